//! The preset catalog ("modes"): named job defaults — a model, LoRAs with strengths, size,
//! steps, guidance, sampler, negative prompt — that a request picks with `preset`.
//!
//! `presets.toml`:
//! ```toml
//! [[preset]]
//! id = "portrait"                  # what requests name in `preset`
//! title = "Portrait, soft light"   # optional
//! model = "sd15"                   # a family or a model id, as a request's `model`
//! loras = [{ name = "ink-sd15", strength = 0.7 }]
//! size = "512x768"
//! steps = 25
//! guidance_scale = 6.5
//! sampler = "DPM++ 2M Karras"
//! negative_prompt = "blurry, low quality"
//! ```
//! Every field but `id` is optional. A request's own fields override the preset's (its `loras`,
//! when it names any, replace the preset's). Loading checks each preset as a job would be
//! checked (the same limits, the errors naming the field) and, when the LoRA files are at hand,
//! that each LoRA was made for the preset's model family; one bad preset refuses the catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::job::{JobRequest, LoraRef, ModelSelector};
use crate::styles::{lora_file_family, name_ok};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetsFile {
    #[serde(default, rename = "preset")]
    presets: Vec<Preset>,
}

/// A validated preset: the defaults it gives a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// What requests name in `preset`.
    pub id: String,
    /// Display title (the id when not given).
    #[serde(default)]
    pub title: Option<String>,
    /// A model family or a model id, as a request's `model`.
    #[serde(default)]
    pub model: Option<String>,
    /// LoRAs with strengths (a request naming its own replaces them).
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// Image size, `"WxH"`.
    #[serde(default)]
    pub size: Option<String>,
    /// Denoising steps.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Guidance scale.
    #[serde(default)]
    pub guidance_scale: Option<f32>,
    /// Sampler, as a request names it.
    #[serde(default)]
    pub sampler: Option<String>,
    /// Sigma schedule.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// What not to draw.
    #[serde(default)]
    pub negative_prompt: Option<String>,
}

impl Preset {
    /// Fills the fields `request` leaves open with this preset's.
    fn fill(&self, request: &mut JobRequest) {
        fn or<T: Clone>(field: &mut Option<T>, default: &Option<T>) {
            if field.is_none() {
                field.clone_from(default);
            }
        }
        or(&mut request.model, &self.model);
        or(&mut request.size, &self.size);
        or(&mut request.steps, &self.steps);
        or(&mut request.guidance_scale, &self.guidance_scale);
        or(&mut request.sampler, &self.sampler);
        or(&mut request.scheduler, &self.scheduler);
        or(&mut request.negative_prompt, &self.negative_prompt);
        if request.loras.is_empty() {
            request.loras.clone_from(&self.loras);
        }
    }
}

/// Why a catalog cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    /// The file cannot be read.
    #[error("cannot read preset catalog {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("preset catalog is not valid: {0}")]
    Syntax(String),
    /// A preset is invalid.
    #[error("preset `{preset}`: {message}")]
    Invalid {
        /// Preset id.
        preset: String,
        /// What is wrong.
        message: String,
    },
}

/// The loaded catalog.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PresetCatalog {
    presets: BTreeMap<String, Preset>,
}

impl PresetCatalog {
    /// Loads `path`; checks LoRA files under `lora_root` when given.
    pub fn load(path: &Path, lora_root: Option<&Path>) -> Result<Self, PresetError> {
        let text = std::fs::read_to_string(path).map_err(|source| PresetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, lora_root)
    }

    /// Parses catalog text; checks LoRA files under `lora_root` when given.
    pub fn parse(text: &str, lora_root: Option<&Path>) -> Result<Self, PresetError> {
        let file: PresetsFile =
            toml::from_str(text).map_err(|e| PresetError::Syntax(e.to_string()))?;
        let mut presets = BTreeMap::new();
        for preset in file.presets {
            check(&preset, lora_root)?;
            if presets.contains_key(&preset.id) {
                return Err(PresetError::Invalid {
                    preset: preset.id,
                    message: "defined twice".into(),
                });
            }
            presets.insert(preset.id.clone(), preset);
        }
        Ok(Self { presets })
    }

    /// Every preset, by id.
    pub fn presets(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values()
    }

    /// The request with its preset's defaults under its own fields; a request naming no preset
    /// is returned as it is. An unknown preset is refused, naming it and the known ones.
    pub fn apply(&self, mut request: JobRequest) -> Result<JobRequest, FieldError> {
        let Some(id) = request.preset.as_deref().map(str::trim) else {
            return Ok(request);
        };
        let Some(preset) = self.presets.get(id) else {
            let known: Vec<&str> = self.presets.keys().map(String::as_str).collect();
            return Err(FieldError::new(
                "preset",
                if known.is_empty() {
                    format!(
                        "unknown preset `{id}`: no preset catalog is configured (DROVER_PRESETS)"
                    )
                } else {
                    format!("unknown preset `{id}`; known presets: {}", known.join(", "))
                },
            ));
        };
        preset.fill(&mut request);
        Ok(request)
    }
}

/// Checks `preset` as a job built from it would be checked, and its LoRA files' families.
fn check(preset: &Preset, lora_root: Option<&Path>) -> Result<(), PresetError> {
    let invalid = |message: String| PresetError::Invalid {
        preset: preset.id.clone(),
        message,
    };
    if !name_ok(&preset.id) {
        return Err(invalid("id must be 1 to 128 of A-Z a-z 0-9 _ - .".into()));
    }
    let mut probe = JobRequest {
        prompt: "preset check".into(),
        ..JobRequest::default()
    };
    preset.fill(&mut probe);
    let spec = probe
        .validate(|| 0)
        .map_err(|e| invalid(format!("{}: {}", e.field, e.message)))?;
    let Some(root) = lora_root else {
        return Ok(());
    };
    let mut family = match spec.model {
        Some(ModelSelector::Family(f)) => Some((f, "its model".to_string())),
        _ => None,
    };
    for lora in &preset.loras {
        let Some((_, found)) = lora_file_family(root, &lora.name)
            .map_err(|e| invalid(format!("lora `{}`: {e}", lora.name)))?
        else {
            continue;
        };
        match &family {
            Some((f, what)) if *f != found => {
                return Err(invalid(format!(
                    "lora `{}` is made for {found}, but {what} is {f}",
                    lora.name
                )));
            }
            Some(_) => {}
            None => family = Some((found, format!("lora `{}`", lora.name))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{self, LoraStyle};
    use crate::family::ModelFamily;
    use crate::safetensors::{Dtype, build::write_model};

    const CATALOG: &str = r#"
        [[preset]]
        id = "portrait"
        title = "Portrait"
        model = "sd15"
        loras = [{ name = "ink-sd15", strength = 0.7 }]
        size = "512x768"
        steps = 25
        guidance_scale = 6.5
        sampler = "DPM++ 2M Karras"
        negative_prompt = "blurry"

        [[preset]]
        id = "fast"
        steps = 4
        sampler = "lcm"
    "#;

    fn request(json: &str) -> JobRequest {
        JobRequest::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_preset_fills_what_the_request_leaves_open() {
        let catalog = PresetCatalog::parse(CATALOG, None).unwrap();
        assert_eq!(catalog.presets().count(), 2);
        let filled = catalog
            .apply(request(r#"{"prompt":"a face","preset":"portrait"}"#))
            .unwrap();
        let spec = filled.validate(|| 1).unwrap();
        assert_eq!(spec.size, Some("512x768".parse().unwrap()));
        assert_eq!(spec.steps, 25);
        assert_eq!(spec.guidance_scale, 6.5);
        assert_eq!(spec.negative_prompt, "blurry");
        assert_eq!(spec.model, Some(ModelSelector::Family(ModelFamily::Sd15)));
        assert_eq!(spec.loras.len(), 1);
        assert_eq!(spec.loras[0].name, "ink-sd15");
        // The request's own fields win; its loras replace the preset's.
        let own = catalog
            .apply(request(
                r#"{"prompt":"a face","preset":"portrait","steps":30,"size":"640x640","loras":[{"name":"other","strength":0.2}]}"#,
            ))
            .unwrap()
            .validate(|| 1)
            .unwrap();
        assert_eq!(own.steps, 30);
        assert_eq!(own.size, Some("640x640".parse().unwrap()));
        assert_eq!(own.loras.len(), 1);
        assert_eq!(own.loras[0].name, "other");
        assert_eq!(own.negative_prompt, "blurry");
        // No preset: untouched.
        let plain = request(r#"{"prompt":"x"}"#);
        assert_eq!(catalog.apply(plain.clone()).unwrap(), plain);
    }

    #[test]
    fn unknown_presets_are_refused_naming_them() {
        let catalog = PresetCatalog::parse(CATALOG, None).unwrap();
        let err = catalog
            .apply(request(r#"{"prompt":"x","preset":"nope"}"#))
            .unwrap_err();
        assert_eq!(err.field, "preset");
        assert!(err.message.contains("`nope`"), "{}", err.message);
        assert!(err.message.contains("fast, portrait"), "{}", err.message);
        let err = PresetCatalog::default()
            .apply(request(r#"{"prompt":"x","preset":"nope"}"#))
            .unwrap_err();
        assert!(err.message.contains("DROVER_PRESETS"), "{}", err.message);
    }

    #[test]
    fn bad_presets_refuse_the_catalog_with_the_reason() {
        let bad = |body: &str| {
            PresetCatalog::parse(&format!("[[preset]]\nid = \"p\"\n{body}"), None)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad("steps = 0").contains("preset `p`: steps"),
            "{}",
            bad("steps = 0")
        );
        assert!(bad("size = \"500x500\"").contains("size"));
        assert!(bad("guidance_scale = 99.0").contains("guidance_scale"));
        assert!(bad("sampler = \"warp\"").contains("sampler"));
        assert!(bad("model = \"sd 9\"").contains("model"));
        assert!(bad("colour = \"red\"").contains("unknown field"));
        let twice = "[[preset]]\nid = \"p\"\n[[preset]]\nid = \"p\"\n";
        assert!(
            PresetCatalog::parse(twice, None)
                .unwrap_err()
                .to_string()
                .contains("defined twice")
        );
        assert!(
            PresetCatalog::parse("[[preset]]\nid = \"a b\"\n", None)
                .unwrap_err()
                .to_string()
                .contains("id must be")
        );
    }

    #[test]
    fn a_lora_of_another_family_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, family: ModelFamily| {
            let tensors = arch::lora(family, LoraStyle::Kohya, 4, false);
            write_model(
                &dir.path().join(format!("{name}.safetensors")),
                &tensors,
                Dtype::F16,
            )
            .unwrap();
        };
        write("ink-sd15", ModelFamily::Sd15);
        write("glow-xl", ModelFamily::Sdxl);
        let root = Some(dir.path());
        PresetCatalog::parse(CATALOG, root).unwrap();
        let err = PresetCatalog::parse(
            "[[preset]]\nid = \"p\"\nmodel = \"sd15\"\nloras = [{ name = \"glow-xl\", strength = 1.0 }]\n",
            root,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("lora `glow-xl` is made for sdxl, but its model is sd15"),
            "{err}"
        );
        // Without a model, the LoRAs must agree among themselves.
        let err = PresetCatalog::parse(
            "[[preset]]\nid = \"p\"\nloras = [{ name = \"ink-sd15\", strength = 1.0 }, { name = \"glow-xl\", strength = 1.0 }]\n",
            root,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("but lora `ink-sd15` is sd15"), "{err}");
    }
}
