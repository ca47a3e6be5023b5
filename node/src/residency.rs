//! Which models a node holds in memory: a budget of bytes (`NODE_MEMORY_BUDGET`), one pool of
//! loaded copies per catalogued model, shared by the workers of one device.
//!
//! A worker *checks out* a copy of the model its job asks for and gives it back when the job
//! ends. An idle copy is reused (one whose LoRA set already matches first); without one, a new
//! copy is loaded, outside the lock so other workers go on, after making room: idle copies of
//! other models are evicted least recently used first, never a pinned model's (`PIN_MODELS`)
//! and never a copy in use. When the copies in use fill the budget the worker waits for one to
//! come back. Every load is timed; loads, evictions and load time are counted per model for the
//! coordinator (heartbeats) and the metrics.
//!
//! The decisions (what fits, what to evict) are [`Ledger`]'s, a pure structure tested on its
//! own; [`Residency`] adds the lock, the waiting and the values.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use crate::error::{NodeError, Result};

/// A catalogued model as residency sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCost {
    /// Its name (for reasons and logs).
    pub name: String,
    /// Bytes one loaded copy takes.
    pub bytes: u64,
    /// Never evicted.
    pub pinned: bool,
}

/// A model's residency, as heartbeats report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Copies loaded (idle or in use) or loading.
    pub copies: u32,
    /// Loads since start.
    pub loads: u64,
    /// Evictions since start.
    pub evictions: u64,
    /// Milliseconds all loads took.
    pub load_ms_total: u64,
    /// The last load's milliseconds.
    pub last_load_ms: u64,
}

/// What the ledger knows about one model.
#[derive(Clone, Debug)]
struct Entry {
    cost: ModelCost,
    idle: u32,
    busy: u32,
    loading: u32,
    last_used: u64,
    stats: ModelStats,
}

/// The pure bookkeeping of residency: bytes in use, copies per model, least-recent use.
#[derive(Clone, Debug)]
pub struct Ledger {
    budget: u64,
    used: u64,
    clock: u64,
    entries: Vec<Entry>,
}

/// What a check-out must do ([`Ledger::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Take an idle copy.
    Reuse,
    /// Evict an idle copy of each model listed (in order), then load a copy.
    Load {
        /// Models (indices) of which one idle copy each goes.
        evict: Vec<usize>,
    },
    /// No room until a copy in use comes back.
    Wait,
}

impl Ledger {
    /// A ledger of `models` under `budget` bytes. Refuses a catalogue whose pinned models do not
    /// fit together, or a model that does not fit beside them.
    pub fn new(budget: u64, models: Vec<ModelCost>) -> Result<Self> {
        let pinned: u64 = models.iter().filter(|m| m.pinned).map(|m| m.bytes).sum();
        if pinned > budget {
            return Err(NodeError::Config(format!(
                "the pinned models need {pinned} bytes, more than NODE_MEMORY_BUDGET={budget}"
            )));
        }
        if let Some(m) = models
            .iter()
            .find(|m| !m.pinned && m.bytes + pinned > budget)
        {
            return Err(NodeError::Config(format!(
                "model {} needs {} bytes, which do not fit NODE_MEMORY_BUDGET={budget} beside \
                 the pinned models ({pinned} bytes)",
                m.name, m.bytes
            )));
        }
        Ok(Self {
            budget,
            used: 0,
            clock: 0,
            entries: models
                .into_iter()
                .map(|cost| Entry {
                    cost,
                    idle: 0,
                    busy: 0,
                    loading: 0,
                    last_used: 0,
                    stats: ModelStats::default(),
                })
                .collect(),
        })
    }

    /// Bytes the loaded and loading copies take.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// What checking out a copy of `model` takes now.
    pub fn plan(&self, model: usize) -> Plan {
        if self.entries[model].idle > 0 {
            return Plan::Reuse;
        }
        let need = self.entries[model].cost.bytes;
        let mut free = self.budget - self.used;
        let mut evict = Vec::new();
        // Candidates: models with idle copies, not pinned, least recently used first.
        let mut candidates: Vec<(u64, usize, u32)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| *i != model && !e.cost.pinned && e.idle > 0)
            .map(|(i, e)| (e.last_used, i, e.idle))
            .collect();
        candidates.sort_unstable();
        let mut candidates = candidates.into_iter();
        let mut current: Option<(usize, u32)> = None;
        while free < need {
            let (i, left) = match current.take() {
                Some((i, left)) if left > 0 => (i, left),
                _ => match candidates.next() {
                    Some((_, i, idle)) => (i, idle),
                    None => return Plan::Wait,
                },
            };
            evict.push(i);
            free += self.entries[i].cost.bytes;
            current = Some((i, left - 1));
        }
        Plan::Load { evict }
    }

    /// Takes an idle copy of `model` into use.
    pub fn reuse(&mut self, model: usize) {
        let e = &mut self.entries[model];
        debug_assert!(e.idle > 0);
        e.idle -= 1;
        e.busy += 1;
        self.clock += 1;
        e.last_used = self.clock;
    }

    /// Applies a [`Plan::Load`]: the evictions, and the new copy's bytes reserved while it loads.
    pub fn start_load(&mut self, model: usize, evict: &[usize]) {
        for &i in evict {
            let e = &mut self.entries[i];
            debug_assert!(e.idle > 0 && !e.cost.pinned);
            e.idle -= 1;
            e.stats.evictions += 1;
            self.used -= e.cost.bytes;
        }
        let e = &mut self.entries[model];
        e.loading += 1;
        self.used += e.cost.bytes;
        debug_assert!(self.used <= self.budget);
    }

    /// A load of `model` ended: in use when it succeeded (taking `ms`), its bytes released when
    /// it failed.
    pub fn end_load(&mut self, model: usize, loaded: Option<u64>) {
        let e = &mut self.entries[model];
        e.loading -= 1;
        match loaded {
            Some(ms) => {
                e.busy += 1;
                e.stats.loads += 1;
                e.stats.load_ms_total += ms;
                e.stats.last_load_ms = ms;
                self.clock += 1;
                e.last_used = self.clock;
            }
            None => self.used -= e.cost.bytes,
        }
    }

    /// Counts a copy of `model` loaded in `ms` outside a check-out as idle, when it fits
    /// without evicting; answers whether it does.
    pub fn admit(&mut self, model: usize, ms: u64) -> bool {
        let e = &mut self.entries[model];
        if self.used + e.cost.bytes > self.budget {
            return false;
        }
        self.used += e.cost.bytes;
        e.idle += 1;
        e.stats.loads += 1;
        e.stats.load_ms_total += ms;
        e.stats.last_load_ms = ms;
        self.clock += 1;
        e.last_used = self.clock;
        true
    }

    /// Drops every idle copy of `model` (counted as evictions); answers how many went. A
    /// pinned model is refused.
    pub fn unload(&mut self, model: usize) -> Result<u32> {
        let e = &mut self.entries[model];
        if e.cost.pinned {
            return Err(NodeError::InvalidJob(format!(
                "model {} is pinned: unpin it first",
                e.cost.name
            )));
        }
        let n = e.idle;
        e.idle = 0;
        e.stats.evictions += u64::from(n);
        self.used -= u64::from(n) * e.cost.bytes;
        Ok(n)
    }

    /// Pins or unpins `model`. Pinning is refused when the pinned models would not fit the
    /// budget together.
    pub fn set_pinned(&mut self, model: usize, pinned: bool) -> Result<()> {
        if pinned && !self.entries[model].cost.pinned {
            let total: u64 = self
                .entries
                .iter()
                .filter(|e| e.cost.pinned)
                .map(|e| e.cost.bytes)
                .sum::<u64>()
                + self.entries[model].cost.bytes;
            if total > self.budget {
                return Err(NodeError::InvalidJob(format!(
                    "pinning model {} would pin {total} bytes, more than the budget of {}",
                    self.entries[model].cost.name, self.budget
                )));
            }
        }
        self.entries[model].cost.pinned = pinned;
        Ok(())
    }

    /// A copy of `model` in use came back.
    pub fn give_back(&mut self, model: usize) {
        let e = &mut self.entries[model];
        debug_assert!(e.busy > 0);
        e.busy -= 1;
        e.idle += 1;
        self.clock += 1;
        e.last_used = self.clock;
    }

    /// Every model's residency, in catalogue order.
    pub fn stats(&self) -> Vec<ModelStats> {
        self.entries
            .iter()
            .map(|e| ModelStats {
                copies: e.idle + e.busy + e.loading,
                ..e.stats.clone()
            })
            .collect()
    }
}

/// Residency with its loaded values (pipelines): the ledger under a lock, idle copies per model.
pub struct Residency<P> {
    state: Mutex<(Ledger, Vec<Vec<P>>)>,
    returned: Condvar,
}

/// A copy of a model in use; it goes back to its pool when dropped.
pub struct Lease<'a, P> {
    residency: &'a Residency<P>,
    model: usize,
    value: Option<P>,
}

impl<P> std::ops::Deref for Lease<'_, P> {
    type Target = P;
    fn deref(&self) -> &P {
        self.value
            .as_ref()
            .expect("a lease holds its copy until dropped")
    }
}

impl<P> std::ops::DerefMut for Lease<'_, P> {
    fn deref_mut(&mut self) -> &mut P {
        self.value
            .as_mut()
            .expect("a lease holds its copy until dropped")
    }
}

impl<P> Drop for Lease<'_, P> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            let mut state = self.residency.lock();
            state.0.give_back(self.model);
            state.1[self.model].push(value);
            drop(state);
            self.residency.returned.notify_all();
        }
    }
}

impl<P> Residency<P> {
    /// Residency over `ledger`, nothing loaded.
    pub fn new(ledger: Ledger) -> Self {
        let pools = (0..ledger.entries.len()).map(|_| Vec::new()).collect();
        Self {
            state: Mutex::new((ledger, pools)),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Ledger, Vec<Vec<P>>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of `model`: an idle one (the first `prefer` accepts, else any), or a new one from
    /// `load` once there is room (evicting idle copies of other models, least recently used
    /// first), waiting for a copy in use to come back when there is none. `load` runs without
    /// the lock.
    pub fn check_out(
        &self,
        model: usize,
        prefer: impl Fn(&P) -> bool,
        load: impl FnOnce() -> Result<P>,
    ) -> Result<Lease<'_, P>> {
        let mut state = self.lock();
        loop {
            match state.0.plan(model) {
                Plan::Reuse => {
                    let pool = &mut state.1[model];
                    let at = pool.iter().position(&prefer).unwrap_or(pool.len() - 1);
                    let value = pool.swap_remove(at);
                    state.0.reuse(model);
                    return Ok(Lease {
                        residency: self,
                        model,
                        value: Some(value),
                    });
                }
                Plan::Load { evict } => {
                    let mut dropped = Vec::with_capacity(evict.len());
                    for &i in &evict {
                        // The least recently returned copy of that model goes.
                        if !state.1[i].is_empty() {
                            dropped.push(state.1[i].remove(0));
                        }
                        tracing::info!(
                            model = %state.0.entries[i].cost.name,
                            for_model = %state.0.entries[model].cost.name,
                            "model evicted"
                        );
                    }
                    state.0.start_load(model, &evict);
                    drop(state);
                    drop(dropped);
                    let started = Instant::now();
                    let loaded = load();
                    let ms = started.elapsed().as_millis() as u64;
                    let mut state = self.lock();
                    return match loaded {
                        Ok(value) => {
                            state.0.end_load(model, Some(ms));
                            tracing::info!(
                                model = %state.0.entries[model].cost.name,
                                ms,
                                used = state.0.used(),
                                budget = state.0.budget(),
                                "model loaded"
                            );
                            Ok(Lease {
                                residency: self,
                                model,
                                value: Some(value),
                            })
                        }
                        Err(e) => {
                            state.0.end_load(model, None);
                            drop(state);
                            self.returned.notify_all();
                            Err(e)
                        }
                    };
                }
                Plan::Wait => {
                    state = self.returned.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Keeps `value`, a copy of `model` loaded in `ms`, as idle when it fits without evicting;
    /// answers whether it was kept (else it is dropped).
    pub fn admit(&self, model: usize, value: P, ms: u64) -> bool {
        let mut state = self.lock();
        if state.0.admit(model, ms) {
            state.1[model].push(value);
            true
        } else {
            false
        }
    }

    /// Every model's residency, in catalogue order.
    pub fn stats(&self) -> Vec<ModelStats> {
        self.lock().0.stats()
    }

    /// Drops the idle copies of `model` ([`Ledger::unload`]); answers how many went.
    pub fn unload(&self, model: usize) -> Result<u32> {
        let mut state = self.lock();
        let n = state.0.unload(model)?;
        let dropped: Vec<P> = state.1[model].drain(..).collect();
        drop(state);
        drop(dropped);
        self.returned.notify_all();
        Ok(n)
    }

    /// Pins or unpins `model` ([`Ledger::set_pinned`]).
    pub fn set_pinned(&self, model: usize, pinned: bool) -> Result<()> {
        self.lock().0.set_pinned(model, pinned)
    }

    /// Bytes in use and the budget.
    pub fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        (state.0.used(), state.0.budget())
    }
}

/// A catalogue's models and their loaded copies: ids, residency and how to load a copy.
pub struct Models<P> {
    ids: Vec<String>,
    residency: Residency<P>,
    loader: Box<dyn Fn(usize) -> Result<P> + Send + Sync>,
}

impl<P> Models<P> {
    /// The models `ids` (the default first) under `ledger`, copies made by `loader`; nothing
    /// loaded.
    pub fn new(
        ids: Vec<String>,
        ledger: Ledger,
        loader: impl Fn(usize) -> Result<P> + Send + Sync + 'static,
    ) -> Self {
        Self {
            ids,
            residency: Residency::new(ledger),
            loader: Box::new(loader),
        }
    }

    /// Loads a fresh copy of model `index`, outside the budget (the caller admits it or not).
    pub fn load(&self, index: usize) -> Result<P> {
        (self.loader)(index)
    }

    /// The position of the model with id `model_id` (case-insensitive; empty: the default); a
    /// model this node does not serve refuses the job.
    pub fn index_of(&self, model_id: &str) -> Result<usize> {
        if model_id.is_empty() {
            return Ok(0);
        }
        self.ids
            .iter()
            .position(|id| id.eq_ignore_ascii_case(model_id))
            .ok_or_else(|| {
                NodeError::InvalidJob(format!("model {model_id} is not served by this node"))
            })
    }

    /// A copy of model `index` for one job: an idle one (one `prefer` accepts first), else one
    /// loaded once there is room ([`Residency::check_out`]).
    pub fn check_out(&self, index: usize, prefer: impl Fn(&P) -> bool) -> Result<Lease<'_, P>> {
        self.residency.check_out(index, prefer, || self.load(index))
    }

    /// Checks out and gives back a copy of model `index` now: it is loaded when it was not.
    pub fn preload(&self, index: usize) -> Result<()> {
        self.check_out(index, |_| true).map(drop)
    }

    /// Keeps `value`, a copy of model `index` loaded in `ms`, as idle when it fits without
    /// evicting; answers whether it was kept.
    pub fn admit(&self, index: usize, value: P, ms: u64) -> bool {
        self.residency.admit(index, value, ms)
    }

    /// Every model's id and residency, in catalogue order.
    pub fn stats(&self) -> Vec<(String, ModelStats)> {
        self.ids
            .iter()
            .cloned()
            .zip(self.residency.stats())
            .collect()
    }

    /// Bytes in use and the budget.
    pub fn usage(&self) -> (u64, u64) {
        self.residency.usage()
    }

    /// Drops the idle copies of model `index`; answers how many went.
    pub fn unload(&self, index: usize) -> Result<u32> {
        self.residency.unload(index)
    }

    /// Pins (and loads) or unpins model `index`.
    pub fn set_pinned(&self, index: usize, pinned: bool) -> Result<()> {
        self.residency.set_pinned(index, pinned)?;
        if pinned {
            self.preload(index)?;
        }
        Ok(())
    }
}

/// Parses a byte count: digits with an optional `K`, `M`, `G` or `T` (powers of 1024, `B`,
/// `iB` after it allowed), e.g. `6G`, `512MiB`, `1073741824`.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 6G, 512M, 1073741824)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{text}`: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{text}` is out of range"))
}

/// The host's memory (`MemTotal` of `/proc/meminfo`), three quarters of which is a cpu node's
/// default budget; `None` where it cannot be read.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cost(name: &str, bytes: u64, pinned: bool) -> ModelCost {
        ModelCost {
            name: name.into(),
            bytes,
            pinned,
        }
    }

    #[test]
    fn idle_copies_are_evicted_least_recently_used_first_and_pins_never() {
        let mut l = Ledger::new(
            10,
            vec![
                cost("a", 4, false),
                cost("b", 4, false),
                cost("c", 4, false),
                cost("p", 2, true),
            ],
        )
        .unwrap();
        for m in [3, 0, 1] {
            assert_eq!(l.plan(m), Plan::Load { evict: vec![] });
            l.start_load(m, &[]);
            l.end_load(m, Some(7));
            l.give_back(m);
        }
        assert_eq!(l.used(), 10);
        // a was used before b: a goes for c; p (pinned, oldest) stays.
        assert_eq!(l.plan(2), Plan::Load { evict: vec![0] });
        l.start_load(2, &[0]);
        l.end_load(2, Some(5));
        assert_eq!(l.stats()[0].evictions, 1);
        assert_eq!(l.stats()[0].copies, 0);
        // c is in use, b idle: a takes b's room.
        assert_eq!(l.plan(0), Plan::Load { evict: vec![1] });
        l.start_load(0, &[1]);
        l.end_load(0, None);
        assert_eq!(l.used(), 6, "a failed load gives its bytes back");
        // b again fits in the room a's failed load left.
        assert_eq!(l.plan(1), Plan::Load { evict: vec![] });
        l.start_load(1, &[]);
        l.end_load(1, Some(1));
        // Everything left is in use or pinned: wait.
        assert_eq!(l.plan(0), Plan::Wait);
        l.give_back(2);
        assert_eq!(l.plan(0), Plan::Load { evict: vec![2] });
        assert_eq!(l.plan(2), Plan::Reuse);
        let p = &l.stats()[3];
        assert_eq!((p.copies, p.loads, p.evictions), (1, 1, 0));
    }

    #[test]
    fn several_copies_of_one_model_may_go_for_a_larger_one() {
        let mut l = Ledger::new(8, vec![cost("small", 3, false), cost("big", 6, false)]).unwrap();
        for _ in 0..2 {
            l.start_load(0, &[]);
            l.end_load(0, Some(1));
        }
        l.give_back(0);
        l.give_back(0);
        assert_eq!(l.plan(1), Plan::Load { evict: vec![0, 0] });
    }

    #[test]
    fn catalogues_that_cannot_fit_are_refused_with_the_reason() {
        let err = Ledger::new(5, vec![cost("p", 3, true), cost("q", 3, true)]).unwrap_err();
        assert!(
            err.to_string().contains("pinned models need 6 bytes"),
            "{err}"
        );
        let err = Ledger::new(5, vec![cost("p", 3, true), cost("big", 3, false)]).unwrap_err();
        assert!(err.to_string().contains("model big needs 3 bytes"), "{err}");
    }

    #[test]
    fn a_worker_waits_for_a_copy_in_use_and_others_load_meanwhile() {
        let residency = Arc::new(Residency::new(
            Ledger::new(4, vec![cost("a", 4, false), cost("b", 4, false)]).unwrap(),
        ));
        let a = residency.check_out(0, |_| true, || Ok("a1")).unwrap();
        let r = residency.clone();
        let waiter = std::thread::spawn(move || {
            let b = r.check_out(1, |_| true, || Ok("b1")).unwrap();
            *b
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "no room while a is in use");
        drop(a);
        assert_eq!(waiter.join().unwrap(), "b1");
        let stats = residency.stats();
        assert_eq!((stats[0].copies, stats[0].evictions), (0, 1));
        assert_eq!((stats[1].copies, stats[1].loads), (1, 1));
        // A failed load leaves nothing behind.
        let err = residency
            .check_out(0, |_| true, || Err(NodeError::Render("broken".into())))
            .err()
            .unwrap();
        assert!(err.to_string().contains("broken"));
        assert_eq!(residency.usage().0, 0);
    }

    #[test]
    fn operators_unload_idle_copies_and_pin_what_fits() {
        let mut l = Ledger::new(
            10,
            vec![
                cost("a", 4, false),
                cost("b", 4, false),
                cost("c", 4, false),
            ],
        )
        .unwrap();
        l.start_load(0, &[]);
        l.end_load(0, Some(1));
        l.give_back(0);
        assert_eq!(l.unload(0).unwrap(), 1);
        assert_eq!((l.used(), l.stats()[0].evictions), (0, 1));
        l.set_pinned(1, true).unwrap();
        l.set_pinned(2, true).unwrap();
        let err = l.set_pinned(0, true).unwrap_err();
        assert!(err.to_string().contains("would pin 12 bytes"), "{err}");
        assert!(l.unload(1).unwrap_err().to_string().contains("pinned"));
        l.set_pinned(1, false).unwrap();
        assert_eq!(l.unload(1).unwrap(), 0);
    }

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(parse_bytes("6G").unwrap(), 6 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes(" 1024 ").unwrap(), 1024);
        assert!(parse_bytes("6 apples").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-1G").is_err());
    }
}
