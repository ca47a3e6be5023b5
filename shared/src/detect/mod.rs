//! What a model file or folder is, from safetensors headers alone: family, kind, layout, dtype,
//! size. The family comes from the cross-attention projection (`attn2.to_k.weight` is
//! `[hidden, cross_dim]`, axis 1) and is confirmed against other keys (text encoders, SDXL added
//! conditioning, projection layout); a contradiction is an error, never a guess.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::family::ModelFamily;
use crate::safetensors::{Dtype, Header, HeaderError, read_header};

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A full text-to-image checkpoint (UNet, VAE, text encoders).
    Checkpoint,
    /// A UNet alone.
    Unet,
    /// A LoRA adapter.
    Lora,
}

/// How the tensors are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The original single-file layout (`model.diffusion_model.*`, ...).
    LdmSingleFile,
    /// diffusers names (a pipeline folder, or a UNet file/folder).
    Diffusers,
    /// kohya-ss LoRA names (`lora_unet_*`, `lora_te*_*`).
    Kohya,
    /// PEFT / diffusers LoRA names (`lora_A` / `lora_B`).
    Peft,
    /// A folder of RKNN NPU models (`text_encoder/`, `unet/`, `vae_decoder/` each holding
    /// `model.rknn` and the diffusers `config.json`), as published for RK3588.
    Rknn,
}

/// The result of inspecting a model path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Inspection {
    /// The inspected path.
    pub path: PathBuf,
    /// Model family (for a LoRA: the family it was made for).
    pub family: ModelFamily,
    /// What it holds.
    pub kind: ModelKind,
    /// Width of the text conditioning the UNet attends to.
    pub cross_attention_dim: u32,
    /// Tensor naming.
    pub layout: Layout,
    /// The float dtype holding most parameters.
    pub dtype: Option<Dtype>,
    /// Parameters over every inspected file.
    pub parameters: u64,
    /// Bytes of weights as stored.
    pub weights_bytes: u64,
    /// Memory to hold the weights at their stored dtype plus 20% working memory (a planning
    /// figure, not a measurement).
    pub estimated_memory_bytes: u64,
    /// The model id (`model_id`): the (UNet) header's SHA-256 hashed with a 64 KiB weight sample.
    pub model_id: String,
    /// Components found (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
    pub components: Vec<String>,
    /// LoRA rank (largest), for LoRAs.
    pub lora_rank: Option<u64>,
    /// A LoRA that distils LCM sampling into a standard model (an LCM-LoRA), told by its file
    /// name or its metadata naming LCM ([`names_lcm`]); false for everything else.
    pub lcm_lora: bool,
    /// An inpainting UNet: its first convolution takes 9 channels (the latent, the mask and
    /// the masked image's latent) instead of 4.
    pub inpainting: bool,
    /// The safetensors files read.
    pub files: Vec<PathBuf>,
}

/// Why a path could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The path does not exist.
    #[error("{0}: no such file or directory")]
    Missing(PathBuf),
    /// A folder with no model in it.
    #[error(
        "{path}: no model here (looked for model_index.json + unet/, a diffusers UNet folder with config.json, or a single .safetensors file; found {found})"
    )]
    NoModelInDir {
        /// The folder.
        path: PathBuf,
        /// What it holds, briefly.
        found: String,
    },
    /// The file is not a readable safetensors file.
    #[error("{path}: {source}")]
    Header {
        /// The file.
        path: PathBuf,
        /// Why.
        source: HeaderError,
    },
    /// A readable safetensors file that is not a model this detector knows.
    #[error("{path}: not a Stable Diffusion checkpoint, UNet or LoRA: {reason}")]
    Unrecognised {
        /// The file.
        path: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// The keys contradict each other.
    #[error("{path}: inconsistent model: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// The contradiction.
        reason: String,
    },
}

/// Inspects a file or folder.
pub fn inspect(path: &Path) -> Result<Inspection, DetectError> {
    let meta = std::fs::metadata(path).map_err(|_| DetectError::Missing(path.to_path_buf()))?;
    if meta.is_dir() {
        inspect_dir(path)
    } else {
        inspect_file(path)
    }
}

fn header(path: &Path) -> Result<Header, DetectError> {
    read_header(path).map_err(|source| DetectError::Header {
        path: path.to_path_buf(),
        source,
    })
}

fn inspect_file(path: &Path) -> Result<Inspection, DetectError> {
    let h = header(path)?;
    let c = classify(path, &h)?;
    let mut components = c.components.clone();
    components.sort();
    Ok(finish(path, &[(&h, path)], c, components))
}

struct Classified {
    family: ModelFamily,
    kind: ModelKind,
    layout: Layout,
    components: Vec<String>,
    lora_rank: Option<u64>,
    lcm_lora: bool,
}

fn finish(
    path: &Path,
    headers: &[(&Header, &Path)],
    c: Classified,
    components: Vec<String>,
) -> Inspection {
    let parameters = headers.iter().map(|(h, _)| h.parameters()).sum();
    let weights_bytes: u64 = headers.iter().map(|(h, _)| h.data_bytes()).sum();
    Inspection {
        path: path.to_path_buf(),
        family: c.family,
        kind: c.kind,
        cross_attention_dim: c.family.cross_attention_dim(),
        layout: c.layout,
        dtype: headers.first().and_then(|(h, _)| h.dominant_dtype()),
        parameters,
        weights_bytes,
        estimated_memory_bytes: weights_bytes + weights_bytes / 5,
        model_id: headers
            .first()
            .map(|(h, p)| model_id(h, p))
            .unwrap_or_default(),
        components,
        lora_rank: c.lora_rank,
        lcm_lora: c.lcm_lora,
        inpainting: headers.iter().any(|(h, _)| unet_in_channels(h) == Some(9)),
        files: headers.iter().map(|(_, p)| p.to_path_buf()).collect(),
    }
}

/// Bytes of UNet weights a model id takes in besides the header.
pub const ID_SAMPLE_BYTES: u64 = 64 * 1024;

/// A model's id: the SHA-256 of its (UNet) header's SHA-256 and of [`ID_SAMPLE_BYTES`] from the
/// middle of its largest UNet tensor. Fine-tunes of one base share every header byte; their
/// weights differ. A file that cannot be read there gets the header's hash alone.
fn model_id(h: &Header, path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let ldm = h
        .tensors
        .keys()
        .any(|k| k.starts_with("model.diffusion_model."));
    let largest = h
        .tensors
        .iter()
        .filter(|(k, _)| !ldm || k.starts_with("model.diffusion_model."))
        .max_by_key(|(k, t)| (t.data_offsets.1 - t.data_offsets.0, std::cmp::Reverse(*k)));
    let Some((_, t)) = largest else {
        return h.sha256.clone();
    };
    let len = (t.data_offsets.1 - t.data_offsets.0).min(ID_SAMPLE_BYTES);
    let start =
        8 + h.header_len + t.data_offsets.0 + (t.data_offsets.1 - t.data_offsets.0 - len) / 2;
    let mut sample = vec![0u8; len as usize];
    let read = std::fs::File::open(path).and_then(|f| {
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut sample, start)
    });
    if read.is_err() {
        return h.sha256.clone();
    }
    let mut hasher = Sha256::new();
    hasher.update(h.sha256.as_bytes());
    hasher.update(&sample);
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The input channels of a UNet's first convolution (diffusers or LDM names), from its shape.
pub fn unet_in_channels(h: &Header) -> Option<u64> {
    [
        "conv_in.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
    ]
    .iter()
    .find_map(|name| h.shape(name))
    .filter(|s| s.len() == 4)
    .map(|s| s[1])
}

fn inconsistent(path: &Path, reason: String) -> DetectError {
    DetectError::Inconsistent {
        path: path.to_path_buf(),
        reason,
    }
}

/// The cross-attention dims found on `attn2.to_k` projections (axis 1 of `[hidden, cross_dim]`).
fn cross_dims<'a>(h: &'a Header, matches: impl Fn(&str) -> bool + 'a) -> BTreeSet<u64> {
    h.tensors
        .iter()
        .filter(|(name, t)| matches(name) && t.shape.len() == 2)
        .map(|(_, t)| t.shape[1])
        .collect()
}

fn family_from_dims(path: &Path, dims: &BTreeSet<u64>) -> Result<Option<ModelFamily>, DetectError> {
    match dims.len() {
        0 => Ok(None),
        1 => {
            let dim = *dims.iter().next().unwrap_or(&0);
            ModelFamily::from_cross_attention_dim(dim as u32)
                .map(Some)
                .ok_or_else(|| {
                    inconsistent(
                        path,
                        format!("cross-attention dim {dim} is not 768, 1024, 1280 or 2048"),
                    )
                })
        }
        _ => Err(inconsistent(
            path,
            format!("cross-attention projections disagree: dims {dims:?}"),
        )),
    }
}

fn classify(path: &Path, h: &Header) -> Result<Classified, DetectError> {
    let keys = &h.tensors;
    let any = |pred: &dyn Fn(&str) -> bool| keys.keys().any(|k| pred(k));
    let is_lora_key = |k: &str| {
        k.contains(".lora_down.")
            || k.contains(".lora_up.")
            || k.contains(".lora_A.")
            || k.contains(".lora_B.")
            || k.contains(".lora.down.")
            || k.contains(".lora.up.")
    };
    if any(&is_lora_key) {
        return classify_lora(path, h);
    }
    if any(&|k| k.starts_with("model.diffusion_model.")) {
        let dims = cross_dims(h, |k| {
            k.starts_with("model.diffusion_model.") && k.ends_with("attn2.to_k.weight")
        });
        let family = family_from_dims(path, &dims)?.ok_or_else(|| {
            unrecognised(
                path,
                "model.diffusion_model.* has no attn2.to_k cross-attention",
            )
        })?;
        confirm_unet(
            path,
            h,
            family,
            "model.diffusion_model.",
            "label_emb.0.0.weight",
            "input_blocks.1.1.proj_in.weight",
            "input_blocks.4.1.proj_in.weight",
        )?;
        let mut components = vec!["unet".to_string()];
        if any(&|k| k.starts_with("first_stage_model.")) {
            components.push("vae".into());
        }
        let te = text_encoders_ldm(h);
        confirm_text_encoders(path, family, &te)?;
        components.extend(te.iter().map(|s| s.to_string()));
        let kind = if components.len() > 1 {
            ModelKind::Checkpoint
        } else {
            ModelKind::Unet
        };
        return Ok(Classified {
            family,
            kind,
            layout: Layout::LdmSingleFile,
            components,
            lora_rank: None,
            lcm_lora: false,
        });
    }
    if keys.contains_key("conv_in.weight") && any(&|k| k.starts_with("down_blocks.")) {
        let dims = cross_dims(h, |k| k.ends_with("attn2.to_k.weight"));
        let family = family_from_dims(path, &dims)?.ok_or_else(|| {
            unrecognised(path, "a diffusers model without cross-attention (a VAE?)")
        })?;
        confirm_unet(
            path,
            h,
            family,
            "",
            "add_embedding.linear_1.weight",
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.1.attentions.0.proj_in.weight",
        )?;
        return Ok(Classified {
            family,
            kind: ModelKind::Unet,
            layout: Layout::Diffusers,
            components: vec!["unet".into()],
            lora_rank: None,
            lcm_lora: false,
        });
    }
    let hint = if upscaler::upscaler_from_header(path, h).is_ok_and(|u| u.is_some()) {
        "it holds a super-resolution upscaler (name it with UPSCALER, not MODEL)"
    } else if any(&|k| k.starts_with("text_model.")) {
        "it holds a text encoder"
    } else if any(&|k| k.starts_with("encoder.") || k.starts_with("decoder.")) {
        "it holds a VAE"
    } else {
        "no UNet (model.diffusion_model.* or down_blocks.*) and no LoRA (lora_*) tensors"
    };
    Err(unrecognised(path, hint))
}

fn unrecognised(path: &Path, reason: &str) -> DetectError {
    DetectError::Unrecognised {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Checks the SDXL added conditioning and the projection layout against `family`.
fn confirm_unet(
    path: &Path,
    h: &Header,
    family: ModelFamily,
    prefix: &str,
    add_key: &str,
    first_proj: &str,
    second_proj: &str,
) -> Result<(), DetectError> {
    let has_add = h.tensors.contains_key(&format!("{prefix}{add_key}"));
    let wants_add = matches!(family, ModelFamily::Sdxl | ModelFamily::SdxlRefiner);
    if has_add != wants_add {
        let what = if has_add { "has" } else { "lacks" };
        return Err(inconsistent(
            path,
            format!(
                "cross-attention dim {} says {family}, but the UNet {what} SDXL added conditioning ({add_key})",
                family.cross_attention_dim()
            ),
        ));
    }
    let proj = h
        .shape(&format!("{prefix}{first_proj}"))
        .or_else(|| h.shape(&format!("{prefix}{second_proj}")));
    if let Some(shape) = proj {
        let conv = shape.len() == 4;
        if conv != (family == ModelFamily::Sd15) {
            let kind = if conv { "1x1 conv" } else { "linear" };
            return Err(inconsistent(
                path,
                format!(
                    "cross-attention dim {} says {family}, but proj_in is a {kind} projection",
                    family.cross_attention_dim()
                ),
            ));
        }
    }
    Ok(())
}

fn text_encoders_ldm(h: &Header) -> Vec<&'static str> {
    let has = |p: &str| h.tensors.keys().any(|k| k.starts_with(p));
    let mut out = Vec::new();
    if has("cond_stage_model.transformer.") {
        out.push("clip_l");
    }
    if has("cond_stage_model.model.") {
        out.push("open_clip_h");
    }
    if has("conditioner.embedders.0.transformer.") {
        out.push("clip_l");
    }
    if has("conditioner.embedders.1.model.") || has("conditioner.embedders.0.model.") {
        out.push("open_clip_bigg");
    }
    out
}

fn confirm_text_encoders(
    path: &Path,
    family: ModelFamily,
    found: &[&str],
) -> Result<(), DetectError> {
    if found.is_empty() {
        return Ok(());
    }
    let expected: &[&str] = match family {
        ModelFamily::Sd15 => &["clip_l"],
        ModelFamily::Sd2 => &["open_clip_h"],
        ModelFamily::Sdxl => &["clip_l", "open_clip_bigg"],
        ModelFamily::SdxlRefiner => &["open_clip_bigg"],
    };
    if found != expected {
        return Err(inconsistent(
            path,
            format!(
                "the UNet is {family} but the text encoders are {found:?} (expected {expected:?})"
            ),
        ));
    }
    Ok(())
}

/// The metadata keys that name a LoRA or describe its training (kohya's `ss_*`, the
/// ModelSpec `modelspec.*`).
const NAMING_KEYS: [&str; 6] = [
    "ss_output_name",
    "ss_training_comment",
    "modelspec.title",
    "modelspec.description",
    "name",
    "title",
];

/// Whether a LoRA file says it is an LCM-LoRA: a word of its file name or of one of its naming
/// metadata values starts with `lcm` (`lcm-lora-sdv1-5`, `LCM_LoRA_Weights_SD15`,
/// `lcmlora_sdxl`), or that metadata says "latent consistency". LCM-LoRA files carry no tensor
/// that tells them apart, so this reads names; `LCM_LORAS` on the node marks the others.
pub fn names_lcm(path: &Path, metadata: &std::collections::BTreeMap<String, String>) -> bool {
    let words_lcm = |text: &str| {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w.to_ascii_lowercase().starts_with("lcm"))
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    words_lcm(&stem)
        || NAMING_KEYS
            .iter()
            .filter_map(|k| metadata.get(*k))
            .any(|v| words_lcm(v) || v.to_ascii_lowercase().contains("latent consistency"))
}

fn classify_lora(path: &Path, h: &Header) -> Result<Classified, DetectError> {
    let kohya = h
        .tensors
        .keys()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"));
    let layout = if kohya { Layout::Kohya } else { Layout::Peft };
    // The down / A matrix is [rank, in_features]: for attn2.to_k, in_features is the cross dim.
    let dims = cross_dims(h, |k| {
        (k.contains("attn2_to_k.")
            || k.contains("attn2.to_k.")
            || k.contains("attn2.processor.to_k_lora."))
            && (k.ends_with("lora_down.weight")
                || k.ends_with("lora_A.weight")
                || k.ends_with("down.weight"))
    });
    let rank = h
        .tensors
        .iter()
        .filter(|(k, t)| {
            (k.ends_with("lora_down.weight") || k.ends_with("lora_A.weight")) && !t.shape.is_empty()
        })
        .map(|(_, t)| t.shape[0])
        .max();
    let has = |p: &str| {
        h.tensors
            .keys()
            .any(|k| k.starts_with(p) || k.contains(&format!(".{p}")))
    };
    let dual_te = has("lora_te1_") || has("lora_te2_") || has("text_encoder_2.");
    let single_te_width = cross_dims(h, |k| {
        (k.starts_with("lora_te_") && k.contains("q_proj") && k.ends_with("lora_down.weight"))
            || (k.starts_with("text_encoder.")
                && k.contains("q_proj")
                && k.ends_with("lora_A.weight"))
    });
    let te_family = if dual_te {
        Some(ModelFamily::Sdxl)
    } else {
        match single_te_width.iter().next() {
            Some(768) => Some(ModelFamily::Sd15),
            Some(1024) => Some(ModelFamily::Sd2),
            _ => None,
        }
    };
    let family = match (family_from_dims(path, &dims)?, te_family) {
        (Some(unet), Some(te)) => {
            let compatible =
                unet == te || (unet == ModelFamily::SdxlRefiner && te == ModelFamily::Sdxl);
            if !compatible {
                return Err(inconsistent(
                    path,
                    format!(
                        "LoRA cross-attention says {unet} but its text-encoder layers say {te}"
                    ),
                ));
            }
            unet
        }
        (Some(unet), None) => unet,
        (None, Some(te)) => te,
        (None, None) => {
            return Err(unrecognised(
                path,
                "a LoRA without cross-attention or text-encoder layers: its base cannot be told",
            ));
        }
    };
    let mut components = Vec::new();
    if h.tensors
        .keys()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("unet.") || k.contains("attn"))
    {
        components.push("unet".to_string());
    }
    if has("lora_te_") || has("lora_te1_") || has("text_encoder.") {
        components.push("text_encoder".into());
    }
    if has("lora_te2_") || has("text_encoder_2.") {
        components.push("text_encoder_2".into());
    }
    components.dedup();
    Ok(Classified {
        family,
        kind: ModelKind::Lora,
        layout,
        components,
        lora_rank: rank,
        lcm_lora: names_lcm(path, &h.metadata),
    })
}

fn safetensors_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The weights file of a diffusers component folder (`diffusion_pytorch_model.safetensors`,
/// `model.safetensors`, or an fp16 variant).
fn component_file(dir: &Path) -> Option<PathBuf> {
    let files = safetensors_in(dir);
    [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| files.contains(p))
    .or_else(|| files.into_iter().next())
}

fn inspect_dir(dir: &Path) -> Result<Inspection, DetectError> {
    if dir.join("unet").join(RKNN_MODEL_FILE).is_file() {
        return inspect_rknn_dir(dir);
    }
    if dir.join("model_index.json").is_file() {
        let unet_file =
            component_file(&dir.join("unet")).ok_or_else(|| DetectError::NoModelInDir {
                path: dir.to_path_buf(),
                found: "model_index.json but no unet/*.safetensors".into(),
            })?;
        let unet = header(&unet_file)?;
        let mut c = classify(&unet_file, &unet)?;
        if c.kind == ModelKind::Lora {
            return Err(unrecognised(dir, "unet/ holds a LoRA, not a UNet"));
        }
        let mut parts: Vec<(String, PathBuf, Header)> = Vec::new();
        for component in ["vae", "text_encoder", "text_encoder_2"] {
            if let Some(file) = component_file(&dir.join(component)) {
                let h = header(&file)?;
                parts.push((component.to_string(), file, h));
            }
        }
        let te: Vec<&str> = parts
            .iter()
            .filter(|(n, _, _)| n.starts_with("text_encoder"))
            .map(|(n, _, _)| n.as_str())
            .collect();
        let expected: &[&str] = match c.family {
            ModelFamily::Sd15 | ModelFamily::Sd2 => &["text_encoder"],
            ModelFamily::Sdxl => &["text_encoder", "text_encoder_2"],
            ModelFamily::SdxlRefiner => &["text_encoder_2"],
        };
        if !te.is_empty() && te != expected {
            return Err(inconsistent(
                dir,
                format!(
                    "the UNet is {} but the text encoders are {te:?} (expected {expected:?})",
                    c.family
                ),
            ));
        }
        // SD2 and SD1 share the text-encoder folder name; their widths tell them apart.
        if let Some((_, _, h)) = parts.iter().find(|(n, _, _)| n == "text_encoder") {
            let width = h
                .shape("text_model.final_layer_norm.weight")
                .and_then(|s| s.first().copied());
            let expected_width = match c.family {
                ModelFamily::Sd2 => 1024,
                _ => 768,
            };
            if let Some(width) = width.filter(|w| *w != expected_width) {
                return Err(inconsistent(
                    dir,
                    format!("the UNet is {} but text_encoder is {width} wide", c.family),
                ));
            }
        }
        c.kind = ModelKind::Checkpoint;
        c.layout = Layout::Diffusers;
        let mut components = vec!["unet".to_string()];
        components.extend(parts.iter().map(|(n, _, _)| n.clone()));
        let mut headers: Vec<(&Header, &Path)> = vec![(&unet, unet_file.as_path())];
        headers.extend(parts.iter().map(|(_, p, h)| (h, p.as_path())));
        return Ok(finish(dir, &headers, c, components));
    }
    if dir.join("config.json").is_file()
        && let Some(file) = component_file(dir)
    {
        let h = header(&file)?;
        let c = classify(&file, &h)?;
        let components = c.components.clone();
        return Ok(finish(dir, &[(&h, file.as_path())], c, components));
    }
    let files = safetensors_in(dir);
    match files.as_slice() {
        [single] => {
            let mut inspection = inspect_file(single)?;
            inspection.path = dir.to_path_buf();
            Ok(inspection)
        }
        _ => {
            let entries: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .take(8)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let found = if files.len() > 1 {
                format!("{} .safetensors files, name one with MODEL", files.len())
            } else if entries.is_empty() {
                "an empty folder".to_string()
            } else {
                entries.join(", ")
            };
            Err(DetectError::NoModelInDir {
                path: dir.to_path_buf(),
                found,
            })
        }
    }
}

mod rknn;
pub mod upscaler;

use rknn::inspect_rknn_dir;
pub use rknn::{RKNN_COMPONENTS, RKNN_MODEL_FILE};

#[cfg(test)]
mod tests;
