//! `Idempotency-Key` on submissions: the key read and checked, and the jobs of a submission
//! made before under it (see `control::idempotency`).

use actix_web::HttpRequest;

use super::jobs::JobBrief;
use super::state::AppState;
use crate::control::idempotency::{self, Lookup};
use crate::control::{LookupKey, SubmissionKey};
use crate::error::{CoordinatorError, Result};
use crate::limits::ClientId;

/// The header that marks an answer given again for an `Idempotency-Key` seen before.
pub(crate) const REPLAYED: &str = "Idempotent-Replayed";

/// The request's `Idempotency-Key` (checked) with its fingerprint, when it has one.
pub(crate) fn submission_key(
    req: &HttpRequest,
    route: &str,
    body: &[u8],
) -> Result<Option<SubmissionKey>> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| {
        drover_shared::error::FieldError::new("Idempotency-Key", "must be visible ASCII characters")
    })?;
    idempotency::check_key(key)
        .map_err(|m| drover_shared::error::FieldError::new("Idempotency-Key", m))?;
    Ok(Some(SubmissionKey {
        key: key.to_string(),
        fingerprint: idempotency::fingerprint(route, body),
    }))
}

/// The jobs of a submission made before under `key` (their state now), when it was; a key
/// used for another request is a `422`.
pub(crate) async fn replayed(
    state: &AppState,
    client: &ClientId,
    key: Option<&SubmissionKey>,
) -> Result<Option<Vec<JobBrief>>> {
    let Some(key) = key else {
        return Ok(None);
    };
    let lookup = state
        .control
        .send(LookupKey {
            client: client.label.clone(),
            key: key.clone(),
        })
        .await?;
    let ids = match lookup {
        Lookup::New => return Ok(None),
        Lookup::Conflict => {
            return Err(CoordinatorError::Unprocessable(
                "this Idempotency-Key was used for another request; a retry must send the same body to the same route"
                    .into(),
            ));
        }
        Lookup::Replay(ids) => ids,
    };
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        let job = state.job(id).await?.ok_or_else(|| {
            CoordinatorError::Conflict(format!(
                "the jobs this Idempotency-Key was used for are gone (job {id}: past the result retention)"
            ))
        })?;
        jobs.push(JobBrief::of(&job));
    }
    tracing::info!(client = %client.label, jobs = jobs.len(), "submission replayed for its idempotency key");
    Ok(Some(jobs))
}
