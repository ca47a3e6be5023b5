//! The Burn worker actor: runs the SD1.x/SD2.x LCM pipeline ([`crate::sd`]) on the CPU (`flex`)
//! or, with the `cuda` feature, on an NVIDIA GPU. One pipeline per actor; LoRAs requested by a job
//! are merged before it runs (the weights reload when the set changes).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use actix::{Actor, Handler, SyncContext};
use burn::tensor::backend::Backend;
use drover_shared::detect::{Inspection, Layout};
use drover_shared::proto;

use crate::error::{NodeError, Result};
use crate::sd::pipeline::{Image, LoraSpec, ModelSource, Pipeline};
use crate::worker::{Rendered, RunJob, encode_png};

/// A worker actor owning one loaded pipeline.
pub struct BurnWorker<B: Backend> {
    pipeline: Box<Pipeline<B>>,
    backend: &'static str,
    model_id: String,
    lora_root: Option<PathBuf>,
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

/// Loads `count` pipelines (one per worker) on `device`, failing with the loader's message.
pub fn load_pipelines<B: Backend>(
    model: &Inspection,
    device: &B::Device,
    count: usize,
) -> Result<Vec<Pipeline<B>>> {
    let source = model_source(model);
    (0..count)
        .map(|_| Pipeline::load(source.clone(), device, &[]))
        .collect()
}

impl<B: Backend> BurnWorker<B> {
    /// A worker around a loaded pipeline.
    pub fn new(
        pipeline: Pipeline<B>,
        backend: &'static str,
        model_id: String,
        lora_root: Option<PathBuf>,
    ) -> Self {
        Self {
            pipeline: Box::new(pipeline),
            backend,
            model_id,
            lora_root,
        }
    }

    /// Starts `pipelines.len()` workers in a `SyncArbiter`, one pipeline each.
    pub fn start_pool(
        pipelines: Vec<Pipeline<B>>,
        backend: &'static str,
        model_id: &str,
        lora_root: Option<PathBuf>,
    ) -> actix::Addr<Self> {
        let n = pipelines.len();
        let pool = Mutex::new(pipelines);
        let model_id = model_id.to_string();
        actix::SyncArbiter::start(n, move || {
            let pipeline = pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .expect("one pipeline was loaded per worker thread");
            Self::new(pipeline, backend, model_id.clone(), lora_root.clone())
        })
    }

    fn loras(&self, spec: &proto::JobSpec) -> Result<Vec<LoraSpec>> {
        spec.loras
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
                })
            })
            .collect()
    }

    fn render(&mut self, job: &RunJob) -> Result<Image> {
        let params = job.lcm_params()?;
        let loras = self.loras(&job.spec)?;
        self.pipeline.set_loras(&loras).map_err(|e| match e {
            NodeError::Lora(m) => NodeError::InvalidJob(format!("lora {m}")),
            other => other,
        })?;
        self.pipeline
            .generate(&params, |step, total| job.step_done(step, total))
    }
}

impl<B: Backend> Actor for BurnWorker<B> {
    type Context = SyncContext<Self>;
}

impl<B: Backend> Handler<RunJob> for BurnWorker<B> {
    type Result = Result<Rendered>;

    fn handle(&mut self, job: RunJob, _: &mut SyncContext<Self>) -> Self::Result {
        let _span = job.span.clone().entered();
        if job.cancel.is_cancelled() {
            return Err(NodeError::Cancelled);
        }
        let started = Instant::now();
        let image = self.render(&job)?;
        let elapsed = started.elapsed();
        if image.truncated_tokens > 0 {
            tracing::warn!(
                dropped = image.truncated_tokens,
                "prompt longer than 75 tokens truncated, as diffusers does"
            );
        }
        tracing::info!(
            backend = self.backend,
            width = image.width,
            height = image.height,
            steps = job.spec.steps,
            ms = elapsed.as_millis() as u64,
            "image rendered"
        );
        let png = encode_png(&image, &job.spec, &self.model_id, self.backend)?;
        Ok(Rendered { png, elapsed })
    }
}
