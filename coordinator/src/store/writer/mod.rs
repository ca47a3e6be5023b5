//! The `drover-store` thread: logs queued changes in order, appends images, syncs the log for
//! the flush waiters of each round (group commit), and hands checkpoints to the
//! `drover-checkpoint` thread. Stops when every handle is gone, after logging and checkpointing
//! what was queued.
//!
//! How failures keep submissions whole (groups, rewinds, lost jobs) is in the store's module
//! docs. The log generation is closed right after a flush (or when no group is open), so a
//! group is never split by it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use drover_shared::ids::JobId;

use super::checkpoint::{self, Changes, Dirty, Task};
use super::error::{Result, StoreError};
use super::waiter::Waiter;
use super::{CHECKPOINT_EVERY, Shared, codec, image_log, lock, wal};
use crate::records::{JobRecord, NodeRecord};

mod schedule;

use schedule::Schedule;

/// Most queued changes the writer takes before it looks at its waiters again.
const MAX_BATCH: usize = 4096;

/// How long a due checkpoint waits for the flush of an open group.
const GROUP_WAIT: Duration = Duration::from_secs(1);

/// How long a lost job holds flushes back when its end does not come (the revoke that answers
/// its failed flush ends it within milliseconds; a submission that never flushed would hold
/// every later one back forever).
pub const LOST_HOLD: Duration = Duration::from_secs(10);

/// One queued change (or request) for the writer thread.
pub(super) enum Write {
    Node(Box<NodeRecord>),
    /// An unfinished job's new state.
    Job(Box<JobRecord>),
    /// A job ended; its record and image wait in `Shared::pending`.
    Finish(JobId),
    /// Retention: finished jobs that ended before `before_ms` (at most `limit`), and image
    /// segments last written before then.
    Prune {
        before_ms: u64,
        limit: usize,
        done: Option<std::sync::mpsc::Sender<Result<usize>>>,
    },
    /// Answer once every job accepted before is durable.
    Sync(Waiter),
    /// Checkpoint now; answer once everything queued before is in sled.
    Checkpoint(Waiter),
    /// Test hook: answered once the round it is in has been written.
    #[cfg(test)]
    Barrier(std::sync::mpsc::Sender<()>),
}

/// What a flush waiter is answered, decided where it stands in the queue.
enum Verdict {
    /// A job accepted before it was refused or lost: this error.
    Refused(String),
    /// Success once the round is durable up to the waiter (log offset `at`). When the round
    /// fails, an error if jobs not yet durable came before it (they are lost with the round),
    /// else success.
    IfDurable { after_new: bool, at: u64 },
}

/// The open group: new jobs queued since the last flush waiter.
struct Group {
    /// Whether its jobs are refused (decided at its first job), and why.
    refusal: std::result::Result<(), String>,
    /// When its first job came.
    since: Instant,
}

/// A finished job logged this round, and what to put back if its image is not written.
struct Undo {
    id: JobId,
    previous: Option<Dirty>,
    was_active: bool,
}

/// One round of the writer.
#[derive(Default)]
struct Round {
    waiters: Vec<(Waiter, Verdict)>,
    finishes: Vec<Undo>,
    /// Where the image log stood before the round.
    images_at: image_log::Mark,
    /// The first failure, and what failed.
    error: Option<(&'static str, StoreError)>,
    /// Whether the images of the round's finished jobs may not be written.
    images_failed: bool,
    #[cfg(test)]
    barriers: Vec<std::sync::mpsc::Sender<()>>,
}

impl Round {
    /// A round starting where the writer's image log stands.
    fn new(w: &Writer<'_>) -> Self {
        Self {
            images_at: w.images.mark(),
            ..Self::default()
        }
    }

    fn fail(&mut self, what: &'static str, e: StoreError) {
        if self.error.is_none() {
            self.error = Some((what, e));
        }
    }
}

/// What the store holds at the writer's start.
pub(super) struct Known {
    /// Jobs with an `active` entry in sled (or in the replayed log).
    pub in_active: HashSet<JobId>,
    /// Jobs whose source is in `sources` (or in the replayed log).
    pub sourced: HashSet<JobId>,
}

/// The writer's state.
struct Writer<'a> {
    s: &'a Shared,
    log: wal::Wal,
    images: image_log::Appender,
    /// Jobs with an `active` entry in sled, or on their way there in a checkpoint.
    in_active: HashSet<JobId>,
    /// Unfinished jobs whose source is logged (or in sled): their records go without it.
    sourced: HashSet<JobId>,
    /// What changed since the last checkpoint.
    changes: Changes,
    /// Jobs first logged after what the log counts durable, with their record's offset (lost
    /// if the log is rewound).
    unsynced_new: Vec<(JobId, u64)>,
    /// The open group, and where it starts in the log.
    group: Option<Group>,
    group_start: u64,
    /// Jobs whose acceptance was refused or lost, with when: nothing of them is stored.
    lost: HashMap<JobId, Instant>,
    /// Why the last of them was (what the flushes they hold back answer).
    lost_reason: String,
    /// Finished jobs to log again: their image was not written.
    retry: Vec<JobId>,
    /// Jobs lost in this round (for its log line).
    lost_in_round: usize,
}

/// Runs the `drover-store` thread until every handle is gone; `carried` goes to the checkpoint
/// thread (a replayed log sled could not take at the start).
pub(super) fn run(
    s: &Arc<Shared>,
    queue: &Receiver<Write>,
    log: wal::Wal,
    images: image_log::Appender,
    known: Known,
    carried: Option<checkpoint::Work>,
) {
    let (tasks, task_rx) = crossbeam_channel::unbounded::<Task>();
    let (done_tx, done) = crossbeam_channel::unbounded::<()>();
    let checkpointer = {
        let s = s.clone();
        std::thread::Builder::new()
            .name("drover-checkpoint".into())
            .spawn(move || checkpoint::run(&s, &task_rx, &done_tx, carried))
    };
    let checkpointer = match checkpointer {
        Ok(handle) => handle,
        Err(e) => {
            // Without it nothing moves into sled; refuse every flush rather than grow the log
            // forever.
            tracing::error!(error = %e, "the store's checkpoint thread could not start");
            s.health.fail(format!(
                "the store's checkpoint thread could not start: {e}"
            ));
            for write in queue {
                if let Write::Sync(w) | Write::Checkpoint(w) = write {
                    w.answer(Err(format!(
                        "the store's checkpoint thread could not start: {e}"
                    )));
                }
            }
            return;
        }
    };
    let mut w = Writer {
        s,
        log,
        images,
        in_active: known.in_active,
        sourced: known.sourced,
        changes: Changes::default(),
        unsynced_new: Vec::new(),
        group: None,
        group_start: 0,
        lost: HashMap::new(),
        lost_reason: String::new(),
        retry: Vec::new(),
        lost_in_round: 0,
    };
    let mut ck = Schedule {
        busy: false,
        last: Instant::now(),
        forced: Vec::new(),
    };
    let mut open = true;
    let mut batch = Vec::new();
    while open {
        // While a checkpoint runs, only a write or its end wakes the writer; a checkpoint that
        // is due waits for the open group's flush (see `Schedule::due`).
        let wait = if ck.busy {
            Duration::from_secs(3600)
        } else {
            match (ck.last + CHECKPOINT_EVERY).saturating_duration_since(Instant::now()) {
                Duration::ZERO if w.group_open() => CHECKPOINT_EVERY / 20,
                wait => wait,
            }
        };
        crossbeam_channel::select! {
            recv(queue) -> write => match write {
                Ok(write) => batch.push(write),
                Err(_) => open = false,
            },
            recv(done) -> _ => ck.busy = false,
            default(wait) => {}
        }
        batch.extend(queue.try_iter().take(MAX_BATCH));
        if done.try_recv().is_ok() {
            ck.busy = false;
        }
        let mut round = Round::new(&w);
        let retry: Vec<_> = w.retry.drain(..).map(Write::Finish).collect();
        for write in retry.into_iter().chain(batch.drain(..)) {
            match write {
                Write::Prune {
                    before_ms,
                    limit,
                    done,
                } => {
                    let _ = tasks.send(Task::Prune {
                        before_ms,
                        limit,
                        open_segment: w.images.segment(),
                        done,
                    });
                }
                Write::Checkpoint(waiter) => ck.forced.push(waiter),
                write => {
                    let flush = matches!(write, Write::Sync(_));
                    w.take(write, &mut round);
                    // Right after a flush no group is open: a due checkpoint closes the round
                    // and the log generation here.
                    if flush && ck.due(&w) {
                        w.end_round(std::mem::take(&mut round));
                        round = Round::new(&w);
                        ck.checkpoint(&mut w, &tasks);
                    }
                }
            }
        }
        w.end_round(round);
        if ck.due(&w) && !w.group_open() {
            ck.checkpoint(&mut w, &tasks);
        }
    }
    // Every handle is gone: one more try for images that were not written, then wait for the
    // checkpoint in flight and checkpoint the rest.
    if !w.retry.is_empty() {
        let mut round = Round::new(&w);
        for id in std::mem::take(&mut w.retry) {
            w.take_finish(id, &mut round);
        }
        w.end_round(round);
    }
    if ck.busy {
        let _ = done.recv();
    }
    let generation = match w.log.sync() {
        Ok(()) => Some(w.log.generation()),
        Err(e) => {
            tracing::error!(error = %e, "final write-ahead log sync failed; the log is replayed at the next start");
            None
        }
    };
    let closing = Task::Checkpoint {
        generation,
        log_bytes: 0,
        changes: std::mem::take(&mut w.changes),
        segments: w.images.take_touched(),
        waiters: std::mem::take(&mut ck.forced),
    };
    let _ = tasks.send(closing);
    drop(tasks);
    if checkpointer.join().is_err() {
        tracing::error!("the store's checkpoint thread panicked");
    }
}

impl Writer<'_> {
    /// Whether a group's flush is awaited (for at most [`GROUP_WAIT`]).
    fn group_open(&self) -> bool {
        self.group
            .as_ref()
            .is_some_and(|g| g.since.elapsed() < GROUP_WAIT)
    }

    /// A refused flush: the jobs of its group that were logged are taken back (the log is
    /// rewound to the group's start), so a refused submission leaves nothing.
    fn drop_group(&mut self) {
        let start = self.group_start;
        if !self.unsynced_new.iter().any(|&(_, at)| at >= start) {
            return;
        }
        self.log.rewind_to(start);
        let reason = self.lost_reason.clone();
        let (dropped, kept) = std::mem::take(&mut self.unsynced_new)
            .into_iter()
            .partition::<Vec<_>, _>(|&(_, at)| at >= start);
        self.unsynced_new = kept;
        for (id, _) in dropped {
            self.lose(id, &reason);
        }
    }

    /// Whether a lost job still holds flushes back.
    fn holding(&self) -> bool {
        self.lost.values().any(|at| at.elapsed() < LOST_HOLD)
    }

    /// Nothing of job `id` is stored (its acceptance was refused or lost): what it changed
    /// goes, and its later records are dropped until it ends.
    fn lose(&mut self, id: JobId, reason: &str) {
        self.lost.insert(id, Instant::now());
        self.lost_in_round += 1;
        reason.clone_into(&mut self.lost_reason);
        if let Some(Dirty::Finished { .. }) = self.changes.jobs.remove(&id) {
            lock(&self.s.pending).remove(&id);
        }
        self.changes.sources.remove(&id);
        self.sourced.remove(&id);
        tracing::debug!(job_id = %id, reason, "job not stored");
    }

    /// Logs one change of a round (images only buffered, the log only appended to).
    fn take(&mut self, write: Write, round: &mut Round) {
        match write {
            Write::Node(node) => match log_json(&mut self.log, wal::Kind::Node, &node) {
                Ok(value) => {
                    self.changes.nodes.insert(node.id, value);
                }
                Err(e) => round.fail("logging a node", e),
            },
            Write::Job(job) => self.take_job(&job, round),
            Write::Finish(id) => self.take_finish(id, round),
            Write::Sync(waiter) => {
                let verdict = if self.holding() {
                    self.drop_group();
                    Verdict::Refused(format!("new jobs are refused: {}", self.lost_reason))
                } else {
                    Verdict::IfDurable {
                        after_new: !self.unsynced_new.is_empty(),
                        at: self.log.len(),
                    }
                };
                self.group = None;
                self.group_start = self.log.len();
                round.waiters.push((waiter, verdict));
            }
            #[cfg(test)]
            Write::Barrier(tx) => round.barriers.push(tx),
            Write::Prune { .. } | Write::Checkpoint(_) => {
                unreachable!("handled by the writer's loop")
            }
        }
    }

    fn take_job(&mut self, job: &JobRecord, round: &mut Round) {
        if self.lost.contains_key(&job.id) {
            return;
        }
        let new = !self.in_active.contains(&job.id) && !self.changes.jobs.contains_key(&job.id);
        if new {
            let health = &self.s.health;
            let group = self.group.get_or_insert_with(|| Group {
                refusal: health.refusal(),
                since: Instant::now(),
            });
            if let Err(reason) = &group.refusal {
                let reason = reason.clone();
                self.lose(job.id, &reason);
                return;
            }
        }
        let at = self.log.len();
        // The source goes into the log once, on its own; the record, logged again at every
        // change, without it.
        let stripped;
        let job = match job.spec.source.as_deref() {
            Some(source) if !source.image.is_empty() => {
                if !self.sourced.contains(&job.id) {
                    let value = codec::encode_source(&source.image, source.mask.as_deref());
                    let body = codec::source_record(job.id, &value);
                    if let Err(e) = self.log.append(wal::Kind::Source, &body) {
                        if new {
                            self.lose(job.id, &format!("logging the job's source failed: {e}"));
                        }
                        round.fail("logging a job's source", e);
                        return;
                    }
                    self.changes.sources.insert(job.id, value);
                    self.sourced.insert(job.id);
                }
                let mut record = job.clone();
                record.spec.source = Some(Box::new(source.stripped()));
                stripped = record;
                &stripped
            }
            _ => job,
        };
        match log_json(&mut self.log, wal::Kind::Job, job) {
            Ok(value) => {
                self.changes.jobs.insert(job.id, Dirty::Unfinished(value));
                if new {
                    self.unsynced_new.push((job.id, at));
                }
            }
            Err(e) => {
                if new {
                    self.lose(job.id, &format!("logging the job failed: {e}"));
                }
                round.fail("logging a job", e);
            }
        }
    }

    /// Logs a finished job: its image to the image log, its record (pointing at the image) to
    /// the write-ahead log. The record stays in the pending set for reads until its checkpoint.
    fn take_finish(&mut self, id: JobId, round: &mut Round) {
        if self.lost.remove(&id).is_some() {
            // The end of a job that was never stored (the revoke of a refused submission).
            lock(&self.s.pending).remove(&id);
            return;
        }
        let was_active = self.in_active.remove(&id);
        match self.encode_finish(id) {
            Ok(None) => {}
            Ok(Some((value, ended_ms))) => match self.log.append(wal::Kind::Finish, &value) {
                Ok(()) => {
                    // Its source goes from `sources` when this end is applied.
                    self.changes.sources.remove(&id);
                    self.sourced.remove(&id);
                    let previous = self.changes.jobs.insert(
                        id,
                        Dirty::Finished {
                            value,
                            ended_ms,
                            in_active: was_active,
                        },
                    );
                    round.finishes.push(Undo {
                        id,
                        previous,
                        was_active,
                    });
                }
                Err(e) => {
                    // Too large for the log: the job stays as it was stored (it runs again
                    // after a restart).
                    tracing::error!(job_id = %id, error = %e, "a finished job cannot be logged");
                    if was_active {
                        self.in_active.insert(id);
                    }
                }
            },
            Err(e) => {
                if was_active {
                    self.in_active.insert(id);
                }
                if e.is_unavailable() {
                    self.retry.push(id);
                    round.images_failed = true;
                    round.fail("writing an image", e);
                } else {
                    tracing::error!(job_id = %id, error = %e, "a finished job cannot be logged");
                }
            }
        }
    }

    /// Appends a finished job's image (buffered) and encodes its record pointing at it;
    /// `None` when it is not pending.
    fn encode_finish(&mut self, id: JobId) -> Result<Option<(Vec<u8>, u64)>> {
        // A segment change does file I/O: not under the lock readers and the actor take.
        self.images.make_room()?;
        let pending = lock(&self.s.pending);
        let Some(p) = pending.get(&id) else {
            return Ok(None);
        };
        let at = p
            .png
            .as_deref()
            .map(|png| self.images.append(id, png))
            .transpose()?;
        let mut value = Vec::with_capacity(1024);
        codec::encode_finished(&mut value, &p.record, at)?;
        Ok(Some((value, p.record.updated_ms)))
    }

    /// Writes the round (images before the records that point at them), syncs the log when a
    /// flush waits, and answers the waiters.
    fn end_round(&mut self, mut round: Round) {
        if round.error.is_none()
            && let Err(e) = self.write_images()
        {
            round.images_failed = true;
            round.fail("writing the image log", e);
        }
        if round.error.is_none() {
            let through = round
                .waiters
                .iter()
                .filter_map(|(_, verdict)| match verdict {
                    Verdict::IfDurable { at, .. } => Some(*at),
                    Verdict::Refused(_) => None,
                })
                .max();
            match self.write_log(through) {
                Ok(()) => {
                    if let Some(through) = through {
                        self.unsynced_new.retain(|&(_, at)| at >= through);
                    }
                }
                Err(e) => round.fail("writing the write-ahead log", e),
            }
        }
        let failed = round
            .error
            .take()
            .map(|(what, e)| self.undo(what, &e, &mut round));
        if self.lost_in_round > 0 {
            tracing::warn!(
                jobs = std::mem::take(&mut self.lost_in_round),
                reason = %self.lost_reason,
                "jobs not stored: their acceptance was refused or lost"
            );
        }
        for (waiter, verdict) in round.waiters {
            waiter.answer(match (verdict, &failed) {
                (Verdict::Refused(reason), _) => Err(reason),
                (
                    Verdict::IfDurable {
                        after_new: true, ..
                    },
                    Some(reason),
                ) => Err(reason.clone()),
                (Verdict::IfDurable { .. }, _) => Ok(()),
            });
        }
        #[cfg(test)]
        for barrier in round.barriers {
            let _ = barrier.send(());
        }
    }

    fn write_images(&mut self) -> Result<()> {
        #[cfg(test)]
        if self.s.faults.take(&self.s.faults.image) {
            self.images.fail_next = true;
        }
        self.images.write()
    }

    /// Writes the log; syncs it when a flush waits, counting it durable `through` the last
    /// flush that succeeds.
    fn write_log(&mut self, through: Option<u64>) -> Result<()> {
        #[cfg(test)]
        if let Some(after) = self.s.faults.take_log() {
            self.log.fail_after = Some(after);
        }
        match through {
            Some(through) => self.log.sync_through(through),
            None => self.log.write(),
        }
    }

    /// After a failed round: rewinds the log (and the image log when its write failed), loses
    /// the jobs first logged since the last sync, degrades the store; answers the reason.
    fn undo(&mut self, what: &str, e: &StoreError, round: &mut Round) -> String {
        if round.images_failed {
            self.images.rewind(round.images_at);
            for undo in round.finishes.drain(..).rev() {
                match undo.previous {
                    Some(previous) => self.changes.jobs.insert(undo.id, previous),
                    None => self.changes.jobs.remove(&undo.id),
                };
                if undo.was_active {
                    self.in_active.insert(undo.id);
                }
                self.retry.push(undo.id);
            }
        }
        self.log.rewind();
        if e.is_unavailable() {
            self.s.fail(what, e);
        } else {
            tracing::error!(error = %e, what, "store write failed");
        }
        let reason = match self.s.health.refusal() {
            Err(reason) => reason,
            Ok(()) => format!("{what}: {e}"),
        };
        for (id, _) in std::mem::take(&mut self.unsynced_new) {
            self.lose(id, &reason);
        }
        self.group_start = self.log.len();
        reason
    }

    /// Syncs the open generation and starts the next one; answers the one closed. When the
    /// sync fails, the round's failure path runs; when the next one cannot start, this one
    /// stays open (tried again in a second).
    fn close_generation(&mut self) -> Option<u64> {
        let synced = {
            #[cfg(test)]
            if let Some(after) = self.s.faults.take_log() {
                self.log.fail_after = Some(after);
            }
            self.log.sync()
        };
        if let Err(e) = synced {
            let mut round = Round {
                images_at: self.images.mark(),
                ..Round::default()
            };
            self.undo("syncing the write-ahead log", &e, &mut round);
            return None;
        }
        self.unsynced_new.clear();
        self.group_start = self.log.len();
        match self.log.start_next() {
            Ok(closed) => {
                self.group_start = 0;
                Some(closed)
            }
            Err(e) => {
                self.s.fail("starting a write-ahead log generation", &e);
                None
            }
        }
    }
}

/// Logs a record as JSON; answers the JSON, which is also what goes into sled.
fn log_json(
    log: &mut wal::Wal,
    kind: wal::Kind,
    record: &impl serde::Serialize,
) -> Result<Vec<u8>> {
    let value = serde_json::to_vec(record)?;
    log.append(kind, &value)?;
    Ok(value)
}
