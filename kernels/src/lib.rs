//! Hand-written CPU kernels for the node's `flex` backend, on plain `f32` slices: group norm
//! fused with its affine and SiLU (two passes over the activations instead of the six the
//! composed ops make), and a row softmax; both use [`exp`], a branch-free exponential the
//! compiler vectorises (flex calls `expf` per element). A crate of its own so dev builds
//! optimise it like the dependencies (`[profile.dev.package.drover-kernels]`): tensor code in
//! tests and benches runs at speed. The node's `burn::nn` routes f32 `flex` tensors here and
//! every other backend to Burn's ops (so does `DROVER_CPU_KERNELS=burn`); `tests` check each
//! kernel against an f64 reference, the node's tests against Burn's ops.

// Unsafe only to call the AVX2/AVX-512 builds of the inner loops (`multiversion!`) once the
// CPU is known to have those features.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use rayon::prelude::*;

/// The widest vector instructions this CPU has, among those the loops are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// The build's baseline (SSE2 on x86-64; any other architecture).
    Baseline,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// AVX-512F with AVX2 and FMA.
    Avx512,
}

/// The level the inner loops run at, detected once.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if v3 && std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if v3 {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Defines `fn $name` three times over one `#[inline(always)]` body — baseline, AVX2+FMA and
/// AVX-512 — and calls the widest the CPU has ([`level`]), so the compiler's vectorised loops
/// use the machine's vectors without a build for each CPU.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match level() {
                    // SAFETY: `level` found AVX-512F, AVX2 and FMA on this CPU.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `level` found AVX2 and FMA on this CPU.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

/// Whether these kernels are used (`DROVER_CPU_KERNELS` unset or `fast`; `burn` leaves every op
/// to Burn's, for comparisons).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("DROVER_CPU_KERNELS").as_deref(), Ok("burn")))
}

/// `bytes` (a tensor's storage, aligned for f32) as f32 values, without looking at each one
/// (the checked casts of generic code compiled without optimisation walk every value); `None`
/// when misaligned or not a whole number of values.
pub fn f32s_mut(bytes: &mut [u8]) -> Option<&mut [f32]> {
    bytemuck::try_cast_slice_mut(bytes).ok()
}

/// `eˣ` for f32 without branches or calls, so loops over it vectorise: `2ⁿ·p(r)` with
/// `x = n·ln2 + r`, `|r| ≤ ln2/2`, `p` a degree-6 Taylor polynomial (relative error < 2e-7 over
/// the f32 range; inputs are clamped to [-87, 88], where eˣ stays a normal float).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 split in a part exact in f32 and the rest (Cody–Waite), so `r` keeps its precision.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5·2²³ rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from its exponent bits: `t`'s low mantissa bits hold n (two's complement) after the
    // rounding add, so integer arithmetic on the bits gives n + 127 without a float → int
    // conversion (which does not vectorise well); n ∈ [-126, 127] after the clamp.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// `x·σ(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// The shape and constants of a group norm over `[n, channels, spatial]` data.
#[derive(Clone, Copy, Debug)]
pub struct GroupShape {
    /// Channels (a multiple of `groups`).
    pub channels: usize,
    /// Values per channel (`h·w`).
    pub spatial: usize,
    /// Number of groups.
    pub groups: usize,
    /// Variance epsilon.
    pub eps: f64,
}

/// Group normalisation of `[n, c, spatial]` data in place, then the per-channel affine
/// (`gamma`, `beta`: `c` values each) and, with `silu_after`, SiLU. With `shift` (`n·c`
/// values), each channel of each item is first moved by its value — a UNet resnet's time
/// embedding, added without a pass of its own. Groups are normalised in parallel; mean and
/// variance are taken in two passes, with f64 totals of f32 lanes.
pub fn group_norm(
    data: &mut [f32],
    shape: GroupShape,
    gamma: &[f32],
    beta: &[f32],
    shift: Option<&[f32]>,
    silu_after: bool,
) {
    let GroupShape {
        channels,
        spatial,
        groups,
        eps,
    } = shape;
    debug_assert_eq!(gamma.len(), channels);
    debug_assert_eq!(beta.len(), channels);
    debug_assert_eq!(data.len() % (channels * spatial).max(1), 0);
    let per_group = channels / groups;
    let group_len = (per_group * spatial).max(1);
    data.par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(index, block)| {
            let group = index % groups;
            if let Some(shift) = shift {
                let first = (index / groups) * channels + group * per_group;
                for (row, &by) in block.chunks_mut(spatial.max(1)).zip(&shift[first..]) {
                    affine_row(row, 1.0, by, false);
                }
            }
            let count = block.len() as f64;
            let mean = (sum(block) / count) as f32;
            let var = sum_sq_dev(block, mean) / count;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            for (j, row) in block.chunks_mut(spatial.max(1)).enumerate() {
                let ch = group * per_group + j;
                let a = gamma[ch] * rstd;
                affine_row(row, a, beta[ch] - mean * a, silu_after);
            }
        });
}

multiversion! {
    /// `v·a + b` over a row, then SiLU when asked.
    fn affine_row(row: &mut [f32], a: f32, b: f32, silu_after: bool) {
        if silu_after {
            row.iter_mut().for_each(|v| *v = silu(*v * a + b));
        } else {
            row.iter_mut().for_each(|v| *v = *v * a + b);
        }
    }
}

multiversion! {
    /// Sum of `values` in eight f32 lanes added up in f64 (vectorised, and exact enough for a
    /// group of a few hundred thousand values).
    fn sum(values: &[f32]) -> f64 {
        sum_of(values, |v| v)
    }
}

multiversion! {
    /// `Σ (v − mean)²`, laid out like [`sum`].
    fn sum_sq_dev(values: &[f32], mean: f32) -> f64 {
        sum_of(values, |v| (v - mean) * (v - mean))
    }
}

/// `Σ f(v)` in eight f32 lanes per block of 4,096 values, the blocks' totals in f64.
#[inline(always)]
fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for chunk in values.chunks(4096) {
        let mut lanes = [0.0f32; 8];
        let mut it = chunk.chunks_exact(8);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += f(v);
            }
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
        total += it.remainder().iter().map(|&v| f64::from(f(v))).sum::<f64>();
    }
    total
}

/// The error function, branch-free (Abramowitz & Stegun 7.1.26 with [`exp`]; absolute error
/// < 5e-7 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// GEGLU, the SD transformers' feed-forward gate: rows of `2·inner` values `[hidden, gate]`
/// become `inner` values `hidden · gelu(gate)` (exact, erf GELU), rows in parallel.
pub fn geglu(h: &[f32], inner: usize) -> Vec<f32> {
    let rows = h.len() / (2 * inner).max(1);
    let mut out = vec![0.0f32; rows * inner];
    out.par_chunks_mut(inner.max(1))
        .zip(h.par_chunks(2 * inner.max(1)))
        .for_each(|(o, row)| {
            let (hidden, gate) = row.split_at(inner);
            geglu_row(o, hidden, gate);
        });
    out
}

multiversion! {
    /// `hidden · gelu(gate)` into `out`.
    fn geglu_row(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// Softmax of every `row`-long row of `data`, in place, rows in parallel.
pub fn softmax_rows(data: &mut [f32], row: usize) {
    data.par_chunks_mut(row.max(1)).for_each(softmax_row);
}

multiversion! {
    /// Softmax of one row in place.
    fn softmax_row(r: &mut [f32]) {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        r.iter_mut().for_each(|v| *v = exp(*v - max));
        let inv = 1.0 / sum_of(r, |v| v) as f32;
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale + shift
            })
            .collect()
    }

    #[test]
    fn exp_is_within_a_few_ulps_over_the_float_range() {
        let mut worst = 0.0f64;
        for i in 0..=174_900 {
            let x = -87.0 + i as f32 * 0.001;
            let want = f64::from(x).exp();
            let rel = ((f64::from(exp(x)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        // Clamped ends: large negatives go to (almost) zero, never NaN or negative.
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(-100.0)).abs() < 1e-30);
        assert!((silu(3.0) - 3.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-6);
    }

    /// Values, gamma, beta and shape of a group norm over `[n, c, spatial]` in `groups`.
    fn norm_case(
        [n, c, spatial, groups]: [usize; 4],
        eps: f64,
        mean: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, GroupShape) {
        let shape = GroupShape {
            channels: c,
            spatial,
            groups,
            eps,
        };
        (
            values(n * c * spatial, 7, 8.0, mean),
            values(c, 8, 2.0, 1.0),
            values(c, 9, 2.0, 0.0),
            shape,
        )
    }

    /// Against a straightforward f64 group norm, with and without SiLU.
    #[test]
    fn group_norm_matches_an_f64_reference() {
        let (n, c, spatial, groups) = (2, 6, 33, 3);
        let (x, gamma, beta, shape) = norm_case([n, c, spatial, groups], 1e-6, 100.0);
        for silu_after in [false, true] {
            let mut got = x.clone();
            group_norm(&mut got, shape, &gamma, &beta, None, silu_after);
            let per = c / groups * spatial;
            for (g, block) in x.chunks(per).enumerate() {
                let mean = block.iter().map(|&v| f64::from(v)).sum::<f64>() / per as f64;
                let var = block
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / per as f64;
                for (i, &v) in block.iter().enumerate() {
                    let ch = (g % groups) * (c / groups) + i / spatial;
                    let y = (f64::from(v) - mean) / (var + 1e-6).sqrt() * f64::from(gamma[ch])
                        + f64::from(beta[ch]);
                    let want = if silu_after {
                        y / (1.0 + (-y).exp())
                    } else {
                        y
                    };
                    let have = f64::from(got[g * per + i]);
                    assert!(
                        (have - want).abs() < 2e-4,
                        "group {g} value {i}: {have} vs {want} (silu {silu_after})"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_rows_match_an_f64_reference() {
        let row = 77;
        let x = values(row * 5, 11, 40.0, 0.0);
        let mut got = x.clone();
        softmax_rows(&mut got, row);
        for (r, (xs, ys)) in x.chunks(row).zip(got.chunks(row)).enumerate() {
            let max = xs
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let total: f64 = xs.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            for (&v, &y) in xs.iter().zip(ys) {
                let want = (f64::from(v) - max).exp() / total;
                assert!((f64::from(y) - want).abs() < 1e-6, "row {r}: {y} vs {want}");
            }
            let sum: f32 = ys.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }

    /// A shift is the same as adding it to every value of its channel first.
    #[test]
    fn a_shifted_group_norm_equals_adding_first() {
        let (n, c, spatial) = (2, 4, 9);
        let (x, gamma, beta, shape) = norm_case([n, c, spatial, 2], 1e-5, 1.0);
        let shift = values(n * c, 4, 6.0, 0.0);
        let mut added = x.clone();
        for (i, v) in added.iter_mut().enumerate() {
            *v += shift[i / spatial];
        }
        group_norm(&mut added, shape, &gamma, &beta, None, true);
        let mut shifted = x;
        group_norm(&mut shifted, shape, &gamma, &beta, Some(&shift), true);
        for (a, b) in added.iter().zip(&shifted) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// erf against its Maclaurin series in f64 (|x| < 3) and its limits.
    #[test]
    fn erf_and_geglu_match_f64_references() {
        let series = |x: f64| {
            let (mut term, mut total) = (x, 0.0);
            for n in 0..80 {
                total += term / (2 * n + 1) as f64;
                term *= -x * x / (n + 1) as f64;
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0.0f64;
        for i in -3000..=3000 {
            let x = i as f32 * 0.001;
            worst = worst.max((f64::from(erf(x)) - series(f64::from(x))).abs());
        }
        assert!(worst < 5e-7, "worst erf error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 1e-7 && (erf(-10.0) + 1.0).abs() < 1e-7);
        let inner = 5;
        let h = values(3 * 2 * inner, 9, 6.0, 0.0);
        let got = geglu(&h, inner);
        assert_eq!(got.len(), 3 * inner);
        for (r, row) in h.chunks(2 * inner).enumerate() {
            for j in 0..inner {
                let (hid, g) = (f64::from(row[j]), f64::from(row[inner + j]));
                let want = hid * 0.5 * g * (1.0 + series(g / 2f64.sqrt()));
                let have = f64::from(got[r * inner + j]);
                assert!(
                    (have - want).abs() < 1e-5,
                    "row {r} col {j}: {have} vs {want}"
                );
            }
        }
    }
}
