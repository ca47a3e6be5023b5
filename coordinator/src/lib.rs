//! Drover coordinator: keeps the node registry and the job queue in its store, accepts image
//! requests over REST (actix-web), and leases jobs to nodes over their gRPC sessions (tonic).
//!
//! Layout (arrows point inward): [`http`] (REST, the only code that knows actix-web) and
//! [`grpc`] (the node endpoint and the replicas' link, the only code that knows tonic) →
//! [`control`] (the `ControlPlane` actor, the job state machine, the router) → [`store`] (the
//! only module that touches the embedded database and the files on disk); [`replica`] (the
//! replicated coordinator, the only code that knows openraft) sends the store's writes through
//! a Raft log; beside them [`config`], [`access`], [`limits`], [`metrics`], [`records`] (what
//! is persisted), [`error`], [`tls`].

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
pub mod replica;
pub mod store;
pub mod tls;
pub mod uploads;

use std::process::ExitCode;
use std::sync::Arc;

use actix::Actor;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use drover_shared::proto::coordinator_server::CoordinatorServer;
use drover_shared::proto::replication_server::ReplicationServer;

pub use config::Config;

/// Binds an `HttpServer` on `DROVER_HTTP_ADDR`, over TLS with `DROVER_HTTP_TLS`.
macro_rules! bind_http {
    ($server:expr, $config:expr) => {{
        let config: &Config = $config;
        let bind_error = || format!("cannot bind HTTP address {}", config.http_addr);
        match (tls::Identity::load(config)?, config.http_tls) {
            (Some(identity), true) => $server
                .bind_rustls_0_23(config.http_addr, identity.https()?)
                .with_context(bind_error)?,
            (None, true) => {
                anyhow::bail!("DROVER_HTTP_TLS needs DROVER_TLS_CERT and DROVER_TLS_KEY")
            }
            (_, false) => $server.bind(config.http_addr).with_context(bind_error)?,
        }
    }};
}

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
    let replica = match &config.peers {
        Some(list) => {
            // In a StatefulSet, the pod's ordinal + 1 when DROVER_REPLICA_ID is unset.
            let me = config.replica_id.or_else(|| {
                std::env::var("HOSTNAME")
                    .ok()
                    .and_then(|h| replica::ordinal_id(&h))
            });
            let peers = replica::Peers::parse(me, list).map_err(anyhow::Error::msg)?;
            Some(replica::Replica::start(&config, peers, store.clone()).await?)
        }
        None => None,
    };

    let gate = grpc::Gate::new(
        "this coordinator replica does not lead the cluster: a node tries the next address of its COORDINATOR_URL",
    );
    serve_grpc(&config, gate.clone(), replica.clone()).await?;
    if let Some(replica) = &replica {
        follow_until_leading(&config, replica, &store).await?;
        // Every committed entry is applied here: put it in sled, where the restore reads.
        let checkpoint = store.clone();
        actix_web::rt::task::spawn_blocking(move || checkpoint.checkpoint_blocking())
            .await
            .context("checkpoint before leading")??;
        let watched = replica.clone();
        actix_web::rt::spawn(async move {
            watched.lost_leadership().await;
            step_down(&watched).await;
        });
    }
    let mut plane = control::ControlPlane::restore(store.clone(), config.clone(), metrics.clone())?;
    if let Some(replica) = &replica {
        // Leases are fenced by the term this replica leads in.
        plane = plane.fencing_epoch(replica.term());
    }
    let control = plane.start();
    gate.open(grpc::NodeService::new(
        control.clone(),
        config.node_token.clone(),
        config.insecure,
        config.heartbeat_ms,
    ));

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
        replica,
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
    let server = bind_http!(server, &config);
    tracing::info!(http = %config.http_addr, grpc = %config.grpc_addr, http_tls = config.http_tls, data_dir = %config.data_dir.display(), "coordinator listening");
    server.run().await.context("http server failed")
}

/// Serves gRPC on `DROVER_GRPC_ADDR`: the node endpoint behind `gate`, and on a replica the
/// replication service its peers call.
async fn serve_grpc(
    config: &Config,
    gate: grpc::Gate,
    replica: Option<Arc<replica::Replica>>,
) -> anyhow::Result<()> {
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot bind gRPC address {}", config.grpc_addr))?;
    let tls = tls::Identity::load(config)?;
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
    let replication = replica.map(|replica| {
        ReplicationServer::new(grpc::replication::ReplicationService::new(
            Arc::new(replica::Endpoint(replica)),
            config.peer_token.clone(),
            config.insecure,
        ))
        .max_decoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
    });
    let grpc = grpc
        .add_service(
            CoordinatorServer::new(gate)
                .max_decoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES),
        )
        .add_optional_service(replication)
        .serve_with_incoming(incoming);
    tracing::info!(grpc = %config.grpc_addr, grpc_tls = tls.is_some(), "grpc listening");
    actix_web::rt::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "grpc server stopped");
        }
    });
    Ok(())
}

/// A follower's REST server (`GET /v1/cluster`, `/healthz`, redirects to the leader), until
/// this replica leads; then it stops, and the caller serves the whole API on the same address.
async fn follow_until_leading(
    config: &Arc<Config>,
    replica: &Arc<replica::Replica>,
    store: &store::Store,
) -> anyhow::Result<()> {
    let (app_replica, app_store, app_config) = (replica.clone(), store.clone(), config.clone());
    let server = HttpServer::new(move || {
        App::new()
            .wrap_fn(http::request_span)
            .configure(http::cluster::follower_app(
                app_replica.clone(),
                app_store.clone(),
                app_config.clone(),
            ))
    })
    .workers(1)
    .shutdown_timeout(1);
    let server = bind_http!(server, config).run();
    let handle = server.handle();
    let running = actix_web::rt::spawn(server);
    tracing::info!(replica = replica.id(), http = %config.http_addr, "following");
    replica.lead().await;
    tracing::info!(
        replica = replica.id(),
        "leading: the control plane restores from the store"
    );
    // Not graceful: a follower serves reads and redirects only, and clients retry.
    handle.stop(false).await;
    let _ = running.await;
    Ok(())
}

/// This replica no longer leads: the process executes itself again and comes back as a
/// follower, its state its store (which holds committed entries only).
async fn step_down(replica: &replica::Replica) {
    tracing::warn!(
        replica = replica.id(),
        "leadership lost: restarting as a follower"
    );
    replica.shutdown().await;
    drover_shared::telemetry::shutdown();
    let error = match std::env::current_exe() {
        Ok(exe) => {
            use std::os::unix::process::CommandExt as _;
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .exec()
        }
        Err(e) => e,
    };
    tracing::error!(error = %error, "cannot restart as a follower: exiting");
    std::process::exit(75);
}
