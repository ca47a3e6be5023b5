//! Dynamic batching on the node: jobs that may share one model call ([`BatchKey`]) are rendered
//! together ([`RunBatch`], [`Renderer::render_batch`]), each keeping its own seed, prompt,
//! progress, cancel and result.
//!
//! The coordinator leases a node at most one lease group per worker: up to `MAX_BATCH` jobs it
//! found compatible, sent one after another and tagged with the group ([`Group`]). The session
//! hands every job to the [`Batcher`]: a job of a group waits until the rest of its group has
//! arrived (at most [`GROUP_WAIT`]), then goes to a free worker with the waiting jobs of its key,
//! up to `MAX_BATCH`; a job on its own goes at once. When every worker is busy (a coordinator
//! that lost count after a restart), jobs wait here and a worker that frees takes the oldest
//! with the later ones of its key.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Handler, Message, Recipient, SyncContext};
use tokio::sync::oneshot;

use super::{Params, Progress, Rendered, Renderer, RunJob, Worker};
use crate::error::{NodeError, Result};
use crate::sampling::{Sampler, SigmaSchedule};

/// What jobs rendered in one batch share: size, steps, sampler, sigma schedule, guidance,
/// guidance rescale and LoRAs (names and strengths: one set of merged weights). Prompts,
/// negative prompts and seeds may differ.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchKey {
    width: usize,
    height: usize,
    steps: usize,
    sampler: Option<Sampler>,
    schedule: SigmaSchedule,
    guidance: u32,
    guidance_rescale: u32,
    loras: Vec<(String, u32)>,
    model: String,
}

/// A job's [`BatchKey`]; `None` for a job rendered alone (one that starts from an image).
pub fn batch_key(params: &Params) -> Option<BatchKey> {
    if params.source.is_some() {
        return None;
    }
    Some(BatchKey {
        width: params.width,
        height: params.height,
        steps: params.steps,
        sampler: params.sampler,
        schedule: params.schedule,
        guidance: params.guidance.to_bits(),
        guidance_rescale: params.guidance_rescale.to_bits(),
        loras: params
            .loras
            .iter()
            .map(|l| (l.name.clone(), l.strength.to_bits()))
            .collect(),
        model: params.model.clone(),
    })
}

/// Render jobs of one [`BatchKey`] together (or one job alone); a result per job, in order.
#[derive(Message)]
#[rtype(result = "Vec<Result<Rendered>>")]
pub struct RunBatch(pub Vec<RunJob>);

impl<R: Renderer> Handler<RunBatch> for Worker<R> {
    type Result = Vec<Result<Rendered>>;

    fn handle(&mut self, batch: RunBatch, ctx: &mut SyncContext<Self>) -> Self::Result {
        let mut jobs = batch.0;
        if jobs.len() == 1 {
            let job = jobs.remove(0);
            return vec![<Self as Handler<RunJob>>::handle(self, job, ctx)];
        }
        let mut results: Vec<Option<Result<Rendered>>> = Vec::new();
        results.resize_with(jobs.len(), || None);
        // Jobs cancelled while they waited leave before the batch starts.
        let mut live: Vec<(usize, RunJob)> = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.into_iter().enumerate() {
            if job.cancel.is_cancelled() {
                results[i] = Some(Err(NodeError::Cancelled));
            } else {
                live.push((i, job));
            }
        }
        let span = live
            .first()
            .map_or_else(tracing::Span::none, |(_, j)| j.span.clone());
        let _span = span.entered();
        let params: Vec<Params> = live.iter().map(|(_, j)| j.params.clone()).collect();
        let started = Instant::now();
        // Progress goes to every job still in the batch; a cancelled job leaves it at the next
        // step (the model calls after run without it), and the batch stops when none is left.
        let flags: Vec<_> = live.iter().map(|(_, j)| j.cancel.clone()).collect();
        let wanted = |i: usize| flags.get(i).is_some_and(|f| !f.is_cancelled());
        let rendered = self.renderer.render_batch(
            &params,
            |step, total| {
                for (_, job) in live.iter().filter(|(_, j)| !j.cancel.is_cancelled()) {
                    job.progress.send(Progress {
                        step: step as u32,
                        total: total as u32,
                    });
                }
                if live.iter().all(|(_, j)| j.cancel.is_cancelled()) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
            &wanted,
        );
        let elapsed = started.elapsed();
        let size = live.len() as u32;
        match rendered {
            Ok(images) if images.len() == live.len() => {
                tracing::info!(
                    backend = self.origin.backend,
                    batch = size,
                    left = images.iter().filter(|i| i.is_none()).count(),
                    steps = params.first().map_or(0, |p| p.steps),
                    ms = elapsed.as_millis() as u64,
                    "batch rendered"
                );
                for ((i, job), image) in live.into_iter().zip(images) {
                    results[i] = Some(match image {
                        Some(image) if !job.cancel.is_cancelled() => {
                            let _job = job.span.clone().entered();
                            self.deliver(&job, image, elapsed, size)
                        }
                        _ => Err(NodeError::Cancelled),
                    });
                }
            }
            outcome => {
                let e = match outcome {
                    Err(e) => e,
                    Ok(images) => NodeError::Render(format!(
                        "a batch of {} jobs answered {} images",
                        live.len(),
                        images.len()
                    )),
                };
                for (i, _) in live {
                    results[i] = Some(Err(each(&e)));
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(NodeError::Render("a job of a batch got no result".into())))
            })
            .collect()
    }
}

/// A batch's failure as each of its jobs reports it: a cancel stays one, a permanent refusal
/// stays permanent.
fn each(e: &NodeError) -> NodeError {
    match e {
        NodeError::Cancelled => NodeError::Cancelled,
        e if e.is_permanent() => NodeError::InvalidJob(e.to_string()),
        e => NodeError::Render(e.to_string()),
    }
}

/// Jobs the coordinator leased together to one worker, to render as one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group's id (unique among the node's leases).
    pub id: u64,
    /// Jobs in the group.
    pub size: u32,
}

/// The longest the first job of a group waits for the rest to arrive (they are sent back to
/// back; a member the coordinator could not lease never comes).
pub const GROUP_WAIT: Duration = Duration::from_millis(200);

/// One job waiting in the [`Batcher`], and where its result goes.
struct Waiting {
    key: Option<BatchKey>,
    group: Option<Group>,
    arrived: Instant,
    job: RunJob,
    reply: oneshot::Sender<Result<Rendered>>,
}

/// The node's jobs on their way to its workers (see the module docs).
#[derive(Clone)]
pub struct Batcher {
    inner: Arc<Mutex<Queue>>,
    workers: Recipient<RunBatch>,
    max_batch: usize,
}

struct Queue {
    idle: usize,
    waiting: VecDeque<Waiting>,
}

impl Batcher {
    /// A batcher in front of `workers` workers, batching up to `max_batch` jobs (1: never).
    pub fn new(workers: Recipient<RunBatch>, count: usize, max_batch: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Queue {
                idle: count.max(1),
                waiting: VecDeque::new(),
            })),
            workers,
            max_batch: max_batch.max(1),
        }
    }

    /// Queues a job, of lease group `group` when it came in one; its result arrives on the
    /// answer. Must run inside an actix system.
    pub fn submit(&self, job: RunJob, group: Option<Group>) -> oneshot::Receiver<Result<Rendered>> {
        let (reply, rx) = oneshot::channel();
        let key = batch_key(&job.params);
        self.lock().waiting.push_back(Waiting {
            key,
            group,
            arrived: Instant::now(),
            job,
            reply,
        });
        self.pump();
        rx
    }

    /// How much longer the oldest waiting job must wait for the rest of its group: `None` when
    /// it may go now.
    fn group_pending(q: &Queue) -> Option<Duration> {
        let first = q.waiting.front()?;
        let group = first.group?;
        let here = q
            .waiting
            .iter()
            .filter(|w| w.group.is_some_and(|g| g.id == group.id))
            .count();
        if here >= group.size as usize {
            return None;
        }
        GROUP_WAIT
            .checked_sub(first.arrived.elapsed())
            .filter(|d| !d.is_zero())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends batches to idle workers while jobs wait.
    fn pump(&self) {
        loop {
            let batch = {
                let mut q = self.lock();
                if q.idle == 0 {
                    return;
                }
                if let Some(wait) = Self::group_pending(&q) {
                    drop(q);
                    let this = self.clone();
                    actix_rt::spawn(async move {
                        actix_rt::time::sleep(wait).await;
                        this.pump();
                    });
                    return;
                }
                let Some(first) = q.waiting.pop_front() else {
                    return;
                };
                let mut batch = vec![first];
                if let Some(key) = batch[0].key.clone() {
                    let mut i = 0;
                    while batch.len() < self.max_batch && i < q.waiting.len() {
                        if q.waiting[i].key.as_ref() == Some(&key) {
                            if let Some(w) = q.waiting.remove(i) {
                                batch.push(w);
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
                q.idle -= 1;
                batch
            };
            let this = self.clone();
            actix_rt::spawn(async move {
                let (jobs, replies): (Vec<RunJob>, Vec<_>) =
                    batch.into_iter().map(|w| (w.job, w.reply)).unzip();
                let n = jobs.len();
                let results = this.workers.send(RunBatch(jobs)).await.unwrap_or_else(|e| {
                    (0..n)
                        .map(|_| Err(NodeError::Render(format!("worker unavailable: {e}"))))
                        .collect()
                });
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                this.lock().idle += 1;
                this.pump();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::render::{CancelFlag, Lora, ProgressSink};
    use crate::sim::SimRenderer;

    fn job(prompt: &str, seed: u64, steps: usize) -> (RunJob, CancelFlag) {
        let cancel = CancelFlag::default();
        let job = RunJob {
            params: Params {
                prompt: prompt.into(),
                model: String::new(),
                negative_prompt: String::new(),
                width: 64,
                height: 64,
                steps,
                guidance: 1.0,
                guidance_rescale: 0.0,
                sampler: None,
                schedule: SigmaSchedule::Automatic,
                seed,
                loras: Vec::new(),
                source: None,
            },
            progress: ProgressSink::new(|_| {}),
            cancel: cancel.clone(),
            span: tracing::Span::none(),
            upscale: None,
        };
        (job, cancel)
    }

    #[test]
    fn keys_part_jobs_that_cannot_share_a_call() {
        let (a, _) = job("a", 1, 4);
        let (b, _) = job("b", 2, 4);
        assert_eq!(batch_key(&a.params), batch_key(&b.params));
        let (mut c, _) = job("c", 3, 4);
        c.params.loras.push(Lora {
            name: "ink".into(),
            strength: 0.5,
        });
        assert_ne!(batch_key(&a.params), batch_key(&c.params));
        let (d, _) = job("d", 4, 5);
        assert_ne!(batch_key(&a.params), batch_key(&d.params));
    }

    /// Jobs submitted to a batcher over one sim worker: (batch size or "cancelled", prompt).
    fn run(max_batch: usize, jobs: Vec<(RunJob, CancelFlag)>, cancel: &[usize]) -> Vec<String> {
        let jobs = jobs.into_iter().map(|j| (j, None)).collect();
        run_grouped(max_batch, jobs, cancel)
    }

    /// [`run`] with each job's lease group.
    fn run_grouped(
        max_batch: usize,
        jobs: Vec<((RunJob, CancelFlag), Option<Group>)>,
        cancel: &[usize],
    ) -> Vec<String> {
        actix_rt::System::new().block_on(async move {
            let addr = Worker::start(1, "sim-sd15", |_| {
                SimRenderer::new(Duration::from_millis(20))
            });
            let batcher = Batcher::new(addr.recipient(), 1, max_batch);
            let mut waits = Vec::new();
            let mut flags = Vec::new();
            for ((job, flag), group) in jobs {
                waits.push(batcher.submit(job, group));
                flags.push(flag);
            }
            for &i in cancel {
                flags[i].cancel();
            }
            let mut out = Vec::new();
            for w in waits {
                out.push(match w.await {
                    Ok(Ok(r)) => r.batch_size.to_string(),
                    Ok(Err(NodeError::Cancelled)) => "cancelled".into(),
                    Ok(Err(e)) => format!("error {e}"),
                    Err(_) => "dropped".into(),
                });
            }
            out
        })
    }

    #[test]
    fn waiting_jobs_of_one_key_share_a_worker_and_the_first_never_waits() {
        // The first job finds the worker free and goes alone; the next four wait and go
        // together; a job of another key waits for its own turn.
        let jobs = vec![
            job("first", 1, 3),
            job("a", 2, 3),
            job("other steps", 3, 5),
            job("b", 4, 3),
            job("c", 5, 3),
            job("d", 6, 3),
        ];
        assert_eq!(run(4, jobs, &[]), ["1", "4", "1", "4", "4", "4"]);
        // MAX_BATCH 1: one at a time.
        let jobs = vec![job("x", 1, 2), job("y", 2, 2), job("z", 3, 2)];
        assert_eq!(run(1, jobs, &[]), ["1", "1", "1"]);
    }

    #[test]
    fn a_job_cancelled_while_it_waits_leaves_its_batch_alone() {
        let jobs = vec![
            job("first", 1, 3),
            job("a", 2, 3),
            job("b", 3, 3),
            job("c", 4, 3),
        ];
        assert_eq!(run(4, jobs, &[2]), ["1", "2", "cancelled", "2"]);
    }

    #[test]
    fn a_lease_group_starts_together_or_after_the_wait_with_what_came() {
        let group = |id, size| Some(Group { id, size });
        // The three jobs of a group share one call, though the worker was free when the first
        // came; a job of another group (of one) goes on its own.
        let jobs = vec![
            (job("a", 1, 3), group(7, 3)),
            (job("b", 2, 3), group(7, 3)),
            (job("c", 3, 3), group(7, 3)),
            (job("d", 4, 3), None),
        ];
        assert_eq!(run_grouped(4, jobs, &[]), ["3", "3", "3", "1"]);
        // A member that never comes: the group leaves after the wait with the two that did.
        let started = Instant::now();
        let jobs = vec![(job("a", 1, 2), group(9, 3)), (job("b", 2, 2), group(9, 3))];
        assert_eq!(run_grouped(4, jobs, &[]), ["2", "2"]);
        assert!(started.elapsed() >= GROUP_WAIT);
    }
}
