//! Routing and residency: how long a node would take to load a job's model, where a job whose
//! model must be loaded completes soonest, when a job may make a node load rather than wait for
//! a busy node that has the model, and where to load a waiting job's model ahead.

use std::cmp::Reverse;

use drover_shared::family::ModelFamily;
use drover_shared::ids::NodeId;
use drover_shared::job::{JobSpec, ModelSelector};

use super::{ModelFacts, NodeView, choose_model, speed_key};

/// Bytes per millisecond a node is taken to load a model at before it has measured a load
/// (1 GB/s: weights read from a local disk's page cache and converted).
pub const DEFAULT_LOAD_BYTES_PER_MS: u64 = 1_000_000;

/// How long loading model `m` on `node` should take, in milliseconds: 0 when it is loaded; its
/// last load there; else its bytes at the node's measured rate over its loads so far; else at
/// [`DEFAULT_LOAD_BYTES_PER_MS`].
pub fn load_estimate_ms(node: &NodeView<'_>, m: &ModelFacts<'_>) -> u64 {
    if node.is_resident(m.id) {
        return 0;
    }
    if let Some(last) = node
        .residency
        .iter()
        .find(|r| r.model_id.eq_ignore_ascii_case(m.id) && r.last_load_ms > 0)
    {
        return last.last_load_ms;
    }
    let (bytes, ms) = node
        .residency
        .iter()
        .filter(|r| r.loads > 0 && r.load_ms_total > 0)
        .filter_map(|r| {
            let size = node.models.iter().find(|a| a.model_id == r.model_id)?.bytes;
            Some((size.saturating_mul(r.loads), r.load_ms_total))
        })
        .fold((0u64, 0u64), |(b, t), (x, y)| {
            (b.saturating_add(x), t.saturating_add(y))
        });
    let rate = if bytes > 0 && ms > 0 {
        (bytes / ms).max(1)
    } else {
        DEFAULT_LOAD_BYTES_PER_MS
    };
    m.bytes / rate
}

/// How many load times a job waits for a busy node that has its model loaded before a free node
/// loads it ([`may_load`]): a switch costs the load now and, when the model it evicts is wanted
/// again, a load back.
pub const SWITCH_LOADS: u64 = 2;

/// How a capable node fits a job ([`fit_on`]): whether the model it would run is loaded there,
/// and, when not, the estimated completion of the job there (the load, then the run) as a
/// log-scale key (~9% buckets, smaller is sooner).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    /// The model it would run is loaded there.
    pub loaded: bool,
    /// Estimated completion key when not loaded (0 when loaded).
    pub cost: u64,
    /// The load's estimate in milliseconds ([`load_estimate_ms`]; 0 when loaded).
    pub load_ms: u64,
}

/// A duration in milliseconds as a key in ~9% log buckets, as [`speed_key`] ranks speeds.
pub fn cost_key(ms: f64) -> u64 {
    ((ms.max(0.0) + 1.0).log2() * 8.0) as u64
}

/// How `node` fits `job` ([`Fit`]); `None` when it cannot serve it. The run's estimate is the
/// job's pixel-steps at the node's speed (nothing when the speed is not known yet).
pub fn fit_on(job: &JobSpec, node: &NodeView<'_>) -> Option<Fit> {
    let choice = choose_model(job, node).ok()?;
    if choice.resident {
        return Some(Fit {
            loaded: true,
            cost: 0,
            load_ms: 0,
        });
    }
    let m = choice.facts;
    let sampler = job.sampler.or_else(|| m.samplers.first().copied());
    let calls = job.model_calls_with(sampler, job.steps_with(sampler));
    let work = job.size_on(m.family, m.sizes).pixels() as f64 * f64::from(calls);
    let speed = node.pixel_steps_per_second;
    let run_ms = if speed.is_finite() && speed > 1.0 {
        1000.0 * work / speed
    } else {
        0.0
    };
    let load_ms = load_estimate_ms(node, &m);
    Some(Fit {
        loaded: false,
        cost: cost_key(load_ms as f64 + run_ms),
        load_ms,
    })
}

/// Whether a job that has waited `waited_ms` may go to a free node that must first load its
/// model (about `load_ms`): at once when no node has a model for it loaded (it has to be loaded
/// somewhere), else only once it has waited what the switch costs ([`SWITCH_LOADS`] loads).
/// Until then it waits for a node that has the model loaded to free up — the ski-rental rule:
/// whichever comes first, the job never waits more than that cost longer than the better of
/// waiting and loading, and nodes do not trade models back and forth under a mixed stream.
pub fn may_load(waited_ms: u64, load_ms: u64, loaded_elsewhere: bool) -> bool {
    !loaded_elsewhere || waited_ms >= SWITCH_LOADS.saturating_mul(load_ms)
}

/// The models loaded on the nodes that can take work (online, on time, not draining), busy or
/// not: what [`may_load`] asks about a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadedModels {
    ids: std::collections::HashSet<String>,
    names: std::collections::HashSet<String>,
    families: Vec<ModelFamily>,
}

impl LoadedModels {
    /// The loaded models of `nodes`.
    pub fn of<'a>(nodes: impl IntoIterator<Item = NodeView<'a>>) -> Self {
        let mut out = Self::default();
        for n in nodes {
            if !n.online || n.suspect || n.draining {
                continue;
            }
            for m in n.model_facts() {
                if n.is_resident(m.id) {
                    out.ids.insert(m.id.to_ascii_lowercase());
                    out.names.insert(m.id.to_string());
                    out.names.insert(m.name.to_string());
                    if !out.families.contains(&m.family) {
                        out.families.push(m.family);
                    }
                }
            }
        }
        out
    }

    /// Whether some node has a model loaded that `job` asks for (the model it names, one of
    /// the family it names, any when it names none). Sizes and samplers are not looked at: a
    /// job this holds back waits at most its load time for nothing.
    pub fn serves(&self, job: &JobSpec) -> bool {
        match &job.model {
            Some(ModelSelector::ModelId(id)) => self.ids.contains(&id.to_ascii_lowercase()),
            Some(ModelSelector::Name(name)) => self.names.contains(name),
            Some(ModelSelector::Family(f)) => self.families.contains(f),
            None => !self.families.is_empty(),
        }
    }
}

/// Where a job waiting for a model that only busy nodes have loaded should have it loaded ahead:
/// among the idle nodes (online, on time, not draining, every worker free) that can serve it
/// with a model they do not have loaded, the one that loads it fastest ([`load_estimate_ms`]),
/// then the fastest renderer; answers the node and the model. `None` when a node could run it
/// on a loaded model, or no idle node can serve it.
pub fn preload_target<'a>(job: &JobSpec, nodes: &[NodeView<'a>]) -> Option<(NodeId, &'a str)> {
    // (load estimate, faster first), node, model.
    type Target<'a> = ((u64, Reverse<u64>), NodeId, &'a str);
    let mut best: Option<Target<'a>> = None;
    for n in nodes {
        let idle = n.online && !n.suspect && !n.draining && n.free_slots >= n.workers;
        let Ok(choice) = choose_model(job, n) else {
            continue;
        };
        if choice.resident {
            if idle {
                return None;
            }
            continue;
        }
        if !idle {
            continue;
        }
        let key = (load_estimate_ms(n, &choice.facts), Reverse(speed_key(n)));
        if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
            best = Some((key, n.id, choice.facts.id));
        }
    }
    best.map(|(_, id, model)| (id, model))
}
