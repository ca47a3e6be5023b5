//! Layout upgrades: the `meta` tree's `layout` says how the store was written; an older store
//! is brought to this build's layout once, at open, and a newer one is refused.

use super::Trees;
use super::codec::finished_key;
use super::error::{Result, StoreError};
use crate::records::JobRecord;

/// The store layout this build writes: 2 = unfinished jobs in `active`, `finished` index; 3 =
/// images in the image log, their place in front of the finished record; the write-ahead log;
/// 4 = unfinished jobs' source images in `sources`, apart from their records (a store of
/// layout 3, whose records hold them, reads as 4; an older build refuses a layout-4 store,
/// whose records it would read without their images).
pub const LAYOUT: u8 = 4;

/// Checks the layout mark and upgrades an older store (before the log's replay).
pub(super) fn check(t: &Trees) -> Result<()> {
    match t.meta.get("layout")?.as_deref() {
        Some(&[LAYOUT]) => {}
        // Layouts 2 and 3 read as layout 4: finished records bare JSON, images in sled (2);
        // sources inside their records (2, 3).
        Some(&[2 | 3]) => {
            t.meta.insert("layout", &[LAYOUT])?;
        }
        Some(&[newer]) if newer > LAYOUT => {
            return Err(StoreError::Damaged(format!(
                "the store was written by a newer drover-coordinator (layout {newer}, this one writes {LAYOUT})"
            )));
        }
        _ => {
            upgrade(t)?;
            t.meta.insert("layout", &[LAYOUT])?;
        }
    }
    Ok(())
}

/// Brings a store written by the first layout (every job in `jobs`, no index) to this one,
/// once: unfinished jobs move to `active`, finished ones get their `finished` entry.
fn upgrade(t: &Trees) -> Result<()> {
    let (mut moved, mut indexed) = (0usize, 0usize);
    for entry in t.jobs.iter() {
        let (key, value) = entry?;
        let job: JobRecord = serde_json::from_slice(&value)?;
        if job.state.is_terminal() {
            t.finished
                .insert(finished_key(job.updated_ms, job.id), &[])?;
            indexed += 1;
        } else {
            t.active.insert(&key, value)?;
            t.jobs.remove(&key)?;
            moved += 1;
        }
    }
    if moved + indexed > 0 {
        tracing::info!(
            unfinished = moved,
            finished = indexed,
            layout = LAYOUT,
            "store upgraded"
        );
    }
    Ok(())
}
