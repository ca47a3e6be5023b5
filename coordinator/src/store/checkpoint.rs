//! The `drover-checkpoint` thread: puts each closed log generation's changes in sled (after
//! syncing the image segments they point into), flushes sled and retires the generation; runs
//! the retention sweep; and, while the store is degraded, tries every second to make it
//! writable again.
//!
//! A checkpoint that fails is carried: the next ones join it, and it is tried again once there
//! is room for it (its generations are retired only when it succeeds, and are replayed at the
//! next start otherwise). When sled failed a write it is reopened first (sled refuses every
//! write after a failed one, and some reads too), in the reserve's space when the failure gave
//! it back. A log replayed at a start that sled could not take is carried the same way.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use drover_shared::ids::{JobId, NodeId};

use super::error::{Result, StoreError};
use super::waiter::Waiter;
use super::{CHECKPOINT_EVERY, Shared, Trees, codec, image_log, lock, wal};

/// Free space wanted before sled is reopened after a failed write, and on top of twice its
/// changes' bytes before a carried checkpoint is tried again (a failed try costs sled's reads).
const DB_ROOM: u64 = 4 * 1024 * 1024;

/// An unfinished job's or finished job's value as it goes into sled at the next checkpoint.
#[derive(Clone)]
pub(super) enum Dirty {
    /// The JSON record, for `active`.
    Unfinished(Vec<u8>),
    /// The encoded finished record, for `jobs`, when it ended, and whether an earlier
    /// checkpoint (or run) left it an `active` entry to remove.
    Finished {
        value: Vec<u8>,
        ended_ms: u64,
        in_active: bool,
    },
}

/// What changed since the last checkpoint: the latest value per key.
#[derive(Clone, Default)]
pub(super) struct Changes {
    pub nodes: HashMap<NodeId, Vec<u8>>,
    pub jobs: HashMap<JobId, Dirty>,
    /// Source images of unfinished jobs (`codec::encode_source`), for `sources`; a finished
    /// job's goes from `sources` when its end is applied.
    pub sources: HashMap<JobId, Vec<u8>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.jobs.is_empty() && self.sources.is_empty()
    }

    /// Bytes of the values.
    fn bytes(&self) -> u64 {
        let jobs = self.jobs.values().map(|d| match d {
            Dirty::Unfinished(value) | Dirty::Finished { value, .. } => value.len(),
        });
        let nodes = self.nodes.values().map(Vec::len);
        let sources = self.sources.values().map(Vec::len);
        jobs.chain(nodes).chain(sources).map(|n| n as u64).sum()
    }

    /// These changes followed by `later` ones: the later value of a key wins. A finished job
    /// may have an `active` entry from these (a failed checkpoint may have written part of
    /// them), so its removal is kept.
    fn then(mut self, later: Self) -> Self {
        self.nodes.extend(later.nodes);
        self.sources.extend(later.sources);
        for (id, mut dirty) in later.jobs {
            if matches!(dirty, Dirty::Finished { .. }) {
                self.sources.remove(&id);
            }
            if let Dirty::Finished { in_active, .. } = &mut dirty
                && self.jobs.contains_key(&id)
            {
                *in_active = true;
            }
            self.jobs.insert(id, dirty);
        }
        self
    }
}

/// Work for the checkpoint thread.
pub(super) enum Task {
    Checkpoint {
        /// The closed (and synced) log generation, retired once this is in sled; none when the
        /// log could not be closed (it is then replayed at the next start).
        generation: Option<u64>,
        /// Bytes the generation took (the size of the spare file to prepare).
        log_bytes: u64,
        changes: Changes,
        segments: BTreeMap<u32, File>,
        waiters: Vec<Waiter>,
    },
    Prune {
        before_ms: u64,
        limit: usize,
        open_segment: u32,
        done: Option<std::sync::mpsc::Sender<Result<usize>>>,
    },
}

/// A checkpoint's work: changes, the image segments they point into, the generation that holds
/// them (with every earlier one).
pub(super) struct Work {
    pub generation: Option<u64>,
    pub changes: Changes,
    pub segments: BTreeMap<u32, File>,
}

impl Work {
    /// This (failed) work followed by `later` work.
    fn then(mut self, later: Self) -> Self {
        self.segments.extend(later.segments);
        Self {
            generation: later.generation,
            changes: self.changes.then(later.changes),
            segments: self.segments,
        }
    }
}

/// The thread's state.
struct Checkpointer<'a> {
    s: &'a Shared,
    /// A checkpoint that failed, to try again.
    carried: Option<Work>,
    last_recovery: Instant,
}

/// Runs the `drover-checkpoint` thread until the writer closes `tasks`; answers `done` after
/// each checkpoint. `carried`: a replayed log sled could not take at the start.
pub(super) fn run(s: &Shared, tasks: &Receiver<Task>, done: &Sender<()>, carried: Option<Work>) {
    let mut c = Checkpointer {
        s,
        carried,
        last_recovery: Instant::now(),
    };
    loop {
        match tasks.recv_timeout(CHECKPOINT_EVERY) {
            Ok(Task::Checkpoint {
                generation,
                log_bytes,
                changes,
                segments,
                waiters,
            }) => {
                let work = Work {
                    generation,
                    changes,
                    segments,
                };
                let answer = c.checkpoint(work, log_bytes).map_err(|e| e.to_string());
                for waiter in waiters {
                    waiter.answer(answer.clone());
                }
                let _ = done.send(());
            }
            Ok(Task::Prune {
                before_ms,
                limit,
                open_segment,
                done,
            }) => {
                let result =
                    s.with_trees(|t| prune(t, &s.image_dir, before_ms, limit, open_segment));
                match &result {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "finished jobs past retention deleted"),
                    Err(e) if e.is_unavailable() => {
                        s.fail("retention sweep", e);
                    }
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let degraded = c.carried.is_some()
            || s.health.refusal().is_err()
            || s.db_failed.load(Ordering::Relaxed);
        if degraded && c.last_recovery.elapsed() >= CHECKPOINT_EVERY {
            c.recover();
        }
    }
    if c.carried.is_some() {
        tracing::error!(
            "the last checkpoints failed; the write-ahead log is kept and replayed at the next start"
        );
    }
}

impl Checkpointer<'_> {
    /// Checkpoints `work`; when a failed checkpoint waits for room, `work` joins it instead.
    fn checkpoint(&mut self, work: Work, log_bytes: u64) -> Result<()> {
        if let Some(carried) = self.carried.take() {
            self.carried = Some(carried.then(work));
            return Err(StoreError::Unwritable(
                "a failed checkpoint waits for room to be tried again".into(),
            ));
        }
        let result = self.apply(work, false);
        if result.is_ok()
            && log_bytes > 0
            && self.s.health.refusal().is_ok()
            && let Err(e) = wal::prepare_spare(&self.s.wal_dir, log_bytes)
        {
            tracing::warn!(error = %e, "cannot prepare a spare write-ahead log file; generations grow their files instead");
        }
        result
    }

    /// Applies `work` (`retried`: it failed before); carries it when that fails. When the
    /// failure gave the reserve back, sled is reopened in that space and the work tried again
    /// if it fits.
    fn apply(&mut self, work: Work, retried: bool) -> Result<()> {
        let Err(e) = apply(self.s, &work) else {
            self.done(&work);
            return Ok(());
        };
        if self.s.fail("checkpoint", &e) && self.reopen_if_failed() && self.fits(&work) {
            match apply(self.s, &work) {
                Ok(()) => {
                    self.done(&work);
                    return Ok(());
                }
                Err(again) => {
                    self.s.fail("checkpoint", &again);
                }
            }
        }
        if retried {
            tracing::debug!(error = %e, generation = work.generation, "checkpoint failed again");
        } else {
            tracing::error!(error = %e, generation = work.generation, "checkpoint failed; the write-ahead log is kept and the checkpoint tried again once there is room");
        }
        self.carried = Some(work);
        Err(e)
    }

    /// After a successful checkpoint: its generations go, and what a start replayed is in sled.
    fn done(&self, work: &Work) {
        if let Some(g) = work.generation
            && let Err(e) = wal::retire_through(&self.s.wal_dir, g)
        {
            tracing::error!(error = %e, generation = g, "cannot retire a checkpointed write-ahead log generation");
        }
        let mut replayed = self.s.replayed.write().unwrap_or_else(|e| e.into_inner());
        if replayed.take().is_some() {
            tracing::info!("the log replayed at the start is in the database");
        }
    }

    /// Whether there is room to try `work` again.
    fn fits(&self, work: &Work) -> bool {
        #[cfg(test)]
        if self.s.faults.disk_full.load(Ordering::Relaxed) {
            return false;
        }
        self.s.reserve.room(room_for(&work.changes)).is_ok()
    }

    /// Reopens sled when it failed a write; answers whether it can be used.
    fn reopen_if_failed(&self) -> bool {
        if !self.s.db_failed.load(Ordering::Relaxed) {
            return true;
        }
        match self.s.reopen_db() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the database");
                false
            }
        }
    }

    /// While degraded: sled reopened when it failed a write (once there is a little room: a
    /// failed reopen leaves no database to read), the carried checkpoint again (once it fits),
    /// then whether there is room to write again (see `Reserve::probe`).
    fn recover(&mut self) {
        self.last_recovery = Instant::now();
        let epoch = self.s.health.epoch();
        if self.s.db_failed.load(Ordering::Relaxed) {
            if let Err(e) = self.s.reserve.room(DB_ROOM) {
                tracing::debug!(error = %e, "no room to reopen the database yet");
                return;
            }
            if !self.reopen_if_failed() {
                return;
            }
        }
        if let Some(work) = self.carried.take() {
            if !self.fits(&work) {
                self.carried = Some(work);
                return;
            }
            if self.apply(work, true).is_err() {
                return;
            }
            tracing::info!("carried checkpoint done");
        }
        if self.s.health.refusal().is_err() {
            #[cfg(test)]
            if self.s.faults.disk_full.load(Ordering::Relaxed) {
                return;
            }
            match self.s.reserve.probe() {
                Ok(()) => {
                    self.s.health.recover(epoch);
                }
                Err(e) => tracing::debug!(error = %e, "the store cannot write yet"),
            }
        }
    }
}

/// Syncs the image segments, puts the changes in sled and flushes it; then the pending copies
/// of the finished jobs can go.
fn apply(s: &Shared, work: &Work) -> Result<()> {
    // The images on disk before anything in sled points at them.
    for file in work.segments.values() {
        file.sync_data()?;
    }
    s.with_trees(|t| {
        #[cfg(test)]
        s.faults.checkpoint()?;
        apply_changes(t, &work.changes)
    })?;
    let mut pending = lock(&s.pending);
    for (id, dirty) in &work.changes.jobs {
        if matches!(dirty, Dirty::Finished { .. }) {
            pending.remove(id);
        }
    }
    Ok(())
}

/// The free space wanted before `changes` are tried in sled again.
pub(super) fn room_for(changes: &Changes) -> u64 {
    DB_ROOM.saturating_add(changes.bytes().saturating_mul(2))
}

/// Puts `changes` in sled and flushes it.
pub(super) fn apply_changes(t: &Trees, changes: &Changes) -> Result<()> {
    for (id, value) in &changes.nodes {
        t.nodes.insert(id.as_bytes(), value.as_slice())?;
    }
    // A job's source before its record, so no record in sled misses its source.
    for (id, value) in &changes.sources {
        t.sources.insert(id.as_bytes(), value.as_slice())?;
    }
    for (id, dirty) in &changes.jobs {
        match dirty {
            Dirty::Unfinished(value) => {
                t.active.insert(id.as_bytes(), value.as_slice())?;
            }
            Dirty::Finished {
                value,
                ended_ms,
                in_active,
            } => {
                t.put_finished(*id, *ended_ms, value, *in_active)?;
                t.sources.remove(id.as_bytes())?;
            }
        }
    }
    t.db.flush()?;
    Ok(())
}

/// The retention sweep (see `Store::prune_finished`). Image segments past the cutoff go first
/// (they free the most space, even when sled cannot write). Time-ordered jobs are found in
/// `jobs` itself, oldest first, stopping at the first one accepted after the cutoff (one that
/// ended after it is kept until it is past it too); other jobs through the `finished` index.
fn prune(
    t: &Trees,
    image_dir: &std::path::Path,
    before_ms: u64,
    limit: usize,
    open_segment: u32,
) -> Result<usize> {
    let cutoff = SystemTime::UNIX_EPOCH + Duration::from_millis(before_ms);
    let segments = image_log::delete_older(image_dir, open_segment, cutoff)?;
    if segments > 0 {
        tracing::info!(segments, "image log segments past retention deleted");
    }
    let mut pruned = 0;
    for entry in t.jobs.iter() {
        if pruned >= limit {
            break;
        }
        let (key, value) = entry?;
        let Some(created) = <[u8; 16]>::try_from(key.as_ref())
            .ok()
            .and_then(|k| JobId::from_bytes(k).created_ms())
        else {
            continue;
        };
        if created >= before_ms {
            break;
        }
        if codec::decode_finished(&value)?.0.updated_ms < before_ms {
            t.jobs.remove(&key)?;
            pruned += 1;
        }
    }
    for entry in t
        .finished
        .range(..before_ms.to_be_bytes().to_vec())
        .take(limit.saturating_sub(pruned))
    {
        let (key, _) = entry?;
        if let Some(id) = key.get(8..) {
            t.jobs.remove(id)?;
            t.images.remove(id)?;
            pruned += 1;
        }
        t.finished.remove(key)?;
    }
    Ok(pruned)
}
