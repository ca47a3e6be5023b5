//! Images clients upload once (`POST /v1/uploads`) and name in later jobs as `upload:<id>`
//! (`init_image`, `mask`, a stand-alone upscale's `image`): kept in memory, each for
//! `DROVER_UPLOAD_TTL_S`, at most `DROVER_UPLOAD_MEMORY_MB` in all (the oldest go first), and
//! usable only by the client that uploaded it (API key label, or address without keys). Not
//! durable: a restart forgets them; a job that named one holds its own copy of the bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_shared::job::source::Uploads;

struct Entry {
    bytes: Arc<[u8]>,
    client: String,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    /// Ids, oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

/// The coordinator's uploads.
pub struct UploadStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    cap: usize,
}

impl UploadStore {
    /// Uploads kept for `ttl`, at most `cap` bytes in all.
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            cap,
        }
    }

    /// How long an upload is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Keeps `bytes` for `client` (dropping expired uploads, then the oldest while over the
    /// cap); answers the new upload's id. An upload larger than the cap is not kept (`None`).
    pub fn put(&self, client: &str, bytes: Arc<[u8]>, now: Instant) -> Option<String> {
        if bytes.len() > self.cap {
            return None;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut inner, now);
        while inner.bytes + bytes.len() > self.cap {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.by_id.remove(&oldest) {
                inner.bytes -= e.bytes.len();
                tracing::info!(upload = %oldest, "upload dropped to make room");
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        inner.bytes += bytes.len();
        inner.order.push_back(id.clone());
        inner.by_id.insert(
            id.clone(),
            Entry {
                bytes,
                client: client.to_string(),
                at: now,
            },
        );
        Some(id)
    }

    /// Upload `id`'s bytes when `client` made it and it has not expired.
    pub fn get(&self, client: &str, id: &str, now: Instant) -> Option<Arc<[u8]>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .get(id)
            .filter(|e| e.client == client && now.duration_since(e.at) < self.ttl)
            .map(|e| e.bytes.clone())
    }

    /// Forgets upload `id` of `client`; whether there was one.
    pub fn remove(&self, client: &str, id: &str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.get(id).is_none_or(|e| e.client != client) {
            return false;
        }
        if let Some(e) = inner.by_id.remove(id) {
            inner.bytes -= e.bytes.len();
        }
        inner.order.retain(|have| have != id);
        true
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some(oldest) = inner.order.front() {
            let expired = inner
                .by_id
                .get(oldest)
                .is_none_or(|e| now.duration_since(e.at) >= self.ttl);
            if !expired {
                break;
            }
            if let Some(id) = inner.order.pop_front()
                && let Some(e) = inner.by_id.remove(&id)
            {
                inner.bytes -= e.bytes.len();
            }
        }
    }

    /// The uploads one client may name, for validating its requests (off the server's threads).
    pub fn of(self: &Arc<Self>, client: &str) -> ClientUploads {
        ClientUploads {
            store: self.clone(),
            client: client.to_string(),
        }
    }
}

/// One client's view of the uploads.
pub struct ClientUploads {
    store: Arc<UploadStore>,
    client: String,
}

impl Uploads for ClientUploads {
    fn get(&self, id: &str) -> Option<Arc<[u8]>> {
        self.store.get(&self.client, id, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_expire_make_room_and_stay_with_their_client() {
        let store = UploadStore::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let a = store.put("alice", Arc::from(vec![1u8; 4]), t0).unwrap();
        let b = store.put("alice", Arc::from(vec![2u8; 4]), t0).unwrap();
        assert_eq!(store.get("alice", &a, t0).as_deref(), Some(&[1u8; 4][..]));
        assert_eq!(store.get("bob", &a, t0), None, "another client's upload");
        // Over the cap: the oldest goes.
        let c = store.put("bob", Arc::from(vec![3u8; 4]), t0).unwrap();
        assert_eq!(store.get("alice", &a, t0), None);
        assert!(store.get("alice", &b, t0).is_some() && store.get("bob", &c, t0).is_some());
        assert_eq!(store.bytes(), 8);
        assert_eq!(
            store.put("bob", Arc::from(vec![0u8; 11]), t0),
            None,
            "larger than all"
        );
        // Past the time to live: gone, and its bytes freed at the next upload.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(store.get("alice", &b, later), None);
        store.put("carol", Arc::from(vec![4u8; 2]), later).unwrap();
        assert_eq!(store.bytes(), 2);
        assert!(!store.remove("bob", &b), "not bob's, and gone");
        let d = store.put("carol", Arc::from(vec![5u8; 2]), later).unwrap();
        assert!(store.remove("carol", &d));
        assert_eq!(store.get("carol", &d, later), None);
        assert_eq!(store.bytes(), 2);
    }
}
