//! The real pipeline behind the scheduler: cpu nodes running Burn's SD1.5 and SDXL LCM pipelines
//! on random-weight demo models (`drover-node make-model`), reached through the coordinator.

use std::process::Command;
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries};
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn png_text(png: &[u8]) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::Cursor::new(png.to_vec()))
        .read_info()
        .expect("a PNG");
    reader
        .info()
        .utf8_text
        .iter()
        .map(|t| (t.keyword.clone(), t.get_text().unwrap_or_default()))
        .collect()
}

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
    let root = dir.path().to_string_lossy().into_owned();

    let mut cluster = ClusterSandbox::start(binaries!(), &[])?;
    let cpu = NodeSpec {
        name: "cpu-a".into(),
        env: vec![
            ("BACKEND".into(), "cpu".into()),
            ("MODEL_ROOT".into(), root.clone()),
            ("MODEL".into(), "demo-sd15".into()),
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
    cluster.wait_for_online(&["cpu-a", "cpu-xl"], T)?;
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
                      "steps": 2, "seed": 11});
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

    // More steps than an LCM pipeline runs: refused for good, with the node's reason.
    let id =
        cluster.submit(&json!({"prompt": "x", "model": "sd15", "size": "64x64", "steps": 20}))?;
    let job = cluster.wait_for_job(&id, T)?;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job.to_string().contains("1..=8 steps"), "{job}");
    Ok(())
}
