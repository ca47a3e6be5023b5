//! Image-to-image and inpainting end to end: source images through the native API and
//! AUTOMATIC1111's `/sdapi/v1/img2img`, refused with field-named 400s when broken, kept across a
//! coordinator `kill -9` with their bytes, and rendered by cpu nodes running the real Burn
//! pipeline (VAE encoder, strength-cut schedules, masked blending) on random-weight demo models.

use std::process::Command;
use std::time::Duration;

use drover_tests::{
    ClusterSandbox, NodeSpec, base64, binaries, png_of, png_rgb, png_size, png_text,
};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn text(png: &[u8], key: &str) -> String {
    png_text(png)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[test]
fn source_images_survive_a_coordinator_kill_and_shape_what_nodes_draw() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let node = cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let teal = [30, 200, 90];
    let source = base64(&png_of(64, 64, |_, _| teal));
    // Left half white: repaint; right half black: keep.
    let mask = base64(&png_of(
        64,
        64,
        |x, _| if x < 32 { [255; 3] } else { [0; 3] },
    ));

    // Barely changed (strength 0.02): the simulated node draws the source back.
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a pond", "init_image": source, "strength": 0.02, "seed": 5}),
    )?;
    reply.expect_status(200);
    assert_eq!(png_size(&reply.body), (64, 64), "the source's own size");
    assert_eq!(text(&reply.body, "mode"), "img2img");
    let rgb = png_rgb(&reply.body);
    for px in rgb.chunks(3) {
        for (got, want) in px.iter().zip(teal) {
            assert!(got.abs_diff(want) <= 6, "{px:?} vs {teal:?}");
        }
    }

    // An inpainting job accepted while no node is up, then the coordinator is killed: the job
    // and its image come back from the store.
    cluster.kill_node(node);
    cluster.wait_for_state("painter", "offline", T)?;
    let id = cluster.submit(&json!({"prompt": "a boat", "init_image": source,
                                    "mask": mask, "seed": 9}))?;
    let queued = cluster.job(&id)?;
    assert_eq!(queued["state"], "queued");
    let shown = &queued["spec"]["source"];
    assert!(
        shown.get("image").is_none(),
        "API answers leave the bytes out: {shown}"
    );
    assert_eq!(shown["strength"], 1.0, "a mask's default strength");
    assert!(
        shown["image_bytes"].as_u64().is_some_and(|b| b > 0),
        "{shown}"
    );
    cluster.kill_coordinator();
    cluster.start_coordinator()?;
    assert_eq!(cluster.job(&id)?["state"], "queued");
    cluster.start_node(node)?;
    let done = cluster.wait_for_job(&id, T)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let png = cluster.get(&format!("/v1/jobs/{id}/image"))?.body;
    assert_eq!(text(&png, "mode"), "inpaint");
    let rgb = png_rgb(&png);
    let px = |x: usize, y: usize| &rgb[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
    for y in [0, 20, 63] {
        assert_eq!(px(40, y), teal, "the kept half is the source");
        assert_ne!(px(10, y), teal, "the masked half is repainted");
    }

    // A1111's img2img: a batch of two from one source, seeds counted up.
    let reply = cluster.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a pond", "init_images": [format!("data:image/png;base64,{source}")],
                "denoising_strength": 0.3, "width": 64, "height": 128, "resize_mode": 1,
                "batch_size": 2, "seed": 40, "steps": 3, "sampler_name": "Euler a",
                "mask_blur": 4, "inpainting_fill": 1, "unknown_field": true}),
    )?;
    reply.expect_status(200);
    let body = reply.json()?;
    let images = body["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    let info: serde_json::Value = serde_json::from_str(body["info"].as_str().expect("info"))?;
    assert_eq!(info["all_seeds"], json!([40, 41]));
    assert!(
        body["parameters"]["init_images"].is_null(),
        "not echoed back"
    );
    use base64::Engine;
    let first =
        base64::engine::general_purpose::STANDARD.decode(images[0].as_str().expect("b64"))?;
    assert_eq!(png_size(&first), (64, 128));
    assert_eq!(text(&first, "strength"), "0.3");

    // An inverted mask (black repaints): the left half is kept this time.
    let reply = cluster.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a boat", "init_images": [source], "mask": mask,
                "inpainting_mask_invert": 1, "seed": 9, "width": 64, "height": 64}),
    )?;
    reply.expect_status(200);
    let body = reply.json()?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["images"][0].as_str().expect("b64"))?;
    let rgb = png_rgb(&png);
    let px = |x: usize, y: usize| &rgb[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
    for y in [0, 20, 63] {
        assert_eq!(px(10, y), teal, "the black half is kept once inverted");
        assert_ne!(px(40, y), teal, "the white half is repainted once inverted");
    }

    // A blurred mask (A1111's mask_blur): far from the edge the halves are as before, at the
    // edge the repaint fades into the source.
    let reply = cluster.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a boat", "init_images": [source], "mask": mask, "mask_blur": 8,
                "seed": 9, "width": 64, "height": 64}),
    )?;
    reply.expect_status(200);
    let png = base64::engine::general_purpose::STANDARD
        .decode(reply.json()?["images"][0].as_str().expect("b64"))?;
    let rgb = png_rgb(&png);
    let px = |x: usize, y: usize| &rgb[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
    assert_eq!(px(63, 20), teal, "far on the kept side: the source");
    let distance = |p: &[u8]| -> u32 {
        p.iter()
            .zip(teal)
            .map(|(a, b)| u32::from(a.abs_diff(b)))
            .sum()
    };
    let (far, edge) = (distance(px(0, 20)), distance(px(33, 20)));
    assert!(
        edge > 0 && edge < far,
        "at the edge a blend: {edge} vs {far} far inside"
    );

    // Broken input: 400 with the field, nothing accepted.
    let before = cluster.get("/v1/jobs")?.json()?;
    let small = base64(&png_of(8, 8, |_, _| [0; 3]));
    for (body, field) in [
        (
            json!({"prompt": "x", "init_image": "not base64 !"}),
            "init_image",
        ),
        (
            json!({"prompt": "x", "init_image": base64(b"GIF89a")}),
            "init_image",
        ),
        (
            json!({"prompt": "x", "init_image": source, "mask": small}),
            "mask",
        ),
        (
            json!({"prompt": "x", "init_image": source, "strength": 0}),
            "strength",
        ),
        (json!({"prompt": "x", "mask": source}), "mask"),
    ] {
        let reply = cluster.post("/v1/jobs", &body)?;
        reply.expect_status(400);
        assert_eq!(reply.json()?["error"]["details"]["field"], field, "{body}");
    }
    for (body, field) in [
        (json!({"prompt": "x"}), "init_images"),
        (
            json!({"prompt": "x", "init_images": [source], "resize_mode": 3}),
            "resize_mode",
        ),
        (
            json!({"prompt": "x", "init_images": [source], "inpainting_mask_invert": 2}),
            "inpainting_mask_invert",
        ),
        (json!({"prompt": "x", "init_images": [7]}), "init_images[0]"),
    ] {
        let reply = cluster.post("/sdapi/v1/img2img", &body)?;
        reply.expect_status(400);
        assert_eq!(reply.json()?["error"]["details"]["field"], field, "{body}");
    }
    assert_eq!(
        cluster.get("/v1/jobs")?.json()?,
        before,
        "nothing half-accepted"
    );

    // Near the limits: a 10 MB (noisy) source is taken and kept, one over 16 MiB is
    // refused naming the field.
    let noise = |w: u32, h: u32| {
        png_of(w, h, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503))
                .wrapping_mul(2_246_822_519);
            [v as u8, (v >> 8) as u8, (v >> 16) as u8]
        })
    };
    let big = noise(2048, 2048);
    assert!(big.len() > 8_000_000, "{} bytes", big.len());
    let id = cluster.submit(&json!({"prompt": "static", "init_image": base64(&big),
                                    "size": "64x64", "strength": 0.5}))?;
    let done = cluster.wait_for_job(&id, T)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["spec"]["source"]["image_bytes"], big.len());
    let huge = noise(3000, 3000);
    assert!(huge.len() > 16 << 20, "{} bytes", huge.len());
    let reply = cluster.post(
        "/v1/jobs",
        &json!({"prompt": "x", "init_image": base64(&huge)}),
    )?;
    reply.expect_status(400);
    assert_eq!(reply.json()?["error"]["details"]["field"], "init_image");
    Ok(())
}

#[test]
fn cpu_nodes_run_img2img_and_inpainting_through_the_burn_pipeline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, variant) in [
        ("demo-sd15", "lcm"),
        ("demo-sd15-standard", "standard"),
        ("demo-sd15-inpaint", "inpaint"),
    ] {
        let status = Command::new(binaries!().node)
            .args(["make-model", "--variant", variant, "--out"])
            .arg(dir.path().join(name))
            .status()?;
        assert!(status.success());
    }
    let root = dir.path().to_string_lossy().into_owned();
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    for (name, model) in [
        ("cpu-lcm", "demo-sd15"),
        ("cpu-std", "demo-sd15-standard"),
        ("cpu-inpaint", "demo-sd15-inpaint"),
    ] {
        cluster.add_node(NodeSpec {
            name: name.into(),
            env: vec![
                ("BACKEND".into(), "cpu".into()),
                ("MODEL_ROOT".into(), root.clone()),
                ("MODEL".into(), model.into()),
            ],
        })?;
    }
    cluster.wait_for_online(&["cpu-lcm", "cpu-std", "cpu-inpaint"], T)?;
    for n in cluster.nodes()? {
        assert_eq!(n["img2img"], true, "{n}");
        assert_eq!(n["inpaint"], true, "{n}");
    }
    // A1111 UIs list the models by the names their operators gave them.
    let titles = cluster.get("/sdapi/v1/sd-models")?.json()?;
    let titles: Vec<&str> = titles
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["title"].as_str())
        .collect();
    assert!(
        titles.iter().any(|t| t.starts_with("demo-sd15-standard [")),
        "{titles:?}"
    );
    // Two nodes run standard samplers: jobs name the model to pin theirs.
    let model_of = |name: &str| -> anyhow::Result<String> {
        Ok(cluster
            .nodes()?
            .into_iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["model_id"].as_str().map(String::from))
            .expect("a model id"))
    };
    let standard = model_of("cpu-std")?;
    let sunset = base64(&png_of(128, 64, |x, y| [(x * 2) as u8, (y * 3) as u8, 120]));
    let night = base64(&png_of(128, 64, |x, _| [10, 10, (x * 2) as u8]));

    // A standard sampler from a source at strength 0.5: half of the 4 steps run.
    let run = |source: &str, seed: u64| {
        cluster.post(
            "/v1/generate",
            &json!({"prompt": "a harbour", "model": standard, "init_image": source,
                    "strength": 0.5, "sampler": "Euler a", "steps": 4, "seed": seed}),
        )
    };
    let a = run(&sunset, 3)?;
    a.expect_status(200);
    assert_eq!(png_size(&a.body), (128, 64));
    assert_eq!(
        a.header("x-node-id"),
        cluster.node_id("cpu-std")?.as_deref()
    );
    assert_eq!(
        (
            text(&a.body, "mode"),
            text(&a.body, "strength"),
            text(&a.body, "sampler")
        ),
        ("img2img".into(), "0.5".into(), "euler_a".into())
    );
    let again = run(&sunset, 3)?;
    assert_eq!(
        png_rgb(&again.body),
        png_rgb(&a.body),
        "same source and seed, same image"
    );
    let other = run(&night, 3)?;
    assert_ne!(
        png_rgb(&other.body),
        png_rgb(&a.body),
        "the source shapes the image"
    );

    // Inpainting on the LCM model, cropped from 128×64 to 64×64.
    let mask = base64(&png_of(
        128,
        64,
        |x, _| if x >= 64 { [255; 3] } else { [0; 3] },
    ));
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a harbour", "model": "sd15", "sampler": "lcm", "steps": 2,
                "init_image": sunset, "mask": mask, "size": "64x64", "resize_mode": "crop",
                "seed": 8}),
    )?;
    reply.expect_status(200);
    assert_eq!(
        reply.header("x-node-id"),
        cluster.node_id("cpu-lcm")?.as_deref()
    );
    assert_eq!(png_size(&reply.body), (64, 64));
    assert_eq!(text(&reply.body, "mode"), "inpaint");
    assert_eq!(text(&reply.body, "strength"), "1");

    // A 9-channel inpainting model: the mask and the masked source are UNet inputs.
    let inpaint = cluster.node_id("cpu-inpaint")?.expect("an id");
    let model = model_of("cpu-inpaint")?;
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a boat", "model": model, "steps": 3, "sampler": "Euler",
                "init_image": sunset, "mask": mask, "seed": 4}),
    )?;
    reply.expect_status(200);
    assert_eq!(reply.header("x-node-id"), Some(inpaint.as_str()));
    assert_eq!(png_size(&reply.body), (128, 64));
    assert_eq!(text(&reply.body, "mode"), "inpaint");
    // The same model renders text-to-image too (everything masked).
    let reply = cluster.post(
        "/v1/generate",
        &json!({"prompt": "a boat", "model": model, "steps": 2, "size": "64x64"}),
    )?;
    reply.expect_status(200);

    // LCM img2img: a strength too low to leave the asked steps is refused by the node, with
    // the reason, and the job fails for good.
    let id = cluster.submit(&json!({"prompt": "x", "model": "sd15", "sampler": "lcm",
                                    "steps": 4, "init_image": sunset, "strength": 0.05}))?;
    let failed = cluster.wait_for_job(&id, T)?;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed.to_string().contains("raise strength"),
        "the node's reason reaches the job: {failed}"
    );
    Ok(())
}

/// An RGBA PNG: `alpha(x, y)` over a flat colour.
fn rgba_png(w: u32, h: u32, rgb: [u8; 3], alpha: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(png::ColorType::Rgba);
        e.set_depth(png::BitDepth::Eight);
        let mut writer = e.write_header().expect("header");
        let mut data = Vec::with_capacity((w * h * 4) as usize);
        for y in 0..h {
            for x in 0..w {
                data.extend(rgb);
                data.push(alpha(x, y));
            }
        }
        writer.write_image_data(&data).expect("data");
    }
    out
}

fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend(b"--drover-test\r\nContent-Disposition: form-data; name=\"");
        body.extend(name.as_bytes());
        body.extend(b"\"");
        if let Some(f) = filename {
            body.extend(b"; filename=\"");
            body.extend(f.as_bytes());
            body.extend(b"\"\r\nContent-Type: image/png");
        }
        body.extend(b"\r\n\r\n");
        body.extend(*data);
        body.extend(b"\r\n");
    }
    body.extend(b"--drover-test--\r\n");
    body
}

#[test]
fn openai_edits_repaint_where_the_image_is_transparent() -> anyhow::Result<()> {
    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    cluster.add_node(NodeSpec::sim("painter", "sd15"))?;
    cluster.wait_for_online(&["painter"], T)?;
    let teal = [30, 200, 90];
    // Left half transparent: OpenAI's "edit here".
    let image = rgba_png(64, 64, teal, |x, _| if x < 32 { 0 } else { 255 });
    let multipart = "multipart/form-data; boundary=drover-test";
    let reply = cluster.post_typed(
        "/v1/images/edits",
        multipart,
        &form(&[
            ("image", Some("in.png"), &image),
            ("prompt", None, b"a boat"),
            ("n", None, b"2"),
            ("response_format", None, b"b64_json"),
            ("model", None, b"gpt-image-1"),
            ("seed", None, b"4"),
        ]),
    )?;
    reply.expect_status(200);
    let body = reply.json()?;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[0]["b64_json"].as_str().expect("b64"))?;
    assert_eq!(png_size(&png), (64, 64), "the image's own size");
    assert_eq!(text(&png, "mode"), "inpaint");
    let rgb = png_rgb(&png);
    let px = |x: usize, y: usize| &rgb[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
    for y in [0, 31, 63] {
        assert_eq!(px(48, y), teal, "the opaque half is kept");
        assert_ne!(px(8, y), teal, "the transparent half is repainted");
    }
    // A separate mask, transparent on the right: the other half is repainted.
    let mask = rgba_png(64, 64, [0, 0, 0], |x, _| if x >= 32 { 0 } else { 255 });
    let opaque = rgba_png(64, 64, teal, |_, _| 255);
    let reply = cluster.post_typed(
        "/v1/images/edits",
        multipart,
        &form(&[
            ("image", Some("in.png"), &opaque),
            ("mask", Some("mask.png"), &mask),
            ("prompt", None, b"a boat"),
            ("response_format", None, b"b64_json"),
        ]),
    )?;
    reply.expect_status(200);
    let png = base64::engine::general_purpose::STANDARD
        .decode(reply.json()?["data"][0]["b64_json"].as_str().expect("b64"))?;
    let rgb = png_rgb(&png);
    assert_eq!(&rgb[(10 * 64 + 8) * 3..(10 * 64 + 8) * 3 + 3], teal);
    assert_ne!(&rgb[(10 * 64 + 48) * 3..(10 * 64 + 48) * 3 + 3], teal);
    // Broken forms: OpenAI's error shape, naming the param.
    for (content_type, body, param) in [
        (multipart, form(&[("prompt", None, b"x")]), "image"),
        (
            multipart,
            form(&[("image", Some("a.png"), b"GIF89a"), ("prompt", None, b"x")]),
            "init_image",
        ),
        ("application/json", b"{}".to_vec(), "body"),
        (
            multipart,
            form(&[
                ("image", Some("in.png"), &image),
                ("prompt", None, b"x"),
                ("n", None, b"many"),
            ]),
            "n",
        ),
    ] {
        let reply = cluster.post_typed("/v1/images/edits", content_type, &body)?;
        reply.expect_status(400);
        assert_eq!(reply.json()?["error"]["param"], param);
    }
    Ok(())
}
