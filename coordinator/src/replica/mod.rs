//! A replicated coordinator (`DROVER_PEERS`): the store's writes go through a Raft log
//! (openraft) and are applied to every replica's store once a majority has them; one replica, the
//! leader, runs the control plane, the REST API and the node sessions, the others follow.
//!
//! - **What is replicated** is what a single coordinator writes to its store ([`Change`]: node
//!   records, job records at every state change, finished jobs with their images), batched per
//!   round as one entry ([`Proposer`]: group commit, one entry in flight at a time). A write's
//!   `Store::flush` resolves once its entry is committed: a 2xx for a job means a majority has it.
//!   Heartbeats, progress, rate-limit buckets and event subscribers are not: the leader rebuilds
//!   them. Entries carry the leader's timestamps inside the records; applying reads no clock.
//! - **Becoming leader** — elected, and every committed entry applied here ([`Replica::lead`]) —
//!   the replica checkpoints its store and restores the control plane from it, as a single
//!   coordinator does at a restart: leases get a full time to live, and the jobs reconnecting
//!   nodes report running are kept on them.
//! - **Losing leadership** ends the process's leader role by re-executing the process
//!   ([`Replica::lost_leadership`], `step_down` in `lib.rs`): it comes back as a follower whose
//!   state is its store, which holds only committed entries (the leader's uncommitted ones are
//!   in the log alone and are truncated there by Raft).
//! - **Snapshots** bound the log: every `DROVER_SNAPSHOT_EVERY` entries the store is exported
//!   (`storage`), and the log keeps only `DROVER_SNAPSHOT_KEEP` entries before it; a replica
//!   that was away longer, or a new one, installs the snapshot and then the entries after it.

pub mod network;
pub mod storage;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::grpc::replication::{PeerClient, PeerEndpoint};
use crate::store::{Change, Committed, RaftDb, Replicate, Store};

/// A replica's id.
pub type NodeIdOf = u64;
/// What the log knows of a replica: its gRPC address.
pub type Node = BasicNode;

/// One entry of the log: the changes of one writer round, in order.
#[derive(Clone, Serialize, Deserialize)]
pub struct Batch(pub Vec<Change>);

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batch({} changes)", self.0.len())
    }
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} changes", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// The coordinator's Raft types: entries are [`Batch`]es, replicas are `u64` ids with their
    /// gRPC address.
    pub TypeConfig:
        D = Batch,
        R = (),
        NodeId = NodeIdOf,
        Node = Node,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The replicas as `DROVER_PEERS` lists them, and which one this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers {
    /// This replica's id.
    pub me: NodeIdOf,
    /// Every replica's id and gRPC address (`host:port`).
    pub all: BTreeMap<NodeIdOf, String>,
}

impl Peers {
    /// Reads `1=host:port,2=host:port,...` and checks that `me` is among them.
    pub fn parse(me: Option<NodeIdOf>, list: &str) -> Result<Self, String> {
        let mut all = BTreeMap::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (id, address) = item
                .split_once('=')
                .ok_or_else(|| format!("DROVER_PEERS: `{item}` is not `id=host:port`"))?;
            let id: NodeIdOf = id
                .trim()
                .parse()
                .map_err(|_| format!("DROVER_PEERS: `{id}` is not a replica id (1, 2, 3, ...)"))?;
            let address = address.trim();
            if !address.contains(':') || address.contains("://") {
                return Err(format!(
                    "DROVER_PEERS: replica {id}'s address `{address}` is not `host:port`"
                ));
            }
            if all.insert(id, address.to_string()).is_some() {
                return Err(format!("DROVER_PEERS: replica {id} is listed twice"));
            }
        }
        if all.is_empty() {
            return Err("DROVER_PEERS lists no replica".into());
        }
        let me =
            me.ok_or("DROVER_PEERS is set: DROVER_REPLICA_ID must say which replica this is")?;
        if !all.contains_key(&me) {
            return Err(format!(
                "DROVER_REPLICA_ID {me} is not in DROVER_PEERS ({})",
                all.keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Self { me, all })
    }
}

/// The replica id a StatefulSet's pod takes when `DROVER_REPLICA_ID` is unset: its ordinal + 1,
/// read from its host name (`drover-coordinator-0` → 1).
pub fn ordinal_id(hostname: &str) -> Option<NodeIdOf> {
    let (_, ordinal) = hostname.rsplit_once('-')?;
    ordinal.parse::<NodeIdOf>().ok()?.checked_add(1)
}

/// One replica as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReplicaStatus {
    /// Its id.
    pub id: NodeIdOf,
    /// Its gRPC address (nodes and replication).
    pub grpc: String,
    /// Its REST API's URL (as it advertises it); empty when it did not answer.
    pub http: String,
    /// `leader`, `follower`, `candidate`, `learner`, or `unreachable`.
    pub state: String,
    /// Index of the last log entry it applied.
    pub last_applied: Option<u64>,
    /// The leader it knows of.
    #[serde(default)]
    pub leader_id: Option<NodeIdOf>,
    /// Its current term.
    #[serde(default)]
    pub term: u64,
}

/// `GET /v1/cluster`: the replicas and their leader, as the answering replica sees them.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    /// The replica that answered; `null` on a single coordinator.
    pub replica_id: Option<NodeIdOf>,
    /// The leader it knows of.
    pub leader_id: Option<NodeIdOf>,
    /// The leader's REST API.
    pub leader_http: Option<String>,
    /// The answering replica's term.
    pub term: u64,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

/// How long a peer's status is reused (for redirects to the leader).
const STATUS_TTL: Duration = Duration::from_millis(500);

/// A replica: its Raft instance and what it knows of its peers.
pub struct Replica {
    raft: Raft<TypeConfig>,
    peers: Peers,
    http: String,
    token: Option<String>,
    tls: Option<crate::grpc::replication::PeerTls>,
    statuses: Mutex<HashMap<NodeIdOf, (Instant, ReplicaStatus)>>,
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

impl Replica {
    /// Starts this replica's Raft over `store` (its log in `<data>/raft`), forms the cluster on
    /// a first start, and sends the store's writes to the log from now on.
    pub async fn start(config: &Config, peers: Peers, store: Store) -> anyhow::Result<Arc<Self>> {
        let db = RaftDb::open(&config.data_dir.join("raft")).with_context(|| {
            format!(
                "cannot open the replicated log in {}",
                config.data_dir.display()
            )
        })?;
        let election = config.election_timeout_ms;
        let raft_config = openraft::Config {
            cluster_name: "drover".into(),
            heartbeat_interval: (election / 4).max(20),
            // openraft waits the leader lease (the maximum) plus a random timeout before it
            // stands: a narrow range keeps a fail-over near 2.25× the setting.
            election_timeout_min: election,
            election_timeout_max: election + (election / 4).max(10),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: config.snapshot_keep,
            ..Default::default()
        }
        .validate()
        .context("replication settings")?;
        // Replicas serving gRPC over TLS call each other over TLS.
        let tls = crate::tls::Identity::load(config)?.map(|identity| identity.peer_client());
        let machine = storage::Machine::new(store.clone(), db.clone())
            .map_err(|e| anyhow::anyhow!("cannot read the replicated log's state: {e}"))?;
        let raft = Raft::new(
            peers.me,
            Arc::new(raft_config),
            network::Network {
                token: config.peer_token.clone(),
                addresses: peers.all.clone(),
                tls: tls.clone(),
            },
            storage::LogStore::new(db),
            machine,
        )
        .await
        .context("cannot start replication")?;
        if config.join {
            tracing::info!(
                replica = peers.me,
                "joining an existing cluster: waiting to be added (POST /v1/cluster/replicas on the leader)"
            );
        } else if !raft.is_initialized().await.context("replication stopped")? {
            let members: BTreeMap<NodeIdOf, Node> = peers
                .all
                .iter()
                .map(|(id, address)| (*id, BasicNode::new(address)))
                .collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::info!(error = %e, "replicated log already formed");
            }
        }
        let http = config.advertise_http.clone().unwrap_or_else(|| {
            let host = peers.all[&peers.me]
                .rsplit_once(':')
                .map_or("127.0.0.1", |(host, _)| host)
                .to_string();
            format!("http://{host}:{}", config.http_addr.port())
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(propose(
            raft.clone(),
            rx,
            Duration::from_millis(config.commit_timeout_ms.max(1)),
        ));
        store.replicate_through(Arc::new(Proposer { tx }));
        tracing::info!(replica = peers.me, replicas = peers.all.len(), http = %http, "replica started");
        Ok(Arc::new(Self {
            raft,
            peers,
            http: http.trim_end_matches('/').to_string(),
            token: config.peer_token.clone(),
            tls,
            statuses: Mutex::default(),
        }))
    }

    /// This replica's id.
    pub fn id(&self) -> NodeIdOf {
        self.peers.me
    }

    /// Resolves once this replica leads and has applied every committed entry: the store then
    /// holds the whole committed state.
    pub async fn lead(&self) {
        let mut metrics = self.raft.metrics();
        loop {
            let leading = {
                let m = metrics.borrow_and_update();
                m.state == ServerState::Leader && m.current_leader == Some(self.peers.me)
            };
            if leading {
                match self.raft.ensure_linearizable().await {
                    Ok(_) => return,
                    Err(e) => tracing::info!(error = %e, "elected, but not yet able to lead"),
                }
            }
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// This replica's current Raft term (a leader's fencing epoch).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Resolves once this replica no longer leads (or its Raft stopped).
    pub async fn lost_leadership(&self) {
        let mut metrics = self.raft.metrics();
        loop {
            if metrics.borrow_and_update().state != ServerState::Leader {
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// This replica's status.
    fn own_status(&self) -> ReplicaStatus {
        let m = self.raft.metrics().borrow().clone();
        ReplicaStatus {
            id: self.peers.me,
            grpc: self.peers.all[&self.peers.me].clone(),
            http: self.http.clone(),
            state: state_name(m.state).to_string(),
            last_applied: m.last_applied.map(|l| l.index),
            leader_id: m.current_leader,
            term: m.current_term,
        }
    }

    /// A peer's status (reused for [`STATUS_TTL`]), asked over its gRPC address.
    async fn peer_status(&self, id: NodeIdOf, fresh: bool) -> ReplicaStatus {
        if id == self.peers.me {
            return self.own_status();
        }
        if !fresh {
            let cached = self
                .statuses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .filter(|(at, _)| at.elapsed() < STATUS_TTL)
                .map(|(_, s)| s.clone());
            if let Some(status) = cached {
                return status;
            }
        }
        let address = match self.peers.all.get(&id) {
            Some(address) => address.clone(),
            None => self.members().remove(&id).unwrap_or_default(),
        };
        let mut client = PeerClient::new(&address, self.token.clone(), self.tls.clone());
        let answer = client
            .call("status", Vec::new(), Duration::from_millis(500))
            .await
            .and_then(|bytes| decode::<ReplicaStatus>(&bytes));
        match answer {
            Ok(status) => {
                self.statuses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (Instant::now(), status.clone()));
                status
            }
            Err(e) => {
                tracing::debug!(replica = id, error = %e, "peer status unavailable");
                ReplicaStatus {
                    id,
                    grpc: address,
                    http: String::new(),
                    state: "unreachable".into(),
                    last_applied: None,
                    leader_id: None,
                    term: 0,
                }
            }
        }
    }

    /// The leader this replica knows of and its REST API's URL, when it can tell.
    pub async fn leader(&self) -> Option<(NodeIdOf, Option<String>)> {
        let leader = self.raft.metrics().borrow().current_leader?;
        let status = self.peer_status(leader, false).await;
        Some((leader, (!status.http.is_empty()).then_some(status.http)))
    }

    /// `GET /v1/cluster`: every replica's status, asked now.
    pub async fn cluster(&self) -> ClusterStatus {
        let own = self.own_status();
        let mut ids: std::collections::BTreeSet<NodeIdOf> =
            self.peers.all.keys().copied().collect();
        ids.extend(self.members().into_keys());
        let mut replicas = Vec::new();
        for id in ids {
            replicas.push(self.peer_status(id, true).await);
        }
        let leader_http = own.leader_id.and_then(|leader| {
            replicas
                .iter()
                .find(|r| r.id == leader && !r.http.is_empty())
                .map(|r| r.http.clone())
        });
        ClusterStatus {
            replica_id: Some(own.id),
            leader_id: own.leader_id,
            leader_http,
            term: own.term,
            replicas,
        }
    }

    /// Adds replica `id` at `grpc` (`host:port`): it first catches up as a learner, then votes.
    /// On the leader only.
    pub async fn add_replica(&self, id: NodeIdOf, grpc: &str) -> Result<(), String> {
        self.raft
            .add_learner(id, BasicNode::new(grpc), true)
            .await
            .map_err(|e| format!("replica {id} could not catch up as a learner: {e}"))?;
        let voters: std::collections::BTreeSet<NodeIdOf> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .chain([id])
            .collect();
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| format!("replica {id} could not be made a voter: {e}"))?;
        tracing::info!(replica = id, grpc, "replica added");
        Ok(())
    }

    /// Removes replica `id` from the voters (it stops receiving the log). On the leader only.
    pub async fn remove_replica(&self, id: NodeIdOf) -> Result<(), String> {
        let voters: std::collections::BTreeSet<NodeIdOf> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != id)
            .collect();
        if voters.is_empty() {
            return Err("the last replica cannot be removed".into());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| format!("replica {id} could not be removed: {e}"))?;
        tracing::info!(replica = id, "replica removed");
        Ok(())
    }

    /// The replicas the log's membership holds (voters and learners), with their addresses.
    pub fn members(&self) -> BTreeMap<NodeIdOf, String> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// Stops Raft (before the process re-executes itself or exits).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Answers peers' calls with this replica's Raft.
pub struct Endpoint(pub Arc<Replica>);

impl PeerEndpoint for Endpoint {
    fn handle(
        &self,
        kind: String,
        body: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let replica = self.0.clone();
        Box::pin(async move {
            let raft = &replica.raft;
            match kind.as_str() {
                "append" => encode(&raft.append_entries(decode(&body)?).await),
                "vote" => encode(&raft.vote(decode(&body)?).await),
                "snapshot" => encode(&raft.install_snapshot(decode(&body)?).await),
                "status" => encode(&replica.own_status()),
                other => Err(format!("unknown replica call `{other}`")),
            }
        })
    }
}

/// What the store hands the log.
enum Proposal {
    Change(Change),
    Commit(oneshot::Sender<Result<(), String>>),
}

/// The store's way into the log ([`Replicate`]).
struct Proposer {
    tx: mpsc::UnboundedSender<Proposal>,
}

impl Replicate for Proposer {
    fn propose(&self, change: Change) {
        let _ = self.tx.send(Proposal::Change(change));
    }

    fn commit(&self) -> Committed {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Proposal::Commit(tx));
        Box::pin(async move {
            if sent.is_err() {
                return Err("replication stopped".to_string());
            }
            rx.await
                .unwrap_or_else(|_| Err("replication stopped".to_string()))
        })
    }
}

/// Group commit: everything proposed while the previous entry was in flight goes in the next
/// entry; every commit waiter in the round is answered when it commits (or with why not: this
/// replica does not lead, or no majority answered within `timeout`).
async fn propose(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    timeout: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut changes = Vec::new();
        let mut waiters = Vec::new();
        let mut take = |p: Proposal| match p {
            Proposal::Change(c) => changes.push(c),
            Proposal::Commit(w) => waiters.push(w),
        };
        take(first);
        while let Ok(p) = rx.try_recv() {
            take(p);
        }
        let result = if changes.is_empty() {
            Ok(())
        } else {
            let count = changes.len();
            match tokio::time::timeout(timeout, raft.client_write(Batch(changes))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, changes = count, "replicated write refused");
                    Err(format!("not committed: {e}"))
                }
                Err(_) => {
                    tracing::warn!(
                        changes = count,
                        timeout_ms = timeout.as_millis() as u64,
                        "replicated write not committed in time"
                    );
                    Err(format!(
                        "not committed on a majority of the replicas within {} ms; retry (the leader may have changed: GET /v1/cluster)",
                        timeout.as_millis()
                    ))
                }
            }
        };
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_read_and_checked() {
        let peers = Peers::parse(Some(2), "1=a:1, 2=b:2,3=c:3").expect("valid");
        assert_eq!(peers.me, 2);
        assert_eq!(peers.all.len(), 3);
        assert_eq!(peers.all[&3], "c:3");
        for (me, list, needle) in [
            (None, "1=a:1", "DROVER_REPLICA_ID"),
            (Some(4), "1=a:1,2=b:2", "not in DROVER_PEERS"),
            (Some(1), "1=a:1,1=b:2", "twice"),
            (Some(1), "1=a", "host:port"),
            (Some(1), "1=http://a:1", "host:port"),
            (Some(1), "x=a:1", "replica id"),
            (Some(1), "", "no replica"),
        ] {
            let e = Peers::parse(me, list).expect_err(list);
            assert!(e.contains(needle), "{list}: {e}");
        }
    }

    #[test]
    fn a_stateful_set_pod_takes_its_ordinal_plus_one() {
        assert_eq!(ordinal_id("drover-coordinator-0"), Some(1));
        assert_eq!(ordinal_id("drover-coordinator-12"), Some(13));
        assert_eq!(ordinal_id("coordinator"), None);
        assert_eq!(ordinal_id("drover-coordinator-x"), None);
    }

    #[test]
    fn batches_survive_the_wire() {
        let batch = Batch(vec![Change::Finish {
            record: b"{}".to_vec(),
            png: Some(vec![1, 2, 3]),
        }]);
        let entry = openraft::Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: openraft::EntryPayload::Normal(batch),
        };
        let bytes = encode(&entry).expect("encodes");
        let back: openraft::Entry<TypeConfig> = decode(&bytes).expect("decodes");
        assert_eq!(back.log_id.index, 7);
        let openraft::EntryPayload::Normal(Batch(changes)) = back.payload else {
            panic!("not a batch");
        };
        let [Change::Finish { png, .. }] = changes.as_slice() else {
            panic!("not a finish");
        };
        assert_eq!(png.as_deref(), Some(&[1u8, 2, 3][..]));
        // Images are bytes on the wire, not arrays of numbers.
        assert!(bytes.len() < 100, "{} bytes", bytes.len());
    }
}
