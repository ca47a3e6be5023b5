//! Someone waiting for the store's threads: the answer of a flush or a checkpoint.

/// Someone waiting for the writer: a flush or a checkpoint.
pub(crate) enum Waiter {
    Async(tokio::sync::oneshot::Sender<std::result::Result<(), String>>),
    Blocking(std::sync::mpsc::Sender<std::result::Result<(), String>>),
}

impl Waiter {
    /// Answers the waiter (nothing happens when it stopped waiting).
    pub fn answer(self, result: std::result::Result<(), String>) {
        match self {
            Self::Async(tx) => {
                let _ = tx.send(result);
            }
            Self::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}
