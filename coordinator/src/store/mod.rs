//! The coordinator's persistent store. Only this module touches sled.
//!
//! **sled holds the state.** Trees: `nodes` (node id → [`NodeRecord`] JSON); `active` (job id →
//! [`JobRecord`] JSON of every unfinished job, all a restart reads); `jobs` (finished jobs, kept
//! for the retention period, the place of the job's image in front: see [`encode_finished`];
//! job ids are time-ordered, so the retention sweep walks `jobs` from its start and stops at
//! the first job accepted after the cutoff); `finished` (end time, big-endian, ++ job id →
//! nothing: the same sweep's index for jobs whose ids are not time-ordered, those of stores
//! before layout 3); `images` (job id → PNG, written by stores before layout 3 and still read);
//! `meta` (the layout version). Result images go to the [`image_log`].
//!
//! **A write-ahead log makes changes durable.** The control plane hands every change to
//! [`Store`] without waiting. The `drover-store` thread appends each change to the [`wal`] in
//! the order it was made; whoever must not answer before a change is on disk (an accepted job's
//! 2xx) calls [`Store::flush`] after making it, and one `fdatasync` of the log answers every
//! flush waiting in that round (group commit). sled's own flush (which also runs its segment
//! cleaning) is never on that path.
//!
//! **Checkpoints move the log into sled.** Every [`CHECKPOINT_EVERY`] the writer closes the log
//! generation and hands what it changed — coalesced per job, so a job accepted and finished in
//! between costs one record in sled, not four writes — to the `drover-checkpoint` thread, which
//! syncs the image segments written to, applies the changes to sled, flushes sled, and recycles
//! the generation's file (log files are preallocated, so a log sync writes no metadata). A
//! restart replays the generations left into sled before anything reads it.
//!
//! **A durable record never points at an image that is not.** Images are synced before the
//! checkpoint that puts their records in sled; a log record written before its image reached the
//! disk is checked on replay, and a finish whose image did not survive (an OS crash) is dropped,
//! so the job is still unfinished and runs again. Until its checkpoint, a finished job and its
//! image are answered from memory ([`Store::job`], [`Store::image`]).

mod image_log;
mod wal;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use drover_shared::ids::{JobId, NodeId};

pub use image_log::ImageRef;

use crate::error::{CoordinatorError, Result};
use crate::records::{JobRecord, NodeRecord};

/// The store layout this build writes: 2 = unfinished jobs in `active`, `finished` index; 3 =
/// images in the image log, their place in front of the finished record; the write-ahead log.
const LAYOUT: u8 = 3;

/// Most queued changes the writer takes before it looks at its waiters again.
const MAX_BATCH: usize = 4096;

/// How often the writer checkpoints its changes into sled.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A log generation this large is checkpointed without waiting for the interval.
const CHECKPOINT_BYTES: u64 = wal::FILE_BYTES;

/// First byte of a finished record that carries an [`ImageRef`] (a bare JSON record starts
/// with `{`).
const WITH_IMAGE: u8 = 0xd1;

/// Someone waiting for the writer: a flush or a checkpoint.
enum Waiter {
    Async(tokio::sync::oneshot::Sender<std::result::Result<(), String>>),
    Blocking(std::sync::mpsc::Sender<std::result::Result<(), String>>),
}

impl Waiter {
    fn answer(self, result: std::result::Result<(), String>) {
        match self {
            Self::Async(tx) => {
                let _ = tx.send(result);
            }
            Self::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// One queued change (or request) for the writer thread.
enum Write {
    Node(NodeRecord),
    /// An unfinished job's new state.
    Job(JobRecord),
    /// A job ended; its record and image wait in [`Shared::pending`].
    Finish(JobId),
    /// Retention: finished jobs that ended before `before_ms` (at most `limit`), and image
    /// segments last written before then.
    Prune {
        before_ms: u64,
        limit: usize,
        done: Option<std::sync::mpsc::Sender<Result<usize>>>,
    },
    /// Answer once everything queued before is durable.
    Sync(Waiter),
    /// Checkpoint now; answer once everything queued before is in sled.
    Checkpoint(Waiter),
}

/// A finished job on its way to sled.
struct Pending {
    record: JobRecord,
    png: Option<Arc<[u8]>>,
}

/// What the handles and the store's threads share.
struct Shared {
    db: sled::Db,
    nodes: sled::Tree,
    active: sled::Tree,
    jobs: sled::Tree,
    images: sled::Tree,
    finished: sled::Tree,
    image_dir: PathBuf,
    wal_dir: PathBuf,
    /// Finished jobs handed to the writer and not yet in sled, with their images.
    pending: Mutex<HashMap<JobId, Pending>>,
}

/// Joins the writer thread once the last [`Store`] handle is gone (its queue then closes and
/// the writer logs what is queued, checkpoints it and stops), so a dropped store is closed.
struct WriterThread(Mutex<Option<std::thread::JoinHandle<()>>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        let handle = lock(&self.0).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the store's writer thread panicked");
        }
    }
}

/// Handle to the store; cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct Store {
    // Declared before `_writer`: the last handle drops its sender first, which lets the writer
    // stop before `_writer` joins it.
    writes: Sender<Write>,
    shared: Arc<Shared>,
    _writer: Arc<WriterThread>,
    /// Keeps a temporary store's folder until the writer has stopped.
    #[cfg(test)]
    _temporary: Option<Arc<tempfile::TempDir>>,
}

/// The files in `dir` whose names `parse` reads, with what it read, sorted by it; none when the
/// folder does not exist.
fn files_named<T: Ord>(dir: &Path, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<(T, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(key) = path.file_name().and_then(|n| n.to_str()).and_then(&parse) {
            out.push((key, path));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `finished` key of a job that ended at `ended_ms`.
fn finished_key(ended_ms: u64, id: JobId) -> Vec<u8> {
    let mut key = ended_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// A finished record as stored in `jobs` (and in the log): the JSON record, preceded by
/// `WITH_IMAGE` and the image's place when it has one.
fn encode_finished(out: &mut Vec<u8>, record: &JobRecord, image: Option<ImageRef>) -> Result<()> {
    if let Some(at) = image {
        out.push(WITH_IMAGE);
        out.extend_from_slice(&at.encode());
    }
    serde_json::to_writer(out, record)?;
    Ok(())
}

/// Reads what [`encode_finished`] wrote (or a bare JSON record of an older layout).
fn decode_finished(value: &[u8]) -> Result<(JobRecord, Option<ImageRef>)> {
    match value.split_first() {
        Some((&WITH_IMAGE, rest)) => {
            let at = ImageRef::decode(rest).ok_or_else(|| {
                CoordinatorError::Damaged("a finished record with a short image place".into())
            })?;
            let record = serde_json::from_slice(&rest[ImageRef::ENCODED_LEN..])?;
            Ok((record, Some(at)))
        }
        _ => Ok((serde_json::from_slice(value)?, None)),
    }
}

/// Puts a finished job in sled: its record (as encoded) in `jobs` (and a `finished` entry when
/// its id is not time-ordered), and, when it has one (`in_active`), its `active` entry gone —
/// the end first, so a crash in between leaves both and a restart keeps the end.
fn put_finished(s: &Shared, id: JobId, ended_ms: u64, value: &[u8], in_active: bool) -> Result<()> {
    s.jobs.insert(id.as_bytes(), value)?;
    if id.created_ms().is_none() {
        s.finished.insert(finished_key(ended_ms, id), &[])?;
    }
    if in_active {
        s.active.remove(id.as_bytes())?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `dir`: sled in `dir`, the log in `dir/wal`, images in
    /// `dir/images`. Replays what the log holds from before a stop or crash.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(1000))
            .open()?;
        Self::from_db(db, dir)
    }

    /// A store that lives in a temporary folder and disappears on drop (for tests).
    #[cfg(test)]
    pub fn temporary() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = sled::Config::new().temporary(true).open()?;
        let mut store = Self::from_db(db, dir.path())?;
        store._temporary = Some(Arc::new(dir));
        Ok(store)
    }

    fn from_db(db: sled::Db, dir: &Path) -> Result<Self> {
        let meta = db.open_tree("meta")?;
        let shared = Arc::new(Shared {
            nodes: db.open_tree("nodes")?,
            active: db.open_tree("active")?,
            jobs: db.open_tree("jobs")?,
            images: db.open_tree("images")?,
            finished: db.open_tree("finished")?,
            db,
            image_dir: dir.join("images"),
            wal_dir: dir.join("wal"),
            pending: Mutex::new(HashMap::new()),
        });
        match meta.get("layout")?.as_deref() {
            Some(&[LAYOUT]) => {}
            Some(&[2]) => {
                meta.insert("layout", &[LAYOUT])?;
            }
            Some(&[newer]) if newer > LAYOUT => {
                return Err(CoordinatorError::Damaged(format!(
                    "the store was written by a newer drover-coordinator (layout {newer}, this one writes {LAYOUT})"
                )));
            }
            _ => {
                upgrade(&shared)?;
                meta.insert("layout", &[LAYOUT])?;
            }
        }
        let next_generation = replay(&shared)?;
        let images = image_log::Appender::open(&shared.image_dir)?;
        let log = wal::Wal::create(&shared.wal_dir, next_generation)?;
        // The `wal/` and `images/` folders' own names, durable before anything is written in them.
        File::open(dir)?.sync_all()?;
        let in_active = shared
            .active
            .iter()
            .keys()
            .map(|k| {
                Ok(JobId::from_bytes(
                    k?.as_ref().try_into().unwrap_or_default(),
                ))
            })
            .collect::<Result<HashSet<JobId>>>()?;
        let (writes, queue) = crossbeam_channel::unbounded();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("drover-store".into())
                .spawn(move || run_writer(&shared, &queue, log, images, in_active))?
        };
        Ok(Self {
            writes,
            shared,
            _writer: Arc::new(WriterThread(Mutex::new(Some(writer)))),
            #[cfg(test)]
            _temporary: None,
        })
    }

    fn queue(&self, write: Write) -> Result<()> {
        self.writes.send(write).map_err(|_| stopped())
    }

    /// Queues a node record (insert or replace).
    pub fn put_node(&self, node: &NodeRecord) -> Result<()> {
        self.queue(Write::Node(node.clone()))
    }

    /// Every registered node (read at start, after the log's replay).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.shared
            .nodes
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Queues an unfinished job's record (insert or replace).
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        debug_assert!(
            !job.state.is_terminal(),
            "finished jobs go through finish_job"
        );
        self.queue(Write::Job(job.clone()))
    }

    /// Queues a finished job with its image: the image goes to the image log and the record,
    /// pointing at it, replaces the unfinished one. Both are answered from memory until they
    /// are in sled.
    pub fn finish_job(&self, job: &JobRecord, png: Option<Arc<[u8]>>) -> Result<()> {
        debug_assert!(
            job.state.is_terminal(),
            "unfinished jobs go through put_job"
        );
        lock(&self.shared.pending).insert(
            job.id,
            Pending {
                record: job.clone(),
                png,
            },
        );
        self.queue(Write::Finish(job.id))
    }

    /// A finished job, if it exists (finished jobs still on their way to sled included). An
    /// unfinished job's current state lives in the control plane; here it is as of the last
    /// checkpoint.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        if let Some(p) = lock(&self.shared.pending).get(&id) {
            return Ok(Some(p.record.clone()));
        }
        if let Some(v) = self.shared.jobs.get(id.as_bytes())? {
            return Ok(Some(decode_finished(&v)?.0));
        }
        match self.shared.active.get(id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every job that has not reached a terminal state (only `active` is read; called at start,
    /// after the log's replay). A job whose end was written to `jobs` just before a crash took
    /// its `active` entry away is finished: the stale entry is dropped, so a finished job never
    /// runs again.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for entry in self.shared.active.iter() {
            let (key, value) = entry?;
            if self.shared.jobs.contains_key(&key)? {
                self.shared.active.remove(&key)?;
                continue;
            }
            out.push(serde_json::from_slice(&value)?);
        }
        Ok(out)
    }

    /// Queues the retention sweep: deletes up to `limit` finished jobs (and their images) that
    /// ended before `before_ms`, oldest first, reading only the `finished` index entries it
    /// deletes, and the image segments last written before then. The checkpoint thread runs it
    /// and logs what it did.
    pub fn prune_finished(&self, before_ms: u64, limit: usize) -> Result<()> {
        self.queue(Write::Prune {
            before_ms,
            limit,
            done: None,
        })
    }

    /// [`Store::prune_finished`], waiting for it; answers how many jobs were deleted.
    pub fn prune_finished_now(&self, before_ms: u64, limit: usize) -> Result<usize> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue(Write::Prune {
            before_ms,
            limit,
            done: Some(tx),
        })?;
        rx.recv().map_err(|_| stopped())?
    }

    /// A job's image, if stored.
    pub fn image(&self, id: JobId) -> Result<Option<Vec<u8>>> {
        if let Some(p) = lock(&self.shared.pending).get(&id) {
            return Ok(p.png.as_deref().map(<[u8]>::to_vec));
        }
        if let Some(v) = self.shared.jobs.get(id.as_bytes())?
            && let (_, Some(at)) = decode_finished(&v)?
        {
            return image_log::read(&self.shared.image_dir, id, at).map(Some);
        }
        Ok(self.shared.images.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Makes every change queued so far durable (one log sync shared with every concurrent
    /// caller).
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(Write::Sync(Waiter::Async(tx)))?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| CoordinatorError::Unavailable(format!("writing the store: {e}")))
    }

    /// [`Store::flush`] for callers outside an async runtime (blocks the thread).
    pub fn flush_blocking(&self) -> Result<()> {
        self.wait(Write::Sync)
    }

    /// Checkpoints now and waits: every change queued so far is in sled and flushed, and the log
    /// generations it was in are gone.
    pub fn checkpoint_blocking(&self) -> Result<()> {
        self.wait(Write::Checkpoint)
    }

    fn wait(&self, write: fn(Waiter) -> Write) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue(write(Waiter::Blocking(tx)))?;
        rx.recv()
            .map_err(|_| stopped())?
            .map_err(|e| CoordinatorError::Unavailable(format!("writing the store: {e}")))
    }
}

fn stopped() -> CoordinatorError {
    CoordinatorError::Unavailable("the store's writer thread stopped".into())
}

/// Brings a store written by the first layout (every job in `jobs`, no index) to this one,
/// once: unfinished jobs move to `active`, finished ones get their `finished` entry.
fn upgrade(s: &Shared) -> Result<()> {
    let (mut moved, mut indexed) = (0usize, 0usize);
    for entry in s.jobs.iter() {
        let (key, value) = entry?;
        let job: JobRecord = serde_json::from_slice(&value)?;
        if job.state.is_terminal() {
            s.finished
                .insert(finished_key(job.updated_ms, job.id), &[])?;
            indexed += 1;
        } else {
            s.active.insert(&key, value)?;
            s.jobs.remove(&key)?;
            moved += 1;
        }
    }
    if moved + indexed > 0 {
        tracing::info!(
            unfinished = moved,
            finished = indexed,
            "store upgraded to layout {LAYOUT}"
        );
    }
    Ok(())
}

/// Applies every log generation left by the last run to sled, in order, flushes sled and
/// deletes them; answers the generation to write next.
fn replay(s: &Shared) -> Result<u64> {
    let generations = wal::generations(&s.wal_dir)?;
    let Some(&last) = generations.last() else {
        return Ok(1);
    };
    let (mut records, mut lost) = (0usize, 0usize);
    for &generation in &generations {
        for (kind, body) in wal::read(&s.wal_dir, generation)? {
            records += 1;
            let damaged = |e: CoordinatorError| {
                CoordinatorError::Damaged(format!(
                    "write-ahead log generation {generation}: a record that passed its checksum does not decode ({e}); was it written by another version?"
                ))
            };
            match kind {
                wal::Kind::Node => {
                    let node: NodeRecord =
                        serde_json::from_slice(&body).map_err(|e| damaged(e.into()))?;
                    s.nodes.insert(node.id.as_bytes(), body)?;
                }
                wal::Kind::Job => {
                    let job: JobRecord =
                        serde_json::from_slice(&body).map_err(|e| damaged(e.into()))?;
                    if !s.jobs.contains_key(job.id.as_bytes())? {
                        s.active.insert(job.id.as_bytes(), body)?;
                    }
                }
                wal::Kind::Finish => {
                    let (job, at) = decode_finished(&body).map_err(damaged)?;
                    let image_ok =
                        at.is_none_or(|at| image_log::read(&s.image_dir, job.id, at).is_ok());
                    if image_ok {
                        put_finished(s, job.id, job.updated_ms, &body, true)?;
                    } else {
                        // The record reached the disk, its image did not (an OS crash before
                        // the image's checkpoint): the job stays unfinished and runs again.
                        lost += 1;
                        tracing::warn!(job_id = %job.id, "a finished job's image did not survive a crash; the job runs again");
                    }
                }
            }
        }
    }
    s.db.flush()?;
    wal::retire_through(&s.wal_dir, last)?;
    tracing::info!(
        generations = generations.len(),
        records,
        lost_images = lost,
        "write-ahead log replayed into the store"
    );
    Ok(last + 1)
}

/// An unfinished job's or finished job's value as it goes into sled at the next checkpoint.
enum Dirty {
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
#[derive(Default)]
struct Changes {
    nodes: HashMap<NodeId, Vec<u8>>,
    jobs: HashMap<JobId, Dirty>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.jobs.is_empty()
    }
}

/// Work for the checkpoint thread.
enum Task {
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

/// The `drover-store` thread: logs queued changes in order, appends images, syncs the log for
/// the flush waiters of each round, and hands checkpoints to the `drover-checkpoint` thread.
/// Stops when every handle is gone, after logging and checkpointing what was queued.
fn run_writer(
    s: &Arc<Shared>,
    queue: &Receiver<Write>,
    mut log: wal::Wal,
    mut images: image_log::Appender,
    mut in_active: HashSet<JobId>,
) {
    let (tasks, task_rx) = crossbeam_channel::unbounded::<Task>();
    let (done_tx, done) = crossbeam_channel::unbounded::<()>();
    let checkpointer = {
        let s = s.clone();
        std::thread::Builder::new()
            .name("drover-checkpoint".into())
            .spawn(move || run_checkpointer(&s, &task_rx, &done_tx))
    };
    let checkpointer = match checkpointer {
        Ok(handle) => handle,
        Err(e) => {
            // Without it nothing moves into sled; refuse every flush rather than grow the log
            // forever.
            tracing::error!(error = %e, "the store's checkpoint thread could not start");
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
    let mut changes = Changes::default();
    let mut busy = false;
    let mut last_checkpoint = Instant::now();
    let mut open = true;
    let mut batch = Vec::new();
    let mut forced: Vec<Waiter> = Vec::new();
    while open {
        // While a checkpoint runs, only a write or its end wakes the writer.
        let wait = if busy {
            Duration::from_secs(3600)
        } else {
            (last_checkpoint + CHECKPOINT_EVERY).saturating_duration_since(Instant::now())
        };
        crossbeam_channel::select! {
            recv(queue) -> w => match w {
                Ok(w) => batch.push(w),
                Err(_) => open = false,
            },
            recv(done) -> _ => busy = false,
            default(wait) => {}
        }
        batch.extend(queue.try_iter().take(MAX_BATCH));
        if done.try_recv().is_ok() {
            busy = false;
        }
        let mut round = Round::default();
        for write in batch.drain(..) {
            match write {
                Write::Node(node) => round.check(
                    log_json(&mut log, wal::Kind::Node, &node)
                        .map(|value| drop(changes.nodes.insert(node.id, value))),
                ),
                Write::Job(job) => round.check(
                    log_json(&mut log, wal::Kind::Job, &job)
                        .map(|value| drop(changes.jobs.insert(job.id, Dirty::Unfinished(value)))),
                ),
                Write::Finish(id) => {
                    let was_active = in_active.remove(&id);
                    round.check(log_finish(
                        s,
                        &mut log,
                        &mut images,
                        &mut changes,
                        id,
                        was_active,
                    ));
                }
                Write::Prune {
                    before_ms,
                    limit,
                    done,
                } => {
                    let _ = tasks.send(Task::Prune {
                        before_ms,
                        limit,
                        open_segment: images.segment(),
                        done,
                    });
                }
                Write::Sync(waiter) => round.waiters.push(waiter),
                Write::Checkpoint(waiter) => forced.push(waiter),
            }
        }
        // Images before the records that point at them (a replay checks them anyway).
        round.check(images.write());
        let written = if round.waiters.is_empty() {
            log.write()
        } else {
            log.sync()
        };
        round.check(written);
        round.answer();
        let due = Instant::now() >= last_checkpoint + CHECKPOINT_EVERY
            || log.len() >= CHECKPOINT_BYTES
            || !forced.is_empty();
        if due && !busy {
            if changes.is_empty() && forced.is_empty() {
                last_checkpoint = Instant::now();
            } else {
                let log_bytes = log.len();
                last_checkpoint = Instant::now();
                match log.rotate() {
                    Ok(closed) => {
                        in_active.extend(changes.jobs.iter().filter_map(|(id, d)| {
                            matches!(d, Dirty::Unfinished(_)).then_some(*id)
                        }));
                        let task = Task::Checkpoint {
                            generation: Some(closed),
                            log_bytes,
                            changes: std::mem::take(&mut changes),
                            segments: images.take_touched(),
                            waiters: std::mem::take(&mut forced),
                        };
                        busy = tasks.send(task).is_ok();
                        if !busy {
                            tracing::error!(
                                "the store's checkpoint thread is gone; changes stay in the write-ahead log until the next start replays it"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a new write-ahead log generation; retrying in a second");
                    }
                }
            }
        }
    }
    // Every handle is gone: wait for the checkpoint in flight, then checkpoint the rest.
    if busy {
        let _ = done.recv();
    }
    let generation = match log.sync() {
        Ok(()) => Some(log.generation()),
        Err(e) => {
            tracing::error!(error = %e, "final write-ahead log sync failed; the log is replayed at the next start");
            None
        }
    };
    let closing = Task::Checkpoint {
        generation,
        log_bytes: 0,
        changes: std::mem::take(&mut changes),
        segments: images.take_touched(),
        waiters: std::mem::take(&mut forced),
    };
    let _ = tasks.send(closing);
    drop(tasks);
    if checkpointer.join().is_err() {
        tracing::error!("the store's checkpoint thread panicked");
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

/// Logs a finished job: its image to the image log, its record (pointing at the image) to the
/// write-ahead log. The record stays in the pending set for reads until its checkpoint.
fn log_finish(
    s: &Shared,
    log: &mut wal::Wal,
    images: &mut image_log::Appender,
    changes: &mut Changes,
    id: JobId,
    in_active: bool,
) -> Result<()> {
    // A segment change does file I/O: not under the lock readers and the actor take.
    images.make_room()?;
    let mut value = Vec::with_capacity(1024);
    let ended_ms = {
        let pending = lock(&s.pending);
        let Some(p) = pending.get(&id) else {
            return Ok(());
        };
        let at = p
            .png
            .as_deref()
            .map(|png| images.append(id, png))
            .transpose()?;
        encode_finished(&mut value, &p.record, at)?;
        p.record.updated_ms
    };
    log.append(wal::Kind::Finish, &value)?;
    changes.jobs.insert(
        id,
        Dirty::Finished {
            value,
            ended_ms,
            in_active,
        },
    );
    Ok(())
}

/// One round of the writer: the flush waiters to answer, and the first error met.
#[derive(Default)]
struct Round {
    waiters: Vec<Waiter>,
    error: Option<String>,
}

impl Round {
    fn check(&mut self, result: Result<()>) {
        if let Err(e) = result {
            tracing::error!(error = %e, "store write failed");
            self.error.get_or_insert_with(|| e.to_string());
        }
    }

    fn answer(&mut self) {
        let result = match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        for waiter in self.waiters.drain(..) {
            waiter.answer(result.clone());
        }
    }
}

/// The `drover-checkpoint` thread: puts each closed log generation's changes in sled (after
/// syncing the image segments they point into), flushes sled, deletes the generation; runs the
/// retention sweep. After a failed checkpoint it deletes no log anymore: the next start replays
/// it.
fn run_checkpointer(s: &Shared, tasks: &Receiver<Task>, done: &Sender<()>) {
    let mut failed = false;
    for task in tasks {
        match task {
            Task::Checkpoint {
                generation,
                log_bytes,
                changes,
                segments,
                waiters,
            } => {
                let result = checkpoint(s, changes, &segments);
                if let Err(e) = &result {
                    failed = true;
                    tracing::error!(error = %e, generation, "checkpoint failed; the write-ahead log is kept and replayed at the next start");
                } else if let Some(g) = generation.filter(|_| !failed) {
                    if let Err(e) = wal::retire_through(&s.wal_dir, g) {
                        tracing::error!(error = %e, generation = g, "cannot retire a checkpointed write-ahead log generation");
                    }
                    if log_bytes > 0
                        && let Err(e) = wal::prepare_spare(&s.wal_dir, log_bytes)
                    {
                        tracing::warn!(error = %e, "cannot prepare a spare write-ahead log file; generations grow their files instead");
                    }
                }
                let answer = result.map_err(|e| e.to_string());
                for waiter in waiters {
                    waiter.answer(answer.clone());
                }
                let _ = done.send(());
            }
            Task::Prune {
                before_ms,
                limit,
                open_segment,
                done,
            } => {
                let result = prune(s, before_ms, limit, open_segment);
                match &result {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "finished jobs past retention deleted"),
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    }
}

fn checkpoint(s: &Shared, changes: Changes, segments: &BTreeMap<u32, File>) -> Result<()> {
    // The images on disk before anything in sled points at them.
    for file in segments.values() {
        file.sync_data()?;
    }
    for (id, value) in changes.nodes {
        s.nodes.insert(id.as_bytes(), value)?;
    }
    let mut finished = Vec::new();
    for (id, dirty) in changes.jobs {
        match dirty {
            Dirty::Unfinished(value) => {
                s.active.insert(id.as_bytes(), value)?;
            }
            Dirty::Finished {
                value,
                ended_ms,
                in_active,
            } => {
                put_finished(s, id, ended_ms, &value, in_active)?;
                finished.push(id);
            }
        }
    }
    // sled answers reads of what it was given at once: the pending copies can go.
    {
        let mut pending = lock(&s.pending);
        for id in &finished {
            pending.remove(id);
        }
    }
    s.db.flush()?;
    Ok(())
}

/// The retention sweep (see [`Store::prune_finished`]). Time-ordered jobs are found in `jobs`
/// itself, oldest first, stopping at the first one accepted after the cutoff (one that ended
/// after it is kept until it is past it too); other jobs through the `finished` index.
fn prune(s: &Shared, before_ms: u64, limit: usize, open_segment: u32) -> Result<usize> {
    let mut pruned = 0;
    for entry in s.jobs.iter() {
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
        if decode_finished(&value)?.0.updated_ms < before_ms {
            s.jobs.remove(&key)?;
            pruned += 1;
        }
    }
    for entry in s
        .finished
        .range(..before_ms.to_be_bytes().to_vec())
        .take(limit.saturating_sub(pruned))
    {
        let (key, _) = entry?;
        if let Some(id) = key.get(8..) {
            s.jobs.remove(id)?;
            s.images.remove(id)?;
            pruned += 1;
        }
        s.finished.remove(key)?;
    }
    let cutoff = SystemTime::UNIX_EPOCH + Duration::from_millis(before_ms);
    let segments = image_log::delete_older(&s.image_dir, open_segment, cutoff)?;
    if segments > 0 {
        tracing::info!(segments, "image log segments past retention deleted");
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::JobState;
    use drover_shared::job::JobRequest;

    fn job() -> JobRecord {
        let spec = JobRequest {
            prompt: "a cat".into(),
            ..Default::default()
        }
        .validate(|| 1)
        .unwrap();
        JobRecord::new(JobId::random(), spec)
    }

    fn finished(state: JobState, ended_ms: u64) -> JobRecord {
        let mut j = job();
        j.state = state;
        j.updated_ms = ended_ms;
        j
    }

    /// What a crash right now would leave on disk: a copy of the store's folder taken while it
    /// is open (the copy has no lock on it and no running process behind it).
    fn crash_image(dir: &Path) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                let target = to.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
        let out = tempfile::tempdir().unwrap();
        copy(dir, out.path());
        out
    }

    #[test]
    fn what_was_flushed_survives_a_stop_before_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let done = finished(JobState::Succeeded, 5);
        let mut queued = job();
        let crashed = {
            let store = Store::open(dir.path()).unwrap();
            store.put_job(&queued).unwrap();
            queued.state = JobState::Leased;
            store.put_job(&queued).unwrap();
            store.finish_job(&done, Some(b"png"[..].into())).unwrap();
            // Answered from memory before it is in sled.
            assert_eq!(store.image(done.id).unwrap().as_deref(), Some(&b"png"[..]));
            assert_eq!(store.job(done.id).unwrap(), Some(done.clone()));
            actix_rt::System::new().block_on(store.flush()).unwrap();
            // The log holds it all, sled nothing yet.
            assert!(store.shared.active.is_empty() && store.shared.jobs.is_empty());
            crash_image(dir.path())
        };
        let store = Store::open(crashed.path()).unwrap();
        assert_eq!(store.job(done.id).unwrap(), Some(done.clone()));
        assert_eq!(store.unfinished_jobs().unwrap(), vec![queued.clone()]);
        assert_eq!(store.image(done.id).unwrap().as_deref(), Some(&b"png"[..]));
        assert_eq!(store.job(JobId::random()).unwrap(), None);
        assert!(
            wal::generations(&store.shared.wal_dir).unwrap().len() <= 1,
            "replayed generations are deleted"
        );
    }

    #[test]
    fn a_checkpoint_moves_the_log_into_sled_once_images_are_on_disk() {
        let store = Store::temporary().unwrap();
        let mut running = job();
        running.state = JobState::Running;
        let done = finished(JobState::Succeeded, 5);
        let mut gone = job();
        store.put_job(&running).unwrap();
        store.put_job(&gone).unwrap();
        store
            .finish_job(&done, Some(b"image bytes"[..].into()))
            .unwrap();
        gone.state = JobState::Cancelled;
        store.finish_job(&gone, None).unwrap();
        store.checkpoint_blocking().unwrap();
        let stored = store.shared.jobs.get(done.id.as_bytes()).unwrap().unwrap();
        let (record, at) = decode_finished(&stored).unwrap();
        assert_eq!(record, done);
        let at = at.expect("the record points at its image");
        assert_eq!(
            image_log::read(&store.shared.image_dir, done.id, at).unwrap(),
            b"image bytes"
        );
        assert!(lock(&store.shared.pending).is_empty());
        assert_eq!(
            store.image(done.id).unwrap().as_deref(),
            Some(&b"image bytes"[..])
        );
        // Coalesced: the cancelled job's unfinished state never reached `active`.
        assert!(
            !store
                .shared
                .active
                .contains_key(gone.id.as_bytes())
                .unwrap()
        );
        assert_eq!(store.job(gone.id).unwrap(), Some(gone));
        assert_eq!(store.unfinished_jobs().unwrap(), vec![running]);
        // Only the generation being written is left.
        assert_eq!(wal::generations(&store.shared.wal_dir).unwrap().len(), 1);
    }

    #[test]
    fn a_finish_whose_image_did_not_survive_is_dropped_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut leased = job();
        leased.state = JobState::Leased;
        let mut done = leased.clone();
        done.state = JobState::Succeeded;
        let crashed = {
            let store = Store::open(dir.path()).unwrap();
            store.put_job(&leased).unwrap();
            store.finish_job(&done, Some(b"image"[..].into())).unwrap();
            store.flush_blocking().unwrap();
            crash_image(dir.path())
        };
        // An OS crash: the log reached the disk, the image's bytes did not.
        for entry in std::fs::read_dir(crashed.path().join("images")).unwrap() {
            let path = entry.unwrap().path();
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        }
        let store = Store::open(crashed.path()).unwrap();
        assert_eq!(
            store.unfinished_jobs().unwrap(),
            vec![leased.clone()],
            "the job runs again"
        );
        assert_eq!(store.image(leased.id).unwrap(), None);
    }

    #[test]
    fn retention_prunes_only_old_finished_jobs() {
        let store = Store::temporary().unwrap();
        let old = finished(JobState::Failed, 1_000);
        let recent = finished(JobState::Succeeded, 5_000);
        let mut waiting = job();
        waiting.updated_ms = 10;
        store.put_job(&waiting).unwrap();
        for j in [&old, &recent] {
            store.finish_job(j, Some(b"png"[..].into())).unwrap();
        }
        store.checkpoint_blocking().unwrap();
        assert_eq!(store.prune_finished_now(2_000, 100).unwrap(), 1);
        assert_eq!(store.job(old.id).unwrap(), None);
        assert_eq!(store.image(old.id).unwrap(), None);
        assert!(store.job(recent.id).unwrap().is_some());
        assert!(store.image(recent.id).unwrap().is_some());
        assert!(
            store.job(waiting.id).unwrap().is_some(),
            "unfinished jobs are never pruned"
        );
        assert_eq!(
            store.prune_finished_now(2_000, 100).unwrap(),
            0,
            "nothing left to prune"
        );
        assert_eq!(
            store.prune_finished_now(6_000, 0).unwrap(),
            0,
            "at most the limit"
        );
        assert_eq!(store.prune_finished_now(6_000, 100).unwrap(), 1);
        assert_eq!(store.job(recent.id).unwrap(), None);
    }

    /// A time-ordered job id made at `ms`.
    fn made_at(ms: u64) -> JobId {
        let mut b = *JobId::random().as_bytes();
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        b[6] = 0x70 | (b[6] & 0x0f);
        JobId::from_bytes(b)
    }

    #[test]
    fn retention_walks_time_ordered_jobs_without_an_index() {
        let store = Store::temporary().unwrap();
        let ended = |made: u64, end: u64| {
            let mut j = finished(JobState::Succeeded, end);
            j.id = made_at(made);
            assert_eq!(j.id.created_ms(), Some(made));
            j
        };
        let (a, b, c) = (
            ended(1_000, 1_500),
            ended(1_100, 9_000),
            ended(8_000, 8_500),
        );
        for j in [&a, &b, &c] {
            store.finish_job(j, Some(b"png"[..].into())).unwrap();
        }
        store.checkpoint_blocking().unwrap();
        assert!(
            store.shared.finished.is_empty(),
            "no index for time-ordered ids"
        );
        assert_eq!(store.prune_finished_now(5_000, 100).unwrap(), 1);
        assert_eq!(store.job(a.id).unwrap(), None);
        assert!(
            store.job(b.id).unwrap().is_some(),
            "accepted before the cutoff but ended after it: kept"
        );
        assert!(store.job(c.id).unwrap().is_some());
        assert_eq!(
            store.prune_finished_now(10_000, 1).unwrap(),
            1,
            "at most the limit"
        );
        assert_eq!(store.prune_finished_now(10_000, 100).unwrap(), 1);
        assert!(store.shared.jobs.is_empty());
    }

    #[test]
    fn a_store_of_the_first_layout_is_upgraded_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = finished(JobState::Succeeded, 1_000);
        let waiting = job();
        {
            // Layout 1: every job in `jobs`, no index, no layout mark, images in sled.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let jobs = db.open_tree("jobs").unwrap();
            for j in [&old, &waiting] {
                jobs.insert(j.id.as_bytes(), serde_json::to_vec(j).unwrap())
                    .unwrap();
            }
            db.open_tree("images")
                .unwrap()
                .insert(old.id.as_bytes(), &b"old png"[..])
                .unwrap();
            db.flush().unwrap();
        }
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.unfinished_jobs().unwrap(), vec![waiting.clone()]);
            assert_eq!(store.job(waiting.id).unwrap(), Some(waiting.clone()));
            assert_eq!(store.job(old.id).unwrap(), Some(old.clone()));
            assert_eq!(
                store.image(old.id).unwrap().as_deref(),
                Some(&b"old png"[..])
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap(), vec![waiting]);
        assert_eq!(store.prune_finished_now(2_000, 100).unwrap(), 1);
        assert_eq!(store.job(old.id).unwrap(), None);
        assert_eq!(store.image(old.id).unwrap(), None);
    }

    #[test]
    fn a_store_of_a_newer_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("layout", &[LAYOUT + 1])
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("newer drover-coordinator"), "{err}");
    }

    #[test]
    fn a_job_moves_from_active_to_finished_once_it_ends() {
        let store = Store::temporary().unwrap();
        let mut j = job();
        store.put_job(&j).unwrap();
        store.checkpoint_blocking().unwrap();
        assert_eq!(store.unfinished_jobs().unwrap().len(), 1);
        j.state = JobState::Cancelled;
        j.updated_ms = 7;
        store.finish_job(&j, None).unwrap();
        store.checkpoint_blocking().unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        assert_eq!(store.job(j.id).unwrap(), Some(j.clone()));
        // A crash between writing the end and removing the active entry leaves both: the end wins.
        let mut stale = j.clone();
        stale.state = JobState::Running;
        store
            .shared
            .active
            .insert(j.id.as_bytes(), serde_json::to_vec(&stale).unwrap())
            .unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        assert!(!store.shared.active.contains_key(j.id.as_bytes()).unwrap());
        assert_eq!(store.prune_finished_now(8, 10).unwrap(), 1);
    }
}
