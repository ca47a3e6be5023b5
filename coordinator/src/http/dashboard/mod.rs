//! The dashboard at `GET /`: server-rendered HTML (it reads fine without scripts) plus a small
//! script of our own, served inline (no CDN, no front-end build), that swaps in a fresh
//! `GET /dashboard/live` fragment every 2 seconds, loads thumbnails and sends drain/resume.
//!
//! The fragment shows nodes (state, backend, family — or each model with whether it is loaded
//! and load/unload buttons —, workers busy/free, measured speed, sizes, LoRAs, last heartbeat,
//! drain/resume buttons), unfinished jobs with progress, attempts and why
//! each queued job waits (every node's skip reason), recent jobs with thumbnails, and SVG charts
//! of throughput, queue depth and per-node speed over the last hour. When API keys are
//! configured, jobs and images need a key (or the admin token), entered in the page.

use std::collections::HashMap;
use std::fmt::Write as _;

use actix_web::{HttpRequest, HttpResponse, get, web};

use crate::control::router::NodeSkip;
use crate::control::{DashboardData, GetDashboard, NodeState, NodeStatus};
use crate::error::Result;
use crate::http::AppState;
use crate::records::{JobRecord, JobState};

mod charts;

use charts::charts;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn short(text: &str, n: usize) -> String {
    if text.chars().count() > n {
        text.chars().take(n).collect::<String>() + "…"
    } else {
        text.to_string()
    }
}

/// Pixel-steps per second, readably.
fn speed(v: f64) -> String {
    if v.is_nan() || v <= 0.0 {
        "–".into()
    } else if v >= 1e6 {
        format!("{:.1} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The node's family, or — for a node that serves several models or reports what it has loaded —
/// each model with its family, whether it is loaded (copies, pinned) and, for admins, a button
/// to load or unload it.
fn models_cell(n: &NodeStatus, admin: bool) -> String {
    let Some(residency) = &n.residency else {
        return n.record.family.to_string();
    };
    let mut out = String::new();
    for m in n.record.catalogue() {
        let copies = residency
            .iter()
            .find(|r| r.model_id == m.model_id)
            .map_or(0, |r| r.copies);
        let (class, state) = if copies > 0 {
            ("loaded", format!("loaded ×{copies}"))
        } else {
            ("unloaded", "not loaded".to_string())
        };
        let action = if copies > 0 { "unload" } else { "load" };
        let button = if admin && n.state.is_connected() && !(m.pinned && copies > 0) {
            format!(
                " <button data-action=\"models/{id}/{action}\" data-node=\"{node}\" \
                 data-name=\"{name} on {node_name}\">{action}</button>",
                id = esc(&m.model_id),
                node = n.record.id,
                name = esc(&m.name),
                node_name = esc(&n.record.name),
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<div class=\"model {class}\">{name} ({family}): {state}{pinned}{button}</div>",
            name = esc(if m.name.is_empty() {
                &m.model_id
            } else {
                &m.name
            }),
            family = m.family,
            pinned = if m.pinned { ", pinned" } else { "" },
        );
    }
    out
}

fn node_row(n: &NodeStatus, admin: bool) -> String {
    let loras: Vec<String> = n.record.loras.iter().map(|l| esc(&l.name)).collect();
    let upscalers: Vec<String> = n
        .record
        .upscalers
        .iter()
        .map(|u| format!("{} ×{}", esc(&u.name), u.scale))
        .collect();
    let sizes: Vec<String> = n.record.sizes.iter().map(|s| s.to_string()).collect();
    let measured = n
        .measured_pixel_steps_per_second
        .map_or_else(|| "–".to_string(), speed);
    let (action, label) = if n.record.draining {
        ("resume", "resume")
    } else {
        ("drain", "drain")
    };
    let button = if admin && n.state.is_connected() {
        format!(
            "<button data-action=\"{action}\" data-node=\"{id}\" data-name=\"{name}\">{label}</button>",
            id = n.record.id,
            name = esc(&n.record.name)
        )
    } else {
        String::new()
    };
    format!(
        "<tr class=\"{state}\" data-node=\"{id}\"><td>{name}</td><td>{state}{suspect}</td><td>{backend}</td>\
         <td>{family}</td><td>{busy}/{workers}{jobs}</td><td>{measured}</td><td>{advertised}</td><td>{sizes}</td>\
         <td>{loras}</td><td>{upscalers}</td><td>{seen:.1} s ago</td><td>{button}</td></tr>",
        name = esc(&n.record.name),
        state = n.state,
        suspect = if n.suspect && n.state != NodeState::Suspect {
            " (late)"
        } else {
            ""
        },
        backend = esc(&n.record.backend),
        family = models_cell(n, admin),
        busy = n.busy_workers,
        jobs = if n.record.max_batch > 1 && n.running > 0 {
            format!(" ({} jobs)", n.running)
        } else {
            String::new()
        },
        workers = if n.record.max_batch > 1 {
            format!("{} × batch {}", n.record.workers, n.record.max_batch)
        } else {
            n.record.workers.to_string()
        },
        advertised = speed(n.record.pixel_steps_per_second),
        sizes = if sizes.is_empty() {
            format!("≤ {:.1} Mpx", n.record.max_pixels as f64 / 1e6)
        } else {
            sizes.join(", ")
        },
        loras = if loras.is_empty() {
            "–".into()
        } else {
            loras.join(", ")
        },
        upscalers = if upscalers.is_empty() {
            "–".into()
        } else {
            upscalers.join(", ")
        },
        seen = n.last_seen_ms_ago as f64 / 1000.0,
        id = n.record.id,
    )
}

/// "painter: busy; xl-box: wrong family (wants sdxl, has sd15)".
fn reasons_text(skips: &[NodeSkip]) -> String {
    let mut parts: Vec<String> = skips
        .iter()
        .map(|s| {
            let v = serde_json::to_value(&s.reason).unwrap_or_default();
            let mut text = v["reason"].as_str().unwrap_or("?").replace('_', " ");
            let extra: Vec<String> = v
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "reason")
                .map(|(k, v)| {
                    format!(
                        "{k} {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    )
                })
                .collect();
            if !extra.is_empty() {
                let _ = write!(text, " ({})", extra.join(", "));
            }
            format!("{}: {text}", s.node)
        })
        .collect();
    if parts.is_empty() {
        parts.push("no node registered".into());
    }
    esc(&parts.join("; "))
}

fn job_row(
    j: &JobRecord,
    names: &HashMap<String, String>,
    waiting: Option<&Vec<NodeSkip>>,
) -> String {
    let progress = match j.progress {
        Some((step, total)) if total > 0 => {
            format!("<progress max=\"{total}\" value=\"{step}\"></progress> {step}/{total}")
        }
        _ => "–".into(),
    };
    let attempts: Vec<String> = j.attempts.iter().map(|a| esc(&a.outcome)).collect();
    let node = j
        .lease
        .as_ref()
        .map(|l| {
            let id = l.node_id.to_string();
            names.get(&id).cloned().unwrap_or(id)
        })
        .unwrap_or_else(|| "–".to_string());
    format!(
        "<tr data-job=\"{id}\"><td><code>{id}</code></td><td>{state}</td><td>{progress}</td><td>{node}</td>\
         <td>{prompt}</td><td>{attempts}</td><td>{waiting}</td></tr>",
        id = j.id,
        state = j.state,
        node = esc(&node),
        prompt = esc(&short(&title(&j.spec), 60)),
        attempts = if attempts.is_empty() {
            "–".into()
        } else {
            attempts.join("; ")
        },
        waiting = waiting.map_or_else(|| "–".to_string(), |w| reasons_text(w)),
    )
}

fn recent_card(j: &JobRecord, names: &HashMap<String, String>, keys: bool) -> String {
    let node = j
        .node_id
        .or(j.attempts.last().map(|a| a.node_id))
        .map(|id| {
            let id = id.to_string();
            names.get(&id).cloned().unwrap_or(id)
        })
        .unwrap_or_else(|| "–".into());
    let picture = if j.state == JobState::Succeeded {
        if keys {
            format!(
                "<img data-job=\"{}\" alt=\"image of job {}\" width=\"96\" height=\"96\">",
                j.id, j.id
            )
        } else {
            format!(
                "<img src=\"/v1/jobs/{id}/image\" data-loaded=\"1\" alt=\"image of job {id}\" width=\"96\" height=\"96\" loading=\"lazy\">",
                id = j.id
            )
        }
    } else {
        format!("<div class=\"noimg\">{}</div>", j.state)
    };
    let error = j
        .error
        .as_deref()
        .map(|e| format!("<div class=\"err\">{}</div>", esc(&short(e, 160))))
        .unwrap_or_default();
    format!(
        "<div class=\"card {state}\" data-job=\"{id}\">{picture}<div><b>{state}</b> on {node}{batch}<br>\
         <small><code>{id}</code></small><br>{prompt}{error}</div></div>",
        state = j.state,
        id = j.id,
        node = esc(&node),
        batch = match j.batch_size {
            Some(n) if n > 1 => format!(" (batch of {n})"),
            _ => String::new(),
        },
        prompt = esc(&short(&title(&j.spec), 80)),
    )
}

/// What a job is, in a line: its prompt, or for a stand-alone upscale what it upscales.
fn title(spec: &drover_shared::job::JobSpec) -> String {
    if spec.task != drover_shared::job::JobTask::Upscale {
        return spec.prompt.clone();
    }
    let size = spec
        .size
        .map(|s| s.to_string())
        .unwrap_or_else(|| "?".into());
    let with = spec
        .upscale
        .as_ref()
        .and_then(|u| u.model.clone())
        .unwrap_or_else(|| "the node's upscaler".into());
    format!("upscale of a {size} image with {with}")
}

/// What the caller may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Jobs, prompts and images (a client key, or no keys configured).
    pub jobs: bool,
    /// Drain/resume buttons (the admin token, or no admin token configured).
    pub admin: bool,
    /// API keys are configured (images then load through the script, with the key).
    pub keys: bool,
}

/// Renders the live part of the page.
pub fn render_live(d: &DashboardData, access: Access) -> String {
    let online = d.nodes.iter().filter(|n| n.state.is_connected()).count();
    let draining = d
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Draining)
        .count();
    let busy: usize = d.nodes.iter().map(|n| n.busy_workers).sum();
    let slots: u32 = d
        .nodes
        .iter()
        .filter(|n| n.state.is_connected())
        .map(|n| n.record.workers)
        .sum();
    let queued = d
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Queued)
        .count();
    let done_hour: u64 = d.history.iter().map(|s| s.succeeded).sum();
    let names: HashMap<String, String> = d
        .nodes
        .iter()
        .map(|n| (n.record.id.to_string(), n.record.name.clone()))
        .collect();
    let node_rows: String = d.nodes.iter().map(|n| node_row(n, access.admin)).collect();
    let mut out = format!(
        "<p class=\"summary\"><span>nodes online: <b id=\"online\">{online}</b> of {total}{drain_note}</span>\
         <span>workers busy: <b id=\"busy\">{busy}</b> of {slots}</span>\
         <span>queued jobs: <b id=\"queued\">{queued}</b></span>\
         <span>unfinished jobs: <b id=\"unfinished\">{unfinished}</b></span>\
         <span>images in the last hour: <b>{done_hour}</b></span></p>{charts}\
         <h2>Nodes</h2><table id=\"nodes\"><tr><th>name</th><th>state</th><th>backend</th><th>models</th>\
         <th>busy/workers</th><th>measured speed</th><th>advertised</th><th>sizes</th><th>LoRAs</th><th>upscalers</th>\
         <th>last heard</th><th></th></tr>{node_rows}</table>",
        total = d.nodes.len(),
        drain_note = if draining > 0 {
            format!(" ({draining} draining)")
        } else {
            String::new()
        },
        unfinished = d.unfinished,
        charts = charts(&d.history, d.history_period_ms),
    );
    if !access.jobs {
        out.push_str(
            "<p id=\"locked\" class=\"note\">API keys are configured: enter a key (or the admin token) above to see jobs and images.</p>",
        );
        return out;
    }
    let job_rows: String = d
        .jobs
        .iter()
        .map(|j| job_row(j, &names, d.waiting.get(&j.id)))
        .collect();
    let recent: String = d
        .recent
        .iter()
        .map(|j| recent_card(j, &names, access.keys))
        .collect();
    let _ = write!(
        out,
        "<h2>Unfinished jobs{more}</h2><table id=\"jobs\"><tr><th>id</th><th>state</th><th>progress</th>\
         <th>node</th><th>prompt</th><th>attempts</th><th>waiting because</th></tr>{job_rows}</table>\
         <h2>Recent jobs</h2><div id=\"recent\">{recent}</div>",
        more = if d.unfinished > d.jobs.len() {
            format!(
                " <small>(oldest {} of {})</small>",
                d.jobs.len(),
                d.unfinished
            )
        } else {
            String::new()
        },
        recent = if recent.is_empty() {
            "<p class=\"note\">none yet</p>".to_string()
        } else {
            recent
        },
    );
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
header{display:flex;gap:1.5em;align-items:center;flex-wrap:wrap}header h1{margin:0}\
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}\
th{background:#f3f3f3}tr.offline{color:#999}tr.draining{background:#fff6e0}\
.summary span{margin-right:2em}code{font-size:85%}.note{color:#666}\
.charts svg{border:1px solid #ddd;margin-right:8px;background:#fcfcfc}.chart text{font-size:10px}\
.chart .title{font-weight:bold}.chart .axis{stroke:#999}\
#recent{display:flex;flex-wrap:wrap;gap:8px}.card{display:flex;gap:6px;border:1px solid #ddd;padding:4px;width:340px;font-size:85%}\
.card img,.noimg{width:96px;height:96px;object-fit:cover;background:#eee}.noimg{display:flex;align-items:center;justify-content:center}\
.card.failed,.card.cancelled{background:#fff0f0}.err{color:#a00}#status{color:#666}";

/// The dashboard's script: refresh the live part, load thumbnails with the key, drain/resume.
const SCRIPT: &str = r#"(function () {
  var token = document.getElementById('token');
  var status = document.getElementById('status');
  var thumbs = {};
  token.value = localStorage.getItem('drover-token') || '';
  function headers() {
    var t = token.value.trim();
    return t ? { 'Authorization': 'Bearer ' + t } : {};
  }
  function say(text) { status.textContent = text; }
  function loadThumbs() {
    document.querySelectorAll('img[data-job]').forEach(function (img) {
      var id = img.getAttribute('data-job');
      if (thumbs[id]) { img.src = thumbs[id]; return; }
      fetch('/v1/jobs/' + id + '/image', { headers: headers() })
        .then(function (r) { return r.ok ? r.blob() : null; })
        .then(function (b) { if (b) { thumbs[id] = URL.createObjectURL(b); img.src = thumbs[id]; } });
    });
  }
  function refresh() {
    fetch('/dashboard/live', { headers: headers(), cache: 'no-store' })
      .then(function (r) {
        if (!r.ok) { say('refresh failed: HTTP ' + r.status); return null; }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        document.getElementById('live').innerHTML = html;
        loadThumbs();
        say('live, updated ' + new Date().toLocaleTimeString());
      })
      .catch(function () { say('coordinator unreachable, retrying'); });
  }
  token.addEventListener('change', function () {
    localStorage.setItem('drover-token', token.value.trim());
    refresh();
  });
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest('button[data-action]');
    if (!b) { return; }
    var action = b.getAttribute('data-action'), name = b.getAttribute('data-name');
    fetch('/v1/nodes/' + b.getAttribute('data-node') + '/' + action, { method: 'POST', headers: headers() })
      .then(function (r) { return r.json().then(function (body) { return [r.ok, body]; }); })
      .then(function (res) {
        say(res[0] ? action + ' ' + name + ': done' : action + ' ' + name + ' failed: ' + res[1].error.message);
        refresh();
      });
  });
  loadThumbs();
  setInterval(refresh, 2000);
})();"#;

/// The whole page around a rendered live part.
pub fn render_page(live: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Drover</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><style>{STYLE}</style></head><body>\
         <header><h1>Drover</h1><label>API key or admin token <input id=\"token\" type=\"password\" \
         autocomplete=\"off\" size=\"28\"></label><span id=\"status\">static view (scripts off)</span>\
         <nav><a href=\"/docs\">API</a> · <a href=\"/openapi.json\">openapi.json</a> · <a href=\"/metrics\">metrics</a></nav></header>\
         <main id=\"live\">{live}</main><script>{SCRIPT}</script></body></html>"
    )
}

fn access(state: &AppState, req: &HttpRequest) -> Access {
    let keys = !state.config.keys.is_empty();
    Access {
        jobs: crate::http::auth::check_client(req).is_ok(),
        admin: crate::http::auth::require_admin(state, req).is_ok(),
        keys,
    }
}

async fn live_html(state: &AppState, req: &HttpRequest) -> Result<String> {
    let data = state.control.send(GetDashboard).await?;
    Ok(render_live(&data, access(state, req)))
}

/// Dashboard (HTML)
///
/// Nodes, unfinished jobs (why each queued one waits), recent jobs and the last hour's charts.
#[utoipa::path(
    tag = "pages",
    responses(
        (status = 200, description = "The dashboard", content_type = "text/html; charset=utf-8",
            body = String),
        (status = 503, response = super::responses::Unavailable),
    )
)]
#[get("/")]
pub async fn index(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse> {
    let live = live_html(&state, &req).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(render_page(&live)))
}

/// The dashboard's live part (HTML fragment)
///
/// What the page's script swaps in every 2 s.
#[utoipa::path(
    tag = "pages",
    responses(
        (status = 200, description = "The live part of the dashboard",
            content_type = "text/html; charset=utf-8", body = String),
        (status = 503, response = super::responses::Unavailable),
    )
)]
#[get("/dashboard/live")]
pub async fn live_part(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse> {
    let live = live_html(&state, &req).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .body(live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> DashboardData {
        DashboardData {
            nodes: Vec::new(),
            jobs: Vec::new(),
            unfinished: 0,
            waiting: HashMap::new(),
            recent: Vec::new(),
            history: Vec::new(),
            history_period_ms: 10_000,
        }
    }

    #[test]
    fn text_is_escaped_and_locked_parts_stay_hidden() {
        assert_eq!(
            esc("<b>&\"x\"</b>"),
            "&lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;"
        );
        let all = Access {
            jobs: true,
            admin: true,
            keys: false,
        };
        let live = render_live(&empty(), all);
        assert!(live.contains("nodes online: <b id=\"online\">0</b> of 0"));
        assert!(live.contains("id=\"jobs\""));
        let locked = render_live(
            &empty(),
            Access {
                jobs: false,
                admin: false,
                keys: true,
            },
        );
        assert!(!locked.contains("id=\"jobs\"") && locked.contains("id=\"locked\""));
        let page = render_page(&live);
        assert!(page.contains("<script>") && !page.contains("src=\"http"));
    }

    #[test]
    fn nodes_with_catalogues_show_each_model_and_what_is_loaded() {
        use crate::records::{ModelAdvert, ModelResidency};
        let model = |id: &str, name: &str, pinned: bool| ModelAdvert {
            model_id: id.into(),
            name: name.into(),
            family: drover_shared::family::ModelFamily::Sd15,
            max_pixels: 1 << 20,
            sizes: Vec::new(),
            samplers: Vec::new(),
            img2img: false,
            inpaint: false,
            bytes: 1,
            pinned,
        };
        let json = serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000001", "name": "multi", "backend": "cpu",
            "family": "sd15", "cross_attention_dim": 768, "model_id": "aa", "workers": 1,
            "max_pixels": 1048576, "loras": [], "version": "t", "pixel_steps_per_second": 0.0,
            "registered_at_ms": 0,
        });
        let mut record: crate::records::NodeRecord = serde_json::from_value(json).unwrap();
        record.models = vec![model("aa", "dream", true), model("bb", "photo", false)];
        let status = NodeStatus {
            record,
            state: NodeState::Online,
            suspect: false,
            running: 0,
            busy_workers: 0,
            last_seen_ms_ago: 0,
            measured_pixel_steps_per_second: None,
            measured_by_batch: Default::default(),
            residency: Some(vec![ModelResidency {
                model_id: "aa".into(),
                copies: 1,
                ..Default::default()
            }]),
            memory_used: Some(1),
        };
        let cell = models_cell(&status, true);
        assert!(
            cell.contains("dream (sd15): loaded ×1, pinned</div>"),
            "a pinned loaded model has no button: {cell}"
        );
        assert!(
            cell.contains("photo (sd15): not loaded <button data-action=\"models/bb/load\""),
            "{cell}"
        );
        assert!(!models_cell(&status, false).contains("<button"));
        let single = NodeStatus {
            residency: None,
            ..status
        };
        assert_eq!(models_cell(&single, true), "sd15");
    }

    #[test]
    fn a_batched_job_says_its_batch() {
        let spec = drover_shared::job::JobRequest {
            prompt: "x".into(),
            ..Default::default()
        }
        .validate(|| 1)
        .unwrap();
        let mut job = JobRecord::new(drover_shared::ids::JobId::random(), spec);
        job.state = JobState::Succeeded;
        job.batch_size = Some(3);
        let card = recent_card(&job, &HashMap::new(), false);
        assert!(card.contains("(batch of 3)"), "{card}");
        job.batch_size = Some(1);
        assert!(!recent_card(&job, &HashMap::new(), false).contains("batch"));
    }
}
