//! The store's error enum. sled's errors stay behind it: the rest of the coordinator sees a
//! [`StoreError`] (as `CoordinatorError::Store`) and asks it what kind of failure it is.

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot take writes now (a full disk, a failed write, a stopped writer thread);
    /// the text says why and what is refused.
    #[error("the store cannot write: {0}")]
    Unwritable(String),
    /// The embedded database failed.
    #[error("store database error: {0}")]
    Db(#[from] sled::Error),
    /// Reading or writing the store's files failed.
    #[error("store i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed its checks (a torn or damaged entry, a layout this build cannot read).
    #[error("stored data damaged: {0}")]
    Damaged(String),
    /// A record could not be encoded or decoded.
    #[error("store record error: {0}")]
    Codec(#[from] serde_json::Error),
    /// Something too large for the store's formats (a record or an image over 4 GiB).
    #[error("too large for the store: {0}")]
    TooLarge(String),
    /// The thing existed but was deleted (past its retention).
    #[error("{0}")]
    Gone(String),
}

impl StoreError {
    /// Whether the store cannot serve the call now — a full disk, an I/O failure, a stopped
    /// writer — as opposed to data that is damaged or does not decode: the caller may retry
    /// later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unwritable(_) | Self::Io(_) | Self::Db(sled::Error::Io(_)) => true,
            Self::Db(_) | Self::Damaged(_) | Self::Codec(_) | Self::TooLarge(_) | Self::Gone(_) => {
                false
            }
        }
    }

    /// Whether this is the disk (or the user's quota) being full.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Io(e) | Self::Db(sled::Error::Io(e)) => is_no_space(e),
            _ => false,
        }
    }
}

/// Whether an I/O error says the disk (or the quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    /// `ENOSPC` and `EDQUOT` on Linux.
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_unavailable_and_damage_is_not() {
        let full = || std::io::Error::from_raw_os_error(28);
        for e in [
            StoreError::Io(full()),
            // How sled wraps it.
            StoreError::Db(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                full().to_string(),
            ))),
        ] {
            assert!(e.is_no_space() && e.is_unavailable(), "{e}");
        }
        let eio = StoreError::Io(std::io::Error::from_raw_os_error(5));
        assert!(eio.is_unavailable() && !eio.is_no_space());
        assert!(StoreError::Unwritable("the writer stopped".into()).is_unavailable());
        for e in [
            StoreError::Damaged("a short record".into()),
            StoreError::Db(sled::Error::ReportableBug("bug".into())),
            StoreError::Gone("pruned".into()),
        ] {
            assert!(!e.is_unavailable() && !e.is_no_space(), "{e}");
        }
    }
}
