//! Routing decisions as pure functions over a snapshot of the registry.
//!
//! The control plane builds one [`NodeView`] per registered node and asks:
//! - [`feasibility`]: could any registered node ever serve this job (ignoring load and liveness)?
//!   If not, the job is refused at submission with every node's reason.
//! - [`pick`]: which eligible node should run it now? Eligible means capable, online, not suspect,
//!   not draining and with a free worker slot. Preference, one sort key: the fastest node (its
//!   measured speed in ~9% log buckets, i.e. the earliest estimated completion of a job that
//!   starts now; unknown speeds rank first so new nodes get measured) — after residency: a node
//!   where a model that serves the job is loaded comes before one that must load it —, then LoRA affinity (the
//!   job's LoRA set already merged on one of its workers: no reload), then the most free slots,
//!   then round robin so equal nodes share the work.
//! - [`RoutingIndex`]: the same decision in O(log n) from an index by family (and by family and
//!   LoRA set); property tests check it picks exactly what the scan picks.
//! - [`plan_dispatch`]: one dispatch round: queued jobs in queue order, each to the node
//!   [`pick`] would choose, together with later queued jobs of the same [`batch_key`] on that
//!   node, up to its `max_batch`, as one lease group on one worker (a short group of young jobs
//!   may wait for partners: the gather window).
//! - [`queue_key`]: the queue order, priority with continuous aging, a key that never changes
//!   while a job waits.
//!
//! Nothing here has side effects; the property tests below hold the rules in place.

use std::cmp::Reverse;

use drover_shared::family::ModelFamily;
use drover_shared::ids::NodeId;
use drover_shared::job::upscale::MAX_UPSCALED_PIXELS;
use drover_shared::job::{JobSpec, JobTask, ModelSelector, Size, UpscaleSpec};
use drover_shared::sampler::Sampler;
use serde::Serialize;

use crate::records::{LoraAdvert, ModelAdvert, ModelResidency, UpscalerAdvert};

/// What the router knows about one node at decision time.
#[derive(Clone, Debug)]
pub struct NodeView<'a> {
    /// Node id.
    pub id: NodeId,
    /// Node name (for reasons shown to users).
    pub name: &'a str,
    /// Model family served.
    pub family: ModelFamily,
    /// Id of the loaded model.
    pub model_id: &'a str,
    /// Largest width*height accepted.
    pub max_pixels: u64,
    /// The only sizes rendered (fixed-shape models); empty: any size up to `max_pixels`.
    pub sizes: &'a [Size],
    /// Samplers it runs, its default first (empty: not stated, any accepted).
    pub samplers: &'a [Sampler],
    /// Starts jobs from a source image (image-to-image).
    pub img2img: bool,
    /// Inpaints (jobs with a mask).
    pub inpaint: bool,
    /// LoRAs available on the node.
    pub loras: &'a [LoraAdvert],
    /// Upscalers it runs after generation, its default first.
    pub upscalers: &'a [UpscalerAdvert],
    /// Session open and heartbeats on time.
    pub online: bool,
    /// Heartbeats late (not yet offline): gets no new work.
    pub suspect: bool,
    /// Draining: takes no new work.
    pub draining: bool,
    /// Lease groups it can still take: its workers minus the groups it runs (a group is up to
    /// `max_batch` compatible jobs sharing one worker, see [`plan_dispatch`]).
    pub free_slots: u32,
    /// Most jobs one worker renders in one batch (1: no batching).
    pub max_batch: u32,
    /// Worker actors (lease groups run at once).
    pub workers: u32,
    /// LoRA sets ([`lora_set_key`]) merged on the node's workers, most recent first (the empty
    /// set, 0, is base weights).
    pub loaded: &'a [u64],
    /// Measured speed (pixel-steps per second), 0 when unknown.
    pub pixel_steps_per_second: f64,
    /// The node's model catalogue, its default first; empty: its one model is the fields
    /// above (`family`, `model_id`, `max_pixels`, `sizes`, `samplers`, `img2img`, `inpaint`).
    pub models: &'a [ModelAdvert],
    /// Ids of the catalogue's models loaded now; `None`: the node keeps every model loaded.
    pub resident: Option<&'a [String]>,
    /// Its models' residency as last reported (load times), empty when it reports none.
    pub residency: &'a [ModelResidency],
}

/// One model of a node, as capability checks see it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelFacts<'a> {
    /// Its id.
    pub id: &'a str,
    /// Its name on the node (empty when not stated).
    pub name: &'a str,
    /// Its family.
    pub family: ModelFamily,
    /// Largest width*height it renders.
    pub max_pixels: u64,
    /// The only sizes it renders (empty: any up to `max_pixels`).
    pub sizes: &'a [Size],
    /// Samplers it runs, its default first (empty: not stated, any accepted).
    pub samplers: &'a [Sampler],
    /// Starts jobs from a source image.
    pub img2img: bool,
    /// Inpaints.
    pub inpaint: bool,
    /// Memory one loaded copy takes (0: not stated).
    pub bytes: u64,
}

impl<'a> NodeView<'a> {
    /// The node's models, its default first.
    pub fn model_facts(&self) -> impl Iterator<Item = ModelFacts<'a>> + '_ {
        let own = self.models.is_empty().then_some(ModelFacts {
            id: self.model_id,
            name: "",
            family: self.family,
            max_pixels: self.max_pixels,
            sizes: self.sizes,
            samplers: self.samplers,
            img2img: self.img2img,
            inpaint: self.inpaint,
            bytes: 0,
        });
        own.into_iter()
            .chain(self.models.iter().map(|m| ModelFacts {
                id: &m.model_id,
                name: &m.name,
                family: m.family,
                max_pixels: m.max_pixels,
                sizes: &m.sizes,
                samplers: &m.samplers,
                img2img: m.img2img,
                inpaint: m.inpaint,
                bytes: m.bytes,
            }))
    }

    /// Whether model `id` is loaded on the node now.
    pub fn is_resident(&self, id: &str) -> bool {
        self.resident
            .is_none_or(|r| r.iter().any(|x| x.eq_ignore_ascii_case(id)))
    }
}

/// The model of a node a job would run on, and whether it is loaded there now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelChoice<'a> {
    /// The model.
    pub facts: ModelFacts<'a>,
    /// Loaded now (no load before the job runs).
    pub resident: bool,
}

/// Why a node cannot take a job; shown to users in 422 bodies and logs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SkipReason {
    /// The node serves another family.
    WrongFamily {
        /// Family asked for.
        wanted: ModelFamily,
        /// Family the node serves.
        has: ModelFamily,
    },
    /// The node has another model loaded.
    WrongModel {
        /// Model id asked for.
        wanted: String,
        /// Model id the node has.
        has: String,
    },
    /// The node's model is not a text-to-image base (an SDXL refiner).
    NotTextToImage {
        /// Family the node serves.
        has: ModelFamily,
    },
    /// The image is larger than the node accepts.
    TooLarge {
        /// Pixels asked for.
        pixels: u64,
        /// Most pixels the node accepts.
        max_pixels: u64,
    },
    /// The node's model renders only some sizes (fixed when it was compiled), not this one.
    SizeNotServed {
        /// Size asked for.
        size: Size,
        /// The sizes the node renders.
        sizes: Vec<Size>,
    },
    /// The node's model does not run the sampler asked for (LCM models run only `lcm`;
    /// standard ones every sampler but `lcm`, and `lcm` too with an LCM-LoRA).
    SamplerNotServed {
        /// Sampler asked for.
        sampler: Sampler,
        /// The samplers the node runs.
        samplers: Vec<Sampler>,
    },
    /// The job asks for `lcm` on a node whose model is a standard one, without one of the
    /// node's LCM-LoRAs in its `loras` (an LCM-LoRA is what makes a standard model run LCM).
    LcmLoraNeeded {
        /// The node's LCM-LoRAs.
        lcm_loras: Vec<String>,
    },
    /// More steps than the sampler the job would run with on this node allows.
    TooManySteps {
        /// The sampler (asked for, or the node's default).
        sampler: Sampler,
        /// Steps asked for.
        steps: u32,
        /// The most it runs.
        max_steps: u32,
    },
    /// The job starts from a source image and the node's model cannot encode one (an RKNN
    /// model without `vae_encoder/`, a VAE without its encoder).
    #[serde(rename = "img2img_not_served")]
    Img2ImgNotServed,
    /// The job has an inpainting mask and the node does not inpaint.
    InpaintingNotServed,
    /// The job asks for an upscale and the node has no upscaler (of that name).
    UpscalerNotServed {
        /// The upscaler asked for (`None`: any).
        upscaler: Option<String>,
        /// The upscalers the node has.
        upscalers: Vec<String>,
    },
    /// The node's upscaler cannot do what the job asks (too many passes for the scale).
    UpscaleNotReached {
        /// The upscaler.
        upscaler: String,
        /// Why.
        detail: String,
    },
    /// The upscaled image would be larger than the farm's limit.
    UpscaleTooLarge {
        /// Pixels of the upscaled image.
        pixels: u64,
        /// The limit.
        max_pixels: u64,
    },
    /// The node does not have a requested LoRA.
    MissingLora {
        /// The LoRA.
        lora: String,
    },
    /// The node has the LoRA but it was made for another family.
    LoraBaseMismatch {
        /// The LoRA.
        lora: String,
        /// Family the LoRA was made for.
        lora_family: ModelFamily,
        /// Family the node serves.
        node_family: ModelFamily,
    },
    /// The node is offline.
    Offline,
    /// The node's heartbeats are late.
    Suspect,
    /// The node is draining.
    Draining,
    /// Every worker of the node is busy.
    Busy,
}

/// A node and why it was skipped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSkip {
    /// Node id.
    pub node_id: NodeId,
    /// Node name.
    pub node: String,
    /// The reason.
    #[serde(flatten)]
    pub reason: SkipReason,
}

/// Whether `node`'s models and LoRAs can serve `job` at all, whatever its load or liveness.
pub fn capability(job: &JobSpec, node: &NodeView<'_>) -> Result<(), SkipReason> {
    choose_model(job, node).map(|_| ())
}

/// The model of `node` that `job` runs on: among the models that can serve it, a loaded one
/// first, then the one that costs least to load (fewest bytes), then catalogue order. Without
/// one, the reason of the model nearest to serving it (one the job's model selector names).
pub fn choose_model<'a>(job: &JobSpec, node: &NodeView<'a>) -> Result<ModelChoice<'a>, SkipReason> {
    let mut facts = node.model_facts();
    let default = facts.next().ok_or(SkipReason::WrongModel {
        wanted: String::new(),
        has: String::new(),
    })?;
    if job.task == JobTask::Upscale {
        // No model runs: only the upscaler matters.
        let size = job.size.unwrap_or(Size {
            width: 0,
            height: 0,
        });
        return match &job.upscale {
            Some(upscale) => {
                upscale_capability(upscale, size, node.upscalers).map(|()| ModelChoice {
                    facts: default,
                    resident: true,
                })
            }
            None => Err(SkipReason::UpscalerNotServed {
                upscaler: None,
                upscalers: node.upscalers.iter().map(|u| u.name.clone()).collect(),
            }),
        };
    }
    let mut best: Option<ModelChoice<'a>> = None;
    let mut reason: Option<SkipReason> = None;
    let mut all = 0;
    for m in std::iter::once(default).chain(facts) {
        all += 1;
        match model_capability(job, node, m) {
            Ok(()) => {
                let choice = ModelChoice {
                    facts: m,
                    resident: node.is_resident(m.id),
                };
                let better = best.is_none_or(|b| {
                    (choice.resident, Reverse(m.bytes)) > (b.resident, Reverse(b.facts.bytes))
                });
                if better {
                    best = Some(choice);
                }
            }
            Err(r) => {
                let selector_miss = matches!(
                    r,
                    SkipReason::WrongFamily { .. } | SkipReason::WrongModel { .. }
                );
                if reason.is_none()
                    || (!selector_miss
                        && reason.as_ref().is_some_and(|r| {
                            matches!(
                                r,
                                SkipReason::WrongFamily { .. } | SkipReason::WrongModel { .. }
                            )
                        }))
                {
                    reason = Some(r);
                }
            }
        }
    }
    if let Some(choice) = best {
        return Ok(choice);
    }
    Err(match reason {
        // Several models, none the one asked for: name them all.
        Some(SkipReason::WrongModel { wanted, .. }) if all > 1 => SkipReason::WrongModel {
            wanted,
            has: node
                .model_facts()
                .map(|m| m.id)
                .collect::<Vec<_>>()
                .join(", "),
        },
        Some(r) => r,
        None => SkipReason::WrongModel {
            wanted: String::new(),
            has: String::new(),
        },
    })
}

/// Whether model `m` of `node` (with the node's LoRAs and upscalers) can serve `job`.
fn model_capability(
    job: &JobSpec,
    node: &NodeView<'_>,
    m: ModelFacts<'_>,
) -> Result<(), SkipReason> {
    if !m.family.is_text_to_image() {
        return Err(SkipReason::NotTextToImage { has: m.family });
    }
    match &job.model {
        Some(ModelSelector::Family(f)) if *f != m.family => {
            return Err(SkipReason::WrongFamily {
                wanted: *f,
                has: m.family,
            });
        }
        Some(ModelSelector::ModelId(id)) if !m.id.eq_ignore_ascii_case(id) => {
            return Err(SkipReason::WrongModel {
                wanted: id.clone(),
                has: m.id.into(),
            });
        }
        Some(ModelSelector::Name(name)) if m.name != name && m.id != name => {
            return Err(SkipReason::WrongModel {
                wanted: name.clone(),
                has: if m.name.is_empty() { m.id } else { m.name }.into(),
            });
        }
        _ => {}
    }
    let size = job.size_on(m.family, m.sizes);
    let pixels = size.pixels();
    if !m.sizes.is_empty() && !m.sizes.contains(&size) {
        return Err(SkipReason::SizeNotServed {
            size,
            sizes: m.sizes.to_vec(),
        });
    }
    if pixels > m.max_pixels {
        return Err(SkipReason::TooLarge {
            pixels,
            max_pixels: m.max_pixels,
        });
    }
    if let Some(&default) = m.samplers.first() {
        let sampler = match job.sampler {
            Some(Sampler::Lcm) if !m.samplers.contains(&Sampler::Lcm) => {
                let lcm_loras: Vec<String> = node
                    .loras
                    .iter()
                    .filter(|l| l.lcm && l.family == m.family)
                    .map(|l| l.name.clone())
                    .collect();
                if lcm_loras.is_empty() {
                    return Err(SkipReason::SamplerNotServed {
                        sampler: Sampler::Lcm,
                        samplers: m.samplers.to_vec(),
                    });
                }
                if !job.loras.iter().any(|r| lcm_loras.contains(&r.name)) {
                    return Err(SkipReason::LcmLoraNeeded { lcm_loras });
                }
                Sampler::Lcm
            }
            Some(s) if !m.samplers.contains(&s) => {
                return Err(SkipReason::SamplerNotServed {
                    sampler: s,
                    samplers: m.samplers.to_vec(),
                });
            }
            Some(s) => s,
            None => default,
        };
        let steps = job.steps_with(Some(sampler));
        if steps > sampler.max_steps() {
            return Err(SkipReason::TooManySteps {
                sampler,
                steps,
                max_steps: sampler.max_steps(),
            });
        }
    }
    if let Some(source) = &job.source {
        if !m.img2img {
            return Err(SkipReason::Img2ImgNotServed);
        }
        if source.mask.is_some() && !m.inpaint {
            return Err(SkipReason::InpaintingNotServed);
        }
    }
    if let Some(upscale) = &job.upscale
        && !upscale.elsewhere
    {
        upscale_capability(upscale, size, node.upscalers)?;
    }
    for lora in &job.loras {
        match node.loras.iter().find(|l| l.name == lora.name) {
            None => {
                return Err(SkipReason::MissingLora {
                    lora: lora.name.clone(),
                });
            }
            Some(l) if l.family != m.family => {
                return Err(SkipReason::LoraBaseMismatch {
                    lora: lora.name.clone(),
                    lora_family: l.family,
                    node_family: m.family,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The upscaler of `upscalers` an upscale runs on: the one it names, else the node's first.
pub fn upscaler_for<'a>(
    upscale: &UpscaleSpec,
    upscalers: &'a [UpscalerAdvert],
) -> Option<&'a UpscalerAdvert> {
    match &upscale.model {
        Some(name) => upscalers.iter().find(|u| &u.name == name),
        None => upscalers.first(),
    }
}

/// Whether a node with `upscalers` can upscale an image of `size` as `upscale` asks: it has the
/// upscaler (the named one; any, its first, when none is named), the passes reach the scale,
/// and the result stays within [`MAX_UPSCALED_PIXELS`].
fn upscale_capability(
    upscale: &UpscaleSpec,
    size: Size,
    upscalers: &[UpscalerAdvert],
) -> Result<(), SkipReason> {
    let Some(upscaler) = upscaler_for(upscale, upscalers) else {
        return Err(SkipReason::UpscalerNotServed {
            upscaler: upscale.model.clone(),
            upscalers: upscalers.iter().map(|u| u.name.clone()).collect(),
        });
    };
    let plan = upscale
        .plan(upscaler.scale)
        .map_err(|detail| SkipReason::UpscaleNotReached {
            upscaler: upscaler.name.clone(),
            detail,
        })?;
    let (w, h) = plan.output(size);
    if w * h > MAX_UPSCALED_PIXELS {
        return Err(SkipReason::UpscaleTooLarge {
            pixels: w * h,
            max_pixels: MAX_UPSCALED_PIXELS,
        });
    }
    Ok(())
}

/// Whether `node` can take `job` right now.
pub fn eligibility(job: &JobSpec, node: &NodeView<'_>) -> Result<(), SkipReason> {
    capability(job, node)?;
    if !node.online {
        Err(SkipReason::Offline)
    } else if node.draining {
        Err(SkipReason::Draining)
    } else if node.suspect {
        Err(SkipReason::Suspect)
    } else if node.free_slots == 0 {
        Err(SkipReason::Busy)
    } else {
        Ok(())
    }
}

fn skip(node: &NodeView<'_>, reason: SkipReason) -> NodeSkip {
    NodeSkip {
        node_id: node.id,
        node: node.name.to_string(),
        reason,
    }
}

/// `Ok` when some registered node could ever serve `job`; otherwise every node's reason.
pub fn feasibility(job: &JobSpec, nodes: &[NodeView<'_>]) -> Result<(), Vec<NodeSkip>> {
    let mut reasons = Vec::with_capacity(nodes.len());
    for node in nodes {
        match capability(job, node) {
            Ok(()) => return Ok(()),
            Err(reason) => reasons.push(skip(node, reason)),
        }
    }
    Err(reasons)
}

/// Whether a job that asks for an upscale, which no node can both render and upscale
/// ([`feasibility`] refused it), can be split: some node renders it without the upscale, and
/// some node (maybe another) upscales what that node renders. The control plane then marks
/// the upscale `elsewhere`.
pub fn follow_up_feasible(job: &JobSpec, nodes: &[NodeView<'_>]) -> bool {
    let Some(upscale) = &job.upscale else {
        return false;
    };
    let render_only = JobSpec {
        upscale: None,
        ..job.clone()
    };
    nodes
        .iter()
        .filter_map(|n| choose_model(&render_only, n).ok())
        .any(|choice| {
            let size = render_only.size_on(choice.facts.family, choice.facts.sizes);
            nodes
                .iter()
                .any(|n| upscale_capability(upscale, size, n.upscalers).is_ok())
        })
}

/// The LoRA set of a job as one key (the empty set, base weights, is 0): which LoRAs at which
/// strengths a worker must have merged to run it without reloading.
pub fn lora_set_key(loras: &[drover_shared::job::LoraRef]) -> u64 {
    if loras.is_empty() {
        return 0;
    }
    let mut parts: Vec<(&str, u32)> = loras
        .iter()
        .map(|l| (l.name.as_str(), l.strength.to_bits()))
        .collect();
    parts.sort_unstable();
    // FNV-1a: stable across runs and Rust versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, strength) in parts {
        for b in name.bytes().chain([0xff]).chain(strength.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

/// How good a capable node is for a job, larger is better, compared in this order: a model
/// that serves the job is loaded there (nothing to load first), then faster (in
/// ~9% log buckets: the estimated completion time of a job that starts now; where the model must
/// be loaded, the sooner estimated completion of load and run, [`fit_on`]), then LoRA affinity
/// (the job's LoRA set is already merged on one of its workers, so nothing reloads), then more
/// free slots (spread the load), then the round-robin position.
type Score = (bool, u64, bool, u32, usize);

fn affine(job_set: u64, node: &NodeView<'_>) -> bool {
    node.loaded.contains(&job_set)
}

/// The node that should run `job` now, or every node's reason for not taking it: the eligible
/// node with the best [`Score`]. This is the scan that [`RoutingIndex::pick`] must agree with.
///
/// `turn` is a counter the caller advances after each placement; it rotates the order among
/// equally good nodes so they share the work.
pub fn pick(job: &JobSpec, nodes: &[NodeView<'_>], turn: u64) -> Result<NodeId, Vec<NodeSkip>> {
    let set = lora_set_key(&job.loras);
    let mut best: Option<(NodeId, Score)> = None;
    let n = nodes.len().max(1);
    for (i, node) in nodes.iter().enumerate() {
        // Eligible: can take work now (cheap), and capable (`fit_on` is `capability` too).
        if !node.online || node.draining || node.suspect || node.free_slots == 0 {
            continue;
        }
        let Some(fit) = fit_on(job, node) else {
            continue;
        };
        let rotation = n - 1 - (i + n - (turn as usize % n)) % n;
        let key = (
            fit.loaded,
            if fit.loaded {
                speed_key(node)
            } else {
                u64::MAX - fit.cost
            },
            affine(set, node),
            node.free_slots,
            rotation,
        );
        if best.as_ref().is_none_or(|(_, k)| key > *k) {
            best = Some((node.id, key));
        }
    }
    // Reasons are only built (and allocated) when no node can take the job.
    best.map(|(id, _)| id).ok_or_else(|| {
        nodes
            .iter()
            .filter_map(|node| eligibility(job, node).err().map(|r| skip(node, r)))
            .collect()
    })
}

/// A node's speed as a rank: log-scale buckets about 9% wide, so nodes of the same kind rank
/// equal (and take turns) however their measured speeds jitter, while a GPU ranks far above an
/// NPU. A node whose speed is not known yet ranks above all, so it gets work and is measured.
fn speed_key(node: &NodeView<'_>) -> u64 {
    let s = node.pixel_steps_per_second;
    if s.is_finite() && s > 1.0 {
        (s.log2() * 8.0) as u64 + 1
    } else {
        u64::MAX
    }
}

/// What jobs leased together to one worker of `node` share, so they run as one model call per
/// step there: the model, the size, steps and guidance the node renders them with, the sampler asked for
/// (as the node's own batching compares it), sigma schedule, guidance rescale, LoRAs in order
/// with strengths, and style. Prompts, negative prompts, seeds and priorities may differ.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchKey {
    size: Size,
    steps: u32,
    guidance: u32,
    sampler: Option<Sampler>,
    scheduler: drover_shared::sampler::SigmaSchedule,
    guidance_rescale: u32,
    loras: Vec<(String, u32)>,
    style: Option<(String, u32)>,
    model: String,
}

/// `job`'s [`BatchKey`] on `node`; `None` when it is leased alone there: the node does not
/// batch (`max_batch` 1), or the job starts from an image or is an upscale.
pub fn batch_key(job: &JobSpec, node: &NodeView<'_>) -> Option<BatchKey> {
    if node.max_batch <= 1 || job.task != JobTask::Generate || job.source.is_some() {
        return None;
    }
    let model = choose_model(job, node).ok()?.facts;
    let default = model.samplers.first().copied();
    Some(BatchKey {
        model: model.id.to_ascii_lowercase(),
        size: job.size_on(model.family, model.sizes),
        steps: job.steps_with(default),
        guidance: job.guidance_with(default).to_bits(),
        sampler: job.sampler,
        scheduler: job.scheduler,
        guidance_rescale: job.guidance_rescale.to_bits(),
        loras: job
            .loras
            .iter()
            .map(|l| (l.name.clone(), l.strength.to_bits()))
            .collect(),
        style: job.style.as_ref().map(|s| (s.style.clone(), s.level)),
    })
}

mod index;
mod residency;

pub use residency::{
    DEFAULT_LOAD_BYTES_PER_MS, Fit, LoadedModels, SWITCH_LOADS, cost_key, fit_on, load_estimate_ms,
    may_load, preload_target,
};

pub use index::{
    CapabilityIndex, JobKeys, Member, Round, RoutingIndex, pick_indexed, plan_dispatch, sample_farm,
};

/// Records that a worker took LoRA set `set`: most recent first, at most `workers` sets.
pub fn remember_set(loaded: &mut Vec<u64>, set: u64, workers: usize) {
    loaded.retain(|s| *s != set);
    loaded.insert(0, set);
    loaded.truncate(workers.max(1));
}

/// Seconds of waiting that raise a queued job's priority by one (aging, so low priorities never
/// starve behind a stream of high ones).
pub const AGING_SECONDS: u64 = 30;

/// A queued job as the queue order sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuedJob<T> {
    /// Requested priority.
    pub priority: i32,
    /// When it was accepted (ms since epoch).
    pub created_ms: u64,
    /// Caller's handle.
    pub id: T,
}

/// A queued job's place in the queue, smaller first: its acceptance time moved earlier by
/// [`AGING_SECONDS`] per priority level. Equivalently, its effective priority is its priority
/// plus one per [`AGING_SECONDS`] waited, the same for every job at every moment, so the key never
/// changes while the job waits and the queue can stay sorted (a waiting low-priority job
/// overtakes a newer high-priority one once it has waited long enough: nothing starves).
pub fn queue_key(priority: i32, created_ms: u64) -> i64 {
    created_ms as i64 - i64::from(priority) * AGING_SECONDS as i64 * 1000
}

/// Sorts `jobs` into the order in which they are offered to nodes: by [`queue_key`], then oldest.
pub fn queue_order<T: Copy>(jobs: &mut [QueuedJob<T>]) {
    jobs.sort_by_key(|j| (queue_key(j.priority, j.created_ms), j.created_ms));
}

#[cfg(test)]
mod tests;
