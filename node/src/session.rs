//! The node's link to the coordinator: register, then keep one session stream open (heartbeats,
//! progress and results up; assignments and cancels down), reconnecting with backoff when it breaks.
//!
//! Results produced while the link is down wait in an outbox and go up on the next session; jobs
//! keep running across reconnects, and the `hello` of each new session lists them so the
//! coordinator can reconcile its leases.
//!
//! This is where protocol messages meet the node's own types: assignments and cancels go through
//! [`crate::convert`] as they arrive, and the workers get [`RunJob`]s with render parameters and
//! a progress sink that writes the job's progress messages into the outbox.

mod follow;

use follow::{RESEND_MAX, RESEND_WINDOW, ReadyFile, coordinator_urls, ended_job};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_shared::ids::{JobId, LeaseId};
use drover_shared::proto::coordinator_client::CoordinatorClient;
use drover_shared::proto::{self, coordinator_message, node_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::Instrument as _;

use crate::config::NodeConfig;
use crate::convert::{self, Assignment, Refused};
use crate::error::{NodeError, Result};
use crate::factory::WorkerPool;
use crate::render::{Batcher, CancelFlag, PostJob, Progress, ProgressSink, RunJob};
use drover_shared::job::JobTask;

/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest reconnect delay when `COORDINATOR_URL` names several replicas.
const MAX_BACKOFF_REPLICAS: Duration = Duration::from_secs(1);
/// Timeout of every unary call and of connecting.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Jobs running on this node, by job and lease: their cancel flags. Keyed by both: a job
/// leased again while an earlier attempt still runs here (its lease expired) has two entries,
/// and each attempt stays cancellable until it ends.
type Running = Arc<Mutex<HashMap<(JobId, LeaseId), CancelFlag>>>;

/// The node's side of the link, alive across sessions.
pub struct NodeLink {
    config: NodeConfig,
    pool: WorkerPool,
    /// Jobs on their way to the workers, batched when they wait ([`Batcher`]).
    batcher: Batcher,
    running: Running,
    outbox_tx: mpsc::UnboundedSender<proto::NodeMessage>,
    outbox_rx: mpsc::UnboundedReceiver<proto::NodeMessage>,
    /// Messages that could not be sent on a broken session, sent first on the next one.
    carry: Vec<proto::NodeMessage>,
    /// Results and failures sent in the last [`RESEND_WINDOW`] (at most [`RESEND_MAX`]), with
    /// when: sent again on the next session, and listed running in its hello. A coordinator
    /// can take a result and lose it (a replicated coordinator's leader that dies before the
    /// log commits it; a single one killed before its log synced): the next one, which restored
    /// the lease, then keeps the job on this node and takes the result instead of running the
    /// job again. One that has it already ignores it (its lease is no longer current).
    recent: std::collections::VecDeque<(Instant, proto::NodeMessage)>,
    /// The coordinator addresses (`COORDINATOR_URL`, comma-separated for replicas).
    urls: Vec<String>,
    /// Sessions this process has opened (its hellos say so).
    sessions: u32,
    /// The address in use: the next one is tried when a session fails.
    current: usize,
}

impl NodeLink {
    /// A link for `pool`, configured by `config`.
    pub fn new(config: NodeConfig, pool: WorkerPool) -> Self {
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let batcher = Batcher::new(
            pool.batches.clone(),
            pool.capabilities.workers as usize,
            pool.capabilities.max_batch as usize,
        );
        Self {
            pool,
            batcher,
            running: Running::default(),
            outbox_tx,
            outbox_rx,
            carry: Vec::new(),
            recent: std::collections::VecDeque::new(),
            urls: coordinator_urls(&config.coordinator_url),
            sessions: 0,
            current: 0,
            config,
        }
    }

    /// The coordinator address in use.
    fn url(&self) -> &str {
        self.urls.get(self.current).map_or("", String::as_str)
    }

    /// Runs sessions until the coordinator refuses this node; link failures are retried forever.
    pub async fn run(mut self) -> Result<()> {
        let mut backoff = MIN_BACKOFF;
        let mut failed_in_turn = 0;
        loop {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => tracing::warn!("session ended by the coordinator"),
                // A refusal or a setting that cannot work will not get better by retrying.
                Err(e @ (NodeError::Refused(_) | NodeError::Config(_))) => return Err(e),
                Err(e) => {
                    let hint = link_hint(self.url(), &e.to_string());
                    tracing::warn!(error = %e, coordinator = self.url(), hint, "session failed");
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = MIN_BACKOFF;
                failed_in_turn = 0;
            }
            // Replicas: the next address at once, until each has been tried.
            self.current = (self.current + 1) % self.urls.len().max(1);
            failed_in_turn += 1;
            if failed_in_turn < self.urls.len() {
                continue;
            }
            failed_in_turn = 0;
            let delay = backoff + jitter(backoff / 4);
            tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
            tokio::time::sleep(delay).await;
            // With replicas, a new leader wants its nodes back within its offline grace: the
            // retries across every address stay within a second.
            let cap = if self.urls.len() > 1 {
                MAX_BACKOFF_REPLICAS
            } else {
                MAX_BACKOFF
            };
            backoff = (backoff * 2).min(cap);
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.config.node_token
            && let Ok(value) = token.parse()
        {
            request
                .metadata_mut()
                .insert(drover_shared::NODE_TOKEN_METADATA, value);
        }
        request
    }

    fn registration(&self) -> proto::RegisterRequest {
        let caps = &self.pool.capabilities;
        proto::RegisterRequest {
            name: self.config.name(),
            backend: caps.backend.as_str().to_string(),
            family: caps.family.to_string(),
            cross_attention_dim: caps.family.cross_attention_dim(),
            model_id: caps.model_id.clone(),
            model_name: caps
                .models
                .first()
                .map_or_else(|| caps.model_id.clone(), |m| m.name.clone()),
            workers: caps.workers,
            max_pixels: caps.max_pixels,
            loras: caps
                .loras
                .iter()
                .map(|l| proto::LoraInfo {
                    name: l.name.clone(),
                    family: l.family.to_string(),
                    lcm: l.lcm,
                })
                .collect(),
            version: drover_shared::VERSION.to_string(),
            pixel_steps_per_second: caps.pixel_steps_per_second,
            sizes: caps
                .sizes
                .iter()
                .map(|&(width, height)| proto::ImageSize { width, height })
                .collect(),
            samplers: caps.samplers.iter().map(|s| s.id().to_string()).collect(),
            max_batch: caps.max_batch,
            img2img: caps.img2img,
            inpaint: caps.inpaint,
            upscalers: caps
                .upscalers
                .iter()
                .map(|u| proto::UpscalerInfo {
                    name: u.name.clone(),
                    scale: u.scale as u32,
                    network: u.network.clone(),
                    ms_per_megapixel: u.ms_per_megapixel,
                })
                .collect(),
            models: caps
                .models
                .iter()
                .map(|m| proto::ModelInfo {
                    model_id: m.id.clone(),
                    name: m.name.clone(),
                    family: m.family.to_string(),
                    cross_attention_dim: m.cross_attention_dim,
                    max_pixels: m.max_pixels,
                    sizes: m
                        .sizes
                        .iter()
                        .map(|&(width, height)| proto::ImageSize { width, height })
                        .collect(),
                    samplers: m.samplers.iter().map(|s| s.id().to_string()).collect(),
                    img2img: m.img2img,
                    inpaint: m.inpaint,
                    bytes: m.bytes,
                    pinned: m.pinned,
                })
                .collect(),
            memory_budget: caps.memory_budget,
            residency: self.residency(),
        }
    }

    /// Every catalogued model's residency now (empty when the backend keeps every model loaded).
    fn residency(&self) -> Vec<proto::ModelState> {
        let Some(probe) = &self.pool.residency else {
            return Vec::new();
        };
        probe
            .models()
            .into_iter()
            .filter(|(id, _)| self.pool.capabilities.models.iter().any(|m| &m.id == id))
            .map(|(model_id, s)| proto::ModelState {
                model_id,
                copies: s.copies,
                loads: s.loads,
                evictions: s.evictions,
                load_ms_total: s.load_ms_total,
                last_load_ms: s.last_load_ms,
            })
            .collect()
    }

    async fn connect(&self) -> Result<CoordinatorClient<Channel>> {
        let endpoint = Endpoint::from_shared(self.url().to_string())
            .map_err(|e| NodeError::Config(format!("COORDINATOR_URL `{}`: {e}", self.url())))?
            .connect_timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let endpoint = match self.tls()? {
            Some(tls) => endpoint
                .tls_config(tls)
                .map_err(|e| NodeError::Config(format!("TLS settings: {e}")))?,
            None => endpoint,
        };
        Ok(CoordinatorClient::new(endpoint.connect().await?)
            .max_decoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(drover_shared::MAX_GRPC_MESSAGE_BYTES))
    }

    /// TLS for an `https://` COORDINATOR_URL: the public roots plus `DROVER_CA_CERT`.
    fn tls(&self) -> Result<Option<ClientTlsConfig>> {
        if !self.url().starts_with("https://") {
            if self.config.ca_cert.is_some() {
                return Err(NodeError::Config(format!(
                    "DROVER_CA_CERT is set but COORDINATOR_URL `{}` is not https://",
                    self.url()
                )));
            }
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &self.config.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                NodeError::Config(format!("DROVER_CA_CERT {}: {e}", path.display()))
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(NodeError::Config(format!(
                    "DROVER_CA_CERT {}: no PEM certificate in it",
                    path.display()
                )));
            }
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some(domain) = &self.config.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(Some(tls))
    }

    /// The jobs this node runs, and those whose end it sent lately (see `recent`).
    fn running_jobs(&mut self) -> Vec<proto::RunningJob> {
        let mut out: Vec<proto::RunningJob> = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running
                .keys()
                .map(|(job_id, lease_id)| proto::RunningJob {
                    job_id: job_id.to_string(),
                    lease_id: lease_id.to_string(),
                })
                .collect()
        };
        self.recent
            .retain(|(sent, _)| sent.elapsed() < RESEND_WINDOW);
        out.extend(self.recent.iter().filter_map(|(_, m)| {
            let (job_id, lease_id) = ended_job(m)?;
            Some(proto::RunningJob {
                job_id: job_id.to_string(),
                lease_id: lease_id.to_string(),
            })
        }));
        out
    }

    /// Keeps a result or failure about to be sent (see `recent`).
    fn remember(&mut self, message: &proto::NodeMessage) {
        if ended_job(message).is_none() {
            return;
        }
        if self.recent.len() == RESEND_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back((Instant::now(), message.clone()));
    }

    /// One session, from connect to its end.
    async fn session(&mut self) -> Result<()> {
        let mut client = self.connect().await?;
        let registered = tokio::time::timeout(
            CALL_TIMEOUT,
            client.register(self.request(self.registration())),
        )
        .await
        .map_err(|_| NodeError::Link("register timed out".into()))??
        .into_inner();
        let heartbeat = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(50)));
        let (tx, rx) = mpsc::channel::<proto::NodeMessage>(256);
        self.sessions = self.sessions.saturating_add(1);
        let hello = proto::Hello {
            node_id: registered.node_id.clone(),
            running: self.running_jobs(),
            session: self.sessions,
        };
        let _ = tx.send(message(node_message::Kind::Hello(hello))).await;
        // What ended lately first (the jobs the hello listed), then what could not be sent.
        let resend: Vec<proto::NodeMessage> = self.recent.iter().map(|(_, m)| m.clone()).collect();
        for pending in resend.into_iter().chain(self.carry.drain(..)) {
            let _ = tx.send(pending).await;
        }
        let mut inbound = tokio::time::timeout(
            CALL_TIMEOUT,
            client.session(self.request(ReceiverStream::new(rx))),
        )
        .await
        .map_err(|_| NodeError::Link("opening the session timed out".into()))??
        .into_inner();
        tracing::info!(node_id = %registered.node_id, coordinator = self.url(), "session open");
        let _ready = ReadyFile::create(self.config.ready_file.as_deref());

        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let beat = proto::Heartbeat {
                        running: self.running_jobs(),
                        models: self.residency(),
                    };
                    if tx.send(message(node_message::Kind::Heartbeat(beat))).await.is_err() {
                        return Err(NodeError::Link("session closed".into()));
                    }
                }
                Some(first) = self.outbox_rx.recv() => {
                    // Everything waiting goes up together, without the progress reports that a
                    // later report of the same job makes stale.
                    let mut batch = vec![first];
                    while batch.len() < OUTBOX_BATCH {
                        match self.outbox_rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let mut batch = coalesce(batch).into_iter();
                    while let Some(out) = batch.next() {
                        self.remember(&out);
                        if let Err(mpsc::error::SendError(out)) = tx.send(out).await {
                            self.carry.push(out);
                            self.carry.extend(batch);
                            return Err(NodeError::Link("session closed".into()));
                        }
                    }
                }
                incoming = inbound.message() => match incoming? {
                    None => return Ok(()),
                    Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Assignment(a)) }) => {
                        self.start_job(a);
                    }
                    Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Cancel(c)) }) => {
                        self.cancel(&c);
                    }
                    Some(proto::CoordinatorMessage { kind: Some(coordinator_message::Kind::Model(m)) }) => {
                        self.model_command(m);
                    }
                    Some(proto::CoordinatorMessage { kind: None }) => {}
                },
            }
        }
    }

    /// Carries out an order about a model on a blocking thread (a load takes seconds); the
    /// residency the next heartbeats report shows the outcome, the log says why one failed.
    fn model_command(&self, command: proto::ModelCommand) {
        let Some(control) = self.pool.control.clone() else {
            tracing::warn!(model_id = %command.model_id, action = %command.action, "model command ignored: this node keeps its one model loaded");
            return;
        };
        let action: crate::catalog::ModelAction = match command.action.parse() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(model_id = %command.model_id, error = %e, "model command ignored");
                return;
            }
        };
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            match control.command(&command.model_id, action) {
                Ok(done) => {
                    tracing::info!(model_id = %command.model_id, action = %command.action, ms = started.elapsed().as_millis() as u64, outcome = %done, "model command done")
                }
                Err(e) => {
                    tracing::warn!(model_id = %command.model_id, action = %command.action, error = %e, "model command refused")
                }
            }
        });
    }

    /// Stops the job a cancel names, when it runs here under the cancel's lease.
    fn cancel(&self, cancel: &proto::Cancel) {
        let (job_id, lease_id) = match convert::ids(&cancel.job_id, &cancel.lease_id) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cancel ignored: malformed id");
                return;
            }
        };
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flag) = running.get(&(job_id, lease_id)) {
            tracing::info!(job_id = %job_id, "cancel requested");
            flag.cancel();
        }
    }

    fn start_job(&self, assignment: proto::Assignment) {
        let span = tracing::info_span!(
            "job",
            job_id = %assignment.job_id,
            lease_id = %assignment.lease_id,
            trace_id = %assignment.trace_id,
            attempt = assignment.attempt
        );
        let _entered = span.enter();
        let converted = Assignment::try_from(assignment).and_then(|a| {
            let upscale = match (a.upscale.clone(), &self.pool.post) {
                (None, _) => None,
                (Some(spec), Some(with)) => Some(PostJob {
                    spec,
                    with: with.clone(),
                    only: a.task == JobTask::Upscale,
                }),
                // Rendered here, upscaled on a node with the upscaler (the result says so).
                (Some(_), None) if a.task == JobTask::Generate => None,
                (Some(_), None) => {
                    return Err(Refused {
                        job_id: a.job_id.to_string(),
                        lease_id: a.lease_id.to_string(),
                        reason: "an upscale job, and this node has no upscaler (UPSCALER)".into(),
                    });
                }
            };
            Ok((a, upscale))
        });
        let (
            Assignment {
                job_id,
                lease_id,
                params,
                group,
                ..
            },
            upscale,
        ) = match converted {
            Ok(a) => a,
            Err(Refused {
                job_id,
                lease_id,
                reason,
            }) => {
                tracing::error!(reason = %reason, "assignment refused");
                let failed = proto::JobFailed {
                    job_id,
                    lease_id,
                    reason,
                    permanent: true,
                };
                let _ = self
                    .outbox_tx
                    .send(message(node_message::Kind::Failed(failed)));
                return;
            }
        };
        tracing::info!(size = %format!("{}x{}", params.width, params.height), steps = params.steps, "job started");
        let cancel = CancelFlag::default();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((job_id, lease_id), cancel.clone());
        let progress = progress_sink(self.outbox_tx.clone(), job_id, lease_id);
        let batcher = self.batcher.clone();
        let outbox = self.outbox_tx.clone();
        let running = self.running.clone();
        let job_span = span.clone();
        actix_rt::spawn(
            async move {
                let outcome = batcher
                    .submit(
                        RunJob {
                            params,
                            progress,
                            cancel,
                            span: job_span,
                            upscale,
                        },
                        group,
                    )
                    .await
                    .unwrap_or_else(|_| Err(NodeError::Render("the worker pool stopped".into())));
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(job_id, lease_id));
                let (job_id, lease_id) = (job_id.to_string(), lease_id.to_string());
                let reply = match outcome {
                    Ok(rendered) => {
                        tracing::info!(
                            elapsed_ms = rendered.elapsed.as_millis() as u64,
                            batch = rendered.batch_size,
                            "job finished"
                        );
                        node_message::Kind::Result(proto::JobResult {
                            job_id,
                            lease_id,
                            png: rendered.png,
                            elapsed_ms: rendered.elapsed.as_millis() as u64,
                            upscaled: rendered.upscaled,
                            batch_size: rendered.batch_size,
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "job failed");
                        node_message::Kind::Failed(proto::JobFailed {
                            job_id,
                            lease_id,
                            reason: e.to_string(),
                            permanent: e.is_permanent(),
                        })
                    }
                };
                let _ = outbox.send(message(reply));
            }
            .instrument(span.clone()),
        );
    }
}

/// A sink that puts each finished step of the job into the outbox as its `JobProgress` message,
/// straight from the worker's thread (nothing happens once the outbox is gone).
fn progress_sink(
    outbox: mpsc::UnboundedSender<proto::NodeMessage>,
    job_id: JobId,
    lease_id: LeaseId,
) -> ProgressSink {
    let (job_id, lease_id) = (job_id.to_string(), lease_id.to_string());
    ProgressSink::new(move |p: Progress| {
        let progress = proto::JobProgress {
            job_id: job_id.clone(),
            lease_id: lease_id.clone(),
            step: p.step,
            total_steps: p.total,
        };
        let _ = outbox.send(message(node_message::Kind::Progress(progress)));
    })
}

/// What usually fixes a link error, when the error text says enough to tell.
fn link_hint(url: &str, error: &str) -> &'static str {
    if error.contains("does not lead") {
        "a replica that does not lead; the node tries the next address"
    } else if error.contains("CaUsedAsEndEntity") {
        "the coordinator's certificate is a CA certificate; give it a leaf certificate \
         (basicConstraints CA:FALSE) with its host names and addresses as subjectAltName"
    } else if error.contains("invalid peer certificate") {
        "check that DROVER_CA_CERT holds the certificate (or CA) of the coordinator and that its \
         names match the host in COORDINATOR_URL (or DROVER_TLS_DOMAIN)"
    } else if url.starts_with("http://")
        && !error.contains("refused")
        && !error.contains("timed out")
    {
        "if the coordinator serves TLS (DROVER_TLS_CERT), use https:// in COORDINATOR_URL"
    } else {
        ""
    }
}

/// Most outbox messages taken in one go.
const OUTBOX_BATCH: usize = 256;

/// Drops every progress report followed, in `batch`, by another report (progress, result or
/// failure) of the same job: it would be stale on arrival.
fn coalesce(batch: Vec<proto::NodeMessage>) -> Vec<proto::NodeMessage> {
    fn job_of(m: &proto::NodeMessage) -> Option<&str> {
        match m.kind.as_ref()? {
            node_message::Kind::Progress(p) => Some(&p.job_id),
            node_message::Kind::Result(r) => Some(&r.job_id),
            node_message::Kind::Failed(f) => Some(&f.job_id),
            _ => None,
        }
    }
    if batch.len() < 2 {
        return batch;
    }
    let mut seen = std::collections::HashSet::new();
    let mut keep = vec![true; batch.len()];
    for (i, m) in batch.iter().enumerate().rev() {
        let Some(job) = job_of(m) else { continue };
        let later = !seen.insert(job);
        if later && matches!(m.kind, Some(node_message::Kind::Progress(_))) {
            keep[i] = false;
        }
    }
    batch
        .into_iter()
        .zip(keep)
        .filter_map(|(m, k)| k.then_some(m))
        .collect()
}

fn message(kind: node_message::Kind) -> proto::NodeMessage {
    proto::NodeMessage { kind: Some(kind) }
}

/// A pseudo-random delay in `0..=max`, so a farm of nodes does not reconnect in lockstep.
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    max.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(job: &str, step: u32) -> proto::NodeMessage {
        message(node_message::Kind::Progress(proto::JobProgress {
            job_id: job.into(),
            lease_id: "l".into(),
            step,
            total_steps: 4,
        }))
    }

    fn result(job: &str) -> proto::NodeMessage {
        message(node_message::Kind::Result(proto::JobResult {
            job_id: job.into(),
            lease_id: "l".into(),
            png: vec![1],
            elapsed_ms: 1,
            upscaled: false,
            batch_size: 1,
        }))
    }

    #[test]
    fn progress_goes_into_the_outbox_under_the_job_and_its_lease() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (job, lease) = (JobId::time_ordered(), LeaseId::random());
        let sink = progress_sink(tx, job, lease);
        sink.send(Progress { step: 2, total: 4 });
        let want = message(node_message::Kind::Progress(proto::JobProgress {
            job_id: job.to_string(),
            lease_id: lease.to_string(),
            step: 2,
            total_steps: 4,
        }));
        assert_eq!(rx.try_recv().ok(), Some(want));
        drop(rx);
        sink.send(Progress { step: 3, total: 4 });
    }

    #[test]
    fn stale_progress_is_dropped_and_nothing_else() {
        let beat = message(node_message::Kind::Heartbeat(proto::Heartbeat::default()));
        let batch = vec![
            progress("a", 1),
            progress("b", 1),
            beat.clone(),
            progress("a", 2),
            result("a"),
            progress("c", 3),
        ];
        let kept = coalesce(batch);
        assert_eq!(
            kept,
            vec![progress("b", 1), beat, result("a"), progress("c", 3)],
            "a's progress is stale behind its result; b and c keep their latest"
        );
        assert_eq!(coalesce(vec![progress("a", 1)]), vec![progress("a", 1)]);
    }
}
