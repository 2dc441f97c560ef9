//! A client of the local control API, used by `loom-peer status`, the demo and the harnesses.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;

use crate::{
    control::{ADDR_FILE, DialRequest, ProbeRecord, ProbeSent, TOKEN_FILE},
    status::StatusReport,
};

/// Why the control API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node's address or token file is missing: it is not running on this data dir.
    #[error("no running loom-peer found in {dir} ({file} missing); start one with `loom-peer run`")]
    NotRunning {
        /// The data directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// The node refused the request (a 4xx answer): its one-line reason.
    #[error("{0}")]
    Refused(String),
    /// The request failed.
    #[error("control API at {addr}: {message}")]
    Request {
        /// API address.
        addr: String,
        /// What went wrong.
        message: String,
    },
}

/// A connection to one node's control API.
#[derive(Debug, Clone)]
pub struct ControlClient {
    addr: String,
    token: String,
    agent: ureq::Agent,
}

impl ControlClient {
    /// Finds the running node of `data_dir`.
    pub fn from_data_dir(data_dir: &Path) -> Result<Self, ClientError> {
        let read = |file: &'static str| {
            std::fs::read_to_string(data_dir.join(file))
                .map(|s| s.trim().to_owned())
                .map_err(|_| ClientError::NotRunning {
                    dir: data_dir.to_owned(),
                    file,
                })
        };
        let addr = read(ADDR_FILE)?;
        let token = read(TOKEN_FILE)?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self { addr, token, agent })
    }

    /// Waits up to `timeout` for the node of `data_dir` to publish its API address.
    pub fn wait_for(data_dir: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::from_data_dir(data_dir) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn error(&self, message: impl ToString) -> ClientError {
        ClientError::Request {
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = response.map_err(|e| self.error(e))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.body_mut().read_to_string().unwrap_or_default();
            let reason = body.lines().next().unwrap_or_default().trim().to_owned();
            if status.is_client_error() && status != ureq::http::StatusCode::UNAUTHORIZED {
                return Err(ClientError::Refused(reason));
            }
            return Err(self.error(format!("{status}: {reason}")));
        }
        response
            .body_mut()
            .read_json::<T>()
            .map_err(|e| self.error(e))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// An authorised GET of `path`, decoded from JSON.
    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.bearer())
            .call();
        self.decode(r)
    }

    /// The node's status report.
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.get_json("/v1/status")
    }

    /// Publishes a latency probe.
    pub fn send_probe(&self) -> Result<u64, ClientError> {
        let r = self
            .agent
            .post(&self.url("/v1/probe"))
            .header("Authorization", &self.bearer())
            .send_empty();
        self.decode::<ProbeSent>(r).map(|p| p.seq)
    }

    /// Probes received by the node.
    pub fn probes(&self) -> Result<Vec<ProbeRecord>, ClientError> {
        self.get_json("/v1/probes")
    }

    /// Asks the node to dial `addr`.
    pub fn dial(&self, addr: &str) -> Result<(), ClientError> {
        self.post_ok(
            "/v1/dial",
            DialRequest {
                addr: addr.to_owned(),
            },
        )
    }

    /// Finalized ledger blocks from `from`, as hex records.
    pub fn ledger_blocks(&self, from: u64, limit: u64) -> Result<Vec<String>, ClientError> {
        self.get_json(&format!("/v1/ledger/blocks?from={from}&limit={limit}"))
    }

    /// The ledger replica's status.
    pub fn ledger_status(&self) -> Result<loom_actors::ledger::LedgerStatus, ClientError> {
        self.get_json("/v1/ledger")
    }

    /// The credit report of the running node.
    pub fn credits(&self) -> Result<loom_actors::credits::CreditReport, ClientError> {
        self.get_json("/v1/credits")
    }

    /// Submits a transfer signed by the node.
    pub fn transfer(&self, to: &str, amount: u64) -> Result<(), ClientError> {
        self.post_ok(
            "/v1/ledger/transfer",
            crate::control::TransferRequest {
                to: to.to_owned(),
                amount,
            },
        )
    }

    /// Submits an entry signed elsewhere (a fleet revocation).
    pub fn submit_entry(
        &self,
        entry: &loom_protocols::ledger::SignedEntry,
    ) -> Result<(), ClientError> {
        self.post_ok(
            "/v1/ledger/submit",
            crate::control::SubmitRequest {
                entry: crate::ledger_cli::hex(&loom_protocols::encode(entry)),
            },
        )
    }

    fn post_ok<B: serde::Serialize>(&self, path: &str, body: B) -> Result<(), ClientError> {
        let mut r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.bearer())
            .send_json(body)
            .map_err(|e| self.error(e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            let body = r.body_mut().read_to_string().unwrap_or_default();
            Err(self.error(body.trim()))
        }
    }

    /// Submits a job: its manifest text, the escrow (default: the manifest's) and the
    /// directory a relative dataset path is taken from.
    pub fn submit_job(
        &self,
        request: &crate::jobs::SubmitJobRequest,
    ) -> Result<crate::jobs::SubmitJobReply, ClientError> {
        // Checking a manifest loads its dataset, which can take a while.
        let r = self
            .agent
            .post(&self.url("/v1/jobs"))
            .header("Authorization", &self.bearer())
            .config()
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .send_json(request);
        self.decode(r)
    }

    /// Closes a job this node submitted, by id or unique hex prefix.
    pub fn close_job(&self, id: &str) -> Result<crate::jobs::CloseJobReply, ClientError> {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.error(crate::jobs::JobError::BadId(id.to_owned())));
        }
        let r = self
            .agent
            .post(&self.url(&format!("/v1/jobs/{id}/close")))
            .header("Authorization", &self.bearer())
            .send_empty();
        self.decode(r)
    }

    /// The jobs on the ledger.
    pub fn jobs(&self) -> Result<Vec<crate::jobs::JobSummary>, ClientError> {
        self.get_json("/v1/jobs")
    }

    /// One job's status, by id or unique hex prefix.
    pub fn job(&self, id: &str) -> Result<crate::jobs::JobStatus, ClientError> {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.error(crate::jobs::JobError::BadId(id.to_owned())));
        }
        self.get_json(&format!("/v1/jobs/{id}"))
    }

    /// Bans a peer on the node.
    pub fn ban(&self, peer: &str, for_secs: Option<u64>, reason: &str) -> Result<(), ClientError> {
        self.post_ok(
            "/v1/ban",
            crate::control::BanRequest {
                peer: peer.to_owned(),
                for_secs,
                reason: reason.to_owned(),
            },
        )
    }

    /// Lifts a local ban.
    pub fn unban(&self, peer: &str) -> Result<(), ClientError> {
        self.post_ok(
            "/v1/unban",
            crate::control::UnbanRequest {
                peer: peer.to_owned(),
            },
        )
    }

    /// Active local bans.
    pub fn bans(&self) -> Result<Vec<crate::bans::BanEntry>, ClientError> {
        self.get_json("/v1/bans")
    }

    /// Measures the throughput from `peer` over `bytes` bytes.
    pub fn speedtest(
        &self,
        peer: &str,
        bytes: u32,
    ) -> Result<crate::network::speedtest::SpeedtestResult, ClientError> {
        let r = self
            .agent
            .post(&self.url("/v1/speedtest"))
            .header("Authorization", &self.bearer())
            .config()
            .timeout_global(Some(std::time::Duration::from_secs(140)))
            .build()
            .send_json(crate::control::SpeedtestRequest {
                peer: peer.to_owned(),
                bytes,
            });
        self.decode(r)
    }
}
