//! The REST API (actix-web). Handlers parse and validate, then ask the [`ControlPlane`].
//!
//! Route setup lives in [`configure`], so tests mount the same app with
//! `actix_web::test::init_service`.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};
use drover_shared::ids::JobId;
use drover_shared::job::{JobRequest, random_seed};
use drover_shared::styles::{ApplyError, StyleCatalog};
use serde::Serialize;
use serde_json::json;

use crate::config::Config;
use crate::control::{
    CancelJob, ControlPlane, Finished, GetJob, ListNodes, SetDraining, SubmitJobs, Submitted,
    WaitJob,
};
use crate::error::{CoordinatorError, Result};
use crate::limits::{ClientId, RateLimiter};
use crate::records::{JobRecord, JobState};
use crate::store::Store;

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

/// Most jobs one `POST /v1/jobs/batch` may carry.
pub const MAX_BATCH_JOBS: usize = 256;

/// Largest accepted batch body.
const MAX_BATCH_BODY: usize = 1024 * 1024;

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
    /// Per-client submission rates.
    pub rates: Arc<RateLimiter>,
}

/// Mounts every route of the REST API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/v1/generate", web::post().to(generate))
        .route("/v1/jobs", web::post().to(submit))
        .route("/v1/jobs/batch", web::post().to(submit_batch))
        .route("/v1/jobs", web::get().to(list_jobs))
        .route("/v1/jobs/{id}", web::get().to(get_job))
        .route("/v1/jobs/{id}", web::delete().to(cancel_job))
        .route("/v1/nodes/{id}/drain", web::post().to(drain_node))
        .route("/v1/nodes/{id}/resume", web::post().to(resume_node))
        .route("/v1/jobs/{id}/image", web::get().to(get_image))
        .route("/v1/jobs/{id}/events", web::get().to(job_events))
        .route("/v1/nodes", web::get().to(list_nodes))
        .route("/v1/models", web::get().to(list_models))
        .route("/v1/styles", web::get().to(list_styles))
        .route("/metrics", web::get().to(metrics))
        .route("/openapi.json", web::get().to(openapi))
        .route("/", web::get().to(crate::dashboard::page))
        .route("/dashboard/live", web::get().to(crate::dashboard::live))
        .route("/docs", web::get().to(crate::apidocs::page));
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

/// The request body, refused past `limit` bytes.
async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes> {
    payload
        .to_bytes_limited(limit)
        .await
        .map_err(|_| CoordinatorError::InvalidRequest(format!("body larger than {limit} bytes")))?
        .map_err(|e| CoordinatorError::InvalidRequest(format!("could not read body: {e}")))
}

async fn read_job_request(payload: web::Payload) -> Result<JobRequest> {
    Ok(JobRequest::from_json(&read_body(payload, MAX_BODY).await?)?)
}

async fn accept(
    state: &AppState,
    client: &ClientId,
    payload: web::Payload,
    wait: bool,
) -> Result<Submitted> {
    accept_request(state, client, read_job_request(payload).await?, wait).await
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

/// Validates a request, applies its style, takes it from `client`'s rate, submits it and waits
/// until it is on disk. With `wait`, the answer carries where the job's end will arrive.
pub(crate) async fn accept_request(
    state: &AppState,
    client: &ClientId,
    request: JobRequest,
    wait: bool,
) -> Result<Submitted> {
    accept_requests(state, client, vec![request], wait)
        .await?
        .pop()
        .ok_or_else(|| CoordinatorError::Unavailable("a submission answered nothing".into()))
}

/// [`accept_request`] for several requests, all accepted or none (a refusal of one names its
/// place), with one submission to the control plane and one wait for the disk.
pub(crate) async fn accept_requests(
    state: &AppState,
    client: &ClientId,
    requests: Vec<JobRequest>,
    wait: bool,
) -> Result<Vec<Submitted>> {
    let result = accept_checked(state, client, requests, wait).await;
    if let Err(e) = &result {
        let reason = match e.unbatched() {
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

async fn accept_checked(
    state: &AppState,
    client: &ClientId,
    requests: Vec<JobRequest>,
    wait: bool,
) -> Result<Vec<Submitted>> {
    let of = requests.len();
    let mut specs = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let spec = request
            .validate(random_seed)
            .map_err(|e| CoordinatorError::from(e).in_batch(index, of))?;
        let spec = state.styles.apply(spec).map_err(|e| {
            match e {
                ApplyError::Field(f) => CoordinatorError::InvalidField(f),
                ApplyError::Unprocessable(m) => CoordinatorError::Unprocessable(m),
            }
            .in_batch(index, of)
        })?;
        specs.push(spec);
    }
    let count = u32::try_from(specs.len()).unwrap_or(u32::MAX);
    state
        .rates
        .take(client, count, std::time::Instant::now())
        .map_err(|retry_after_s| {
            state.metrics.inc(
                "drover_rejections_total",
                vec![("reason", "rate_limited".into())],
            );
            CoordinatorError::RateLimited {
                message: format!(
                    "client {} is over its {} submissions per minute",
                    client.label, client.rate_per_min
                ),
                retry_after_s,
            }
        })?;
    let submitted = state
        .control
        .send(SubmitJobs {
            specs,
            client: client.clone(),
            wait,
        })
        .await??;
    for s in &submitted {
        tracing::info!(job_id = %s.job.id, client = %client.label, "job submitted");
    }
    // Durable before we answer 2xx.
    state.store.flush().await?;
    Ok(submitted)
}

async fn submit(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let job = accept(&state, &client, payload, false).await?.job;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
        .json(json!({ "id": job.id, "state": job.state })))
}

/// `POST /v1/jobs/batch`: `{"jobs": [JobRequest, ...]}` (1 to [`MAX_BATCH_JOBS`]), all accepted
/// or none; answers `202` with every job's id and state, in order.
async fn submit_batch(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let requests = batch_requests(&read_body(payload, MAX_BATCH_BODY).await?)?;
    let submitted = accept_requests(&state, &client, requests, false).await?;
    let jobs: Vec<_> = submitted
        .iter()
        .map(|s| json!({ "id": s.job.id, "state": s.job.state }))
        .collect();
    Ok(HttpResponse::Accepted().json(json!({ "jobs": jobs })))
}

/// The job requests of a batch body, each read as strictly as `POST /v1/jobs` reads one.
fn batch_requests(body: &[u8]) -> Result<Vec<JobRequest>> {
    use drover_shared::error::FieldError;
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("malformed json: {e}")))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(FieldError::new("body", "expected a JSON object with `jobs`").into());
    };
    if let Some(unknown) = map.keys().find(|k| *k != "jobs") {
        return Err(
            FieldError::new(unknown.clone(), "unknown field; a batch has only `jobs`").into(),
        );
    }
    let Some(serde_json::Value::Array(jobs)) = map.remove("jobs") else {
        return Err(FieldError::new("jobs", "expected an array of job requests").into());
    };
    if jobs.is_empty() || jobs.len() > MAX_BATCH_JOBS {
        return Err(FieldError::new(
            "jobs",
            format!(
                "a batch holds 1..={MAX_BATCH_JOBS} jobs, not {}",
                jobs.len()
            ),
        )
        .into());
    }
    jobs.iter()
        .enumerate()
        .map(|(index, job)| {
            let bytes = serde_json::to_vec(job).map_err(CoordinatorError::from)?;
            JobRequest::from_json(&bytes).map_err(|e| CoordinatorError::InBatch {
                index,
                error: Box::new(e.into()),
            })
        })
        .collect()
}

async fn generate(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let submitted = accept(&state, &client, payload, true).await?;
    let (done, png) = wait_image(&state, submitted).await?;
    let mut response = HttpResponse::Ok();
    response
        .content_type("image/png")
        .insert_header(("X-Seed", done.spec.seed.to_string()))
        .insert_header(("X-Job-Id", done.id.to_string()));
    if let Some(node) = done.node_id {
        response.insert_header(("X-Node-Id", node.to_string()));
    }
    Ok(response.body(actix_web::web::Bytes::from_owner(png)))
}

/// Waits (up to the generate timeout) for a submitted job to end; its record and image when it
/// succeeded, else the failure with its reason.
pub(crate) async fn wait_image(
    state: &AppState,
    submitted: Submitted,
) -> Result<(JobRecord, Arc<[u8]>)> {
    let id = submitted.job.id;
    let waiter = match submitted.done {
        Some(done) => done,
        None => state.control.send(WaitJob(id)).await??,
    };
    let secs = state.config.generate_timeout_s;
    let Finished { job: done, png } =
        match tokio::time::timeout(Duration::from_secs(secs), waiter).await {
            Ok(Ok(done)) => done,
            Ok(Err(_)) => {
                return Err(CoordinatorError::Unavailable(
                    "control plane stopped".into(),
                ));
            }
            Err(_) => {
                return Err(CoordinatorError::Timeout {
                    id: id.to_string(),
                    secs,
                });
            }
        };
    match done.state {
        JobState::Succeeded => {
            let png = match png {
                Some(png) => png,
                None => state
                    .store
                    .image(done.id)?
                    .ok_or_else(|| CoordinatorError::NotFound(format!("image of job {}", done.id)))?
                    .into(),
            };
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
        // A job's image never changes.
        return Ok(HttpResponse::Ok()
            .content_type("image/png")
            .insert_header(("Cache-Control", "private, max-age=86400, immutable"))
            .body(png));
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

/// One model the farm serves, as `GET /v1/models` lists it.
#[derive(Debug, PartialEq, Serialize)]
pub struct ModelView {
    /// The model id (sha256 of its header; a sim id for simulated nodes).
    pub model_id: String,
    /// Its family.
    pub family: drover_shared::family::ModelFamily,
    /// Backends of the nodes serving it.
    pub backends: Vec<String>,
    /// Nodes registered with it.
    pub nodes: usize,
    /// Of those, online now.
    pub nodes_online: usize,
    /// Workers on its online nodes.
    pub workers_online: u32,
    /// Largest image (pixels) some node of it renders.
    pub max_pixels: u64,
    /// The only sizes its nodes render, when every node of it has fixed sizes; empty: any size
    /// up to `max_pixels` on some node.
    pub sizes: Vec<drover_shared::job::Size>,
    /// LoRAs some node of it offers.
    pub loras: Vec<String>,
}

/// The models of the registry, one entry per model id, by family then id.
pub fn models(nodes: &[crate::control::NodeStatus]) -> Vec<ModelView> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_model: BTreeMap<(String, String), Vec<&crate::control::NodeStatus>> =
        BTreeMap::new();
    for n in nodes {
        by_model
            .entry((n.record.family.to_string(), n.record.model_id.clone()))
            .or_default()
            .push(n);
    }
    by_model
        .into_values()
        .map(|group| {
            let first = &group[0].record;
            let online: Vec<_> = group.iter().filter(|n| n.state != "offline").collect();
            let fixed = group.iter().all(|n| !n.record.sizes.is_empty());
            let sizes: BTreeSet<_> = if fixed {
                group
                    .iter()
                    .flat_map(|n| n.record.sizes.iter().map(|s| (s.width, s.height)))
                    .collect()
            } else {
                BTreeSet::new()
            };
            ModelView {
                model_id: first.model_id.clone(),
                family: first.family,
                backends: group
                    .iter()
                    .map(|n| n.record.backend.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                nodes: group.len(),
                nodes_online: online.len(),
                workers_online: online.iter().map(|n| n.record.workers).sum(),
                max_pixels: group.iter().map(|n| n.record.max_pixels).max().unwrap_or(0),
                sizes: sizes
                    .into_iter()
                    .map(|(width, height)| drover_shared::job::Size { width, height })
                    .collect(),
                loras: group
                    .iter()
                    .flat_map(|n| n.record.loras.iter().map(|l| l.name.clone()))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            }
        })
        .collect()
}

async fn list_models(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    Ok(HttpResponse::Ok().json(models(&nodes)))
}

async fn list_styles(state: web::Data<AppState>) -> HttpResponse {
    let styles: Vec<_> = state.styles.styles().collect();
    HttpResponse::Ok().json(styles)
}

/// A caller allowed to use the client API, and who it is: a configured API key
/// (`Authorization: Bearer <key>` or `X-Api-Key: <key>`; the admin token works too) when keys
/// are configured, else anyone, known by address. Its limits come with it.
pub struct Client(pub ClientId);

impl actix_web::FromRequest for Client {
    type Error = CoordinatorError;
    type Future = std::future::Ready<Result<Self>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(check_client(req).map(Client))
    }
}

fn presented_key(req: &HttpRequest) -> Option<&str> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    header("x-api-key")
        .filter(|k| !k.is_empty())
        .or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer ")))
}

/// The id of the REST request being served: the caller's `X-Request-Id` when it is a sane token,
/// else a fresh one. [`request_span`] sets it; every response carries it back.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id of `req` (empty outside [`request_span`]).
    pub fn of(req: &HttpRequest) -> String {
        req.extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default()
    }
}

/// Middleware body: gives the request an id, runs it inside a `request` span (method, path,
/// request id) and answers the id in `X-Request-Id`.
pub fn request_span<S, B>(
    req: actix_web::dev::ServiceRequest,
    srv: &S,
) -> impl std::future::Future<
    Output = std::result::Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>,
> + use<S, B>
where
    S: actix_web::dev::Service<
            actix_web::dev::ServiceRequest,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >,
{
    use tracing::Instrument as _;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", method = %req.method(), path = %req.path(), request_id = %id);
    let call = srv.call(req);
    async move {
        let mut response = call.await?;
        if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&id) {
            response.headers_mut().insert(
                actix_web::http::header::HeaderName::from_static("x-request-id"),
                value,
            );
        }
        Ok(response)
    }
    .instrument(span)
}

pub(crate) fn check_client(req: &HttpRequest) -> Result<ClientId> {
    let request_id = RequestId::of(req);
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Ok(ClientId {
            label: "anonymous".into(),
            rate_per_min: 0,
            max_active: 0,
            request_id,
        });
    };
    let config = &state.config;
    if config.keys.is_empty() {
        let peer = req
            .peer_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        return Ok(ClientId {
            label: format!("ip:{peer}"),
            rate_per_min: config.key_rate_per_min,
            max_active: config.key_max_active,
            request_id,
        });
    }
    let Some(presented) = presented_key(req) else {
        return Err(CoordinatorError::Unauthorized(
            "this call needs an API key: `Authorization: Bearer <key>` or `X-Api-Key: <key>`"
                .into(),
        ));
    };
    if let Some(key) = config
        .keys
        .iter()
        .find(|k| drover_shared::secret_eq(presented, &k.secret))
    {
        return Ok(ClientId {
            label: key.label.clone(),
            rate_per_min: key.rate_per_min.unwrap_or(config.key_rate_per_min),
            max_active: key.max_active.unwrap_or(config.key_max_active),
            request_id,
        });
    }
    match &config.admin_token {
        Some(admin) if drover_shared::secret_eq(presented, admin) => Ok(ClientId {
            label: "admin".into(),
            rate_per_min: 0,
            max_active: 0,
            request_id,
        }),
        _ => Err(CoordinatorError::Unauthorized("unknown API key".into())),
    }
}

/// Checks `Authorization: Bearer <DROVER_ADMIN_TOKEN>` when an admin token is configured.
pub(crate) fn require_admin(state: &AppState, req: &HttpRequest) -> Result<()> {
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
        Some(token)
            if state
                .config
                .keys
                .iter()
                .any(|k| drover_shared::secret_eq(token, &k.secret)) =>
        {
            Err(CoordinatorError::Forbidden(
                "this is a client API key; admin calls need DROVER_ADMIN_TOKEN".into(),
            ))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::NodeStatus;
    use crate::records::{LoraAdvert, NodeRecord};
    use drover_shared::family::ModelFamily;
    use drover_shared::ids::NodeId;
    use drover_shared::job::Size;

    fn node(name: &str, model: &str, backend: &str, state: &'static str) -> NodeStatus {
        NodeStatus {
            record: NodeRecord {
                id: NodeId::random(),
                name: name.into(),
                backend: backend.into(),
                family: ModelFamily::Sd15,
                cross_attention_dim: 768,
                model_id: model.into(),
                workers: 3,
                max_pixels: 512 * 512,
                loras: vec![LoraAdvert {
                    name: format!("{name}-style"),
                    family: ModelFamily::Sd15,
                }],
                version: "test".into(),
                pixel_steps_per_second: 0.0,
                registered_at_ms: 0,
                draining: false,
                sizes: Vec::new(),
            },
            state,
            suspect: false,
            running: 0,
            last_seen_ms_ago: 0,
            measured_pixel_steps_per_second: None,
        }
    }

    #[test]
    fn models_group_nodes_by_model_id() {
        let square = |s| Size {
            width: s,
            height: s,
        };
        let mut npu = node("npu-a", "m1", "rknn", "online");
        npu.record.sizes = vec![square(384)];
        let mut npu2 = node("npu-b", "m1", "rknn", "offline");
        npu2.record.sizes = vec![square(512), square(384)];
        let listed = models(&[npu, node("gpu", "m2", "cuda", "online"), npu2]);
        assert_eq!(listed.len(), 2);
        let m1 = &listed[0];
        assert_eq!(
            (
                m1.model_id.as_str(),
                m1.nodes,
                m1.nodes_online,
                m1.workers_online
            ),
            ("m1", 2, 1, 3)
        );
        assert_eq!(m1.backends, vec!["rknn".to_string()]);
        assert_eq!(m1.sizes, vec![square(384), square(512)]);
        assert_eq!(
            m1.loras,
            vec!["npu-a-style".to_string(), "npu-b-style".to_string()]
        );
        // A model that some node renders at any size lists no fixed sizes.
        let mut mixed = node("npu-c", "m2", "rknn", "online");
        mixed.record.sizes = vec![square(384)];
        let listed = models(&[node("gpu", "m2", "cuda", "online"), mixed]);
        assert!(listed[0].sizes.is_empty());
        assert_eq!(
            listed[0].backends,
            vec!["cuda".to_string(), "rknn".to_string()]
        );
    }
}
