//! The style catalog: named looks, each a LoRA at a few strength levels, for one model family.
//!
//! `styles.toml`:
//! ```toml
//! [[style]]
//! id = "ink"                       # what requests name in style_lora.style
//! title = "Ink wash"
//! lora = "ink-sd15"                # LoRA name: its file name under LORA_ROOT, without .safetensors
//! levels = [0.4, 0.7, 1.0]         # level N uses levels[N-1]; level 0 is off
//! base = "sd15"                    # or cross_attention_dim = 768
//! trigger_words = ["ink wash painting"]
//! ```
//! Loading validates every style; when the LoRA files are at hand, each file's detected base must
//! agree with the declared one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::{ModelKind, inspect};
use crate::error::FieldError;
use crate::family::ModelFamily;
use crate::job::{JobSpec, LoraRef, MAX_LORA_STRENGTH, MAX_LORAS, MAX_PROMPT_CHARS, ModelSelector};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StylesFile {
    #[serde(default, rename = "style")]
    styles: Vec<StyleDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleDef {
    id: String,
    title: Option<String>,
    lora: String,
    levels: Vec<f32>,
    base: Option<ModelFamily>,
    cross_attention_dim: Option<u32>,
    #[serde(default)]
    trigger_words: Vec<String>,
}

/// A validated style.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Style {
    /// Style id.
    pub id: String,
    /// Display title.
    pub title: String,
    /// LoRA name.
    pub lora: String,
    /// Strength per level (level N = `levels[N-1]`).
    pub levels: Vec<f32>,
    /// Family the LoRA was made for.
    pub family: ModelFamily,
    /// Its cross-attention width.
    pub cross_attention_dim: u32,
    /// Words put in front of the prompt when the style is on.
    pub trigger_words: Vec<String>,
}

/// Why a catalog cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StyleError {
    /// The file cannot be read.
    #[error("cannot read style catalog {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("style catalog is not valid: {0}")]
    Syntax(String),
    /// A style is invalid.
    #[error("style `{style}`: {message}")]
    Invalid {
        /// Style id.
        style: String,
        /// What is wrong.
        message: String,
    },
    /// A style's LoRA file was made for another family than declared.
    #[error(
        "style `{style}` declares base {declared}, but its lora file {file} is detected as {detected}"
    )]
    BaseMismatch {
        /// Style id.
        style: String,
        /// The LoRA file.
        file: PathBuf,
        /// Declared family.
        declared: ModelFamily,
        /// Detected family.
        detected: ModelFamily,
    },
}

/// Why a job's style cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A field is out of range (the level).
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The style does not exist, or does not fit the requested model.
    #[error("{0}")]
    Unprocessable(String),
}

/// The loaded catalog.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StyleCatalog {
    styles: BTreeMap<String, Style>,
}

impl StyleCatalog {
    /// Loads `path`; checks LoRA files under `lora_root` when given.
    pub fn load(path: &Path, lora_root: Option<&Path>) -> Result<Self, StyleError> {
        let text = std::fs::read_to_string(path).map_err(|source| StyleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, lora_root)
    }

    /// Parses catalog text; checks LoRA files under `lora_root` when given.
    pub fn parse(text: &str, lora_root: Option<&Path>) -> Result<Self, StyleError> {
        let file: StylesFile =
            toml::from_str(text).map_err(|e| StyleError::Syntax(e.to_string()))?;
        let mut styles = BTreeMap::new();
        for def in file.styles {
            let style = validate(def, lora_root)?;
            if styles.contains_key(&style.id) {
                return Err(StyleError::Invalid {
                    style: style.id,
                    message: "defined twice".into(),
                });
            }
            styles.insert(style.id.clone(), style);
        }
        Ok(Self { styles })
    }

    /// One style.
    pub fn get(&self, id: &str) -> Option<&Style> {
        self.styles.get(id)
    }

    /// Every style, by id.
    pub fn styles(&self) -> impl Iterator<Item = &Style> {
        self.styles.values()
    }

    /// Turns the job's style into a LoRA at the level's strength, trigger words in front of the
    /// prompt, and the style's family as the model when the job names none.
    pub fn apply(&self, mut spec: JobSpec) -> Result<JobSpec, ApplyError> {
        let Some(request) = spec.style.clone() else {
            return Ok(spec);
        };
        let style = self.get(&request.style).ok_or_else(|| {
            let known: Vec<&str> = self.styles.keys().map(String::as_str).collect();
            ApplyError::Unprocessable(if known.is_empty() {
                format!(
                    "unknown style `{}`: no style catalog is configured (DROVER_STYLES)",
                    request.style
                )
            } else {
                format!(
                    "unknown style `{}`; known styles: {}",
                    request.style,
                    known.join(", ")
                )
            })
        })?;
        let strength = *(request.level as usize)
            .checked_sub(1)
            .and_then(|i| style.levels.get(i))
            .ok_or_else(|| {
                FieldError::new(
                    "style_lora.level",
                    format!(
                        "level {} is above style `{}`'s {} levels",
                        request.level,
                        style.id,
                        style.levels.len()
                    ),
                )
            })?;
        match &spec.model {
            Some(ModelSelector::Family(f)) if *f != style.family => {
                return Err(ApplyError::Unprocessable(format!(
                    "style `{}` is made for {} (cross-attention {}), but the request asks for {f}",
                    style.id, style.family, style.cross_attention_dim
                )));
            }
            Some(_) => {}
            None => spec.model = Some(ModelSelector::Family(style.family)),
        }
        if spec.loras.iter().any(|l| l.name == style.lora) {
            return Err(FieldError::new(
                "loras",
                format!(
                    "lora `{}` is also applied by style `{}`",
                    style.lora, style.id
                ),
            )
            .into());
        }
        if spec.loras.len() >= MAX_LORAS {
            return Err(FieldError::new(
                "loras",
                format!("with the style's lora, more than {MAX_LORAS} loras"),
            )
            .into());
        }
        spec.loras.push(LoraRef {
            name: style.lora.clone(),
            strength,
        });
        if !style.trigger_words.is_empty() {
            let prompt = format!("{}, {}", style.trigger_words.join(", "), spec.prompt);
            if prompt.chars().count() > MAX_PROMPT_CHARS {
                return Err(FieldError::new(
                    "prompt",
                    format!("with the style's trigger words, over {MAX_PROMPT_CHARS} characters"),
                )
                .into());
            }
            spec.prompt = prompt;
        }
        Ok(spec)
    }
}

/// Whether `s` may name a catalog entry or a LoRA: 1 to 128 of `A-Z a-z 0-9 _ - .`, not
/// starting with a dot.
pub(crate) fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The LoRA file `name` under `root`: its path and detected family, `None` when the file is not
/// there; an error saying why when it is there but is not a readable LoRA.
pub(crate) fn lora_file_family(
    root: &Path,
    name: &str,
) -> Result<Option<(PathBuf, ModelFamily)>, String> {
    let file = root.join(format!("{name}.safetensors"));
    if !file.exists() {
        return Ok(None);
    }
    let found = inspect(&file).map_err(|e| format!("lora file: {e}"))?;
    if found.kind != ModelKind::Lora {
        return Err(format!("{} is not a LoRA", file.display()));
    }
    Ok(Some((file, found.family)))
}

fn validate(def: StyleDef, lora_root: Option<&Path>) -> Result<Style, StyleError> {
    let invalid = |message: String| StyleError::Invalid {
        style: def.id.clone(),
        message,
    };
    if !name_ok(&def.id) {
        return Err(invalid("id must be 1 to 128 of A-Z a-z 0-9 _ - .".into()));
    }
    if !name_ok(&def.lora) {
        return Err(invalid(format!(
            "lora `{}` is not a valid LoRA name",
            def.lora
        )));
    }
    if def.levels.is_empty() || def.levels.len() > 10 {
        return Err(invalid("levels must hold 1 to 10 strengths".into()));
    }
    if let Some(bad) = def
        .levels
        .iter()
        .find(|l| !l.is_finite() || l.abs() > MAX_LORA_STRENGTH)
    {
        return Err(invalid(format!(
            "level strength {bad} is outside -{MAX_LORA_STRENGTH}..={MAX_LORA_STRENGTH}"
        )));
    }
    let from_dim = match def.cross_attention_dim {
        Some(dim) => Some(ModelFamily::from_cross_attention_dim(dim).ok_or_else(|| {
            invalid(format!(
                "cross_attention_dim {dim} is not 768, 1024, 1280 or 2048"
            ))
        })?),
        None => None,
    };
    let family = match (def.base, from_dim) {
        (Some(a), Some(b)) if a != b => {
            return Err(invalid(format!(
                "base {a} disagrees with cross_attention_dim {}",
                b.cross_attention_dim()
            )));
        }
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => {
            return Err(invalid(
                "needs `base` (sd15, sd2, sdxl) or `cross_attention_dim`".into(),
            ));
        }
    };
    if let Some(root) = lora_root
        && let Some((file, detected)) = lora_file_family(root, &def.lora).map_err(invalid)?
        && detected != family
    {
        return Err(StyleError::BaseMismatch {
            style: def.id,
            file,
            declared: family,
            detected,
        });
    }
    Ok(Style {
        title: def.title.clone().unwrap_or_else(|| def.id.clone()),
        id: def.id,
        lora: def.lora,
        levels: def.levels,
        family,
        cross_attention_dim: family.cross_attention_dim(),
        trigger_words: def.trigger_words,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{self, LoraStyle};
    use crate::job::JobRequest;
    use crate::safetensors::{Dtype, build::write_model};

    const CATALOG: &str = r#"
[[style]]
id = "ink"
title = "Ink wash"
lora = "ink-sd15"
levels = [0.4, 0.7, 1.0]
base = "sd15"
trigger_words = ["ink wash painting"]

[[style]]
id = "xl-film"
lora = "film-xl"
levels = [0.5]
cross_attention_dim = 2048
"#;

    fn spec(json: &str) -> JobSpec {
        JobRequest::from_json(json.as_bytes())
            .unwrap()
            .validate(|| 1)
            .unwrap()
    }

    #[test]
    fn styles_turn_into_loras_at_their_level() {
        let catalog = StyleCatalog::parse(CATALOG, None).unwrap();
        assert_eq!(catalog.styles().count(), 2);
        assert_eq!(catalog.get("xl-film").unwrap().family, ModelFamily::Sdxl);
        let out = catalog
            .apply(spec(
                r#"{"prompt":"a heron","style_lora":{"style":"ink","level":2}}"#,
            ))
            .unwrap();
        assert_eq!(
            out.loras,
            vec![LoraRef {
                name: "ink-sd15".into(),
                strength: 0.7
            }]
        );
        assert_eq!(out.prompt, "ink wash painting, a heron");
        assert_eq!(out.model, Some(ModelSelector::Family(ModelFamily::Sd15)));
        let off = spec(r#"{"prompt":"a heron","style_lora":{"style":"ink","level":0}}"#);
        assert_eq!(catalog.apply(off.clone()).unwrap(), off);
    }

    #[test]
    fn mismatches_and_unknowns_are_refused_by_name() {
        let catalog = StyleCatalog::parse(CATALOG, None).unwrap();
        let err = catalog
            .apply(spec(
                r#"{"prompt":"x","model":"sdxl","style_lora":{"style":"ink","level":1}}"#,
            ))
            .unwrap_err();
        assert!(
            matches!(&err, ApplyError::Unprocessable(m) if m.contains("made for sd15") && m.contains("asks for sdxl")),
            "{err}"
        );
        let err = catalog
            .apply(spec(
                r#"{"prompt":"x","style_lora":{"style":"oil","level":1}}"#,
            ))
            .unwrap_err();
        assert!(
            err.to_string().contains("known styles: ink, xl-film"),
            "{err}"
        );
        let err = catalog
            .apply(spec(
                r#"{"prompt":"x","style_lora":{"style":"ink","level":4}}"#,
            ))
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::Field(ref f) if f.field == "style_lora.level"),
            "{err}"
        );
        let empty = StyleCatalog::default();
        let err = empty
            .apply(spec(
                r#"{"prompt":"x","style_lora":{"style":"ink","level":1}}"#,
            ))
            .unwrap_err();
        assert!(err.to_string().contains("no style catalog"), "{err}");
    }

    #[test]
    fn the_example_catalog_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/styles.toml");
        let catalog = StyleCatalog::load(&path, None).unwrap();
        assert_eq!(
            catalog.styles().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["film", "ink"]
        );
    }

    #[test]
    fn bad_catalogs_are_refused_at_load() {
        for (text, expected) in [
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[1.0]\n",
                "needs `base`",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[]\nbase='sd15'\n",
                "levels",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[9.0]\nbase='sd15'\n",
                "outside",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[1.0]\nbase='sd15'\ncross_attention_dim=2048\n",
                "disagrees",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[1.0]\nbase='sd3'\n",
                "valid",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[1.0]\nbase='sd15'\ncolour='red'\n",
                "colour",
            ),
            (
                "[[style]]\nid='a'\nlora='b'\nlevels=[1.0]\nbase='sd15'\n[[style]]\nid='a'\nlora='c'\nlevels=[1.0]\nbase='sd15'\n",
                "twice",
            ),
        ] {
            let err = StyleCatalog::parse(text, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn a_lora_file_of_another_family_is_named_with_both_bases() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ink-sd15.safetensors");
        write_model(
            &file,
            &arch::lora(ModelFamily::Sdxl, LoraStyle::Kohya, 4, false),
            Dtype::F16,
        )
        .unwrap();
        let err = StyleCatalog::parse(CATALOG, Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("declares base sd15") && err.contains("detected as sdxl"),
            "{err}"
        );
        write_model(
            &file,
            &arch::lora(ModelFamily::Sd15, LoraStyle::Peft, 4, false),
            Dtype::F16,
        )
        .unwrap();
        assert!(StyleCatalog::parse(CATALOG, Some(dir.path())).is_ok());
    }
}
