//! How records are laid out in sled and in the log: the finished record (the place of its image
//! in front of the JSON record), the `finished` index key, and a job's source image kept apart
//! from its record.

use std::sync::Arc;

use drover_shared::ids::JobId;

use super::error::{Result, StoreError};
use super::image_log::ImageRef;
use crate::records::JobRecord;

/// First byte of a finished record that carries an [`ImageRef`] (a bare JSON record starts
/// with `{`).
const WITH_IMAGE: u8 = 0xd1;

/// The `finished` key of a job that ended at `ended_ms`: the end time (big-endian, so the index
/// is in time order), then the job id.
pub fn finished_key(ended_ms: u64, id: JobId) -> Vec<u8> {
    let mut key = ended_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// A finished record as stored in `jobs` (and in the log): the JSON record, preceded by
/// `WITH_IMAGE` and the image's place when it has one.
pub fn encode_finished(
    out: &mut Vec<u8>,
    record: &JobRecord,
    image: Option<ImageRef>,
) -> Result<()> {
    if let Some(at) = image {
        out.push(WITH_IMAGE);
        out.extend_from_slice(&at.encode());
    }
    serde_json::to_writer(out, record)?;
    Ok(())
}

/// Reads what [`encode_finished`] wrote (or a bare JSON record of an older layout).
pub fn decode_finished(value: &[u8]) -> Result<(JobRecord, Option<ImageRef>)> {
    match value.split_first() {
        Some((&WITH_IMAGE, rest)) => {
            let at = ImageRef::decode(rest).ok_or_else(|| {
                StoreError::Damaged("a finished record with a short image place".into())
            })?;
            let record = serde_json::from_slice(&rest[ImageRef::ENCODED_LEN..])?;
            Ok((record, Some(at)))
        }
        _ => Ok((serde_json::from_slice(value)?, None)),
    }
}

/// A job's source image (and mask) as stored in `sources`: a mask flag, the image's length
/// (u64 LE), the image, then the mask.
pub fn encode_source(image: &[u8], mask: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + image.len() + mask.map_or(0, <[u8]>::len));
    out.push(u8::from(mask.is_some()));
    out.extend_from_slice(&(image.len() as u64).to_le_bytes());
    out.extend_from_slice(image);
    out.extend_from_slice(mask.unwrap_or_default());
    out
}

/// A source's image and mask, as decoded.
pub type SourceBytes = (Arc<[u8]>, Option<Arc<[u8]>>);

/// Reads what [`encode_source`] wrote: the image and the mask.
pub fn decode_source(value: &[u8]) -> Result<SourceBytes> {
    let short = || StoreError::Damaged("a job's source record is too short".into());
    let (&flag, rest) = value.split_first().ok_or_else(short)?;
    let len: [u8; 8] = rest
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(short)?;
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| short())?;
    let image = rest.get(8..8 + len).ok_or_else(short)?;
    let mask = &rest[8 + len..];
    Ok((Arc::from(image), (flag == 1).then(|| Arc::from(mask))))
}

/// A source record of the log: the job's id, then [`encode_source`]'s bytes.
pub fn source_record(id: JobId, source: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + source.len());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(source);
    out
}

/// Reads what [`source_record`] wrote.
pub fn read_source_record(body: &[u8]) -> Result<(JobId, &[u8])> {
    let id: [u8; 16] = body
        .get(..16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Damaged("a source record without its job id".into()))?;
    Ok((JobId::from_bytes(id), &body[16..]))
}

/// Puts a source kept apart back into its job's record (a record whose source lost its bytes
/// to `sources`); answers whether the record wanted it.
pub fn rejoin_source(job: &mut JobRecord, value: &[u8]) -> Result<bool> {
    let Some(source) = job.spec.source.as_mut().filter(|s| s.is_stripped()) else {
        return Ok(false);
    };
    let (image, mask) = decode_source(value)?;
    source.image = image;
    source.mask = mask;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::job::JobRequest;

    #[test]
    fn finished_records_round_trip_with_and_without_an_image() {
        let spec = JobRequest {
            prompt: "a cat".into(),
            ..Default::default()
        }
        .validate(|| 1)
        .unwrap();
        let record = JobRecord::new(JobId::random(), spec);
        let at = ImageRef {
            segment: 3,
            offset: 4096,
            len: 17,
        };
        for image in [Some(at), None] {
            let mut value = Vec::new();
            encode_finished(&mut value, &record, image).unwrap();
            assert_eq!(decode_finished(&value).unwrap(), (record.clone(), image));
        }
        assert!(matches!(
            decode_finished(&[WITH_IMAGE, 1, 2]),
            Err(StoreError::Damaged(_))
        ));
        // Sources round trip with and without a mask, and through the log's record.
        for mask in [None, Some(&b"mask"[..]), Some(&b""[..])] {
            let value = encode_source(b"image", mask);
            let (image, got) = decode_source(&value).unwrap();
            assert_eq!((&image[..], got.as_deref()), (&b"image"[..], mask));
            let id = JobId::random();
            let body = source_record(id, &value);
            assert_eq!(read_source_record(&body).unwrap(), (id, &value[..]));
        }
        assert!(decode_source(&[0, 9, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        // The index is in time order whatever the ids.
        assert!(finished_key(1, JobId::random()) < finished_key(2, JobId::random()));
    }
}
