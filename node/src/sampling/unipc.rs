//! UniPC (Zhao et al. 2023; diffusers' `UniPCMultistepScheduler` with its defaults: order 2,
//! `bh2`, x₀ prediction, lower order at the last step): a multistep predictor (UniP) and, from the
//! second step on, a corrector (UniC) that revises the previous prediction with the model's new
//! output — one UNet call per step. x in variance-preserving form; λ = −ln σ.

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::{Prediction, alpha_sigma, x0_vp};
use crate::error::Result;

/// x₀ estimates with the noise level each was made at, newest last.
struct History<B: Backend> {
    outputs: Vec<(Tensor<B, 4>, f64)>,
}

/// The UniC corrector of `x` (the sample the last predictor started from, at `s0`) with the
/// model's output `mt` at the predicted level `t`, of `order` (1 or 2): `m0` is the x₀ made at
/// `s0`, `prev` the one before it (for order 2).
fn correct<B: Backend>(
    x: Tensor<B, 4>,
    (m0, s0): &(Tensor<B, 4>, f64),
    prev: Option<&(Tensor<B, 4>, f64)>,
    mt: &Tensor<B, 4>,
    t: f64,
    order: usize,
) -> Tensor<B, 4> {
    let (alpha_t, sigma_t) = alpha_sigma(t);
    let (_, sigma_s0) = alpha_sigma(*s0);
    let h = (s0 / t).ln();
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = h_phi_1;
    let phi_k1 = h_phi_1 / hh - 1.0;
    let b1 = phi_k1 / b_h;
    let base = x.mul_scalar((sigma_t / sigma_s0) as f32)
        - m0.clone().mul_scalar((alpha_t * h_phi_1) as f32);
    let d1_t = mt.clone() - m0.clone();
    match (order, prev) {
        (2, Some((m1, s1))) => {
            let phi_k2 = phi_k1 / hh - 0.5;
            let b2 = phi_k2 * 2.0 / b_h;
            let rk = (s0 / s1).ln() / h;
            // Solve [[1, 1], [rk, 1]] · ρ = [b1, b2].
            let rho0 = (b1 - b2) / (1.0 - rk);
            let rho1 = b1 - rho0;
            let d1 = (m1.clone() - m0.clone()).div_scalar(rk as f32);
            base - (d1.mul_scalar(rho0 as f32) + d1_t.mul_scalar(rho1 as f32))
                .mul_scalar((alpha_t * b_h) as f32)
        }
        _ => base - d1_t.mul_scalar((alpha_t * b_h * 0.5) as f32),
    }
}

/// The UniP predictor from `x` at `s0` (x₀ `m0`, and `prev` for order 2) to level `t`.
fn predict<B: Backend>(
    x: Tensor<B, 4>,
    (m0, s0): &(Tensor<B, 4>, f64),
    prev: Option<&(Tensor<B, 4>, f64)>,
    t: f64,
    order: usize,
) -> Tensor<B, 4> {
    let d1 = match (order, prev) {
        (2, Some((m1, s1))) => {
            let h = if t > 0.0 {
                (s0 / t).ln()
            } else {
                f64::INFINITY
            };
            let rk = (s0 / s1).ln() / h;
            Some((m1.clone() - m0.clone()).div_scalar(rk as f32))
        }
        _ => None,
    };
    if t == 0.0 {
        // σ = 0: αₜ = 1, σₜ = 0, e^{−h} − 1 = −1.
        return match d1 {
            Some(d1) => m0.clone() + d1.mul_scalar(0.5),
            None => m0.clone(),
        };
    }
    let (alpha_t, sigma_t) = alpha_sigma(t);
    let (_, sigma_s0) = alpha_sigma(*s0);
    let hh = -(s0 / t).ln();
    let h_phi_1 = hh.exp_m1();
    let b_h = h_phi_1;
    let mut out = x.mul_scalar((sigma_t / sigma_s0) as f32)
        - m0.clone().mul_scalar((alpha_t * h_phi_1) as f32);
    if let Some(d1) = d1 {
        out = out - d1.mul_scalar((alpha_t * b_h * 0.5) as f32);
    }
    out
}

/// Runs UniPC over `sigmas` (n + 1 levels, the last 0) from `x`; `report(k)` after each step,
/// `blend(k + 1, x)` on each step's result.
pub(super) fn run<B: Backend>(
    prediction: Prediction,
    sigmas: &[f64],
    timesteps: &[f32],
    mut x: Tensor<B, 4>,
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    report: &mut impl FnMut(usize) -> Result<()>,
    blend: &mut impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    let n = timesteps.len();
    let mut history = History {
        outputs: Vec::new(),
    };
    let mut last: Option<(Tensor<B, 4>, usize)> = None;
    for (k, &t) in timesteps.iter().enumerate() {
        let s = sigmas[k];
        let out = model(x.clone(), t)?;
        let m = x0_vp(prediction, &x, out, s);
        if let Some((start, order)) = last.take() {
            let len = history.outputs.len();
            let m0 = &history.outputs[len - 1];
            let prev = len.checked_sub(2).map(|i| &history.outputs[i]);
            x = correct(start, m0, prev, &m, s, order);
        }
        history.outputs.push((m, s));
        if history.outputs.len() > 2 {
            history.outputs.remove(0);
        }
        // Order 2 once there is a previous output, and order 1 for the last step.
        let order = 2.min(n - k).min(history.outputs.len());
        let len = history.outputs.len();
        let m0 = &history.outputs[len - 1];
        let prev = len.checked_sub(2).map(|i| &history.outputs[i]);
        let next = predict(x.clone(), m0, prev, sigmas[k + 1], order);
        last = Some((x, order));
        x = next;
        x = blend(k + 1, x);
        report(k)?;
    }
    Ok(x)
}
