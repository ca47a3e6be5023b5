//! [`BurnRenderer`]: the cpu/cuda [`Renderer`]. It checks out a copy of the job's model from its
//! device's [`ModelPool`] (loaded on demand under the node's memory budget), switches the LoRAs
//! the job asks for in place, and runs the pipeline with the worker's step callback.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::burn::tensor::backend::Backend;
use actix::Addr;
use drover_shared::detect::{Inspection, Layout};

use super::pipeline::{LoraSpec, ModelSource, Pipeline, Precision};
use crate::error::{NodeError, Result};
use crate::render::{Image, Lora, Params, Renderer, Worker};
use crate::residency::{Lease, Ledger, Models};

/// One worker's renderer: it checks out a copy of each job's model from its device's
/// [`ModelPool`].
pub struct BurnRenderer<B: Backend> {
    pool: Arc<ModelPool<B>>,
    backend: &'static str,
    lora_root: Option<PathBuf>,
    lcm_loras: Arc<BTreeSet<String>>,
}

/// Where the detected model's parts are read from.
pub fn model_source(model: &Inspection) -> ModelSource {
    if model.path.is_dir() || model.layout == Layout::Diffusers {
        let dir = if model.path.is_dir() {
            model.path.clone()
        } else {
            model
                .path
                .parent()
                .and_then(Path::parent)
                .map_or_else(|| model.path.clone(), Path::to_path_buf)
        };
        ModelSource::Diffusers(dir)
    } else {
        ModelSource::SingleFile {
            path: model.path.clone(),
            family: model.family,
        }
    }
}

/// Renders one throw-away one-step image at `width`×`height` so that every kernel the size needs
/// is compiled (and, on GPUs, written to the kernel cache) before the node takes jobs; answers
/// how long it took.
pub fn warm_up<B: Backend>(
    pipeline: &Pipeline<B>,
    (width, height): (usize, usize),
) -> Result<std::time::Duration> {
    let started = std::time::Instant::now();
    let params = Params {
        model: String::new(),
        prompt: "warm-up".into(),
        negative_prompt: String::new(),
        width,
        height,
        steps: 1,
        guidance: 1.0,
        guidance_rescale: 0.0,
        sampler: None,
        schedule: crate::sampling::SigmaSchedule::Automatic,
        seed: 0,
        loras: Vec::new(),
        source: None,
    };
    pipeline.generate(&params, |_, _| std::ops::ControlFlow::Continue(()))?;
    Ok(started.elapsed())
}

/// A model a [`ModelPool`] can load.
#[derive(Clone, Debug)]
pub struct PoolModel {
    /// Its id (as jobs name it).
    pub id: String,
    /// Its name (for messages).
    pub name: String,
    /// Where its parts are read from.
    pub source: ModelSource,
}

/// The catalogued models of one device, loaded on demand under `ledger`'s budget, shared by
/// the device's workers: copies are loaded on `device` in `precision` (base weights;
/// `prediction` overrides every model's scheduler config).
pub type ModelPool<B> = Models<Pipeline<B>>;

/// A [`ModelPool`] of `models` (the default first) on `device`, nothing loaded.
pub fn model_pool<B: Backend>(
    models: Vec<PoolModel>,
    device: B::Device,
    precision: Precision,
    prediction: Option<String>,
    ledger: Ledger,
) -> ModelPool<B> {
    let ids = models.iter().map(|m| m.id.clone()).collect();
    Models::new(ids, ledger, move |index| {
        let mut pipeline = Pipeline::load(models[index].source.clone(), &device, precision, &[])?;
        if let Some(prediction) = &prediction {
            pipeline.set_prediction(prediction)?;
        }
        Ok(pipeline)
    })
}

/// Starts `workers` workers in a `SyncArbiter` (`backend` is `cpu` or `cuda`), worker i on
/// `pools[i % pools.len()]` (one pool per device); LoRAs are looked up under `lora_root`, those
/// named in `lcm_loras` are LCM-LoRAs.
pub fn start_pool<B: Backend>(
    pools: Vec<Arc<ModelPool<B>>>,
    workers: usize,
    backend: &'static str,
    default_model: &str,
    lora_root: Option<PathBuf>,
    lcm_loras: BTreeSet<String>,
) -> Addr<Worker<BurnRenderer<B>>> {
    let lcm_loras = Arc::new(lcm_loras);
    Worker::start(workers, default_model, move |i| BurnRenderer {
        pool: pools[i % pools.len()].clone(),
        backend,
        lora_root: lora_root.clone(),
        lcm_loras: lcm_loras.clone(),
    })
}

impl<B: Backend> BurnRenderer<B> {
    /// Checks a job's model, sampler, steps and model kind before any LoRA is loaded, then
    /// merges the LoRAs it asks for on a copy of its model (a no-op when they are merged
    /// already).
    fn prepare(&self, params: &Params) -> Result<Lease<'_, Pipeline<B>>> {
        let index = self.pool.index_of(&params.model)?;
        let loras = self.lora_files(&params.loras)?;
        let mut pipeline = self.pool.check_out(index, |p| p.loras() == loras)?;
        pipeline.plan_with(
            params.sampler,
            params.schedule,
            params.steps,
            loras.iter().any(|l| l.lcm),
        )?;
        let started = std::time::Instant::now();
        let layers = pipeline.set_loras(&loras).map_err(|e| match e {
            NodeError::Lora(m) => NodeError::InvalidJob(format!("lora {m}")),
            other => other,
        })?;
        if layers > 0 {
            tracing::debug!(
                layers,
                ms = started.elapsed().as_millis() as u64,
                loras = loras.len(),
                "loras switched in place"
            );
        }
        Ok(pipeline)
    }

    /// The files of the LoRAs a job asks for; a LoRA this node does not have refuses the job.
    fn lora_files(&self, loras: &[Lora]) -> Result<Vec<LoraSpec>> {
        loras
            .iter()
            .map(|l| {
                let root = self.lora_root.as_ref().ok_or_else(|| {
                    NodeError::InvalidJob(format!(
                        "lora {} requested but this node has no LORA_ROOT",
                        l.name
                    ))
                })?;
                let path = root.join(format!("{}.safetensors", l.name));
                if !path.is_file() {
                    return Err(NodeError::InvalidJob(format!(
                        "lora {} is not under {}",
                        l.name,
                        root.display()
                    )));
                }
                Ok(LoraSpec {
                    name: l.name.clone(),
                    path,
                    strength: l.strength,
                    lcm: self.lcm_loras.contains(&l.name),
                })
            })
            .collect()
    }
}

impl<B: Backend> Renderer for BurnRenderer<B> {
    fn backend(&self) -> &'static str {
        self.backend
    }

    fn render(
        &mut self,
        params: &Params,
        step: impl FnMut(usize, usize) -> std::ops::ControlFlow<()>,
    ) -> Result<Image> {
        self.prepare(params)?.generate(params, step)
    }

    fn render_batch(
        &mut self,
        jobs: &[Params],
        step: impl FnMut(usize, usize) -> std::ops::ControlFlow<()>,
        live: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Image>>> {
        let Some(first) = jobs.first() else {
            return Ok(Vec::new());
        };
        // One key: the first job's model and LoRAs are every job's.
        self.prepare(first)?.generate_batch_live(jobs, step, live)
    }
}
