//! Replay at open: the log generations a stop or crash left, read before anything reads sled,
//! coalesced into one set of changes that the store applies to sled (or, when sled cannot take
//! them for lack of space, serves from memory and checkpoints later).

use std::path::Path;

use super::Trees;
use super::checkpoint::{Changes, Dirty};
use super::codec::{decode_finished, read_source_record};
use super::error::{Result, StoreError};
use super::{image_log, wal};
use crate::records::{JobRecord, NodeRecord};

/// What the log generations hold.
pub(super) struct Replayed {
    /// The latest value of every key they change.
    pub changes: Changes,
    /// The last generation.
    pub last: u64,
}

/// Reads every log generation in `wal_dir`, in order; `None` when there is none. A finish whose
/// image (in `image_dir`) does not check out is dropped: the job stays unfinished and runs
/// again. A job already finished in sled is never made unfinished again.
pub(super) fn read(t: &Trees, wal_dir: &Path, image_dir: &Path) -> Result<Option<Replayed>> {
    let generations = wal::generations(wal_dir)?;
    let Some(&last) = generations.last() else {
        return Ok(None);
    };
    let mut changes = Changes::default();
    let (mut records, mut lost) = (0usize, 0usize);
    for &generation in &generations {
        for (kind, body) in wal::read(wal_dir, generation)? {
            records += 1;
            let damaged = |e: StoreError| {
                StoreError::Damaged(format!(
                    "write-ahead log generation {generation}: a record that passed its checksum does not decode ({e}); was it written by another version?"
                ))
            };
            match kind {
                wal::Kind::Node => {
                    let node: NodeRecord =
                        serde_json::from_slice(&body).map_err(|e| damaged(e.into()))?;
                    changes.nodes.insert(node.id, body);
                }
                wal::Kind::Source => {
                    let (id, source) = read_source_record(&body).map_err(damaged)?;
                    changes.sources.insert(id, source.to_vec());
                }
                wal::Kind::Job => {
                    let job: JobRecord =
                        serde_json::from_slice(&body).map_err(|e| damaged(e.into()))?;
                    changes.jobs.insert(job.id, Dirty::Unfinished(body));
                }
                wal::Kind::Finish => {
                    let (job, at) = decode_finished(&body).map_err(damaged)?;
                    let image_ok =
                        at.is_none_or(|at| image_log::read(image_dir, job.id, at).is_ok());
                    if image_ok {
                        let finished = Dirty::Finished {
                            value: body,
                            ended_ms: job.updated_ms,
                            in_active: true,
                        };
                        changes.jobs.insert(job.id, finished);
                        changes.sources.remove(&job.id);
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
    let mut finished_in_sled = Vec::new();
    for (id, dirty) in &changes.jobs {
        if matches!(dirty, Dirty::Unfinished(_)) && t.jobs.contains_key(id.as_bytes())? {
            finished_in_sled.push(*id);
        }
    }
    for id in finished_in_sled {
        changes.jobs.remove(&id);
        changes.sources.remove(&id);
    }
    tracing::info!(
        generations = generations.len(),
        records,
        lost_images = lost,
        "write-ahead log read"
    );
    Ok(Some(Replayed { changes, last }))
}
