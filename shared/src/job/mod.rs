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
use crate::image::ResizeMode;
use crate::sampler::{Sampler, SigmaSchedule};
use validate::{check_name, clip};

pub mod source;
pub mod upscale;
mod validate;

pub use source::SourceSpec;
pub use upscale::{UpscaleJobRequest, UpscaleRequest, UpscaleSpec};

/// Longest accepted prompt (and negative prompt), in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Smallest accepted image side, in pixels.
pub const MIN_SIDE: u32 = 64;
/// Largest accepted image side, in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Image sides must be a multiple of this (the VAE downsamples by 8).
pub const SIDE_MULTIPLE: u32 = 8;
/// Most denoising steps a job may ask for (each sampler has its own range; LCM: 1..=8).
pub const MAX_STEPS: u32 = 150;
/// Largest guidance rescale accepted.
pub const MAX_GUIDANCE_RESCALE: f32 = 1.0;
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
// With the `openapi` feature its schema states the limits `validate` enforces (the coordinator's
// tests hold the two together); doc comments here are the API document's descriptions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// What to draw: at most 2000 characters, not only white space.
    // The pattern spells out U+0085: ECMA-262's `\s` leaves it out, Rust's `trim` removes it.
    #[cfg_attr(
        feature = "openapi",
        schema(
            max_length = 2000,
            pattern = r"[^\s\u0085]",
            example = "a lighthouse at dusk"
        )
    )]
    pub prompt: String,
    /// What not to draw: at most 2000 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 2000))]
    pub negative_prompt: Option<String>,
    /// A model family (`sd15`, `sd2`, `sdxl`; also `sd1.5`, `sd2.1` and other spellings, in any
    /// case), a model id (hex, as `GET /v1/models` lists it) or a model's name on its nodes
    /// (`model_name`: 1 to 128 of A-Z a-z 0-9 _ - ., not starting with .); any family when
    /// absent or empty.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = "^(?!sdxl_refiner$)(sd15|sd2|sdxl|[0-9A-Fa-f]{1,128}|[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})?$",
            example = "sd15"
        )
    )]
    pub model: Option<String>,
    /// Image size as `"WxH"`, each side a multiple of 8 in 64..=2048; the serving family's
    /// default when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = openapi::size))]
    pub size: Option<String>,
    /// Denoising steps, 1..=150 (the sampler's own range: LCM 1..=8); the sampler's default
    /// when absent (LCM 4, the others 20).
    #[serde(default, deserialize_with = "whole::option")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 150))]
    pub steps: Option<u32>,
    /// Sampler, as AUTOMATIC1111 or diffusers name it, in any case: `Euler`, `Euler a`, `Heun`,
    /// `DPM++ 2M`, `DPM++ 2M SDE`, `DDIM`, `LCM` (or `euler_a`, `dpmpp_2m`, ...; a ` Karras`
    /// suffix asks for Karras sigmas); the serving model's default when absent (LCM on LCM
    /// models, DPM++ 2M Karras on standard ones).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(example = "Euler a"))]
    pub sampler: Option<String>,
    /// Sigma schedule: `automatic` (the sampler's default), `normal` or `karras`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(example = "karras"))]
    pub scheduler: Option<String>,
    /// Guidance rescale φ in 0..=1 (0, off, when absent): classifier-free guidance's output
    /// scaled back toward the conditional output's standard deviation.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1))]
    pub guidance_rescale: Option<f32>,
    /// Guidance scale, 0..=20; the sampler's default when absent (LCM 1.5, the others 7).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 20))]
    pub guidance_scale: Option<f32>,
    /// Seed, 0..=2^31-1; random when absent.
    #[serde(default, deserialize_with = "whole::option")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2147483647))]
    pub seed: Option<i64>,
    /// LoRAs to apply, by name, with strengths: at most 8, each name once.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 8))]
    pub loras: Vec<LoraRef>,
    /// A style from the style catalog (`GET /v1/styles`), at a strength level.
    #[serde(default)]
    pub style_lora: Option<StyleRef>,
    /// Scheduling priority, -10..=10 (higher first); 0 when absent.
    #[serde(default, deserialize_with = "whole::option")]
    #[cfg_attr(feature = "openapi", schema(minimum = -10, maximum = 10))]
    pub priority: Option<i32>,
    /// Image-to-image: the source image, base64 PNG or JPEG (a `data:image/…;base64,` prefix
    /// is accepted), at most 16 MiB and 4096×4096 pixels; or `upload:<id>` (`POST /v1/uploads`). Without `size` the job takes the
    /// source's own size (rounded down to multiples of 8).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = Byte))]
    pub init_image: Option<String>,
    /// Inpainting: the mask, base64 PNG or JPEG (or `upload:<id>`), the source's size; white
    /// repaints, black keeps.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = Byte))]
    pub mask: Option<String>,
    /// How far from the source the result may go, in (0, 1]: the fraction of the noise schedule
    /// run. 0.75 when absent; 1.0 with a mask (the masked part starts from pure noise).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(exclusive_minimum = 0, maximum = 1, example = 0.75)
    )]
    pub strength: Option<f64>,
    /// How the source is fitted to `size`: `resize` (stretch, the default), `crop` (cover and
    /// crop the centre) or `fill` (fit inside, extend the edges).
    #[serde(default)]
    pub resize_mode: Option<ResizeMode>,
    /// Inpainting: blur the mask by this radius in pixels, 0..=64 (0 when absent: a hard
    /// mask), so the repainted part's edge blends into the kept one.
    #[serde(default, deserialize_with = "whole::option")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 64))]
    pub mask_blur: Option<u32>,
    /// Super-resolution of the generated image on a node that holds the upscaler (1 to 3
    /// passes, the result at most 4096×4096 pixels).
    #[serde(default)]
    pub upscale: Option<UpscaleRequest>,
    /// A preset from the preset catalog (`GET /v1/presets`): its model, LoRAs, size, steps,
    /// guidance, sampler and negative prompt fill the fields this request leaves out.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(example = "portrait"))]
    pub preset: Option<String>,
}

/// Integer fields read numbers as JSON (and JSON Schema) does: `5` and `5.0` are the same
/// integer; `5.5`, or a number outside the field's type, is refused.
mod whole {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, Unexpected, Visitor};

    struct Whole<T>(PhantomData<T>);

    impl<'de, T: TryFrom<i128>> Visitor<'de> for Whole<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number ({})", std::any::type_name::<T>())
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            T::try_from(i128::from(v)).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(i128::from(v)).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            // Past 2^63 a float is no exact integer anyway.
            let whole = v.fract() == 0.0 && v.abs() < 9.2e18;
            whole
                .then(|| T::try_from(v as i128).ok())
                .flatten()
                .ok_or_else(|| E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    struct OptionWhole<T>(PhantomData<T>);

    impl<'de, T: TryFrom<i128>> Visitor<'de> for OptionWhole<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number ({}) or null", std::any::type_name::<T>())
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            d.deserialize_any(Whole(PhantomData)).map(Some)
        }
    }

    /// An optional integer field (`null` or absent: `None`).
    pub(super) fn option<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        d.deserialize_option(OptionWhole(PhantomData))
    }

    /// An integer field.
    pub(super) fn required<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
        d: D,
    ) -> Result<T, D::Error> {
        d.deserialize_any(Whole(PhantomData))
    }
}

/// A LoRA by name (its file name without `.safetensors` under the node's `LORA_ROOT`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// LoRA name: 1 to 128 of `A-Z a-z 0-9 _ - .`, not starting with `.`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
    )]
    pub name: String,
    /// Merge strength, -4..=4; 1.0 when absent.
    #[serde(default = "default_strength")]
    #[cfg_attr(feature = "openapi", schema(minimum = -4, maximum = 4, default = 1.0))]
    pub strength: f32,
}

fn default_strength() -> f32 {
    1.0
}

/// A style from the catalog at a strength level (0 = off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StyleRef {
    /// Style id: 1 to 128 of `A-Z a-z 0-9 _ - .`, not starting with `.`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
    )]
    pub style: String,
    /// Strength level; 0 turns the style off, N uses the style's N-th strength (a catalog style
    /// has 1 to 10; a level above its count is refused).
    #[serde(default, deserialize_with = "whole::required")]
    #[cfg_attr(feature = "openapi", schema(maximum = 10))]
    pub level: u32,
}

/// An image size in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelSelector {
    /// Any model of this family.
    Family(ModelFamily),
    /// Exactly this model id (as advertised by nodes).
    ModelId(String),
    /// The model a node's operator gave this name (its file or folder name, `GET /v1/models`'s
    /// `model_name`), or whose id is this (ids that are not hex: simulated models).
    Name(String),
}

/// A validated job: what the coordinator stores and schedules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Sampler; `None`: the serving model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<Sampler>,
    /// Sigma schedule.
    #[serde(default, skip_serializing_if = "is_automatic")]
    pub scheduler: SigmaSchedule,
    /// Guidance rescale φ (0: off).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guidance_rescale: f32,
    /// What the request left to the serving model (`steps`, `guidance_scale` then hold the
    /// LCM defaults and are replaced at dispatch by [`JobSpec::steps_with`] and
    /// [`JobSpec::guidance_with`]).
    #[serde(default, skip_serializing_if = "ModelDefaults::is_empty")]
    pub model_defaults: ModelDefaults,
    /// Seed (chosen at submission when the request had none).
    pub seed: u64,
    /// LoRAs to merge.
    pub loras: Vec<LoraRef>,
    /// Style, when one is asked for at a level above 0.
    pub style: Option<StyleRef>,
    /// Scheduling priority.
    pub priority: i32,
    /// Image-to-image and inpainting: the source image, mask and strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<SourceSpec>>,
    /// Super-resolution after generation (or, for [`JobTask::Upscale`], of the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscale: Option<UpscaleSpec>,
    /// What the job does: generate an image (the default), or only upscale its source.
    #[serde(default, skip_serializing_if = "JobTask::is_generate")]
    pub task: JobTask,
}

/// What a job does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobTask {
    /// Text-to-image, image-to-image or inpainting (then `upscale` if asked).
    #[default]
    Generate,
    /// Super-resolution of `source` alone: no model, no prompt (`POST /v1/upscale`).
    Upscale,
}

impl JobTask {
    /// Whether this is [`JobTask::Generate`].
    pub fn is_generate(&self) -> bool {
        *self == Self::Generate
    }

    /// The task's wire name (`generate`, `upscale`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Upscale => "upscale",
        }
    }
}

/// The fields of a job left to the serving model's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelDefaults {
    /// `steps` was not given.
    #[serde(default)]
    pub steps: bool,
    /// `guidance_scale` was not given.
    #[serde(default)]
    pub guidance_scale: bool,
}

impl ModelDefaults {
    /// Nothing left to the model.
    pub fn is_empty(&self) -> bool {
        !self.steps && !self.guidance_scale
    }
}

impl JobSpec {
    /// The steps this job runs when `sampler` (the one it names, else the node's default; `None`
    /// when unknown) serves it: the steps asked for, else that sampler's default.
    pub fn steps_with(&self, sampler: Option<Sampler>) -> u32 {
        match self.sampler.or(sampler) {
            Some(s) if self.model_defaults.steps => s.default_steps(),
            _ => self.steps,
        }
    }

    /// The model calls `steps` steps of this job make under `sampler` (the job's own sampler
    /// first, as [`JobSpec::steps_with`]): what its run time scales with.
    pub fn model_calls_with(&self, sampler: Option<Sampler>, steps: u32) -> u32 {
        self.sampler
            .or(sampler)
            .map_or(steps, |s| s.model_calls(steps))
    }

    /// The guidance this job runs with under `sampler` (as [`JobSpec::steps_with`]).
    pub fn guidance_with(&self, sampler: Option<Sampler>) -> f32 {
        match self.sampler.or(sampler) {
            Some(s) if self.model_defaults.guidance_scale => s.default_guidance(),
            _ => self.guidance_scale,
        }
    }

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
}

/// Parses a JSON body strictly into `T` (a request type that refuses unknown fields), naming
/// the offending field on error: `body` for a body that is not a JSON object.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FieldError> {
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

fn is_automatic(s: &SigmaSchedule) -> bool {
    *s == SigmaSchedule::Automatic
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

/// A random seed in 0..=[`MAX_SEED`].
pub fn random_seed() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) & MAX_SEED
}

/// Image sides a size may have: the multiples of [`SIDE_MULTIPLE`] in
/// [`MIN_SIDE`]..=[`MAX_SIDE`] (what `Size::from_str` accepts).
pub fn sides() -> impl Iterator<Item = u32> {
    (MIN_SIDE..=MAX_SIDE).filter(|s| s.is_multiple_of(SIDE_MULTIPLE))
}

/// Schemas the derives cannot state from literals (feature `openapi`).
#[cfg(feature = "openapi")]
pub mod openapi {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{Object, SchemaFormat};

    /// `JobRequest.size` (and the compatibility bodies' `size`): `WxH`, or `null`, with both
    /// sides from [`super::sides`], spelled out as a pattern.
    pub fn size() -> Object {
        let sides: Vec<String> = super::sides().map(|s| s.to_string()).collect();
        let sides = sides.join("|");
        ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                Type::String,
                Type::Null,
            ]))
            .description(Some(format!(
                "Image size as `WxH`, each side a multiple of {} in {}..={}; the serving \
                 family's default when absent.",
                super::SIDE_MULTIPLE,
                super::MIN_SIDE,
                super::MAX_SIDE
            )))
            .pattern(Some(format!("^(?:{sides})x(?:{sides})$")))
            .examples([serde_json::json!("512x512")])
            .format(None::<SchemaFormat>)
            .build()
    }
}

#[cfg(test)]
mod tests;
