//! Numerical parity of the Burn SD pipeline against diffusers/transformers.
//!
//! The fixtures in `tests/fixtures/` come from `scripts/make_fixtures.py`: tiny random models
//! (weights stored as f16/bf16, so both sides compute with identical values), inputs, and the
//! outputs PyTorch produced. Every comparison must agree within 1e-4 (max absolute error, f32).
//!
//! - `batch`: jobs rendered in one batch give the images they render alone.
//! - `components`: the SD1.5 tokenizer, text encoder, UNet (with LoRAs, with the LCM guidance
//!   embedding) and VAE decoder, one by one.
//! - `pipeline`: the SD1.5 LCM loop end to end, and `generate` (deterministic, cancellable).
//! - `layouts`: single-file LDM and OpenCLIP names load the same weights; broken weights and
//!   LoRAs fail naming what is wrong.
//! - `half`: the f16/bf16 path of GPU workers (weights and compute in half precision, the VAE in
//!   f32), run on the CPU, within tolerances derived from the formats.
//! - `img2img`: the VAE encoder, and img2img and inpainting runs against diffusers' pipelines.
//! - `samplers`: Euler, Euler a, Heun, DPM++ 2M (SDE, Karras), UniPC, DDIM with CFG against
//!   diffusers.
//! - `sdxl`: both text encoders, the text_time UNet, the LCM loop and LoRAs in every naming.
//! - `upscale`: super-resolution networks (RRDBNet in three namings, compact SRVGGNet) against
//!   spandrel (`scripts/make_upscaler_fixtures.py`), and tiled against untiled images.
//!
//! This file holds what they share: the fixtures, the expected tensors and [`check`].

// Helpers outside #[test] fns panic on broken fixtures, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod batch;
mod components;
mod half;
mod img2img;
mod layouts;
mod pipeline;
mod samplers;
mod sdxl;
mod upscale;

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use drover_node::burn::Cpu;
use drover_node::burn::lora::LoraSet;
use drover_node::burn::tensor_file::{HostTensor, TensorFile};
use drover_node::burn::unet::{Unet, UnetConfig};
use drover_node::burn::vae::{VaeConfig, VaeDecoder};
use drover_node::burn::weights::{Loader, NameMap};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("tiny-sd15-lcm")
}

struct Expected(TensorFile);

impl Expected {
    fn load() -> Self {
        Self(TensorFile::open(&fixtures().join("parity.safetensors")).unwrap())
    }

    fn host(&self, name: &str) -> HostTensor {
        self.0.read(name).unwrap()
    }

    fn tensor<const D: usize>(&self, name: &str) -> Tensor<Cpu, D> {
        let t = self.host(name);
        Tensor::from_data(TensorData::new(t.data, t.shape), &Default::default())
    }
}

fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Asserts the max absolute error is within tolerance and returns it.
fn check<const D: usize>(what: &str, got: Tensor<Cpu, D>, want: &HostTensor) -> f32 {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let got = values(got);
    let err = got
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "parity {what}: max abs error {err:.3e} over {} values",
        got.len()
    );
    assert!(
        err <= TOLERANCE,
        "{what}: max abs error {err} > {TOLERANCE}"
    );
    err
}

fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_unet(dir: &Path, lora: Option<&Path>) -> drover_node::error::Result<Unet<Cpu>> {
    let cfg: UnetConfig = read_config(&dir.join("config.json"));
    let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors"))?;
    let mut set = LoraSet::new();
    if let Some(path) = lora {
        set.add("test", path, 0.8)?;
    }
    let unet = {
        let mut l =
            Loader::<Cpu>::prefixed(&file, "", &Default::default()).with_lora(&mut set, "unet", "");
        Unet::load(&mut l, &cfg)?
    };
    set.check_claimed()?;
    Ok(unet)
}

fn load_vae(map: Option<NameMap>, file: &TensorFile) -> VaeDecoder<Cpu> {
    let cfg: VaeConfig = read_config(&model_dir().join("vae/config.json"));
    let mut l = match map {
        Some(m) => Loader::<Cpu>::new(file, m, &Default::default()),
        None => Loader::<Cpu>::prefixed(file, "", &Default::default()),
    };
    VaeDecoder::load(&mut l, &cfg).unwrap()
}

fn sdxl_dir() -> PathBuf {
    fixtures().join("tiny-sdxl-lcm")
}

/// The token ids of the prompt the fixtures were made with.
fn prompt_ids(want: &Expected) -> Vec<u32> {
    want.host("text.input_ids")
        .data
        .iter()
        .map(|&v| v as u32)
        .collect()
}
