//! Model detection, LoRA and style routing, end to end: the `inspect` tool, nodes scanning their
//! LORA_ROOT, the coordinator's style catalog and its refusals.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_shared::arch::{self, LoraStyle, UnetConfig};
use drover_shared::family::ModelFamily;
use drover_shared::safetensors::{Dtype, build::write_model};
use drover_tests::{ClusterSandbox, NodeSpec, binaries};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn write(path: &Path, tensors: Vec<arch::Tensor>) -> PathBuf {
    write_model(path, &tensors, Dtype::F16).expect("write model");
    path.to_path_buf()
}

fn node_tool(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(binaries!().node)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .expect("run node");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn inspect_prints_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sdxl_pipeline = dir.path().join("sdxl-pipeline");
    write(
        &sdxl_pipeline.join("unet/diffusion_pytorch_model.safetensors"),
        UnetConfig::for_family(ModelFamily::Sdxl).diffusers_tensors(),
    );
    for (folder, tensors) in arch::diffusers_text_encoders(ModelFamily::Sdxl) {
        write(
            &sdxl_pipeline.join(folder).join("model.safetensors"),
            tensors,
        );
    }
    std::fs::write(sdxl_pipeline.join("model_index.json"), "{}").expect("index");
    let cases = [
        (
            write(
                &dir.path().join("sd15.safetensors"),
                arch::ldm_checkpoint(ModelFamily::Sd15),
            ),
            "sd15",
            "checkpoint",
            768,
            "ldm_single_file",
        ),
        (
            write(
                &dir.path().join("sd21.safetensors"),
                arch::ldm_checkpoint(ModelFamily::Sd2),
            ),
            "sd2",
            "checkpoint",
            1024,
            "ldm_single_file",
        ),
        (
            write(
                &dir.path().join("refiner.safetensors"),
                arch::ldm_checkpoint(ModelFamily::SdxlRefiner),
            ),
            "sdxl_refiner",
            "checkpoint",
            1280,
            "ldm_single_file",
        ),
        (sdxl_pipeline, "sdxl", "checkpoint", 2048, "diffusers"),
        (
            write(
                &dir.path().join("xl-lora.safetensors"),
                arch::lora(ModelFamily::Sdxl, LoraStyle::Kohya, 32, true),
            ),
            "sdxl",
            "lora",
            2048,
            "kohya",
        ),
        (
            write(
                &dir.path().join("peft.safetensors"),
                arch::lora(ModelFamily::Sd15, LoraStyle::Peft, 8, false),
            ),
            "sd15",
            "lora",
            768,
            "peft",
        ),
    ];
    for (path, family, kind, dim, layout) in cases {
        let path = path.to_string_lossy().into_owned();
        let (code, stdout, stderr) = node_tool(&["inspect", &path, "--json"], &[]);
        assert_eq!(code, Some(0), "{path}: {stderr}");
        let found: Value = serde_json::from_str(&stdout).expect("one JSON object");
        assert_eq!(
            (
                &found["family"],
                &found["kind"],
                &found["cross_attention_dim"],
                &found["layout"]
            ),
            (&json!(family), &json!(kind), &json!(dim), &json!(layout)),
            "{path}"
        );
        let (code, table, _) = node_tool(&["inspect", &path], &[]);
        assert_eq!(code, Some(0));
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("family") && l.trim_end().ends_with(family)),
            "{table}"
        );
    }
    std::fs::write(
        dir.path().join("junk.safetensors"),
        b"\x89PNG\r\n\x1a\n....",
    )
    .expect("junk");
    let (code, _, stderr) = node_tool(
        &[
            "inspect",
            &dir.path().join("junk.safetensors").to_string_lossy(),
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("not a safetensors file") && stderr.contains("PNG"),
        "{stderr}"
    );
}

#[test]
fn a_node_refuses_what_it_cannot_serve_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_string_lossy().into_owned();
    write(
        &dir.path().join("refiner.safetensors"),
        arch::ldm_checkpoint(ModelFamily::SdxlRefiner),
    );
    write(
        &dir.path().join("sd15.safetensors"),
        arch::ldm_checkpoint(ModelFamily::Sd15),
    );
    // An RK3588 model folder as published: three .rknn networks with their diffusers configs.
    let npu = dir.path().join("sd15-lcm-rknn");
    for (component, config) in [
        ("text_encoder", r#"{"hidden_size": 768}"#),
        (
            "unet",
            r#"{"cross_attention_dim": 768, "in_channels": 4, "time_cond_proj_dim": 256}"#,
        ),
        ("vae_decoder", r#"{"scaling_factor": 0.18215}"#),
    ] {
        std::fs::create_dir_all(npu.join(component)).expect("folder");
        std::fs::write(npu.join(component).join("model.rknn"), b"RKNN\0fake").expect("rknn");
        std::fs::write(npu.join(component).join("config.json"), config).expect("config");
    }
    let (code, stdout, stderr) = node_tool(&["inspect", &npu.to_string_lossy(), "--json"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let found: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        (found["family"].as_str(), found["layout"].as_str()),
        (Some("sd15"), Some("rknn"))
    );
    let unreachable = ("COORDINATOR_URL", "http://127.0.0.1:9");
    let no_runtime = "cannot load the RKNN runtime librknnrt.so";
    for (env, expected) in [
        (
            vec![
                ("BACKEND", "cpu"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "refiner.safetensors"),
            ],
            "not a text-to-image base model",
        ),
        (vec![("BACKEND", "auto")], "no model configured"),
        (
            vec![
                ("BACKEND", "cpu"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "missing.safetensors"),
            ],
            "no such file",
        ),
        (
            vec![
                ("BACKEND", "cpu"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "sd15.safetensors"),
            ],
            "no tokenizer found: expected tokenizer.json or vocab.json + merges.txt",
        ),
        (
            vec![
                ("BACKEND", "rknn"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "sd15.safetensors"),
            ],
            "BACKEND=rknn needs an RKNN model folder",
        ),
        // This machine has no NPU runtime: the node stops at once, naming the library.
        (
            vec![
                ("BACKEND", "rknn"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "sd15-lcm-rknn"),
            ],
            no_runtime,
        ),
        (
            vec![
                ("BACKEND", "auto"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "sd15-lcm-rknn"),
            ],
            "install Rockchip's RKNN runtime",
        ),
        (
            vec![
                ("BACKEND", "cpu"),
                ("MODEL_ROOT", root.as_str()),
                ("MODEL", "sd15-lcm-rknn"),
            ],
            "runs only with BACKEND=rknn",
        ),
        (
            vec![("BACKEND", "sim"), ("LORA_ROOT", "/no/such/folder")],
            "LORA_ROOT",
        ),
    ] {
        let mut env = env.clone();
        env.push(unreachable);
        let (code, _, stderr) = node_tool(&[], &env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{env:?}: expected `{expected}` in {stderr}"
        );
    }
}

/// The example catalog shipped in the repository (styles `ink` for sd15 and `film` for sdxl).
fn example_styles() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/styles.toml")
}

#[test]
fn loras_and_styles_only_reach_nodes_of_their_family() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let loras = dir.path().join("loras");
    write(
        &loras.join("ink-sd15.safetensors"),
        arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 16, true),
    );
    write(
        &loras.join("film-xl.safetensors"),
        arch::lora(ModelFamily::Sdxl, LoraStyle::Peft, 8, false),
    );
    let (styles, loras) = (
        example_styles().to_string_lossy().into_owned(),
        loras.to_string_lossy().into_owned(),
    );

    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_STYLES", styles.as_str()),
            ("DROVER_LORA_ROOT", loras.as_str()),
        ],
    )?;
    cluster.add_node(NodeSpec::sim("classic", "sd15").env("LORA_ROOT", &loras))?;
    cluster.add_node(NodeSpec::sim("xl", "sdxl").env("LORA_ROOT", &loras))?;
    cluster.wait_for_online(&["classic", "xl"], T)?;

    let listed = cluster.get("/v1/styles")?.json()?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    for node in cluster.nodes()? {
        let names: Vec<&str> = node["loras"]
            .as_array()
            .expect("loras")
            .iter()
            .filter_map(|l| l["name"].as_str())
            .collect();
        let expected = if node["family"] == "sd15" {
            ["ink-sd15"]
        } else {
            ["film-xl"]
        };
        assert_eq!(names, expected, "{node}");
    }
    let classic = cluster.node_id("classic")?.expect("classic");
    let xl = cluster.node_id("xl")?.expect("xl");

    // An SD1.5 LoRA asked for with SDXL: refused, naming both.
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "model": "sdxl", "loras": [{"name": "ink-sd15"}]}),
    )?;
    assert_eq!(reply.status, 422);
    let message = reply.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("made for sd15") && message.contains("asks for sdxl"),
        "{message}"
    );
    // The same for a style.
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "model": "sdxl", "style_lora": {"style": "ink", "level": 1}}),
    )?;
    assert_eq!(reply.status, 422);
    assert!(
        reply.json()?["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("made for sd15")
    );
    // Unknown style, level too high.
    assert_eq!(
        cluster
            .post(
                "/v1/jobs",
                &json!({"prompt": "x", "style_lora": {"style": "oil", "level": 1}})
            )?
            .status,
        422
    );
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "style_lora": {"style": "film", "level": 3}}),
    )?;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()?["error"]["details"]["field"],
        "style_lora.level"
    );

    // Without a model, the LoRA picks the family; the style's LoRA rides along at its level.
    let id = cluster.submit(&json!({"prompt": "a heron", "size": "64x64", "loras": [{"name": "ink-sd15", "strength": 0.8}]}))?;
    assert_eq!(cluster.wait_for_job(&id, T)?["node_id"], classic.as_str());
    let id = cluster.submit(
        &json!({"prompt": "a heron", "size": "64x64", "style_lora": {"style": "film", "level": 2}}),
    )?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["node_id"], xl.as_str(), "{job}");
    assert_eq!(
        job["spec"]["loras"],
        json!([{"name": "film-xl", "strength": 0.9}])
    );
    let id = cluster.submit(
        &json!({"prompt": "a heron", "size": "64x64", "style_lora": {"style": "ink", "level": 3}}),
    )?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["node_id"], classic.as_str());
    assert_eq!(job["spec"]["prompt"], "ink wash painting, a heron");
    Ok(())
}

#[test]
fn a_style_whose_lora_file_disagrees_stops_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loras = dir.path().join("loras");
    // ink-sd15 is declared sd15 but the file is an SDXL LoRA.
    write(
        &loras.join("ink-sd15.safetensors"),
        arch::lora(ModelFamily::Sdxl, LoraStyle::Kohya, 4, false),
    );
    let styles = example_styles();
    let out = Command::new(binaries!().coordinator)
        .env("DROVER_STYLES", &styles)
        .env("DROVER_LORA_ROOT", &loras)
        .env("DROVER_DATA_DIR", dir.path().join("data"))
        .env("DROVER_HTTP_ADDR", "127.0.0.1:0")
        .env("DROVER_GRPC_ADDR", "127.0.0.1:0")
        .output()
        .expect("run coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("declares base sd15") && stderr.contains("detected as sdxl"),
        "{stderr}"
    );
}

/// The example preset catalog shipped in the repository (`portrait` for sd15, `film` for sdxl).
fn example_presets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/presets.toml")
}

#[test]
fn presets_fill_jobs_and_a_refused_reload_keeps_the_catalog() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let loras = dir.path().join("loras");
    write(
        &loras.join("ink-sd15.safetensors"),
        arch::lora(ModelFamily::Sd15, LoraStyle::Kohya, 8, false),
    );
    write(
        &loras.join("film-xl.safetensors"),
        arch::lora(ModelFamily::Sdxl, LoraStyle::Peft, 8, false),
    );
    let catalog = dir.path().join("presets.toml");
    let example = std::fs::read_to_string(example_presets())?;
    std::fs::write(&catalog, &example)?;
    let (catalog_env, loras_env) = (
        catalog.to_string_lossy().into_owned(),
        loras.to_string_lossy().into_owned(),
    );
    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_PRESETS", catalog_env.as_str()),
            ("DROVER_LORA_ROOT", loras_env.as_str()),
        ],
    )?;
    cluster.add_node(NodeSpec::sim("classic", "sd15").env("LORA_ROOT", &loras_env))?;
    cluster.add_node(NodeSpec::sim("xl", "sdxl").env("LORA_ROOT", &loras_env))?;
    cluster.wait_for_online(&["classic", "xl"], T)?;
    let ids = |cluster: &ClusterSandbox| -> anyhow::Result<Vec<String>> {
        Ok(cluster
            .get("/v1/presets")?
            .json()?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    };
    assert_eq!(ids(&cluster)?, ["film", "portrait"]);

    // The preset's defaults fill the job, and it goes where its model and LoRA are.
    let id = cluster.submit(&json!({"prompt": "a face", "preset": "portrait"}))?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["spec"]["steps"], 6);
    assert_eq!(job["spec"]["size"], json!({"width": 512, "height": 768}));
    assert_eq!(job["spec"]["negative_prompt"], "blurry, low quality");
    assert_eq!(job["spec"]["loras"][0]["name"], "ink-sd15");
    assert_eq!(
        job["node_id"].as_str(),
        cluster.node_id("classic")?.as_deref(),
        "{job}"
    );
    // Its own fields win.
    let id = cluster.submit(&json!({"prompt": "a face", "preset": "film", "steps": 3}))?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["spec"]["steps"], 3);
    assert_eq!(job["spec"]["size"], json!({"width": 1024, "height": 1024}));
    assert_eq!(
        job["node_id"].as_str(),
        cluster.node_id("xl")?.as_deref(),
        "{job}"
    );
    // An unknown preset: refused, naming it and the known ones.
    let reply = cluster.post("/v1/jobs", &json!({"prompt": "x", "preset": "oil"}))?;
    assert_eq!(reply.status, 400, "{:?}", reply.json());
    let body = reply.json()?;
    assert_eq!(body["error"]["details"]["field"], "preset", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`oil`") && message.contains("film, portrait"),
        "{message}"
    );

    // A catalog whose preset pairs an SD1.5 model with an SDXL LoRA: refused with the reason,
    // and the catalog in force stays (by the admin call, and by the file watcher alike).
    std::fs::write(
        &catalog,
        "[[preset]]\nid = \"mixed\"\nmodel = \"sd15\"\nloras = [{ name = \"film-xl\", strength = 1.0 }]\n",
    )?;
    let reply = cluster.post("/v1/presets/reload", &json!({}))?;
    assert_eq!(reply.status, 422, "{:?}", reply.json());
    let message = reply.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("preset `mixed`") && message.contains("made for sdxl"),
        "{message}"
    );
    std::thread::sleep(Duration::from_millis(2500)); // a watcher round on the refused file
    assert_eq!(ids(&cluster)?, ["film", "portrait"]);
    let id = cluster.submit(&json!({"prompt": "a face", "preset": "portrait"}))?;
    assert_eq!(cluster.wait_for_job(&id, T)?["spec"]["steps"], 6);

    // A good change is picked up by itself.
    std::fs::write(
        &catalog,
        format!("{example}\n[[preset]]\nid = \"quick\"\nsteps = 2\n"),
    )?;
    cluster.wait_until(T, "the changed catalog is in force", |c| {
        Ok(ids(c)?.len() == 3)
    })?;
    let id = cluster.submit(&json!({"prompt": "x", "preset": "quick", "model": "sd15"}))?;
    assert_eq!(cluster.wait_for_job(&id, T)?["spec"]["steps"], 2);
    Ok(())
}
