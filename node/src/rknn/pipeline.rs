//! The RKNN SD1.x/SD2.x pipeline, for a model folder as published for RK3588
//! (`text_encoder/`, `unet/`, `vae_decoder/`, each a `model.rknn` with its diffusers
//! `config.json`; `scheduler/scheduler_config.json`; `tokenizer/`):
//! tokenize → text encoder → sampling loop on the UNet → VAE decoder → RGB. An LCM model (a
//! UNet with a `timestep_cond` input, or an `LCMScheduler` config) runs the LCM sampler; a
//! standard one every other sampler, with classifier-free guidance as two batch-1 UNet calls
//! per step (the compiled UNet takes one sample). With
//! `vae_encoder/model.rknn` too (image `[1, 3, H, W]` in [-1, 1] → the latent distribution's
//! moments or mean), jobs may start from a source image: image-to-image over the noisiest
//! `strength` of the LCM schedule and inpainting (the unmasked source put back after every
//! step), through the same [`crate::sampling::Plan`] the Burn pipeline runs.
//!
//! The tokenizer, the samplers ([`crate::sampling::Plan`]) and the guidance embedding are the Burn
//! pipeline's own code, the seeded noise and the image conversion [`crate::render`]'s: only the
//! three networks run on the NPU. Host-side arithmetic runs on Burn's CPU backend.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use drover_shared::detect::RKNN_MODEL_FILE;
use serde::Deserialize;

use super::api::{CoreMask, RknnApi};
use super::model::{HostData, HostTensor, RknnModel};
use crate::burn::Cpu;
use crate::burn::pipeline::{
    latent_mask, mask_weights, read_config, scheduler_config, signed_planes,
};
use crate::burn::tokenizer::ClipTokenizer;
use crate::burn::unet::guidance_embedding;
use crate::error::{NodeError, Result};
use crate::render::{Image, Params, gaussian, rgb_from_chw, step_noise_seed};
use crate::sampling::guidance::guided;
use crate::sampling::{Keep, NoiseSchedule, Plan, Sampler};

/// What the pipeline reads from `unet/config.json`.
#[derive(Clone, Debug, Deserialize)]
struct UnetConfig {
    #[serde(default = "four")]
    in_channels: usize,
    cross_attention_dim: usize,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
}

/// The scheduler class a folder's `scheduler_config.json` names.
#[derive(Clone, Debug, Default, Deserialize)]
struct SchedulerClass {
    #[serde(rename = "_class_name", default)]
    class_name: String,
}

/// What the pipeline reads from `vae_decoder/config.json`.
#[derive(Clone, Debug, Deserialize)]
struct VaeConfig {
    #[serde(default = "sd_scale")]
    scaling_factor: f32,
}

fn four() -> usize {
    4
}
fn sd_scale() -> f32 {
    0.18215
}

/// Input positions of the UNet.
#[derive(Clone, Copy, Debug)]
struct UnetInputs {
    sample: usize,
    timestep: usize,
    context: usize,
    cond: Option<usize>,
}

/// A source's latent and, for inpainting, its mask at latent size.
type SourceLatents = (Tensor<Cpu, 4>, Option<Tensor<Cpu, 4>>);

/// A loaded RKNN pipeline: three contexts on one NPU core, owned by one worker thread.
pub struct RknnPipeline {
    tokenizer: ClipTokenizer,
    text: RknnModel,
    unet: RknnModel,
    vae: RknnModel,
    /// The VAE encoder, when the folder has one (img2img and inpainting).
    encoder: Option<RknnModel>,
    /// An LCM model (runs `lcm` only); else a standard one (every other sampler).
    lcm_model: bool,
    schedule: NoiseSchedule,
    io: UnetInputs,
    ids_input: usize,
    latent_input: usize,
    in_channels: usize,
    context_dims: Vec<usize>,
    cond_dim: Option<usize>,
    scaling_factor: f32,
    vae_factor: usize,
    sizes: Vec<(u32, u32)>,
}

impl std::fmt::Debug for RknnPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RknnPipeline")
            .field("text", &self.text)
            .field("unet", &self.unet)
            .field("vae", &self.vae)
            .field("sizes", &self.sizes)
            .finish_non_exhaustive()
    }
}

fn config_error(dir: &Path, m: impl std::fmt::Display) -> NodeError {
    NodeError::ModelConfig(format!("{}: {m}", dir.display()))
}

impl RknnPipeline {
    /// Loads the model folder `dir` into three contexts pinned to `core`, checking that the
    /// networks' inputs and outputs fit together and fit their configs.
    pub fn load(api: Arc<dyn RknnApi>, dir: &Path, core: CoreMask) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer")).map_err(|e| {
            NodeError::Tokenizer(format!(
                "{e}; an RKNN model folder needs the base model's CLIP tokenizer in tokenizer/ \
                 (vocab.json + merges.txt, or tokenizer.json): Drover never downloads it"
            ))
        })?;
        let scheduler = scheduler_config(dir)?;
        let schedule = NoiseSchedule::new(scheduler)?;
        let class_path = dir.join("scheduler").join("scheduler_config.json");
        let class: SchedulerClass = if class_path.is_file() {
            read_config(&class_path)?
        } else {
            SchedulerClass::default()
        };
        let unet_cfg: UnetConfig = read_config(&dir.join("unet").join("config.json"))?;
        let vae_cfg: VaeConfig = {
            let path = dir.join("vae_decoder").join("config.json");
            if path.is_file() {
                read_config(&path)?
            } else {
                VaeConfig {
                    scaling_factor: sd_scale(),
                }
            }
        };
        let load =
            |name: &str| RknnModel::load(api.clone(), &dir.join(name).join(RKNN_MODEL_FILE), core);
        let text = load("text_encoder")?;
        let unet = load("unet")?;
        let vae = load("vae_decoder")?;
        let encoder = if dir.join("vae_encoder").join(RKNN_MODEL_FILE).is_file() {
            Some(load("vae_encoder")?)
        } else {
            None
        };

        let ids_input = text.input_index("input_ids", 0)?;
        let ids_dims = super::model::logical_dims(&text.inputs()[ids_input]);
        if ids_dims != [1, 77] {
            return Err(config_error(
                dir,
                format!("text_encoder input_ids is {ids_dims:?}, expected [1, 77]"),
            ));
        }
        let text_out = text
            .outputs()
            .first()
            .map(super::model::logical_dims)
            .unwrap_or_default();

        let io = UnetInputs {
            sample: unet.input_index("sample", 0)?,
            timestep: unet.input_index("timestep", 1)?,
            context: unet.input_index("encoder_hidden_states", 2)?,
            cond: if unet.inputs().len() > 3 {
                Some(unet.input_index("timestep_cond", 3)?)
            } else {
                None
            },
        };
        if unet.inputs().len() > 4 {
            return Err(config_error(
                dir,
                format!(
                    "the UNet has {} inputs; SD1.x/SD2.x UNets take sample, timestep, encoder_hidden_states and (LCM) timestep_cond",
                    unet.inputs().len()
                ),
            ));
        }
        let context_dims = super::model::logical_dims(&unet.inputs()[io.context]);
        if context_dims.len() != 3 || context_dims[2] != unet_cfg.cross_attention_dim {
            return Err(config_error(
                dir,
                format!(
                    "the UNet's encoder_hidden_states is {context_dims:?} but unet/config.json says cross_attention_dim {}",
                    unet_cfg.cross_attention_dim
                ),
            ));
        }
        if text_out != context_dims {
            return Err(config_error(
                dir,
                format!(
                    "the text encoder gives {text_out:?} but the UNet takes encoder_hidden_states {context_dims:?}"
                ),
            ));
        }
        if unet.inputs()[io.timestep].n_elems != 1 {
            return Err(config_error(
                dir,
                format!(
                    "the UNet's timestep input is {:?}, expected one value",
                    unet.inputs()[io.timestep].dims
                ),
            ));
        }
        let cond_dim = match io.cond {
            Some(i) => {
                let d = super::model::logical_dims(&unet.inputs()[i]);
                let dim = d.last().copied().unwrap_or(0);
                if d.len() != 2 || unet_cfg.time_cond_proj_dim.is_some_and(|c| c != dim) {
                    return Err(config_error(
                        dir,
                        format!(
                            "the UNet's timestep_cond is {d:?} but unet/config.json says time_cond_proj_dim {:?}",
                            unet_cfg.time_cond_proj_dim
                        ),
                    ));
                }
                Some(dim)
            }
            None => None,
        };

        let latent_input = vae.input_index("latent_sample", 0)?;
        let vae_in = super::model::logical_dims(&vae.inputs()[latent_input]);
        let vae_out = vae
            .outputs()
            .first()
            .map(super::model::logical_dims)
            .unwrap_or_default();
        if vae_in.len() != 4 || vae_out.len() != 4 || vae_out[1] != 3 || vae_in[2] == 0 {
            return Err(config_error(
                dir,
                format!(
                    "the VAE decoder maps {vae_in:?} to {vae_out:?}, expected [1, C, h, w] to [1, 3, H, W]"
                ),
            ));
        }
        let vae_factor = vae_out[2] / vae_in[2];

        // The sizes served: every latent shape the UNet takes that the VAE decoder takes too.
        let vae_shapes = vae.accepted_shapes(latent_input);
        let mut sizes = Vec::new();
        for shape in unet.accepted_shapes(io.sample) {
            if shape.len() != 4 || shape[0] != 1 || shape[1] != unet_cfg.in_channels {
                return Err(config_error(
                    dir,
                    format!(
                        "the UNet's sample input is {shape:?}; unet/config.json says in_channels {} (batch 1)",
                        unet_cfg.in_channels
                    ),
                ));
            }
            if vae_shapes.contains(&shape) {
                sizes.push((
                    (shape[3] * vae_factor) as u32,
                    (shape[2] * vae_factor) as u32,
                ));
            } else {
                tracing::warn!(latent = ?shape, "the unet takes a latent shape the vae decoder does not; size not served");
            }
        }
        if sizes.is_empty() {
            return Err(config_error(
                dir,
                "the UNet and the VAE decoder share no latent shape",
            ));
        }
        sizes.sort_unstable();
        sizes.dedup();
        if let Some(enc) = &encoder {
            let input = enc
                .inputs()
                .first()
                .map(super::model::logical_dims)
                .unwrap_or_default();
            let output = enc
                .outputs()
                .first()
                .map(super::model::logical_dims)
                .unwrap_or_default();
            let c = unet_cfg.in_channels;
            let fits = input.len() == 4
                && output.len() == 4
                && input[1] == 3
                && (output[1] == c || output[1] == 2 * c)
                && output[2] * vae_factor == input[2];
            if !fits {
                return Err(config_error(
                    dir,
                    format!(
                        "the VAE encoder maps {input:?} to {output:?}, expected [1, 3, H, W] to [1, {c} or {}, H/{vae_factor}, W/{vae_factor}]",
                        2 * c
                    ),
                ));
            }
        }
        let lcm_model = cond_dim.is_some() || class.class_name == "LCMScheduler";
        Ok(Self {
            tokenizer,
            text,
            unet,
            vae,
            encoder,
            lcm_model,
            schedule,
            io,
            ids_input,
            latent_input,
            in_channels: unet_cfg.in_channels,
            context_dims,
            cond_dim,
            scaling_factor: vae_cfg.scaling_factor,
            vae_factor,
            sizes,
        })
    }

    /// The samplers this model runs, its default first: `lcm` on LCM models; on standard ones
    /// DPM++ 2M (Karras) and every other sampler but `lcm`.
    pub fn samplers(&self) -> Vec<Sampler> {
        if self.lcm_model {
            vec![Sampler::Lcm]
        } else {
            Sampler::standard()
        }
    }

    /// Plans a job's run: its sampler (the model's default when it names none) checked against
    /// the model kind, its steps against the sampler, cut by its strength when it starts from
    /// an image.
    fn plan(&self, params: &Params) -> Result<Plan> {
        let default = self.samplers()[0];
        let sampler = params.sampler.unwrap_or(default);
        if (sampler == Sampler::Lcm) != self.lcm_model {
            return Err(NodeError::InvalidJob(if self.lcm_model {
                format!(
                    "this RKNN model is an LCM model: sampler lcm only, not {}",
                    sampler.a1111_name()
                )
            } else {
                "this RKNN model is a standard one: the lcm sampler needs an LCM model (an \
                 rknn node cannot merge an LCM-LoRA)"
                    .to_string()
            }));
        }
        let plan = Plan::new(&self.schedule, sampler, params.schedule, params.steps)?;
        match &params.source {
            Some(s) => plan.with_strength(s.strength),
            None => Ok(plan),
        }
    }

    /// Whether jobs may start from a source image (the folder has `vae_encoder/`).
    pub fn can_encode(&self) -> bool {
        self.encoder.is_some()
    }

    /// The source's latent (the encoder's mean, scaled for the UNet) and, with a mask, the
    /// mask at latent size (binarised at half, nearest-neighbour, as the Burn pipeline).
    fn source_latents(
        &mut self,
        params: &Params,
        latent: [usize; 4],
    ) -> Result<Option<SourceLatents>> {
        let Some(source) = &params.source else {
            return Ok(None);
        };
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(NodeError::InvalidJob(
                "this RKNN model folder has no vae_encoder/: it cannot start from an image".into(),
            ));
        };
        let (width, height) = (params.width, params.height);
        let fitted = source.fit(width, height)?;
        let chw = signed_planes(&fitted.rgb, width, height);
        let input = [1, 3, height, width];
        encoder.select_shape(0, &input)?;
        let out = encoder
            .run(&[HostTensor::f32(&input, chw)])?
            .swap_remove(0)
            .into_f32("vae encoder output")?;
        let [_, c, h, w] = latent;
        let mean: Vec<f32> = out[..c * h * w]
            .iter()
            .map(|v| v * self.scaling_factor)
            .collect();
        let device = Default::default();
        let image = Tensor::<Cpu, 4>::from_data(TensorData::new(mean, latent), &device);
        let soft = fitted.soft;
        let mask = fitted.mask.map(|m| {
            let cells = latent_mask(&mask_weights(&m, soft), width, height, w, h, soft);
            Tensor::<Cpu, 4>::from_data(TensorData::new(cells, [1, 1, h, w]), &device)
        });
        Ok(Some((image, mask)))
    }

    /// The image sizes (width, height) this model renders; RKNN shapes are fixed at conversion.
    pub fn sizes(&self) -> &[(u32, u32)] {
        &self.sizes
    }

    /// The NPU core the pipeline runs on.
    pub fn core(&self) -> CoreMask {
        self.unet.core()
    }

    fn encode(&mut self, prompt: &str) -> Result<(HostTensor, usize)> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids = HostTensor {
            dims: vec![1, 77],
            data: HostData::I32(tokens.ids.iter().map(|&i| i as i32).collect()),
        };
        let mut feeds = vec![ids];
        // A text encoder may have more inputs (an attention mask): feed ones.
        for (i, attr) in self.text.inputs().iter().enumerate() {
            if i != self.ids_input {
                let dims = super::model::logical_dims(attr);
                let n = dims.iter().product();
                feeds.insert(
                    i,
                    HostTensor {
                        dims,
                        data: HostData::I32(vec![1; n]),
                    },
                );
            }
        }
        let mut out = self.text.run(&feeds)?;
        Ok((out.swap_remove(0), tokens.truncated))
    }

    /// Runs the UNet once: the noise prediction for `sample` at timestep `t` (rounded when the
    /// compiled UNet takes an integer timestep: Karras sigmas fall between training steps).
    fn predict(
        &mut self,
        sample: Vec<f32>,
        latent: &[usize],
        t: f32,
        context: &HostTensor,
        cond: Option<&HostTensor>,
    ) -> Result<Vec<f32>> {
        let attrs = self.unet.inputs();
        let mut feeds: Vec<Option<HostTensor>> = vec![None; attrs.len()];
        feeds[self.io.sample] = Some(HostTensor::f32(latent, sample));
        let timestep = &attrs[self.io.timestep];
        feeds[self.io.timestep] = Some(HostTensor {
            dims: super::model::logical_dims(timestep),
            data: if timestep.dtype.is_integer_input() {
                HostData::I64(vec![t.round() as i64])
            } else {
                HostData::F32(vec![t])
            },
        });
        feeds[self.io.context] = Some(context.clone());
        if let (Some(i), Some(c)) = (self.io.cond, cond) {
            feeds[i] = Some(c.clone());
        }
        let feeds: Vec<HostTensor> = feeds.into_iter().flatten().collect();
        let mut out = self.unet.run(&feeds)?;
        out.swap_remove(0).into_f32("unet output")
    }

    /// Renders one image. `progress(step, total)` may stop it with `Break` (→ `Cancelled`).
    pub fn generate(
        &mut self,
        params: &Params,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Image> {
        let size = (params.width as u32, params.height as u32);
        if !self.sizes.contains(&size) {
            return Err(NodeError::InvalidJob(format!(
                "this RKNN model renders only {} (its shapes are fixed when it is converted), not {}x{}",
                self.sizes_text(),
                params.width,
                params.height
            )));
        }
        // The sampler, steps and model kind are checked before any NPU call.
        let plan = self.plan(params)?;
        let (h, w) = (
            params.height / self.vae_factor,
            params.width / self.vae_factor,
        );
        let latent = [1, self.in_channels, h, w];
        self.unet.select_shape(self.io.sample, &latent)?;
        self.vae.select_shape(self.latent_input, &latent)?;

        let (context, truncated) = self.encode(&params.prompt)?;
        let negative = if self.cond_dim.is_none() && params.guidance > 1.0 {
            Some(self.encode(&params.negative_prompt)?.0)
        } else {
            None
        };
        let device = Default::default();
        let cond = self.cond_dim.map(|d| {
            let e = guidance_embedding::<Cpu>(params.guidance - 1.0, d, &device);
            HostTensor::f32(&[1, d], e.into_data().to_vec::<f32>().unwrap_or_default())
        });
        let tensor = |v: Vec<f32>| Tensor::<Cpu, 4>::from_data(TensorData::new(v, latent), &device);
        let host = |t: Tensor<Cpu, 4>| {
            t.into_data()
                .to_vec::<f32>()
                .map_err(|e| NodeError::Render(format!("reading a latent back: {e:?}")))
        };
        let n = latent.iter().product();
        let init = tensor(gaussian(params.seed, n));
        let guidance = params.guidance;
        let source = self.source_latents(params, latent)?;
        let mut eps = |x: Tensor<Cpu, 4>, t: f32| -> Result<Tensor<Cpu, 4>> {
            let x = host(x)?;
            Ok(match &negative {
                Some(neg) => {
                    let c = self.predict(x.clone(), &latent, t, &context, None)?;
                    let u = self.predict(x, &latent, t, neg, None)?;
                    guided(tensor(u), tensor(c), guidance)
                }
                None => tensor(self.predict(x, &latent, t, &context, cond.as_ref())?),
            })
        };
        let noise = |k| tensor(gaussian(step_noise_seed(params.seed, k), n));
        let denoised = match source {
            Some((image, mask)) => {
                let strength = params.source.as_ref().map_or(1.0, |s| s.strength);
                // As the Burn pipeline: strength 1 with a mask starts the masked part from
                // pure noise; otherwise the source noised to the plan's first level.
                let pure = strength >= 1.0 && mask.is_some();
                let x = plan.initial(init.clone(), (!pure).then_some(&image));
                let keep = mask.map(|mask| Keep {
                    image,
                    mask,
                    noise: init,
                });
                plan.run_from(x, &mut eps, noise, progress, keep.as_ref())?
            }
            None => plan.run(init, &mut eps, noise, progress)?,
        };
        let scaled = host(denoised.div_scalar(self.scaling_factor))?;
        let mut out = self.vae.run(&[HostTensor::f32(&latent, scaled)])?;
        let image = out.swap_remove(0);
        let [_, ch, ih, iw] = [image.dims[0], image.dims[1], image.dims[2], image.dims[3]];
        let values = image.into_f32("vae output")?;
        Ok(Image {
            width: iw,
            height: ih,
            rgb: rgb_from_chw(&values, ch, ih, iw),
            truncated_tokens: truncated,
        })
    }

    /// Times one UNet step at the largest size served (zeros in, result dropped): the speed
    /// the node advertises, in pixel-steps per second, so the router's estimates treat slow
    /// NPU nodes fairly next to GPUs.
    pub fn measure_speed(&mut self) -> Result<f64> {
        let Some(&(w, h)) = self.sizes.iter().max_by_key(|(w, h)| w * h) else {
            return Ok(0.0);
        };
        let latent = [
            1,
            self.in_channels,
            h as usize / self.vae_factor,
            w as usize / self.vae_factor,
        ];
        self.unet.select_shape(self.io.sample, &latent)?;
        let context = HostTensor::f32(
            &self.context_dims,
            vec![0.0; self.context_dims.iter().product()],
        );
        let cond = self
            .cond_dim
            .map(|d| HostTensor::f32(&[1, d], vec![0.0; d]));
        let started = Instant::now();
        self.predict(
            vec![0.0; latent.iter().product()],
            &latent,
            999.0,
            &context,
            cond.as_ref(),
        )?;
        let elapsed = started.elapsed().max(Duration::from_micros(1));
        Ok(f64::from(w * h) / elapsed.as_secs_f64())
    }

    fn sizes_text(&self) -> String {
        self.sizes
            .iter()
            .map(|(w, h)| format!("{w}x{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
