//! `drover-node inspect PATH [--json]`: prints what a model path is (a Stable Diffusion model
//! or LoRA, or a super-resolution upscaler).

use std::path::Path;

use drover_shared::detect::upscaler::{UpscalerSpec, inspect_upscaler};
use drover_shared::detect::{DetectError, Inspection, inspect};

/// Runs the tool; answers the text to print.
pub fn run(path: &Path, json: bool) -> Result<String, DetectError> {
    let found = match inspect(path) {
        Ok(found) => found,
        Err(e @ DetectError::Unrecognised { .. }) => {
            let Ok(upscaler) = inspect_upscaler(path) else {
                return Err(e);
            };
            return Ok(if json {
                serde_json::to_string_pretty(&upscaler).unwrap_or_default()
            } else {
                upscaler_table(&upscaler)
            });
        }
        Err(e) => return Err(e),
    };
    Ok(if json {
        serde_json::to_string_pretty(&found).unwrap_or_default()
    } else {
        table(&found)
    })
}

fn plain<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn human_count(n: u64, unit: &str) -> String {
    let n = n as f64;
    let (value, prefix) = if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        (n, "")
    };
    format!("{value:.2} {prefix}{unit}")
}

/// The human table.
pub fn table(found: &Inspection) -> String {
    let mut rows = vec![
        ("path", found.path.display().to_string()),
        ("family", found.family.to_string()),
        ("kind", plain(&found.kind)),
        ("layout", plain(&found.layout)),
        ("cross-attention dim", found.cross_attention_dim.to_string()),
        (
            "dtype",
            found
                .dtype
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("parameters", human_count(found.parameters, "")),
        ("weights", human_count(found.weights_bytes, "B")),
        (
            "estimated memory",
            human_count(found.estimated_memory_bytes, "B"),
        ),
        ("components", found.components.join(", ")),
        ("model id", found.model_id.clone()),
    ];
    if let Some(rank) = found.lora_rank {
        rows.push(("lora rank", rank.to_string()));
    }
    if found.inpainting {
        rows.push((
            "inpainting",
            "yes (9-channel UNet: latent, mask, masked image)".into(),
        ));
    }
    rows.iter().map(|(k, v)| format!("{k:<20} {v}\n")).collect()
}

/// The human table of an upscaler.
pub fn upscaler_table(found: &UpscalerSpec) -> String {
    let rows = [
        ("path", found.path.display().to_string()),
        ("kind", "upscaler (super-resolution)".to_string()),
        ("network", found.label()),
        ("scale", format!("×{}", found.scale)),
        (
            "dtype",
            found
                .dtype
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("parameters", human_count(found.parameters, "")),
        ("weights", human_count(found.weights_bytes, "B")),
        ("model id", found.model_id.clone()),
    ];
    rows.iter().map(|(k, v)| format!("{k:<20} {v}\n")).collect()
}
