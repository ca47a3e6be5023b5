//! Read-only views of the control plane: nodes as `GET /v1/nodes` shows them, the dashboard's
//! snapshot, and the gauges `/metrics` adds to the recorded series.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use drover_shared::ids::JobId;
use drover_shared::job::ModelSelector;
use serde::Serialize;

use super::ControlPlane;
use super::history::Sample;
use super::nodes::NodeState;
use super::router;
use crate::metrics::FarmGauges;
use crate::records::{JobRecord, JobState, NodeRecord};

/// Unfinished jobs the dashboard lists at most.
const DASHBOARD_JOBS: usize = 100;

/// A node as shown by `GET /v1/nodes`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct NodeStatus {
    /// The registry record.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// `online`, `suspect`, `draining` or `offline`.
    pub state: NodeState,
    /// Heartbeats are late (the node gets no new work until they resume).
    pub suspect: bool,
    /// Jobs leased to the node now.
    pub running: usize,
    /// Workers its lease groups keep busy (a group is the jobs of one batch).
    pub busy_workers: usize,
    /// Milliseconds since the node was last heard from.
    pub last_seen_ms_ago: u64,
    /// Speed measured from its results (EWMA, pixel-steps per second), once it has some; the
    /// router uses it instead of the advertised `pixel_steps_per_second`.
    pub measured_pixel_steps_per_second: Option<f64>,
    /// Each job's measured speed (pixel-steps per second of the call it ran in) per batch size
    /// the node has run: what lease deadlines of batches that size are sized from.
    pub measured_by_batch: BTreeMap<u32, f64>,
    /// Its models' residency as last reported (copies loaded, loads, evictions, load time);
    /// absent when the node keeps every model loaded (one model, or a simulation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residency: Option<Vec<crate::records::ModelResidency>>,
    /// Bytes its loaded models take now by its own planning figures (each model's `bytes` times
    /// its copies); absent with `residency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used: Option<u64>,
}

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

impl ControlPlane {
    /// Every registered node with its live state, by name.
    pub(super) fn node_statuses(&self) -> Vec<NodeStatus> {
        let now = Instant::now();
        let mut out: Vec<NodeStatus> = self
            .nodes
            .values()
            .map(|entry| {
                let (_, suspect) = entry.status_at(&self.config, now);
                NodeStatus {
                    record: entry.record.clone(),
                    state: entry.state_at(&self.config, now),
                    suspect,
                    running: self.jobs.leases_on(entry.record.id),
                    busy_workers: self.jobs.groups_on(entry.record.id),
                    last_seen_ms_ago: now.saturating_duration_since(entry.last_seen).as_millis()
                        as u64,
                    measured_pixel_steps_per_second: entry.measured_alone(),
                    measured_by_batch: entry.measured.clone(),
                    memory_used: entry.residency.as_ref().map(|r| {
                        r.iter()
                            .map(|m| {
                                let bytes = entry
                                    .record
                                    .models
                                    .iter()
                                    .find(|a| a.model_id == m.model_id)
                                    .map_or(0, |a| a.bytes);
                                bytes * u64::from(m.copies)
                            })
                            .sum()
                    }),
                    residency: entry.residency.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }

    /// Every unfinished job, oldest first.
    pub(super) fn unfinished_jobs(&self) -> Vec<JobRecord> {
        let mut jobs: Vec<JobRecord> = self.jobs.iter().cloned().collect();
        jobs.sort_by_key(|j| (j.created_ms, j.id));
        jobs
    }

    /// The dashboard's snapshot.
    pub(super) fn dashboard(&self) -> DashboardData {
        let mut jobs: Vec<&JobRecord> = self.jobs.iter().collect();
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
        DashboardData {
            nodes: self.node_statuses(),
            jobs: jobs.into_iter().cloned().collect(),
            unfinished: self.jobs.len(),
            waiting,
            recent: self.recent.iter().rev().cloned().collect(),
            history: self.history.samples(),
            history_period_ms: self.history.period().as_millis() as u64,
        }
    }

    /// Gauges of the current state: queue depth by state and requested family, nodes by state,
    /// free slots and speed per node.
    pub(super) fn gauges(&self) -> FarmGauges {
        let mut depth: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
        for job in self.jobs.iter() {
            let family = match &job.spec.model {
                Some(ModelSelector::Family(f)) => f.to_string(),
                Some(ModelSelector::ModelId(_) | ModelSelector::Name(_)) => "model_id".to_string(),
                None => "any".to_string(),
            };
            *depth.entry((job.state.as_str(), family)).or_default() += 1;
        }
        let now = Instant::now();
        let mut by_state: BTreeMap<NodeState, u64> =
            NodeState::ALL.into_iter().map(|s| (s, 0)).collect();
        for entry in self.nodes.values() {
            *by_state
                .entry(entry.state_at(&self.config, now))
                .or_default() += 1;
        }
        let views = self.views(now);
        FarmGauges {
            queue_depth: depth.into_iter().collect(),
            nodes: by_state
                .into_iter()
                .map(|(state, n)| (state.as_str(), n))
                .collect(),
            free_slots: views
                .iter()
                .map(|v| ((v.name.to_string(), v.family.to_string()), v.free_slots))
                .collect(),
            speed: views
                .iter()
                .map(|v| (v.name.to_string(), v.pixel_steps_per_second))
                .collect(),
            models: self
                .nodes
                .values()
                .flat_map(|e| {
                    e.residency.iter().flatten().map(|m| {
                        let name = e
                            .record
                            .models
                            .iter()
                            .find(|a| a.model_id == m.model_id)
                            .map_or_else(|| m.model_id.clone(), |a| a.name.clone());
                        (
                            (e.record.name.clone(), name),
                            (m.copies, m.loads, m.evictions, m.load_ms_total),
                        )
                    })
                })
                .collect(),
            // The store's side is the REST handler's to fill (the actor never asks the store).
            ..FarmGauges::default()
        }
    }
}
