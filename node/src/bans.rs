//! Local peer bans, persisted in `<data-dir>/bans.json`.
//!
//! A [`BanList`] holds at most [`MAX_BANS`] entries, one per peer: who, until when (or until
//! unbanned), why, and where the ban came from ([`BanSource`]: the operator, the ledger, or
//! automatic anomaly detection). Every change is written to disk before it takes effect in memory,
//! atomically (temporary file, fsync, rename, fsync of the directory, via
//! [`crate::identity::write_atomic`]), so a crash leaves either the old or the new list. A file
//! that cannot be parsed is refused with an error naming it rather than silently replaced.
//!
//! Time comes in as `now_ms` (Unix milliseconds); expired bans are pruned when the list is read
//! or written.
//!
//! Merging: banning a peer that is already banned keeps whichever ban ends later (a ban without an
//! end outlasts every timed one) and its reason and source; lift a ban with [`BanList::unban`].

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// File name of the ban list inside the data directory.
pub const BANS_FILE: &str = "bans.json";
/// Most bans kept.
pub const MAX_BANS: usize = 10_000;
/// Longest peer id accepted, in bytes.
pub const MAX_PEER_ID_LEN: usize = 128;
/// Longest reason kept, in characters (longer ones are cut).
pub const MAX_REASON_CHARS: usize = 512;
/// Largest file accepted.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Version of the file format.
const FORMAT_VERSION: u32 = 1;
/// Permissions of the file.
const FILE_MODE: u32 = 0o644;

/// Where a ban came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanSource {
    /// The operator of this node.
    Local,
    /// A ban recorded in the ledger.
    Ledger,
    /// Automatic: anomaly detection flagged the peer (`--auto-ban`).
    Auto,
}

impl fmt::Display for BanSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Ledger => "ledger",
            Self::Auto => "auto",
        })
    }
}

impl FromStr for BanSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "ledger" => Ok(Self::Ledger),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown ban source `{other}` (expected local, ledger or auto)"
            )),
        }
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanEntry {
    /// The banned peer (libp2p `PeerId` string).
    pub peer_id: String,
    /// When the ban ends (Unix milliseconds); `None`: until unbanned.
    pub until_unix_ms: Option<u64>,
    /// Why.
    pub reason: String,
    /// Where the ban came from.
    pub source: BanSource,
    /// When the ban was made (Unix milliseconds).
    #[serde(default)]
    pub since_unix_ms: u64,
}

impl BanEntry {
    /// Whether the ban holds at `now_ms`.
    pub fn is_active(&self, now_ms: u64) -> bool {
        self.until_unix_ms.is_none_or(|until| until > now_ms)
    }

    /// Whether this ban ends no earlier than `other`.
    fn outlasts(&self, other: &BanEntry) -> bool {
        match (self.until_unix_ms, other.until_unix_ms) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        }
    }
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BanFile {
    version: u32,
    bans: Vec<BanEntry>,
}

/// Why the ban list could not be read, changed or written.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// Reading the file failed.
    #[error("cannot read the ban list {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid ban list.
    #[error("the ban list {path} is corrupt: {reason} (fix or remove the file)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the file failed; the list is unchanged.
    #[error("cannot write the ban list {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The peer id cannot be a peer id.
    #[error("invalid peer id {peer:?}: {reason}")]
    InvalidPeer {
        /// The id given (cut to a printable length).
        peer: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The list holds its maximum number of bans.
    #[error("the ban list is full ({max} bans); unban peers first")]
    Full {
        /// The bound.
        max: usize,
    },
}

/// Checks that `peer` looks like a peer id: 1 to [`MAX_PEER_ID_LEN`] printable ASCII characters.
pub fn validate_peer_id(peer: &str) -> Result<(), BanError> {
    let bad = |reason| {
        Err(BanError::InvalidPeer {
            peer: peer.chars().take(MAX_PEER_ID_LEN).collect(),
            reason,
        })
    };
    if peer.is_empty() {
        return bad("empty");
    }
    if peer.len() > MAX_PEER_ID_LEN {
        return bad("too long");
    }
    if !peer.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only printable ASCII without spaces is allowed");
    }
    Ok(())
}

/// The node's local bans, backed by `<data-dir>/bans.json`.
#[derive(Debug, Clone)]
pub struct BanList {
    path: PathBuf,
    max: usize,
    entries: BTreeMap<String, BanEntry>,
}

impl BanList {
    /// Loads `<data_dir>/bans.json`; an empty list when the file does not exist.
    pub fn load(data_dir: &Path) -> Result<Self, BanError> {
        Self::load_bounded(data_dir, MAX_BANS)
    }

    fn load_bounded(data_dir: &Path, max: usize) -> Result<Self, BanError> {
        let path = data_dir.join(BANS_FILE);
        let corrupt = |reason: String| BanError::Corrupt {
            path: path.clone(),
            reason,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    max,
                    entries: BTreeMap::new(),
                });
            }
            Err(source) => return Err(BanError::Read { path, source }),
        };
        if meta.len() > MAX_FILE_BYTES {
            return Err(corrupt(format!(
                "{} bytes, more than the {MAX_FILE_BYTES} accepted",
                meta.len()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|source| BanError::Read {
            path: path.clone(),
            source,
        })?;
        let file: BanFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (this build reads version {FORMAT_VERSION})",
                file.version
            )));
        }
        if file.bans.len() > max {
            return Err(corrupt(format!(
                "{} bans, more than the {max} allowed",
                file.bans.len()
            )));
        }
        let mut entries: BTreeMap<String, BanEntry> = BTreeMap::new();
        for mut entry in file.bans {
            validate_peer_id(&entry.peer_id).map_err(|e| corrupt(e.to_string()))?;
            entry.reason = cut(&entry.reason);
            match entries.get(&entry.peer_id) {
                Some(old) if !entry.outlasts(old) => {}
                _ => {
                    entries.insert(entry.peer_id.clone(), entry);
                }
            }
        }
        Ok(Self { path, max, entries })
    }

    /// The file backing the list.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of bans held (expired ones included until pruned).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no bans are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The ban of `peer`, active or not.
    pub fn get(&self, peer: &str) -> Option<&BanEntry> {
        self.entries.get(peer)
    }

    /// Whether `peer` is banned at `now_ms`.
    pub fn is_banned(&self, peer: &str, now_ms: u64) -> bool {
        self.entries.get(peer).is_some_and(|e| e.is_active(now_ms))
    }

    /// Bans `peer` for `duration` (`None`: until unbanned) and saves the list. If the peer is
    /// already banned, the ban that ends later is kept. Returns the ban now in force.
    pub fn ban(
        &mut self,
        peer: &str,
        duration: Option<Duration>,
        reason: &str,
        source: BanSource,
        now_ms: u64,
    ) -> Result<BanEntry, BanError> {
        validate_peer_id(peer)?;
        let until_unix_ms = duration
            .map(|d| now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        let new = BanEntry {
            peer_id: peer.to_string(),
            until_unix_ms,
            reason: cut(reason),
            source,
            since_unix_ms: now_ms,
        };
        let mut entries = self.entries.clone();
        entries.retain(|_, e| e.is_active(now_ms));
        let kept = match entries.get(peer) {
            Some(old) if !new.outlasts(old) => old.clone(),
            Some(_) => new,
            None if entries.len() >= self.max => return Err(BanError::Full { max: self.max }),
            None => new,
        };
        entries.insert(peer.to_string(), kept.clone());
        self.save(entries)?;
        Ok(kept)
    }

    /// Lifts the ban of `peer` and saves the list; `false` if it was not banned.
    pub fn unban(&mut self, peer: &str) -> Result<bool, BanError> {
        if !self.entries.contains_key(peer) {
            return Ok(false);
        }
        let mut entries = self.entries.clone();
        entries.remove(peer);
        self.save(entries)?;
        Ok(true)
    }

    /// The bans in force at `now_ms`, by peer id; expired ones are dropped from memory (and from
    /// the file at the next write).
    pub fn active(&mut self, now_ms: u64) -> Vec<BanEntry> {
        self.entries.retain(|_, e| e.is_active(now_ms));
        self.entries.values().cloned().collect()
    }

    /// Drops expired bans and saves the list if any were; returns how many.
    pub fn prune(&mut self, now_ms: u64) -> Result<usize, BanError> {
        let mut entries = self.entries.clone();
        entries.retain(|_, e| e.is_active(now_ms));
        let pruned = self.entries.len() - entries.len();
        if pruned > 0 {
            self.save(entries)?;
        }
        Ok(pruned)
    }

    /// Writes `entries` to the file, then makes them the list.
    fn save(&mut self, entries: BTreeMap<String, BanEntry>) -> Result<(), BanError> {
        let file = BanFile {
            version: FORMAT_VERSION,
            bans: entries.values().cloned().collect(),
        };
        let write_err = |source| BanError::Write {
            path: self.path.clone(),
            source,
        };
        let mut bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| write_err(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        crate::identity::write_atomic(&self.path, &bytes, FILE_MODE).map_err(write_err)?;
        self.entries = entries;
        Ok(())
    }
}

/// `reason` cut to [`MAX_REASON_CHARS`] characters.
fn cut(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER_A: &str = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const PEER_B: &str = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn bans_persist_and_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bans = BanList::load(dir.path()).expect("empty");
        assert!(bans.is_empty());
        let a = bans
            .ban(PEER_A, None, "spam", BanSource::Local, NOW)
            .expect("ban a");
        assert_eq!(a.until_unix_ms, None);
        let b = bans
            .ban(
                PEER_B,
                Some(Duration::from_secs(60)),
                "flood",
                BanSource::Auto,
                NOW,
            )
            .expect("ban b");
        assert_eq!(b.until_unix_ms, Some(NOW + 60_000));

        let mut again = BanList::load(dir.path()).expect("reload");
        assert_eq!(again.active(NOW), vec![a.clone(), b.clone()]);
        let text = std::fs::read_to_string(dir.path().join(BANS_FILE)).expect("read");
        assert!(text.contains("\"source\": \"auto\""), "{text}");
        assert!(text.contains("\"version\": 1"), "{text}");

        assert!(again.unban(PEER_A).expect("unban"));
        assert!(!again.unban(PEER_A).expect("unban again"));
        let mut third = BanList::load(dir.path()).expect("reload");
        assert_eq!(third.active(NOW), vec![b]);
        assert!(!third.is_banned(PEER_A, NOW));
    }

    #[test]
    fn timed_bans_expire_and_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bans = BanList::load(dir.path()).expect("empty");
        bans.ban(
            PEER_A,
            Some(Duration::from_secs(10)),
            "x",
            BanSource::Ledger,
            NOW,
        )
        .expect("ban");
        assert!(bans.is_banned(PEER_A, NOW + 9_999));
        assert!(!bans.is_banned(PEER_A, NOW + 10_000));
        assert_eq!(bans.active(NOW + 5_000).len(), 1);
        assert!(bans.active(NOW + 10_000).is_empty());
        // `active` pruned memory only; `prune` writes.
        let mut reloaded = BanList::load(dir.path()).expect("reload");
        assert_eq!(reloaded.len(), 1);
        assert_eq!(reloaded.prune(NOW + 10_000).expect("prune"), 1);
        assert!(BanList::load(dir.path()).expect("reload").is_empty());
    }

    #[test]
    fn the_longer_ban_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bans = BanList::load(dir.path()).expect("empty");
        let hour = Some(Duration::from_secs(3600));
        bans.ban(PEER_A, hour, "first", BanSource::Auto, NOW)
            .expect("ban");
        let shorter = bans
            .ban(
                PEER_A,
                Some(Duration::from_secs(60)),
                "second",
                BanSource::Local,
                NOW,
            )
            .expect("ban");
        assert_eq!(shorter.reason, "first");
        let forever = bans
            .ban(PEER_A, None, "third", BanSource::Local, NOW)
            .expect("ban");
        assert_eq!(
            (forever.until_unix_ms, forever.source),
            (None, BanSource::Local)
        );
        let timed = bans
            .ban(PEER_A, hour, "fourth", BanSource::Ledger, NOW)
            .expect("ban");
        assert_eq!(timed.reason, "third");
        // A huge duration saturates instead of overflowing.
        let max = bans
            .ban(PEER_B, Some(Duration::MAX), "max", BanSource::Local, NOW)
            .expect("ban");
        assert_eq!(max.until_unix_ms, Some(u64::MAX));
    }

    #[test]
    fn the_list_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bans = BanList::load_bounded(dir.path(), 2).expect("empty");
        bans.ban("p1", None, "", BanSource::Local, NOW).expect("1");
        bans.ban(
            "p2",
            Some(Duration::from_secs(1)),
            "",
            BanSource::Local,
            NOW,
        )
        .expect("2");
        assert!(matches!(
            bans.ban("p3", None, "", BanSource::Local, NOW),
            Err(BanError::Full { max: 2 })
        ));
        // Re-banning a listed peer is fine when full.
        bans.ban("p1", None, "again", BanSource::Local, NOW)
            .expect("re-ban");
        // Once p2 expired there is room.
        bans.ban("p3", None, "", BanSource::Local, NOW + 1_000)
            .expect("3 after expiry");
        assert_eq!(bans.len(), 2);
        // A file with more entries than the bound is refused.
        assert!(matches!(
            BanList::load_bounded(dir.path(), 1),
            Err(BanError::Corrupt { .. })
        ));
        // Long reasons are cut.
        let e = bans
            .ban("p1", None, &"x".repeat(5000), BanSource::Local, NOW)
            .expect("long reason");
        assert_eq!(e.reason.chars().count(), MAX_REASON_CHARS);
    }

    #[test]
    fn bad_peer_ids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bans = BanList::load(dir.path()).expect("empty");
        for bad in [
            "",
            "has space",
            "tab\t",
            &"x".repeat(MAX_PEER_ID_LEN + 1),
            "é",
        ] {
            assert!(
                matches!(
                    bans.ban(bad, None, "", BanSource::Local, NOW),
                    Err(BanError::InvalidPeer { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(!dir.path().join(BANS_FILE).exists());
    }

    #[test]
    fn corrupt_files_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(BANS_FILE);
        for (content, needle) in [
            ("{not json", "not valid JSON"),
            (r#"{"version":2,"bans":[]}"#, "format version 2"),
            (
                r#"{"version":1,"bans":[{"peer_id":"a b","until_unix_ms":null,"reason":"","source":"local"}]}"#,
                "invalid peer id",
            ),
            (
                r#"{"version":1,"bans":[{"peer_id":"p","until_unix_ms":null,"reason":"","source":"martian"}]}"#,
                "not valid JSON",
            ),
        ] {
            std::fs::write(&path, content).expect("write");
            let err = BanList::load(dir.path()).expect_err(content);
            let msg = err.to_string();
            assert!(matches!(err, BanError::Corrupt { .. }), "{msg}");
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        // A corrupt file is not overwritten by a failed load.
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            r#"{"version":1,"bans":[{"peer_id":"p","until_unix_ms":null,"reason":"","source":"martian"}]}"#
        );
    }

    #[test]
    fn a_failed_write_leaves_the_list_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The data "directory" is a file: nothing can be written under it.
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").expect("write");
        assert!(matches!(
            BanList::load(&blocker),
            Err(BanError::Read { .. })
        ));
        let mut bans = BanList {
            path: blocker.join(BANS_FILE),
            max: MAX_BANS,
            entries: BTreeMap::new(),
        };
        assert!(matches!(
            bans.ban(PEER_A, None, "", BanSource::Local, NOW),
            Err(BanError::Write { .. })
        ));
        assert!(bans.is_empty());
    }

    #[test]
    fn sources_parse_and_print() {
        for s in [BanSource::Local, BanSource::Ledger, BanSource::Auto] {
            assert_eq!(s.to_string().parse::<BanSource>(), Ok(s));
        }
        assert!("x".parse::<BanSource>().is_err());
    }
}
