//! `drover-loadgen`: end-to-end load on a real coordinator (durable sled queue) with simulated
//! nodes whose steps take no time, so every millisecond measured is scheduler overhead.
//!
//! Phase 1 (saturation): `--clients` threads each submit `POST /v1/generate` (which answers when
//! the image is stored) back to back for `--seconds`; prints jobs/s.
//! Phase 2 (half load): the same clients pace themselves to half the measured rate; prints
//! p50/p90/p99/max latency, which with zero-time steps is all added latency.
//!
//! Run it from the release build next to the sandbox binaries:
//! `cargo build --release -p drover-tests --bins && RUST_LOG=warn target/release/drover-loadgen`.
//! Routing decision time by node count is `cargo bench -p drover-coordinator --bench routing`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_tests::{Binaries, ClusterSandbox, NodeSpec};

struct Options {
    nodes: usize,
    workers: usize,
    clients: usize,
    seconds: f64,
}

fn options() -> Result<Options> {
    let mut o = Options {
        nodes: 4,
        workers: 32,
        clients: 32,
        seconds: 10.0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => o.nodes = value.parse()?,
            "--workers" => o.workers = value.parse()?,
            "--clients" => o.clients = value.parse()?,
            "--seconds" => o.seconds = value.parse()?,
            other => {
                bail!("unknown flag {other} (--nodes N --workers PER_NODE --clients N --seconds S)")
            }
        }
    }
    Ok(o)
}

fn binaries() -> Result<Binaries> {
    let dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .context("no folder for this executable")?;
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

/// Runs `clients` threads until `deadline`; each waits `pace` between the starts of its requests
/// (zero: back to back). Returns every latency and the wall time taken.
fn drive(
    base: &str,
    clients: usize,
    duration: Duration,
    pace: Duration,
) -> Result<(Vec<Duration>, Duration, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = format!("{base}/v1/generate");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build()
                    .into();
                let mut latencies = Vec::new();
                let mut failures = 0usize;
                let mut next = Instant::now() + pace.mul_f64(c as f64 / clients as f64);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if !pace.is_zero() {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += pace;
                    }
                    let body = format!(
                        r#"{{"prompt":"load {c} {i}","size":"64x64","steps":1,"seed":{i}}}"#
                    );
                    i += 1;
                    let t = Instant::now();
                    match agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.as_bytes())
                    {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_vec();
                            latencies.push(t.elapsed());
                        }
                        _ => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut failures = 0;
    for h in handles {
        let (l, f) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        all.extend(l);
        failures += f;
    }
    Ok((all, started.elapsed(), failures))
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

fn main() -> Result<()> {
    let o = options()?;
    let (sync_p50, sync_p99) = fsync_baseline(500)?;
    println!(
        "baseline: 4 KiB append + fdatasync on this disk: p50 {sync_p50:.2} ms, p99 {sync_p99:.2} ms (500 runs)"
    );
    let mut cluster = ClusterSandbox::start(binaries()?, &[("DROVER_QUEUE_LIMIT", "100000")])?;
    let mut names = Vec::new();
    for i in 0..o.nodes {
        let name = format!("sim-{i}");
        cluster.add_node(
            NodeSpec::sim(&name, "sd15")
                .env("SIM_STEP_MS", "0")
                .env("NUM_WORKERS", &o.workers.to_string()),
        )?;
        names.push(name);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    cluster.wait_for_online(&refs, Duration::from_secs(30))?;
    let base = cluster.base_url();
    println!(
        "drover-loadgen: {} sim nodes × {} workers (0 ms steps), {} clients, POST /v1/generate 64x64 1 step",
        o.nodes, o.workers, o.clients
    );

    // Warm-up, then saturation.
    drive(&base, o.clients, Duration::from_secs(1), Duration::ZERO)?;
    let (lat, wall, failures) = drive(
        &base,
        o.clients,
        Duration::from_secs_f64(o.seconds),
        Duration::ZERO,
    )?;
    let rate = lat.len() as f64 / wall.as_secs_f64();
    let mut sorted = lat.clone();
    sorted.sort();
    println!(
        "saturation: {} jobs in {:.1} s = {rate:.0} jobs/s ({failures} failed); latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99)
    );

    // Half load, paced.
    let half = rate / 2.0;
    let pace = Duration::from_secs_f64(o.clients as f64 / half.max(1.0));
    let (lat, wall, failures) = drive(&base, o.clients, Duration::from_secs_f64(o.seconds), pace)?;
    let mut sorted = lat.clone();
    sorted.sort();
    println!(
        "half load ({half:.0} jobs/s offered): {} jobs in {:.1} s = {:.0} jobs/s ({failures} failed); added latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.9),
        percentile(&sorted, 0.99),
        percentile(&sorted, 1.0)
    );
    Ok(())
}
