//! Who is calling: client API keys, the admin token, request ids.

use actix_web::{HttpMessage as _, HttpRequest, web};

use super::state::AppState;
use crate::error::{CoordinatorError, Result};
use crate::limits::ClientId;

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
    // The whole API's state, or a follower replica's settings alone.
    let config = match req.app_data::<web::Data<AppState>>() {
        Some(state) => state.config.clone(),
        None => match req.app_data::<web::Data<std::sync::Arc<crate::config::Config>>>() {
            Some(config) => config.get_ref().clone(),
            None => {
                return Ok(ClientId {
                    label: "anonymous".into(),
                    rate_per_min: 0,
                    max_active: 0,
                    request_id,
                });
            }
        },
    };
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

/// Checks `Authorization: Bearer <DROVER_ADMIN_TOKEN>`; without an admin token, admin calls
/// come from loopback only unless `DROVER_INSECURE` ([`crate::access`]).
pub(crate) fn require_admin(state: &AppState, req: &HttpRequest) -> Result<()> {
    let Some(expected) = &state.config.admin_token else {
        let peer = req.peer_addr().map(|a| a.ip());
        return crate::access::tokenless(crate::access::Door::Admin, state.config.insecure, peer);
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

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;
    use crate::config::Config;

    fn state(config: Config) -> AppState {
        AppState::for_tests(config)
    }

    /// Without an admin token, the drain button's call works from the machine itself and is
    /// refused (403, naming the setting) from anywhere else unless the operator opened it.
    #[test]
    fn admin_calls_without_a_token_come_from_loopback_only() {
        actix_rt::System::new().block_on(async {
            let dir = tempfile::tempdir().expect("a folder");
            let mut config = Config::for_tests(dir.path().to_path_buf());
            let from = |ip: &str| {
                TestRequest::post()
                    .peer_addr(format!("{ip}:50000").parse().expect("an address"))
                    .to_http_request()
            };
            let protected = state(config.clone());
            assert!(require_admin(&protected, &from("127.0.0.1")).is_ok());
            let refused = require_admin(&protected, &from("192.168.7.9")).expect_err("refused");
            assert!(matches!(refused, CoordinatorError::Forbidden(_)));
            assert!(
                refused.to_string().contains("DROVER_ADMIN_TOKEN"),
                "{refused}"
            );
            config.insecure = true;
            assert!(require_admin(&state(config.clone()), &from("192.168.7.9")).is_ok());
            // A token closes the door for everyone without it, loopback included.
            config.insecure = false;
            config.admin_token = Some("t0ken".into());
            let guarded = state(config);
            assert!(require_admin(&guarded, &from("127.0.0.1")).is_err());
            let with_token = TestRequest::post()
                .peer_addr("192.168.7.9:50000".parse().expect("an address"))
                .insert_header(("authorization", "Bearer t0ken"))
                .to_http_request();
            assert!(require_admin(&guarded, &with_token).is_ok());
        });
    }
}
