//! `GET /openapi.json`: the OpenAPI 3.0 document of the REST API, assembled here next to the
//! routes (a test checks every documented operation is routed) from the same limits the
//! validators use.

use drover_shared::job::{DEFAULT_STEPS, MAX_STEPS};
use serde_json::{Value, json};

/// Every operation: method, path, summary, request body schema (if any), success response.
pub const OPERATIONS: &[(&str, &str, &str)] = &[
    ("get", "/", "Dashboard (HTML)"),
    (
        "get",
        "/dashboard/live",
        "The dashboard's live part (HTML fragment)",
    ),
    ("get", "/docs", "Interactive API page (HTML)"),
    ("get", "/healthz", "Liveness and node counts"),
    ("get", "/metrics", "Prometheus metrics"),
    ("get", "/openapi.json", "This document"),
    (
        "post",
        "/v1/generate",
        "Submit a job and wait for its image",
    ),
    ("post", "/v1/jobs", "Submit a job"),
    (
        "post",
        "/v1/jobs/batch",
        "Submit up to 256 jobs at once, all or none",
    ),
    ("get", "/v1/jobs", "Unfinished jobs, oldest first"),
    (
        "get",
        "/v1/jobs/{id}",
        "One job: state, lease, attempts, progress",
    ),
    ("delete", "/v1/jobs/{id}", "Cancel a job"),
    ("get", "/v1/jobs/{id}/image", "The PNG of a finished job"),
    (
        "get",
        "/v1/jobs/{id}/events",
        "Live job events (server-sent events)",
    ),
    ("get", "/v1/nodes", "Registered nodes"),
    (
        "get",
        "/v1/models",
        "Models the farm serves: family, nodes, sizes, LoRAs",
    ),
    (
        "post",
        "/v1/nodes/{id}/drain",
        "Give a node no new work (admin)",
    ),
    (
        "post",
        "/v1/nodes/{id}/resume",
        "Give a drained node work again (admin)",
    ),
    ("get", "/v1/styles", "The style catalog"),
    ("post", "/generate", "Python LCM server compatibility"),
    (
        "post",
        "/sdapi/v1/txt2img",
        "AUTOMATIC1111 txt2img compatibility",
    ),
];

fn job_request_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "maxLength": 2000},
            "negative_prompt": {"type": "string", "maxLength": 2000},
            "model": {"type": "string", "description": "sd15, sd2, sdxl or a model id"},
            "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$",
                     "description": "WxH, multiples of 8 in 64..=2048"},
            "steps": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS, "default": DEFAULT_STEPS},
            "guidance_scale": {"type": "number", "minimum": 0, "maximum": 20},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2147483647},
            "loras": {"type": "array", "items": {
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": {"type": "string"}, "strength": {"type": "number"}}}},
            "style_lora": {"type": "object", "additionalProperties": false, "required": ["style"],
                "properties": {"style": {"type": "string"}, "level": {"type": "integer", "minimum": 0}}},
            "priority": {"type": "integer", "minimum": -10, "maximum": 10}
        }
    })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {}
            }
        }}
    })
}

fn operation(method: &str, path: &str, summary: &str) -> Value {
    let error = json!({"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}});
    let json_ok =
        |d: &str| json!({"description": d, "content": {"application/json": {"schema": {}}}});
    let png = json!({"description": "PNG image", "content": {"image/png": {
        "schema": {"type": "string", "format": "binary"}}}});
    let mut op = json!({"summary": summary, "responses": {"default": error}});
    let body = |schema: Value| json!({"required": true, "content": {"application/json": {"schema": schema}}});
    let lenient = json!({"type": "object", "required": ["prompt"],
        "properties": {"prompt": {"type": "string"}}, "additionalProperties": true});
    let (ok_code, ok) = match (method, path) {
        ("post", "/v1/generate") => {
            op["requestBody"] = body(json!({"$ref": "#/components/schemas/JobRequest"}));
            ("200", png)
        }
        ("post", "/v1/jobs") => {
            op["requestBody"] = body(json!({"$ref": "#/components/schemas/JobRequest"}));
            ("202", json_ok("accepted: id and state"))
        }
        ("post", "/v1/jobs/batch") => {
            op["requestBody"] = body(json!({
                "type": "object", "additionalProperties": false, "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "minItems": 1,
                    "maxItems": crate::http::MAX_BATCH_JOBS,
                    "items": {"$ref": "#/components/schemas/JobRequest"}}}
            }));
            (
                "202",
                json_ok("accepted: every job's id and state, in order"),
            )
        }
        ("post", "/generate") => {
            op["requestBody"] = body(lenient);
            ("200", png)
        }
        ("post", "/sdapi/v1/txt2img") => {
            op["requestBody"] = body(lenient);
            ("200", json_ok("base64 images, parameters, info"))
        }
        ("get", "/v1/jobs/{id}/image") => ("200", png),
        ("get", "/v1/jobs/{id}/events") => (
            "200",
            json!({"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}),
        ),
        ("get", "/" | "/dashboard/live" | "/docs") => (
            "200",
            json!({"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}),
        ),
        ("get", "/metrics") => (
            "200",
            json!({"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        ),
        _ => ("200", json_ok("ok")),
    };
    op["responses"][ok_code] = ok;
    if path.contains("{id}") {
        op["parameters"] = json!([{"name": "id", "in": "path", "required": true,
            "schema": {"type": "string", "format": "uuid"}}]);
    }
    if path.starts_with("/v1/nodes/") {
        op["security"] = json!([{"admin": []}]);
    }
    op
}

/// The OpenAPI 3.0 document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in OPERATIONS {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = operation(method, path, summary);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Drover", "version": drover_shared::VERSION,
                 "description": "Distributed Stable Diffusion scheduler: REST API of the coordinator."},
        "paths": paths,
        "components": {
            "schemas": {"JobRequest": job_request_schema(), "Error": error_schema()},
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_documented_once_with_a_success_response() {
        let doc = document();
        for (method, path, _) in OPERATIONS {
            let op = &doc["paths"][*path][*method];
            assert!(op.is_object(), "{method} {path}");
            let codes: Vec<&String> = op["responses"]
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            assert!(
                codes.iter().any(|c| c.starts_with('2')),
                "{method} {path}: {codes:?}"
            );
        }
        assert_eq!(doc["openapi"], "3.0.3");
    }
}
