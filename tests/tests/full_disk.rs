//! A full disk, with real processes: the coordinator's data folder on a small tmpfs, filled up
//! while 256-job batches come in (issue 22).
//!
//! Checks that batches stay all or none across the moment the disk fills (every `202` batch is
//! there after restarts, no job of a `503` batch is stored or run), that `/healthz` says
//! `degraded` (503) while the store cannot write and `ok` once space is freed, and that after a
//! `kill -9` on the full disk the coordinator starts (on its reserve), answers reads, refuses
//! submissions with the reason and still takes a running job's result.
//!
//! Mounting the tmpfs needs root (or CAP_SYS_ADMIN); the test fails, saying so, without it.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use drover_tests::{ClusterSandbox, NodeSpec, Reply, binaries};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// The tmpfs's size and the store's reserve (two halves of 2 MiB).
const DISK_MB: u32 = 24;
const RESERVE_MB: &str = "4";

/// A tmpfs of its own, unmounted (and its folder deleted) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("drover-full-disk-")
            .tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a {mb} MB tmpfs on {} (this test needs root or CAP_SYS_ADMIN to make a small disk): {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes zeros to `name` until the disk is full but for `spare` bytes; answers how many
    /// bytes went in.
    fn fill(&self, name: &str, spare: u64) -> anyhow::Result<u64> {
        let mut file = std::fs::File::create(self.path().join(name))?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let written = written.saturating_sub(spare);
        file.set_len(written)?;
        file.sync_all()?;
        Ok(written)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut command = Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount {}", self.dir.path().display());
        }
    }
}

/// A batch submitted, and what came of it.
struct Batch {
    /// Its jobs' prompts start with this.
    tag: String,
    /// The request id (the jobs' trace id on the node).
    request_id: String,
    /// `202` or `503`.
    status: u16,
    /// The job ids of an accepted batch.
    ids: Vec<String>,
}

fn batch_body(tag: &str) -> Value {
    let jobs: Vec<Value> = (0..256)
        .map(|i| json!({"prompt": format!("{tag} job {i}"), "size": "64x64", "steps": 1}))
        .collect();
    json!({ "jobs": jobs })
}

fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// Submits batch `n`; a refusal must be a `503` that says why.
fn submit_batch(cluster: &ClusterSandbox, n: usize) -> anyhow::Result<Batch> {
    let tag = format!("batch-{n}");
    let reply = cluster.post("/v1/jobs/batch", &batch_body(&tag))?;
    let request_id = reply
        .header("x-request-id")
        .context("no x-request-id")?
        .to_string();
    let ids = match reply.status {
        202 => reply.json()?["jobs"]
            .as_array()
            .context("no jobs in a 202")?
            .iter()
            .map(|j| j["id"].as_str().map(String::from).context("no id"))
            .collect::<anyhow::Result<Vec<_>>>()?,
        503 => {
            let message = reply.json()?["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ensure!(
                message.contains("disk is full"),
                "a 503 without the reason: {message}"
            );
            Vec::new()
        }
        other => bail!("batch {n} answered {other}: {}", text(&reply)),
    };
    ensure!(
        reply.status != 202 || ids.len() == 256,
        "a 202 with {} jobs",
        ids.len()
    );
    Ok(Batch {
        tag,
        request_id,
        status: reply.status,
        ids,
    })
}

/// `GET /healthz`: its status and body.
fn health(cluster: &ClusterSandbox) -> anyhow::Result<(u16, Value)> {
    let reply = cluster.get("/healthz")?;
    Ok((reply.status, reply.json()?))
}

fn assert_degraded(cluster: &ClusterSandbox) -> anyhow::Result<()> {
    let (status, body) = health(cluster)?;
    ensure!(status == 503, "healthz answered {status}: {body}");
    ensure!(body["status"] == "degraded", "{body}");
    ensure!(body["store"]["writable"] == false, "{body}");
    ensure!(body["store"]["since_ms"].is_u64(), "{body}");
    ensure!(
        body["store"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("disk is full")),
        "{body}"
    );
    ensure!(
        body["nodes"].is_u64() && body["nodes_online"].is_u64(),
        "{body}"
    );
    Ok(())
}

/// The ids of the jobs a refused batch's request put in the control plane before the refusal
/// (from the coordinator's log: `job submitted` lines in the request's span).
fn refused_ids(log: &str, request_id: &str) -> Vec<String> {
    let span = format!("request_id={request_id}");
    log.lines()
        .filter(|l| l.contains(&span) && l.contains("job submitted"))
        .filter_map(|l| {
            let at = l.find("job_id=")? + "job_id=".len();
            Some(l[at..].split_whitespace().next()?.to_string())
        })
        .collect()
}

/// Every accepted job is stored (and was not revoked); no job of a refused batch is stored,
/// queued or run. While the disk is full (`degraded`), sled may refuse reads after a failed
/// write, so a refused job's lookup may answer `503` naming the store (as it should: it cannot
/// tell); the check after space comes back, on a healthy store, reads every one of them.
fn check_batches(
    cluster: &ClusterSandbox,
    batches: &[Batch],
    degraded: bool,
) -> anyhow::Result<()> {
    let unfinished = cluster.get("/v1/jobs")?.json()?;
    let unfinished_prompts: HashSet<String> = unfinished
        .as_array()
        .context("GET /v1/jobs is not an array")?
        .iter()
        .filter_map(|j| j["spec"]["prompt"].as_str().map(String::from))
        .collect();
    let log = cluster.coordinator_log();
    let node_log = cluster.node_log(0);
    for batch in batches {
        if batch.status == 202 {
            for id in &batch.ids {
                let job = cluster.job(id)?;
                ensure!(
                    !job["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("not accepted")),
                    "an accepted job of {} was revoked: {job}",
                    batch.tag
                );
            }
            continue;
        }
        let prefix = format!("{} job ", batch.tag);
        ensure!(
            !unfinished_prompts.iter().any(|p| p.starts_with(&prefix)),
            "a job of refused {} is unfinished",
            batch.tag
        );
        ensure!(
            !node_log.contains(&format!("trace_id={}", batch.request_id)),
            "a job of refused {} ran on the node",
            batch.tag
        );
        for id in refused_ids(&log, &batch.request_id) {
            let reply = cluster.get(&format!("/v1/jobs/{id}"))?;
            match reply.status {
                404 => {}
                200 => {
                    // Revoked after it was stored: failed, never run.
                    let job = reply.json()?;
                    ensure!(
                        job["state"] == "failed"
                            && job["error"]
                                .as_str()
                                .is_some_and(|e| e.contains("not accepted")),
                        "a job of refused {} is stored: {job}",
                        batch.tag
                    );
                }
                // sled's own read error (`store database error: …`) or the store's i/o error.
                503 if degraded && text(&reply).contains("store") => {}
                other => bail!(
                    "GET job {id} of {} answered {other}: {}",
                    batch.tag,
                    text(&reply)
                ),
            }
        }
    }
    Ok(())
}

#[test]
fn a_full_disk_keeps_batches_whole_reports_itself_and_does_not_stop_a_start() {
    let disk = match SmallDisk::mount(DISK_MB) {
        Ok(disk) => disk,
        Err(e) => panic!("{e:#}"),
    };
    let data: PathBuf = disk.path().join("coordinator");
    let data = data.display().to_string();
    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_DATA_DIR", &data),
            ("DROVER_STORE_RESERVE_MB", RESERVE_MB),
            // The long job's 30 s fit in its lease.
            ("DROVER_LEASE_FLOOR_MS", "120000"),
        ],
    )
    .expect("the coordinator starts on the small disk");
    // Panics with the processes' logs while the cluster still runs.
    if let Err(e) = run(&mut cluster, &disk) {
        panic!("{e:#}");
    }
}

fn run(cluster: &mut ClusterSandbox, disk: &SmallDisk) -> anyhow::Result<()> {
    let (status, body) = health(cluster)?;
    ensure!(status == 200 && body["store"]["writable"] == true, "{body}");
    ensure!(
        disk.path().join("coordinator/reserve.ballast").exists(),
        "the reserve is kept"
    );
    cluster.add_node(
        NodeSpec::sim("painter", "sd15")
            .env("SIM_STEP_MS", "600")
            .env("NUM_WORKERS", "2"),
    )?;
    cluster.wait_for_online(&["painter"], T)?;
    // A job that runs across the coordinator's restart (50 steps of 600 ms).
    let long = cluster.submit(&json!({"prompt": "long", "size": "64x64", "steps": 50}))?;
    cluster.wait_until(T, "the long job runs", |c| {
        Ok(c.job(&long)?["state"] == "running")
    })?;

    // Batches before and across the moment the disk fills.
    let mut batches = Vec::new();
    for n in 0..2 {
        let batch = submit_batch(cluster, n)?;
        ensure!(
            batch.status == 202,
            "batch {n} refused before the disk filled"
        );
        batches.push(batch);
    }
    // Room for a few more batches, so that the disk fills while they come in.
    let filled = disk.fill("filler", 3 * 1024 * 1024)?;
    println!("filler: {} MiB", filled / (1024 * 1024));
    let mut refused_in_a_row = 0;
    for n in 2..40 {
        let batch = submit_batch(cluster, n)?;
        refused_in_a_row = if batch.status == 503 {
            refused_in_a_row + 1
        } else {
            0
        };
        batches.push(batch);
        if refused_in_a_row == 3 {
            break;
        }
    }
    let accepted = batches.iter().filter(|b| b.status == 202).count();
    println!(
        "{accepted} batches accepted, {} refused",
        batches.len() - accepted
    );
    ensure!(
        refused_in_a_row == 3,
        "the store took 38 batches on a full disk"
    );
    assert_degraded(cluster)?;
    let metrics = text(&cluster.get("/metrics")?);
    ensure!(
        metrics.lines().any(|l| l == "drover_store_writable 0"),
        "{metrics}"
    );
    check_batches(cluster, &batches, true)?;

    // kill -9 on the full disk: the coordinator starts all the same.
    ensure!(
        cluster.job(&long)?["state"] == "running",
        "the long job ended before the kill"
    );
    cluster.kill_coordinator();
    cluster.start_coordinator_answering()?;
    assert_degraded(cluster)?;
    let first = &batches[0].ids[0];
    ensure!(
        cluster.get(&format!("/v1/jobs/{first}"))?.status == 200,
        "an accepted job is read"
    );
    let refused = submit_batch(cluster, 100)?;
    ensure!(refused.status == 503, "a batch was taken on a full disk");
    batches.push(refused);
    let done = cluster.wait_for_job(&long, T)?;
    ensure!(done["state"] == "succeeded", "{done}");
    let image = cluster.get(&format!("/v1/jobs/{long}/image"))?;
    ensure!(
        image.status == 200,
        "the long job's image: {}",
        text(&image)
    );

    // Space comes back: healthy again, batches taken again.
    std::fs::remove_file(disk.path().join("filler"))?;
    cluster.wait_until(T, "healthz says ok again", |c| Ok(health(c)?.0 == 200))?;
    let (_, body) = health(cluster)?;
    ensure!(
        body["status"] == "ok" && body["store"]["error"].is_null(),
        "{body}"
    );
    let batch = submit_batch(cluster, 200)?;
    ensure!(batch.status == 202, "a batch refused after space came back");
    batches.push(batch);

    // After another kill -9, every accepted batch is there whole and no refused job is.
    cluster.kill_coordinator();
    cluster.start_coordinator()?;
    check_batches(cluster, &batches, false)?;
    // What the store did, for the record (`--nocapture`).
    for line in cluster
        .coordinator_log()
        .lines()
        .filter(|l| l.contains("drover_coordinator::store"))
    {
        println!("{line}");
    }
    Ok(())
}
