//! The store's reads: a job, its image, the unfinished jobs a restart restores (their sources
//! rejoined) and the recently finished jobs whose idempotency keys a restart rebuilds.

use std::collections::HashMap;

use drover_shared::ids::JobId;

use super::checkpoint::Dirty;
use super::error::{Result, StoreError};
use super::{Change, Store, codec, image_log, lock};
use crate::records::JobRecord;

impl Store {
    /// A finished job, if it exists (finished jobs still on their way to sled included). An
    /// unfinished job's current state lives in the control plane; here it is as of the last
    /// checkpoint.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        if let Some(p) = lock(&self.shared.pending).get(&id) {
            return Ok(Some(p.record.clone()));
        }
        if let Some((job, _)) = self.shared.replayed_job(id)? {
            return Ok(Some(job));
        }
        self.shared.with_trees(|t| {
            if let Some(v) = t.jobs.get(id.as_bytes())? {
                return Ok(Some(codec::decode_finished(&v)?.0));
            }
            match t.active.get(id.as_bytes())? {
                Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
                None => Ok(None),
            }
        })
    }

    /// Every job that has not reached a terminal state (only `active` is read; called at start,
    /// after the log's replay). A job whose end was written to `jobs` just before a crash took
    /// its `active` entry away is finished: the stale entry is dropped (only skipped while the
    /// store is degraded: a failed write costs sled its reads), so a finished job never runs
    /// again.
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>> {
        let healthy = self.shared.health.refusal().is_ok();
        let mut jobs = self.shared.with_trees(|t| {
            let mut out = HashMap::new();
            for entry in t.active.iter() {
                let (key, value) = entry?;
                if t.jobs.contains_key(&key)? {
                    if healthy && let Err(e) = t.active.remove(&key) {
                        tracing::warn!(error = %e, "cannot drop the stale entry of a finished job");
                    }
                    continue;
                }
                let job: JobRecord = serde_json::from_slice(&value)?;
                out.insert(job.id, job);
            }
            Ok(out)
        })?;
        let replayed = self.shared.replayed();
        if let Some(replayed) = replayed.as_ref() {
            for (id, dirty) in &replayed.jobs {
                match dirty {
                    Dirty::Unfinished(value) => {
                        let job = serde_json::from_slice(value).map_err(StoreError::from)?;
                        jobs.insert(*id, job);
                    }
                    Dirty::Finished { .. } => {
                        jobs.remove(id);
                    }
                }
            }
        }
        // Sources kept apart go back into their records; those of no unfinished job (a job
        // whose end reached sled before its source was removed) are dropped.
        let from_log = replayed.as_ref().map(|r| &r.sources);
        let orphans = self.shared.with_trees(|t| {
            for job in jobs.values_mut() {
                let value = match from_log.and_then(|s| s.get(&job.id)) {
                    Some(v) => Some(v.clone()),
                    None => t.sources.get(job.id.as_bytes())?.map(|v| v.to_vec()),
                };
                let stripped = job.spec.source.as_ref().is_some_and(|s| s.is_stripped());
                match value {
                    Some(v) => {
                        codec::rejoin_source(job, &v)?;
                    }
                    None if stripped => {
                        tracing::error!(job_id = %job.id, "an unfinished job's source image is missing from the store; the job will fail");
                    }
                    None => {}
                }
            }
            let mut orphans = Vec::new();
            for key in t.sources.iter().keys() {
                let key = key?;
                let id = JobId::from_bytes(key.as_ref().try_into().unwrap_or_default());
                if !jobs.contains_key(&id) {
                    orphans.push(key);
                }
            }
            if healthy {
                for key in &orphans {
                    t.sources.remove(key)?;
                }
            }
            Ok(orphans.len())
        })?;
        if orphans > 0 {
            tracing::info!(orphans, "sources of finished jobs dropped");
        }
        Ok(jobs.into_values().collect())
    }

    /// Finished jobs submitted with an idempotency key since `since_ms` (read at start, to
    /// rebuild the keys): time-ordered ids let the walk start at `since_ms`.
    pub fn finished_with_keys(&self, since_ms: u64) -> Result<Vec<JobRecord>> {
        let mut start = [0u8; 16];
        start[..6].copy_from_slice(&since_ms.to_be_bytes()[2..]);
        let mut out = self.shared.with_trees(|t| {
            let mut out = Vec::new();
            for entry in t.jobs.range(start..) {
                let (_, value) = entry?;
                let (job, _) = codec::decode_finished(&value)?;
                if job.idempotency.is_some() {
                    out.push(job);
                }
            }
            Ok(out)
        })?;
        if let Some(replayed) = self.shared.replayed().as_ref() {
            for dirty in replayed.jobs.values() {
                if let Dirty::Finished { value, .. } = dirty {
                    let (job, _) = codec::decode_finished(value)?;
                    if job.idempotency.is_some() && job.created_ms >= since_ms {
                        out.push(job);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The whole state, as the changes that rebuild it (a replicated coordinator's snapshot):
    /// every node, every unfinished job (its source rejoined), every finished job with its
    /// image. Reads sled: checkpoint first. Held in memory whole.
    pub fn export(&self) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        for node in self.nodes()? {
            out.push(Change::Node(serde_json::to_vec(&node)?));
        }
        for job in self.unfinished_jobs()? {
            out.push(Change::Job(serde_json::to_vec(&job)?));
        }
        let finished: Vec<JobId> = self.shared.with_trees(|t| {
            t.jobs
                .iter()
                .keys()
                .map(|k| {
                    Ok(JobId::from_bytes(
                        k?.as_ref().try_into().unwrap_or_default(),
                    ))
                })
                .collect()
        })?;
        for id in finished {
            let Some(record) = self.job(id)? else {
                continue;
            };
            out.push(Change::Finish {
                record: serde_json::to_vec(&record)?,
                png: self.image(id)?,
            });
        }
        Ok(out)
    }

    /// A job's image, if stored.
    pub fn image(&self, id: JobId) -> Result<Option<Vec<u8>>> {
        if let Some(p) = lock(&self.shared.pending).get(&id) {
            return Ok(p.png.as_deref().map(<[u8]>::to_vec));
        }
        if let Some((_, at)) = self.shared.replayed_job(id)? {
            return match at {
                Some(at) => Ok(Some(image_log::read(&self.shared.image_dir, id, at)?)),
                None => Ok(None),
            };
        }
        let (at, old) = self.shared.with_trees(|t| {
            if let Some(v) = t.jobs.get(id.as_bytes())?
                && let (_, Some(at)) = codec::decode_finished(&v)?
            {
                return Ok((Some(at), None));
            }
            Ok((None, t.images.get(id.as_bytes())?.map(|v| v.to_vec())))
        })?;
        match at {
            Some(at) => Ok(Some(image_log::read(&self.shared.image_dir, id, at)?)),
            None => Ok(old),
        }
    }
}
