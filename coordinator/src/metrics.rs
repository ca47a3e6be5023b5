//! Metrics (`GET /metrics`, OpenMetrics text through the official `prometheus-client` crate,
//! series prefixed `drover_`).
//!
//! Counters and histograms are recorded where things happen (the control plane, the REST
//! handlers); gauges (queue depth, nodes by state, node speed, the store) are set from one
//! snapshot of the control plane's state when scraped ([`FarmGauges`]). Every label value is
//! from a bounded set: reasons are fixed words (a node's own failure text never becomes a
//! label), node labels are registered node names.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

/// Why a submission was refused (a fixed word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason.
    pub reason: &'static str,
}

/// How a job ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    state: &'static str,
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeFamily {
    node: String,
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeModel {
    node: String,
    model: String,
}

/// A model's residency on a node: copies loaded, and since the node started loads, evictions
/// and milliseconds spent loading.
pub type ModelCounts = (u32, u64, u64, u64);

/// What the gauges show, from one look at the control plane (and the store).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FarmGauges {
    /// Unfinished jobs by (state, requested family).
    pub queue_depth: Vec<((&'static str, String), u64)>,
    /// Registered nodes by state (every state, zeros included).
    pub nodes: Vec<(&'static str, u64)>,
    /// Free worker slots by (node name, family).
    pub free_slots: Vec<((String, String), u32)>,
    /// Speed by node name (pixel-steps per second; measured, else advertised, 0 when unknown).
    pub speed: Vec<(String, f64)>,
    /// By (node name, model name): copies loaded, and since the node started loads, evictions
    /// and milliseconds spent loading (nodes that report residency).
    pub models: Vec<((String, String), ModelCounts)>,
    /// Whether the store can write now.
    pub store_writable: bool,
    /// Write rounds the store has failed since it started.
    pub store_failed_writes: u64,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Batch sizes: 1 (alone) to `MAX_BATCH`'s 64.
fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Jobs accepted (2xx) and written to the queue.
    pub accepted: Counter,
    /// Jobs that reached a terminal state, by outcome.
    pub finished: Family<Outcome, Counter>,
    /// Submissions refused, by reason.
    pub rejections: Family<Reason, Counter>,
    /// Attempts that ended without a result and went back to the queue, by reason.
    pub requeues: Family<Reason, Counter>,
    /// Leases that passed their deadline.
    pub lease_expiries: Counter,
    /// Store writes (rounds) that failed (counted by the store, caught up at each scrape).
    store_write_errors: Counter,
    /// Time from acceptance to the first lease.
    pub queue_wait: Histogram,
    /// Time from the lease to the result, for successful attempts.
    pub run: Histogram,
    /// Time from acceptance to success.
    pub end_to_end: Histogram,
    /// Jobs in the batch each successful job was rendered in, by node.
    batch_sizes: Family<NodeLabel, Histogram, fn() -> Histogram>,
    queue_depth: Family<QueueLabels, Gauge>,
    nodes: Family<StateLabel, Gauge>,
    free_slots: Family<NodeFamily, Gauge>,
    speed: Family<NodeLabel, Gauge<f64, AtomicU64>>,
    model_copies: Family<NodeModel, Gauge>,
    model_loads: Family<NodeModel, Gauge>,
    model_evictions: Family<NodeModel, Gauge>,
    model_load_seconds: Family<NodeModel, Gauge<f64, AtomicU64>>,
    store_writable: Gauge,
    /// One scrape at a time sets the gauges and encodes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            accepted: Counter::default(),
            finished: Family::default(),
            rejections: Family::default(),
            requeues: Family::default(),
            lease_expiries: Counter::default(),
            store_write_errors: Counter::default(),
            queue_wait: histogram(),
            run: histogram(),
            end_to_end: histogram(),
            batch_sizes: Family::new_with_constructor(batch_histogram),
            queue_depth: Family::default(),
            nodes: Family::default(),
            free_slots: Family::default(),
            speed: Family::default(),
            model_copies: Family::default(),
            model_loads: Family::default(),
            model_evictions: Family::default(),
            model_load_seconds: Family::default(),
            store_writable: Gauge::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "drover_jobs_accepted",
            "Jobs accepted (2xx) and written to the queue",
            m.accepted.clone(),
        );
        registry.register(
            "drover_jobs_finished",
            "Jobs that reached a terminal state, by outcome",
            m.finished.clone(),
        );
        registry.register(
            "drover_rejections",
            "Submissions refused, by reason",
            m.rejections.clone(),
        );
        registry.register(
            "drover_requeues",
            "Attempts that ended without a result and went back to the queue, by reason",
            m.requeues.clone(),
        );
        registry.register(
            "drover_lease_expiries",
            "Leases that passed their deadline",
            m.lease_expiries.clone(),
        );
        registry.register(
            "drover_store_write_errors",
            "Store write rounds that failed (a full disk, an I/O error)",
            m.store_write_errors.clone(),
        );
        registry.register(
            "drover_job_queue_wait_seconds",
            "Time from acceptance to the first lease",
            m.queue_wait.clone(),
        );
        registry.register(
            "drover_job_run_seconds",
            "Time from the lease to the result, for successful attempts",
            m.run.clone(),
        );
        registry.register(
            "drover_job_end_to_end_seconds",
            "Time from acceptance to success",
            m.end_to_end.clone(),
        );
        registry.register(
            "drover_job_batch_size",
            "Jobs in the batch each successful job was rendered in (one model call for all), by node",
            m.batch_sizes.clone(),
        );
        registry.register(
            "drover_queue_depth",
            "Unfinished jobs by state and requested family",
            m.queue_depth.clone(),
        );
        registry.register("drover_nodes", "Registered nodes by state", m.nodes.clone());
        registry.register(
            "drover_node_free_slots",
            "Worker slots not running a job",
            m.free_slots.clone(),
        );
        registry.register(
            "drover_node_pixel_steps_per_second",
            "Node speed: measured from its results, else advertised (0 when unknown)",
            m.speed.clone(),
        );
        registry.register(
            "drover_node_model_copies",
            "Copies of a model loaded (or loading) on a node now",
            m.model_copies.clone(),
        );
        registry.register(
            "drover_node_model_loads",
            "Loads of a model on a node since the node started",
            m.model_loads.clone(),
        );
        registry.register(
            "drover_node_model_evictions",
            "Evictions of a model from a node (to make room for another) since the node started",
            m.model_evictions.clone(),
        );
        registry.register(
            "drover_node_model_load_seconds",
            "Seconds a node spent loading a model since the node started",
            m.model_load_seconds.clone(),
        );
        registry.register(
            "drover_store_writable",
            "Whether the store can write now (1) or refuses writes (0)",
            m.store_writable.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Records the batch size a job of `node` was rendered in.
    pub fn batch(&self, node: &str, size: u32) {
        self.batch_sizes
            .get_or_create(&NodeLabel {
                node: node.to_string(),
            })
            .observe(f64::from(size));
    }

    /// Counts a refused submission.
    pub fn reject(&self, reason: &'static str) {
        self.rejections.get_or_create(&Reason { reason }).inc();
    }

    /// Renders every series as OpenMetrics text, the gauges set from `farm`.
    pub fn render(&self, farm: &FarmGauges) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.queue_depth.clear();
        for ((state, family), n) in &farm.queue_depth {
            let labels = QueueLabels {
                state,
                family: family.clone(),
            };
            self.queue_depth.get_or_create(&labels).set(*n as i64);
        }
        self.nodes.clear();
        for (state, n) in &farm.nodes {
            self.nodes
                .get_or_create(&StateLabel { state })
                .set(*n as i64);
        }
        self.free_slots.clear();
        for ((node, family), n) in &farm.free_slots {
            let labels = NodeFamily {
                node: node.clone(),
                family: family.clone(),
            };
            self.free_slots.get_or_create(&labels).set(i64::from(*n));
        }
        self.speed.clear();
        for (node, speed) in &farm.speed {
            self.speed
                .get_or_create(&NodeLabel { node: node.clone() })
                .set(*speed);
        }
        for family in [&self.model_copies, &self.model_loads, &self.model_evictions] {
            family.clear();
        }
        self.model_load_seconds.clear();
        for ((node, model), (copies, loads, evictions, load_ms)) in &farm.models {
            let labels = NodeModel {
                node: node.clone(),
                model: model.clone(),
            };
            self.model_copies
                .get_or_create(&labels)
                .set(i64::from(*copies));
            self.model_loads.get_or_create(&labels).set(*loads as i64);
            self.model_evictions
                .get_or_create(&labels)
                .set(*evictions as i64);
            self.model_load_seconds
                .get_or_create(&labels)
                .set(*load_ms as f64 / 1000.0);
        }
        self.store_writable.set(i64::from(farm.store_writable));
        let counted = self.store_write_errors.get();
        if farm.store_failed_writes > counted {
            self.store_write_errors
                .inc_by(farm.store_failed_writes - counted);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_text() {
        let m = Metrics::default();
        m.accepted.inc();
        m.accepted.inc();
        m.reject("queue_full");
        m.run.observe(0.003);
        let farm = FarmGauges {
            nodes: vec![("online", 2), ("offline", 0)],
            free_slots: vec![(("painter".into(), "sd15".into()), 2)],
            speed: vec![("painter".into(), 1.5e6)],
            store_writable: true,
            store_failed_writes: 3,
            ..FarmGauges::default()
        };
        let text = m.render(&farm);
        for line in [
            "# TYPE drover_jobs_accepted counter",
            "drover_jobs_accepted_total 2",
            "drover_rejections_total{reason=\"queue_full\"} 1",
            "drover_job_run_seconds_bucket{le=\"0.0025\"} 0",
            "drover_job_run_seconds_bucket{le=\"0.005\"} 1",
            "drover_job_run_seconds_bucket{le=\"+Inf\"} 1",
            "drover_job_run_seconds_count 1",
            "# TYPE drover_nodes gauge",
            "drover_nodes{state=\"online\"} 2",
            "drover_nodes{state=\"offline\"} 0",
            "drover_node_free_slots{node=\"painter\",family=\"sd15\"} 2",
            "drover_node_pixel_steps_per_second{node=\"painter\"} 1500000.0",
            "drover_store_writable 1",
            "drover_store_write_errors_total 3",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        // Gauges follow the latest snapshot: a node gone from it is gone from the text.
        let text = m.render(&FarmGauges::default());
        assert!(!text.contains("painter"), "{text}");
    }
}
