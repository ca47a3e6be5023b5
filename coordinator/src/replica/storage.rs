//! openraft's storage over the store: the log ([`LogStore`], in the store's [`RaftDb`]) and the
//! state machine ([`Machine`]: the replica's own [`Store`], which applies each committed batch
//! of [`Change`]s as a single coordinator writes them).
//!
//! How far the machine applied is recorded only after the store has synced what it applied,
//! so a crash makes a replica apply some entries again (harmless: see [`Change`]), never skip
//! one. A **snapshot** is the store exported as changes (`Store::export`: nodes, unfinished
//! jobs, finished jobs with their images), kept in the log's database; installing one applies
//! them (a replica's store only ever holds a prefix of the same history, and retention runs on
//! each replica, so nothing needs deleting). It may hold changes applied after its last entry:
//! the entries after it then apply again, harmlessly.

// openraft's traits fix these error types (large by design).
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};

use super::{Node, NodeIdOf, TypeConfig};
use crate::store::{RaftDb, Store};

type StorageResult<T> = Result<T, StorageError<NodeIdOf>>;

const VOTE: &str = "vote";
const PURGED: &str = "purged";
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT: &str = "snapshot";

/// A snapshot as the log's database keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeIdOf, Node>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

fn snapshot_error(e: impl std::fmt::Display) -> StorageError<NodeIdOf> {
    StorageIOError::write_snapshot(None, openraft::AnyError::error(e.to_string())).into()
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// The replicated log, in the store's log database.
#[derive(Clone)]
pub struct LogStore {
    db: RaftDb,
}

impl LogStore {
    /// The log kept in `db`.
    pub fn new(db: RaftDb) -> Self {
        Self { db }
    }

    fn named<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        match self.db.value(name).map_err(|e| e.to_string())? {
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i + 1,
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        let read = self
            .db
            .entries(from, to)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        read.iter()
            .map(|bytes| decode(bytes).map_err(|e| StorageIOError::read_logs(&e).into()))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeIdOf>> = self
            .named(PURGED)
            .map_err(|e| StorageIOError::read_logs(openraft::AnyError::error(e)))?;
        let last = match self.db.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some(bytes) => Some(
                decode::<Entry<TypeConfig>>(&bytes)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeIdOf>) -> StorageResult<()> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.db
            .set_value(VOTE, &bytes, true)
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeIdOf>>> {
        Ok(self
            .named(VOTE)
            .map_err(|e| StorageIOError::read_vote(openraft::AnyError::error(e)))?)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, encode(&entry)?)))
            .collect::<Result<Vec<_>, rmp_serde::encode::Error>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let result = self.db.append(encoded).await;
        let io = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io);
        result.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeIdOf>) -> StorageResult<()> {
        self.db
            .truncate_from(log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeIdOf>) -> StorageResult<()> {
        let bytes = encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.db
            .set_value(PURGED, &bytes, true)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.db
            .purge_through(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

/// How often the machine records how far it applied (each record costs a sync of the store).
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The state machine: the replica's store.
pub struct Machine {
    store: Store,
    db: RaftDb,
    applied: Option<LogId<NodeIdOf>>,
    membership: StoredMembership<NodeIdOf, Node>,
    /// When it last recorded how far it applied.
    recorded: std::time::Instant,
}

impl Machine {
    /// The machine applying to `store`, resuming where `db` says it got to.
    pub fn new(store: Store, db: RaftDb) -> Result<Self, String> {
        let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
            db.value(name).map_err(|e| e.to_string())
        };
        let applied = match read(APPLIED)? {
            Some(bytes) => decode(&bytes).map_err(|e| e.to_string())?,
            None => None,
        };
        let membership = match read(MEMBERSHIP)? {
            Some(bytes) => decode(&bytes).map_err(|e| e.to_string())?,
            None => StoredMembership::default(),
        };
        Ok(Self {
            store,
            db,
            applied,
            membership,
            recorded: std::time::Instant::now(),
        })
    }
}

impl Machine {
    /// Records how far the machine applied, and its membership.
    async fn record_applied(&self, durable: bool) -> StorageResult<()> {
        let applied = encode(&self.applied).map_err(|e| StorageIOError::write_state_machine(&e))?;
        let membership =
            encode(&self.membership).map_err(|e| StorageIOError::write_state_machine(&e))?;
        for (name, bytes) in [(APPLIED, applied), (MEMBERSHIP, membership)] {
            self.db
                .set_value(name, &bytes, durable)
                .await
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        Ok(())
    }

    /// Stores `data` as the current snapshot (durably), for `get_current_snapshot`.
    async fn keep_snapshot(
        &self,
        meta: &SnapshotMeta<NodeIdOf, Node>,
        data: Vec<u8>,
    ) -> StorageResult<()> {
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .map_err(snapshot_error)?;
        self.db
            .set_value(SNAPSHOT, &stored, true)
            .await
            .map_err(snapshot_error)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let store = self.store.clone();
        let changes = tokio::task::spawn_blocking(move || {
            store.checkpoint_blocking()?;
            store.export()
        })
        .await
        .map_err(snapshot_error)?
        .map_err(snapshot_error)?;
        // The checkpoint made everything applied so far durable in sled: the snapshot's point
        // is recorded as applied (the log before it may be purged next).
        self.record_applied(true).await?;
        let data = encode(&changes).map_err(snapshot_error)?;
        let index = self.applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{index}-{}", uuid::Uuid::now_v7().simple()),
        };
        self.keep_snapshot(&meta, data.clone()).await?;
        tracing::info!(
            index,
            changes = changes.len(),
            bytes = data.len(),
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeIdOf>>, StoredMembership<NodeIdOf, Node>)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<()>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    for change in batch.0 {
                        self.store
                            .apply(change)
                            .map_err(|e| StorageIOError::write_state_machine(&e))?;
                    }
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            self.applied = Some(entry.log_id);
            answers.push(());
        }
        // What was applied is on this replica's disk before the log says so; recorded every
        // RECORD_EVERY (a crash re-applies what came after the record, harmlessly) rather than
        // at every entry, which would cost a sync of the store per commit on every replica.
        if self.recorded.elapsed() >= RECORD_EVERY {
            self.store
                .sync_local()
                .await
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
            self.record_applied(false).await?;
            self.recorded = std::time::Instant::now();
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Self {
            store: self.store.clone(),
            db: self.db.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            recorded: self.recorded,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeIdOf, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let changes: Vec<crate::store::Change> = decode(&data).map_err(snapshot_error)?;
        let count = changes.len();
        for change in changes {
            self.store.apply(change).map_err(snapshot_error)?;
        }
        self.store.sync_local().await.map_err(snapshot_error)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.record_applied(true).await?;
        self.keep_snapshot(meta, data).await?;
        tracing::info!(
            index = meta.last_log_id.map_or(0, |l| l.index),
            changes = count,
            "snapshot installed"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self
            .db
            .value(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
