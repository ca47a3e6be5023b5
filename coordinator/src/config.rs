//! Coordinator configuration: every setting is a flag with an environment variable and a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one coordinator process.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "drover-coordinator",
    version,
    about = "Drover coordinator: REST API, node registry, job routing"
)]
pub struct Config {
    /// Address of the REST API.
    #[arg(long, env = "DROVER_HTTP_ADDR", default_value = "0.0.0.0:4200")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC endpoint nodes connect to.
    #[arg(long, env = "DROVER_GRPC_ADDR", default_value = "0.0.0.0:4201")]
    pub grpc_addr: SocketAddr,
    /// Folder of the store (database, write-ahead log, images).
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "./drover-data")]
    pub data_dir: PathBuf,
    /// Bearer token required on admin calls; when unset, admin calls are accepted from loopback
    /// only (unless `--insecure`).
    #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token nodes must present when they connect; when unset, nodes may join from loopback only
    /// (unless `--insecure`).
    #[arg(long, env = "DROVER_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
    /// Lab mode: without `DROVER_ADMIN_TOKEN` admin calls, and without `DROVER_NODE_TOKEN` node
    /// joins, are accepted from any address (by default only from loopback); `1`/`true`/`yes`.
    #[arg(
        long,
        env = "DROVER_INSECURE",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
    /// PEM certificate chain of this coordinator; with `--tls-key`, nodes connect over TLS
    /// (`https://` in their COORDINATOR_URL), and with `--http-tls` the REST API is HTTPS too.
    #[arg(long, env = "DROVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "DROVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve the REST API over TLS too (with `--tls-cert` and `--tls-key`); `1`/`true`/`yes`.
    #[arg(
        long,
        env = "DROVER_HTTP_TLS",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub http_tls: bool,
    /// Reads the admin token from this file (Docker/Kubernetes secrets) instead of the variable.
    #[arg(long, env = "DROVER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Reads the node token from this file instead of the variable.
    #[arg(long, env = "DROVER_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,
    /// Client API keys, comma-separated. Client calls (generate, jobs, images, events,
    /// compatibility endpoints) need one when any key is configured; they are open otherwise.
    #[arg(
        long,
        env = "DROVER_API_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,
    /// More client API keys, one per line: `KEY [name=LABEL] [rate=N] [active=N]` (`#` starts
    /// a comment); `rate` and `active` override the defaults below for that key.
    #[arg(long, env = "DROVER_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Submissions per minute one client may make (an API key; the caller's address when no
    /// keys are configured), in bursts of up to as many; 0: no limit.
    #[arg(long, env = "DROVER_KEY_RATE_PER_MIN", default_value_t = 0)]
    pub key_rate_per_min: u32,
    /// Unfinished jobs one client may have at once; 0: no limit.
    #[arg(long, env = "DROVER_KEY_MAX_ACTIVE", default_value_t = 0)]
    pub key_max_active: u32,
    /// The client keys of `api_keys` and `api_keys_file`, parsed (filled by `resolve_secrets`).
    #[arg(skip)]
    pub keys: Vec<crate::limits::ApiKey>,
    /// Style catalog (`styles.toml`); no styles when unset.
    #[arg(long, env = "DROVER_STYLES")]
    pub styles: Option<PathBuf>,
    /// Preset catalog (`presets.toml`: named job defaults a request picks with `preset`),
    /// reloaded when the file changes or on `POST /v1/presets/reload`; no presets when unset.
    #[arg(long, env = "DROVER_PRESETS")]
    pub presets: Option<PathBuf>,
    /// Folder of LoRA files used to check the style catalog's declared bases, when available here.
    #[arg(long, env = "DROVER_LORA_ROOT")]
    pub lora_root: Option<PathBuf>,
    /// Interval at which nodes send heartbeats, in milliseconds.
    #[arg(long, env = "DROVER_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which a node is suspect (gets no new work).
    #[arg(long, env = "DROVER_SUSPECT_MISSES", default_value_t = 3)]
    pub suspect_misses: u32,
    /// Silence after which a node is offline and its leases are re-queued, in milliseconds.
    #[arg(long, env = "DROVER_OFFLINE_GRACE_MS", default_value_t = 10_000)]
    pub offline_grace_ms: u64,
    /// Dynamic batching's gather window, in milliseconds: a newly accepted job whose lease group
    /// on a batching node would not be full waits up to this long for partners (0: never; a
    /// job then leaves with the partners queued now).
    #[arg(long, env = "DROVER_GATHER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=5000))]
    pub gather_ms: u64,
    /// Whether routing looks at which models nodes have loaded (default). Off, every catalogued
    /// model counts as loaded everywhere: residency-blind routing, the baseline
    /// `scripts/bench-residency.sh` measures against.
    #[arg(long, env = "DROVER_RESIDENCY_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub residency_routing: bool,
    /// Demand-driven loading, in milliseconds: a job queued this long whose model is loaded
    /// only on busy nodes makes an idle node that can serve it load the model ahead (0: never).
    #[arg(long, env = "DROVER_PRELOAD_AFTER_MS", default_value_t = 1000)]
    pub preload_after_ms: u64,
    /// Shortest lease a job gets, in milliseconds (longer for big jobs on slow nodes).
    #[arg(long, env = "DROVER_LEASE_FLOOR_MS", default_value_t = 30_000)]
    pub lease_floor_ms: u64,
    /// Attempts a job gets before it fails.
    #[arg(long, env = "DROVER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long `POST /v1/generate` waits for the image, in seconds.
    #[arg(long, env = "DROVER_GENERATE_TIMEOUT_S", default_value_t = 600)]
    pub generate_timeout_s: u64,
    /// Most queued jobs; further submissions get 429 with Retry-After.
    #[arg(long, env = "DROVER_QUEUE_LIMIT", default_value_t = 10_000)]
    pub queue_limit: usize,
    /// How long an image `POST /v1/uploads` took is kept (in memory), in seconds.
    #[arg(long, env = "DROVER_UPLOAD_TTL_S", default_value_t = 3600)]
    pub upload_ttl_s: u64,
    /// Memory all uploads may take, in MiB (the oldest are dropped first).
    #[arg(long, env = "DROVER_UPLOAD_MEMORY_MB", default_value_t = 512)]
    pub upload_memory_mb: usize,
    /// A queued job that no node takes within this many seconds fails as expired.
    #[arg(long, env = "DROVER_QUEUE_EXPIRY_S", default_value_t = 1200)]
    pub queue_expiry_s: u64,
    /// Finished jobs (and their images) are deleted this many seconds after they ended; 0 keeps
    /// them forever.
    #[arg(long, env = "DROVER_RESULT_RETENTION_S", default_value_t = 7 * 24 * 3600)]
    pub result_retention_s: u64,
    /// How often the dashboard's charts take a sample (they show the last hour), in milliseconds.
    #[arg(long, env = "DROVER_HISTORY_SAMPLE_MS", default_value_t = 10_000)]
    pub history_sample_ms: u64,
    /// Threads serving the REST API (the control plane, gRPC sessions and the store have their
    /// own).
    #[arg(long, env = "DROVER_HTTP_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub http_workers: u16,
    /// Space the store keeps in reserve (a ballast file in the data folder), in MiB: when the
    /// disk fills up, it is given back so the coordinator can still start, serve reads and take
    /// running jobs' results while it refuses new work; 0 keeps no reserve.
    #[arg(long, env = "DROVER_STORE_RESERVE_MB", default_value_t = 64)]
    pub store_reserve_mb: u64,
    /// This replica's id in `DROVER_PEERS` (a replicated coordinator); unset, a host name ending
    /// in `-N` (a StatefulSet's pod) gives N + 1.
    #[arg(long, env = "DROVER_REPLICA_ID")]
    pub replica_id: Option<u64>,
    /// The replicas of a replicated coordinator, `1=host:port,2=host:port,3=host:port` (each
    /// one's gRPC address, which carries the replication too), the same list on every replica.
    /// Unset: a single coordinator.
    #[arg(long, env = "DROVER_PEERS")]
    pub peers: Option<String>,
    /// This replica joins an existing cluster (added with `POST /v1/cluster/replicas` on the
    /// leader) instead of forming one with `DROVER_PEERS` on its first start; `1`/`true`/`yes`.
    #[arg(
        long,
        env = "DROVER_JOIN",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub join: bool,
    /// Token the replicas present to each other; when unset, replica calls are accepted from
    /// loopback only (unless `--insecure`).
    #[arg(long, env = "DROVER_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Reads the peer token from this file instead of the variable.
    #[arg(long, env = "DROVER_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,
    /// The URL clients reach this replica's REST API at (where followers send clients to the
    /// leader); default: `http://` + the host of its `DROVER_PEERS` address + the port of
    /// `DROVER_HTTP_ADDR`.
    #[arg(long, env = "DROVER_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    /// How long a replicated write may wait for a majority before the request gets 503, in
    /// milliseconds.
    #[arg(long, env = "DROVER_COMMIT_TIMEOUT_MS", default_value_t = 5000)]
    pub commit_timeout_ms: u64,
    /// A replicated coordinator snapshots its store (the log's entries before it can then go)
    /// every this many log entries.
    #[arg(long, env = "DROVER_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Log entries kept before the last snapshot (a replica a little behind catches up from them
    /// rather than from a whole snapshot).
    #[arg(long, env = "DROVER_SNAPSHOT_KEEP", default_value_t = 1_000)]
    pub snapshot_keep: u64,
    /// Election timeout, in milliseconds: a follower that has heard no leader for 1.25× this (the
    /// leader's lease) plus a random 1–1.25× this stands for election, so a fail-over takes
    /// about 2.25–2.5× it; the leader's heartbeat is a quarter of it. Raise it on slow links.
    #[arg(long, env = "DROVER_ELECTION_TIMEOUT_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub election_timeout_ms: u64,
}

impl Config {
    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }

    /// Silence after which a node gets no new work.
    pub fn suspect_after(&self) -> Duration {
        self.heartbeat() * self.suspect_misses.max(1)
    }

    /// Silence after which a node is offline.
    pub fn offline_grace(&self) -> Duration {
        Duration::from_millis(self.offline_grace_ms).max(self.suspect_after())
    }

    /// A configuration for tests: local addresses on port 0 are replaced by the caller.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        use clap::Parser;
        let mut config = Self::parse_from(["drover-coordinator"]);
        config.data_dir = data_dir;
        config
    }
}

fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{what}: cannot read {}", path.display()))?;
    let secret = text.trim().to_string();
    anyhow::ensure!(!secret.is_empty(), "{what}: {} is empty", path.display());
    Ok(secret)
}

impl Config {
    /// Reads the `*_FILE` secrets into their settings and drops empty API keys.
    pub fn resolve_secrets(&mut self) -> anyhow::Result<()> {
        if let Some(path) = &self.admin_token_file {
            self.admin_token = Some(read_secret(path, "DROVER_ADMIN_TOKEN_FILE")?);
        }
        if let Some(path) = &self.node_token_file {
            self.node_token = Some(read_secret(path, "DROVER_NODE_TOKEN_FILE")?);
        }
        if let Some(path) = &self.peer_token_file {
            self.peer_token = Some(read_secret(path, "DROVER_PEER_TOKEN_FILE")?);
        }
        self.api_keys.retain(|k| !k.trim().is_empty());
        let mut lines: Vec<(String, String)> = self
            .api_keys
            .iter()
            .map(|k| ("DROVER_API_KEYS".to_string(), k.clone()))
            .collect();
        if let Some(path) = &self.api_keys_file {
            let text = read_secret(path, "DROVER_API_KEYS_FILE")?;
            for (i, line) in text.lines().enumerate() {
                lines.push((
                    format!("{} line {}", path.display(), i + 1),
                    line.to_string(),
                ));
            }
        }
        self.keys.clear();
        for (place, line) in lines {
            if let Some(key) = crate::limits::ApiKey::parse_line(&line)
                .map_err(|e| anyhow::anyhow!("{place}: {e}"))?
            {
                self.keys.push(key);
            }
        }
        Ok(())
    }
}
