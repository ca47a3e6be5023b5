//! The few layers the SD networks are made of, as plain structs over Burn's functional ops.
//! Weights are created by [`super::weights::Loader`]; nothing here trains.

use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::module::{self, conv2d, linear};
use ::burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use ::burn::tensor::{DType, Tensor, TensorPrimitive, activation};

/// Where a LoRA-capable weight sits: its component and the module names LoRA keys may give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraSite {
    /// `unet`, `text_encoder` or `text_encoder_2`.
    pub component: &'static str,
    /// The module's path as LoRA keys name it (diffusers; `text_model.` before text layers).
    pub path: String,
    /// Another name the module goes by (SDXL kohya files use LDM paths).
    pub alias: Option<String>,
}

/// A weight LoRAs may change in place ([`super::lora::switch`]): where it sits, and its base
/// weight while it carries a LoRA delta (`None`: the weight is the base).
#[derive(Clone, Debug)]
pub struct LoraSlot<B: Backend, const D: usize> {
    /// Where the weight sits.
    pub site: Arc<LoraSite>,
    /// The weight without any delta, kept while a delta is merged.
    pub base: Option<Tensor<B, D>>,
}

/// `y = x·W + b`, with `W` stored `[in, out]`.
#[derive(Clone, Debug)]
pub struct Linear<B: Backend> {
    /// `[in, out]`.
    pub weight: Tensor<B, 2>,
    /// `[out]`.
    pub bias: Option<Tensor<B, 1>>,
    /// Set when LoRAs may change the weight (loaded with a LoRA component).
    pub lora: Option<LoraSlot<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// Applies the layer over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(x, self.weight.clone(), self.bias.clone())
    }
}

/// A 2-D convolution with square kernels, symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: Tensor<B, 4>,
    /// `[out]`.
    pub bias: Option<Tensor<B, 1>>,
    /// Stride on both axes.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Set when LoRAs may change the weight (loaded with a LoRA component).
    pub lora: Option<LoraSlot<B, 4>>,
}

impl<B: Backend> Conv2d<B> {
    /// Applies the convolution to `[n, c, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let options = ConvOptions::new(
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        conv2d(x, self.weight.clone(), self.bias.clone(), options)
    }
}

/// One LoRA-capable layer, reached by [`Layers::visit_layers`].
pub enum LayerMut<'a, B: Backend> {
    /// A linear layer.
    Linear(&'a mut Linear<B>),
    /// A convolution.
    Conv(&'a mut Conv2d<B>),
}

/// A network whose linear and convolution layers can be visited, in a fixed order, so LoRAs
/// can be switched on the loaded weights.
pub trait Layers<B: Backend> {
    /// Calls `f` on every linear and convolution layer.
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>));
}

impl<B: Backend> Layers<B> for Linear<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        f(LayerMut::Linear(self));
    }
}

impl<B: Backend> Layers<B> for Conv2d<B> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        f(LayerMut::Conv(self));
    }
}

impl<B: Backend, T: Layers<B>> Layers<B> for Option<T> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        if let Some(t) = self {
            t.visit_layers(f);
        }
    }
}

impl<B: Backend, T: Layers<B>> Layers<B> for [T] {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_, B>)) {
        for t in self {
            t.visit_layers(f);
        }
    }
}

/// Group normalisation over `[n, c, h, w]` (or `[n, c, l]` flattened the same way).
#[derive(Clone, Debug)]
pub struct GroupNorm<B: Backend> {
    /// Per-channel scale (f32).
    pub gamma: Tensor<B, 1>,
    /// Per-channel shift (f32).
    pub beta: Tensor<B, 1>,
    /// Number of groups.
    pub groups: usize,
    /// Variance epsilon.
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// Normalises `[n, c, h, w]`: each group is a row of the backend's (fused) layer norm,
    /// then the per-channel affine. Half-precision inputs are normalised in f32 (a group's sum
    /// of squares overflows f16 at SD sizes) and the result cast back.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let dtype = x.dtype();
        let row = (c / self.groups) * h * w;
        let grouped = in_f32(x).reshape([n, self.groups, row]);
        let ones = Tensor::<B, 1>::ones([row], &grouped.device());
        let normed = fused_layer_norm(grouped, ones, None, self.eps);
        let out = normed.reshape([n, c, h, w]) * self.gamma.clone().reshape([1, c, 1, 1])
            + self.beta.clone().reshape([1, c, 1, 1]);
        out.cast(dtype)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale (f32).
    pub gamma: Tensor<B, 1>,
    /// Shift (f32).
    pub beta: Tensor<B, 1>,
    /// Variance epsilon.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Normalises `[n, l, d]` over `d` (in f32 for half-precision inputs, like [`GroupNorm`]).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = x.dtype();
        fused_layer_norm(
            in_f32(x),
            self.gamma.clone(),
            Some(self.beta.clone()),
            self.eps,
        )
        .cast(dtype)
    }
}

/// `x` as f32 (a no-op for f32 tensors).
pub fn in_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
}

/// The backend's layer norm over the last dimension (one fused kernel where the backend has one).
fn fused_layer_norm<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
    eps: f64,
) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.map(|b| b.into_primitive().tensor()),
        eps,
    )))
}

/// SiLU, `x·σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation::silu(x)
}

/// Exact (erf) GELU.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation::gelu(x)
}

/// OpenAI CLIP's `quick_gelu`, `x·σ(1.702x)`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * activation::sigmoid(x.mul_scalar(1.702))
}

/// Multi-head attention on `[n, l, heads·d]` queries and `[n, s, heads·d]` keys/values:
/// `softmax(Q·Kᵀ/√d)·V`, causal when asked (CLIP text).
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [n, l, inner] = q.dims();
    let s = k.dims()[1];
    let d = inner / heads;
    let split = |t: Tensor<B, 3>, len: usize| t.reshape([n, len, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, l), split(k, s), split(v, s));
    // Flex's fused attention computes the scores in scalar loops; as two GEMMs around a softmax
    // the UNet step runs ~25% faster on the CPU (BENCHMARKS.md). GPU backends keep the fused op.
    if !causal && B::name(&q.device()) == "flex" {
        return explicit_attention(q, k, v)
            .swap_dims(1, 2)
            .reshape([n, l, inner]);
    }
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    module::attention(q, k, v, None, None, options)
        .swap_dims(1, 2)
        .reshape([n, l, inner])
}

/// `softmax(Q·Kᵀ/√d)·V` on `[n, heads, l, d]` as two matrix products (GEMM) around a softmax,
/// in blocks of 1,024 queries so the score matrix stays small (16 MiB per head at 4,096 keys).
fn explicit_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    const BLOCK: usize = 1024;
    let [_, _, l, d] = q.dims();
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.swap_dims(2, 3);
    let block = |q: Tensor<B, 4>| {
        let scores = q.mul_scalar(scale).matmul(kt.clone());
        activation::softmax(scores, 3).matmul(v.clone())
    };
    if l <= BLOCK {
        return block(q);
    }
    let parts: Vec<Tensor<B, 4>> = (0..l)
        .step_by(BLOCK)
        .map(|start| block(q.clone().narrow(2, start, BLOCK.min(l - start))))
        .collect();
    Tensor::cat(parts, 2)
}

/// `[n, c, h, w]` → `[n, h·w, c]`.
pub fn to_tokens<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).swap_dims(1, 2)
}

/// `[n, h·w, c]` → `[n, c, h, w]`.
pub fn from_tokens<B: Backend>(x: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 4> {
    let [n, _, c] = x.dims();
    x.swap_dims(1, 2).reshape([n, c, h, w])
}

/// Nearest-neighbour 2× upsampling of `[n, c, h, w]`.
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, 2, w, 2])
        .reshape([n, c, 2 * h, 2 * w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::burn::Cpu;
    use ::burn::tensor::{Distribution, Tolerance};

    /// The GEMM attention the CPU runs equals the fused op, across the query blocks too
    /// (2,500 queries: two whole blocks and a partial one), with causal masks left to the
    /// fused op.
    #[test]
    fn blocked_gemm_attention_equals_the_fused_op() {
        let device = Default::default();
        let t = |l: usize| {
            Tensor::<Cpu, 4>::random([1, 2, l, 16], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (t(2500), t(300), t(300));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let fused = module::attention(q.clone(), k.clone(), v.clone(), None, None, options);
        let gemm = explicit_attention(q, k, v);
        gemm.into_data()
            .assert_approx_eq::<f32>(&fused.into_data(), Tolerance::absolute(1e-5));
        // Through `attention`, [n, l, heads·d] in and out, both ways.
        let flat = |l: usize| {
            Tensor::<Cpu, 3>::random([2, l, 32], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (flat(1100), flat(77), flat(77));
        let out = attention(q.clone(), k.clone(), v.clone(), 2, false);
        assert_eq!(out.dims(), [2, 1100, 32]);
        let split = |t: Tensor<Cpu, 3>, len: usize| t.reshape([2, len, 2, 16]).swap_dims(1, 2);
        let want = module::attention(
            split(q, 1100),
            split(k, 77),
            split(v, 77),
            None,
            None,
            options,
        )
        .swap_dims(1, 2)
        .reshape([2, 1100, 32]);
        out.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
    }
}
