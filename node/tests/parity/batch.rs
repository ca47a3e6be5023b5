//! Dynamic batching's promise: a job rendered in a batch gives the image it renders alone.
//! Demo models (`drover-node make-model`: SD1.5 LCM with its guidance embedding, SD1.5 standard
//! with classifier-free guidance, SDXL with pooled text and time ids), three jobs with their own
//! prompts, negative prompts and seeds, rendered one by one and as one batch. Pixels may differ
//! by one step of 255 at most (a batched matrix product may sum in another order; a value on a
//! rounding boundary then lands on the other side), and in practice do not differ at all.

use std::ops::ControlFlow;

use drover_node::burn::Cpu;
use drover_node::burn::pipeline::{ModelSource, Pipeline, Precision};
use drover_node::render::Params;
use drover_node::sampling::{Sampler, SigmaSchedule};
use drover_shared::family::ModelFamily;

fn job(
    prompt: &str,
    negative: &str,
    seed: u64,
    sampler: Option<Sampler>,
    steps: usize,
    guidance: f32,
) -> Params {
    Params {
        model: String::new(),
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        width: 64,
        height: 64,
        steps,
        guidance,
        guidance_rescale: 0.0,
        sampler,
        schedule: SigmaSchedule::Automatic,
        seed,
        loras: Vec::new(),
        source: None,
    }
}

/// A demo model (folder name, family, variant) and the jobs' sampler, steps and guidance.
type Case = (
    &'static str,
    ModelFamily,
    &'static str,
    Option<Sampler>,
    usize,
    f32,
);

/// The demo model `name` under `dir` (made on first use: `drover-node make-model`), loaded.
fn demo(dir: &std::path::Path, name: &str, family: ModelFamily, variant: &str) -> Pipeline<Cpu> {
    let out = dir.join(name);
    if !out.exists() {
        drover_node::tools::make_model(&out, 5, family, variant).unwrap();
    }
    Pipeline::<Cpu>::load(
        ModelSource::Diffusers(out),
        &Default::default(),
        Precision::F32,
        &[],
    )
    .unwrap()
}

/// Renders `jobs` alone and as a batch; answers the largest pixel difference.
fn batched_vs_alone(pipe: &Pipeline<Cpu>, jobs: &[Params]) -> u8 {
    let go = |_: usize, _: usize| ControlFlow::Continue(());
    let alone: Vec<_> = jobs.iter().map(|p| pipe.generate(p, go).unwrap()).collect();
    let mut steps = Vec::new();
    let together = pipe
        .generate_batch(jobs, |k, n| {
            steps.push((k, n));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(together.len(), jobs.len());
    assert_eq!(
        steps.last().map(|s| s.0),
        Some(jobs[0].steps),
        "one progress per step"
    );
    let mut worst = 0u8;
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!((a.width, a.height), (b.width, b.height));
        for (x, y) in a.rgb.iter().zip(&b.rgb) {
            worst = worst.max(x.abs_diff(*y));
        }
    }
    // The jobs differ, so a batch that mixed them up would show it.
    assert_ne!(alone[0].rgb, alone[1].rgb);
    worst
}

#[test]
fn a_job_rendered_in_a_batch_is_the_image_it_renders_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [Case; 4] = [
        ("sd15-lcm", ModelFamily::Sd15, "lcm", None, 3, 1.5),
        (
            "sd15-std",
            ModelFamily::Sd15,
            "standard",
            Some(Sampler::EulerA),
            4,
            6.0,
        ),
        (
            "sd15-std",
            ModelFamily::Sd15,
            "standard",
            Some(Sampler::DpmppSde),
            3,
            5.0,
        ),
        ("sdxl-lcm", ModelFamily::Sdxl, "lcm", None, 2, 1.5),
    ];
    for (name, family, variant, sampler, steps, guidance) in cases {
        let pipe = demo(dir.path(), name, family, variant);
        let jobs = [
            job(
                "a red fox in the snow",
                "blurry",
                1,
                sampler,
                steps,
                guidance,
            ),
            job("a lighthouse at dusk", "", 2, sampler, steps, guidance),
            job(
                "a red fox in the snow",
                "low quality",
                3,
                sampler,
                steps,
                guidance,
            ),
        ];
        let worst = batched_vs_alone(&pipe, &jobs);
        println!("batch {name} {sampler:?}: largest pixel difference batched vs alone {worst}");
        assert!(worst <= 1, "{name} {sampler:?}: pixels differ by {worst}");
    }
}

#[test]
fn jobs_that_cannot_share_a_batch_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = demo(dir.path(), "m", ModelFamily::Sd15, "lcm");
    let a = job("x", "", 1, None, 2, 1.5);
    let mut b = job("y", "", 2, None, 3, 1.5);
    let go = |_: usize, _: usize| ControlFlow::Continue(());
    let err = pipe
        .generate_batch(&[a.clone(), b.clone()], go)
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("share size, steps"),
        "{err}"
    );
    b.steps = 2;
    b.guidance = 2.0;
    assert!(pipe.generate_batch(&[a, b], go).is_err());
}

#[test]
fn a_job_that_leaves_a_batch_does_not_disturb_the_others() {
    // Three jobs; the middle one leaves after the first step (a cancel). The model calls after
    // run on the two left (CFG and LCM's guidance embedding alike); their images are the ones
    // they render alone, and the one that left gets none.
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Option<Sampler>, f32); 2] = [
        ("standard", "standard", Some(Sampler::EulerA), 6.0),
        ("lcm", "lcm", None, 1.5),
    ];
    for (name, variant, sampler, guidance) in cases {
        let pipe = demo(dir.path(), name, ModelFamily::Sd15, variant);
        let jobs = [
            job("a red fox", "blurry", 1, sampler, 4, guidance),
            job("a lighthouse", "", 2, sampler, 4, guidance),
            job("a harbour at night", "fog", 3, sampler, 4, guidance),
        ];
        let go = |_: usize, _: usize| ControlFlow::Continue(());
        let alone: Vec<_> = jobs.iter().map(|p| pipe.generate(p, go).unwrap()).collect();
        let done = std::cell::Cell::new(0);
        let together = pipe
            .generate_batch_live(
                &jobs,
                |k, _| {
                    done.set(k);
                    ControlFlow::Continue(())
                },
                |i| i != 1 || done.get() < 1,
            )
            .unwrap();
        assert!(
            together[1].is_none(),
            "{name}: the job that left got an image"
        );
        for i in [0, 2] {
            let image = together[i]
                .as_ref()
                .expect("a job that stayed gets its image");
            let worst = alone[i]
                .rgb
                .iter()
                .zip(&image.rgb)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            assert!(
                worst <= 1,
                "{name}: job {i} differs by {worst} after another left"
            );
        }
        // Every job leaving stops nothing early but gives no image at all.
        let none = pipe.generate_batch_live(&jobs, go, |_| false).unwrap();
        assert!(none.iter().all(Option::is_none));
    }
}
