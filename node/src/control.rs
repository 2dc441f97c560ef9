//! The local control API: a small HTTP server on loopback, protected by a bearer token.
//!
//! The token is kept in `<data-dir>/control.token` (mode 0600) and the bound address in
//! `<data-dir>/api.addr`, so `loom-peer status` and scripts on the same machine find the running
//! node. Request bodies are capped; every call into an actor has a timeout.
//!
//! Jobs: `POST /v1/jobs` checks a manifest as `loom-peer train` would, computes its job id and
//! puts it on the ledger with its escrow (signed by this node); `GET /v1/jobs` lists the jobs on
//! the ledger and `GET /v1/jobs/<id>` (a unique hex prefix will do) gives one job's status, both
//! from the node's job book ([`crate::jobs`]).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use loom_actors::{MembershipMsg, SupervisorMsg, credits::CreditsMsg, ledger::LedgerMsg, names};
use loom_protocols::PeerKey;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::{
    identity::write_atomic,
    jobs::{JobError, SharedJobBook, SubmitJobReply, SubmitJobRequest},
    network::{NetCommand, NetworkHandle, NetworkMsg, peer_id_of},
    status::{ActorStatus, MemberStatus, StatusReport, TrainingSlot},
};

/// File holding the bearer token.
pub const TOKEN_FILE: &str = "control.token";
/// File holding the bound address of the API.
pub const ADDR_FILE: &str = "api.addr";
/// Timeout of one call into an actor, in milliseconds.
const ACTOR_CALL_MS: u64 = 2_000;

/// Why the control API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The token or address file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The address could not be bound.
    #[error("cannot listen on control API address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What the API reads and drives of the node.
#[derive(Clone)]
pub struct ApiShared {
    /// The network command queue.
    pub network: NetworkHandle,
    /// The training status.
    pub training: TrainingSlot,
    /// The ledger store, when the node keeps one.
    pub ledger: Option<loom_actors::ledger::SharedLedgerStore>,
    /// Local bans.
    pub bans: crate::network::defense::SharedBanList,
    /// The jobs on the ledger.
    pub jobs: SharedJobBook,
    /// This node's key.
    pub me: PeerKey,
}

#[derive(Clone)]
struct ApiState {
    token: Arc<String>,
    started: Instant,
    network: NetworkHandle,
    training: TrainingSlot,
    ledger: Option<loom_actors::ledger::SharedLedgerStore>,
    bans: crate::network::defense::SharedBanList,
    jobs: SharedJobBook,
    me: PeerKey,
    data_dir: Arc<std::path::PathBuf>,
}

/// Largest body of `POST /v1/jobs`: a manifest of the largest size ledger entries carry, escaped
/// as JSON.
const MAX_JOB_BODY_BYTES: usize = 4 * loom_protocols::ledger::MAX_MANIFEST_BYTES;

/// A probe publication result.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProbeSent {
    /// Sequence number of the probe.
    pub seq: u64,
}

/// One received probe, for the harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Origin PeerId.
    pub origin: String,
    /// Sequence number at the origin.
    pub seq: u64,
    /// One-way latency in µs (same-machine clocks).
    pub latency_us: u64,
}

/// Body of `POST /v1/dial`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DialRequest {
    /// Multiaddr to dial.
    pub addr: String,
}

/// Query of `GET /v1/ledger/blocks`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlocksQuery {
    /// First height.
    pub from: u64,
    /// Most blocks (capped at 256).
    pub limit: u64,
}

/// Body of `POST /v1/ledger/transfer`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TransferRequest {
    /// Receiver's PeerId.
    pub to: String,
    /// Credits.
    pub amount: u64,
}

/// Body of `POST /v1/ban`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BanRequest {
    /// The peer's PeerId.
    pub peer: String,
    /// How long, in seconds (none: until unbanned).
    pub for_secs: Option<u64>,
    /// Why.
    pub reason: String,
}

/// Body of `POST /v1/speedtest`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpeedtestRequest {
    /// The serving peer's PeerId.
    pub peer: String,
    /// Bytes to transfer.
    pub bytes: u32,
}

/// Body of `POST /v1/unban`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnbanRequest {
    /// The peer's PeerId.
    pub peer: String,
}

/// Body of `POST /v1/ledger/submit`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// Hex of an encoded signed entry.
    pub entry: String,
}

/// Binds the API, writes the token and address files, and serves until the process ends.
pub async fn serve(
    data_dir: &Path,
    addr: SocketAddr,
    shared: ApiShared,
) -> Result<SocketAddr, ControlError> {
    let token = load_or_create_token(data_dir)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ControlError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlError::Bind { addr, source })?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "control API is not on loopback; it is protected only by its token");
    }
    let addr_path = data_dir.join(ADDR_FILE);
    write_atomic(&addr_path, bound.to_string().as_bytes(), 0o600).map_err(|source| {
        ControlError::Write {
            path: addr_path.display().to_string(),
            source,
        }
    })?;
    let state = ApiState {
        token: Arc::new(token),
        started: Instant::now(),
        network: shared.network,
        training: shared.training,
        ledger: shared.ledger,
        bans: shared.bans,
        jobs: shared.jobs,
        me: shared.me,
        data_dir: Arc::new(data_dir.to_path_buf()),
    };
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/probe", post(send_probe))
        .route("/v1/probes", get(probes))
        .route("/v1/dial", post(dial))
        .route("/v1/ledger", get(ledger_status))
        .route("/v1/ledger/blocks", get(ledger_blocks))
        .route("/v1/ledger/transfer", post(ledger_transfer))
        .route("/v1/ledger/submit", post(ledger_submit))
        .route("/v1/credits", get(credits_report))
        .route("/v1/bans", get(list_bans))
        .route("/v1/speedtest", post(speedtest))
        .route("/v1/ban", post(ban_peer))
        .route("/v1/unban", post(unban_peer))
        .route(
            "/v1/jobs",
            get(list_jobs)
                .post(submit_job)
                .layer(DefaultBodyLimit::max(MAX_JOB_BODY_BYTES)),
        )
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/jobs/{id}/close", post(close_job))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    tracing::info!(%bound, "control API listening");
    Ok(bound)
}

fn load_or_create_token(data_dir: &Path) -> Result<String, ControlError> {
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_owned();
        if token.len() >= 32 {
            return Ok(token);
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_atomic(&path, token.as_bytes(), 0o600).map_err(|source| ControlError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok(token)
}

async fn authorize(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let offered = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(offered.as_bytes(), state.token.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{what}: {e}\n")).into_response()
}

fn actor<M: ractor::Message>(name: &str) -> Option<ActorRef<M>> {
    ractor::registry::where_is(name).map(Into::into)
}

async fn status(State(state): State<ApiState>) -> Response {
    let Some(network) = actor::<NetworkMsg>(names::NETWORK) else {
        return unavailable("network", "restarting");
    };
    let network = match ractor::call_t!(network, NetworkMsg::Status, ACTOR_CALL_MS) {
        Ok(s) => s,
        Err(e) => return unavailable("network", e),
    };
    let members = match actor::<MembershipMsg>(names::MEMBERSHIP) {
        Some(m) => ractor::call_t!(m, MembershipMsg::LiveView, ACTOR_CALL_MS).unwrap_or_default(),
        None => Vec::new(),
    };
    let actors = match actor::<SupervisorMsg>(names::SUPERVISOR) {
        Some(s) => ractor::call_t!(s, SupervisorMsg::Children, ACTOR_CALL_MS).unwrap_or_default(),
        None => Vec::new(),
    };
    Json(StatusReport {
        agent: crate::agent(),
        uptime_secs: state.started.elapsed().as_secs(),
        network,
        members: members
            .into_iter()
            .map(|m| MemberStatus {
                peer_id: peer_id_of(&m.peer_key)
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                state: m.state,
                silent_ms: m.silent_ms,
                nat: m.nat,
                addrs: m.addrs,
            })
            .collect(),
        actors: actors
            .into_iter()
            .map(|c| ActorStatus {
                name: c.name,
                running: c.running,
                restarts: c.restarts,
            })
            .collect(),
        training: state
            .training
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    })
    .into_response()
}

async fn send_probe() -> Response {
    let Some(m) = actor::<MembershipMsg>(names::MEMBERSHIP) else {
        return unavailable("membership", "restarting");
    };
    match ractor::call_t!(m, MembershipMsg::SendProbe, ACTOR_CALL_MS) {
        Ok(Ok(seq)) => Json(ProbeSent { seq }).into_response(),
        Ok(Err(e)) => unavailable("publish", e),
        Err(e) => unavailable("membership", e),
    }
}

async fn probes() -> Response {
    let Some(m) = actor::<MembershipMsg>(names::MEMBERSHIP) else {
        return unavailable("membership", "restarting");
    };
    match ractor::call_t!(m, MembershipMsg::ProbeSamples, ACTOR_CALL_MS) {
        Ok(samples) => Json(
            samples
                .into_iter()
                .map(|s| ProbeRecord {
                    origin: peer_id_of(&s.origin)
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    seq: s.seq,
                    latency_us: s.latency_us,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => unavailable("membership", e),
    }
}

async fn dial(State(state): State<ApiState>, Json(request): Json<DialRequest>) -> Response {
    let addr: libp2p::Multiaddr = match request.addr.parse() {
        Ok(a) => a,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad multiaddr: {e}\n")).into_response();
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = state.network.send(NetCommand::Dial(addr, tx)) {
        return unavailable("network", e);
    }
    match tokio::time::timeout(std::time::Duration::from_millis(ACTOR_CALL_MS), rx).await {
        Ok(Ok(Ok(()))) => StatusCode::ACCEPTED.into_response(),
        Ok(Ok(Err(e))) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        _ => unavailable("network", "no answer"),
    }
}

async fn ledger_status() -> Response {
    let Some(ledger) = actor::<LedgerMsg>(names::LEDGER) else {
        return unavailable("ledger", "restarting");
    };
    match ractor::call_t!(ledger, LedgerMsg::Status, ACTOR_CALL_MS) {
        Ok(status) => Json(status).into_response(),
        Err(e) => unavailable("ledger", e),
    }
}

async fn ledger_blocks(
    State(state): State<ApiState>,
    axum::extract::Query(query): axum::extract::Query<BlocksQuery>,
) -> Response {
    let Some(store) = state.ledger.clone() else {
        return unavailable("ledger", "not running");
    };
    let limit = query.limit.min(256) as usize;
    let from = query.from;
    let result = tokio::task::spawn_blocking(move || {
        store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .range(from, limit)
    })
    .await;
    match result {
        Ok(Ok(blocks)) => Json(
            blocks
                .iter()
                .map(|(b, c)| crate::ledger_cli::record_hex(b, c))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Ok(Err(e)) => unavailable("ledger", e),
        Err(e) => unavailable("ledger", e),
    }
}

async fn ledger_transfer(Json(request): Json<TransferRequest>) -> Response {
    let to = match request
        .to
        .parse::<libp2p::PeerId>()
        .ok()
        .and_then(|p| crate::network::key_of(&p))
    {
        Some(key) => key,
        None => {
            return (StatusCode::BAD_REQUEST, "invalid receiver peer id\n").into_response();
        }
    };
    let Some(ledger) = actor::<LedgerMsg>(names::LEDGER) else {
        return unavailable("ledger", "restarting");
    };
    let entry = loom_protocols::ledger::Entry::Transfer {
        to,
        amount: request.amount,
    };
    match ractor::call_t!(ledger, LedgerMsg::SubmitOwn, ACTOR_CALL_MS, entry) {
        Ok(Ok(())) => StatusCode::ACCEPTED.into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(e) => unavailable("ledger", e),
    }
}

async fn credits_report() -> Response {
    let Some(credits) = actor::<CreditsMsg>(names::CREDITS) else {
        return unavailable("credits", "restarting");
    };
    match ractor::call_t!(credits, CreditsMsg::Report, ACTOR_CALL_MS, None) {
        Ok(report) => Json(report).into_response(),
        Err(e) => unavailable("credits", e),
    }
}

async fn ledger_submit(Json(request): Json<SubmitRequest>) -> Response {
    let entry = crate::ledger_cli::unhex(&request.entry).and_then(|bytes| {
        loom_protocols::decode_bounded::<loom_protocols::ledger::SignedEntry>(&bytes, 16 * 1024)
            .ok()
    });
    let Some(entry) = entry else {
        return (StatusCode::BAD_REQUEST, "entry does not decode\n").into_response();
    };
    let Some(ledger) = actor::<LedgerMsg>(names::LEDGER) else {
        return unavailable("ledger", "restarting");
    };
    match ractor::call_t!(ledger, LedgerMsg::Submit, ACTOR_CALL_MS, entry) {
        Ok(Ok(())) => StatusCode::ACCEPTED.into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(e) => unavailable("ledger", e),
    }
}

async fn list_bans(State(state): State<ApiState>) -> Response {
    let now = loom_actors::unix_ms();
    let active = state
        .bans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .active(now);
    Json(active).into_response()
}

async fn ban_peer(State(state): State<ApiState>, Json(request): Json<BanRequest>) -> Response {
    let now = loom_actors::unix_ms();
    let result = state.bans.lock().unwrap_or_else(|e| e.into_inner()).ban(
        &request.peer,
        request.for_secs.map(std::time::Duration::from_secs),
        &request.reason,
        crate::bans::BanSource::Local,
        now,
    );
    match result {
        Ok(entry) => {
            metrics::counter!("loom_bans_total", "source" => "local").increment(1);
            Json(entry).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn unban_peer(State(state): State<ApiState>, Json(request): Json<UnbanRequest>) -> Response {
    let result = state
        .bans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unban(&request.peer);
    match result {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, "no local ban of that peer\n").into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn speedtest(
    State(state): State<ApiState>,
    Json(request): Json<SpeedtestRequest>,
) -> Response {
    let Ok(peer) = request.peer.parse::<libp2p::PeerId>() else {
        return (StatusCode::BAD_REQUEST, "invalid peer id\n").into_response();
    };
    if request.bytes == 0 || request.bytes > crate::network::speedtest::MAX_SPEEDTEST_BYTES {
        return (StatusCode::BAD_REQUEST, "bytes must be 1 to 64 MiB\n").into_response();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = state.network.send(NetCommand::Speedtest {
        peer,
        bytes: request.bytes,
        reply: tx,
    }) {
        return unavailable("network", e);
    }
    match tokio::time::timeout(std::time::Duration::from_secs(130), rx).await {
        Ok(Ok(Ok(result))) => Json(result).into_response(),
        Ok(Ok(Err(e))) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        _ => unavailable("network", "no answer"),
    }
}

fn job_error(error: JobError) -> Response {
    let status = match &error {
        JobError::Unknown(_) => StatusCode::NOT_FOUND,
        JobError::Duplicate(_) => StatusCode::CONFLICT,
        e if e.is_bad_request() => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("{error}\n")).into_response()
}

async fn submit_job(
    State(state): State<ApiState>,
    Json(request): Json<SubmitJobRequest>,
) -> Response {
    let base = match &request.base_dir {
        Some(dir) => std::path::PathBuf::from(dir),
        None => state.data_dir.as_ref().clone(),
    };
    let SubmitJobRequest {
        manifest, escrow, ..
    } = request;
    let text = manifest.clone();
    let checked =
        tokio::task::spawn_blocking(move || crate::jobs::check_submission(&text, escrow, &base))
            .await;
    let submission = match checked {
        Ok(Ok(submission)) => submission,
        Ok(Err(error)) => return job_error(error),
        Err(e) => return unavailable("job check", e),
    };
    let Some(ledger) = actor::<LedgerMsg>(names::LEDGER) else {
        return job_error(JobError::Ledger("is not running".into()));
    };
    let status = match ractor::call_t!(ledger, LedgerMsg::Status, ACTOR_CALL_MS) {
        Ok(status) => status,
        Err(e) => return job_error(JobError::Ledger(format!("does not answer: {e}"))),
    };
    if status.genesis.is_none() {
        return job_error(JobError::Ledger(
            "has no genesis yet (start a peer with --genesis, or wait for it to sync)".into(),
        ));
    }
    if !status.member {
        return job_error(JobError::Ledger(
            "does not count this node as a member yet; try again once it has enrolled".into(),
        ));
    }
    let job_hex = crate::ledger_cli::hex(&submission.id);
    {
        let book = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if book.get(&submission.id).is_some() {
            return job_error(JobError::Duplicate(job_hex));
        }
        let balance = book.credits().balance(&state.me);
        if balance < submission.escrow {
            return job_error(JobError::Balance {
                balance,
                escrow: submission.escrow,
            });
        }
    }
    let entry = loom_protocols::ledger::Entry::JobSubmitted {
        job: submission.id,
        escrow: submission.escrow,
        manifest,
        terms: submission.manifest.ledger_terms(),
    };
    match ractor::call_t!(ledger, LedgerMsg::SubmitOwn, ACTOR_CALL_MS, entry) {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(SubmitJobReply {
                job_id: job_hex,
                escrow: submission.escrow,
            }),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::BAD_REQUEST,
            format!("ledger refused the job: {e}\n"),
        )
            .into_response(),
        Err(e) => unavailable("ledger", e),
    }
}

/// `POST /v1/jobs/<id>/close`: the submitter (this node) closes its job; the escrow left goes
/// back to it once the entry is final.
async fn close_job(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let (job, refund) = {
        let book = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let record = match book.resolve(&id) {
            Ok(record) => record,
            Err(error) => return job_error(error),
        };
        let job_hex = crate::ledger_cli::hex(&record.id);
        if record.submitter != state.me {
            return job_error(JobError::NotSubmitter(job_hex));
        }
        if record.closed_height.is_some() {
            return job_error(JobError::Closed(job_hex));
        }
        (record.id, book.credits().escrow(&record.id))
    };
    let Some(ledger) = actor::<LedgerMsg>(names::LEDGER) else {
        return job_error(JobError::Ledger("is not running".into()));
    };
    let entry = loom_protocols::ledger::Entry::JobClosed { job };
    match ractor::call_t!(ledger, LedgerMsg::SubmitOwn, ACTOR_CALL_MS, entry) {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(crate::jobs::CloseJobReply {
                job_id: crate::ledger_cli::hex(&job),
                refund,
            }),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::BAD_REQUEST,
            format!("ledger refused to close the job: {e}\n"),
        )
            .into_response(),
        Err(e) => unavailable("ledger", e),
    }
}

async fn list_jobs(State(state): State<ApiState>) -> Response {
    let book = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    let jobs: Vec<crate::jobs::JobSummary> = book.jobs().map(|r| book.summary(r)).collect();
    Json(jobs).into_response()
}

async fn job_status(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let local = state
        .training
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let book = state.jobs.lock().unwrap_or_else(|e| e.into_inner());
    match book.resolve(&id) {
        Ok(record) => Json(book.status(record, local)).into_response(),
        Err(error) => job_error(error),
    }
}
