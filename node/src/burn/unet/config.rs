//! The UNet's shape: the fields of a diffusers UNet `config.json` this implementation reads,
//! their defaults, validation, and the matching [`drover_shared::arch`] description.

use serde::Deserialize;

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
    pub(super) fn get(&self, i: usize) -> usize {
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

    pub(super) fn heads(&self, level: usize) -> usize {
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
