//! The Rust SDK for agents on a Tessera hub, over its public HTTP API only (the same one any
//! OpenAI client uses): an API key registered by an EIP-712 signature of the wallet, chat
//! completions with the hub's `tessera` receipt (provider, job, cost, model, seed, commitment,
//! verification), the balance and the model catalog; the task market (post, claim, deliver,
//! accept, reject, dispute) and spending policies of session keys, each change signed by the
//! wallet.
#![deny(missing_docs)]

mod error;
mod market;
mod types;
mod verification;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_protocol::{Address, ApiKeyRegistration, Domain, Wallet};

pub use error::{Error, Result};
pub use market::{Policy, PolicyLimits, Task, TaskQuery};
pub use tessera_protocol::TaskAction;
pub use types::{Account, ChatMessage, ChatRequest, ChatResponse, ModelInfo, Receipt, Usage};
pub use verification::{JobStatus, ProviderStanding};

/// How long a key that [`Client::new`] registers stays valid.
pub const KEY_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// An HTTP agent that returns error statuses instead of failing on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

fn read_json(mut r: ureq::http::Response<ureq::Body>) -> Result<Value> {
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Decode(format!("{e} in a {status} answer: {text:.200}")))?;
    if status != 200 {
        let e = &v["error"];
        if e["code"] == "policy_violation" {
            return Err(Error::Policy {
                limit: e["param"].as_str().unwrap_or("unknown").to_owned(),
                message: e["message"].as_str().unwrap_or(&text).to_owned(),
            });
        }
        return Err(Error::Api {
            status,
            code: e["code"]
                .as_str()
                .or(e["type"].as_str())
                .unwrap_or("unknown")
                .to_owned(),
            message: e["message"].as_str().unwrap_or(&text).to_owned(),
        });
    }
    Ok(v)
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Decode(e.to_string()))
}

/// The EIP-712 domain a hub's signatures are bound to (`GET /v1/domain`).
pub fn domain(url: &str) -> Result<Domain> {
    let v = read_json(http().get(format!("{url}/v1/domain")).call()?)?;
    let chain = v["chainId"]
        .as_u64()
        .ok_or_else(|| Error::Decode("domain without chainId".into()))?;
    let contract = v["verifyingContract"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Decode("domain without verifyingContract".into()))?;
    Ok(Domain::for_hub(chain, contract))
}

/// Registers `key` as an API key of `wallet`, valid for `valid_for` (`POST /v1/keys`, signed
/// once; the hub stores only the key's sha256).
pub fn register_key(
    url: &str,
    wallet: &Wallet,
    key: &str,
    nonce: u64,
    valid_for: Duration,
) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| Error::Decode(e.to_string()))?
        .as_secs();
    let signed = wallet.sign(
        ApiKeyRegistration {
            keyHash: <[u8; 32]>::from(Sha256::digest(key.as_bytes())).into(),
            validUntil: now + valid_for.as_secs(),
            nonce,
            expiry: now + 600,
        },
        domain(url)?,
    )?;
    read_json(http().post(format!("{url}/v1/keys")).send_json(&signed)?)?;
    Ok(())
}

/// An agent's connection to one hub.
#[derive(Clone)]
pub struct Client {
    url: String,
    key: Option<String>,
    address: Address,
    http: ureq::Agent,
    /// Signs task and policy messages.
    wallet: Option<Wallet>,
    /// The hub's EIP-712 domain, fetched once.
    domain: std::sync::Arc<std::sync::OnceLock<Domain>>,
}

impl Client {
    /// Registers a fresh API key for `wallet` (valid [`KEY_VALIDITY`]) and connects with it.
    pub fn new(hub_url: &str, wallet: &Wallet) -> Result<Self> {
        let url = hub_url.trim_end_matches('/').to_owned();
        let secret: [u8; 24] = rand::random();
        let key = format!("sk-agent-{}", hex::encode(secret));
        register_key(&url, wallet, &key, rand::random(), KEY_VALIDITY)?;
        Ok(Self {
            wallet: Some(wallet.clone()),
            ..Self::with_key(&url, &key, wallet.address())
        })
    }

    /// Connects with an API key already registered for `address` (no wallet: chat and reads
    /// only).
    pub fn with_key(hub_url: &str, key: &str, address: Address) -> Self {
        Self {
            url: hub_url.trim_end_matches('/').to_owned(),
            key: Some(key.to_owned()),
            address,
            http: http(),
            wallet: None,
            domain: Default::default(),
        }
    }

    /// Connects with `wallet` to sign task and policy messages, without registering an API key
    /// (chat needs [`Client::new`] or [`Client::with_key`]).
    pub fn signer(hub_url: &str, wallet: &Wallet) -> Self {
        Self {
            url: hub_url.trim_end_matches('/').to_owned(),
            key: None,
            address: wallet.address(),
            http: http(),
            wallet: Some(wallet.clone()),
            domain: Default::default(),
        }
    }

    /// Adds an API key (to read a private task's input as a party, or to chat).
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.key = key;
        self
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => request.header("Authorization", &format!("Bearer {k}")),
            None => request,
        }
    }

    /// The hub's EIP-712 domain (`GET /v1/domain`, fetched once).
    pub fn domain(&self) -> Result<Domain> {
        if let Some(d) = self.domain.get() {
            return Ok(*d);
        }
        let d = domain(&self.url)?;
        let _ = self.domain.set(d);
        Ok(d)
    }

    /// The hub's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The paying wallet's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// `POST /v1/chat/completions` (non-streaming). A request the hub could not serve is an
    /// [`Error::Api`]; the hub charges nothing for it.
    pub fn chat(&self, request: &ChatRequest) -> Result<ChatResponse> {
        let r = self
            .authorized(self.http.post(format!("{}/v1/chat/completions", self.url)))
            .send_json(request)?;
        ChatResponse::from_json(read_json(r)?)
    }

    /// The wallet's account (`GET /v1/accounts/{address}`).
    pub fn account(&self) -> Result<Account> {
        decode(read_json(
            self.http
                .get(format!("{}/v1/accounts/{:#x}", self.url, self.address))
                .call()?,
        )?)
    }

    /// Any address's account as the hub shows it (balance, holds, stake, history).
    pub fn account_of(&self, address: Address) -> Result<Value> {
        read_json(
            self.http
                .get(format!("{}/v1/accounts/{address:#x}", self.url))
                .call()?,
        )
    }

    /// The wallet's spendable balance in micro-units.
    pub fn balance(&self) -> Result<u64> {
        Ok(self.account()?.balance)
    }

    /// The models live providers serve (`GET /v1/models`).
    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        let v = read_json(self.http.get(format!("{}/v1/models", self.url)).call()?)?;
        v["data"]
            .as_array()
            .ok_or_else(|| Error::Decode("models without data".into()))?
            .iter()
            .map(ModelInfo::from_json)
            .collect()
    }
}
