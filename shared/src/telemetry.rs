//! OTLP export of the `tracing` spans, off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: OTLP over gRPC (a collector's port 4317), the
//! standard `OTEL_*` variables (service name, batch delay, timeout, headers) read by the
//! OpenTelemetry SDK. Spans keep their fields as attributes (`request_id`, `job_id`, `trace_id`,
//! ...), so a collector joins a request's REST span on the coordinator with its job's span on
//! the node by the request id.
//!
//! The exporter's gRPC channel lives on a small runtime of its own (one thread), so it works the
//! same under the coordinator's actix arbiters, the node's runtime and plain threads; the SDK's
//! batch processor exports from its own thread.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// What stays alive while spans are exported.
struct Telemetry {
    provider: SdkTracerProvider,
    /// Drives the exporter's gRPC channel; never dropped (a static).
    _runtime: tokio::runtime::Runtime,
}

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// Whether the environment asks for OTLP export.
pub fn wanted() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|e| !e.is_empty()))
}

/// An exporter whose every call runs on the telemetry runtime (the batch processor calls it from
/// a plain thread; the gRPC channel needs its runtime).
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    handle: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.handle.block_on(self.inner.export(batch))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The `tracing` layer that exports spans over OTLP as `service` (unless `OTEL_SERVICE_NAME`
/// names it), or `None` when export is not asked for or cannot start (said on stderr: logging is
/// not up yet).
pub fn layer<S>(service: &str) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    if !wanted() {
        return None;
    }
    let started = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("drover-otlp")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            let exporter = {
                let _inside = runtime.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|e| e.to_string())?
            };
            Ok((runtime, exporter))
        });
    let (runtime, exporter) = match started {
        Ok(started) => started,
        Err(e) => {
            eprintln!("otlp export not started: {e}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: exporter,
            handle: runtime.handle().clone(),
        })
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("drover");
    let _ = TELEMETRY.set(Telemetry {
        provider,
        _runtime: runtime,
    });
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Exports the spans still buffered and stops the exporter (call before the process exits).
pub fn shutdown() {
    if let Some(t) = TELEMETRY.get()
        && let Err(e) = t.provider.shutdown()
    {
        tracing::warn!(error = %e, "otlp exporter did not shut down cleanly");
    }
}
