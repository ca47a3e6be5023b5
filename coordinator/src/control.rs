//! `ControlPlane`: the actor that owns the registry and the job queue.
//!
//! It holds state and moves messages; every decision about where a job goes is made by the pure
//! functions of [`crate::router`] over a snapshot it builds. Every change to a node or a job is
//! written to the [`Store`] before it is acted on, so a restarted coordinator picks up where it
//! stopped: queued jobs stay queued, leases stay with their nodes until they expire or the node is
//! declared offline, and results are accepted only from the current lease holder (fencing).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use drover_shared::family::ModelFamily;
use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::{JobSpec, ModelSelector, Size};
use drover_shared::proto::{self, coordinator_message, node_message};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::error::{CoordinatorError, Result};
use crate::history::{History, Sample};
use crate::limits::ClientId;
use crate::metrics::{Gauge, Metrics};
use crate::records::{Attempt, JobRecord, JobState, Lease, LoraAdvert, NodeRecord, now_ms};
use crate::router::{self, NodeView};
use crate::store::Store;

/// Messages the coordinator pushes down a node's session.
pub type SessionSender =
    mpsc::UnboundedSender<std::result::Result<proto::CoordinatorMessage, tonic::Status>>;
/// The receiving half handed to the gRPC layer.
pub type SessionReceiver =
    mpsc::UnboundedReceiver<std::result::Result<proto::CoordinatorMessage, tonic::Status>>;

/// Tick interval of the liveness and lease loop.
const LOOP_INTERVAL: Duration = Duration::from_millis(100);

struct Session {
    id: u64,
    tx: SessionSender,
}

struct NodeEntry {
    record: NodeRecord,
    session: Option<Session>,
    /// Last time anything was heard from the node (or its session opened or closed).
    last_seen: Instant,
    /// Jobs leased to the node.
    running: HashSet<JobId>,
    /// Speed measured from the node's results (EWMA of pixel-steps per second), once it has
    /// returned one.
    measured: Option<f64>,
    /// LoRA sets its workers have merged, most recent first (`router::lora_set_key`; 0 is base).
    loaded: Vec<u64>,
    /// (online, suspect) when last indexed: the tick re-indexes a node whose state has moved.
    status: (bool, bool),
}

/// Weight of the newest result in a node's measured speed.
const SPEED_EWMA: f64 = 0.3;

/// Finished jobs the dashboard shows.
const RECENT_JOBS: usize = 24;

/// The actor owning the registry and the queue.
pub struct ControlPlane {
    config: Arc<Config>,
    store: Store,
    nodes: HashMap<NodeId, NodeEntry>,
    /// Jobs not yet in a terminal state.
    active: HashMap<JobId, JobRecord>,
    waiters: HashMap<JobId, Vec<oneshot::Sender<Finished>>>,
    /// Where the next placement starts looking among equally good nodes (round robin by id).
    pivot: NodeId,
    /// The nodes that can take work now, kept current: every change to a node marks it dirty and
    /// the index is brought up to date before each dispatch.
    index: router::CapabilityIndex<NodeId>,
    /// Nodes whose index entry is stale.
    dirty: HashSet<NodeId>,
    next_session: u64,
    /// When finished jobs were last pruned (retention).
    last_prune: Instant,
    metrics: Arc<Metrics>,
    /// Live event streams (`GET /v1/jobs/{id}/events`) by job.
    watchers: HashMap<JobId, Vec<mpsc::UnboundedSender<JobEvent>>>,
    /// Unfinished jobs per client label (for the per-client cap).
    clients: HashMap<String, u32>,
    /// The queued jobs in the order they are offered to nodes (`router::queue_key`).
    queue: BTreeSet<QueueEntry>,
    /// The last hour, for the dashboard's charts.
    history: History,
    /// The most recently finished jobs, newest last.
    recent: VecDeque<JobRecord>,
}

/// One live update of a job, as `GET /v1/jobs/{id}/events` streams it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting for a node; `position` jobs are ahead of it (0: next).
    Queued {
        /// Jobs ahead in the queue order.
        position: usize,
    },
    /// Leased to a node.
    Assigned {
        /// The node.
        node_id: NodeId,
        /// Attempt number (1 for the first).
        attempt: u32,
    },
    /// A denoising step finished.
    Progress {
        /// Steps done.
        step: u32,
        /// Steps in total.
        total: u32,
    },
    /// The attempt ended without a result; the job waits for another node.
    Requeued {
        /// Why the attempt ended.
        reason: String,
    },
    /// The job ended.
    Done {
        /// `succeeded`, `failed` or `cancelled`.
        state: JobState,
        /// Where the image is, when it succeeded.
        image_url: Option<String>,
        /// Why it failed (every attempt's reason).
        error: Option<String>,
    },
}

/// How often the retention sweep runs.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Most finished jobs one retention sweep deletes (a sweep never stalls the control plane long).
const PRUNE_BATCH: usize = 5_000;

impl ControlPlane {
    /// Restores the registry and unfinished jobs from `store`.
    pub fn restore(store: Store, config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self> {
        let now = Instant::now();
        let config_history_ms = config.history_sample_ms;
        let mut nodes: HashMap<NodeId, NodeEntry> = store
            .nodes()?
            .into_iter()
            .map(|record| {
                (
                    record.id,
                    NodeEntry {
                        record,
                        session: None,
                        last_seen: now,
                        running: HashSet::new(),
                        measured: None,
                        loaded: vec![0],
                        status: (false, false),
                    },
                )
            })
            .collect();
        let mut active = HashMap::new();
        let mut clients: HashMap<String, u32> = HashMap::new();
        let mut queue = BTreeSet::new();
        for job in store.unfinished_jobs()? {
            if job.state == JobState::Queued {
                queue.insert(queue_entry(&job));
            }
            if let Some(c) = &job.client {
                *clients.entry(c.clone()).or_default() += 1;
            }
            if let Some(lease) = &job.lease
                && let Some(node) = nodes.get_mut(&lease.node_id)
            {
                node.running.insert(job.id);
            }
            active.insert(job.id, job);
        }
        tracing::info!(
            nodes = nodes.len(),
            jobs = active.len(),
            "control plane restored"
        );
        let mut plane = Self {
            config,
            store,
            nodes,
            active,
            waiters: HashMap::new(),
            pivot: NodeId::from_bytes([0; 16]),
            index: router::CapabilityIndex::default(),
            dirty: HashSet::new(),
            next_session: 1,
            last_prune: now,
            metrics,
            watchers: HashMap::new(),
            clients,
            queue,
            history: History::new(
                Duration::from_millis(config_history_ms),
                Duration::from_secs(3600),
            ),
            recent: VecDeque::with_capacity(RECENT_JOBS),
        };
        // Leases whose node is unknown (removed from the registry) cannot complete.
        let orphans: Vec<JobId> = plane
            .active
            .values()
            .filter(|j| {
                j.lease
                    .as_ref()
                    .is_some_and(|l| !plane.nodes.contains_key(&l.node_id))
            })
            .map(|j| j.id)
            .collect();
        for id in orphans {
            plane.requeue(id, "lease holder is no longer registered")?;
        }
        plane.dirty.extend(plane.nodes.keys().copied());
        Ok(plane)
    }

    fn node_view<'a>(&self, entry: &'a NodeEntry, now: Instant) -> NodeView<'a> {
        view_of(entry, &self.config, now)
    }

    /// Marks node `id` for re-indexing (its availability, free slots, speed or LoRA sets may
    /// have changed).
    fn touch(&mut self, id: NodeId) {
        self.dirty.insert(id);
    }

    /// Brings the capability index up to date with every dirty node.
    fn refresh_index(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let now = Instant::now();
        for id in std::mem::take(&mut self.dirty) {
            let member = self.nodes.get_mut(&id).and_then(|entry| {
                entry.status = status_of(entry, &self.config, now);
                router::Member::of(&view_of(entry, &self.config, now))
            });
            self.index.upsert(id, member);
        }
        #[cfg(debug_assertions)]
        self.check_index();
    }

    /// Debug builds (every test) check the invariant that keeps the index honest: after a
    /// refresh it holds exactly what a fresh look at every node gives (at the state the node was
    /// last indexed in; only the tick moves that with time).
    #[cfg(debug_assertions)]
    fn check_index(&self) {
        for (id, entry) in &self.nodes {
            let (online, suspect) = entry.status;
            let view = NodeView {
                online,
                suspect,
                ..view_of(entry, &self.config, Instant::now())
            };
            let fresh = router::Member::of(&view);
            assert_eq!(
                self.index.member(id),
                fresh.as_ref(),
                "the capability index drifted from node {id} ({})",
                entry.record.name
            );
        }
    }

    fn views(&self, now: Instant) -> Vec<NodeView<'_>> {
        let mut views: Vec<_> = self
            .nodes
            .values()
            .map(|e| self.node_view(e, now))
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }
}

/// A node's (online, suspect) state at `now`.
fn status_of(entry: &NodeEntry, config: &Config, now: Instant) -> (bool, bool) {
    let silent = now.saturating_duration_since(entry.last_seen);
    let online = entry.session.is_some() && silent <= config.offline_grace();
    (online, online && silent > config.suspect_after())
}

/// What the router sees of a node at `now`.
fn view_of<'a>(entry: &'a NodeEntry, config: &Config, now: Instant) -> NodeView<'a> {
    let (online, suspect) = status_of(entry, config, now);
    NodeView {
        id: entry.record.id,
        name: &entry.record.name,
        family: entry.record.family,
        model_id: &entry.record.model_id,
        max_pixels: entry.record.max_pixels,
        sizes: &entry.record.sizes,
        loras: &entry.record.loras,
        online,
        suspect,
        draining: entry.record.draining,
        free_slots: entry
            .record
            .workers
            .saturating_sub(entry.running.len() as u32),
        workers: entry.record.workers,
        loaded: &entry.loaded,
        pixel_steps_per_second: node_speed(entry),
    }
}

impl ControlPlane {
    /// Refuses a job whose LoRAs are known (from node adverts) only for other families than the
    /// one it asks for, naming both: a LoRA is never skipped silently.
    fn check_lora_bases(&self, spec: &JobSpec) -> Result<()> {
        let Some(ModelSelector::Family(wanted)) = &spec.model else {
            return Ok(());
        };
        for lora in &spec.loras {
            let bases: std::collections::BTreeSet<ModelFamily> = self
                .nodes
                .values()
                .flat_map(|n| n.record.loras.iter())
                .filter(|l| l.name == lora.name)
                .map(|l| l.family)
                .collect();
            if !bases.is_empty() && !bases.contains(wanted) {
                let made_for: Vec<String> = bases.iter().map(ToString::to_string).collect();
                return Err(CoordinatorError::Unprocessable(format!(
                    "lora `{}` is made for {}, but the request asks for {wanted}",
                    lora.name,
                    made_for.join(" and ")
                )));
            }
        }
        Ok(())
    }

    /// Sends `event` to every live stream of `job_id`, forgetting closed ones.
    fn notify(&mut self, job_id: JobId, event: JobEvent) {
        if let Some(list) = self.watchers.get_mut(&job_id) {
            list.retain(|tx| tx.send(event.clone()).is_ok());
        }
    }

    /// Puts `job` in the queue (it is queued) or takes it out (it is not).
    fn enqueue(&mut self, job: &JobRecord, queued: bool) {
        let entry = queue_entry(job);
        if queued {
            self.queue.insert(entry);
        } else {
            self.queue.remove(&entry);
        }
    }

    /// Jobs ahead of `job_id` in the queue order now.
    fn queue_position(&self, job_id: JobId) -> usize {
        self.queue
            .iter()
            .position(|(_, _, id)| *id == job_id)
            .unwrap_or(0)
    }

    fn queued_count(&self) -> usize {
        self.queue.len()
    }

    /// Places as many queued jobs as there are free eligible slots ([`router::plan_dispatch`]
    /// over the capability index, in queue order), then leases.
    fn dispatch(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        self.refresh_index();
        let now = Instant::now();
        let (nodes, config, active) = (&self.nodes, &self.config, &self.active);
        let queue = self
            .queue
            .iter()
            .filter_map(|&(_, _, id)| active.get(&id).map(|job| (id, &job.spec)));
        let capable = |spec: &JobSpec, id: NodeId| {
            nodes
                .get(&id)
                .is_some_and(|e| router::capability(spec, &view_of(e, config, now)).is_ok())
        };
        let (placements, pivot) =
            router::plan_dispatch(&mut self.index, queue, self.pivot, capable, next_id);
        self.pivot = pivot;
        for (job_id, node_id) in placements {
            // The lease re-indexes the node from its entry, whatever happens to the lease.
            self.touch(node_id);
            if let Err(e) = self.lease(job_id, node_id) {
                tracing::error!(job_id = %job_id, node_id = %node_id, error = %e, "lease failed");
            }
        }
    }

    fn lease_duration(&self, spec: &JobSpec, record: &NodeRecord) -> Duration {
        let floor = Duration::from_millis(self.config.lease_floor_ms);
        if record.pixel_steps_per_second <= 0.0 {
            return floor;
        }
        let work =
            spec.size_on(record.family, &record.sizes).pixels() as f64 * f64::from(spec.steps);
        floor + Duration::from_secs_f64(4.0 * work / record.pixel_steps_per_second)
    }

    fn lease(&mut self, job_id: JobId, node_id: NodeId) -> Result<()> {
        let Some(entry) = self.nodes.get(&node_id) else {
            return Ok(());
        };
        let Some(job) = self.active.get(&job_id) else {
            return Ok(());
        };
        let Some(session) = &entry.session else {
            return Ok(());
        };
        let now = now_ms();
        let lease = Lease {
            id: LeaseId::random(),
            node_id,
            attempt: job.attempts.len() as u32 + 1,
            granted_ms: now,
            deadline_ms: now + self.lease_duration(&job.spec, &entry.record).as_millis() as u64,
        };
        let assignment = proto::Assignment {
            job_id: job_id.to_string(),
            lease_id: lease.id.to_string(),
            attempt: lease.attempt,
            spec: Some(job.spec.to_proto(entry.record.family, &entry.record.sizes)),
            deadline_unix_ms: lease.deadline_ms,
            trace_id: job.trace_id.clone().unwrap_or_default(),
        };
        let message = proto::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Assignment(assignment)),
        };
        if session.tx.send(Ok(message)).is_err() {
            tracing::warn!(node_id = %node_id, "session closed while leasing");
            return Ok(());
        }
        let size = job.spec.size_on(entry.record.family, &entry.record.sizes);
        let set = router::lora_set_key(&job.spec.loras);
        if let Some(entry) = self.nodes.get_mut(&node_id) {
            let workers = entry.record.workers as usize;
            router::remember_set(&mut entry.loaded, set, workers);
        }
        let job = self
            .active
            .get_mut(&job_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("job {job_id}")))?;
        if job.attempts.is_empty() {
            self.metrics.observe(
                "drover_job_queue_wait_seconds",
                vec![],
                now.saturating_sub(job.created_ms) as f64 / 1000.0,
            );
        }
        self.queue.remove(&queue_entry(job));
        job.state = JobState::Leased;
        job.size = Some(size);
        job.updated_ms = now;
        job.progress = None;
        tracing::info!(job_id = %job_id, node_id = %node_id, lease_id = %lease.id, attempt = lease.attempt, trace_id = job.trace_id.as_deref().unwrap_or(""), "job leased");
        let (attempt, event_node) = (lease.attempt, lease.node_id);
        job.lease = Some(lease);
        self.store.put_job(job)?;
        self.notify(
            job_id,
            JobEvent::Assigned {
                node_id: event_node,
                attempt,
            },
        );
        if let Some(entry) = self.nodes.get_mut(&node_id) {
            entry.running.insert(job_id);
        }
        Ok(())
    }

    /// Ends the current attempt of `job_id` with `reason`; queues it again or fails it when it has
    /// used every attempt.
    fn requeue(&mut self, job_id: JobId, reason: &str) -> Result<()> {
        let max_attempts = self.config.max_attempts;
        let Some(job) = self.active.get_mut(&job_id) else {
            return Ok(());
        };
        let now = now_ms();
        end_attempt(&mut self.nodes, &mut self.dirty, job, reason.to_string());
        self.metrics
            .inc("drover_requeues_total", vec![("reason", reason.into())]);
        job.updated_ms = now;
        job.progress = None;
        if job.attempts.len() as u32 >= max_attempts {
            let reasons: Vec<_> = job.attempts.iter().map(|a| a.outcome.as_str()).collect();
            let error = format!(
                "failed after {} attempts: {}",
                job.attempts.len(),
                reasons.join("; ")
            );
            tracing::warn!(job_id = %job_id, %error, "job failed");
            self.finish(job_id, JobState::Failed, Some(error), None)
        } else {
            job.state = JobState::Queued;
            self.queue.insert(queue_entry(job));
            tracing::info!(job_id = %job_id, reason, "job re-queued");
            self.store.put_job(job)?;
            self.notify(
                job_id,
                JobEvent::Requeued {
                    reason: reason.to_string(),
                },
            );
            Ok(())
        }
    }

    /// Counts `job` in (`+1`) or out (`-1`) of its client's unfinished jobs.
    fn track(&mut self, job: &JobRecord, delta: i32) {
        let Some(client) = &job.client else {
            return;
        };
        let n = self.clients.entry(client.clone()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.clients.remove(client);
        }
    }

    /// Moves a job to a terminal state, persists it and wakes its waiters (handing them the
    /// image, when there is one, so they need not read it back).
    fn finish(
        &mut self,
        job_id: JobId,
        state: JobState,
        error: Option<String>,
        png: Option<Arc<[u8]>>,
    ) -> Result<()> {
        let Some(mut job) = self.active.remove(&job_id) else {
            return Ok(());
        };
        self.track(&job, -1);
        self.enqueue(&job, false);
        let outcome = match state {
            JobState::Succeeded => "succeeded".to_string(),
            _ => error.clone().unwrap_or_else(|| state.as_str().to_string()),
        };
        let attempt_started = job.lease.as_ref().map(|l| l.granted_ms);
        let node_id = end_attempt(&mut self.nodes, &mut self.dirty, &mut job, outcome);
        let now = now_ms();
        if state == JobState::Succeeded {
            job.node_id = node_id;
            let secs = |from: u64| now.saturating_sub(from) as f64 / 1000.0;
            self.metrics.observe(
                "drover_job_end_to_end_seconds",
                vec![],
                secs(job.created_ms),
            );
            if let Some(started) = attempt_started {
                self.metrics
                    .observe("drover_job_run_seconds", vec![], secs(started));
            }
        }
        self.metrics.inc(
            "drover_jobs_finished_total",
            vec![("outcome", state.as_str().into())],
        );
        job.state = state;
        job.error = error;
        job.updated_ms = now_ms();
        self.store.finish_job(&job, png.clone())?;
        self.history.finished(state == JobState::Succeeded);
        if self.recent.len() == RECENT_JOBS {
            self.recent.pop_front();
        }
        self.recent.push_back(job.clone());
        for waiter in self.waiters.remove(&job_id).unwrap_or_default() {
            let _ = waiter.send(Finished {
                job: job.clone(),
                png: png.clone(),
            });
        }
        let done = done_event(&job);
        self.notify(job_id, done);
        // Dropping the senders ends the streams after the final event.
        self.watchers.remove(&job_id);
        Ok(())
    }

    /// The job, if `lease_id` is its current lease held by `node_id`.
    fn fenced(&mut self, job_id: &str, lease_id: &str, node_id: NodeId) -> Option<&mut JobRecord> {
        let job_id: JobId = job_id.parse().ok()?;
        let lease_id: LeaseId = lease_id.parse().ok()?;
        let job = self.active.get_mut(&job_id)?;
        match &job.lease {
            Some(l) if l.id == lease_id && l.node_id == node_id => Some(job),
            _ => {
                tracing::info!(job_id = %job_id, lease_id = %lease_id, node_id = %node_id, "stale report dropped");
                None
            }
        }
    }

    fn on_node_message(&mut self, node_id: NodeId, msg: node_message::Kind) -> Result<()> {
        match msg {
            node_message::Kind::Hello(_) | node_message::Kind::Heartbeat(_) => {}
            node_message::Kind::Progress(p) => {
                if let Some(job) = self.fenced(&p.job_id, &p.lease_id, node_id) {
                    job.state = JobState::Running;
                    job.progress = Some((p.step, p.total_steps));
                    job.updated_ms = now_ms();
                    // Progress is not persisted: it is cheap to lose and frequent.
                    let job_id = job.id;
                    self.notify(
                        job_id,
                        JobEvent::Progress {
                            step: p.step,
                            total: p.total_steps,
                        },
                    );
                }
            }
            node_message::Kind::Result(r) => {
                if let Some(job) = self.fenced(&r.job_id, &r.lease_id, node_id) {
                    let job_id = job.id;
                    if let Some((_, total)) = job.progress {
                        job.progress = Some((total, total));
                    }
                    let work =
                        job.size.map_or(0, |s| s.pixels()) as f64 * f64::from(job.spec.steps);
                    let png: Arc<[u8]> = r.png.into();
                    if work > 0.0
                        && let Some(entry) = self.nodes.get_mut(&node_id)
                    {
                        let speed = work * 1000.0 / r.elapsed_ms.max(1) as f64;
                        entry.measured = Some(match entry.measured {
                            Some(old) => old + SPEED_EWMA * (speed - old),
                            None => speed,
                        });
                        self.dirty.insert(node_id);
                    }
                    tracing::info!(job_id = %job_id, node_id = %node_id, elapsed_ms = r.elapsed_ms, bytes = png.len(), "job succeeded");
                    self.finish(job_id, JobState::Succeeded, None, Some(png))?;
                }
            }
            node_message::Kind::Failed(f) => {
                if let Some(job) = self.fenced(&f.job_id, &f.lease_id, node_id) {
                    let job_id = job.id;
                    let reason = format!("node reported: {}", f.reason);
                    if f.permanent {
                        self.finish(job_id, JobState::Failed, Some(reason), None)?;
                    } else {
                        self.requeue(job_id, &reason)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Liveness, lease deadlines, queue expiry and the dashboard's samples.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.history.due(now) {
            let queued = self.queued_count();
            let running = self.active.len() - queued;
            let mut speeds: Vec<(String, f64)> = self
                .nodes
                .values()
                .filter(|e| e.session.is_some())
                .map(|e| (e.record.name.clone(), node_speed(e)))
                .collect();
            speeds.sort_by(|a, b| a.0.cmp(&b.0));
            self.history.sample(now, now_ms(), queued, running, speeds);
        }
        let grace = self.config.offline_grace();
        let mut lost = Vec::new();
        for (id, entry) in self.nodes.iter_mut() {
            let silent = now.saturating_duration_since(entry.last_seen);
            if silent > grace {
                if entry.session.take().is_some() {
                    tracing::warn!(node_id = %entry.record.id, name = %entry.record.name, silent_ms = silent.as_millis() as u64, "node offline: heartbeats stopped");
                }
                lost.extend(entry.running.iter().copied());
            }
            // Time moves nodes to suspect and offline: re-index the ones whose state moved.
            if status_of(entry, &self.config, now) != entry.status {
                self.dirty.insert(*id);
            }
        }
        for job_id in lost {
            report(self.requeue(job_id, "node went offline"));
        }
        let wall = now_ms();
        let expired: Vec<JobId> = self
            .active
            .values()
            .filter(|j| j.lease.as_ref().is_some_and(|l| l.deadline_ms < wall))
            .map(|j| j.id)
            .collect();
        for job_id in expired {
            self.metrics.inc("drover_lease_expiries_total", vec![]);
            self.cancel_on_node(job_id);
            report(self.requeue(job_id, "lease expired"));
        }
        let expiry_ms = self.config.queue_expiry_s * 1000;
        let stale: Vec<JobId> = self
            .active
            .values()
            .filter(|j| {
                j.state == JobState::Queued && wall.saturating_sub(j.created_ms) > expiry_ms
            })
            .map(|j| j.id)
            .collect();
        for job_id in stale {
            let error = format!(
                "expired after waiting {} s for a free node",
                self.config.queue_expiry_s
            );
            report(self.finish(job_id, JobState::Failed, Some(error), None));
        }
        let retention_ms = self.config.result_retention_s.saturating_mul(1000);
        if retention_ms > 0 && now.saturating_duration_since(self.last_prune) >= PRUNE_INTERVAL {
            self.last_prune = now;
            // The store's writer runs the sweep, in order with every other write, and logs it.
            report(
                self.store
                    .prune_finished(wall.saturating_sub(retention_ms), PRUNE_BATCH),
            );
        }
        self.dispatch();
    }

    fn cancel_on_node(&self, job_id: JobId) {
        let Some(lease) = self.active.get(&job_id).and_then(|j| j.lease.as_ref()) else {
            return;
        };
        if let Some(Session { tx, .. }) = self
            .nodes
            .get(&lease.node_id)
            .and_then(|n| n.session.as_ref())
        {
            let cancel = proto::Cancel {
                job_id: job_id.to_string(),
                lease_id: lease.id.to_string(),
            };
            let _ = tx.send(Ok(proto::CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Cancel(cancel)),
            }));
        }
    }
}

/// Ends the job's current lease (if any) with `outcome`: frees the node's slot and records the
/// attempt. Answers the node that held the lease.
fn end_attempt(
    nodes: &mut HashMap<NodeId, NodeEntry>,
    dirty: &mut HashSet<NodeId>,
    job: &mut JobRecord,
    outcome: String,
) -> Option<NodeId> {
    let lease = job.lease.take()?;
    if let Some(node) = nodes.get_mut(&lease.node_id) {
        node.running.remove(&job.id);
        dirty.insert(lease.node_id);
    }
    job.attempts.push(Attempt {
        node_id: lease.node_id,
        lease_id: lease.id,
        started_ms: lease.granted_ms,
        ended_ms: now_ms(),
        outcome,
    });
    Some(lease.node_id)
}

/// The job a result or failure report is about.
fn reported_job(message: &node_message::Kind) -> Option<&str> {
    match message {
        node_message::Kind::Result(r) => Some(&r.job_id),
        node_message::Kind::Failed(f) => Some(&f.job_id),
        _ => None,
    }
}

/// A queued job's place: (`router::queue_key`, acceptance time, id).
type QueueEntry = (i64, u64, JobId);

fn queue_entry(job: &JobRecord) -> QueueEntry {
    (
        router::queue_key(job.spec.priority, job.created_ms),
        job.created_ms,
        job.id,
    )
}

/// The id after `id`, where the next round-robin search among equals starts.
fn next_id(id: NodeId) -> NodeId {
    NodeId::from_bytes(
        u128::from_be_bytes(*id.as_bytes())
            .wrapping_add(1)
            .to_be_bytes(),
    )
}

/// A node's speed: measured from its results once it has some, else what it advertised.
fn node_speed(entry: &NodeEntry) -> f64 {
    entry
        .measured
        .unwrap_or(entry.record.pixel_steps_per_second)
}

fn report(result: Result<()>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "control plane store write failed");
    }
}

impl Actor for ControlPlane {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(LOOP_INTERVAL, |plane, _| plane.tick());
    }
}

/// Registers (or re-registers) a node; answers its record.
#[derive(Message)]
#[rtype(result = "Result<NodeRecord>")]
pub struct RegisterNode(pub proto::RegisterRequest);

impl Handler<RegisterNode> for ControlPlane {
    type Result = Result<NodeRecord>;

    fn handle(&mut self, RegisterNode(req): RegisterNode, _: &mut Context<Self>) -> Self::Result {
        let name = req.name.trim().to_string();
        if name.is_empty() || name.len() > 128 {
            return Err(CoordinatorError::InvalidRequest(
                "node name must be 1 to 128 characters".into(),
            ));
        }
        let family: ModelFamily =
            req.family
                .parse()
                .map_err(|e: drover_shared::family::UnknownFamily| {
                    CoordinatorError::InvalidRequest(e.to_string())
                })?;
        if req.workers == 0 {
            return Err(CoordinatorError::InvalidRequest(
                "a node needs at least one worker".into(),
            ));
        }
        if let Some(bad) = req.sizes.iter().find(|s| s.width == 0 || s.height == 0) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "size {}x{} has no pixels",
                bad.width, bad.height
            )));
        }
        let sizes = req
            .sizes
            .iter()
            .map(|s| Size {
                width: s.width,
                height: s.height,
            })
            .collect();
        let mut loras = Vec::with_capacity(req.loras.len());
        for l in req.loras {
            let family = l
                .family
                .parse()
                .map_err(|e: drover_shared::family::UnknownFamily| {
                    CoordinatorError::InvalidRequest(format!("lora `{}`: {e}", l.name))
                })?;
            loras.push(LoraAdvert {
                name: l.name,
                family,
            });
        }
        let existing = self
            .nodes
            .values()
            .find(|e| e.record.name == name)
            .map(|e| e.record.clone());
        let record = NodeRecord {
            id: existing.as_ref().map_or_else(NodeId::random, |r| r.id),
            name,
            backend: req.backend,
            family,
            cross_attention_dim: req.cross_attention_dim,
            model_id: req.model_id,
            workers: req.workers,
            max_pixels: req.max_pixels,
            loras,
            version: req.version,
            pixel_steps_per_second: req.pixel_steps_per_second,
            registered_at_ms: now_ms(),
            draining: existing.as_ref().is_some_and(|r| r.draining),
            sizes,
        };
        self.store.put_node(&record)?;
        tracing::info!(node_id = %record.id, name = %record.name, family = %record.family, backend = %record.backend, workers = record.workers, "node registered");
        let entry = self.nodes.entry(record.id).or_insert_with(|| NodeEntry {
            record: record.clone(),
            session: None,
            last_seen: Instant::now(),
            running: HashSet::new(),
            measured: None,
            loaded: vec![0],
            status: (false, false),
        });
        entry.record = record.clone();
        self.dirty.insert(record.id);
        Ok(record)
    }
}

/// Opens a node's session; answers the session id and the stream of messages for the node.
#[derive(Message)]
#[rtype(result = "Result<(u64, SessionReceiver)>")]
pub struct OpenSession {
    /// The node (must be registered).
    pub node_id: NodeId,
    /// Jobs the node says it is still running.
    pub running: Vec<proto::RunningJob>,
}

impl Handler<OpenSession> for ControlPlane {
    type Result = Result<(u64, SessionReceiver)>;

    fn handle(&mut self, msg: OpenSession, _: &mut Context<Self>) -> Self::Result {
        let session_id = self.next_session;
        self.next_session += 1;
        let entry = self.nodes.get_mut(&msg.node_id).ok_or_else(|| {
            CoordinatorError::NotFound(format!("node {} (register first)", msg.node_id))
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        entry.session = Some(Session { id: session_id, tx });
        entry.last_seen = Instant::now();
        self.dirty.insert(msg.node_id);
        tracing::info!(node_id = %msg.node_id, session_id, "node session opened");
        // Leases this node holds but no longer runs (it restarted) are re-queued now.
        let still_running: HashSet<(String, String)> = msg
            .running
            .into_iter()
            .map(|r| (r.job_id, r.lease_id))
            .collect();
        let dropped: Vec<JobId> = entry
            .running
            .iter()
            .filter(|job_id| {
                self.active
                    .get(job_id)
                    .and_then(|j| j.lease.as_ref())
                    .is_none_or(|l| {
                        !still_running.contains(&(job_id.to_string(), l.id.to_string()))
                    })
            })
            .copied()
            .collect();
        for job_id in dropped {
            self.requeue(job_id, "node restarted without the job")?;
        }
        self.dispatch();
        Ok((session_id, rx))
    }
}

/// Something a node sent on its session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeEvent {
    /// The node.
    pub node_id: NodeId,
    /// The session it came on.
    pub session_id: u64,
    /// The message.
    pub message: node_message::Kind,
}

impl Handler<NodeEvent> for ControlPlane {
    type Result = ();

    fn handle(&mut self, msg: NodeEvent, _: &mut Context<Self>) {
        let Some(entry) = self.nodes.get_mut(&msg.node_id) else {
            return;
        };
        if entry
            .session
            .as_ref()
            .is_none_or(|s| s.id != msg.session_id)
        {
            if let Some(job_id) = reported_job(&msg.message) {
                tracing::info!(node_id = %msg.node_id, session_id = msg.session_id, job_id, "late report from a closed session dropped");
            }
            return;
        }
        entry.last_seen = Instant::now();
        // A heartbeat after a silence brings a suspect node back.
        if status_of(entry, &self.config, entry.last_seen) != entry.status {
            self.dirty.insert(msg.node_id);
        }
        let frees_slot = matches!(
            msg.message,
            node_message::Kind::Result(_) | node_message::Kind::Failed(_)
        );
        let result = self.on_node_message(msg.node_id, msg.message);
        report(result);
        if frees_slot {
            self.dispatch();
        }
    }
}

/// A node's session ended (stream closed or broken).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    /// The node.
    pub node_id: NodeId,
    /// The session that ended.
    pub session_id: u64,
}

impl Handler<SessionClosed> for ControlPlane {
    type Result = ();

    fn handle(&mut self, msg: SessionClosed, _: &mut Context<Self>) {
        if let Some(entry) = self.nodes.get_mut(&msg.node_id)
            && entry
                .session
                .as_ref()
                .is_some_and(|s| s.id == msg.session_id)
        {
            entry.session = None;
            // The grace starts now: its leases are re-queued if it does not come back in time.
            entry.last_seen = Instant::now();
            self.dirty.insert(msg.node_id);
            tracing::warn!(node_id = %msg.node_id, session_id = msg.session_id, "node session closed");
        }
    }
}

/// Accepts validated jobs, all together or none of them: checks each one's feasibility, then
/// the queue limit and the client's cap for all; persists them, dispatches once. A refusal of
/// one job of several names its place ([`CoordinatorError::InBatch`]).
#[derive(Message)]
#[rtype(result = "Result<Vec<Submitted>>")]
pub struct SubmitJobs {
    /// What to render, in order.
    pub specs: Vec<JobSpec>,
    /// Who asks, with their cap on unfinished jobs.
    pub client: ClientId,
    /// Whether the caller waits for the jobs to end (then each `Submitted::done` is set).
    pub wait: bool,
}

/// An accepted job, and, when the submitter waits, where its end arrives.
pub struct Submitted {
    /// The job as accepted (and maybe already leased).
    pub job: JobRecord,
    /// Yields the job when it ends.
    pub done: Option<oneshot::Receiver<Finished>>,
}

/// A job that ended, with its image when it succeeded.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The job in its terminal state.
    pub job: JobRecord,
    /// The image, handed over from the node's result (none after a restart or a failure).
    pub png: Option<Arc<[u8]>>,
}

impl ControlPlane {
    /// Checks every job (LoRA bases, feasibility), then the queue limit and the client's cap on
    /// unfinished jobs for all of them together; accepts all or none.
    fn submit(
        &mut self,
        specs: Vec<JobSpec>,
        client: ClientId,
        wait: bool,
    ) -> Result<Vec<Submitted>> {
        let reject = |metrics: &Metrics, reason: &str| {
            metrics.inc("drover_rejections_total", vec![("reason", reason.into())]);
        };
        let of = specs.len();
        let now = Instant::now();
        for (index, spec) in specs.iter().enumerate() {
            if let Err(e) = self.check_lora_bases(spec) {
                reject(&self.metrics, "lora_family_mismatch");
                return Err(e.in_batch(index, of));
            }
            // Usually some node can serve it: found without building a snapshot; the reasons
            // are only gathered when none can.
            let feasible = self
                .nodes
                .values()
                .any(|e| router::capability(spec, &view_of(e, &self.config, now)).is_ok());
            if let Some(reasons) = (!feasible)
                .then(|| router::feasibility(spec, &self.views(now)).err())
                .flatten()
            {
                reject(&self.metrics, "infeasible");
                return Err(CoordinatorError::Infeasible { reasons }.in_batch(index, of));
            }
        }
        if self.queued_count() + specs.len() > self.config.queue_limit {
            reject(&self.metrics, "queue_full");
            return Err(CoordinatorError::QueueFull {
                limit: self.config.queue_limit,
                retry_after_s: 5,
            });
        }
        let active = self.clients.get(&client.label).copied().unwrap_or(0);
        if client.max_active > 0 && active as usize + specs.len() > client.max_active as usize {
            reject(&self.metrics, "client_active_limit");
            return Err(CoordinatorError::RateLimited {
                message: format!(
                    "client {} has {active} unfinished jobs and its limit is {}",
                    client.label, client.max_active
                ),
                retry_after_s: 5,
            });
        }
        let trace_id = (!client.request_id.is_empty()).then_some(client.request_id);
        let mut accepted = Vec::with_capacity(specs.len());
        for spec in specs {
            let mut job = JobRecord::new(JobId::time_ordered(), spec);
            job.client = Some(client.label.clone());
            job.trace_id = trace_id.clone();
            let id = job.id;
            tracing::info!(job_id = %id, trace_id = job.trace_id.as_deref().unwrap_or(""), "job accepted");
            self.metrics.inc("drover_jobs_accepted_total", vec![]);
            self.track(&job, 1);
            self.enqueue(&job, true);
            // Registered before dispatch: the job may end before the submitter could ask.
            let done = wait.then(|| {
                let (tx, rx) = oneshot::channel();
                self.waiters.entry(id).or_default().push(tx);
                rx
            });
            self.active.insert(id, job);
            accepted.push((id, done));
        }
        self.dispatch();
        // One write per job as it now is: a lease made by this dispatch was written by `lease`;
        // a job still waiting is written here. The submitter's flush comes after these.
        let mut submitted = Vec::with_capacity(accepted.len());
        for (id, done) in accepted {
            let job = self
                .active
                .get(&id)
                .cloned()
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
            if job.state == JobState::Queued {
                self.store.put_job(&job)?;
            }
            submitted.push(Submitted { job, done });
        }
        Ok(submitted)
    }
}

impl Handler<SubmitJobs> for ControlPlane {
    type Result = Result<Vec<Submitted>>;

    fn handle(
        &mut self,
        SubmitJobs {
            specs,
            client,
            wait,
        }: SubmitJobs,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.submit(specs, client, wait)
    }
}

/// Answers a job by id (from memory while active, else from the store).
#[derive(Message)]
#[rtype(result = "Result<Option<JobRecord>>")]
pub struct GetJob(pub JobId);

impl Handler<GetJob> for ControlPlane {
    type Result = Result<Option<JobRecord>>;

    fn handle(&mut self, GetJob(id): GetJob, _: &mut Context<Self>) -> Self::Result {
        match self.active.get(&id) {
            Some(job) => Ok(Some(job.clone())),
            None => self.store.job(id),
        }
    }
}

/// Answers a receiver that yields the job once it reaches a terminal state.
#[derive(Message)]
#[rtype(result = "Result<oneshot::Receiver<Finished>>")]
pub struct WaitJob(pub JobId);

impl Handler<WaitJob> for ControlPlane {
    type Result = Result<oneshot::Receiver<Finished>>;

    fn handle(&mut self, WaitJob(id): WaitJob, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.active.contains_key(&id) {
            self.waiters.entry(id).or_default().push(tx);
        } else {
            let job = self
                .store
                .job(id)?
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
            let _ = tx.send(Finished { job, png: None });
        }
        Ok(rx)
    }
}

/// A node as shown by `GET /v1/nodes`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// The registry record.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// `online`, `draining` or `offline`.
    pub state: &'static str,
    /// Heartbeats are late (the node gets no new work until they resume).
    pub suspect: bool,
    /// Jobs leased to the node now.
    pub running: usize,
    /// Milliseconds since the node was last heard from.
    pub last_seen_ms_ago: u64,
    /// Speed measured from its results (EWMA, pixel-steps per second), once it has some; the
    /// router uses it instead of the advertised `pixel_steps_per_second`.
    pub measured_pixel_steps_per_second: Option<f64>,
}

/// Lists every registered node with its live state.
#[derive(Message)]
#[rtype(result = "Vec<NodeStatus>")]
pub struct ListNodes;

impl Handler<ListNodes> for ControlPlane {
    type Result = MessageResult<ListNodes>;

    fn handle(&mut self, _: ListNodes, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.node_statuses())
    }
}

impl ControlPlane {
    /// Every registered node with its live state, by name.
    fn node_statuses(&self) -> Vec<NodeStatus> {
        let now = Instant::now();
        let mut out: Vec<NodeStatus> = self
            .nodes
            .values()
            .map(|entry| {
                let view = self.node_view(entry, now);
                let state = match (view.online, entry.record.draining) {
                    (false, _) => "offline",
                    (true, true) => "draining",
                    (true, false) => "online",
                };
                NodeStatus {
                    record: entry.record.clone(),
                    state,
                    suspect: view.suspect,
                    running: entry.running.len(),
                    last_seen_ms_ago: now.saturating_duration_since(entry.last_seen).as_millis()
                        as u64,
                    measured_pixel_steps_per_second: entry.measured,
                }
            })
            .collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }
}

/// Unfinished jobs the dashboard lists at most.
const DASHBOARD_JOBS: usize = 100;

/// What the dashboard shows, from one look at the control plane.
#[derive(Debug, Serialize)]
pub struct DashboardData {
    /// Every node with its live state.
    pub nodes: Vec<NodeStatus>,
    /// Unfinished jobs, oldest first (at most 100).
    pub jobs: Vec<JobRecord>,
    /// Unfinished jobs in all.
    pub unfinished: usize,
    /// Why each listed queued job is waiting: every node's reason for not taking it now.
    pub waiting: HashMap<JobId, Vec<router::NodeSkip>>,
    /// Recently finished jobs, newest first.
    pub recent: Vec<JobRecord>,
    /// The last hour, oldest sample first.
    pub history: Vec<Sample>,
    /// Milliseconds between samples.
    pub history_period_ms: u64,
}

/// Answers the dashboard's data.
#[derive(Message)]
#[rtype(result = "DashboardData")]
pub struct GetDashboard;

impl Handler<GetDashboard> for ControlPlane {
    type Result = MessageResult<GetDashboard>;

    fn handle(&mut self, _: GetDashboard, _: &mut Context<Self>) -> Self::Result {
        let mut jobs: Vec<&JobRecord> = self.active.values().collect();
        jobs.sort_by_key(|j| (j.created_ms, j.id));
        jobs.truncate(DASHBOARD_JOBS);
        let views = self.views(Instant::now());
        let waiting = jobs
            .iter()
            .filter(|j| j.state == JobState::Queued)
            .filter_map(|j| {
                router::pick(&j.spec, &views, 0)
                    .err()
                    .map(|reasons| (j.id, reasons))
            })
            .collect();
        MessageResult(DashboardData {
            nodes: self.node_statuses(),
            jobs: jobs.into_iter().cloned().collect(),
            unfinished: self.active.len(),
            waiting,
            recent: self.recent.iter().rev().cloned().collect(),
            history: self.history.samples(),
            history_period_ms: self.history.period().as_millis() as u64,
        })
    }
}

/// Cancels a job: a queued job is removed from the queue; a running one is stopped on its node at
/// the next step (its late result, if any, is dropped by fencing).
#[derive(Message)]
#[rtype(result = "Result<JobRecord>")]
pub struct CancelJob(pub JobId);

impl Handler<CancelJob> for ControlPlane {
    type Result = Result<JobRecord>;

    fn handle(&mut self, CancelJob(id): CancelJob, _: &mut Context<Self>) -> Self::Result {
        if !self.active.contains_key(&id) {
            return match self.store.job(id)? {
                Some(job) => Err(CoordinatorError::Conflict(format!(
                    "job {id} already ended ({})",
                    job.state
                ))),
                None => Err(CoordinatorError::NotFound(format!("job {id}"))),
            };
        }
        self.cancel_on_node(id);
        self.finish(
            id,
            JobState::Cancelled,
            Some("cancelled by a client".into()),
            None,
        )?;
        tracing::info!(job_id = %id, "job cancelled");
        self.dispatch();
        self.store
            .job(id)?
            .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))
    }
}

/// Sets a node's draining flag: a draining node finishes its work and takes nothing new.
#[derive(Message)]
#[rtype(result = "Result<NodeRecord>")]
pub struct SetDraining {
    /// The node.
    pub node_id: NodeId,
    /// Drain (true) or resume (false).
    pub draining: bool,
}

impl Handler<SetDraining> for ControlPlane {
    type Result = Result<NodeRecord>;

    fn handle(&mut self, msg: SetDraining, _: &mut Context<Self>) -> Self::Result {
        let entry = self
            .nodes
            .get_mut(&msg.node_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("node {}", msg.node_id)))?;
        entry.record.draining = msg.draining;
        self.dirty.insert(msg.node_id);
        self.store.put_node(&entry.record)?;
        tracing::info!(node_id = %msg.node_id, draining = msg.draining, "node drain changed");
        let record = entry.record.clone();
        self.dispatch();
        Ok(record)
    }
}

/// Renders `GET /metrics`: the recorded series plus gauges of the current state.
#[derive(Message)]
#[rtype(result = "String")]
pub struct RenderMetrics;

impl Handler<RenderMetrics> for ControlPlane {
    type Result = String;

    fn handle(&mut self, _: RenderMetrics, _: &mut Context<Self>) -> Self::Result {
        let mut depth: std::collections::BTreeMap<(&'static str, String), u64> =
            std::collections::BTreeMap::new();
        for job in self.active.values() {
            let family = match &job.spec.model {
                Some(ModelSelector::Family(f)) => f.to_string(),
                Some(ModelSelector::ModelId(_)) => "model_id".to_string(),
                None => "any".to_string(),
            };
            *depth.entry((job.state.as_str(), family)).or_default() += 1;
        }
        let mut gauges: Vec<Gauge> = depth
            .into_iter()
            .map(|((state, family), n)| Gauge {
                name: "drover_queue_depth",
                help: "Unfinished jobs by state and requested family.",
                labels: vec![("state", state.into()), ("family", family)],
                value: n as f64,
            })
            .collect();
        let now = Instant::now();
        let views = self.views(now);
        let mut by_state: std::collections::BTreeMap<&'static str, u64> =
            ["online", "suspect", "draining", "offline"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for v in &views {
            let state = if !v.online {
                "offline"
            } else if v.draining {
                "draining"
            } else if v.suspect {
                "suspect"
            } else {
                "online"
            };
            *by_state.entry(state).or_default() += 1;
        }
        gauges.extend(by_state.into_iter().map(|(state, n)| Gauge {
            name: "drover_nodes",
            help: "Registered nodes by state.",
            labels: vec![("state", state.into())],
            value: n as f64,
        }));
        for v in &views {
            let labels = vec![
                ("node", v.name.to_string()),
                ("family", v.family.to_string()),
            ];
            gauges.push(Gauge {
                name: "drover_node_free_slots",
                help: "Worker slots not running a job.",
                labels: labels.clone(),
                value: f64::from(v.free_slots),
            });
        }
        for v in &views {
            gauges.push(Gauge {
                name: "drover_node_pixel_steps_per_second",
                help: "Speed the node advertised (0 when unknown).",
                labels: vec![("node", v.name.to_string())],
                value: v.pixel_steps_per_second,
            });
        }
        self.metrics.render(&gauges)
    }
}

fn done_event(job: &JobRecord) -> JobEvent {
    JobEvent::Done {
        state: job.state,
        image_url: (job.state == JobState::Succeeded).then(|| format!("/v1/jobs/{}/image", job.id)),
        error: job.error.clone(),
    }
}

/// Opens a live event stream of a job: the events that describe it now, and a receiver of the
/// ones to come (`None` when the job already ended).
#[derive(Message)]
#[rtype(result = "Result<(Vec<JobEvent>, Option<mpsc::UnboundedReceiver<JobEvent>>)>")]
pub struct WatchJob(pub JobId);

impl Handler<WatchJob> for ControlPlane {
    type Result = Result<(Vec<JobEvent>, Option<mpsc::UnboundedReceiver<JobEvent>>)>;

    fn handle(&mut self, WatchJob(id): WatchJob, _: &mut Context<Self>) -> Self::Result {
        let Some(job) = self.active.get(&id) else {
            let job = self
                .store
                .job(id)?
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
            return Ok((vec![done_event(&job)], None));
        };
        let mut now = Vec::new();
        match (&job.lease, job.state) {
            (Some(lease), _) => {
                now.push(JobEvent::Assigned {
                    node_id: lease.node_id,
                    attempt: lease.attempt,
                });
                if let Some((step, total)) = job.progress {
                    now.push(JobEvent::Progress { step, total });
                }
            }
            (None, _) => now.push(JobEvent::Queued {
                position: self.queue_position(id),
            }),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.entry(id).or_default().push(tx);
        Ok((now, Some(rx)))
    }
}

/// Every unfinished job, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<JobRecord>")]
pub struct ListJobs;

impl Handler<ListJobs> for ControlPlane {
    type Result = Vec<JobRecord>;

    fn handle(&mut self, _: ListJobs, _: &mut Context<Self>) -> Self::Result {
        let mut jobs: Vec<JobRecord> = self.active.values().cloned().collect();
        jobs.sort_by_key(|j| (j.created_ms, j.id));
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::job::JobRequest;

    fn register(name: &str) -> RegisterNode {
        RegisterNode(proto::RegisterRequest {
            name: name.into(),
            backend: "sim".into(),
            family: "sd15".into(),
            cross_attention_dim: 768,
            model_id: "m".into(),
            workers: 1,
            max_pixels: 1 << 20,
            loras: vec![proto::LoraInfo {
                name: "ink".into(),
                family: "sd15".into(),
            }],
            version: "test".into(),
            // 64×64 × 1 step in 4 ms: what the results below measure, so speeds stay equal.
            pixel_steps_per_second: 1_024_000.0,
            sizes: Vec::new(),
        })
    }

    fn spec(lora: bool) -> JobSpec {
        let body = if lora {
            r#"{"prompt":"x","size":"64x64","steps":1,"loras":[{"name":"ink"}]}"#
        } else {
            r#"{"prompt":"x","size":"64x64","steps":1}"#
        };
        JobRequest::from_json(body.as_bytes())
            .unwrap()
            .validate(|| 1)
            .unwrap()
    }

    fn client() -> ClientId {
        ClientId {
            label: "test".into(),
            rate_per_min: 0,
            max_active: 0,
            request_id: String::new(),
        }
    }

    /// The job id and lease of the next assignment on a session, if one is waiting.
    fn assignment(rx: &mut SessionReceiver) -> Option<(String, String)> {
        match rx.try_recv().ok()?.ok()?.kind? {
            coordinator_message::Kind::Assignment(a) => Some((a.job_id, a.lease_id)),
            coordinator_message::Kind::Cancel(_) => None,
        }
    }

    #[test]
    fn jobs_go_where_their_lora_set_is_already_merged() {
        actix_rt::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let config = Arc::new(Config::for_tests(dir.path().to_path_buf()));
            let plane = ControlPlane::restore(
                Store::temporary().unwrap(),
                config,
                Arc::new(Metrics::default()),
            )
            .unwrap()
            .start();
            let mut sessions = Vec::new();
            for name in ["a", "b"] {
                let node = plane.send(register(name)).await.unwrap().unwrap();
                let (session, rx) = plane
                    .send(OpenSession {
                        node_id: node.id,
                        running: Vec::new(),
                    })
                    .await
                    .unwrap()
                    .unwrap();
                sessions.push((node.id, session, rx));
            }
            let submit = |lora| {
                plane.send(SubmitJobs {
                    specs: vec![spec(lora)],
                    client: client(),
                    wait: false,
                })
            };
            // Runs one job to the end; answers the index of the node that ran it.
            let mut run = async |lora: bool| {
                submit(lora).await.unwrap().unwrap();
                let (i, (job, lease)) = sessions
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, (_, _, rx))| assignment(rx).map(|a| (i, a)))
                    .expect("an assignment");
                let (node_id, session_id, _) = &sessions[i];
                plane
                    .send(NodeEvent {
                        node_id: *node_id,
                        session_id: *session_id,
                        message: node_message::Kind::Result(proto::JobResult {
                            job_id: job,
                            lease_id: lease,
                            png: vec![1, 2, 3],
                            elapsed_ms: 4,
                        }),
                    })
                    .await
                    .unwrap();
                i
            };
            // The first LoRA job lands on one node, which now has `ink` merged on its worker.
            let inked = run(true).await;
            // From then on, with both nodes free and equally fast, LoRA jobs go to that node and
            // plain jobs to the other, twice in a row each, against what the round robin alone
            // would do (alternate).
            for _ in 0..3 {
                assert_eq!(run(true).await, inked);
                assert_eq!(run(true).await, inked);
                assert_eq!(run(false).await, 1 - inked);
                assert_eq!(run(false).await, 1 - inked);
            }
        });
    }
}
