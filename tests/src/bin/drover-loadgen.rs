//! `drover-loadgen`: end-to-end load on a real coordinator (durable queue) with simulated nodes
//! whose steps take no time, so every millisecond measured is scheduler overhead.
//!
//! 1. Routing decision time at 10, 1,000 and 10,000 registered nodes (the control plane's index,
//!    in process, against a bare scan of the same registry; `cargo bench -p drover-coordinator
//!    --bench routing` has more columns).
//! 2. The disk's own durability cost, machine idle: 4 KiB append + `fdatasync`.
//! 3. One client alone, back to back: the latency of an idle farm.
//! 4. Saturation: `--clients` threads each submit `POST /v1/generate` (answered with the image,
//!    after the job's acceptance is synced to disk and the job is done) back to back for
//!    `--seconds`; prints jobs/s and the CPU time each process spent per job.
//! 5. Half load: the same clients pace themselves to half the measured rate (or `--rate`); prints
//!    p50/p90/p99/max latency, all of it added latency with zero-time steps, beside a disk probe
//!    running during the same phase (the disk's fsync latency under that load).
//!
//! Each client is one keep-alive connection driven by [`drover_tests::http1`], a client that costs
//! two system calls per request, so the generator takes as little as possible of the CPU it
//! shares with what it measures.
//!
//! Run it from the release build next to the sandbox binaries:
//! `cargo build --release -p drover-tests --bins && RUST_LOG=warn target/release/drover-loadgen`;
//! `--bins DIR` measures another build's `sandbox-coordinator` and `sandbox-node` with the same
//! load.

#[global_allocator]
static ALLOCATOR: drover_shared::Allocator = drover_shared::Allocator;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_tests::http1::Connection;
use drover_tests::replicas::ReplicaSet;
use drover_tests::{Binaries, ClusterSandbox, NodeSpec};

/// End-to-end load on a real coordinator with simulated zero-time nodes: routing decision
/// times, the disk's fsync baseline, one-client latency, saturation throughput and added latency
/// at half load.
#[derive(clap::Parser, Debug)]
#[command(name = "drover-loadgen", version)]
struct Options {
    /// Simulated nodes.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Workers per node.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Client threads (one keep-alive connection each).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Images per request: 1 submits `POST /v1/generate`; 2 to 8 submit AUTOMATIC1111-style
    /// `POST /sdapi/v1/txt2img` with `batch_size` (accepted as one batch, answered when all are
    /// done).
    #[arg(long, default_value_t = 1, value_parser = images_per_request)]
    batch: usize,
    /// Jobs per second offered in the paced phase (default: half the saturation rate).
    #[arg(long)]
    rate: Option<f64>,
    /// Milliseconds each simulated step takes (0: zero-time nodes, the scheduler alone).
    #[arg(long, default_value_t = 0)]
    step_ms: u64,
    /// The nodes' MAX_BATCH (dynamic batching; a simulated batch takes one job's time).
    #[arg(long, default_value_t = 1)]
    max_batch: u32,
    /// Where the sandbox binaries are (default: next to this executable); another build's, to
    /// measure it with the same load generator.
    #[arg(long)]
    bins: Option<PathBuf>,
    /// Coordinator replicas: 1 is a single coordinator; 3 a replicated one (Raft, every
    /// replica on this machine), loaded through its leader.
    #[arg(long, default_value_t = 1)]
    replicas: u64,
}

/// The farm under load: a single coordinator or a replicated one, with its nodes.
enum Farm {
    Single(ClusterSandbox),
    Replicated(ReplicaSet),
}

impl Farm {
    fn start(o: &Options) -> Result<Self> {
        // The coordinator's production timings (the sandbox's test timings beat 10× as often).
        let env = [
            ("DROVER_QUEUE_LIMIT", "100000"),
            ("DROVER_HEARTBEAT_MS", "1000"),
            ("DROVER_OFFLINE_GRACE_MS", "10000"),
            ("DROVER_LEASE_FLOOR_MS", "30000"),
        ];
        let spec = |i: usize| {
            NodeSpec::sim(&format!("sim-{i}"), "sd15")
                .env("SIM_STEP_MS", &o.step_ms.to_string())
                .env("MAX_BATCH", &o.max_batch.to_string())
                .env("NUM_WORKERS", &o.workers.to_string())
        };
        if o.replicas > 1 {
            let mut set = ReplicaSet::start_direct(binaries(o.bins.clone())?, o.replicas, &env)?;
            for i in 0..o.nodes {
                set.add_node(spec(i))?;
            }
            set.wait_for_nodes(o.nodes, Duration::from_secs(30))?;
            return Ok(Self::Replicated(set));
        }
        let mut cluster = ClusterSandbox::start(binaries(o.bins.clone())?, &env)?;
        let mut names = Vec::new();
        for i in 0..o.nodes {
            cluster.add_node(spec(i))?;
            names.push(format!("sim-{i}"));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        cluster.wait_for_online(&refs, Duration::from_secs(30))?;
        Ok(Self::Single(cluster))
    }

    /// The REST address the clients load: the coordinator's, or the leader's.
    fn addr(&self) -> Result<SocketAddr> {
        let port = match self {
            Self::Single(cluster) => cluster.http_port(),
            Self::Replicated(set) => {
                let leader = set.wait_for_leader(Duration::from_secs(30))?;
                set.http_port(leader)?
            }
        };
        Ok(format!("127.0.0.1:{port}").parse()?)
    }

    fn pids(&self) -> Vec<(String, u32)> {
        match self {
            Self::Single(cluster) => cluster.pids(),
            Self::Replicated(set) => set.pids(),
        }
    }
}

fn images_per_request(text: &str) -> std::result::Result<usize, String> {
    match text.parse() {
        Ok(n @ 1..=8) => Ok(n),
        _ => Err(format!("{text}: 1 to 8 images per request")),
    }
}

fn binaries(dir: Option<PathBuf>) -> Result<Binaries> {
    let dir = match dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("no folder for this executable")?,
    };
    let bins = Binaries {
        coordinator: dir.join("sandbox-coordinator"),
        node: dir.join("sandbox-node"),
    };
    if !bins.coordinator.is_file() || !bins.node.is_file() {
        bail!(
            "sandbox binaries not found next to {}: build with `cargo build -p drover-tests --bins`",
            dir.display()
        );
    }
    Ok(bins)
}

/// What one run of the clients measured.
struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
    failures: usize,
    first_failure: Option<String>,
}

/// Runs `clients` threads for `duration`; each waits `pace` between the starts of its requests
/// (zero: back to back), each request `batch` images.
fn drive(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    pace: Duration,
    batch: usize,
) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut conn = Connection::new(addr);
                let mut latencies = Vec::with_capacity(65_536);
                let (mut failures, mut first_failure) = (0usize, None);
                let mut next = Instant::now() + pace.mul_f64(c as f64 / clients as f64);
                let mut body = Vec::with_capacity(128);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if !pace.is_zero() {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += pace;
                    }
                    body.clear();
                    use std::io::Write as _;
                    let path = if batch == 1 {
                        let _ = write!(
                            body,
                            r#"{{"prompt":"load {c} {i}","size":"64x64","steps":1,"seed":{i}}}"#
                        );
                        "/v1/generate"
                    } else {
                        let _ = write!(
                            body,
                            r#"{{"prompt":"load {c} {i}","width":64,"height":64,"steps":1,"seed":{i},"batch_size":{batch}}}"#
                        );
                        "/sdapi/v1/txt2img"
                    };
                    i += 1;
                    let t = Instant::now();
                    match conn.post_json(path, &body) {
                        Ok(r) if r.status == 200 && !r.body.is_empty() => {
                            latencies.push(t.elapsed())
                        }
                        Ok(r) => {
                            failures += 1;
                            first_failure.get_or_insert_with(|| {
                                format!("{}: {}", r.status, String::from_utf8_lossy(r.body))
                            });
                        }
                        Err(e) => {
                            failures += 1;
                            first_failure.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (latencies, failures, first_failure)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut run = Run {
        latencies: Vec::new(),
        wall: Duration::ZERO,
        failures: 0,
        first_failure: None,
    };
    for h in handles {
        let (l, f, first) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        run.latencies.extend(l);
        run.failures += f;
        run.first_failure = run.first_failure.or(first);
    }
    run.wall = started.elapsed();
    run.latencies.sort();
    Ok(run)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The disk's own durability cost, measured in the same run: `n` times a 4 KiB append and an
/// `fdatasync` in the temporary folder the sandbox's data lives in. Answers p50 and p99 in ms.
fn fsync_baseline(n: usize) -> Result<(f64, f64)> {
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("fsync-probe"))?;
    let block = vec![0x5a_u8; 4096];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// The disk probe running beside a phase: every 10 ms a 4 KiB append and an `fdatasync` in the
/// sandbox's temporary folder, so the disk's own durability cost is measured under the same
/// load as the coordinator's acknowledgements (on a busy machine the disk can stall far more
/// often than an idle one shows). Stop it with `stop`; `join` answers the sorted latencies.
struct DiskProbe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Duration>>,
}

impl DiskProbe {
    fn start() -> Result<Self> {
        use std::io::Write as _;
        let dir = tempfile::tempdir()?;
        let mut file = std::fs::File::create(dir.path().join("fsync-probe"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let _dir = dir;
            let block = vec![0x5a_u8; 4096];
            let mut times = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                if file
                    .write_all(&block)
                    .and_then(|()| file.sync_data())
                    .is_err()
                {
                    break;
                }
                times.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            times.sort();
            times
        });
        Ok(Self { stop, handle })
    }

    fn join(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat` (clock ticks of
/// 10 ms, Linux's USER_HZ of 100).
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of every sandbox process and of this load generator, grouped as the report prints
/// them: coordinator, all nodes together, load generator.
fn cpu_snapshot(pids: &[(String, u32)]) -> [Duration; 3] {
    let mut out = [Duration::ZERO; 3];
    for (name, pid) in pids {
        let slot = usize::from(name != "coordinator");
        out[slot] += cpu_time(&pid.to_string()).unwrap_or_default();
    }
    out[2] = cpu_time("self").unwrap_or_default();
    out
}

/// Context switches (voluntary, i.e. a thread went to sleep to wait, and involuntary) of every
/// thread of a process so far, from `/proc/<pid>/task/*/status`: the thread hand-offs a request
/// path makes show up here.
fn switches(pid: &str) -> [u64; 2] {
    let mut out = [0; 2];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let (key, value) = line.split_once(':').unwrap_or_default();
            let slot = match key {
                "voluntary_ctxt_switches" => 0,
                "nonvoluntary_ctxt_switches" => 1,
                _ => continue,
            };
            out[slot] += value.trim().parse::<u64>().unwrap_or_default();
        }
    }
    out
}

/// Context switches of the coordinator and of all nodes together, voluntary and involuntary.
fn switch_snapshot(pids: &[(String, u32)]) -> [[u64; 2]; 2] {
    let mut out = [[0; 2]; 2];
    for (name, pid) in pids {
        let slot = usize::from(name != "coordinator");
        let s = switches(&pid.to_string());
        out[slot][0] += s[0];
        out[slot][1] += s[1];
    }
    out
}

/// Prints context switches per job between two snapshots.
fn print_switches(before: [[u64; 2]; 2], after: [[u64; 2]; 2], jobs: usize) {
    let per = |i: usize, k: usize| (after[i][k] - before[i][k]) as f64 / jobs.max(1) as f64;
    println!(
        "  context switches per job: coordinator {:.1} voluntary + {:.1} involuntary, nodes {:.1} + {:.1}",
        per(0, 0),
        per(0, 1),
        per(1, 0),
        per(1, 1)
    );
}

/// Routing decision time at 10, 1,000 and 10,000 registered nodes, as the control plane decides:
/// [`router::pick_indexed`] on a live [`router::CapabilityIndex`] with the same capability check
/// `dispatch` passes it; against a bare scan of the same registry that decides nothing, measured
/// in the same run.
fn decision_times() -> Result<()> {
    use drover_coordinator::control::router::{self, CapabilityIndex, Member};
    use std::hint::black_box;
    let job = drover_shared::job::JobRequest::from_json(
        br#"{"prompt":"x","model":"sdxl","size":"1024x1024"}"#,
    )
    .and_then(|r| r.validate(|| 1))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "routing decision time (SDXL 1024² job; registry mixes families, offline, draining, busy):"
    );
    for n in [10usize, 1_000, 10_000] {
        let views = router::sample_farm(n);
        let by_id: std::collections::HashMap<_, _> = views.iter().map(|v| (v.id, v)).collect();
        let mut index = CapabilityIndex::default();
        for v in &views {
            index.upsert(v.id, Member::of(v));
        }
        let iterations = 200_000u32;
        let started = Instant::now();
        for i in 0..iterations {
            let pivot = views[i as usize % n].id;
            let capable = |id| by_id.get(&id).and_then(|v| router::fit_on(&job, v));
            black_box(router::pick_indexed(
                &index,
                black_box(&job),
                pivot,
                capable,
            ));
        }
        let decision = started.elapsed().as_nanos() as f64 / f64::from(iterations);
        let scans = (2_000_000 / n).max(200) as u32;
        let started = Instant::now();
        for _ in 0..scans {
            black_box(views.iter().filter(|v| black_box(v.free_slots) > 0).count());
        }
        let scan = started.elapsed().as_nanos() as f64 / f64::from(scans);
        println!(
            "  {n:>6} nodes: decision {decision:>7.0} ns; bare scan of the registry {scan:>9.0} ns ({:.3}× the scan)",
            decision / scan
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let o = <Options as clap::Parser>::parse();
    decision_times()?;
    let (sync_p50, sync_p99) = fsync_baseline(500)?;
    println!(
        "baseline: 4 KiB append + fdatasync on this disk, machine idle: p50 {sync_p50:.2} ms, p99 {sync_p99:.2} ms (500 runs)"
    );
    let farm = Farm::start(&o)?;
    let addr = farm.addr()?;
    let pids = farm.pids();
    let what = if o.batch == 1 {
        "POST /v1/generate, 1 image".to_string()
    } else {
        format!("POST /sdapi/v1/txt2img, {} images", o.batch)
    };
    println!(
        "drover-loadgen: {} coordinator replica(s), {} sim nodes × {} workers ({} ms steps, MAX_BATCH {}), {} clients, {what} per request, 64x64 1 step",
        o.replicas, o.nodes, o.workers, o.step_ms, o.max_batch, o.clients
    );
    let b = o.batch;

    // Warm-up; one client alone (the latency of an idle farm); then saturation.
    drive(
        addr,
        o.clients,
        Duration::from_secs(1),
        Duration::ZERO,
        o.batch,
    )?;
    let switched = switch_snapshot(&pids);
    let alone = drive(addr, 1, Duration::from_secs(2), Duration::ZERO, o.batch)?;
    println!(
        "one client, back to back: {} jobs in {:.1} s; added latency p50 {:.2} ms, p99 {:.2} ms",
        alone.latencies.len() * b,
        alone.wall.as_secs_f64(),
        percentile(&alone.latencies, 0.5),
        percentile(&alone.latencies, 0.99)
    );
    print_switches(switched, switch_snapshot(&pids), alone.latencies.len() * b);
    let switched = switch_snapshot(&pids);
    let before = cpu_snapshot(&pids);
    let run = drive(
        addr,
        o.clients,
        Duration::from_secs_f64(o.seconds),
        Duration::ZERO,
        o.batch,
    )?;
    let after = cpu_snapshot(&pids);
    let switched_after = switch_snapshot(&pids);
    let jobs = run.latencies.len() * b;
    let rate = jobs as f64 / run.wall.as_secs_f64();
    println!(
        "saturation: {jobs} jobs in {:.1} s = {rate:.0} jobs/s ({} failed); latency p50 {:.2} ms, p99 {:.2} ms",
        run.wall.as_secs_f64(),
        run.failures,
        percentile(&run.latencies, 0.5),
        percentile(&run.latencies, 0.99)
    );
    if let Some(first) = &run.first_failure {
        println!("  first failure: {first}");
    }
    let per_job = |i: usize| (after[i] - before[i]).as_secs_f64() * 1e6 / jobs.max(1) as f64;
    let cores = (0..3)
        .map(|i| (after[i] - before[i]).as_secs_f64())
        .sum::<f64>()
        / run.wall.as_secs_f64();
    println!(
        "  cpu per job: coordinator {:.0} µs, nodes {:.0} µs, load generator {:.0} µs ({cores:.2} cores busy in all)",
        per_job(0),
        per_job(1),
        per_job(2)
    );
    print_switches(switched, switched_after, jobs);

    // Half load (or --rate), paced, with the disk probe beside it.
    let half = o.rate.unwrap_or(rate / 2.0);
    let pace = Duration::from_secs_f64(o.clients as f64 * b as f64 / half.max(1.0));
    let probe = DiskProbe::start()?;
    let run = drive(
        addr,
        o.clients,
        Duration::from_secs_f64(o.seconds),
        pace,
        o.batch,
    )?;
    let disk = probe.join();
    let lat = &run.latencies;
    println!(
        "paced ({half:.0} jobs/s offered): {} jobs in {:.1} s = {:.0} jobs/s ({} failed); added latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len() * b,
        run.wall.as_secs_f64(),
        (lat.len() * b) as f64 / run.wall.as_secs_f64(),
        run.failures,
        percentile(lat, 0.5),
        percentile(lat, 0.9),
        percentile(lat, 0.99),
        percentile(lat, 1.0)
    );
    if let Some(first) = &run.first_failure {
        println!("  first failure: {first}");
    }
    let (disk_p50, disk_p99) = (percentile(&disk, 0.5), percentile(&disk, 0.99));
    println!(
        "  the disk during the paced phase (4 KiB append + fdatasync every 10 ms, {} probes): p50 {disk_p50:.2} ms, p99 {disk_p99:.2} ms, max {:.2} ms",
        disk.len(),
        percentile(&disk, 1.0)
    );
    println!(
        "  paced latency against the disk: p50 {:.1}× its idle fsync p50; p99 {:.1}× its idle fsync p99, {:.1}× its fsync p99 under the same load",
        percentile(lat, 0.5) / sync_p50,
        percentile(lat, 0.99) / sync_p99,
        percentile(lat, 0.99) / disk_p99
    );
    Ok(())
}
