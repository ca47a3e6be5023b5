//! The documented answers every handler shares: one error response per [`ErrorCode`] (named by
//! the status it maps to, all with the shared [`ErrorBody`]) and the security schemes' names. A
//! leaf: handlers name these in their `#[utoipa::path]`, and [`super::openapi`] collects them.

use drover_shared::error::{ErrorBody, ErrorCode};
use utoipa::openapi::{Content, Header, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{PartialSchema as _, ToSchema as _};

/// Security scheme: an API key in `X-Api-Key` (client calls, when keys are configured).
pub const API_KEY: &str = "apiKey";
/// Security scheme: `Authorization: Bearer <API key>` (client calls, when keys are configured).
pub const BEARER_KEY: &str = "bearerKey";
/// Security scheme: `Authorization: Bearer <DROVER_ADMIN_TOKEN>` (admin calls).
pub const ADMIN_TOKEN: &str = "adminToken";

macro_rules! error_responses {
    ($($(#[doc = $doc:literal])+ $name:ident = $code:ident;)+) => {
        $(
            $(#[doc = $doc])+
            ///
            /// A response component of the document: the shared error body under the status
            /// its [`ErrorCode`] maps to.
            pub struct $name;

            impl<'r> utoipa::ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<Response>) {
                    (
                        stringify!($name),
                        error_response(ErrorCode::$code, concat!($($doc, "\n"),+)).into(),
                    )
                }
            }
        )+

        /// Every error response component: its name and the code it answers.
        pub const ERROR_RESPONSES: &[(&str, ErrorCode)] = &[$((stringify!($name), ErrorCode::$code)),+];

        pub(super) fn error_components() -> Vec<(&'static str, RefOr<Response>)> {
            vec![$(<$name as utoipa::ToResponse<'static>>::response()),+]
        }

        /// The component of each code: a code added to `ErrorCode` stops the tests from
        /// compiling until it has one.
        #[cfg(test)]
        pub(super) fn component_of(code: ErrorCode) -> &'static str {
            match code {
                $(ErrorCode::$code => stringify!($name),)+
            }
        }
    };
}

error_responses! {
    /// The body or a value is malformed or out of range: `details.field` names the field, and
    /// `details.index` the job of a batch.
    BadRequest = InvalidRequest;
    /// API keys are configured and this call presented none, or an unknown one.
    Unauthorized = Unauthorized;
    /// A client API key on an admin call, or an admin call from another machine while no admin
    /// token is configured.
    Forbidden = Forbidden;
    /// No such job or node (an id that is not a UUID names none), or it is past its retention.
    NotFound = NotFound;
    /// The job's state does not allow this (it already ended, or it has no image).
    Conflict = Conflict;
    /// The body is larger than the call accepts (`details.limit`, in bytes).
    PayloadTooLarge = PayloadTooLarge;
    /// No registered node could ever serve the job (`details.nodes`: each node and its
    /// `reason`), or it names a style or LoRA the farm does not offer for its model.
    Unprocessable = Unprocessable;
    /// The queue is full, or the client is over its submission rate or its cap on unfinished
    /// jobs; `Retry-After` says when to try again.
    TooManyRequests = TooManyRequests;
    /// The store failed to read or write.
    Internal = Internal;
    /// The job ran and failed on every attempt (or was cancelled): the message says why.
    JobFailed = JobFailed;
    /// The coordinator is shutting down, or the store cannot take writes now.
    Unavailable = Unavailable;
    /// The job did not finish in time; it may still finish (`details.job_id`).
    Timeout = Timeout;
}

fn error_response(code: ErrorCode, doc: &str) -> Response {
    let description: Vec<&str> = doc.lines().map(str::trim).collect();
    let mut response = ResponseBuilder::new()
        .description(description.join(" ").trim())
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(ErrorBody::name()))),
        );
    if code == ErrorCode::TooManyRequests {
        response = response.header(
            "Retry-After",
            Header::builder()
                .schema(Some(u64::schema()))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response.build()
}
