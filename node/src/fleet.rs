//! Private fleets on the node side: the fleet key and fleet files (`loom-peer fleet init |
//! enroll | revoke`), and the `/loom/fleet/1` exchange through which two peers show each other
//! their enrollment tokens right after the libp2p handshake.
//!
//! A fleet file holds the fleet's public key and this peer's token. A node started with
//! `--fleet <file>` treats every remote peer as a stranger until it has shown a valid token for
//! its own authenticated key: none of a stranger's gossip is accepted, it is served no blobs, no
//! ledger blocks and no speedtests, and its connections are closed (and it is blacklisted in
//! gossipsub and blocked) when it does not prove membership within [`PROOF_DEADLINE_MS`]. The
//! only strangers kept connected are the relays and bootstrap peers the operator configured, and
//! only as transport: a relay the fleet does not control carries circuits between members and is
//! sent no gossip.

use std::{io, path::Path};

use anyhow::Context as _;
use futures::{AsyncReadExt, AsyncWriteExt, prelude::*};
use libp2p::StreamProtocol;
use loom_protocols::{
    PeerKey,
    fleet::{EnrollmentToken, MAX_TOKEN_BYTES},
    ledger::{Entry, SignedEntry},
};
use serde::{Deserialize, Serialize};

use crate::{
    identity::write_atomic,
    ledger_cli::{hex, peer_name, unhex},
    network::key_of,
};

/// The protocol name.
pub const FLEET_PROTOCOL: StreamProtocol = StreamProtocol::new("/loom/fleet/1");
/// How long a new connection has to prove fleet membership, in milliseconds.
pub const PROOF_DEADLINE_MS: u64 = 5_000;

/// This peer's membership: the fleet and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetMembership {
    /// The fleet's public key.
    pub fleet: PeerKey,
    /// This peer's token (encoded).
    pub token: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    fleet: String,
    token: String,
}

/// Reads a fleet file and checks that its token enrolls `me`.
pub fn load_membership(path: &Path, me: &PeerKey) -> anyhow::Result<FleetMembership> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fleet file {}", path.display()))?;
    let file: FleetFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("bad fleet file {}: {}", path.display(), e.message()))?;
    let fleet: PeerKey = unhex(&file.fleet)
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("bad fleet key in {}", path.display()))?;
    let token = unhex(&file.token).with_context(|| format!("bad token in {}", path.display()))?;
    let decoded = EnrollmentToken::from_bytes(&token)?;
    decoded
        .verify(&fleet, me, loom_actors::unix_ms())
        .map_err(|e| {
            anyhow::anyhow!(
                "fleet file {}: {e} (this peer is {})",
                path.display(),
                peer_name(me)
            )
        })?;
    Ok(FleetMembership { fleet, token })
}

fn read_fleet_key(path: &Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fleet key {}", path.display()))?;
    let secret: [u8; 32] = unhex(text.trim())
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not a fleet key", path.display()))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&secret))
}

fn parse_peer(text: &str) -> anyhow::Result<PeerKey> {
    let id: libp2p::PeerId = text
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid peer id {text:?}: {e}"))?;
    key_of(&id).with_context(|| format!("peer id {text} is not an ed25519 key"))
}

/// `fleet init`: makes a fleet key at `key_path` (never overwrites one).
pub fn init(key_path: &Path) -> anyhow::Result<()> {
    if key_path.exists() {
        anyhow::bail!(
            "{} already exists; a fleet key is never overwritten",
            key_path.display()
        );
    }
    let secret: [u8; 32] = rand::random();
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    write_atomic(key_path, hex(&secret).as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    println!(
        "fleet key written to {} (keep it secret)\nfleet id {}",
        key_path.display(),
        hex(&key.verifying_key().to_bytes())
    );
    Ok(())
}

/// `fleet enroll`: writes (or prints) the fleet file that enrolls `peer`.
pub fn enroll(
    key_path: &Path,
    peer: &str,
    expires: Option<std::time::Duration>,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let key = read_fleet_key(key_path)?;
    let peer_key = parse_peer(peer)?;
    let expires_unix_ms = match expires {
        Some(d) => loom_actors::unix_ms().saturating_add(d.as_millis() as u64),
        None => 0,
    };
    let token = EnrollmentToken::issue(&key, peer_key, expires_unix_ms);
    let text = toml::to_string(&FleetFile {
        fleet: hex(&key.verifying_key().to_bytes()),
        token: hex(&token.to_bytes()),
    })?;
    let text = format!("# loom fleet enrollment of {peer}\n{text}");
    match out {
        Some(path) => {
            write_atomic(path, text.as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("fleet file for {peer} written to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// `fleet revoke`: a ban entry signed by the fleet key, for the running node to put on the
/// ledger.
pub fn revoke_entry(key_path: &Path, peer: &str, reason: &str) -> anyhow::Result<SignedEntry> {
    let key = read_fleet_key(key_path)?;
    let author = key.verifying_key().to_bytes();
    let entry = Entry::Ban {
        peer: parse_peer(peer)?,
        until_unix_ms: 0,
        reason: reason.chars().take(200).collect(),
    };
    Ok(SignedEntry::sign(entry, author, |message| {
        ed25519_dalek::Signer::sign(&key, message)
            .to_bytes()
            .to_vec()
    }))
}

/// The codec of [`FLEET_PROTOCOL`]: the request is the dialer's token, the response the
/// listener's (empty when it refuses); each is a u16 length and the bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetCodec;

async fn read_token<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len).await?;
    let len = u16::from_le_bytes(len) as usize;
    if len > MAX_TOKEN_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fleet token too large",
        ));
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn write_token<T: AsyncWrite + Unpin + Send>(io: &mut T, token: &[u8]) -> io::Result<()> {
    let len = u16::try_from(token.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_TOKEN_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "fleet token too large"))?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(token).await?;
    io.close().await
}

impl libp2p::request_response::Codec for FleetCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_token(io).await
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_token(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_token(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_token(io, &response).await
    }
}

/// Whether `token` (shown by `presenter`) proves membership of `fleet` now.
pub fn proves_membership(fleet: &PeerKey, presenter: &PeerKey, token: &[u8]) -> bool {
    EnrollmentToken::from_bytes(token)
        .and_then(|t| t.verify(fleet, presenter, loom_actors::unix_ms()))
        .is_ok()
}
