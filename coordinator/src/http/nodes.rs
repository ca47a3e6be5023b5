//! Registry and farm endpoints: health, nodes, models, styles, drain/resume and model orders
//! (admin), metrics.

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use drover_shared::error::ErrorBody;
use drover_shared::ids::NodeId;
use drover_shared::styles::Style;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::require_admin;
use super::responses::{Conflict, Forbidden, Internal, NotFound, Unauthorized, Unavailable};
use super::state::AppState;
use crate::control::{ListNodes, ModelOrdered, NodeState, NodeStatus, OrderModel, SetDraining};
use crate::error::{CoordinatorError, Result};
use drover_shared::models::ModelAction;

/// The answer of `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok`, or `degraded` while the store cannot write.
    pub status: HealthStatus,
    /// Registered nodes.
    pub nodes: usize,
    /// Of those, online.
    pub nodes_online: usize,
    /// The store's state.
    pub store: StoreState,
}

/// Whether the coordinator takes work.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Everything works.
    Ok,
    /// The store cannot write: jobs are refused.
    Degraded,
}

/// The store's part of [`Health`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreState {
    /// Whether the store takes writes (new jobs) now.
    pub writable: bool,
    /// Why not: the last failure.
    pub error: Option<String>,
    /// Since when not (Unix time, ms).
    pub since_ms: Option<u64>,
}

/// What a `503` of `GET /healthz` carries: the degraded health, or the error of a coordinator
/// shutting down.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum Unhealthy {
    /// The store cannot write.
    Degraded(Health),
    /// The coordinator cannot answer.
    Error(ErrorBody),
}

/// A node's drain flag after `POST /v1/nodes/{id}/drain` or `/resume`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeDrain {
    /// The node.
    pub id: NodeId,
    /// Its name.
    pub name: String,
    /// Whether it is draining now.
    pub draining: bool,
}

/// Liveness, node counts and the store's state
///
/// `ok` (200), or `degraded` (503) while the store cannot write, with why and since when.
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "The coordinator works", body = Health),
        (status = 503, description = "The store cannot write (jobs are refused), or the \
            coordinator is shutting down", body = Unhealthy),
    )
)]
#[get("/healthz")]
pub(crate) async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    let online = nodes
        .iter()
        .filter(|n| n.state == NodeState::Online)
        .count();
    let store = state.store.health();
    let (mut response, status) = if store.writable {
        (HttpResponse::Ok(), HealthStatus::Ok)
    } else {
        (HttpResponse::ServiceUnavailable(), HealthStatus::Degraded)
    };
    Ok(response.json(Health {
        status,
        nodes: nodes.len(),
        nodes_online: online,
        store: StoreState {
            writable: store.writable,
            error: store.error,
            since_ms: store.since_ms,
        },
    }))
}

/// Prometheus metrics (OpenMetrics text)
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "Counters, histograms and gauges of the farm",
            content_type = crate::metrics::CONTENT_TYPE, body = String),
        (status = 503, response = Unavailable),
    )
)]
#[get("/metrics")]
pub(crate) async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse> {
    let mut farm = state.control.send(crate::control::GetGauges).await?;
    let store = state.store.health();
    farm.store_writable = store.writable;
    farm.store_failed_writes = store.failed_writes;
    let text = state.metrics.render(&farm);
    Ok(HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(text))
}

/// Registered nodes
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "Every registered node with its live state, by name",
            body = Vec<NodeStatus>),
        (status = 503, response = Unavailable),
    )
)]
#[get("/v1/nodes")]
pub(crate) async fn list_nodes(state: web::Data<AppState>) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.control.send(ListNodes).await?))
}

/// One model the farm serves, as `GET /v1/models` lists it.
#[derive(Debug, PartialEq, Serialize, ToSchema)]
pub struct ModelView {
    /// The model id (sha256 of its header; a sim id for simulated nodes).
    pub model_id: String,
    /// Its family.
    pub family: drover_shared::family::ModelFamily,
    /// Backends of the nodes serving it.
    pub backends: Vec<String>,
    /// Nodes registered with it in their catalogue.
    pub nodes: usize,
    /// Of those, online now.
    pub nodes_online: usize,
    /// Workers on its online nodes.
    pub workers_online: u32,
    /// Names of the nodes that serve it.
    pub served_by: Vec<String>,
    /// Names of the connected nodes where it is loaded now (a job there starts without loading
    /// it); nodes that keep every model loaded count as loaded.
    pub resident_on: Vec<String>,
    /// Largest image (pixels) some node of it renders.
    pub max_pixels: u64,
    /// The only sizes its nodes render, when every node of it has fixed sizes; empty: any size
    /// up to `max_pixels` on some node.
    pub sizes: Vec<drover_shared::job::Size>,
    /// LoRAs of its family some node of it offers.
    pub loras: Vec<String>,
    /// Upscalers some node of it runs after generation (a job's `upscale.model`).
    pub upscalers: Vec<String>,
    /// Its name as its nodes' operators gave it (`MODEL`), the first one registered.
    pub model_name: String,
}

/// The models of the registry (every node's catalogue), one entry per model id, by family then
/// id.
pub fn models(nodes: &[crate::control::NodeStatus]) -> Vec<ModelView> {
    use std::collections::{BTreeMap, BTreeSet};
    type Served<'a> = (&'a crate::control::NodeStatus, crate::records::ModelAdvert);
    let mut by_model: BTreeMap<(String, String), Vec<Served<'_>>> = BTreeMap::new();
    for n in nodes {
        for m in n.record.catalogue() {
            by_model
                .entry((m.family.to_string(), m.model_id.to_ascii_lowercase()))
                .or_default()
                .push((n, m));
        }
    }
    by_model
        .into_values()
        .map(|group| {
            let first = &group[0].1;
            let online: Vec<_> = group
                .iter()
                .filter(|(n, _)| n.state.is_connected())
                .collect();
            let fixed = group.iter().all(|(_, m)| !m.sizes.is_empty());
            let sizes: BTreeSet<_> = if fixed {
                group
                    .iter()
                    .flat_map(|(_, m)| m.sizes.iter().map(|s| (s.width, s.height)))
                    .collect()
            } else {
                BTreeSet::new()
            };
            let names = |nodes: &mut dyn Iterator<Item = &Served<'_>>| {
                nodes
                    .map(|(n, _)| n.record.name.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            ModelView {
                model_name: group
                    .iter()
                    .map(|(_, m)| m.name.clone())
                    .find(|n| !n.is_empty())
                    .unwrap_or_else(|| first.model_id.clone()),
                model_id: first.model_id.clone(),
                family: first.family,
                backends: group
                    .iter()
                    .map(|(n, _)| n.record.backend.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                nodes: group.len(),
                nodes_online: online.len(),
                workers_online: online.iter().map(|(n, _)| n.record.workers).sum(),
                served_by: names(&mut group.iter()),
                resident_on: names(&mut online.iter().copied().filter(|(n, m)| {
                    n.residency.as_ref().is_none_or(|r| {
                        r.iter()
                            .any(|x| x.copies > 0 && x.model_id.eq_ignore_ascii_case(&m.model_id))
                    })
                })),
                max_pixels: group.iter().map(|(_, m)| m.max_pixels).max().unwrap_or(0),
                sizes: sizes
                    .into_iter()
                    .map(|(width, height)| drover_shared::job::Size { width, height })
                    .collect(),
                loras: group
                    .iter()
                    .flat_map(|(n, m)| {
                        n.record
                            .loras
                            .iter()
                            .filter(|l| l.family == m.family)
                            .map(|l| l.name.clone())
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                upscalers: group
                    .iter()
                    .flat_map(|(n, _)| n.record.upscalers.iter().map(|u| u.name.clone()))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            }
        })
        .collect()
}

/// One upscaler the farm runs, as `GET /v1/upscalers` lists it.
#[derive(Debug, PartialEq, Serialize, ToSchema)]
pub struct UpscalerView {
    /// Its name (a job's `upscale.model`).
    pub name: String,
    /// Output pixels per input pixel on each side.
    pub scale: u32,
    /// The network, as the first node holding it describes it.
    pub network: String,
    /// Nodes registered with it.
    pub nodes: usize,
    /// Of those, online now.
    pub nodes_online: usize,
    /// Models of the nodes holding it: jobs for these may ask for it.
    pub model_ids: Vec<String>,
}

/// The upscalers of the registry, one entry per name and scale, by name.
pub fn upscalers(nodes: &[crate::control::NodeStatus]) -> Vec<UpscalerView> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_name: BTreeMap<(String, u32), (String, Vec<&crate::control::NodeStatus>)> =
        BTreeMap::new();
    for n in nodes {
        for u in &n.record.upscalers {
            by_name
                .entry((u.name.clone(), u.scale))
                .or_insert_with(|| (u.network.clone(), Vec::new()))
                .1
                .push(n);
        }
    }
    by_name
        .into_iter()
        .map(|((name, scale), (network, group))| UpscalerView {
            name,
            scale,
            network,
            nodes: group.len(),
            nodes_online: group.iter().filter(|n| n.state.is_connected()).count(),
            model_ids: group
                .iter()
                .map(|n| n.record.model_id.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        })
        .collect()
}

/// Upscalers the farm runs after generation: name, scale, network, nodes
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "One entry per upscaler name and scale, by name",
            body = Vec<UpscalerView>),
        (status = 503, response = Unavailable),
    )
)]
#[get("/v1/upscalers")]
pub(crate) async fn list_upscalers(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    Ok(HttpResponse::Ok().json(upscalers(&nodes)))
}

/// Models the farm serves: family, nodes, sizes, LoRAs
#[utoipa::path(
    tag = "farm",
    responses(
        (status = 200, description = "One entry per model id, by family then id",
            body = Vec<ModelView>),
        (status = 503, response = Unavailable),
    )
)]
#[get("/v1/models")]
pub(crate) async fn list_models(state: web::Data<AppState>) -> Result<HttpResponse> {
    let nodes = state.control.send(ListNodes).await?;
    Ok(HttpResponse::Ok().json(models(&nodes)))
}

/// The style catalog
#[utoipa::path(
    tag = "farm",
    responses((status = 200, description = "Every style, by id", body = Vec<Style>))
)]
#[get("/v1/styles")]
pub(crate) async fn list_styles(state: web::Data<AppState>) -> HttpResponse {
    let styles: Vec<_> = state.styles.styles().collect();
    HttpResponse::Ok().json(styles)
}

pub(crate) async fn set_draining(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: &str,
    draining: bool,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let node_id = id
        .parse()
        .map_err(|_| CoordinatorError::NotFound(format!("node {id}")))?;
    let record = state
        .control
        .send(SetDraining { node_id, draining })
        .await??;
    Ok(HttpResponse::Ok().json(NodeDrain {
        id: record.id,
        name: record.name,
        draining: record.draining,
    }))
}

/// Give a node no new work (admin)
///
/// The node finishes what it runs and takes nothing new until resumed.
#[utoipa::path(
    tag = "farm",
    params(("id" = inline(NodeId), Path, description = "The node")),
    responses(
        (status = 200, description = "The node is draining", body = NodeDrain),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("adminToken" = []))
)]
#[post("/v1/nodes/{id}/drain")]
pub(crate) async fn drain_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    set_draining(state, req, &id, true).await
}

/// Load, unload, pin or unpin a model on a node (admin)
///
/// `load` loads a copy now (evicting idle models as a job would), `unload` drops its idle
/// copies (refused by the node while pinned), `pin` loads it and keeps it, `unpin` makes it
/// evictable again. The node carries the order out in the background: `202` says it was sent;
/// the node's `residency` in `GET /v1/nodes` shows the outcome, its log the reason of a refusal.
#[utoipa::path(
    tag = "farm",
    params(
        ("id" = inline(NodeId), Path, description = "The node"),
        ("model" = String, Path, description = "The model: its id or its name on the node"),
        ("action" = inline(ModelAction), Path, description = "What to do"),
    ),
    responses(
        (status = 202, description = "The order was sent to the node", body = ModelOrdered),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("adminToken" = []))
)]
#[post("/v1/nodes/{id}/models/{model}/{action}")]
pub(crate) async fn order_model(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse> {
    require_admin(&state, &req)?;
    let (id, model, action) = path.into_inner();
    let node_id = id
        .parse()
        .map_err(|_| CoordinatorError::NotFound(format!("node {id}")))?;
    let action: ModelAction = action.parse().map_err(CoordinatorError::NotFound)?;
    let ordered = state
        .control
        .send(OrderModel {
            node_id,
            model,
            action,
        })
        .await??;
    Ok(HttpResponse::Accepted().json(ordered))
}

/// Give a drained node work again (admin)
#[utoipa::path(
    tag = "farm",
    params(("id" = inline(NodeId), Path, description = "The node")),
    responses(
        (status = 200, description = "The node takes work again", body = NodeDrain),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("adminToken" = []))
)]
#[post("/v1/nodes/{id}/resume")]
pub(crate) async fn resume_node(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    set_draining(state, req, &id, false).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{LoraAdvert, NodeRecord};
    use drover_shared::family::ModelFamily;
    use drover_shared::job::Size;

    fn node(name: &str, model: &str, backend: &str, state: NodeState) -> NodeStatus {
        NodeStatus {
            record: NodeRecord {
                id: NodeId::random(),
                name: name.into(),
                backend: backend.into(),
                family: ModelFamily::Sd15,
                cross_attention_dim: 768,
                model_id: model.into(),
                workers: 3,
                max_pixels: 512 * 512,
                loras: vec![LoraAdvert {
                    name: format!("{name}-style"),
                    family: ModelFamily::Sd15,
                    lcm: false,
                }],
                version: "test".into(),
                pixel_steps_per_second: 0.0,
                registered_at_ms: 0,
                draining: false,
                sizes: Vec::new(),
                samplers: Vec::new(),
                img2img: false,
                inpaint: false,
                model_name: format!("{model}.safetensors"),
                upscalers: Vec::new(),
                max_batch: 1,
                models: Vec::new(),
                memory_budget: 0,
            },
            state,
            suspect: false,
            running: 0,
            busy_workers: 0,
            last_seen_ms_ago: 0,
            measured_pixel_steps_per_second: None,
            measured_by_batch: Default::default(),
            residency: None,
            memory_used: None,
        }
    }

    #[test]
    fn models_group_nodes_by_model_id() {
        let square = |s| Size {
            width: s,
            height: s,
        };
        let mut npu = node("npu-a", "m1", "rknn", NodeState::Online);
        npu.record.sizes = vec![square(384)];
        let mut npu2 = node("npu-b", "m1", "rknn", NodeState::Offline);
        npu2.record.sizes = vec![square(512), square(384)];
        let listed = models(&[npu, node("gpu", "m2", "cuda", NodeState::Online), npu2]);
        assert_eq!(listed.len(), 2);
        let m1 = &listed[0];
        assert_eq!(
            (
                m1.model_id.as_str(),
                m1.nodes,
                m1.nodes_online,
                m1.workers_online
            ),
            ("m1", 2, 1, 3)
        );
        assert_eq!(m1.backends, vec!["rknn".to_string()]);
        assert_eq!(m1.sizes, vec![square(384), square(512)]);
        assert_eq!(
            m1.loras,
            vec!["npu-a-style".to_string(), "npu-b-style".to_string()]
        );
        // A model that some node renders at any size lists no fixed sizes.
        let mut mixed = node("npu-c", "m2", "rknn", NodeState::Online);
        mixed.record.sizes = vec![square(384)];
        let listed = models(&[node("gpu", "m2", "cuda", NodeState::Online), mixed]);
        assert!(listed[0].sizes.is_empty());
        assert_eq!(
            listed[0].backends,
            vec!["cuda".to_string(), "rknn".to_string()]
        );
    }
}
