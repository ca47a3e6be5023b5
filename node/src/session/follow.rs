//! What a node's link needs to follow a replicated coordinator and to be probed: its addresses,
//! the results it sends again after a reconnect, and the ready file.

use std::time::Duration;

use drover_shared::proto::{self, node_message};

/// How long a sent result or failure is sent again on the next session (see `NodeLink::recent`).
pub(super) const RESEND_WINDOW: Duration = Duration::from_secs(30);
/// Most results and failures kept for that.
pub(super) const RESEND_MAX: usize = 32;

/// The job and lease a result or failure is about.
pub(super) fn ended_job(message: &proto::NodeMessage) -> Option<(&str, &str)> {
    match &message.kind {
        Some(node_message::Kind::Result(r)) => Some((&r.job_id, &r.lease_id)),
        Some(node_message::Kind::Failed(f)) => Some((&f.job_id, &f.lease_id)),
        _ => None,
    }
}

/// `DROVER_READY_FILE` while a session is open: created with it, removed when it ends.
pub(super) struct ReadyFile(Option<std::path::PathBuf>);

impl ReadyFile {
    pub(super) fn create(path: Option<&std::path::Path>) -> Self {
        let Some(path) = path else { return Self(None) };
        match std::fs::write(path, b"ready\n") {
            Ok(()) => Self(Some(path.to_path_buf())),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot write the ready file");
                Self(None)
            }
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The addresses of `COORDINATOR_URL` (comma-separated for a replicated coordinator).
pub(super) fn coordinator_urls(list: &str) -> Vec<String> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        vec![list.to_string()]
    } else {
        urls
    }
}
