//! The coordinator's error enum and its single mapping to HTTP responses and gRPC status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use drover_shared::error::{ErrorBody, ErrorCode, FieldError};
use serde_json::{Value, json};

use crate::control::router::NodeSkip;
use crate::store::StoreError;

/// Result alias for the coordinator.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is malformed or out of range.
    #[error("invalid request: {0}")]
    InvalidField(#[from] FieldError),
    /// A request is invalid as a whole.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A request body is larger than the call accepts.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The call's limit in bytes.
        limit: usize,
    },
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// No registered node could ever serve the job.
    #[error("no registered node can serve this job")]
    Infeasible {
        /// Why each node was ruled out.
        reasons: Vec<NodeSkip>,
    },
    /// The request names something the farm does not offer (an unknown style, LoRA, ...).
    #[error("{0}")]
    Unprocessable(String),
    /// The state of a resource does not allow the request.
    #[error("{0}")]
    Conflict(String),
    /// The queue is full.
    #[error("queue is full ({limit} jobs waiting); retry later")]
    QueueFull {
        /// The configured queue limit.
        limit: usize,
        /// Suggested wait in seconds.
        retry_after_s: u64,
    },
    /// The job failed on every attempt.
    #[error("job {id} failed: {reason}")]
    JobFailed {
        /// The job.
        id: String,
        /// Why (every attempt's reason).
        reason: String,
    },
    /// Waiting for a job took too long; it may still finish.
    #[error("job {id} did not finish within {secs} s; poll GET /v1/jobs/{id}")]
    Timeout {
        /// The job.
        id: String,
        /// How long we waited.
        secs: u64,
    },
    /// Missing or wrong credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Valid credentials that do not allow this call.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The client is over its submission rate or its cap on unfinished jobs.
    #[error("{message}; retry in {retry_after_s} s")]
    RateLimited {
        /// Which limit, and the client's figures.
        message: String,
        /// Suggested wait in seconds.
        retry_after_s: u64,
    },
    /// The store failed: it cannot write now (a full disk, an I/O failure), its data is
    /// damaged, or what was asked for was deleted.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A value could not be encoded or decoded as JSON (outside the store).
    #[error("json error: {0}")]
    Codec(#[from] serde_json::Error),
    /// One job of a batch submission was refused (so the whole batch was: nothing is accepted).
    #[error("job {index} of the batch: {error}")]
    InBatch {
        /// The job's position in the batch, from 0.
        index: usize,
        /// Why it was refused.
        error: Box<CoordinatorError>,
    },
    /// The control plane actor is gone (shutting down).
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
}

impl CoordinatorError {
    /// This refusal of job `index` of a submission of `of` jobs: named by its place
    /// ([`CoordinatorError::InBatch`]) when the submission holds more than one.
    pub fn in_batch(self, index: usize, of: usize) -> Self {
        if of > 1 {
            Self::InBatch {
                index,
                error: Box::new(self),
            }
        } else {
            self
        }
    }

    /// The error itself, out of its [`CoordinatorError::InBatch`] wrapper.
    pub fn unbatched(&self) -> &Self {
        match self {
            Self::InBatch { error, .. } => error,
            e => e,
        }
    }

    /// The transport-independent code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidField(_) | Self::InvalidRequest(_) => ErrorCode::InvalidRequest,
            Self::NotFound(_) | Self::Store(StoreError::Gone(_)) => ErrorCode::NotFound,
            Self::Infeasible { .. } | Self::Unprocessable(_) => ErrorCode::Unprocessable,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::QueueFull { .. } | Self::RateLimited { .. } => ErrorCode::TooManyRequests,
            Self::JobFailed { .. } => ErrorCode::JobFailed,
            Self::Timeout { .. } => ErrorCode::Timeout,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::InBatch { error, .. } => error.code(),
            Self::Store(e) if e.is_unavailable() => ErrorCode::Unavailable,
            Self::Store(_) | Self::Codec(_) => ErrorCode::Internal,
        }
    }

    /// Structured details for the JSON error body.
    pub fn details(&self) -> Value {
        match self {
            Self::InvalidField(e) => json!({ "field": e.field }),
            Self::TooLarge { limit } => json!({ "limit": limit }),
            Self::Infeasible { reasons } => json!({ "nodes": reasons }),
            Self::QueueFull {
                limit,
                retry_after_s,
            } => {
                json!({ "limit": limit, "retry_after_s": retry_after_s })
            }
            Self::RateLimited { retry_after_s, .. } => json!({ "retry_after_s": retry_after_s }),
            Self::JobFailed { id, .. } | Self::Timeout { id, .. } => json!({ "job_id": id }),
            Self::InBatch { index, error } => {
                let mut details = match error.details() {
                    Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                };
                details.insert("index".into(), json!(index));
                Value::Object(details)
            }
            _ => Value::Null,
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string(), self.details())
    }
}

impl From<actix::MailboxError> for CoordinatorError {
    fn from(e: actix::MailboxError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl ResponseError for CoordinatorError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        if self.code() == ErrorCode::Internal {
            tracing::error!(error = %self, "internal error");
        }
        let mut response = HttpResponse::build(self.status_code());
        if let Self::QueueFull { retry_after_s, .. } | Self::RateLimited { retry_after_s, .. } =
            self
        {
            response.insert_header(("Retry-After", retry_after_s.to_string()));
        } else if self.code() == ErrorCode::Unavailable {
            // A store that cannot write, a replica without a leader: worth a retry soon.
            response.insert_header(("Retry-After", "1"));
        }
        response.json(self.body())
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        tonic::Status::new(e.code().grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mapping_for_http_and_grpc() {
        let e = CoordinatorError::InvalidField(FieldError::new("steps", "0 is outside 1..=50"));
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
        let e = CoordinatorError::QueueFull {
            limit: 3,
            retry_after_s: 5,
        };
        assert_eq!(e.status_code(), StatusCode::TOO_MANY_REQUESTS);
        let e = CoordinatorError::RateLimited {
            message: "client key-1 is over 30 submissions per minute".into(),
            retry_after_s: 2,
        };
        let response = e.error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
        let e = CoordinatorError::Forbidden("a client key cannot drain nodes".into());
        assert_eq!(e.status_code(), StatusCode::FORBIDDEN);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
        let e = CoordinatorError::Unauthorized("bad node token".into());
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
        // A batch's refusal is its job's, with the job's place added.
        let e = CoordinatorError::InBatch {
            index: 2,
            error: Box::new(CoordinatorError::InvalidField(FieldError::new(
                "steps",
                "0 is outside 1..=50",
            ))),
        };
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(body["error"]["details"]["index"], 2);
        assert_eq!(body["error"]["details"]["field"], "steps");
        assert!(e.to_string().starts_with("job 2 of the batch: "), "{e}");
    }

    #[test]
    fn store_errors_map_by_what_went_wrong() {
        let full = CoordinatorError::Store(StoreError::Unwritable(
            "new jobs are refused: the disk is full".into(),
        ));
        assert_eq!(full.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(full.to_string().contains("the disk is full"), "{full}");
        let eio = CoordinatorError::from(StoreError::Io(std::io::Error::from_raw_os_error(5)));
        assert_eq!(eio.code(), ErrorCode::Unavailable);
        let damaged = CoordinatorError::from(StoreError::Damaged("a short record".into()));
        assert_eq!(damaged.code(), ErrorCode::Internal);
        let gone = CoordinatorError::from(StoreError::Gone("pruned".into()));
        assert_eq!(gone.code(), ErrorCode::NotFound);
    }
}

impl CoordinatorError {
    /// The error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for the
    /// OpenAI-compatible routes: the same status as [`CoordinatorError::body`], `param` the
    /// offending field, `code` the [`ErrorCode`].
    pub fn openai_body(&self) -> Value {
        let kind = match self.code() {
            ErrorCode::Unauthorized | ErrorCode::Forbidden => "authentication_error",
            ErrorCode::TooManyRequests => "rate_limit_error",
            ErrorCode::Internal
            | ErrorCode::Unavailable
            | ErrorCode::JobFailed
            | ErrorCode::Timeout => "server_error",
            _ => "invalid_request_error",
        };
        let param = match self.details().get("field") {
            Some(Value::String(f)) => Value::String(f.clone()),
            _ => Value::Null,
        };
        json!({"error": {
            "message": self.to_string(),
            "type": kind,
            "param": param,
            "code": serde_json::to_value(self.code()).unwrap_or(Value::Null),
        }})
    }
}

/// A [`CoordinatorError`] answered in OpenAI's error shape ([`CoordinatorError::openai_body`]).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct OpenAiError(#[from] pub CoordinatorError);

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let usual = self.0.error_response();
        let mut answer = HttpResponse::build(usual.status());
        if let Some(retry) = usual.headers().get("retry-after") {
            answer.insert_header(("Retry-After", retry.clone()));
        }
        answer.json(self.0.openai_body())
    }
}
