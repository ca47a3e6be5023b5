//! Every sampler against diffusers' scheduler of the same name: full denoising loops with
//! classifier-free guidance (batched, as the pipeline runs it) on the tiny SD1.5 and SDXL
//! UNets, from `scripts/make_sampler_fixtures.py` — LCM included, on the standard SD1.5 UNet
//! (no guidance embedding, so CFG), the loop an LCM-LoRA runs (nodes do not offer `lcm` on
//! standard models yet: routing must first tell an LCM-LoRA job from a plain one). Ancestral and SDE samplers replay the noise
//! diffusers drew. Final latents agree within 1e-4 absolute, or within 32 f32 ulps of the
//! latent's largest value where that is looser: a random UNet is no denoiser, so its x₀
//! estimates (x − σ·ε at σ up to 14.6) push final latents to |x| ≈ 25–60, where one f32 ulp
//! is already 2–4e-6 and eight chaotic UNet calls amplify rounding differences.

use std::ops::ControlFlow;

use burn::tensor::{Tensor, TensorData};
use drover_node::burn::Cpu;
use drover_node::burn::denoise::{Prompt, TextConditioning, sample_unet};
use drover_node::burn::tensor_file::TensorFile;
use drover_node::burn::unet::Unet;
use drover_node::sampling::{NoiseSchedule, Plan, Sampler, SchedulerConfig, SigmaSchedule};
use serde::Deserialize;

use super::{TOLERANCE, fixtures, load_unet, sdxl_dir, values};

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sampler: String,
    model: String,
    steps: usize,
    guidance: f32,
    guidance_rescale: f32,
    config: SchedulerConfig,
    noise_draws: usize,
    unet_calls: usize,
    timesteps: Vec<f32>,
}

/// The fixture's sampler ids as Drover's sampler and sigma schedule.
pub(crate) fn sampler(id: &str) -> (Sampler, SigmaSchedule) {
    match id {
        "euler" => (Sampler::Euler, SigmaSchedule::Normal),
        "euler_karras" => (Sampler::Euler, SigmaSchedule::Karras),
        "euler_a" => (Sampler::EulerA, SigmaSchedule::Normal),
        "heun" => (Sampler::Heun, SigmaSchedule::Normal),
        "dpmpp_2m" => (Sampler::Dpmpp2m, SigmaSchedule::Normal),
        "dpmpp_2m_karras" => (Sampler::Dpmpp2m, SigmaSchedule::Karras),
        "dpmpp_2m_sde_karras" => (Sampler::Dpmpp2mSde, SigmaSchedule::Karras),
        "dpmpp_sde" => (Sampler::DpmppSde, SigmaSchedule::Normal),
        "dpmpp_sde_karras" => (Sampler::DpmppSde, SigmaSchedule::Karras),
        "ddim" => (Sampler::Ddim, SigmaSchedule::Normal),
        "unipc" => (Sampler::UniPc, SigmaSchedule::Normal),
        "unipc_karras" => (Sampler::UniPc, SigmaSchedule::Karras),
        // LCM on a standard UNet (an LCM-LoRA's use), guided by CFG.
        "lcm" => (Sampler::Lcm, SigmaSchedule::Automatic),
        other => panic!("fixture sampler {other} has no counterpart here"),
    }
}

struct Inputs(TensorFile);

impl Inputs {
    fn tensor<const D: usize>(&self, name: &str) -> Tensor<Cpu, D> {
        let t = self.0.read(name).unwrap();
        Tensor::from_data(TensorData::new(t.data, t.shape), &Default::default())
    }
}

fn conditioning(inputs: &Inputs, model: &str) -> TextConditioning<Cpu> {
    let prompt = |which: &str| Prompt {
        context: inputs.tensor(&format!("{model}.{which}")),
        pooled: (model == "sdxl").then(|| inputs.tensor(&format!("sdxl.pooled_{which}"))),
    };
    let ids = inputs.0.read("sdxl.time_ids").unwrap().data;
    TextConditioning {
        prompt: prompt("cond"),
        negative: Some(prompt("uncond")),
        time_ids: std::array::from_fn(|i| ids[i]),
    }
}

#[test]
fn every_sampler_matches_diffusers_with_cfg_on_sd15_and_sdxl() {
    let dir = fixtures();
    let cases: Cases = super::read_config(&dir.join("samplers.json"));
    let inputs = Inputs(TensorFile::open(&dir.join("samplers.safetensors")).unwrap());
    let sd15 = load_unet(&dir.join("tiny-unet"), None).unwrap();
    let sdxl = load_unet(&sdxl_dir().join("unet"), None).unwrap();
    let mut covered = std::collections::BTreeSet::new();
    let mut failed = Vec::new();
    assert!(cases.cases.len() >= 15, "the fixture lost cases");
    for case in &cases.cases {
        let (kind, sigmas) = sampler(&case.sampler);
        covered.insert(kind);
        let schedule = NoiseSchedule::new(case.config.clone()).unwrap();
        let plan = Plan::new(&schedule, kind, sigmas, case.steps).unwrap();
        let timesteps = plan.timesteps();
        assert_eq!(
            timesteps.len(),
            case.unet_calls,
            "{}: UNet calls",
            case.name
        );
        for (got, want) in timesteps.iter().zip(&case.timesteps) {
            assert!(
                (got - want).abs() < 1e-3,
                "{}: timesteps {timesteps:?} vs {:?}",
                case.name,
                case.timesteps
            );
        }
        let unet: &Unet<Cpu> = if case.model == "sdxl" { &sdxl } else { &sd15 };
        let text = conditioning(&inputs, &case.model);
        let mut drawn = 0;
        let mut steps_seen = 0;
        let latent = sample_unet(
            unet,
            &text,
            inputs.tensor(&format!("{}.init", case.model)),
            &plan,
            case.guidance,
            case.guidance_rescale,
            |k| {
                drawn += 1;
                inputs.tensor(&format!("{}.noise.{k}", case.name))
            },
            |k, total| {
                steps_seen = k;
                assert_eq!(total, case.steps);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!(steps_seen, case.steps, "{}: progress", case.name);
        assert!(
            drawn <= case.noise_draws && (case.noise_draws == 0) == (drawn == 0),
            "{}: drew {drawn} noises, diffusers {}",
            case.name,
            case.noise_draws
        );
        let want = inputs.0.read(&format!("{}.final", case.name)).unwrap();
        let got = values(latent);
        let err = got
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!(
            "parity sampler {}: max abs error {err:.3e} (values up to {scale:.2})",
            case.name
        );
        let allowed = TOLERANCE.max(32.0 * f32::EPSILON * scale);
        if err > allowed {
            failed.push(format!(
                "{}: max abs error {err} > {allowed} (values up to {scale})",
                case.name
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    for s in Sampler::ALL {
        assert!(covered.contains(&s), "no parity case for {s}");
    }
}

#[test]
fn a_cancel_stops_a_standard_sampler_at_the_next_step() {
    let dir = fixtures();
    let inputs = Inputs(TensorFile::open(&dir.join("samplers.safetensors")).unwrap());
    let sd15 = load_unet(&dir.join("tiny-unet"), None).unwrap();
    let schedule = NoiseSchedule::new(SchedulerConfig::default()).unwrap();
    let plan = Plan::new(&schedule, Sampler::Heun, SigmaSchedule::Karras, 6).unwrap();
    let mut seen = 0;
    let err = sample_unet(
        &sd15,
        &conditioning(&inputs, "sd15"),
        inputs.tensor("sd15.init"),
        &plan,
        7.0,
        0.0,
        |_| unreachable!("heun draws no noise"),
        |k, _| {
            seen = k;
            if k == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, drover_node::error::NodeError::Cancelled),
        "{err}"
    );
    assert_eq!(seen, 2);
}
