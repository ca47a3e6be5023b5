//! Prometheus metrics (`GET /metrics`, text exposition format, series prefixed `drover_`).
//!
//! Counters and histograms are recorded where things happen (the control plane, the REST
//! handlers); gauges (queue depth, nodes by state, node speed) are computed from the control
//! plane's state when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The process's counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, Labels), Histogram>>,
}

/// A gauge value computed at scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct Gauge {
    /// Series name (with the `drover_` prefix).
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Labels.
    pub labels: Labels,
    /// Value.
    pub value: f64,
}

/// Help texts of the recorded series.
fn help(name: &str) -> &'static str {
    match name {
        "drover_jobs_accepted_total" => "Jobs accepted (2xx) and written to the queue.",
        "drover_jobs_finished_total" => "Jobs that reached a terminal state, by outcome.",
        "drover_rejections_total" => "Submissions refused, by reason.",
        "drover_requeues_total" => {
            "Attempts that ended without a result and went back to the queue, by reason."
        }
        "drover_lease_expiries_total" => "Leases that passed their deadline.",
        "drover_job_queue_wait_seconds" => "Time from acceptance to the first lease.",
        "drover_job_run_seconds" => "Time from the lease to the result, for successful attempts.",
        "drover_job_end_to_end_seconds" => "Time from acceptance to success.",
        _ => "",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: &[(&'static str, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Metrics {
    /// Adds one to counter `name` with `labels`.
    pub fn inc(&self, name: &'static str, labels: Labels) {
        *lock(&self.counters).entry((name, labels)).or_default() += 1;
    }

    /// Records `seconds` in histogram `name` with `labels`.
    pub fn observe(&self, name: &'static str, labels: Labels, seconds: f64) {
        let mut histograms = lock(&self.histograms);
        let h = histograms.entry((name, labels)).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// The current value of a counter (0 when never incremented).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> u64 {
        lock(&self.counters)
            .get(&(name, labels.to_vec()))
            .copied()
            .unwrap_or(0)
    }

    /// Renders every series in the Prometheus text format, with `gauges` appended.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), value) in lock(&self.counters).iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", help(name));
                last = name;
            }
            let _ = writeln!(out, "{name}{} {value}", label_text(labels, None));
        }
        last = "";
        for ((name, labels), h) in lock(&self.histograms).iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", help(name));
                last = name;
            }
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let le = Some(("le", bound.to_string()));
                let _ = writeln!(out, "{name}_bucket{} {count}", label_text(labels, le));
            }
            let inf = Some(("le", "+Inf".to_string()));
            let _ = writeln!(out, "{name}_bucket{} {}", label_text(labels, inf), h.count);
            let _ = writeln!(out, "{name}_sum{} {}", label_text(labels, None), h.sum);
            let _ = writeln!(out, "{name}_count{} {}", label_text(labels, None), h.count);
        }
        last = "";
        for g in gauges {
            if g.name != last {
                let _ = writeln!(out, "# HELP {} {}\n# TYPE {} gauge", g.name, g.help, g.name);
                last = g.name;
            }
            let _ = writeln!(out, "{}{} {}", g.name, label_text(&g.labels, None), g.value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.inc("drover_jobs_accepted_total", vec![]);
        m.inc("drover_jobs_accepted_total", vec![]);
        m.inc(
            "drover_rejections_total",
            vec![("reason", "queue_full".into())],
        );
        m.observe("drover_job_run_seconds", vec![], 0.003);
        let text = m.render(&[Gauge {
            name: "drover_nodes",
            help: "Nodes by state.",
            labels: vec![("state", "online".into())],
            value: 2.0,
        }]);
        assert!(
            text.contains(
                "# TYPE drover_jobs_accepted_total counter\ndrover_jobs_accepted_total 2\n"
            )
        );
        assert!(text.contains("drover_rejections_total{reason=\"queue_full\"} 1"));
        assert!(text.contains("drover_job_run_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("drover_job_run_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("drover_job_run_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("drover_job_run_seconds_count 1"));
        assert!(text.contains("# TYPE drover_nodes gauge\ndrover_nodes{state=\"online\"} 2"));
        assert_eq!(m.counter("drover_jobs_accepted_total", &[]), 2);
    }
}
