//! Stand-alone upscaling: an image in, the image upscaled by a node's upscaler out, no model
//! run. Three doors to one job kind ([`JobTask::Upscale`]), each submitted and awaited like
//! `POST /v1/generate`:
//! - `POST /v1/upscale`: the native, strict body ([`UpscaleJobRequest`]), answered with the PNG;
//! - `POST /sdapi/v1/extra-single-image`: AUTOMATIC1111's extras (`image`, `upscaler_1`,
//!   `resize_mode` 0 with `upscaling_resize` or 1 with `upscaling_resize_w`/`_h`), answered
//!   `{"html_info", "image"}`; face restoration and a second upscaler are refused by name;
//! - `POST /superres`: the Python LCM server's (`image`, `superres` passes), answered with PNG
//!   bytes.

use std::sync::Arc;

use actix_web::{HttpResponse, post, web};
use base64::Engine;
use drover_shared::error::FieldError;
use drover_shared::job::source::Uploads;
use drover_shared::job::upscale::upscale_job;
use drover_shared::job::{JobSpec, JobTask, SourceSpec, UpscaleJobRequest, UpscaleRequest};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::accept::{accept_specs, count_rejection};
use super::jobs::{Png, png_answer, wait_image};
use super::lenient::{number, object, string};
use super::responses::{
    BadRequest, Internal, JobFailed, PayloadTooLarge, Timeout, TooManyRequests, Unauthorized,
    Unavailable, Unprocessable,
};
use super::state::{MAX_IMAGE_BODY, read_body};
use crate::error::{CoordinatorError, Result};
use crate::http::{AppState, Client};
use crate::limits::ClientId;
use crate::records::JobRecord;

/// Submits one upscale job and waits for its image.
async fn run(state: &AppState, client: &ClientId, spec: JobSpec) -> Result<(JobRecord, Arc<[u8]>)> {
    let submitted = match accept_specs(state, client, vec![spec], true, None).await {
        Ok(mut s) => s
            .pop()
            .ok_or_else(|| CoordinatorError::Unavailable("a submission answered nothing".into()))?,
        Err(e) => {
            count_rejection(state, &e);
            return Err(e);
        }
    };
    tracing::info!(job_id = %submitted.job.id, client = %client.label, "upscale submitted");
    wait_image(state, submitted).await
}

/// Decodes (off the server's threads: a large image takes a while) and checks a request.
async fn validated<F>(check: F) -> Result<JobSpec>
where
    F: FnOnce() -> Result<JobSpec> + Send + 'static,
{
    web::block(check)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("validating: {e}")))?
}

/// Upscale an image
///
/// Runs super-resolution on the image with an upscaler of the farm (`GET /v1/upscalers`) and
/// answers with the PNG (its text chunks name the upscaler, passes, scale and source size). No
/// model runs; the job goes to a node holding the upscaler (`422` with each node's reason when
/// none does, or when the result would pass 4096×4096 pixels).
#[utoipa::path(
    tag = "jobs",
    request_body = UpscaleJobRequest,
    responses(
        (status = 200, description = "The upscaled image", content_type = "image/png", body = Png,
            headers(
                ("X-Job-Id" = String, description = "The job"),
                ("X-Node-Id" = String, description = "The node that upscaled it"),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
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
#[post("/v1/upscale")]
pub(crate) async fn upscale(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_IMAGE_BODY).await?;
    let request: UpscaleJobRequest = drover_shared::job::from_json(&body)?;
    let uploads = state.uploads.of(&client.label);
    let spec = validated(move || Ok(request.validate_with(&uploads)?)).await?;
    let (done, png) = run(&state, &client, spec).await?;
    Ok(png_answer(&done, png, false))
}

/// The body of `POST /sdapi/v1/extra-single-image` (the AUTOMATIC1111 subset). Other fields are
/// ignored; a field read is checked, and `null` is absent.
// Read by `extras_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct ExtrasRequest {
    /// The image, base64 PNG or JPEG (a `data:` URL prefix is accepted).
    #[schema(format = Byte)]
    pub image: String,
    /// The upscaler (`GET /sdapi/v1/upscalers`); absent: the serving node's first. `None`
    /// (no upscaling) is refused.
    pub upscaler_1: Option<String>,
    /// 0: scale by `upscaling_resize` (2 when absent); 1: to `upscaling_resize_w` ×
    /// `upscaling_resize_h` (the image's aspect).
    #[schema(minimum = 0, maximum = 1)]
    pub resize_mode: Option<i64>,
    /// The scale, 1..=16, with `resize_mode` 0.
    #[schema(minimum = 1, maximum = 16)]
    pub upscaling_resize: Option<f64>,
    /// The width to reach, with `resize_mode` 1.
    pub upscaling_resize_w: Option<u32>,
    /// The height to reach, with `resize_mode` 1.
    pub upscaling_resize_h: Option<u32>,
    /// Face restoration: only 0 (Drover has none).
    #[schema(maximum = 0)]
    pub gfpgan_visibility: Option<f64>,
    /// Face restoration: only 0 (Drover has none).
    #[schema(maximum = 0)]
    pub codeformer_visibility: Option<f64>,
    /// A second upscaler's weight: only 0.
    #[schema(maximum = 0)]
    pub extras_upscaler_2_visibility: Option<f64>,
}

/// The answer of `POST /sdapi/v1/extra-single-image`.
#[derive(Serialize, ToSchema)]
pub struct ExtrasResponse {
    /// A line saying what was done.
    pub html_info: String,
    /// The upscaled image, base64 PNG.
    pub image: String,
}

/// A client mistake in field `field`.
fn bad(field: &str, message: impl Into<String>) -> CoordinatorError {
    FieldError::new(field, message).into()
}

/// The upscale job an extras body asks for ([`ExtrasRequest`]), decoding the image.
pub fn extras_request(body: &[u8], uploads: &dyn Uploads) -> Result<JobSpec> {
    let map = object(body)?;
    for key in [
        "gfpgan_visibility",
        "codeformer_visibility",
        "extras_upscaler_2_visibility",
    ] {
        if let Some(v) = number(&map, key)?
            && v != 0.0
        {
            return Err(bad(
                key,
                "face restoration and a second upscaler are not supported; send 0",
            ));
        }
    }
    let model = match string(&map, "upscaler_1")?.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(n) if n.eq_ignore_ascii_case("none") => {
            return Err(bad(
                "upscaler_1",
                "`None` does no upscaling; name an upscaler (GET /sdapi/v1/upscalers)",
            ));
        }
        Some(n) => Some(n.to_string()),
    };
    let mode = number(&map, "resize_mode")?;
    let resize = number(&map, "upscaling_resize")?;
    let to_w = number(&map, "upscaling_resize_w")?;
    let to_h = number(&map, "upscaling_resize_h")?;
    let image = string(&map, "image")?.ok_or_else(|| bad("image", "is required"))?;
    let source = SourceSpec::image_only("image", &image, uploads)?;
    let scale = match mode {
        None | Some(0.0) => resize.unwrap_or(2.0),
        Some(1.0) => {
            let (w, h) = (f64::from(source.width), f64::from(source.height));
            let want_w =
                to_w.ok_or_else(|| bad("upscaling_resize_w", "is required with resize_mode 1"))?;
            let scale = want_w / w;
            if let Some(want_h) = to_h
                && (want_h - h * scale).abs() > 1.0
            {
                return Err(bad(
                    "upscaling_resize_h",
                    format!(
                        "{want_h} does not keep the image's aspect ({}×{} to width {want_w} gives height {})",
                        source.width,
                        source.height,
                        (h * scale).round()
                    ),
                ));
            }
            scale
        }
        Some(other) => {
            return Err(bad(
                "resize_mode",
                format!("{other}: 0 (scale by) or 1 (scale to)"),
            ));
        }
    };
    let wanted = UpscaleRequest {
        model,
        passes: None,
        scale: Some(scale),
    }
    .validate()
    .map_err(|e| {
        let field = match e.field.as_str() {
            "upscale.model" => "upscaler_1",
            "upscale.scale" if mode == Some(1.0) => "upscaling_resize_w",
            _ => "upscaling_resize",
        };
        bad(field, e.message)
    })?;
    Ok(upscale_job(source, wanted, 0))
}

/// AUTOMATIC1111 extras: upscale one image
///
/// AUTOMATIC1111's `extra-single-image` subset: `image`, `upscaler_1`, `resize_mode` 0 (by
/// `upscaling_resize`, 2 when absent) or 1 (to `upscaling_resize_w` × `_h`). Face restoration
/// and a second upscaler are refused unless 0.
#[utoipa::path(
    tag = "compat",
    request_body = ExtrasRequest,
    responses(
        (status = 200, description = "The upscaled image", body = ExtrasResponse),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
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
#[post("/sdapi/v1/extra-single-image")]
pub(crate) async fn extra_single_image(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_IMAGE_BODY).await?;
    let uploads = state.uploads.of(&client.label);
    let spec = validated(move || extras_request(&body, &uploads)).await?;
    let (done, png) = run(&state, &client, spec).await?;
    let asked = done.spec.upscale.as_ref();
    let html_info = format!(
        "<p>upscaled ×{} with {} (job {})</p>",
        asked.and_then(|u| u.scale).unwrap_or(0.0),
        asked
            .and_then(|u| u.model.as_deref())
            .unwrap_or("the node's first upscaler"),
        done.id
    );
    Ok(HttpResponse::Ok().json(ExtrasResponse {
        html_info,
        image: base64::engine::general_purpose::STANDARD.encode(&png),
    }))
}

/// The body of `POST /superres` (the Python LCM server's). Other fields are ignored.
// Read by `superres_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct SuperresRequest {
    /// The image, base64 PNG or JPEG.
    #[schema(format = Byte)]
    pub image: String,
    /// Passes of the upscaler, 1..=3 (1 when absent).
    #[schema(minimum = 1, maximum = 3)]
    pub superres: Option<u32>,
    /// The upscaler; absent: the serving node's first.
    pub model: Option<String>,
}

/// The upscale job a `POST /superres` body asks for ([`SuperresRequest`]).
pub fn superres_request(body: &[u8], uploads: &dyn Uploads) -> Result<JobSpec> {
    let map = object(body)?;
    let passes = match map.get("superres") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p) => Some(u32::try_from(p).unwrap_or(u32::MAX)),
            None => return Err(bad("superres", "expected 1, 2 or 3 passes")),
        },
        Some(_) => return Err(bad("superres", "expected 1, 2 or 3 passes")),
    };
    let model = string(&map, "model")?;
    let image = string(&map, "image")?.ok_or_else(|| bad("image", "is required"))?;
    let wanted = UpscaleRequest {
        model,
        passes: passes.or(Some(1)),
        scale: None,
    }
    .validate()
    .map_err(|e| {
        let field = if e.field == "upscale.passes" {
            "superres"
        } else {
            "model"
        };
        bad(field, e.message)
    })?;
    let source = SourceSpec::image_only("image", &image, uploads)?;
    Ok(upscale_job(source, wanted, 0))
}

/// Python LCM server compatibility: upscale one image
///
/// The Python LCM server's `POST /superres`: `image` (base64) and `superres` passes (1..=3);
/// answers with the upscaled PNG's bytes.
#[utoipa::path(
    tag = "compat",
    request_body = SuperresRequest,
    responses(
        (status = 200, description = "The upscaled image", content_type = "image/png", body = Png,
            headers(("X-Job-Id" = String, description = "The job"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
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
#[post("/superres")]
pub(crate) async fn superres(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_IMAGE_BODY).await?;
    let uploads = state.uploads.of(&client.label);
    let spec = validated(move || superres_request(&body, &uploads)).await?;
    debug_assert_eq!(spec.task, JobTask::Upscale);
    let (done, png) = run(&state, &client, spec).await?;
    Ok(png_answer(&done, png, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::job::source::NoUploads;

    /// The field a refusal names.
    fn field_of(e: CoordinatorError) -> String {
        match e {
            CoordinatorError::InvalidField(f) => f.field,
            other => panic!("not a field error: {other}"),
        }
    }

    fn png(w: u32, h: u32) -> String {
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, w, h);
            e.set_color(png::ColorType::Rgb);
            let mut writer = e.write_header().expect("header");
            writer
                .write_image_data(&vec![7u8; (w * h * 3) as usize])
                .expect("data");
        }
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Every field the document lists for the extras and superres bodies is read and checked:
    /// a value of the wrong type is refused, naming it.
    #[test]
    fn every_documented_field_is_read() {
        let doc: Value = serde_json::from_str(crate::http::openapi::json()).expect("json");
        let image = png(8, 6);
        for schema in ["ExtrasRequest", "SuperresRequest"] {
            let parse = |body: &[u8]| match schema {
                "ExtrasRequest" => extras_request(body, &NoUploads),
                _ => superres_request(body, &NoUploads),
            };
            let properties = doc["components"]["schemas"][schema]["properties"]
                .as_object()
                .expect("properties")
                .clone();
            for field in properties.keys() {
                let mut body = serde_json::json!({"image": image});
                body[field] = serde_json::json!({"wrong": "type"});
                let err = parse(&serde_json::to_vec(&body).expect("json")).unwrap_err();
                assert_eq!(&field_of(err), field, "{schema}");
            }
            let ok = parse(format!(r#"{{"image": "{image}", "unused": 1}}"#).as_bytes());
            assert!(ok.is_ok(), "{schema}: {ok:?}");
        }
    }

    #[test]
    fn extras_bodies_become_upscale_jobs() {
        let image = png(40, 30);
        let job = extras_request(
            format!(r#"{{"image": "{image}", "upscaler_1": "x4", "upscaling_resize": 3}}"#)
                .as_bytes(),
            &NoUploads,
        )
        .unwrap();
        assert_eq!(job.task, JobTask::Upscale);
        let up = job.upscale.clone().unwrap();
        assert_eq!((up.model.as_deref(), up.scale), (Some("x4"), Some(3.0)));
        assert_eq!(job.size.map(|s| (s.width, s.height)), Some((40, 30)));
        let to = extras_request(
            format!(
                r#"{{"image": "{image}", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 75}}"#
            )
            .as_bytes(),
            &NoUploads,
        )
        .unwrap();
        assert_eq!(to.upscale.unwrap().scale, Some(2.5));
        for (body, field) in [
            (
                format!(r#"{{"image": "{image}", "upscaler_1": "None"}}"#),
                "upscaler_1",
            ),
            (
                format!(r#"{{"image": "{image}", "gfpgan_visibility": 0.5}}"#),
                "gfpgan_visibility",
            ),
            (
                format!(
                    r#"{{"image": "{image}", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 90}}"#
                ),
                "upscaling_resize_h",
            ),
            (
                format!(r#"{{"image": "{image}", "upscaling_resize": 40}}"#),
                "upscaling_resize",
            ),
            (r#"{"upscaler_1": "x4"}"#.to_string(), "image"),
            (r#"{"image": "not base64 !"}"#.to_string(), "image"),
        ] {
            let err = extras_request(body.as_bytes(), &NoUploads).unwrap_err();
            assert_eq!(field_of(err), field, "{body}");
        }
        let err = superres_request(
            format!(r#"{{"image": "{image}", "superres": 4}}"#).as_bytes(),
            &NoUploads,
        )
        .unwrap_err();
        assert_eq!(field_of(err), "superres");
    }
}
