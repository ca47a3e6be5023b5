//! The link between the replicas of a replicated coordinator: the `Replication` service (a
//! replica answers its peers' calls) and [`PeerClient`] (a replica calls a peer). Calls carry
//! opaque bytes (`replica` encodes openraft's messages); this file only moves them, checks the
//! peer token and bounds each call's time.

use std::sync::Arc;
use std::time::Duration;

use drover_shared::proto::replication_client::ReplicationClient;
use drover_shared::proto::replication_server::Replication;
use drover_shared::proto::{self};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;

/// TLS settings of a replica's calls to its peers (what `tls::Identity::peer_client` makes).
pub type PeerTls = ClientTlsConfig;

/// What answers a peer's call: `kind` names the message, `body` is its encoding.
pub trait PeerEndpoint: Send + Sync + 'static {
    /// Answers one call (its encoded answer), or why it cannot.
    fn handle(
        &self,
        kind: String,
        body: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;
}

/// The `Replication` service: checks the peer token, hands the call to the endpoint.
pub struct ReplicationService {
    endpoint: Arc<dyn PeerEndpoint>,
    peer_token: Option<String>,
    insecure: bool,
}

impl ReplicationService {
    /// A service answering with `endpoint`; peers must present `peer_token` when it is set, and
    /// call from loopback only when it is not (unless `insecure`).
    pub fn new(
        endpoint: Arc<dyn PeerEndpoint>,
        peer_token: Option<String>,
        insecure: bool,
    ) -> Self {
        Self {
            endpoint,
            peer_token,
            insecure,
        }
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn call(
        &self,
        request: Request<proto::ReplicaCall>,
    ) -> Result<Response<proto::ReplicaReply>, Status> {
        match &self.peer_token {
            None => {
                let peer = request.remote_addr().map(|a| a.ip());
                crate::access::tokenless(crate::access::Door::Peer, self.insecure, peer)?;
            }
            Some(expected) => {
                let presented = request
                    .metadata()
                    .get(drover_shared::PEER_TOKEN_METADATA)
                    .and_then(|v| v.to_str().ok());
                if !presented.is_some_and(|t| drover_shared::secret_eq(t, expected)) {
                    return Err(CoordinatorError::Unauthorized(
                        "wrong or missing peer token (DROVER_PEER_TOKEN)".into(),
                    )
                    .into());
                }
            }
        }
        let call = request.into_inner();
        let body = self
            .endpoint
            .handle(call.kind, call.body)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(proto::ReplicaReply { body }))
    }
}

/// A replica's client of one peer: one HTTP/2 connection, made when first used and kept.
#[derive(Clone)]
pub struct PeerClient {
    address: String,
    token: Option<String>,
    /// TLS, when the replicas serve gRPC over TLS.
    tls: Option<ClientTlsConfig>,
    client: Option<ReplicationClient<Channel>>,
}

impl PeerClient {
    /// A client of the peer at `address` (`host:port` of its gRPC endpoint), over TLS with
    /// `tls`.
    pub fn new(address: &str, token: Option<String>, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            address: address.to_string(),
            token,
            tls,
            client: None,
        }
    }

    /// Sends one call and waits up to `timeout` for its answer.
    pub async fn call(
        &mut self,
        kind: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let client = match &mut self.client {
            Some(client) => client,
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let uri = format!("{scheme}://{}", self.address);
                let mut endpoint = Endpoint::from_shared(uri)
                    .map_err(|e| format!("peer address `{}`: {e}", self.address))?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(2));
                if let Some(tls) = &self.tls {
                    endpoint = endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| format!("TLS to peer {}: {e}", self.address))?;
                }
                let channel = endpoint.connect_lazy();
                self.client.insert(
                    ReplicationClient::new(channel)
                        .max_decoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
                        .max_encoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES),
                )
            }
        };
        let mut request = Request::new(proto::ReplicaCall {
            kind: kind.to_string(),
            body,
        });
        request.set_timeout(timeout);
        if let Some(token) = &self.token
            && let Ok(value) = token.parse()
        {
            request
                .metadata_mut()
                .insert(drover_shared::PEER_TOKEN_METADATA, value);
        }
        match tokio::time::timeout(timeout, client.call(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().body),
            Ok(Err(status)) => Err(format!(
                "peer {} answered {:?}: {}",
                self.address,
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!(
                "peer {} did not answer within {} ms",
                self.address,
                timeout.as_millis()
            )),
        }
    }
}
