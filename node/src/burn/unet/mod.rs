//! diffusers `UNet2DConditionModel` for the SD1.x/SD2.x family: resnet blocks, cross-attention
//! transformers (conv or linear projections), sinusoidal time embedding and the optional
//! `time_cond_proj_dim` guidance embedding of LCM-distilled UNets.
//!
//! `config` holds the shape (`config.json`), `blocks` the resnet and transformer blocks;
//! this module assembles them and adds the time, text_time and guidance embeddings.

mod blocks;
mod config;

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use self::blocks::{Level, LevelShape, Resnet, Transformer2d};
pub use self::config::{PerBlock, UnetConfig};
use super::nn::{Conv2d, GroupNorm, LayerMut, Layers, Linear, silu, upsample_nearest2x};
use super::weights::Loader;
use crate::error::{NodeError, Result};

/// SDXL's added conditioning for one image.
#[derive(Clone, Debug)]
pub struct AddedCond<B: Backend> {
    /// The pooled text embedding of the second encoder: `[n, width]`.
    pub text_embeds: Tensor<B, 2>,
    /// Original height and width, crop top and left, target height and width.
    pub time_ids: [f32; 6],
}

/// A loaded SD1.x/SD2.x/SDXL UNet.
pub struct Unet<B: Backend> {
    config: UnetConfig,
    time_linear_1: Linear<B>,
    time_linear_2: Linear<B>,
    add_embedding: Option<(Linear<B>, Linear<B>)>,
    cond_proj: Option<Linear<B>>,
    conv_in: Conv2d<B>,
    down: Vec<Level<B>>,
    mid_resnets: [Resnet<B>; 2],
    mid_attention: Transformer2d<B>,
    up: Vec<Level<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Unet<B> {
    /// Loads every UNet tensor (diffusers names) through `l`.
    pub fn load(l: &mut Loader<B>, config: &UnetConfig) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let c = &cfg.block_out_channels;
        let n = c.len();
        let temb = 4 * c[0];
        let depth = |i: usize| cfg.transformer_layers_per_block.get(i);
        let time_linear_1 = l.linear("time_embedding.linear_1", c[0], temb, true)?;
        let time_linear_2 = l.linear("time_embedding.linear_2", temb, temb, true)?;
        let cond_proj = match cfg.time_cond_proj_dim {
            Some(d) => Some(l.linear("time_embedding.cond_proj", d, c[0], false)?),
            None => None,
        };
        let add_embedding = match cfg.projection_class_embeddings_input_dim {
            Some(input) if cfg.text_time() => Some((
                l.linear("add_embedding.linear_1", input, temb, true)?,
                l.linear("add_embedding.linear_2", temb, temb, true)?,
            )),
            _ => None,
        };
        let conv_in = l.conv2d("conv_in", cfg.in_channels, c[0], 3, 1, 1)?;
        let attention = |cross: bool, level: usize| cross.then(|| (cfg.heads(level), depth(level)));
        let mut down = Vec::new();
        let mut cin = c[0];
        for (i, &cout) in c.iter().enumerate() {
            let shape = LevelShape {
                prefix: format!("down_blocks.{i}"),
                resnet_inputs: (0..cfg.layers_per_block)
                    .map(|j| if j == 0 { cin } else { cout })
                    .collect(),
                channels: cout,
                attention: attention(cfg.down_block_types[i].starts_with("CrossAttn"), i),
                resample: (i + 1 < n).then_some(("downsamplers", 2)),
            };
            down.push(Level::load(l, &shape, temb, cfg)?);
            cin = cout;
        }
        let last = c[n - 1];
        let mid_resnets = [
            Resnet::load(l, "mid_block.resnets.0", last, last, temb, cfg)?,
            Resnet::load(l, "mid_block.resnets.1", last, last, temb, cfg)?,
        ];
        let mid_attention = Transformer2d::load(
            l,
            "mid_block.attentions.0",
            last,
            cfg.heads(n - 1),
            depth(n - 1),
            cfg,
        )?;
        let mut up = Vec::new();
        let mut prev = last;
        for i in 0..n {
            let level = n - 1 - i;
            let cout = c[level];
            // The last resnet of an up level takes the skip from the level's input side.
            let skip_in = c[level.saturating_sub(1)];
            let layers = cfg.layers_per_block + 1;
            let shape = LevelShape {
                prefix: format!("up_blocks.{i}"),
                resnet_inputs: (0..layers)
                    .map(|j| {
                        let rin = if j == 0 { prev } else { cout };
                        rin + if j == layers - 1 { skip_in } else { cout }
                    })
                    .collect(),
                channels: cout,
                attention: attention(cfg.up_block_types[i].starts_with("CrossAttn"), level),
                resample: (i + 1 < n).then_some(("upsamplers", 1)),
            };
            up.push(Level::load(l, &shape, temb, cfg)?);
            prev = cout;
        }
        Ok(Self {
            config: cfg.clone(),
            time_linear_1,
            time_linear_2,
            add_embedding,
            cond_proj,
            conv_in,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: l.group_norm("conv_norm_out", c[0], cfg.norm_num_groups, cfg.norm_eps)?,
            conv_out: l.conv2d("conv_out", c[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// The config the UNet was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Predicts the noise in `sample` (`[n, 4, h, w]`) at `timestep`, conditioned on
    /// `context` (`[n, tokens, cross_attention_dim]`) and, for LCM UNets, the guidance
    /// embedding `timestep_cond` (`[n, time_cond_proj_dim]`), and for SDXL the `added`
    /// text_time conditioning. The inputs may be f32 whatever the weights' dtype: the UNet
    /// computes in its weights' dtype and answers in the sample's.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timestep: f32,
        context: &Tensor<B, 3>,
        timestep_cond: Option<&Tensor<B, 2>>,
        added: Option<&AddedCond<B>>,
    ) -> Result<Tensor<B, 4>> {
        let [n, _, h, w] = sample.dims();
        let down = self.config.downscale();
        if h % down != 0 || w % down != 0 {
            return Err(NodeError::InvalidJob(format!(
                "latent {h}×{w} is not divisible by this UNet's downscale {down}"
            )));
        }
        let device = sample.device();
        // The embeddings are computed in f32 and join the weights' dtype (f16 on GPU workers).
        let (dtype, answer) = (self.conv_in.weight.dtype(), sample.dtype());
        let sample = sample.cast(dtype);
        let context = &context.clone().cast(dtype);
        let c0 = self.config.block_out_channels[0];
        let t = timestep_embedding::<B>(
            &[timestep],
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &device,
        )
        .cast(dtype)
        .repeat_dim(0, n);
        let t = match (&self.cond_proj, timestep_cond) {
            (Some(p), Some(cond)) => t + p.forward(cond.clone().cast(dtype)),
            // As diffusers: without a guidance embedding the projection is skipped (the pipeline
            // only samples guidance-distilled UNets with LCM, which always passes one).
            _ => t,
        };
        let mut temb = self
            .time_linear_2
            .forward(silu(self.time_linear_1.forward(t)));
        match (&self.add_embedding, added) {
            (Some((l1, l2)), Some(added)) => {
                let dim = self.config.addition_time_embed_dim.unwrap_or(256);
                let ids = timestep_embedding::<B>(
                    &added.time_ids,
                    dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                    &device,
                )
                .cast(dtype)
                .reshape([1, 6 * dim])
                .repeat_dim(0, n);
                let add = Tensor::cat(vec![added.text_embeds.clone().cast(dtype), ids], 1);
                let want = self
                    .config
                    .projection_class_embeddings_input_dim
                    .unwrap_or(0);
                if add.dims()[1] != want {
                    return Err(NodeError::InvalidJob(format!(
                        "added conditioning is {} wide, this UNet takes {want}",
                        add.dims()[1]
                    )));
                }
                temb = temb + l2.forward(silu(l1.forward(add)));
            }
            (Some(_), None) => {
                return Err(NodeError::InvalidJob(
                    "this UNet (SDXL) needs the text_time conditioning: pooled text embedding and time ids"
                        .into(),
                ));
            }
            _ => {}
        }

        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward(x, &temb);
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(x, context);
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(x);
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(x, &temb);
        x = self.mid_attention.forward(x, context);
        x = self.mid_resnets[1].forward(x, &temb);
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    NodeError::Render("unet skip connections ran out (config mismatch)".into())
                })?;
                x = resnet.forward(Tensor::cat(vec![x, skip], 1), &temb);
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(x, context);
                }
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(upsample_nearest2x(x));
            }
        }
        Ok(self
            .conv_out
            .forward(self.norm_out.forward_silu(x))
            .cast(answer))
    }
}

/// The sinusoidal timestep embedding (`dim` wide; cos first when `flip`).
pub fn timestep_embedding<B: Backend>(
    timesteps: &[f32],
    dim: usize,
    flip: bool,
    shift: f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    // Mirrors diffusers' f32 arithmetic: f32 exponent, f32 product, accurate sin/cos.
    let log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32 / (half as f32 - shift as f32)) as f64).exp() as f32)
        .collect();
    for &t in timesteps {
        let sin = freqs.iter().map(|&f| ((t * f) as f64).sin() as f32);
        let cos = freqs.iter().map(|&f| ((t * f) as f64).cos() as f32);
        if flip {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(
        ::burn::tensor::TensorData::new(data, [timesteps.len(), dim]),
        device,
    )
}

/// The LCM guidance embedding of `w = guidance − 1`: `1000·w` through a sin-first sinusoid.
pub fn guidance_embedding<B: Backend>(w: f32, dim: usize, device: &B::Device) -> Tensor<B, 2> {
    let half = dim / 2;
    let scale = (10000f64.ln() as f32) / (half as f32 - 1.0);
    let w = w * 1000.0;
    let args: Vec<f32> = (0..half)
        .map(|i| w * ((-(i as f32) * scale) as f64).exp() as f32)
        .collect();
    let mut data: Vec<f32> = args.iter().map(|&a| (a as f64).sin() as f32).collect();
    data.extend(args.iter().map(|&a| (a as f64).cos() as f32));
    if dim % 2 == 1 {
        data.push(0.0);
    }
    Tensor::from_data(::burn::tensor::TensorData::new(data, [1, dim]), device)
}

impl<B: Backend> Layers<B> for Unet<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.time_linear_1.visit_layers(f);
        self.time_linear_2.visit_layers(f);
        if let Some((a, b)) = &mut self.add_embedding {
            a.visit_layers(f);
            b.visit_layers(f);
        }
        self.cond_proj.visit_layers(f);
        self.conv_in.visit_layers(f);
        self.down.visit_layers(f);
        self.mid_resnets.visit_layers(f);
        self.mid_attention.visit_layers(f);
        self.up.visit_layers(f);
        self.conv_out.visit_layers(f);
    }
}
