//! A crash that loses the page cache, simulated under the write-ahead log: every write to a log
//! file is noted with the bytes it overwrote until a sync of that file makes it durable;
//! [`lossy_image`] copies a store's folder as such a crash would leave it — each write since the
//! file's last sync undone (the last one torn, half on disk, if asked). A plain copy of an open
//! store's folder (`crash_image`) keeps the page cache, as a `kill -9` does, so it cannot tell a
//! sync from none; this can.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Writes since a file's last sync, oldest first: where, and the bytes each covered.
type Writes = Vec<(u64, Vec<u8>)>;

/// Per log file, its [`Writes`].
static PENDING: Mutex<BTreeMap<PathBuf, Writes>> = Mutex::new(BTreeMap::new());

fn pending() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, Writes>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes a write of `len` bytes at `at` to `path`, with what it overwrites (zeros past the end).
pub fn before_write(path: &Path, len: usize, at: u64) {
    let mut old = vec![0u8; len];
    if let Ok(file) = File::open(path) {
        let mut read = 0;
        while read < len {
            match file.read_at(&mut old[read..], at + read as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    }
    pending()
        .entry(path.to_path_buf())
        .or_default()
        .push((at, old));
}

/// `path` was synced: its writes are durable.
pub fn synced(path: &Path) {
    pending().remove(path);
}

/// A copy of the folder `dir` (an open store's) as a crash that loses the page cache leaves it:
/// the log's unsynced writes undone, newest first; with `torn`, the last write keeps its first
/// half (a write cut by the crash).
pub fn lossy_image(dir: &Path, torn: bool) -> tempfile::TempDir {
    let image = super::crash_image(dir);
    for (path, writes) in pending().iter() {
        let Ok(inside) = path.strip_prefix(dir) else {
            continue;
        };
        let Ok(file) = File::options().write(true).open(image.path().join(inside)) else {
            continue;
        };
        for (k, (at, old)) in writes.iter().enumerate().rev() {
            let keep = if torn && k + 1 == writes.len() {
                old.len() / 2
            } else {
                0
            };
            file.write_all_at(&old[keep..], at + keep as u64)
                .expect("undoing a write in the crash image");
        }
    }
    image
}
