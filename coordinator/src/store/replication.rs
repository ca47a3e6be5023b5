//! The store on a replicated coordinator: the [`Change`]s its writes become, the [`Replicate`]
//! it hands them to (the Raft log), and how a replica applies what the log committed.

use std::sync::Arc;

use super::error::Result;
use super::waiter::Waiter;
use super::writer::Write;
use super::{Pending, Store, StoreError, lock, stopped};
use crate::records::JobRecord;

/// A change to the store as a replicated coordinator's log carries it: records as the store keeps
/// them (JSON), images as bytes. Applying one twice, or an older one again before the newer ones
/// that followed it, ends in the same state (records replace records; a finish rewrites its
/// image), which is what lets a replica replay its log from the last entry it knows it applied.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Change {
    /// A node record (insert or replace).
    Node(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An unfinished job's record (insert or replace).
    Job(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A finished job's record, with its image.
    Finish {
        /// The record (JSON).
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
        /// The image (PNG), if the job made one.
        #[serde(with = "serde_bytes")]
        png: Option<Vec<u8>>,
    },
}

/// What resolves once the changes proposed before it are committed on a majority, or with why not.
pub type Committed =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), String>> + Send>>;

/// Where a replicated coordinator's store sends its writes: to the replicated log, which applies
/// them to every replica's store once a majority has them ([`Store::apply`]).
pub trait Replicate: Send + Sync + 'static {
    /// Hands a change to the log, after every change handed before.
    fn propose(&self, change: Change);
    /// Resolves once every change proposed before is committed on a majority, or with why not.
    fn commit(&self) -> Committed;
}

impl Store {
    /// From now on, sends every write to `replicator` (a replicated coordinator): a write is
    /// applied here, as on every replica, once the log has committed it ([`Store::apply`]), and
    /// [`Store::flush`] waits for that commit.
    pub fn replicate_through(&self, replicator: Arc<dyn Replicate>) {
        if self.replicator.set(replicator).is_err() {
            tracing::warn!("the store already has a replicated log");
        }
    }

    /// The replicated log writes go to, if any.
    pub(super) fn replicated(&self) -> Option<&Arc<dyn Replicate>> {
        self.replicator.get()
    }

    /// On a replicated coordinator, what resolves once every change so far is committed (to act
    /// on them only then); `None` on a single coordinator.
    pub fn commit_point(&self) -> Option<Committed> {
        self.replicated().map(|log| log.commit())
    }

    /// Applies a change the replicated log committed (on every replica, the leader included).
    pub fn apply(&self, change: Change) -> Result<()> {
        match change {
            Change::Node(json) => self.queue(Write::Node(Box::new(serde_json::from_slice(&json)?))),
            Change::Job(json) => self.queue(Write::Job(Box::new(serde_json::from_slice(&json)?))),
            Change::Finish { record, png } => {
                let record: JobRecord = serde_json::from_slice(&record)?;
                let id = record.id;
                lock(&self.shared.pending).insert(
                    id,
                    Pending {
                        record,
                        png: png.map(Arc::from),
                    },
                );
                self.queue(Write::Finish(id))
            }
        }
    }

    /// Makes every change applied so far durable in this replica's own log (a replicated
    /// coordinator's state machine, before it records how far it applied).
    pub async fn sync_local(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(Write::Sync(Waiter::Async(tx)))?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(StoreError::Unwritable)
    }
}
