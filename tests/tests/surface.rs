//! End-to-end tests of the REST surface: bad input, compatibility endpoints, metrics, the CLI, the
//! OpenAPI document, the status page and the logs.

use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries, png_size};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

#[test]
fn bad_input_gets_a_clear_json_error() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("judge", "sd15").env("SIM_STEP_MS", "500"))?;
    cluster.wait_for_online(&["judge"], T)?;
    let cases: [(&str, &[u8], u16, &str); 10] = [
        ("/v1/jobs", b"{not json", 400, "body"),
        (
            "/v1/jobs",
            br#"{"prompt":"x","colour":"red"}"#,
            400,
            "colour",
        ),
        ("/v1/jobs", br#"{"prompt":"x","steps":151}"#, 400, "steps"),
        (
            "/v1/jobs",
            br#"{"prompt":"x","sampler":"DPM adaptive"}"#,
            400,
            "sampler",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt":"x","sampler_name":"UniPC 9"}"#,
            400,
            "sampler_name",
        ),
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

/// What an A1111 UI does when it connects: lists models, sets a checkpoint, renders, polls
/// progress; the checkpoint it picks is the model its calls render with.
#[test]
fn a1111_discovery_calls_list_models_and_pick_the_checkpoint() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("small", "sd15"))?;
    cluster.add_node(NodeSpec::sim("large", "sdxl"))?;
    cluster.wait_for_online(&["small", "large"], T)?;
    let listed = cluster.get("/sdapi/v1/sd-models")?.json()?;
    let listed = listed.as_array().expect("a list").clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let title_of = |family: &str| {
        listed
            .iter()
            .find(|m| m["family"] == family)
            .and_then(|m| m["title"].as_str())
            .map(String::from)
            .expect("a title")
    };
    let (sd15, sdxl) = (title_of("sd15"), title_of("sdxl"));

    let ran_on = |body: serde_json::Value| -> anyhow::Result<String> {
        let reply = cluster.post("/sdapi/v1/txt2img", &body)?;
        reply.expect_status(200);
        let info: serde_json::Value =
            serde_json::from_str(reply.json()?["info"].as_str().expect("info"))?;
        let job = cluster.job(info["job_ids"][0].as_str().expect("a job id"))?;
        Ok(job["node_id"].as_str().unwrap_or_default().to_string())
    };
    let (small, large) = (
        cluster.node_id("small")?.expect("id"),
        cluster.node_id("large")?.expect("id"),
    );
    let reply = cluster.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": sdxl, "CLIP_stop_at_last_layers": 2}),
    )?;
    reply.expect_status(200);
    assert_eq!(
        cluster.get("/sdapi/v1/options")?.json()?["sd_model_checkpoint"],
        sdxl
    );
    let body = json!({"prompt": "a fox", "steps": 2, "width": 64, "height": 64});
    assert_eq!(
        ran_on(body.clone())?,
        large,
        "the checkpoint set in options"
    );
    let mut overridden = body;
    overridden["override_settings"] = json!({"sd_model_checkpoint": sd15});
    assert_eq!(ran_on(overridden)?, small, "override_settings wins");
    let progress = cluster.get("/sdapi/v1/progress")?.json()?;
    assert_eq!(progress["progress"], 1.0, "{progress}");
    assert_eq!(
        (
            progress["state"]["job_count"].as_u64(),
            progress["state"]["job_no"].as_u64()
        ),
        (Some(1), Some(1))
    );

    let reply = cluster.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "gone [0000000000]"}),
    )?;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()?["error"]["details"]["field"],
        "sd_model_checkpoint"
    );
    for path in ["/sdapi/v1/loras", "/sdapi/v1/upscalers"] {
        assert!(cluster.get(path)?.json()?.is_array(), "{path}");
    }
    assert_eq!(cluster.get("/sdapi/v1/cmd-flags")?.json()?["api"], true);

    // OpenAI's image generations: base64 or URLs on this coordinator, errors in OpenAI's shape.
    let reply = cluster.post(
        "/v1/images/generations",
        &json!({"prompt": "a fox", "n": 2, "size": "64x64", "model": "dall-e-3",
                "response_format": "b64_json", "seed": 3, "quality": "hd", "steps": 2}),
    )?;
    reply.expect_status(200);
    let body = reply.json()?;
    assert!(body["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[1]["b64_json"].as_str().expect("b64_json"))?;
    assert_eq!(png_size(&png), (64, 64));
    let reply = cluster.post(
        "/v1/images/generations",
        &json!({"prompt": "a fox", "size": "64x64", "steps": 2}),
    )?;
    let url = reply.json()?["data"][0]["url"]
        .as_str()
        .expect("a url by default")
        .to_string();
    let path = url
        .strip_prefix(&cluster.base_url())
        .expect("on this coordinator");
    assert_eq!(png_size(&cluster.get(path)?.body), (64, 64));
    let reply = cluster.post(
        "/v1/images/generations",
        &json!({"prompt": "a fox", "n": 9}),
    )?;
    assert_eq!(reply.status, 400);
    let error = reply.json()?;
    assert_eq!(
        (
            &error["error"]["type"],
            &error["error"]["param"],
            &error["error"]["code"]
        ),
        (
            &json!("invalid_request_error"),
            &json!("n"),
            &json!("invalid_request")
        ),
        "{error}"
    );
    Ok(())
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
            .starts_with("application/openmetrics-text")
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
        "--sampler",
        "Euler a",
        "-o",
        out.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stderr}");
    // Not a terminal: one line per event (a terminal gets an indicatif bar instead).
    assert!(stderr.contains("step 3/3"), "{stderr}");
    assert!(stdout.contains("seed 9"), "{stdout}");
    assert_eq!(png_size(&std::fs::read(&out)?), (128, 64));
    let refused = cli(&["generate", "a red fox", "--sampler", "DPM adaptive"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unknown sampler"), "{stderr}");

    // img2img from a file, with a mask: the result has the source's size and says so.
    let source = dir.path().join("source.png");
    let mask = dir.path().join("mask.png");
    std::fs::write(
        &source,
        drover_tests::png_of(96, 64, |x, _| [x as u8, 90, 200]),
    )?;
    std::fs::write(
        &mask,
        drover_tests::png_of(96, 64, |x, _| [if x < 48 { 255 } else { 0 }; 3]),
    )?;
    let edited = dir.path().join("edited.png");
    let run = cli(&[
        "img2img",
        source.to_str().expect("utf-8 path"),
        "a blue fox",
        "--strength",
        "0.6",
        "--mask",
        mask.to_str().expect("utf-8 path"),
        "--steps",
        "2",
        "-o",
        edited.to_str().expect("utf-8 path"),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let png = std::fs::read(&edited)?;
    assert_eq!(png_size(&png), (96, 64));
    let rgb = drover_tests::png_rgb(&png);
    assert_eq!(
        &rgb[(10 * 96 + 80) * 3..(10 * 96 + 80) * 3 + 3],
        [80, 90, 200],
        "kept"
    );

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
    let models = cli(&["models"]);
    assert!(String::from_utf8_lossy(&models.stdout).contains("sim-sd15"));
    // A node without a catalogue keeps its one model: the order is refused with the reason.
    let order = cli(&["model", "unload", "painter", "sim-sd15"]);
    assert!(!order.status.success());
    assert!(
        String::from_utf8_lossy(&order.stderr).contains("keeps its one model loaded"),
        "{}",
        String::from_utf8_lossy(&order.stderr)
    );

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
fn openapi_documents_every_route_the_server_answers() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let doc = cluster.get("/openapi.json")?.json()?;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let id = "00000000-0000-4000-8000-000000000000";
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path.replace("{id}", id);
        for (method, op) in ops.as_object().expect("operations") {
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
            // Whatever it answers is one of the answers it documents.
            assert!(
                op["responses"].get(reply.status.to_string()).is_some(),
                "{method} {path}: {} is not documented: {body}",
                reply.status
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 45, "{checked} operations");
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
