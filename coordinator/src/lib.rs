//! Drover coordinator: keeps the node registry and the job queue in its store, accepts image
//! requests over REST (actix-web), and leases jobs to nodes over their gRPC sessions (tonic).
//!
//! Layout (arrows point inward): [`http`] (REST, the only code that knows actix-web) and
//! [`grpc`] (the node endpoint, the only code that knows tonic) → [`control`] (the
//! `ControlPlane` actor, the job state machine, the router) → [`store`] (the only module that
//! touches the embedded database and the files on disk); beside them [`config`], [`access`],
//! [`limits`], [`metrics`], [`records`] (what is persisted), [`error`], [`tls`].

pub mod access;
pub mod config;
pub mod control;
pub mod error;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod presets;
pub mod records;
pub mod store;
pub mod tls;
pub mod uploads;

use std::process::ExitCode;
use std::sync::Arc;

use actix::Actor;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use drover_shared::proto::coordinator_server::CoordinatorServer;

pub use config::Config;

/// Entry point of the `drover-coordinator` binary: parses flags/env, runs until SIGINT/SIGTERM.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    drover_shared::init_logging("drover-coordinator");
    let config = Config::parse();
    let result = actix_web::rt::System::new().block_on(run(config));
    drover_shared::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator stopped");
            eprintln!("drover-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the coordinator (REST + gRPC + control plane) until the HTTP server stops.
///
/// Must be called inside an actix system.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    config.resolve_secrets()?;
    let config = Arc::new(config);
    let styles = match &config.styles {
        Some(path) => drover_shared::styles::StyleCatalog::load(path, config.lora_root.as_deref())?,
        None => drover_shared::styles::StyleCatalog::default(),
    };
    tracing::info!(styles = styles.styles().count(), "style catalog loaded");
    let presets = Arc::new(presets::Presets::load(
        config.presets.as_deref(),
        config.lora_root.as_deref(),
    )?);
    tracing::info!(
        presets = presets.catalog().presets().count(),
        "preset catalog loaded"
    );
    access::warn_open_doors(&config);
    let store = store::Store::open(&config.data_dir, config.store_reserve_mb)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let metrics = Arc::new(metrics::Metrics::default());
    let control =
        control::ControlPlane::restore(store.clone(), config.clone(), metrics.clone())?.start();

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot bind gRPC address {}", config.grpc_addr))?;
    let service = grpc::NodeService::new(
        control.clone(),
        config.node_token.clone(),
        config.insecure,
        config.heartbeat_ms,
    );
    let tls = tls::Identity::load(&config)?;
    let mut grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)));
    if let Some(identity) = &tls {
        grpc = grpc
            .tls_config(identity.grpc())
            .context("the TLS certificate cannot serve gRPC")?;
    }
    // Sessions carry small messages both ways: without TCP_NODELAY, Nagle's algorithm holds an
    // assignment back until the node's delayed ACK (40 ms on Linux).
    let incoming = {
        use tokio_stream::StreamExt as _;
        tokio_stream::wrappers::TcpListenerStream::new(grpc_listener).map(|socket| {
            socket.inspect(|s| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY on a node session");
                }
            })
        })
    };
    let grpc = grpc
        .add_service(
            CoordinatorServer::new(service)
                .max_decoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES),
        )
        .serve_with_incoming(incoming);
    actix_web::rt::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "grpc server stopped");
        }
    });

    let state = http::AppState {
        control,
        metrics,
        store,
        config: config.clone(),
        styles: Arc::new(styles),
        presets: presets.clone(),
        rates: Arc::new(limits::RateLimiter::default()),
        a1111: Arc::default(),
        uploads: Arc::new(uploads::UploadStore::new(
            std::time::Duration::from_secs(config.upload_ttl_s),
            config.upload_memory_mb.saturating_mul(1 << 20),
        )),
    };
    presets.watch(std::time::Duration::from_secs(2));
    let server = HttpServer::new(move || {
        App::new()
            .wrap_fn(http::request_span)
            .app_data(web::Data::new(state.clone()))
            .configure(http::configure)
            .default_service(web::to(http::not_found))
    })
    .workers(usize::from(config.http_workers))
    .tcp_nodelay(true)
    .shutdown_timeout(5);
    let bind_error = || format!("cannot bind HTTP address {}", config.http_addr);
    let server = match (&tls, config.http_tls) {
        (Some(identity), true) => server
            .bind_rustls_0_23(config.http_addr, identity.https()?)
            .with_context(bind_error)?,
        (None, true) => anyhow::bail!("DROVER_HTTP_TLS needs DROVER_TLS_CERT and DROVER_TLS_KEY"),
        (_, false) => server.bind(config.http_addr).with_context(bind_error)?,
    };
    tracing::info!(http = %config.http_addr, grpc = %config.grpc_addr, grpc_tls = tls.is_some(), http_tls = config.http_tls, data_dir = %config.data_dir.display(), "coordinator listening");
    server.run().await.context("http server failed")
}
