//! The peer's persistent ed25519 identity, kept in the data directory.
//!
//! Created on first run and written atomically (temporary file, fsync, rename, fsync of the
//! directory) with mode 0600; refused with a clear error when unreadable, corrupt or readable by
//! others.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use libp2p::identity::Keypair;

/// File name of the identity key inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading the key file failed.
    #[error("cannot read identity file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is not a valid ed25519 key.
    #[error("identity file {path} is corrupt: {reason}")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing the key file failed.
    #[error("cannot write identity file {path}: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is readable by other users.
    #[error(
        "identity file {path} has mode {mode:o}; it must not be readable by others (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the identity from `data_dir`, creating it on first run.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let mode = fs::metadata(&path)
                .map_err(|source| IdentityError::Read {
                    path: path.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions { path, mode });
            }
            decode(&bytes).map_err(|reason| IdentityError::Corrupt { path, reason })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_atomic(&path, &bytes, 0o600).map_err(|source| IdentityError::Write {
                path: path.clone(),
                source,
            })?;
            tracing::info!(peer_id = %keypair.public().to_peer_id(), path = %path.display(), "created identity");
            Ok(keypair)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Loads an existing identity without creating one.
pub fn load_existing(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let bytes = fs::read(&path).map_err(|source| IdentityError::Read {
        path: path.clone(),
        source,
    })?;
    decode(&bytes).map_err(|reason| IdentityError::Corrupt { path, reason })
}

fn decode(bytes: &[u8]) -> Result<Keypair, String> {
    let keypair = Keypair::from_protobuf_encoding(bytes).map_err(|e| e.to_string())?;
    if keypair.clone().try_into_ed25519().is_err() {
        return Err("not an ed25519 key".into());
    }
    Ok(keypair)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. The file gets `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(dir.path()).expect("reload");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn a_corrupt_identity_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_atomic(&dir.path().join(KEY_FILE), b"garbage", 0o600).expect("write");
        let err = load_or_create(dir.path()).expect_err("corrupt");
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_world_readable_identity_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Permissions { .. })
        ));
    }
}
