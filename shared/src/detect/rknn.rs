//! RKNN model folders: three compiled components, identified by their files and configs.

use super::*;

/// The model file of each component folder of an RKNN model folder.
pub const RKNN_MODEL_FILE: &str = "model.rknn";

/// The component folders an RKNN text-to-image model folder must hold.
pub const RKNN_COMPONENTS: [&str; 3] = ["text_encoder", "unet", "vae_decoder"];

/// Bytes of each `.rknn` file hashed into the model id (the files hold weights after their
/// header; hashing a prefix and the length identifies them without reading gigabytes).
const RKNN_ID_PREFIX: usize = 64 * 1024;

/// An RKNN model folder: the family comes from the UNet's diffusers `config.json`
/// (`cross_attention_dim`), cross-checked against the text encoder's `hidden_size` when its
/// config says. The NPU runtime checks the `.rknn` files themselves when it loads them.
pub(super) fn inspect_rknn_dir(dir: &Path) -> Result<Inspection, DetectError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let missing: Vec<String> = RKNN_COMPONENTS
        .iter()
        .map(|c| format!("{c}/{RKNN_MODEL_FILE}"))
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(unrecognised(
            dir,
            &format!("an RKNN model folder needs {}", missing.join(", ")),
        ));
    }
    let config = |component: &str| -> Result<serde_json::Value, DetectError> {
        let path = dir.join(component).join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            unrecognised(
                dir,
                &format!(
                    "{component}/config.json: {e} (the family of an .rknn model is read from the diffusers config beside it)"
                ),
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| unrecognised(dir, &format!("{component}/config.json: {e}")))
    };
    let unet = config("unet")?;
    let dim = unet
        .get("cross_attention_dim")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| unrecognised(dir, "unet/config.json has no cross_attention_dim"))?;
    let family = u32::try_from(dim)
        .ok()
        .and_then(ModelFamily::from_cross_attention_dim)
        .ok_or_else(|| {
            unrecognised(
                dir,
                &format!("unet/config.json: cross_attention_dim {dim} is no known family"),
            )
        })?;
    if let Some(width) = config("text_encoder")
        .ok()
        .and_then(|c| c.get("hidden_size").and_then(serde_json::Value::as_u64))
        && width != dim
        && family != ModelFamily::Sdxl
    {
        return Err(inconsistent(
            dir,
            format!("the UNet attends to {dim}-wide text but the text encoder is {width} wide"),
        ));
    }
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    let mut bytes = 0u64;
    for component in RKNN_COMPONENTS {
        let path = dir.join(component).join(RKNN_MODEL_FILE);
        let len = std::fs::metadata(&path)
            .map_err(|_| DetectError::Missing(path.clone()))?
            .len();
        let mut prefix = Vec::with_capacity(RKNN_ID_PREFIX);
        std::fs::File::open(&path)
            .and_then(|f| f.take(RKNN_ID_PREFIX as u64).read_to_end(&mut prefix))
            .map_err(|e| unrecognised(dir, &format!("{}: {e}", path.display())))?;
        hasher.update(component.as_bytes());
        hasher.update(len.to_le_bytes());
        hasher.update(&prefix);
        bytes += len;
        files.push(path);
    }
    let model_id: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Inspection {
        path: dir.to_path_buf(),
        family,
        kind: ModelKind::Checkpoint,
        cross_attention_dim: family.cross_attention_dim(),
        layout: Layout::Rknn,
        dtype: None,
        parameters: 0,
        weights_bytes: bytes,
        estimated_memory_bytes: bytes + bytes / 5,
        model_id,
        components: RKNN_COMPONENTS.iter().map(|c| c.to_string()).collect(),
        lora_rank: None,
        lcm_lora: false,
        inpainting: false,
        files,
    })
}
