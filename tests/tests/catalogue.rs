//! Nodes that serve several models: cpu nodes with two SD1.5 demo models (other random weights)
//! and an SDXL one, under a memory budget. Each model's images equal what `drover-node render`
//! draws from that model alone; a budget that fits one model evicts and reloads; a pinned model
//! is never evicted; files that are not models are skipped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries, png_rgb};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(180);

fn node_tool(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binaries!().node).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "drover-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The model id `drover-node inspect` reads from `path`'s headers.
fn model_id(path: &Path) -> anyhow::Result<String> {
    let text = node_tool(&["inspect", "--json", &path.to_string_lossy()])?;
    let v: Value = serde_json::from_str(&text)?;
    Ok(v["model_id"].as_str().unwrap_or_default().to_string())
}

/// What `drover-node render` draws from `model` alone for one prompt and seed, as RGB bytes.
fn reference(model: &Path, out: &Path, seed: u64) -> anyhow::Result<Vec<u8>> {
    node_tool(&[
        "render",
        "--model",
        &model.to_string_lossy(),
        "--prompt",
        "a lighthouse",
        "--steps",
        "2",
        "--guidance",
        "7",
        "--size",
        "64",
        "--seed",
        &seed.to_string(),
        "--out",
        &out.to_string_lossy(),
    ])?;
    Ok(png_rgb(&std::fs::read(out)?))
}

/// The residency a node last reported for `model_id`: (copies, loads, evictions).
fn residency(
    cluster: &ClusterSandbox,
    node: &str,
    model_id: &str,
) -> anyhow::Result<(u64, u64, u64)> {
    let nodes = cluster.nodes()?;
    let n = nodes
        .iter()
        .find(|n| n["name"] == node)
        .ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
    let m = n["residency"]
        .as_array()
        .and_then(|r| r.iter().find(|m| m["model_id"] == model_id))
        .ok_or_else(|| anyhow::anyhow!("{node} reports no residency of {model_id}: {n}"))?;
    let get = |k: &str| m[k].as_u64().unwrap_or(0);
    Ok((get("copies"), get("loads"), get("evictions")))
}

#[test]
fn nodes_serve_catalogues_under_a_memory_budget() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("models");
    for (name, args) in [
        ("dream", vec!["--family", "sd15"]),
        ("photo", vec!["--family", "sd15", "--seed", "7"]),
        ("xl", vec!["--family", "sdxl"]),
    ] {
        let out = root.join(name).to_string_lossy().into_owned();
        let mut all = vec!["make-model"];
        all.extend(args);
        all.extend(["--out", &out]);
        node_tool(&all)?;
    }
    std::fs::write(root.join("notes.txt"), "not a model")?;
    let ids: Vec<String> = ["dream", "photo", "xl"]
        .iter()
        .map(|m| model_id(&root.join(m)))
        .collect::<anyhow::Result<_>>()?;
    assert_ne!(ids[0], ids[1], "fine-tunes of one shape have their own ids");
    let refs: Vec<Vec<u8>> = ["dream", "photo", "xl"]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            reference(
                &root.join(m),
                &dir.path().join(format!("{m}.png")),
                40 + i as u64,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    assert_ne!(
        refs[0], refs[1],
        "the two SD1.5 models draw different images"
    );

    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let root_s = root.to_string_lossy().into_owned();
    // One SD1.5 demo model is 23 M parameters (92 MB in f32): 120 MB holds one, not two.
    cluster.add_node(NodeSpec {
        name: "lru".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root_s.clone()),
            ("MODEL".into(), "dream,photo".into()),
            ("NODE_MEMORY_BUDGET".into(), "120M".into()),
        ],
    })?;
    cluster.wait_for_online(&["lru"], T)?;
    let lru = cluster.node_id("lru")?.expect("lru id");
    let nodes = cluster.nodes()?;
    let listed: Vec<&str> = nodes[0]["models"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, ["dream", "photo"], "{nodes:?}");
    assert_eq!(nodes[0]["memory_budget"], 120 << 20);

    let render = |cluster: &ClusterSandbox, i: usize| -> anyhow::Result<(Vec<u8>, String)> {
        let reply = cluster.post(
            "/v1/generate",
            &json!({"prompt": "a lighthouse", "model": ids[i], "size": "64x64", "steps": 2,
                    "guidance_scale": 7, "seed": 40 + i as u64}),
        )?;
        anyhow::ensure!(
            reply.status == 200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let node = reply.header("x-node-id").unwrap_or_default().to_string();
        Ok((png_rgb(&reply.body), node))
    };
    // Alternating models on a budget of one: every switch evicts the other, and every image is
    // the one its model draws alone.
    for i in [0, 1, 0, 1] {
        let (rgb, node) = render(&cluster, i)?;
        assert_eq!(node, lru);
        assert!(
            rgb == refs[i],
            "model {i}: the image differs from its single-model render"
        );
    }
    cluster.wait_until(T, "lru reports three evictions", |c| {
        let (a, b) = (residency(c, "lru", &ids[0])?, residency(c, "lru", &ids[1])?);
        Ok(a.2 + b.2 == 3 && a.0 + b.0 == 1)
    })?;
    let metrics = String::from_utf8(cluster.get("/metrics")?.body)?;
    assert!(
        metrics.contains(r#"drover_node_model_evictions{node="lru",model="dream"} 2"#),
        "{metrics}"
    );

    // A node serving every model under MODEL_ROOT (the note is skipped), `dream` pinned: SD1.5
    // `photo` and the SDXL model take turns in the rest of the budget; `dream` stays.
    cluster.post_raw(&format!("/v1/nodes/{lru}/drain"), b"")?;
    cluster.add_node(NodeSpec {
        name: "pin".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root_s.clone()),
            ("MODELS".into(), "*".into()),
            ("PIN_MODELS".into(), "dream".into()),
            // dream 92 MB + the SDXL demo's 273 MB + 35 MB: never photo beside both.
            ("NODE_MEMORY_BUDGET".into(), "400M".into()),
        ],
    })?;
    cluster.wait_for_online(&["pin"], T)?;
    let pin_index = 1;
    let log = cluster.node_log(pin_index);
    assert!(
        log.contains("catalogue entry skipped") && log.contains("notes.txt"),
        "{log}"
    );
    let pin = cluster.node_id("pin")?.expect("pin id");
    for i in [1, 2, 1, 2, 0] {
        let (rgb, node) = render(&cluster, i)?;
        assert_eq!(node, pin);
        assert!(
            rgb == refs[i],
            "model {i}: the image differs from its single-model render"
        );
    }
    cluster.wait_until(T, "pin reports its evictions", |c| {
        let photo = residency(c, "pin", &ids[1])?;
        let xl = residency(c, "pin", &ids[2])?;
        Ok(photo.2 + xl.2 >= 3)
    })?;
    let dream = residency(&cluster, "pin", &ids[0])?;
    assert_eq!((dream.0, dream.2), (1, 0), "the pinned model stays loaded");

    // The farm's model list: every model with the nodes that serve it and where it is loaded.
    let models = cluster.get("/v1/models")?.json()?;
    let entry = |id: &str| {
        models
            .as_array()
            .and_then(|m| m.iter().find(|m| m["model_id"] == id).cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        entry(&ids[0])["served_by"],
        json!(["lru", "pin"]),
        "{models}"
    );
    assert_eq!(entry(&ids[2])["served_by"], json!(["pin"]), "{models}");
    assert_eq!(entry(&ids[2])["family"], "sdxl");
    assert!(
        entry(&ids[0])["resident_on"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("pin"))),
        "{models}"
    );
    Ok(())
}

/// A simulated catalogue node (`SIM_MODELS`): one worker, 20 ms steps, models loading in
/// `load_ms`, a budget that holds one SD1.5 model (2 GiB each).
fn sim_catalogue(name: &str, models: &str, load_ms: u64) -> NodeSpec {
    NodeSpec::sim(name, "sd15")
        .env("NUM_WORKERS", "1")
        .env("SIM_MODELS", models)
        .env("SIM_LOAD_MS", &load_ms.to_string())
        .env("NODE_MEMORY_BUDGET", "3G")
}

/// Sum over `nodes` of a model's (copies, loads, evictions).
fn farm_residency(
    cluster: &ClusterSandbox,
    nodes: &[&str],
    model_id: &str,
) -> anyhow::Result<(u64, u64, u64)> {
    let mut total = (0, 0, 0);
    for n in nodes {
        let (c, l, e) = residency(cluster, n, model_id)?;
        total = (total.0 + c, total.1 + l, total.2 + e);
    }
    Ok(total)
}

#[test]
fn jobs_go_where_their_model_is_loaded_and_operators_order_loads() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(sim_catalogue("sim-a", "alpha,beta", 300))?;
    cluster.add_node(sim_catalogue("sim-b", "alpha,beta", 300))?;
    cluster.add_node(NodeSpec::sim("plain", "sd15"))?;
    cluster.wait_for_online(&["sim-a", "sim-b", "plain"], T)?;
    cluster.post_raw(
        &format!(
            "/v1/nodes/{}/drain",
            cluster.node_id("plain")?.unwrap_or_default()
        ),
        b"",
    )?;
    let both = ["sim-a", "sim-b"];
    let run = |cluster: &ClusterSandbox, model: &str| -> anyhow::Result<String> {
        let id =
            cluster.submit(&json!({"prompt": "x", "model": model, "size": "64x64", "steps": 4}))?;
        let job = cluster.wait_for_job(&id, T)?;
        anyhow::ensure!(job["state"] == "succeeded", "{job}");
        Ok(job["node_id"].as_str().unwrap_or_default().to_string())
    };
    // Both nodes start with their default, alpha. The first beta job makes one of them load it
    // (evicting alpha there); from then on each model's jobs go where it is loaded.
    let loader = run(&cluster, "sim-beta")?;
    cluster.wait_until(T, "beta resident on one node", |c| {
        Ok(farm_residency(c, &both, "sim-beta")?.0 == 1)
    })?;
    for _ in 0..3 {
        assert_eq!(
            run(&cluster, "sim-beta")?,
            loader,
            "beta goes where it is loaded"
        );
        assert_ne!(
            run(&cluster, "sim-alpha")?,
            loader,
            "alpha goes where it is loaded"
        );
    }
    assert_eq!(
        farm_residency(&cluster, &both, "sim-beta")?.1,
        1,
        "beta was loaded once"
    );
    assert_eq!(
        farm_residency(&cluster, &both, "sim-alpha")?.1,
        2,
        "alpha only at the starts"
    );
    let models = cluster.get("/v1/models")?.json()?;
    let beta = models
        .as_array()
        .and_then(|m| m.iter().find(|m| m["model_id"] == "sim-beta").cloned())
        .unwrap_or_default();
    assert_eq!(beta["served_by"], json!(["sim-a", "sim-b"]), "{models}");
    assert_eq!(
        beta["resident_on"].as_array().map(Vec::len),
        Some(1),
        "{models}"
    );

    // Operators order loads, unloads and pins; wrong names are 404, a node without a catalogue 409.
    let order = |node: &str, model: &str, action: &str| -> anyhow::Result<(u16, Value)> {
        let id = cluster.node_id(node)?.unwrap_or_default();
        let reply = cluster.post_raw(&format!("/v1/nodes/{id}/models/{model}/{action}"), b"")?;
        Ok((reply.status, reply.json().unwrap_or_default()))
    };
    let loader_name = if cluster.node_id("sim-a")?.as_deref() == Some(loader.as_str()) {
        "sim-a"
    } else {
        "sim-b"
    };
    assert_eq!(order(loader_name, "gamma", "load")?.0, 404);
    assert_eq!(order(loader_name, "alpha", "explode")?.0, 404);
    let (status, body) = order("plain", "sim-sd15", "load")?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("keeps its one model"),
        "{body}"
    );
    let (status, body) = order(loader_name, "alpha", "load")?;
    assert_eq!(
        (status, body["model_id"].as_str()),
        (202, Some("sim-alpha")),
        "{body}"
    );
    cluster.wait_until(T, "alpha loaded in beta's place", |c| {
        Ok(residency(c, loader_name, "sim-alpha")?.0 == 1
            && residency(c, loader_name, "sim-beta")?.0 == 0)
    })?;
    // Residency counts a copy while it loads; the node logs when the load is done.
    let index = if loader_name == "sim-a" { 0 } else { 1 };
    cluster.wait_until(T, "the load is done", |c| {
        Ok(c.node_log(index)
            .contains("model command done model_id=sim-alpha action=load"))
    })?;
    assert_eq!(order(loader_name, "sim-alpha", "unload")?.0, 202);
    cluster.wait_until(T, "alpha unloaded", |c| {
        Ok(residency(c, loader_name, "sim-alpha")?.0 == 0)
    })?;
    // A pinned model stays: the node refuses to unload it and says why in its log.
    assert_eq!(order(loader_name, "beta", "pin")?.0, 202);
    cluster.wait_until(T, "beta pinned and loaded", |c| {
        Ok(residency(c, loader_name, "sim-beta")?.0 == 1)
    })?;
    assert_eq!(order(loader_name, "beta", "unload")?.0, 202);
    cluster.wait_until(T, "the refusal is logged", |c| {
        Ok(c.node_log(index).contains("model command refused"))
    })?;
    assert_eq!(residency(&cluster, loader_name, "sim-beta")?.0, 1);
    Ok(())
}

#[test]
fn a_node_killed_while_loading_a_model_has_its_job_run_elsewhere_once() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    // Loads take 3 s: long enough to kill the node in the middle of one.
    cluster.add_node(sim_catalogue("load-a", "alpha,gamma", 3000))?;
    cluster.add_node(sim_catalogue("load-b", "alpha,gamma", 3000))?;
    cluster.wait_for_online(&["load-a", "load-b"], T)?;
    let id = cluster
        .submit(&json!({"prompt": "x", "model": "sim-gamma", "size": "64x64", "steps": 4}))?;
    let mut first = String::new();
    cluster.wait_until(T, "the job is leased", |c| {
        let job = c.job(&id)?;
        first = job["lease"]["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok((job["state"] == "leased" || job["state"] == "running") && !first.is_empty())
    })?;
    let (victim, survivor) = if cluster.node_id("load-a")?.as_deref() == Some(first.as_str()) {
        (0, "load-b")
    } else {
        (1, "load-a")
    };
    // Once the node logs the eviction it is loading gamma (3 s): no step has run yet.
    cluster.wait_until(T, "the node loads gamma", |c| {
        Ok(c.node_log(victim).contains("model evicted"))
    })?;
    cluster.kill_node(victim);
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["node_id"],
        cluster.node_id(survivor)?.unwrap_or_default().as_str(),
        "{job}"
    );
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["node_id"], first.as_str(), "{job}");
    assert_ne!(attempts[0]["outcome"], "succeeded", "{job}");
    assert_eq!(attempts[1]["outcome"], "succeeded", "{job}");
    Ok(())
}

/// When the attempt that succeeded ended (ms since epoch).
fn ended_ms(job: &Value) -> u64 {
    job["attempts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["outcome"] == "succeeded"))
        .and_then(|a| a["ended_ms"].as_u64())
        .unwrap_or(u64::MAX)
}

#[test]
fn a_job_waiting_for_a_busy_model_has_it_loaded_ahead_on_an_idle_node() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    // Loads take 2 s; the 2 GiB models' estimate follows from each node's start-up load.
    cluster.add_node(sim_catalogue("pre-a", "alpha,beta", 2000).env("SIM_STEP_MS", "40"))?;
    cluster.add_node(sim_catalogue("pre-b", "alpha,beta", 2000).env("SIM_STEP_MS", "40"))?;
    cluster.wait_for_online(&["pre-a", "pre-b"], T)?;
    // One node loads beta for a first job.
    let first = cluster
        .submit(&json!({"prompt": "x", "model": "sim-beta", "size": "64x64", "steps": 2}))?;
    let holder = cluster.wait_for_job(&first, T)?["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    cluster.wait_until(T, "beta reported loaded", |c| {
        Ok(farm_residency(c, &["pre-a", "pre-b"], "sim-beta")?.0 == 1)
    })?;
    // A long beta job keeps the holder busy for 6 s; a second beta job arrives behind it. It may
    // not make the idle node switch before it has waited two loads (4 s), but after a second of
    // waiting the coordinator has the idle node load beta ahead (2 s): the job runs there at
    // about 3 s and ends long before the long one.
    let long = cluster
        .submit(&json!({"prompt": "x", "model": "sim-beta", "size": "64x64", "steps": 150}))?;
    cluster.wait_until(T, "the long job runs", |c| {
        Ok(c.job(&long)?["state"] == "running")
    })?;
    let second = cluster
        .submit(&json!({"prompt": "y", "model": "sim-beta", "size": "64x64", "steps": 2}))?;
    let second = cluster.wait_for_job(&second, T)?;
    let long = cluster.wait_for_job(&long, T)?;
    assert_eq!(long["node_id"], holder.as_str(), "{long}");
    assert_ne!(second["node_id"], holder.as_str(), "{second}");
    assert!(ended_ms(&second) < ended_ms(&long), "{second} {long}");
    assert!(
        cluster
            .coordinator_log()
            .contains("model preload ordered for waiting jobs"),
        "{}",
        cluster.coordinator_log()
    );
    Ok(())
}
