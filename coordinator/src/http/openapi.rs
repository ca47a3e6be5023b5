//! `GET /openapi.json`: the OpenAPI 3.1 document of the REST API, derived by `utoipa` from the
//! route table ([`super::routes`]: each handler's actix-web route macro gives its method and
//! path, its `#[utoipa::path]` its parameters, body and answers) and from the request, response
//! and error types (`ToSchema`), so a route or a field cannot be left out of it.
//!
//! Added here: the error answers, one response component per [`ErrorCode`] (named by the status
//! it maps to, all with the shared [`ErrorBody`]), and the security schemes. The tests hold the
//! document to the code: every status an operation documents is its error's mapped status, every
//! reference resolves, and the request schema's limits are the validator's.

use std::sync::OnceLock;

#[cfg(test)]
use super::responses::component_of;
use super::responses::error_components;
pub use super::responses::{ADMIN_TOKEN, API_KEY, BEARER_KEY, ERROR_RESPONSES};

use drover_shared::error::ErrorBody;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_actix_web::AppExt as _;

/// What no derive states: the title, the error responses and the security schemes.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Drover",
        description = "Distributed Stable Diffusion scheduler: REST API of the coordinator."
    ),
    components(schemas(ErrorBody, super::compat::Txt2ImgInfo)),
    tags(
        (name = "jobs", description = "Submit jobs, follow them, fetch their images"),
        (name = "farm", description = "Nodes, models, styles, health and metrics"),
        (name = "compat", description = "Endpoints of the Python LCM server and AUTOMATIC1111"),
        (name = "pages", description = "HTML pages and this document")
    )
)]
struct Base;

/// The document: [`Base`] plus every operation of the route table.
pub fn document() -> OpenApi {
    let (_, mut doc) = actix_web::App::new()
        .into_utoipa_app()
        .openapi(<Base as utoipa::OpenApi>::openapi())
        .configure(super::routes)
        .split_for_parts();
    doc.info.version = drover_shared::VERSION.to_string();
    let components = doc.components.get_or_insert_with(Default::default);
    for name in ["Txt2ImgRequest", "Img2ImgRequest"] {
        if let Some(schema) = components.schemas.remove(name) {
            components
                .schemas
                .insert(name.into(), super::compat::txt2img_request_schema(schema));
        }
    }
    for (name, response) in error_components() {
        components.responses.insert(name.to_string(), response);
    }
    components.add_security_scheme(
        API_KEY,
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-Api-Key",
            "A client API key (DROVER_API_KEYS); needed only when keys are configured",
        ))),
    );
    components.add_security_scheme(
        BEARER_KEY,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "A client API key as a bearer token; needed only when keys are configured",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        ADMIN_TOKEN,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "DROVER_ADMIN_TOKEN; without one configured, admin calls come from loopback \
                     only (or anywhere with DROVER_INSECURE)",
                ))
                .build(),
        ),
    );
    doc
}

/// The document as JSON, made once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        serde_json::to_string(&document()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot serialise the openapi document");
            String::from("{}")
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use drover_shared::job::{JobRequest, LoraRef, StyleRef};
    use serde_json::{Value, json};

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(json()).expect("the document is JSON")
    }

    /// Every operation of the route table, as (method, path).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                out.push((method.clone(), path.clone(), op.clone()));
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_with_a_success_and_its_errors() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let ops = operations(&doc);
        let listed: BTreeSet<String> = ops.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
        for expected in [
            "get /",
            "get /dashboard/live",
            "get /docs",
            "get /healthz",
            "get /metrics",
            "get /openapi.json",
            "post /v1/generate",
            "post /v1/jobs",
            "post /v1/jobs/batch",
            "get /v1/jobs",
            "get /v1/jobs/{id}",
            "delete /v1/jobs/{id}",
            "get /v1/jobs/{id}/image",
            "get /v1/jobs/{id}/events",
            "get /v1/nodes",
            "get /v1/models",
            "get /v1/upscalers",
            "post /v1/upscale",
            "post /v1/uploads",
            "post /v1/images/edits",
            "delete /v1/uploads/{id}",
            "post /sdapi/v1/extra-single-image",
            "post /superres",
            "post /v1/nodes/{id}/drain",
            "post /v1/nodes/{id}/resume",
            "get /v1/styles",
            "post /generate",
            "post /sdapi/v1/txt2img",
            "post /sdapi/v1/img2img",
            "get /sdapi/v1/sd-models",
            "get /sdapi/v1/options",
            "post /sdapi/v1/options",
            "get /sdapi/v1/loras",
            "get /sdapi/v1/upscalers",
            "get /sdapi/v1/progress",
            "get /sdapi/v1/cmd-flags",
            "post /v1/images/generations",
            "get /sdapi/v1/samplers",
            "get /sdapi/v1/schedulers",
            "get /v1/presets",
            "post /v1/presets/reload",
            "get /v1/cluster",
            "post /v1/cluster/replicas",
            "delete /v1/cluster/replicas/{id}",
        ] {
            assert!(listed.contains(expected), "{expected} is not documented");
        }
        assert_eq!(listed.len(), 45, "{listed:?}");
        let names: BTreeSet<&str> = ERROR_RESPONSES.iter().map(|(n, _)| *n).collect();
        for (name, code) in ERROR_RESPONSES {
            assert_eq!(component_of(*code), *name);
        }
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("security schemes");
        for scheme in [API_KEY, BEARER_KEY, ADMIN_TOKEN] {
            assert!(schemes.contains_key(scheme), "{scheme}");
        }
        for (method, path, op) in &ops {
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{method} {path}: no success"
            );
            assert!(
                !responses.contains_key("default"),
                "{method} {path}: every status is listed, none is left to `default`"
            );
            assert!(op["summary"].is_string(), "{method} {path}: no summary");
            let ids: BTreeSet<&str> = ops
                .iter()
                .filter_map(|(_, _, op)| op["operationId"].as_str())
                .collect();
            for link in responses.values().filter_map(|r| r["links"].as_object()) {
                for (name, target) in link {
                    let id = target["operationId"].as_str().unwrap_or_default();
                    assert!(ids.contains(id), "{method} {path}: link {name} to {id}");
                }
            }
            for (status, response) in responses {
                // An error answer is a reference to the component of its code, under the
                // status that code maps to.
                let Some(reference) = response["$ref"].as_str() else {
                    continue;
                };
                let name = reference
                    .strip_prefix("#/components/responses/")
                    .expect("a response reference");
                let (_, code) = ERROR_RESPONSES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("{method} {path}: unknown response {name}"));
                assert_eq!(
                    status,
                    &code.http_status().to_string(),
                    "{method} {path}: {name}"
                );
                assert!(names.contains(name));
            }
            for requirement in op["security"].as_array().into_iter().flatten() {
                for scheme in requirement.as_object().expect("a requirement").keys() {
                    assert!(schemes.contains_key(scheme), "{method} {path}: {scheme}");
                }
            }
            // Admin calls need the admin token; client calls take a key when keys are set.
            if path.starts_with("/v1/nodes/") {
                assert_eq!(
                    op["security"],
                    json!([{ ADMIN_TOKEN: [] }]),
                    "{method} {path}"
                );
            }
            if path.contains("{id}") {
                let params = op["parameters"].as_array().expect("parameters");
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == "id" && p["in"] == "path"),
                    "{method} {path}: {params:?}"
                );
            }
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(value: &Value, doc: &Value, seen: &mut usize) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(reference)) = map.get("$ref") {
                        let pointer = reference.strip_prefix('#').expect("a local reference");
                        assert!(
                            doc.pointer(pointer).is_some(),
                            "{reference} does not resolve"
                        );
                        *seen += 1;
                    }
                    map.values().for_each(|v| walk(v, doc, seen));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc, seen)),
                _ => {}
            }
        }
        let doc = doc();
        let mut seen = 0;
        walk(&doc, &doc, &mut seen);
        assert!(seen > 50, "{seen} references");
    }

    /// A field added to `JobRequest` is in the document (the schema is derived; this fails if a
    /// field is skipped or the schema is ever written by hand again).
    #[test]
    fn every_job_request_field_is_documented() {
        let doc = doc();
        let schema = &doc["components"]["schemas"]["JobRequest"];
        let full = JobRequest {
            prompt: "a cat".into(),
            negative_prompt: Some("a dog".into()),
            model: Some("sd15".into()),
            size: Some("512x512".into()),
            steps: Some(4),
            guidance_scale: Some(1.5),
            sampler: Some("Euler a".into()),
            scheduler: Some("karras".into()),
            guidance_rescale: Some(0.7),
            seed: Some(7),
            loras: vec![LoraRef {
                name: "ink".into(),
                strength: 1.0,
            }],
            style_lora: Some(StyleRef {
                style: "ink".into(),
                level: 1,
            }),
            priority: Some(1),
            init_image: Some("iVBORw0KGgo=".into()),
            mask: Some("iVBORw0KGgo=".into()),
            strength: Some(0.5),
            resize_mode: Some(drover_shared::image::ResizeMode::Crop),
            mask_blur: Some(4),
            upscale: Some(drover_shared::job::UpscaleRequest {
                model: Some("x4".into()),
                passes: Some(1),
                scale: Some(2.0),
            }),
            preset: Some("portrait".into()),
        };
        let sent = serde_json::to_value(&full).expect("json");
        let fields: BTreeSet<&String> = sent.as_object().expect("an object").keys().collect();
        let documented: BTreeSet<&String> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .collect();
        assert_eq!(fields, documented);
        assert_eq!(schema["required"], json!(["prompt"]));
        // Unknown fields are refused, and the document says so.
        assert_eq!(schema["additionalProperties"], json!(false));
        assert!(JobRequest::from_json(br#"{"prompt":"x","colour":1}"#).is_err());
        // The batch body is a list of the same requests.
        let batch = &doc["paths"]["/v1/jobs/batch"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(batch["$ref"], "#/components/schemas/BatchRequest");
        let jobs = &doc["components"]["schemas"]["BatchRequest"]["properties"]["jobs"];
        assert_eq!(jobs["items"]["$ref"], "#/components/schemas/JobRequest");
        assert_eq!(jobs["minItems"], 1);
        assert_eq!(jobs["maxItems"], crate::http::MAX_BATCH_JOBS);
    }

    /// `GET /healthz` answers the documented `Health`, field for field (its handler writes the
    /// JSON by hand).
    #[test]
    fn healthz_answers_the_documented_health() {
        use actix_web::{App, test, web};
        actix_rt::System::new().block_on(async {
            let dir = tempfile::tempdir().expect("a folder");
            let config = crate::config::Config::for_tests(dir.path().to_path_buf());
            let app = test::init_service(
                App::new()
                    .app_data(web::Data::new(crate::http::AppState::for_tests(config)))
                    .configure(crate::http::configure),
            )
            .await;
            let request = test::TestRequest::get().uri("/healthz").to_request();
            let response = test::call_service(&app, request).await;
            assert_eq!(response.status(), 200);
            let health: crate::http::nodes::Health = test::read_body_json(response).await;
            assert!(matches!(
                health.status,
                crate::http::nodes::HealthStatus::Ok
            ));
            assert!(health.store.writable);
        });
    }

    fn validate(request: Value) -> bool {
        let body = serde_json::to_vec(&request).expect("json");
        JobRequest::from_json(&body)
            .and_then(|r| r.validate(|| 1))
            .is_ok()
    }

    /// The limits the document states are the ones the validator enforces: the last value
    /// inside each documented bound is accepted, the first outside refused.
    #[test]
    fn the_documented_limits_are_the_validators() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        let request = &schemas["JobRequest"]["properties"];
        let with = |field: &str, value: Value| {
            let mut r = json!({"prompt": "a cat"});
            r[field] = value;
            r
        };
        for field in ["steps", "seed", "priority"] {
            assert_eq!(
                request[field]["type"],
                json!(["integer", "null"]),
                "{field}"
            );
            let min = request[field]["minimum"].as_i64().expect(field);
            let max = request[field]["maximum"].as_i64().expect(field);
            assert!(validate(with(field, json!(min))), "{field} {min}");
            assert!(validate(with(field, json!(max))), "{field} {max}");
            assert!(
                !validate(with(field, json!(max + 1))),
                "{field} {}",
                max + 1
            );
            assert!(
                !validate(with(field, json!(min - 1))),
                "{field} {}",
                min - 1
            );
        }
        let guidance = &request["guidance_scale"];
        let (min, max) = (
            guidance["minimum"].as_f64().expect("minimum"),
            guidance["maximum"].as_f64().expect("maximum"),
        );
        for (value, ok) in [
            (min, true),
            (max, true),
            (min - 0.01, false),
            (max + 0.01, false),
        ] {
            assert_eq!(
                validate(with("guidance_scale", json!(value))),
                ok,
                "{value}"
            );
        }
        let max_chars = request["prompt"]["maxLength"].as_u64().expect("prompt") as usize;
        assert_eq!(request["negative_prompt"]["maxLength"], json!(max_chars));
        assert!(validate(json!({"prompt": "é".repeat(max_chars)})));
        assert!(!validate(json!({"prompt": "é".repeat(max_chars + 1)})));
        assert!(!validate(
            json!({"prompt": "a", "negative_prompt": "é".repeat(max_chars + 1)})
        ));
        // Not only white space: a character that is none in any regex dialect (ECMA-262's `\s`
        // leaves out U+0085, which `trim` removes).
        assert_eq!(request["prompt"]["pattern"], "[^\\s\\u0085]");
        for blank in [" \t\n", "\u{85}", "\u{3000}\u{2028}"] {
            assert!(!validate(json!({ "prompt": blank })), "{blank:?}");
        }
        // Sizes: each side one of the pattern's alternatives, exactly what `Size` parses.
        let pattern = request["size"]["pattern"].as_str().expect("size pattern");
        let sides: BTreeSet<u32> = pattern
            .trim_start_matches("^(?:")
            .split(")x(?:")
            .next()
            .expect("sides")
            .split('|')
            .map(|s| s.parse().expect("a side"))
            .collect();
        assert_eq!(
            pattern,
            format!(
                "^(?:{0})x(?:{0})$",
                sides
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join("|")
            )
        );
        for side in 0..=4200 {
            let ok = validate(with("size", json!(format!("{side}x512"))));
            assert_eq!(ok, sides.contains(&side), "width {side}");
            let ok = validate(with("size", json!(format!("512x{side}"))));
            assert_eq!(ok, sides.contains(&side), "height {side}");
        }
        // Models: the families by name, a hex model id of up to 128 digits, or a model name.
        assert_eq!(
            request["model"]["pattern"],
            "^(?!sdxl_refiner$)(sd15|sd2|sdxl|[0-9A-Fa-f]{1,128}|[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})?$"
        );
        for model in [
            "",
            "sd15",
            "sd2",
            "sdxl",
            "0",
            &"aF".repeat(64),
            "sd3",
            "dreamshaper_8.safetensors",
            &"a".repeat(128),
        ] {
            assert!(validate(with("model", json!(model))), "{model}");
        }
        for model in [
            "sdxl_refiner",
            ".hidden",
            "two words",
            "a/b",
            &"a".repeat(129),
        ] {
            assert!(!validate(with("model", json!(model))), "{model}");
        }
        // LoRAs: at most 8, names as the pattern says, strengths in range.
        let loras = &request["loras"];
        let max = loras["maxItems"].as_u64().expect("maxItems") as usize;
        let stack = |n: usize| {
            (0..n)
                .map(|i| json!({"name": format!("l{i}")}))
                .collect::<Vec<_>>()
        };
        assert!(validate(with("loras", json!(stack(max)))));
        assert!(!validate(with("loras", json!(stack(max + 1)))));
        let lora = &schemas["LoraRef"]["properties"];
        assert_eq!(
            lora["name"]["pattern"],
            "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$"
        );
        assert_eq!(
            schemas["StyleRef"]["properties"]["style"]["pattern"],
            lora["name"]["pattern"]
        );
        for (name, ok) in [
            ("a", true),
            ("_x-1.b", true),
            (".hidden", false),
            ("a/b", false),
            ("", false),
        ] {
            assert_eq!(
                validate(with("loras", json!([{ "name": name }]))),
                ok,
                "{name:?}"
            );
        }
        assert!(validate(with(
            "loras",
            json!([{ "name": "a".repeat(128) }])
        )));
        assert!(!validate(with(
            "loras",
            json!([{ "name": "a".repeat(129) }])
        )));
        let (min, max) = (
            lora["strength"]["minimum"].as_f64().expect("min"),
            lora["strength"]["maximum"].as_f64().expect("max"),
        );
        for (strength, ok) in [
            (min, true),
            (max, true),
            (min - 0.01, false),
            (max + 0.01, false),
        ] {
            assert_eq!(
                validate(with(
                    "loras",
                    json!([{ "name": "a", "strength": strength }])
                )),
                ok,
                "{strength}"
            );
        }
    }
}
