//! `GET /`: a server-rendered status page (no scripts, no external assets): nodes with their state,
//! backend, family, busy/free workers, speed, LoRAs and last heartbeat; unfinished jobs with their
//! progress and attempts. It refreshes itself every 2 seconds.

use actix_web::{HttpResponse, web};

use crate::control::{ListJobs, ListNodes, NodeStatus};
use crate::error::Result;
use crate::http::AppState;
use crate::records::JobRecord;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn node_row(n: &NodeStatus) -> String {
    let loras: Vec<String> = n.record.loras.iter().map(|l| esc(&l.name)).collect();
    let speed = if n.record.pixel_steps_per_second > 0.0 {
        format!("{:.0}", n.record.pixel_steps_per_second)
    } else {
        "–".into()
    };
    format!(
        "<tr class=\"{state}\"><td>{name}</td><td>{state}{suspect}</td><td>{backend}</td>\
         <td>{family}</td><td>{busy}/{workers}</td><td>{speed}</td><td>{loras}</td>\
         <td>{seen:.1} s ago</td><td><code>{id}</code></td></tr>",
        name = esc(&n.record.name),
        state = n.state,
        suspect = if n.suspect { " (late)" } else { "" },
        backend = esc(&n.record.backend),
        family = n.record.family,
        busy = n.running,
        workers = n.record.workers,
        loras = if loras.is_empty() {
            "–".into()
        } else {
            loras.join(", ")
        },
        seen = n.last_seen_ms_ago as f64 / 1000.0,
        id = n.record.id,
    )
}

fn job_row(j: &JobRecord) -> String {
    let progress = match j.progress {
        Some((step, total)) => format!("{step}/{total}"),
        None => "–".into(),
    };
    let attempts: Vec<String> = j.attempts.iter().map(|a| esc(&a.outcome)).collect();
    let mut prompt = j.spec.prompt.clone();
    if prompt.chars().count() > 60 {
        prompt = prompt.chars().take(60).collect::<String>() + "…";
    }
    format!(
        "<tr><td><code>{id}</code></td><td>{state}</td><td>{progress}</td><td>{node}</td>\
         <td>{prompt}</td><td>{attempts}</td></tr>",
        id = j.id,
        state = j.state,
        node = j
            .lease
            .as_ref()
            .map_or_else(|| "–".to_string(), |l| l.node_id.to_string()),
        prompt = esc(&prompt),
        attempts = if attempts.is_empty() {
            "–".into()
        } else {
            attempts.join("; ")
        },
    )
}

/// Renders the page from the registry and the unfinished jobs.
pub fn render(nodes: &[NodeStatus], jobs: &[JobRecord]) -> String {
    let online = nodes.iter().filter(|n| n.state == "online").count();
    let busy: usize = nodes.iter().map(|n| n.running).sum();
    let slots: u32 = nodes
        .iter()
        .filter(|n| n.state != "offline")
        .map(|n| n.record.workers)
        .sum();
    let queued = jobs
        .iter()
        .filter(|j| j.state == crate::records::JobState::Queued)
        .count();
    let node_rows: String = nodes.iter().map(node_row).collect();
    let job_rows: String = jobs.iter().map(job_row).collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
<title>Drover</title><style>\
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
table{{border-collapse:collapse;margin-bottom:2em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
th{{background:#f3f3f3}}tr.offline{{color:#999}}tr.draining{{background:#fff6e0}}\
.summary span{{margin-right:2em}}code{{font-size:85%}}</style></head><body>\
<h1>Drover</h1><p class=\"summary\"><span>nodes online: <b id=\"online\">{online}</b> of {total}</span>\
<span>workers busy: <b>{busy}</b> of {slots}</span><span>queued jobs: <b id=\"queued\">{queued}</b></span>\
<span>unfinished jobs: <b>{unfinished}</b></span></p>\
<h2>Nodes</h2><table id=\"nodes\"><tr><th>name</th><th>state</th><th>backend</th><th>family</th>\
<th>busy/workers</th><th>pixel-steps/s</th><th>LoRAs</th><th>last heard</th><th>id</th></tr>{node_rows}</table>\
<h2>Unfinished jobs</h2><table id=\"jobs\"><tr><th>id</th><th>state</th><th>progress</th><th>node</th>\
<th>prompt</th><th>attempts</th></tr>{job_rows}</table>\
<p>API: <a href=\"/openapi.json\">/openapi.json</a> · <a href=\"/metrics\">/metrics</a></p></body></html>",
        total = nodes.len(),
        unfinished = jobs.len(),
    )
}

/// `GET /`.
pub async fn page(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let jobs = state.control.send(ListJobs).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(render(&nodes, &jobs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<b>&\"x\"</b>"),
            "&lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt;"
        );
        let page = render(&[], &[]);
        assert!(page.contains("nodes online: <b id=\"online\">0</b> of 0"));
    }
}
