//! The real pipeline behind the scheduler: cpu nodes running Burn's SD1.5 and SDXL pipelines
//! (LCM, and a standard SD1.5 model sampled with CFG) on random-weight demo models
//! (`drover-node make-model`), reached through the coordinator.

use std::process::Command;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries, png_text};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

#[test]
fn a_cpu_node_renders_through_the_real_pipeline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for family in ["sd15", "sdxl"] {
        let status = Command::new(binaries!().node)
            .args(["make-model", "--family", family, "--out"])
            .arg(dir.path().join(format!("demo-{family}")))
            .status()?;
        assert!(status.success());
    }
    let status = Command::new(binaries!().node)
        .args([
            "make-model",
            "--variant",
            "standard",
            "--seed",
            "2",
            "--out",
        ])
        .arg(dir.path().join("demo-sd15-standard"))
        .status()?;
    assert!(status.success());
    // A random LoRA for the standard model, named as LCM-LoRAs are: the node takes it for one.
    let status = Command::new(binaries!().node)
        .args(["make-lora", "--model"])
        .arg(dir.path().join("demo-sd15-standard"))
        .arg("--out")
        .arg(dir.path().join("loras/lcm-demo.safetensors"))
        .status()?;
    assert!(status.success());
    let root = dir.path().to_string_lossy().into_owned();

    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let cpu = NodeSpec {
        name: "cpu-a".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root.clone()),
            ("MODEL".into(), "demo-sd15".into()),
            ("MAX_BATCH".into(), "3".into()),
        ],
    };
    cluster.add_node(cpu)?;
    let xl = NodeSpec {
        name: "cpu-xl".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root.clone()),
            ("MODEL".into(), "demo-sdxl".into()),
        ],
    };
    cluster.add_node(xl)?;
    let standard = NodeSpec {
        name: "cpu-std".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root.clone()),
            ("MODEL".into(), "demo-sd15-standard".into()),
            (
                "LORA_ROOT".into(),
                dir.path().join("loras").to_string_lossy().into_owned(),
            ),
        ],
    };
    cluster.add_node(standard)?;
    cluster.wait_for_online(&["cpu-a", "cpu-xl", "cpu-std"], T)?;
    let nodes = cluster.nodes()?;
    for n in &nodes {
        assert_eq!(n["backend"], "cpu", "{nodes:?}");
        let want = if n["name"] == "cpu-xl" {
            "sdxl"
        } else {
            "sd15"
        };
        assert_eq!(n["family"], want, "{nodes:?}");
    }

    // An SDXL job reaches the SDXL node and runs its pipeline (two text encoders, text_time).
    let xl_id = cluster.node_id("cpu-xl")?.expect("sdxl node id");
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a lighthouse", "model": "sdxl", "size": "256x256", "steps": 2, "seed": 3}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-node-id"), Some(xl_id.as_str()));
    let text = png_text(&reply.body);
    assert!(
        text.iter().any(|(k, v)| k == "size" && v == "256x256"),
        "{text:?}"
    );

    let body = json!({"prompt": "a lighthouse at dusk", "model": "sd15", "size": "128x64",
                      "steps": 2, "seed": 11, "sampler": "lcm"});
    let reply = cluster.post("/v1/generate", &body)?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let text = png_text(&reply.body);
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(get("Software").contains("cpu backend"), "{text:?}");
    assert_eq!(get("prompt"), "a lighthouse at dusk");
    assert_eq!(
        (get("seed"), get("steps"), get("size")),
        ("11".into(), "2".into(), "128x64".into())
    );
    assert_eq!(get("model").len(), 64, "model id: {text:?}");
    // Same seed through the real pipeline: the same pixels.
    let again = cluster.post("/v1/generate", &body)?;
    assert_eq!(again.body, reply.body);

    // Nodes say what they run: the LCM models only lcm, the standard model the rest, its
    // default (DPM++ 2M) first.
    let samplers = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["samplers"].clone())
    };
    assert_eq!(samplers("cpu-a"), Some(json!(["lcm"])), "{nodes:?}");
    assert_eq!(
        samplers("cpu-std").map(|s| s[0].clone()),
        Some(json!("dpmpp_2m"))
    );

    // An AUTOMATIC1111 client's ordinary request renders on the standard model: Euler a, 20 steps,
    // CFG 7, with a negative prompt; the same seed gives the same image.
    let std_id = cluster.node_id("cpu-std")?.expect("standard node id");
    let a1111 = json!({"prompt": "a red fox", "negative_prompt": "blurry", "sampler_name": "Euler a",
                       "steps": 20, "cfg_scale": 7, "width": 64, "height": 64, "seed": 5});
    let reply = cluster.post("/sdapi/v1/txt2img", &a1111)?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let first = reply.json()?;
    let info: serde_json::Value = serde_json::from_str(first["info"].as_str().unwrap_or("{}"))?;
    let job = cluster.job(info["job_ids"][0].as_str().unwrap_or_default())?;
    assert_eq!(job["node_id"], std_id.as_str(), "{job}");
    assert_eq!(job["spec"]["sampler"], "euler_a", "{job}");
    let again = cluster.post("/sdapi/v1/txt2img", &a1111)?.json()?;
    assert_eq!(first["images"], again["images"]);
    // A different sampler on the same seed draws a different image.
    let dpm = cluster.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red fox", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M",
                "scheduler": "Karras", "steps": 12, "cfg_scale": 7, "width": 64, "height": 64,
                "seed": 5}),
    )?;
    assert_eq!(dpm.status, 200, "{}", String::from_utf8_lossy(&dpm.body));
    assert_ne!(dpm.json()?["images"], first["images"]);
    // With no sampler named, an sd15 job of 20 steps can only be the standard model's.
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "x", "model": "sd15", "size": "64x64", "steps": 20, "guidance_scale": 5}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-node-id"), Some(std_id.as_str()));

    // Steps and guidance left out take the serving sampler's defaults: 20 and CFG 7 for Euler,
    // 4 and 1.5 for LCM.
    for (sampler, steps, guidance) in [("Euler", "20", "7"), ("lcm", "4", "1.5")] {
        let reply = cluster.post(
            "/v1/generate",
            &json!({"prompt": "x", "model": "sd15", "size": "64x64", "sampler": sampler}),
        )?;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let text = png_text(&reply.body);
        let get = |k: &str| {
            text.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            (get("steps"), get("guidance")),
            (Some(steps), Some(guidance)),
            "{text:?}"
        );
    }

    // An LCM-LoRA lets the standard model run LCM: 4 steps, CFG 1.5 by default; the node
    // advertises the LoRA as one.
    let std_node = nodes
        .iter()
        .find(|n| n["name"] == "cpu-std")
        .expect("standard node");
    assert_eq!(
        std_node["loras"],
        json!([{"name": "lcm-demo", "family": "sd15", "lcm": true}]),
        "{std_node}"
    );
    let lcm_lora = json!({"prompt": "x", "model": "sd15", "size": "64x64", "sampler": "lcm",
                          "seed": 3, "loras": [{"name": "lcm-demo", "strength": 1.0}]});
    let reply = cluster.post("/v1/generate", &lcm_lora)?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-node-id"), Some(std_id.as_str()));
    let text = png_text(&reply.body);
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        (get("steps"), get("guidance"), get("sampler")),
        (Some("4"), Some("1.5"), Some("lcm")),
        "{text:?}"
    );
    // Without the LoRA, the standard model names the LoRA that would let it run lcm.
    let std_model = std_node["model_id"].as_str().unwrap_or_default();
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "model": std_model, "size": "64x64", "sampler": "lcm"}),
    )?;
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        text.contains("lcm_lora_needed") && text.contains("lcm-demo"),
        "{text}"
    );
    // DPM++ SDE (Karras by default): two UNet calls per step but the last.
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "x", "model": "sd15", "size": "64x64", "sampler": "DPM++ SDE",
                "steps": 6, "seed": 4}),
    )?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-node-id"), Some(std_id.as_str()));

    // Dynamic batching through the real pipeline: four LCM jobs at once on the LCM node
    // (MAX_BATCH 3, one worker): leased three and one, the three rendered in one batched UNet
    // call per step, each the image it renders alone.
    let jobs: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            json!({"prompt": format!("a lighthouse {i}"), "model": "sd15", "size": "64x64",
                        "sampler": "lcm", "steps": 2, "seed": 20 + i})
        })
        .collect();
    let ids = cluster.submit_batch(&jobs)?;
    let mut batched = None;
    for (i, id) in ids.iter().enumerate() {
        let job = cluster.wait_for_job(id, T)?;
        assert_eq!(job["state"], "succeeded", "{job}");
        if job["batch_size"].as_u64().unwrap_or(1) > 1 {
            batched = Some(i);
        }
    }
    let i = batched.expect("the jobs that waited were batched");
    let together = cluster.get(&format!("/v1/jobs/{}/image", ids[i]))?.body;
    let alone = cluster.post("/v1/generate", &jobs[i])?;
    assert_eq!(alone.status, 200);
    assert_eq!(
        drover_tests::png_rgb(&alone.body),
        drover_tests::png_rgb(&together),
        "a batched job draws what it draws alone"
    );

    // What no node can run is refused at submit with each node's reason, not failed later.
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "model": "sdxl", "size": "64x64", "steps": 20}),
    )?;
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        text.contains("too_many_steps") && text.contains("\"max_steps\":8"),
        "{text}"
    );
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "model": "sdxl", "sampler": "Euler a"}),
    )?;
    assert_eq!(
        reply.status,
        422,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(String::from_utf8_lossy(&reply.body).contains("sampler_not_served"));
    Ok(())
}
