//! Upscaling end to end: a cpu SD1.5 node holding two random-weight upscalers (a compact
//! SRVGGNet ×4 and an RRDBNet ×2) next to a simulated SDXL node holding none; jobs that ask for
//! `upscale` go to the holder, come back at the upscaled size with the upscaler named in the
//! PNG, and equal what `drover-node upscale` makes of the same render; an SDXL job is rendered
//! by the simulated node and upscaled by the cpu node (one job, one image); stand-alone upscales (native,
//! AUTOMATIC1111's extras, the LCM server's `superres`) run there too; requests no node can serve
//! are refused with each node's reason.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, base64, binaries, png_rgb, png_size, png_text};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn text(png: &[u8], key: &str) -> String {
    png_text(png)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn decode64(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

fn node_tool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(binaries!().node)
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "drover-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn jobs_upscale_on_the_node_holding_the_upscaler() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    node_tool(&["make-model", "--out", "demo-sd15"], root)?;
    node_tool(
        &[
            "make-model",
            "--upscaler",
            "x4",
            "--features",
            "16",
            "--depth",
            "4",
            "--out",
            "general-x4.safetensors",
        ],
        root,
    )?;
    node_tool(
        &[
            "make-model",
            "--upscaler",
            "x2",
            "--arch",
            "rrdb",
            "--features",
            "8",
            "--depth",
            "1",
            "--out",
            "rrdb-x2.safetensors",
        ],
        root,
    )?;
    // A misnamed upscaler stops the node at start with the reason.
    let refused = Command::new(binaries!().node)
        .env("BACKEND", "cpu")
        .env("MODEL_ROOT", root)
        .env("MODEL", "demo-sd15")
        .env("UPSCALER", "missing-x8")
        .env("COORDINATOR_URL", "http://127.0.0.1:9")
        .output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("UPSCALER `missing-x8`"), "{stderr}");

    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec {
        name: "cpu-up".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root.to_string_lossy().into_owned()),
            ("MODEL".into(), "demo-sd15".into()),
            ("UPSCALER".into(), "general-x4,rrdb-x2.safetensors".into()),
            ("UPSCALE_TILE".into(), "24".into()),
        ],
    })?;
    cluster.add_node(NodeSpec::sim("plain", "sdxl"))?;
    cluster.wait_for_online(&["cpu-up", "plain"], T)?;
    let holder = cluster.node_id("cpu-up")?;

    // The farm lists its upscalers, natively and as A1111 does.
    let listed = cluster.get("/v1/upscalers")?.json()?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed[0]["name"], "general-x4");
    assert_eq!(listed[0]["scale"], 4);
    assert!(
        listed[0]["network"]
            .as_str()
            .is_some_and(|n| n.starts_with("SRVGGNetCompact ×4")),
        "{listed}"
    );
    assert_eq!(listed[1]["name"], "rrdb-x2");
    assert_eq!(listed[1]["scale"], 2);
    let a1111 = cluster.get("/sdapi/v1/upscalers")?.json()?;
    let names: Vec<&str> = a1111
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(names, ["None", "general-x4", "rrdb-x2"]);

    // The default upscaler (the node's first, ×4) on a 64×64 render.
    let base = json!({"prompt": "a harbour", "size": "64x64", "steps": 2, "seed": 11});
    let mut job = base.clone();
    job["upscale"] = json!({});
    let reply = cluster.post("/v1/generate", &job)?;
    reply.expect_status(200);
    assert_eq!(reply.header("x-node-id"), holder.as_deref());
    assert_eq!(png_size(&reply.body), (256, 256));
    assert_eq!(text(&reply.body, "upscaler"), "general-x4");
    assert_eq!(text(&reply.body, "upscale_passes"), "1");
    assert_eq!(text(&reply.body, "generated_size"), "64x64");
    assert_eq!(text(&reply.body, "size"), "256x256");

    // The same render without upscaling, pinned to the holder's model, upscaled by the tool:
    // the same bytes.
    let model = cluster
        .nodes()?
        .into_iter()
        .find(|n| n["name"] == "cpu-up")
        .and_then(|n| n["model_id"].as_str().map(String::from))
        .expect("a model id");
    let mut plain = base.clone();
    plain["model"] = json!(model);
    let render = cluster.post("/v1/generate", &plain)?;
    render.expect_status(200);
    assert_eq!(png_size(&render.body), (64, 64));
    std::fs::write(root.join("render.png"), &render.body)?;
    node_tool(
        &[
            "upscale",
            "--model",
            "general-x4.safetensors",
            "--image",
            "render.png",
            "--out",
            "tool.png",
            "--tile",
            "24",
        ],
        root,
    )?;
    let tool = std::fs::read(root.join("tool.png"))?;
    assert_eq!(
        png_rgb(&reply.body),
        png_rgb(&tool),
        "the job's upscale is the tool's"
    );

    // Two passes of the RRDBNet ×2, and ×3 from the ×4 (one pass, resized down).
    let mut twice = base.clone();
    twice["upscale"] = json!({"model": "rrdb-x2", "passes": 2});
    let reply = cluster.post("/v1/generate", &twice)?;
    reply.expect_status(200);
    assert_eq!(png_size(&reply.body), (256, 256));
    assert_eq!(text(&reply.body, "upscaler"), "rrdb-x2");
    assert_eq!(text(&reply.body, "upscale_passes"), "2");
    let mut three = base.clone();
    three["upscale"] = json!({"scale": 3});
    let reply = cluster.post("/v1/generate", &three)?;
    reply.expect_status(200);
    assert_eq!(png_size(&reply.body), (192, 192));
    assert_eq!(text(&reply.body, "upscale"), "3");

    // Stand-alone upscales of that render, through each door: the native one equals the tool.
    let image = base64(&render.body);
    let reply = cluster.post(
        "/v1/upscale",
        &json!({"image": image, "model": "general-x4"}),
    )?;
    reply.expect_status(200);
    assert_eq!(reply.header("x-node-id"), holder.as_deref());
    assert_eq!(png_size(&reply.body), (256, 256));
    assert_eq!(text(&reply.body, "mode"), "upscale");
    assert_eq!(text(&reply.body, "source_size"), "64x64");
    assert_eq!(png_rgb(&reply.body), png_rgb(&tool), "the same upscale");
    let job = reply.header("x-job-id").expect("a job id").to_string();
    let record = cluster.job(&job)?;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["spec"]["task"], "upscale", "{record}");
    assert!(record["spec"]["source"].get("image").is_none(), "{record}");
    // The command-line client: `drover upscale` writes the same image; `drover upscalers` lists.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sandbox-cli"))
            .args(args)
            .current_dir(root)
            .env("DROVER_URL", cluster.base_url())
            .output()
            .expect("run the cli")
    };
    let run = cli(&[
        "upscale",
        "render.png",
        "-o",
        "cli.png",
        "--upscaler",
        "general-x4",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        png_rgb(&std::fs::read(root.join("cli.png"))?),
        png_rgb(&tool)
    );
    let listed = cli(&["upscalers"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("general-x4") && listed.contains("rrdb-x2"),
        "{listed}"
    );
    let refused = cli(&["upscale", "render.png", "--upscaler", "x8"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("422"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The same image uploaded once and named by id: the same upscale.
    let uploaded = cluster.post_raw("/v1/uploads", &render.body)?;
    uploaded.expect_status(201);
    let upload = uploaded.json()?;
    assert_eq!(
        (upload["width"].clone(), upload["format"].clone()),
        (json!(64), json!("png"))
    );
    let reference = upload["reference"]
        .as_str()
        .expect("a reference")
        .to_string();
    let by_id = cluster.post(
        "/v1/upscale",
        &json!({"image": reference, "model": "general-x4"}),
    )?;
    by_id.expect_status(200);
    assert_eq!(
        png_rgb(&by_id.body),
        png_rgb(&tool),
        "the upload is the image"
    );
    let id = upload["id"].as_str().expect("an id");
    let forgotten = cluster.delete(&format!("/v1/uploads/{id}"))?;
    forgotten.expect_status(204);
    for (path, body) in [
        ("/v1/upscale", json!({"image": reference})),
        ("/v1/jobs", json!({"prompt": "x", "init_image": reference})),
    ] {
        let reply = cluster.post(path, &body)?;
        reply.expect_status(400);
        let error = reply.json()?;
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown or expired")),
            "{error}"
        );
    }
    let junk = cluster.post_raw("/v1/uploads", b"not an image")?;
    junk.expect_status(400);
    // A form's file part (curl -F file=@render.png) is the image too; a form without one is
    // refused naming the field.
    let form = |name: &str, filename: &str, data: &[u8]| {
        let mut body = format!(
            "--XyZ\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
             content-type: image/png\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        body
    };
    let multipart = "multipart/form-data; boundary=XyZ";
    let as_form = cluster.post_typed(
        "/v1/uploads",
        multipart,
        &form("file", "r.png", &render.body),
    )?;
    as_form.expect_status(201);
    assert_eq!(as_form.json()?["bytes"], json!(render.body.len()));
    let no_file = cluster.post_typed(
        "/v1/uploads",
        multipart,
        b"--XyZ\r\ncontent-disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ--\r\n",
    )?;
    no_file.expect_status(400);
    assert!(String::from_utf8_lossy(&no_file.body).contains("file"));
    let extras = cluster.post(
        "/sdapi/v1/extra-single-image",
        &json!({"image": format!("data:image/png;base64,{image}"), "upscaler_1": "rrdb-x2",
                "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 96,
                "gfpgan_visibility": 0, "show_extras_results": true}),
    )?;
    extras.expect_status(200);
    let body = extras.json()?;
    let png = decode64(body["image"].as_str().expect("image"))?;
    assert_eq!(png_size(&png), (96, 96), "one ×2 pass resized to 96");
    assert_eq!(text(&png, "upscaler"), "rrdb-x2");
    assert!(
        body["html_info"]
            .as_str()
            .is_some_and(|h| h.contains("rrdb-x2")),
        "{body}"
    );
    let superres = cluster.post("/superres", &json!({"image": image, "superres": 2}))?;
    superres.expect_status(200);
    assert_eq!(png_size(&superres.body), (1024, 1024), "two ×4 passes");
    let generated = cluster.post(
        "/generate",
        &json!({"prompt": "a harbour", "size": "64x64", "num_inference_steps": 2,
                "seed": 11, "superres": true}),
    )?;
    generated.expect_status(200);
    assert_eq!(png_size(&generated.body), (256, 256));
    assert_eq!(text(&generated.body, "upscaler"), "general-x4");
    for (path, body, field) in [
        (
            "/v1/upscale",
            json!({"image": image, "passes": 0}),
            "passes",
        ),
        ("/v1/upscale", json!({"image": "####"}), "image"),
        ("/v1/upscale", json!({"picture": image}), "picture"),
        (
            "/sdapi/v1/extra-single-image",
            json!({"image": image, "codeformer_visibility": 1}),
            "codeformer_visibility",
        ),
        (
            "/superres",
            json!({"image": image, "superres": 9}),
            "superres",
        ),
        (
            "/generate",
            json!({"prompt": "x", "superres": "yes"}),
            "superres",
        ),
    ] {
        let reply = cluster.post(path, &body)?;
        reply.expect_status(400);
        assert_eq!(
            reply.json()?["error"]["details"]["field"],
            field,
            "{path} {body}"
        );
    }
    // An upscale one pass cannot reach, or with an upscaler nobody has: 422 with the reasons.
    let reply = cluster.post(
        "/v1/upscale",
        &json!({"image": image, "model": "rrdb-x2", "passes": 1, "scale": 8}),
    )?;
    reply.expect_status(422);
    assert!(
        reply.json()?["error"]["details"]["nodes"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["reason"] == "upscale_not_reached"),
        "one ×2 pass does not reach ×8"
    );
    let reply = cluster.post("/v1/upscale", &json!({"image": image, "model": "x8"}))?;
    reply.expect_status(422);

    // No node both renders SDXL and holds an upscaler: the simulated SDXL node renders, the
    // cpu node upscales what it rendered; one job, one image, the render's text kept.
    let split = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a split job", "model": "sdxl", "size": "64x64", "steps": 2,
                "seed": 3, "upscale": {}}),
    )?;
    split.expect_status(200);
    assert_eq!(png_size(&split.body), (256, 256));
    assert_eq!(
        split.header("x-node-id"),
        holder.as_deref(),
        "the upscaling node"
    );
    assert_eq!(text(&split.body, "prompt"), "a split job");
    assert_eq!(text(&split.body, "seed"), "3");
    assert_eq!(text(&split.body, "upscaler"), "general-x4");
    assert_eq!(text(&split.body, "source_size"), "64x64");
    let id = split.header("x-job-id").expect("a job id").to_string();
    let record = cluster.job(&id)?;
    let attempts = record["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(
        attempts[0]["node_id"].as_str(),
        cluster.node_id("plain")?.as_deref()
    );
    assert!(
        attempts[0]["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("upscale follows")),
        "{record}"
    );

    // What no node can do is refused at once, with each node's reason.
    let mut unknown = base.clone();
    unknown["upscale"] = json!({"model": "x8"});
    let reply = cluster.post("/v1/jobs", &unknown)?;
    reply.expect_status(422);
    let error = reply.json()?;
    let reasons = error["error"]["details"]["nodes"]
        .as_array()
        .expect("per-node reasons")
        .clone();
    assert_eq!(reasons.len(), 2, "{error}");
    assert!(
        reasons
            .iter()
            .all(|r| r["reason"] == "upscaler_not_served" && r["upscaler"] == "x8"),
        "{error}"
    );
    let mut huge = json!({"prompt": "x", "size": "768x768"});
    huge["upscale"] = json!({"model": "rrdb-x2", "passes": 3});
    let reply = cluster.post("/v1/jobs", &huge)?;
    reply.expect_status(422);
    let error = reply.json()?;
    assert!(
        error["error"]["details"]["nodes"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["reason"] == "upscale_too_large" && r["pixels"] == 6144u64 * 6144),
        "{error}"
    );
    let mut bad = base.clone();
    bad["upscale"] = json!({"passes": 4});
    let reply = cluster.post("/v1/jobs", &bad)?;
    reply.expect_status(400);
    assert_eq!(reply.json()?["error"]["details"]["field"], "upscale.passes");
    let mut bad = base;
    bad["upscale"] = json!({"factor": 2});
    let reply = cluster.post("/v1/jobs", &bad)?;
    reply.expect_status(400);
    assert_eq!(reply.json()?["error"]["details"]["field"], "factor");
    Ok(())
}
