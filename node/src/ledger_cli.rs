//! `loom-peer ledger show | verify | export` and `loom-peer credits`: read the ledger of the
//! running node (through its control API) or, when no node runs on the data directory, straight
//! from its database; verify it from genesis; render blocks and balances for people (tables) and
//! programs (JSON lines).
//!
//! Blocks cross the control API as hex of their wire encoding, so `verify` checks exactly the
//! bytes the replica stored, with the same fold ([`LedgerState`]) every replica runs.

use std::{io::Write, path::Path};

use anyhow::Context as _;
use loom_actors::{credits::CreditBook, ledger_store::LedgerStore};
use loom_protocols::{
    PeerKey, decode_bounded, encode,
    ledger::{Block, Entry, MAX_BLOCK_BYTES, QuorumCertificate},
    ledger_state::LedgerState,
};
use serde::Serialize;

use crate::{client::ControlClient, network::peer_id_of, run::LEDGER_FILE};

/// Largest block record accepted from the control API, in bytes.
const MAX_RECORD_BYTES: usize = MAX_BLOCK_BYTES + 64 * 1024;
/// Blocks asked for per API call.
const PAGE: u64 = 256;

pub use loom_actors::exchanger::hex;

/// Parses lowercase or uppercase hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A peer key as its PeerId string.
pub fn peer_name(key: &PeerKey) -> String {
    peer_id_of(key)
        .map(|p| p.to_string())
        .unwrap_or_else(|| hex(key))
}

/// Encodes a finalized block for the control API.
pub fn record_hex(block: &Block, certificate: &QuorumCertificate) -> String {
    hex(&encode(&(block, certificate)))
}

/// Decodes a block record from the control API.
pub fn record_from_hex(text: &str) -> anyhow::Result<(Block, QuorumCertificate)> {
    let bytes = unhex(text).context("ledger record is not hex")?;
    decode_bounded(&bytes, MAX_RECORD_BYTES).context("ledger record does not decode")
}

/// The whole finalized chain of the node on `data_dir`: from its control API when it runs,
/// else from its database.
pub fn load_chain(data_dir: &Path) -> anyhow::Result<Vec<(Block, QuorumCertificate)>> {
    if let Ok(client) = ControlClient::from_data_dir(data_dir)
        && client.status().is_ok()
    {
        let mut chain = Vec::new();
        loop {
            let page = client.ledger_blocks(chain.len() as u64, PAGE)?;
            let done = (page.len() as u64) < PAGE;
            for record in page {
                chain.push(record_from_hex(&record)?);
            }
            if done {
                return Ok(chain);
            }
        }
    }
    let path = data_dir.join(LEDGER_FILE);
    if !path.exists() {
        anyhow::bail!("no ledger at {} and no running node", path.display());
    }
    let store = LedgerStore::open(&path)?;
    let mut chain = Vec::new();
    loop {
        let page = store.range(chain.len() as u64, PAGE as usize)?;
        let done = (page.len() as u64) < PAGE;
        chain.extend(page);
        if done {
            return Ok(chain);
        }
    }
}

/// Verifies a chain from genesis; returns the folded state.
pub fn verify_chain(chain: &[(Block, QuorumCertificate)]) -> anyhow::Result<LedgerState> {
    let Some((genesis, certificate)) = chain.first() else {
        anyhow::bail!("the ledger is empty");
    };
    let mut state = LedgerState::from_genesis(genesis, certificate)
        .map_err(|e| anyhow::anyhow!("genesis does not verify: {e}"))?;
    for (block, certificate) in &chain[1..] {
        state
            .apply(block, certificate)
            .map_err(|e| anyhow::anyhow!("block {} does not verify: {e}", block.height))?;
    }
    if !state.credits().check_conservation() {
        anyhow::bail!("credits are not conserved at the tip");
    }
    Ok(state)
}

/// One entry, for people and JSON.
#[derive(Debug, Serialize)]
pub struct EntryView {
    /// The signer.
    pub author: String,
    /// What it records.
    pub kind: &'static str,
    /// Its fields.
    pub detail: serde_json::Value,
}

/// One block, for people and JSON.
#[derive(Debug, Serialize)]
pub struct BlockView {
    /// Height.
    pub height: u64,
    /// blake3 of the block.
    pub hash: String,
    /// Previous block's hash.
    pub prev_hash: String,
    /// Its proposer (the height's coordinator).
    pub proposer: String,
    /// Proposer's clock.
    pub timestamp_unix_ms: u64,
    /// The entries.
    pub entries: Vec<EntryView>,
    /// Committee members whose precommit signatures certify it.
    pub signers: Vec<String>,
}

fn entry_view(author: &PeerKey, entry: &Entry) -> EntryView {
    use serde_json::json;
    let (kind, detail) = match entry {
        Entry::Genesis {
            network,
            open_enrollment,
            fleet,
        } => (
            "genesis",
            json!({"network": network, "open_enrollment": open_enrollment, "fleet": fleet.as_ref().map(|f| hex(f))}),
        ),
        Entry::Mint { to, amount } => ("mint", json!({"to": peer_name(to), "amount": amount})),
        Entry::Enroll { peer } => ("enroll", json!({"peer": peer_name(peer)})),
        Entry::JobSubmitted {
            job,
            escrow,
            manifest,
            terms,
        } => (
            "job-submitted",
            json!({
                "job": hex(job),
                "escrow": escrow,
                "manifest_bytes": manifest.len(),
                "terms": {
                    "rounds": terms.rounds,
                    "max_contributors": terms.max_contributors,
                    "per_contribution": terms.per_contribution,
                    "per_verdict": terms.per_verdict,
                },
            }),
        ),
        Entry::JobClosed { job } => ("job-closed", json!({"job": hex(job)})),
        Entry::JobJoined { job } => ("job-joined", json!({"job": hex(job)})),
        Entry::RoundVote {
            job,
            round,
            model_hash,
            accepted_digest,
            rejected,
        } => (
            "round-vote",
            json!({
                "job": hex(job),
                "round": round,
                "model_hash": hex(model_hash),
                "accepted_digest": hex(accepted_digest),
                "rejected": rejected.iter().map(peer_name).collect::<Vec<_>>(),
            }),
        ),
        Entry::RoundResult {
            job,
            round,
            model_hash,
            accepted,
            rejected,
            evidence,
        } => (
            "round-result",
            json!({
                "job": hex(job),
                "round": round,
                "model_hash": hex(model_hash),
                "accepted": accepted.iter().map(|(p, c)| json!({"peer": peer_name(p), "credits": c})).collect::<Vec<_>>(),
                "rejected": rejected.iter().map(peer_name).collect::<Vec<_>>(),
                "evidence": evidence.iter().map(|signed| match signed.verify() {
                    Ok(c) => json!({"author": peer_name(&c.author), "round": c.round, "blob_hash": hex(&c.blob_hash), "blob_len": c.blob_len}),
                    Err(e) => json!({"invalid": e.to_string()}),
                }).collect::<Vec<_>>(),
            }),
        ),
        Entry::Verdict {
            job,
            round,
            subject,
            accepted,
            reason,
            fee,
        } => (
            "verdict",
            json!({"job": hex(job), "round": round, "subject": peer_name(subject), "accepted": accepted, "reason": reason, "fee": fee}),
        ),
        Entry::Transfer { to, amount } => {
            ("transfer", json!({"to": peer_name(to), "amount": amount}))
        }
        Entry::CheckpointPublished { job, round, hash } => (
            "checkpoint",
            json!({"job": hex(job), "round": round, "hash": hex(hash)}),
        ),
        Entry::Ban {
            peer,
            until_unix_ms,
            reason,
        } => (
            "ban",
            json!({"peer": peer_name(peer), "until_unix_ms": until_unix_ms, "reason": reason}),
        ),
    };
    EntryView {
        author: peer_name(author),
        kind,
        detail,
    }
}

/// The view of a finalized block.
pub fn block_view(block: &Block, certificate: &QuorumCertificate) -> BlockView {
    BlockView {
        height: block.height,
        hash: hex(&block.hash()),
        prev_hash: hex(&block.prev_hash),
        proposer: peer_name(&block.proposer),
        timestamp_unix_ms: block.timestamp_unix_ms,
        entries: block
            .entries
            .iter()
            .map(|e| entry_view(&e.author, &e.entry))
            .collect(),
        signers: certificate
            .votes
            .iter()
            .map(|(p, _)| peer_name(p))
            .collect(),
    }
}

/// `ledger show`: the last `limit` blocks, newest last.
pub fn show(data_dir: &Path, limit: usize, json: bool) -> anyhow::Result<()> {
    let chain = load_chain(data_dir)?;
    let start = chain.len().saturating_sub(limit);
    let mut out = std::io::stdout().lock();
    for (block, certificate) in &chain[start..] {
        let view = block_view(block, certificate);
        if json {
            writeln!(out, "{}", serde_json::to_string(&view)?)?;
            continue;
        }
        writeln!(
            out,
            "#{:<6} {}  proposer {}  {} entries  {} signers",
            view.height,
            &view.hash[..16],
            short_peer(&view.proposer),
            view.entries.len(),
            view.signers.len()
        )?;
        for entry in &view.entries {
            writeln!(
                out,
                "         {:<14} by {}  {}",
                entry.kind,
                short_peer(&entry.author),
                entry.detail
            )?;
        }
    }
    writeln!(out, "{} finalized blocks", chain.len())?;
    Ok(())
}

fn short_peer(name: &str) -> String {
    let tail = name.len().saturating_sub(8);
    format!("…{}", &name[tail..])
}

/// `ledger verify`: the whole chain from genesis.
pub fn verify(data_dir: &Path) -> anyhow::Result<()> {
    let chain = load_chain(data_dir)?;
    let state = verify_chain(&chain)?;
    println!(
        "ledger verified: {} blocks of network {:?}, tip {}, committee of {}, {} credits minted and conserved",
        chain.len(),
        state.network(),
        &hex(&state.tip_hash())[..16],
        state.committee().len(),
        state.credits().minted()
    );
    Ok(())
}

/// `ledger export`: every block as one JSON line, to `out` or stdout.
pub fn export(data_dir: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let chain = load_chain(data_dir)?;
    let mut text = String::new();
    for (block, certificate) in &chain {
        text.push_str(&serde_json::to_string(&block_view(block, certificate))?);
        text.push('\n');
    }
    match out {
        Some(path) => crate::identity::write_atomic(path, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// `credits [peer]`: balances and earnings from the verified ledger.
pub fn credits(data_dir: &Path, peer: Option<&str>, json: bool) -> anyhow::Result<()> {
    let chain = load_chain(data_dir)?;
    verify_chain(&chain)?;
    let mut book = CreditBook::default();
    for (block, _) in &chain {
        book.apply(block).map_err(|e| anyhow::anyhow!(e))?;
    }
    let only = match peer {
        Some(text) => {
            let id: libp2p::PeerId = text
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid peer id {text:?}: {e}"))?;
            Some(crate::network::key_of(&id).context("peer id is not an ed25519 key")?)
        }
        None => None,
    };
    let report = book.report(only.as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "height {}  minted {}  balances {}  escrow {}  conserved {}",
        report.next_height,
        report.minted,
        report.balances_total,
        report.escrow_total,
        report.conserved
    );
    println!(
        "{:<54} {:>10} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "peer", "balance", "rep", "trained", "verified", "slashed", "escrow", "refunded"
    );
    for row in &report.peers {
        println!(
            "{:<54} {:>10} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8}",
            peer_name(&row.peer),
            row.balance,
            row.reputation,
            row.earned_training,
            row.earned_verifying,
            row.slashed,
            row.escrowed,
            row.refunded
        );
    }
    Ok(())
}
