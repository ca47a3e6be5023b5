//! The CUDA kernels the node chooses itself instead of Burn's defaults (which, without
//! autotuning, are a direct convolution and attention as matmul + softmax): tensor-core
//! implicit-GEMM convolution and flash attention from burn-cubecl / cubek, called on the
//! `CubeBackend` primitive. [`super::nn`] hands every CUDA tensor here first; a shape a kernel
//! refuses (no tensor cores, an unsupported tile) is remembered and goes to Burn's op from then
//! on, so the fast path never fails a job. Half precision only: f32 keeps Burn's exact kernels.
//! `DROVER_CUDA_KERNELS=burn` turns the choice off (the device bench measures both).

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use ::burn::tensor::backend::Backend;
use ::burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use ::burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::attention::{AttentionStrategy, attention as cube_attention};
use burn_cubecl::kernel::conv::{ConvStrategy, conv_forward};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::tensor::CubeTensor;
use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;

type Prim = CubeTensor<CudaRuntime>;

/// Whether the node's kernel choice is on (`DROVER_CUDA_KERNELS` unset or `fast`; `burn`
/// leaves every op to Burn).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = !matches!(std::env::var("DROVER_CUDA_KERNELS").as_deref(), Ok("burn"));
        tracing::info!(fast_kernels = on, "cuda kernel choice");
        on
    })
}

/// Set when the start-up check found a kernel disagreeing with Burn's op.
static CONV_OFF: AtomicBool = AtomicBool::new(false);
static ATTENTION_OFF: AtomicBool = AtomicBool::new(false);

/// Runs each chosen kernel once on `device` beside Burn's op on the same small f16 inputs (a
/// 3×3 convolution; attention with SD1.5's head dim 40, padded) and turns off any kernel whose
/// answer is off by more than [`AGREEMENT`] of the reference's largest value, with a warning:
/// a kernel that computes wrongly on this GPU falls back instead of spoiling images. Returns
/// the kernels turned off. Called before the warm-up.
pub fn self_check<B: Backend>(device: &B::Device) -> Vec<&'static str> {
    use ::burn::tensor::{Distribution, module};
    if !is_cuda::<B>() || !enabled() {
        return Vec::new();
    }
    let normal = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(DType::F16)
    };
    let mut off = Vec::new();
    let mut judge = |kernel: &'static str, flag: &AtomicBool, fast, reference| {
        if let Some(error) = disagreement::<B, 4>(fast, reference) {
            flag.store(true, Ordering::Relaxed);
            tracing::warn!(
                kernel,
                error,
                "cuda kernel disagrees with burn's op; turned off"
            );
            off.push(kernel);
        }
    };
    let (x, w) = (normal([1, 32, 16, 16]), normal([64, 32, 3, 3]));
    let bias = Tensor::<B, 1>::random([64], Distribution::Normal(0.0, 1.0), device);
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    if let Some(fast) = conv2d(&x, &w, Some(&bias), &options) {
        let reference = module::conv2d(x, w, Some(bias.cast(DType::F16)), options);
        judge("implicit-gemm conv", &CONV_OFF, fast, reference);
    }
    let (q, k, v) = (
        normal([1, 2, 64, 40]),
        normal([1, 2, 77, 40]),
        normal([1, 2, 77, 40]),
    );
    let flash =
        super::nn::with_head_dim_multiple(q.clone(), k.clone(), v.clone(), 16, |q, k, v| {
            flash_attention(&q, &k, &v)
        });
    if let Some(fast) = flash {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let reference = module::attention(q, k, v, None, None, options);
        judge("flash attention", &ATTENTION_OFF, fast, reference);
    }
    off
}

/// How far a kernel's answer may be from Burn's op, relative to the reference's largest value
/// (f16 keeps 11 significant bits; both sides accumulate in f32 over a few hundred terms).
pub const AGREEMENT: f32 = 1e-2;

fn disagreement<B: Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>) -> Option<f32> {
    super::nn::disagreement(got, want, AGREEMENT)
}

/// Shapes (with the kernel's name) a kernel refused; they go to Burn's op from then on.
fn refused() -> &'static Mutex<HashSet<String>> {
    static REFUSED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    REFUSED.get_or_init(Default::default)
}

fn was_refused(key: &str) -> bool {
    refused().lock().map(|r| r.contains(key)).unwrap_or(true)
}

fn refuse(key: String, reason: &str) {
    tracing::warn!(kernel = %key, reason, "cuda kernel refused a shape; burn's op runs it");
    if let Ok(mut r) = refused().lock() {
        r.insert(key);
    }
}

fn downcast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let boxed: Box<dyn Any> = Box::new(t);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(boxed) => match boxed.downcast::<T>() {
            Ok(t) => Err(*t),
            // Unreachable: the box holds a `T`.
            Err(_) => unreachable!("a box keeps its type"),
        },
    }
}

/// The CUDA primitive of `t`, or `t` back for other backends.
fn to_prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Prim, Tensor<B, D>> {
    downcast::<B::FloatTensorPrimitive, Prim>(t.into_primitive().tensor())
        .map_err(|p| Tensor::from_primitive(TensorPrimitive::Float(p)))
}

/// `p` as a tensor of `B` (whose primitive it came from).
fn from_prim<B: Backend, const D: usize>(p: Prim) -> Option<Tensor<B, D>> {
    downcast::<Prim, B::FloatTensorPrimitive>(p)
        .ok()
        .map(|p| Tensor::from_primitive(TensorPrimitive::Float(p)))
}

/// Whether `B` is a CUDA backend (its tensors are CUDA primitives).
pub fn is_cuda<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Prim>()
}

/// A 2-D convolution of f16/bf16 tensors on tensor cores (implicit GEMM, f32 accumulation), or
/// `None` when `B` is not CUDA, the input is f32, the choice is off or the kernel refuses this
/// shape.
pub fn conv2d<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<B, 4>> {
    // f32 stays on Burn's exact kernels: the tensor-core path would compute it in tf32.
    if !is_cuda::<B>()
        || !enabled()
        || CONV_OFF.load(Ordering::Relaxed)
        || !matches!(x.dtype(), DType::F16 | DType::BF16)
    {
        return None;
    }
    let key = format!(
        "implicit-gemm conv x{:?} w{:?} {:?} s{:?} p{:?}",
        x.dims(),
        weight.dims(),
        x.dtype(),
        options.stride,
        options.padding
    );
    if was_refused(&key) {
        return None;
    }
    let x = to_prim(x.clone()).ok()?;
    let w = to_prim(weight.clone()).ok()?;
    // The kernel wants one dtype throughout: weights, input and bias alike.
    let dtype = x.dtype;
    let w = if w.dtype == dtype { w } else { cast(w, dtype) };
    let b = match bias {
        Some(b) => {
            let b = to_prim(b.clone()).ok()?;
            Some(if b.dtype == dtype { b } else { cast(b, dtype) })
        }
        None => None,
    };
    match conv_forward::<CudaRuntime, 2>(x, w, b, options.clone(), ConvStrategy::ImplicitGemm) {
        Ok(out) => from_prim(out),
        Err(e) => {
            refuse(key, &format!("{e:?}"));
            None
        }
    }
}

/// Flash attention `softmax(Q·Kᵀ/√d)·V` on f16 `[n, heads, l, d]` tensors (`d` a multiple of
/// 8; [`super::nn::attention`] pads it), or `None` when `B` is not CUDA, the tensors are not
/// f16, the choice is off or no flash kernel takes this shape. Tries the tensor-core kernel first (`d` a multiple of 16,
/// queries a multiple of 64), then the one without tensor cores.
pub fn flash_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    // The flash kernels compute in f16 tiles whatever the input: f32 (precision) and bf16
    // (range) stay on Burn's attention.
    if !is_cuda::<B>()
        || !enabled()
        || ATTENTION_OFF.load(Ordering::Relaxed)
        || q.dtype() != DType::F16
    {
        return None;
    }
    let [_, _, l, d] = q.dims();
    let s = k.dims()[2];
    let shape = format!("q{:?} k{:?} {:?}", q.dims(), k.dims(), q.dtype());
    let q = into_contiguous(to_prim(q.clone()).ok()?);
    let k = into_contiguous(to_prim(k.clone()).ok()?);
    let v = into_contiguous(to_prim(v.clone()).ok()?);
    let mut strategies: Vec<(&str, AttentionStrategy)> = Vec::new();
    // The tensor-core tiles: d in steps of 16, 16·num_planes queries per stage, and (in cubek
    // 0.2) no tile for score blocks 4× longer one way than the other.
    if d % 16 == 0 && l % 64 == 0 && l < 4 * s && s < 4 * l {
        strategies.push((
            "flash-tensor-core",
            AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
                num_planes: 4,
                seq_q: 1,
                seq_kv: 1,
            }),
        ));
    }
    if d % 8 == 0 {
        strategies.push(("flash-unit", AttentionStrategy::FlashUnit));
    }
    for (name, strategy) in strategies {
        let key = format!("{name} attention {shape}");
        if was_refused(&key) {
            continue;
        }
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        match cube_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            None,
            None,
            options,
            strategy,
        ) {
            Ok(out) => return from_prim(out),
            Err(e) => refuse(key, &e.to_string()),
        }
    }
    None
}
