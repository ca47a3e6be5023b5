//! Compatibility endpoints, so existing clients work unchanged:
//! - `POST /generate`: the Python LCM server's body (`prompt`, `negative_prompt`, `model`, `size`
//!   "WxH", `num_inference_steps`, `guidance_scale`, `seed`, `style_lora {style, level}`,
//!   `superres` passes), answered as it did: PNG bytes with `X-Seed`. (Its `POST /superres` is
//!   in [`super::upscale`].)
//! - `POST /sdapi/v1/txt2img`: the AUTOMATIC1111 subset (`prompt`, `negative_prompt`, `steps`,
//!   `cfg_scale`, `sampler_name`, `scheduler`, `width`, `height`, `seed`, `batch_size`,
//!   `n_iter`), answered with base64 PNGs, the parameters and an `info` JSON string (the
//!   samplers and schedules it accepts are listed by [`super::a1111`]).
//! - `POST /sdapi/v1/img2img`: txt2img's subset plus `init_images`, `denoising_strength`, `mask`,
//!   `resize_mode`, `inpainting_mask_invert` (and `inpainting_fill`, `mask_blur` checked),
//!   answered as txt2img (the echoed parameters without the images).
//!
//! Unlike the strict native API, these accept whole bodies real clients send: fields they do not
//! use are ignored, and seed −1 means random. Fields they do use are validated like native ones,
//! and errors name them.

use actix_web::{HttpResponse, post, web};
use drover_shared::error::FieldError;
use drover_shared::image::ResizeMode;
use drover_shared::job::{JobRequest, MAX_SEED, StyleRef, random_seed};
use drover_shared::sampler::{SamplerName, SigmaSchedule};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, SchemaType};

use super::lenient::{number, object, seed, steps, string, whole};
use super::responses::{
    BadRequest, Internal, JobFailed, NotFound, PayloadTooLarge, Timeout, TooManyRequests,
    Unauthorized, Unavailable, Unprocessable,
};
use super::state::{MAX_BODY, MAX_IMAGE_BODY, read_body};
use crate::error::Result;
use crate::http::accept::{accept_request, accept_requests};
use crate::http::jobs::{Png, wait_image};
use crate::http::{AppState, Client};
use crate::limits::ClientId;

/// Most images one txt2img call may ask for (`batch_size × n_iter`).
pub const MAX_BATCH: u64 = 8;

/// The body of `POST /generate`. Other fields are ignored; a field read is checked like its
/// native counterpart, and `null` is absent.
// Read by `lcm_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct LcmRequest {
    /// What to draw: at most 2000 characters, not only white space.
    #[schema(max_length = 2000, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// What not to draw: at most 2000 characters.
    #[schema(max_length = 2000)]
    pub negative_prompt: Option<String>,
    /// A model family (`sd15`, `sd2`, `sdxl`) or a model id, as in `POST /v1/jobs`.
    #[schema(pattern = "^(sd15|sd2|sdxl|[0-9A-Fa-f]{1,128})?$")]
    pub model: Option<String>,
    /// Image size as `WxH`, as in `POST /v1/jobs`.
    #[schema(schema_with = drover_shared::job::openapi::size)]
    pub size: Option<String>,
    /// Denoising steps, 1..=150 (the sampler's own range: LCM 1..=8).
    #[schema(minimum = 1, maximum = 150)]
    pub num_inference_steps: Option<u32>,
    /// Guidance scale, 0..=20.
    #[schema(minimum = 0, maximum = 20)]
    pub guidance_scale: Option<f64>,
    /// Seed, 0..=2^31-1; -1 (or absent) for a random one.
    #[schema(minimum = -1, maximum = 2147483647)]
    pub seed: Option<i64>,
    /// A style from the style catalog, at a strength level.
    pub style_lora: Option<StyleRef>,
    /// Super-resolution passes after generation, 0..=3 (`true` is 1): the job's `upscale`
    /// with the serving node's first upscaler.
    #[schema(value_type = Option<u32>, minimum = 0, maximum = 3)]
    pub superres: Option<Value>,
}

/// The body of `POST /sdapi/v1/txt2img` (the AUTOMATIC1111 subset). Other fields are ignored
/// (and echoed in `parameters`); a field read is checked like its native counterpart, and
/// `null` is absent.
// Read by `txt2img_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct Txt2ImgRequest {
    /// What to draw: at most 2000 characters, not only white space.
    #[schema(max_length = 2000, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// What not to draw: at most 2000 characters; empty for nothing.
    #[schema(max_length = 2000)]
    pub negative_prompt: Option<String>,
    /// Denoising steps, 1..=150 (the sampler's own range: LCM 1..=8).
    #[schema(minimum = 1, maximum = 150)]
    pub steps: Option<u32>,
    /// Guidance scale, 0..=20.
    #[schema(minimum = 0, maximum = 20)]
    pub cfg_scale: Option<f64>,
    /// Sampler, as `GET /sdapi/v1/samplers` lists it (any case; a ` Karras` suffix asks for
    /// Karras sigmas); the serving model's default when absent.
    #[schema(example = "Euler a")]
    pub sampler_name: Option<String>,
    /// Sigma schedule, as `GET /sdapi/v1/schedulers` lists it: `Automatic`, `Normal`, `Karras`.
    #[schema(example = "Karras")]
    pub scheduler: Option<String>,
    /// Image width: a multiple of 8 in 64..=2048; 512 when absent.
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8, default = 512)]
    pub width: Option<u32>,
    /// Image height: a multiple of 8 in 64..=2048; 512 when absent.
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8, default = 512)]
    pub height: Option<u32>,
    /// Seed of the first image, 0..=2^31-1 (image i gets seed + i, from 0 again past
    /// 2^31-1); -1 (or absent) for a random one.
    #[schema(minimum = -1, maximum = 2147483647)]
    pub seed: Option<i64>,
    /// Images per iteration; `batch_size × n_iter` is at most 8.
    #[schema(minimum = 1, maximum = 8, default = 1)]
    pub batch_size: Option<u32>,
    /// Iterations; `batch_size × n_iter` is at most 8.
    #[schema(minimum = 1, maximum = 8, default = 1)]
    pub n_iter: Option<u32>,
}

/// The body of `POST /sdapi/v1/img2img` (the AUTOMATIC1111 subset): txt2img's fields and the
/// source image's. Other fields are ignored (and echoed in `parameters`, without the images).
// Read by `img2img_request`; a test holds the two together.
#[derive(ToSchema)]
pub struct Img2ImgRequest {
    /// What to draw: at most 2000 characters, not only white space.
    #[schema(max_length = 2000, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// What not to draw: at most 2000 characters; empty for nothing.
    #[schema(max_length = 2000)]
    pub negative_prompt: Option<String>,
    /// The source images, base64 PNG or JPEG (a data-URL prefix is accepted), each at most
    /// 16 MiB and 4096×4096 pixels; image i of the batch starts from `init_images[i mod len]`.
    #[schema(min_items = 1)]
    pub init_images: Vec<String>,
    /// How far from the source the result may go, in (0, 1]; 0.75 when absent (1.0 with a
    /// mask).
    #[schema(exclusive_minimum = 0, maximum = 1, default = 0.75)]
    pub denoising_strength: Option<f64>,
    /// Inpainting mask, base64 PNG or JPEG, the source's size: white repaints, black keeps.
    pub mask: Option<String>,
    /// How the source is fitted to width × height: 0 just resize, 1 crop and resize, 2 resize
    /// and fill (3, latent upscale, is not served).
    #[schema(minimum = 0, maximum = 2, default = 0)]
    pub resize_mode: Option<i64>,
    /// Read and checked (0..=3); Drover's masked content is the source below strength 1 and
    /// noise at strength 1 (A1111's "original" and "latent noise").
    #[schema(minimum = 0, maximum = 3)]
    pub inpainting_fill: Option<i64>,
    /// The mask's blur radius in pixels, 0..=64: the repainted part's edge blends into the
    /// kept one (used with a mask).
    #[schema(minimum = 0, maximum = 64)]
    pub mask_blur: Option<i64>,
    /// 0: white repaints (the default); 1: black repaints (the mask is inverted).
    #[schema(minimum = 0, maximum = 1)]
    pub inpainting_mask_invert: Option<i64>,
    /// Denoising steps, 1..=150 (the sampler's own range: LCM 1..=8).
    #[schema(minimum = 1, maximum = 150)]
    pub steps: Option<u32>,
    /// Guidance scale, 0..=20.
    #[schema(minimum = 0, maximum = 20)]
    pub cfg_scale: Option<f64>,
    /// Sampler, as `GET /sdapi/v1/samplers` lists it.
    #[schema(example = "Euler a")]
    pub sampler_name: Option<String>,
    /// Sigma schedule: `Automatic`, `Normal`, `Karras`.
    #[schema(example = "Karras")]
    pub scheduler: Option<String>,
    /// Image width: a multiple of 8 in 64..=2048; 512 when absent.
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8, default = 512)]
    pub width: Option<u32>,
    /// Image height: a multiple of 8 in 64..=2048; 512 when absent.
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8, default = 512)]
    pub height: Option<u32>,
    /// Seed of the first image, 0..=2^31-1; -1 (or absent) for a random one.
    #[schema(minimum = -1, maximum = 2147483647)]
    pub seed: Option<i64>,
    /// Images per iteration; `batch_size × n_iter` is at most 8.
    #[schema(minimum = 1, maximum = 8, default = 1)]
    pub batch_size: Option<u32>,
    /// Iterations; `batch_size × n_iter` is at most 8.
    #[schema(minimum = 1, maximum = 8, default = 1)]
    pub n_iter: Option<u32>,
}

/// The schema of [`Txt2ImgRequest`] with the rule its fields cannot state alone: `batch_size ×
/// n_iter` is at most [`MAX_BATCH`] (an absent or `null` one counts 1), one branch per `n_iter`.
pub fn txt2img_request_schema(derived: RefOr<Schema>) -> RefOr<Schema> {
    let mut branches = AnyOfBuilder::new();
    for n_iter in 1..=MAX_BATCH {
        // No `type` on these: the derived schema types the fields.
        let any = || ObjectBuilder::new().schema_type(SchemaType::AnyValue);
        let iterations = if n_iter == 1 {
            any().enum_values(Some([Value::from(1), Value::Null]))
        } else {
            any().enum_values(Some([n_iter]))
        };
        let mut branch = ObjectBuilder::new()
            .property("n_iter", iterations)
            .property("batch_size", any().maximum(Some(MAX_BATCH / n_iter)));
        if n_iter > 1 {
            branch = branch.required("n_iter");
        }
        branches = branches.item(branch);
    }
    AllOfBuilder::new()
        .item(derived)
        .item(branches.description(Some(format!("batch_size × n_iter is at most {MAX_BATCH}"))))
        .into()
}

/// The answer of `POST /sdapi/v1/txt2img`.
#[derive(Serialize, ToSchema)]
pub struct Txt2ImgResponse {
    /// The PNGs, base64 (standard alphabet, padded), in order.
    pub images: Vec<String>,
    /// The request body as it was sent.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// A JSON object as a string (schema `Txt2ImgInfo`), as AUTOMATIC1111 answers it.
    #[schema(content_media_type = "application/json")]
    pub info: String,
}

/// What `info` of a txt2img answer holds (as a JSON string).
#[derive(Serialize, ToSchema)]
pub struct Txt2ImgInfo {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty for none).
    pub negative_prompt: String,
    /// The first image's seed.
    pub seed: u64,
    /// Every image's seed, in order.
    pub all_seeds: Vec<u64>,
    /// Image width.
    pub width: i64,
    /// Image height.
    pub height: i64,
    /// Images per iteration.
    pub batch_size: i64,
    /// Iterations.
    pub n_iter: i64,
    /// The jobs that rendered the images, in order.
    pub job_ids: Vec<String>,
    /// Always `drover`.
    pub sd_model_name: String,
}

fn required_prompt(map: &Map<String, Value>) -> Result<String> {
    string(map, "prompt")?.ok_or_else(|| FieldError::new("prompt", "is required").into())
}

/// The job a `POST /generate` body asks for ([`LcmRequest`]).
pub fn lcm_request(body: &[u8]) -> Result<JobRequest> {
    let map = object(body)?;
    let style_lora = match map.get("style_lora") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<StyleRef>(v.clone())
                .map_err(|e| FieldError::new("style_lora", e.to_string()))?,
        ),
    };
    Ok(JobRequest {
        prompt: required_prompt(&map)?,
        negative_prompt: string(&map, "negative_prompt")?,
        model: string(&map, "model")?,
        size: string(&map, "size")?,
        steps: steps(&map, "num_inference_steps")?,
        guidance_scale: number(&map, "guidance_scale")?.map(|g| g as f32),
        seed: seed(&map, "seed")?,
        style_lora,
        upscale: superres(&map)?,
        ..JobRequest::default()
    })
}

/// The Python LCM server's `superres` (passes, or `true` for one) as a job's `upscale`.
fn superres(map: &Map<String, Value>) -> Result<Option<drover_shared::job::UpscaleRequest>> {
    let passes = match map.get("superres") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => 0,
        Some(Value::Bool(true)) => 1,
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|&p| p <= 3)
            .ok_or_else(|| FieldError::new("superres", format!("{n}: 0 to 3 passes")))?,
        Some(_) => return Err(FieldError::new("superres", "expected 0 to 3 passes").into()),
    };
    Ok((passes > 0).then(|| drover_shared::job::UpscaleRequest {
        passes: Some(passes as u32),
        ..Default::default()
    }))
}

/// Python LCM server compatibility
///
/// The Python LCM server's `POST /generate`: the job's PNG, with its seed in `X-Seed`.
#[utoipa::path(
    tag = "compat",
    request_body = LcmRequest,
    responses(
        (status = 200, description = "The image", content_type = "image/png", body = Png,
            headers(
                ("X-Seed" = u64, description = "The seed it was rendered with"),
                ("X-Job-Id" = String, description = "The job"),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
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
#[post("/generate")]
pub(crate) async fn lcm_generate(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let request = lcm_request(&read_body(payload, MAX_BODY).await?)?;
    let submitted = accept_request(&state, &client, request, true).await?;
    let (done, png) = wait_image(&state, submitted).await?;
    Ok(HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("X-Seed", done.spec.seed.to_string()))
        .insert_header(("X-Job-Id", done.id.to_string()))
        .body(web::Bytes::from_owner(png)))
}

/// A txt2img body read: its jobs, and what the answer echoes.
pub struct Txt2Img {
    /// The jobs, one per image, in order.
    pub requests: Vec<JobRequest>,
    /// The body as sent.
    pub parameters: Map<String, Value>,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt, when not empty.
    pub negative: Option<String>,
    /// Image width.
    pub width: i64,
    /// Image height.
    pub height: i64,
    /// Images per iteration.
    pub batch: i64,
    /// Iterations.
    pub iterations: i64,
}

/// The jobs a `POST /sdapi/v1/txt2img` body asks for ([`Txt2ImgRequest`]).
pub fn txt2img_request(body: &[u8]) -> Result<Txt2Img> {
    txt2img_from(object(body)?)
}

/// The jobs a `POST /sdapi/v1/img2img` body asks for ([`Img2ImgRequest`]): txt2img's, each
/// starting from an init image (image i of the batch from `init_images[i mod len]`, as A1111
/// does), with the mask, strength and resize mode.
pub fn img2img_request(body: &[u8]) -> Result<Txt2Img> {
    let map = object(body)?;
    let images = match map.get("init_images") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(FieldError::new(
                    format!("init_images[{i}]"),
                    "expected a base64 image string",
                )
                .into()),
            })
            .collect::<Result<Vec<String>>>()?,
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return Err(
                FieldError::new("init_images", "is required: one or more base64 images").into(),
            );
        }
        Some(_) => {
            return Err(
                FieldError::new("init_images", "expected an array of base64 images").into(),
            );
        }
    };
    let mask = string(&map, "mask")?.filter(|m| !m.is_empty());
    let strength = number(&map, "denoising_strength")?;
    let resize_mode = match whole(&map, "resize_mode")? {
        None => None,
        Some(m) => Some(ResizeMode::from_a1111(m).ok_or_else(|| {
            FieldError::new(
                "resize_mode",
                format!(
                    "{m} is not served: 0 (just resize), 1 (crop and resize) or 2 (resize and fill)"
                ),
            )
        })?),
    };
    if let Some(fill) = whole(&map, "inpainting_fill")?
        && !(0..=3).contains(&fill)
    {
        return Err(FieldError::new("inpainting_fill", format!("{fill} is outside 0..=3")).into());
    }
    let blur = whole(&map, "mask_blur")?;
    if let Some(blur) = blur
        && !(0..=64).contains(&blur)
    {
        return Err(FieldError::new("mask_blur", format!("{blur} is outside 0..=64")).into());
    }
    let mask = match (whole(&map, "inpainting_mask_invert")?.unwrap_or(0), mask) {
        (0, mask) => mask,
        (1, Some(m)) => Some(drover_shared::job::source::inverted_mask_base64(
            "mask", &m,
        )?),
        (1, None) => None,
        (other, _) => {
            return Err(FieldError::new(
                "inpainting_mask_invert",
                format!("{other}: 0 (white repaints) or 1 (black repaints)"),
            )
            .into());
        }
    };
    let mut call = txt2img_from(map)?;
    for (i, request) in call.requests.iter_mut().enumerate() {
        request.init_image = Some(images[i % images.len()].clone());
        request.mask = mask.clone();
        request.strength = strength;
        request.resize_mode = resize_mode;
        // A1111 sends mask_blur with every img2img call; it means something only with a mask.
        request.mask_blur = mask.as_ref().and(blur).map(|b| b as u32);
    }
    Ok(call)
}

fn txt2img_from(map: Map<String, Value>) -> Result<Txt2Img> {
    let prompt = required_prompt(&map)?;
    let negative = string(&map, "negative_prompt")?.filter(|s| !s.is_empty());
    let width = whole(&map, "width")?.unwrap_or(512);
    let height = whole(&map, "height")?.unwrap_or(512);
    let batch = whole(&map, "batch_size")?.unwrap_or(1);
    let iterations = whole(&map, "n_iter")?.unwrap_or(1);
    let count = batch.saturating_mul(iterations);
    if batch < 1 || iterations < 1 || count as u64 > MAX_BATCH {
        let field = if batch < 1 || batch as u64 > MAX_BATCH {
            "batch_size"
        } else {
            "n_iter"
        };
        return Err(FieldError::new(
            field,
            format!("batch_size × n_iter must be 1..={MAX_BATCH}, not {batch} × {iterations}"),
        )
        .into());
    }
    let steps = steps(&map, "steps")?;
    let guidance_scale = number(&map, "cfg_scale")?.map(|g| g as f32);
    // Checked here so errors name A1111's fields; the native validation reads them again.
    let sampler = string(&map, "sampler_name")?.filter(|n| !n.trim().is_empty());
    if let Some(name) = &sampler {
        name.parse::<SamplerName>()
            .map_err(|m| FieldError::new("sampler_name", m))?;
    }
    let scheduler = match string(&map, "scheduler")? {
        Some(raw) => {
            raw.parse::<SigmaSchedule>()
                .map_err(|m| FieldError::new("scheduler", m))?;
            Some(raw)
        }
        None => None,
    };
    let first_seed = seed(&map, "seed")?.unwrap_or_else(|| random_seed() as i64);
    let seeds = 1 + MAX_SEED as i64;
    let requests = (0..count)
        .map(|i| JobRequest {
            prompt: prompt.clone(),
            negative_prompt: negative.clone(),
            size: Some(format!("{width}x{height}")),
            steps,
            guidance_scale,
            sampler: sampler.clone(),
            scheduler: scheduler.clone(),
            // A1111 gives image i of a batch the seed + i; past the last seed, from 0 again (a
            // first seed out of range stays so, and is refused).
            seed: Some(if (0..seeds).contains(&first_seed) {
                (first_seed + i) % seeds
            } else {
                first_seed + i
            }),
            ..JobRequest::default()
        })
        .collect();
    Ok(Txt2Img {
        requests,
        parameters: map,
        prompt,
        negative,
        width,
        height,
        batch,
        iterations,
    })
}

/// AUTOMATIC1111 img2img compatibility
///
/// The AUTOMATIC1111 img2img subset (txt2img's fields plus `init_images`, `denoising_strength`,
/// `mask`, `resize_mode`): every image as base64 PNG, the parameters, and `info`.
#[utoipa::path(
    tag = "compat",
    request_body = Img2ImgRequest,
    responses(
        (status = 200, description = "The images", body = Txt2ImgResponse),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
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
#[post("/sdapi/v1/img2img")]
pub(crate) async fn img2img(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let call = img2img_request(&read_body(payload, MAX_IMAGE_BODY).await?)?;
    answer_a1111(&state, &client, call).await
}

/// AUTOMATIC1111 txt2img compatibility
///
/// The AUTOMATIC1111 subset: every image as base64 PNG, the parameters, and `info`.
#[utoipa::path(
    tag = "compat",
    request_body = Txt2ImgRequest,
    responses(
        (status = 200, description = "The images", body = Txt2ImgResponse),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
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
#[post("/sdapi/v1/txt2img")]
pub(crate) async fn txt2img(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let call = txt2img_request(&read_body(payload, MAX_BODY).await?)?;
    answer_a1111(&state, &client, call).await
}

/// Submits an A1111 call's jobs and answers its images, parameters and `info`.
async fn answer_a1111(
    state: &AppState,
    client: &ClientId,
    mut call: Txt2Img,
) -> Result<HttpResponse> {
    // The answer echoes the body, less the images it carried.
    for key in ["init_images", "mask"] {
        if call.parameters.contains_key(key) {
            call.parameters.insert(key.into(), Value::Null);
        }
    }
    // The checkpoint it overrides or set with /sdapi/v1/options picks the model.
    if let Some(name) = super::a1111::checkpoint_of(state, &client.label, &call.parameters)? {
        let nodes = state.control.send(crate::control::ListNodes).await?;
        let model = super::a1111::resolve_checkpoint(&super::nodes::models(&nodes), &name)?;
        for request in &mut call.requests {
            request.model = Some(model.clone());
        }
    }
    // All or nothing: the batch is accepted as one submission, with one wait for the disk.
    let jobs = accept_requests(state, client, call.requests, true).await?;
    super::a1111::remember_jobs(
        state,
        &client.label,
        jobs.iter().map(|j| j.job.id).collect(),
    );
    let mut images = Vec::new();
    let mut all_seeds = Vec::new();
    let mut job_ids = Vec::new();
    for job in jobs {
        let (done, png) = wait_image(state, job).await?;
        images.push(base64(&png));
        all_seeds.push(done.spec.seed);
        job_ids.push(done.id.to_string());
    }
    let info = Txt2ImgInfo {
        prompt: call.prompt,
        negative_prompt: call.negative.unwrap_or_default(),
        seed: all_seeds.first().copied().unwrap_or_default(),
        all_seeds,
        width: call.width,
        height: call.height,
        batch_size: call.batch,
        n_iter: call.iterations,
        job_ids,
        sd_model_name: "drover".into(),
    };
    Ok(HttpResponse::Ok().json(Txt2ImgResponse {
        images,
        parameters: call.parameters,
        info: serde_json::to_string(&info)?,
    }))
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests;
