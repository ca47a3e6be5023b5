//! AUTOMATIC1111's discovery calls, which UIs and client libraries make before they render:
//! `GET /sdapi/v1/sd-models` (the farm's models), `GET`/`POST /sdapi/v1/options` (the caller's
//! `sd_model_checkpoint`, kept per API key and used by its later txt2img/img2img calls),
//! `GET /sdapi/v1/loras`, `/upscalers`, `/progress` (the caller's latest call), `/cmd-flags`,
//! and `/samplers`, `/schedulers` (what txt2img's `sampler_name` and `scheduler` accept).
//!
//! A checkpoint is named as `sd-models` lists it — `title` (`name [hash]`), `model_name`, the
//! `hash` or `sha256` (the model id) — or by family (`sd15`, `sdxl`); [`resolve_checkpoint`]
//! turns it into the `model` of a native job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use actix_web::{HttpResponse, get, post, web};
use drover_shared::error::FieldError;
use drover_shared::ids::JobId;
use drover_shared::sampler::{Sampler, SigmaSchedule};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::nodes::{ModelView, models};
use super::responses::{BadRequest, PayloadTooLarge, Unauthorized, Unavailable};
use super::state::{MAX_BODY, read_body};
use crate::control::ListNodes;
use crate::error::Result;
use crate::http::{AppState, Client};
use crate::records::JobState;

/// What the coordinator remembers of each A1111 caller (by API key label), in memory.
#[derive(Clone, Debug, Default)]
pub struct A1111Client {
    /// The checkpoint set with `POST /sdapi/v1/options`.
    pub checkpoint: Option<String>,
    /// The jobs of its latest txt2img/img2img call, for `GET /sdapi/v1/progress`.
    pub last_jobs: Vec<JobId>,
}

/// Every caller's A1111 settings.
pub type A1111Clients = Arc<Mutex<HashMap<String, A1111Client>>>;

fn with_client<T>(state: &AppState, label: &str, f: impl FnOnce(&mut A1111Client) -> T) -> T {
    let mut all = state
        .a1111
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(all.entry(label.to_string()).or_default())
}

/// The checkpoint a caller's next call uses: its `override_settings.sd_model_checkpoint`, else
/// the one it set with `POST /sdapi/v1/options`.
pub fn checkpoint_of(
    state: &AppState,
    label: &str,
    parameters: &serde_json::Map<String, Value>,
) -> Result<Option<String>> {
    match parameters
        .get("override_settings")
        .and_then(|o| o.get("sd_model_checkpoint"))
    {
        None | Some(Value::Null) => Ok(with_client(state, label, |c| c.checkpoint.clone())),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(
            "override_settings.sd_model_checkpoint",
            "expected a string",
        )
        .into()),
    }
}

/// Remembers a caller's latest call, for `GET /sdapi/v1/progress`.
pub fn remember_jobs(state: &AppState, label: &str, jobs: Vec<JobId>) {
    with_client(state, label, |c| c.last_jobs = jobs);
}

/// The first ten hex digits of a model id, as A1111 shortens hashes.
fn short_hash(model_id: &str) -> String {
    model_id.chars().take(10).collect()
}

/// A model as `GET /sdapi/v1/sd-models` lists it.
#[derive(Serialize, ToSchema)]
pub struct SdModel {
    /// `model_name [hash]`: what `sd_model_checkpoint` takes.
    pub title: String,
    /// The model's file or folder name on its nodes.
    pub model_name: String,
    /// The model id's first ten hex digits.
    pub hash: String,
    /// The model id (SHA-256 of its safetensors header).
    pub sha256: String,
    /// The model's file or folder name.
    pub filename: String,
    /// Always `null` (no LDM config file).
    pub config: Option<String>,
    /// Drover's family of the model (`sd15`, `sd2`, `sdxl`).
    pub family: String,
}

fn sd_model(m: &ModelView) -> SdModel {
    let hash = short_hash(&m.model_id);
    SdModel {
        title: format!("{} [{hash}]", m.model_name),
        model_name: m.model_name.clone(),
        hash,
        sha256: m.model_id.clone(),
        filename: m.model_name.clone(),
        config: None,
        family: m.family.to_string(),
    }
}

/// The `model` of a native job for an A1111 checkpoint name: a listed title, model name, hash or
/// model id names that model; anything else (a family, an id no node has yet) is passed on for
/// the native validation and routing to judge.
pub fn resolve_checkpoint(
    listed: &[ModelView],
    name: &str,
) -> std::result::Result<String, FieldError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(FieldError::new(
            "sd_model_checkpoint",
            "must name a model (GET /sdapi/v1/sd-models lists them)",
        ));
    }
    // `name [hash]`: the hash decides.
    let hash = name
        .strip_suffix(']')
        .and_then(|rest| rest.rsplit_once(" ["))
        .map(|(_, h)| h);
    let found = listed.iter().find(|m| {
        let id = m.model_id.to_ascii_lowercase();
        match hash {
            Some(h) => !h.is_empty() && id.starts_with(&h.to_ascii_lowercase()),
            None => {
                m.model_name == name
                    || id == name.to_ascii_lowercase()
                    || (name.len() >= 10 && id.starts_with(&name.to_ascii_lowercase()))
            }
        }
    });
    match (found, hash) {
        // A model id jobs cannot name (a simulated node's): its family.
        (Some(m), _) if !m.model_id.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(m.family.to_string())
        }
        (Some(m), _) => Ok(m.model_id.clone()),
        (None, Some(h)) => Err(FieldError::new(
            "sd_model_checkpoint",
            format!("no model of the farm has hash `{h}` (GET /sdapi/v1/sd-models lists them)"),
        )),
        (None, None) => Ok(name.to_string()),
    }
}

/// The farm's models, as AUTOMATIC1111 lists its checkpoints
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "One entry per model id", body = Vec<SdModel>),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/sd-models")]
pub(crate) async fn sd_models(_: Client, state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let list: Vec<SdModel> = models(&nodes).iter().map(sd_model).collect();
    Ok(HttpResponse::Ok().json(list))
}

/// The options A1111 clients read and set (the rest of A1111's options are not kept).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct A1111Options {
    /// The caller's checkpoint: what it set, else the first model listed (empty with none).
    pub sd_model_checkpoint: String,
    /// The hash of that checkpoint, when it names a listed model.
    pub sd_checkpoint_hash: Option<String>,
    /// Always `png`.
    pub samples_format: String,
}

async fn options_of(state: &AppState, label: &str) -> Result<A1111Options> {
    let nodes = state.control.send(ListNodes).await?;
    let listed = models(&nodes);
    let checkpoint = with_client(state, label, |c| c.checkpoint.clone())
        .or_else(|| listed.first().map(|m| sd_model(m).title))
        .unwrap_or_default();
    let hash = resolve_checkpoint(&listed, &checkpoint)
        .ok()
        .filter(|id| listed.iter().any(|m| &m.model_id == id))
        .map(|id| short_hash(&id));
    Ok(A1111Options {
        sd_model_checkpoint: checkpoint,
        sd_checkpoint_hash: hash,
        samples_format: "png".into(),
    })
}

/// The caller's options (its checkpoint)
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "The caller's options", body = A1111Options),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/options")]
pub(crate) async fn get_options(
    Client(client): Client,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(options_of(&state, &client.label).await?))
}

/// Sets the caller's checkpoint
///
/// `sd_model_checkpoint` (a title, model name, hash, model id or family) becomes the model of
/// the caller's later txt2img/img2img calls that do not override it; other options are ignored.
#[utoipa::path(
    tag = "compat",
    request_body(content = Object, description = "A1111 options; `sd_model_checkpoint` is read"),
    responses(
        (status = 200, description = "The caller's options now", body = A1111Options),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[post("/sdapi/v1/options")]
pub(crate) async fn set_options(
    Client(client): Client,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse> {
    let body = read_body(payload, MAX_BODY).await?;
    let map = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(FieldError::new("body", "expected a JSON object").into()),
        Err(e) => return Err(FieldError::new("body", format!("malformed json: {e}")).into()),
    };
    match map.get("sd_model_checkpoint") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) => {
            let nodes = state.control.send(ListNodes).await?;
            resolve_checkpoint(&models(&nodes), name)?;
            let name = name.trim().to_string();
            with_client(&state, &client.label, |c| c.checkpoint = Some(name));
        }
        Some(_) => return Err(FieldError::new("sd_model_checkpoint", "expected a string").into()),
    }
    Ok(HttpResponse::Ok().json(options_of(&state, &client.label).await?))
}

/// A LoRA as `GET /sdapi/v1/loras` lists it.
#[derive(Serialize, ToSchema)]
pub struct A1111Lora {
    /// The name jobs use (`<lora:NAME:1>` in A1111 prompts; `loras` in Drover's jobs).
    pub name: String,
    /// The same name.
    pub alias: String,
    /// The family it was made for.
    pub family: String,
    /// Nodes offering it.
    pub nodes: usize,
}

/// The LoRAs nodes offer
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "Every LoRA some node offers, by name", body = Vec<A1111Lora>),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/loras")]
pub(crate) async fn loras(_: Client, state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let mut by_name: BTreeMap<(String, String), usize> = BTreeMap::new();
    for n in &nodes {
        for l in &n.record.loras {
            *by_name
                .entry((l.name.clone(), l.family.to_string()))
                .or_default() += 1;
        }
    }
    let list: Vec<A1111Lora> = by_name
        .into_iter()
        .map(|((name, family), nodes)| A1111Lora {
            alias: name.clone(),
            name,
            family,
            nodes,
        })
        .collect();
    Ok(HttpResponse::Ok().json(list))
}

/// An upscaler as `GET /sdapi/v1/upscalers` lists it.
#[derive(Serialize, ToSchema)]
pub struct A1111Upscaler {
    /// Its name.
    pub name: String,
    /// Its model (none).
    pub model_name: Option<String>,
    /// Its file (none).
    pub model_path: Option<String>,
    /// Where it came from (none).
    pub model_url: Option<String>,
    /// Its scale.
    pub scale: f64,
}

/// Upscalers: A1111's `None`, then the farm's
///
/// `None` first (A1111 lists it, and UIs offer it as "no upscaling"), then every upscaler some
/// node runs (`GET /v1/upscalers`), `model_name` its network.
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "The upscalers", body = Vec<A1111Upscaler>),
        (status = 401, response = Unauthorized),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/upscalers")]
pub(crate) async fn upscalers(state: web::Data<AppState>, _: Client) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let none = A1111Upscaler {
        name: "None".into(),
        model_name: None,
        model_path: None,
        model_url: None,
        scale: 4.0,
    };
    let farm = super::nodes::upscalers(&nodes)
        .into_iter()
        .map(|u| A1111Upscaler {
            name: u.name,
            model_name: Some(u.network),
            model_path: None,
            model_url: None,
            scale: f64::from(u.scale),
        });
    let list: Vec<A1111Upscaler> = std::iter::once(none).chain(farm).collect();
    Ok(HttpResponse::Ok().json(list))
}

/// Where a caller's latest call stands, as A1111's `state` reports it.
#[derive(Serialize, ToSchema)]
pub struct A1111State {
    /// Never (Drover does not skip).
    pub skipped: bool,
    /// Whether a job of the call was cancelled.
    pub interrupted: bool,
    /// The job running now (its id), empty when none.
    pub job: String,
    /// Images of the call.
    pub job_count: usize,
    /// Images of the call finished.
    pub job_no: usize,
    /// Step of the job running now.
    pub sampling_step: u32,
    /// Steps of the job running now.
    pub sampling_steps: u32,
}

/// The answer of `GET /sdapi/v1/progress`.
#[derive(Serialize, ToSchema)]
pub struct A1111Progress {
    /// Fraction of the call done, 0..=1 (finished images, plus the running one's steps).
    pub progress: f64,
    /// Seconds left, estimated from the time so far (0 when nothing is done yet).
    pub eta_relative: f64,
    /// Details.
    pub state: A1111State,
    /// Always `null` (no live previews).
    pub current_image: Option<String>,
    /// Always `null`.
    pub textinfo: Option<String>,
}

/// The caller's latest txt2img/img2img call: progress and time left
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "The call's progress", body = A1111Progress),
        (status = 401, response = Unauthorized),
        (status = 503, response = Unavailable),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/progress")]
pub(crate) async fn progress(
    Client(client): Client,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let ids = with_client(&state, &client.label, |c| c.last_jobs.clone());
    let mut done = 0usize;
    let mut fraction = 0.0;
    let mut running = (String::new(), 0, 0);
    let mut interrupted = false;
    let mut started_ms = u64::MAX;
    for id in &ids {
        let Some(job) = state.job(*id).await? else {
            continue;
        };
        started_ms = started_ms.min(job.created_ms);
        if job.state.is_terminal() {
            done += 1;
            fraction += 1.0;
            interrupted |= job.state == JobState::Cancelled;
        } else if let Some((step, total)) = job.progress {
            fraction += f64::from(step) / f64::from(total.max(1));
            running = (job.id.to_string(), step, total);
        }
    }
    let progress = if ids.is_empty() {
        0.0
    } else {
        fraction / ids.len() as f64
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let elapsed = now_ms.saturating_sub(started_ms) as f64 / 1000.0;
    let eta_relative = if progress > 0.0 && progress < 1.0 {
        elapsed * (1.0 - progress) / progress
    } else {
        0.0
    };
    Ok(HttpResponse::Ok().json(A1111Progress {
        progress,
        eta_relative,
        state: A1111State {
            skipped: false,
            interrupted,
            job: running.0,
            job_count: ids.len(),
            job_no: done,
            sampling_step: running.1,
            sampling_steps: running.2,
        },
        current_image: None,
        textinfo: None,
    }))
}

/// The flags A1111 reports (API mode, no web UI)
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "Flags", body = Object),
        (status = 401, response = Unauthorized),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/cmd-flags")]
pub(crate) async fn cmd_flags(_: Client) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "api": true,
        "nowebui": true,
        "lowvram": false,
        "medvram": false,
        "no_half": false,
        "drover": drover_shared::VERSION,
    }))
}

/// A sampler as AUTOMATIC1111's `GET /sdapi/v1/samplers` lists it.
#[derive(Serialize, ToSchema)]
pub struct A1111Sampler {
    /// The name `sampler_name` takes.
    pub name: String,
    /// Other names accepted for it.
    pub aliases: Vec<String>,
    /// Options (none here).
    pub options: BTreeMap<String, String>,
}

/// The samplers `sampler_name` accepts
///
/// Every sampler Drover has; which nodes run which is in `GET /v1/nodes` (`samplers`), and a
/// job for a sampler no node runs is refused with 422 and the reason per node.
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "The samplers", body = [A1111Sampler]),
        (status = 401, response = Unauthorized),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/samplers")]
pub(crate) async fn samplers(_: Client) -> HttpResponse {
    HttpResponse::Ok().json(a1111_samplers())
}

/// The listing of [`samplers`]: each sampler, and its Karras form where it has one.
pub fn a1111_samplers() -> Vec<A1111Sampler> {
    let mut out = Vec::new();
    for s in Sampler::ALL {
        out.push(A1111Sampler {
            name: s.a1111_name().into(),
            aliases: vec![s.id().into()],
            options: BTreeMap::new(),
        });
        if s.takes_karras() {
            out.push(A1111Sampler {
                name: format!("{} Karras", s.a1111_name()),
                aliases: vec![format!("{}_karras", s.id())],
                options: BTreeMap::from([("scheduler".into(), "karras".into())]),
            });
        }
    }
    out
}

/// A sigma schedule as AUTOMATIC1111's `GET /sdapi/v1/schedulers` lists it.
#[derive(Serialize, ToSchema)]
pub struct A1111Scheduler {
    /// The id `scheduler` takes.
    pub name: String,
    /// The label shown.
    pub label: String,
}

/// The sigma schedules `scheduler` accepts
#[utoipa::path(
    tag = "compat",
    responses(
        (status = 200, description = "The schedules", body = [A1111Scheduler]),
        (status = 401, response = Unauthorized),
    ),
    security((), ("apiKey" = []), ("bearerKey" = []))
)]
#[get("/sdapi/v1/schedulers")]
pub(crate) async fn schedulers(_: Client) -> HttpResponse {
    let list: Vec<A1111Scheduler> = [
        SigmaSchedule::Automatic,
        SigmaSchedule::Normal,
        SigmaSchedule::Karras,
    ]
    .into_iter()
    .map(|s| A1111Scheduler {
        name: s.id().into(),
        label: {
            let id = s.id();
            id[..1].to_ascii_uppercase() + &id[1..]
        },
    })
    .collect();
    HttpResponse::Ok().json(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::family::ModelFamily;

    fn model(id: &str, name: &str) -> ModelView {
        ModelView {
            model_id: id.into(),
            model_name: name.into(),
            family: ModelFamily::Sd15,
            backends: vec!["cpu".into()],
            nodes: 1,
            nodes_online: 1,
            workers_online: 1,
            served_by: vec!["n".into()],
            resident_on: vec!["n".into()],
            max_pixels: 1 << 20,
            sizes: Vec::new(),
            loras: Vec::new(),
            upscalers: Vec::new(),
        }
    }

    #[test]
    fn checkpoints_resolve_by_title_name_hash_or_family() {
        let listed = [
            model("0123456789abcdef", "dreamshaper"),
            model("fedcba9876543210", "juggernaut"),
        ];
        let title = sd_model(&listed[1]).title;
        assert_eq!(title, "juggernaut [fedcba9876]");
        for name in [
            title.as_str(),
            "juggernaut",
            "fedcba9876",
            "FEDCBA9876543210",
        ] {
            assert_eq!(
                resolve_checkpoint(&listed, name).as_deref(),
                Ok("fedcba9876543210"),
                "{name}"
            );
        }
        // A stale title: the hash decides, and an unknown one is refused.
        assert_eq!(
            resolve_checkpoint(&listed, "old-name [0123456789]").as_deref(),
            Ok("0123456789abcdef")
        );
        let err = resolve_checkpoint(&listed, "gone [aaaaaaaaaa]").unwrap_err();
        assert_eq!(err.field, "sd_model_checkpoint");
        // A simulated node's model (its id is no hex model id) is named by its family.
        let sim = [model("sim-sdxl", "sim-sdxl")];
        assert_eq!(
            resolve_checkpoint(&sim, "sim-sdxl [sim-sdxl]").as_deref(),
            Ok("sd15")
        );
        // Families and unknown ids go on to the native validation.
        assert_eq!(resolve_checkpoint(&listed, "sdxl").as_deref(), Ok("sdxl"));
        assert!(resolve_checkpoint(&listed, " ").is_err());
    }
}
