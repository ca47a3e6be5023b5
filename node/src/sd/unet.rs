//! diffusers `UNet2DConditionModel` for the SD1.x/SD2.x family: resnet blocks, cross-attention
//! transformers (conv or linear projections), sinusoidal time embedding and the optional
//! `time_cond_proj_dim` guidance embedding of LCM-distilled UNets.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use super::nn::{
    Conv2d, GroupNorm, LayerNorm, Linear, attention, from_tokens, gelu, silu, to_tokens,
    upsample_nearest2x,
};
use super::weights::Loader;
use crate::error::{NodeError, Result};

/// An int or a per-block list, as diffusers configs write `attention_head_dim`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per down block.
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            Self::One(v) => *v,
            Self::Each(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// The fields of a diffusers UNet `config.json` this implementation reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UnetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D` per level (deepest first).
    pub up_block_types: Vec<String>,
    /// Resnets per down block.
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Text conditioning width.
    pub cross_attention_dim: usize,
    /// Number of heads (diffusers' historical name), per block or shared.
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    /// Number of heads when given under its real name (takes precedence).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention.
    #[serde(default = "one_block")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear rather than 1×1 conv `proj_in`/`proj_out`.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Group norm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Group norm epsilon of resnets and the output norm.
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    /// Width of the guidance embedding of LCM-distilled UNets.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Cos-first time sinusoid.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the time sinusoid.
    #[serde(default)]
    pub freq_shift: f64,
    /// Added conditioning: `text_time` (SDXL: pooled text embedding + 6 size/crop ids).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each time id's sinusoid (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (SDXL: 1280 pooled + 6 × 256 = 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Mid block kind (`UNetMidBlock2DCrossAttn` or absent for the default).
    #[serde(default)]
    pub mid_block_type: Option<String>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn one_block() -> PerBlock {
    PerBlock::One(1)
}
fn thirty_two() -> usize {
    32
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl UnetConfig {
    /// SD1.5's published UNet config, with `time_cond_proj_dim` for LCM-distilled weights.
    pub fn sd15(time_cond_proj_dim: Option<usize>) -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            layers_per_block: 2,
            cross_attention_dim: 768,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::One(1),
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            time_cond_proj_dim,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            mid_block_type: None,
        }
    }

    /// SDXL base's published UNet config.
    pub fn sdxl(time_cond_proj_dim: Option<usize>) -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280],
            down_block_types: vec![
                "DownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
            ],
            up_block_types: vec![
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "UpBlock2D".into(),
            ],
            cross_attention_dim: 2048,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::sd15(time_cond_proj_dim)
        }
    }

    /// The shape description `drover_shared::arch` maps names with (diffusers ↔ LDM).
    pub fn to_arch(&self) -> drover_shared::arch::UnetConfig {
        let n = self.block_out_channels.len();
        drover_shared::arch::UnetConfig {
            block_out_channels: self.block_out_channels.iter().map(|&c| c as u64).collect(),
            cross_attention: self
                .down_block_types
                .iter()
                .map(|t| t.starts_with("CrossAttn"))
                .collect(),
            transformer_layers: (0..n)
                .map(|i| self.transformer_layers_per_block.get(i) as u64)
                .collect(),
            mid_transformer_layers: self.transformer_layers_per_block.get(n - 1) as u64,
            layers_per_block: self.layers_per_block as u64,
            cross_attention_dim: self.cross_attention_dim as u64,
            linear_projection: self.use_linear_projection,
            addition_embed_in: self.projection_class_embeddings_input_dim.map(|d| d as u64),
            time_cond_proj_dim: self.time_cond_proj_dim.map(|d| d as u64),
            in_channels: self.in_channels as u64,
        }
    }

    /// Whether the UNet takes SDXL's `text_time` added conditioning.
    pub fn text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// SD2.x's published UNet config (heads of 64 dims, linear projections, 1024-wide text).
    pub fn sd2(time_cond_proj_dim: Option<usize>) -> Self {
        Self {
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            ..Self::sd15(time_cond_proj_dim)
        }
    }

    fn heads(&self, level: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(level)
    }

    /// Checks the config describes a UNet this module can build.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let bad = |m: String| Err(NodeError::ModelConfig(format!("unet config: {m}")));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return bad(format!("block type {t} is not supported"));
            }
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_some()
                    && self.projection_class_embeddings_input_dim.is_some() => {}
            Some("text_time") => {
                return bad("text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
            }
            Some(t) => return bad(format!("addition_embed_type {t} is not supported")),
        }
        if let Some(t) = &self.mid_block_type
            && t != "UNetMidBlock2DCrossAttn"
        {
            return bad(format!("mid_block_type {t} is not supported"));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if heads == 0 || c % heads != 0 || c % self.norm_num_groups != 0 {
                return bad(format!(
                    "{c} channels at level {i} do not split into {heads} heads and {} groups",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }

    /// How many times the latent is halved (`2^(levels-1)` must divide its sides).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

struct Resnet<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Linear<B>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> Resnet<B> {
    fn load(
        l: &mut Loader<B>,
        p: &str,
        cin: usize,
        cout: usize,
        temb: usize,
        cfg: &UnetConfig,
    ) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            norm1: l.group_norm(&format!("{p}.norm1"), cin, g, cfg.norm_eps)?,
            conv1: l.conv2d(&format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: l.linear(&format!("{p}.time_emb_proj"), temb, cout, true)?,
            norm2: l.group_norm(&format!("{p}.norm2"), cout, g, cfg.norm_eps)?,
            conv2: l.conv2d(&format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(l.conv2d(&format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let t = self.time_emb_proj.forward(silu(temb.clone()));
        let [n, c] = t.dims();
        let h = h + t.reshape([n, c, 1, 1]);
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

struct Attention<B: Backend> {
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    fn load(l: &mut Loader<B>, p: &str, dim: usize, ctx: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: l.linear(&format!("{p}.to_q"), dim, dim, false)?,
            to_k: l.linear(&format!("{p}.to_k"), ctx, dim, false)?,
            to_v: l.linear(&format!("{p}.to_v"), ctx, dim, false)?,
            to_out: l.linear(&format!("{p}.to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: Tensor<B, 3>, ctx: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let ctx = ctx.cloned().unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx.clone());
        let v = self.to_v.forward(ctx);
        self.to_out.forward(attention(q, k, v, self.heads, false))
    }
}

struct TransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff_in: Linear<B>,
    ff_out: Linear<B>,
}

impl<B: Backend> TransformerBlock<B> {
    fn load(l: &mut Loader<B>, p: &str, dim: usize, ctx: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: l.layer_norm(&format!("{p}.norm1"), dim, 1e-5)?,
            attn1: Attention::load(l, &format!("{p}.attn1"), dim, dim, heads)?,
            norm2: l.layer_norm(&format!("{p}.norm2"), dim, 1e-5)?,
            attn2: Attention::load(l, &format!("{p}.attn2"), dim, ctx, heads)?,
            norm3: l.layer_norm(&format!("{p}.norm3"), dim, 1e-5)?,
            ff_in: l.linear(&format!("{p}.ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: l.linear(&format!("{p}.ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: Tensor<B, 3>, ctx: &Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(ctx)) + x;
        let h = self.ff_in.forward(self.norm3.forward(x.clone()));
        let [hidden, gate] = chunk2(h);
        self.ff_out.forward(hidden * gelu(gate)) + x
    }
}

/// Splits the last dimension in two halves.
pub(crate) fn chunk2<B: Backend>(x: Tensor<B, 3>) -> [Tensor<B, 3>; 2] {
    let [n, l, d] = x.dims();
    let half = d / 2;
    [
        x.clone().slice([0..n, 0..l, 0..half]),
        x.slice([0..n, 0..l, half..d]),
    ]
}

enum Projection<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

struct Transformer2d<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Projection<B>,
    blocks: Vec<TransformerBlock<B>>,
    proj_out: Projection<B>,
}

impl<B: Backend> Transformer2d<B> {
    fn load(
        l: &mut Loader<B>,
        p: &str,
        ch: usize,
        heads: usize,
        depth: usize,
        cfg: &UnetConfig,
    ) -> Result<Self> {
        let proj = |l: &mut Loader<B>, name: &str| -> Result<Projection<B>> {
            let path = format!("{p}.{name}");
            Ok(if cfg.use_linear_projection {
                Projection::Linear(l.linear(&path, ch, ch, true)?)
            } else {
                Projection::Conv(l.conv2d(&path, ch, ch, 1, 1, 0)?)
            })
        };
        let norm = l.group_norm(&format!("{p}.norm"), ch, cfg.norm_num_groups, 1e-6)?;
        let proj_in = proj(l, "proj_in")?;
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(
                    l,
                    &format!("{p}.transformer_blocks.{i}"),
                    ch,
                    cfg.cross_attention_dim,
                    heads,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out: proj(l, "proj_out")?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>, ctx: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let normed = self.norm.forward(x.clone());
        let mut t = match &self.proj_in {
            Projection::Conv(c) => to_tokens(c.forward(normed)),
            Projection::Linear(lin) => lin.forward(to_tokens(normed)),
        };
        for block in &self.blocks {
            t = block.forward(t, ctx);
        }
        let out = match &self.proj_out {
            Projection::Conv(c) => c.forward(from_tokens(t, h, w)),
            Projection::Linear(lin) => from_tokens(lin.forward(t), h, w),
        };
        out + x
    }
}

struct Level<B: Backend> {
    resnets: Vec<Resnet<B>>,
    attentions: Vec<Transformer2d<B>>,
    resample: Option<Conv2d<B>>,
}

/// How one down or up level is shaped.
struct LevelShape {
    /// `down_blocks.{i}` or `up_blocks.{i}`.
    prefix: String,
    /// Input channels of each resnet (with the skip connection for up levels).
    resnet_inputs: Vec<usize>,
    /// Output channels of the level.
    channels: usize,
    /// `(heads, transformer depth)` when the level has cross-attention.
    attention: Option<(usize, usize)>,
    /// The resampling conv after the resnets (`downsamplers.0` stride 2, `upsamplers.0` stride 1).
    resample: Option<(&'static str, usize)>,
}

impl<B: Backend> Level<B> {
    fn load(l: &mut Loader<B>, shape: &LevelShape, temb: usize, cfg: &UnetConfig) -> Result<Self> {
        let (p, cout) = (&shape.prefix, shape.channels);
        let mut level = Self {
            resnets: Vec::new(),
            attentions: Vec::new(),
            resample: None,
        };
        for (j, &rin) in shape.resnet_inputs.iter().enumerate() {
            let resnet = Resnet::load(l, &format!("{p}.resnets.{j}"), rin, cout, temb, cfg)?;
            level.resnets.push(resnet);
            if let Some((heads, depth)) = shape.attention {
                let path = format!("{p}.attentions.{j}");
                level
                    .attentions
                    .push(Transformer2d::load(l, &path, cout, heads, depth, cfg)?);
            }
        }
        if let Some((name, stride)) = shape.resample {
            let path = format!("{p}.{name}.0.conv");
            level.resample = Some(l.conv2d(&path, cout, cout, 3, stride, 1)?);
        }
        Ok(level)
    }
}

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
    /// text_time conditioning.
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
        let c0 = self.config.block_out_channels[0];
        let t = timestep_embedding::<B>(
            &[timestep],
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &device,
        )
        .repeat_dim(0, n);
        let t = match (&self.cond_proj, timestep_cond) {
            (Some(p), Some(cond)) => t + p.forward(cond.clone()),
            (Some(_), None) => {
                return Err(NodeError::InvalidJob(
                    "this UNet is guidance-distilled (time_cond_proj_dim) and needs a guidance embedding"
                        .into(),
                ));
            }
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
                .reshape([1, 6 * dim])
                .repeat_dim(0, n);
                let add = Tensor::cat(vec![added.text_embeds.clone(), ids], 1);
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
        Ok(self.conv_out.forward(silu(self.norm_out.forward(x))))
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
        burn::tensor::TensorData::new(data, [timesteps.len(), dim]),
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
    Tensor::from_data(burn::tensor::TensorData::new(data, [1, dim]), device)
}
