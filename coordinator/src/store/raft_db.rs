//! The replicated log of a replicated coordinator, in its own sled database (`<data>/raft`):
//! entries by index (big-endian, so sled's order is the log's) and a few named values (the vote,
//! the last purged entry, the state machine's applied entry and membership). It stores bytes:
//! what they mean is `replica`'s business. Appends and the vote are flushed before they are
//! answered (Raft's durability rule); the named values the state machine keeps are flushed with
//! the next append, since replaying an entry twice is harmless (see `Store::apply`).

use std::path::Path;

use super::error::Result;

/// The log's database; cheap to clone (sled's handles are shared).
#[derive(Clone)]
pub struct RaftDb {
    db: sled::Db,
    log: sled::Tree,
    values: sled::Tree,
}

impl RaftDb {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(1000))
            .open()?;
        Ok(Self {
            log: db.open_tree("log")?,
            values: db.open_tree("values")?,
            db,
        })
    }

    /// Appends entries (index, encoded entry), replacing any at those indexes, and flushes.
    pub async fn append(&self, entries: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (index, bytes) in entries {
            batch.insert(&index.to_be_bytes(), bytes);
        }
        self.log.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The entries with indexes in `from..to`, in order (fewer where some are gone).
    pub fn entries(&self, from: u64, to: u64) -> Result<Vec<Vec<u8>>> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.log
            .range(from.to_be_bytes()..to.to_be_bytes())
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// The last entry, if any.
    pub fn last(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.log.last()?.map(|(_, v)| v.to_vec()))
    }

    /// Removes the entries from `index` on (a conflicting suffix), and flushes.
    pub async fn truncate_from(&self, index: u64) -> Result<()> {
        let keys: Vec<_> = self
            .log
            .range(index.to_be_bytes()..)
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.log.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Removes the entries up to `index` included (they are in a snapshot).
    pub fn purge_through(&self, index: u64) -> Result<()> {
        let keys: Vec<_> = self
            .log
            .range(..=index.to_be_bytes())
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// A named value.
    pub fn value(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.values.get(name)?.map(|v| v.to_vec()))
    }

    /// Sets a named value; flushed now when `durable`, else with the next append.
    pub async fn set_value(&self, name: &str, value: &[u8], durable: bool) -> Result<()> {
        self.values.insert(name, value)?;
        if durable {
            self.db.flush_async().await?;
        }
        Ok(())
    }
}
