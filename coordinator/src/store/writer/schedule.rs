//! When the writer checkpoints: every `CHECKPOINT_EVERY`, when the log generation is large, or
//! when asked; and how a checkpoint is handed to the `drover-checkpoint` thread.

use std::time::Instant;

use super::super::checkpoint::{Dirty, Task};
use super::super::{CHECKPOINT_EVERY, wal};
use super::{Waiter, Writer};

/// A log generation this large is checkpointed without waiting for the interval.
const CHECKPOINT_BYTES: u64 = wal::FILE_BYTES;

/// When the writer checkpoints.
pub(super) struct Schedule {
    /// Whether a checkpoint is in the checkpoint thread's hands.
    pub(super) busy: bool,
    /// When the last one was handed over (or found nothing to do).
    pub(super) last: Instant,
    /// Waiters of `Store::checkpoint_blocking`.
    pub(super) forced: Vec<Waiter>,
}

impl Schedule {
    /// Whether a checkpoint is due: every [`CHECKPOINT_EVERY`], when the generation is large,
    /// or when asked.
    pub(super) fn due(&self, w: &Writer<'_>) -> bool {
        let timed = Instant::now() >= self.last + CHECKPOINT_EVERY;
        #[cfg(test)]
        let timed = timed
            && !w
                .s
                .faults
                .hold_checkpoints
                .load(std::sync::atomic::Ordering::SeqCst);
        !self.busy && (timed || w.log.len() >= CHECKPOINT_BYTES || !self.forced.is_empty())
    }

    /// Closes the log generation and hands what changed to the checkpoint thread.
    pub(super) fn checkpoint(
        &mut self,
        w: &mut Writer<'_>,
        tasks: &crossbeam_channel::Sender<Task>,
    ) {
        self.last = Instant::now();
        if w.changes.is_empty() && self.forced.is_empty() {
            return;
        }
        let log_bytes = w.log.len();
        let Some(closed) = w.close_generation() else {
            return;
        };
        w.in_active.extend(
            w.changes
                .jobs
                .iter()
                .filter_map(|(id, d)| matches!(d, Dirty::Unfinished(_)).then_some(*id)),
        );
        let task = Task::Checkpoint {
            generation: Some(closed),
            log_bytes,
            changes: std::mem::take(&mut w.changes),
            segments: w.images.take_touched(),
            waiters: std::mem::take(&mut self.forced),
        };
        self.busy = tasks.send(task).is_ok();
        if !self.busy {
            tracing::error!(
                "the store's checkpoint thread is gone; changes stay in the write-ahead log until the next start replays it"
            );
        }
    }
}
