//! The noise schedule a model was trained with (diffusers' `scheduler_config.json`), and the
//! timesteps and sigmas an `n`-step run walks: spacings `leading`, `trailing` and `linspace`,
//! Karras sigmas, sigma → timestep by log-sigma interpolation — all as diffusers computes them,
//! so the same request gives the same latents.

use serde::Deserialize;

use crate::error::{NodeError, Result};

/// The scheduler settings (diffusers `scheduler_config.json` names). Fields a model's config
/// leaves out take the values Stable Diffusion's configs have; `timestep_spacing` left out means
/// each sampler's own diffusers default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    /// Training timesteps (1000).
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    /// `scaled_linear` (Stable Diffusion) or `linear`.
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    /// `epsilon` or `v_prediction` (SD2 768-v models).
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`; `None`: the sampler's default.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Added to `leading` timesteps (1 in SD's configs).
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM's last step goes to ᾱ = 1 (else to ᾱ₀).
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// Karras sigmas when a request asks for none in particular.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Zero terminal SNR rescaling (not supported: refused at load).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// LCM: steps of the teacher schedule the model was distilled on (50).
    #[serde(default = "fifty")]
    pub original_inference_steps: usize,
    /// LCM: scale from timestep to the boundary-condition time (10).
    #[serde(default = "ten")]
    pub timestep_scaling: f64,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn fifty() -> usize {
    50
}
fn ten() -> f64 {
    10.0
}

impl Default for SchedulerConfig {
    /// Stable Diffusion's schedule (what SD1.x/SD2/SDXL checkpoints without a config use).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: scaled_linear(),
            prediction_type: epsilon(),
            timestep_spacing: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            use_karras_sigmas: false,
            rescale_betas_zero_snr: false,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

/// What the model's output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD2 768-v).
    V,
}

/// How an `n`-step run picks its training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// `k · (T / n)` from 0, highest first, plus the offset.
    Leading,
    /// `T − k · T / n`, minus one.
    Trailing,
    /// `n` points evenly from 0 to T − 1.
    Linspace,
}

impl Spacing {
    fn parse(raw: &str) -> Result<Self> {
        match raw {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(NodeError::ModelConfig(format!(
                "timestep_spacing {other:?} is not one of leading, trailing, linspace"
            ))),
        }
    }
}

/// A model's noise schedule, ready to plan runs.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    config: SchedulerConfig,
    prediction: Prediction,
    /// ᾱₜ for every training timestep (f32, as diffusers keeps them).
    alphas_cumprod: Vec<f32>,
    /// ln σₜ for every training timestep, σ = √((1 − ᾱ)/ᾱ) (f32).
    log_sigmas: Vec<f32>,
}

impl NoiseSchedule {
    /// Builds the schedule, refusing settings this node cannot honour.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let t = config.num_train_timesteps;
        if t < 2 {
            return Err(NodeError::ModelConfig(format!(
                "num_train_timesteps {t} is below 2"
            )));
        }
        if config.rescale_betas_zero_snr {
            return Err(NodeError::ModelConfig(
                "rescale_betas_zero_snr (zero terminal SNR) schedules are not supported".into(),
            ));
        }
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => {
                return Err(NodeError::ModelConfig(format!(
                    "prediction_type {other:?} is not supported (epsilon, v_prediction)"
                )));
            }
        };
        if let Some(spacing) = &config.timestep_spacing {
            Spacing::parse(spacing)?;
        }
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => {
                let (a, b) = (
                    config.beta_start.sqrt() as f32,
                    config.beta_end.sqrt() as f32,
                );
                (0..t)
                    .map(|i| {
                        let s = a + (b - a) * i as f32 / (t - 1) as f32;
                        s * s
                    })
                    .collect()
            }
            "linear" => {
                let (a, b) = (config.beta_start as f32, config.beta_end as f32);
                (0..t)
                    .map(|i| a + (b - a) * i as f32 / (t - 1) as f32)
                    .collect()
            }
            other => {
                return Err(NodeError::ModelConfig(format!(
                    "beta_schedule {other:?} is not supported (scaled_linear, linear)"
                )));
            }
        };
        let mut prod = 1f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                prod *= 1.0 - b;
                prod
            })
            .collect();
        let log_sigmas = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt().ln())
            .collect();
        Ok(Self {
            config,
            prediction,
            alphas_cumprod,
            log_sigmas,
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// What the model predicts.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// Training timesteps.
    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ at training timestep `t` (clamped to the schedule).
    pub fn alpha_cumprod(&self, t: usize) -> f32 {
        self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)]
    }

    /// σ at training timestep `t`.
    pub fn sigma(&self, t: usize) -> f32 {
        let a = self.alpha_cumprod(t);
        ((1.0 - a) / a).sqrt()
    }

    /// The spacing for a sampler whose diffusers default is `default`.
    pub fn spacing(&self, default: Spacing) -> Spacing {
        self.config
            .timestep_spacing
            .as_deref()
            .and_then(|s| Spacing::parse(s).ok())
            .unwrap_or(default)
    }

    /// σ at a fractional timestep, linear between the neighbouring training timesteps
    /// (`np.interp`).
    pub fn sigma_at(&self, t: f64) -> f64 {
        let last = self.alphas_cumprod.len() - 1;
        if t <= 0.0 {
            return f64::from(self.sigma(0));
        }
        if t >= last as f64 {
            return f64::from(self.sigma(last));
        }
        let low = t.floor() as usize;
        let w = t - low as f64;
        let (a, b) = (f64::from(self.sigma(low)), f64::from(self.sigma(low + 1)));
        a + (b - a) * w
    }

    /// The (fractional) timestep of noise level `sigma`: linear in ln σ between the two training
    /// timesteps around it, clamped to the schedule.
    pub fn timestep_of(&self, sigma: f64) -> f64 {
        let ls = sigma.max(1e-10).ln();
        let logs = &self.log_sigmas;
        let below = logs.partition_point(|&l| f64::from(l) <= ls);
        let low = below.saturating_sub(1).min(logs.len() - 2);
        let (lo, hi) = (f64::from(logs[low]), f64::from(logs[low + 1]));
        let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }

    /// Karras et al. sigmas (ρ = 7): `n` levels from `max` down to `min`.
    pub fn karras(min: f64, max: f64, n: usize) -> Vec<f64> {
        let rho = 7.0;
        let (lo, hi) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
        (0..n)
            .map(|i| {
                let ramp = if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                (hi + ramp * (lo - hi)).powf(rho)
            })
            .collect()
    }
}

/// numpy's `round` (half to even), which diffusers' spacings use.
pub fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, n)`.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, 0, -step)`: `start, start − step, ...` while above 0.
pub fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil() as usize;
    (0..count).map(|i| start - i as f64 * step).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphas_match_published_values() {
        let s = NoiseSchedule::new(SchedulerConfig::default()).unwrap();
        for (t, want) in [
            (999, 0.004660),
            (759, 0.052213),
            (499, 0.277670),
            (259, 0.658976),
        ] {
            assert!((s.alpha_cumprod(t) - want).abs() < 2e-6, "t={t}");
        }
    }

    #[test]
    fn sigma_to_timestep_inverts_the_schedule() {
        let s = NoiseSchedule::new(SchedulerConfig::default()).unwrap();
        for t in [0usize, 1, 17, 500, 998, 999] {
            let back = s.timestep_of(f64::from(s.sigma(t)));
            assert!((back - t as f64).abs() < 1e-3, "{t} → {back}");
        }
        let mid = s.timestep_of(s.sigma_at(400.5));
        assert!((mid - 400.5).abs() < 1e-2, "{mid}");
        assert_eq!(s.timestep_of(1e6), 999.0);
        assert_eq!(s.timestep_of(0.0), 0.0);
    }

    #[test]
    fn karras_runs_from_max_to_min() {
        let k = NoiseSchedule::karras(0.03, 14.6, 5);
        assert!((k[0] - 14.6).abs() < 1e-9 && (k[4] - 0.03).abs() < 1e-9);
        assert!(k.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn numpy_helpers_agree_with_numpy() {
        assert_eq!(arange_down(1000.0, 1000.0 / 6.0).len(), 6);
        assert_eq!(arange_down(1000.0, 125.0).len(), 8);
        assert_eq!(round_even(62.5), 62.0);
        assert_eq!(round_even(63.5), 64.0);
        assert_eq!(linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        for (change, word) in [
            (
                SchedulerConfig {
                    prediction_type: "sample".into(),
                    ..Default::default()
                },
                "prediction_type",
            ),
            (
                SchedulerConfig {
                    beta_schedule: "squaredcos_cap_v2".into(),
                    ..Default::default()
                },
                "beta_schedule",
            ),
            (
                SchedulerConfig {
                    rescale_betas_zero_snr: true,
                    ..Default::default()
                },
                "zero",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: Some("karras".into()),
                    ..Default::default()
                },
                "timestep_spacing",
            ),
        ] {
            let err = NoiseSchedule::new(change).unwrap_err().to_string();
            assert!(err.contains(word), "{err}");
        }
    }
}
