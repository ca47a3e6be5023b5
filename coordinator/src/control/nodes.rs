//! The registry's live side: each node's record, session, liveness and measured speed, the one
//! place a node's [`NodeState`] is worked out, and what the router sees of a node.

use drover_shared::sampler::Sampler;
use std::collections::BTreeMap;
use std::time::Instant;

use drover_shared::family::ModelFamily;
use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::Size;
use serde::Serialize;
use tokio::sync::mpsc;

use super::jobs::Assignment;
use super::router::NodeView;
use crate::config::Config;
use crate::records::{LoraAdvert, ModelAdvert, ModelResidency, NodeRecord, UpscalerAdvert};

/// Weight of the newest result in a node's measured speed.
const SPEED_EWMA: f64 = 0.3;

/// What the control plane sends down a node's session (the gRPC edge turns it into protobuf).
#[derive(Clone, Debug, PartialEq)]
pub enum ToNode {
    /// Run a job under a lease.
    Assign(Box<Assignment>),
    /// Stop running a job.
    Cancel {
        /// The job.
        job_id: JobId,
        /// The lease it runs under.
        lease_id: LeaseId,
    },
    /// Load, unload, pin or unpin one of its models.
    Model {
        /// The model.
        model_id: String,
        /// What to do.
        action: drover_shared::models::ModelAction,
    },
}

/// Messages the coordinator pushes down a node's session.
pub type SessionSender = mpsc::UnboundedSender<ToNode>;
/// The receiving half handed to the gRPC layer.
pub type SessionReceiver = mpsc::UnboundedReceiver<ToNode>;

/// A node's state, as the API, the dashboard and the metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Connected, heartbeats on time, taking work.
    Online,
    /// Connected but its heartbeats are late: it keeps its leases and takes no new work.
    Suspect,
    /// Connected, finishing its work, taking nothing new.
    Draining,
    /// No session, or silent past the grace.
    Offline,
}

impl NodeState {
    /// Every state, in display order.
    pub const ALL: [Self; 4] = [Self::Online, Self::Suspect, Self::Draining, Self::Offline];

    /// The state of a node that is `online` (has a session, heard from within the grace),
    /// `suspect` (late) and `draining`. Draining wins over suspect: an operator's choice is shown
    /// before a transient one.
    pub fn of(online: bool, suspect: bool, draining: bool) -> Self {
        match (online, draining, suspect) {
            (false, _, _) => Self::Offline,
            (true, true, _) => Self::Draining,
            (true, false, true) => Self::Suspect,
            (true, false, false) => Self::Online,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Suspect => "suspect",
            Self::Draining => "draining",
            Self::Offline => "offline",
        }
    }

    /// Whether the node is connected (online, suspect or draining).
    pub fn is_connected(self) -> bool {
        self != Self::Offline
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's open session.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) tx: SessionSender,
}

/// One registered node as the control plane holds it.
pub(super) struct NodeEntry {
    pub(super) record: NodeRecord,
    pub(super) session: Option<Session>,
    /// Last time anything was heard from the node (or its session opened or closed).
    pub(super) last_seen: Instant,
    /// Speed measured from the node's results per batch size (EWMA of each job's pixel-steps
    /// per second of the call it ran in), for the sizes it has run.
    pub(super) measured: BTreeMap<u32, f64>,
    /// LoRA sets its workers have merged, most recent first (`router::lora_set_key`; 0 is base).
    pub(super) loaded: Vec<u64>,
    /// (online, suspect) when last indexed: the tick re-indexes a node whose state has moved.
    pub(super) status: (bool, bool),
    /// Its models' residency as last reported; `None`: the node keeps every model loaded.
    pub(super) residency: Option<Vec<ModelResidency>>,
    /// Ids of its models loaded now: reported resident, or sent a job since the last report
    /// (the node loads it for the job). `None` with `residency`.
    pub(super) resident: Option<Vec<String>>,
    /// A model it was asked to load ahead for waiting jobs, and when (one at a time).
    pub(super) preloading: Option<(String, Instant)>,
}

impl NodeEntry {
    /// A node just registered or restored, not connected.
    pub(super) fn new(record: NodeRecord, now: Instant) -> Self {
        Self {
            record,
            session: None,
            last_seen: now,
            measured: BTreeMap::new(),
            loaded: vec![0],
            status: (false, false),
            residency: None,
            resident: None,
            preloading: None,
        }
    }

    /// Takes a residency report: the resident set becomes what it says. Answers whether the
    /// resident set changed (the node must be re-indexed).
    pub(super) fn set_residency(&mut self, report: Option<Vec<ModelResidency>>) -> bool {
        let resident = report.as_ref().map(|r| {
            r.iter()
                .filter(|m| m.copies > 0)
                .map(|m| m.model_id.to_ascii_lowercase())
                .collect::<Vec<_>>()
        });
        self.residency = report;
        let changed = resident != self.resident;
        self.resident = resident;
        changed
    }

    /// Records that a job for model `id` was sent: the node loads it if it must.
    pub(super) fn assume_resident(&mut self, id: &str) {
        if let Some(resident) = &mut self.resident {
            let id = id.to_ascii_lowercase();
            if !resident.contains(&id) {
                resident.push(id);
            }
        }
    }

    /// (online, suspect) at `now`.
    pub(super) fn status_at(&self, config: &Config, now: Instant) -> (bool, bool) {
        let silent = now.saturating_duration_since(self.last_seen);
        let online = self.session.is_some() && silent <= config.offline_grace();
        (online, online && silent > config.suspect_after())
    }

    /// The node's state at `now`.
    pub(super) fn state_at(&self, config: &Config, now: Instant) -> NodeState {
        let (online, suspect) = self.status_at(config, now);
        NodeState::of(online, suspect, self.record.draining)
    }

    /// The speed of a job that starts alone now: measured from its results once it has some
    /// (alone; else the best per-job speed of a batch, which a job alone at least reaches),
    /// else what it advertised.
    pub(super) fn speed(&self) -> f64 {
        self.measured_alone()
            .unwrap_or(self.record.pixel_steps_per_second)
    }

    /// The measured speed of a job alone, or the best per-job speed of a batch.
    pub(super) fn measured_alone(&self) -> Option<f64> {
        self.measured
            .get(&1)
            .copied()
            .or_else(|| self.measured.values().copied().reduce(f64::max))
    }

    /// The per-job speed of a batch of `size` jobs: measured once it ran one that size, else
    /// [`NodeEntry::speed`] shared `size` ways (no gain from batching assumed). 0 when unknown.
    pub(super) fn speed_in_batch(&self, size: u32) -> f64 {
        match self.measured.get(&size) {
            Some(&s) => s,
            None => self.speed() / f64::from(size.max(1)),
        }
    }

    /// Folds a result's speed into the one measured for its batch size.
    pub(super) fn measure(&mut self, pixel_steps_per_second: f64, batch_size: u32) {
        self.measured
            .entry(batch_size.max(1))
            .and_modify(|old| *old += SPEED_EWMA * (pixel_steps_per_second - *old))
            .or_insert(pixel_steps_per_second);
    }

    /// What the router sees of the node at `now`, holding `groups` lease groups.
    pub(super) fn view(&self, config: &Config, now: Instant, groups: usize) -> NodeView<'_> {
        let (online, suspect) = self.status_at(config, now);
        NodeView {
            id: self.record.id,
            name: &self.record.name,
            family: self.record.family,
            model_id: &self.record.model_id,
            max_pixels: self.record.max_pixels,
            sizes: &self.record.sizes,
            samplers: &self.record.samplers,
            img2img: self.record.img2img,
            inpaint: self.record.inpaint,
            loras: &self.record.loras,
            upscalers: &self.record.upscalers,
            online,
            suspect,
            draining: self.record.draining,
            free_slots: self.record.workers.saturating_sub(groups as u32),
            max_batch: self.record.max_batch.max(1),
            workers: self.record.workers,
            loaded: &self.loaded,
            pixel_steps_per_second: self.speed(),
            models: &self.record.models,
            resident: self
                .resident
                .as_deref()
                .filter(|_| config.residency_routing),
            residency: self.residency.as_deref().unwrap_or_default(),
        }
    }
}

/// What a node says about itself when it registers, checked at the gRPC edge.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRegistration {
    /// Unique human name (1 to 128 characters).
    pub name: String,
    /// Backend kind.
    pub backend: String,
    /// Model family served.
    pub family: ModelFamily,
    /// Cross-attention width of its UNet.
    pub cross_attention_dim: u32,
    /// Id of its model.
    pub model_id: String,
    /// Worker actors (at least one).
    pub workers: u32,
    /// Largest width*height it renders.
    pub max_pixels: u64,
    /// The only sizes it renders (empty: any up to `max_pixels`).
    pub sizes: Vec<Size>,
    /// Its LoRAs.
    pub loras: Vec<LoraAdvert>,
    /// drover-node version.
    pub version: String,
    /// Advertised speed (pixel-steps per second, 0 when unknown).
    pub pixel_steps_per_second: f64,
    /// Samplers it runs, its default first (empty: not stated).
    pub samplers: Vec<Sampler>,
    /// Whether it starts jobs from a source image.
    pub img2img: bool,
    /// Whether it inpaints.
    pub inpaint: bool,
    /// The model's name (its file or folder name).
    pub model_name: String,
    /// Its upscalers, its default first.
    pub upscalers: Vec<UpscalerAdvert>,
    /// Most jobs one worker renders in one batch (at least 1).
    pub max_batch: u32,
    /// Its model catalogue, its default first; empty from nodes before catalogues (their one
    /// model is the fields above: [`NodeRecord::catalogue`]).
    pub models: Vec<ModelAdvert>,
    /// Bytes its resident models may take; 0: not stated.
    pub memory_budget: u64,
    /// Its models' residency now; `None`: it keeps every model loaded.
    pub residency: Option<Vec<ModelResidency>>,
}

impl NodeRegistration {
    /// The registry record of this registration: `existing` (a node of the same name) keeps its
    /// id and draining flag.
    pub fn into_record(self, existing: Option<&NodeRecord>, now_ms: u64) -> NodeRecord {
        NodeRecord {
            id: existing.map_or_else(NodeId::random, |r| r.id),
            name: self.name,
            backend: self.backend,
            family: self.family,
            cross_attention_dim: self.cross_attention_dim,
            model_id: self.model_id,
            workers: self.workers,
            max_pixels: self.max_pixels,
            loras: self.loras,
            version: self.version,
            pixel_steps_per_second: self.pixel_steps_per_second,
            registered_at_ms: now_ms,
            draining: existing.is_some_and(|r| r.draining),
            sizes: self.sizes,
            samplers: self.samplers,
            img2img: self.img2img,
            inpaint: self.inpaint,
            model_name: self.model_name,
            upscalers: self.upscalers,
            max_batch: self.max_batch.max(1),
            models: self.models,
            memory_budget: self.memory_budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeds_are_kept_per_batch_size() {
        let registration = NodeRegistration {
            name: "n".into(),
            backend: "sim".into(),
            family: ModelFamily::Sd15,
            cross_attention_dim: 768,
            model_id: "m".into(),
            workers: 1,
            max_pixels: 1 << 20,
            sizes: Vec::new(),
            loras: Vec::new(),
            version: "test".into(),
            pixel_steps_per_second: 2000.0,
            samplers: Vec::new(),
            img2img: false,
            inpaint: false,
            model_name: "m".into(),
            upscalers: Vec::new(),
            max_batch: 4,
            models: Vec::new(),
            memory_budget: 0,
            residency: None,
        };
        let mut entry = NodeEntry::new(registration.into_record(None, 0), Instant::now());
        // Nothing measured: the advertised speed, shared by a batch (no gain assumed).
        assert_eq!(entry.speed(), 2000.0);
        assert_eq!(entry.speed_in_batch(4), 500.0);
        // Only batches of four measured: a job alone is at least as fast as one of those.
        entry.measure(600.0, 4);
        assert_eq!(entry.measured_alone(), Some(600.0));
        assert_eq!(entry.speed_in_batch(4), 600.0);
        entry.measure(1000.0, 1);
        entry.measure(2000.0, 1);
        // EWMA per size: 1000 + 0.3 × (2000 − 1000).
        assert_eq!(entry.speed(), 1300.0);
        assert_eq!(entry.speed_in_batch(4), 600.0);
        assert_eq!(entry.speed_in_batch(2), 650.0);
        assert_eq!(entry.measured.len(), 2);
    }

    #[test]
    fn one_state_per_combination() {
        let cases = [
            ((false, false, false), NodeState::Offline),
            ((false, true, true), NodeState::Offline),
            ((true, false, false), NodeState::Online),
            ((true, true, false), NodeState::Suspect),
            ((true, false, true), NodeState::Draining),
            ((true, true, true), NodeState::Draining),
        ];
        for ((online, suspect, draining), state) in cases {
            assert_eq!(NodeState::of(online, suspect, draining), state);
        }
        let names: Vec<String> = NodeState::ALL
            .iter()
            .map(|s| {
                serde_json::to_value(s)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            names,
            ["\"online\"", "\"suspect\"", "\"draining\"", "\"offline\""]
        );
    }
}
