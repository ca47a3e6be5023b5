//! The coordinator's persistent store. Only this module touches sled.
//!
//! **sled holds the state.** Trees: `nodes` (node id → [`NodeRecord`] JSON); `active` (job id →
//! [`JobRecord`] JSON of every unfinished job, all a restart reads); `jobs` (finished jobs, kept
//! for the retention period, the place of the job's image in front: see
//! `codec::encode_finished`; job ids are time-ordered, so the retention sweep walks `jobs` from
//! its start and stops at the first job accepted after the cutoff); `finished` (end time,
//! big-endian, ++ job id → nothing: the same sweep's index for jobs whose ids are not
//! time-ordered, those of stores before layout 3); `sources` (job id → the source image and
//! mask of an unfinished img2img job, `codec::encode_source`: kept apart so the record, written
//! again at every lease and re-queue, stays small — the source is logged once, when the job is
//! accepted, and goes when it ends); `images` (job id → PNG, written by stores
//! before layout 3 and still read); `meta` (the layout version, see `migrate`). Result images
//! go to the `image_log`.
//!
//! **A write-ahead log makes changes durable.** The control plane hands every change to
//! [`Store`] without waiting. The `drover-store` thread (`writer`) appends each change to the
//! `wal` in the order it was made; whoever must not answer before a change is on disk (an
//! accepted job's 2xx) calls [`Store::flush`] after making it, and one `fdatasync` of the log
//! answers every flush waiting in that round (group commit). sled's own flush (which also runs
//! its segment cleaning) is never on that path.
//!
//! **Checkpoints move the log into sled.** Every [`CHECKPOINT_EVERY`] the writer closes the log
//! generation and hands what it changed — coalesced per job, so a job accepted and finished in
//! between costs one record in sled, not four writes — to the `drover-checkpoint` thread
//! (`checkpoint`), which syncs the image segments written to, applies the changes to sled,
//! flushes sled, and recycles the generation's file (log files are preallocated, so a log sync
//! writes no metadata). A restart reads the generations left (`replay`) and applies them to
//! sled before anything reads it.
//!
//! **A durable record never points at an image that is not.** Images are synced before the
//! checkpoint that puts their records in sled; a log record written before its image reached the
//! disk is checked on replay, and a finish whose image did not survive (an OS crash) is dropped,
//! so the job is still unfinished and runs again. Until sled has flushed it, a finished job and
//! its image are answered from memory ([`Store::job`], [`Store::image`]).
//!
//! **Failed writes and a full disk** (issue 22). What the store does, and promises:
//! - *A submission is all or nothing.* New jobs are taken in groups: those queued between two
//!   flushes (a submission's jobs, then its flush). Whether a group is refused is decided at its
//!   first job; the log counts records durable only up to a flush that a sync answered, and the
//!   timed rotation waits (up to a second) for an open group's flush, so no group is half on
//!   disk. A flush succeeds only when every new job before it is durable.
//! - *A failed round leaves nothing.* When a round's image write, log write or log sync fails,
//!   the log is rewound to what is durable and zeros go over what lies after it (replay stops at
//!   the first bad frame), so nothing written since comes back after a restart. Jobs first
//!   logged in that span are *lost*: their flushes fail (503, and the submission is revoked),
//!   their later records and their end are dropped, nothing of them is checkpointed. Other
//!   records of the span stay in memory for the next checkpoint (best effort, as leases and
//!   results always are); finished jobs whose image was not written are logged again.
//! - *A refused flush takes its group with it*, logged or not. A lost job holds later flushes
//!   back (they are refused) until its end comes — the revoke — or for `writer::LOST_HOLD`.
//! - *Degraded.* Any failed write (the writer's or a checkpoint's) makes the store degraded
//!   ([`Store::health`]; `/healthz` answers 503 with the reason): new jobs are refused while
//!   reads, node records, leases and results go on being written, best effort. A failed
//!   checkpoint is carried and tried again once there is room for it; its generations stay.
//! - *The reserve.* [`Store::open`] keeps a ballast of `reserve_mb` MiB of real blocks in the
//!   data folder, in two halves. When a write fails for lack of space, `reserve.ballast` is
//!   deleted at once so checkpoints and results can go on in its space (sled, which refuses every
//!   write — and some reads — after a failed one, is reopened there). `reserve-start.ballast` is
//!   deleted only when the store cannot open for lack of space (a `kill -9` on a full disk): it
//!   then opens again, degraded; when sled cannot take the replayed log either, the log is kept,
//!   answered from memory and checkpointed once there is room. A start that finds no room for
//!   the reserve is degraded too. The store is healthy again once both halves are back and as
//!   much space again can be written (checked every second: a probe file written, synced,
//!   deleted). Without a reserve (0 MiB) a full disk can keep the coordinator from starting.
//!   Filesystems that compress zeros (btrfs, ZFS) make the ballast useless.
//! - *Never lost:* a job whose flush succeeded, whatever fails afterwards. *Known limit:* with
//!   concurrent submissions, a flush held back by another submission's lost job refuses jobs
//!   that were already durable (only when a sync came between them and their flush); their
//!   revoke (failed, "not accepted") is then logged best effort.

mod checkpoint;
mod codec;
mod error;
mod health;
mod image_log;
mod migrate;
mod raft_db;
mod reads;
mod replay;
mod replication;
mod waiter;
mod wal;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use drover_shared::ids::JobId;

pub use error::StoreError;
pub use health::StoreHealth;
pub use image_log::ImageRef;
pub use raft_db::RaftDb;
pub use replication::{Change, Committed, Replicate};

use checkpoint::Dirty;
use error::Result;
use waiter::Waiter;
use writer::Write;

use crate::records::{JobRecord, NodeRecord};

/// How often the writer checkpoints its changes into sled (and how often a degraded store
/// checks whether it can write again).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A finished job on its way to sled.
struct Pending {
    record: JobRecord,
    png: Option<Arc<[u8]>>,
}

/// The sled database and its trees.
struct Trees {
    db: sled::Db,
    nodes: sled::Tree,
    active: sled::Tree,
    jobs: sled::Tree,
    images: sled::Tree,
    finished: sled::Tree,
    sources: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    fn new(db: sled::Db) -> Result<Self> {
        Ok(Self {
            nodes: db.open_tree("nodes")?,
            active: db.open_tree("active")?,
            jobs: db.open_tree("jobs")?,
            images: db.open_tree("images")?,
            finished: db.open_tree("finished")?,
            sources: db.open_tree("sources")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Opens the database in `dir`. sled's snapshots are a summary of its log, rebuilt from the
    /// log when absent: one left half-written (sled 0.34 reads a `snap.*.generating` file, which
    /// a kill or a full disk can leave truncated, as the newest snapshot and refuses to open) is
    /// removed first, and when sled still finds a snapshot corrupt, the snapshots are set aside
    /// (`snapshots-set-aside/`) and it opens from its log.
    fn open(dir: &Path) -> Result<Self> {
        let config = || sled::Config::new().path(dir).flush_every_ms(Some(1000));
        for partial in snapshots(dir, true) {
            tracing::warn!(file = %partial.display(), "half-written sled snapshot removed");
            std::fs::remove_file(&partial).map_err(StoreError::from)?;
        }
        let db = match config().open() {
            Err(sled::Error::Corruption { .. }) if !snapshots(dir, false).is_empty() => {
                let aside = dir.join("snapshots-set-aside");
                std::fs::create_dir_all(&aside).map_err(StoreError::from)?;
                for snapshot in snapshots(dir, false) {
                    if let Some(name) = snapshot.file_name() {
                        std::fs::rename(&snapshot, aside.join(name)).map_err(StoreError::from)?;
                    }
                }
                tracing::warn!(folder = %aside.display(), "sled found a snapshot corrupt: snapshots set aside, opening from the log");
                config().open()?
            }
            opened => opened?,
        };
        Self::new(db)
    }

    /// Puts a finished job in sled: its record (as encoded) in `jobs` (and a `finished` entry
    /// when its id is not time-ordered), and, when it has one (`in_active`), its `active` entry
    /// gone — the end first, so a crash in between leaves both and a restart keeps the end.
    fn put_finished(&self, id: JobId, ended_ms: u64, value: &[u8], in_active: bool) -> Result<()> {
        self.jobs.insert(id.as_bytes(), value)?;
        if id.created_ms().is_none() {
            self.finished
                .insert(codec::finished_key(ended_ms, id), &[])?;
        }
        if in_active {
            self.active.remove(id.as_bytes())?;
        }
        Ok(())
    }
}

/// What the handles and the store's threads share.
struct Shared {
    /// sled; `None` only after a failed reopen (see [`Shared::reopen_db`]).
    trees: RwLock<Option<Trees>>,
    /// sled's folder, to reopen it; `None` for a temporary store.
    db_dir: Option<PathBuf>,
    /// Whether sled failed a write: it then refuses every write until it is reopened.
    db_failed: AtomicBool,
    /// The log a start replayed, while sled does not have it (it could not take it for lack of
    /// space): reads look here first.
    replayed: RwLock<Option<checkpoint::Changes>>,
    image_dir: PathBuf,
    wal_dir: PathBuf,
    /// Finished jobs handed to the writer and not yet flushed in sled, with their images.
    pending: Mutex<HashMap<JobId, Pending>>,
    health: health::Health,
    reserve: health::Reserve,
    #[cfg(test)]
    faults: tests::Faults,
}

impl Shared {
    /// Runs `read` on sled's trees.
    fn with_trees<T>(&self, read: impl FnOnce(&Trees) -> Result<T>) -> Result<T> {
        let trees = self.trees.read().unwrap_or_else(|e| e.into_inner());
        let trees = trees.as_ref().ok_or_else(|| {
            StoreError::Unwritable(
                "the database could not be reopened after a failed write; retrying".into(),
            )
        })?;
        read(trees).inspect_err(|e| {
            if matches!(e, StoreError::Db(_)) && e.is_unavailable() {
                self.db_failed.store(true, Ordering::Relaxed);
            }
        })
    }

    /// The log a start replayed, while sled does not have it.
    fn replayed(&self) -> std::sync::RwLockReadGuard<'_, Option<checkpoint::Changes>> {
        self.replayed.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A job as the log a start replayed has it (while sled does not): its record, and its
    /// image's place when it finished with one.
    fn replayed_job(&self, id: JobId) -> Result<Option<(JobRecord, Option<ImageRef>)>> {
        match self.replayed().as_ref().and_then(|r| r.jobs.get(&id)) {
            Some(Dirty::Unfinished(value)) => Ok(Some((serde_json::from_slice(value)?, None))),
            Some(Dirty::Finished { value, .. }) => Ok(Some(codec::decode_finished(value)?)),
            None => Ok(None),
        }
    }

    /// Records a failed write (`what` failed with `e`): the store is degraded, and when the disk
    /// is full the reserve is given back. Answers whether it was.
    fn fail(&self, what: &str, e: &StoreError) -> bool {
        let released = e.is_no_space() && self.reserve.release();
        let reason = if e.is_no_space() {
            format!("the disk is full ({what}: {e})")
        } else {
            format!("{what}: {e}")
        };
        // Loud when it degrades the store; while degraded, retries fail quietly.
        if self.health.refusal().is_ok() || released {
            tracing::error!(error = %e, what, released_reserve = released, "store write failed");
        } else {
            tracing::debug!(error = %e, what, "store write failed again");
        }
        self.health.fail(reason);
        released
    }

    /// Opens sled again, after a failed write made it refuse every other (sled keeps the error
    /// until it is reopened). The old handles go first: sled locks its folder.
    fn reopen_db(&self) -> Result<()> {
        let Some(dir) = &self.db_dir else {
            return Err(StoreError::Unwritable(
                "a temporary store's database cannot be reopened".into(),
            ));
        };
        let mut trees = self.trees.write().unwrap_or_else(|e| e.into_inner());
        *trees = None;
        *trees = Some(Trees::open(dir)?);
        self.db_failed.store(false, Ordering::Relaxed);
        tracing::info!("database reopened after a failed write");
        Ok(())
    }
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

/// Handle to the store; cheap to clone and safe to share between threads. Its errors are
/// [`CoordinatorError::Store`](crate::error::CoordinatorError::Store).
#[derive(Clone)]
pub struct Store {
    // Declared before `_writer`: the last handle drops its sender first, which lets the writer
    // stop before `_writer` joins it.
    writes: Sender<Write>,
    shared: Arc<Shared>,
    /// The replicated log, in a replicated coordinator: writes go there, not to the local log.
    replicator: Arc<OnceLock<Arc<dyn Replicate>>>,
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

/// The job ids a tree keyed by job id holds.
fn job_ids(tree: &sled::Tree) -> Result<HashSet<JobId>> {
    tree.iter()
        .keys()
        .map(|k| {
            Ok(JobId::from_bytes(
                k?.as_ref().try_into().unwrap_or_default(),
            ))
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (or creates) the store in `dir`: sled in `dir`, the log in `dir/wal`, images in
    /// `dir/images`, a reserve of `reserve_mb` MiB in `dir/reserve*.ballast`. Replays what the
    /// log holds from before a stop or crash. When that fails for lack of space, gives the
    /// reserve back and opens again, degraded, serving the log from memory if sled cannot take
    /// it (see the module docs).
    pub fn open(dir: &Path, reserve_mb: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(StoreError::from)?;
        let reserve = health::Reserve::new(dir, reserve_mb.saturating_mul(1024 * 1024));
        let open = |last_try: bool| -> Result<Self> {
            let trees = Trees::open(dir)?;
            Self::start(
                trees,
                Some(dir.to_path_buf()),
                dir,
                reserve.clone(),
                last_try,
            )
        };
        let store = match open(false) {
            Err(e) if e.is_no_space() => {
                let released = reserve.release_all();
                tracing::warn!(error = %e, released_reserve = released, "the disk is full: the store opens degraded");
                let store = open(true)?;
                store.shared.health.fail(format!(
                    "the disk is full (opening the store: {e}); new jobs are refused until space is freed"
                ));
                store
            }
            opened => opened?,
        };
        if store.shared.health.refusal().is_ok()
            && let Err(e) = store.shared.reserve.keep()
        {
            if error::is_no_space(&e) {
                store.shared.health.fail(format!(
                    "the disk is full (keeping the store's {reserve_mb} MiB reserve: {e}); new jobs are refused until space is freed"
                ));
            } else {
                tracing::warn!(error = %e, reserve_mb, "cannot keep the store's reserve; a full disk may keep the coordinator from starting");
            }
        }
        Ok(store)
    }

    /// A store that lives in a temporary folder and disappears on drop (for tests).
    #[cfg(test)]
    pub fn temporary() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(StoreError::from)?;
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(StoreError::from)?;
        let mut store = Self::start(
            Trees::new(db)?,
            None,
            dir.path(),
            health::Reserve::new(dir.path(), 0),
            false,
        )?;
        store._temporary = Some(Arc::new(dir));
        Ok(store)
    }

    /// Upgrades the layout, replays the log, opens the image log and the next log generation,
    /// and starts the writer. On the `last_try` of an open on a full disk, a replayed log that
    /// sled cannot take is served from memory and carried to the checkpoint thread.
    fn start(
        trees: Trees,
        db_dir: Option<PathBuf>,
        dir: &Path,
        reserve: health::Reserve,
        last_try: bool,
    ) -> Result<Self> {
        let image_dir = dir.join("images");
        let wal_dir = dir.join("wal");
        migrate::check(&trees)?;
        let (mut carried, mut replayed, mut db_failed) = (None, None, false);
        let next_generation = match replay::read(&trees, &wal_dir, &image_dir)? {
            None => 1,
            Some(log) => {
                let apply = || -> Result<()> {
                    #[cfg(test)]
                    if tests::full_at_open() {
                        return Err(std::io::Error::from_raw_os_error(28).into());
                    }
                    // A failed write costs sled its reads: not tried without room on the last try.
                    if last_try {
                        reserve.room(checkpoint::room_for(&log.changes))?;
                    }
                    checkpoint::apply_changes(&trees, &log.changes)
                };
                match apply() {
                    Ok(()) => wal::retire_through(&wal_dir, log.last)?,
                    Err(e) if last_try && e.is_no_space() => {
                        tracing::warn!(error = %e, generation = log.last, "the database cannot take the replayed log for lack of space: it is served from memory and checkpointed once there is room");
                        db_failed = matches!(e, StoreError::Db(_));
                        replayed = Some(log.changes.clone());
                        carried = Some(checkpoint::Work {
                            generation: Some(log.last),
                            changes: log.changes,
                            segments: std::collections::BTreeMap::new(),
                        });
                    }
                    Err(e) => return Err(e),
                }
                log.last + 1
            }
        };
        let images = image_log::Appender::open(&image_dir)?;
        let log = wal::Wal::create(&wal_dir, next_generation)?;
        // The `wal/` and `images/` folders' own names, durable before anything is written in them.
        File::open(dir)?.sync_all()?;
        let mut in_active = job_ids(&trees.active)?;
        // Jobs whose source is stored apart already: their records are logged without it.
        let mut sourced = job_ids(&trees.sources)?;
        if let Some(changes) = &replayed {
            in_active.extend(
                changes
                    .jobs
                    .iter()
                    .filter_map(|(id, d)| matches!(d, Dirty::Unfinished(_)).then_some(*id)),
            );
            sourced.extend(changes.sources.keys().copied());
        }
        let shared = Arc::new(Shared {
            trees: RwLock::new(Some(trees)),
            db_dir,
            db_failed: AtomicBool::new(db_failed),
            replayed: RwLock::new(replayed),
            image_dir,
            wal_dir,
            pending: Mutex::new(HashMap::new()),
            health: health::Health::default(),
            reserve,
            #[cfg(test)]
            faults: tests::Faults::opened(),
        });
        let (writes, queue) = crossbeam_channel::unbounded();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("drover-store".into())
                .spawn(move || {
                    let known = writer::Known { in_active, sourced };
                    writer::run(&shared, &queue, log, images, known, carried)
                })?
        };
        Ok(Self {
            writes,
            shared,
            replicator: Arc::default(),
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
        if let Some(log) = self.replicated() {
            log.propose(Change::Node(serde_json::to_vec(node)?));
            return Ok(());
        }
        self.queue(Write::Node(Box::new(node.clone())))
    }

    /// Every registered node (read at start, after the log's replay).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut nodes = self.shared.with_trees(|t| {
            t.nodes
                .iter()
                .values()
                .map(|v| {
                    let node: NodeRecord = serde_json::from_slice(&v?)?;
                    Ok((node.id, node))
                })
                .collect::<Result<HashMap<_, _>>>()
        })?;
        if let Some(replayed) = self.shared.replayed().as_ref() {
            for value in replayed.nodes.values() {
                let node: NodeRecord = serde_json::from_slice(value).map_err(StoreError::from)?;
                nodes.insert(node.id, node);
            }
        }
        Ok(nodes.into_values().collect())
    }

    /// Queues an unfinished job's record (insert or replace).
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        debug_assert!(
            !job.state.is_terminal(),
            "finished jobs go through finish_job"
        );
        if let Some(log) = self.replicated() {
            log.propose(Change::Job(serde_json::to_vec(job)?));
            return Ok(());
        }
        self.queue(Write::Job(Box::new(job.clone())))
    }

    /// Queues a finished job with its image: the image goes to the image log and the record,
    /// pointing at it, replaces the unfinished one. Both are answered from memory until they
    /// are in sled.
    pub fn finish_job(&self, job: &JobRecord, png: Option<Arc<[u8]>>) -> Result<()> {
        debug_assert!(
            job.state.is_terminal(),
            "unfinished jobs go through put_job"
        );
        // Answered from memory from now on (on a replicated coordinator's leader too, while the
        // log commits it).
        lock(&self.shared.pending).insert(
            job.id,
            Pending {
                record: job.clone(),
                png: png.clone(),
            },
        );
        if let Some(log) = self.replicated() {
            log.propose(Change::Finish {
                record: serde_json::to_vec(job)?,
                png: png.map(|p| p.to_vec()),
            });
            return Ok(());
        }
        self.queue(Write::Finish(job.id))
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

    /// Makes every job accepted so far durable (one log sync shared with every concurrent
    /// caller). Fails with [`StoreError::Unwritable`], and the reason, when one of them is not:
    /// its record was lost in a failed write, or refused because the store is degraded.
    /// On a replicated coordinator, resolves once every change so far is committed on a majority.
    pub async fn flush(&self) -> Result<()> {
        if let Some(log) = self.replicated() {
            return log.commit().await.map_err(StoreError::Unwritable);
        }
        self.sync_local().await
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
            .map_err(StoreError::Unwritable)
    }

    /// Test hook: waits until everything queued so far has been through a writer round.
    #[cfg(test)]
    fn barrier(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue(Write::Barrier(tx)).unwrap();
        rx.recv().unwrap();
    }

    /// Whether the store can write now; when not, since when and why.
    pub fn health(&self) -> StoreHealth {
        self.shared.health.snapshot()
    }
}

fn stopped() -> StoreError {
    StoreError::Unwritable("the store's writer thread stopped".into())
}

/// sled's snapshot files in `dir` (`snap.*`), or only the half-written ones (`*.generating`).
fn snapshots(dir: &Path, partial: bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap.") && (!partial || n.ends_with(".generating")))
        })
        .collect()
}
