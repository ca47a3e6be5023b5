//! The worker factory: decides, at start-up, which workers this node runs and what it advertises.
//!
//! Each backend gets a branch that checks its requirements (model file, driver, library) and
//! fails with a message naming what is missing. Only `sim` is built so far; the cpu, cuda and rknn
//! pipelines land in their own issues and slot in here behind the same [`RunJob`] interface.

use std::time::Duration;

use actix::{Recipient, SyncArbiter};
use drover_shared::family::ModelFamily;

use crate::config::{BackendKind, NodeConfig};
use crate::error::{NodeError, Result};
use crate::sim::SimWorker;
use crate::worker::RunJob;

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
    pub loras: Vec<(String, ModelFamily)>,
    /// Expected speed in pixel-steps per second (0 when unknown).
    pub pixel_steps_per_second: f64,
}

/// The workers of a node and what they can do.
pub struct WorkerPool {
    /// Sends a job to the next free worker.
    pub runner: Recipient<RunJob>,
    /// What the workers can do.
    pub capabilities: Capabilities,
}

/// Largest image the sim backend accepts for `family` (four times the family's native area).
fn sim_max_pixels(family: ModelFamily) -> u64 {
    let (w, h) = family.default_size();
    4 * u64::from(w) * u64::from(h)
}

/// Creates the node's workers. Must run inside an actix system.
pub fn build(config: &NodeConfig) -> Result<WorkerPool> {
    match config.backend {
        BackendKind::Sim => build_sim(config),
        BackendKind::Auto => Err(NodeError::Backend {
            backend: "auto",
            message:
                "no real backend is available in this build (the cpu, cuda and rknn pipelines \
                      are not built yet); set BACKEND=sim to run a simulated node"
                    .into(),
        }),
        other => Err(NodeError::Backend {
            backend: other.as_str(),
            message: "this backend is not built into this drover-node yet; set BACKEND=sim to \
                      run a simulated node"
                .into(),
        }),
    }
}

fn build_sim(config: &NodeConfig) -> Result<WorkerPool> {
    let family = config.sim_family;
    if !family.is_text_to_image() {
        return Err(NodeError::Config(format!(
            "SIM_FAMILY={family} is not a text-to-image family"
        )));
    }
    if config.model.is_some() || config.model_root.is_some() {
        return Err(NodeError::Config(
            "BACKEND=sim runs no model, but MODEL/MODEL_ROOT are set; unset them or choose a real backend".into(),
        ));
    }
    let workers = config.num_workers.unwrap_or(2);
    if !(1..=64).contains(&workers) {
        return Err(NodeError::Config(format!(
            "NUM_WORKERS={workers} is outside 1..=64"
        )));
    }
    let step = Duration::from_millis(config.sim_step_ms);
    let addr = SyncArbiter::start(workers as usize, move || SimWorker::new(step));
    let (w, h) = family.default_size();
    let pixel_steps_per_second = if config.sim_step_ms == 0 {
        0.0
    } else {
        f64::from(w * h) * 1000.0 / config.sim_step_ms as f64
    };
    tracing::info!(family = %family, workers, step_ms = config.sim_step_ms, "sim workers started (simulated backend, no model)");
    Ok(WorkerPool {
        runner: addr.recipient(),
        capabilities: Capabilities {
            backend: BackendKind::Sim,
            family,
            model_id: format!("sim-{family}"),
            workers,
            max_pixels: config.max_pixels.unwrap_or_else(|| sim_max_pixels(family)),
            loras: Vec::new(),
            pixel_steps_per_second,
        },
    })
}
