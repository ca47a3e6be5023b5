//! Routing decisions as pure functions over a snapshot of the registry.
//!
//! The control plane builds one [`NodeView`] per registered node and asks:
//! - [`feasibility`]: could any registered node ever serve this job (ignoring load and liveness)?
//!   If not, the job is refused at submission with every node's reason.
//! - [`pick`]: which eligible node should run it now? Eligible means capable, online, not suspect,
//!   not draining and with a free worker slot. Preference, one sort key: the fastest node (its
//!   measured speed in ~9% log buckets, i.e. the earliest estimated completion of a job that
//!   starts now; unknown speeds rank first so new nodes get measured), then LoRA affinity (the
//!   job's LoRA set already merged on one of its workers: no reload), then the most free slots,
//!   then round robin so equal nodes share the work.
//! - [`RoutingIndex`]: the same decision in O(log n) from an index by family (and by family and
//!   LoRA set); property tests check it picks exactly what the scan picks.
//! - [`queue_key`]: the queue order, priority with continuous aging, a key that never changes
//!   while a job waits.
//!
//! Nothing here has side effects; the property tests below hold the rules in place.

use drover_shared::family::ModelFamily;
use drover_shared::ids::NodeId;
use drover_shared::job::{JobSpec, ModelSelector, Size};
use serde::Serialize;

use crate::records::LoraAdvert;

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
    /// LoRAs available on the node.
    pub loras: &'a [LoraAdvert],
    /// Session open and heartbeats on time.
    pub online: bool,
    /// Heartbeats late (not yet offline): gets no new work.
    pub suspect: bool,
    /// Draining: takes no new work.
    pub draining: bool,
    /// Worker slots not running a job.
    pub free_slots: u32,
    /// Worker actors (jobs run at once).
    pub workers: u32,
    /// LoRA sets ([`lora_set_key`]) merged on the node's workers, most recent first (the empty
    /// set, 0, is base weights).
    pub loaded: &'a [u64],
    /// Measured speed (pixel-steps per second), 0 when unknown.
    pub pixel_steps_per_second: f64,
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

/// Whether `node`'s model and LoRAs can serve `job` at all, whatever its load or liveness.
pub fn capability(job: &JobSpec, node: &NodeView<'_>) -> Result<(), SkipReason> {
    if !node.family.is_text_to_image() {
        return Err(SkipReason::NotTextToImage { has: node.family });
    }
    match &job.model {
        Some(ModelSelector::Family(f)) if *f != node.family => {
            return Err(SkipReason::WrongFamily {
                wanted: *f,
                has: node.family,
            });
        }
        Some(ModelSelector::ModelId(id)) if !node.model_id.eq_ignore_ascii_case(id) => {
            return Err(SkipReason::WrongModel {
                wanted: id.clone(),
                has: node.model_id.into(),
            });
        }
        _ => {}
    }
    let size = job.size_on(node.family, node.sizes);
    let pixels = size.pixels();
    if !node.sizes.is_empty() && !node.sizes.contains(&size) {
        return Err(SkipReason::SizeNotServed {
            size,
            sizes: node.sizes.to_vec(),
        });
    }
    if pixels > node.max_pixels {
        return Err(SkipReason::TooLarge {
            pixels,
            max_pixels: node.max_pixels,
        });
    }
    for lora in &job.loras {
        match node.loras.iter().find(|l| l.name == lora.name) {
            None => {
                return Err(SkipReason::MissingLora {
                    lora: lora.name.clone(),
                });
            }
            Some(l) if l.family != node.family => {
                return Err(SkipReason::LoraBaseMismatch {
                    lora: lora.name.clone(),
                    lora_family: l.family,
                    node_family: node.family,
                });
            }
            Some(_) => {}
        }
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

/// How good a capable node is for a job, larger is better, compared in this order: faster (in
/// ~9% log buckets: the estimated completion time of a job that starts now), then LoRA affinity
/// (the job's LoRA set is already merged on one of its workers, so nothing reloads), then more
/// free slots (spread the load), then the round-robin position.
type Score = (u64, bool, u32, usize);

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
        if eligibility(job, node).is_err() {
            continue;
        }
        let rotation = n - 1 - (i + n - (turn as usize % n)) % n;
        let key = (
            speed_key(node),
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

/// A node's rank in the index, smaller is better: faster, then more free slots.
type Rank = (Reverse<u64>, Reverse<u32>);

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

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

/// What the index keeps about a node that can take work now.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Family served.
    pub family: ModelFamily,
    /// Speed bucket (`speed_key`).
    pub speed: u64,
    /// Free worker slots (> 0).
    pub free: u32,
    /// Worker actors.
    pub workers: u32,
    /// LoRA sets merged on its workers, most recent first.
    pub loaded: Vec<u64>,
}

impl Member {
    /// The member for `node`, if it can take work now (online, not suspect, not draining, with a
    /// free slot).
    pub fn of(node: &NodeView<'_>) -> Option<Self> {
        (node.online && !node.suspect && !node.draining && node.free_slots > 0).then(|| Self {
            family: node.family,
            speed: speed_key(node),
            free: node.free_slots,
            workers: node.workers,
            loaded: node.loaded.to_vec(),
        })
    }

    fn rank(&self) -> Rank {
        (Reverse(self.speed), Reverse(self.free))
    }
}

/// An index pick's candidate, smaller is better: speed rank, not affine, free-slot rank, then
/// (before the pivot, key) so equals take turns.
type Candidate<K> = (Reverse<u64>, bool, Reverse<u32>, (bool, K));

/// Nodes grouped by rank, best first; within a rank, by key.
type Ranked<K> = BTreeMap<Rank, BTreeSet<K>>;

fn put<K: Ord>(ranked: &mut Ranked<K>, rank: Rank, key: K) {
    ranked.entry(rank).or_default().insert(key);
}

fn take_out<K: Ord>(ranked: &mut Ranked<K>, rank: Rank, key: &K) {
    if let Some(group) = ranked.get_mut(&rank) {
        group.remove(key);
        if group.is_empty() {
            ranked.remove(&rank);
        }
    }
}

/// The first node of `ranked` (best rank first) that `capable` accepts, starting among equals at
/// `pivot` and wrapping, so equal nodes take turns: `(rank, key)`.
fn first_capable<K: Ord + Copy>(
    ranked: &Ranked<K>,
    pivot: K,
    capable: &impl Fn(K) -> bool,
) -> Option<(Rank, K)> {
    ranked.iter().find_map(|(rank, group)| {
        group
            .range(pivot..)
            .chain(group.range(..pivot))
            .find(|k| capable(**k))
            .map(|k| (*rank, *k))
    })
}

/// The capability index: the nodes that can take work now, per family and per (family, LoRA set
/// merged on one of its workers), each ordered by rank (fastest, then most free slots). A
/// decision looks at the job's families only, usually at one capable node each, in O(log n). It
/// is keyed by `K` (a node id in the control plane, which keeps it current as nodes change; a
/// snapshot position in [`RoutingIndex`]).
#[derive(Clone, Debug)]
pub struct CapabilityIndex<K> {
    ranked: [Ranked<K>; 4],
    by_set: HashMap<(ModelFamily, u64), Ranked<K>>,
    members: HashMap<K, Member>,
    total_free: u64,
}

impl<K> Default for CapabilityIndex<K> {
    fn default() -> Self {
        Self {
            ranked: Default::default(),
            by_set: HashMap::new(),
            members: HashMap::new(),
            total_free: 0,
        }
    }
}

fn family_slot(f: ModelFamily) -> usize {
    match f {
        ModelFamily::Sd15 => 0,
        ModelFamily::Sd2 => 1,
        ModelFamily::Sdxl => 2,
        ModelFamily::SdxlRefiner => 3,
    }
}

impl<K: Ord + Copy + Hash> CapabilityIndex<K> {
    /// Sets what the index knows about node `key`: `Some` when it can take work now, `None` to
    /// take it out.
    pub fn upsert(&mut self, key: K, member: Option<Member>) {
        if let Some(old) = self.members.remove(&key) {
            let rank = old.rank();
            take_out(&mut self.ranked[family_slot(old.family)], rank, &key);
            for set in &old.loaded {
                if let Some(ranked) = self.by_set.get_mut(&(old.family, *set)) {
                    take_out(ranked, rank, &key);
                    if ranked.is_empty() {
                        self.by_set.remove(&(old.family, *set));
                    }
                }
            }
            self.total_free -= u64::from(old.free);
        }
        let Some(member) = member.filter(|m| m.free > 0) else {
            return;
        };
        let rank = member.rank();
        put(&mut self.ranked[family_slot(member.family)], rank, key);
        for set in &member.loaded {
            put(
                self.by_set.entry((member.family, *set)).or_default(),
                rank,
                key,
            );
        }
        self.total_free += u64::from(member.free);
        self.members.insert(key, member);
    }

    /// What the index knows about `key`.
    pub fn member(&self, key: &K) -> Option<&Member> {
        self.members.get(key)
    }

    /// Free slots over every indexed node.
    pub fn free_slots(&self) -> u64 {
        self.total_free
    }

    /// The node that should run a job of LoRA set `set` that nodes of `families` could serve,
    /// among those `capable` accepts: the best [`Score`] (speed bucket, LoRA affinity, free
    /// slots), and among equals the first at or after `pivot` (wrapping). `None` when no indexed
    /// node is capable.
    pub fn pick(
        &self,
        families: &[ModelFamily],
        set: u64,
        pivot: K,
        capable: impl Fn(K) -> bool,
    ) -> Option<K> {
        // (speed rank, not affine, free-slot rank, (before the pivot, key)): smaller is better,
        // across families too.
        let mut best: Option<Candidate<K>> = None;
        for family in families {
            // The family's best capable node; then its best capable node with the job's LoRA set
            // merged, which wins when it is as fast: affinity outranks free slots, not speed.
            let Some((g_rank, g_key)) =
                first_capable(&self.ranked[family_slot(*family)], pivot, &capable)
            else {
                continue;
            };
            let affine_best = self
                .by_set
                .get(&(*family, set))
                .and_then(|ranked| first_capable(ranked, pivot, &capable));
            let (rank, key, affine) = match affine_best {
                Some((a_rank, a_key)) if a_rank.0 == g_rank.0 => (a_rank, a_key, true),
                _ => {
                    let affine = self
                        .members
                        .get(&g_key)
                        .is_some_and(|m| m.loaded.contains(&set));
                    (g_rank, g_key, affine)
                }
            };
            let candidate = (rank.0, !affine, rank.1, (key < pivot, key));
            if best.is_none_or(|b| candidate < b) {
                best = Some(candidate);
            }
        }
        best.map(|(_, _, _, (_, key))| key)
    }

    /// Records that node `key` took one job of LoRA set `set`: one slot less, and the set now
    /// merged on one of its workers (the least recently used one is replaced).
    pub fn take(&mut self, key: K, set: u64) {
        let Some(mut member) = self.members.get(&key).cloned() else {
            return;
        };
        member.free -= 1;
        remember_set(&mut member.loaded, set, member.workers as usize);
        self.upsert(key, Some(member));
    }
}

/// The job's families: the one it asks for, or all.
fn job_families(job: &JobSpec) -> &[ModelFamily] {
    match &job.model {
        Some(ModelSelector::Family(f)) => std::slice::from_ref(f),
        _ => &ModelFamily::ALL,
    }
}

/// A [`CapabilityIndex`] over one snapshot, keyed by position in it: what [`pick`] is checked
/// against, and what the routing benchmark measures.
#[derive(Clone, Debug, Default)]
pub struct RoutingIndex {
    index: CapabilityIndex<usize>,
}

impl RoutingIndex {
    /// Indexes the nodes of `nodes` that are online, not suspect, not draining, with a free slot.
    pub fn new(nodes: &[NodeView<'_>]) -> Self {
        let mut index = CapabilityIndex::default();
        for (i, node) in nodes.iter().enumerate() {
            index.upsert(i, Member::of(node));
        }
        Self { index }
    }

    /// Free slots left in the whole index.
    pub fn free_slots(&self) -> u64 {
        self.index.free_slots()
    }

    /// The position (in the snapshot the index was built from) of the node that should run `job`:
    /// the eligible node with the best [`Score`], as [`pick`] would choose it; among equals the one
    /// at or after `turn` (wrapping), so equal nodes take turns. `None` when no node is eligible.
    pub fn pick(&self, job: &JobSpec, nodes: &[NodeView<'_>], turn: u64) -> Option<usize> {
        let pivot = turn as usize % nodes.len().max(1);
        self.index
            .pick(job_families(job), lora_set_key(&job.loras), pivot, |i| {
                capability(job, &nodes[i]).is_ok()
            })
    }

    /// Records that the node at `position` took one job with LoRA set `set`.
    pub fn take(&mut self, position: usize, set: u64) {
        self.index.take(position, set);
    }
}

/// A synthetic registry of `n` nodes for benchmarks (the routing bench, the load generator):
/// families SD1.5 / SDXL / SD2 in turn, every 7th offline, every 11th draining, 0 to 2 free slots
/// of 2 workers, speeds all slightly different.
pub fn sample_farm(n: usize) -> Vec<NodeView<'static>> {
    (0..n)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            NodeView {
                id: NodeId::from_bytes(id),
                name: "node",
                family: [ModelFamily::Sd15, ModelFamily::Sdxl, ModelFamily::Sd2][i % 3],
                model_id: "abcd",
                max_pixels: 4 << 20,
                sizes: &[],
                loras: &[],
                online: i % 7 != 0,
                suspect: false,
                draining: i % 11 == 0,
                free_slots: (i % 3) as u32,
                workers: 2,
                loaded: &[0],
                pixel_steps_per_second: 1e6 + i as f64,
            }
        })
        .collect()
}

/// The node `index` picks for `job`, with `capable` telling whether a node id can serve it:
/// [`CapabilityIndex::pick`] with the job's families and LoRA set.
pub fn pick_indexed<K: Ord + Copy + Hash>(
    index: &CapabilityIndex<K>,
    job: &JobSpec,
    pivot: K,
    capable: impl Fn(K) -> bool,
) -> Option<K> {
    index.pick(job_families(job), lora_set_key(&job.loras), pivot, capable)
}

/// One dispatch round over `index`: offers the jobs of `queue` in its order, each to the node
/// [`pick_indexed`] picks among those `capable` accepts for it, taking that node's slot before the
/// next job is offered; stops when no slot is left. The pivot moves past each chosen node so
/// equal nodes take turns. Returns the placements (job, node) and the pivot for the next round.
/// A job left unplaced has no free capable node left in `index` (none stays idle while it waits).
pub fn plan_dispatch<'a, K: Ord + Copy + Hash, J>(
    index: &mut CapabilityIndex<K>,
    queue: impl IntoIterator<Item = (J, &'a JobSpec)>,
    mut pivot: K,
    capable: impl Fn(&JobSpec, K) -> bool,
    after: impl Fn(K) -> K,
) -> (Vec<(J, K)>, K) {
    let mut placements = Vec::new();
    for (job, spec) in queue {
        if index.free_slots() == 0 {
            break;
        }
        let set = lora_set_key(&spec.loras);
        if let Some(key) = index.pick(job_families(spec), set, pivot, |k| capable(spec, k)) {
            index.take(key, set);
            pivot = after(key);
            placements.push((job, key));
        }
    }
    (placements, pivot)
}

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
mod tests {
    use super::*;
    use drover_shared::job::{JobRequest, LoraRef};
    use proptest::prelude::*;

    fn job(json: &str) -> JobSpec {
        JobRequest::from_json(json.as_bytes())
            .unwrap()
            .validate(|| 1)
            .unwrap()
    }

    fn node(i: u8, family: ModelFamily) -> NodeView<'static> {
        NodeView {
            id: NodeId::from_bytes([i; 16]),
            name: "n",
            family,
            model_id: "abcd",
            max_pixels: 1024 * 1024,
            sizes: &[],
            loras: &[],
            online: true,
            suspect: false,
            draining: false,
            free_slots: 1,
            workers: 2,
            loaded: &[0],
            pixel_steps_per_second: 0.0,
        }
    }

    #[test]
    fn family_and_size_and_liveness_are_named() {
        let sd15 = node(1, ModelFamily::Sd15);
        let check = |json: &str, n: &NodeView<'_>| eligibility(&job(json), n).err();
        assert_eq!(check(r#"{"prompt":"x"}"#, &sd15), None);
        assert_eq!(
            check(r#"{"prompt":"x","model":"sdxl"}"#, &sd15),
            Some(SkipReason::WrongFamily {
                wanted: ModelFamily::Sdxl,
                has: ModelFamily::Sd15
            })
        );
        assert_eq!(
            check(r#"{"prompt":"x","size":"2048x1024"}"#, &sd15),
            Some(SkipReason::TooLarge {
                pixels: 2048 * 1024,
                max_pixels: 1024 * 1024
            })
        );
        assert_eq!(
            check(r#"{"prompt":"x","model":"ffff"}"#, &sd15),
            Some(SkipReason::WrongModel {
                wanted: "ffff".into(),
                has: "abcd".into()
            })
        );
        let offline = NodeView {
            online: false,
            ..sd15.clone()
        };
        assert_eq!(
            check(r#"{"prompt":"x"}"#, &offline),
            Some(SkipReason::Offline)
        );
        let busy = NodeView {
            free_slots: 0,
            ..sd15.clone()
        };
        assert_eq!(check(r#"{"prompt":"x"}"#, &busy), Some(SkipReason::Busy));
        let refiner = node(2, ModelFamily::SdxlRefiner);
        assert_eq!(
            check(r#"{"prompt":"x"}"#, &refiner),
            Some(SkipReason::NotTextToImage {
                has: ModelFamily::SdxlRefiner
            })
        );
        // A fixed-shape (RKNN) node renders its sizes only; a job without a size gets one.
        let npu = NodeView {
            sizes: FIXED_SIZES[2],
            ..sd15.clone()
        };
        assert_eq!(check(r#"{"prompt":"x"}"#, &npu), None);
        assert_eq!(check(r#"{"prompt":"x","size":"1024x1024"}"#, &npu), None);
        assert_eq!(
            check(r#"{"prompt":"x","size":"512x512"}"#, &npu),
            Some(SkipReason::SizeNotServed {
                size: square(512),
                sizes: vec![square(384), square(1024)]
            })
        );
    }

    #[test]
    fn loras_must_exist_and_match_the_node_family() {
        let loras = [
            LoraAdvert {
                name: "ink".into(),
                family: ModelFamily::Sd15,
            },
            LoraAdvert {
                name: "xl-ink".into(),
                family: ModelFamily::Sdxl,
            },
        ];
        let sd15 = NodeView {
            loras: &loras,
            ..node(1, ModelFamily::Sd15)
        };
        let mut spec = job(r#"{"prompt":"x"}"#);
        spec.loras = vec![LoraRef {
            name: "ink".into(),
            strength: 1.0,
        }];
        assert_eq!(eligibility(&spec, &sd15), Ok(()));
        spec.loras = vec![LoraRef {
            name: "xl-ink".into(),
            strength: 1.0,
        }];
        assert_eq!(
            eligibility(&spec, &sd15),
            Err(SkipReason::LoraBaseMismatch {
                lora: "xl-ink".into(),
                lora_family: ModelFamily::Sdxl,
                node_family: ModelFamily::Sd15
            })
        );
        spec.loras = vec![LoraRef {
            name: "nope".into(),
            strength: 1.0,
        }];
        assert_eq!(
            eligibility(&spec, &sd15),
            Err(SkipReason::MissingLora {
                lora: "nope".into()
            })
        );
    }

    #[test]
    fn feasibility_ignores_load_but_not_capability() {
        let busy_offline = NodeView {
            online: false,
            free_slots: 0,
            ..node(1, ModelFamily::Sdxl)
        };
        assert_eq!(
            feasibility(
                &job(r#"{"prompt":"x","model":"sdxl"}"#),
                std::slice::from_ref(&busy_offline)
            ),
            Ok(())
        );
        let reasons =
            feasibility(&job(r#"{"prompt":"x","model":"sd15"}"#), &[busy_offline]).unwrap_err();
        assert_eq!(reasons.len(), 1);
        assert!(matches!(reasons[0].reason, SkipReason::WrongFamily { .. }));
        assert!(
            feasibility(&job(r#"{"prompt":"x"}"#), &[])
                .unwrap_err()
                .is_empty()
        );
    }

    #[test]
    fn equal_nodes_take_turns() {
        let nodes = [
            node(1, ModelFamily::Sd15),
            node(2, ModelFamily::Sd15),
            node(3, ModelFamily::Sd15),
        ];
        let spec = job(r#"{"prompt":"x"}"#);
        let picked: std::collections::HashSet<_> = (0..3)
            .map(|turn| pick(&spec, &nodes, turn).unwrap())
            .collect();
        assert_eq!(picked.len(), 3);
        let index = RoutingIndex::new(&nodes);
        let picked: std::collections::HashSet<_> = (0..3)
            .map(|turn| index.pick(&spec, &nodes, turn).unwrap())
            .collect();
        assert_eq!(picked.len(), 3, "the index rotates among equal nodes too");
    }

    #[test]
    fn priorities_order_the_queue_and_age() {
        let job = |priority, created_ms, id| QueuedJob {
            priority,
            created_ms,
            id,
        };
        let mut jobs = vec![
            job(0, 1_000, 'a'),
            job(5, 2_000, 'b'),
            job(0, 500, 'c'),
            job(5, 1_500, 'd'),
        ];
        queue_order(&mut jobs);
        assert_eq!(jobs.iter().map(|j| j.id).collect::<String>(), "dbca");
        // A low-priority job that waited 3.3 aging periods overtakes a fresh +2 job...
        let mut jobs = vec![job(2, 100_000, 'n'), job(-1, 0, 'o')];
        queue_order(&mut jobs);
        assert_eq!(jobs[0].id, 'o');
        // ...but not one that came 2.7 periods later.
        let mut jobs = vec![job(2, 80_000, 'n'), job(-1, 0, 'o')];
        queue_order(&mut jobs);
        assert_eq!(jobs[0].id, 'n');
    }

    fn arb_family() -> impl Strategy<Value = ModelFamily> {
        prop::sample::select(ModelFamily::ALL.to_vec())
    }

    fn arb_node() -> impl Strategy<Value = (ModelFamily, bool, bool, bool, u32, u64, usize)> {
        (
            arb_family(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u32..3,
            0u64..4,
            0usize..3,
        )
    }

    const fn square(side: u32) -> Size {
        Size {
            width: side,
            height: side,
        }
    }

    /// What a node may render: any size, or only the sizes a fixed-shape model was compiled for.
    static FIXED_SIZES: [&[Size]; 3] = [&[], &[square(512)], &[square(384), square(1024)]];

    proptest! {
        /// Placing jobs one after another through the index never gives a node more jobs than it
        /// has free slots, and stops only when no eligible slot is left.
        #[test]
        fn index_placements_respect_slots(
            specs in prop::collection::vec(arb_node(), 0..8),
            jobs in 0usize..30,
        ) {
            let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| NodeView {
                online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
                max_pixels: 2048 * 2048,
                ..node(i as u8, s.0)
            }).collect();
            let spec = job(r#"{"prompt":"x"}"#);
            let mut index = RoutingIndex::new(&nodes);
            let mut given = vec![0u32; nodes.len()];
            let mut placed = 0;
            for turn in 0..jobs as u64 {
                let Some(i) = index.pick(&spec, &nodes, turn) else { break };
                index.take(i, 0);
                given[i] += 1;
                placed += 1;
            }
            for (i, n) in nodes.iter().enumerate() {
                prop_assert!(given[i] <= n.free_slots);
                if given[i] > 0 { prop_assert!(eligibility(&spec, n).is_ok()); }
            }
            let capacity: u32 = nodes.iter().filter(|n| eligibility(&spec, n).is_ok()).map(|n| n.free_slots).sum();
            prop_assert_eq!(placed, jobs.min(capacity as usize));
        }
    }

    proptest! {
        /// The picked node is always eligible; if none is picked, every node has a reason; a job is
        /// never left waiting while an eligible node exists.
        #[test]
        fn pick_is_sound_and_complete(
            specs in prop::collection::vec(arb_node(), 0..8),
            wanted in prop::option::of(arb_family()),
            size in prop::sample::select(vec![None, Some("512x512"), Some("1024x1024"), Some("2048x2048")]),
            turn in any::<u64>(),
        ) {
            let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| NodeView {
                online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
                max_pixels: [512 * 512, 768 * 768, 1024 * 1024, 2048 * 2048][s.5 as usize],
                sizes: FIXED_SIZES[s.6],
                ..node(i as u8, s.0)
            }).collect();
            let mut spec = job(r#"{"prompt":"x"}"#);
            spec.model = wanted.map(ModelSelector::Family);
            spec.size = size.map(|s| s.parse().unwrap());
            let any_eligible = nodes.iter().any(|n| eligibility(&spec, n).is_ok());
            match pick(&spec, &nodes, turn) {
                Ok(id) => {
                    let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                    prop_assert!(eligibility(&spec, chosen).is_ok());
                    if let Some(f) = wanted { prop_assert_eq!(chosen.family, f); }
                    let size = spec.size_on(chosen.family, chosen.sizes);
                    prop_assert!(size.pixels() <= chosen.max_pixels);
                    prop_assert!(chosen.sizes.is_empty() || chosen.sizes.contains(&size));
                }
                Err(reasons) => {
                    prop_assert!(!any_eligible);
                    prop_assert_eq!(reasons.len(), nodes.len());
                }
            }
            // The capability index agrees: it finds an eligible node exactly when one exists, and
            // the same one the scan picks.
            let index = RoutingIndex::new(&nodes);
            match index.pick(&spec, &nodes, turn) {
                Some(i) => {
                    prop_assert!(eligibility(&spec, &nodes[i]).is_ok());
                    prop_assert_eq!(Ok(nodes[i].id), pick(&spec, &nodes, turn).map_err(|_| ()));
                }
                None => prop_assert!(!any_eligible),
            }
            // A feasible job has at least one capable node; an infeasible one has a reason per node.
            match feasibility(&spec, &nodes) {
                Ok(()) => prop_assert!(nodes.iter().any(|n| capability(&spec, n).is_ok())),
                Err(r) => prop_assert_eq!(r.len(), nodes.len()),
            }
        }
    }

    /// Speeds the affinity test draws from: unknown, two within one ~9% bucket, and faster.
    const SPEEDS: [f64; 4] = [0.0, 1.0e6, 1.02e6, 8.0e6];

    fn lora_job(set: usize) -> JobSpec {
        let mut spec = job(r#"{"prompt":"x","model":"sd15"}"#);
        let names: &[&str] = [&[][..], &["ink"][..], &["ink", "film"][..]][set];
        spec.loras = names
            .iter()
            .map(|n| LoraRef {
                name: n.to_string(),
                strength: 1.0,
            })
            .collect();
        spec
    }

    proptest! {
        /// The index picks exactly the node the scan picks; the pick is never slower than an
        /// eligible node, and among the fastest eligible nodes it has the job's LoRA set merged
        /// whenever one of them has (LoRA-affine placement is preferred).
        #[test]
        fn placement_prefers_speed_then_lora_affinity(
            specs in prop::collection::vec(
                (any::<bool>(), 0u32..3, 0usize..4, prop::collection::vec(0usize..3, 0..3)),
                1..10,
            ),
            set in 0usize..3,
            turn in any::<u64>(),
        ) {
            let adverts: &'static [LoraAdvert] = Box::leak(Box::new([
                LoraAdvert { name: "ink".into(), family: ModelFamily::Sd15 },
                LoraAdvert { name: "film".into(), family: ModelFamily::Sd15 },
            ]));
            let spec = lora_job(set);
            let job_set = lora_set_key(&spec.loras);
            let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, s)| {
                let loaded: Vec<u64> = s.3.iter().map(|k| lora_set_key(&lora_job(*k).loras)).collect();
                NodeView {
                    online: s.0,
                    free_slots: s.1,
                    pixel_steps_per_second: SPEEDS[s.2],
                    loaded: Box::leak(loaded.into_boxed_slice()),
                    loras: adverts,
                    ..node(i as u8, ModelFamily::Sd15)
                }
            }).collect();
            let scan = pick(&spec, &nodes, turn).ok();
            let index = RoutingIndex::new(&nodes).pick(&spec, &nodes, turn).map(|i| nodes[i].id);
            prop_assert_eq!(scan, index);
            let eligible: Vec<&NodeView<'_>> = nodes.iter().filter(|n| eligibility(&spec, n).is_ok()).collect();
            match scan {
                None => prop_assert!(eligible.is_empty()),
                Some(id) => {
                    let chosen = nodes.iter().find(|n| n.id == id).unwrap();
                    let top = eligible.iter().map(|n| speed_key(n)).max().unwrap();
                    prop_assert_eq!(speed_key(chosen), top);
                    let affine_at_top = eligible.iter().any(|n| speed_key(n) == top && affine(job_set, n));
                    prop_assert_eq!(affine(job_set, chosen), affine_at_top);
                }
            }
        }
    }

    proptest! {
        /// A dispatch round over a queue of mixed jobs (families, sizes, LoRA sets, priorities):
        /// every placement is eligible, no node gets more jobs than its free slots, and a job left
        /// waiting has no eligible node with a slot still free: nothing starves while an eligible
        /// node is idle, and an earlier job in queue order is never passed over for a later one.
        #[test]
        fn dispatch_round_never_leaves_an_eligible_slot_idle(
            specs in prop::collection::vec((arb_node(), any::<bool>()), 0..8),
            jobs in prop::collection::vec((
                prop::option::of(arb_family()),
                prop::sample::select(vec![None, Some("512x512"), Some("1024x1024")]),
                0usize..3,
                -2i32..3,
                0u64..200_000,
            ), 0..24),
            pivot in 0usize..8,
        ) {
            let adverts: &'static [LoraAdvert] = Box::leak(Box::new(
                ModelFamily::ALL.iter().flat_map(|f| ["ink", "film"].map(|n| LoraAdvert {
                    name: n.into(), family: *f,
                })).collect::<Vec<_>>(),
            ));
            let nodes: Vec<NodeView<'static>> = specs.iter().enumerate().map(|(i, (s, has))| NodeView {
                online: s.1, suspect: s.2, draining: s.3, free_slots: s.4,
                max_pixels: [512 * 512, 768 * 768, 1024 * 1024, 2048 * 2048][s.5 as usize],
                sizes: FIXED_SIZES[s.6],
                loras: if *has { adverts } else { &[] },
                ..node(i as u8, s.0)
            }).collect();
            let mut queued: Vec<QueuedJob<usize>> = jobs.iter().enumerate().map(|(i, j)| QueuedJob {
                priority: j.3, created_ms: j.4, id: i,
            }).collect();
            queue_order(&mut queued);
            let job_specs: Vec<JobSpec> = jobs.iter().map(|(family, size, set, priority, _)| {
                let mut spec = lora_job(*set);
                spec.model = family.map(ModelSelector::Family);
                spec.size = size.map(|s| s.parse().unwrap());
                spec.priority = *priority;
                spec
            }).collect();
            let mut index = CapabilityIndex::default();
            for (i, n) in nodes.iter().enumerate() {
                index.upsert(i, Member::of(n));
            }
            let (placements, _) = plan_dispatch(
                &mut index,
                queued.iter().map(|q| (q.id, &job_specs[q.id])),
                pivot,
                |spec, k| capability(spec, &nodes[k]).is_ok(),
                |k| k + 1,
            );
            let mut given = vec![0u32; nodes.len()];
            let mut placed = vec![false; jobs.len()];
            for (j, k) in &placements {
                prop_assert!(!placed[*j], "job {} placed twice", j);
                placed[*j] = true;
                prop_assert!(eligibility(&job_specs[*j], &nodes[*k]).is_ok());
                given[*k] += 1;
            }
            for (k, n) in nodes.iter().enumerate() {
                prop_assert!(given[k] <= n.free_slots);
            }
            for (position, q) in queued.iter().enumerate() {
                if placed[q.id] {
                    continue;
                }
                let spec = &job_specs[q.id];
                for (k, n) in nodes.iter().enumerate() {
                    prop_assert!(
                        given[k] >= n.free_slots || eligibility(spec, n).is_err(),
                        "job at queue place {} waits while node {} has a free eligible slot",
                        position, k
                    );
                }
            }
        }
    }

    #[test]
    fn a_node_keeps_its_workers_recent_lora_sets() {
        let mut loaded = vec![0];
        remember_set(&mut loaded, 7, 2);
        assert_eq!(loaded, vec![7, 0]);
        remember_set(&mut loaded, 9, 2);
        assert_eq!(loaded, vec![9, 7]);
        remember_set(&mut loaded, 7, 2);
        assert_eq!(loaded, vec![7, 9]);
        assert_eq!(lora_set_key(&[]), 0);
        let ink = lora_job(1).loras;
        let mut reversed = lora_job(2).loras;
        reversed.reverse();
        assert_eq!(
            lora_set_key(&reversed),
            lora_set_key(&lora_job(2).loras),
            "order does not matter"
        );
        assert_ne!(lora_set_key(&ink), lora_set_key(&lora_job(2).loras));
        let mut stronger = ink.clone();
        stronger[0].strength = 0.5;
        assert_ne!(lora_set_key(&ink), lora_set_key(&stronger), "strength does");
    }
}
