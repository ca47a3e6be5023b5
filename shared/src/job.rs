//! The job request a client sends (`POST /v1/jobs`, `POST /v1/generate`) and its validation.
//!
//! The native API is strict: unknown fields and out-of-range values are refused with a
//! [`FieldError`] naming the field. Validation turns a [`JobRequest`] into a [`JobSpec`], the only
//! form the coordinator stores and schedules.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::family::ModelFamily;

/// Longest accepted prompt (and negative prompt), in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Smallest accepted image side, in pixels.
pub const MIN_SIDE: u32 = 64;
/// Largest accepted image side, in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Image sides must be a multiple of this (the VAE downsamples by 8).
pub const SIDE_MULTIPLE: u32 = 8;
/// Most denoising steps a job may ask for.
pub const MAX_STEPS: u32 = 50;
/// Steps used when a request does not say (LCM models need few).
pub const DEFAULT_STEPS: u32 = 4;
/// Largest classifier-free guidance scale accepted.
pub const MAX_GUIDANCE: f32 = 20.0;
/// Guidance used when a request does not say.
pub const DEFAULT_GUIDANCE: f32 = 1.5;
/// Largest accepted seed (2^31 - 1).
pub const MAX_SEED: u64 = (1 << 31) - 1;
/// Most LoRAs one job may stack.
pub const MAX_LORAS: usize = 8;
/// Largest absolute LoRA strength accepted.
pub const MAX_LORA_STRENGTH: f32 = 4.0;
/// Priority range (higher runs first).
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -10..=10;

/// A job as a client submits it to the native API. Every field but `prompt` is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// What to draw.
    pub prompt: String,
    /// What not to draw.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// A model family (`sd15`, `sd2`, `sdxl`) or a model id; any family when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// Image size as `"WxH"`; the serving family's default when absent.
    #[serde(default)]
    pub size: Option<String>,
    /// Denoising steps, 1..=50.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Guidance scale, 0..=20.
    #[serde(default)]
    pub guidance_scale: Option<f32>,
    /// Seed, 0..=2^31-1; random when absent.
    #[serde(default)]
    pub seed: Option<i64>,
    /// LoRAs to apply, by name, with strengths.
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// A style from the style catalog, at a strength level.
    #[serde(default)]
    pub style_lora: Option<StyleRef>,
    /// Scheduling priority, -10..=10 (higher first); 0 when absent.
    #[serde(default)]
    pub priority: Option<i32>,
}

/// A LoRA by name (its file name without `.safetensors` under the node's `LORA_ROOT`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// LoRA name.
    pub name: String,
    /// Merge strength; 1.0 when absent.
    #[serde(default = "default_strength")]
    pub strength: f32,
}

fn default_strength() -> f32 {
    1.0
}

/// A style from the catalog at a strength level (0 = off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleRef {
    /// Style id.
    pub style: String,
    /// Strength level; 0 turns the style off.
    #[serde(default)]
    pub level: u32,
}

/// An image size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Size {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Size {
    /// Number of pixels.
    pub fn pixels(self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || {
            format!(
                "`{}` is not a size: expected \"WxH\", e.g. \"512x512\"",
                clip(s)
            )
        };
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(shape)?;
        let side = |v: &str| v.trim().parse::<u32>().map_err(|_| shape());
        let size = Size {
            width: side(w)?,
            height: side(h)?,
        };
        for (name, v) in [("width", size.width), ("height", size.height)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
                return Err(format!("{name} {v} is outside {MIN_SIDE}..={MAX_SIDE}"));
            }
            if !v.is_multiple_of(SIDE_MULTIPLE) {
                return Err(format!("{name} {v} is not a multiple of {SIDE_MULTIPLE}"));
            }
        }
        Ok(size)
    }
}

/// Which model a job asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSelector {
    /// Any model of this family.
    Family(ModelFamily),
    /// Exactly this model id (as advertised by nodes).
    ModelId(String),
}

/// A validated job: what the coordinator stores and schedules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// What to draw.
    pub prompt: String,
    /// What not to draw (may be empty).
    pub negative_prompt: String,
    /// Requested model; `None` means any family.
    pub model: Option<ModelSelector>,
    /// Requested size; `None` means the serving family's default.
    pub size: Option<Size>,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Seed (chosen at submission when the request had none).
    pub seed: u64,
    /// LoRAs to merge.
    pub loras: Vec<LoraRef>,
    /// Style, when one is asked for at a level above 0.
    pub style: Option<StyleRef>,
    /// Scheduling priority.
    pub priority: i32,
}

impl JobSpec {
    /// The size this job renders at on a node of `family` that renders only `sizes` (empty:
    /// any size): the size asked for; else the family's default; else, when the node cannot
    /// render that default (a model compiled for fixed shapes), the node's first size.
    pub fn size_on(&self, family: ModelFamily, sizes: &[Size]) -> Size {
        self.size.unwrap_or_else(|| {
            let (width, height) = family.default_size();
            let default = Size { width, height };
            match sizes.first() {
                Some(first) if !sizes.contains(&default) => *first,
                _ => default,
            }
        })
    }

    /// The job as sent to a node of `family` that renders `sizes` (see [`JobSpec::size_on`]).
    pub fn to_proto(&self, family: ModelFamily, sizes: &[Size]) -> crate::proto::JobSpec {
        let size = self.size_on(family, sizes);
        crate::proto::JobSpec {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: size.width,
            height: size.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            loras: self
                .loras
                .iter()
                .map(|l| crate::proto::LoraRequest {
                    name: l.name.clone(),
                    strength: l.strength,
                })
                .collect(),
        }
    }
}

impl JobRequest {
    /// Parses a JSON body strictly, naming the offending field on error.
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(FieldError::new("body", "expected a JSON object"));
        }
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let message = inner.to_string();
            if inner.is_syntax() || inner.is_eof() {
                return FieldError::new("body", format!("malformed json: {message}"));
            }
            let field = match message.strip_prefix("unknown field `") {
                Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
                None if path == "." => "body".to_string(),
                None => path,
            };
            FieldError::new(field, message)
        })
    }

    /// Checks every value and fills defaults; `random_seed` is called only when no seed was given.
    pub fn validate(self, random_seed: impl FnOnce() -> u64) -> Result<JobSpec, FieldError> {
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
        let size = match self.size.as_deref() {
            None => None,
            Some(s) => Some(s.parse::<Size>().map_err(|m| FieldError::new("size", m))?),
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
            seed,
            loras: self.loras,
            style,
            priority,
        })
    }
}

/// A random seed in 0..=[`MAX_SEED`].
pub fn random_seed() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) & MAX_SEED
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

fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
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
    if is_id {
        Ok(ModelSelector::ModelId(m.to_ascii_lowercase()))
    } else {
        Err(FieldError::new(
            "model",
            format!(
                "`{}` is neither a family (sd15, sd2, sdxl) nor a hex model id",
                clip(m)
            ),
        ))
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(json: &str) -> Result<JobSpec, FieldError> {
        JobRequest::from_json(json.as_bytes())?.validate(|| 42)
    }

    fn field_of(json: &str) -> String {
        match parse(json) {
            Ok(spec) => panic!("expected an error for {json}, got {spec:?}"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn minimal_request_gets_defaults() {
        let spec = parse(r#"{"prompt":"a cat"}"#).unwrap();
        assert_eq!(spec.steps, DEFAULT_STEPS);
        assert_eq!(spec.seed, 42);
        assert_eq!(spec.size, None);
        assert_eq!(
            spec.size_on(ModelFamily::Sdxl, &[]),
            Size {
                width: 1024,
                height: 1024
            }
        );
        assert_eq!(
            spec.size_on(ModelFamily::Sd15, &[]),
            Size {
                width: 512,
                height: 512
            }
        );
        // A node compiled for fixed sizes renders the default when it can, else its first size.
        let fixed = |w, h| Size {
            width: w,
            height: h,
        };
        let both = [fixed(384, 384), fixed(512, 512)];
        assert_eq!(spec.size_on(ModelFamily::Sd15, &both), fixed(512, 512));
        assert_eq!(spec.size_on(ModelFamily::Sd15, &both[..1]), fixed(384, 384));
        let sized = parse(r#"{"prompt":"a cat","size":"640x480"}"#).unwrap();
        assert_eq!(sized.size_on(ModelFamily::Sd15, &both), fixed(640, 480));
        assert_eq!(spec.model, None);
    }

    #[test]
    fn full_request_is_kept() {
        let spec = parse(
            r#"{"prompt":"a cat","negative_prompt":"dog","model":"sdxl","size":"768x1024",
                "steps":8,"guidance_scale":2.5,"seed":7,"loras":[{"name":"pixel-art","strength":0.8}],
                "style_lora":{"style":"ink","level":2},"priority":3}"#,
        )
        .unwrap();
        assert_eq!(spec.model, Some(ModelSelector::Family(ModelFamily::Sdxl)));
        assert_eq!(
            spec.size,
            Some(Size {
                width: 768,
                height: 1024
            })
        );
        assert_eq!((spec.steps, spec.seed, spec.priority), (8, 7, 3));
        assert_eq!(
            spec.loras,
            vec![LoraRef {
                name: "pixel-art".into(),
                strength: 0.8
            }]
        );
        assert_eq!(
            spec.style,
            Some(StyleRef {
                style: "ink".into(),
                level: 2
            })
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (r#"{"prompt":"x","bogus":1}"#, "bogus"),
            (r#"{"prompt":"x","steps":"many"}"#, "steps"),
            (r#"{"prompt":"x","steps":0}"#, "steps"),
            (r#"{"prompt":"x","steps":51}"#, "steps"),
            (r#"{"prompt":"x","size":"512"}"#, "size"),
            (r#"{"prompt":"x","size":"513x512"}"#, "size"),
            (r#"{"prompt":"x","size":"4096x512"}"#, "size"),
            (r#"{"prompt":"x","size":"56x512"}"#, "size"),
            (r#"{"prompt":"x","guidance_scale":20.5}"#, "guidance_scale"),
            (r#"{"prompt":"x","guidance_scale":-1}"#, "guidance_scale"),
            (r#"{"prompt":"x","seed":-1}"#, "seed"),
            (r#"{"prompt":"x","seed":2147483648}"#, "seed"),
            (r#"{"prompt":"x","model":"sd3"}"#, "model"),
            (r#"{"prompt":"x","model":"sdxl_refiner"}"#, "model"),
            (
                r#"{"prompt":"x","loras":[{"name":"../etc"}]}"#,
                "loras[0].name",
            ),
            (
                r#"{"prompt":"x","loras":[{"name":"a","strength":9}]}"#,
                "loras[0].strength",
            ),
            (
                r#"{"prompt":"x","loras":[{"name":"a"},{"name":"a"}]}"#,
                "loras[1].name",
            ),
            (
                r#"{"prompt":"x","loras":[{"name":"a","extra":1}]}"#,
                "extra",
            ),
            (r#"{"prompt":"x","priority":11}"#, "priority"),
            (r#"{"prompt":"  "}"#, "prompt"),
            (r#"{"steps":4}"#, "body"),
            (r#"{"prompt":"x""#, "body"),
            (r#"[1,2]"#, "body"),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(json), field, "for {json}");
        }
        let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(MAX_PROMPT_CHARS + 1));
        assert_eq!(field_of(&long), "prompt");
    }

    #[test]
    fn edges_of_ranges_are_accepted() {
        for json in [
            r#"{"prompt":"x","size":"64x2048","steps":1,"guidance_scale":0,"seed":0}"#,
            r#"{"prompt":"x","size":"2048x64","steps":50,"guidance_scale":20,"seed":2147483647}"#,
            r#"{"prompt":"x","model":"0123abcd"}"#,
            r#"{"prompt":"x","style_lora":{"style":"ink","level":0}}"#,
        ] {
            assert!(parse(json).is_ok(), "{json}");
        }
    }

    proptest! {
        #[test]
        fn sizes_are_accepted_exactly_when_in_range(w in 0u32..3000, h in 0u32..3000) {
            let ok = |v: u32| (MIN_SIDE..=MAX_SIDE).contains(&v) && v.is_multiple_of(SIDE_MULTIPLE);
            let parsed = format!("{w}x{h}").parse::<Size>();
            prop_assert_eq!(parsed.is_ok(), ok(w) && ok(h));
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = JobRequest::from_json(&body).and_then(|r| r.validate(|| 1));
        }

        #[test]
        fn validated_seeds_are_in_range(seed in any::<i64>()) {
            let req = JobRequest { prompt: "x".into(), seed: Some(seed), ..Default::default() };
            match req.validate(|| 0) {
                Ok(spec) => prop_assert!(spec.seed <= MAX_SEED && spec.seed as i64 == seed),
                Err(e) => prop_assert_eq!(e.field, "seed"),
            }
        }
    }
}
