//! Idempotency keys: a client that sends `Idempotency-Key` with a submission and retries it
//! (its answer was lost: a timeout, a reset connection, a coordinator restart) gets the jobs
//! of the first submission back instead of new ones. Keys are per client, kept
//! [`KEY_TTL_MS`] after their submission, carried on the jobs' records (so a restart rebuilds
//! them from the store) and bound to the request's fingerprint: the same key with another body
//! is refused. Pure bookkeeping; the control plane holds one [`Keys`].

use std::collections::HashMap;

use drover_shared::ids::JobId;
use sha2::{Digest, Sha256};

use crate::records::{Idempotency, JobRecord};

/// How long a key is remembered after its submission.
pub const KEY_TTL_MS: u64 = 24 * 3600 * 1000;

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Checks a key as sent: 1..=255 visible ASCII characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "must be 1..={MAX_KEY_LEN} characters, not {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err("must be visible ASCII characters".into());
    }
    Ok(())
}

/// A request's fingerprint: what it asked for (the route and its body), hashed.
pub fn fingerprint(route: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(route.as_bytes());
    hash.update([0]);
    hash.update(body);
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a key is known for.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    fingerprint: String,
    /// The submission's jobs, in the order it gave them.
    ids: Vec<JobId>,
    created_ms: u64,
}

/// What a submission with a key gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The key is new: submit.
    New,
    /// The same request was accepted before: these are its jobs.
    Replay(Vec<JobId>),
    /// The key was used for another request.
    Conflict,
}

/// The keys of recent submissions, by client and key.
#[derive(Debug, Default)]
pub struct Keys {
    entries: HashMap<(String, String), Entry>,
    by_job: HashMap<JobId, (String, String)>,
}

impl Keys {
    /// Rebuilt from jobs' records (the unfinished ones and those finished recently).
    pub fn restore<'a>(jobs: impl IntoIterator<Item = &'a JobRecord>) -> Self {
        let mut keys = Self::default();
        let mut found: Vec<(u32, &JobRecord, &Idempotency)> = jobs
            .into_iter()
            .filter_map(|j| j.idempotency.as_ref().map(|i| (i.index, j, i)))
            .collect();
        found.sort_by_key(|(index, j, _)| (*index, j.id));
        for (_, job, idem) in found {
            let client = job.client.clone().unwrap_or_default();
            let entry = keys
                .entries
                .entry((client.clone(), idem.key.clone()))
                .or_insert_with(|| Entry {
                    fingerprint: idem.fingerprint.clone(),
                    ids: Vec::new(),
                    created_ms: job.created_ms,
                });
            entry.ids.push(job.id);
            keys.by_job.insert(job.id, (client, idem.key.clone()));
        }
        keys
    }

    /// What `client`'s submission with `key` and `fingerprint` gets.
    pub fn lookup(&self, client: &str, key: &str, fingerprint: &str) -> Lookup {
        match self.entries.get(&(client.to_string(), key.to_string())) {
            None => Lookup::New,
            Some(e) if e.fingerprint == fingerprint => Lookup::Replay(e.ids.clone()),
            Some(_) => Lookup::Conflict,
        }
    }

    /// Remembers an accepted submission's jobs under its key.
    pub fn insert(
        &mut self,
        client: &str,
        key: &str,
        fingerprint: &str,
        ids: &[JobId],
        now_ms: u64,
    ) {
        let at = (client.to_string(), key.to_string());
        for id in ids {
            self.by_job.insert(*id, at.clone());
        }
        self.entries.insert(
            at,
            Entry {
                fingerprint: fingerprint.to_string(),
                ids: ids.to_vec(),
                created_ms: now_ms,
            },
        );
    }

    /// Forgets the keys of jobs whose acceptance was taken back: a retry submits them anew.
    pub fn revoke(&mut self, ids: &[JobId]) {
        for id in ids {
            if let Some(at) = self.by_job.remove(id) {
                self.entries.remove(&at);
            }
        }
    }

    /// Forgets keys older than [`KEY_TTL_MS`].
    pub fn prune(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(KEY_TTL_MS);
        let by_job = &mut self.by_job;
        self.entries.retain(|_, e| {
            let keep = e.created_ms >= cutoff;
            if !keep {
                for id in &e.ids {
                    by_job.remove(id);
                }
            }
            keep
        });
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::job::JobRequest;

    fn keyed(client: &str, key: &str, fp: &str, index: u32, created_ms: u64) -> JobRecord {
        let spec = JobRequest {
            prompt: "x".into(),
            ..Default::default()
        }
        .validate(|| 1)
        .unwrap();
        let mut job = JobRecord::new(JobId::random(), spec);
        job.client = Some(client.into());
        job.created_ms = created_ms;
        job.idempotency = Some(Idempotency {
            key: key.into(),
            fingerprint: fp.into(),
            index,
        });
        job
    }

    #[test]
    fn a_key_replays_its_jobs_per_client_and_refuses_another_body() {
        let mut keys = Keys::default();
        let (a, b) = (JobId::random(), JobId::random());
        assert_eq!(keys.lookup("alice", "k1", "f"), Lookup::New);
        keys.insert("alice", "k1", "f", &[a, b], 10);
        assert_eq!(keys.lookup("alice", "k1", "f"), Lookup::Replay(vec![a, b]));
        assert_eq!(keys.lookup("alice", "k1", "g"), Lookup::Conflict);
        // Another client's key of the same name is its own.
        assert_eq!(keys.lookup("bob", "k1", "f"), Lookup::New);
        // A revoked submission's key is free again.
        keys.revoke(&[b]);
        assert_eq!(keys.lookup("alice", "k1", "f"), Lookup::New);
        assert!(keys.is_empty());
    }

    #[test]
    fn keys_expire_and_come_back_from_records_in_their_order() {
        let mut keys = Keys::default();
        keys.insert("c", "old", "f", &[JobId::random()], 0);
        keys.insert("c", "new", "f", &[JobId::random()], KEY_TTL_MS + 5);
        keys.prune(KEY_TTL_MS + 10);
        assert_eq!(keys.lookup("c", "old", "f"), Lookup::New);
        assert!(matches!(keys.lookup("c", "new", "f"), Lookup::Replay(_)));
        assert_eq!(keys.len(), 1);

        let jobs = [
            keyed("c", "batch", "fp", 1, 7),
            keyed("c", "batch", "fp", 0, 7),
            keyed("d", "batch", "other", 0, 7),
        ];
        let keys = Keys::restore(&jobs);
        assert_eq!(
            keys.lookup("c", "batch", "fp"),
            Lookup::Replay(vec![jobs[1].id, jobs[0].id])
        );
        assert_eq!(keys.lookup("d", "batch", "fp"), Lookup::Conflict);
    }

    #[test]
    fn a_key_is_kept_for_a_day_to_the_millisecond() {
        const HOUR: u64 = 3600 * 1000;
        let mut keys = Keys::default();
        assert_eq!(keys.len(), 0);
        keys.insert("c", "a", "f", &[JobId::random()], HOUR);
        let kept = JobId::random();
        keys.insert("c", "b", "f", &[kept], 2 * HOUR);
        assert_eq!(keys.len(), 2);
        assert!(!keys.is_empty());
        // 24 hours after its submission a key still replays; a millisecond later it is gone.
        keys.prune(25 * HOUR);
        assert_eq!(keys.len(), 2);
        keys.prune(25 * HOUR + 1);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.lookup("c", "a", "f"), Lookup::New);
        assert!(matches!(keys.lookup("c", "b", "f"), Lookup::Replay(_)));
        // The key that stayed still frees when its submission is revoked.
        keys.revoke(&[kept]);
        assert_eq!(keys.lookup("c", "b", "f"), Lookup::New);
    }

    #[test]
    fn keys_and_fingerprints_are_checked() {
        assert!(check_key("order-42").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(check_key(&"k".repeat(256)).is_err());
        assert!(check_key("spaces are fine").is_ok());
        assert!(check_key("tab\there").is_err());
        assert_eq!(
            fingerprint("/v1/jobs", b"{}"),
            fingerprint("/v1/jobs", b"{}")
        );
        assert_ne!(
            fingerprint("/v1/jobs", b"{}"),
            fingerprint("/v1/jobs/batch", b"{}")
        );
        assert_ne!(
            fingerprint("/v1/jobs", b"{}"),
            fingerprint("/v1/jobs", b"{ }")
        );
    }
}
