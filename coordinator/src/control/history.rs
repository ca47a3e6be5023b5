//! The last hour of the farm, sampled at a fixed period for the dashboard's charts: images
//! finished per period, queue depth, busy workers and each node's measured speed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken (ms since epoch).
    pub at_ms: u64,
    /// Jobs that succeeded since the previous sample.
    pub succeeded: u64,
    /// Jobs that failed or expired since the previous sample.
    pub failed: u64,
    /// Jobs waiting for a node.
    pub queued: usize,
    /// Jobs leased or running.
    pub running: usize,
    /// Each node's speed (pixel-steps per second), by node name.
    pub speeds: Vec<(String, f64)>,
}

/// A ring of samples covering `span`.
#[derive(Debug)]
pub struct History {
    period: Duration,
    keep: usize,
    samples: VecDeque<Sample>,
    last: Option<Instant>,
    succeeded: u64,
    failed: u64,
}

impl History {
    /// Samples every `period`, keeping those of the last `span`.
    pub fn new(period: Duration, span: Duration) -> Self {
        let period = period.max(Duration::from_millis(10));
        let keep = (span.as_millis() / period.as_millis()).max(2) as usize;
        Self {
            period,
            keep,
            samples: VecDeque::with_capacity(keep),
            last: None,
            succeeded: 0,
            failed: 0,
        }
    }

    /// Counts a job that ended.
    pub fn finished(&mut self, succeeded: bool) {
        if succeeded {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Whether a sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.period)
    }

    /// Takes a sample (the counts since the previous one, and the given levels).
    pub fn sample(
        &mut self,
        now: Instant,
        at_ms: u64,
        queued: usize,
        running: usize,
        speeds: Vec<(String, f64)>,
    ) {
        if self.samples.len() == self.keep {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            at_ms,
            succeeded: std::mem::take(&mut self.succeeded),
            failed: std::mem::take(&mut self.failed),
            queued,
            running,
            speeds,
        });
        self.last = Some(now);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }

    /// The sampling period.
    pub fn period(&self) -> Duration {
        self.period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_count_what_ended_between_them_and_keep_one_span() {
        let mut h = History::new(Duration::from_secs(10), Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(h.due(t0));
        h.finished(true);
        h.finished(true);
        h.finished(false);
        h.sample(t0, 0, 5, 2, vec![("a".into(), 100.0)]);
        assert!(!h.due(t0 + Duration::from_secs(9)));
        assert!(h.due(t0 + Duration::from_secs(10)));
        for i in 1..=4 {
            h.sample(t0 + Duration::from_secs(10 * i), 10_000 * i, 0, 0, vec![]);
        }
        let s = h.samples();
        assert_eq!(s.len(), 3, "30 s at a 10 s period");
        assert_eq!(s[0].at_ms, 20_000);
        assert!(s.iter().all(|x| x.succeeded == 0 && x.failed == 0));
        let mut h = History::new(Duration::from_secs(10), Duration::from_secs(30));
        h.finished(true);
        h.sample(t0, 0, 1, 1, vec![]);
        assert_eq!((h.samples()[0].succeeded, h.samples()[0].failed), (1, 0));
    }
}
