//! The control plane's messages and their handlers. Handlers are thin: they call the job state
//! machine, the registry or a view, stage the effects and commit them.

use std::time::Instant;

use actix::prelude::*;
use drover_shared::family::ModelFamily;
use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::{JobSpec, ModelSelector};
use tokio::sync::{mpsc, oneshot};

use super::jobs::{Finished, JobEvent, NodeReport};
use super::nodes::ToNode;
use super::nodes::{NodeRegistration, Session, SessionReceiver};
use super::views::{DashboardData, NodeStatus};
use super::{ControlPlane, router};
use crate::error::{CoordinatorError, Result};
use crate::limits::ClientId;
use crate::metrics::FarmGauges;
use crate::records::ModelResidency;
use crate::records::{JobRecord, NodeRecord, now_ms};
use drover_shared::models::ModelAction;

/// A gather window ended: dispatch again (sent by the control plane to itself).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Wake;

impl Handler<Wake> for ControlPlane {
    type Result = ();

    fn handle(&mut self, _: Wake, _: &mut Context<Self>) {
        self.wake = None;
        self.dispatch();
        self.commit();
    }
}

/// Registers (or re-registers) a node; answers its record.
#[derive(Message)]
#[rtype(result = "Result<NodeRecord>")]
pub struct RegisterNode(pub NodeRegistration);

impl Handler<RegisterNode> for ControlPlane {
    type Result = Result<NodeRecord>;

    fn handle(
        &mut self,
        RegisterNode(registration): RegisterNode,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.register(registration)
    }
}

/// Opens a node's session; answers the session id and the stream of messages for the node.
#[derive(Message)]
#[rtype(result = "Result<(u64, SessionReceiver)>")]
pub struct OpenSession {
    /// The node (must be registered).
    pub node_id: NodeId,
    /// The (job, lease) pairs the node says it is still running.
    pub running: Vec<(JobId, LeaseId)>,
    /// Whether the node process just started (its first session): a leased job it does not
    /// list was lost with it, and the attempt counts.
    pub fresh: bool,
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
        let effects = self
            .jobs
            .reconcile(msg.node_id, &msg.running, msg.fresh, now_ms());
        self.stage(effects);
        self.dispatch();
        self.commit();
        Ok((session_id, rx))
    }
}

/// Something a node sent on its session: a heartbeat (`report: None`) or a report about a job.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeEvent {
    /// The node.
    pub node_id: NodeId,
    /// The session it came on.
    pub session_id: u64,
    /// The report, when it is one.
    pub report: Option<NodeReport>,
    /// The node's models' residency, when it reports it (heartbeats of nodes with a budget).
    pub residency: Option<Vec<ModelResidency>>,
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
            if let Some(report) = &msg.report
                && !matches!(report, NodeReport::Progress { .. })
            {
                let (job_id, _) = report.lease();
                tracing::info!(node_id = %msg.node_id, session_id = msg.session_id, job_id = %job_id, "late report from a closed session dropped");
            }
            return;
        }
        entry.last_seen = Instant::now();
        // A heartbeat after a silence brings a suspect node back.
        if entry.status_at(&self.config, entry.last_seen) != entry.status {
            self.dirty.insert(msg.node_id);
        }
        if msg.residency.is_some() && entry.set_residency(msg.residency) {
            self.dirty.insert(msg.node_id);
        }
        let Some(report) = msg.report else {
            return;
        };
        let frees_slot = !matches!(report, NodeReport::Progress { .. });
        let effects = self.jobs.report(msg.node_id, report, now_ms());
        self.stage(effects);
        if frees_slot {
            self.dispatch();
        }
        self.commit();
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
/// the queue limit and the client's cap for all; logs them, dispatches once. A refusal of one
/// job of several names its place ([`CoordinatorError::InBatch`]).
#[derive(Message)]
#[rtype(result = "Result<Vec<Submitted>>")]
pub struct SubmitJobs {
    /// What to render, in order.
    pub specs: Vec<JobSpec>,
    /// Who asks, with their cap on unfinished jobs.
    pub client: ClientId,
    /// Whether the caller waits for the jobs to end (then each `Submitted::done` is set).
    pub wait: bool,
    /// The submission's `Idempotency-Key` and fingerprint, when it has one.
    pub key: Option<SubmissionKey>,
}

/// A submission's `Idempotency-Key` and its fingerprint (`idempotency::fingerprint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmissionKey {
    /// The key, as sent.
    pub key: String,
    /// The request's fingerprint.
    pub fingerprint: String,
}

/// What `client` already submitted under a key (see [`super::idempotency::Keys::lookup`]).
#[derive(Message)]
#[rtype(result = "super::idempotency::Lookup")]
pub struct LookupKey {
    /// The client's label.
    pub client: String,
    /// The key and fingerprint.
    pub key: SubmissionKey,
}

impl Handler<LookupKey> for ControlPlane {
    type Result = MessageResult<LookupKey>;

    fn handle(&mut self, msg: LookupKey, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.keys
                .lookup(&msg.client, &msg.key.key, &msg.key.fingerprint),
        )
    }
}

/// An accepted job, and, when the submitter waits, where its end arrives.
pub struct Submitted {
    /// The job as accepted (and maybe already leased).
    pub job: JobRecord,
    /// Yields the job when it ends.
    pub done: Option<oneshot::Receiver<Finished>>,
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

    /// Checks that some registered node could serve `spec` (found without building a snapshot;
    /// the reasons are only gathered when none can).
    fn check_feasible(&self, spec: &JobSpec, now: Instant) -> Result<()> {
        let feasible = self.nodes.values().any(|e| {
            router::capability(
                spec,
                &e.view(&self.config, now, self.jobs.groups_on(e.record.id)),
            )
            .is_ok()
        });
        match (!feasible)
            .then(|| router::feasibility(spec, &self.views(now)).err())
            .flatten()
        {
            Some(reasons) => Err(CoordinatorError::Infeasible { reasons }),
            None => Ok(()),
        }
    }

    fn submit(
        &mut self,
        specs: Vec<JobSpec>,
        client: ClientId,
        wait: bool,
        key: Option<SubmissionKey>,
    ) -> Result<Vec<Submitted>> {
        let reject = |plane: &Self, reason: &'static str| plane.metrics.reject(reason);
        // A key taken since the caller looked it up: by a concurrent submission with it.
        if let Some(k) = &key
            && self.keys.lookup(&client.label, &k.key, &k.fingerprint)
                != super::idempotency::Lookup::New
        {
            return Err(CoordinatorError::Conflict(
                "a submission with this Idempotency-Key was accepted meanwhile; send it again to get its jobs"
                    .into(),
            ));
        }
        let of = specs.len();
        let now = Instant::now();
        let mut specs = specs;
        for (index, spec) in specs.iter_mut().enumerate() {
            if let Err(e) = self.check_lora_bases(spec) {
                reject(self, "lora_family_mismatch");
                return Err(e.in_batch(index, of));
            }
            if let Err(e) = self.check_feasible(spec, now) {
                // No node both renders and upscales it: split, when one renders and one
                // upscales.
                if router::follow_up_feasible(spec, &self.views(now))
                    && let Some(upscale) = spec.upscale.as_mut()
                {
                    upscale.elsewhere = true;
                    continue;
                }
                reject(self, "infeasible");
                return Err(e.in_batch(index, of));
            }
        }
        let trace_id = (!client.request_id.is_empty()).then_some(client.request_id.clone());
        let now_ms = now_ms();
        let records: Vec<JobRecord> = specs
            .into_iter()
            .map(|spec| {
                let mut job = JobRecord::new(JobId::time_ordered(), spec);
                job.created_ms = now_ms;
                job.updated_ms = now_ms;
                job.client = Some(client.label.clone());
                job.trace_id = trace_id.clone();
                job
            })
            .collect();
        let mut records = records;
        if let Some(k) = &key {
            for (index, job) in records.iter_mut().enumerate() {
                job.idempotency = Some(crate::records::Idempotency {
                    key: k.key.clone(),
                    fingerprint: k.fingerprint.clone(),
                    index: index as u32,
                });
            }
        }
        let ids: Vec<JobId> = records.iter().map(|j| j.id).collect();
        let effects = match self
            .jobs
            .submit(records, self.config.queue_limit, client.max_active)
        {
            Ok(effects) => effects,
            Err(e) => {
                let reason = match e {
                    CoordinatorError::QueueFull { .. } => "queue_full",
                    _ => "client_active_limit",
                };
                reject(self, reason);
                return Err(e);
            }
        };
        for id in &ids {
            tracing::info!(job_id = %id, trace_id = trace_id.as_deref().unwrap_or(""), "job accepted");
        }
        if let Some(k) = &key {
            self.keys
                .insert(&client.label, &k.key, &k.fingerprint, &ids, now_ms);
        }
        self.stage(effects);
        // Registered before anything leaves: the job may end before the submitter could ask.
        let mut done: Vec<Option<oneshot::Receiver<Finished>>> = ids
            .iter()
            .map(|id| {
                wait.then(|| {
                    let (tx, rx) = oneshot::channel();
                    self.waiters.entry(*id).or_default().push(tx);
                    rx
                })
            })
            .collect();
        self.dispatch();
        self.commit();
        let mut submitted = Vec::with_capacity(ids.len());
        for (id, done) in ids.iter().zip(done.drain(..)) {
            let job = self
                .jobs
                .get(id)
                .cloned()
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
            submitted.push(Submitted { job, done });
        }
        Ok(submitted)
    }
}

impl Handler<SubmitJobs> for ControlPlane {
    type Result = Result<Vec<Submitted>>;

    fn handle(&mut self, msg: SubmitJobs, _: &mut Context<Self>) -> Self::Result {
        self.submit(msg.specs, msg.client, msg.wait, msg.key)
    }
}

/// Takes back jobs whose acceptance could not be made durable (see [`Jobs::revoke`]).
///
/// [`Jobs::revoke`]: super::jobs::Jobs::revoke
#[derive(Message)]
#[rtype(result = "()")]
pub struct RevokeJobs {
    /// The jobs.
    pub ids: Vec<JobId>,
    /// Why they could not be stored.
    pub reason: String,
}

impl Handler<RevokeJobs> for ControlPlane {
    type Result = ();

    fn handle(&mut self, msg: RevokeJobs, _: &mut Context<Self>) {
        self.keys.revoke(&msg.ids);
        let effects = self.jobs.revoke(&msg.ids, &msg.reason, now_ms());
        self.stage(effects);
        self.dispatch();
        self.commit();
    }
}

/// Answers an unfinished job by id (`None` when it is not unfinished: finished jobs are read
/// from the store by the caller, never on the actor's thread).
#[derive(Message)]
#[rtype(result = "Option<JobRecord>")]
pub struct GetJob(pub JobId);

impl Handler<GetJob> for ControlPlane {
    type Result = Option<JobRecord>;

    fn handle(&mut self, GetJob(id): GetJob, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&id).cloned()
    }
}

/// Answers a receiver that yields an unfinished job once it ends (`None` when it is not
/// unfinished).
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<Finished>>")]
pub struct WaitJob(pub JobId);

impl Handler<WaitJob> for ControlPlane {
    type Result = Option<oneshot::Receiver<Finished>>;

    fn handle(&mut self, WaitJob(id): WaitJob, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&id)?;
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        Some(rx)
    }
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

/// Answers the dashboard's data.
#[derive(Message)]
#[rtype(result = "DashboardData")]
pub struct GetDashboard;

impl Handler<GetDashboard> for ControlPlane {
    type Result = MessageResult<GetDashboard>;

    fn handle(&mut self, _: GetDashboard, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.dashboard())
    }
}

/// Cancels an unfinished job: a queued job leaves the queue; a running one is stopped on its
/// node at the next step (its late result, if any, is fenced off). Answers the cancelled job,
/// or `None` when the job is not unfinished.
#[derive(Message)]
#[rtype(result = "Option<JobRecord>")]
pub struct CancelJob(pub JobId);

impl Handler<CancelJob> for ControlPlane {
    type Result = Option<JobRecord>;

    fn handle(&mut self, CancelJob(id): CancelJob, _: &mut Context<Self>) -> Self::Result {
        let effects = self.jobs.cancel(id, now_ms())?;
        let cancelled = effects.iter().find_map(|e| match e {
            super::Effect::Ended(f) => Some(f.job.clone()),
            _ => None,
        });
        self.stage(effects);
        self.dispatch();
        self.commit();
        cancelled
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
        self.commit();
        Ok(record)
    }
}

/// Sends an order about one of a node's models down its session (`POST
/// /v1/nodes/{id}/models/{model}/{action}`); answers what was sent.
#[derive(Message)]
#[rtype(result = "Result<ModelOrdered>")]
pub struct OrderModel {
    /// The node.
    pub node_id: NodeId,
    /// The model: its id or its name on the node.
    pub model: String,
    /// What to do.
    pub action: ModelAction,
}

/// An order sent to a node.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelOrdered {
    /// The node.
    #[schema(value_type = String)]
    pub node_id: NodeId,
    /// Its name.
    pub node: String,
    /// The model's id.
    pub model_id: String,
    /// The model's name on the node.
    pub model: String,
    /// What it was asked to do. The node carries it out in the background; its residency in
    /// `GET /v1/nodes` shows the outcome.
    pub action: ModelAction,
}

impl Handler<OrderModel> for ControlPlane {
    type Result = Result<ModelOrdered>;

    fn handle(&mut self, msg: OrderModel, _: &mut Context<Self>) -> Self::Result {
        let entry = self
            .nodes
            .get(&msg.node_id)
            .ok_or_else(|| CoordinatorError::NotFound(format!("node {}", msg.node_id)))?;
        let model = entry
            .record
            .catalogue()
            .into_iter()
            .find(|m| m.model_id.eq_ignore_ascii_case(&msg.model) || m.name == msg.model)
            .ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "model {} on node {}",
                    msg.model, entry.record.name
                ))
            })?;
        if entry.residency.is_none() {
            return Err(CoordinatorError::Conflict(format!(
                "node {} keeps its one model loaded (it reports no residency): nothing to {}",
                entry.record.name,
                msg.action.as_str()
            )));
        }
        let session = entry.session.as_ref().ok_or_else(|| {
            CoordinatorError::Conflict(format!("node {} is not connected", entry.record.name))
        })?;
        session
            .tx
            .send(ToNode::Model {
                model_id: model.model_id.clone(),
                action: msg.action,
            })
            .map_err(|_| {
                CoordinatorError::Conflict(format!("node {} is not connected", entry.record.name))
            })?;
        tracing::info!(node_id = %msg.node_id, model_id = %model.model_id, action = msg.action.as_str(), "model order sent");
        Ok(ModelOrdered {
            node_id: msg.node_id,
            node: entry.record.name.clone(),
            model_id: model.model_id,
            model: model.name,
            action: msg.action,
        })
    }
}

/// Answers the gauges of the current state for `GET /metrics`.
#[derive(Message)]
#[rtype(result = "FarmGauges")]
pub struct GetGauges;

impl Handler<GetGauges> for ControlPlane {
    type Result = MessageResult<GetGauges>;

    fn handle(&mut self, _: GetGauges, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.gauges())
    }
}

/// Opens a live event stream of an unfinished job: the events that describe it now, and a
/// receiver of the ones to come (`None` when the job is not unfinished).
#[derive(Message)]
#[rtype(result = "Option<(Vec<JobEvent>, mpsc::UnboundedReceiver<JobEvent>)>")]
pub struct WatchJob(pub JobId);

impl Handler<WatchJob> for ControlPlane {
    type Result = Option<(Vec<JobEvent>, mpsc::UnboundedReceiver<JobEvent>)>;

    fn handle(&mut self, WatchJob(id): WatchJob, _: &mut Context<Self>) -> Self::Result {
        let job = self.jobs.get(&id)?;
        let mut now = Vec::new();
        match &job.lease {
            Some(lease) => {
                now.push(JobEvent::Assigned {
                    node_id: lease.node_id,
                    attempt: lease.attempt,
                });
                if let Some((step, total)) = job.progress {
                    now.push(JobEvent::Progress { step, total });
                }
            }
            None => now.push(JobEvent::Queued {
                position: self.jobs.queue_position(id),
            }),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.entry(id).or_default().push(tx);
        Some((now, rx))
    }
}

/// Every unfinished job, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<JobRecord>")]
pub struct ListJobs;

impl Handler<ListJobs> for ControlPlane {
    type Result = Vec<JobRecord>;

    fn handle(&mut self, _: ListJobs, _: &mut Context<Self>) -> Self::Result {
        self.unfinished_jobs()
    }
}
