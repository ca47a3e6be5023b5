//! Reading a model into its parts: a diffusers folder or a single-file LDM checkpoint, text
//! encoders, UNet and VAE onto a device in a precision, with LoRAs merged.

use crate::burn::clip::{ClipConfig, ClipText, clip_prefix};
use crate::burn::tensor_file::TensorFile;
use crate::burn::tokenizer::ClipTokenizer;
use crate::burn::unet::{Unet, UnetConfig};
use crate::burn::vae::vae_diffusers_to_ldm;
use crate::burn::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use crate::burn::weights::{Loader, NameMap, OpenClipSource};
use crate::error::{NodeError, Result};
use crate::sampling::{NoiseSchedule, SchedulerConfig};
use ::burn::tensor::backend::Backend;
use drover_shared::family::ModelFamily;
use std::path::{Path, PathBuf};

use super::*;

/// Weights file names of a diffusers text encoder folder, preferred first.
const TEXT_ENCODER_FILES: &[&str] = &["model.safetensors", "model.fp16.safetensors"];
/// Weights file names of a diffusers UNet or VAE folder, preferred first.
const MODEL_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// Opens the weights file of a diffusers component folder (the first of `names` present).
fn component_file(dir: &Path, names: &[&str]) -> Result<TensorFile> {
    match names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        Some(path) => TensorFile::open(&path),
        None => Err(NodeError::MissingTensor {
            file: dir.display().to_string(),
            name: format!("weights file (one of {})", names.join(", ")),
        }),
    }
}

/// A model's parts as loaded, before they become a [`Pipeline`].
pub(super) struct Parts<B: Backend> {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) text: ClipText<B>,
    pub(super) text2: Option<(ClipTokenizer, ClipText<B>)>,
    pub(super) unet: Unet<B>,
    /// The VAE (decoder, and encoder when the weights have one); `None` when only the
    /// LoRA-bearing parts were loaded.
    pub(super) vae: Option<(VaeDecoder<B>, Option<VaeEncoder<B>>)>,
    pub(super) schedule: NoiseSchedule,
}

/// The VAE encoder when the weights have one (decoder-only VAE files serve text-to-image only).
fn load_encoder<B: Backend>(
    l: &mut Loader<B>,
    config: &VaeConfig,
) -> Result<Option<VaeEncoder<B>>> {
    if l.has("encoder.conv_in.weight") {
        VaeEncoder::load(l, config).map(Some)
    } else {
        Ok(None)
    }
}

/// Loads a model's parts with `loras` merged; the VAE too when `with_vae` (LoRAs never touch
/// it, so a LoRA switch leaves it loaded).
pub(super) fn load_parts<B: Backend>(
    source: &ModelSource,
    device: &B::Device,
    precision: Precision,
    loras: &[LoraSpec],
    with_vae: bool,
) -> Result<Parts<B>> {
    let mut set = lora_set(loras)?;
    let parts = match source {
        ModelSource::Diffusers(dir) => {
            let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
            let te_dir = dir.join("text_encoder");
            let te_cfg: ClipConfig = read_config(&te_dir.join("config.json"))?;
            let te_file = component_file(&te_dir, TEXT_ENCODER_FILES)?;
            let text = {
                let mut l = Loader::<B>::prefixed(&te_file, clip_prefix(&te_file), device)
                    .with_dtype(precision.weights)
                    .with_lora(&mut set, "text_encoder", "text_model.");
                ClipText::load(&mut l, &te_cfg)?
            };
            let te2_dir = dir.join("text_encoder_2");
            let text2 = if te2_dir.is_dir() {
                let cfg: ClipConfig = read_config(&te2_dir.join("config.json"))?;
                let file = component_file(&te2_dir, TEXT_ENCODER_FILES)?;
                let projection = file
                    .shape("text_projection.weight")
                    .map(|s| s[0])
                    .ok_or_else(|| NodeError::MissingTensor {
                        file: file.path().display().to_string(),
                        name: "text_projection.weight".into(),
                    })?;
                let tower = {
                    let mut l = Loader::<B>::prefixed(&file, clip_prefix(&file), device)
                        .with_dtype(precision.weights)
                        .with_lora(&mut set, "text_encoder_2", "text_model.");
                    ClipText::load(&mut l, &cfg)?
                };
                let mut l = Loader::<B>::prefixed(&file, "", device).with_dtype(precision.weights);
                let tower = tower.with_projection(&mut l, projection)?;
                Some((ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?, tower))
            } else {
                None
            };
            let unet_dir = dir.join("unet");
            let unet_cfg: UnetConfig = read_config(&unet_dir.join("config.json"))?;
            let unet_file = component_file(&unet_dir, MODEL_FILES)?;
            let unet = {
                // SDXL LoRAs from kohya name UNet modules by their LDM paths.
                let ldm = unet_cfg.to_arch();
                let mut l = Loader::<B>::prefixed(&unet_file, "", device)
                    .with_dtype(precision.weights)
                    .with_lora(&mut set, "unet", "")
                    .with_lora_alias(Box::new(move |p| ldm.diffusers_to_ldm(p)));
                Unet::load(&mut l, &unet_cfg)?
            };
            let vae = if with_vae {
                let vae_dir = dir.join("vae");
                let vae_cfg: VaeConfig = read_config(&vae_dir.join("config.json"))?;
                let vae_file = component_file(&vae_dir, MODEL_FILES)?;
                let loader =
                    || Loader::<B>::prefixed(&vae_file, "", device).with_dtype(precision.vae);
                Some((
                    VaeDecoder::load(&mut loader(), &vae_cfg)?,
                    load_encoder(&mut loader(), &vae_cfg)?,
                ))
            } else {
                None
            };
            let schedule = NoiseSchedule::new(scheduler_config(dir)?)?;
            Parts {
                tokenizer,
                text,
                text2,
                unet,
                vae,
                schedule,
            }
        }
        ModelSource::SingleFile { path, family } => {
            let file = TensorFile::open(path)?;
            let cond_dim = file
                .shape("model.diffusion_model.time_embed.cond_proj.weight")
                .map(|s| s[1]);
            let mut unet_cfg = match family {
                ModelFamily::Sd15 => UnetConfig::sd15(cond_dim),
                ModelFamily::Sd2 => UnetConfig::sd2(cond_dim),
                ModelFamily::Sdxl => UnetConfig::sdxl(cond_dim),
                other => {
                    return Err(NodeError::ModelConfig(format!(
                        "{}: {other} is not a text-to-image base model",
                        path.display()
                    )));
                }
            };
            // Inpainting checkpoints take 9 input channels (latent, mask, masked-image latent).
            if let Some(shape) = file.shape("model.diffusion_model.input_blocks.0.0.weight") {
                unet_cfg.in_channels = shape.get(1).copied().unwrap_or(unet_cfg.in_channels);
            }
            let beside = |name: &str| {
                path.parent()
                    .map(|p| p.join(name))
                    .unwrap_or_else(|| PathBuf::from(name))
            };
            let tokenizer = ClipTokenizer::from_dir(&beside("tokenizer"))?;
            let (text, text2) = match family {
                ModelFamily::Sd2 => {
                    // OpenCLIP ViT-H; diffusers' SD2 uses its penultimate layer then the final
                    // norm, which is the 23-layer tower.
                    let src = OpenClipSource::new(&file, "cond_stage_model.model.");
                    let mut l = Loader::<B>::prefixed(&src, "", device)
                        .with_dtype(precision.weights)
                        .with_lora(&mut set, "text_encoder", "text_model.");
                    (ClipText::load(&mut l, &ClipConfig::open_clip_h())?, None)
                }
                ModelFamily::Sdxl => {
                    let text = {
                        let mut l = Loader::<B>::prefixed(
                            &file,
                            "conditioner.embedders.0.transformer.text_model.",
                            device,
                        )
                        .with_dtype(precision.weights)
                        .with_lora(&mut set, "text_encoder", "text_model.");
                        ClipText::load(&mut l, &ClipConfig::clip_l())?
                    };
                    let src = OpenClipSource::new(&file, "conditioner.embedders.1.model.");
                    let cfg = ClipConfig {
                        hidden_size: src.width().unwrap_or(1280),
                        intermediate_size: 4 * src.width().unwrap_or(1280),
                        num_hidden_layers: src.layers(),
                        num_attention_heads: src.width().unwrap_or(1280) / 64,
                        hidden_act: "gelu".into(),
                        ..ClipConfig::clip_l()
                    };
                    let projection = file
                        .shape("conditioner.embedders.1.model.text_projection")
                        .map_or(1280, |s| s[1]);
                    let tower = {
                        let mut l = Loader::<B>::prefixed(&src, "", device)
                            .with_dtype(precision.weights)
                            .with_lora(&mut set, "text_encoder_2", "text_model.");
                        ClipText::load(&mut l, &cfg)?
                    };
                    let tower = tower.with_projection(
                        &mut Loader::<B>::prefixed(&src, "", device).with_dtype(precision.weights),
                        projection,
                    )?;
                    let tokenizer_2 = if beside("tokenizer_2").is_dir() {
                        ClipTokenizer::from_dir(&beside("tokenizer_2"))?
                    } else {
                        ClipTokenizer::from_dir(&beside("tokenizer"))?
                    };
                    (text, Some((tokenizer_2, tower)))
                }
                _ => {
                    let mut l = Loader::<B>::prefixed(
                        &file,
                        "cond_stage_model.transformer.text_model.",
                        device,
                    )
                    .with_dtype(precision.weights)
                    .with_lora(&mut set, "text_encoder", "text_model.");
                    (ClipText::load(&mut l, &ClipConfig::clip_l())?, None)
                }
            };
            let unet = {
                let ldm = unet_cfg.to_arch();
                let alias = ldm.clone();
                let map: NameMap =
                    Box::new(move |n| format!("model.diffusion_model.{}", ldm.diffusers_to_ldm(n)));
                let mut l = Loader::<B>::new(&file, map, device)
                    .with_dtype(precision.weights)
                    .with_lora(&mut set, "unet", "")
                    .with_lora_alias(Box::new(move |p| alias.diffusers_to_ldm(p)));
                Unet::load(&mut l, &unet_cfg)?
            };
            let vae_cfg = VaeConfig {
                scaling_factor: if *family == ModelFamily::Sdxl {
                    0.13025
                } else {
                    0.18215
                },
                ..VaeConfig::sd()
            };
            let levels = vae_cfg.block_out_channels.len();
            let map = move || -> NameMap {
                Box::new(move |n| format!("first_stage_model.{}", vae_diffusers_to_ldm(n, levels)))
            };
            let vae = if with_vae {
                let loader = || Loader::<B>::new(&file, map(), device).with_dtype(precision.vae);
                Some((
                    VaeDecoder::load(&mut loader(), &vae_cfg)?,
                    load_encoder(&mut loader(), &vae_cfg)?,
                ))
            } else {
                None
            };
            Parts {
                tokenizer,
                text,
                text2,
                unet,
                vae,
                schedule: NoiseSchedule::new(SchedulerConfig::default())?,
            }
        }
    };
    set.check_claimed()?;
    let text_width = parts.text.config().hidden_size
        + parts
            .text2
            .as_ref()
            .map_or(0, |(_, t)| t.config().hidden_size);
    if parts.unet.config().cross_attention_dim != text_width {
        return Err(NodeError::ModelConfig(format!(
            "the UNet attends to {}-wide text but the text encoders give {text_width}",
            parts.unet.config().cross_attention_dim,
        )));
    }
    if parts.unet.config().text_time() != parts.text2.is_some() {
        return Err(NodeError::ModelConfig(
            "an SDXL UNet (text_time conditioning) needs text_encoder_2 and tokenizer_2, and only it uses them"
                .into(),
        ));
    }
    if parts.tokenizer.vocab_size() > parts.text.config().vocab_size {
        return Err(NodeError::ModelConfig(format!(
            "the tokenizer has {} tokens but the text encoder only {}",
            parts.tokenizer.vocab_size(),
            parts.text.config().vocab_size
        )));
    }
    Ok(parts)
}
