//! The worker factory: decides, at start-up, which workers this node runs and what it advertises.
//!
//! It identifies the model from its headers (never loading weights to find out), picks the backend
//! (`BACKEND=auto`: rknn for an RKNN model folder, else cuda if a CUDA driver is present, else
//! cpu; never the simulation), scans `LORA_ROOT` and keeps only the LoRAs made for the model's family
//! (logging every one it skips, with the reason), then loads the pipeline once per worker and
//! starts `NUM_WORKERS` [`Worker`] actors in a `SyncArbiter`, each around one renderer: Burn on
//! the CPU (`cpu`), Burn CUDA (`cuda`, with the `cuda` feature), the RK3588 NPU (`rknn`, with the
//! `rknn` feature: worker i on `NPU_CORE_{i % 3}`) or the simulation (`sim`). The session sees
//! only the pool's `Recipient<RunJob>`, whatever the backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::burn::tensor::DType;
use actix::Recipient;
use drover_shared::detect::{Inspection, Layout, ModelKind, inspect};
use drover_shared::family::ModelFamily;

use crate::burn::pipeline::Precision;
use crate::catalog::{ModelCaps, ModelControl, ResidencyProbe};
use crate::config::{BackendKind, NodeConfig, PrecisionKind};
use crate::error::{NodeError, Result};
use crate::render::{RunBatch, Worker};
use crate::sampling::Sampler;
use crate::sim::SimRenderer;
use crate::upscaling::{self, PostProcess, UpscalerEntry};

mod cuda;
mod sim;

use cuda::build_cuda;
use sim::build_sim;

/// What the node tells the coordinator it can do.
#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    /// Backend that runs the workers.
    pub backend: BackendKind,
    /// Model family served.
    pub family: ModelFamily,
    /// Stable id of the loaded model.
    pub model_id: String,
    /// Number of worker actors.
    pub workers: u32,
    /// Largest width*height accepted.
    pub max_pixels: u64,
    /// LoRAs available, with their base families.
    pub loras: Vec<LoraEntry>,
    /// Expected speed in pixel-steps per second (0 when unknown).
    pub pixel_steps_per_second: f64,
    /// The only sizes (width, height) served, for models with fixed shapes; empty: any size up
    /// to `max_pixels`.
    pub sizes: Vec<(u32, u32)>,
    /// Samplers the workers run, the default for jobs that name none first.
    pub samplers: Vec<Sampler>,
    /// Whether jobs may start from a source image (the model's VAE has an encoder).
    pub img2img: bool,
    /// Whether jobs may carry an inpainting mask.
    pub inpaint: bool,
    /// Super-resolution networks run after generation (`UPSCALER`).
    pub upscalers: Vec<UpscalerEntry>,
    /// Most jobs one worker renders in one batch (`MAX_BATCH`; 1: one at a time).
    pub max_batch: u32,
    /// Every model served, the default (the one the fields above describe) first.
    pub models: Vec<ModelCaps>,
    /// Bytes resident models may take (`NODE_MEMORY_BUDGET`, per device on cuda); 0: no budget.
    pub memory_budget: u64,
}

/// A LoRA under `LORA_ROOT` the node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraEntry {
    /// Name (the file's stem).
    pub name: String,
    /// The family it was made for.
    pub family: ModelFamily,
    /// An LCM-LoRA (named so, or listed in `LCM_LORAS`): with it a standard model runs `lcm`.
    pub lcm: bool,
}

/// The workers of a node and what they can do.
pub struct WorkerPool {
    /// Sends a batch of jobs (or one) to the next free worker.
    pub batches: Recipient<RunBatch>,
    /// What the workers can do.
    pub capabilities: Capabilities,
    /// The upscalers jobs' `upscale` runs on (shared by every worker); `None` without any.
    pub post: Option<Arc<dyn PostProcess>>,
    /// The models' residency now (Burn backends); `None`: every model always resident.
    pub residency: Option<Arc<dyn ResidencyProbe>>,
    /// Orders about the models (Burn backends); `None`: nothing to order.
    pub control: Option<Arc<dyn ModelControl>>,
}

/// Largest image accepted for `family`: four times the family's native area.
pub fn default_max_pixels(family: ModelFamily) -> u64 {
    let (w, h) = family.default_size();
    4 * u64::from(w) * u64::from(h)
}

/// Creates the node's workers and loads its upscalers. Must run inside an actix system.
pub fn build(config: &NodeConfig) -> Result<WorkerPool> {
    let mut upscalers = upscaling::configured(config)?;
    let mut pool = build_workers(config)?;
    pool.post = upscaling::load(
        config,
        &mut upscalers,
        pool.capabilities.backend == BackendKind::Cuda,
    )?;
    pool.capabilities.upscalers = upscalers;
    Ok(pool)
}

fn build_workers(config: &NodeConfig) -> Result<WorkerPool> {
    if config.backend == BackendKind::Sim {
        return build_sim(config);
    }
    if !config.has_models() {
        return Err(NodeError::Config(
            "no model configured: set MODEL_ROOT and MODEL (or BACKEND=sim for a simulated node)"
                .into(),
        ));
    }
    let mut entries = crate::catalog::discover(config)?;
    let model = entries[0].model.clone();
    let path = model.path.clone();
    let rknn_model = model.layout == Layout::Rknn;
    let backend = match config.backend {
        BackendKind::Auto if rknn_model => BackendKind::Rknn,
        BackendKind::Auto => auto_backend(),
        explicit => explicit,
    };
    if rknn_model != (backend == BackendKind::Rknn) {
        return Err(NodeError::Config(if rknn_model {
            format!(
                "{} is an RKNN model folder: it runs only with BACKEND=rknn (or auto)",
                path.display()
            )
        } else {
            format!(
                "BACKEND=rknn needs an RKNN model folder (text_encoder/, unet/ and vae_decoder/ \
                 each with model.rknn and its config.json), but {} is {}",
                path.display(),
                model_description(&model)
            )
        }));
    }
    // Every entry must be a base model this drover-node runs; one found by MODELS=* that is
    // not is skipped, one the operator named stops the start.
    let mut refused = None;
    entries.retain(|e| {
        let runs = matches!(
            e.model.family,
            ModelFamily::Sd15 | ModelFamily::Sd2 | ModelFamily::Sdxl
        ) && (e.model.layout == Layout::Rknn) == rknn_model;
        if !runs {
            if e.explicit {
                refused.get_or_insert_with(|| (e.model.path.clone(), e.model.family));
            } else {
                tracing::info!(model = %e.name, family = %e.model.family, backend = backend.as_str(), "catalogue entry skipped: this backend does not run it");
            }
        }
        runs
    });
    if let Some((path, family)) = refused {
        return Err(NodeError::Backend {
            backend: backend.as_str(),
            message: format!(
                "model {} is {family}: this drover-node runs SD1.x, SD2.x and SDXL base models",
                path.display(),
            ),
        });
    }
    for e in &entries {
        tracing::info!(model = %e.name, path = %e.model.path.display(), family = %e.model.family, kind = ?e.model.kind, backend = backend.as_str(), pinned = e.pinned, "model detected");
    }
    let mut families: Vec<ModelFamily> = Vec::new();
    for e in &entries {
        if !families.contains(&e.model.family) {
            families.push(e.model.family);
        }
    }
    let loras = match &config.lora_root {
        Some(root) => scan_loras(root, &families, &config.lcm_loras)?,
        None => Vec::new(),
    };
    match backend {
        BackendKind::Cpu => {
            let workers = config.num_workers.unwrap_or(1);
            if !(1..=8).contains(&workers) {
                return Err(NodeError::Config(format!(
                    "NUM_WORKERS={workers}: a cpu node runs 1..=8 workers (each job uses a full copy of its model)"
                )));
            }
            let budget = config
                .memory_budget
                .or_else(|| crate::residency::host_memory().map(|m| m / 4 * 3))
                .unwrap_or(u64::MAX);
            let started = std::time::Instant::now();
            let (models_pool, models) = crate::catalog::load_pool::<crate::burn::Cpu>(
                &mut entries,
                &Default::default(),
                precision(config, PrecisionKind::F32),
                config,
                budget,
                |f| max_pixels(config, f),
            )?;
            let (used, _) = models_pool.usage();
            tracing::info!(
                workers,
                models = models.len(),
                resident_bytes = used,
                budget,
                ms = started.elapsed().as_millis() as u64,
                "cpu models checked"
            );
            let pools = vec![models_pool];
            let addr = crate::burn::renderer::start_pool(
                pools.clone(),
                workers as usize,
                "cpu",
                &models[0].id,
                config.lora_root.clone(),
                lcm_names(&loras),
            );
            let mut pool = pool(
                config,
                BackendKind::Cpu,
                workers,
                loras,
                models,
                addr.recipient(),
            );
            pool.capabilities.memory_budget = budget;
            let pools = Arc::new(pools);
            pool.residency = Some(pools.clone());
            pool.control = Some(pools);
            Ok(pool)
        }
        BackendKind::Cuda => build_cuda(config, entries, loras),
        BackendKind::Rknn => build_rknn(config, &model, loras),
        other => Err(NodeError::Config(format!(
            "BACKEND={} cannot run model {}",
            other.as_str(),
            path.display()
        ))),
    }
}

fn model_description(model: &Inspection) -> String {
    format!(
        "{} {:?} ({:?} layout)",
        model.family, model.kind, model.layout
    )
}

#[cfg(feature = "rknn")]
fn build_rknn(
    config: &NodeConfig,
    model: &Inspection,
    loras: Vec<LoraEntry>,
) -> Result<WorkerPool> {
    if !matches!(model.family, ModelFamily::Sd15 | ModelFamily::Sd2) {
        return Err(NodeError::Backend {
            backend: "rknn",
            message: format!(
                "the rknn pipeline runs SD1.x and SD2.x models; {} is {}",
                model.path.display(),
                model.family
            ),
        });
    }
    let api = crate::rknn::ffi::RknnLibrary::open(config.rknn_library.as_deref())?;
    start_rknn(api, config, model, loras)
}

/// Starts the rknn workers on a loaded runtime (the real library, or a fake in tests).
#[cfg(feature = "rknn")]
pub fn start_rknn(
    api: std::sync::Arc<dyn crate::rknn::api::RknnApi>,
    config: &NodeConfig,
    model: &Inspection,
    loras: Vec<LoraEntry>,
) -> Result<WorkerPool> {
    if !loras.is_empty() {
        tracing::warn!(
            count = loras.len(),
            "rknn models are compiled with their weights: the loras under LORA_ROOT are not advertised"
        );
    }
    let workers = config.num_workers.unwrap_or(3);
    let started = std::time::Instant::now();
    let rknn = crate::rknn::start_workers(api, model.path.clone(), &model.model_id, workers)?;
    tracing::info!(
        workers,
        ms = started.elapsed().as_millis() as u64,
        sizes = ?rknn.sizes,
        pixel_steps_per_second = rknn.pixel_steps_per_second,
        "rknn workers started"
    );
    let largest = rknn
        .sizes
        .iter()
        .map(|&(w, h)| u64::from(w) * u64::from(h))
        .max()
        .unwrap_or(0);
    let name = model
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut caps = model_caps(config, &name, model);
    caps.max_pixels = config.max_pixels.unwrap_or(largest).min(largest);
    caps.sizes = rknn.sizes;
    caps.samplers = rknn.samplers;
    caps.img2img = rknn.img2img;
    caps.inpaint = rknn.img2img;
    let mut pool = pool(
        config,
        BackendKind::Rknn,
        workers,
        Vec::new(),
        vec![caps],
        rknn.addr.recipient(),
    );
    pool.capabilities.pixel_steps_per_second = rknn.pixel_steps_per_second;
    if config.max_batch > 1 {
        tracing::warn!(
            max_batch = config.max_batch,
            "rknn models are compiled for batch 1: MAX_BATCH is ignored"
        );
    }
    pool.capabilities.max_batch = 1;
    Ok(pool)
}

#[cfg(not(feature = "rknn"))]
fn build_rknn(
    _config: &NodeConfig,
    _model: &Inspection,
    _loras: Vec<LoraEntry>,
) -> Result<WorkerPool> {
    Err(NodeError::Backend {
        backend: "rknn",
        message: "this drover-node was built without the `rknn` feature; rebuild with \
                  `cargo build --release -p drover-node --features rknn`"
            .into(),
    })
}

/// `MAX_PIXELS`, else four times `family`'s native area.
fn max_pixels(config: &NodeConfig, family: ModelFamily) -> u64 {
    config
        .max_pixels
        .unwrap_or_else(|| default_max_pixels(family))
}

/// What one model of `model`'s inspection serves before anything is known from loading it
/// (an RKNN folder, whose workers then say the rest):
/// its family's pixel limit, any size, LCM only.
#[cfg(feature = "rknn")]
fn model_caps(config: &NodeConfig, name: &str, model: &Inspection) -> ModelCaps {
    ModelCaps {
        id: model.model_id.clone(),
        name: name.to_string(),
        family: model.family,
        cross_attention_dim: model.cross_attention_dim,
        max_pixels: max_pixels(config, model.family),
        sizes: Vec::new(),
        samplers: vec![Sampler::Lcm],
        img2img: false,
        inpaint: false,
        bytes: model.estimated_memory_bytes,
        pinned: false,
    }
}

/// The pool of `workers` workers behind `batches` serving `models` (the default first, which
/// the node-wide fields describe).
fn pool(
    config: &NodeConfig,
    backend: BackendKind,
    workers: u32,
    loras: Vec<LoraEntry>,
    models: Vec<ModelCaps>,
    batches: Recipient<RunBatch>,
) -> WorkerPool {
    let default = models[0].clone();
    WorkerPool {
        batches,
        capabilities: Capabilities {
            backend,
            family: default.family,
            model_id: default.id,
            workers,
            max_pixels: default.max_pixels,
            loras,
            pixel_steps_per_second: 0.0,
            sizes: default.sizes,
            samplers: default.samplers,
            img2img: default.img2img,
            inpaint: default.inpaint,
            upscalers: Vec::new(),
            max_batch: config.max_batch,
            models,
            memory_budget: 0,
        },
        post: None,
        residency: None,
        control: None,
    }
}

/// The dtypes of a Burn pipeline: `PRECISION`, else `default`.
fn precision(config: &NodeConfig, default: PrecisionKind) -> Precision {
    match config.precision.unwrap_or(default) {
        PrecisionKind::F32 => Precision::F32,
        PrecisionKind::F16 => Precision::half(DType::F16),
        PrecisionKind::Bf16 => Precision::half(DType::BF16),
    }
}

/// Identifies the model and refuses what a text-to-image node cannot serve.
pub fn detect_model(path: &Path) -> Result<Inspection> {
    let model = inspect(path)?;
    if model.kind == ModelKind::Lora {
        return Err(NodeError::Config(format!(
            "{} is a LoRA for {}, not a base model; put it under LORA_ROOT",
            path.display(),
            model.family
        )));
    }
    if !model.family.is_text_to_image() {
        return Err(NodeError::Config(format!(
            "{} is an SDXL refiner (cross-attention 1280): it refines images, it is not a text-to-image base model",
            path.display()
        )));
    }
    Ok(model)
}

/// `BACKEND=auto` for a safetensors model: cuda if a CUDA driver library is installed, else cpu
/// (RKNN model folders always get rknn).
fn auto_backend() -> BackendKind {
    if cfg!(feature = "cuda") && cuda_driver_present() {
        BackendKind::Cuda
    } else {
        BackendKind::Cpu
    }
}

fn cuda_driver_present() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/lib/wsl/lib",
    ]
    .iter()
    .any(|dir| Path::new(dir).join("libcuda.so.1").exists())
}

/// The names of the LCM-LoRAs among `loras`.
fn lcm_names(loras: &[LoraEntry]) -> std::collections::BTreeSet<String> {
    loras
        .iter()
        .filter(|l| l.lcm)
        .map(|l| l.name.clone())
        .collect()
}

/// The LoRAs under `root` made for `family`, by name; every other file is logged with the reason
/// it was skipped. LoRAs named in `lcm` are LCM-LoRAs whatever their names say; a name there
/// that is not served is a start-up error.
pub fn scan_loras(root: &Path, families: &[ModelFamily], lcm: &[String]) -> Result<Vec<LoraEntry>> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| NodeError::Config(format!("LORA_ROOT {}: {e}", root.display())))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut loras = Vec::new();
    for path in files {
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        match inspect(&path) {
            Ok(found) if found.kind != ModelKind::Lora => {
                tracing::warn!(lora = %name, kind = ?found.kind, "lora skipped: the file is not a lora");
            }
            Ok(found) if !families.contains(&found.family) => {
                tracing::info!(lora = %name, lora_family = %found.family, node_families = ?families, "lora skipped: made for a family none of the node's models is");
            }
            Ok(found) => {
                let lcm = found.lcm_lora || lcm.contains(&name);
                tracing::info!(lora = %name, family = %found.family, rank = found.lora_rank, lcm, "lora available");
                loras.push(LoraEntry {
                    name,
                    family: found.family,
                    lcm,
                });
            }
            Err(e) => tracing::warn!(lora = %name, error = %e, "lora skipped: unreadable"),
        }
    }
    if let Some(missing) = lcm
        .iter()
        .find(|n| !n.is_empty() && !loras.iter().any(|l| &&l.name == n))
    {
        return Err(NodeError::Config(format!(
            "LCM_LORAS names `{missing}`, which is not a lora of the node's families ({families:?}) under LORA_ROOT {}",
            root.display()
        )));
    }
    Ok(loras)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::arch::{self, LoraStyle};
    use drover_shared::safetensors::{Dtype, build::write_model};

    #[test]
    fn only_loras_of_the_node_family_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, tensors: Vec<arch::Tensor>| {
            write_model(
                &dir.path().join(format!("{name}.safetensors")),
                &tensors,
                Dtype::F16,
            )
            .unwrap()
        };
        put(
            "ink",
            arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 8, true),
        );
        put(
            "pixels",
            arch::lora(ModelFamily::Sd15, LoraStyle::Peft, 4, false),
        );
        put(
            "xl-ink",
            arch::lora(ModelFamily::Sdxl, LoraStyle::Kohya, 8, true),
        );
        put("vae", arch::ldm_vae());
        std::fs::write(dir.path().join("broken.safetensors"), b"nope").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not a lora").unwrap();
        put(
            "lcm-lora-sdv1-5",
            arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 4, false),
        );
        let entry = |name: &str, family, lcm| LoraEntry {
            name: name.to_string(),
            family,
            lcm,
        };
        let sd15 = scan_loras(dir.path(), &[ModelFamily::Sd15], &[]).unwrap();
        assert_eq!(
            sd15,
            vec![
                entry("ink", ModelFamily::Sd15, false),
                entry("lcm-lora-sdv1-5", ModelFamily::Sd15, true),
                entry("pixels", ModelFamily::Sd15, false),
            ]
        );
        // LCM_LORAS marks a LoRA whose name does not say so; a name not served is refused.
        let marked = scan_loras(dir.path(), &[ModelFamily::Sd15], &["pixels".into()]).unwrap();
        assert!(marked.iter().all(|l| l.lcm == (l.name != "ink")));
        let err = scan_loras(dir.path(), &[ModelFamily::Sd15], &["xl-ink".into()]).unwrap_err();
        assert!(
            err.to_string().contains("LCM_LORAS names `xl-ink`"),
            "{err}"
        );
        let sdxl = scan_loras(dir.path(), &[ModelFamily::Sdxl], &[]).unwrap();
        assert_eq!(sdxl, vec![entry("xl-ink", ModelFamily::Sdxl, false)]);
        assert!(scan_loras(&dir.path().join("missing"), &[ModelFamily::Sd15], &[]).is_err());
    }

    #[test]
    fn refiners_and_loras_are_not_base_models() {
        let dir = tempfile::tempdir().unwrap();
        let refiner = dir.path().join("refiner.safetensors");
        write_model(
            &refiner,
            &arch::ldm_checkpoint(ModelFamily::SdxlRefiner),
            Dtype::F16,
        )
        .unwrap();
        let err = detect_model(&refiner).unwrap_err().to_string();
        assert!(
            err.contains("refiner") && err.contains("not a text-to-image base"),
            "{err}"
        );
        let lora = dir.path().join("lora.safetensors");
        write_model(
            &lora,
            &arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 4, false),
            Dtype::F16,
        )
        .unwrap();
        assert!(
            detect_model(&lora)
                .unwrap_err()
                .to_string()
                .contains("LORA_ROOT")
        );
        let base = dir.path().join("base.safetensors");
        write_model(&base, &arch::ldm_checkpoint(ModelFamily::Sd15), Dtype::F16).unwrap();
        assert_eq!(detect_model(&base).unwrap().family, ModelFamily::Sd15);
    }
}
