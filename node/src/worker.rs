//! The interface every worker actor implements, whatever its backend.
//!
//! A worker is an actix actor running in a `SyncArbiter` thread: the factory closure runs on that
//! thread, so backend handles (CUDA contexts, RKNN contexts) never cross threads. The session sends
//! it [`RunJob`]; it reports each finished step on `progress`, checks `cancel` between steps, and
//! answers the encoded image.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::Message;
use drover_shared::proto;
use tokio::sync::mpsc;

use crate::error::{NodeError, Result};
use crate::sd::lcm::MAX_STEPS;
use crate::sd::pipeline::{Image, Params};

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

/// Where a worker reports finished steps.
#[derive(Clone, Debug)]
pub enum ProgressSink {
    /// Straight into the node's session outbox, as the job's `JobProgress` message (no task
    /// or thread in between).
    Session {
        /// The session's outbox.
        outbox: mpsc::UnboundedSender<proto::NodeMessage>,
        /// The job.
        job_id: String,
        /// Its lease.
        lease_id: String,
    },
    /// Into a channel of [`Progress`] values (tools and tests).
    Channel(mpsc::UnboundedSender<Progress>),
}

impl ProgressSink {
    /// Reports a finished step (nothing happens when nobody listens any more).
    pub fn send(&self, p: Progress) {
        match self {
            Self::Session {
                outbox,
                job_id,
                lease_id,
            } => {
                let progress = proto::JobProgress {
                    job_id: job_id.clone(),
                    lease_id: lease_id.clone(),
                    step: p.step,
                    total_steps: p.total,
                };
                let _ = outbox.send(proto::NodeMessage {
                    kind: Some(proto::node_message::Kind::Progress(progress)),
                });
            }
            Self::Channel(tx) => {
                let _ = tx.send(p);
            }
        }
    }
}

impl From<mpsc::UnboundedSender<Progress>> for ProgressSink {
    fn from(tx: mpsc::UnboundedSender<Progress>) -> Self {
        Self::Channel(tx)
    }
}

/// Render one job.
#[derive(Message)]
#[rtype(result = "Result<Rendered>")]
pub struct RunJob {
    /// What to render.
    pub spec: proto::JobSpec,
    /// Where to report finished steps.
    pub progress: ProgressSink,
    /// Checked between steps.
    pub cancel: CancelFlag,
    /// The job's span (job id, lease, trace id): the worker thread logs inside it.
    pub span: tracing::Span,
}

impl RunJob {
    /// The LCM pipeline's parameters for this job; refuses (permanently) a step count outside
    /// 1..=[`MAX_STEPS`].
    pub fn lcm_params(&self) -> Result<Params> {
        let spec = &self.spec;
        if spec.steps == 0 || spec.steps as usize > MAX_STEPS {
            return Err(NodeError::InvalidJob(format!(
                "this node runs an LCM pipeline: 1..={MAX_STEPS} steps, not {}",
                spec.steps
            )));
        }
        Ok(Params {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            width: spec.width as usize,
            height: spec.height as usize,
            steps: spec.steps as usize,
            guidance: spec.guidance_scale,
            seed: spec.seed,
        })
    }

    /// Reports a finished step and says whether to go on (`Break` once cancelled): the progress
    /// callback of the pipelines.
    pub fn step_done(&self, step: usize, total: usize) -> ControlFlow<()> {
        self.progress.send(Progress {
            step: step as u32,
            total: total as u32,
        });
        if self.cancel.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// PNG-encodes an image with text chunks naming the prompt, seed, steps, guidance and model.
pub fn encode_png(
    image: &Image,
    spec: &proto::JobSpec,
    model_id: &str,
    backend: &str,
) -> Result<Vec<u8>> {
    let render = |e: png::EncodingError| NodeError::Render(e.to_string());
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut text = vec![
        (
            "Software",
            format!("drover {} ({backend} backend)", drover_shared::VERSION),
        ),
        ("prompt", spec.prompt.clone()),
        ("seed", spec.seed.to_string()),
        ("steps", spec.steps.to_string()),
        ("guidance", spec.guidance_scale.to_string()),
        ("model", model_id.to_string()),
        ("size", format!("{}x{}", image.width, image.height)),
    ];
    if !spec.negative_prompt.is_empty() {
        text.push(("negative_prompt", spec.negative_prompt.clone()));
    }
    if !spec.loras.is_empty() {
        let list: Vec<String> = spec
            .loras
            .iter()
            .map(|l| format!("{}:{}", l.name, l.strength))
            .collect();
        text.push(("loras", list.join(",")));
    }
    if image.truncated_tokens > 0 {
        text.push((
            "prompt_truncated_tokens",
            image.truncated_tokens.to_string(),
        ));
    }
    for (key, value) in text {
        encoder
            .add_itxt_chunk(key.to_string(), value)
            .map_err(render)?;
    }
    let mut writer = encoder.write_header().map_err(render)?;
    writer.write_image_data(&image.rgb).map_err(render)?;
    writer.finish().map_err(render)?;
    Ok(out)
}
