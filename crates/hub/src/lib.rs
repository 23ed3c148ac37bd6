//! `tessera-hub`: the coordinator of a Tessera network.
//!
//! It serves an OpenAI-compatible API to agents ([`api`]), accepts provider nodes over an
//! outward WebSocket ([`connect`]), serves only model files pinned in its [`catalog`], schedules
//! each job on a provider ([`registry`]), escrows and settles through the ledger, and has a
//! sampled fraction of jobs checked by other providers, slashing and quarantining a provider
//! whose failure is confirmed, and the verifiers that answer known-answer checks wrong ([`jobs`]).
//!
//! Money, nonces, API keys, provider records and jobs awaiting a verdict live in the database.
//! The hub never links the inference engine: it decodes token ids with each model's vocabulary.
#![deny(missing_docs)]

pub mod activity;
pub mod api;
pub mod catalog;
pub mod chain;
pub mod config;
pub mod connect;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod store;
pub mod tasks;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tessera_ledger::{Ledger, LedgerConfig};
use tessera_protocol::{Address, Domain, Verifier};

pub use api::router;
pub use catalog::{Catalog, ModelEntry};
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
    /// Recent jobs, slashes and counters for the dashboard.
    pub activity: activity::Activity,
    /// Interactive requests in admission (batch jobs wait while any are).
    pub interactive_waiting: std::sync::atomic::AtomicUsize,
    /// A per-process random tag in every idempotency key, so job ids of a restarted hub never
    /// collide with those already in the ledger.
    pub run_id: String,
    /// Known-answer checks for verifiers.
    pub canaries: jobs::verify::Canaries,
    /// Per-wallet limits.
    pub limits: Arc<api::limits::Limits>,
    /// The task market's tables.
    pub tasks: tasks::TaskStore,
    /// Spending policies of session keys.
    pub policies: policy::PolicyStore,
    /// The chain holding the vault, when `--rpc` is set.
    pub chain: Option<chain::ChainLink>,
    api_keys: RwLock<HashMap<[u8; 32], (Address, u64, Instant)>>,
    /// `--fast-settle`: maximum costs reserved per agent for jobs in flight.
    reservations: std::sync::Mutex<HashMap<Address, u64>>,
    /// `--fast-settle`: a lower bound of each agent's balance, to admit without a read.
    fast_balances: std::sync::Mutex<HashMap<Address, u64>>,
}

impl Hub {
    /// Opens the ledger and builds the state.
    pub async fn open(config: HubConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let ledger_config = LedgerConfig {
            dev_mode: config.dev,
            fee_bps: config.fee_bps,
            unbonding_secs: config.unbonding_secs,
            ..LedgerConfig::default()
        };
        let ledger = Ledger::open(&config.db, ledger_config).await?;
        let store = store::Store::open(&config.db).await?;
        let task_store = tasks::TaskStore::open(store.pool()).await?;
        let policies = policy::PolicyStore::open(store.pool()).await?;
        let registry = registry::Registry::default();
        for (address, record) in store.records().await? {
            registry.update(address, |r| *r = record);
        }
        // Signatures are bound to this hub: to its vault contract when it has one, else to an
        // address derived from its identity (kept in its database across restarts).
        let chain = chain::ChainLink::open(&config.chain, &config.db).await?;
        let verifying_contract = match (config.verifying_contract, config.chain.vault) {
            (Some(a), _) => a,
            (None, Some(vault)) if chain.is_some() => vault,
            _ => identity_address(&store.identity().await?),
        };
        let domain = Domain::for_hub(config.chain_id, verifying_contract);
        let hub = Arc::new(Self {
            verifier: Verifier::new(domain).with_max_validity(config.max_signature_validity_secs),
            config,
            ledger,
            registry,
            store,
            metrics: metrics::Metrics::default(),
            next_id: AtomicU64::new(1),
            interactive_waiting: Default::default(),
            activity: Default::default(),
            run_id: format!("{:08x}", rand::random::<u32>()),
            canaries: Default::default(),
            limits: Default::default(),
            tasks: task_store,
            policies,
            chain,
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
        // The task market's escrows live for days: they are the market's, not a cut-off job's.
        let tasks = self.tasks.live_escrows().await?;
        for escrow in self.ledger.open_escrows().await? {
            if tasks.contains(&escrow) {
                continue;
            }
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

    /// The expected loss per job of a provider that cheats on every job: p·S, with p the base
    /// verification probability and S the slash.
    pub fn cheater_expected_loss(&self) -> f64 {
        self.config.verify_probability * self.config.slash_amount as f64
    }

    /// The probability that a job of a provider with `reputation` is checked: new and
    /// low-reputation providers are checked more often, `p·(2 − reputation)`.
    pub fn verify_probability_for(&self, reputation: f64) -> f64 {
        (self.config.verify_probability * (2.0 - reputation)).clamp(0.0, 1.0)
    }
}

/// The EIP-712 `verifyingContract` of a hub without a vault: the last 20 bytes of
/// sha256("tessera-hub/" ‖ identity).
pub fn identity_address(identity: &str) -> Address {
    let digest: [u8; 32] = Sha256::digest(format!("tessera-hub/{identity}")).into();
    Address::from_slice(&digest[12..])
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
    if let Err(e) = hub.resume_withdrawals(true).await {
        tracing::warn!(error = %e, "paying the withdrawals a previous run left unpaid failed; the watcher retries");
    }
    let watcher = chain::spawn_watcher(hub.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(hub.clone())).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    let clock = tokio::spawn(tasks::run_clock(hub.clone()));
    let sampler = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(activity::SAMPLE_EVERY);
            loop {
                every.tick().await;
                hub.activity.sample(&hub.metrics);
            }
        })
    };
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
    clock.abort();
    sampler.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
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
            let tasks = self.tasks.live_escrows().await?;
            let open = self
                .ledger
                .open_escrows()
                .await?
                .into_iter()
                .filter(|e| !tasks.contains(e))
                .count();
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
