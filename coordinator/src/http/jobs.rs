//! Job endpoints: submission (one, a batch, or submit-and-wait), reads, the image, live events
//! and cancel. Every submission, native or compatible, goes through [`super::accept`].

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use drover_shared::ids::JobId;
use drover_shared::job::JobRequest;
use serde::Serialize;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use super::accept::{accept, accept_checked, count_rejection};
use super::auth::Client;
use super::idempotent::{REPLAYED, replayed, submission_key};
use super::responses::{
    BadRequest, Conflict, Internal, JobFailed, NotFound, PayloadTooLarge, Timeout, TooManyRequests,
    Unauthorized, Unavailable, Unprocessable,
};
use super::state::{AppState, MAX_BATCH_BODY, MAX_BATCH_JOBS, MAX_IMAGE_BODY, read_body};
use crate::control::{CancelJob, Finished, JobEvent, Submitted, WaitJob};
use crate::error::{CoordinatorError, Result};
use crate::records::{JobRecord, JobState};

/// A job's id and state: the answer to a submission and to a cancel.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct JobBrief {
    /// The job.
    pub id: JobId,
    /// Its state now.
    pub state: JobState,
}

impl JobBrief {
    pub(crate) fn of(job: &JobRecord) -> Self {
        Self {
            id: job.id,
            state: job.state,
        }
    }
}

/// The body of `POST /v1/jobs/batch`.
// Read by `batch_requests`, which names the job of a refusal.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The jobs, each read as strictly as `POST /v1/jobs` reads one.
    #[schema(min_items = 1, max_items = 256)]
    pub jobs: Vec<JobRequest>,
}

/// The answer to `POST /v1/jobs/batch`: every job, in the order given.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAccepted {
    /// The jobs accepted.
    pub jobs: Vec<JobBrief>,
}

/// Submit a job
///
/// Validates the request, applies its style and queues the job; answers once the job is on
/// disk. A job no registered node could ever serve is refused (`422`, a reason per node).
#[utoipa::path(
    tag = "jobs",
    request_body = JobRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "1..=255 visible ASCII characters: a retry with the same key and body gets the first submission's job (`Idempotent-Replayed: true`) instead of a new one, for a day; the same key with another body is a 422")),
    responses(
        (status = 202, description = "Accepted, on disk and queued (or accepted before, with the same Idempotency-Key)", body = JobBrief,
            headers(("Location" = String, description = "The job's URL"),
                ("Idempotent-Replayed" = String, description = "`true` when the job was accepted before under the request's Idempotency-Key")),
            links(
                ("GetJob" = (operation_id = "get_job",
                    parameters(("id" = "$response.body#/id")))),
                ("JobEvents" = (operation_id = "job_events",
                    parameters(("id" = "$response.body#/id")))),
                ("GetImage" = (operation_id = "get_image",
                    parameters(("id" = "$response.body#/id")))),
                ("CancelJob" = (operation_id = "cancel_job",
                    parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/jobs")]
pub(crate) async fn submit(
    Client(client): Client,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_IMAGE_BODY).await?;
    let key = submission_key(&req, "/v1/jobs", &body)?;
    if let Some(jobs) = replayed(&state, &client, key.as_ref()).await? {
        let job = jobs.into_iter().next().ok_or_else(|| {
            CoordinatorError::Unavailable("an idempotency key without its job".into())
        })?;
        return Ok(HttpResponse::Accepted()
            .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
            .insert_header((REPLAYED, "true"))
            .json(job));
    }
    let request = JobRequest::from_json(&body)?;
    let result = accept_checked(&state, &client, vec![request], false, key).await;
    if let Err(e) = &result {
        count_rejection(&state, e);
    }
    let job = result?
        .pop()
        .ok_or_else(|| CoordinatorError::Unavailable("a submission answered nothing".into()))?
        .job;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/jobs/{}", job.id)))
        .json(JobBrief::of(&job)))
}

/// Submit up to 256 jobs at once, all or none
///
/// Every job is checked as `POST /v1/jobs` checks one; a refusal of one refuses the batch and
/// names the job (`details.index`, from 0).
#[utoipa::path(
    tag = "jobs",
    request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "As on `POST /v1/jobs`: a retry with the same key and body gets the first batch's jobs")),
    responses(
        (status = 202, description = "Every job accepted, in the order given (or accepted before, with the same Idempotency-Key)", body = BatchAccepted,
            headers(("Idempotent-Replayed" = String, description = "`true` when the batch was accepted before under the request's Idempotency-Key"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/jobs/batch")]
pub(crate) async fn submit_batch(
    Client(client): Client,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_BATCH_BODY).await?;
    let key = submission_key(&req, "/v1/jobs/batch", &body)?;
    if let Some(jobs) = replayed(&state, &client, key.as_ref()).await? {
        return Ok(HttpResponse::Accepted()
            .insert_header((REPLAYED, "true"))
            .json(BatchAccepted { jobs }));
    }
    let requests = batch_requests(&body)?;
    let result = accept_checked(&state, &client, requests, false, key).await;
    if let Err(e) = &result {
        count_rejection(&state, e);
    }
    let jobs = result?.iter().map(|s| JobBrief::of(&s.job)).collect();
    Ok(HttpResponse::Accepted().json(BatchAccepted { jobs }))
}

/// The job requests of a batch body, each read as strictly as `POST /v1/jobs` reads one.
pub(crate) fn batch_requests(body: &[u8]) -> Result<Vec<JobRequest>> {
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

/// Submit a job and wait for its image
///
/// The job is submitted as `POST /v1/jobs` submits it; the answer is its PNG once it
/// succeeded, or its failure.
#[utoipa::path(
    tag = "jobs",
    request_body = JobRequest,
    responses(
        (status = 200, description = "The image", content_type = "image/png", body = Png,
            headers(
                ("X-Seed" = u64, description = "The seed it was rendered with"),
                ("X-Job-Id" = String, description = "The job"),
                ("X-Node-Id" = String, description = "The node that rendered it"),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 429, response = TooManyRequests),
        (status = 500, response = Internal),
        (status = 502, response = JobFailed),
        (status = 503, response = Unavailable),
        (status = 504, response = Timeout),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/generate")]
pub(crate) async fn generate(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let submitted = accept(&state, &client, payload, true).await?;
    let (done, png) = wait_image(&state, submitted).await?;
    Ok(png_answer(&done, png, true))
}

/// A finished job's PNG as the answer of a call that waited for it: `X-Job-Id`, `X-Node-Id`
/// (the node that made it) and, with `seed`, `X-Seed`.
pub(crate) fn png_answer(done: &JobRecord, png: Arc<[u8]>, seed: bool) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response
        .content_type("image/png")
        .insert_header(("X-Job-Id", done.id.to_string()));
    if seed {
        response.insert_header(("X-Seed", done.spec.seed.to_string()));
    }
    if let Some(node) = done.node_id {
        response.insert_header(("X-Node-Id", node.to_string()));
    }
    response.body(actix_web::web::Bytes::from_owner(png))
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
        None => match state.control.send(WaitJob(id)).await? {
            Some(waiter) => waiter,
            None => {
                // It already ended: its end is in the store.
                let job = state
                    .job(id)
                    .await?
                    .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = tx.send(Finished { job, png: None });
                rx
            }
        },
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
                    .image(done.id)
                    .await?
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

pub(crate) fn parse_job_id(raw: &str) -> Result<JobId> {
    raw.parse()
        .map_err(|_| CoordinatorError::NotFound(format!("job {raw}")))
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    /// The job.
    #[serde(flatten)]
    pub job: JobRecord,
    /// Where its image is, once it succeeded.
    pub image_url: Option<String>,
}

/// One job: state, lease, attempts, progress
#[utoipa::path(
    tag = "jobs",
    params(("id" = inline(JobId), Path, description = "The job")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/v1/jobs/{id}")]
pub(crate) async fn get_job(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    let job = state
        .job(id)
        .await?
        .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
    Ok(job_answer(job))
}

/// `GET /v1/jobs/{id}`'s answer: the job as a client sees it, with its image's place.
pub(crate) fn job_answer(job: JobRecord) -> HttpResponse {
    let image_url =
        (job.state == JobState::Succeeded).then(|| format!("/v1/jobs/{}/image", job.id));
    HttpResponse::Ok().json(JobView {
        job: job.public(),
        image_url,
    })
}

/// `GET /v1/jobs/{id}/image`'s answer: the PNG, which never changes.
pub(crate) fn image_answer(png: Vec<u8>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("Cache-Control", "private, max-age=86400, immutable"))
        .body(png)
}

/// The PNG of a finished job
#[utoipa::path(
    tag = "jobs",
    params(("id" = inline(JobId), Path, description = "The job")),
    responses(
        (status = 200, description = "The image (it never changes)", content_type = "image/png",
            body = Png, headers(("Cache-Control" = String))),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/v1/jobs/{id}/image")]
pub(crate) async fn get_image(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    if let Some(png) = state.image(id).await? {
        return Ok(image_answer(png));
    }
    match state.job(id).await? {
        None => Err(CoordinatorError::NotFound(format!("job {id}"))),
        Some(job) => Err(CoordinatorError::Conflict(format!(
            "job {id} is {}; it has no image",
            job.state
        ))),
    }
}

/// A PNG image, as the `image/png` answers carry it.
pub struct Png;

impl PartialSchema for Png {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("image/png")
            .description(Some("A PNG image"))
            .into()
    }
}

impl ToSchema for Png {}

/// One server-sent event: `event: <kind>` and the JSON of the event as `data` (one line).
pub(crate) fn sse(event: &JobEvent) -> web::Bytes {
    let data = serde_json::to_value(event).unwrap_or_default();
    let kind = data["event"].as_str().unwrap_or("message").to_string();
    web::Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// One server-sent event of `GET /v1/jobs/{id}/events` as an event-stream reader sees it: its
/// `event` is the kind, its `data` the [`JobEvent`] as JSON (whose own `event` is the same kind).
/// OpenAPI 3.1 has `text/event-stream`'s schema describe each event.
pub struct JobEventMessage;

impl PartialSchema for JobEventMessage {
    fn schema() -> RefOr<Schema> {
        // The kinds are the tags of the derived `JobEvent` schema, so a new kind is listed.
        let event = serde_json::to_value(JobEvent::schema()).unwrap_or_default();
        let kinds: Vec<serde_json::Value> = event["oneOf"]
            .as_array()
            .map(|variants| {
                variants
                    .iter()
                    .flat_map(|v| v["properties"]["event"]["enum"].as_array().cloned())
                    .flatten()
                    .collect()
            })
            .unwrap_or_default();
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "event",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(kinds)),
            )
            .required("event")
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .content_schema(Some(utoipa::openapi::Ref::from_schema_name(
                        JobEvent::name(),
                    ))),
            )
            .required("data")
            .description(Some(
                "One server-sent event: `event` names the kind, `data` is the JobEvent as JSON",
            ))
            .into()
    }
}

impl ToSchema for JobEventMessage {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobEvent::name().into(), JobEvent::schema()));
        JobEvent::schemas(schemas);
    }
}

/// Live job events (server-sent events)
///
/// The job's state now, then every change until it ends (`done`, then the stream closes).
#[utoipa::path(
    tag = "jobs",
    params(("id" = inline(JobId), Path, description = "The job")),
    responses(
        (status = 200, description = "The event stream: one JobEvent per event",
            content_type = "text/event-stream", body = JobEventMessage),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/v1/jobs/{id}/events")]
pub(crate) async fn job_events(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    use tokio_stream::StreamExt as _;
    let id = parse_job_id(&id)?;
    let (now, live) = match state.control.send(crate::control::WatchJob(id)).await? {
        Some((now, live)) => (now, live),
        None => {
            // A job that already ended has no live part: an already closed channel stands in.
            let job = state
                .job(id)
                .await?
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))?;
            (
                vec![JobEvent::done(&job)],
                tokio::sync::mpsc::unbounded_channel().1,
            )
        }
    };
    let first = tokio_stream::iter(now.iter().map(sse).collect::<Vec<_>>());
    let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(live).map(|e| sse(&e));
    let stream = first.chain(rest).map(Ok::<_, actix_web::Error>);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream))
}

/// Unfinished jobs, oldest first
#[utoipa::path(
    tag = "jobs",
    responses(
        (status = 200, description = "Every unfinished job, oldest first", body = Vec<JobRecord>),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/v1/jobs")]
pub(crate) async fn list_jobs(_: Client, state: web::Data<AppState>) -> Result<HttpResponse> {
    let jobs: Vec<JobRecord> = state
        .control
        .send(crate::control::ListJobs)
        .await?
        .into_iter()
        .map(JobRecord::public)
        .collect();
    Ok(HttpResponse::Ok().json(jobs))
}

/// Cancel a job
///
/// The job is cancelled at once; a node running it stops at its next step.
#[utoipa::path(
    tag = "jobs",
    params(("id" = inline(JobId), Path, description = "The job")),
    responses(
        (status = 200, description = "Cancelled", body = JobBrief),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[delete("/v1/jobs/{id}")]
pub(crate) async fn cancel_job(
    _: Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_job_id(&id)?;
    let Some(job) = state.control.send(CancelJob(id)).await? else {
        return match state.job(id).await? {
            Some(job) => Err(CoordinatorError::Conflict(format!(
                "job {id} already ended ({})",
                job.state
            ))),
            None => Err(CoordinatorError::NotFound(format!("job {id}"))),
        };
    };
    Ok(HttpResponse::Ok().json(JobBrief::of(&job)))
}
