//! What the job state machine answers: the [`Effect`]s to perform, and the values its commands
//! take and give (grants, node reports, end reasons, live events).

use std::sync::Arc;

use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::{JobSpec, Size};
use serde::Serialize;

use crate::records::{JobRecord, JobState};

/// What a command asks the outside world to do, in order.
pub type Effects = Vec<Effect>;

/// One thing to do after a state change.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Make an unfinished job's new state durable (the write-ahead log).
    Persist(JobRecord),
    /// Make a job's end durable, with its image when it succeeded.
    PersistFinished {
        /// The job in its terminal state.
        job: JobRecord,
        /// The image.
        png: Option<Arc<[u8]>>,
    },
    /// Send a lease to its node.
    Assign(Assignment),
    /// Ask a node to stop running a job (its lease ended).
    CancelOnNode {
        /// The node.
        node_id: NodeId,
        /// The job.
        job_id: JobId,
        /// The lease it runs under.
        lease_id: LeaseId,
    },
    /// Push a live event to the job's watchers.
    Event {
        /// The job.
        job_id: JobId,
        /// What happened.
        event: JobEvent,
    },
    /// The job ended: wake whoever waits for it, close its event streams.
    Ended(Finished),
    /// A node's leases changed (its free slots): re-index it.
    Reindex(NodeId),
    /// A node rendered a job at this speed (pixel-steps per second).
    Measured {
        /// The node.
        node_id: NodeId,
        /// What the result measured: its work over the time of the model call it ran in.
        pixel_steps_per_second: f64,
        /// Jobs that shared that call.
        batch_size: u32,
    },
    /// Count something.
    Metric(JobMetric),
}

impl Effect {
    /// Whether the effect makes state durable (it must precede the messages about its job).
    pub fn is_durable(&self) -> bool {
        matches!(self, Self::Persist(_) | Self::PersistFinished { .. })
    }

    /// Whether the effect is a message that leaves the control plane (to a node, a watcher or a
    /// waiter).
    pub fn is_message(&self) -> bool {
        matches!(
            self,
            Self::Assign(_) | Self::CancelOnNode { .. } | Self::Event { .. } | Self::Ended(_)
        )
    }

    /// The job the effect is about, when it is about one.
    pub fn job_id(&self) -> Option<JobId> {
        match self {
            Self::Persist(job) | Self::PersistFinished { job, .. } => Some(job.id),
            Self::Assign(a) => Some(a.job_id),
            Self::CancelOnNode { job_id, .. } | Self::Event { job_id, .. } => Some(*job_id),
            Self::Ended(f) => Some(f.job.id),
            Self::Reindex(_) | Self::Measured { .. } | Self::Metric(_) => None,
        }
    }
}

/// A lease as it goes down to its node, in domain types (the gRPC edge converts it).
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The node it is for.
    pub node_id: NodeId,
    /// The job.
    pub job_id: JobId,
    /// The lease.
    pub lease_id: LeaseId,
    /// 1-based attempt number.
    pub attempt: u32,
    /// What to render.
    pub spec: JobSpec,
    /// The size to render at on this node (the family's default when the job named none).
    pub size: Size,
    /// When the lease expires (ms since epoch).
    pub deadline_ms: u64,
    /// The REST request that submitted the job.
    pub trace_id: Option<String>,
    /// The lease group: jobs leased together to one worker, to render in one batch.
    pub group: Group,
    /// The node's model to render with (the control plane's choice; empty: the node's default).
    pub model_id: String,
}

/// What the caller decided about a lease: the node, a fresh lease id, the size the node renders
/// and the deadline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grant {
    /// The node.
    pub node_id: NodeId,
    /// A fresh lease id.
    pub lease_id: LeaseId,
    /// The size the node renders the job at.
    pub size: Size,
    /// The steps it runs ([`drover_shared::job::JobSpec::steps_with`] the node's default sampler).
    pub steps: u32,
    /// The guidance it runs with.
    pub guidance_scale: f32,
    /// When the lease expires (ms since epoch).
    pub deadline_ms: u64,
    /// The lease group it joins (one per worker; [`Group::alone`] for a job leased by itself).
    pub group: Group,
}

/// Jobs leased together to one worker of a node, to render as one batch: an id and how many
/// jobs it has. A node runs at most one group per worker; leases, fencing and attempts stay per
/// job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Group {
    /// Its id (its first lease's, folded to a number): unique among the node's live leases.
    pub id: u64,
    /// Jobs leased in it.
    pub size: u32,
}

impl Group {
    /// The group of a job leased by itself under `lease`.
    pub fn alone(lease: LeaseId) -> Self {
        Self::led_by(lease, 1)
    }

    /// A group of `size` jobs whose first lease is `lease`.
    pub fn led_by(lease: LeaseId, size: u32) -> Self {
        let bytes = lease.as_bytes();
        let (mut low, mut high) = ([0u8; 8], [0u8; 8]);
        low.copy_from_slice(&bytes[..8]);
        high.copy_from_slice(&bytes[8..]);
        Self {
            id: u64::from_le_bytes(low) ^ u64::from_le_bytes(high),
            size: size.max(1),
        }
    }
}

/// What a node reported about a job it holds a lease for.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeReport {
    /// A denoising step finished.
    Progress {
        /// The job.
        job_id: JobId,
        /// The lease it ran under.
        lease_id: LeaseId,
        /// Steps done.
        step: u32,
        /// Steps in total.
        total: u32,
    },
    /// The image.
    Succeeded {
        /// The job.
        job_id: JobId,
        /// The lease it ran under.
        lease_id: LeaseId,
        /// PNG bytes.
        png: Arc<[u8]>,
        /// Rendering time.
        elapsed_ms: u64,
        /// Whether the node ran the job's upscale (a job that asks for one and comes back
        /// without it is upscaled next on another node).
        upscaled: bool,
        /// Jobs in the batch it was rendered in.
        batch_size: u32,
    },
    /// The attempt failed.
    Failed {
        /// The job.
        job_id: JobId,
        /// The lease it ran under.
        lease_id: LeaseId,
        /// Why.
        reason: String,
        /// Whether another attempt would fail the same way.
        permanent: bool,
    },
}

impl NodeReport {
    /// The job and lease the report names.
    pub fn lease(&self) -> (JobId, LeaseId) {
        match self {
            Self::Progress {
                job_id, lease_id, ..
            }
            | Self::Succeeded {
                job_id, lease_id, ..
            }
            | Self::Failed {
                job_id, lease_id, ..
            } => (*job_id, *lease_id),
        }
    }
}

/// Why an attempt ended without a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The lease's deadline passed.
    LeaseExpired,
    /// The node stopped answering past the grace.
    NodeOffline,
    /// The node came back without the job (it restarted).
    NodeRestarted,
    /// The node reconnected (it did not restart) without the job: its assignment or its result
    /// was lost with the link or with the coordinator (a replicated coordinator's leader that
    /// died). Not counted against the job's attempts: the node did not fail it.
    AssignmentLost,
    /// The node is no longer in the registry.
    NodeUnregistered,
    /// The node said the attempt failed, and why.
    NodeReported(String),
}

impl EndReason {
    /// Whether the attempt counts against the job's `DROVER_MAX_ATTEMPTS`.
    pub fn counts(&self) -> bool {
        !matches!(self, Self::AssignmentLost)
    }

    /// The bounded metric label of the reason (a node's own text never becomes a label).
    pub fn label(&self) -> &'static str {
        match self {
            Self::LeaseExpired => "lease_expired",
            Self::NodeOffline => "node_offline",
            Self::NodeRestarted => "node_restarted",
            Self::AssignmentLost => "assignment_lost",
            Self::NodeUnregistered => "node_unregistered",
            Self::NodeReported(_) => "node_reported",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseExpired => f.write_str("lease expired"),
            Self::NodeOffline => f.write_str("node went offline"),
            Self::NodeRestarted => f.write_str("node restarted without the job"),
            Self::AssignmentLost => {
                f.write_str("node reconnected without the job (its assignment or result was lost)")
            }
            Self::NodeUnregistered => f.write_str("lease holder is no longer registered"),
            Self::NodeReported(reason) => write!(f, "node reported: {reason}"),
        }
    }
}

/// Something to count about jobs (the actor feeds the metrics registry).
#[derive(Clone, Debug, PartialEq)]
pub enum JobMetric {
    /// A job was accepted.
    Accepted,
    /// A job waited this long (seconds) before its first lease.
    QueueWait(f64),
    /// An attempt ended without a result, for this reason label.
    Requeued(&'static str),
    /// A lease passed its deadline.
    LeaseExpired,
    /// A job's image came from a batch of this many jobs on this node.
    Batch {
        /// The node.
        node_id: NodeId,
        /// Jobs in the batch.
        size: u32,
    },
    /// A job ended.
    Finished {
        /// How.
        state: JobState,
        /// Seconds from acceptance to the end, when it succeeded.
        end_to_end_s: Option<f64>,
        /// Seconds of its last attempt, when it succeeded.
        run_s: Option<f64>,
    },
}

/// One live update of a job, as `GET /v1/jobs/{id}/events` streams it: each is one server-sent
/// event whose `event` is the variant's name and whose `data` is this JSON.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
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

impl JobEvent {
    /// The final event of a job that ended.
    pub fn done(job: &JobRecord) -> Self {
        Self::Done {
            state: job.state,
            image_url: (job.state == JobState::Succeeded)
                .then(|| format!("/v1/jobs/{}/image", job.id)),
            error: job.error.clone(),
        }
    }
}

/// A job that ended, with its image when it succeeded.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The job in its terminal state.
    pub job: JobRecord,
    /// The image, handed over from the node's result (none after a restart or a failure).
    pub png: Option<Arc<[u8]>>,
}
