//! The durable half of a ledger replica: finalized blocks and their certificates in a redb
//! database, one record per height.
//!
//! redb commits are atomic and, with its default `Immediate` durability, fsynced before `commit`
//! returns: a `kill -9` at any moment leaves either the block fully stored or not at all, never a
//! torn record, and never loses a block whose append returned. Appends must extend the stored
//! chain by exactly one height. [`LedgerStore::replay`] re-verifies every stored block from
//! genesis through [`LedgerState`], so a replica never trusts its own disk blindly.

use std::path::{Path, PathBuf};

use loom_protocols::{
    consensus::{SigningWatermark, WalEntry},
    decode_bounded, encode,
    ledger::{Block, MAX_BLOCK_BYTES, QuorumCertificate},
    ledger_state::{LedgerState, LedgerStateError},
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const WATERMARK_KEY: &str = "signing_watermark";
const WAL: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("consensus_wal");
/// Largest stored record: a block and its certificate.
const MAX_RECORD_BYTES: usize = MAX_BLOCK_BYTES + 64 * 1024;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerStoreError {
    /// The database could not be opened.
    #[error("cannot open the ledger database {path}: {reason}")]
    Open {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("ledger database: {0}")]
    Database(String),
    /// A stored record does not decode.
    #[error("ledger record at height {height} is corrupt")]
    Corrupt {
        /// The height.
        height: u64,
    },
    /// An append that does not extend the chain by one.
    #[error("append at height {got}, expected {expected}")]
    NotNext {
        /// The next height.
        expected: u64,
        /// The block's height.
        got: u64,
    },
    /// A stored block does not verify.
    #[error("stored chain does not verify: {0}")]
    Invalid(#[from] LedgerStateError),
}

fn db_error(error: impl std::fmt::Display) -> LedgerStoreError {
    LedgerStoreError::Database(error.to_string())
}

/// A finalized block with its certificate.
pub type Finalized = (Block, QuorumCertificate);

/// Finalized blocks on disk.
pub struct LedgerStore {
    db: Database,
    next_height: u64,
}

impl std::fmt::Debug for LedgerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerStore")
            .field("next_height", &self.next_height)
            .finish()
    }
}

impl LedgerStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerStoreError> {
        let open_error = |reason: String| LedgerStoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| open_error(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| open_error(e.to_string()))?;
        let write = db.begin_write().map_err(db_error)?;
        write.open_table(BLOCKS).map_err(db_error)?;
        write.open_table(META).map_err(db_error)?;
        write.open_table(WAL).map_err(db_error)?;
        write.commit().map_err(db_error)?;
        let next_height = {
            let read = db.begin_read().map_err(db_error)?;
            let table = read.open_table(BLOCKS).map_err(db_error)?;
            match table.last().map_err(db_error)? {
                Some((height, _)) => height.value() + 1,
                None => 0,
            }
        };
        Ok(Self { db, next_height })
    }

    /// The height the next append must have (0 when empty).
    pub fn next_height(&self) -> u64 {
        self.next_height
    }

    /// Stores the next finalized block durably; returns once it is on disk.
    pub fn append(
        &mut self,
        block: &Block,
        certificate: &QuorumCertificate,
    ) -> Result<(), LedgerStoreError> {
        if block.height != self.next_height {
            return Err(LedgerStoreError::NotNext {
                expected: self.next_height,
                got: block.height,
            });
        }
        let record = encode(&(block, certificate));
        let write = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = write.open_table(BLOCKS).map_err(db_error)?;
            table
                .insert(block.height, record.as_slice())
                .map_err(db_error)?;
        }
        write.commit().map_err(db_error)?;
        self.next_height += 1;
        Ok(())
    }

    /// Stores the highest (height, round) this peer signed at, durably, before its votes go out:
    /// after a crash the engine must not sign again at or below it (no equivocation).
    pub fn save_watermark(&mut self, watermark: SigningWatermark) -> Result<(), LedgerStoreError> {
        let bytes = encode(&watermark);
        let write = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = write.open_table(META).map_err(db_error)?;
            table
                .insert(WATERMARK_KEY, bytes.as_slice())
                .map_err(db_error)?;
        }
        write.commit().map_err(db_error)
    }

    /// Appends consensus write-ahead entries of `height` from index `from`, durably, and drops
    /// those of earlier heights. Called before the votes they lead to are sent.
    pub fn append_wal(
        &mut self,
        height: u64,
        from: u32,
        entries: &[WalEntry],
    ) -> Result<(), LedgerStoreError> {
        let write = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = write.open_table(WAL).map_err(db_error)?;
            let stale: Vec<(u64, u32)> = table
                .range(..(height, 0))
                .map_err(db_error)?
                .filter_map(|item| item.ok().map(|(k, _)| k.value()))
                .collect();
            for key in stale {
                table.remove(key).map_err(db_error)?;
            }
            for (offset, entry) in entries.iter().enumerate() {
                let bytes = entry.to_bytes();
                table
                    .insert((height, from + offset as u32), bytes.as_slice())
                    .map_err(db_error)?;
            }
        }
        write.commit().map_err(db_error)
    }

    /// The write-ahead entries stored for `height`, in order (corrupt ones end the log).
    pub fn wal(&self, height: u64) -> Result<Vec<WalEntry>, LedgerStoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        let table = read.open_table(WAL).map_err(db_error)?;
        let mut out = Vec::new();
        for item in table
            .range((height, 0)..=(height, u32::MAX))
            .map_err(db_error)?
        {
            let (_, value) = item.map_err(db_error)?;
            match WalEntry::from_bytes(value.value()) {
                Ok(entry) => out.push(entry),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// The stored signing watermark.
    pub fn watermark(&self) -> Result<Option<SigningWatermark>, LedgerStoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        let table = read.open_table(META).map_err(db_error)?;
        let Some(value) = table.get(WATERMARK_KEY).map_err(db_error)? else {
            return Ok(None);
        };
        decode_bounded(value.value(), 64)
            .map(Some)
            .map_err(|_| LedgerStoreError::Corrupt { height: 0 })
    }

    /// The finalized block at `height`.
    pub fn get(&self, height: u64) -> Result<Option<Finalized>, LedgerStoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        let table = read.open_table(BLOCKS).map_err(db_error)?;
        let Some(record) = table.get(height).map_err(db_error)? else {
            return Ok(None);
        };
        decode_bounded(record.value(), MAX_RECORD_BYTES)
            .map(Some)
            .map_err(|_| LedgerStoreError::Corrupt { height })
    }

    /// Up to `limit` finalized blocks from `from` on, in height order.
    pub fn range(&self, from: u64, limit: usize) -> Result<Vec<Finalized>, LedgerStoreError> {
        let read = self.db.begin_read().map_err(db_error)?;
        let table = read.open_table(BLOCKS).map_err(db_error)?;
        let mut out = Vec::new();
        for item in table.range(from..).map_err(db_error)?.take(limit) {
            let (height, record) = item.map_err(db_error)?;
            let height = height.value();
            out.push(
                decode_bounded(record.value(), MAX_RECORD_BYTES)
                    .map_err(|_| LedgerStoreError::Corrupt { height })?,
            );
        }
        Ok(out)
    }

    /// Re-verifies the whole stored chain from genesis and returns the state it folds to
    /// (`None` when empty). `visit` sees every block after it verified.
    pub fn replay(
        &self,
        mut visit: impl FnMut(&Block, &QuorumCertificate, &LedgerState),
    ) -> Result<Option<LedgerState>, LedgerStoreError> {
        const BATCH: usize = 256;
        let mut state: Option<LedgerState> = None;
        let mut from = 0;
        loop {
            let batch = self.range(from, BATCH)?;
            let done = batch.len() < BATCH;
            for (block, certificate) in &batch {
                if block.height != from {
                    return Err(LedgerStoreError::Corrupt { height: from });
                }
                match state.as_mut() {
                    None => state = Some(LedgerState::from_genesis(block, certificate)?),
                    Some(state) => state.apply(block, certificate)?,
                }
                if let Some(state) = &state {
                    visit(block, certificate, state);
                }
                from += 1;
            }
            if done {
                return Ok(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use loom_protocols::{
        ledger::{Entry, SignedEntry},
        ledger_state::{certify, make_genesis},
    };

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn chain(length: u64) -> Vec<Finalized> {
        let members: Vec<_> = (1..=4).map(|s| key(s).verifying_key().to_bytes()).collect();
        let (genesis, cert) =
            make_genesis(&key(9), "t", false, None, &members, &[(members[0], 50)], 0);
        let mut state = LedgerState::from_genesis(&genesis, &cert).expect("genesis");
        let mut out = vec![(genesis, cert)];
        let signers: Vec<SigningKey> = (1..=3).map(key).collect();
        for height in 1..length {
            let author = key(1);
            let entry = SignedEntry::sign(
                Entry::Transfer {
                    to: members[1],
                    amount: 1,
                },
                members[0],
                |m| ed25519_dalek::Signer::sign(&author, m).to_bytes().to_vec(),
            );
            let block = Block {
                height,
                prev_hash: state.tip_hash(),
                proposer: members[0],
                timestamp_unix_ms: height,
                entries: vec![entry],
            };
            let cert = certify(&block, &signers.iter().collect::<Vec<_>>());
            state.apply(&block, &cert).expect("apply");
            out.push((block, cert));
        }
        out
    }

    #[test]
    fn appended_blocks_survive_reopen_and_replay() {
        let dir = tempdir();
        let path = dir.join("ledger.redb");
        let blocks = chain(5);
        {
            let mut store = LedgerStore::open(&path).expect("open");
            for (block, cert) in &blocks {
                store.append(block, cert).expect("append");
            }
        }
        let store = LedgerStore::open(&path).expect("reopen");
        assert_eq!(store.next_height(), 5);
        assert_eq!(store.get(3).expect("get"), Some(blocks[3].clone()));
        assert_eq!(store.range(2, 2).expect("range").len(), 2);
        let mut seen = 0;
        let state = store
            .replay(|_, _, _| seen += 1)
            .expect("replay")
            .expect("state");
        assert_eq!(seen, 5);
        assert_eq!(
            state.credits().balance(&key(2).verifying_key().to_bytes()),
            4
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn appends_out_of_order_are_refused() {
        let dir = tempdir();
        let mut store = LedgerStore::open(&dir.join("ledger.redb")).expect("open");
        let blocks = chain(3);
        assert!(matches!(
            store.append(&blocks[1].0, &blocks[1].1),
            Err(LedgerStoreError::NotNext {
                expected: 0,
                got: 1
            })
        ));
        store.append(&blocks[0].0, &blocks[0].1).expect("genesis");
        assert!(store.append(&blocks[0].0, &blocks[0].1).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "loom-ledger-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
