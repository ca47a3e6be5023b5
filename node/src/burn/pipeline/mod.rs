//! The SD1.x/SD2.x/SDXL pipeline: load a model (diffusers folder or single-file LDM checkpoint),
//! merge LoRAs, tokenize → encode → sample ([`crate::sampling`]: LCM or a standard sampler with
//! classifier-free guidance) → decode.

mod batch;
mod source;

pub use source::{latent_mask, mask_weights, signed_planes};

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{DType, Tensor, TensorData};
use drover_shared::family::ModelFamily;
use serde::de::DeserializeOwned;

use super::clip::{ClipConfig, ClipText, clip_prefix};
use super::denoise::{Prompt, TextConditioning, sample_unet, sample_unet_from};
use super::lora::LoraSet;
use super::tensor_file::TensorFile;
use super::tokenizer::{ClipTokenizer, Tokens};
use super::unet::{AddedCond, Unet, UnetConfig};
pub use super::vae::vae_diffusers_to_ldm;
use super::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use super::weights::{Loader, NameMap, OpenClipSource};
use crate::error::{NodeError, Result};
use crate::render::{Image, Params, gaussian, rgb_from_chw, step_noise_seed};
use crate::sampling::{Keep, NoiseSchedule, Plan, Sampler, SchedulerConfig, SigmaSchedule};

/// Where a model's parts live.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, `tokenizer/`).
    Diffusers(PathBuf),
    /// A single-file LDM checkpoint of `family`, with a tokenizer folder found beside it.
    SingleFile {
        /// The `.safetensors` checkpoint.
        path: PathBuf,
        /// Its family (from detection).
        family: ModelFamily,
    },
}

/// One LoRA to merge: its name, file and strength.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// Catalog name (for messages).
    pub name: String,
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Strength.
    pub strength: f32,
    /// An LCM-LoRA: merged, it lets a standard model run the `lcm` sampler.
    pub lcm: bool,
}

/// The dtypes a pipeline's weights are stored and computed in. The scheduler's latents stay f32
/// whatever these are; each network casts its inputs to its weights' dtype and answers in theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    /// Text encoders and UNet.
    pub weights: DType,
    /// VAE decoder (f32 for half-precision models: SD VAEs overflow f16 when decoding).
    pub vae: DType,
}

impl Precision {
    /// Everything in f32 (CPU workers, parity tests).
    pub const F32: Self = Self {
        weights: DType::F32,
        vae: DType::F32,
    };

    /// Text encoders and UNet in `dtype` (f16 or bf16), the VAE in f32.
    pub fn half(dtype: DType) -> Self {
        Self {
            weights: dtype,
            vae: DType::F32,
        }
    }
}

/// A loaded pipeline on one device.
pub struct Pipeline<B: Backend> {
    source: ModelSource,
    device: B::Device,
    precision: Precision,
    tokenizer: ClipTokenizer,
    text: ClipText<B>,
    text2: Option<(ClipTokenizer, ClipText<B>)>,
    unet: Unet<B>,
    vae: VaeDecoder<B>,
    encoder: Option<VaeEncoder<B>>,
    schedule: NoiseSchedule,
    loras: Vec<LoraSpec>,
}

/// The noise schedule settings of a model folder: `scheduler/scheduler_config.json`, or Stable
/// Diffusion's when the folder has none.
pub fn scheduler_config(dir: &Path) -> Result<SchedulerConfig> {
    let sched = dir.join("scheduler").join("scheduler_config.json");
    if sched.is_file() {
        read_config(&sched)
    } else {
        Ok(SchedulerConfig::default())
    }
}

/// Reads a JSON config, naming the file in errors.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))
}

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

struct Parts<B: Backend> {
    tokenizer: ClipTokenizer,
    text: ClipText<B>,
    text2: Option<(ClipTokenizer, ClipText<B>)>,
    unet: Unet<B>,
    /// The VAE (decoder, and encoder when the weights have one); `None` when only the
    /// LoRA-bearing parts were loaded.
    vae: Option<(VaeDecoder<B>, Option<VaeEncoder<B>>)>,
    schedule: NoiseSchedule,
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
fn load_parts<B: Backend>(
    source: &ModelSource,
    device: &B::Device,
    precision: Precision,
    loras: &[LoraSpec],
    with_vae: bool,
) -> Result<Parts<B>> {
    let mut set = LoraSet::new();
    for l in loras {
        set.add(&l.name, &l.path, l.strength)?;
    }
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

impl<B: Backend> Pipeline<B> {
    /// Loads every part of the model at `source` onto `device` in `precision`, merging `loras`.
    pub fn load(
        source: ModelSource,
        device: &B::Device,
        precision: Precision,
        loras: &[LoraSpec],
    ) -> Result<Self> {
        let parts = load_parts::<B>(&source, device, precision, loras, true)?;
        let (vae, encoder) = parts
            .vae
            .ok_or_else(|| NodeError::ModelConfig("the VAE was not loaded".into()))?;
        Ok(Self {
            source,
            device: device.clone(),
            precision,
            tokenizer: parts.tokenizer,
            text: parts.text,
            text2: parts.text2,
            unet: parts.unet,
            vae,
            encoder,
            schedule: parts.schedule,
            loras: loras.to_vec(),
        })
    }

    /// Switches the merged LoRAs: a no-op when unchanged, else the text encoders and the UNet
    /// are reloaded from the model files with the new set (exact; no drift from repeated
    /// merge/unmerge); the VAE, which LoRAs never touch, stays.
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
        if self.loras == loras {
            return Ok(());
        }
        let parts = load_parts::<B>(&self.source, &self.device, self.precision, loras, false)?;
        self.text = parts.text;
        self.text2 = parts.text2;
        self.unet = parts.unet;
        self.loras = loras.to_vec();
        Ok(())
    }

    /// The LoRAs merged now.
    pub fn loras(&self) -> &[LoraSpec] {
        &self.loras
    }

    /// The UNet config (shape of the model).
    pub fn unet_config(&self) -> &UnetConfig {
        self.unet.config()
    }

    /// Pixels per latent cell.
    pub fn vae_scale(&self) -> usize {
        self.vae.config().upscale()
    }

    /// The model's noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Overrides what the model predicts (`epsilon` or `v_prediction`; `PREDICTION`), for single
    /// files that cannot say (SD2 768-v).
    pub fn set_prediction(&mut self, prediction: &str) -> Result<()> {
        let mut config = self.schedule.config().clone();
        config.prediction_type = prediction.to_string();
        self.schedule = NoiseSchedule::new(config)?;
        Ok(())
    }

    /// Whether the UNet is guidance-distilled (an LCM model: it takes a guidance embedding and
    /// only the LCM sampler).
    pub fn is_lcm(&self) -> bool {
        self.unet.config().time_cond_proj_dim.is_some()
    }

    /// The sampler a job that names none runs with: LCM on LCM models, DPM++ 2M (Karras) on
    /// standard ones.
    pub fn default_sampler(&self) -> Sampler {
        if self.is_lcm() {
            Sampler::Lcm
        } else {
            Sampler::Dpmpp2m
        }
    }

    /// The samplers this model runs, its default first.
    pub fn samplers(&self) -> Vec<Sampler> {
        if self.is_lcm() {
            vec![Sampler::Lcm]
        } else {
            Sampler::standard()
        }
    }

    /// Plans a run of `sampler` (the model's default when `None`) with the LoRAs merged now
    /// ([`Pipeline::plan_with`]).
    pub fn plan(
        &self,
        sampler: Option<Sampler>,
        sigmas: SigmaSchedule,
        steps: usize,
    ) -> Result<Plan> {
        let lcm_lora = self.loras.iter().any(|l| l.lcm);
        self.plan_with(sampler, sigmas, steps, lcm_lora)
    }

    /// Plans a run of `sampler` (the model's default when `None`), refusing what this model
    /// cannot do: standard samplers on a guidance-distilled (LCM) UNet, LCM on a standard one
    /// unless an LCM-LoRA is merged (`lcm_lora`).
    pub fn plan_with(
        &self,
        sampler: Option<Sampler>,
        sigmas: SigmaSchedule,
        steps: usize,
        lcm_lora: bool,
    ) -> Result<Plan> {
        let sampler = sampler.unwrap_or_else(|| self.default_sampler());
        match (self.is_lcm(), sampler == Sampler::Lcm) {
            (true, false) => {
                return Err(NodeError::InvalidJob(format!(
                    "this node's model is an LCM model: sampler lcm only, not {}",
                    sampler.a1111_name()
                )));
            }
            (false, true) if !lcm_lora => {
                return Err(NodeError::InvalidJob(
                    "the lcm sampler needs an LCM model or an LCM-LoRA in the job's loras \
                     (this node's model is a standard one)"
                        .into(),
                ));
            }
            _ => {}
        }
        Plan::new(&self.schedule, sampler, sigmas, steps)
    }

    /// The dtypes of its weights.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Tokenizes and encodes a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Prompt<B>, Tokens)> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids2 = match &self.text2 {
            Some((tokenizer, _)) => Some(tokenizer.encode(prompt)?.ids),
            None => None,
        };
        let encoded = self.encode_ids(&tokens.ids, ids2.as_deref())?;
        Ok((encoded, tokens))
    }

    /// The text encoders on given token ids (`ids2` for SDXL's second encoder; the first
    /// encoder's ids are used when absent).
    pub fn encode_ids(&self, ids: &[u32], ids2: Option<&[u32]>) -> Result<Prompt<B>> {
        let first = self.text.encode(&[ids.to_vec()])?;
        Ok(match &self.text2 {
            None => Prompt {
                context: first.last,
                pooled: None,
            },
            Some((_, text2)) => {
                let second = text2.encode(&[ids2.unwrap_or(ids).to_vec()])?;
                Prompt {
                    context: Tensor::cat(vec![first.penultimate, second.penultimate], 2),
                    pooled: Some(second.pooled),
                }
            }
        })
    }

    /// One UNet evaluation.
    pub fn unet(
        &self,
        sample: Tensor<B, 4>,
        timestep: f32,
        context: &Tensor<B, 3>,
        timestep_cond: Option<&Tensor<B, 2>>,
        added: Option<&AddedCond<B>>,
    ) -> Result<Tensor<B, 4>> {
        self.unet
            .forward(sample, timestep, context, timestep_cond, added)
    }

    /// Runs `plan` from unit noise `init` on this pipeline's UNet ([`sample_unet`]).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        text: &TextConditioning<B>,
        init: Tensor<B, 4>,
        plan: &Plan,
        guidance: f32,
        rescale: f32,
        noise: impl FnMut(usize) -> Tensor<B, 4>,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        sample_unet(
            &self.unet, text, init, plan, guidance, rescale, noise, progress,
        )
    }

    /// Whether the model can start from an image (its VAE has an encoder): img2img and
    /// inpainting.
    pub fn can_encode(&self) -> bool {
        self.encoder.is_some()
    }

    /// Encodes images in `[-1, 1]` to latents scaled for the UNet (the latent distribution's
    /// mean times the scaling factor).
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            NodeError::InvalidJob(
                "this node's VAE has no encoder: it serves text-to-image only".into(),
            )
        })?;
        Ok(encoder
            .forward(image)
            .mul_scalar(self.vae.config().scaling_factor))
    }

    /// Decodes a latent to an image tensor in `[-1, 1]`.
    pub fn decode(&self, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        let scale = self.vae.config().scaling_factor;
        self.vae.forward(latent.div_scalar(scale))
    }

    /// Renders one image. `progress(step, total)` may stop it with `Break` (→ `Cancelled`).
    /// `params.loras` is not looked at: the LoRAs merged are those of [`Pipeline::set_loras`].
    pub fn generate(
        &self,
        params: &Params,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Image> {
        let shape = self.latent_shape(params)?;
        let latent = |seed: u64| {
            Tensor::<B, 4>::from_data(
                TensorData::new(gaussian(seed, shape.iter().product()), shape),
                &self.device,
            )
        };
        let (denoised, truncated_tokens) = self.sample(
            params,
            latent(params.seed),
            |k| latent(step_noise_seed(params.seed, k)),
            progress,
        )?;
        let image = self.decode(denoised);
        let [_, ch, ih, iw] = image.dims();
        let values = super::nn::in_f32(image)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| NodeError::Render(format!("reading the image back: {e:?}")))?;
        let rgb = rgb_from_chw(&values, ch, ih, iw);
        Ok(Image {
            width: iw,
            height: ih,
            rgb,
            truncated_tokens,
        })
    }

    /// The shape of a job's latent, `[1, channels, h, w]`; refuses sizes the model cannot
    /// render.
    pub fn latent_shape(&self, params: &Params) -> Result<[usize; 4]> {
        let scale = self.vae_scale() * self.unet.config().downscale();
        if !params.width.is_multiple_of(scale) || !params.height.is_multiple_of(scale) {
            return Err(NodeError::InvalidJob(format!(
                "{}×{} is not a multiple of {scale} on both sides, which this model needs",
                params.width, params.height
            )));
        }
        Ok([
            1,
            self.vae.config().latent_channels,
            params.height / self.vae_scale(),
            params.width / self.vae_scale(),
        ])
    }

    /// Samples a job's final latent from the given noise: `init` (unit Gaussian, the latent's
    /// shape) and `noise(k)` for step `k`. Text-to-image starts from `init`; a job with a source
    /// image starts from the image's latent noised with `init` to where its strength cuts the
    /// schedule (image-to-image), and with a mask keeps the unmasked part of the image at every
    /// step (inpainting; strength 1 starts the masked part from pure noise, as diffusers).
    /// Answers the latent and how many prompt tokens were dropped.
    pub fn sample(
        &self,
        params: &Params,
        init: Tensor<B, 4>,
        noise: impl FnMut(usize) -> Tensor<B, 4>,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<(Tensor<B, 4>, usize)> {
        let [_, _, h, w] = self.latent_shape(params)?;
        let mut plan = self.plan(params.sampler, params.schedule, params.steps)?;
        let source = match &params.source {
            Some(source) => {
                plan = plan.with_strength(source.strength)?;
                Some(source.fit(params.width, params.height)?)
            }
            None => None,
        };
        let latents = self.source_latents(source.as_ref(), params, h, w)?;
        let (prompt, tokens) = self.encode_prompt(&params.prompt)?;
        let negative = if self.unet.config().time_cond_proj_dim.is_none() && params.guidance > 1.0 {
            Some(self.encode_prompt(&params.negative_prompt)?.0)
        } else {
            None
        };
        let (hh, ww) = (params.height as f32, params.width as f32);
        let text = TextConditioning {
            prompt,
            negative,
            time_ids: [hh, ww, 0.0, 0.0, hh, ww],
        };
        let pure = params.source.as_ref().is_some_and(|s| s.strength >= 1.0);
        let (x, keep) = match latents.image {
            None => (plan.initial(init, None), None),
            Some(image) => match (latents.mask, &latents.extra) {
                // A 4-channel UNet inpaints by putting the unmasked source back every step.
                (Some(mask), None) => {
                    let x = plan.initial(init.clone(), (!pure).then_some(&image));
                    let keep = Keep {
                        image,
                        mask,
                        noise: init,
                    };
                    (x, Some(keep))
                }
                (Some(_), Some(_)) => (plan.initial(init, (!pure).then_some(&image)), None),
                (None, _) => (plan.initial(init, Some(&image)), None),
            },
        };
        let denoised = sample_unet_from(
            &self.unet,
            &text,
            x,
            keep.as_ref(),
            latents.extra.as_ref(),
            &plan,
            params.guidance,
            params.guidance_rescale,
            noise,
            progress,
        )?;
        Ok((denoised, tokens.truncated))
    }
}
