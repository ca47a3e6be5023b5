//! The SD1.5 pipeline end to end: the LCM loop against diffusers, and `generate`.

use std::ops::ControlFlow;

use drover_node::burn::Cpu;
use drover_node::burn::denoise::Prompt;
use drover_node::burn::denoise::TextConditioning;
use drover_node::burn::pipeline::{ModelSource, Pipeline, Precision};
use drover_node::error::NodeError;
use drover_node::render::Params;
use drover_node::sampling::SigmaSchedule;

use crate::{Expected, check, model_dir, prompt_ids};

#[test]
fn full_lcm_loop_matches_diffusers() {
    let want = Expected::load();
    let pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        Precision::F32,
        &[],
    )
    .unwrap();
    let timesteps: Vec<usize> = want
        .host("lcm.timesteps")
        .data
        .iter()
        .map(|&v| v as usize)
        .collect();
    let planned: Vec<usize> = pipe
        .plan(None, SigmaSchedule::Automatic, 4)
        .unwrap()
        .timesteps()
        .iter()
        .map(|&t| t as usize)
        .collect();
    assert_eq!(planned, timesteps);
    let ids = prompt_ids(&want);
    let ctx = pipe.encode_ids(&ids, None).unwrap().context;
    let mut seen = Vec::new();
    let denoised = pipe
        .denoise(
            &TextConditioning {
                prompt: Prompt {
                    context: ctx,
                    pooled: None,
                },
                negative: None,
                time_ids: [0.0; 6],
            },
            want.tensor("lcm.init"),
            &pipe.plan(None, SigmaSchedule::Automatic, 4).unwrap(),
            8.0,
            0.0,
            |k| want.tensor(&format!("lcm.noise.{k}")),
            |k, total| {
                seen.push((k, total));
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    check(
        "lcm final latent",
        denoised.clone(),
        &want.host("lcm.denoised.3"),
    );
    check("lcm image", pipe.decode(denoised), &want.host("lcm.image"));
}

#[test]
fn generate_renders_deterministic_images_and_stops_on_cancel() {
    let pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        Precision::F32,
        &[],
    )
    .unwrap();
    let params = Params {
        model: String::new(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        width: 32,
        height: 16,
        steps: 3,
        guidance: 8.0,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: SigmaSchedule::Automatic,
        seed: 42,
        loras: Vec::new(),
        source: None,
    };
    let a = pipe
        .generate(&params, |_, _| ControlFlow::Continue(()))
        .unwrap();
    let b = pipe
        .generate(&params, |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!((a.width, a.height, a.rgb.len()), (32, 16, 32 * 16 * 3));
    assert_eq!(a, b, "same seed, same image");
    let c = pipe
        .generate(
            &Params {
                seed: 43,
                ..params.clone()
            },
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_ne!(a.rgb, c.rgb, "another seed, another image");
    let mut calls = 0;
    let err = pipe
        .generate(&params, |_, _| {
            calls += 1;
            ControlFlow::Break(())
        })
        .err()
        .unwrap();
    assert!(matches!(err, NodeError::Cancelled));
    assert_eq!(calls, 1, "stops after the first step");
    let err = pipe
        .generate(
            &Params {
                width: 18,
                ..params
            },
            |_, _| ControlFlow::Continue(()),
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a multiple of 4"), "{err}");
}

#[test]
fn a_prediction_override_reaches_the_schedule_and_bad_ones_are_refused() {
    use drover_node::sampling::Prediction;
    let mut pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        Precision::F32,
        &[],
    )
    .unwrap();
    assert_eq!(pipe.schedule().prediction(), Prediction::Epsilon);
    pipe.set_prediction("v_prediction").unwrap();
    assert_eq!(pipe.schedule().prediction(), Prediction::V);
    let err = pipe.set_prediction("sample").unwrap_err().to_string();
    assert!(err.contains("prediction_type"), "{err}");
}

/// A LoRA switch reloads what LoRAs touch and nothing else, exactly: switching a LoRA on gives
/// what a pipeline loaded with it gives, switching it off gives back the base images.
#[test]
fn lora_switches_equal_fresh_loads_both_ways() {
    use drover_node::burn::pipeline::LoraSpec;
    let lora = [LoraSpec {
        name: "kohya".into(),
        path: crate::fixtures().join("lora-kohya.safetensors"),
        strength: 0.8,
        lcm: false,
    }];
    let load = |loras: &[LoraSpec]| {
        Pipeline::<Cpu>::load(
            ModelSource::Diffusers(model_dir()),
            &Default::default(),
            Precision::F32,
            loras,
        )
        .unwrap()
    };
    let params = Params {
        model: String::new(),
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        width: 32,
        height: 32,
        steps: 2,
        guidance: 8.0,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: SigmaSchedule::Automatic,
        seed: 7,
        loras: Vec::new(),
        source: None,
    };
    let go = |_: usize, _: usize| ControlFlow::Continue(());
    let mut pipe = load(&[]);
    let base = pipe.generate(&params, go).unwrap();
    pipe.set_loras(&lora).unwrap();
    let switched = pipe.generate(&params, go).unwrap();
    let fresh = load(&lora).generate(&params, go).unwrap();
    assert_ne!(base.rgb, switched.rgb, "the LoRA changes the image");
    assert_eq!(switched, fresh, "switched on = loaded with it");
    pipe.set_loras(&[]).unwrap();
    assert_eq!(
        pipe.generate(&params, go).unwrap(),
        base,
        "switched off = base"
    );
}
