//! OTLP export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the coordinator's REST `request` span and
//! the node's `job` span reach a collector (a fake one here, the real OTLP/gRPC service), each
//! under its service name and joined by the request id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_tests::{ClusterSandbox, NodeSpec, binaries};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

/// A span as the collector got it: service, name, string attributes.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    attributes: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(a.value.as_ref()))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    got.push(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(a.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the fake collector on a free loopback port; answers its endpoint.
fn start_collector(collector: Collector) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the collector");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("the listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(incoming)
                .await;
        });
    });
    Ok(format!("http://{addr}"))
}

#[test]
fn spans_go_to_an_otlp_collector_when_one_is_configured() -> anyhow::Result<()> {
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone())?;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut cluster = ClusterSandbox::start(binaries!(), &otel)?;
    let mut node = NodeSpec::sim("painter", "sd15");
    for (k, v) in otel {
        node = node.env(k, v);
    }
    cluster.add_node(node)?;
    cluster.wait_for_online(&["painter"], Duration::from_secs(30))?;
    let reply = ureq::post(&format!("{}/v1/generate", cluster.base_url()))
        .header("x-request-id", "otlp-check-42")
        .send_json(json!({"prompt": "a fox", "size": "64x64", "steps": 2}))?;
    assert_eq!(reply.status(), 200);
    let spans = || {
        collector
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    };
    let found = |service: &str, name: &str, key: &str| {
        spans().iter().any(|s| {
            s.service == service
                && s.name == name
                && s.attributes.get(key).map(String::as_str) == Some("otlp-check-42")
        })
    };
    cluster.wait_until(
        Duration::from_secs(30),
        "both spans at the collector",
        |_| {
            Ok(found("drover-coordinator", "request", "request_id")
                && found("drover-node", "job", "trace_id"))
        },
    )?;
    Ok(())
}
