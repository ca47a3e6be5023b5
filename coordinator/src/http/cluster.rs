//! The replicas of a replicated coordinator, as REST sees them: `GET /v1/cluster` on any
//! replica, and the small app a follower serves ([`follower_app`]): `/v1/cluster`, `/healthz`,
//! finished jobs and their images from its own store (final, so safe to read from a replica
//! that may lag), and every other request answered `307` to the same URL on the leader
//! (`curl -L` follows it), or `503` with a retry hint while no leader is known.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use serde::Deserialize;
use utoipa::ToSchema;

use super::jobs::{image_answer, job_answer, parse_job_id};
use super::responses::{BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unavailable};
use super::state::read_store;
use super::{AppState, Client};
use crate::config::Config;
use crate::error::{CoordinatorError, Result};
use crate::replica::{ClusterStatus, Replica};
use crate::store::Store;

/// The replicas and their leader
///
/// On a single coordinator: no replica id, no replicas.
#[utoipa::path(
    tag = "farm",
    responses((status = 200, description = "The replicas as this one sees them", body = ClusterStatus))
)]
#[get("/v1/cluster")]
pub(crate) async fn cluster(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(status(state.replica.as_deref()).await)
}

/// A replica to add: its id and gRPC address.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReplica {
    /// Its id (unused so far in the cluster).
    pub id: u64,
    /// Its gRPC address, `host:port`.
    pub grpc: String,
}

/// The replicated coordinator this call needs, or a `409`.
fn replicated(state: &AppState) -> Result<&Replica> {
    state.replica.as_deref().ok_or_else(|| {
        CoordinatorError::Conflict(
            "this coordinator is not replicated (DROVER_PEERS is unset)".into(),
        )
    })
}

/// Add a replica (admin)
///
/// Start it with `DROVER_JOIN=1` first; it catches up from the log as a learner, then votes.
#[utoipa::path(
    tag = "farm",
    request_body = NewReplica,
    responses(
        (status = 200, description = "The replica votes", body = ClusterStatus),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    ),
    security(("adminToken" = []))
)]
#[post("/v1/cluster/replicas")]
pub(crate) async fn add_replica(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse> {
    super::auth::require_admin(&state, &req)?;
    let replica = replicated(&state)?;
    let bytes = super::state::read_body(body, super::state::MAX_BODY).await?;
    let new: NewReplica = serde_json::from_slice(&bytes).map_err(|e| {
        CoordinatorError::InvalidRequest(format!(
            "a replica is {{\"id\": N, \"grpc\": \"host:port\"}}: {e}"
        ))
    })?;
    if new.id == 0 || !new.grpc.contains(':') || new.grpc.contains("://") {
        return Err(CoordinatorError::InvalidRequest(
            "a replica needs an id above 0 and `grpc` as host:port".into(),
        ));
    }
    if replica.members().contains_key(&new.id) {
        return Err(CoordinatorError::Conflict(format!(
            "replica {} is already a member",
            new.id
        )));
    }
    replica
        .add_replica(new.id, &new.grpc)
        .await
        .map_err(CoordinatorError::Unavailable)?;
    Ok(HttpResponse::Ok().json(replica.cluster().await))
}

/// Remove a replica (admin)
#[utoipa::path(
    tag = "farm",
    params(("id" = u64, Path, description = "The replica")),
    responses(
        (status = 200, description = "The replica no longer votes", body = ClusterStatus),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    ),
    security(("adminToken" = []))
)]
#[delete("/v1/cluster/replicas/{id}")]
pub(crate) async fn remove_replica(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<u64>,
) -> Result<HttpResponse> {
    super::auth::require_admin(&state, &req)?;
    let replica = replicated(&state)?;
    let id = id.into_inner();
    if !replica.members().contains_key(&id) {
        return Err(CoordinatorError::NotFound(format!("replica {id}")));
    }
    replica
        .remove_replica(id)
        .await
        .map_err(CoordinatorError::Unavailable)?;
    Ok(HttpResponse::Ok().json(replica.cluster().await))
}

async fn status(replica: Option<&Replica>) -> ClusterStatus {
    match replica {
        Some(replica) => replica.cluster().await,
        None => ClusterStatus {
            replica_id: None,
            leader_id: None,
            leader_http: None,
            term: 0,
            replicas: Vec::new(),
        },
    }
}

/// Mounts a follower's routes.
pub fn follower_app(
    replica: Arc<Replica>,
    store: Store,
    config: Arc<Config>,
) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(replica))
            .app_data(web::Data::new(store))
            .app_data(web::Data::new(config))
            .route("/v1/cluster", web::get().to(follower_cluster))
            .route("/healthz", web::get().to(follower_health))
            .route("/v1/jobs/{id}", web::get().to(follower_job))
            .route("/v1/jobs/{id}/image", web::get().to(follower_image))
            .default_service(web::to(to_leader));
    }
}

/// A finished job from this replica's store; any other to the leader.
async fn follower_job(
    _: Client,
    req: HttpRequest,
    id: web::Path<String>,
    store: web::Data<Store>,
    replica: web::Data<Arc<Replica>>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    match read_store(&store, move |s| Ok(s.job(id)?)).await? {
        Some(job) if job.state.is_terminal() => Ok(job_answer(job)),
        _ => to_leader(req, replica).await,
    }
}

/// A finished job's image from this replica's store; else to the leader.
async fn follower_image(
    _: Client,
    req: HttpRequest,
    id: web::Path<String>,
    store: web::Data<Store>,
    replica: web::Data<Arc<Replica>>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    match read_store(&store, move |s| Ok(s.image(id)?)).await? {
        Some(png) => Ok(image_answer(png)),
        None => to_leader(req, replica).await,
    }
}

async fn follower_cluster(replica: web::Data<Arc<Replica>>) -> HttpResponse {
    HttpResponse::Ok().json(status(Some(&replica)).await)
}

async fn follower_health(replica: web::Data<Arc<Replica>>) -> HttpResponse {
    let leader = replica.leader().await;
    HttpResponse::Ok().json(serde_json::json!({
        "status": "follower",
        "replica_id": replica.id(),
        "leader_id": leader.as_ref().map(|l| l.0),
        "leader_http": leader.and_then(|l| l.1),
    }))
}

/// Every other request on a follower: `307` to the leader's same URL.
async fn to_leader(req: HttpRequest, replica: web::Data<Arc<Replica>>) -> Result<HttpResponse> {
    match replica.leader().await {
        Some((id, Some(http))) if id != replica.id() => {
            let target = format!(
                "{http}{}",
                req.uri()
                    .path_and_query()
                    .map_or_else(|| req.path(), |p| p.as_str())
            );
            Ok(HttpResponse::TemporaryRedirect()
                .insert_header(("Location", target.clone()))
                .insert_header(("X-Drover-Leader", id.to_string()))
                .json(serde_json::json!({
                    "error": {
                        "code": "not_leader",
                        "message": format!("replica {} is a follower: the leader is replica {id} at {http}", replica.id()),
                    },
                    "leader_id": id,
                    "leader_http": http,
                })))
        }
        Some((id, _)) => Err(CoordinatorError::Unavailable(format!(
            "replica {} is a follower and cannot reach the leader (replica {id}) yet; retry in a second",
            replica.id()
        ))),
        None => Err(CoordinatorError::Unavailable(format!(
            "replica {} is a follower and knows no leader yet (an election may be under way); retry in a second",
            replica.id()
        ))),
    }
}
