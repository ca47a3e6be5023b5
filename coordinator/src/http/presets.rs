//! The preset catalog: `GET /v1/presets` lists it, `POST /v1/presets/reload` (admin) reads its
//! file again; a catalog that does not load is refused (`422`, the reason) and the previous one
//! stays in force.

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use drover_shared::presets::Preset;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::require_admin;
use super::responses::{Forbidden, Unauthorized, Unprocessable};
use super::state::AppState;
use crate::error::{CoordinatorError, Result};

/// The preset catalog
///
/// Named job defaults (model, LoRAs, size, steps, guidance, sampler, negative prompt) a job
/// picks with `preset`; its own fields override them.
#[utoipa::path(
    tag = "farm",
    responses((status = 200, description = "Every preset, by id", body = Vec<Preset>))
)]
#[get("/v1/presets")]
pub(crate) async fn list_presets(state: web::Data<AppState>) -> HttpResponse {
    let catalog = state.presets.catalog();
    let presets: Vec<&Preset> = catalog.presets().collect();
    HttpResponse::Ok().json(presets)
}

/// The answer to a preset reload.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresetsReloaded {
    /// Presets now in force.
    pub presets: usize,
}

/// Read the preset catalog again (admin)
///
/// The new catalog goes into force, or is refused with the reason (`422`) and the previous one
/// stays. The file is also read again by itself when it changes.
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "The catalog in force now", body = PresetsReloaded),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
    ),
    security(("adminToken" = []))
)]
#[post("/v1/presets/reload")]
pub(crate) async fn reload_presets(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let presets = state.presets.clone();
    let count = web::block(move || presets.reload())
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("reloading presets: {e}")))?
        .map_err(|e| {
            tracing::warn!(error = %e, "preset catalog refused; the previous one stays");
            CoordinatorError::Unprocessable(format!("{e}; the previous catalog stays in force"))
        })?;
    tracing::info!(presets = count, "preset catalog reloaded");
    Ok(HttpResponse::Ok().json(PresetsReloaded { presets: count }))
}
