//! The records the coordinator persists: registered nodes and jobs.

use drover_shared::family::ModelFamily;
use drover_shared::ids::{JobId, LeaseId, NodeId};
use drover_shared::job::{JobSpec, Size};
use drover_shared::sampler::Sampler;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A LoRA a node advertises, with its base family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoraAdvert {
    /// LoRA name (file name without `.safetensors`).
    pub name: String,
    /// Base family the LoRA was trained for.
    pub family: ModelFamily,
    /// An LCM-LoRA: with it in a job's `loras`, a standard model runs the `lcm` sampler.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lcm: bool,
}

/// A super-resolution network a node runs after generation (`UPSCALER`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpscalerAdvert {
    /// Name (the file's stem).
    pub name: String,
    /// Output pixels per input pixel on each side.
    pub scale: u32,
    /// The network, e.g. `RRDBNet ×4 (64 features, 23 blocks)`.
    pub network: String,
    /// Measured by the node at start: milliseconds per input megapixel of one pass (0:
    /// unknown). Leases of jobs that upscale are lengthened by it.
    #[serde(default)]
    pub ms_per_megapixel: f64,
}

/// A registered node, as persisted in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecord {
    /// Stable id (kept when a node with the same name registers again).
    pub id: NodeId,
    /// Unique human name.
    pub name: String,
    /// Backend kind (`cuda`, `rknn`, `cpu`, `sim`).
    pub backend: String,
    /// Model family served.
    pub family: ModelFamily,
    /// Cross-attention width of the node's UNet.
    pub cross_attention_dim: u32,
    /// Id of the loaded model.
    pub model_id: String,
    /// Worker actors, i.e. jobs run at once.
    pub workers: u32,
    /// Largest width*height accepted.
    pub max_pixels: u64,
    /// LoRAs available on the node.
    pub loras: Vec<LoraAdvert>,
    /// drover-node version.
    pub version: String,
    /// Measured speed in pixel-steps per second (0 when unknown).
    pub pixel_steps_per_second: f64,
    /// When the node last registered (ms since epoch).
    pub registered_at_ms: u64,
    /// Whether the node is draining (finishes its work, takes nothing new).
    #[serde(default)]
    pub draining: bool,
    /// The only sizes the node renders (fixed-shape models such as RKNN); empty: any size up
    /// to `max_pixels`.
    #[serde(default)]
    pub sizes: Vec<Size>,
    /// The samplers the node runs, its default for jobs that name none first; empty: not
    /// stated (a node from before samplers), any accepted.
    #[serde(default)]
    pub samplers: Vec<Sampler>,
    /// Whether the node starts jobs from a source image (image-to-image).
    #[serde(default)]
    pub img2img: bool,
    /// Whether the node inpaints (jobs with a mask).
    #[serde(default)]
    pub inpaint: bool,
    /// The model's name as its operator gave it (`MODEL`); empty from older nodes.
    #[serde(default)]
    pub model_name: String,
    /// Upscalers it runs after generation, its default (for jobs naming none) first.
    #[serde(default)]
    pub upscalers: Vec<UpscalerAdvert>,
    /// Most jobs one worker renders in one batch (`MAX_BATCH`; 1 from older nodes).
    #[serde(default = "one")]
    pub max_batch: u32,
    /// Every model the node serves, its default (the one the fields above describe) first;
    /// empty from nodes before catalogues, whose one model the fields above are.
    #[serde(default)]
    pub models: Vec<ModelAdvert>,
    /// Bytes its resident models may take (`NODE_MEMORY_BUDGET`, per device on cuda); 0: not
    /// stated.
    #[serde(default)]
    pub memory_budget: u64,
}

/// A catalogued model's residency on a node, as its heartbeats report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelResidency {
    /// The model.
    pub model_id: String,
    /// Loaded copies (0: not resident).
    pub copies: u32,
    /// Loads since the node started.
    pub loads: u64,
    /// Evictions since the node started.
    pub evictions: u64,
    /// Milliseconds all its loads took.
    pub load_ms_total: u64,
    /// The last load's milliseconds (0: never loaded).
    pub last_load_ms: u64,
}

/// A model of a node's catalogue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelAdvert {
    /// Stable id (the sha256 of its UNet's safetensors header, or a sim id).
    pub model_id: String,
    /// Its name as the node's operator gave it (file or folder name).
    pub name: String,
    /// Family.
    pub family: ModelFamily,
    /// Largest width*height it renders.
    pub max_pixels: u64,
    /// The only sizes it renders; empty: any up to `max_pixels`.
    #[serde(default)]
    pub sizes: Vec<Size>,
    /// Samplers it runs, its default first (empty: not stated, any accepted).
    #[serde(default)]
    pub samplers: Vec<Sampler>,
    /// Starts jobs from a source image.
    #[serde(default)]
    pub img2img: bool,
    /// Inpaints.
    #[serde(default)]
    pub inpaint: bool,
    /// Memory one loaded copy takes (the node's planning figure); 0: not stated.
    #[serde(default)]
    pub bytes: u64,
    /// Pinned on the node: loaded at start, never evicted.
    #[serde(default)]
    pub pinned: bool,
}

impl NodeRecord {
    /// The node's models, its default first: its catalogue, or (a node from before
    /// catalogues) its one model from the record's own fields.
    pub fn catalogue(&self) -> Vec<ModelAdvert> {
        if !self.models.is_empty() {
            return self.models.clone();
        }
        vec![ModelAdvert {
            model_id: self.model_id.clone(),
            name: self.model_name.clone(),
            family: self.family,
            max_pixels: self.max_pixels,
            sizes: self.sizes.clone(),
            samplers: self.samplers.clone(),
            img2img: self.img2img,
            inpaint: self.inpaint,
            bytes: 0,
            pinned: false,
        }]
    }
}

fn one() -> u32 {
    1
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a node.
    Queued,
    /// Leased to a node, not yet started.
    Leased,
    /// Running on a node (progress reported).
    Running,
    /// Finished; the image is stored.
    Succeeded,
    /// Failed on every attempt, or refused as impossible.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// The state's wire name (`queued`, `leased`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Leased => "leased",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current lease of a job: which node may run it, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    /// The lease id; only results carrying it are accepted.
    pub id: LeaseId,
    /// The node holding the lease.
    pub node_id: NodeId,
    /// 1-based attempt number.
    pub attempt: u32,
    /// When the lease was granted (ms since epoch).
    pub granted_ms: u64,
    /// When the lease expires (ms since epoch).
    pub deadline_ms: u64,
}

/// One finished attempt of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// The node it ran on.
    pub node_id: NodeId,
    /// Its lease.
    pub lease_id: LeaseId,
    /// When it started (ms since epoch).
    pub started_ms: u64,
    /// When it ended (ms since epoch).
    pub ended_ms: u64,
    /// How it ended: `succeeded` or the reason it failed.
    pub outcome: String,
    /// Whether it counts against the job's attempts (not when the node lost its assignment or
    /// result to the link or the coordinator).
    #[serde(default = "counted", skip_serializing_if = "is_counted")]
    pub counted: bool,
}

fn counted() -> bool {
    true
}

fn is_counted(counted: &bool) -> bool {
    *counted
}

/// The `Idempotency-Key` a job was submitted with (see `control::idempotency`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Idempotency {
    /// The key, as the client sent it.
    pub key: String,
    /// The submission's fingerprint (its route and body, hashed): a retry must match it.
    pub fingerprint: String,
    /// The job's place in its submission (a batch's order).
    pub index: u32,
}

/// A job, as persisted in the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    /// Job id.
    pub id: JobId,
    /// Current state.
    pub state: JobState,
    /// What to render.
    pub spec: JobSpec,
    /// When the job was accepted (ms since epoch).
    pub created_ms: u64,
    /// When the job last changed (ms since epoch).
    pub updated_ms: u64,
    /// The current lease, while leased or running.
    pub lease: Option<Lease>,
    /// Finished attempts, oldest first.
    pub attempts: Vec<Attempt>,
    /// The node that produced the image.
    pub node_id: Option<NodeId>,
    /// The size rendered (known once a node of a family takes the job).
    pub size: Option<Size>,
    /// Last progress report as (step, total steps).
    pub progress: Option<(u32, u32)>,
    /// Why the job failed, when it did.
    pub error: Option<String>,
    /// Who submitted it: an API key's label, `admin`, or `ip:<address>` (never the key).
    #[serde(default)]
    pub client: Option<String>,
    /// The REST request that submitted it (`X-Request-Id`); nodes log it with the job.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Jobs in the batch its image was rendered in (one UNet call for all), when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// The submission's `Idempotency-Key`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
}

impl JobRecord {
    /// The record as API answers show it: a source image's bytes left out (its size and
    /// byte counts stay).
    pub fn public(mut self) -> Self {
        if let Some(source) = &mut self.spec.source {
            **source = source.stripped();
        }
        self
    }

    /// A freshly accepted job.
    pub fn new(id: JobId, spec: JobSpec) -> Self {
        let now = now_ms();
        Self {
            id,
            state: JobState::Queued,
            spec,
            created_ms: now,
            updated_ms: now,
            lease: None,
            attempts: Vec::new(),
            node_id: None,
            size: None,
            progress: None,
            error: None,
            client: None,
            trace_id: None,
            batch_size: None,
            idempotency: None,
        }
    }
}
