//! DDIM, deterministic (η = 0; diffusers' `DDIMScheduler`): x in variance-preserving form, each
//! step from x₀ and ε at ᾱₜ to ᾱ of the next timestep.

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::Prediction;
use crate::error::Result;

/// Runs the DDIM steps `(t, ᾱₜ, ᾱ_prev)` from `x`; `report(k)` after each step,
/// `blend(k + 1, x)` on each step's result.
pub(super) fn run<B: Backend>(
    prediction: Prediction,
    steps: &[(f32, f64, f64)],
    mut x: Tensor<B, 4>,
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    report: &mut impl FnMut(usize) -> Result<()>,
    blend: &mut impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    for (k, &(t, a, a_prev)) in steps.iter().enumerate() {
        let out = model(x.clone(), t)?;
        let (sa, sb) = (a.sqrt() as f32, (1.0 - a).sqrt() as f32);
        let (x0, eps) = match prediction {
            Prediction::Epsilon => ((x - out.clone().mul_scalar(sb)).div_scalar(sa), out),
            Prediction::V => (
                x.clone().mul_scalar(sa) - out.clone().mul_scalar(sb),
                out.mul_scalar(sa) + x.mul_scalar(sb),
            ),
        };
        x = x0.mul_scalar(a_prev.sqrt() as f32) + eps.mul_scalar((1.0 - a_prev).sqrt() as f32);
        x = blend(k + 1, x);
        report(k)?;
    }
    Ok(x)
}
