//! The coordinator's persistent store. Only this module touches sled.
//!
//! Trees: `nodes` (node id → [`NodeRecord`] JSON); `active` (job id → [`JobRecord`] JSON of
//! every unfinished job, all a restart reads); `jobs` (the same for finished jobs, kept for the
//! retention period); `images` (job id → PNG bytes); `finished` (end time, big-endian, ++ job id →
//! nothing: the retention sweep reads only what it deletes, however many jobs are kept); `meta`
//! (the layout version).

use std::path::Path;

use drover_shared::ids::JobId;

use crate::error::{CoordinatorError, Result};
use crate::records::{JobRecord, NodeRecord};

/// A request to be told when every write made before it is on disk.
type CommitWaiter = (
    sled::Db,
    tokio::sync::oneshot::Sender<std::result::Result<(), String>>,
);

/// Handle to the embedded database; cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    nodes: sled::Tree,
    active: sled::Tree,
    jobs: sled::Tree,
    images: sled::Tree,
    finished: sled::Tree,
    commits: std::sync::mpsc::Sender<CommitWaiter>,
}

/// The store layout this build writes: 2 = unfinished jobs in `active`, `finished` index.
const LAYOUT: u8 = 2;

/// The `finished` key of a job that ended at `ended_ms`.
fn finished_key(ended_ms: u64, id: JobId) -> Vec<u8> {
    let mut key = ended_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// Group commit: one thread takes every waiting commit request, runs one `fsync`ing flush that
/// covers all writes made before those requests, and answers them together. Concurrent
/// submissions therefore share flushes instead of queueing one flush each. The database handle
/// travels with each request, so the thread holds none between batches (a dropped store closes).
fn start_committer() -> std::sync::mpsc::Sender<CommitWaiter> {
    let (tx, rx) = std::sync::mpsc::channel::<CommitWaiter>();
    let spawned = std::thread::Builder::new()
        .name("drover-commit".into())
        .spawn(move || {
            while let Ok((db, first)) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter().map(|(_, waiter)| waiter));
                let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                drop(db);
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "commit thread could not start; flushes will fail");
    }
    tx
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::from_db(
            sled::Config::new()
                .path(dir)
                .flush_every_ms(Some(200))
                .open()?,
        )
    }

    /// A store that lives in a temporary folder and disappears on drop (for tests).
    pub fn temporary() -> Result<Self> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self> {
        let meta = db.open_tree("meta")?;
        let store = Self {
            nodes: db.open_tree("nodes")?,
            active: db.open_tree("active")?,
            jobs: db.open_tree("jobs")?,
            images: db.open_tree("images")?,
            finished: db.open_tree("finished")?,
            commits: start_committer(),
            db,
        };
        if meta.get("layout")?.as_deref() != Some(&[LAYOUT][..]) {
            store.upgrade()?;
            meta.insert("layout", &[LAYOUT])?;
        }
        Ok(store)
    }

    /// Brings a store written by an earlier layout (every job in `jobs`, no index) to this one,
    /// once: unfinished jobs move to `active`, finished ones get their `finished` entry.
    fn upgrade(&self) -> Result<()> {
        let (mut moved, mut indexed) = (0usize, 0usize);
        for entry in self.jobs.iter() {
            let (key, value) = entry?;
            let job: JobRecord = serde_json::from_slice(&value)?;
            if job.state.is_terminal() {
                self.finished
                    .insert(finished_key(job.updated_ms, job.id), &[])?;
                indexed += 1;
            } else {
                self.active.insert(&key, value)?;
                self.jobs.remove(&key)?;
                moved += 1;
            }
        }
        if moved + indexed > 0 {
            tracing::info!(
                unfinished = moved,
                finished = indexed,
                "store upgraded to layout 2"
            );
        }
        Ok(())
    }

    /// Inserts or replaces a node record.
    pub fn put_node(&self, node: &NodeRecord) -> Result<()> {
        self.nodes
            .insert(node.id.as_bytes(), serde_json::to_vec(node)?)?;
        Ok(())
    }

    /// Every registered node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.nodes
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Inserts or replaces a job record: an unfinished job in `active`; a finished one in `jobs`
    /// and the `finished` index, and out of `active`.
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        let value = serde_json::to_vec(job)?;
        if job.state.is_terminal() {
            self.jobs.insert(job.id.as_bytes(), value)?;
            self.finished
                .insert(finished_key(job.updated_ms, job.id), &[])?;
            self.active.remove(job.id.as_bytes())?;
        } else {
            self.active.insert(job.id.as_bytes(), value)?;
        }
        Ok(())
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        let found = match self.jobs.get(id.as_bytes())? {
            Some(v) => Some(v),
            None => self.active.get(id.as_bytes())?,
        };
        Ok(match found {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Every job that has not reached a terminal state (only `active` is read). A job whose end
    /// was written to `jobs` just before a crash took its `active` entry away is finished: the
    /// stale entry is dropped, so a finished job never runs again.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for entry in self.active.iter() {
            let (key, value) = entry?;
            if self.jobs.contains_key(&key)? {
                self.active.remove(&key)?;
                continue;
            }
            out.push(serde_json::from_slice(&value)?);
        }
        Ok(out)
    }

    /// Deletes up to `limit` finished jobs (and their images) that ended before `before_ms`,
    /// oldest first; returns how many. Reads only the `finished` index entries it deletes.
    pub fn prune_finished(&self, before_ms: u64, limit: usize) -> Result<usize> {
        let mut pruned = 0;
        for entry in self
            .finished
            .range(..before_ms.to_be_bytes().to_vec())
            .take(limit)
        {
            let (key, _) = entry?;
            if let Some(id) = key.get(8..) {
                self.jobs.remove(id)?;
                self.images.remove(id)?;
                pruned += 1;
            }
            self.finished.remove(key)?;
        }
        Ok(pruned)
    }

    /// Stores a job's image.
    pub fn put_image(&self, id: JobId, png: &[u8]) -> Result<()> {
        self.images.insert(id.as_bytes(), png)?;
        Ok(())
    }

    /// A job's image, if stored.
    pub fn image(&self, id: JobId) -> Result<Option<Vec<u8>>> {
        Ok(self.images.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Makes every write so far durable on disk (sharing the flush with concurrent callers).
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = || CoordinatorError::Unavailable("the store's commit thread stopped".into());
        self.commits
            .send((self.db.clone(), tx))
            .map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| CoordinatorError::Unavailable(format!("flushing the store: {e}")))
    }
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

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut done = job();
        done.state = JobState::Succeeded;
        let queued = job();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_job(&done).unwrap();
            store.put_job(&queued).unwrap();
            store.put_image(done.id, b"png").unwrap();
            actix_rt::System::new().block_on(store.flush()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.job(done.id).unwrap(), Some(done.clone()));
        assert_eq!(store.unfinished_jobs().unwrap(), vec![queued]);
        assert_eq!(store.image(done.id).unwrap().as_deref(), Some(&b"png"[..]));
        assert_eq!(store.job(JobId::random()).unwrap(), None);
    }

    #[test]
    fn retention_prunes_only_old_finished_jobs() {
        let store = Store::temporary().unwrap();
        let mut old = job();
        old.state = JobState::Failed;
        old.updated_ms = 1_000;
        let mut recent = job();
        recent.state = JobState::Succeeded;
        recent.updated_ms = 5_000;
        let mut waiting = job();
        waiting.updated_ms = 10;
        for j in [&old, &recent, &waiting] {
            store.put_job(j).unwrap();
            store.put_image(j.id, b"png").unwrap();
        }
        assert_eq!(store.prune_finished(2_000, 100).unwrap(), 1);
        assert_eq!(store.job(old.id).unwrap(), None);
        assert_eq!(store.image(old.id).unwrap(), None);
        assert!(store.job(recent.id).unwrap().is_some());
        assert!(store.image(recent.id).unwrap().is_some());
        assert!(
            store.job(waiting.id).unwrap().is_some(),
            "unfinished jobs are never pruned"
        );
        assert_eq!(
            store.prune_finished(2_000, 100).unwrap(),
            0,
            "nothing left to prune"
        );
        assert_eq!(
            store.prune_finished(6_000, 0).unwrap(),
            0,
            "at most the limit"
        );
        assert_eq!(store.prune_finished(6_000, 100).unwrap(), 1);
        assert_eq!(store.job(recent.id).unwrap(), None);
    }

    #[test]
    fn a_store_of_the_first_layout_is_upgraded_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = job();
        old.state = JobState::Succeeded;
        old.updated_ms = 1_000;
        let waiting = job();
        {
            // Layout 1: every job in `jobs`, no index, no layout mark.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let jobs = db.open_tree("jobs").unwrap();
            for j in [&old, &waiting] {
                jobs.insert(j.id.as_bytes(), serde_json::to_vec(j).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.unfinished_jobs().unwrap(), vec![waiting.clone()]);
            assert_eq!(store.job(waiting.id).unwrap(), Some(waiting.clone()));
            actix_rt::System::new().block_on(store.flush()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap(), vec![waiting]);
        assert_eq!(store.prune_finished(2_000, 100).unwrap(), 1);
        assert_eq!(store.job(old.id).unwrap(), None);
    }

    #[test]
    fn a_job_moves_from_active_to_finished_once_it_ends() {
        let store = Store::temporary().unwrap();
        let mut j = job();
        store.put_job(&j).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap().len(), 1);
        j.state = JobState::Cancelled;
        j.updated_ms = 7;
        store.put_job(&j).unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        assert_eq!(store.job(j.id).unwrap(), Some(j.clone()));
        // A crash between writing the end and removing the active entry leaves both: the end wins.
        let mut stale = j.clone();
        stale.state = JobState::Running;
        store
            .active
            .insert(j.id.as_bytes(), serde_json::to_vec(&stale).unwrap())
            .unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        assert!(!store.active.contains_key(j.id.as_bytes()).unwrap());
        assert_eq!(store.prune_finished(8, 10).unwrap(), 1);
    }
}
