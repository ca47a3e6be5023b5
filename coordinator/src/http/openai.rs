//! OpenAI's Images API, so OpenAI client libraries render on the farm:
//! `POST /v1/images/generations` (`prompt`, `n` ≤ 8, `size`, `response_format` `url` |
//! `b64_json`, `user`; OpenAI's `model` names mean any model, and Drover's extras — `seed`,
//! `steps`, `guidance_scale`, `negative_prompt`, `sampler`, `loras`, a Drover `model` — pass
//! through), answered `{created, data: [{url | b64_json}]}`. Every error on this route is in
//! OpenAI's shape ([`OpenAiError`]).

use actix_web::{FromRequest, HttpRequest, HttpResponse, post, web};
use drover_shared::error::FieldError;
use drover_shared::job::{JobRequest, LoraRef, MAX_SEED, random_seed};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::accept::accept_requests;
use super::compat::base64;
use super::jobs::wait_image;
use super::state::{MAX_BODY, read_body};
use crate::error::{CoordinatorError, OpenAiError};
use crate::http::{AppState, Client};
use drover_shared::job::source::MAX_SOURCE_BYTES;

/// Most images one call may ask for.
pub const MAX_IMAGES: u64 = 8;

/// The body of `POST /v1/images/generations` (OpenAI's, plus Drover's extras). Other fields
/// (`quality`, `style`, ...) are ignored.
// Read by `generations_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct ImageGenerationRequest {
    /// What to draw: at most 2000 characters, not only white space.
    #[schema(max_length = 2000, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// Images, 1..=8.
    #[schema(minimum = 1, maximum = 8, default = 1)]
    pub n: Option<u32>,
    /// `WxH` (multiples of 8 in 64..=2048), or `auto` for the serving family's default.
    #[schema(example = "1024x1024")]
    pub size: Option<String>,
    /// `url` (the image's address on this coordinator; the default, as OpenAI's) or `b64_json`.
    #[schema(example = "b64_json")]
    pub response_format: Option<String>,
    /// The end user, for the caller's records (logged with the job's request).
    pub user: Option<String>,
    /// OpenAI model names (`dall-e-2`, `dall-e-3`, `gpt-image-1`) mean any model; else a Drover
    /// family (`sd15`, `sdxl`) or model id.
    pub model: Option<String>,
    /// Drover: seed of the first image (image i gets seed + i); random when absent.
    #[schema(minimum = 0, maximum = 2147483647)]
    pub seed: Option<i64>,
    /// Drover: denoising steps (the sampler's range).
    #[schema(minimum = 1, maximum = 150)]
    pub steps: Option<u32>,
    /// Drover: guidance scale, 0..=20.
    #[schema(minimum = 0, maximum = 20)]
    pub guidance_scale: Option<f64>,
    /// Drover: what not to draw.
    #[schema(max_length = 2000)]
    pub negative_prompt: Option<String>,
    /// Drover: the sampler (`Euler a`, `DPM++ 2M Karras`, ...).
    pub sampler: Option<String>,
    /// Drover: LoRAs by name, with strengths.
    pub loras: Option<Vec<LoraRef>>,
}

/// One image of an answer.
#[derive(Serialize, ToSchema)]
pub struct ImageData {
    /// Where the PNG is (with `response_format` `url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The PNG, base64 (with `response_format` `b64_json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
}

/// The answer of `POST /v1/images/generations`.
#[derive(Serialize, ToSchema)]
pub struct ImagesResponse {
    /// When the images were made (seconds since the Unix epoch).
    pub created: u64,
    /// The images, in order.
    pub data: Vec<ImageData>,
}

/// An error as OpenAI's API answers it.
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// The error.
    pub error: OpenAiErrorPayload,
}

/// The error inside an [`OpenAiErrorBody`].
#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorPayload {
    /// What is wrong.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending field, when one is.
    pub param: Option<String>,
    /// Drover's error code.
    pub code: String,
}

fn field(e: FieldError) -> CoordinatorError {
    CoordinatorError::InvalidField(e)
}

/// Whether `model` is one of OpenAI's own image model names.
fn is_openai_model(model: &str) -> bool {
    let m = model.trim().to_ascii_lowercase();
    m.starts_with("dall-e") || m.starts_with("gpt-image")
}

/// A generations body read: its jobs and the answer's format.
pub struct Generations {
    /// One job per image.
    pub requests: Vec<JobRequest>,
    /// `b64_json` rather than `url`.
    pub b64: bool,
}

/// The jobs a `POST /v1/images/generations` body asks for ([`ImageGenerationRequest`]).
pub fn generations_request(body: &[u8]) -> Result<Generations, CoordinatorError> {
    let map: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(field(FieldError::new("body", "expected a JSON object"))),
        Err(e) => {
            return Err(field(FieldError::new(
                "body",
                format!("malformed json: {e}"),
            )));
        }
    };
    let string = |key: &str| -> Result<Option<String>, CoordinatorError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(field(FieldError::new(key, "expected a string"))),
        }
    };
    let whole = |key: &str| -> Result<Option<i64>, CoordinatorError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => Ok(Some(v as i64)),
                _ => Err(field(FieldError::new(key, "expected a whole number"))),
            },
            Some(_) => Err(field(FieldError::new(key, "expected a whole number"))),
        }
    };
    let prompt =
        string("prompt")?.ok_or_else(|| field(FieldError::new("prompt", "is required")))?;
    let n = whole("n")?.unwrap_or(1);
    if !(1..=MAX_IMAGES as i64).contains(&n) {
        return Err(field(FieldError::new(
            "n",
            format!("{n} is outside 1..={MAX_IMAGES}"),
        )));
    }
    let size = string("size")?.filter(|s| !s.eq_ignore_ascii_case("auto"));
    let b64 = match string("response_format")?.as_deref() {
        None | Some("url") => false,
        Some("b64_json") => true,
        Some(other) => {
            return Err(field(FieldError::new(
                "response_format",
                format!("`{other}` is not url or b64_json"),
            )));
        }
    };
    string("user")?;
    let model = string("model")?.filter(|m| !is_openai_model(m));
    let steps = whole("steps")?
        .map(|s| u32::try_from(s).map_err(|_| field(FieldError::new("steps", "is negative"))))
        .transpose()?;
    let guidance_scale = match map.get("guidance_scale") {
        None | Some(Value::Null) => None,
        Some(Value::Number(g)) => g.as_f64().map(|g| g as f32),
        Some(_) => {
            return Err(field(FieldError::new(
                "guidance_scale",
                "expected a number",
            )));
        }
    };
    let loras = match map.get("loras") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<LoraRef>>(v.clone())
            .map_err(|e| field(FieldError::new("loras", e.to_string())))?,
    };
    let negative_prompt = string("negative_prompt")?;
    let sampler = string("sampler")?;
    let first_seed = whole("seed")?.unwrap_or_else(|| random_seed() as i64);
    let seeds = 1 + MAX_SEED as i64;
    let requests = (0..n)
        .map(|i| JobRequest {
            prompt: prompt.clone(),
            negative_prompt: negative_prompt.clone(),
            model: model.clone(),
            size: size.clone(),
            steps,
            guidance_scale,
            sampler: sampler.clone(),
            loras: loras.clone(),
            seed: Some(if (0..seeds).contains(&first_seed) {
                (first_seed + i) % seeds
            } else {
                first_seed + i
            }),
            ..JobRequest::default()
        })
        .collect();
    Ok(Generations { requests, b64 })
}

/// OpenAI image generation compatibility
///
/// OpenAI's `POST /v1/images/generations`: the images as URLs on this coordinator (default) or
/// base64 PNGs. Errors come in OpenAI's shape.
#[utoipa::path(
    tag = "compat",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "The images", body = ImagesResponse),
        (status = 400, description = "A field is wrong (`param` names it)", body = OpenAiErrorBody),
        (status = 401, description = "A missing or unknown API key", body = OpenAiErrorBody),
        (status = 413, description = "The body is over the limit", body = OpenAiErrorBody),
        (status = 422, description = "No registered node could serve the job", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full or the caller over its rate", body = OpenAiErrorBody),
        (status = 500, description = "A fault of the coordinator", body = OpenAiErrorBody),
        (status = 502, description = "A job failed", body = OpenAiErrorBody),
        (status = 503, description = "The coordinator cannot take work now", body = OpenAiErrorBody),
        (status = 504, description = "A job did not finish in time", body = OpenAiErrorBody),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/images/generations")]
pub(crate) async fn generations(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, OpenAiError> {
    let Client(client) = Client::extract(&req).await?;
    let call = generations_request(&read_body(payload, MAX_BODY).await?)?;
    answer(&req, &state, &client, call).await
}

/// Submits a call's jobs (all or nothing, as every batch: one submission, one wait for the
/// disk), waits for them, and answers OpenAI's images response.
async fn answer(
    req: &HttpRequest,
    state: &AppState,
    client: &crate::limits::ClientId,
    call: Generations,
) -> Result<HttpResponse, OpenAiError> {
    let jobs = accept_requests(state, client, call.requests, true).await?;
    let info = req.connection_info().clone();
    let mut data = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (done, png) = wait_image(state, job).await?;
        data.push(if call.b64 {
            ImageData {
                url: None,
                b64_json: Some(base64(&png)),
            }
        } else {
            ImageData {
                url: Some(format!(
                    "{}://{}/v1/jobs/{}/image",
                    info.scheme(),
                    info.host(),
                    done.id
                )),
                b64_json: None,
            }
        });
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(HttpResponse::Ok().json(ImagesResponse { created, data }))
}

/// The form of `POST /v1/images/edits` (OpenAI's): the image, an optional mask, and the
/// generation fields of [`ImageGenerationRequest`] as text fields.
// Read by `edits_request`.
#[derive(ToSchema)]
pub struct ImageEditRequest {
    /// The image to edit (PNG or JPEG file, at most 16 MiB and 4096×4096 pixels). Without a
    /// mask, its transparent pixels are what is repainted; an opaque image without a mask is
    /// redrawn whole (image-to-image).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// Where to edit, the image's size: as OpenAI's, its transparent pixels (alpha below half)
    /// are repainted; a mask without alpha is read as Drover's (white repaints).
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    /// What to draw.
    pub prompt: String,
    /// Images, 1..=8.
    pub n: Option<u32>,
    /// `WxH` or `auto` (the image's own size).
    pub size: Option<String>,
    /// `url` or `b64_json`.
    pub response_format: Option<String>,
    /// OpenAI model names mean any model; else a Drover family or model id.
    pub model: Option<String>,
    /// Drover: how far from the image the result may go, in (0, 1] (0.75; 1 with a mask).
    pub strength: Option<f64>,
}

/// The jobs an edits form asks for ([`ImageEditRequest`]): the text fields read as
/// [`generations_request`] reads JSON, the image (and mask, OpenAI's transparency made
/// Drover's white-repaints) set on every job.
pub fn edits_request(content_type: &str, body: &[u8]) -> Result<Generations, CoordinatorError> {
    let parts = super::multipart::parse(content_type, body).map_err(field)?;
    let mut map = Map::new();
    let (mut image, mut mask) = (None, None);
    for part in parts {
        match part.name.as_str() {
            "image" | "image[]" => {
                image.get_or_insert(part.data);
            }
            "mask" => mask = Some(part.data),
            name => {
                let text = String::from_utf8(part.data)
                    .map_err(|_| field(FieldError::new(name, "is not UTF-8 text")))?;
                let value = match name {
                    "n" | "seed" | "steps" | "guidance_scale" | "strength" => {
                        match text.trim().parse::<f64>() {
                            Ok(v) => serde_json::Number::from_f64(v)
                                .map(Value::Number)
                                .ok_or_else(|| field(FieldError::new(name, "is not a number")))?,
                            Err(_) => return Err(field(FieldError::new(name, "is not a number"))),
                        }
                    }
                    _ => Value::String(text),
                };
                map.insert(name.to_string(), value);
            }
        }
    }
    let image = image.ok_or_else(|| field(FieldError::new("image", "is required")))?;
    let strength = map.remove("strength").and_then(|v| v.as_f64());
    let mut call =
        generations_request(&serde_json::to_vec(&Value::Object(map)).unwrap_or_default())?;
    let alpha = |bytes: &[u8], name: &str| {
        drover_shared::image::mask_from_alpha(bytes)
            .map_err(|e| field(FieldError::new(name, e.to_string())))
    };
    let mask = match mask {
        Some(m) => Some(alpha(&m, "mask")?.unwrap_or(m)),
        None => alpha(&image, "image")?,
    };
    let (image, mask) = (base64(&image), mask.map(|m| base64(&m)));
    for request in &mut call.requests {
        request.init_image = Some(image.clone());
        request.mask = mask.clone();
        request.strength = strength;
    }
    Ok(call)
}

/// OpenAI image edits compatibility
///
/// OpenAI's `POST /v1/images/edits` (multipart form): the image repainted where the mask (or
/// the image itself) is transparent, as URLs on this coordinator or base64 PNGs. Errors come
/// in OpenAI's shape.
#[utoipa::path(
    tag = "compat",
    request_body(content = ImageEditRequest, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The images", body = ImagesResponse),
        (status = 400, description = "A field is wrong (`param` names it)", body = OpenAiErrorBody),
        (status = 401, description = "A missing or unknown API key", body = OpenAiErrorBody),
        (status = 413, description = "The body is over the limit", body = OpenAiErrorBody),
        (status = 422, description = "No registered node could serve the job", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full or the caller over its rate", body = OpenAiErrorBody),
        (status = 500, description = "A fault of the coordinator", body = OpenAiErrorBody),
        (status = 502, description = "A job failed", body = OpenAiErrorBody),
        (status = 503, description = "The coordinator cannot take work now", body = OpenAiErrorBody),
        (status = 504, description = "A job did not finish in time", body = OpenAiErrorBody),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/v1/images/edits")]
pub(crate) async fn edits(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, OpenAiError> {
    let Client(client) = Client::extract(&req).await?;
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = read_body(payload, 2 * MAX_SOURCE_BYTES + MAX_BODY).await?;
    // Parsing and re-encoding megabytes of images: off the server's threads.
    let call = web::block(move || edits_request(&content_type, &body))
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("reading the form: {e}")))??;
    answer(&req, &state, &client, call).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> (String, String) {
        let e = generations_request(body.as_bytes())
            .err()
            .expect("an error");
        let body = e.openai_body();
        (
            body["error"]["param"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["error"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    #[test]
    fn openai_bodies_become_jobs_and_errors_name_the_param() {
        let call = generations_request(
            br#"{"prompt":"a fox","n":3,"size":"auto","model":"dall-e-3","seed":7,
                 "response_format":"b64_json","quality":"hd","steps":4,"user":"u1"}"#,
        )
        .expect("a call");
        assert!(call.b64);
        let seeds: Vec<_> = call.requests.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
        assert!(
            call.requests
                .iter()
                .all(|r| r.model.is_none() && r.size.is_none())
        );
        let call = generations_request(br#"{"prompt":"a fox","model":"sdxl"}"#).expect("a call");
        assert!(!call.b64, "url by default");
        assert_eq!(call.requests[0].model.as_deref(), Some("sdxl"));
        for (body, param) in [
            (r#"{"n":1}"#, "prompt"),
            (r#"{"prompt":"x","n":9}"#, "n"),
            (r#"{"prompt":"x","n":0}"#, "n"),
            (
                r#"{"prompt":"x","response_format":"jpeg"}"#,
                "response_format",
            ),
            (r#"{"prompt":"x","user":5}"#, "user"),
            (r#"{"prompt":"x","loras":[{"nom":"ink"}]}"#, "loras"),
            ("[1]", "body"),
        ] {
            assert_eq!(
                param_of(body),
                (param.to_string(), "invalid_request_error".to_string()),
                "{body}"
            );
        }
    }

    #[test]
    fn the_openai_shape_keeps_the_status_and_retry_after() {
        use actix_web::ResponseError as _;
        let e = OpenAiError(CoordinatorError::RateLimited {
            retry_after_s: 3,
            message: "rate".into(),
        });
        let response = e.error_response();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("3")
        );
        assert_eq!(e.0.openai_body()["error"]["type"], "rate_limit_error");
    }
}
