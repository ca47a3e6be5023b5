//! Validation: a [`JobRequest`] checked field by field into a [`JobSpec`], every refusal a
//! [`FieldError`] naming the field.

use crate::error::FieldError;
use crate::family::ModelFamily;
use crate::sampler::{SamplerName, SigmaSchedule};

use super::*;

impl JobRequest {
    /// Parses a JSON body strictly, naming the offending field on error.
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        from_json(body)
    }

    /// Checks every value and fills defaults; `random_seed` is called only when no seed was given.
    pub fn validate(self, random_seed: impl FnOnce() -> u64) -> Result<JobSpec, FieldError> {
        self.validate_with(random_seed, &source::NoUploads)
    }

    /// [`JobRequest::validate`], image fields naming `upload:<id>` looked up in `uploads`.
    pub fn validate_with(
        self,
        random_seed: impl FnOnce() -> u64,
        uploads: &dyn source::Uploads,
    ) -> Result<JobSpec, FieldError> {
        check_prompt("prompt", &self.prompt)?;
        if self.prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "must not be empty"));
        }
        let negative_prompt = self.negative_prompt.unwrap_or_default();
        check_prompt("negative_prompt", &negative_prompt)?;

        let model = match self.model.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(m) => Some(parse_model(m)?),
        };
        let source = SourceSpec::from_request(
            self.init_image.as_deref(),
            self.mask.as_deref(),
            self.strength,
            self.resize_mode,
            uploads,
        )?
        .map(Box::new);
        let mut source = source;
        if let Some(blur) = self.mask_blur.filter(|&b| b > 0) {
            if blur > source::MAX_MASK_BLUR {
                return Err(FieldError::new(
                    "mask_blur",
                    format!("{blur} is outside 0..={}", source::MAX_MASK_BLUR),
                ));
            }
            match source.as_deref_mut() {
                Some(s) if s.mask.is_some() => s.mask_blur = blur,
                _ => {
                    return Err(FieldError::new(
                        "mask_blur",
                        "mask_blur applies to a mask, and there is none",
                    ));
                }
            }
        }
        let size = match self.size.as_deref() {
            None => source.as_deref().map(SourceSpec::default_size),
            Some(s) => Some(s.parse::<Size>().map_err(|m| FieldError::new("size", m))?),
        };
        let model_defaults = ModelDefaults {
            steps: self.steps.is_none(),
            guidance_scale: self.guidance_scale.is_none(),
        };
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(FieldError::new(
                "steps",
                format!("{steps} is outside 1..={MAX_STEPS}"),
            ));
        }
        let guidance_scale = self.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
        if !(0.0..=MAX_GUIDANCE).contains(&guidance_scale) {
            return Err(FieldError::new(
                "guidance_scale",
                format!("{guidance_scale} is outside 0..={MAX_GUIDANCE}"),
            ));
        }
        let (sampler, mut scheduler) = match self.sampler.as_deref().map(str::trim) {
            None | Some("") => (None, SigmaSchedule::Automatic),
            Some(name) => {
                let name: SamplerName = name.parse().map_err(|m| FieldError::new("sampler", m))?;
                (Some(name.sampler), name.schedule)
            }
        };
        if let Some(raw) = self.scheduler.as_deref() {
            let asked: SigmaSchedule = raw.parse().map_err(|m| FieldError::new("scheduler", m))?;
            if asked != SigmaSchedule::Automatic {
                scheduler = asked;
            }
        }
        if let Some(s) = sampler {
            s.check_schedule(scheduler)
                .map_err(|m| FieldError::new("scheduler", m))?;
        }
        let guidance_rescale = self.guidance_rescale.unwrap_or(0.0);
        if !(0.0..=MAX_GUIDANCE_RESCALE).contains(&guidance_rescale) {
            return Err(FieldError::new(
                "guidance_rescale",
                format!("{guidance_rescale} is outside 0..={MAX_GUIDANCE_RESCALE}"),
            ));
        }
        let seed = match self.seed {
            None => random_seed() & MAX_SEED,
            Some(s) => u64::try_from(s)
                .ok()
                .filter(|s| *s <= MAX_SEED)
                .ok_or_else(|| FieldError::new("seed", format!("{s} is outside 0..={MAX_SEED}")))?,
        };
        if self.loras.len() > MAX_LORAS {
            return Err(FieldError::new(
                "loras",
                format!(
                    "{} loras given, at most {MAX_LORAS} may be stacked",
                    self.loras.len()
                ),
            ));
        }
        for (i, lora) in self.loras.iter().enumerate() {
            check_name(&format!("loras[{i}].name"), &lora.name)?;
            if !lora.strength.is_finite() || lora.strength.abs() > MAX_LORA_STRENGTH {
                return Err(FieldError::new(
                    format!("loras[{i}].strength"),
                    format!(
                        "{} is outside -{MAX_LORA_STRENGTH}..={MAX_LORA_STRENGTH}",
                        lora.strength
                    ),
                ));
            }
            if self.loras[..i].iter().any(|l| l.name == lora.name) {
                return Err(FieldError::new(
                    format!("loras[{i}].name"),
                    format!("lora `{}` is given twice", lora.name),
                ));
            }
        }
        let style = match self.style_lora {
            Some(style) => {
                check_name("style_lora.style", &style.style)?;
                (style.level > 0).then_some(style)
            }
            None => None,
        };
        let priority = self.priority.unwrap_or(0);
        if !PRIORITY_RANGE.contains(&priority) {
            return Err(FieldError::new(
                "priority",
                format!(
                    "{priority} is outside {}..={}",
                    PRIORITY_RANGE.start(),
                    PRIORITY_RANGE.end()
                ),
            ));
        }
        Ok(JobSpec {
            prompt: self.prompt,
            negative_prompt,
            model,
            size,
            steps,
            guidance_scale,
            sampler,
            scheduler,
            guidance_rescale,
            model_defaults,
            seed,
            loras: self.loras,
            style,
            priority,
            source,
            upscale: self.upscale.map(UpscaleRequest::validate).transpose()?,
            task: JobTask::Generate,
        })
    }
}

fn check_prompt(field: &str, text: &str) -> Result<(), FieldError> {
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(FieldError::new(
            field,
            format!("{chars} characters, at most {MAX_PROMPT_CHARS} are accepted"),
        ));
    }
    Ok(())
}

pub(super) fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "`{}` is not a valid name: use 1 to 128 of A-Z a-z 0-9 _ - . (not starting with .)",
                clip(name)
            ),
        ))
    }
}

fn parse_model(m: &str) -> Result<ModelSelector, FieldError> {
    if let Ok(family) = m.parse::<ModelFamily>() {
        if !family.is_text_to_image() {
            return Err(FieldError::new(
                "model",
                "sdxl_refiner is a refiner, not a text-to-image base model",
            ));
        }
        return Ok(ModelSelector::Family(family));
    }
    let is_id = !m.is_empty() && m.len() <= 128 && m.chars().all(|c| c.is_ascii_hexdigit());
    let is_name = !m.is_empty()
        && m.len() <= 128
        && !m.starts_with('.')
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if is_id {
        Ok(ModelSelector::ModelId(m.to_ascii_lowercase()))
    } else if is_name {
        Ok(ModelSelector::Name(m.to_string()))
    } else {
        Err(FieldError::new(
            "model",
            format!(
                "`{}` is neither a family (sd15, sd2, sdxl), a hex model id, nor a model name \
                 (1 to 128 of A-Z a-z 0-9 _ - ., not starting with .)",
                clip(m)
            ),
        ))
    }
}

pub(super) fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
