//! End-to-end tests: a real coordinator and real node processes, talking gRPC, driven over REST —
//! the job's paths (routing, node loss, coordinator restarts, events, batches).

use std::collections::HashMap;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries, png_size};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

#[test]
fn generate_round_trip() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let node_id = cluster.node_id("painter")?.expect("registered");

    let body =
        json!({"prompt": "a lighthouse at dusk", "size": "256x192", "seed": 1234, "steps": 3});
    let reply = cluster.post("/v1/generate", &body)?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(reply.header("x-seed"), Some("1234"));
    assert_eq!(reply.header("x-node-id"), Some(node_id.as_str()));
    assert_eq!(png_size(&reply.body), (256, 192));
    let job_id = reply.header("x-job-id").expect("job id header").to_string();

    // The job is recorded, and its image is served again byte for byte.
    let job = cluster.job(&job_id)?;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["node_id"], node_id.as_str());
    assert_eq!(job["progress"], json!([3, 3]));
    let image = cluster.get(job["image_url"].as_str().expect("image url"))?;
    assert_eq!(image.body, reply.body);

    // Same prompt and seed, same image; a random seed is reported back.
    let again = cluster.post("/v1/generate", &body)?;
    assert_eq!(again.body, reply.body);
    let random = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a lighthouse at dusk", "size": "64x64"}),
    )?;
    assert_eq!(random.status, 200);
    let seed: u64 = random.header("x-seed").expect("seed").parse()?;
    assert!(seed < 1 << 31);

    // The asynchronous path: 202, then poll, then fetch; family default size when none is given.
    let id = cluster.submit(&json!({"prompt": "a red kite"}))?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["size"], json!({"width": 512, "height": 512}));
    let image = cluster.get(&format!("/v1/jobs/{id}/image"))?;
    assert_eq!(png_size(&image.body), (512, 512));
    Ok(())
}

#[test]
fn each_family_gets_only_its_own_jobs() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("classic", "sd15"))?;
    cluster.add_node(NodeSpec::sim("xl", "sdxl"))?;
    cluster.wait_for_online(&["classic", "xl"], T)?;
    let ids: HashMap<&str, String> = [("sd15", "classic"), ("sdxl", "xl")]
        .into_iter()
        .map(|(family, name)| (family, cluster.node_id(name).unwrap().expect("registered")))
        .collect();

    let mut jobs = Vec::new();
    for i in 0..8 {
        let family = if i % 2 == 0 { "sd15" } else { "sdxl" };
        let id = cluster
            .submit(&json!({"prompt": format!("job {i}"), "model": family, "size": "128x128"}))?;
        jobs.push((family, id));
    }
    for (family, id) in &jobs {
        let job = cluster.wait_for_job(id, T)?;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(
            job["node_id"],
            ids[family].as_str(),
            "a {family} job ran on the wrong node: {job}"
        );
    }

    // Without a model, either family may serve; the default size follows the serving family.
    let id = cluster.submit(&json!({"prompt": "anything"}))?;
    let job = cluster.wait_for_job(&id, T)?;
    let expected = if job["node_id"] == ids["sdxl"].as_str() {
        1024
    } else {
        512
    };
    assert_eq!(job["size"]["width"], expected);

    // A family nobody serves is refused at once, with a reason per node.
    let reply = cluster.post("/v1/jobs", &json!({"prompt": "x", "model": "sd2"}))?;
    assert_eq!(reply.status, 422);
    let error = reply.json()?;
    let reasons = error["error"]["details"]["nodes"]
        .as_array()
        .expect("per-node reasons")
        .clone();
    assert_eq!(reasons.len(), 2, "{error}");
    assert!(
        reasons
            .iter()
            .all(|r| r["reason"] == "wrong_family" && r["wanted"] == "sd2"),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_silent_node_goes_offline_and_its_jobs_move() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let quiet = cluster.add_node(NodeSpec::sim("quiet", "sd15").env("SIM_STEP_MS", "300"))?;
    cluster.add_node(NodeSpec::sim("steady", "sd15"))?;
    cluster.wait_for_online(&["quiet", "steady"], T)?;
    let quiet_id = cluster.node_id("quiet")?.expect("registered");
    let steady_id = cluster.node_id("steady")?.expect("registered");

    // Give "quiet" a job, then freeze it mid-job: no heartbeats, no result, session still open.
    let mut jobs = Vec::new();
    let mut frozen_job = None;
    cluster.wait_until(T, "a job runs on quiet", |c| {
        let id = c.submit(&json!({"prompt": "x", "size": "64x64", "steps": 10}))?;
        let job = c.job(&id)?;
        jobs.push(id.clone());
        if job["lease"]["node_id"] == quiet_id.as_str() {
            frozen_job = Some(id);
            return Ok(true);
        }
        Ok(false)
    })?;
    cluster.signal_node(quiet, "STOP")?;
    cluster.wait_for_state("quiet", "offline", Duration::from_secs(10))?;
    assert_eq!(cluster.node_state("steady")?.as_deref(), Some("online"));

    // Its job was re-queued and finished on the other node; the lost attempt is on record.
    let frozen_job = frozen_job.expect("a job was placed on quiet");
    let job = cluster.wait_for_job(&frozen_job, T)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["node_id"], steady_id.as_str());
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["node_id"], quiet_id.as_str());
    assert_eq!(attempts[0]["outcome"], "node went offline");
    for id in &jobs {
        assert_eq!(cluster.wait_for_job(id, T)?["state"], "succeeded");
    }

    // Thawed, it reconnects and is online again.
    cluster.signal_node(quiet, "CONT")?;
    cluster.wait_for_state("quiet", "online", T)?;
    Ok(())
}

#[test]
fn jobs_of_a_killed_node_finish_on_its_peer() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let victim = cluster.add_node(NodeSpec::sim("victim", "sd15").env("SIM_STEP_MS", "200"))?;
    cluster.wait_for_online(&["victim"], T)?;
    let victim_id = cluster.node_id("victim")?.expect("registered");
    let ids: Vec<String> = (0..4)
        .map(|i| cluster.submit(&json!({"prompt": format!("p{i}"), "size": "64x64", "steps": 10})))
        .collect::<anyhow::Result<_>>()?;
    cluster.wait_until(T, "the victim runs a job", |c| {
        Ok(c.job(&ids[0])?["state"] == "running")
    })?;
    cluster.kill_node(victim);
    cluster.add_node(NodeSpec::sim("survivor", "sd15"))?;
    for id in &ids {
        let job = cluster.wait_for_job(id, T)?;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_ne!(job["node_id"], victim_id.as_str());
    }
    let first = cluster.job(&ids[0])?;
    assert_eq!(
        first["attempts"][0]["node_id"],
        victim_id.as_str(),
        "{first}"
    );
    assert_eq!(cluster.node_state("victim")?.as_deref(), Some("offline"));
    Ok(())
}

#[test]
fn coordinator_restart_keeps_registry_queue_and_results() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let node = cluster.add_node(NodeSpec::sim("keeper", "sd15"))?;
    cluster.wait_for_online(&["keeper"], T)?;
    let done = cluster.submit(&json!({"prompt": "before the crash", "size": "64x64"}))?;
    assert_eq!(cluster.wait_for_job(&done, T)?["state"], "succeeded");
    let image = cluster.get(&format!("/v1/jobs/{done}/image"))?.body;

    // With the node gone, jobs are accepted (a capable node is registered) and wait in the queue.
    cluster.kill_node(node);
    cluster.wait_for_state("keeper", "offline", T)?;
    let queued: Vec<String> = (0..3)
        .map(|i| cluster.submit(&json!({"prompt": format!("queued {i}"), "size": "64x64"})))
        .collect::<anyhow::Result<_>>()?;
    for id in &queued {
        assert_eq!(cluster.job(id)?["state"], "queued");
    }

    cluster.kill_coordinator();
    cluster.start_coordinator()?;
    let nodes = cluster.nodes()?;
    assert_eq!(nodes.len(), 1, "the registry survived: {nodes:?}");
    assert_eq!(nodes[0]["name"], "keeper");
    assert_eq!(cluster.job(&done)?["state"], "succeeded");
    assert_eq!(cluster.get(&format!("/v1/jobs/{done}/image"))?.body, image);

    cluster.start_node(node)?;
    for id in &queued {
        assert_eq!(cluster.wait_for_job(id, T)?["state"], "succeeded");
    }
    Ok(())
}

#[test]
fn nodes_reconnect_when_the_coordinator_comes_back() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("loyal", "sdxl"))?;
    cluster.wait_for_online(&["loyal"], T)?;
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_millis(700));
    cluster.start_coordinator()?;
    cluster.wait_for_online(&["loyal"], T)?;
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "back again", "size": "64x64"}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    Ok(())
}

#[test]
fn job_events_stream_progress_until_done() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("SIM_STEP_MS", "150"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let id = cluster.submit(&json!({"prompt": "a fox", "size": "64x64", "steps": 3}))?;
    let reply = cluster.get(&format!("/v1/jobs/{id}/events"))?;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(reply.body)?;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(
        matches!(kinds.first(), Some(&"queued" | &"assigned")),
        "{kinds:?}"
    );
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["step"].as_u64())
        .collect();
    assert_eq!(steps.last(), Some(&3), "{text}");
    let done = events.last().expect("a final event");
    assert_eq!(done["event"], "done", "{text}");
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["image_url"], format!("/v1/jobs/{id}/image"));

    // A finished job's stream is its final event alone; an unknown job is a JSON 404.
    let again = String::from_utf8(cluster.get(&format!("/v1/jobs/{id}/events"))?.body)?;
    assert_eq!(again.matches("event: done").count(), 1, "{again}");
    assert!(!again.contains("progress"), "{again}");
    let missing = cluster.get("/v1/jobs/00000000-0000-4000-8000-000000000000/events")?;
    assert_eq!(missing.status, 404);
    assert!(missing.json()?["error"]["message"].is_string());
    Ok(())
}

#[test]
fn a_batch_is_accepted_whole_or_not_at_all() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("SIM_STEP_MS", "5"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let reply = cluster.post(
        "/v1/jobs/batch",
        &json!({"jobs": [
            {"prompt": "one", "size": "64x64"},
            {"prompt": "two", "size": "64x64", "seed": 3},
            {"prompt": "three", "size": "64x64", "priority": 2}
        ]}),
    )?;
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let jobs = reply.json()?["jobs"].as_array().cloned().expect("jobs");
    assert_eq!(jobs.len(), 3);
    for (job, prompt) in jobs.iter().zip(["one", "two", "three"]) {
        let id = job["id"].as_str().expect("id");
        let done = cluster.wait_for_job(id, T)?;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["spec"]["prompt"], prompt, "answered in order");
    }
    assert_eq!(jobs[1]["id"].as_str().map(|id| id.len()), Some(36));

    // One bad job refuses the whole batch, naming its place; nothing of it is accepted.
    let refusals: [(Value, u16, &str); 3] = [
        (
            json!({"jobs": [{"prompt": "fine"}, {"prompt": "bad", "steps": 0}]}),
            400,
            "steps",
        ),
        (
            json!({"jobs": [{"prompt": "fine"}, {"prompt": "odd", "colour": "red"}]}),
            400,
            "colour",
        ),
        (
            json!({"jobs": [{"prompt": "fine"}, {"prompt": "large", "model": "sdxl"}]}),
            422,
            "",
        ),
    ];
    for (body, status, field) in refusals {
        let reply = cluster.post("/v1/jobs/batch", &body)?;
        assert_eq!(
            reply.status,
            status,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = reply.json()?;
        assert_eq!(error["error"]["details"]["index"], 1, "{error}");
        if !field.is_empty() {
            assert_eq!(error["error"]["details"]["field"], field, "{error}");
        }
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("job 1 of the batch")),
            "{error}"
        );
    }
    for (body, field) in [
        (json!({"jobs": []}), "jobs"),
        (json!({"jobs": [{"prompt": "x"}], "extra": 1}), "extra"),
        (json!([{"prompt": "x"}]), "body"),
        (
            json!({"jobs": (0..257).map(|i| json!({"prompt": format!("p{i}")})).collect::<Vec<_>>()}),
            "jobs",
        ),
    ] {
        let reply = cluster.post("/v1/jobs/batch", &body)?;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()?["error"]["details"]["field"], field);
    }
    let metrics = String::from_utf8(cluster.get("/metrics")?.body)?;
    assert!(
        metrics.lines().any(|l| l == "drover_jobs_accepted_total 3"),
        "only the first batch was accepted:\n{metrics}"
    );
    assert_eq!(cluster.get("/v1/jobs")?.json()?, json!([]));
    Ok(())
}

#[test]
fn a_retried_submission_with_an_idempotency_key_gets_its_first_jobs_across_a_restart()
-> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("once", "sd15"))?;
    cluster.wait_for_online(&["once"], T)?;
    let body = json!({"prompt": "a lighthouse", "size": "64x64"});
    let keyed = |cluster: &ClusterSandbox, path: &str, body: &serde_json::Value, key: &str| {
        cluster.post_with_headers(path, body, &[("Idempotency-Key", key)])
    };
    let first = keyed(&cluster, "/v1/jobs", &body, "order-1")?;
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let id = first.json()?["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(first.header("idempotent-replayed"), None);
    // The retry (its first answer lost) gets the same job, marked as given again.
    let again = keyed(&cluster, "/v1/jobs", &body, "order-1")?;
    assert_eq!(again.status, 202);
    assert_eq!(again.json()?["id"], id.as_str());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // The same key with another body, or a key that is not one, is refused.
    let other = keyed(
        &cluster,
        "/v1/jobs",
        &json!({"prompt": "a harbour", "size": "64x64"}),
        "order-1",
    )?;
    assert_eq!(
        other.status,
        422,
        "{}",
        String::from_utf8_lossy(&other.body)
    );
    assert!(String::from_utf8_lossy(&other.body).contains("Idempotency-Key"));
    let long = "k".repeat(256);
    let bad = keyed(&cluster, "/v1/jobs", &body, &long)?;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("Idempotency-Key"));
    // A batch: the same jobs in the same order.
    let batch =
        json!({"jobs": [{"prompt": "one", "size": "64x64"}, {"prompt": "two", "size": "64x64"}]});
    let ids = |reply: &drover_tests::Reply| -> anyhow::Result<Vec<String>> {
        Ok(reply.json()?["jobs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    };
    let b1 = keyed(&cluster, "/v1/jobs/batch", &batch, "batch-1")?;
    assert_eq!(b1.status, 202);
    let batch_ids = ids(&b1)?;
    assert_eq!(batch_ids.len(), 2);
    assert_eq!(
        ids(&keyed(&cluster, "/v1/jobs/batch", &batch, "batch-1")?)?,
        batch_ids
    );
    assert_eq!(cluster.wait_for_job(&id, T)?["state"], "succeeded");
    let accepted = |cluster: &ClusterSandbox| -> anyhow::Result<String> {
        let metrics = String::from_utf8(cluster.get("/metrics")?.body)?;
        Ok(metrics
            .lines()
            .find(|l| l.starts_with("drover_jobs_accepted_total"))
            .unwrap_or("drover_jobs_accepted_total 0")
            .to_string())
    };
    // Three jobs for five submissions.
    assert_eq!(accepted(&cluster)?, "drover_jobs_accepted_total 3");

    // After a kill -9 and a restart the keys come back from the store: finished or not, the
    // retry gets the first jobs, and nothing ran twice.
    cluster.kill_coordinator();
    cluster.start_coordinator()?;
    let after = keyed(&cluster, "/v1/jobs", &body, "order-1")?;
    assert_eq!(after.status, 202);
    assert_eq!(after.json()?["id"], id.as_str());
    assert_eq!(after.json()?["state"], "succeeded");
    assert_eq!(
        ids(&keyed(&cluster, "/v1/jobs/batch", &batch, "batch-1")?)?,
        batch_ids
    );
    assert_eq!(accepted(&cluster)?, "drover_jobs_accepted_total 0");
    Ok(())
}

#[test]
fn a_late_node_is_suspect_and_gets_no_work_then_offline_then_back() -> anyhow::Result<()> {
    // Heartbeats every 100 ms: suspect after 300 ms of silence, offline after 4 s.
    let mut cluster = ClusterSandbox::start(binaries!(), &[("DROVER_OFFLINE_GRACE_MS", "4000")])?;
    let late = cluster.add_node(NodeSpec::sim("late", "sd15").env("SIM_STEP_MS", "5"))?;
    cluster.add_node(NodeSpec::sim("steady", "sd15").env("SIM_STEP_MS", "5"))?;
    cluster.wait_for_online(&["late", "steady"], T)?;
    let steady = cluster.node_id("steady")?.expect("registered");
    let late_id = cluster.node_id("late")?.expect("registered");

    cluster.signal_node(late, "STOP")?;
    cluster.wait_for_state("late", "suspect", Duration::from_secs(3))?;
    // While suspect (its session still open), it gets nothing new: every job goes to steady.
    for i in 0..4 {
        let id = cluster.submit(&json!({"prompt": format!("while late {i}"), "size": "64x64"}))?;
        let job = cluster.wait_for_job(&id, T)?;
        assert_eq!(job["node_id"], steady.as_str(), "{job}");
        assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    }
    assert_eq!(cluster.node_state("late")?.as_deref(), Some("suspect"));
    cluster.wait_for_state("late", "offline", Duration::from_secs(8))?;

    // Thawed: online again, and it takes work again.
    cluster.signal_node(late, "CONT")?;
    cluster.wait_for_state("late", "online", T)?;
    cluster.wait_until(T, "a job runs on the node that came back", |c| {
        let id = c.submit(&json!({"prompt": "after", "size": "64x64"}))?;
        Ok(c.wait_for_job(&id, T)?["node_id"] == late_id.as_str())
    })?;
    Ok(())
}
