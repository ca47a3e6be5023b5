//! The control plane: the [`ControlPlane`] actor, which holds the registry, the unfinished jobs
//! and whoever waits for them, and moves messages; the decisions are made elsewhere, by pure
//! functions it calls:
//! - [`jobs`]: the job lifecycle as a state machine that answers the [`Effect`]s to perform;
//! - [`router`]: where a job may and should go;
//! - [`nodes`]: a node's live state ([`NodeState`]) and what the router sees of it;
//! - [`views`]: what the API, the dashboard and the metrics show; [`history`]: the last hour.
//!
//! **Log, then act.** Every handler stages the effects of what it did; at its end the actor hands
//! the durable ones to the [`Store`] (coalesced per job, in order), and only then sends what
//! leaves it: assignments and cancels to nodes, events to watchers, ends to waiters. A restarted
//! coordinator therefore picks up where it stopped: queued jobs stay queued, leases stay with
//! their nodes until they expire or the node is declared offline, and results are accepted only
//! from the current lease holder (fencing).
//!
//! The actor never reads the store: finished jobs are read by the REST layer.

pub mod history;
pub mod idempotency;
pub mod jobs;
mod messages;
pub mod nodes;
pub mod router;
mod views;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::JobSpec;
use tokio::sync::{mpsc, oneshot};

pub use crate::records::ModelResidency;
pub use jobs::{Effect, Finished, JobEvent, NodeReport};
pub use messages::*;
pub use nodes::{NodeRegistration, NodeState, SessionReceiver, ToNode};
pub use views::{DashboardData, NodeStatus};

use crate::config::Config;
use crate::error::Result;
use crate::metrics::{Metrics, Outcome, Reason};
use crate::records::{JobRecord, NodeRecord, now_ms};
use crate::store::Store;
use history::History;
use jobs::{Effects, Grant, Group, JobMetric, Jobs};
use nodes::NodeEntry;
use router::NodeView;

/// Tick interval of the liveness and lease loop.
const LOOP_INTERVAL: Duration = Duration::from_millis(100);
/// Queued jobs (from the front) the demand-driven loading looks at per tick.
const PRELOAD_SCAN: usize = 64;
/// How long a preload order may take before the node may be asked again.
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Finished jobs the dashboard shows.
const RECENT_JOBS: usize = 24;

/// How often the retention sweep runs.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Most finished jobs one retention sweep deletes (a sweep never stalls the control plane long).
const PRUNE_BATCH: usize = 5_000;

/// The actor owning the registry and the queue.
pub struct ControlPlane {
    config: Arc<Config>,
    store: Store,
    nodes: HashMap<NodeId, NodeEntry>,
    /// The unfinished jobs and their lifecycle.
    jobs: Jobs,
    /// Effects staged by the current handler, carried out by [`ControlPlane::commit`].
    staged: Staged,
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
    /// The last hour, for the dashboard's charts.
    history: History,
    /// The most recently finished jobs, newest last.
    recent: VecDeque<JobRecord>,
    /// Recent submissions' idempotency keys.
    keys: idempotency::Keys,
    /// Its own address (once started): the gather window's wake-ups are sent to it.
    me: Option<Addr<Self>>,
    /// When a wake-up is due (ms since epoch), if one is pending.
    wake: Option<u64>,
    /// The fencing tokens' epoch: leases are `LeaseId::fenced(epoch, n)`, n counting up.
    fencing_epoch: u64,
    /// The next lease's `n` (a cell: granting is a read of the actor's state otherwise).
    leases_granted: std::cell::Cell<u64>,
}

/// Effects waiting for the end of a handler: the durable ones coalesced per job (the latest
/// record wins, at the place of the first), then the rest in order.
#[derive(Default)]
struct Staged {
    durable: Vec<Effect>,
    at: HashMap<JobId, usize>,
    messages: Vec<Effect>,
}

impl ControlPlane {
    /// Restores the registry and unfinished jobs from `store` (read here, before the actor
    /// starts; the actor never reads the store).
    pub fn restore(store: Store, config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self> {
        let now = Instant::now();
        let nodes: HashMap<NodeId, NodeEntry> = store
            .nodes()?
            .into_iter()
            .map(|record| (record.id, NodeEntry::new(record, now)))
            .collect();
        let unfinished = store.unfinished_jobs()?;
        let since = now_ms().saturating_sub(idempotency::KEY_TTL_MS);
        let keys =
            idempotency::Keys::restore(unfinished.iter().chain(&store.finished_with_keys(since)?));
        let jobs = Jobs::restore(unfinished, config.max_attempts);
        tracing::info!(
            nodes = nodes.len(),
            jobs = jobs.len(),
            "control plane restored"
        );
        let history = History::new(
            Duration::from_millis(config.history_sample_ms),
            Duration::from_secs(3600),
        );
        let mut plane = Self {
            config,
            store,
            nodes,
            jobs,
            staged: Staged::default(),
            waiters: HashMap::new(),
            pivot: NodeId::from_bytes([0; 16]),
            index: router::CapabilityIndex::default(),
            dirty: HashSet::new(),
            next_session: 1,
            last_prune: now,
            metrics,
            watchers: HashMap::new(),
            history,
            recent: VecDeque::with_capacity(RECENT_JOBS),
            keys,
            me: None,
            wake: None,
            // A single coordinator's epoch: its start time (a replica leads with its term:
            // `ControlPlane::fencing_epoch`).
            fencing_epoch: now_ms(),
            leases_granted: std::cell::Cell::new(0),
        };
        // Leases whose node is unknown (removed from the registry) cannot complete.
        let registered: HashSet<NodeId> = plane.nodes.keys().copied().collect();
        let orphans = plane
            .jobs
            .drop_orphans(|id| registered.contains(&id), now_ms());
        plane.stage(orphans);
        plane.commit();
        plane.dirty.extend(registered);
        Ok(plane)
    }

    /// Grants leases in fencing epoch `epoch` (a replicated coordinator's Raft term: every
    /// leader's leases sort after its predecessors').
    #[must_use]
    pub fn fencing_epoch(mut self, epoch: u64) -> Self {
        self.fencing_epoch = epoch;
        self
    }

    /// Stages `effects`: internal bookkeeping (re-indexing, speeds, metrics) at once, durable
    /// records and messages for [`ControlPlane::commit`].
    fn stage(&mut self, effects: Effects) {
        for effect in effects {
            match effect {
                Effect::Reindex(node) => {
                    self.dirty.insert(node);
                }
                Effect::Measured {
                    node_id,
                    pixel_steps_per_second,
                    batch_size,
                } => {
                    if let Some(entry) = self.nodes.get_mut(&node_id) {
                        entry.measure(pixel_steps_per_second, batch_size);
                        self.dirty.insert(node_id);
                    }
                }
                Effect::Metric(metric) => self.count(metric),
                effect if effect.is_durable() => {
                    let id = effect
                        .job_id()
                        .unwrap_or_else(|| JobId::from_bytes([0; 16]));
                    match self.staged.at.get(&id) {
                        Some(&at) => self.staged.durable[at] = effect,
                        None => {
                            self.staged.at.insert(id, self.staged.durable.len());
                            self.staged.durable.push(effect);
                        }
                    }
                }
                message => self.staged.messages.push(message),
            }
        }
    }

    /// Carries out what the handler staged: durable records to the store first, then the
    /// messages, in order.
    fn commit(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        for effect in staged.durable {
            let written = match &effect {
                Effect::Persist(job) => self.store.put_job(job),
                Effect::PersistFinished { job, png } => self.store.finish_job(job, png.clone()),
                _ => Ok(()),
            };
            report(written);
        }
        for effect in staged.messages {
            self.send(effect);
        }
    }

    /// Sends one message effect.
    fn send(&mut self, effect: Effect) {
        match effect {
            Effect::Assign(assignment) => {
                let Some(entry) = self.nodes.get_mut(&assignment.node_id) else {
                    return;
                };
                let set = router::lora_set_key(&assignment.spec.loras);
                router::remember_set(&mut entry.loaded, set, entry.record.workers as usize);
                self.dirty.insert(assignment.node_id);
                let node_id = assignment.node_id;
                let sent = entry
                    .session
                    .as_ref()
                    .is_some_and(|s| s.tx.send(ToNode::Assign(Box::new(assignment))).is_ok());
                if !sent {
                    // The lease stands: it ends when the node is declared offline or expires.
                    tracing::warn!(node_id = %node_id, "session closed while leasing");
                }
            }
            Effect::CancelOnNode {
                node_id,
                job_id,
                lease_id,
            } => {
                if let Some(session) = self.nodes.get(&node_id).and_then(|n| n.session.as_ref()) {
                    let _ = session.tx.send(ToNode::Cancel { job_id, lease_id });
                }
            }
            Effect::Event { job_id, event } => self.notify(job_id, event),
            Effect::Ended(finished) => self.ended(finished),
            // Durable and internal effects never reach here (see `stage`).
            _ => {}
        }
    }

    /// Sends `event` to every live stream of `job_id`, forgetting closed ones.
    fn notify(&mut self, job_id: JobId, event: JobEvent) {
        if let Some(list) = self.watchers.get_mut(&job_id) {
            list.retain(|tx| tx.send(event.clone()).is_ok());
        }
    }

    /// A job ended: its watchers get the last event (and their streams end), its waiters the
    /// job and image; the dashboard's lists move. On a replicated coordinator, watchers and
    /// waiters hear of the end once the log has committed it (a leader that dies before then
    /// has told no client of an end the next leader does not know).
    fn ended(&mut self, finished: Finished) {
        let job_id = finished.job.id;
        self.history
            .finished(finished.job.state == crate::records::JobState::Succeeded);
        if self.recent.len() == RECENT_JOBS {
            self.recent.pop_front();
        }
        self.recent.push_back(finished.job.clone());
        let watchers = self.watchers.remove(&job_id).unwrap_or_default();
        let waiters = self.waiters.remove(&job_id).unwrap_or_default();
        let tell = move || {
            let done = JobEvent::done(&finished.job);
            for tx in watchers {
                let _ = tx.send(done.clone());
            }
            for waiter in waiters {
                let _ = waiter.send(finished.clone());
            }
        };
        match self.store.commit_point() {
            None => tell(),
            Some(committed) => {
                actix::spawn(async move {
                    match committed.await {
                        Ok(()) => tell(),
                        Err(e) => {
                            tracing::warn!(job_id = %job_id, error = %e, "end not committed: its clients are not told")
                        }
                    }
                });
            }
        }
    }

    fn count(&self, metric: JobMetric) {
        let m = &self.metrics;
        match metric {
            JobMetric::Accepted => {
                m.accepted.inc();
            }
            JobMetric::QueueWait(s) => m.queue_wait.observe(s),
            JobMetric::Requeued(reason) => {
                m.requeues.get_or_create(&Reason { reason }).inc();
            }
            JobMetric::LeaseExpired => {
                m.lease_expiries.inc();
            }
            JobMetric::Batch { node_id, size } => {
                if let Some(entry) = self.nodes.get(&node_id) {
                    m.batch(&entry.record.name, size);
                }
            }
            JobMetric::Finished {
                state,
                end_to_end_s,
                run_s,
            } => {
                if let Some(s) = end_to_end_s {
                    m.end_to_end.observe(s);
                }
                if let Some(s) = run_s {
                    m.run.observe(s);
                }
                let outcome = Outcome {
                    outcome: state.as_str(),
                };
                m.finished.get_or_create(&outcome).inc();
            }
        }
    }

    /// Brings the capability index up to date with every dirty node.
    fn refresh_index(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let now = Instant::now();
        for id in std::mem::take(&mut self.dirty) {
            let leases = self.jobs.groups_on(id);
            let member = self.nodes.get_mut(&id).and_then(|entry| {
                entry.status = entry.status_at(&self.config, now);
                router::Member::of(&entry.view(&self.config, now, leases))
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
                ..entry.view(&self.config, Instant::now(), self.jobs.groups_on(*id))
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

    /// What the router sees of every node at `now`, by id.
    fn views(&self, now: Instant) -> Vec<NodeView<'_>> {
        let mut views: Vec<_> = self
            .nodes
            .values()
            .map(|e| e.view(&self.config, now, self.jobs.groups_on(e.record.id)))
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    /// Places queued jobs on free eligible workers ([`router::plan_dispatch`] over the capability
    /// index, in queue order, each with the later jobs of its batch key a batching node can take
    /// with it), then leases each lease group.
    fn dispatch(&mut self) {
        if self.jobs.queued() == 0 {
            return;
        }
        self.refresh_index();
        let now = Instant::now();
        let (nodes, config, jobs) = (&self.nodes, &self.config, &self.jobs);
        let view = |id: NodeId| {
            nodes
                .get(&id)
                .map(|e| e.view(config, now, jobs.groups_on(id)))
        };
        let now_ms = now_ms();
        // What is loaded where, worked out only when a job would make a node load its model.
        let loaded = std::cell::OnceCell::new();
        let capable = |job: JobId, spec: &JobSpec, id: NodeId| {
            let v = view(id)?;
            let fit = router::fit_on(spec, &v)?;
            if fit.loaded {
                return Some(fit);
            }
            let waited = jobs
                .get(&job)
                .map_or(0, |j| now_ms.saturating_sub(j.created_ms));
            let elsewhere = loaded
                .get_or_init(|| {
                    router::LoadedModels::of(
                        nodes
                            .values()
                            .map(|e| e.view(config, now, jobs.groups_on(e.record.id))),
                    )
                })
                .serves(spec);
            router::may_load(waited, fit.load_ms, elsewhere).then_some(fit)
        };
        let batch_key =
            |spec: &JobSpec, id: NodeId| view(id).and_then(|v| router::batch_key(spec, &v));
        // The gather window: a job accepted less than `gather_ms` ago, never leased, may wait.
        let gather = config.gather_ms;
        let release = |id: &JobId| {
            jobs.get(id)
                .filter(|j| j.attempts.is_empty())
                .map(|j| j.created_ms.saturating_add(gather))
        };
        let hold = |id: JobId| gather > 0 && release(&id).is_some_and(|at| at > now_ms);
        let round = router::plan_dispatch(
            &mut self.index,
            jobs.queue(),
            self.pivot,
            capable,
            batch_key,
            hold,
            next_id,
        );
        let wake = round.held.iter().filter_map(release).min();
        self.pivot = round.pivot;
        if let Some(at) = wake {
            self.wake_at(at, now_ms);
        }
        for (node_id, group) in round.groups {
            // The lease re-indexes the node from its entry, whatever happens to the lease.
            self.dirty.insert(node_id);
            let size = group.len() as u32;
            let mut led_by = None;
            for job_id in group {
                let Some((mut grant, model)) = self.grant(job_id, node_id, size, now_ms) else {
                    continue;
                };
                grant.group = *led_by.get_or_insert(Group::led_by(grant.lease_id, size));
                let mut effects = self.jobs.lease(job_id, grant, now_ms);
                for effect in &mut effects {
                    if let Effect::Assign(a) = effect {
                        a.model_id.clone_from(&model);
                    }
                }
                if let Some(entry) = self.nodes.get_mut(&node_id) {
                    entry.assume_resident(&model);
                }
                self.stage(effects);
            }
        }
    }

    /// A lease of `job_id` on `node_id` in a group of `batch` jobs granted at `now_ms`: a fresh
    /// id, the size, steps and guidance the node renders with (the model's defaults for what the
    /// job left out), a deadline of the floor plus four times the node's estimated time for a
    /// batch that size, and a group of its own (the caller sets the group it shares).
    fn grant(
        &self,
        job_id: JobId,
        node_id: NodeId,
        batch: u32,
        now_ms: u64,
    ) -> Option<(Grant, String)> {
        let entry = self.nodes.get(&node_id)?;
        let record = &entry.record;
        let spec = &self.jobs.get(&job_id)?.spec;
        let view = entry.view(&self.config, Instant::now(), 0);
        let model = router::choose_model(spec, &view).ok()?.facts;
        let size = spec.size_on(model.family, model.sizes);
        let default_sampler = model.samplers.first().copied();
        let steps = spec.steps_with(default_sampler);
        let guidance_scale = spec.guidance_with(default_sampler);
        let floor = Duration::from_millis(self.config.lease_floor_ms);
        let speed = entry.speed_in_batch(batch);
        let mut duration = if speed > 0.0 {
            let calls = spec.model_calls_with(default_sampler, steps);
            let work = size.pixels() as f64 * f64::from(calls);
            floor + Duration::from_secs_f64(4.0 * work / speed)
        } else {
            floor
        };
        if let Some(upscale) = &spec.upscale {
            duration += upscale_allowance(upscale, size, &record.upscalers, floor);
        }
        let n = self.leases_granted.get();
        self.leases_granted.set(n + 1);
        let lease_id = LeaseId::fenced(self.fencing_epoch, n);
        let grant = Grant {
            node_id,
            lease_id,
            size,
            steps,
            guidance_scale,
            deadline_ms: now_ms + duration.as_millis() as u64,
            group: Group::alone(lease_id),
        };
        Some((grant, model.id.to_string()))
    }

    /// Dispatches again at `at` (ms since epoch), when the gather window of a held job ends;
    /// nothing when a wake-up at or before `at` is already pending (the dispatch it runs sets
    /// the next one).
    fn wake_at(&mut self, at: u64, now_ms: u64) {
        if self.wake.is_some_and(|pending| pending <= at) {
            return;
        }
        let Some(me) = self.me.clone() else {
            return;
        };
        self.wake = Some(at);
        let wait = Duration::from_millis(at.saturating_sub(now_ms));
        actix::spawn(async move {
            actix::clock::sleep(wait).await;
            me.do_send(messages::Wake);
        });
    }

    /// Liveness, lease deadlines, queue expiry, retention and the dashboard's samples.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.history.due(now) {
            let queued = self.jobs.queued();
            let running = self.jobs.len() - queued;
            let mut speeds: Vec<(String, f64)> = self
                .nodes
                .values()
                .filter(|e| e.session.is_some())
                .map(|e| (e.record.name.clone(), e.speed()))
                .collect();
            speeds.sort_by(|a, b| a.0.cmp(&b.0));
            self.history.sample(now, now_ms(), queued, running, speeds);
        }
        let grace = self.config.offline_grace();
        let wall = now_ms();
        let mut lost = Vec::new();
        for (id, entry) in self.nodes.iter_mut() {
            let silent = now.saturating_duration_since(entry.last_seen);
            if silent > grace {
                if entry.session.take().is_some() {
                    tracing::warn!(node_id = %entry.record.id, name = %entry.record.name, silent_ms = silent.as_millis() as u64, "node offline: heartbeats stopped");
                }
                if self.jobs.leases_on(*id) > 0 {
                    lost.push(*id);
                }
            }
            // Time moves nodes to suspect and offline: re-index the ones whose state moved.
            if entry.status_at(&self.config, now) != entry.status {
                self.dirty.insert(*id);
            }
        }
        for node_id in lost {
            let effects = self.jobs.node_lost(node_id, wall);
            self.stage(effects);
        }
        let effects = self.jobs.expire(wall, self.config.queue_expiry_s);
        self.stage(effects);
        let retention_ms = self.config.result_retention_s.saturating_mul(1000);
        if now.saturating_duration_since(self.last_prune) >= PRUNE_INTERVAL {
            self.last_prune = now;
            self.keys.prune(wall);
            if retention_ms > 0 {
                // The store's writer runs the sweep, in order with every other write, and logs it.
                report(
                    self.store
                        .prune_finished(wall.saturating_sub(retention_ms), PRUNE_BATCH),
                );
            }
        }
        self.dispatch();
        self.preload(now, wall);
        self.commit();
    }

    /// Demand-driven loading: for queued jobs older than `DROVER_PRELOAD_AFTER_MS` whose model
    /// is loaded only on busy nodes, asks the idle node that loads it fastest to load it ahead
    /// ([`router::preload_target`]); one order in flight per node (until its residency shows the
    /// model, or a minute passes).
    fn preload(&mut self, now: Instant, now_ms: u64) {
        let after = self.config.preload_after_ms;
        if after == 0 || self.jobs.queued() == 0 {
            return;
        }
        for entry in self.nodes.values_mut() {
            let done = entry.preloading.as_ref().is_some_and(|(model, since)| {
                entry.resident.as_ref().is_some_and(|r| r.contains(model))
                    || now.saturating_duration_since(*since) > PRELOAD_TIMEOUT
            });
            if done {
                entry.preloading = None;
            }
        }
        if !self
            .nodes
            .values()
            .any(|e| e.residency.is_some() && e.preloading.is_none())
        {
            return;
        }
        let views = self.views(now);
        let mut orders: Vec<(NodeId, String)> = Vec::new();
        for (job_id, spec) in self.jobs.queue().take(PRELOAD_SCAN) {
            let waited = self
                .jobs
                .get(&job_id)
                .map_or(0, |j| now_ms.saturating_sub(j.created_ms));
            if waited < after {
                continue;
            }
            let free: Vec<NodeView<'_>> = views
                .iter()
                .filter(|v| {
                    self.nodes
                        .get(&v.id)
                        .is_some_and(|e| e.preloading.is_none())
                        && !orders.iter().any(|(n, _)| *n == v.id)
                })
                .cloned()
                .collect();
            if let Some((node_id, model)) = router::preload_target(spec, &free) {
                orders.push((node_id, model.to_ascii_lowercase()));
            }
        }
        for (node_id, model_id) in orders {
            let Some(entry) = self.nodes.get_mut(&node_id) else {
                continue;
            };
            if let Some(session) = &entry.session {
                let _ = session.tx.send(ToNode::Model {
                    model_id: model_id.clone(),
                    action: drover_shared::models::ModelAction::Load,
                });
                tracing::info!(node_id = %node_id, model_id = %model_id, "model preload ordered for waiting jobs");
                entry.preloading = Some((model_id, now));
            }
        }
    }

    /// Registers (or re-registers) a node; answers its record.
    fn register(&mut self, mut registration: NodeRegistration) -> Result<NodeRecord> {
        let residency = registration.residency.take();
        let existing = self
            .nodes
            .values()
            .find(|e| e.record.name == registration.name)
            .map(|e| e.record.clone());
        let record = registration.into_record(existing.as_ref(), now_ms());
        self.store.put_node(&record)?;
        tracing::info!(node_id = %record.id, name = %record.name, family = %record.family, backend = %record.backend, workers = record.workers, "node registered");
        let entry = self
            .nodes
            .entry(record.id)
            .or_insert_with(|| NodeEntry::new(record.clone(), Instant::now()));
        entry.record = record.clone();
        entry.set_residency(residency);
        self.dirty.insert(record.id);
        Ok(record)
    }
}

/// The id after `id`, where the next round-robin search among equals starts.
fn next_id(id: NodeId) -> NodeId {
    NodeId::from_bytes(
        u128::from_be_bytes(*id.as_bytes())
            .wrapping_add(1)
            .to_be_bytes(),
    )
}

fn report<E: std::fmt::Display>(result: std::result::Result<(), E>) {
    if let Err(e) = result {
        tracing::error!(error = %e, "control plane store write failed");
    }
}

impl Actor for ControlPlane {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.me = Some(ctx.address());
        ctx.run_interval(LOOP_INTERVAL, |plane, _| plane.tick());
    }
}

/// The extra lease time a job's upscale gets on a node with `upscalers`: four times its
/// estimate from the upscaler's measured speed (every pass's input pixels), or the floor again
/// when the node measured none.
fn upscale_allowance(
    upscale: &drover_shared::job::UpscaleSpec,
    size: drover_shared::job::Size,
    upscalers: &[crate::records::UpscalerAdvert],
    floor: Duration,
) -> Duration {
    let Some(upscaler) = router::upscaler_for(upscale, upscalers) else {
        return floor;
    };
    let Ok(plan) = upscale.plan(upscaler.scale) else {
        return floor;
    };
    if upscaler.ms_per_megapixel <= 0.0 {
        return floor;
    }
    let growth = f64::from(upscaler.scale * upscaler.scale);
    let megapixels: f64 = (0..plan.passes)
        .map(|k| size.pixels() as f64 / 1e6 * growth.powi(k as i32))
        .sum();
    Duration::from_secs_f64(4.0 * megapixels * upscaler.ms_per_megapixel / 1000.0)
}
