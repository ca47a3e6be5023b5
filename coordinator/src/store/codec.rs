//! How records are laid out in sled and in the log: the finished record (the place of its image
//! in front of the JSON record) and the `finished` index key.

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
        // The index is in time order whatever the ids.
        assert!(finished_key(1, JobId::random()) < finished_key(2, JobId::random()));
    }
}
