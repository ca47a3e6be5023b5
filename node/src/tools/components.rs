//! `drover-node component-eval`: one text encoder or VAE decoder forward of a diffusers folder
//! on a device, inputs and output f32 — what the GPU bench's parity script
//! (`scripts/gpu_parity.py`) compares against the committed diffusers fixtures, as `unet-eval`
//! does for the UNet.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::eval::{device_and_dtype, tensor_from};
use super::{host, io, write_f32};
use crate::burn::clip::{ClipConfig, ClipText, clip_prefix};
use crate::burn::tensor_file::TensorFile;
use crate::burn::vae::{VaeConfig, VaeDecoder};
use crate::burn::weights::Loader;
use crate::error::{NodeError, Result};

/// One `component-eval` run.
pub struct ComponentEval<'a> {
    /// `text-encoder` (tensor `input_ids` in, the last hidden state out) or `vae` (tensor
    /// `latents` in, the decoded image out).
    pub component: &'a str,
    /// A diffusers folder (`text_encoder/`, `vae/`).
    pub model: &'a Path,
    /// The input tensors (.safetensors).
    pub inputs: &'a Path,
    /// Where tensor `out` is written.
    pub output: &'a Path,
    /// `cpu` or `cuda` (cuda builds), optionally `-f16` / `-bf16` for the weights' dtype.
    pub device: &'a str,
}

/// Runs the component on the inputs and writes `out` (f32 whatever the weights' dtype).
pub fn component_eval(o: &ComponentEval) -> Result<()> {
    match device_and_dtype(o.device)? {
        #[cfg(feature = "cuda")]
        ("cuda", dtype) => component_eval_on::<crate::burn::Gpu>(o, &Default::default(), dtype),
        (_, dtype) => component_eval_on::<crate::burn::Cpu>(o, &Default::default(), dtype),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))
}

fn component_eval_on<B: Backend>(
    o: &ComponentEval,
    device: &B::Device,
    dtype: DType,
) -> Result<()> {
    let inputs = TensorFile::open(o.inputs)?;
    let out = match o.component {
        "text-encoder" => {
            let dir = o.model.join("text_encoder");
            let config: ClipConfig = read_json(&dir.join("config.json"))?;
            let file = TensorFile::open(&dir.join("model.safetensors"))?;
            let mut l = Loader::<B>::prefixed(&file, clip_prefix(&file), device).with_dtype(dtype);
            let clip = ClipText::load(&mut l, &config)?;
            let ids: Vec<u32> = inputs
                .read("input_ids")?
                .data
                .iter()
                .map(|&v| v as u32)
                .collect();
            host(clip.forward(&[ids])?)?
        }
        "vae" => {
            let dir = o.model.join("vae");
            let config: VaeConfig = read_json(&dir.join("config.json"))?;
            let file = TensorFile::open(&dir.join("diffusion_pytorch_model.safetensors"))?;
            let mut l = Loader::<B>::prefixed(&file, "", device).with_dtype(dtype);
            let vae = VaeDecoder::load(&mut l, &config)?;
            let latents: Tensor<B, 4> = tensor_from(&inputs, "latents", device)?;
            host(vae.forward(latents))?
        }
        other => {
            return Err(NodeError::Config(format!(
                "component {other}: expected text-encoder or vae"
            )));
        }
    };
    write_f32(o.output, vec![("out".to_string(), out)])
}
