//! Compatibility endpoints, so existing clients work unchanged:
//! - `POST /generate`: the Python LCM server's body (`prompt`, `size` "WxH",
//!   `num_inference_steps`, `guidance_scale`, `seed`, `style_lora {style, level}`), answered as it
//!   did: PNG bytes with `X-Seed`.
//! - `POST /sdapi/v1/txt2img`: the AUTOMATIC1111 subset (`prompt`, `negative_prompt`, `steps`,
//!   `cfg_scale`, `width`, `height`, `seed`, `batch_size`, `n_iter`), answered with base64 PNGs,
//!   the parameters and an `info` JSON string.
//!
//! Unlike the strict native API, these accept whole bodies real clients send: fields they do not
//! use are ignored, and seed −1 means random. Fields they do use are validated like native ones,
//! and errors name them.

use actix_web::{HttpResponse, web};
use drover_shared::error::FieldError;
use drover_shared::job::{JobRequest, StyleRef, random_seed};
use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::http::{AppState, Client, accept_request, accept_requests, wait_image};

/// Most images one txt2img call may ask for (`batch_size × n_iter`).
pub const MAX_BATCH: u64 = 8;

/// Mounts the compatibility routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/generate", web::post().to(lcm_generate))
        .route("/sdapi/v1/txt2img", web::post().to(txt2img));
}

fn object(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(FieldError::new("body", "expected a JSON object").into()),
        Err(e) => Err(FieldError::new("body", format!("malformed json: {e}")).into()),
    }
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(key, "expected a string").into()),
    }
}

fn number(map: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(FieldError::new(key, "expected a number").into()),
    }
}

fn whole(map: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    match number(map, key)? {
        None => Ok(None),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => Ok(Some(v as i64)),
        Some(_) => Err(FieldError::new(key, "expected a whole number").into()),
    }
}

fn steps(map: &Map<String, Value>, key: &str) -> Result<Option<u32>> {
    whole(map, key)?
        .map(|v| {
            u32::try_from(v).map_err(|_| FieldError::new(key, format!("{v} is negative")).into())
        })
        .transpose()
}

/// A seed where −1 (or absent) means random.
fn seed(map: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    Ok(whole(map, key)?.filter(|&s| s != -1))
}

fn required_prompt(map: &Map<String, Value>) -> Result<String> {
    string(map, "prompt")?.ok_or_else(|| FieldError::new("prompt", "is required").into())
}

/// `POST /generate` (the Python LCM server).
async fn lcm_generate(
    Client(client): Client,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let map = object(&body)?;
    let style_lora = match map.get("style_lora") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<StyleRef>(v.clone())
                .map_err(|e| FieldError::new("style_lora", e.to_string()))?,
        ),
    };
    let request = JobRequest {
        prompt: required_prompt(&map)?,
        negative_prompt: string(&map, "negative_prompt")?,
        model: string(&map, "model")?,
        size: string(&map, "size")?,
        steps: steps(&map, "num_inference_steps")?,
        guidance_scale: number(&map, "guidance_scale")?.map(|g| g as f32),
        seed: seed(&map, "seed")?,
        style_lora,
        ..JobRequest::default()
    };
    let submitted = accept_request(&state, &client, request, true).await?;
    let (done, png) = wait_image(&state, submitted).await?;
    Ok(HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("X-Seed", done.spec.seed.to_string()))
        .insert_header(("X-Job-Id", done.id.to_string()))
        .body(web::Bytes::from_owner(png)))
}

/// `POST /sdapi/v1/txt2img` (AUTOMATIC1111 subset).
async fn txt2img(
    Client(client): Client,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let map = object(&body)?;
    let prompt = required_prompt(&map)?;
    let negative = string(&map, "negative_prompt")?.filter(|s| !s.is_empty());
    let width = whole(&map, "width")?.unwrap_or(512);
    let height = whole(&map, "height")?.unwrap_or(512);
    let batch = whole(&map, "batch_size")?.unwrap_or(1);
    let iterations = whole(&map, "n_iter")?.unwrap_or(1);
    let count = batch.saturating_mul(iterations);
    if batch < 1 || iterations < 1 || count as u64 > MAX_BATCH {
        return Err(FieldError::new(
            "batch_size",
            format!("batch_size × n_iter must be 1..={MAX_BATCH}, not {batch} × {iterations}"),
        )
        .into());
    }
    let first_seed = seed(&map, "seed")?.unwrap_or_else(|| random_seed() as i64);
    let requests = (0..count)
        .map(|i| {
            Ok(JobRequest {
                prompt: prompt.clone(),
                negative_prompt: negative.clone(),
                size: Some(format!("{width}x{height}")),
                steps: steps(&map, "steps")?,
                guidance_scale: number(&map, "cfg_scale")?.map(|g| g as f32),
                // A1111 gives image i of a batch the seed + i.
                seed: Some(first_seed + i),
                ..JobRequest::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // All or nothing: the batch is accepted as one submission, with one wait for the disk.
    let jobs = accept_requests(&state, &client, requests, true).await?;
    let mut images = Vec::new();
    let mut seeds = Vec::new();
    let mut ids = Vec::new();
    for job in jobs {
        let (done, png) = wait_image(&state, job).await?;
        images.push(Value::String(base64(&png)));
        seeds.push(done.spec.seed);
        ids.push(done.id.to_string());
    }
    let info = json!({
        "prompt": prompt,
        "negative_prompt": negative.unwrap_or_default(),
        "seed": seeds.first(),
        "all_seeds": seeds,
        "width": width,
        "height": height,
        "batch_size": batch,
        "n_iter": iterations,
        "job_ids": ids,
        "sd_model_name": "drover",
    });
    Ok(HttpResponse::Ok().json(json!({
        "images": images,
        "parameters": Value::Object(map),
        "info": info.to_string(),
    })))
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn seeds_of_minus_one_are_random_and_types_are_checked() {
        let map = object(br#"{"seed": -1, "steps": "many", "cfg_scale": 7}"#).unwrap();
        assert_eq!(seed(&map, "seed").unwrap(), None);
        assert!(steps(&map, "steps").is_err());
        assert_eq!(number(&map, "cfg_scale").unwrap(), Some(7.0));
        assert!(object(b"[1]").is_err());
    }
}
