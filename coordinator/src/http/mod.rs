//! The REST API (actix-web): the only code that knows actix-web. Handlers parse and validate,
//! then ask the [`ControlPlane`](crate::control::ControlPlane).
//!
//! [`routes`] is the route table, and it feeds both the router and the OpenAPI document: each
//! handler carries its actix-web route macro (method and path) under its `#[utoipa::path]`
//! (parameters, body, every answer), and each `service(...)` there routes the handler and adds
//! its operation to the document ([`openapi::document`]). [`configure`] mounts the table on an
//! app, so tests mount the same app with `actix_web::test::init_service`.
//!
//! Submodules: [`state`] (what handlers reach), [`auth`] (client and admin checks, request ids),
//! [`accept`] (the one submission funnel), [`jobs`] (submission, waiting, job reads, cancel,
//! events), [`nodes`] (registry reads, drain/resume, models, styles, health, metrics),
//! [`compat`] (the Python LCM server's and AUTOMATIC1111's endpoints, read through
//! [`lenient`]), [`a1111`] (A1111's discovery calls: models, options, progress, samplers),
//! [`openai`] (OpenAI's image generations, with its error shape), [`presets`] (the preset
//! catalog and its reload), [`uploads`] (images sent once,
//! named by id in later jobs), [`upscale`] (stand-alone
//! upscale jobs: native, A1111's extras, the LCM server's `superres`), [`dashboard`], [`docs`]
//! and [`openapi`].

pub mod a1111;
mod accept;
pub mod auth;
pub mod cluster;
pub mod compat;
pub mod dashboard;
pub mod docs;
mod idempotent;
mod jobs;
pub mod lenient;
pub mod multipart;
pub mod nodes;
pub mod openai;
pub mod openapi;
pub mod presets;
pub mod responses;
pub mod state;
pub mod uploads;
pub mod upscale;

use actix_web::{HttpRequest, HttpResponse, get, web};
use utoipa_actix_web::service_config::ServiceConfig;

pub use auth::{Client, RequestId, request_span};
pub use state::{AppState, MAX_BATCH_JOBS};

use crate::error::{CoordinatorError, Result};

/// The route table: every operation of the REST API.
pub fn routes(cfg: &mut ServiceConfig<'_>) {
    cfg.service(jobs::submit)
        .service(jobs::submit_batch)
        .service(jobs::generate)
        .service(jobs::list_jobs)
        .service(jobs::get_job)
        .service(jobs::cancel_job)
        .service(jobs::get_image)
        .service(jobs::job_events)
        .service(nodes::list_nodes)
        .service(nodes::list_models)
        .service(nodes::list_upscalers)
        .service(openai::edits)
        .service(uploads::upload)
        .service(uploads::forget)
        .service(upscale::upscale)
        .service(upscale::extra_single_image)
        .service(upscale::superres)
        .service(nodes::list_styles)
        .service(presets::list_presets)
        .service(presets::reload_presets)
        .service(nodes::drain_node)
        .service(nodes::resume_node)
        .service(nodes::order_model)
        .service(nodes::healthz)
        .service(cluster::cluster)
        .service(cluster::add_replica)
        .service(cluster::remove_replica)
        .service(nodes::metrics)
        .service(compat::lcm_generate)
        .service(compat::txt2img)
        .service(compat::img2img)
        .service(a1111::samplers)
        .service(a1111::schedulers)
        .service(a1111::sd_models)
        .service(a1111::get_options)
        .service(a1111::set_options)
        .service(a1111::loras)
        .service(a1111::upscalers)
        .service(a1111::progress)
        .service(a1111::cmd_flags)
        .service(openai::generations)
        .service(dashboard::index)
        .service(dashboard::live_part)
        .service(docs::api_page)
        .service(openapi_document);
}

/// Mounts every route of the REST API ([`routes`]) on an app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    routes(&mut ServiceConfig::new(cfg));
}

/// Answers unknown routes with a JSON 404.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(CoordinatorError::NotFound(format!(
        "route {} {}",
        req.method(),
        req.path()
    )))
}

/// The OpenAPI document of this API
///
/// OpenAPI 3.1, derived from the route table and the request and response types.
#[utoipa::path(
    tag = "pages",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
#[get("/openapi.json")]
async fn openapi_document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi::json())
}
