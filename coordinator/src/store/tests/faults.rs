//! What failed writes and a full disk do, with injected failures ([`Faults`]): rounds lost
//! whole, flushes answering for their own jobs, images written again, checkpoints carried,
//! a start whose log sled cannot take.

use super::*;

/// A store whose writes fail as told, in a folder of its own, with a 1 MiB reserve.
fn failing_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    assert!(store.shared.reserve.held(), "the reserve is made at open");
    (dir, store)
}

fn ids_in(store: &Store) -> Vec<JobId> {
    let mut ids: Vec<_> = store
        .unfinished_jobs()
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    ids
}

/// Opens what a crash right now would leave of `dir`; answers its unfinished jobs' ids.
fn after_a_crash(dir: &Path) -> Vec<JobId> {
    let crashed = crash_image(dir);
    let reopened = Store::open(crashed.path(), 0).unwrap();
    ids_in(&reopened)
}

fn sorted(mut ids: Vec<JobId>) -> Vec<JobId> {
    ids.sort();
    ids
}

#[test]
fn a_failed_round_is_lost_whole_with_the_unsynced_rounds_before_it() {
    let (dir, store) = failing_store();
    // The log's generation stays, with whatever a failed write left in it.
    store
        .shared
        .faults
        .hold_checkpoints
        .store(true, Ordering::SeqCst);
    let kept = job();
    store.put_job(&kept).unwrap();
    flush(&store).unwrap();
    // A batch split over two rounds: the first is written (not synced), the second's write
    // fails after all its bytes reached the file.
    let (first, second) = (job(), job());
    store.put_job(&first).unwrap();
    store.barrier();
    *lock(&store.shared.faults.log) = Some(usize::MAX);
    store.shared.faults.disk_full.store(true, Ordering::SeqCst);
    store.put_job(&second).unwrap();
    let err = flush(&store).unwrap_err().to_string();
    assert!(err.contains("the disk is full"), "{err}");
    let health = store.health();
    assert!(!health.writable && health.since_ms.is_some(), "{health:?}");
    assert!(health.error.unwrap().contains("write-ahead log"));
    assert!(
        !store.shared.reserve.held(),
        "the reserve is given back when the disk is full"
    );
    assert_eq!(
        after_a_crash(dir.path()),
        vec![kept.id],
        "nothing of the batch"
    );
    // Degraded: a new job is refused, whatever the log could take.
    let refused = job();
    store.put_job(&refused).unwrap();
    let err = flush(&store).unwrap_err().to_string();
    assert!(err.contains("new jobs are refused"), "{err}");
    // The control plane revokes them: their ends are dropped, not stored.
    for j in [&first, &second, &refused] {
        let mut revoked = j.clone();
        revoked.state = JobState::Failed;
        store.finish_job(&revoked, None).unwrap();
    }
    flush(&store).unwrap();
    for j in [&first, &second, &refused] {
        assert_eq!(store.job(j.id).unwrap(), None, "nothing of a lost job");
    }
    assert_eq!(after_a_crash(dir.path()), vec![kept.id]);
    // Space comes back: the reserve is made again and new jobs are taken.
    store.shared.faults.disk_full.store(false, Ordering::SeqCst);
    wait_until("the store is writable again", || store.health().writable);
    assert!(store.shared.reserve.held());
    // A record as long as the lost ones ends just where the second one began: the rewind's
    // zeros keep it from being read back.
    let later = job();
    store.put_job(&later).unwrap();
    flush(&store).unwrap();
    assert_eq!(after_a_crash(dir.path()), sorted(vec![kept.id, later.id]));
    store.checkpoint_blocking().unwrap();
    assert_eq!(ids_in(&store), sorted(vec![kept.id, later.id]));
    assert_eq!(store.health().failed_writes, 1);
}

#[test]
fn a_write_failing_right_after_a_sync_leaves_nothing_to_replay() {
    let (dir, store) = failing_store();
    store
        .shared
        .faults
        .hold_checkpoints
        .store(true, Ordering::SeqCst);
    // Everything before the failing write is synced: the write starts where the durable part
    // ends, and all its bytes reach the file before it fails (ENOSPC on the last block).
    let kept = job();
    store.put_job(&kept).unwrap();
    flush(&store).unwrap();
    let refused: Vec<JobRecord> = (0..8).map(|_| job()).collect();
    *lock(&store.shared.faults.log) = Some(usize::MAX);
    store.shared.faults.disk_full.store(true, Ordering::SeqCst);
    for j in &refused {
        store.put_job(j).unwrap();
    }
    let err = flush(&store).unwrap_err().to_string();
    assert!(err.contains("the disk is full"), "{err}");
    assert_eq!(
        after_a_crash(dir.path()),
        vec![kept.id],
        "a refused job came back from the log"
    );
}

#[test]
fn a_flush_answers_only_for_the_jobs_before_it() {
    let (_dir, store) = failing_store();
    // A round whose write fails with nothing new before the flush (a lease): the flush holds.
    let j = job();
    store.put_job(&j).unwrap();
    flush(&store).unwrap();
    *lock(&store.shared.faults.log) = Some(3);
    let mut leased = j.clone();
    leased.state = JobState::Leased;
    store.put_job(&leased).unwrap();
    flush(&store).unwrap();
    assert!(!store.health().writable, "but the store is degraded");
    wait_until("the store is writable again", || store.health().writable);
    // A job refused while the store was degraded holds flushes back until it ends.
    store.shared.faults.disk_full.store(true, Ordering::SeqCst);
    *lock(&store.shared.faults.log) = Some(0);
    store.put_job(&leased).unwrap();
    store.barrier();
    let refused = job();
    store.put_job(&refused).unwrap();
    store.shared.faults.disk_full.store(false, Ordering::SeqCst);
    wait_until("the store is writable again", || store.health().writable);
    assert!(
        flush(&store).is_err(),
        "the refused job's flush still fails"
    );
    let mut revoked = refused.clone();
    revoked.state = JobState::Failed;
    store.finish_job(&revoked, None).unwrap();
    let accepted = job();
    store.put_job(&accepted).unwrap();
    flush(&store).unwrap();
    store.checkpoint_blocking().unwrap();
    assert_eq!(ids_in(&store), sorted(vec![j.id, accepted.id]));
}

#[test]
fn a_finish_whose_image_was_not_written_is_logged_again() {
    let (dir, store) = failing_store();
    let mut running = job();
    running.state = JobState::Running;
    store.put_job(&running).unwrap();
    flush(&store).unwrap();
    let mut done = running.clone();
    done.state = JobState::Succeeded;
    store.shared.faults.image.store(true, Ordering::SeqCst);
    store
        .finish_job(&done, Some(b"the image"[..].into()))
        .unwrap();
    store.barrier();
    assert!(!store.health().writable);
    assert_eq!(
        store.image(done.id).unwrap().as_deref(),
        Some(&b"the image"[..]),
        "answered from memory meanwhile"
    );
    // The next round logs it again, after the cut-off half entry.
    store.barrier();
    flush(&store).unwrap();
    let crashed = crash_image(dir.path());
    let reopened = Store::open(crashed.path(), 0).unwrap();
    assert_eq!(reopened.job(done.id).unwrap(), Some(done.clone()));
    assert_eq!(
        reopened.image(done.id).unwrap().as_deref(),
        Some(&b"the image"[..])
    );
    assert!(reopened.unfinished_jobs().unwrap().is_empty());
    store.checkpoint_blocking().unwrap();
    assert_eq!(
        store.image(done.id).unwrap().as_deref(),
        Some(&b"the image"[..])
    );
}

#[test]
fn a_failed_checkpoint_is_tried_again_after_sled_is_reopened() {
    let (dir, store) = failing_store();
    let mut queued = job();
    store.put_job(&queued).unwrap();
    let done = finished(JobState::Succeeded, 5);
    store.finish_job(&done, Some(b"png"[..].into())).unwrap();
    // Fails, gives the reserve back, reopens sled in that space and succeeds.
    store.shared.faults.checkpoints.store(1, Ordering::SeqCst);
    store.checkpoint_blocking().unwrap();
    assert!(!store.health().writable && !store.shared.reserve.held());
    assert_eq!(trees(&store, |t| t.jobs.len()), 1);
    wait_until("the store is writable again", || store.health().writable);
    assert!(store.shared.reserve.held());
    // Fails three times: carried, tried again every second, and merged with what came after.
    store.shared.faults.checkpoints.store(3, Ordering::SeqCst);
    queued.state = JobState::Leased;
    store.put_job(&queued).unwrap();
    let later = finished(JobState::Failed, 6);
    store.finish_job(&later, None).unwrap();
    assert!(store.checkpoint_blocking().is_err());
    assert_eq!(store.job(later.id).unwrap(), Some(later.clone()));
    wait_until("the carried checkpoint is done", || {
        trees(&store, |t| {
            t.jobs.contains_key(later.id.as_bytes()).unwrap()
        })
    });
    wait_until("the store is writable again", || store.health().writable);
    assert_eq!(store.unfinished_jobs().unwrap(), vec![queued.clone()]);
    assert!(lock(&store.shared.pending).is_empty());
    store.checkpoint_blocking().unwrap();
    assert_eq!(
        wal::generations(&store.shared.wal_dir).unwrap().len(),
        1,
        "the carried generations are retired"
    );
    drop(store);
    let reopened = Store::open(dir.path(), 0).unwrap();
    assert_eq!(reopened.job(later.id).unwrap(), Some(later));
    assert_eq!(reopened.unfinished_jobs().unwrap(), vec![queued]);
}

#[test]
fn a_start_whose_log_sled_cannot_take_serves_it_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = job();
    let done = finished(JobState::Succeeded, 5);
    let crashed = {
        let store = Store::open(dir.path(), 1).unwrap();
        running.state = JobState::Leased;
        store.put_job(&running).unwrap();
        store.finish_job(&done, Some(b"png"[..].into())).unwrap();
        flush(&store).unwrap();
        crash_image(dir.path())
    };
    FULL_AT_OPEN.set(true);
    let store = Store::open(crashed.path(), 1).unwrap();
    FULL_AT_OPEN.set(false);
    let health = store.health();
    assert!(!health.writable, "{health:?}");
    assert!(health.error.unwrap().contains("the disk is full"));
    assert!(!store.shared.reserve.held(), "the reserve was given back");
    // Served from memory: sled has none of it.
    assert!(trees(&store, |t| t.active.is_empty() && t.jobs.is_empty()));
    assert_eq!(store.unfinished_jobs().unwrap(), vec![running.clone()]);
    assert_eq!(store.job(done.id).unwrap(), Some(done.clone()));
    assert_eq!(store.image(done.id).unwrap().as_deref(), Some(&b"png"[..]));
    let refused = job();
    store.put_job(&refused).unwrap();
    assert!(flush(&store).is_err(), "new jobs are refused");
    let mut revoked = refused.clone();
    revoked.state = JobState::Failed;
    store.finish_job(&revoked, None).unwrap();
    // The log it replayed is kept until sled has it.
    assert!(wal::generations(&store.shared.wal_dir).unwrap().len() >= 2);
    // Space comes back: the replayed log goes into sled, the store is writable again.
    store.shared.faults.disk_full.store(false, Ordering::SeqCst);
    wait_until("the replayed log is in sled", || {
        store.shared.replayed().is_none()
    });
    wait_until("the store is writable again", || store.health().writable);
    assert!(trees(&store, |t| t
        .jobs
        .contains_key(done.id.as_bytes())
        .unwrap()));
    assert_eq!(store.unfinished_jobs().unwrap(), vec![running.clone()]);
    let mut ran = running.clone();
    ran.state = JobState::Succeeded;
    store.finish_job(&ran, None).unwrap();
    drop(store);
    let reopened = Store::open(crashed.path(), 0).unwrap();
    assert!(reopened.unfinished_jobs().unwrap().is_empty());
    assert_eq!(reopened.job(ran.id).unwrap(), Some(ran));
    assert_eq!(reopened.job(done.id).unwrap(), Some(done));
    assert_eq!(reopened.job(refused.id).unwrap(), None);
}

#[test]
fn a_group_of_new_jobs_is_taken_or_refused_whole() {
    let (dir, store) = failing_store();
    store
        .shared
        .faults
        .hold_checkpoints
        .store(true, Ordering::SeqCst);
    // The store degrades between two jobs of one submission: the decision taken at its first
    // job holds for all of it.
    let (a1, a2) = (job(), job());
    store.put_job(&a1).unwrap();
    store.barrier();
    store.shared.faults.disk_full.store(true, Ordering::SeqCst);
    store
        .shared
        .health
        .fail("the disk is full (injected)".into());
    store.put_job(&a2).unwrap();
    flush(&store).unwrap();
    assert_eq!(after_a_crash(dir.path()), sorted(vec![a1.id, a2.id]));
    // A submission refused while degraded holds back the flush of the next one, which was
    // logged once the store could write again: that one is taken back too, though its
    // records reached the file.
    let x = job();
    store.put_job(&x).unwrap();
    assert!(flush(&store).is_err());
    store.shared.faults.disk_full.store(false, Ordering::SeqCst);
    wait_until("the store is writable again", || store.health().writable);
    let b = job();
    store.put_job(&b).unwrap();
    store.barrier();
    let err = flush(&store).unwrap_err().to_string();
    assert!(err.contains("new jobs are refused"), "{err}");
    assert_eq!(after_a_crash(dir.path()), sorted(vec![a1.id, a2.id]));
    for j in [&x, &b] {
        let mut revoked = j.clone();
        revoked.state = JobState::Failed;
        store.finish_job(&revoked, None).unwrap();
    }
    let c = job();
    store.put_job(&c).unwrap();
    flush(&store).unwrap();
    assert_eq!(after_a_crash(dir.path()), sorted(vec![a1.id, a2.id, c.id]));
    for j in [&x, &b] {
        assert_eq!(store.job(j.id).unwrap(), None);
    }
}
