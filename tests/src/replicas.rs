//! `ReplicaSet`: a replicated coordinator (`DROVER_PEERS`) of real processes on this machine,
//! with sim nodes, for the fail-over tests and the HA benchmark.
//!
//! Each replica reaches each peer through its own [`LinkProxy`] (one per direction), so a test
//! can partition a replica from the others (both directions) while its nodes and clients still
//! reach it. Nodes get every replica's address in `COORDINATOR_URL`. Clients find the leader
//! with `GET /v1/cluster` on any live replica ([`ReplicaSet::leader`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::proxy::LinkProxy;
use crate::{Binaries, NodeSpec, Proc, free_port, spawn};

struct Replica {
    id: u64,
    http_port: u16,
    grpc_port: u16,
    env: Vec<(String, String)>,
    proc: Proc,
}

/// Three (or more) coordinator replicas, their links and their nodes.
pub struct ReplicaSet {
    bins: Binaries,
    dir: tempfile::TempDir,
    replicas: Vec<Replica>,
    /// `(from, to)` → the proxy `from` reaches `to` through.
    links: BTreeMap<(u64, u64), LinkProxy>,
    nodes: Vec<Proc>,
    agent: ureq::Agent,
}

/// An answer: status and JSON body (`Null` when not JSON).
#[derive(Clone, Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body as JSON.
    pub body: Value,
    /// The `Location` header, if any.
    pub location: Option<String>,
}

impl ReplicaSet {
    /// Starts `count` replicas with test timings and extra environment `env`, and waits until
    /// they agree on a leader.
    pub fn start(bins: Binaries, count: u64, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_linked(bins, count, env, true)
    }

    /// [`ReplicaSet::start`], with the replicas linked directly (no proxies to cut: for load
    /// measurements, where the proxies' threads would cost CPU).
    pub fn start_direct(bins: Binaries, count: u64, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_linked(bins, count, env, false)
    }

    fn start_linked(
        bins: Binaries,
        count: u64,
        env: &[(&str, &str)],
        proxied: bool,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("drover-replicas-")
            .tempdir()?;
        let ports: Vec<(u64, u16, u16)> = (1..=count)
            .map(|id| Ok((id, free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let mut links = BTreeMap::new();
        for &(from, _, _) in &ports {
            for &(to, _, grpc) in &ports {
                if from != to && proxied {
                    links.insert((from, to), LinkProxy::start(format!("127.0.0.1:{grpc}"))?);
                }
            }
        }
        let mut replicas = Vec::new();
        for &(id, http_port, grpc_port) in &ports {
            let peers: Vec<String> = ports
                .iter()
                .map(|&(peer, _, grpc)| {
                    let port = links.get(&(id, peer)).map_or(grpc, LinkProxy::port);
                    format!("{peer}=127.0.0.1:{port}")
                })
                .collect();
            let mut replica_env: Vec<(String, String)> = vec![
                ("DROVER_REPLICA_ID".into(), id.to_string()),
                ("DROVER_PEERS".into(), peers.join(",")),
                ("DROVER_HTTP_ADDR".into(), format!("127.0.0.1:{http_port}")),
                ("DROVER_GRPC_ADDR".into(), format!("127.0.0.1:{grpc_port}")),
                (
                    "DROVER_ADVERTISE_HTTP".into(),
                    format!("http://127.0.0.1:{http_port}"),
                ),
                (
                    "DROVER_DATA_DIR".into(),
                    dir.path()
                        .join(format!("replica-{id}"))
                        .display()
                        .to_string(),
                ),
                ("DROVER_HEARTBEAT_MS".into(), "100".into()),
                // Nodes find a new leader within about a second of its election.
                ("DROVER_OFFLINE_GRACE_MS".into(), "3000".into()),
                ("DROVER_LEASE_FLOOR_MS".into(), "10000".into()),
                ("DROVER_STORE_RESERVE_MB".into(), "1".into()),
                ("DROVER_ELECTION_TIMEOUT_MS".into(), "500".into()),
                ("DROVER_COMMIT_TIMEOUT_MS".into(), "2000".into()),
            ];
            for (k, v) in env {
                replica_env.retain(|(key, _)| key != k);
                replica_env.push((k.to_string(), v.to_string()));
            }
            replicas.push(Replica {
                id,
                http_port,
                grpc_port,
                env: replica_env,
                proc: Proc {
                    name: format!("replica {id}"),
                    log: dir.path().join(format!("replica-{id}.log")),
                    child: None,
                },
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut set = Self {
            bins,
            dir,
            replicas,
            links,
            nodes: Vec::new(),
            agent,
        };
        for id in 1..=count {
            set.start_replica(id)?;
        }
        set.wait_for_leader(Duration::from_secs(30))?;
        Ok(set)
    }

    fn replica(&self, id: u64) -> Result<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| anyhow!("no replica {id}"))
    }

    /// Starts replica `id` (again, on the same data).
    pub fn start_replica(&mut self, id: u64) -> Result<()> {
        let program = self.bins.coordinator.clone();
        let replica = self
            .replicas
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| anyhow!("no replica {id}"))?;
        replica.proc.kill();
        replica.proc.child = Some(spawn(&program, &replica.env, &replica.proc.log)?);
        Ok(())
    }

    /// Kills replica `id` with SIGKILL.
    pub fn kill_replica(&mut self, id: u64) {
        if let Some(replica) = self.replicas.iter_mut().find(|r| r.id == id) {
            replica.proc.kill();
        }
    }

    /// Cuts (or heals) every link between replica `id` and the others, both ways.
    pub fn partition(&self, id: u64, cut: bool) {
        for ((from, to), proxy) in &self.links {
            if *from == id || *to == id {
                if cut {
                    proxy.cut();
                } else {
                    proxy.heal();
                }
            }
        }
    }

    /// Replica `id`'s REST URL.
    pub fn url(&self, id: u64) -> Result<String> {
        Ok(format!("http://127.0.0.1:{}", self.replica(id)?.http_port))
    }

    /// The replicas' `DROVER_TLS_CERT`, when they serve gRPC over TLS.
    fn tls_cert(&self) -> Option<String> {
        self.replicas.first().and_then(|r| {
            r.env
                .iter()
                .find(|(k, _)| k == "DROVER_TLS_CERT")
                .map(|(_, v)| v.clone())
        })
    }

    /// Every replica's gRPC URL, comma-separated (a node's `COORDINATOR_URL`; `https://` when
    /// the replicas serve TLS).
    pub fn grpc_urls(&self) -> String {
        let scheme = if self.tls_cert().is_some() {
            "https"
        } else {
            "http"
        };
        self.replicas
            .iter()
            .map(|r| format!("{scheme}://127.0.0.1:{}", r.grpc_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The replicas' ids.
    pub fn ids(&self) -> Vec<u64> {
        self.replicas.iter().map(|r| r.id).collect()
    }

    /// `method url` with an optional JSON body and headers; `Err` only when no answer came.
    pub fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer> {
        let response = match method {
            "GET" => {
                let mut req = self.agent.get(url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.call()
            }
            _ => {
                let mut req = self.agent.post(url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                match body {
                    Some(b) => req.send_json(b),
                    None => req.send_empty(),
                }
            }
        };
        let mut response = response.with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.body_mut().read_to_string().unwrap_or_default();
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            location,
        })
    }

    /// Replica `id`'s view of the cluster.
    pub fn cluster(&self, id: u64) -> Result<Value> {
        let answer = self.call("GET", &format!("{}/v1/cluster", self.url(id)?), None, &[])?;
        if answer.status != 200 {
            bail!("GET /v1/cluster on replica {id}: {}", answer.status);
        }
        Ok(answer.body)
    }

    /// The leader as a live replica that leads says it (its id), if any does now.
    pub fn leader(&self) -> Option<u64> {
        self.replicas.iter().find_map(|r| {
            let view = self.cluster(r.id).ok()?;
            (view["leader_id"].as_u64() == Some(r.id)).then_some(r.id)
        })
    }

    /// Waits until a replica leads and answers writes (`GET /v1/jobs` there is 200).
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.leader()
                && let Ok(url) = self.url(id)
                && self
                    .call("GET", &format!("{url}/v1/jobs"), None, &[])
                    .is_ok_and(|a| a.status == 200)
            {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!("no replica leads after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts a sim node (its spec's environment) that knows every replica.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<()> {
        let index = self.nodes.len();
        let mut env = vec![
            ("COORDINATOR_URL".to_string(), self.grpc_urls()),
            ("NODE_NAME".to_string(), spec.name.clone()),
        ];
        if let Some(cert) = self.tls_cert() {
            env.push(("DROVER_CA_CERT".to_string(), cert));
        }
        env.extend(spec.env.iter().cloned());
        let log = self
            .dir
            .path()
            .join(format!("node-{index}-{}.log", spec.name));
        let child = spawn(&self.bins.node, &env, &log)?;
        self.nodes.push(Proc {
            name: format!("node {}", spec.name),
            log,
            child: Some(child),
        });
        Ok(())
    }

    /// Every replica's process id (named `coordinator`: their CPU time counts together) and every
    /// node's.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.replicas
            .iter()
            .filter_map(|r| Some(("coordinator".to_string(), r.proc.pid().ok()?)))
            .chain(
                self.nodes
                    .iter()
                    .filter_map(|p| Some((p.name.clone(), p.pid().ok()?))),
            )
            .collect()
    }

    /// Waits until the leader sees `count` nodes online.
    pub fn wait_for_nodes(&self, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let online = self.leader().and_then(|leader| {
                let url = self.url(leader).ok()?;
                let nodes = self
                    .call("GET", &format!("{url}/v1/nodes"), None, &[])
                    .ok()?;
                Some(
                    nodes
                        .body
                        .as_array()?
                        .iter()
                        .filter(|n| n["state"] == "online")
                        .count(),
                )
            });
            if online == Some(count) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{count} nodes not online after {timeout:?} (seen {online:?})");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Replica `id`'s REST port.
    pub fn http_port(&self, id: u64) -> Result<u16> {
        Ok(self.replica(id)?.http_port)
    }

    /// Replica `id`'s log so far.
    pub fn replica_log(&self, id: u64) -> String {
        self.replica(id)
            .map(|r| std::fs::read_to_string(&r.proc.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Replica `id`'s data folder.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("replica-{id}"))
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for proc in self
            .nodes
            .iter_mut()
            .chain(self.replicas.iter_mut().map(|r| &mut r.proc))
        {
            proc.stop(60);
        }
    }
}
