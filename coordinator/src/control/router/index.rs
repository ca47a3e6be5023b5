//! The capability index: the nodes that can take work now, ranked, per family, per (family,
//! LoRA set), and per loaded model and per family with a loaded model, so a dispatch decision
//! takes O(log n); and one dispatch round over it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use drover_shared::family::ModelFamily;
use drover_shared::job::{JobSpec, JobTask, ModelSelector};

use drover_shared::ids::NodeId;

use super::{Fit, NodeView, fit_on, lora_set_key, remember_set, speed_key};

/// A node's rank in the index, smaller is better: faster, then more free slots.
type Rank = (Reverse<u64>, Reverse<u32>);

/// What the index keeps about a node that can take work now.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Families of its models.
    pub families: Vec<ModelFamily>,
    /// Ids (lowercase) of its models loaded now.
    pub resident: Vec<String>,
    /// Families of its models loaded now.
    pub resident_families: Vec<ModelFamily>,
    /// Speed bucket (`speed_key`).
    pub speed: u64,
    /// Free slots (lease groups it can still take, > 0).
    pub free: u32,
    /// Most jobs in one lease group (its `max_batch`).
    pub batch: u32,
    /// Worker actors.
    pub workers: u32,
    /// LoRA sets merged on its workers, most recent first.
    pub loaded: Vec<u64>,
}

impl Member {
    /// The member for `node`, if it can take work now (online, not suspect, not draining, with a
    /// free slot).
    pub fn of(node: &NodeView<'_>) -> Option<Self> {
        (node.online && !node.suspect && !node.draining && node.free_slots > 0).then(|| {
            let mut families = Vec::new();
            let mut resident = Vec::new();
            let mut resident_families = Vec::new();
            for m in node.model_facts() {
                if !families.contains(&m.family) {
                    families.push(m.family);
                }
                if node.is_resident(m.id) {
                    let id = m.id.to_ascii_lowercase();
                    if !resident.contains(&id) {
                        resident.push(id);
                    }
                    if !resident_families.contains(&m.family) {
                        resident_families.push(m.family);
                    }
                }
            }
            Self {
                families,
                resident,
                resident_families,
                speed: speed_key(node),
                free: node.free_slots,
                batch: node.max_batch.max(1),
                workers: node.workers,
                loaded: node.loaded.to_vec(),
            }
        })
    }

    fn rank(&self) -> Rank {
        (Reverse(self.speed), Reverse(self.free))
    }
}

/// An index pick's candidate, smaller is better: speed rank, not affine, free-slot rank, then
/// (before the pivot, key) so equals take turns.
type Candidate<K> = (Reverse<u64>, bool, Reverse<u32>, (bool, K));

/// A candidate that must load the job's model, smaller is better: completion key, not affine,
/// free-slot rank, then (before the pivot, key).
type CostCandidate<K> = (u64, bool, Reverse<u32>, (bool, K));

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
    by_model: HashMap<String, Ranked<K>>,
    by_resident_family: [Ranked<K>; 4],
    members: HashMap<K, Member>,
    total_free: u64,
}

impl<K> Default for CapabilityIndex<K> {
    fn default() -> Self {
        Self {
            ranked: Default::default(),
            by_set: HashMap::new(),
            by_model: HashMap::new(),
            by_resident_family: Default::default(),
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
            for f in &old.families {
                take_out(&mut self.ranked[family_slot(*f)], rank, &key);
                for set in &old.loaded {
                    if let Some(ranked) = self.by_set.get_mut(&(*f, *set)) {
                        take_out(ranked, rank, &key);
                        if ranked.is_empty() {
                            self.by_set.remove(&(*f, *set));
                        }
                    }
                }
            }
            for id in &old.resident {
                if let Some(ranked) = self.by_model.get_mut(id) {
                    take_out(ranked, rank, &key);
                    if ranked.is_empty() {
                        self.by_model.remove(id);
                    }
                }
            }
            for f in &old.resident_families {
                take_out(&mut self.by_resident_family[family_slot(*f)], rank, &key);
            }
            self.total_free -= u64::from(old.free);
        }
        let Some(member) = member.filter(|m| m.free > 0) else {
            return;
        };
        let rank = member.rank();
        for f in &member.families {
            put(&mut self.ranked[family_slot(*f)], rank, key);
            for set in &member.loaded {
                put(self.by_set.entry((*f, *set)).or_default(), rank, key);
            }
        }
        for id in &member.resident {
            put(self.by_model.entry(id.clone()).or_default(), rank, key);
        }
        for f in &member.resident_families {
            put(&mut self.by_resident_family[family_slot(*f)], rank, key);
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

    /// The node that should run `job` (its families, model and LoRA set `set`) among those
    /// `capable` accepts (`Some(fit)`, [`fit_on`]): first among the nodes where it runs on a
    /// loaded model, the best [`Score`](super::pick) (speed bucket, LoRA affinity, free slots),
    /// in O(log n); else — the model must be loaded — the soonest estimated completion (load and
    /// run), then affinity and free slots, over every capable node of its families; among equals
    /// the first at or after `pivot` (wrapping). `None` when no indexed node is capable.
    pub fn pick(
        &self,
        job: &JobKeys<'_>,
        pivot: K,
        capable: impl Fn(K) -> Option<Fit>,
    ) -> Option<K> {
        if job.residency {
            let loaded = |k: K| capable(k).is_some_and(|f| f.loaded);
            let groups: Vec<&Ranked<K>> = match &job.model {
                Some(id) => self.by_model.get(id).into_iter().collect(),
                None => job
                    .families
                    .iter()
                    .map(|f| &self.by_resident_family[family_slot(*f)])
                    .collect(),
            };
            if let Some(key) = self.best(groups, job.families, job.set, pivot, &loaded) {
                return Some(key);
            }
            return self.cheapest(job, pivot, &capable);
        }
        let any = |k: K| capable(k).is_some();
        let groups = job
            .families
            .iter()
            .map(|f| &self.ranked[family_slot(*f)])
            .collect();
        self.best(groups, job.families, job.set, pivot, &any)
    }

    /// The capable node of `job`'s families where it completes soonest, loading its model first:
    /// smallest (cost, not affine, fewest free slots last, before the pivot, key).
    fn cheapest(
        &self,
        job: &JobKeys<'_>,
        pivot: K,
        capable: &impl Fn(K) -> Option<Fit>,
    ) -> Option<K> {
        let mut best: Option<CostCandidate<K>> = None;
        for family in job.families {
            for key in self.ranked[family_slot(*family)].values().flatten() {
                let (Some(fit), Some(member)) = (capable(*key), self.members.get(key)) else {
                    continue;
                };
                let candidate = (
                    fit.cost,
                    !member.loaded.contains(&job.set),
                    Reverse(member.free),
                    (*key < pivot, *key),
                );
                if best.is_none_or(|b| candidate < b) {
                    best = Some(candidate);
                }
            }
        }
        best.map(|(_, _, _, (_, key))| key)
    }

    /// The best capable node of `groups`: each group's first capable node (best rank, from the
    /// pivot among equals) and each family's first capable node with LoRA set `set` merged,
    /// compared by (speed rank, not affine, free-slot rank, before the pivot, key). An affine
    /// node wins over an equally fast one: affinity outranks free slots, not speed.
    fn best(
        &self,
        groups: Vec<&Ranked<K>>,
        families: &[ModelFamily],
        set: u64,
        pivot: K,
        capable: &impl Fn(K) -> bool,
    ) -> Option<K> {
        let mut best: Option<Candidate<K>> = None;
        let mut consider = |(rank, key): (Rank, K), affine: bool| {
            let candidate = (rank.0, !affine, rank.1, (key < pivot, key));
            if best.is_none_or(|b| candidate < b) {
                best = Some(candidate);
            }
        };
        for ranked in groups {
            if let Some(found) = first_capable(ranked, pivot, capable) {
                let affine = self
                    .members
                    .get(&found.1)
                    .is_some_and(|m| m.loaded.contains(&set));
                consider(found, affine);
            }
        }
        for family in families {
            if let Some(found) = self
                .by_set
                .get(&(*family, set))
                .and_then(|ranked| first_capable(ranked, pivot, capable))
            {
                consider(found, true);
            }
        }
        best.map(|(_, _, _, (_, key))| key)
    }

    /// Records that node `key` took one lease group of LoRA set `set`: one slot less, and the set
    /// now merged on one of its workers (the least recently used one is replaced).
    pub fn take(&mut self, key: K, set: u64) {
        let Some(mut member) = self.members.get(&key).cloned() else {
            return;
        };
        member.free -= 1;
        remember_set(&mut member.loaded, set, member.workers as usize);
        self.upsert(key, Some(member));
    }
}

/// What an index pick looks up for a job ([`JobKeys::of`]).
#[derive(Clone, Debug, PartialEq)]
pub struct JobKeys<'a> {
    /// The families whose nodes may serve it: the one it asks for, or all (an upscale runs on
    /// a node of any family).
    pub families: &'a [ModelFamily],
    /// The model id it asks for (lowercase), if it names one.
    pub model: Option<String>,
    /// Its LoRA set ([`lora_set_key`]).
    pub set: u64,
    /// Whether residency matters (not for an upscale: no model runs).
    pub residency: bool,
}

impl<'a> JobKeys<'a> {
    /// The keys of `job`.
    pub fn of(job: &'a JobSpec) -> Self {
        let upscale = job.task == JobTask::Upscale;
        Self {
            families: match &job.model {
                _ if upscale => &ModelFamily::ALL,
                Some(ModelSelector::Family(f)) => std::slice::from_ref(f),
                _ => &ModelFamily::ALL,
            },
            model: match &job.model {
                Some(ModelSelector::ModelId(id)) if !upscale => Some(id.to_ascii_lowercase()),
                _ => None,
            },
            set: lora_set_key(&job.loras),
            residency: !upscale,
        }
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
            .pick(&JobKeys::of(job), pivot, |i| fit_on(job, &nodes[i]))
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
                samplers: &[],
                img2img: true,
                inpaint: true,
                loras: &[],
                upscalers: &[],
                online: i % 7 != 0,
                suspect: false,
                draining: i % 11 == 0,
                free_slots: (i % 3) as u32,
                max_batch: 1,
                workers: 2,
                loaded: &[0],
                pixel_steps_per_second: 1e6 + i as f64,
                models: &[],
                resident: None,
                residency: &[],
            }
        })
        .collect()
}

/// The node `index` picks for `job`, with `capable` telling whether a node id can serve it
/// ([`fit_on`]): [`CapabilityIndex::pick`] with the job's keys.
pub fn pick_indexed<K: Ord + Copy + Hash>(
    index: &CapabilityIndex<K>,
    job: &JobSpec,
    pivot: K,
    capable: impl Fn(K) -> Option<Fit>,
) -> Option<K> {
    index.pick(&JobKeys::of(job), pivot, capable)
}

/// How far past a group's first job a dispatch round looks for partners of its batch key.
pub const PARTNER_SCAN: usize = 512;

/// Reads `queue` into `seen` (jobs read so far, with whether each is placed) until position
/// `at` is there; false when the queue ends first.
fn reach<'a, J>(
    seen: &mut Vec<(J, &'a JobSpec, bool)>,
    queue: &mut impl Iterator<Item = (J, &'a JobSpec)>,
    at: usize,
) -> bool {
    while seen.len() <= at {
        match queue.next() {
            Some((job, spec)) => seen.push((job, spec, false)),
            None => return false,
        }
    }
    true
}

/// What one dispatch round decided ([`plan_dispatch`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Round<K, J> {
    /// Lease groups: a node and its jobs, in queue order.
    pub groups: Vec<(K, Vec<J>)>,
    /// First jobs of groups held back to gather partners (the gather window).
    pub held: Vec<J>,
    /// Where the next round's search among equal nodes starts.
    pub pivot: K,
}

/// One dispatch round over `index`: offers the jobs of `queue` in its order, each to the node
/// [`pick_indexed`] picks among those `capable` accepts for it, taking one of that node's slots
/// (a worker) before the next job is offered; stops when no slot is left. When the node batches
/// (`max_batch` > 1) and the job has a `batch_key` there, later queued jobs (up to
/// [`PARTNER_SCAN`] on) with the same key that the node can serve join it, in queue order, up to
/// `max_batch` jobs: one lease group, one worker. A group leaves with what is queued now, unless
/// it is short of `max_batch` and every job in it may still wait for partners (`hold`: the
/// gather window, never true when it is 0): then it is held, its node's slot left to the jobs
/// behind. The pivot moves past each chosen node so equal nodes take turns.
///
/// A job left unplaced and not held has no free capable node left in `index` (none stays idle
/// while it waits), and no group of its key with room on a node that can serve it; a partner
/// placed ahead of an earlier job rides on a worker that job could not use.
pub fn plan_dispatch<'a, K: Ord + Copy + Hash, J: Copy, B: PartialEq>(
    index: &mut CapabilityIndex<K>,
    queue: impl IntoIterator<Item = (J, &'a JobSpec)>,
    mut pivot: K,
    capable: impl Fn(J, &JobSpec, K) -> Option<Fit>,
    batch_key: impl Fn(&JobSpec, K) -> Option<B>,
    hold: impl Fn(J) -> bool,
    after: impl Fn(K) -> K,
) -> Round<K, J> {
    let mut groups = Vec::new();
    let mut held = Vec::new();
    if index.free_slots() == 0 {
        return Round {
            groups,
            held,
            pivot,
        };
    }
    // The queue is read lazily: a round usually ends long before its end.
    let mut queue = queue.into_iter();
    let mut seen: Vec<(J, &JobSpec, bool)> = Vec::new();
    let mut i = 0;
    loop {
        if index.free_slots() == 0 {
            break;
        }
        if !reach(&mut seen, &mut queue, i) {
            break;
        }
        let (job, spec, placed) = seen[i];
        i += 1;
        if placed {
            continue;
        }
        let keys = JobKeys::of(spec);
        let set = keys.set;
        let Some(key) = index.pick(&keys, pivot, |k| capable(job, spec, k)) else {
            continue;
        };
        let room = index.member(&key).map_or(1, |m| m.batch.max(1)) as usize;
        // The group: this job, then its partners (positions in `seen`).
        let mut group = vec![i - 1];
        if room > 1
            && let Some(leader) = batch_key(spec, key)
        {
            let mut j = i;
            while group.len() < room && j < i + PARTNER_SCAN {
                if !reach(&mut seen, &mut queue, j) {
                    break;
                }
                let (other, other_spec, taken) = seen[j];
                if !taken
                    && batch_key(other_spec, key).as_ref() == Some(&leader)
                    && capable(other, other_spec, key).is_some()
                {
                    group.push(j);
                }
                j += 1;
            }
        }
        if group.len() < room && group.iter().all(|&g| hold(seen[g].0)) {
            held.push(job);
            continue;
        }
        index.take(key, set);
        pivot = after(key);
        for &g in &group {
            seen[g].2 = true;
        }
        groups.push((key, group.iter().map(|&g| seen[g].0).collect()));
    }
    Round {
        groups,
        held,
        pivot,
    }
}
