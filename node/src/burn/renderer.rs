//! [`BurnRenderer`]: the cpu/cuda [`Renderer`]. It owns one loaded [`Pipeline`], merges the LoRAs
//! a job asks for (the weights reload when the set changes) and runs the LCM pipeline with the
//! worker's step callback.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ::burn::tensor::backend::Backend;
use actix::Addr;
use drover_shared::detect::{Inspection, Layout};

use super::pipeline::{LoraSpec, ModelSource, Pipeline, Precision};
use crate::error::{NodeError, Result};
use crate::render::{Image, Lora, Params, Renderer, Worker};

/// One loaded pipeline on one device, for one worker.
pub struct BurnRenderer<B: Backend> {
    pipeline: Box<Pipeline<B>>,
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

/// Loads `count` pipelines (one per worker) on `device` in `precision`, failing with the
/// loader's message.
pub fn load_pipelines<B: Backend>(
    model: &Inspection,
    device: &B::Device,
    precision: Precision,
    count: usize,
) -> Result<Vec<Pipeline<B>>> {
    let source = model_source(model);
    (0..count)
        .map(|_| Pipeline::load(source.clone(), device, precision, &[]))
        .collect()
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

/// Starts one worker per pipeline in a `SyncArbiter` (`backend` is `cpu` or `cuda`); LoRAs are
/// looked up under `lora_root`, those named in `lcm_loras` are LCM-LoRAs.
pub fn start_pool<B: Backend>(
    pipelines: Vec<Pipeline<B>>,
    backend: &'static str,
    model_id: &str,
    lora_root: Option<PathBuf>,
    lcm_loras: BTreeSet<String>,
) -> Addr<Worker<BurnRenderer<B>>> {
    let n = pipelines.len();
    let pool = Mutex::new(pipelines);
    let lcm_loras = Arc::new(lcm_loras);
    Worker::start(n, model_id, move |_| {
        let pipeline = pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("one pipeline was loaded per worker thread");
        BurnRenderer::new(pipeline, backend, lora_root.clone()).with_lcm_loras(lcm_loras.clone())
    })
}

impl<B: Backend> BurnRenderer<B> {
    /// A renderer around a loaded pipeline.
    pub fn new(pipeline: Pipeline<B>, backend: &'static str, lora_root: Option<PathBuf>) -> Self {
        Self {
            pipeline: Box::new(pipeline),
            backend,
            lora_root,
            lcm_loras: Arc::default(),
        }
    }

    /// The same, with the names of the LCM-LoRAs under its `lora_root`.
    pub fn with_lcm_loras(mut self, names: Arc<BTreeSet<String>>) -> Self {
        self.lcm_loras = names;
        self
    }

    /// Checks a job's sampler, steps and model kind before any LoRA is loaded, then merges the
    /// LoRAs it asks for (a no-op when they are merged already).
    fn prepare(&mut self, params: &Params) -> Result<()> {
        let loras = self.lora_files(&params.loras)?;
        self.pipeline.plan_with(
            params.sampler,
            params.schedule,
            params.steps,
            loras.iter().any(|l| l.lcm),
        )?;
        let started = std::time::Instant::now();
        let layers = self.pipeline.set_loras(&loras).map_err(|e| match e {
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
        Ok(())
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
        self.prepare(params)?;
        self.pipeline.generate(params, step)
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
        // One key: the first job's LoRAs are every job's.
        self.prepare(first)?;
        self.pipeline.generate_batch_live(jobs, step, live)
    }
}
