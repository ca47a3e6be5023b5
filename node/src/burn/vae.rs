//! diffusers' `AutoencoderKL` (KL-f8 for real SD models): the decoder (latents → RGB) and the
//! encoder (RGB → the latent distribution's mean, for img2img and inpainting).

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;
use ::burn::tensor::ops::PadMode;
use serde::Deserialize;

use super::nn::{Conv2d, GroupNorm, Linear, attention, from_tokens, to_tokens, upsample_nearest2x};
use super::weights::Loader;
use crate::error::{NodeError, Result};

/// The fields of a VAE `config.json` this implementation reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (decoder levels have one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Group norm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latent scaling factor (0.18215 for SD1/SD2).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    /// Whether the mid block has its attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// The SD1/SD2 VAE.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
        }
    }

    /// Pixels per latent cell on each side.
    pub fn upscale(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }
}

/// Maps a diffusers VAE name (encoder, decoder, `quant_conv`s) to the LDM single-file name
/// (without `first_stage_model.`).
pub fn vae_diffusers_to_ldm(name: &str, levels: usize) -> String {
    let resnet_tail = |t: &str| t.replacen("conv_shortcut", "nin_shortcut", 1);
    for half in ["encoder", "decoder"] {
        let Some(inner) = name
            .strip_prefix(half)
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            continue;
        };
        if let Some(rest) = inner.strip_prefix("mid_block.") {
            if let Some(t) = rest.strip_prefix("resnets.0.") {
                return format!("{half}.mid.block_1.{}", resnet_tail(t));
            }
            if let Some(t) = rest.strip_prefix("resnets.1.") {
                return format!("{half}.mid.block_2.{}", resnet_tail(t));
            }
            if let Some(t) = rest.strip_prefix("attentions.0.") {
                let t = t
                    .replacen("group_norm", "norm", 1)
                    .replacen("to_q", "q", 1)
                    .replacen("to_k", "k", 1)
                    .replacen("to_v", "v", 1)
                    .replacen("to_out.0", "proj_out", 1);
                return format!("{half}.mid.attn_1.{t}");
            }
        }
        // Decoder levels count up from the bottom in LDM files, encoder levels down from the top.
        let (blocks, ldm_blocks, sampler, ldm_sampler) = if half == "decoder" {
            ("up_blocks.", "up", "upsamplers.0.", "upsample")
        } else {
            ("down_blocks.", "down", "downsamplers.0.", "downsample")
        };
        if let Some(rest) = inner.strip_prefix(blocks) {
            let mut parts = rest.splitn(2, '.');
            let i: usize = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let tail = parts.next().unwrap_or("");
            let level = if half == "decoder" {
                levels.saturating_sub(1 + i)
            } else {
                i
            };
            if let Some(t) = tail.strip_prefix("resnets.") {
                return format!("{half}.{ldm_blocks}.{level}.block.{}", resnet_tail(t));
            }
            if let Some(t) = tail.strip_prefix(sampler) {
                return format!("{half}.{ldm_blocks}.{level}.{ldm_sampler}.{t}");
            }
        }
        if let Some(t) = inner.strip_prefix("conv_norm_out.") {
            return format!("{half}.norm_out.{t}");
        }
    }
    name.to_string()
}

const EPS: f64 = 1e-6;

struct Resnet<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> Resnet<B> {
    fn load(l: &mut Loader<B>, p: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: l.group_norm(&format!("{p}.norm1"), cin, groups, EPS)?,
            conv1: l.conv2d(&format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            norm2: l.group_norm(&format!("{p}.norm2"), cout, groups, EPS)?,
            conv2: l.conv2d(&format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(l.conv2d(&format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

struct MidAttention<B: Backend> {
    norm: GroupNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> MidAttention<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let t = to_tokens(self.norm.forward(x.clone()));
        let a = attention(
            self.q.forward(t.clone()),
            self.k.forward(t.clone()),
            self.v.forward(t),
            1,
            false,
        );
        from_tokens(self.out.forward(a), h, w) + x
    }
}

fn mid_attention<B: Backend>(
    l: &mut Loader<B>,
    p: &str,
    c: usize,
    groups: usize,
) -> Result<MidAttention<B>> {
    Ok(MidAttention {
        norm: l.group_norm(&format!("{p}.group_norm"), c, groups, EPS)?,
        q: l.linear(&format!("{p}.to_q"), c, c, true)?,
        k: l.linear(&format!("{p}.to_k"), c, c, true)?,
        v: l.linear(&format!("{p}.to_v"), c, c, true)?,
        out: l.linear(&format!("{p}.to_out.0"), c, c, true)?,
    })
}

/// One decoder level: its resnets and the upsampler after them.
type UpLevel<B> = (Vec<Resnet<B>>, Option<Conv2d<B>>);

/// A loaded VAE decoder.
pub struct VaeDecoder<B: Backend> {
    config: VaeConfig,
    post_quant_conv: Conv2d<B>,
    conv_in: Conv2d<B>,
    mid: [Resnet<B>; 2],
    mid_attention: Option<MidAttention<B>>,
    up: Vec<UpLevel<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> VaeDecoder<B> {
    /// Loads the decoder (diffusers names: `post_quant_conv`, `decoder.*`).
    pub fn load(l: &mut Loader<B>, config: &VaeConfig) -> Result<Self> {
        let c = &config.block_out_channels;
        if c.is_empty() {
            return Err(NodeError::ModelConfig(
                "vae config: no block_out_channels".into(),
            ));
        }
        let g = config.norm_num_groups;
        let z = config.latent_channels;
        let top = c[c.len() - 1];
        let post_quant_conv = l.conv2d("post_quant_conv", z, z, 1, 1, 0)?;
        let conv_in = l.conv2d("decoder.conv_in", z, top, 3, 1, 1)?;
        let mid = [
            Resnet::load(l, "decoder.mid_block.resnets.0", top, top, g)?,
            Resnet::load(l, "decoder.mid_block.resnets.1", top, top, g)?,
        ];
        let mid_attention = if config.mid_block_add_attention {
            Some(mid_attention(l, "decoder.mid_block.attentions.0", top, g)?)
        } else {
            None
        };
        let mut up = Vec::new();
        let mut prev = top;
        let n = c.len();
        for i in 0..n {
            let cout = c[n - 1 - i];
            let mut resnets = Vec::new();
            for j in 0..=config.layers_per_block {
                let cin = if j == 0 { prev } else { cout };
                resnets.push(Resnet::load(
                    l,
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    cin,
                    cout,
                    g,
                )?);
            }
            let upsample = if i + 1 < n {
                Some(l.conv2d(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push((resnets, upsample));
            prev = cout;
        }
        Ok(Self {
            config: config.clone(),
            post_quant_conv,
            conv_in,
            mid,
            mid_attention,
            up,
            norm_out: l.group_norm("decoder.conv_norm_out", c[0], g, EPS)?,
            conv_out: l.conv2d("decoder.conv_out", c[0], config.out_channels, 3, 1, 1)?,
        })
    }

    /// The config the decoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes latents (already divided by the scaling factor) to images in `[-1, 1]`, computed
    /// in the weights' dtype and answered in the latents'.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let answer = z.dtype();
        let z = z.cast(self.conv_in.weight.dtype());
        let mut x = self.conv_in.forward(self.post_quant_conv.forward(z));
        x = self.mid[0].forward(x);
        if let Some(a) = &self.mid_attention {
            x = a.forward(x);
        }
        x = self.mid[1].forward(x);
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(x);
            }
            if let Some(conv) = upsample {
                x = conv.forward(upsample_nearest2x(x));
            }
        }
        self.conv_out
            .forward(self.norm_out.forward_silu(x))
            .cast(answer)
    }
}

/// One encoder level: its resnets and the stride-2 downsampler after them (all but the last).
type DownLevel<B> = (Vec<Resnet<B>>, Option<Conv2d<B>>);

/// A loaded VAE encoder (with `quant_conv`).
pub struct VaeEncoder<B: Backend> {
    config: VaeConfig,
    conv_in: Conv2d<B>,
    down: Vec<DownLevel<B>>,
    mid: [Resnet<B>; 2],
    mid_attention: Option<MidAttention<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    quant_conv: Conv2d<B>,
}

impl<B: Backend> VaeEncoder<B> {
    /// Loads the encoder (diffusers names: `encoder.*`, `quant_conv`).
    pub fn load(l: &mut Loader<B>, config: &VaeConfig) -> Result<Self> {
        let c = &config.block_out_channels;
        if c.is_empty() {
            return Err(NodeError::ModelConfig(
                "vae config: no block_out_channels".into(),
            ));
        }
        let g = config.norm_num_groups;
        let z = config.latent_channels;
        let top = c[c.len() - 1];
        let conv_in = l.conv2d("encoder.conv_in", config.in_channels, c[0], 3, 1, 1)?;
        let mut down = Vec::new();
        let mut prev = c[0];
        for (i, &cout) in c.iter().enumerate() {
            let mut resnets = Vec::new();
            for j in 0..config.layers_per_block {
                let cin = if j == 0 { prev } else { cout };
                let p = format!("encoder.down_blocks.{i}.resnets.{j}");
                resnets.push(Resnet::load(l, &p, cin, cout, g)?);
            }
            let downsample = if i + 1 < c.len() {
                let p = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                Some(l.conv2d(&p, cout, cout, 3, 2, 0)?)
            } else {
                None
            };
            down.push((resnets, downsample));
            prev = cout;
        }
        let mid = [
            Resnet::load(l, "encoder.mid_block.resnets.0", top, top, g)?,
            Resnet::load(l, "encoder.mid_block.resnets.1", top, top, g)?,
        ];
        let mid_attention = if config.mid_block_add_attention {
            Some(mid_attention(l, "encoder.mid_block.attentions.0", top, g)?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            conv_in,
            down,
            mid,
            mid_attention,
            norm_out: l.group_norm("encoder.conv_norm_out", top, g, EPS)?,
            conv_out: l.conv2d("encoder.conv_out", top, 2 * z, 3, 1, 1)?,
            quant_conv: l.conv2d("quant_conv", 2 * z, 2 * z, 1, 1, 0)?,
        })
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images in `[-1, 1]` (`[n, 3, h, w]`, sides multiples of
    /// [`VaeConfig::upscale`]) to the mean of the latent distribution (unscaled: multiply by
    /// the scaling factor for the UNet), computed in the weights' dtype and answered in the
    /// images'. The mean, not a sample: the posterior's spread is far below a latent step
    /// (its log-variance sits near −20 on SD VAEs), so sampling only adds seed-dependence.
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let answer = image.dtype();
        let mut x = self
            .conv_in
            .forward(image.cast(self.conv_in.weight.dtype()));
        for (resnets, downsample) in &self.down {
            for r in resnets {
                x = r.forward(x);
            }
            if let Some(conv) = downsample {
                // diffusers pads right and bottom by one, then convolves with stride 2.
                x = conv.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)));
            }
        }
        x = self.mid[0].forward(x);
        if let Some(a) = &self.mid_attention {
            x = a.forward(x);
        }
        x = self.mid[1].forward(x);
        let moments = self
            .quant_conv
            .forward(self.conv_out.forward(self.norm_out.forward_silu(x)));
        let z = self.config.latent_channels;
        moments.narrow(1, 0, z).cast(answer)
    }
}
