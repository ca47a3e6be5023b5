//! Error codes shared by every Drover service, and their one mapping to HTTP and gRPC status.
//!
//! Each crate has its own error enum; each variant names an [`ErrorCode`], and this module is the
//! only place that decides which HTTP status and which gRPC code a code becomes.

use serde::{Deserialize, Serialize};

/// What kind of failure an error is, independent of transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a value is out of range (a client mistake).
    InvalidRequest,
    /// Credentials are missing or wrong.
    Unauthorized,
    /// The credentials are valid but do not allow this call (a client key on an admin call).
    Forbidden,
    /// The named resource does not exist.
    NotFound,
    /// The request is well-formed but no part of the farm could ever serve it.
    Unprocessable,
    /// The request conflicts with the current state of the resource.
    Conflict,
    /// The request body is larger than the call accepts.
    PayloadTooLarge,
    /// The queue is full; retry later.
    TooManyRequests,
    /// The job ran and failed on every attempt.
    JobFailed,
    /// Waiting for a result took longer than allowed; the job may still finish.
    Timeout,
    /// A dependency (store, node session) is not available right now.
    Unavailable,
    /// A bug or an unexpected condition inside Drover.
    Internal,
}

impl ErrorCode {
    /// The code's wire name, as written in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Unprocessable => "unprocessable",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::TooManyRequests => "too_many_requests",
            Self::JobFailed => "job_failed",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// HTTP status for this code. Client mistakes are 4xx, never 5xx.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::Unprocessable => 422,
            Self::TooManyRequests => 429,
            Self::JobFailed => 502,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    /// gRPC status code for this code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidRequest => tonic::Code::InvalidArgument,
            Self::Unauthorized => tonic::Code::Unauthenticated,
            Self::Forbidden => tonic::Code::PermissionDenied,
            Self::NotFound => tonic::Code::NotFound,
            Self::Conflict => tonic::Code::AlreadyExists,
            // gRPC's own answer to a message over its size limit.
            Self::PayloadTooLarge => tonic::Code::ResourceExhausted,
            Self::Unprocessable => tonic::Code::FailedPrecondition,
            Self::TooManyRequests => tonic::Code::ResourceExhausted,
            Self::JobFailed => tonic::Code::Aborted,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Internal => tonic::Code::Internal,
        }
    }
}

/// The JSON body of every REST error: `{"error":{"code","message","details"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorPayload,
}

/// The error inside an `ErrorBody`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorPayload {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message, lowercase, saying what is wrong.
    pub message: String,
    /// Structured details (e.g. the offending field, per-node reasons); `null` when none.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub details: serde_json::Value,
}

impl ErrorBody {
    /// Builds a body from its parts.
    pub fn new(code: ErrorCode, message: impl Into<String>, details: serde_json::Value) -> Self {
        Self {
            error: ErrorPayload {
                code,
                message: message.into(),
                details,
            },
        }
    }
}

/// A string that does not parse as the id it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{value}`: expected a UUID")]
pub struct InvalidId {
    /// Which id kind was expected.
    pub kind: &'static str,
    /// The offending value (truncated).
    pub value: String,
}

/// A request value that fails validation; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path of the offending field (`steps`, `loras[1].strength`); `body` for the whole body.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_never_5xx() {
        for code in [
            ErrorCode::InvalidRequest,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::Unprocessable,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::TooManyRequests,
        ] {
            assert!((400..500).contains(&code.http_status()), "{code:?}");
        }
    }

    #[test]
    fn body_has_the_documented_shape() {
        let body = ErrorBody::new(
            ErrorCode::NotFound,
            "no job",
            serde_json::json!({"id": "x"}),
        );
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "not_found", "message": "no job", "details": {"id": "x"}}})
        );
    }
}
