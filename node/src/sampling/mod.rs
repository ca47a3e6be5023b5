//! Sampling: from noise to a latent, whatever predicts the noise. Backend-neutral (any Burn
//! backend's tensors; the Burn and RKNN pipelines both sample through it) and checked against
//! diffusers' schedulers (`tests/parity/samplers.rs`).
//!
//! - [`schedule`]: the model's noise schedule, spacings, Karras sigmas (pure maths).
//! - [`Plan`]: one run — sampler, steps, the timesteps and sigmas it walks — and [`Plan::run`],
//!   the loop: scale the input, call the model, turn its output into x₀, step.
//! - `kdiff`: Euler, Euler ancestral, Heun (k-diffusion form, x in σ-space).
//! - `dpm`: DPM-Solver++ 2M and 2M SDE; `unipc`: UniPC; `ddim`: DDIM (x in
//!   variance-preserving form).
//! - [`lcm`]: the LCM scheduler (guidance-distilled models, or an LCM LoRA).
//! - [`guidance`]: classifier-free guidance and guidance rescale.

mod ddim;
mod dpm;
pub mod guidance;
mod kdiff;
pub mod lcm;
pub mod schedule;
mod unipc;

use std::ops::ControlFlow;

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;
pub use drover_shared::sampler::{Sampler, SigmaSchedule};

use crate::error::{NodeError, Result};
use lcm::Lcm;
pub use schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use schedule::{Spacing, arange_down, linspace, round_even};

/// The most steps a standard sampler runs.
pub const MAX_STEPS: usize = 150;

/// What a run walks.
#[derive(Clone, Debug)]
enum Walk {
    /// σ-space samplers: `sigmas[0..=n]` (the last 0), the timestep of each of the first `n`.
    Sigmas {
        sigmas: Vec<f64>,
        timesteps: Vec<f32>,
        init_sigma: f64,
    },
    /// DPM-Solver++: the same, in variance-preserving form (initial noise unscaled).
    Dpm {
        sigmas: Vec<f64>,
        timesteps: Vec<f32>,
    },
    /// DDIM: each step's timestep, ᾱ there and ᾱ at the step it goes to.
    Ddim(Vec<(f32, f64, f64)>),
    /// LCM's own timesteps.
    Lcm(Lcm),
}

/// One sampling run, planned: its sampler, steps and what they walk.
#[derive(Clone, Debug)]
pub struct Plan {
    sampler: Sampler,
    steps: usize,
    prediction: Prediction,
    walk: Walk,
}

impl Plan {
    /// Plans `steps` steps of `sampler` with sigma schedule `sigmas` on `schedule`, as diffusers'
    /// matching scheduler would (built from the model's scheduler config).
    pub fn new(
        schedule: &NoiseSchedule,
        sampler: Sampler,
        sigmas: SigmaSchedule,
        steps: usize,
    ) -> Result<Self> {
        sampler
            .check_schedule(sigmas)
            .map_err(NodeError::InvalidJob)?;
        // `Automatic` also honours a model config that asks for Karras sigmas.
        let karras = sigmas.resolve(sampler) == SigmaSchedule::Karras
            || (sigmas == SigmaSchedule::Automatic
                && schedule.config().use_karras_sigmas
                && sampler.takes_karras());
        let max = if sampler == Sampler::Lcm {
            lcm::MAX_STEPS.min(schedule.config().original_inference_steps)
        } else {
            MAX_STEPS.min(schedule.train_steps())
        };
        if steps == 0 || steps > max {
            return Err(NodeError::InvalidJob(format!(
                "{} runs 1..={max} steps, not {steps}",
                sampler.a1111_name()
            )));
        }
        let walk = match sampler {
            Sampler::Lcm => Walk::Lcm(Lcm::new(schedule.config().clone())),
            Sampler::Euler | Sampler::EulerA | Sampler::Heun => k_sigmas(schedule, steps, karras),
            Sampler::Dpmpp2m | Sampler::Dpmpp2mSde | Sampler::UniPc => {
                dpm_sigmas(schedule, steps, karras)
            }
            Sampler::Ddim => Walk::Ddim(ddim_steps(schedule, steps)),
        };
        Ok(Self {
            sampler,
            steps,
            prediction: schedule.prediction(),
            walk,
        })
    }

    /// The sampler.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// Steps (progress counts these).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The timestep of every model call, in order (Heun calls twice per step but the last).
    pub fn timesteps(&self) -> Vec<f32> {
        match &self.walk {
            Walk::Sigmas { timesteps, .. } if self.sampler == Sampler::Heun => {
                let mut out = vec![timesteps[0]];
                for &t in &timesteps[1..] {
                    out.extend([t, t]);
                }
                out
            }
            Walk::Sigmas { timesteps, .. } | Walk::Dpm { timesteps, .. } => timesteps.clone(),
            Walk::Ddim(steps) => steps.iter().map(|s| s.0).collect(),
            Walk::Lcm(lcm) => lcm
                .timesteps(self.steps)
                .unwrap_or_default()
                .into_iter()
                .map(|t| t as f32)
                .collect(),
        }
    }

    /// Runs the loop from unit Gaussian noise `init`. `model(input, t)` answers the model's
    /// (guided) output for the scaled input at timestep `t`; `noise(k)` is the fresh noise of
    /// step `k` (ancestral and SDE samplers, LCM); `progress(k, steps)` after each step may stop
    /// the run with `Break` (→ `Cancelled`). Answers the final latent.
    pub fn run<B: Backend>(
        &self,
        init: Tensor<B, 4>,
        mut model: impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
        mut noise: impl FnMut(usize) -> Tensor<B, 4>,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        if let Walk::Lcm(lcm) = &self.walk {
            // LCM reports progress itself, as (step, steps).
            return lcm.sample(init, self.steps, |x, t| model(x, t as f32), noise, progress);
        }
        let mut report = |k: usize| {
            if progress(k + 1, self.steps).is_break() {
                Err(NodeError::Cancelled)
            } else {
                Ok(())
            }
        };
        match &self.walk {
            Walk::Lcm(_) => unreachable!("sampled above"),
            Walk::Sigmas {
                sigmas,
                timesteps,
                init_sigma,
            } => kdiff::run(
                self.sampler,
                self.prediction,
                sigmas,
                timesteps,
                init.mul_scalar(*init_sigma as f32),
                &mut model,
                &mut noise,
                &mut report,
            ),
            Walk::Dpm { sigmas, timesteps } if self.sampler == Sampler::UniPc => unipc::run(
                self.prediction,
                sigmas,
                timesteps,
                init,
                &mut model,
                &mut report,
            ),
            Walk::Dpm { sigmas, timesteps } => dpm::run(
                self.sampler == Sampler::Dpmpp2mSde,
                self.prediction,
                sigmas,
                timesteps,
                init,
                &mut model,
                &mut noise,
                &mut report,
            ),
            Walk::Ddim(steps) => ddim::run(self.prediction, steps, init, &mut model, &mut report),
        }
    }
}

/// The timesteps of an `n`-step run of a σ-space sampler (diffusers' Euler/Heun `set_timesteps`),
/// fractional where the spacing makes them so.
fn k_timesteps(schedule: &NoiseSchedule, n: usize) -> Vec<f64> {
    let t = schedule.train_steps();
    let offset = schedule.config().steps_offset as f64;
    match schedule.spacing(Spacing::Linspace) {
        Spacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| f64::from(v as f32))
            .collect(),
        Spacing::Leading => {
            let ratio = (t / n) as f64;
            (0..n)
                .rev()
                .map(|k| round_even(k as f64 * ratio) + offset)
                .collect()
        }
        Spacing::Trailing => arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|v| round_even(v) - 1.0)
            .collect(),
    }
}

fn k_sigmas(schedule: &NoiseSchedule, n: usize, karras: bool) -> Walk {
    let spaced = k_timesteps(schedule, n);
    let mut sigmas: Vec<f64> = spaced.iter().map(|&t| schedule.sigma_at(t)).collect();
    let timesteps: Vec<f32> = if karras {
        let (min, max) = (sigmas[n - 1], sigmas[0]);
        sigmas = NoiseSchedule::karras(min, max, n);
        sigmas
            .iter()
            .map(|&s| schedule.timestep_of(s) as f32)
            .collect()
    } else {
        spaced.iter().map(|&t| t as f32).collect()
    };
    sigmas.push(0.0);
    let sigmas: Vec<f64> = sigmas.iter().map(|&s| f64::from(s as f32)).collect();
    let max = sigmas.iter().copied().fold(0.0, f64::max);
    let init_sigma = match schedule.spacing(Spacing::Linspace) {
        Spacing::Leading => (max * max + 1.0).sqrt(),
        _ => max,
    };
    Walk::Sigmas {
        sigmas,
        timesteps,
        init_sigma,
    }
}

fn dpm_sigmas(schedule: &NoiseSchedule, n: usize, karras: bool) -> Walk {
    let t = schedule.train_steps();
    let (sigmas, timesteps): (Vec<f64>, Vec<f32>) = if karras {
        let sigmas = NoiseSchedule::karras(
            f64::from(schedule.sigma(0)),
            f64::from(schedule.sigma(t - 1)),
            n,
        );
        let timesteps = sigmas
            .iter()
            .map(|&s| round_even(schedule.timestep_of(s)) as f32)
            .collect();
        (sigmas, timesteps)
    } else {
        let steps: Vec<usize> = match schedule.spacing(Spacing::Linspace) {
            Spacing::Linspace => linspace(0.0, (t - 1) as f64, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(|v| round_even(v) as usize)
                .collect(),
            Spacing::Leading => {
                let ratio = t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|k| k * ratio + schedule.config().steps_offset)
                    .collect()
            }
            Spacing::Trailing => arange_down(t as f64, t as f64 / n as f64)
                .into_iter()
                .map(|v| (round_even(v) as usize).saturating_sub(1))
                .collect(),
        };
        (
            steps
                .iter()
                .map(|&s| f64::from(schedule.sigma(s)))
                .collect(),
            steps.iter().map(|&s| s as f32).collect(),
        )
    };
    let mut sigmas: Vec<f64> = sigmas.iter().map(|&s| f64::from(s as f32)).collect();
    sigmas.push(0.0);
    Walk::Dpm { sigmas, timesteps }
}

fn ddim_steps(schedule: &NoiseSchedule, n: usize) -> Vec<(f32, f64, f64)> {
    let t = schedule.train_steps();
    let steps: Vec<usize> = match schedule.spacing(Spacing::Leading) {
        Spacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| round_even(v) as usize)
            .collect(),
        Spacing::Leading => (0..n)
            .rev()
            .map(|k| k * (t / n) + schedule.config().steps_offset)
            .collect(),
        Spacing::Trailing => arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|v| (round_even(v) as usize).saturating_sub(1))
            .collect(),
    };
    let last = if schedule.config().set_alpha_to_one {
        1.0
    } else {
        f64::from(schedule.alpha_cumprod(0))
    };
    steps
        .into_iter()
        .map(|s| {
            let a = f64::from(schedule.alpha_cumprod(s));
            let prev = s.checked_sub(t / n);
            let a_prev = prev.map_or(last, |p| f64::from(schedule.alpha_cumprod(p)));
            (s as f32, a, a_prev)
        })
        .collect()
}

/// (αₜ, σₜ) of the variance-preserving form at k-diffusion noise level `sigma`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// x₀ from a model output at noise level `sigma` for `x` in variance-preserving form.
fn x0_vp<B: Backend>(
    prediction: Prediction,
    x: &Tensor<B, 4>,
    out: Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    let (alpha, sigma_vp) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => {
            (x.clone() - out.mul_scalar(sigma_vp as f32)).div_scalar(alpha as f32)
        }
        Prediction::V => x.clone().mul_scalar(alpha as f32) - out.mul_scalar(sigma_vp as f32),
    }
}

/// x₀ from a σ-space model output at noise level `sigma` (input `x`).
fn x0_sigma<B: Backend>(
    prediction: Prediction,
    x: &Tensor<B, 4>,
    out: Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    match prediction {
        Prediction::Epsilon => x.clone() - out.mul_scalar(sigma as f32),
        Prediction::V => {
            let s2 = sigma * sigma + 1.0;
            out.mul_scalar((-sigma / s2.sqrt()) as f32) + x.clone().div_scalar(s2 as f32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> NoiseSchedule {
        NoiseSchedule::new(SchedulerConfig::default()).unwrap()
    }

    #[test]
    fn step_counts_are_checked_per_sampler() {
        let s = sd();
        assert!(Plan::new(&s, Sampler::Euler, SigmaSchedule::Automatic, 0).is_err());
        assert!(Plan::new(&s, Sampler::Euler, SigmaSchedule::Automatic, 150).is_ok());
        let err = Plan::new(&s, Sampler::Euler, SigmaSchedule::Automatic, 151).unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("1..=150"),
            "{err}"
        );
        let err = Plan::new(&s, Sampler::Lcm, SigmaSchedule::Automatic, 20).unwrap_err();
        assert!(err.to_string().contains("1..=8 steps"), "{err}");
        assert!(Plan::new(&s, Sampler::Ddim, SigmaSchedule::Karras, 10).is_err());
    }

    #[test]
    fn heun_calls_the_model_twice_per_step_but_the_last() {
        let p = Plan::new(&sd(), Sampler::Heun, SigmaSchedule::Automatic, 5).unwrap();
        assert_eq!(p.timesteps().len(), 9);
    }

    #[test]
    fn ddim_leading_timesteps_match_diffusers() {
        let p = Plan::new(&sd(), Sampler::Ddim, SigmaSchedule::Automatic, 8).unwrap();
        assert_eq!(
            p.timesteps(),
            vec![876.0, 751.0, 626.0, 501.0, 376.0, 251.0, 126.0, 1.0]
        );
    }
}
