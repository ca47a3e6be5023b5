//! What every handler can reach, and reading request bodies.

use std::sync::Arc;

use actix::Addr;
use actix_web::web;
use drover_shared::ids::JobId;
use drover_shared::styles::StyleCatalog;

use crate::config::Config;
use crate::control::ControlPlane;
use crate::error::{CoordinatorError, Result};
use crate::limits::RateLimiter;
use crate::records::JobRecord;
use crate::store::Store;

/// Runs `read` on `store` on a blocking thread (never on an async worker or an actor).
pub async fn read_store<T: Send + 'static>(
    store: &Store,
    read: impl FnOnce(&Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    web::block(move || read(&store))
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("reading the store: {e}")))?
}

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

/// Largest accepted body of a request that may carry images (a job with a source image and a
/// mask, each up to [`drover_shared::job::source::MAX_SOURCE_BYTES`], base64 in JSON).
pub const MAX_IMAGE_BODY: usize =
    MAX_BODY + 2 * (drover_shared::job::source::MAX_SOURCE_BYTES / 3 + 1) * 4;

/// Most jobs one `POST /v1/jobs/batch` may carry.
pub const MAX_BATCH_JOBS: usize = 256;

/// Largest accepted batch body.
pub const MAX_BATCH_BODY: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The control plane actor.
    pub control: Addr<ControlPlane>,
    /// The store (read directly for images).
    pub store: Store,
    /// Settings.
    pub config: Arc<Config>,
    /// The style catalog.
    pub styles: Arc<StyleCatalog>,
    /// The preset catalog in force.
    pub presets: Arc<crate::presets::Presets>,
    /// Counters and histograms.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Per-client submission rates.
    pub rates: Arc<RateLimiter>,
    /// AUTOMATIC1111 callers' checkpoints and latest calls (in memory).
    pub a1111: super::a1111::A1111Clients,
    /// Images uploaded for later jobs (in memory).
    pub uploads: Arc<crate::uploads::UploadStore>,
    /// This replica, on a replicated coordinator (`GET /v1/cluster`).
    pub replica: Option<Arc<crate::replica::Replica>>,
}

/// The request body, refused (`413`) past `limit` bytes.
pub async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes> {
    payload
        .to_bytes_limited(limit)
        .await
        .map_err(|_| CoordinatorError::TooLarge { limit })?
        .map_err(|e| CoordinatorError::InvalidRequest(format!("could not read body: {e}")))
}

impl AppState {
    /// A state over a temporary store and a fresh control plane, for tests (needs a running
    /// actix system).
    #[cfg(test)]
    pub(crate) fn for_tests(config: Config) -> Self {
        use actix::Actor as _;
        let config = Arc::new(config);
        let store = Store::temporary().expect("a store");
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let control = ControlPlane::restore(store.clone(), config.clone(), metrics.clone())
            .expect("a control plane")
            .start();
        Self {
            control,
            store,
            config,
            styles: Arc::default(),
            presets: Arc::default(),
            metrics,
            rates: Arc::default(),
            a1111: Arc::default(),
            uploads: Arc::new(crate::uploads::UploadStore::new(
                std::time::Duration::from_secs(60),
                1 << 20,
            )),
            replica: None,
        }
    }

    /// Runs a store read on a blocking thread (never on an async worker or the actor).
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        read_store(&self.store, read).await
    }

    /// A job: unfinished ones from the control plane, finished ones from the store.
    pub async fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        match self.control.send(crate::control::GetJob(id)).await? {
            Some(job) => Ok(Some(job)),
            None => self.read(move |store| Ok(store.job(id)?)).await,
        }
    }

    /// A finished job's image, when it has one.
    pub async fn image(&self, id: JobId) -> Result<Option<Vec<u8>>> {
        self.read(move |store| Ok(store.image(id)?)).await
    }
}
