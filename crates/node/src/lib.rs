//! `tessera-node`: the provider daemon. It loads a model, connects *outward* to a hub over
//! WebSocket (so it can serve from behind NAT), registers with a signed EIP-712
//! `ProviderRegistration`, serves jobs through the engine's continuous-batching service with a
//! commitment per job, answers verification requests with one teacher-forced pass, heartbeats,
//! reconnects with exponential backoff and drains in-flight jobs on SIGTERM/Ctrl-C.
//!
//! Stopping is a state the node keeps ([`Phase`] in a `watch` channel), not a one-shot
//! notification: every wait (loading, connecting, registering, the session, the backoff between
//! reconnects) selects on it, so a stop asked at any moment is seen, even by a session that ends
//! for another reason at the same instant (issue 17).
#![deny(missing_docs)]

#[cfg(feature = "adversary")]
pub mod adversary;
mod error;
mod serve;
pub mod synthetic;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tessera_engine::{Engine, EngineService, LoadOptions, Variant};
use tessera_protocol::{Domain, ProviderRegistration, Wallet, B256};
use tessera_wire::{HubMessage, NodeMessage, CONNECT_PATH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Frame;

pub use error::{Error, Result};

#[cfg(feature = "adversary")]
pub use adversary::Cheat;

/// `tessera node` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// The hub's base URL (`http://HOST:PORT` or `ws://HOST:PORT`).
    #[arg(long, env = "TESSERA_HUB")]
    pub hub: String,
    /// Keystore file of the provider's wallet (password from `TESSERA_WALLET_PASSWORD`).
    #[arg(long, env = "TESSERA_WALLET", required_unless_present = "private_key")]
    pub wallet: Option<PathBuf>,
    /// The keystore password.
    #[arg(
        long,
        env = "TESSERA_WALLET_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    pub password: String,
    /// A raw private key instead of a keystore (development).
    #[arg(long, env = "TESSERA_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: Option<String>,
    /// A known model name or a path to a .gguf file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Price per generated token, in micro-units.
    #[arg(long, default_value_t = 10)]
    pub price: u64,
    /// Jobs decoded together.
    #[arg(long, default_value_t = 4)]
    pub capacity: u32,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Development: ask a `--dev` hub to fund and stake this provider from its faucet.
    #[arg(long)]
    pub dev_stake: bool,
    /// EIP-712 chain id of the hub's domain.
    #[arg(long, default_value_t = tessera_protocol::DEFAULT_CHAIN_ID)]
    pub chain_id: u64,
    /// Misbehave on purpose (tests and demos; only in builds with the `adversary` feature).
    #[cfg(feature = "adversary")]
    #[arg(long, value_enum)]
    pub cheat: Option<Cheat>,
    /// Testing: refuse every job before its first token (the hub must retry elsewhere).
    #[cfg(feature = "adversary")]
    #[arg(long, hide = true)]
    pub refuse_jobs: bool,
    /// Seconds a stopping node waits for its jobs and verifications in flight; then it fails the
    /// jobs left (the hub charges the tokens already delivered) and exits.
    #[arg(long, env = "TESSERA_NODE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// A loaded provider: the wallet, the serving engine and a second copy for tokenizing and
/// verifying (the service thread owns the first, and a teacher-forced pass must not wait behind
/// a batch of generations).
pub struct Node {
    config: NodeConfig,
    wallet: Wallet,
    service: EngineService,
    engine: Arc<Engine>,
    active: AtomicU32,
    draining: AtomicBool,
    /// One verification at a time: a prefill pass uses every core.
    verify_lock: Mutex<()>,
}

impl Node {
    /// Loads the wallet and the model.
    pub fn load(config: NodeConfig) -> Result<Self> {
        let wallet = match (&config.private_key, &config.wallet) {
            (Some(key), _) => Wallet::from_private_key_hex(key)?,
            (None, Some(path)) => Wallet::load_keystore(path, &config.password)?,
            (None, None) => return Err(Error::Config("give --wallet or --private-key".into())),
        };
        if tessera_engine::registry::known(&config.model).is_some() {
            tessera_engine::registry::fetch(&config.model)?;
        }
        #[cfg(feature = "adversary")]
        let variant = config.cheat.map_or(Variant::Faithful, Cheat::variant);
        #[cfg(not(feature = "adversary"))]
        let variant = Variant::Faithful;
        let options = LoadOptions {
            threads: config.threads,
            variant,
            ..Default::default()
        };
        let service = EngineService::spawn(
            Engine::load_with(&config.model, &options)?,
            config.capacity as usize,
        );
        let engine = Arc::new(Engine::load_with(&config.model, &options)?);
        tracing::info!(address = %wallet.address(), model = %engine.info().name, sha256 = %engine.info().sha256, "node loaded");
        #[cfg(feature = "adversary")]
        if let Some(cheat) = config.cheat {
            tracing::warn!(?cheat, "this node misbehaves on purpose");
        }
        Ok(Self {
            config,
            wallet,
            service,
            engine,
            active: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            verify_lock: Mutex::new(()),
        })
    }

    fn refuses_jobs(&self) -> bool {
        #[cfg(feature = "adversary")]
        return self.config.refuse_jobs;
        #[cfg(not(feature = "adversary"))]
        false
    }

    /// The provider's address.
    pub fn address(&self) -> tessera_protocol::Address {
        self.wallet.address()
    }

    fn registration(&self, domain: Domain) -> Result<NodeMessage> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let sha: B256 = self
            .engine
            .info()
            .sha256
            .parse()
            .map_err(|e| Error::Config(format!("model sha256: {e}")))?;
        let message = ProviderRegistration {
            model: sha,
            pricePerToken: self.config.price,
            capacity: self.config.capacity,
            // Nanoseconds: a fresh nonce per connection, increasing across restarts.
            nonce: now.as_nanos() as u64,
            expiry: now.as_secs() + 300,
        };
        Ok(NodeMessage::Register {
            registration: self.wallet.sign(message, domain)?,
            dev_stake: self.config.dev_stake,
            engine: format!("tessera-engine {}", tessera_engine::VERSION),
        })
    }
}

/// How a session ended.
enum SessionEnd {
    /// Stopped on request (drained, or nothing to drain).
    Shutdown,
    /// The connection dropped; reconnect.
    Lost(String),
}

/// Where a node stands on its way down. Kept in a `watch` channel so that every wait can select
/// on it, and one that starts after the stop was asked still sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving.
    Running,
    /// A stop was asked: take no new work, finish what is in flight until `deadline`.
    Draining {
        /// When the jobs still running are failed and the node exits.
        deadline: Instant,
    },
}

/// How long a WebSocket connection (TCP and the HTTP upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the hub may take to answer the registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Past the drain deadline, how long a session may still take to fail its jobs and close before
/// the node gives up on it (a hub that stopped reading) and exits with an error.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Resolves with the drain deadline once a stop is asked (at once if it already was).
async fn stop_requested(phase: &mut watch::Receiver<Phase>) -> Instant {
    match phase.wait_for(|p| *p != Phase::Running).await {
        Ok(p) => match *p {
            Phase::Draining { deadline } => deadline,
            Phase::Running => unreachable!("wait_for returned a running phase"),
        },
        // The sender lives as long as the runtime; if it is gone, nothing can ask any more.
        Err(_) => std::future::pending().await,
    }
}

/// Runs a provider until `shutdown` resolves (the CLI passes Ctrl-C/SIGTERM): load, connect,
/// serve, reconnect with backoff. On shutdown it takes no new work, waits up to
/// `--drain-timeout-secs` for the jobs and verifications in flight, fails the jobs still running
/// (so the hub charges only what was delivered) and returns `Ok`. It returns an error only when
/// the session could not even be closed within [`CLOSE_GRACE`] after that deadline.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let drain = Duration::from_secs(config.drain_timeout_secs);
    let (phase_tx, mut phase) = watch::channel(Phase::Running);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(drain_timeout = ?drain, "stop requested: taking no new jobs");
        phase_tx.send_replace(Phase::Draining {
            deadline: Instant::now() + drain,
        });
        // Keep the sender (and so the state) alive for every later wait.
        std::future::pending::<()>().await
    });
    let loading = tokio::task::spawn_blocking(move || Node::load(config));
    let node = tokio::select! {
        loaded = loading => Arc::new(loaded.map_err(|e| Error::Config(e.to_string()))??),
        _ = stop_requested(&mut phase) => {
            tracing::info!("stopped while loading the model");
            return Ok(());
        }
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let ended = tokio::select! {
            ended = session(&node, phase.clone(), &mut backoff) => ended,
            _ = async {
                let deadline = stop_requested(&mut phase.clone()).await;
                tokio::time::sleep_until(deadline + CLOSE_GRACE).await
            } => {
                tracing::error!(active = node.active.load(Ordering::Relaxed), "the hub did not take the session's close in time; exiting without it");
                return Err(Error::Shutdown("the session did not close within the drain bound".into()));
            }
        };
        let stopping = *phase.borrow() != Phase::Running;
        match ended {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Err(Error::Rejected(why)) => return Err(Error::Rejected(why)),
            // The hub went away as the stop was asked: nothing left to drain into.
            Ok(SessionEnd::Lost(why)) if stopping => {
                tracing::info!(%why, active = node.active.load(Ordering::Relaxed), "stopped; the hub connection ended while stopping");
                return Ok(());
            }
            Err(e) if stopping => {
                tracing::info!(error = %e, "stopped; the hub could not be reached while stopping");
                return Ok(());
            }
            Ok(SessionEnd::Lost(why)) => {
                tracing::warn!(%why, retry_in = ?backoff, "connection to hub lost")
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach hub"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop_requested(&mut phase) => {
                tracing::info!("stopped while waiting to reconnect");
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn ws_url(hub: &str) -> String {
    let base = hub.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        format!("ws://{base}")
    };
    format!("{base}{CONNECT_PATH}")
}

fn timed_out(what: &str) -> Error {
    Error::Connection(tokio_tungstenite::tungstenite::Error::Io(
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out {what}")),
    ))
}

async fn session(
    node: &Arc<Node>,
    mut phase: watch::Receiver<Phase>,
    backoff: &mut Duration,
) -> Result<SessionEnd> {
    let connecting = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async(ws_url(&node.config.hub)),
    );
    let (ws, _) = tokio::select! {
        connected = connecting => connected.map_err(|_| timed_out("connecting to the hub"))??,
        _ = stop_requested(&mut phase) => {
            tracing::info!("stopped while connecting to the hub");
            return Ok(SessionEnd::Shutdown);
        }
    };
    let (mut sink, mut stream) = ws.split();
    // The hub greets with the domain its signatures are bound to; a registration signed for
    // another hub would not be accepted here (nor one signed here elsewhere).
    let greeting = async {
        loop {
            let Some(frame) = stream.next().await else {
                return Ok::<_, Error>(None);
            };
            let Frame::Text(text) = frame? else { continue };
            return match serde_json::from_str::<HubMessage>(&text) {
                Ok(HubMessage::Hello { domain }) => Ok(Some(domain)),
                Ok(other) => Err(Error::Protocol(format!(
                    "expected the hub's greeting, got {other:?}"
                ))),
                Err(e) => Err(Error::Protocol(e.to_string())),
            };
        }
    };
    let domain = tokio::select! {
        greeted = tokio::time::timeout(REGISTER_TIMEOUT, greeting) => {
            match greeted.map_err(|_| timed_out("waiting for the hub's greeting"))?? {
                Some(domain) => domain,
                None => return Ok(SessionEnd::Lost("closed before the greeting".into())),
            }
        }
        _ = stop_requested(&mut phase) => {
            tracing::info!("stopped while waiting for the hub's greeting");
            return Ok(SessionEnd::Shutdown);
        }
    };
    if domain.chain_id != node.config.chain_id {
        return Err(Error::Rejected(format!(
            "the hub's domain is on chain {}, this node was told {}",
            domain.chain_id, node.config.chain_id
        )));
    }
    sink.send(Frame::text(node.registration(domain)?.to_json()))
        .await?;
    // The first answer decides whether this session serves at all.
    let registration = async {
        loop {
            let Some(frame) = stream.next().await else {
                return Ok::<_, Error>(None);
            };
            let Frame::Text(text) = frame? else { continue };
            return match serde_json::from_str::<HubMessage>(&text) {
                Ok(HubMessage::Registered {
                    provider,
                    staked,
                    model,
                }) => Ok(Some((provider, staked, model))),
                Ok(HubMessage::Rejected { message }) => Err(Error::Rejected(message)),
                Ok(other) => Err(Error::Protocol(format!(
                    "expected a registration answer, got {other:?}"
                ))),
                Err(e) => Err(Error::Protocol(e.to_string())),
            };
        }
    };
    tokio::select! {
        answer = tokio::time::timeout(REGISTER_TIMEOUT, registration) => {
            match answer.map_err(|_| timed_out("waiting for the registration answer"))?? {
                Some((provider, staked, model)) => tracing::info!(%provider, staked, %model, hub = %node.config.hub, "registered with hub"),
                None => return Ok(SessionEnd::Lost("closed during registration".into())),
            }
        }
        _ = stop_requested(&mut phase) => {
            tracing::info!("stopped while registering with the hub");
            let _ = sink.send(Frame::Close(None)).await;
            return Ok(SessionEnd::Shutdown);
        }
    }
    *backoff = Duration::from_millis(250);
    let (tx, mut rx) = mpsc::unbounded_channel::<NodeMessage>();
    let cancels: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    // Verifications of this session still computing (jobs are counted in `node.active`).
    let verifying = Arc::new(AtomicU32::new(0));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut drain_deadline: Option<Instant> = None;
    let mut next_report = Instant::now();
    loop {
        tokio::select! {
            Some(message) = rx.recv() => sink.send(Frame::text(message.to_json())).await?,
            frame = stream.next() => {
                let frame = match frame {
                    None => return Ok(SessionEnd::Lost("hub closed the connection".into())),
                    Some(frame) => frame?,
                };
                let text = match frame {
                    Frame::Text(text) => text,
                    Frame::Close(_) => return Ok(SessionEnd::Lost("hub closed the connection".into())),
                    _ => continue,
                };
                match serde_json::from_str::<HubMessage>(&text) {
                    Ok(HubMessage::Job { job, request }) => {
                        if node.draining.load(Ordering::Relaxed) || node.refuses_jobs() {
                            let _ = tx.send(NodeMessage::Failed { job, kind: tessera_wire::FailureKind::Unavailable, message: "node is not taking jobs".into(), prompt_hash: None });
                            continue;
                        }
                        let cancel = Arc::new(AtomicBool::new(false));
                        cancels.lock().unwrap_or_else(|p| p.into_inner()).insert(job, cancel.clone());
                        let (node, tx, cancels) = (node.clone(), tx.clone(), cancels.clone());
                        node.active.fetch_add(1, Ordering::Relaxed);
                        tokio::task::spawn_blocking(move || {
                            serve::job(&node, job, request, &tx, &cancel);
                            cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(&job);
                            node.active.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Ok(HubMessage::Cancel { job }) => {
                        if let Some(flag) = cancels.lock().unwrap_or_else(|p| p.into_inner()).get(&job) {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(HubMessage::Score { id, .. }) if drain_deadline.is_some() => {
                        // An inconclusive verdict counts for no one, never as a fail.
                        let _ = tx.send(NodeMessage::Scored { id, verdict: tessera_wire::Verdict::Inconclusive { error: "node is shutting down".into() } });
                    }
                    Ok(HubMessage::Score { id, request, output_tokens, commitment, partial, prompt_tokens, logprobs }) => {
                        let (node, tx, verifying) = (node.clone(), tx.clone(), verifying.clone());
                        let request = serve::ScoreRequest { id, request, output_tokens, commitment, partial, prompt_tokens, logprobs };
                        verifying.fetch_add(1, Ordering::Relaxed);
                        tokio::task::spawn_blocking(move || {
                            let _ = tx.send(serve::score(&node, request));
                            verifying.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Ok(other) => tracing::debug!(?other, "ignored hub message"),
                    Err(e) => tracing::warn!(error = %e, "unreadable hub message"),
                }
            }
            _ = heartbeat.tick() => {
                let active_jobs = node.active.load(Ordering::Relaxed);
                sink.send(Frame::text(NodeMessage::Heartbeat { active_jobs }.to_json())).await?;
                if let Some(deadline) = drain_deadline {
                    let verifications = verifying.load(Ordering::Relaxed);
                    if active_jobs == 0 && verifications == 0 && rx.is_empty() {
                        tracing::info!("drained; closing the hub connection");
                        let _ = sink.send(Frame::Close(None)).await;
                        return Ok(SessionEnd::Shutdown);
                    }
                    if Instant::now() >= next_report {
                        tracing::info!(jobs = active_jobs, verifications, left = ?deadline.saturating_duration_since(Instant::now()), "draining: waiting for the work in flight");
                        next_report = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
            deadline = stop_requested(&mut phase), if drain_deadline.is_none() => {
                tracing::info!(
                    jobs = node.active.load(Ordering::Relaxed),
                    verifications = verifying.load(Ordering::Relaxed),
                    timeout = ?deadline.saturating_duration_since(Instant::now()),
                    "draining before shutdown: finishing the jobs and verifications in flight, then failing what is left"
                );
                node.draining.store(true, Ordering::Relaxed);
                drain_deadline = Some(deadline);
                next_report = Instant::now() + Duration::from_secs(5);
                heartbeat = tokio::time::interval(Duration::from_millis(100));
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                // What the jobs already produced goes out first, then each job still running
                // fails, so the hub settles exactly the tokens the agent received.
                while let Ok(message) = rx.try_recv() {
                    sink.send(Frame::text(message.to_json())).await?;
                }
                let cut: Vec<u64> = {
                    let cancels = cancels.lock().unwrap_or_else(|p| p.into_inner());
                    for flag in cancels.values() {
                        flag.store(true, Ordering::Relaxed);
                    }
                    cancels.keys().copied().collect()
                };
                tracing::warn!(jobs = ?cut, verifications = verifying.load(Ordering::Relaxed), "drain timeout: failing the jobs still running");
                for job in cut {
                    let failed = NodeMessage::Failed { job, kind: tessera_wire::FailureKind::Unavailable, message: "the provider shut down; the job was cut off after its drain timeout".into(), prompt_hash: None };
                    sink.send(Frame::text(failed.to_json())).await?;
                }
                let _ = sink.send(Frame::Close(None)).await;
                return Ok(SessionEnd::Shutdown);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hub_urls_become_websocket_urls() {
        assert_eq!(
            super::ws_url("http://127.0.0.1:8080/"),
            "ws://127.0.0.1:8080/v1/providers/connect"
        );
        assert_eq!(
            super::ws_url("https://hub.example"),
            "wss://hub.example/v1/providers/connect"
        );
        assert_eq!(super::ws_url("hub:1"), "ws://hub:1/v1/providers/connect");
    }
}
