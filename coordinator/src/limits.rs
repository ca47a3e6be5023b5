//! Who is calling, and how much they may ask for: client identities from API keys (or the peer
//! address when no keys are configured), per-client submission rates (a token bucket per
//! client) and per-client caps on unfinished jobs (checked by the control plane, which knows
//! them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One configured client API key.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    /// The secret itself (compared in constant time, never logged or stored).
    pub secret: String,
    /// The name jobs, logs and metrics show for this key: `name=` from the keys file, else
    /// `key-` and the first 8 hex digits of the key's SHA-256.
    pub label: String,
    /// Submissions per minute (None: the coordinator's default).
    pub rate_per_min: Option<u32>,
    /// Unfinished jobs at once (None: the coordinator's default).
    pub max_active: Option<u32>,
}

impl ApiKey {
    /// A key without overrides.
    pub fn new(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        let label = format!(
            "key-{}",
            digest[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Self {
            secret: secret.to_string(),
            label,
            rate_per_min: None,
            max_active: None,
        }
    }

    /// Parses a keys-file line: `KEY [name=LABEL] [rate=N] [active=N]` (`#` starts a comment).
    /// `Ok(None)` for blank and comment lines.
    pub fn parse_line(line: &str) -> Result<Option<Self>, String> {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(secret) = words.next() else {
            return Ok(None);
        };
        let mut key = Self::new(secret);
        for word in words {
            let (name, value) = word
                .split_once('=')
                .ok_or_else(|| format!("`{word}`: expected name=LABEL, rate=N or active=N"))?;
            let number = || {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("`{word}`: {value} is not a whole number"))
            };
            match name {
                "name" if !value.is_empty() => key.label = value.to_string(),
                "rate" => key.rate_per_min = Some(number()?),
                "active" => key.max_active = Some(number()?),
                _ => return Err(format!("`{word}`: unknown option {name}")),
            }
        }
        Ok(Some(key))
    }
}

/// The caller of a client request, with the limits that apply to it (0: no limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientId {
    /// Key label, `admin`, or `ip:<address>` when no keys are configured.
    pub label: String,
    /// Submissions per minute.
    pub rate_per_min: u32,
    /// Unfinished jobs at once.
    pub max_active: u32,
    /// The REST request being served (`X-Request-Id`), carried to the job as its trace id.
    pub request_id: String,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// When the bucket will be full again: from then on it is the same as no bucket.
    full_at: Instant,
}

/// Buckets kept at least before a sweep is considered.
const SWEEP_FLOOR: usize = 1024;

/// Token buckets, one per client: a client may submit `rate` jobs per minute on average, in
/// bursts of up to `rate`. A bucket that has refilled is forgotten (a full bucket and no bucket
/// are the same), so memory follows the clients active in the last minute, not every address
/// ever seen.
#[derive(Debug, Default)]
pub struct RateLimiter {
    state: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_client: HashMap<String, Bucket>,
    /// Buckets left after the last sweep: the next sweep runs when there are twice as many.
    after_sweep: usize,
}

impl RateLimiter {
    /// Takes `n` submissions from `client`'s bucket at `now`; when it holds fewer, takes
    /// nothing and answers the seconds until it will hold enough.
    pub fn take(&self, client: &ClientId, n: u32, now: Instant) -> Result<(), u64> {
        if client.rate_per_min == 0 {
            return Ok(());
        }
        let capacity = f64::from(client.rate_per_min);
        let per_sec = capacity / 60.0;
        let want = f64::from(n);
        if want > capacity {
            return Err(60);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.by_client.len() >= SWEEP_FLOOR.max(state.after_sweep * 2) {
            state.by_client.retain(|_, b| b.full_at > now);
            state.after_sweep = state.by_client.len();
        }
        let bucket = state
            .by_client
            .entry(client.label.clone())
            .or_insert(Bucket {
                tokens: capacity,
                last: now,
                full_at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(capacity);
        bucket.last = now;
        let answer = if bucket.tokens >= want {
            bucket.tokens -= want;
            Ok(())
        } else {
            Err(((want - bucket.tokens) / per_sec).ceil().max(1.0) as u64)
        };
        bucket.full_at = now + Duration::from_secs_f64((capacity - bucket.tokens) / per_sec);
        answer
    }

    /// Buckets held now (clients seen within about their refill time).
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_client
            .len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(rate: u32) -> ClientId {
        ClientId {
            label: "key-1".into(),
            rate_per_min: rate,
            max_active: 0,
            request_id: String::new(),
        }
    }

    #[test]
    fn keys_file_lines_carry_their_limits() {
        assert_eq!(ApiKey::parse_line("  # a comment").unwrap(), None);
        assert_eq!(ApiKey::parse_line("").unwrap(), None);
        let plain = ApiKey::parse_line("s3cret").unwrap().unwrap();
        assert_eq!(plain.secret, "s3cret");
        assert!(plain.label.starts_with("key-") && plain.label.len() == 12);
        assert_eq!((plain.rate_per_min, plain.max_active), (None, None));
        let full = ApiKey::parse_line("abc name=studio-a rate=30 active=4 # ok")
            .unwrap()
            .unwrap();
        assert_eq!(
            (full.label.as_str(), full.rate_per_min, full.max_active),
            ("studio-a", Some(30), Some(4))
        );
        assert!(
            ApiKey::parse_line("abc rate=fast")
                .unwrap_err()
                .contains("rate=fast")
        );
        assert!(
            ApiKey::parse_line("abc speed=3")
                .unwrap_err()
                .contains("unknown option")
        );
        assert!(
            ApiKey::parse_line("abc 3")
                .unwrap_err()
                .contains("expected")
        );
    }

    /// Memory stays bounded under a stream of new addresses: buckets that have refilled are
    /// forgotten, and a forgotten client starts with a full bucket as before.
    #[test]
    fn buckets_of_quiet_clients_are_forgotten() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let mut most = 0;
        // 200,000 addresses, 100 new ones a second, each submitting once (rate 60/min: a bucket
        // refills in a second).
        for i in 0..200_000u64 {
            let c = ClientId {
                label: format!("ip:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                ..client(60)
            };
            let now = t0 + Duration::from_millis(i * 10);
            assert_eq!(limiter.take(&c, 1, now), Ok(()));
            most = most.max(limiter.len());
        }
        assert!(most <= 2 * SWEEP_FLOOR, "{most} buckets held at once");
        // A client that was forgotten has its full burst again; one that is not keeps its debt.
        let c = client(60);
        for _ in 0..60 {
            assert_eq!(limiter.take(&c, 1, t0), Ok(()));
        }
        assert_eq!(limiter.take(&c, 1, t0), Err(1));
    }

    #[test]
    fn buckets_refill_at_the_rate_and_say_when_to_retry() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let c = client(60);
        for _ in 0..60 {
            assert_eq!(limiter.take(&c, 1, t0), Ok(()));
        }
        assert_eq!(limiter.take(&c, 1, t0), Err(1));
        // One per second comes back.
        assert_eq!(
            limiter.take(&c, 1, t0 + Duration::from_millis(1000)),
            Ok(())
        );
        assert_eq!(
            limiter.take(&c, 5, t0 + Duration::from_millis(1000)),
            Err(5)
        );
        // More than a minute's worth at once can never pass.
        assert_eq!(
            limiter.take(&c, 61, t0 + Duration::from_secs(3600)),
            Err(60)
        );
        // Unlimited clients and other clients are not affected.
        assert_eq!(limiter.take(&client(0), 1000, t0), Ok(()));
        let other = ClientId {
            label: "key-2".into(),
            ..c
        };
        assert_eq!(limiter.take(&other, 1, t0), Ok(()));
    }
}
