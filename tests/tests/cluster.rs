//! End-to-end tests: a real coordinator and real node processes, talking gRPC, driven over REST.

use std::collections::HashMap;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("a valid png");
    (reader.info().width, reader.info().height)
}

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
fn a_wrong_node_token_is_refused() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[("DROVER_NODE_TOKEN", "s3cret")])?;
    let wrong =
        cluster.add_node(NodeSpec::sim("intruder", "sd15").env("DROVER_NODE_TOKEN", "guess"))?;
    let missing = cluster.add_node(NodeSpec::sim("forgetful", "sd15"))?;
    cluster.add_node(NodeSpec::sim("member", "sd15").env("DROVER_NODE_TOKEN", "s3cret"))?;
    assert_eq!(cluster.wait_node_exit(wrong, T)?, Some(2));
    assert!(
        cluster.node_log(wrong).contains("wrong node token"),
        "{}",
        cluster.node_log(wrong)
    );
    assert_eq!(cluster.wait_node_exit(missing, T)?, Some(2));
    assert!(cluster.node_log(missing).contains("requires a node token"));
    cluster.wait_for_online(&["member"], T)?;
    let names: Vec<Value> = cluster.nodes()?.iter().map(|n| n["name"].clone()).collect();
    assert_eq!(names, vec![json!("member")]);
    Ok(())
}

#[test]
fn bad_input_gets_a_clear_json_error() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("judge", "sd15").env("SIM_STEP_MS", "500"))?;
    cluster.wait_for_online(&["judge"], T)?;
    let cases: [(&str, &[u8], u16, &str); 8] = [
        ("/v1/jobs", b"{not json", 400, "body"),
        (
            "/v1/jobs",
            br#"{"prompt":"x","colour":"red"}"#,
            400,
            "colour",
        ),
        ("/v1/jobs", br#"{"prompt":"x","steps":99}"#, 400, "steps"),
        (
            "/v1/jobs",
            br#"{"prompt":"x","size":"100x100"}"#,
            400,
            "size",
        ),
        ("/v1/jobs", br#"{"prompt":"x","seed":-5}"#, 400, "seed"),
        (
            "/v1/generate",
            br#"{"prompt":"x","guidance_scale":30}"#,
            400,
            "guidance_scale",
        ),
        (
            "/v1/generate",
            br#"{"prompt":"x","loras":[{"name":"nope"}]}"#,
            422,
            "",
        ),
        (
            "/v1/jobs",
            br#"{"prompt":"x","style_lora":{"style":"ink","level":1}}"#,
            422,
            "",
        ),
    ];
    for (path, body, status, field) in cases {
        let reply = cluster.post_raw(path, body)?;
        let text = String::from_utf8_lossy(body);
        assert_eq!(
            reply.status,
            status,
            "{text}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = reply.json()?;
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        if !field.is_empty() {
            assert_eq!(error["error"]["details"]["field"], field, "{text}: {error}");
            assert_eq!(error["error"]["code"], "invalid_request");
        }
    }
    let missing_lora = cluster
        .post_raw("/v1/jobs", br#"{"prompt":"x","loras":[{"name":"nope"}]}"#)?
        .json()?;
    assert_eq!(
        missing_lora["error"]["details"]["nodes"][0]["reason"],
        "missing_lora"
    );

    for path in [
        "/v1/jobs/00000000-0000-0000-0000-000000000000",
        "/v1/jobs/not-an-id",
        "/v1/jobs/x/image",
        "/nope",
    ] {
        let reply = cluster.get(path)?;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.json()?["error"]["code"], "not_found");
    }
    // A job without an image yet: 409, not 404 or 5xx.
    let id = cluster.submit(&json!({"prompt": "slow", "size": "64x64"}))?;
    let reply = cluster.get(&format!("/v1/jobs/{id}/image"))?;
    assert_eq!(
        reply.status,
        409,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // Nothing was lost: the valid job still completes.
    assert_eq!(cluster.wait_for_job(&id, T)?["state"], "succeeded");
    Ok(())
}

/// Decodes standard base64 (test helper for the A1111 answer).
fn unbase64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (u32::from(value(c)) << (18 - 6 * i)));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn compatibility_endpoints_serve_lcm_server_and_a1111_clients() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;

    // The Python LCM server's body, with a field Drover does not use and seed -1 (random).
    let reply = cluster.post(
        "/generate",
        &json!({"prompt": "a red fox", "size": "320x256", "num_inference_steps": 4,
                "guidance_scale": 1.5, "seed": -1, "lcm_origin_steps": 50}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(png_size(&reply.body), (320, 256));
    let seed: i64 = reply.header("x-seed").expect("seed header").parse()?;
    assert!((0..=i64::from(i32::MAX)).contains(&seed));

    // A1111 txt2img: a batch of 2 gets seeds s and s + 1, base64 PNGs and an info string.
    let reply = cluster.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red fox", "negative_prompt": "", "steps": 3, "cfg_scale": 7,
                "width": 256, "height": 256, "seed": 5, "batch_size": 2,
                "sampler_name": "Euler a", "override_settings": {}}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json()?;
    let images = body["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for image in images {
        assert_eq!(
            png_size(&unbase64(image.as_str().expect("base64"))),
            (256, 256)
        );
    }
    let info: Value = serde_json::from_str(body["info"].as_str().expect("info string"))?;
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(body["parameters"]["sampler_name"], "Euler a");

    // The fields they use are still validated, by name.
    for (path, bad, field) in [
        (
            "/generate",
            json!({"prompt": "x", "num_inference_steps": "four"}),
            "num_inference_steps",
        ),
        ("/generate", json!({"size": "512x512"}), "prompt"),
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "batch_size": 50}),
            "batch_size",
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "width": 100}),
            "size",
        ),
    ] {
        let reply = cluster.post(path, &bad)?;
        assert_eq!(
            reply.status,
            400,
            "{path} {bad}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = reply.json()?;
        assert_eq!(
            error["error"]["details"]["field"], field,
            "{path} {bad}: {error}"
        );
    }
    Ok(())
}

#[test]
fn metrics_count_jobs_rejections_and_nodes() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let ok = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a fox", "size": "64x64", "steps": 1}),
    )?;
    assert_eq!(ok.status, 200);
    let bad = cluster.post("/v1/jobs", &json!({"prompt": "a fox", "steps": 0}))?;
    assert_eq!(bad.status, 400);
    let none = cluster.post("/v1/jobs", &json!({"prompt": "a fox", "model": "sdxl"}))?;
    assert_eq!(none.status, 422);

    let reply = cluster.get("/metrics")?;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(reply.body)?;
    for line in [
        "drover_jobs_accepted_total 1",
        "drover_jobs_finished_total{outcome=\"succeeded\"} 1",
        "drover_rejections_total{reason=\"invalid_request\"} 1",
        "drover_rejections_total{reason=\"infeasible\"} 1",
        "drover_job_end_to_end_seconds_count 1",
        "drover_job_queue_wait_seconds_count 1",
        "drover_nodes{state=\"online\"} 1",
        "drover_node_free_slots{node=\"painter\",family=\"sd15\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
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
fn the_drover_cli_generates_with_progress_and_manages_nodes() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("SIM_STEP_MS", "100"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("fox.png");
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-cli"))
            .args(args)
            .env("DROVER_URL", cluster.base_url())
            .env_remove("DROVER_ADMIN_TOKEN")
            .output()
            .expect("run the cli")
    };
    let run = cli(&[
        "generate",
        "a red fox",
        "--size",
        "128x64",
        "--steps",
        "3",
        "--seed",
        "9",
        "-o",
        out.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("[##############################] 3/3"),
        "{stderr}"
    );
    assert!(stdout.contains("seed 9"), "{stdout}");
    assert_eq!(png_size(&std::fs::read(&out)?), (128, 64));

    let nodes = cli(&["nodes"]);
    assert!(String::from_utf8_lossy(&nodes.stdout).contains("painter"));
    let drain = cli(&["drain", "painter"]);
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    assert!(String::from_utf8_lossy(&drain.stdout).contains("draining: true"));
    assert_eq!(cluster.node_state("painter")?.as_deref(), Some("draining"));
    let jobs = cli(&["jobs"]);
    assert!(jobs.status.success());

    let cancel = cli(&["cancel", "00000000-0000-4000-8000-000000000000"]);
    assert!(!cancel.status.success());
    assert!(
        String::from_utf8_lossy(&cancel.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    Ok(())
}

#[test]
fn api_keys_and_secret_files_guard_the_client_api() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "# studio keys\nkey-alpha\nkey-beta # render box\nkey-tight name=intern rate=3 active=1\n",
    )?;
    let admin = dir.path().join("admin");
    std::fs::write(&admin, "admin-secret\n")?;
    let (keys_s, admin_s) = (keys.display().to_string(), admin.display().to_string());
    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_API_KEYS_FILE", keys_s.as_str()),
            ("DROVER_ADMIN_TOKEN_FILE", admin_s.as_str()),
        ],
    )?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let body = json!({"prompt": "a fox", "size": "64x64", "steps": 1});

    // Without a key, or with a wrong one: 401 with a JSON reason.
    let reply = cluster.post("/v1/generate", &body)?;
    assert_eq!(reply.status, 401);
    assert!(
        reply.json()?["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("API key")
    );
    let reply = cluster.post_with_token("/v1/jobs", "key-gamma")?;
    assert_eq!(reply.status, 401);
    assert_eq!(
        cluster.post("/generate", &json!({"prompt": "x"}))?.status,
        401
    );
    // Health, metrics, nodes and styles stay open.
    assert_eq!(cluster.get("/healthz")?.status, 200);

    // A key from the file works, through the CLI too; the admin token from its file drains.
    let cli = |args: &[&str], key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-cli"))
            .args(args)
            .env("DROVER_URL", cluster.base_url())
            .env("DROVER_API_KEY", key)
            .env("DROVER_ADMIN_TOKEN", "admin-secret")
            .output()
            .expect("run the cli")
    };
    let out = dir.path().join("fox.png");
    let run = cli(
        &[
            "generate",
            "a fox",
            "--size",
            "64x64",
            "--steps",
            "1",
            "-o",
            out.to_str().expect("utf-8"),
        ],
        "key-beta",
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(png_size(&std::fs::read(&out)?), (64, 64));
    let denied = cli(&["jobs"], "nope");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("unknown API key"));
    let drain = cli(&["drain", "painter"], "key-alpha");
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    let wrong_admin = cluster.post_with_token(
        &format!(
            "/v1/nodes/{}/resume",
            cluster.node_id("painter")?.expect("id")
        ),
        "key-alpha",
    )?;
    assert_eq!(
        wrong_admin.status, 403,
        "a client key may not call admin endpoints"
    );
    assert_eq!(wrong_admin.json()?["error"]["code"], "forbidden");
    let resume = cluster.post_with_token(
        &format!(
            "/v1/nodes/{}/resume",
            cluster.node_id("painter")?.expect("id")
        ),
        "admin-secret",
    )?;
    assert_eq!(resume.status, 200);

    // Per-key limits from the keys file: one unfinished job at a time, three submissions a minute.
    let slow = serde_json::to_vec(&json!({"prompt": "slow", "size": "64x64", "steps": 50}))?;
    let first = cluster.call_as("POST", "/v1/jobs", Some(&slow), Some("key-tight"))?;
    assert_eq!(first.status, 202);
    let first_id = first.json()?["id"].as_str().expect("id").to_string();
    let job_as = |c: &ClusterSandbox, id: &str| -> anyhow::Result<Value> {
        c.call_as("GET", &format!("/v1/jobs/{id}"), None, Some("key-alpha"))?
            .json()
    };
    assert_eq!(job_as(&cluster, &first_id)?["client"], "intern");
    let second = cluster.call_as("POST", "/v1/jobs", Some(&slow), Some("key-tight"))?;
    assert_eq!(second.status, 429);
    assert!(second.header("retry-after").is_some());
    let message = second.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("intern has 1 unfinished jobs"),
        "{message}"
    );
    // Other keys are not held back by it.
    let other = cluster.call_as("POST", "/v1/jobs", Some(&slow), Some("key-alpha"))?;
    assert_eq!(other.status, 202);
    let other_id = other.json()?["id"].as_str().expect("id").to_string();
    for id in [&first_id, &other_id] {
        cluster.call_as("DELETE", &format!("/v1/jobs/{id}"), None, Some("key-alpha"))?;
    }
    cluster.wait_until(T, "the cancelled job leaves the client's count", |c| {
        Ok(job_as(c, &first_id)?["state"] == "cancelled")
    })?;
    // Two tokens are spent (the refused submission counted); the third goes through, the
    // fourth is over the rate.
    let third = cluster.call_as("POST", "/v1/jobs", Some(&slow), Some("key-tight"))?;
    assert_eq!(
        third.status,
        202,
        "{}",
        String::from_utf8_lossy(&third.body)
    );
    let third_id = third.json()?["id"].as_str().expect("id").to_string();
    cluster.call_as(
        "DELETE",
        &format!("/v1/jobs/{third_id}"),
        None,
        Some("key-tight"),
    )?;
    cluster.wait_until(T, "the third job is cancelled", |c| {
        Ok(job_as(c, &third_id)?["state"] == "cancelled")
    })?;
    let fourth = cluster.call_as("POST", "/v1/jobs", Some(&slow), Some("key-tight"))?;
    assert_eq!(fourth.status, 429);
    let message = fourth.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("over its 3 submissions per minute"),
        "{message}"
    );
    let metrics = String::from_utf8(cluster.get("/metrics")?.body)?;
    assert!(
        metrics.contains("drover_rejections_total{reason=\"rate_limited\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("drover_rejections_total{reason=\"client_active_limit\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn openapi_documents_every_route_the_server_answers() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let doc = cluster.get("/openapi.json")?.json()?;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    let id = "00000000-0000-4000-8000-000000000000";
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path.replace("{id}", id);
        for method in ops.as_object().expect("operations").keys() {
            let reply = match method.as_str() {
                "get" => cluster.get(&concrete)?,
                "delete" => cluster.delete(&concrete)?,
                _ => cluster.post_raw(&concrete, b"{}")?,
            };
            // The router's own 404 says "route ..."; any other answer means the route exists.
            let body = String::from_utf8_lossy(&reply.body);
            assert!(
                !(reply.status == 404 && body.contains("\"route ")),
                "{method} {path} is documented but not routed"
            );
            assert!(
                reply.status < 500,
                "{method} {path}: {} {body}",
                reply.status
            );
            checked += 1;
        }
    }
    assert!(checked >= 16, "{checked} operations");
    Ok(())
}

#[test]
fn the_status_page_shows_nodes_and_running_jobs() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("SIM_STEP_MS", "400"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let id =
        cluster.submit(&json!({"prompt": "a <b>bold</b> fox", "size": "64x64", "steps": 20}))?;
    cluster.wait_until(T, "the job runs", |s| Ok(s.job(&id)?["state"] == "running"))?;
    let page = cluster.get("/")?;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap_or_default()
            .starts_with("text/html")
    );
    let html = String::from_utf8(page.body)?;
    assert!(
        html.contains("<td>painter</td><td>online</td><td>sim</td><td>sd15</td><td>1/2</td>"),
        "{html}"
    );
    assert!(html.contains(&id), "{html}");
    assert!(
        html.contains("a &lt;b&gt;bold&lt;/b&gt; fox"),
        "prompts are escaped: {html}"
    );
    cluster.delete(&format!("/v1/jobs/{id}"))?;
    Ok(())
}

#[test]
fn json_logs_follow_a_job_from_rest_through_grpc_to_the_worker() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[("DROVER_LOG_FORMAT", "json")])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("DROVER_LOG_FORMAT", "json"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let body = serde_json::to_vec(&json!({"prompt": "a fox", "size": "64x64", "steps": 2}))?;
    let response = ureq::post(&format!("{}/v1/generate", cluster.base_url()))
        .header("content-type", "application/json")
        .header("x-request-id", "trace-fox-42")
        .send(&body[..])?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-fox-42")
    );
    // A request without an id gets a fresh one.
    let health = ureq::get(&format!("{}/healthz", cluster.base_url())).call()?;
    let fresh = health
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(fresh.len(), 32, "{fresh}");

    let lines = |log: String| -> Vec<Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    };
    let coordinator = lines(cluster.coordinator_log());
    assert!(!coordinator.is_empty(), "the coordinator logs JSON lines");
    let accepted = coordinator
        .iter()
        .find(|l| l["fields"]["message"] == "job accepted")
        .expect("a job accepted line");
    assert_eq!(accepted["fields"]["trace_id"], "trace-fox-42");
    let job_id = accepted["fields"]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    assert!(
        coordinator
            .iter()
            .any(|l| l["fields"]["message"] == "job submitted"
                && l["span"]["request_id"] == "trace-fox-42"),
        "the REST handler logs inside the request's span"
    );
    assert!(coordinator.iter().any(
        |l| l["fields"]["message"] == "job leased" && l["fields"]["trace_id"] == "trace-fox-42"
    ));
    cluster.wait_until(T, "the node logs the finished job", |c| {
        Ok(c.node_log(0).contains("job finished"))
    })?;
    let node = lines(cluster.node_log(0));
    for message in ["job started", "job finished"] {
        let line = node
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("a {message} line"));
        assert_eq!(line["span"]["job_id"], job_id.as_str(), "{line}");
        assert_eq!(line["span"]["trace_id"], "trace-fox-42", "{line}");
    }
    Ok(())
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made now: (cert, key) PEM paths.
fn self_signed(dir: &std::path::Path, name: &str) -> anyhow::Result<(String, String)> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    Ok((cert.display().to_string(), key.display().to_string()))
}

#[test]
fn tls_protects_the_node_link_and_the_rest_api() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = self_signed(dir.path(), "coordinator")?;
    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_TLS_CERT", cert.as_str()),
            ("DROVER_TLS_KEY", key.as_str()),
            ("DROVER_HTTP_TLS", "1"),
        ],
    )?;
    assert!(cluster.base_url().starts_with("https://"));
    // The node joins over TLS, trusting the coordinator's certificate (DROVER_CA_CERT).
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a fox", "size": "64x64", "steps": 2}),
    )?;
    assert_eq!(reply.status, 200);
    assert_eq!(png_size(&reply.body), (64, 64));

    // Plain HTTP gets no answer from the HTTPS port.
    let plain = ureq::get(&format!("http://127.0.0.1:{}/healthz", cluster.http_port())).call();
    assert!(
        plain.is_err(),
        "plain http answered: {:?}",
        plain.map(|r| r.status())
    );
    // Nor does a client that does not trust the certificate.
    assert!(
        ureq::get(&format!("{}/healthz", cluster.base_url()))
            .call()
            .is_err()
    );

    // A node trusting another certificate never joins, and says why.
    let (other, _) = self_signed(dir.path(), "impostor")?;
    let stranger =
        cluster.add_node(NodeSpec::sim("stranger", "sd15").env("DROVER_CA_CERT", &other))?;
    cluster.wait_until(T, "the stranger reports the certificate", |c| {
        Ok(c.node_log(stranger).contains("session failed"))
    })?;
    let log = cluster.node_log(stranger);
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    assert_eq!(cluster.node_state("stranger")?, None);

    // The CLI talks HTTPS with DROVER_CA_CERT.
    let nodes = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-cli"))
        .arg("nodes")
        .env("DROVER_URL", cluster.base_url())
        .env("DROVER_CA_CERT", &cert)
        .output()?;
    assert!(
        nodes.status.success(),
        "{}",
        String::from_utf8_lossy(&nodes.stderr)
    );
    assert!(String::from_utf8_lossy(&nodes.stdout).contains("painter"));

    // A key that does not match the certificate stops the coordinator at start, saying so.
    let (_, wrong_key) = self_signed(dir.path(), "mismatch")?;
    let out = std::process::Command::new(binaries!().coordinator)
        .env("DROVER_TLS_CERT", &cert)
        .env("DROVER_TLS_KEY", &wrong_key)
        .env("DROVER_DATA_DIR", dir.path().join("data"))
        .env("DROVER_HTTP_ADDR", "127.0.0.1:0")
        .env("DROVER_GRPC_ADDR", "127.0.0.1:0")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("do not make a usable identity"), "{stderr}");
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
