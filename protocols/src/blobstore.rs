//! A bounded, content-addressed store of the blobs a peer holds and serves: its own and fetched
//! contributions, and model snapshots.
//!
//! Blobs are keyed by their blake3 hash and evicted oldest-first once the byte budget is
//! exceeded; pinned hashes (the snapshot being served, the current round's contributions) are
//! evicted last. Inserting checks the hash, so the store never serves bytes under a wrong name.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use crate::contribution::{BlobHash, blob_hash};

/// A content-addressed blob store with a byte budget.
#[derive(Debug)]
pub struct BlobStore {
    blobs: HashMap<BlobHash, Arc<Vec<u8>>>,
    order: VecDeque<BlobHash>,
    pinned: HashSet<BlobHash>,
    bytes: usize,
    budget_bytes: usize,
}

impl BlobStore {
    /// An empty store holding at most `budget_bytes` (one blob larger than that is still kept
    /// until the next insert).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            blobs: HashMap::new(),
            order: VecDeque::new(),
            pinned: HashSet::new(),
            bytes: 0,
            budget_bytes,
        }
    }

    /// Stores `blob` and returns its hash.
    pub fn insert(&mut self, blob: Vec<u8>) -> BlobHash {
        let hash = blob_hash(&blob);
        if self.blobs.contains_key(&hash) {
            return hash;
        }
        self.bytes += blob.len();
        self.blobs.insert(hash, Arc::new(blob));
        self.order.push_back(hash);
        self.evict(&hash);
        hash
    }

    /// Keeps `hash` through evictions until unpinned.
    pub fn pin(&mut self, hash: BlobHash) {
        self.pinned.insert(hash);
    }

    /// Lets `hash` be evicted again.
    pub fn unpin(&mut self, hash: &BlobHash) {
        self.pinned.remove(hash);
    }

    /// The blob with this hash.
    pub fn get(&self, hash: &BlobHash) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(hash).cloned()
    }

    /// Whether the blob is held.
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.blobs.contains_key(hash)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn evict(&mut self, keep: &BlobHash) {
        let mut skipped = VecDeque::new();
        while self.bytes > self.budget_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if oldest == *keep || self.pinned.contains(&oldest) {
                skipped.push_back(oldest);
                continue;
            }
            if let Some(blob) = self.blobs.remove(&oldest) {
                self.bytes -= blob.len();
            }
        }
        while let Some(hash) = skipped.pop_back() {
            self.order.push_front(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unpinned_blob_goes_first_when_over_budget() {
        let mut store = BlobStore::new(10);
        let a = store.insert(vec![1; 4]);
        let b = store.insert(vec![2; 4]);
        store.pin(a);
        let c = store.insert(vec![3; 4]);
        assert!(store.contains(&a), "pinned");
        assert!(!store.contains(&b), "oldest unpinned evicted");
        assert!(store.contains(&c));
        assert_eq!(store.bytes(), 8);
        assert_eq!(store.get(&c).map(|b| b.len()), Some(4));
    }
}
