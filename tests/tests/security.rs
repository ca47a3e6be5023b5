//! End-to-end tests of who may do what: node tokens, API keys and secret files, TLS.

use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries, png_size};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

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
