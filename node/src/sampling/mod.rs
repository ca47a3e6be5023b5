//! Sampling: from noise to a latent, whatever predicts the noise. Backend-neutral (any Burn
//! backend's tensors; the Burn and RKNN pipelines both sample through it) and checked against
//! diffusers' schedulers (`tests/parity/samplers.rs`).
//!
//! - [`schedule`]: the model's noise schedule, spacings, Karras sigmas (pure maths).
//! - [`Plan`]: one run — sampler, steps, the timesteps and sigmas it walks — and [`Plan::run`],
//!   the loop: scale the input, call the model, turn its output into x₀, step.
//! - `kdiff`: Euler, Euler ancestral, Heun, DPM++ SDE (k-diffusion form, x in σ-space).
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
    /// σ-space samplers: `sigmas[0..=n]` (the last 0), the timestep of each of the first `n`;
    /// DPM++ SDE also calls the model between levels `k` and `k + 1` (`mids[k]`, every step but
    /// the last).
    Sigmas {
        sigmas: Vec<f64>,
        timesteps: Vec<f32>,
        mids: Vec<f32>,
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
    Lcm(Lcm, Vec<usize>),
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
            Sampler::Lcm => {
                let lcm = Lcm::new(schedule.config().clone());
                let timesteps = lcm.timesteps(steps)?;
                Walk::Lcm(lcm, timesteps)
            }
            Sampler::Euler | Sampler::EulerA | Sampler::Heun | Sampler::DpmppSde => {
                k_sigmas(schedule, steps, karras, sampler == Sampler::DpmppSde)
            }
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

    /// The timestep of every model call, in order (Heun and DPM++ SDE call twice per step but
    /// the last).
    pub fn timesteps(&self) -> Vec<f32> {
        match &self.walk {
            Walk::Sigmas { timesteps, .. } if self.sampler == Sampler::Heun => {
                let mut out = vec![timesteps[0]];
                for &t in &timesteps[1..] {
                    out.extend([t, t]);
                }
                out
            }
            Walk::Sigmas {
                timesteps, mids, ..
            } if self.sampler == Sampler::DpmppSde => timesteps
                .iter()
                .enumerate()
                .flat_map(|(k, &t)| std::iter::once(t).chain(mids.get(k).copied()))
                .collect(),
            Walk::Sigmas { timesteps, .. } | Walk::Dpm { timesteps, .. } => timesteps.clone(),
            Walk::Ddim(steps) => steps.iter().map(|s| s.0).collect(),
            Walk::Lcm(_, timesteps) => timesteps.iter().map(|&t| t as f32).collect(),
        }
    }

    /// Cuts the plan for image-to-image at `strength` (0 < s ≤ 1), as diffusers' img2img
    /// pipelines do: a standard sampler runs only the last `⌊steps · s⌋` (at least one) of its
    /// steps, starting from the source image noised to that level; LCM runs all its steps over
    /// the noisiest `s` of its distillation schedule (`LCMScheduler`'s `strength`).
    pub fn with_strength(mut self, strength: f64) -> Result<Self> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(NodeError::InvalidJob(format!(
                "strength must be in (0, 1], not {strength}"
            )));
        }
        let n = self.steps;
        let run = ((n as f64 * strength) as usize).clamp(1, n);
        let skip = n - run;
        match &mut self.walk {
            Walk::Lcm(lcm, timesteps) => *timesteps = lcm.timesteps_with_strength(n, strength)?,
            Walk::Sigmas {
                sigmas,
                timesteps,
                mids,
                ..
            } => {
                sigmas.drain(..skip);
                timesteps.drain(..skip);
                mids.drain(..skip.min(mids.len()));
            }
            Walk::Dpm { sigmas, timesteps } => {
                sigmas.drain(..skip);
                timesteps.drain(..skip);
            }
            Walk::Ddim(steps) => {
                steps.drain(..skip);
            }
        }
        if self.sampler != Sampler::Lcm {
            self.steps = run;
        }
        Ok(self)
    }

    /// `image` (a scaled latent) noised with `noise` to the noise level the run is at after
    /// `level` steps (0: where it starts; `steps()`: clean, `image` itself), in the form the
    /// sampler keeps its sample in: what img2img starts from and what inpainting puts back.
    pub fn noised<B: Backend>(
        &self,
        image: &Tensor<B, 4>,
        noise: &Tensor<B, 4>,
        level: usize,
    ) -> Tensor<B, 4> {
        let by_alpha_bar = |a: f64| {
            image.clone().mul_scalar(a.sqrt() as f32)
                + noise.clone().mul_scalar((1.0 - a).sqrt() as f32)
        };
        match &self.walk {
            Walk::Sigmas { sigmas, .. } => match sigmas.get(level) {
                Some(&s) if s > 0.0 => image.clone() + noise.clone().mul_scalar(s as f32),
                _ => image.clone(),
            },
            Walk::Dpm { sigmas, .. } => match sigmas.get(level) {
                Some(&s) if s > 0.0 => {
                    let (alpha, sigma) = alpha_sigma(s);
                    image.clone().mul_scalar(alpha as f32) + noise.clone().mul_scalar(sigma as f32)
                }
                _ => image.clone(),
            },
            Walk::Ddim(steps) => steps
                .get(level)
                .map_or_else(|| image.clone(), |s| by_alpha_bar(s.1)),
            Walk::Lcm(lcm, timesteps) => timesteps.get(level).map_or_else(
                || image.clone(),
                |&t| by_alpha_bar(f64::from(lcm.alpha_cumprod(t))),
            ),
        }
    }

    /// The sample a run starts from: unit Gaussian `noise` scaled to the first noise level
    /// (text-to-image), or `image` noised to it (image-to-image, [`Plan::noised`]).
    pub fn initial<B: Backend>(
        &self,
        noise: Tensor<B, 4>,
        image: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        match (image, &self.walk) {
            (Some(image), _) => self.noised(image, &noise, 0),
            (None, Walk::Sigmas { init_sigma, .. }) => noise.mul_scalar(*init_sigma as f32),
            (None, _) => noise,
        }
    }

    /// Runs the loop from unit Gaussian noise `init`. `model(input, t)` answers the model's
    /// (guided) output for the scaled input at timestep `t`; `noise(k)` is the fresh noise of
    /// step `k` (ancestral and SDE samplers, LCM); `progress(k, steps)` after each step may stop
    /// the run with `Break` (→ `Cancelled`). Answers the final latent.
    pub fn run<B: Backend>(
        &self,
        init: Tensor<B, 4>,
        model: impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
        noise: impl FnMut(usize) -> Tensor<B, 4>,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        self.run_from(self.initial(init, None), model, noise, progress, None)
    }

    /// [`Plan::run`] from a sample `x` already at the first level ([`Plan::initial`]); with
    /// `keep`, after every step (and Heun's half steps) the part of the sample outside the mask
    /// is replaced by the kept image noised to the level reached, as diffusers' inpaint pipeline
    /// does for UNets without mask inputs.
    pub fn run_from<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        mut model: impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
        mut noise: impl FnMut(usize) -> Tensor<B, 4>,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
        keep: Option<&Keep<B>>,
    ) -> Result<Tensor<B, 4>> {
        let mut blend = |level: usize, x: Tensor<B, 4>| match keep {
            Some(k) => {
                let proper = self.noised(&k.image, &k.noise, level);
                proper.clone() + (x - proper).mul(k.mask.clone())
            }
            None => x,
        };
        if let Walk::Lcm(lcm, timesteps) = &self.walk {
            // LCM reports progress itself, as (step, steps).
            return lcm.sample_over(
                timesteps,
                x,
                |x, t| model(x, t as f32),
                noise,
                progress,
                blend,
            );
        }
        let mut report = |k: usize| {
            if progress(k + 1, self.steps).is_break() {
                Err(NodeError::Cancelled)
            } else {
                Ok(())
            }
        };
        match &self.walk {
            Walk::Lcm(..) => unreachable!("sampled above"),
            Walk::Sigmas {
                sigmas,
                timesteps,
                mids,
                ..
            } => kdiff::run(
                self.sampler,
                self.prediction,
                kdiff::Levels {
                    sigmas,
                    timesteps,
                    mids,
                },
                x,
                &mut model,
                &mut noise,
                &mut report,
                &mut blend,
            ),
            Walk::Dpm { sigmas, timesteps } if self.sampler == Sampler::UniPc => unipc::run(
                self.prediction,
                sigmas,
                timesteps,
                x,
                &mut model,
                &mut report,
                &mut blend,
            ),
            Walk::Dpm { sigmas, timesteps } => dpm::run(
                self.sampler == Sampler::Dpmpp2mSde,
                self.prediction,
                sigmas,
                timesteps,
                x,
                &mut model,
                &mut noise,
                &mut report,
                &mut blend,
            ),
            Walk::Ddim(steps) => ddim::run(
                self.prediction,
                steps,
                x,
                &mut model,
                &mut report,
                &mut blend,
            ),
        }
    }
}

/// What inpainting keeps of its source image (UNets without mask inputs): after every step
/// the sample becomes `mask · sample + (1 − mask) · image noised to the level reached`.
pub struct Keep<B: Backend> {
    /// The source image's latent, scaled for the UNet.
    pub image: Tensor<B, 4>,
    /// `[1, 1, h, w]` at latent size: 1 where the model repaints, 0 where the image stays.
    pub mask: Tensor<B, 4>,
    /// The noise the image is noised with (the run's initial noise, as diffusers).
    pub noise: Tensor<B, 4>,
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

/// The levels of a σ-space run; with `mids`, also the timestep of each step's midpoint
/// (σ = √(σₖ·σₖ₊₁), the midpoint in log σ), DPM++ SDE's second model call.
fn k_sigmas(schedule: &NoiseSchedule, n: usize, karras: bool, mids: bool) -> Walk {
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
    let mids = if mids {
        sigmas
            .windows(2)
            .map(|w| schedule.timestep_of((w[0] * w[1]).sqrt()) as f32)
            .collect()
    } else {
        Vec::new()
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
        mids,
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
