//! The gRPC endpoint nodes talk to: `Register` and the long-lived `Session` stream.
//!
//! This layer only checks the node token, translates between protobuf and domain types
//! ([`convert`]), and forwards a session's inbound messages to the [`ControlPlane`] in arrival
//! order. tonic stops here: nothing inward sees a protobuf type or a `tonic::Status`.

pub mod convert;
pub mod replication;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::Addr;
use drover_shared::ids::NodeId;
use drover_shared::proto::coordinator_server::Coordinator;
use drover_shared::proto::{self, node_message};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::control::{ControlPlane, NodeEvent, OpenSession, RegisterNode, SessionClosed};
use crate::error::CoordinatorError;

/// How long a node has to send `hello` after opening a session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The tonic service implementation.
pub struct NodeService {
    control: Addr<ControlPlane>,
    node_token: Option<String>,
    insecure: bool,
    heartbeat_ms: u32,
}

impl NodeService {
    /// A service forwarding to `control`; nodes must present `node_token` when it is set, and
    /// join from loopback only when it is not (unless `insecure`).
    pub fn new(
        control: Addr<ControlPlane>,
        node_token: Option<String>,
        insecure: bool,
        heartbeat_ms: u64,
    ) -> Self {
        Self {
            control,
            node_token,
            insecure,
            heartbeat_ms: heartbeat_ms.min(u64::from(u32::MAX)) as u32,
        }
    }

    fn check_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.node_token else {
            let peer = request.remote_addr().map(|a| a.ip());
            return Ok(crate::access::tokenless(
                crate::access::Door::NodeJoin,
                self.insecure,
                peer,
            )?);
        };
        let presented = request
            .metadata()
            .get(drover_shared::NODE_TOKEN_METADATA)
            .and_then(|v| v.to_str().ok());
        match presented {
            Some(token) if drover_shared::secret_eq(token, expected) => Ok(()),
            Some(_) => Err(CoordinatorError::Unauthorized("wrong node token".into()).into()),
            None => Err(CoordinatorError::Unauthorized(
                "this coordinator requires a node token (set DROVER_NODE_TOKEN on the node)".into(),
            )
            .into()),
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for NodeService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        self.check_token(&request)?;
        let registration = convert::registration(request.into_inner())?;
        let record = self
            .control
            .send(RegisterNode(registration))
            .await
            .map_err(CoordinatorError::from)??;
        Ok(Response::new(proto::RegisterResponse {
            node_id: record.id.to_string(),
            heartbeat_interval_ms: self.heartbeat_ms,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::NodeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.check_token(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(proto::NodeMessage {
            kind: Some(node_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first session message must be hello",
            ));
        };
        let node_id: NodeId = hello
            .node_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let (session_id, rx) = self
            .control
            .send(OpenSession {
                node_id,
                running: convert::running(&hello.running),
                fresh: hello.session <= 1,
            })
            .await
            .map_err(CoordinatorError::from)??;
        let control = self.control.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(proto::NodeMessage {
                        kind: Some(message),
                    })) => {
                        control.do_send(NodeEvent {
                            node_id,
                            session_id,
                            residency: convert::heartbeat_residency(&message),
                            report: convert::report(message),
                        });
                    }
                    Ok(Some(proto::NodeMessage { kind: None })) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(node_id = %node_id, session_id, error = %status, "node session broke");
                        break;
                    }
                }
            }
            control.do_send(SessionClosed {
                node_id,
                session_id,
            });
        });
        use tokio_stream::StreamExt as _;
        let outbound = UnboundedReceiverStream::new(rx).map(|m| Ok(convert::to_node(m)));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// The node endpoint as served: the [`NodeService`] once it is open (at once on a single
/// coordinator; on a replica once it leads), refused before with `unavailable` and `refusal`,
/// so a node moves on to the next address of its `COORDINATOR_URL`.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<OnceLock<NodeService>>,
    refusal: Arc<str>,
}

impl Gate {
    /// A closed gate refusing with `refusal`.
    pub fn new(refusal: &str) -> Self {
        Self {
            inner: Arc::default(),
            refusal: refusal.into(),
        }
    }

    /// Lets calls through to `service` from now on.
    pub fn open(&self, service: NodeService) {
        if self.inner.set(service).is_err() {
            tracing::warn!("node endpoint opened twice");
        }
    }

    fn service(&self) -> Result<&NodeService, Status> {
        self.inner
            .get()
            .ok_or_else(|| Status::unavailable(self.refusal.to_string()))
    }
}

#[tonic::async_trait]
impl Coordinator for Gate {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        self.service()?.register(request).await
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::NodeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.service()?.session(request).await
    }
}
