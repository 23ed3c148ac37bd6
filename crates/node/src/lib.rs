//! `tessera-node`: the provider daemon. It loads a model, connects *outward* to a hub over
//! WebSocket (so it can serve from behind NAT), registers with a signed EIP-712
//! `ProviderRegistration`, serves jobs through the engine's continuous-batching service with a
//! commitment per job, answers verification requests with one teacher-forced pass, heartbeats,
//! reconnects with exponential backoff and drains in-flight jobs on SIGTERM/Ctrl-C.
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
use tokio::sync::mpsc;
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
        })
    }
}

/// How a session ended.
enum SessionEnd {
    /// Shut down on a signal after draining.
    Shutdown,
    /// The connection dropped; reconnect.
    Lost(String),
}

/// Runs a provider until `shutdown` resolves (the CLI passes Ctrl-C/SIGTERM): load, connect,
/// serve, reconnect with backoff; on shutdown it drains the jobs in flight (up to 30 s).
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let node = Arc::new(
        tokio::task::spawn_blocking(move || Node::load(config))
            .await
            .map_err(|e| Error::Config(e.to_string()))??,
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.notify_one();
        });
    }
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(&node, &stop, &mut backoff).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Lost(why)) => {
                tracing::warn!(%why, retry_in = ?backoff, "connection to hub lost")
            }
            Err(Error::Rejected(why)) => return Err(Error::Rejected(why)),
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach hub"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.notified() => return Ok(()),
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

async fn session(
    node: &Arc<Node>,
    shutdown: &tokio::sync::Notify,
    backoff: &mut Duration,
) -> Result<SessionEnd> {
    let (ws, _) = tokio_tungstenite::connect_async(ws_url(&node.config.hub)).await?;
    let (mut sink, mut stream) = ws.split();
    // The hub greets with the domain its signatures are bound to; a registration signed for
    // another hub would not be accepted here (nor one signed here elsewhere).
    let domain = loop {
        let Some(frame) = stream.next().await else {
            return Ok(SessionEnd::Lost("closed before the greeting".into()));
        };
        let Frame::Text(text) = frame? else { continue };
        match serde_json::from_str::<HubMessage>(&text) {
            Ok(HubMessage::Hello { domain }) => break domain,
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected the hub's greeting, got {other:?}"
                )))
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
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
    loop {
        let Some(frame) = stream.next().await else {
            return Ok(SessionEnd::Lost("closed during registration".into()));
        };
        let Frame::Text(text) = frame? else { continue };
        match serde_json::from_str::<HubMessage>(&text) {
            Ok(HubMessage::Registered {
                provider,
                staked,
                model,
            }) => {
                tracing::info!(%provider, staked, %model, hub = %node.config.hub, "registered with hub");
                break;
            }
            Ok(HubMessage::Rejected { message }) => return Err(Error::Rejected(message)),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected a registration answer, got {other:?}"
                )))
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
    }
    *backoff = Duration::from_millis(250);
    let (tx, mut rx) = mpsc::unbounded_channel::<NodeMessage>();
    let cancels: Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>> = Arc::default();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut drain_deadline: Option<tokio::time::Instant> = None;
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
                    Ok(HubMessage::Score { id, request, output_tokens, commitment, partial, prompt_tokens }) => {
                        let (node, tx) = (node.clone(), tx.clone());
                        let request = serve::ScoreRequest { id, request, output_tokens, commitment, partial, prompt_tokens };
                        tokio::task::spawn_blocking(move || {
                            let _ = tx.send(serve::score(&node, request));
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
                    if active_jobs == 0 || tokio::time::Instant::now() >= deadline {
                        let _ = sink.send(Frame::Close(None)).await;
                        return Ok(SessionEnd::Shutdown);
                    }
                }
            }
            _ = shutdown.notified(), if drain_deadline.is_none() => {
                tracing::info!(active = node.active.load(Ordering::Relaxed), "draining before shutdown");
                node.draining.store(true, Ordering::Relaxed);
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(30));
                heartbeat = tokio::time::interval(Duration::from_millis(200));
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
