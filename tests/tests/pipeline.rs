//! The real pipeline behind the scheduler: cpu nodes running Burn's SD1.5 LCM pipeline on the
//! random-weight demo model (`drover-node make-model`), reached through the coordinator.

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
    let model = dir.path().join("demo-sd15");
    let status = Command::new(binaries!().node)
        .args(["make-model", "--out"])
        .arg(&model)
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
        ],
    };
    cluster.add_node(cpu)?;
    cluster.wait_for_online(&["cpu-a"], T)?;
    let nodes = cluster.nodes()?;
    assert_eq!(nodes[0]["backend"], "cpu", "{nodes:?}");
    assert_eq!(nodes[0]["family"], "sd15", "{nodes:?}");

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
