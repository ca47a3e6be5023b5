//! The store's tests: the round trip through the log, checkpoints and replay, retention,
//! layouts, and what failed writes and a full disk do (with injected failures: [`Faults`]).

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use drover_shared::ids::JobId;
use drover_shared::job::JobRequest;

use super::*;
use crate::records::JobState;

pub(super) mod crash;
mod faults;

/// Failures to inject into a store's writes.
#[derive(Default)]
pub(super) struct Faults {
    /// The next log write stops with "no space" after this many bytes.
    log: Mutex<Option<usize>>,
    /// The next image write stops half-way with "no space".
    pub image: AtomicBool,
    /// Checkpoints to fail with "no space" from sled.
    checkpoints: AtomicU32,
    /// While set, the disk stays full for the recovery check.
    pub disk_full: AtomicBool,
    /// While set, the writer checkpoints only when asked to.
    pub hold_checkpoints: AtomicBool,
}

thread_local! {
    /// Whether the stores this thread opens find the disk full: the log they replay cannot go
    /// into sled, and the disk stays full ([`Faults::disk_full`]).
    static FULL_AT_OPEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// See [`FULL_AT_OPEN`].
pub(super) fn full_at_open() -> bool {
    FULL_AT_OPEN.get()
}

impl Faults {
    /// The faults of a store opened now.
    pub fn opened() -> Self {
        Self {
            disk_full: AtomicBool::new(full_at_open()),
            ..Self::default()
        }
    }

    /// Whether `flag` was set (it is cleared).
    pub fn take(&self, flag: &AtomicBool) -> bool {
        flag.swap(false, Ordering::SeqCst)
    }

    /// The injected log failure, if any (it is cleared).
    pub fn take_log(&self) -> Option<usize> {
        lock(&self.log).take()
    }

    /// Fails when a checkpoint failure is injected.
    pub fn checkpoint(&self) -> Result<()> {
        let injected = self
            .checkpoints
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            return Err(StoreError::Db(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ))));
        }
        Ok(())
    }
}

/// Runs `f` on the store's sled trees.
fn trees<T>(store: &Store, f: impl FnOnce(&Trees) -> T) -> T {
    store.shared.with_trees(|t| Ok(f(t))).unwrap()
}

/// Waits (failing after 10 s) until `check` holds.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn flush(store: &Store) -> Result<()> {
    actix_rt::System::new().block_on(store.flush())
}

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
        let store = Store::open(dir.path(), 0).unwrap();
        store.put_job(&queued).unwrap();
        queued.state = JobState::Leased;
        store.put_job(&queued).unwrap();
        store.finish_job(&done, Some(b"png"[..].into())).unwrap();
        // Answered from memory before it is in sled.
        assert_eq!(store.image(done.id).unwrap().as_deref(), Some(&b"png"[..]));
        assert_eq!(store.job(done.id).unwrap(), Some(done.clone()));
        actix_rt::System::new().block_on(store.flush()).unwrap();
        // The log holds it all, sled nothing yet.
        assert!(trees(&store, |t| t.active.is_empty() && t.jobs.is_empty()));
        crash_image(dir.path())
    };
    let store = Store::open(crashed.path(), 0).unwrap();
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
    let stored = trees(&store, |t| t.jobs.get(done.id.as_bytes()).unwrap().unwrap());
    let (record, at) = codec::decode_finished(&stored).unwrap();
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
    assert!(!trees(&store, |t| t
        .active
        .contains_key(gone.id.as_bytes())
        .unwrap()));
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
        let store = Store::open(dir.path(), 0).unwrap();
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
    let store = Store::open(crashed.path(), 0).unwrap();
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
        trees(&store, |t| t.finished.is_empty()),
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
    assert!(trees(&store, |t| t.jobs.is_empty()));
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
        let store = Store::open(dir.path(), 0).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap(), vec![waiting.clone()]);
        assert_eq!(store.job(waiting.id).unwrap(), Some(waiting.clone()));
        assert_eq!(store.job(old.id).unwrap(), Some(old.clone()));
        assert_eq!(
            store.image(old.id).unwrap().as_deref(),
            Some(&b"old png"[..])
        );
    }
    let store = Store::open(dir.path(), 0).unwrap();
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
            .insert("layout", &[migrate::LAYOUT + 1])
            .unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(dir.path(), 0)
        .err()
        .expect("refused")
        .to_string();
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
    trees(&store, |t| {
        t.active
            .insert(j.id.as_bytes(), serde_json::to_vec(&stale).unwrap())
            .unwrap()
    });
    assert!(store.unfinished_jobs().unwrap().is_empty());
    assert!(!trees(&store, |t| t
        .active
        .contains_key(j.id.as_bytes())
        .unwrap()));
    assert_eq!(store.prune_finished_now(8, 10).unwrap(), 1);
}

/// A job that starts from a source image of `bytes` bytes, with a mask.
fn job_with_source(bytes: usize) -> JobRecord {
    let mut j = job();
    let image: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    j.spec.source = Some(Box::new(drover_shared::job::SourceSpec {
        image: image.into(),
        mask: Some(b"mask bytes"[..].into()),
        strength: 0.6,
        resize_mode: Default::default(),
        width: 64,
        height: 64,
        image_bytes: bytes as u64,
        mask_bytes: 10,
        mask_blur: 0,
    }));
    j
}

/// The records of the log generation being written.
fn logged(store: &Store) -> Vec<(wal::Kind, Vec<u8>)> {
    let generations = wal::generations(&store.shared.wal_dir).unwrap();
    let last = *generations.last().expect("a generation");
    wal::read(&store.shared.wal_dir, last).unwrap()
}

#[test]
fn a_source_image_is_logged_once_and_kept_apart_from_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = job_with_source(200_000);
    let crashed = {
        let store = Store::open(dir.path(), 0).unwrap();
        store
            .shared
            .faults
            .hold_checkpoints
            .store(true, Ordering::SeqCst);
        // Accepted, leased, re-queued, leased again: four records, one source.
        for state in [
            JobState::Queued,
            JobState::Leased,
            JobState::Queued,
            JobState::Leased,
        ] {
            j.state = state;
            store.put_job(&j).unwrap();
        }
        flush(&store).unwrap();
        let records = logged(&store);
        let sources: Vec<_> = records
            .iter()
            .filter(|(k, _)| *k == wal::Kind::Source)
            .collect();
        assert_eq!(sources.len(), 1);
        let jobs: Vec<_> = records
            .iter()
            .filter(|(k, _)| *k == wal::Kind::Job)
            .collect();
        assert_eq!(jobs.len(), 4);
        assert!(
            jobs.iter().all(|(_, body)| body.len() < 4_000),
            "records carry the source: {:?}",
            jobs.iter().map(|(_, b)| b.len()).collect::<Vec<_>>()
        );
        crash_image(dir.path())
    };
    // A crash before any checkpoint: the log gives the job back whole.
    {
        let store = Store::open(crashed.path(), 0).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap(), vec![j.clone()]);
        // In sled now (the replay was applied): the source apart, the record without it.
        let (active, source) = trees(&store, |t| {
            (
                t.active.get(j.id.as_bytes()).unwrap().unwrap(),
                t.sources.get(j.id.as_bytes()).unwrap(),
            )
        });
        assert!(active.len() < 4_000);
        assert!(source.is_some_and(|s| s.len() > 200_000));
        // Leased again after the restart: the record alone is logged.
        store.put_job(&j).unwrap();
        flush(&store).unwrap();
        assert!(logged(&store).iter().all(|(k, _)| *k != wal::Kind::Source));
        // Its end takes the source away, and the finished record has none of its bytes.
        let mut done = j.clone();
        done.state = JobState::Succeeded;
        done.spec.source = done.spec.source.map(|s| Box::new(s.stripped()));
        store.finish_job(&done, None).unwrap();
        store.checkpoint_blocking().unwrap();
        assert!(trees(&store, |t| t.sources.is_empty()));
        assert!(store.unfinished_jobs().unwrap().is_empty());
    }
}

#[test]
fn sources_of_no_unfinished_job_go_and_inline_sources_still_read() {
    let store = Store::temporary().unwrap();
    // A layout-3 record, its source inside it; and a source whose job is gone.
    let inline = job_with_source(1_000);
    trees(&store, |t| {
        t.active
            .insert(inline.id.as_bytes(), serde_json::to_vec(&inline).unwrap())
            .unwrap();
        t.sources
            .insert(JobId::random().as_bytes(), codec::encode_source(b"x", None))
            .unwrap();
    });
    assert_eq!(store.unfinished_jobs().unwrap(), vec![inline.clone()]);
    assert!(trees(&store, |t| t.sources.is_empty()));
    // Its next change logs the source apart, once.
    store.put_job(&inline).unwrap();
    store.put_job(&inline).unwrap();
    store.checkpoint_blocking().unwrap();
    assert_eq!(trees(&store, |t| t.sources.len()), 1);
    assert_eq!(store.unfinished_jobs().unwrap(), vec![inline]);
}

#[test]
fn only_what_a_sync_made_durable_survives_a_crash_that_loses_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 0).unwrap();
    store
        .shared
        .faults
        .hold_checkpoints
        .store(true, Ordering::SeqCst);
    let flushed: Vec<JobRecord> = (0..3).map(|_| job()).collect();
    for j in &flushed {
        store.put_job(j).unwrap();
    }
    flush(&store).unwrap();
    // Written to the log file (page cache), never synced.
    let written: Vec<JobRecord> = (0..2).map(|_| job()).collect();
    for j in &written {
        store.put_job(j).unwrap();
    }
    store.barrier();
    let kept = crash_image(dir.path());
    let lost = crash::lossy_image(dir.path(), false);
    let torn = crash::lossy_image(dir.path(), true);
    let ids = |image: &tempfile::TempDir| {
        let reopened = Store::open(image.path(), 0).unwrap();
        let mut ids: Vec<JobId> = reopened
            .unfinished_jobs()
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        ids.sort();
        ids
    };
    let sorted = |jobs: &[&JobRecord]| {
        let mut ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        ids.sort();
        ids
    };
    // A kill -9 keeps the page cache: everything written comes back.
    assert_eq!(
        ids(&kept),
        sorted(&flushed.iter().chain(&written).collect::<Vec<_>>())
    );
    // Losing it loses exactly what was not synced. A torn write may leave whole records of
    // its first half (never acknowledged, so allowed either way) but never a broken one, and
    // never less than what was synced.
    let durable = sorted(&flushed.iter().collect::<Vec<_>>());
    assert_eq!(ids(&lost), durable);
    let after_tear = ids(&torn);
    assert!(durable.iter().all(|id| after_tear.contains(id)));
    assert!(
        after_tear
            .iter()
            .all(|id| durable.contains(id) || written.iter().any(|j| j.id == *id))
    );
    assert!(
        after_tear.len() < flushed.len() + written.len(),
        "the tear lost nothing"
    );
}

#[test]
fn a_half_written_or_corrupt_sled_snapshot_does_not_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let trees = Trees::open(dir.path()).unwrap();
        trees.jobs.insert(b"kept", b"value").unwrap();
        trees.db.flush().unwrap();
    }
    // What a kill or a full disk leaves behind while sled writes a snapshot; sled alone then
    // refuses to open ("Read corrupted data").
    std::fs::write(dir.path().join("snap.7FFFFFFFFFFFFFFF.generating"), b"torn").unwrap();
    {
        let trees = Trees::open(dir.path()).unwrap();
        assert_eq!(
            trees.jobs.get(b"kept").unwrap().as_deref(),
            Some(&b"value"[..])
        );
    }
    assert!(!dir.path().join("snap.7FFFFFFFFFFFFFFF.generating").exists());
    // A finished snapshot that is corrupt is set aside and the log opens.
    std::fs::write(
        dir.path().join("snap.7FFFFFFFFFFFFFFF"),
        b"not a snapshot at all",
    )
    .unwrap();
    let trees = Trees::open(dir.path()).unwrap();
    assert_eq!(
        trees.jobs.get(b"kept").unwrap().as_deref(),
        Some(&b"value"[..])
    );
    assert!(
        dir.path()
            .join("snapshots-set-aside/snap.7FFFFFFFFFFFFFFF")
            .exists()
    );
}
