//! The UNet's building blocks: resnet blocks, cross-attention transformers (conv or linear
//! projections) and the down/up levels made of them.

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::UnetConfig;
use crate::burn::nn::{
    Conv2d, GroupNorm, LayerMut, LayerNorm, Layers, Linear, attention, from_tokens, geglu, silu,
    to_tokens,
};
use crate::burn::weights::Loader;
use crate::error::Result;

pub(super) struct Resnet<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Linear<B>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> Resnet<B> {
    pub(super) fn load(
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

    pub(super) fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let t = self.time_emb_proj.forward(silu(temb.clone()));
        let h = self.conv2.forward(self.norm2.forward_silu_shifted(h, t));
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
        self.ff_out.forward(geglu(h)) + x
    }
}

/// Splits the last dimension in two halves.
enum Projection<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

pub(super) struct Transformer2d<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Projection<B>,
    blocks: Vec<TransformerBlock<B>>,
    proj_out: Projection<B>,
}

impl<B: Backend> Transformer2d<B> {
    pub(super) fn load(
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

    pub(super) fn forward(&self, x: Tensor<B, 4>, ctx: &Tensor<B, 3>) -> Tensor<B, 4> {
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

pub(super) struct Level<B: Backend> {
    pub(super) resnets: Vec<Resnet<B>>,
    pub(super) attentions: Vec<Transformer2d<B>>,
    pub(super) resample: Option<Conv2d<B>>,
}

/// How one down or up level is shaped.
pub(super) struct LevelShape {
    /// `down_blocks.{i}` or `up_blocks.{i}`.
    pub(super) prefix: String,
    /// Input channels of each resnet (with the skip connection for up levels).
    pub(super) resnet_inputs: Vec<usize>,
    /// Output channels of the level.
    pub(super) channels: usize,
    /// `(heads, transformer depth)` when the level has cross-attention.
    pub(super) attention: Option<(usize, usize)>,
    /// The resampling conv after the resnets (`downsamplers.0` stride 2, `upsamplers.0` stride 1).
    pub(super) resample: Option<(&'static str, usize)>,
}

impl<B: Backend> Level<B> {
    pub(super) fn load(
        l: &mut Loader<B>,
        shape: &LevelShape,
        temb: usize,
        cfg: &UnetConfig,
    ) -> Result<Self> {
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

impl<B: Backend> Layers<B> for Resnet<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.conv1.visit_layers(f);
        self.time_emb_proj.visit_layers(f);
        self.conv2.visit_layers(f);
        self.shortcut.visit_layers(f);
    }
}

impl<B: Backend> Layers<B> for Attention<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        for l in [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ] {
            l.visit_layers(f);
        }
    }
}

impl<B: Backend> Layers<B> for TransformerBlock<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.attn1.visit_layers(f);
        self.attn2.visit_layers(f);
        self.ff_in.visit_layers(f);
        self.ff_out.visit_layers(f);
    }
}

impl<B: Backend> Layers<B> for Projection<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        match self {
            Projection::Conv(c) => c.visit_layers(f),
            Projection::Linear(l) => l.visit_layers(f),
        }
    }
}

impl<B: Backend> Layers<B> for Transformer2d<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.proj_in.visit_layers(f);
        self.blocks.visit_layers(f);
        self.proj_out.visit_layers(f);
    }
}

impl<B: Backend> Layers<B> for Level<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        self.resnets.visit_layers(f);
        self.attentions.visit_layers(f);
        self.resample.visit_layers(f);
    }
}
