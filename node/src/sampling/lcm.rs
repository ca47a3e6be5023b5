//! The LCM scheduler (diffusers `LCMScheduler`, epsilon prediction): timestep selection from
//! `original_inference_steps`, boundary-condition scalings and the denoise/re-noise step.

use std::ops::ControlFlow;

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::SchedulerConfig;
use crate::error::{NodeError, Result};

/// The most LCM steps a job may ask for.
pub const MAX_STEPS: usize = 8;

/// Refuses (permanently) a job's step count outside 1..=[`MAX_STEPS`], before any work is done
/// for it: every LCM backend checks this first.
pub fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(NodeError::InvalidJob(format!(
            "this node runs an LCM pipeline: 1..={MAX_STEPS} steps, not {steps}"
        )));
    }
    Ok(())
}

/// A ready scheduler.
#[derive(Clone, Debug)]
pub struct Lcm {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
}

impl Lcm {
    /// Builds the scaled-linear beta schedule (in f32, as diffusers does).
    pub fn new(config: SchedulerConfig) -> Self {
        let t = config.num_train_timesteps.max(2);
        let (a, b) = (
            config.beta_start.sqrt() as f32,
            config.beta_end.sqrt() as f32,
        );
        let mut prod = 1f32;
        let alphas_cumprod = (0..t)
            .map(|i| {
                let s = a + (b - a) * i as f32 / (t - 1) as f32;
                prod *= 1.0 - s * s;
                prod
            })
            .collect();
        Self {
            config,
            alphas_cumprod,
        }
    }

    /// ᾱ at timestep `t`.
    pub fn alpha_cumprod(&self, t: usize) -> f32 {
        self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)]
    }

    /// The timesteps of an `n`-step run, highest first.
    pub fn timesteps(&self, n: usize) -> Result<Vec<usize>> {
        self.timesteps_with_strength(n, 1.0)
    }

    /// The timesteps of an `n`-step img2img run at `strength` (diffusers' `LCMScheduler`
    /// `set_timesteps(strength=…)`): the distillation schedule is cut to its noisiest
    /// `⌊original · strength⌋` entries, then `n` are picked evenly from what is left. All `n`
    /// steps run; a strength too low to leave `n` timesteps is refused.
    pub fn timesteps_with_strength(&self, n: usize, strength: f64) -> Result<Vec<usize>> {
        let original = self.config.original_inference_steps;
        if n == 0 || n > original.min(MAX_STEPS) {
            return Err(NodeError::InvalidJob(format!(
                "LCM runs 1..={} steps, not {n}",
                original.min(MAX_STEPS)
            )));
        }
        let c = self.config.num_train_timesteps / original;
        let kept = (original as f64 * strength) as usize;
        if kept < n {
            return Err(NodeError::InvalidJob(format!(
                "strength {strength} leaves {kept} of the LCM schedule's {original} timesteps, \
                 fewer than the {n} steps asked for: raise strength or lower steps"
            )));
        }
        let origin: Vec<usize> = (1..=kept).rev().map(|i| i * c - 1).collect();
        Ok((0..n)
            .map(|k| origin[(k as f64 * kept as f64 / n as f64).floor() as usize])
            .collect())
    }

    /// `(c_skip, c_out)` at timestep `t`.
    pub fn scalings(&self, t: usize) -> (f32, f32) {
        let s = (t as f64 * self.config.timestep_scaling) as f32;
        let sigma2 = 0.25f32;
        (sigma2 / (s * s + sigma2), s / (s * s + sigma2).sqrt())
    }

    /// One step: from the noise prediction `eps` at `t` to the denoised estimate and, unless this
    /// is the last step (`next` is `None`), the sample re-noised to `next` with `noise`.
    pub fn step<B: Backend>(
        &self,
        eps: Tensor<B, 4>,
        t: usize,
        sample: Tensor<B, 4>,
        next: Option<(usize, Tensor<B, 4>)>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let a = self.alpha_cumprod(t);
        let (c_skip, c_out) = self.scalings(t);
        let x0 = (sample.clone() - eps.mul_scalar((1.0 - a).sqrt())).div_scalar(a.sqrt());
        let denoised = x0.mul_scalar(c_out) + sample.mul_scalar(c_skip);
        let next_sample = match next {
            Some((t_prev, noise)) => {
                let ap = self.alpha_cumprod(t_prev);
                denoised.clone().mul_scalar(ap.sqrt()) + noise.mul_scalar((1.0 - ap).sqrt())
            }
            None => denoised.clone(),
        };
        (next_sample, denoised)
    }
}

impl Lcm {
    /// The LCM sampling loop, whatever predicts the noise: from `init`, for each of the `steps`
    /// timesteps, `eps(x, t)` predicts the noise, [`Lcm::step`] denoises and re-noises with
    /// `noise(k)`, and `progress(k + 1, steps)` may stop the run with `Break` (→ `Cancelled`).
    /// Returns the last denoised latent. The Burn and RKNN pipelines both sample through it.
    pub fn sample<B: Backend>(
        &self,
        init: Tensor<B, 4>,
        steps: usize,
        eps: impl FnMut(Tensor<B, 4>, usize) -> Result<Tensor<B, 4>>,
        noise: impl FnMut(usize) -> Tensor<B, 4>,
        progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>> {
        let timesteps = self.timesteps(steps)?;
        self.sample_over(&timesteps, init, eps, noise, progress, |_, x| x)
    }

    /// [`Lcm::sample`] over given `timesteps`; `blend(k + 1, x)` rewrites each step's result
    /// (the re-noised sample, the denoised latent after the last step) before it goes on —
    /// inpainting puts the kept part of the image back there.
    pub fn sample_over<B: Backend>(
        &self,
        timesteps: &[usize],
        init: Tensor<B, 4>,
        mut eps: impl FnMut(Tensor<B, 4>, usize) -> Result<Tensor<B, 4>>,
        mut noise: impl FnMut(usize) -> Tensor<B, 4>,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
        mut blend: impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let mut x = init;
        let mut denoised = x.clone();
        for (k, &t) in timesteps.iter().enumerate() {
            let e = eps(x.clone(), t)?;
            let next = timesteps.get(k + 1).map(|&tp| (tp, noise(k)));
            let last = next.is_none();
            let (nx, d) = self.step(e, t, x, next);
            if last {
                denoised = blend(k + 1, d);
                x = nx;
            } else {
                x = blend(k + 1, nx);
                denoised = d;
            }
            if progress(k + 1, timesteps.len()).is_break() {
                return Err(NodeError::Cancelled);
            }
        }
        Ok(denoised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers() {
        let lcm = Lcm::new(SchedulerConfig::default());
        assert_eq!(lcm.timesteps(4).unwrap(), vec![999, 759, 499, 259]);
        assert_eq!(
            lcm.timesteps(8).unwrap(),
            vec![999, 879, 759, 639, 499, 379, 259, 139]
        );
        assert_eq!(lcm.timesteps(1).unwrap(), vec![999]);
        assert!(lcm.timesteps(0).is_err());
        // diffusers' LCMScheduler.set_timesteps(4, strength=0.5) and (2, strength=0.3).
        assert_eq!(
            lcm.timesteps_with_strength(4, 0.5).unwrap(),
            vec![499, 379, 259, 139]
        );
        assert_eq!(lcm.timesteps_with_strength(2, 0.3).unwrap(), vec![299, 159]);
        let err = lcm.timesteps_with_strength(4, 0.05).unwrap_err();
        assert!(err.to_string().contains("raise strength"), "{err}");
        assert!(lcm.timesteps(9).is_err());
    }

    #[test]
    fn step_counts_outside_the_lcm_range_are_refused_for_good() {
        for steps in [0, MAX_STEPS + 1, 20] {
            let err = check_steps(steps).unwrap_err();
            assert!(err.is_permanent(), "{err}");
            assert!(err.to_string().contains("1..=8 steps"), "{err}");
        }
        for steps in 1..=MAX_STEPS {
            assert!(check_steps(steps).is_ok());
        }
    }
}
