//! `POST /v1/uploads`: an image sent once (raw PNG or JPEG bytes), named in later jobs as
//! `upload:<id>` instead of base64 (`init_image`, `mask`, `POST /v1/upscale`'s `image`);
//! `DELETE /v1/uploads/{id}` forgets one. Kept in memory ([`crate::uploads`]).

use std::time::Instant;

use actix_web::{HttpResponse, delete, post, web};
use drover_shared::error::FieldError;
use drover_shared::job::source::MAX_SOURCE_BYTES;
use serde::Serialize;
use utoipa::ToSchema;

use super::jobs::Png;
use super::responses::{BadRequest, NotFound, PayloadTooLarge, Unauthorized, Unavailable};
use super::state::read_body;
use crate::error::{CoordinatorError, Result};
use crate::http::{AppState, Client};

/// An upload, as `POST /v1/uploads` answers it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadView {
    /// The id; name it in an image field as `upload:<id>`.
    pub id: String,
    /// `upload:<id>`, ready for an image field.
    pub reference: String,
    /// `png` or `jpeg`.
    pub format: String,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes kept.
    pub bytes: usize,
    /// Seconds it is kept (a restart forgets it sooner).
    pub expires_in_s: u64,
}

/// Upload an image for later jobs
///
/// The body is the image itself (PNG or JPEG, at most 16 MiB and 4096×4096 pixels), or a
/// multipart form whose `file` part is. Jobs of the
/// same client name it as `upload:<id>` in `init_image`, `mask` or `POST /v1/upscale`'s `image`,
/// instead of sending its base64 each time. Uploads are kept in memory for a while
/// (`expires_in_s`), not across restarts; a job that named one keeps its own copy.
#[utoipa::path(
    tag = "jobs",
    request_body(content = Png, content_type = "image/png",
        description = "The image (PNG or JPEG bytes)"),
    responses(
        (status = 201, description = "Kept", body = UploadView,
            headers(("Location" = String, description = "The upload's URL"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/uploads")]
pub(crate) async fn upload(
    Client(client): Client,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse> {
    // A form's framing on top of the image's limit.
    let body = read_body(payload, MAX_SOURCE_BYTES + 64 * 1024).await?;
    let bytes: std::sync::Arc<[u8]> = upload_bytes(&req, &body)?.into();
    let checked = bytes.clone();
    // Decoding a large image takes a while: off the server's threads.
    let decoded = web::block(move || drover_shared::image::decode(&checked))
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("checking the upload: {e}")))?
        .map_err(|e| FieldError::new("body", e.to_string()))?;
    let format = drover_shared::image::sniff(&bytes)
        .unwrap_or("png")
        .to_string();
    let size = bytes.len();
    let id = state
        .uploads
        .put(&client.label, bytes, Instant::now())
        .ok_or(CoordinatorError::TooLarge {
            limit: state.config.upload_memory_mb << 20,
        })?;
    tracing::info!(upload = %id, client = %client.label, bytes = size, "image uploaded");
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/v1/uploads/{id}")))
        .json(UploadView {
            reference: format!("{}{id}", drover_shared::job::source::UPLOAD_PREFIX),
            id,
            format,
            width: decoded.width,
            height: decoded.height,
            bytes: size,
            expires_in_s: state.uploads.ttl().as_secs(),
        }))
}

/// The image an upload's body holds: the body itself, or a multipart form's file part (the one
/// named `file` or `image`, else the first with a file name), within the 16 MiB limit.
fn upload_bytes(req: &actix_web::HttpRequest, body: &[u8]) -> Result<Vec<u8>> {
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let data = if content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        let mut parts = super::multipart::parse(content_type, body)?;
        let at = parts
            .iter()
            .position(|p| p.name == "file" || p.name == "image")
            .or_else(|| parts.iter().position(|p| p.filename.is_some()))
            .ok_or_else(|| FieldError::new("file", "the form has no file part (name it `file`)"))?;
        parts.swap_remove(at).data
    } else {
        body.to_vec()
    };
    if data.len() > MAX_SOURCE_BYTES {
        return Err(CoordinatorError::TooLarge {
            limit: MAX_SOURCE_BYTES,
        });
    }
    Ok(data)
}

/// Forget an upload
///
/// Only the client that uploaded it may; jobs that named it keep their copy.
#[utoipa::path(
    tag = "jobs",
    params(("id" = String, Path, description = "The upload")),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[delete("/v1/uploads/{id}")]
pub(crate) async fn forget(
    Client(client): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    if state.uploads.remove(&client.label, &id) {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(CoordinatorError::NotFound(format!("upload {id}")))
    }
}
