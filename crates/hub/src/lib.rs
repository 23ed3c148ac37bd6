//! `tessera-hub`: the coordinator of a Tessera network.
//!
//! It serves an OpenAI-compatible API to agents ([`openai`]), accepts provider nodes over an
//! outward WebSocket ([`connect`]), schedules each job on a provider ([`registry`]), escrows and
//! settles through the ledger, and samples jobs for verification by another provider, slashing
//! and quarantining the provider of a job that fails ([`jobs`]).
//!
//! Money and nonces live in the ledger's database; the provider registry (reputation,
//! quarantine) and API keys are kept in memory in this version (see the README's caveats).
#![deny(missing_docs)]

pub mod config;
pub mod connect;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod registry;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_ledger::{Ledger, LedgerConfig, SystemAccount};
use tessera_protocol::{Address, ApiKeyRegistration, Domain, Signed, Verifier};

pub use config::{load_config_file, HubConfig};
pub use error::{ApiError, Error, Result};

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The hub's shared state.
pub struct Hub {
    /// Settings.
    pub config: HubConfig,
    /// The books.
    pub ledger: Ledger,
    /// Checks signed messages under the hub's EIP-712 domain.
    pub verifier: Verifier,
    /// Providers.
    pub registry: registry::Registry,
    /// The hub's own tables.
    pub store: store::Store,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Ids of jobs, sessions and verifications.
    pub next_id: AtomicU64,
    /// A per-process random tag in every idempotency key, so job ids of a restarted hub never
    /// collide with those already in the ledger.
    pub run_id: String,
    api_keys: RwLock<HashMap<[u8; 32], Address>>,
    /// `--fast-settle`: maximum costs reserved per agent for jobs in flight.
    reservations: std::sync::Mutex<HashMap<Address, u64>>,
    /// `--fast-settle`: a lower bound of each agent's balance, to admit without a read.
    fast_balances: std::sync::Mutex<HashMap<Address, u64>>,
}

impl Hub {
    /// Opens the ledger and builds the state.
    pub async fn open(config: HubConfig) -> Result<Arc<Self>> {
        if !(0.0..=1.0).contains(&config.verify_probability) {
            return Err(Error::Config(
                "--verify-probability must be in [0, 1]".into(),
            ));
        }
        let ledger_config = LedgerConfig {
            dev_mode: config.dev,
            fee_bps: config.fee_bps,
            ..LedgerConfig::default()
        };
        let ledger = Ledger::open(&config.db, ledger_config).await?;
        let store = store::Store::open(&config.db).await?;
        let registry = registry::Registry::default();
        for (address, record) in store.records().await? {
            registry.update(address, |r| *r = record);
        }
        let hub = Arc::new(Self {
            verifier: Verifier::new(Domain::new(config.chain_id)),
            config,
            ledger,
            registry,
            store,
            metrics: metrics::Metrics::default(),
            next_id: AtomicU64::new(1),
            run_id: format!("{:08x}", rand::random::<u32>()),
            api_keys: RwLock::default(),
            reservations: Default::default(),
            fast_balances: Default::default(),
        });
        hub.recover().await?;
        Ok(hub)
    }

    /// Closes the escrows a previous run left open: settles jobs that were answered and waiting
    /// for a verdict (the agent was told the cost), refunds jobs cut off before their answer.
    /// Assumes one hub per database (replicas sharing PostgreSQL would need a lease per job).
    async fn recover(&self) -> Result<()> {
        for job in self.store.open_jobs().await? {
            if let Some(provider) = job.provider {
                match self
                    .ledger
                    .finish(
                        &format!("{}:finish", job.key),
                        job.escrow_id,
                        provider,
                        job.cost,
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(job = %job.key, cost = job.cost, "settled a job whose verdict a previous run did not see")
                    }
                    Err(tessera_ledger::Error::EscrowClosed(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.store.job_closed(&job.key).await?;
        }
        for escrow in self.ledger.open_escrows().await? {
            match self
                .ledger
                .release(&format!("recover-escrow-{escrow}"), escrow)
                .await
            {
                Ok(r) => tracing::info!(
                    escrow,
                    refunded = r.value.refunded,
                    "refunded a job a previous run cut off"
                ),
                Err(tessera_ledger::Error::EscrowClosed(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Saves a provider's record (after a verification changed it).
    pub async fn persist_record(&self, address: Address) {
        if let Err(e) = self
            .store
            .put_record(address, &self.registry.record(address))
            .await
        {
            tracing::error!(%address, error = %e, "saving a provider record failed");
        }
    }

    /// The agent an API key belongs to (cached; the database is the record, so keys survive
    /// restarts and are shared by replicas).
    pub async fn agent_for_key(&self, key: &str) -> Option<Address> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(agent) = self
            .api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
        {
            return Some(*agent);
        }
        let agent = self.store.api_key(&hash).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "API key lookup failed");
            None
        })?;
        self.api_keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, agent);
        Some(agent)
    }

    /// The expected loss per job of a provider that cheats on every job: p·S, with p the base
    /// verification probability and S the slash.
    pub fn cheater_expected_loss(&self) -> f64 {
        self.config.verify_probability * self.config.slash_amount as f64
    }
}

/// The hub's HTTP routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/keys", post(register_key))
        .route("/v1/dev/faucet", post(faucet))
        .route("/v1/accounts/{address}", get(account))
        .route("/v1/providers", get(providers))
        .route(tessera_wire::CONNECT_PATH, get(connect::connect))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid("not_found", "Unknown endpoint.")
            }
        })
        .with_state(hub)
}

/// `POST /v1/keys`: registers an API key by a wallet's signed `ApiKeyRegistration` (the JSON of
/// a `Signed<ApiKeyRegistration>`; the key itself is never sent, only its sha256).
async fn register_key(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let signed: Signed<ApiKeyRegistration> = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return ApiError::invalid(
                "invalid_json",
                format!("Expected a signed ApiKeyRegistration: {e}"),
            )
            .into_response()
        }
    };
    let agent = match hub.verifier.verify(&signed, now_secs(), &hub.ledger).await {
        Ok(a) => a,
        Err(e) => {
            return ApiError::bad_signature(format!("Invalid signature: {e}")).into_response()
        }
    };
    if let Err(e) = hub
        .store
        .put_api_key(&signed.message.keyHash.0, agent)
        .await
    {
        return ApiError::internal(e).into_response();
    }
    hub.api_keys
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(signed.message.keyHash.0, agent);
    tracing::info!(%agent, "API key registered");
    Json(json!({"address": agent})).into_response()
}

#[derive(Deserialize)]
struct FaucetRequest {
    address: Address,
    amount: u64,
}

/// `POST /v1/dev/faucet` (`--dev` only): mints money to an address.
async fn faucet(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Some(faucet) = hub.ledger.faucet() else {
        return ApiError::forbidden("The faucet exists only on a hub started with --dev.")
            .into_response();
    };
    let request: FaucetRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::invalid(
                "invalid_json",
                format!("Expected {{\"address\", \"amount\"}}: {e}"),
            )
            .into_response()
        }
    };
    let key = format!(
        "faucet-{}-{}",
        hub.run_id,
        hub.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    if let Err(e) = faucet.mint(&key, request.address, request.amount).await {
        return ApiError::invalid("faucet_refused", e.to_string()).into_response();
    }
    let balance = hub.ledger.balance(request.address).await.unwrap_or(0);
    Json(json!({"address": request.address, "balance": balance})).into_response()
}

/// `GET /v1/accounts/{address}`: balance and stake.
async fn account(State(hub): State<Arc<Hub>>, Path(address): Path<String>) -> Response {
    let Ok(address) = address.parse::<Address>() else {
        return ApiError::invalid_param("address", "Not a 0x address.").into_response();
    };
    let balance = match hub.ledger.balance(address).await {
        Ok(b) => b,
        Err(tessera_ledger::Error::UnknownAccount(_)) => 0,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let staked = hub.ledger.staked(address).await.unwrap_or(0);
    Json(json!({"address": address, "balance": balance, "staked": staked})).into_response()
}

/// `GET /v1/providers`: every provider seen, with reputation and quarantine.
async fn providers(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(json!({
        "verify_probability": hub.config.verify_probability,
        "slash_amount": hub.config.slash_amount,
        "cheater_expected_loss_per_job": hub.cheater_expected_loss(),
        "providers": hub.registry.views(),
    }))
}

async fn health(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(json!({"status": "ok", "providers": hub.registry.connections().len()}))
}

async fn metrics_text(State(hub): State<Arc<Hub>>) -> Response {
    let providers = hub.registry.views();
    let connected = providers.iter().filter(|p| p.connected).count() as f64;
    let quarantined = providers.iter().filter(|p| p.record.quarantined).count() as f64;
    let balance = |a: SystemAccount| {
        let ledger = hub.ledger.clone();
        async move { ledger.balance(a).await.unwrap_or(0) as f64 }
    };
    let (fees, treasury, escrow, stake) = (
        balance(SystemAccount::Fees).await,
        balance(SystemAccount::Treasury).await,
        balance(SystemAccount::Escrow).await,
        balance(SystemAccount::Stake).await,
    );
    let text = hub.metrics.render(&[
        (
            "tessera_providers_connected",
            "Providers with an open session.",
            connected,
        ),
        (
            "tessera_providers_quarantined",
            "Providers quarantined.",
            quarantined,
        ),
        (
            "tessera_verify_probability",
            "Base verification probability.",
            hub.config.verify_probability,
        ),
        (
            "tessera_cheater_expected_loss_micro",
            "Expected slash per cheated job (p times S).",
            hub.cheater_expected_loss(),
        ),
        (
            "tessera_balance_fees_micro",
            "Protocol fees collected.",
            fees,
        ),
        (
            "tessera_balance_treasury_micro",
            "Treasury balance.",
            treasury,
        ),
        (
            "tessera_balance_escrow_micro",
            "Money held in open escrows.",
            escrow,
        ),
        (
            "tessera_balance_stake_micro",
            "Money bonded as stake.",
            stake,
        ),
    ]);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// Runs the hub until `shutdown` resolves (the CLI passes Ctrl-C/SIGTERM), then finishes the
/// requests in flight.
pub async fn run(
    config: HubConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let hub = Hub::open(config.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = &config.addr_file {
        // Write then rename, so a reader never sees a half-written address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(%addr, db = %config.db, dev = config.dev, p = config.verify_probability, slash = config.slash_amount, "hub listening");
    serve(hub, listener, shutdown).await
}

/// Serves `hub` on a bound listener until `shutdown` resolves, then stops within
/// `drain_timeout_secs`: it accepts no new connection, waits for the requests in flight and the
/// verifications they started, settles or refunds every escrow still open (as a restart's
/// recovery would), and closes the databases, so the ledger audit is clean after a stop.
pub async fn serve(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(hub.clone())).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    tokio::select! {
        served = &mut server => served?,
        _ = shutdown => {
            let drain = std::time::Duration::from_secs(hub.config.drain_timeout_secs);
            let deadline = tokio::time::Instant::now() + drain;
            tracing::info!(drain_timeout = ?drain, "stop requested: accepting no new requests");
            let _ = stop_tx.send(());
            if let Err(e) = hub.drain(server, deadline).await {
                tracing::error!(error = %e, "draining failed; closing now");
            }
        }
    }
    hub.close().await
}

impl Hub {
    /// The stop's drain: waits, until `deadline`, for the HTTP server to finish its requests in
    /// flight, then for the verifications they left open, logging what it waits for.
    async fn drain(
        &self,
        mut server: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let mut requests_done = false;
        // A hub with nothing in flight stops before it has anything to report.
        let mut next_report = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let open = self.ledger.open_escrows().await?.len();
            if requests_done && open == 0 {
                tracing::info!("drained");
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                tracing::warn!(
                    requests_done,
                    open_escrows = open,
                    "drain timeout: cutting off what is still in flight"
                );
                return Ok(());
            }
            if now >= next_report {
                let waiting_for = if requests_done {
                    "the verdicts of jobs already answered"
                } else {
                    "the requests in flight (a stream ends when its provider finishes)"
                };
                tracing::info!(open_escrows = open, ?left, waiting_for, "draining");
                next_report = now + std::time::Duration::from_secs(5);
            }
            let step = std::time::Duration::from_millis(200).min(left);
            if requests_done {
                tokio::time::sleep(step).await;
            } else if let Ok(served) = tokio::time::timeout(step, &mut server).await {
                served?;
                requests_done = true;
            }
        }
    }

    /// The end of a stop: settles or refunds every escrow the drain left open (what a restart's
    /// recovery would do; a request still running past the deadline then finds its escrow closed
    /// and charges nothing twice) and closes the databases.
    pub async fn close(&self) -> Result<()> {
        let recovered = self.recover().await;
        if let Err(e) = &recovered {
            tracing::error!(error = %e, "closing the escrows left open failed; the next start will");
        }
        self.ledger.close().await;
        self.store.close().await;
        tracing::info!("hub stopped");
        recovered
    }
}
