//! openraft's storage over the store: the log ([`LogStore`], in the store's [`RaftDb`]) and the
//! state machine ([`Machine`]: the replica's own [`Store`], which applies each committed batch
//! of [`Change`]s as a single coordinator writes them).
//!
//! How far the machine applied is recorded only after the store has synced what it applied,
//! so a crash makes a replica apply some entries again (harmless: see [`Change`]), never skip
//! one. Snapshots are not built (the log is kept whole; see `ARCHITECTURE.md`): a replica that
//! was away catches up from the log.

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

/// The state machine: the replica's store.
pub struct Machine {
    store: Store,
    db: RaftDb,
    applied: Option<LogId<NodeIdOf>>,
    membership: StoredMembership<NodeIdOf, Node>,
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
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        Err(StorageIOError::write_snapshot(
            None,
            openraft::AnyError::error("snapshots are not built: the log is kept whole"),
        )
        .into())
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
        // What was applied is on this replica's disk before the log says so.
        self.store
            .sync_local()
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let applied = encode(&self.applied).map_err(|e| StorageIOError::write_state_machine(&e))?;
        let membership =
            encode(&self.membership).map_err(|e| StorageIOError::write_state_machine(&e))?;
        for (name, bytes) in [(APPLIED, applied), (MEMBERSHIP, membership)] {
            self.db
                .set_value(name, &bytes, false)
                .await
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Self {
            store: self.store.clone(),
            db: self.db.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeIdOf, Node>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        Err(StorageIOError::write_snapshot(
            None,
            openraft::AnyError::error("snapshots are not installed: the log is kept whole"),
        )
        .into())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(None)
    }
}
