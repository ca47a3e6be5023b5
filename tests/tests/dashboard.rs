//! The dashboard in a real browser: headless Chromium through chromedriver (Debian's `chromium`
//! and `chromium-driver`), driven over W3C WebDriver (`drover_tests::webdriver`) against a
//! sandbox cluster. It checks the page lists the nodes, follows a job live until its thumbnail
//! shows, says why a queued job waits, drains and resumes a node with the admin token, and draws
//! the charts; a screenshot is kept in `target/drover-artifacts/dashboard.png`.
//!
//! Built only with `--features browser` (`.ci/run` installs the browser and runs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_tests::webdriver::Browser;
use drover_tests::{ClusterSandbox, NodeSpec, binaries, free_port};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const ADMIN: &str = "dashboard-admin";

/// A chromedriver process, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(p.into());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

fn start_driver() -> Result<(Driver, String)> {
    let driver = find_program("CHROMEDRIVER", &["chromedriver"]).context(
        "chromedriver not found: install Debian's chromium and chromium-driver \
         (apt-get install chromium chromium-driver) or set CHROMEDRIVER",
    )?;
    let port = free_port()?;
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start chromedriver")?;
    let guard = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + T;
    while ureq::get(&format!("{url}/status")).call().is_err() {
        if Instant::now() > deadline {
            bail!("chromedriver did not answer on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((guard, url))
}

fn browser(driver: &str) -> Result<Browser> {
    let mut options = json!({
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1200"]
    });
    if let Some(chromium) = find_program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    ) {
        options["binary"] = json!(chromium);
    }
    Browser::start(driver, json!({ "goog:chromeOptions": options }))
        .context("open a chromium session")
}

/// Evaluates `script` (a function body returning a value) until it answers `true`.
fn wait_js(page: &Browser, what: &str, script: &str) -> Result<()> {
    let deadline = Instant::now() + T;
    loop {
        if page.execute(script, vec![])? == Value::Bool(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let html = page.source().unwrap_or_default();
            bail!("timed out waiting until {what}; page:\n{html}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn artifact_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("drover-artifacts")
}

#[test]
fn the_dashboard_shows_the_cluster_live_and_drains_nodes() -> Result<()> {
    let (_driver, driver_url) = start_driver()?;
    let mut cluster = ClusterSandbox::start(
        binaries!(),
        &[
            ("DROVER_ADMIN_TOKEN", ADMIN),
            ("DROVER_HISTORY_SAMPLE_MS", "500"),
        ],
    )?;
    cluster.add_node(NodeSpec::sim("painter", "sd15").env("SIM_STEP_MS", "150"))?;
    cluster.add_node(NodeSpec::sim("xl-box", "sdxl"))?;
    cluster.wait_for_online(&["painter", "xl-box"], T)?;
    let page = browser(&driver_url)?;
    let result = run(&page, &cluster);
    if result.is_err()
        && let Ok(shot) = page.screenshot()
    {
        let _ = std::fs::create_dir_all(artifact_dir());
        let _ = std::fs::write(artifact_dir().join("dashboard-failure.png"), shot);
    }
    let _ = page.close();
    result
}

fn run(page: &Browser, cluster: &ClusterSandbox) -> Result<()> {
    page.goto(&format!("{}/", cluster.base_url()))?;
    let nodes = page.find("#nodes")?.text()?;
    assert!(
        nodes.contains("painter") && nodes.contains("xl-box"),
        "{nodes}"
    );
    // Without the admin token the page offers no drain buttons.
    assert!(page.find_all("button[data-action]")?.is_empty());

    // A job runs: the page follows it live, then shows it with its thumbnail.
    let id = cluster.submit(&json!({"prompt": "a lighthouse at dusk", "model": "sd15",
                                      "size": "64x64", "steps": 30}))?;
    wait_js(
        page,
        "the running job shows with its progress",
        &format!(
            "var r = document.querySelector('#jobs tr[data-job=\"{id}\"]');\
             return !!r && r.textContent.indexOf('painter') >= 0 && !!r.querySelector('progress');"
        ),
    )?;
    wait_js(
        page,
        "the finished job shows its thumbnail",
        &format!(
            "var c = document.querySelector('#recent .card[data-job=\"{id}\"]');\
             var img = c && c.querySelector('img');\
             return !!img && c.textContent.indexOf('succeeded') >= 0 && img.complete && img.naturalWidth === 64;"
        ),
    )?;

    // A job for a drained node waits, and the page says why.
    let xl = cluster.node_id("xl-box")?.context("xl-box id")?;
    let drained = cluster.post_with_token(&format!("/v1/nodes/{xl}/drain"), ADMIN)?;
    assert_eq!(drained.status, 200);
    let waiting = cluster
        .submit(&json!({"prompt": "a castle", "model": "sdxl", "size": "64x64", "steps": 2}))?;
    wait_js(
        page,
        "the queued job says it waits for a draining node",
        &format!(
            "var r = document.querySelector('#jobs tr[data-job=\"{waiting}\"]');\
             return !!r && r.textContent.indexOf('xl-box: draining') >= 0;"
        ),
    )?;
    // With the admin token entered, buttons appear; resuming the node lets the job run.
    page.find("#token")?.send_keys(ADMIN)?;
    page.execute(
        "document.getElementById('token').dispatchEvent(new Event('change'));",
        vec![],
    )?;
    let resume = "button[data-action=\"resume\"][data-name=\"xl-box\"]";
    wait_js(
        page,
        "the resume button shows",
        &format!("return !!document.querySelector('{resume}');"),
    )?;
    page.find(resume)?.click()?;
    let done = cluster.wait_for_job(&waiting, T)?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(cluster.node_state("xl-box")?.as_deref(), Some("online"));

    // Drain from the page.
    let drain = "button[data-action=\"drain\"][data-name=\"painter\"]";
    wait_js(
        page,
        "the drain button of painter shows",
        &format!("return !!document.querySelector('{drain}');"),
    )?;
    page.find(drain)?.click()?;
    wait_js(
        page,
        "painter shows as draining",
        "var r = [].slice.call(document.querySelectorAll('#nodes tr'))\
           .filter(function (tr) { return tr.textContent.indexOf('painter') === 0; })[0];\
         return !!r && r.className === 'draining';",
    )?;
    // The charts have samples: the throughput line has points and counted the images.
    wait_js(
        page,
        "the charts plot the last samples",
        "var p = document.querySelector('#chart-throughput polyline');\
         var q = document.querySelector('#chart-queue polyline');\
         var s = document.querySelector('#chart-speed polyline');\
         return !!p && !!q && !!s && p.getAttribute('points').split(' ').length >= 3;",
    )?;
    assert_eq!(cluster.node_state("painter")?.as_deref(), Some("draining"));

    let shot = page.screenshot()?;
    let decoder = png::Decoder::new(std::io::Cursor::new(&shot));
    let info = decoder.read_info()?.info().clone();
    assert!(
        info.width >= 1000,
        "screenshot {}x{}",
        info.width,
        info.height
    );
    std::fs::create_dir_all(artifact_dir())?;
    let path = artifact_dir().join("dashboard.png");
    std::fs::write(&path, &shot)?;
    println!("dashboard screenshot: {}", path.display());
    Ok(())
}
