//! The half-precision path GPU workers take (weights and compute in f16 or bf16, the VAE in f32,
//! the scheduler's latents in f32), run here on the CPU backend, which computes in those dtypes
//! too, against the same f32 diffusers references as everything else.
//!
//! Tolerances come from the formats: f16 keeps 11 significant bits (unit roundoff 2^-11 ≈
//! 4.9e-4), bf16 8 (2^-8 ≈ 3.9e-3). A UNet forward is ~20 layers deep, each normalised, and its
//! outputs are O(1): errors of a few units of roundoff per layer that add up like a random walk
//! give ~1e-2 for f16 and ~1e-1 for bf16, which is also where PyTorch's own fp16/bf16 UNets sit
//! against fp32. Each check also requires the error to be above f32's level, so a path that
//! silently ran in f32 fails.

use burn::tensor::{DType, Tensor};
use drover_node::burn::Cpu;
use drover_node::burn::denoise::Prompt;
use drover_node::burn::denoise::TextConditioning;
use drover_node::burn::pipeline::{ModelSource, Pipeline, Precision};
use drover_node::burn::tensor_file::{HostTensor, TensorFile};
use drover_node::burn::unet::{Unet, UnetConfig};
use drover_node::burn::weights::Loader;
use drover_node::sampling::SigmaSchedule;

use crate::{Expected, fixtures, model_dir, prompt_ids, read_config, values};

/// Max absolute error against `want`, after checking the shape and that `got` came back as f32.
fn error<const D: usize>(what: &str, got: Tensor<Cpu, D>, want: &HostTensor) -> f32 {
    assert_eq!(got.dtype(), DType::F32, "{what}: answered in f32");
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let err = values(got)
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("half precision {what}: max abs error {err:.3e}");
    err
}

/// Asserts `err` is within `tolerance` and above what f32 arithmetic alone produces.
fn within(what: &str, err: f32, tolerance: f32) {
    assert!(
        err <= tolerance,
        "{what}: max abs error {err} > {tolerance}"
    );
    assert!(
        err > 1e-5,
        "{what}: error {err} is at f32 level: the half-precision path did not run"
    );
}

fn unet_in(dtype: DType) -> Unet<Cpu> {
    let dir = fixtures().join("tiny-unet");
    let cfg: UnetConfig = read_config(&dir.join("config.json"));
    let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut l = Loader::<Cpu>::prefixed(&file, "", &Default::default()).with_dtype(dtype);
    Unet::load(&mut l, &cfg).unwrap()
}

#[test]
fn unet_in_f16_and_bf16_tracks_the_f32_reference() {
    let want = Expected::load();
    let sample: Tensor<Cpu, 4> = want.tensor("unet.sample");
    let ctx: Tensor<Cpu, 3> = want.tensor("unet.encoder_hidden_states");
    for (dtype, tolerance) in [(DType::F16, 1e-2), (DType::BF16, 1e-1)] {
        let what = format!("unet in {dtype:?}");
        let out = unet_in(dtype)
            .forward(sample.clone(), 759.0, &ctx, None, None)
            .unwrap();
        within(&what, error(&what, out, &want.host("unet.out")), tolerance);
    }
}

#[test]
fn lcm_pipeline_in_f16_with_an_f32_vae_tracks_the_reference_image() {
    let want = Expected::load();
    let pipe = Pipeline::<Cpu>::load(
        ModelSource::Diffusers(model_dir()),
        &Default::default(),
        Precision::half(DType::F16),
        &[],
    )
    .unwrap();
    assert_eq!(pipe.precision(), Precision::half(DType::F16));
    let context = pipe.encode_ids(&prompt_ids(&want), None).unwrap().context;
    assert_eq!(context.dtype(), DType::F16, "the text encoder runs in f16");
    let text = TextConditioning {
        prompt: Prompt {
            context,
            pooled: None,
        },
        negative: None,
        time_ids: [0.0; 6],
    };
    let denoised = pipe
        .denoise(
            &text,
            want.tensor("lcm.init"),
            &pipe.plan(None, SigmaSchedule::Automatic, 4).unwrap(),
            8.0,
            0.0,
            |k| want.tensor(&format!("lcm.noise.{k}")),
            |_, _| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    let latent_err = error(
        "lcm final latent",
        denoised.clone(),
        &want.host("lcm.denoised.3"),
    );
    within("lcm final latent", latent_err, 5e-2);
    // The f32 VAE adds no half-precision error of its own: the image is off by what the latent
    // carries through the decoder, not more.
    let image_err = error("lcm image", pipe.decode(denoised), &want.host("lcm.image"));
    within("lcm image", image_err, 1e-2);
}
