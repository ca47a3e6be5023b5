//! The coordinator's persistent store. Only this module touches sled.
//!
//! Trees: `nodes` (node id → [`NodeRecord`] JSON), `jobs` (job id → [`JobRecord`] JSON) and
//! `images` (job id → PNG bytes).

use std::path::Path;

use drover_shared::ids::JobId;

use crate::error::Result;
use crate::records::{JobRecord, NodeRecord};

/// Handle to the embedded database; cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    nodes: sled::Tree,
    jobs: sled::Tree,
    images: sled::Tree,
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
        Ok(Self {
            nodes: db.open_tree("nodes")?,
            jobs: db.open_tree("jobs")?,
            images: db.open_tree("images")?,
            db,
        })
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

    /// Inserts or replaces a job record.
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        self.jobs
            .insert(job.id.as_bytes(), serde_json::to_vec(job)?)?;
        Ok(())
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every job that has not reached a terminal state.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for v in self.jobs.iter().values() {
            let job: JobRecord = serde_json::from_slice(&v?)?;
            if !job.state.is_terminal() {
                out.push(job);
            }
        }
        Ok(out)
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

    /// Makes every write so far durable on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
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
}
