//! Identifier newtypes. All ids are UUIDs (random, version 4; job ids time-ordered, version 7)
//! rendered as lowercase hyphenated strings, so they travel unchanged through JSON, gRPC and sled
//! keys. Random bits come from a per-thread ChaCha generator seeded by the OS, not a system call
//! per id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(
            feature = "openapi",
            derive(utoipa::ToSchema),
            schema(value_type = String, format = "uuid")
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// The id's 16 bytes, used as a sled key.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// Rebuilds an id from the 16 bytes of [`Self::as_bytes`].
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = crate::error::InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| crate::error::InvalidId {
                    kind: $what,
                    value: s.chars().take(64).collect(),
                })
            }
        }
    };
}

id_type!(
    /// Identifies a registered node; stable across reconnects of a node with the same name.
    NodeId,
    "node id"
);
id_type!(
    /// Identifies a job from submission to its terminal state.
    JobId,
    "job id"
);

impl JobId {
    /// A fresh time-ordered id (UUID version 7: milliseconds since the epoch, then random
    /// bits): jobs accepted later sort later, so the store's trees and indexes grow at their
    /// end instead of at random places.
    pub fn time_ordered() -> Self {
        Self(Uuid::now_v7())
    }

    /// When a [`JobId::time_ordered`] id was made (ms since the epoch); `None` for other ids.
    pub fn created_ms(&self) -> Option<u64> {
        let b = self.0.as_bytes();
        (b[6] >> 4 == 7).then(|| u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]))
    }
}
id_type!(
    /// Identifies one lease (one attempt of a job on one node). Only the current lease holder may
    /// report a job's result.
    LeaseId,
    "lease id"
);

impl LeaseId {
    /// A fencing token: ordered by `(epoch, counter)` as bytes (and as strings): the 48 low
    /// bits of `epoch` first, then UUID version 8's fixed bits, then the 62 low bits of
    /// `counter`. A coordinator takes a new epoch each time it starts leading (a replicated
    /// one's Raft term; a single one's start time in ms), so its leases sort after every lease
    /// an earlier leader granted.
    pub fn fenced(epoch: u64, counter: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&epoch.to_be_bytes()[2..]);
        bytes[8..].copy_from_slice(&(counter & (u64::MAX >> 2)).to_be_bytes());
        Self(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_tokens_sort_by_epoch_then_counter() {
        let tokens = [
            LeaseId::fenced(1, 0),
            LeaseId::fenced(1, 1),
            LeaseId::fenced(1, 1 << 40),
            LeaseId::fenced(2, 0),
            LeaseId::fenced(1_796_423_744_595, 0),
            LeaseId::fenced(1_796_423_744_595, 7),
        ];
        for pair in tokens.windows(2) {
            assert!(
                pair[0].as_bytes() < pair[1].as_bytes(),
                "{} < {}",
                pair[0],
                pair[1]
            );
            assert!(pair[0].to_string() < pair[1].to_string());
        }
        let parsed: LeaseId = tokens[3].to_string().parse().expect("a uuid");
        assert_eq!(parsed, tokens[3]);
    }

    #[test]
    fn ids_round_trip_through_strings_and_bytes() {
        let id = JobId::random();
        assert_eq!(id.to_string().parse::<JobId>().ok(), Some(id));
        assert_eq!(JobId::from_bytes(*id.as_bytes()), id);
        assert_ne!(JobId::random(), id);
    }

    #[test]
    fn new_job_ids_are_time_ordered() {
        let ids: Vec<JobId> = (0..1000).map(|_| JobId::time_ordered()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "later ids sort later");
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let made = ids[0].created_ms().expect("a time-ordered id has a time");
        assert!(now.abs_diff(made) < 60_000, "{made} vs {now}");
        assert_eq!(JobId::random().created_ms(), None);
    }

    #[test]
    fn bad_ids_are_rejected_with_their_kind() {
        let err = "nope".parse::<NodeId>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid node id `nope`: expected a UUID")
        );
    }
}
