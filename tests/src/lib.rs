//! `ClusterSandbox`: a whole Drover cluster on this machine for end-to-end and fault tests.
//!
//! The coordinator and every node are real child processes (the `sandbox-coordinator` and
//! `sandbox-node` binaries of this crate, which are the production entry points) on free loopback
//! ports with their own temporary data folder, so tests can `kill -9` them, pause them with
//! SIGSTOP, and restart them on the same data. Waits are `wait_until` polls with a deadline,
//! never bare sleeps. When a test panics, the tail of every process log is printed.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod http1;
mod images;
pub mod proxy;
pub mod replicas;
mod rest;
pub mod webdriver;

pub use images::{base64, png_of, png_rgb, png_size, png_text};
pub use rest::Reply;

/// Paths of the binaries the sandbox runs. Build it with [`binaries!`].
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The coordinator binary.
    pub coordinator: PathBuf,
    /// The node binary.
    pub node: PathBuf,
}

/// The sandbox binaries of this crate, as cargo built them for the calling integration test.
#[macro_export]
macro_rules! binaries {
    () => {
        $crate::Binaries {
            coordinator: env!("CARGO_BIN_EXE_sandbox-coordinator").into(),
            node: env!("CARGO_BIN_EXE_sandbox-node").into(),
        }
    };
}

/// A node to start in the sandbox.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// `NODE_NAME`.
    pub name: String,
    /// Environment of the node process (BACKEND, SIM_FAMILY, ...).
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    /// A simulated node of `family` with 2 workers and 20 ms steps.
    pub fn sim(name: &str, family: &str) -> Self {
        Self {
            name: name.to_string(),
            env: vec![
                ("BACKEND".into(), "sim".into()),
                ("SIM_FAMILY".into(), family.into()),
                ("SIM_STEP_MS".into(), "20".into()),
                ("NUM_WORKERS".into(), "2".into()),
            ],
        }
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }
}

pub(crate) struct Proc {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Kills it, printing the last `lines` of its log first when a test is failing.
    fn stop(&mut self, lines: usize) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, lines)
            );
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("{} is not running", self.name))
    }
}

/// A running cluster: one coordinator and any number of nodes.
pub struct ClusterSandbox {
    bins: Binaries,
    dir: tempfile::TempDir,
    http_port: u16,
    grpc_port: u16,
    coordinator_env: Vec<(String, String)>,
    coordinator: Proc,
    nodes: Vec<(NodeSpec, Proc)>,
    agent: ureq::Agent,
    /// The coordinator's certificate when it serves TLS (nodes trust it as their CA).
    tls_cert: Option<PathBuf>,
    /// Whether the REST API is HTTPS.
    http_tls: bool,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn spawn(program: &Path, env: &[(String, String)], log: &Path) -> Result<Child> {
    let out = File::options().create(true).append(true).open(log)?;
    Command::new(program)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ClusterSandbox {
    /// Starts a coordinator with test timings (100 ms heartbeats, 1.5 s offline grace) and extra
    /// environment `env`, and waits until it answers `/healthz`.
    pub fn start(bins: Binaries, env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("drover-sandbox-")
            .tempdir()?;
        let (http_port, grpc_port) = (free_port()?, free_port()?);
        let mut coordinator_env: Vec<(String, String)> = vec![
            ("DROVER_HTTP_ADDR".into(), format!("127.0.0.1:{http_port}")),
            ("DROVER_GRPC_ADDR".into(), format!("127.0.0.1:{grpc_port}")),
            (
                "DROVER_DATA_DIR".into(),
                dir.path().join("coordinator-data").display().to_string(),
            ),
            ("DROVER_HEARTBEAT_MS".into(), "100".into()),
            ("DROVER_OFFLINE_GRACE_MS".into(), "1500".into()),
            ("DROVER_LEASE_FLOOR_MS".into(), "10000".into()),
            // A small disk reserve: every sandbox would otherwise write 64 MiB of zeros.
            ("DROVER_STORE_RESERVE_MB".into(), "1".into()),
        ];
        for (k, v) in env {
            coordinator_env.retain(|(key, _)| key != k);
            coordinator_env.push((k.to_string(), v.to_string()));
        }
        let setting = |name: &str| {
            coordinator_env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let tls_cert = setting("DROVER_TLS_CERT").map(PathBuf::from);
        let http_tls =
            setting("DROVER_HTTP_TLS").is_some_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        let mut agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)));
        if http_tls && let Some(cert) = &tls_cert {
            agent_config = agent_config.tls_config(drover_cli::trusting(cert)?);
        }
        let agent: ureq::Agent = agent_config.build().into();
        let coordinator = Proc {
            name: "coordinator".into(),
            log: dir.path().join("coordinator.log"),
            child: None,
        };
        let mut sandbox = Self {
            bins,
            dir,
            http_port,
            grpc_port,
            coordinator_env,
            coordinator,
            nodes: Vec::new(),
            agent,
            tls_cert,
            http_tls,
        };
        sandbox.start_coordinator()?;
        Ok(sandbox)
    }

    /// Starts the coordinator process (again) on the same ports and data, and waits for it.
    pub fn start_coordinator(&mut self) -> Result<()> {
        self.coordinator.kill();
        let child = spawn(
            &self.bins.coordinator,
            &self.coordinator_env,
            &self.coordinator.log,
        )?;
        self.coordinator.child = Some(child);
        self.wait_until(
            Duration::from_secs(30),
            "coordinator answers /healthz",
            |s| Ok(s.get("/healthz").map(|r| r.status == 200).unwrap_or(false)),
        )
    }

    /// Kills the coordinator with SIGKILL.
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// Base URL of the REST API (`https://` when the coordinator serves it over TLS).
    pub fn base_url(&self) -> String {
        let scheme = if self.http_tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.http_port)
    }

    /// URL nodes use to reach the coordinator (`https://` when it serves TLS).
    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.grpc_port)
    }

    /// The REST API's port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Starts a node process; answers its index. Does not wait for it to come online.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<usize> {
        let index = self.nodes.len();
        let log = self
            .dir
            .path()
            .join(format!("node-{index}-{}.log", spec.name));
        let proc = Proc {
            name: format!("node {}", spec.name),
            log,
            child: None,
        };
        self.nodes.push((spec, proc));
        self.start_node(index)?;
        Ok(index)
    }

    /// Starts node `index` (again).
    pub fn start_node(&mut self, index: usize) -> Result<()> {
        let grpc_url = self.grpc_url();
        let ca = self.tls_cert.clone();
        let (spec, proc) = self
            .nodes
            .get_mut(index)
            .ok_or_else(|| anyhow!("no node {index}"))?;
        proc.kill();
        let mut env = vec![
            ("COORDINATOR_URL".to_string(), grpc_url),
            ("NODE_NAME".to_string(), spec.name.clone()),
        ];
        if let Some(ca) = ca {
            env.push(("DROVER_CA_CERT".to_string(), ca.display().to_string()));
        }
        env.extend(spec.env.iter().cloned());
        proc.child = Some(spawn(&self.bins.node, &env, &proc.log)?);
        Ok(())
    }

    /// Starts a node whose link to the coordinator runs through a [`proxy::LinkProxy`], so the
    /// test can partition it; answers the node's index and the proxy.
    pub fn add_node_behind_proxy(&mut self, spec: NodeSpec) -> Result<(usize, proxy::LinkProxy)> {
        let proxy = proxy::LinkProxy::start(format!("127.0.0.1:{}", self.grpc_port))?;
        let spec = spec.env(
            "COORDINATOR_URL",
            &format!("http://127.0.0.1:{}", proxy.port()),
        );
        Ok((self.add_node(spec)?, proxy))
    }

    /// The process id of the coordinator (first) and of every running node, with their names.
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::iter::once(&self.coordinator)
            .chain(self.nodes.iter().map(|(_, proc)| proc))
            .filter_map(|proc| Some((proc.name.clone(), proc.pid().ok()?)))
            .collect()
    }

    /// The coordinator's log so far.
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(&self.coordinator.log).unwrap_or_default()
    }

    /// Kills node `index` with SIGKILL.
    pub fn kill_node(&mut self, index: usize) {
        if let Some((_, proc)) = self.nodes.get_mut(index) {
            proc.kill();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, ...) to node `index` with `kill -s`.
    pub fn signal_node(&self, index: usize, signal: &str) -> Result<()> {
        let (_, proc) = self
            .nodes
            .get(index)
            .ok_or_else(|| anyhow!("no node {index}"))?;
        let status = Command::new("kill")
            .args(["-s", signal, &proc.pid()?.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -s {signal} {} failed", proc.name);
        }
        Ok(())
    }

    /// Waits for node `index` to exit by itself; answers its exit code.
    pub fn wait_node_exit(&mut self, index: usize, timeout: Duration) -> Result<Option<i32>> {
        let (_, proc) = self
            .nodes
            .get_mut(index)
            .ok_or_else(|| anyhow!("no node {index}"))?;
        let deadline = Instant::now() + timeout;
        let child = proc
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{} is not running", proc.name))?;
        loop {
            if let Some(status) = child.try_wait()? {
                proc.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", proc.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log of node `index` so far.
    pub fn node_log(&self, index: usize) -> String {
        self.nodes
            .get(index)
            .map(|(_, p)| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Polls `check` every 25 ms until it answers true, or fails after `timeout` naming `what`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_error = None;
        loop {
            match check(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting until {what} (last error: {last_error:?})"
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ClusterSandbox {
    fn drop(&mut self) {
        for (_, proc) in &mut self.nodes {
            proc.stop(40);
        }
        self.coordinator.stop(80);
    }
}

impl ClusterSandbox {
    /// Starts the coordinator process (again) on the same ports and data, and waits until it
    /// answers `/healthz` at all: a coordinator whose store is degraded answers `503`. Fails at
    /// once when the process exits.
    pub fn start_coordinator_answering(&mut self) -> Result<()> {
        self.coordinator.kill();
        let child = spawn(
            &self.bins.coordinator,
            &self.coordinator_env,
            &self.coordinator.log,
        )?;
        self.coordinator.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.get("/healthz").is_ok() {
                return Ok(());
            }
            if let Some(code) = self.coordinator_exit() {
                bail!(
                    "the coordinator exited ({code:?}) instead of starting:\n{}",
                    tail(&self.coordinator.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("timed out after 30 s waiting until the coordinator answers /healthz");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The coordinator's exit code when it has exited by itself (`None` while it runs).
    fn coordinator_exit(&mut self) -> Option<Option<i32>> {
        let status = self.coordinator.child.as_mut()?.try_wait().ok()??;
        Some(status.code())
    }
}
