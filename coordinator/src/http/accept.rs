//! The one funnel every submission goes through, native or compatible: read, validate, apply
//! the style, take from the client's rate, submit to the control plane (all or none), wait for
//! the disk; a refusal after submission revokes the jobs, so a refused submission never runs.

use actix_web::web;
use drover_shared::job::{JobRequest, random_seed};
use drover_shared::styles::ApplyError;

use super::state::{AppState, MAX_IMAGE_BODY, read_body};
use crate::control::{SubmissionKey, SubmitJobs, Submitted};
use crate::error::{CoordinatorError, Result};
use crate::limits::ClientId;

/// Reads a native job request body (strict JSON, up to the image body limit).
pub(crate) async fn read_job_request(payload: web::Payload) -> Result<JobRequest> {
    Ok(JobRequest::from_json(
        &read_body(payload, MAX_IMAGE_BODY).await?,
    )?)
}

/// Reads, validates and submits one native job request ([`accept_request`]).
pub(crate) async fn accept(
    state: &AppState,
    client: &ClientId,
    payload: web::Payload,
    wait: bool,
) -> Result<Submitted> {
    accept_request(state, client, read_job_request(payload).await?, wait).await
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
    let result = accept_checked(state, client, requests, wait, None).await;
    if let Err(e) = &result {
        count_rejection(state, e);
    }
    result
}

/// Counts a refused submission in the rejection metric, by reason (client mistakes and jobs
/// no node can serve; rate limits and full disks are counted where they happen).
pub(crate) fn count_rejection(state: &AppState, e: &CoordinatorError) {
    let reason = match e.unbatched() {
        CoordinatorError::InvalidField(_) | CoordinatorError::InvalidRequest(_) => {
            Some("invalid_request")
        }
        CoordinatorError::Unprocessable(_) => Some("unprocessable"),
        _ => None,
    };
    if let Some(reason) = reason {
        state.metrics.reject(reason);
    }
}

/// Validates `requests` (off the server's threads when they carry a source image) and applies
/// their styles, naming the place of a refusal, then [`accept_specs`].
pub(crate) async fn accept_checked(
    state: &AppState,
    client: &ClientId,
    requests: Vec<JobRequest>,
    wait: bool,
    key: Option<SubmissionKey>,
) -> Result<Vec<Submitted>> {
    let of = requests.len();
    let mut specs = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let request = state
            .presets
            .apply(request)
            .map_err(|e| CoordinatorError::from(e).in_batch(index, of))?;
        // Decoding a source image takes milliseconds to a second: off the server's threads.
        let validated = if request.init_image.is_some() {
            let uploads = state.uploads.of(&client.label);
            web::block(move || request.validate_with(random_seed, &uploads))
                .await
                .map_err(|e| CoordinatorError::Unavailable(format!("validating: {e}")))?
        } else {
            request.validate(random_seed)
        };
        let spec = validated.map_err(|e| CoordinatorError::from(e).in_batch(index, of))?;
        let spec = state.styles.apply(spec).map_err(|e| {
            match e {
                ApplyError::Field(f) => CoordinatorError::InvalidField(f),
                ApplyError::Unprocessable(m) => CoordinatorError::Unprocessable(m),
            }
            .in_batch(index, of)
        })?;
        specs.push(spec);
    }
    accept_specs(state, client, specs, wait, key).await
}

/// Takes validated jobs from `client`'s rate, submits them (all or none) and waits until they
/// are on disk; a refusal after submission revokes them.
pub(crate) async fn accept_specs(
    state: &AppState,
    client: &ClientId,
    specs: Vec<drover_shared::job::JobSpec>,
    wait: bool,
    key: Option<SubmissionKey>,
) -> Result<Vec<Submitted>> {
    let count = u32::try_from(specs.len()).unwrap_or(u32::MAX);
    state
        .rates
        .take(client, count, std::time::Instant::now())
        .map_err(|retry_after_s| {
            state.metrics.reject("rate_limited");
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
            key,
        })
        .await??;
    for s in &submitted {
        tracing::info!(job_id = %s.job.id, client = %client.label, "job submitted");
    }
    // Durable before we answer 2xx; refused jobs are taken back, so a refusal means that none
    // of them runs and a retry cannot run one twice.
    if let Err(e) = state.store.flush().await {
        let ids = submitted.iter().map(|s| s.job.id).collect();
        let reason = e.to_string();
        state
            .control
            .send(crate::control::RevokeJobs { ids, reason })
            .await?;
        return Err(e.into());
    }
    Ok(submitted)
}
