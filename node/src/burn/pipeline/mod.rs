//! The SD1.x/SD2.x/SDXL pipeline: load a model (diffusers folder or single-file LDM checkpoint),
//! merge LoRAs, tokenize → encode → sample ([`crate::sampling`]: LCM or a standard sampler with
//! classifier-free guidance) → decode.

mod batch;
mod load;
mod source;

pub use source::{latent_mask, mask_weights, signed_planes};

use load::load_parts;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use ::burn::tensor::backend::Backend;
use ::burn::tensor::{DType, Tensor, TensorData};
use drover_shared::family::ModelFamily;
use serde::de::DeserializeOwned;

use super::clip::ClipText;
use super::denoise::{Prompt, TextConditioning, sample_unet, sample_unet_from};
use super::lora::{self, LoraSet};
use super::nn::Layers;
use super::tokenizer::{ClipTokenizer, Tokens};
use super::unet::{AddedCond, Unet, UnetConfig};
pub use super::vae::vae_diffusers_to_ldm;
use super::vae::{VaeDecoder, VaeEncoder};
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

/// The LoRA files of `loras` with their strengths (decoded once, then from the cache).
fn lora_set(loras: &[LoraSpec]) -> Result<LoraSet> {
    let mut set = LoraSet::new();
    for l in loras {
        set.add(&l.name, &l.path, l.strength)?;
    }
    Ok(set)
}

/// Reads a JSON config, naming the file in errors.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| NodeError::ModelConfig(format!("{}: {e}", path.display())))
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

    /// Switches the merged LoRAs in place: a no-op when unchanged, else only the layers the
    /// old or the new set changes are recomputed from their kept base weights, exactly as a
    /// fresh load merges them (LoRA files decoded once, from a cache). Returns how many layers
    /// changed. All or nothing: a LoRA that does not fit leaves the pipeline as it was.
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<usize> {
        if self.loras == loras {
            return Ok(0);
        }
        let set = lora_set(loras)?;
        let mut nets: Vec<&mut dyn Layers<B>> = vec![&mut self.text, &mut self.unet];
        if let Some((_, text2)) = &mut self.text2 {
            nets.push(text2);
        }
        let changed = lora::switch(&mut nets, set)?;
        self.loras = loras.to_vec();
        Ok(changed)
    }

    /// Switches the merged LoRAs the way nodes did before switches in place: the text encoders
    /// and the UNet reloaded from the model files with the new set merged (the VAE stays). The
    /// baseline `drover-node bench-lora` times [`Self::set_loras`] against.
    pub fn reload_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
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
