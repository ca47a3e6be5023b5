//! openraft's network over the gRPC `Replication` service: each message MessagePack-encoded in
//! a [`PeerClient`] call, the peer's answer (its `Result`) encoded back.

// openraft's traits fix these error types (large by design).
#![allow(clippy::result_large_err)]

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{Node, NodeIdOf, TypeConfig};
use crate::grpc::replication::PeerClient;

/// Makes a [`Link`] per peer.
pub struct Network {
    /// The peer token this replica presents.
    pub token: Option<String>,
    /// The peers' addresses as this replica's `DROVER_PEERS` gives them: they win over the
    /// addresses in the log's membership, so a replica reaches its peers the way its own
    /// settings say (a changed address takes a restart, not a membership change).
    pub addresses: std::collections::BTreeMap<NodeIdOf, String>,
    /// TLS to the peers, when the replicas serve gRPC over TLS.
    pub tls: Option<crate::grpc::replication::PeerTls>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: NodeIdOf, node: &Node) -> Link {
        let address = self.addresses.get(&target).unwrap_or(&node.addr);
        Link {
            target,
            node: node.clone(),
            client: PeerClient::new(address, self.token.clone(), self.tls.clone()),
        }
    }
}

/// The link to one peer.
pub struct Link {
    target: NodeIdOf,
    node: Node,
    client: PeerClient,
}

impl Link {
    async fn send<Req, Resp, E>(
        &mut self,
        kind: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeIdOf, Node, E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let body = rmp_serde::to_vec_named(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .client
            .call(kind, body, timeout)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
        let answer: Result<Resp, E> =
            rmp_serde::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeIdOf>, RPCError<NodeIdOf, Node, RaftError<NodeIdOf>>>
    {
        self.send("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeIdOf>,
        RPCError<NodeIdOf, Node, RaftError<NodeIdOf, InstallSnapshotError>>,
    > {
        self.send("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeIdOf>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeIdOf>, RPCError<NodeIdOf, Node, RaftError<NodeIdOf>>> {
        self.send("vote", &rpc, option.hard_ttl()).await
    }

    /// Retries an unreachable peer every 100 ms (openraft's default is 500 ms): a restarted
    /// replica hears from the leader well within its election timeout, instead of standing for
    /// election against a leader that is alive.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
