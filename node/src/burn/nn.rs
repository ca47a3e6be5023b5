//! The few layers the SD networks are made of, as plain structs over Burn's functional ops.
//! Weights are created by [`super::weights::Loader`]; nothing here trains.

use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use ::burn::tensor::module::{self, conv2d, linear};
use ::burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use ::burn::tensor::{DType, Tensor, TensorData, TensorPrimitive, activation};

use drover_kernels as cpu_kernels;

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
        #[cfg(feature = "cuda")]
        if let Some(out) =
            super::cuda_kernels::conv2d(&x, &self.weight, self.bias.as_ref(), &options)
        {
            return out;
        }
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
        self.apply(x, None, false)
    }

    /// `silu(self.forward(x))`, in one fused kernel on the CPU.
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.apply(x, None, true)
    }

    /// `silu(self.forward(x + shift))` with `shift` `[n, c]` added to every value of its
    /// channel (a resnet's time embedding), in one fused kernel on the CPU.
    pub fn forward_silu_shifted(&self, x: Tensor<B, 4>, shift: Tensor<B, 2>) -> Tensor<B, 4> {
        self.apply(x, Some(shift), true)
    }

    fn apply(
        &self,
        x: Tensor<B, 4>,
        shift: Option<Tensor<B, 2>>,
        silu_after: bool,
    ) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let shape = cpu_kernels::GroupShape {
            channels: c,
            spatial: h * w,
            groups: self.groups,
            eps: self.eps,
        };
        let x = match on_cpu_values(x, |values| {
            let gamma = cpu_values(&self.gamma)?;
            let beta = cpu_values(&self.beta)?;
            let shift = match &shift {
                Some(t) if t.dims() == [n, c] && t.dtype() == DType::F32 => Some(cpu_values(t)?),
                Some(_) => return None,
                None => None,
            };
            cpu_kernels::group_norm(values, shape, &gamma, &beta, shift.as_deref(), silu_after);
            Some(())
        }) {
            Ok((out, ())) => return out,
            Err(x) => x,
        };
        let x = match shift {
            Some(t) => x + t.reshape([n, c, 1, 1]),
            None => x,
        };
        let out = self.composed(x, [n, c, h, w]);
        if silu_after { silu(out) } else { out }
    }

    /// Burn's ops: the backend's layer norm per group, then the affine.
    fn composed(&self, x: Tensor<B, 4>, [n, c, h, w]: [usize; 4]) -> Tensor<B, 4> {
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

/// Runs `kernel` in place on the values of an f32 tensor of the `flex` backend and gives the
/// tensor and the kernel's answer back; any other tensor (or a kernel answering `None` before it wrote) comes back as
/// `Err`, unchanged, for Burn's ops.
fn on_cpu_values<B: Backend, const D: usize, T>(
    x: Tensor<B, D>,
    kernel: impl FnOnce(&mut [f32]) -> Option<T>,
) -> Result<(Tensor<B, D>, T), Tensor<B, D>> {
    let device = x.device();
    if x.dtype() != DType::F32 || B::name(&device) != "flex" || !cpu_kernels::enabled() {
        return Err(x);
    }
    let mut data = x.into_data();
    let done = cpu_kernels::f32s_mut(&mut data.bytes).and_then(kernel);
    let out = Tensor::from_data(data, &device);
    match done {
        Some(answer) => Ok((out, answer)),
        None => Err(out),
    }
}

/// The values of a small f32 tensor (norm parameters) on the host.
fn cpu_values<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Vec<f32>> {
    x.to_data().into_vec::<f32>().ok()
}

/// The largest difference of `got` from `want` relative to `want`'s largest value, when over
/// `limit` (or infinite: shapes differ, a value is not finite); `None` when they agree.
pub fn disagreement<B: Backend, const D: usize>(
    got: Tensor<B, D>,
    want: Tensor<B, D>,
    limit: f32,
) -> Option<f32> {
    if got.dims() != want.dims() {
        return Some(f32::INFINITY);
    }
    let values = |t: Tensor<B, D>| in_f32(t).into_data().to_vec::<f32>().unwrap_or_default();
    let (got, want) = (values(got), values(want));
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max);
    let error = worst / scale;
    (error > limit || got.len() != want.len()).then_some(error)
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

/// GEGLU on `[n, l, 2·inner]`: `hidden · gelu(gate)` with `[hidden, gate]` the two halves of the
/// last dimension (one kernel on the CPU).
pub fn geglu<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, l, d] = h.dims();
    let inner = d / 2;
    let device = h.device();
    let h = match on_cpu_values(h, |values| Some(cpu_kernels::geglu(values, inner))) {
        Ok((_, out)) => return Tensor::from_data(TensorData::new(out, [n, l, inner]), &device),
        Err(h) => h,
    };
    let hidden = h.clone().slice([0..n, 0..l, 0..inner]);
    let gate = h.slice([0..n, 0..l, inner..d]);
    hidden * gelu(gate)
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
    #[cfg(feature = "cuda")]
    if !causal
        && q.dtype() == DType::F16
        && super::cuda_kernels::is_cuda::<B>()
        && super::cuda_kernels::enabled()
    {
        // Tensor-core flash tiles take head dims in steps of 16 (SD1.5's 40 is padded to 48).
        let flash = with_head_dim_multiple(q.clone(), k.clone(), v.clone(), 16, |q, k, v| {
            super::cuda_kernels::flash_attention(&q, &k, &v)
        });
        if let Some(out) = flash {
            return out.swap_dims(1, 2).reshape([n, l, inner]);
        }
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

/// Runs `attend` (an attention with the default `1/√d` scale, on `[n, heads, l, d]`) with the
/// head dimension zero-padded up to a multiple of `multiple`, and gives the first `d` output
/// columns back. Zero columns add nothing to `Q·Kᵀ` and give zero output columns; the query is
/// scaled by `√(d'/d)` so the kernel's `1/√d'` becomes the model's `1/√d`.
pub fn with_head_dim_multiple<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    multiple: usize,
    attend: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Option<Tensor<B, 4>>,
) -> Option<Tensor<B, 4>> {
    let d = q.dims()[3];
    let padded = d.div_ceil(multiple) * multiple;
    if padded == d {
        return attend(q, k, v);
    }
    let pad = |t: Tensor<B, 4>| {
        let [a, b, c, _] = t.dims();
        let zeros = Tensor::<B, 4>::zeros([a, b, c, padded - d], (&t.device(), t.dtype()));
        Tensor::cat(vec![t, zeros], 3)
    };
    let q = pad(q).mul_scalar((padded as f64 / d as f64).sqrt());
    let out = attend(q, pad(k), pad(v))?;
    Some(out.narrow(3, 0, d))
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
        let keys = scores.dims()[3];
        let probs = on_cpu_values(scores, |values| {
            cpu_kernels::softmax_rows(values, keys);
            Some(())
        })
        .map_or_else(|scores| activation::softmax(scores, 3), |(probs, ())| probs);
        probs.matmul(v.clone())
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

    /// The CPU's fused group norm (+ SiLU) equals Burn's composed ops, with several groups per
    /// batch item, odd spatial sizes and a non-trivial affine; half-precision tensors keep
    /// Burn's ops and their dtype.
    #[test]
    fn fused_cpu_group_norm_equals_the_composed_ops() {
        let device = Default::default();
        let c = 12;
        let norm = GroupNorm::<Cpu> {
            gamma: Tensor::random([c], Distribution::Normal(1.0, 0.5), &device),
            beta: Tensor::random([c], Distribution::Normal(0.0, 0.5), &device),
            groups: 4,
            eps: 1e-5,
        };
        let x = Tensor::<Cpu, 4>::random([2, c, 5, 7], Distribution::Normal(3.0, 2.0), &device);
        let composed = norm.composed(x.clone(), [2, c, 5, 7]);
        norm.forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&composed.clone().into_data(), Tolerance::absolute(1e-5));
        norm.forward_silu(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&silu(composed).into_data(), Tolerance::absolute(1e-5));
        let shift = Tensor::<Cpu, 2>::random([2, c], Distribution::Normal(0.0, 4.0), &device);
        let shifted = x.clone() + shift.clone().reshape([2, c, 1, 1]);
        norm.forward_silu_shifted(x.clone(), shift)
            .into_data()
            .assert_approx_eq::<f32>(
                &silu(norm.composed(shifted, [2, c, 5, 7])).into_data(),
                Tolerance::absolute(1e-5),
            );
        let half = norm.forward_silu(x.clone().cast(DType::F16));
        assert_eq!(half.dtype(), DType::F16);
        half.cast(DType::F32)
            .into_data()
            .assert_approx_eq::<f32>(&norm.forward_silu(x).into_data(), Tolerance::absolute(1e-2));
    }

    /// Attention with the head dimension zero-padded (40 → 48, as SD1.5's on tensor-core flash
    /// kernels) and the query rescaled equals attention on the original dimension.
    #[test]
    fn padded_head_dim_attention_equals_the_original() {
        let device = Default::default();
        let t = |l: usize, d: usize| {
            Tensor::<Cpu, 4>::random([2, 3, l, d], Distribution::Normal(0.0, 1.0), &device)
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let fused = |q, k, v| Some(module::attention(q, k, v, None, None, options));
        for d in [40, 48, 20] {
            let (q, k, v) = (t(64, d), t(77, d), t(77, d));
            let want = module::attention(q.clone(), k.clone(), v.clone(), None, None, options);
            let mut seen = 0;
            let padded = with_head_dim_multiple(q, k, v, 16, |q, k, v| {
                seen = q.dims()[3];
                assert_eq!([k.dims()[3], v.dims()[3]], [seen, seen]);
                fused(q, k, v)
            })
            .expect("the op answers");
            assert_eq!(seen, d.div_ceil(16) * 16);
            assert_eq!(padded.dims(), [2, 3, 64, d]);
            padded
                .into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-5));
        }
    }

    /// Agreement within the limit, relative to the reference's scale; a value off, a NaN or
    /// another shape disagrees.
    #[test]
    fn disagreement_is_relative_and_catches_nans_and_shapes() {
        let device = Default::default();
        let want = Tensor::<Cpu, 2>::from_floats([[100.0, -50.0], [3.0, 0.0]], &device);
        let close = want.clone() + Tensor::from_floats([[0.5, -0.5], [0.9, 0.0]], &device);
        assert_eq!(disagreement(close, want.clone(), 1e-2), None);
        let off = want.clone() + Tensor::from_floats([[0.0, 0.0], [2.0, 0.0]], &device);
        let error = disagreement(off, want.clone(), 1e-2).expect("2 in 100 is over 1%");
        assert!((error - 0.02).abs() < 1e-6, "{error}");
        let nan = Tensor::<Cpu, 2>::from_floats([[100.0, f32::NAN], [3.0, 0.0]], &device);
        assert_eq!(disagreement(nan, want.clone(), 1e-2), Some(f32::INFINITY));
        let other = Tensor::<Cpu, 2>::zeros([1, 4], &device);
        assert_eq!(disagreement(other, want, 1e-2), Some(f32::INFINITY));
    }

    /// The CPU's GEGLU kernel equals the halves through Burn's ops; half precision keeps them.
    #[test]
    fn geglu_kernel_equals_the_composed_ops() {
        let device = Default::default();
        let h = Tensor::<Cpu, 3>::random([2, 7, 12], Distribution::Normal(0.0, 2.0), &device);
        let hidden = h.clone().slice([0..2, 0..7, 0..6]);
        let gate = h.clone().slice([0..2, 0..7, 6..12]);
        let want = hidden * gelu(gate);
        let got = geglu(h.clone());
        assert_eq!(got.dims(), [2, 7, 6]);
        got.into_data()
            .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::absolute(1e-5));
        let half = geglu(h.cast(DType::F16));
        assert_eq!(half.dtype(), DType::F16);
        half.cast(DType::F32)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-2));
    }
}
