//! The image log: result images appended to segment files (`images/<number>.seg`), each entry
//! checked by a header, located from the job's record by an [`ImageRef`].
//!
//! Images are the bulk of what the coordinator writes (kilobytes to megabytes each, written once,
//! read rarely, deleted by age). In sled every image went through its tree and was rewritten when
//! leaves consolidated; here it costs one append to a file, and retention deletes whole segments.
//!
//! Entry layout: `DRIMG\0\0\x01` (8 bytes), job id (16), image length (u32 LE), CRC-32 of the
//! image (u32 LE), then the image. A reader checks all four against what the record says, so a
//! torn or foreign entry is an error, never wrong bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use drover_shared::ids::JobId;

use super::error::{Result, StoreError};

const MAGIC: &[u8; 8] = b"DRIMG\0\0\x01";
/// Bytes of an entry before the image.
pub const HEADER_LEN: usize = 32;
/// A segment that has reached this size is closed and a new one started.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Where an image lives: its segment, the offset of its entry, the image's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Segment number (file `<number>.seg`).
    pub segment: u32,
    /// Offset of the entry's header in the segment.
    pub offset: u64,
    /// Length of the image in bytes.
    pub len: u32,
}

impl ImageRef {
    /// Bytes of [`ImageRef::encode`].
    pub const ENCODED_LEN: usize = 16;

    /// Fixed-width little-endian encoding (stored in front of a finished job's record).
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..4].copy_from_slice(&self.segment.to_le_bytes());
        out[4..12].copy_from_slice(&self.offset.to_le_bytes());
        out[12..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Reads what [`ImageRef::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.get(..Self::ENCODED_LEN)?.try_into().ok()?;
        let (segment, rest) = bytes.split_at(4);
        let (offset, len) = rest.split_at(8);
        Some(Self {
            segment: u32::from_le_bytes(segment.try_into().ok()?),
            offset: u64::from_le_bytes(offset.try_into().ok()?),
            len: u32::from_le_bytes(len.try_into().ok()?),
        })
    }
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}.seg"))
}

/// The segments in `dir`, by number.
fn segments(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    super::files_named(dir, |n| n.strip_suffix(".seg")?.parse().ok())
}

/// Opens segment `segment` for appending; a new one's name is made durable at once (a synced
/// image in a file whose directory entry was lost in a crash would be lost with it).
fn open_segment(dir: &Path, segment: u32) -> Result<File> {
    let path = segment_path(dir, segment);
    let existed = path.exists();
    let file = File::options().create(true).append(true).open(&path)?;
    if !existed {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// Reads one image, checking its entry against the reference and the job.
pub fn read(dir: &Path, id: JobId, at: ImageRef) -> Result<Vec<u8>> {
    let lost = |why: &str| StoreError::Damaged(format!("image of job {id}: {why}"));
    let file = match File::open(segment_path(dir, at.segment)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Gone(format!(
                "the image of job {id} is past its retention and was deleted"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let mut buf = vec![0u8; HEADER_LEN + at.len as usize];
    file.read_exact_at(&mut buf, at.offset)
        .map_err(|e| lost(&format!("segment {} ends early ({e})", at.segment)))?;
    let (header, png) = buf.split_at(HEADER_LEN);
    if &header[..8] != MAGIC || header[8..24] != id.as_bytes()[..] {
        return Err(lost("the entry at its place belongs to something else"));
    }
    let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
    let crc = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
    if len != at.len || crc != crc32fast::hash(png) {
        return Err(lost("the entry is damaged (length or checksum)"));
    }
    buf.drain(..HEADER_LEN);
    Ok(buf)
}

/// The writing side: the open segment, appended to by the store's writer thread only.
pub struct Appender {
    dir: PathBuf,
    segment: u32,
    file: File,
    /// Bytes in the segment, written or buffered.
    len: u64,
    /// Entries not yet written to the file.
    buffer: Vec<u8>,
    /// Segments written to since [`Appender::take_touched`] last ran, to be synced.
    touched: BTreeMap<u32, File>,
    /// Test hook: the next write stops half-way with "no space".
    #[cfg(test)]
    pub fail_next: bool,
}

impl Appender {
    /// Opens the newest segment in `dir` for appending (a new one in an empty folder). Bytes
    /// after the last complete entry of a crashed run stay where they are: nothing that survived
    /// points at them.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let segment = segments(dir)?.last().map_or(1, |(n, _)| *n);
        let file = open_segment(dir, segment)?;
        let len = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            segment,
            file,
            len,
            buffer: Vec::new(),
            touched: BTreeMap::new(),
            #[cfg(test)]
            fail_next: false,
        })
    }

    /// The segment being appended to.
    pub fn segment(&self) -> u32 {
        self.segment
    }

    /// Moves on to a new segment when the current one is full (file I/O), so that the next
    /// [`Appender::append`] only buffers.
    pub fn make_room(&mut self) -> Result<()> {
        if self.len >= SEGMENT_BYTES {
            self.write()?;
            self.file = open_segment(&self.dir, self.segment + 1)?;
            self.segment += 1;
            self.len = 0;
        }
        Ok(())
    }

    /// Buffers an entry for `png` (after [`Appender::make_room`]); answers where it will be.
    /// Call [`Appender::write`] to put the buffered entries in the file.
    pub fn append(&mut self, id: JobId, png: &[u8]) -> Result<ImageRef> {
        let len = u32::try_from(png.len())
            .map_err(|_| StoreError::TooLarge(format!("an image of {} bytes", png.len())))?;
        self.make_room()?;
        let at = ImageRef {
            segment: self.segment,
            offset: self.len,
            len,
        };
        self.buffer.extend_from_slice(MAGIC);
        self.buffer.extend_from_slice(id.as_bytes());
        self.buffer.extend_from_slice(&len.to_le_bytes());
        self.buffer
            .extend_from_slice(&crc32fast::hash(png).to_le_bytes());
        self.buffer.extend_from_slice(png);
        self.len += (HEADER_LEN + png.len()) as u64;
        Ok(at)
    }

    /// Writes the buffered entries to the file (the page cache: they survive the process, and
    /// reach the disk when [`Appender::take_touched`]'s segments are synced).
    pub fn write(&mut self) -> Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) && !self.buffer.is_empty() {
            self.file.write_all(&self.buffer[..self.buffer.len() / 2])?;
            return Err(std::io::Error::from_raw_os_error(28).into());
        }
        if !self.buffer.is_empty() {
            self.file.write_all(&self.buffer)?;
            self.buffer.clear();
            if !self.touched.contains_key(&self.segment) {
                self.touched.insert(self.segment, self.file.try_clone()?);
            }
        }
        Ok(())
    }

    /// The segments written to since the last call, to sync before anything durable points
    /// at their entries.
    pub fn take_touched(&mut self) -> BTreeMap<u32, File> {
        std::mem::take(&mut self.touched)
    }

    /// Where the next entry goes (taken before a round, for [`Appender::rewind`]).
    pub fn mark(&self) -> Mark {
        Mark {
            segment: self.segment,
            len: self.len,
        }
    }

    /// Forgets the entries appended since `mark`, after a failed write: the buffer is dropped
    /// and the segment cut back to the mark (best effort: an entry nothing points at is never
    /// read). The next entry goes where the file ends.
    pub fn rewind(&mut self, mark: Mark) {
        self.buffer.clear();
        let keep = if mark.segment == self.segment {
            mark.len
        } else {
            // The round had moved on to a new segment: it holds nothing of an earlier round.
            0
        };
        if let Err(e) = self.file.set_len(keep) {
            tracing::error!(error = %e, segment = self.segment, "cannot cut a failed write out of the image log");
        }
        self.len = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => keep,
        };
    }
}

/// A place in the image log (see [`Appender::mark`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    segment: u32,
    len: u64,
}

/// Deletes every segment in `dir` below `open` (the one being appended to, which is kept) last
/// written before `before`; answers how many.
pub fn delete_older(dir: &Path, open: u32, before: SystemTime) -> Result<usize> {
    let mut deleted = 0;
    for (number, path) in segments(dir)? {
        if number >= open {
            continue;
        }
        if std::fs::metadata(&path)?.modified()? < before {
            std::fs::remove_file(&path)?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_round_trip_and_bad_references_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (JobId::random(), JobId::random());
        let mut log = Appender::open(dir.path()).unwrap();
        let at_a = log.append(a, b"first image").unwrap();
        let at_b = log.append(b, b"second").unwrap();
        log.write().unwrap();
        for (_, f) in log.take_touched() {
            f.sync_data().unwrap();
        }
        assert_eq!(read(dir.path(), a, at_a).unwrap(), b"first image");
        assert_eq!(read(dir.path(), b, at_b).unwrap(), b"second");
        assert_eq!(ImageRef::decode(&at_b.encode()), Some(at_b));
        // The wrong job, a wrong length, an offset into the middle of an entry.
        assert!(read(dir.path(), b, at_a).is_err());
        assert!(read(dir.path(), a, ImageRef { len: 5, ..at_a }).is_err());
        assert!(read(dir.path(), a, ImageRef { offset: 3, ..at_a }).is_err());
        // Reopening appends after what is there.
        drop(log);
        let mut log = Appender::open(dir.path()).unwrap();
        let at_c = log.append(a, b"third").unwrap();
        log.write().unwrap();
        assert!(at_c.offset > at_b.offset);
        assert_eq!(read(dir.path(), a, at_c).unwrap(), b"third");
    }

    #[test]
    fn a_damaged_entry_is_an_error_and_a_deleted_segment_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let id = JobId::random();
        let mut log = Appender::open(dir.path()).unwrap();
        let at = log.append(id, b"png bytes").unwrap();
        log.write().unwrap();
        let path = segment_path(dir.path(), at.segment);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(dir.path(), id, at).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        // Closed segments are deleted by age; the open one never is.
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(delete_older(dir.path(), at.segment, later).unwrap(), 0);
        assert_eq!(delete_older(dir.path(), at.segment + 1, later).unwrap(), 1);
        assert!(matches!(read(dir.path(), id, at), Err(StoreError::Gone(_))));
    }
}
