//! Whether the store can write ([`Health`], answered by `Store::health`), and the reserve that
//! lets it go on when the disk fills up ([`Reserve`], the ballast file). The policy is in the
//! store's module docs.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The store's health, as `/healthz` and `/metrics` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// Whether the store takes writes (new jobs) now.
    pub writable: bool,
    /// Why not: the last failure.
    pub error: Option<String>,
    /// Since when not (Unix time, ms).
    pub since_ms: Option<u64>,
    /// Writes that failed since the start (rounds of the log, checkpoints, retries).
    pub failed_writes: u64,
}

/// A failure that made the store degraded.
struct Failure {
    reason: String,
    since_ms: u64,
}

#[derive(Default)]
struct State {
    failure: Option<Failure>,
    /// Counts failures: a recovery check that began before the last failure does not count.
    epoch: u64,
}

/// Whether the store can write, shared by the writer and the checkpoint thread.
#[derive(Default)]
pub(super) struct Health {
    state: Mutex<State>,
    failed_writes: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A write failed: the store is degraded (or stays so, with this reason).
    pub fn fail(&self, reason: String) {
        self.failed_writes.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        state.epoch += 1;
        match &mut state.failure {
            Some(failure) => failure.reason = reason,
            None => {
                tracing::warn!(reason = %reason, "store degraded: new jobs are refused");
                state.failure = Some(Failure {
                    reason,
                    since_ms: now_ms(),
                });
            }
        }
    }

    /// `Err(why)` while the store is degraded.
    pub fn refusal(&self) -> Result<(), String> {
        match &self.state().failure {
            Some(failure) => Err(failure.reason.clone()),
            None => Ok(()),
        }
    }

    /// Where a recovery check starts from (see [`Health::recover`]).
    pub fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// The store can write again, unless a write failed since `epoch`; answers whether it was
    /// degraded.
    pub fn recover(&self, epoch: u64) -> bool {
        let mut state = self.state();
        if state.epoch != epoch {
            return false;
        }
        match state.failure.take() {
            Some(failure) => {
                tracing::info!(
                    degraded_ms = now_ms().saturating_sub(failure.since_ms),
                    "store writable again"
                );
                true
            }
            None => false,
        }
    }

    /// The health now.
    pub fn snapshot(&self) -> StoreHealth {
        let state = self.state();
        StoreHealth {
            writable: state.failure.is_none(),
            error: state.failure.as_ref().map(|f| f.reason.clone()),
            since_ms: state.failure.as_ref().map(|f| f.since_ms),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
        }
    }
}

/// The ballast: files of real blocks in the data folder whose space is given back when the disk
/// is full. Half of it, `reserve.ballast`, goes as soon as a write fails for lack of space, so
/// that checkpoints and results can go on; the other half, `reserve-start.ballast`, only when
/// the store cannot open for lack of space (that space is gone too, by then, if the process was
/// killed on a full disk). Both are made again once there is room.
#[derive(Clone, Debug)]
pub(super) struct Reserve {
    running: PathBuf,
    start: PathBuf,
    /// Size of each half.
    bytes: u64,
}

/// Zeros written at a time.
const CHUNK: usize = 1024 * 1024;

/// Where [`write_zeros`] writes `path` before it is whole.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Writes `bytes` zeros to a new file `path` (through a temporary name, so a crash never leaves
/// a short one under `path`) and syncs it; the partial file is deleted when that fails.
fn write_zeros(path: &Path, bytes: u64) -> std::io::Result<()> {
    let partial = partial(path);
    let written = (|| {
        let file = File::create(&partial)?;
        let zeros = vec![0u8; CHUNK];
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        std::fs::rename(&partial, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Makes sure `path` holds `bytes` zeros (none when `bytes` is 0).
fn keep_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    // What a crash while making it left.
    let _ = std::fs::remove_file(partial(path));
    match std::fs::metadata(path) {
        Ok(m) if m.len() == bytes && bytes > 0 => return Ok(()),
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if bytes == 0 {
        return Ok(());
    }
    write_zeros(path, bytes)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Reserve {
    /// A reserve of `bytes` in all in `dir` (0: none).
    pub fn new(dir: &Path, bytes: u64) -> Self {
        Self {
            running: dir.join("reserve.ballast"),
            start: dir.join("reserve-start.ballast"),
            bytes: bytes / 2,
        }
    }

    /// Whether the half given back while running is there.
    #[cfg(test)]
    pub fn held(&self) -> bool {
        self.running.exists()
    }

    /// Makes sure both halves are there at their size (none when the size is 0).
    pub fn keep(&self) -> std::io::Result<()> {
        let kept = self.running.exists() && self.start.exists();
        keep_file(&self.running, self.bytes)?;
        keep_file(&self.start, self.bytes)?;
        if !kept && self.bytes > 0 {
            tracing::info!(
                reserve_mb = 2 * self.bytes / (1024 * 1024),
                "store reserve kept"
            );
        }
        Ok(())
    }

    /// Gives back the half kept for a running store (after a write failed for lack of space);
    /// answers whether it was there.
    pub fn release(&self) -> bool {
        match std::fs::remove_file(&self.running) {
            Ok(()) => {
                tracing::warn!(
                    reserve_mb = self.bytes / (1024 * 1024),
                    "store reserve given back to go on writing"
                );
                true
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(error = %e, "cannot give the store's reserve back");
                }
                false
            }
        }
    }

    /// Gives back both halves (the store cannot open for lack of space); answers whether
    /// anything was there.
    pub fn release_all(&self) -> bool {
        let running = std::fs::remove_file(&self.running).is_ok();
        let start = std::fs::remove_file(&self.start).is_ok();
        if running || start {
            tracing::warn!("store reserve given back to start");
        }
        running || start
    }

    /// Whether `bytes` can be written and synced in the data folder now (a probe file, deleted).
    pub fn room(&self, bytes: u64) -> std::io::Result<()> {
        let probe = self.running.with_extension("probe");
        let result = write_zeros(&probe, bytes);
        let _ = std::fs::remove_file(&probe);
        result
    }

    /// Whether the store can write again: the ballast is made again and as much space again
    /// (1 MiB at least) can be written and synced (a probe file, deleted). When not, the
    /// ballast is left as it was found.
    pub fn probe(&self) -> std::io::Result<()> {
        let had = (self.running.exists(), self.start.exists());
        let result = self
            .keep()
            .and_then(|()| self.room((2 * self.bytes).max(CHUNK as u64)));
        if result.is_err() {
            if !had.0 {
                let _ = std::fs::remove_file(&self.running);
            }
            if !had.1 {
                let _ = std::fs::remove_file(&self.start);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_given_back_and_probed() {
        let dir = tempfile::tempdir().unwrap();
        let names = || {
            let mut names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let reserve = Reserve::new(dir.path(), 6 * 1024 * 1024 + 2);
        reserve.keep().unwrap();
        assert_eq!(names(), ["reserve-start.ballast", "reserve.ballast"]);
        for path in [&reserve.running, &reserve.start] {
            assert_eq!(std::fs::metadata(path).unwrap().len(), 3 * 1024 * 1024 + 1);
        }
        reserve.keep().unwrap();
        assert!(reserve.release() && !reserve.held());
        assert!(!reserve.release(), "given back once");
        assert_eq!(names(), ["reserve-start.ballast"], "the start's half stays");
        reserve.probe().unwrap();
        assert!(
            reserve.held(),
            "a probe that succeeds makes the ballast again"
        );
        assert_eq!(
            names(),
            ["reserve-start.ballast", "reserve.ballast"],
            "no probe or partial file left"
        );
        assert!(reserve.release_all() && !reserve.release_all());
        assert!(names().is_empty());
        // A size of 0 keeps none.
        reserve.keep().unwrap();
        Reserve::new(dir.path(), 0).keep().unwrap();
        assert!(names().is_empty());
    }

    #[test]
    fn health_recovers_only_when_nothing_failed_since_the_check_began() {
        let health = Health::default();
        assert!(health.snapshot().writable);
        health.fail("the disk is full".into());
        let first = health.snapshot();
        assert!(!first.writable && first.since_ms.is_some());
        assert_eq!(health.refusal(), Err("the disk is full".into()));
        let epoch = health.epoch();
        health.fail("still full".into());
        let second = health.snapshot();
        assert_eq!(
            second.since_ms, first.since_ms,
            "degraded since the first failure"
        );
        assert_eq!(second.error.as_deref(), Some("still full"));
        assert!(
            !health.recover(epoch),
            "a failure came after the check began"
        );
        assert!(health.recover(health.epoch()));
        let healthy = health.snapshot();
        assert!(healthy.writable && healthy.error.is_none() && healthy.since_ms.is_none());
        assert_eq!(healthy.failed_writes, 2);
    }
}
