//! The write-ahead log: every change to the store, written to a generation file
//! (`wal/<generation>.wal`) and made durable with one `fdatasync` for all the waiters of a round,
//! before sled has it. A checkpoint puts a generation's changes in sled, flushes sled and
//! recycles the generation's file; a restart replays the generations left (see `Store::open`).
//!
//! **Files are preallocated and recycled.** A generation is written into a file that already has
//! its blocks ([`FILE_BYTES`] of zeros, or a checkpointed generation's file renamed), so an
//! `fdatasync` writes the records and nothing else: no block allocation, no size change, no
//! inode write. Spare files are made and kept by the checkpoint thread, off the path of
//! acknowledgements.
//!
//! Record layout: length of what follows the checksum (u32 LE), CRC-32 of it (u32 LE), then the
//! generation (u64 LE), the kind (u8) and the body. Reading stops at the first record that is
//! short, fails its checksum or carries another generation: the torn tail of a crash (never
//! acknowledged: an acknowledgement waits for the `fdatasync` after the record), what an
//! earlier use of a recycled file left after the end, or the zeros a [`Wal::rewind`] wrote over
//! what a failed write left.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::error::{Result, StoreError};

/// Largest preallocated log file; a generation that reaches it is checkpointed.
pub const FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Smallest preallocated log file.
const MIN_FILE_BYTES: u64 = 1024 * 1024;

/// Spare files kept ready for the next generations.
const SPARES: usize = 2;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A node record (JSON).
    Node = 1,
    /// An unfinished job's record (JSON).
    Job = 2,
    /// A finished job, as it goes into `jobs` (see `encode_finished`).
    Finish = 3,
    /// A job's source image, logged once, apart from its record (see `codec::source_record`).
    Source = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Node),
            2 => Some(Self::Job),
            3 => Some(Self::Finish),
            4 => Some(Self::Source),
            _ => None,
        }
    }
}

/// Length and checksum.
const FRAME: usize = 8;
/// Generation and kind, the checksummed part before the body.
const PREFIX: usize = 9;

fn generation_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.wal"))
}

fn spares(dir: &Path) -> Result<Vec<PathBuf>> {
    let spares = super::files_named(dir, |n| {
        (n.starts_with("spare-") && n.ends_with(".wal")).then(|| n.to_string())
    })?;
    Ok(spares.into_iter().map(|(_, path)| path).collect())
}

/// The generations in `dir`, oldest first.
pub fn generations(dir: &Path) -> Result<Vec<u64>> {
    let generations = super::files_named(dir, |n| n.strip_suffix(".wal")?.parse::<u64>().ok())?;
    Ok(generations.into_iter().map(|(g, _)| g).collect())
}

/// Every whole record of a generation, in order.
pub fn read(dir: &Path, generation: u64) -> Result<Vec<(Kind, Vec<u8>)>> {
    let bytes = std::fs::read(generation_path(dir, generation))?;
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(frame) = bytes.get(at..at + FRAME) {
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let Some(rest) = bytes.get(at + FRAME..at + FRAME + len) else {
            break;
        };
        if len < PREFIX || crc32fast::hash(rest) != crc {
            break;
        }
        let (prefix, body) = rest.split_at(PREFIX);
        let written_in = u64::from_le_bytes(prefix[..8].try_into().unwrap_or_default());
        let Some(kind) = Kind::from_u8(prefix[8]).filter(|_| written_in == generation) else {
            break;
        };
        out.push((kind, body.to_vec()));
        at += FRAME + len;
    }
    Ok(out)
}

/// Retires every generation up to and including `generation`: their files become spares (up to
/// a few) or are deleted.
pub fn retire_through(dir: &Path, generation: u64) -> Result<()> {
    let mut spare_count = spares(dir)?.len();
    for g in generations(dir)? {
        if g > generation {
            continue;
        }
        let path = generation_path(dir, g);
        if spare_count < SPARES {
            std::fs::rename(&path, dir.join(format!("spare-{g:020}.wal")))?;
            spare_count += 1;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Makes sure a spare file is ready: zeros on disk, twice the `expected` size of a generation
/// (a power of two between 1 MiB and [`FILE_BYTES`]). Run off the path of acknowledgements: it
/// writes the whole file. A generation that outgrows its file goes on growing it (slower syncs),
/// and the file is then recycled at its larger size.
pub fn prepare_spare(dir: &Path, expected: u64) -> Result<()> {
    if !spares(dir)?.is_empty() {
        return Ok(());
    }
    let size = expected
        .saturating_mul(2)
        .next_power_of_two()
        .clamp(MIN_FILE_BYTES, FILE_BYTES);
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join("spare.partial");
    let written = (|| {
        let file = File::create(&temporary)?;
        let zeros = vec![0u8; 1024 * 1024];
        let mut at = 0;
        while at < size {
            file.write_all_at(&zeros, at)?;
            at += zeros.len() as u64;
        }
        file.sync_all()
    })();
    if let Err(e) = written {
        // Not left to take space on a full disk.
        let _ = std::fs::remove_file(&temporary);
        return Err(e.into());
    }
    let name = format!(
        "spare-new-{}.wal",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    std::fs::rename(&temporary, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The open generation, written by the store's writer thread.
pub struct Wal {
    dir: PathBuf,
    generation: u64,
    file: File,
    /// Bytes of records in the generation, written or buffered.
    len: u64,
    /// Bytes already written to the file.
    written: u64,
    /// Bytes known to be on disk: the records up to the last successful sync.
    synced: u64,
    buffer: Vec<u8>,
    /// Whether something was written since the last sync.
    unsynced: bool,
    /// Test hook: the next write stops with "no space" after this many bytes.
    #[cfg(test)]
    pub fail_after: Option<usize>,
}

impl Wal {
    /// Starts generation `generation` in `dir`, in a spare file when there is one (else in a new,
    /// growing file).
    pub fn create(dir: &Path, generation: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = generation_path(dir, generation);
        let file = match spares(dir)?.into_iter().next() {
            Some(spare) => {
                std::fs::rename(&spare, &path)?;
                File::options().write(true).open(&path)?
            }
            None => File::options()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)?,
        };
        // The generation's name must survive a crash as much as its records do.
        File::open(dir)?.sync_all()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            generation,
            file,
            len: 0,
            written: 0,
            synced: 0,
            buffer: Vec::with_capacity(64 * 1024),
            unsynced: false,
            #[cfg(test)]
            fail_after: None,
        })
    }

    /// The generation being written.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes in this generation so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Buffers one record.
    pub fn append(&mut self, kind: Kind, body: &[u8]) -> Result<()> {
        let len = PREFIX + body.len();
        let len32 = u32::try_from(len)
            .map_err(|_| StoreError::TooLarge(format!("a log record of {len} bytes")))?;
        let start = self.buffer.len();
        self.buffer.extend_from_slice(&[0; FRAME]);
        self.buffer
            .extend_from_slice(&self.generation.to_le_bytes());
        self.buffer.push(kind as u8);
        self.buffer.extend_from_slice(body);
        let crc = crc32fast::hash(&self.buffer[start + FRAME..]);
        self.buffer[start..start + 4].copy_from_slice(&len32.to_le_bytes());
        self.buffer[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.len += (len + FRAME) as u64;
        Ok(())
    }

    /// Writes the buffered records to the file (page cache).
    pub fn write(&mut self) -> Result<()> {
        #[cfg(test)]
        if let Some(after) = self.fail_after.take() {
            let after = after.min(self.buffer.len());
            self.put(&self.buffer[..after], self.written)?;
            return Err(std::io::Error::from_raw_os_error(28).into());
        }
        if !self.buffer.is_empty() {
            self.put(&self.buffer, self.written)?;
            self.written += self.buffer.len() as u64;
            self.buffer.clear();
            self.unsynced = true;
        }
        Ok(())
    }

    /// Writes and `fdatasync`s: every record appended so far is durable.
    pub fn sync(&mut self) -> Result<()> {
        self.sync_through(self.len)
    }

    /// Writes and `fdatasync`s everything, and counts the records up to `offset` (at most
    /// [`Wal::len`]) as durable: a later [`Wal::rewind`] can still take back those after it.
    pub fn sync_through(&mut self, offset: u64) -> Result<()> {
        self.write()?;
        if self.unsynced {
            self.file.sync_data()?;
            // Only now are the writes on disk (the crash simulation of the tests keeps them).
            #[cfg(test)]
            super::tests::crash::synced(&generation_path(&self.dir, self.generation));
            self.unsynced = false;
        }
        self.synced = self.synced.max(offset.min(self.written));
        Ok(())
    }

    /// Forgets every record after the last durable one, after a failed write or sync (see
    /// [`Wal::rewind_to`]).
    pub fn rewind(&mut self) {
        self.rewind_to(self.synced);
    }

    /// Forgets every record after `offset` (never one counted durable): they are dropped from
    /// the buffer, and zeros go over whatever of them reached the file (best effort: what
    /// reads as a record after a rewind's zeros is never read), so that none of them is read
    /// back by a replay, even when later records end just where one of them began. The next
    /// records are written from there.
    pub fn rewind_to(&mut self, offset: u64) {
        let offset = offset.max(self.synced);
        // A failed write may have put any part of the buffer on the file past `written`.
        let reached = self.written + self.buffer.len() as u64;
        if offset >= self.written {
            self.buffer
                .truncate(usize::try_from(offset - self.written).unwrap_or(usize::MAX));
            self.len = offset.min(self.len);
            // What is kept of the buffer is written again over its own bytes; what follows
            // it on the file is cleared.
            self.clear_file(offset, reached);
            return;
        }
        self.buffer.clear();
        self.clear_file(offset, reached);
        self.written = offset;
        self.len = offset;
    }

    /// Writes `data` at `at` in the generation's file (page cache until the next sync; the
    /// tests' crash simulation notes what it overwrites).
    fn put(&self, data: &[u8], at: u64) -> std::io::Result<()> {
        #[cfg(test)]
        super::tests::crash::before_write(
            &generation_path(&self.dir, self.generation),
            data.len(),
            at,
        );
        self.file.write_all_at(data, at)
    }

    /// Writes zeros over the file's bytes in `from..to` that it holds (best effort).
    fn clear_file(&mut self, from: u64, to: u64) {
        let on_file = self.file.metadata().map(|m| m.len()).unwrap_or(to);
        let (offset, end) = (from, to.min(on_file));
        if end > offset {
            // Zeros over bytes the file already has need no new blocks, even on a full disk.
            let zeros = vec![0u8; (end - offset).min(1024 * 1024) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                if let Err(e) = self.put(&zeros[..n], at) {
                    tracing::error!(error = %e, generation = self.generation, "cannot clear what a failed write left in the write-ahead log");
                    break;
                }
                at += n as u64;
            }
            self.unsynced = true;
        }
    }

    /// Starts the next generation (after a [`Wal::sync`]: a flush after the rotation syncs only
    /// the new generation, so the old one must already be durable); answers the generation just
    /// closed. When it fails, this generation stays open.
    pub fn start_next(&mut self) -> Result<u64> {
        let closed = self.generation;
        *self = Self::create(&self.dir, closed + 1)?;
        Ok(closed)
    }

    /// Syncs this generation and starts the next one; answers the generation just closed.
    #[cfg(test)]
    pub fn rotate(&mut self) -> Result<u64> {
        self.sync()?;
        self.start_next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(wal: &mut Wal, kind: Kind, body: &[u8]) {
        wal.append(kind, body).unwrap();
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), 7).unwrap();
        put(&mut wal, Kind::Job, b"first");
        put(&mut wal, Kind::Finish, b"second");
        wal.sync().unwrap();
        let whole = wal.len();
        assert_eq!(
            read(dir.path(), 7).unwrap(),
            vec![
                (Kind::Job, b"first".to_vec()),
                (Kind::Finish, b"second".to_vec())
            ]
        );
        // A crash mid-record: the last record is cut short, or its bytes are damaged.
        let path = generation_path(dir.path(), 7);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, whole);
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert_eq!(
            read(dir.path(), 7).unwrap(),
            vec![(Kind::Job, b"first".to_vec())]
        );
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        assert_eq!(read(dir.path(), 7).unwrap().len(), 1);
    }

    #[test]
    fn spares_are_sized_for_twice_the_expected_log_within_1_to_64_mib() {
        let size = |expected: u64| {
            let dir = tempfile::tempdir().unwrap();
            prepare_spare(dir.path(), expected).unwrap();
            let spare = spares(dir.path()).unwrap().remove(0);
            std::fs::metadata(spare).unwrap().len()
        };
        assert_eq!(size(0), 1 << 20);
        assert_eq!(size(3 << 20), 8 << 20);
        assert_eq!(
            size(1 << 30),
            64 << 20,
            "capped: a bigger log grows its file"
        );
    }

    #[test]
    fn recycled_files_are_preallocated_and_their_old_records_never_read() {
        let dir = tempfile::tempdir().unwrap();
        prepare_spare(dir.path(), 600_000).unwrap();
        let mut wal = Wal::create(dir.path(), 1).unwrap();
        assert_eq!(
            std::fs::metadata(generation_path(dir.path(), 1))
                .unwrap()
                .len(),
            2 * 1024 * 1024,
            "generation 1 took the spare, sized for twice what was expected"
        );
        for i in 0..3u8 {
            put(&mut wal, Kind::Job, &[i; 100]);
        }
        assert_eq!(wal.rotate().unwrap(), 1);
        assert_eq!(generations(dir.path()).unwrap(), vec![1, 2]);
        retire_through(dir.path(), 1).unwrap();
        assert_eq!(generations(dir.path()).unwrap(), vec![2]);
        assert_eq!(spares(dir.path()).unwrap().len(), 1, "kept as a spare");
        // Generation 3 reuses generation 1's file: its three old records are still in it, after
        // generation 3's one record, and are not read as generation 3's.
        put(&mut wal, Kind::Node, b"two");
        wal.rotate().unwrap();
        put(&mut wal, Kind::Finish, b"three");
        wal.sync().unwrap();
        assert_eq!(wal.generation(), 3);
        assert_eq!(
            read(dir.path(), 3).unwrap(),
            vec![(Kind::Finish, b"three".to_vec())]
        );
        assert_eq!(
            read(dir.path(), 2).unwrap(),
            vec![(Kind::Node, b"two".to_vec())]
        );
        // Beyond the spares wanted, retired files are deleted.
        prepare_spare(dir.path(), 0).unwrap();
        retire_through(dir.path(), 2).unwrap();
        assert_eq!(spares(dir.path()).unwrap().len(), SPARES);
        assert_eq!(generations(dir.path()).unwrap(), vec![3]);
    }
}
