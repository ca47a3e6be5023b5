//! The interface every worker actor implements, whatever its backend.
//!
//! A worker is an actix actor running in a `SyncArbiter` thread: the factory closure runs on that
//! thread, so backend handles (CUDA contexts, RKNN contexts) never cross threads. The session sends
//! it [`RunJob`]; it reports each finished step on `progress`, checks `cancel` between steps, and
//! answers the encoded image.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::Message;
use drover_shared::proto;
use tokio::sync::mpsc;

use crate::error::Result;

/// One finished denoising step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Steps done.
    pub step: u32,
    /// Steps in total.
    pub total: u32,
}

/// Cooperative cancellation flag shared by the session and a running job.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// Asks the job to stop at its next step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A rendered image.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// PNG bytes.
    pub png: Vec<u8>,
    /// Time spent rendering.
    pub elapsed: Duration,
}

/// Render one job.
#[derive(Message)]
#[rtype(result = "Result<Rendered>")]
pub struct RunJob {
    /// What to render.
    pub spec: proto::JobSpec,
    /// Where to report finished steps.
    pub progress: mpsc::UnboundedSender<Progress>,
    /// Checked between steps.
    pub cancel: CancelFlag,
}
