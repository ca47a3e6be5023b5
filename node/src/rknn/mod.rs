//! RKNN NPU workers (Rockchip RK3588), feature `rknn`.
//!
//! - [`api`]: the FFI boundary, the C API as the [`api::RknnApi`] trait, and what status codes mean.
//! - [`ffi`]: that trait over `librknnrt.so`, loaded at run time (the only `unsafe` in Drover).
//! - [`model`]: the safe wrapper over one context (load, attributes, core mask, run on NCHW host
//!   tensors with the layout conversions the model's attributes ask for).
//! - [`pipeline`]: the SD1.x/SD2.x pipeline (LCM, or the standard samplers with CFG) over
//!   three contexts.
//! - [`RknnRenderer`] (the backend's [`Renderer`]) and [`start_workers`]: `NUM_WORKERS` worker
//!   actors, worker i on `NPU_CORE_{i % 3}`, each loading its own contexts on its own thread
//!   (contexts never cross threads).
//!
//! The tests run all of it against a fake runtime behind the same trait (`fake`), and the FFI
//! marshalling against a C library with the runtime's ABI that they build (`c_abi_tests`).

pub mod api;
pub mod ffi;
pub mod model;
pub mod pipeline;
pub mod upscale;

#[cfg(test)]
mod c_abi_tests;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;

use api::{CoreMask, RknnApi};
use pipeline::RknnPipeline;

use crate::error::{NodeError, Result};
use crate::render::{Image, Params, Renderer, Worker};
use crate::sampling::Sampler;

/// Largest `NUM_WORKERS` for an rknn node (three per NPU core; each holds its own contexts).
pub const MAX_WORKERS: u32 = 9;

/// One pipeline (three contexts) on one NPU core, for one worker.
pub struct RknnRenderer {
    pipeline: std::result::Result<RknnPipeline, String>,
    core: CoreMask,
}

impl Renderer for RknnRenderer {
    fn backend(&self) -> &'static str {
        "rknn"
    }

    fn device(&self) -> Option<&'static str> {
        Some(self.core.name())
    }

    fn render(
        &mut self,
        params: &Params,
        step: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Image> {
        let pipeline = self
            .pipeline
            .as_mut()
            .map_err(|e| NodeError::Render(format!("this worker did not start: {e}")))?;
        if !params.loras.is_empty() {
            let names: Vec<&str> = params.loras.iter().map(|l| l.name.as_str()).collect();
            return Err(NodeError::InvalidJob(format!(
                "an rknn node runs a compiled model and cannot merge LoRAs (asked for {})",
                names.join(", ")
            )));
        }
        // The sampler, its steps and the model kind are checked by the pipeline's plan.
        pipeline.generate(params, step)
    }
}

/// What the started workers can do.
pub struct Started {
    /// The pool's address.
    pub addr: Addr<Worker<RknnRenderer>>,
    /// Image sizes the model renders.
    pub sizes: Vec<(u32, u32)>,
    /// Mean measured speed of one worker, pixel-steps per second.
    pub pixel_steps_per_second: f64,
    /// Whether the model folder has a VAE encoder: jobs may start from an image (and inpaint).
    pub img2img: bool,
    /// The samplers the model runs, its default first.
    pub samplers: Vec<Sampler>,
}

/// Starts `workers` RKNN worker actors on the model folder `dir`: worker i loads its own
/// contexts on its own thread, pinned to `NPU_CORE_{i % 3}`, and times one UNet step. Waits
/// until every worker has loaded; the first failure fails the start with its message.
pub fn start_workers(
    api: Arc<dyn RknnApi>,
    dir: PathBuf,
    model_id: &str,
    workers: u32,
) -> Result<Started> {
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(NodeError::Config(format!(
            "NUM_WORKERS={workers}: an rknn node runs 1..={MAX_WORKERS} workers (worker i on NPU core i % 3)"
        )));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = Worker::start(workers as usize, model_id, move |i| {
        let core = CoreMask::for_worker(i);
        let started = Instant::now();
        let loaded = RknnPipeline::load(api.clone(), &dir, core).and_then(|mut p| {
            let speed = p.measure_speed()?;
            Ok((p, speed))
        });
        let pipeline = match loaded {
            Ok((p, speed)) => {
                tracing::info!(
                    worker = i,
                    core = core.name(),
                    ms = started.elapsed().as_millis() as u64,
                    pixel_steps_per_second = speed,
                    "rknn worker ready"
                );
                let _ = tx.send(Ok((
                    p.sizes().to_vec(),
                    speed,
                    p.can_encode(),
                    p.samplers(),
                )));
                Ok(p)
            }
            Err(e) => {
                let message = format!("worker {i} on {}: {e}", core.name());
                let _ = tx.send(Err(message.clone()));
                Err(message)
            }
        };
        RknnRenderer { pipeline, core }
    });
    let mut sizes = Vec::new();
    let mut speeds = Vec::new();
    let mut img2img = true;
    let mut samplers = Vec::new();
    for _ in 0..workers {
        match rx.recv() {
            Ok(Ok((s, speed, encodes, runs))) => {
                sizes = s;
                samplers = runs;
                speeds.push(speed);
                img2img &= encodes;
            }
            Ok(Err(message)) => {
                return Err(NodeError::Backend {
                    backend: "rknn",
                    message,
                });
            }
            Err(_) => {
                return Err(NodeError::Backend {
                    backend: "rknn",
                    message: "a worker thread stopped while loading".into(),
                });
            }
        }
    }
    Ok(Started {
        addr,
        img2img,
        samplers,
        sizes,
        pixel_steps_per_second: speeds.iter().sum::<f64>() / speeds.len().max(1) as f64,
    })
}
