//! Samplers by name: what a request may ask for (`sampler`, `scheduler`), as AUTOMATIC1111 and
//! diffusers spell them, and the canonical ids nodes advertise. The maths lives in the node
//! (`drover_node::sampling`); this module is only the vocabulary both sides share.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most steps a standard sampler runs.
pub const MAX_SAMPLER_STEPS: u32 = 150;

/// A denoising algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Latent Consistency Model sampling (LCM models, or a standard model with an LCM LoRA).
    Lcm,
    /// Euler (diffusers `EulerDiscreteScheduler`).
    Euler,
    /// Euler ancestral (`EulerAncestralDiscreteScheduler`).
    EulerA,
    /// Heun's second-order method (`HeunDiscreteScheduler`; two UNet calls per step but the last).
    Heun,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler`, `dpmsolver++`, order 2).
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
    /// DPM-Solver++ 2M SDE (`DPMSolverMultistepScheduler`, `sde-dpmsolver++`).
    #[serde(rename = "dpmpp_2m_sde")]
    Dpmpp2mSde,
    /// DPM-Solver++ SDE (`DPMSolverSDEScheduler`: second order, two UNet calls per step but the
    /// last, noise from one Brownian path per job).
    #[serde(rename = "dpmpp_sde")]
    DpmppSde,
    /// DDIM, deterministic (eta 0).
    Ddim,
    /// UniPC (`UniPCMultistepScheduler`: order 2, bh2, predictor-corrector).
    #[serde(rename = "unipc")]
    UniPc,
}

impl Sampler {
    /// Every sampler, in the order listings show them.
    pub const ALL: [Sampler; 9] = [
        Sampler::Euler,
        Sampler::EulerA,
        Sampler::Heun,
        Sampler::Dpmpp2m,
        Sampler::Dpmpp2mSde,
        Sampler::DpmppSde,
        Sampler::UniPc,
        Sampler::Ddim,
        Sampler::Lcm,
    ];

    /// The samplers a standard (not guidance-distilled) model runs, its default (DPM++ 2M) first:
    /// every sampler but `lcm`.
    pub fn standard() -> Vec<Sampler> {
        let mut all = vec![Sampler::Dpmpp2m];
        all.extend(
            Self::ALL
                .into_iter()
                .filter(|s| !matches!(s, Sampler::Dpmpp2m | Sampler::Lcm)),
        );
        all
    }

    /// The canonical id (`euler_a`, `dpmpp_2m`, ...).
    pub fn id(self) -> &'static str {
        match self {
            Sampler::Lcm => "lcm",
            Sampler::Euler => "euler",
            Sampler::EulerA => "euler_a",
            Sampler::Heun => "heun",
            Sampler::Dpmpp2m => "dpmpp_2m",
            Sampler::Dpmpp2mSde => "dpmpp_2m_sde",
            Sampler::DpmppSde => "dpmpp_sde",
            Sampler::Ddim => "ddim",
            Sampler::UniPc => "unipc",
        }
    }

    /// The name AUTOMATIC1111 shows (`Euler a`, `DPM++ 2M`, ...).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Sampler::Lcm => "LCM",
            Sampler::Euler => "Euler",
            Sampler::EulerA => "Euler a",
            Sampler::Heun => "Heun",
            Sampler::Dpmpp2m => "DPM++ 2M",
            Sampler::Dpmpp2mSde => "DPM++ 2M SDE",
            Sampler::DpmppSde => "DPM++ SDE",
            Sampler::Ddim => "DDIM",
            Sampler::UniPc => "UniPC",
        }
    }

    /// The most steps it runs (LCM models are distilled for few; the others up to
    /// [`MAX_SAMPLER_STEPS`]).
    pub fn max_steps(self) -> u32 {
        match self {
            Sampler::Lcm => 8,
            _ => MAX_SAMPLER_STEPS,
        }
    }

    /// Model calls a run of `steps` steps makes: Heun and DPM++ SDE call the model twice per step
    /// but the last; the others once. (What a job's cost in time scales with.)
    pub fn model_calls(self, steps: u32) -> u32 {
        match self {
            Sampler::Heun | Sampler::DpmppSde => (2 * steps).saturating_sub(1),
            _ => steps,
        }
    }

    /// Steps a job that names none runs: 4 for LCM, 20 for the others.
    pub fn default_steps(self) -> u32 {
        match self {
            Sampler::Lcm => 4,
            _ => 20,
        }
    }

    /// Guidance a job that names none runs with: 1.5 for LCM (its guidance embedding), 7 (CFG)
    /// for the others.
    pub fn default_guidance(self) -> f32 {
        match self {
            Sampler::Lcm => 1.5,
            _ => 7.0,
        }
    }

    /// The sigma schedule `Automatic` means for this sampler: Karras for the DPM++ family (as
    /// AUTOMATIC1111 defaults them), the model's own spacing for the others.
    pub fn automatic_schedule(self) -> SigmaSchedule {
        match self {
            Sampler::Dpmpp2m | Sampler::Dpmpp2mSde | Sampler::DpmppSde => SigmaSchedule::Karras,
            _ => SigmaSchedule::Normal,
        }
    }

    /// Whether it can walk Karras sigmas (LCM and DDIM walk their own timesteps).
    pub fn takes_karras(self) -> bool {
        !matches!(self, Sampler::Lcm | Sampler::Ddim)
    }

    /// Refuses a sigma schedule the sampler cannot walk, saying why.
    pub fn check_schedule(self, schedule: SigmaSchedule) -> Result<(), String> {
        if schedule == SigmaSchedule::Karras && !self.takes_karras() {
            return Err(format!(
                "{} walks its own timesteps: no Karras schedule",
                self.a1111_name()
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// The spacing of noise levels a sampler walks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SigmaSchedule {
    /// The sampler's default ([`Sampler::automatic_schedule`]).
    #[default]
    Automatic,
    /// The model's timestep spacing (diffusers' `timestep_spacing`), sigmas at those timesteps.
    Normal,
    /// Karras et al. (2022) sigmas, ρ = 7, between the schedule's smallest and largest sigma.
    Karras,
}

impl SigmaSchedule {
    /// The canonical id.
    pub fn id(self) -> &'static str {
        match self {
            SigmaSchedule::Automatic => "automatic",
            SigmaSchedule::Normal => "normal",
            SigmaSchedule::Karras => "karras",
        }
    }

    /// This schedule for `sampler`, `Automatic` resolved.
    pub fn resolve(self, sampler: Sampler) -> SigmaSchedule {
        match self {
            SigmaSchedule::Automatic => sampler.automatic_schedule(),
            other => other,
        }
    }
}

impl FromStr for SigmaSchedule {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "automatic" | "auto" | "default" => Ok(SigmaSchedule::Automatic),
            "normal" | "uniform" => Ok(SigmaSchedule::Normal),
            "karras" => Ok(SigmaSchedule::Karras),
            other => Err(format!(
                "unknown scheduler {other:?}: one of automatic, normal, karras"
            )),
        }
    }
}

/// A sampler as a request names it: the algorithm and, when the name carries one (`DPM++ 2M
/// Karras`), its sigma schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerName {
    /// The algorithm.
    pub sampler: Sampler,
    /// The schedule the name implies (`Automatic` when it names none).
    pub schedule: SigmaSchedule,
}

impl FromStr for SamplerName {
    type Err = String;

    /// Case-insensitive; AUTOMATIC1111 names (`Euler a`, `DPM++ 2M Karras`, `k_dpmpp_2m`) and
    /// canonical ids (`euler_a`, `dpmpp_2m_karras`) are both accepted.
    fn from_str(raw: &str) -> Result<Self, String> {
        let lower = raw.trim().to_ascii_lowercase();
        let mut key: String = lower
            .chars()
            .map(|c| match c {
                ' ' | '-' | '.' => '_',
                '+' => 'p',
                c => c,
            })
            .collect();
        if let Some(rest) = key.strip_prefix("k_") {
            key = rest.to_string();
        }
        let (base, schedule) = match key.strip_suffix("_karras") {
            Some(base) => (base.to_string(), SigmaSchedule::Karras),
            None => (key, SigmaSchedule::Automatic),
        };
        let sampler = match base.as_str() {
            "lcm" => Sampler::Lcm,
            "euler" => Sampler::Euler,
            "euler_a" | "euler_ancestral" => Sampler::EulerA,
            "heun" => Sampler::Heun,
            "dpmpp_2m" | "dpmpp2m" => Sampler::Dpmpp2m,
            "dpmpp_2m_sde" | "dpmpp2m_sde" => Sampler::Dpmpp2mSde,
            "dpmpp_sde" | "dpmppsde" => Sampler::DpmppSde,
            "ddim" => Sampler::Ddim,
            "unipc" | "uni_pc" => Sampler::UniPc,
            _ => {
                let known: Vec<&str> = Sampler::ALL.iter().map(|s| s.a1111_name()).collect();
                return Err(format!(
                    "unknown sampler {:?}: one of {} (add \" Karras\" for Karras sigmas)",
                    raw.trim(),
                    known.join(", ")
                ));
            }
        };
        // "LCM Karras" names no sampler at all; other samplers refuse a schedule in
        // `check_schedule`, where the job's validation names the `scheduler` field.
        if sampler == Sampler::Lcm {
            sampler.check_schedule(schedule)?;
        }
        Ok(SamplerName { sampler, schedule })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_names_and_ids_parse_case_insensitively() {
        for (raw, sampler, schedule) in [
            ("Euler a", Sampler::EulerA, SigmaSchedule::Automatic),
            ("euler_a", Sampler::EulerA, SigmaSchedule::Automatic),
            ("EULER", Sampler::Euler, SigmaSchedule::Automatic),
            ("DPM++ 2M", Sampler::Dpmpp2m, SigmaSchedule::Automatic),
            ("DPM++ 2M Karras", Sampler::Dpmpp2m, SigmaSchedule::Karras),
            ("dpmpp_2m_karras", Sampler::Dpmpp2m, SigmaSchedule::Karras),
            ("k_dpmpp_2m", Sampler::Dpmpp2m, SigmaSchedule::Automatic),
            (
                "DPM++ 2M SDE Karras",
                Sampler::Dpmpp2mSde,
                SigmaSchedule::Karras,
            ),
            ("DPM++ SDE Karras", Sampler::DpmppSde, SigmaSchedule::Karras),
            ("dpmpp_sde", Sampler::DpmppSde, SigmaSchedule::Automatic),
            ("Heun", Sampler::Heun, SigmaSchedule::Automatic),
            (" ddim ", Sampler::Ddim, SigmaSchedule::Automatic),
            ("LCM", Sampler::Lcm, SigmaSchedule::Automatic),
        ] {
            let name: SamplerName = raw.parse().unwrap();
            assert_eq!((name.sampler, name.schedule), (sampler, schedule), "{raw}");
        }
    }

    #[test]
    fn the_vocabulary_is_what_requests_and_nodes_expect() {
        // A standard model: DPM++ 2M first, then every sampler but LCM, each once.
        let standard = Sampler::standard();
        assert_eq!(standard.len(), Sampler::ALL.len() - 1);
        assert_eq!(standard[0], Sampler::Dpmpp2m);
        assert!(!standard.contains(&Sampler::Lcm));
        for s in Sampler::ALL.into_iter().filter(|s| *s != Sampler::Lcm) {
            assert_eq!(standard.iter().filter(|&&x| x == s).count(), 1, "{s}");
        }
        assert_eq!(
            (Sampler::Lcm.max_steps(), Sampler::EulerA.max_steps()),
            (8, MAX_SAMPLER_STEPS)
        );
        assert_eq!(MAX_SAMPLER_STEPS, 150);
        assert!(Sampler::Euler.takes_karras() && Sampler::DpmppSde.takes_karras());
        assert!(!Sampler::Ddim.takes_karras() && !Sampler::Lcm.takes_karras());
        assert_eq!(Sampler::EulerA.to_string(), "euler_a");
        assert_eq!(
            [
                SigmaSchedule::Automatic.id(),
                SigmaSchedule::Normal.id(),
                SigmaSchedule::Karras.id()
            ],
            ["automatic", "normal", "karras"]
        );
    }

    #[test]
    fn second_order_samplers_cost_two_calls_per_step_but_the_last() {
        assert_eq!(Sampler::Heun.model_calls(5), 9);
        assert_eq!(Sampler::DpmppSde.model_calls(6), 11);
        assert_eq!(Sampler::DpmppSde.model_calls(1), 1);
        assert_eq!(Sampler::EulerA.model_calls(20), 20);
        assert_eq!(Sampler::Lcm.model_calls(4), 4);
    }

    #[test]
    fn every_sampler_parses_back_from_both_of_its_names() {
        for s in Sampler::ALL {
            assert_eq!(s.id().parse::<SamplerName>().unwrap().sampler, s);
            assert_eq!(s.a1111_name().parse::<SamplerName>().unwrap().sampler, s);
        }
    }

    #[test]
    fn unknown_names_are_refused_listing_the_known_ones() {
        let err = "DPM adaptive".parse::<SamplerName>().unwrap_err();
        assert!(err.contains("Euler a") && err.contains("DPM++ 2M"), "{err}");
        assert!("LCM Karras".parse::<SamplerName>().is_err());
        assert!("exponential".parse::<SigmaSchedule>().is_err());
    }

    #[test]
    fn serde_names_are_the_canonical_ids() {
        for s in Sampler::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.id())
            );
        }
    }

    #[test]
    fn automatic_resolves_per_sampler() {
        assert_eq!(
            SigmaSchedule::Automatic.resolve(Sampler::Dpmpp2m),
            SigmaSchedule::Karras
        );
        assert_eq!(
            SigmaSchedule::Automatic.resolve(Sampler::EulerA),
            SigmaSchedule::Normal
        );
        assert_eq!(
            SigmaSchedule::Normal.resolve(Sampler::Dpmpp2m),
            SigmaSchedule::Normal
        );
    }
}
