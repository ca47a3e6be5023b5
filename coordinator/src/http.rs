//! The REST API (actix-web). Handlers parse and validate, then ask the [`ControlPlane`].
//!
//! Route setup lives in [`configure`], so tests mount the same app with
//! `actix_web::test::init_service`.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{HttpRequest, HttpResponse, web};
use drover_shared::ids::JobId;
use drover_shared::job::{JobRequest, random_seed};
use drover_shared::styles::{ApplyError, StyleCatalog};
use serde::Serialize;
use serde_json::json;

use crate::config::Config;
use crate::control::{CancelJob, ControlPlane, GetJob, ListNodes, SetDraining, SubmitJob, WaitJob};
use crate::error::{CoordinatorError, Result};
use crate::records::{JobRecord, JobState};
use crate::store::Store;

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The control plane actor.
    pub control: Addr<ControlPlane>,
    /// The store (read directly for images).
    pub store: Store,
    /// Settings.
    pub config: Arc<Config>,
    /// The style catalog.
    pub styles: Arc<StyleCatalog>,
    /// Counters and histograms.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Mounts every route of the REST API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/v1/generate", web::post().to(generate))
        .route("/v1/jobs", web::post().to(submit))
        .route("/v1/jobs", web::get().to(list_jobs))
        .route("/v1/jobs/{id}", web::get().to(get_job))
        .route("/v1/jobs/{id}", web::delete().to(cancel_job))
        .route("/v1/nodes/{id}/drain", web::post().to(drain_node))
        .route("/v1/nodes/{id}/resume", web::post().to(resume_node))
        .route("/v1/jobs/{id}/image", web::get().to(get_image))
        .route("/v1/jobs/{id}/events", web::get().to(job_events))
        .route("/v1/nodes", web::get().to(list_nodes))
        .route("/v1/styles", web::get().to(list_styles))
        .route("/metrics", web::get().to(metrics))
        .route("/openapi.json", web::get().to(openapi))
        .route("/", web::get().to(crate::dashboard::page));
}

/// Answers unknown routes with a JSON 404.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(CoordinatorError::NotFound(format!(
        "route {} {}",
        req.method(),
        req.path()
    )))
}

async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let online = nodes.iter().filter(|n| n.state == "online").count();
    Ok(HttpResponse::Ok()
        .json(json!({ "status": "ok", "nodes": nodes.len(), "nodes_online": online })))
}

async fn read_job_request(payload: web::Payload) -> Result<JobRequest> {
    let body = payload
        .to_bytes_limited(MAX_BODY)
        .await
        .map_err(|_| {
            CoordinatorError::InvalidRequest(format!("body larger than {MAX_BODY} bytes"))
        })?
        .map_err(|e| CoordinatorError::InvalidRequest(format!("could not read body: {e}")))?;
    Ok(JobRequest::from_json(&body)?)
}

async fn accept(state: &AppState, payload: web::Payload) -> Result<JobRecord> {
    accept_request(state, read_job_request(payload).await?).await
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::document())
}

async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse> {
    let text = state.control.send(crate::control::RenderMetrics).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text))
}

/// Validates a request, applies its style, submits it and waits until it is on disk.
pub(crate) async fn accept_request(state: &AppState, request: JobRequest) -> Result<JobRecord> {
    let result = accept_checked(state, request).await;
    if let Err(e) = &result {
        let reason = match e {
            CoordinatorError::InvalidField(_) | CoordinatorError::InvalidRequest(_) => {
                Some("invalid_request")
            }
            CoordinatorError::Unprocessable(_) => Some("unprocessable"),
            _ => None,
        };
        if let Some(reason) = reason {
            state
                .metrics
                .inc("drover_rejections_total", vec![("reason", reason.into())]);
        }
    }
    result
}

async fn accept_checked(state: &AppState, request: JobRequest) -> Result<JobRecord> {
    let spec = request.validate(random_seed)?;
    let spec = state.styles.apply(spec).map_err(|e| match e {
        ApplyError::Field(f) => CoordinatorError::InvalidField(f),
        ApplyError::Unprocessable(m) => CoordinatorError::Unprocessable(m),
    })?;
    let job = state.control.send(SubmitJob(spec)).await??;
    // Durable before we answer 2xx.
    state.store.flush().await?;
    Ok(job)
}

async fn submit(
    _: Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let job = accept(&state, payload).await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
        .json(json!({ "id": job.id, "state": job.state })))
}

async fn generate(
    _: Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let job = accept(&state, payload).await?;
    let (done, png) = wait_image(&state, job).await?;
    let mut response = HttpResponse::Ok();
    response
        .content_type("image/png")
        .insert_header(("X-Seed", done.spec.seed.to_string()))
        .insert_header(("X-Job-Id", done.id.to_string()));
    if let Some(node) = done.node_id {
        response.insert_header(("X-Node-Id", node.to_string()));
    }
    Ok(response.body(png))
}

/// Waits (up to the generate timeout) for `job` to end; its record and image when it succeeded,
/// else the failure with its reason.
pub(crate) async fn wait_image(state: &AppState, job: JobRecord) -> Result<(JobRecord, Vec<u8>)> {
    let waiter = state.control.send(WaitJob(job.id)).await??;
    let secs = state.config.generate_timeout_s;
    let done = match tokio::time::timeout(Duration::from_secs(secs), waiter).await {
        Ok(Ok(done)) => done,
        Ok(Err(_)) => {
            return Err(CoordinatorError::Unavailable(
                "control plane stopped".into(),
            ));
        }
        Err(_) => {
            return Err(CoordinatorError::Timeout {
                id: job.id.to_string(),
                secs,
            });
        }
    };
    match done.state {
        JobState::Succeeded => {
            let png = state
                .store
                .image(done.id)?
                .ok_or_else(|| CoordinatorError::NotFound(format!("image of job {}", done.id)))?;
            Ok((done, png))
        }
        _ => Err(CoordinatorError::JobFailed {
            id: done.id.to_string(),
            reason: done.error.unwrap_or_else(|| done.state.to_string()),
        }),
    }
}

fn parse_job_id(raw: &str) -> Result<JobId> {
    raw.parse()
        .map_err(|_| CoordinatorError::NotFound(format!("job {raw}")))
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Serialize)]
struct JobView {
    #[serde(flatten)]
    job: JobRecord,
    image_url: Option<String>,
}

async fn get_job(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    let job = state
        .control
        .send(GetJob(id))
        .await??
        .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
    let image_url = (job.state == JobState::Succeeded).then(|| format!("/v1/jobs/{id}/image"));
    Ok(HttpResponse::Ok().json(JobView { job, image_url }))
}

async fn get_image(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    if let Some(png) = state.store.image(id)? {
        return Ok(HttpResponse::Ok().content_type("image/png").body(png));
    }
    match state.control.send(GetJob(id)).await?? {
        None => Err(CoordinatorError::NotFound(format!("job {id}"))),
        Some(job) => Err(CoordinatorError::Conflict(format!(
            "job {id} is {}; it has no image",
            job.state
        ))),
    }
}

/// One server-sent event: `event: <kind>` and the JSON of the event as `data`.
fn sse(event: &crate::control::JobEvent) -> web::Bytes {
    let data = serde_json::to_value(event).unwrap_or_default();
    let kind = data["event"].as_str().unwrap_or("message").to_string();
    web::Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// `GET /v1/jobs/{id}/events`: the job's state now, then every change until it ends.
async fn job_events(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    use tokio_stream::StreamExt as _;
    let id = parse_job_id(&id)?;
    let (now, live) = state.control.send(crate::control::WatchJob(id)).await??;
    let first = tokio_stream::iter(now.iter().map(sse).collect::<Vec<_>>());
    // A job that already ended has no live part: an already closed channel stands in for it.
    let live = live.unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().1);
    let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(live).map(|e| sse(&e));
    let stream = first.chain(rest).map(Ok::<_, actix_web::Error>);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream))
}

/// `GET /v1/jobs`: every unfinished job, oldest first.
async fn list_jobs(_: Client, state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.control.send(crate::control::ListJobs).await?))
}

async fn list_nodes(state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.control.send(ListNodes).await?))
}

async fn list_styles(state: web::Data<AppState>) -> HttpResponse {
    let styles: Vec<_> = state.styles.styles().collect();
    HttpResponse::Ok().json(styles)
}

/// A caller allowed to use the client API: with a configured API key (`Authorization: Bearer
/// <key>` or `X-Api-Key: <key>`; the admin token works too) when keys are configured, anyone
/// otherwise.
pub struct Client;

impl actix_web::FromRequest for Client {
    type Error = CoordinatorError;
    type Future = std::future::Ready<Result<Self>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(check_client(req).map(|()| Client))
    }
}

fn check_client(req: &HttpRequest) -> Result<()> {
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Ok(());
    };
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let presented = header("x-api-key")
        .filter(|k| !k.is_empty())
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")));
    let Some(key) = presented else {
        return Err(CoordinatorError::Unauthorized(
            "this call needs an API key: `Authorization: Bearer <key>` or `X-Api-Key: <key>`"
                .into(),
        ));
    };
    let admin = state.config.admin_token.iter();
    if keys
        .iter()
        .chain(admin)
        .any(|k| drover_shared::secret_eq(key, k))
    {
        Ok(())
    } else {
        Err(CoordinatorError::Unauthorized("unknown API key".into()))
    }
}

/// Checks `Authorization: Bearer <DROVER_ADMIN_TOKEN>` when an admin token is configured.
fn require_admin(state: &AppState, req: &HttpRequest) -> Result<()> {
    let Some(expected) = &state.config.admin_token else {
        return Ok(());
    };
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if drover_shared::secret_eq(token, expected) => Ok(()),
        Some(_) => Err(CoordinatorError::Unauthorized("wrong admin token".into())),
        None => Err(CoordinatorError::Unauthorized(
            "this call needs `Authorization: Bearer <DROVER_ADMIN_TOKEN>`".into(),
        )),
    }
}

async fn cancel_job(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    let job = state.control.send(CancelJob(id)).await??;
    Ok(HttpResponse::Ok().json(json!({ "id": job.id, "state": job.state })))
}

async fn set_draining(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: &str,
    draining: bool,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let node_id = id
        .parse()
        .map_err(|_| CoordinatorError::NotFound(format!("node {id}")))?;
    let record = state
        .control
        .send(SetDraining { node_id, draining })
        .await??;
    Ok(HttpResponse::Ok()
        .json(json!({ "id": record.id, "name": record.name, "draining": record.draining })))
}

async fn drain_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    set_draining(state, req, &id, true).await
}

async fn resume_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    set_draining(state, req, &id, false).await
}
