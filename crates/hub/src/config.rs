//! `tessera hub` settings: flags, each also readable from a `TESSERA_HUB_*` environment variable
//! and from a TOML file (`--config`, keys named like the flags with underscores). A flag beats
//! the environment, which beats the file, which beats the default.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The hub's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct HubConfig {
    /// A TOML file of settings (`db = "sqlite://hub.db"`, `verify_probability = 0.2`, …).
    #[arg(long, env = "TESSERA_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ledger database: `sqlite://PATH` (created if missing) or `postgres://…`.
    #[arg(
        long,
        env = "TESSERA_HUB_DB",
        default_value = "sqlite://tessera-hub.db"
    )]
    pub db: String,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "TESSERA_HUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Write the bound address (`HOST:PORT`) to this file once listening.
    #[arg(long, env = "TESSERA_HUB_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Base probability p that a job is re-checked by another provider (a provider with
    /// reputation r is checked with p·(2 − r)). The default 0.05 keeps the amortized cost of
    /// checking near 3% of generation (`tessera bench verify`).
    #[arg(long, env = "TESSERA_HUB_VERIFY_PROBABILITY", default_value_t = 0.05)]
    pub verify_probability: f64,
    /// Micro-units slashed from a provider whose job fails verification.
    #[arg(long, env = "TESSERA_HUB_SLASH_AMOUNT", default_value_t = 1_000_000)]
    pub slash_amount: u64,
    /// Stake a provider must hold to register, in micro-units.
    #[arg(long, env = "TESSERA_HUB_MIN_STAKE", default_value_t = 1_000_000)]
    pub min_stake: u64,
    /// Seconds unstaked money waits before it can be withdrawn back to the balance.
    #[arg(long, env = "TESSERA_HUB_UNBONDING_SECS", default_value_t = 7 * 24 * 3600)]
    pub unbonding_secs: u64,
    /// Protocol fee on captured payments, in basis points.
    #[arg(long, env = "TESSERA_HUB_FEE_BPS", default_value_t = 500)]
    pub fee_bps: u32,
    /// Development mode: a faucet endpoint, and providers may ask to be funded and staked.
    #[arg(long, env = "TESSERA_HUB_DEV")]
    pub dev: bool,
    /// Single-hub fast path: reserve a job's maximum cost in the hub's memory instead of a ledger
    /// escrow, and settle each job in one group-committed ledger transaction. Several times the
    /// throughput on SQLite, but only safe with one hub per database (replicas could overspend).
    #[arg(long, env = "TESSERA_HUB_FAST_SETTLE")]
    pub fast_settle: bool,
    /// EIP-712 chain id of accepted signatures.
    #[arg(long, env = "TESSERA_HUB_CHAIN_ID", default_value_t = tessera_protocol::DEFAULT_CHAIN_ID)]
    pub chain_id: u64,
    /// Seconds to wait for a provider's first token before trying another.
    #[arg(long, env = "TESSERA_HUB_FIRST_TOKEN_TIMEOUT", default_value_t = 60)]
    pub first_token_timeout_secs: u64,
    /// Seconds a provider may go silent between tokens once a job has started; then the job is
    /// ended and only what was delivered is paid.
    #[arg(long, env = "TESSERA_HUB_TOKEN_TIMEOUT", default_value_t = 30)]
    pub token_timeout_secs: u64,
    /// Serve a model file the hub has: `NAME=PATH.gguf` (repeatable). The known models found in
    /// the model cache are served under their names without this.
    #[arg(long = "model", value_name = "NAME=PATH.gguf")]
    pub models: Vec<String>,
    /// The models served, resolved from the cache and `--model` by the command line.
    #[arg(skip)]
    pub catalog: crate::catalog::Catalog,
    /// Schedule a provider even when no other provider of its model exists to verify it (a
    /// one-node development network). Its jobs are then never checked.
    #[arg(long, env = "TESSERA_HUB_ALLOW_UNVERIFIED")]
    pub allow_unverified: bool,
    /// Fee a verifier earns per check, in basis points of the checked job's cost (at least one
    /// micro-unit), paid from protocol fees.
    #[arg(long, env = "TESSERA_HUB_VERIFY_FEE_BPS", default_value_t = 4000)]
    pub verify_fee_bps: u32,
    /// Probability that a passed verification is checked again by a second verifier (a lazy
    /// "pass" is then found out; two agreeing passes become a known-answer check).
    #[arg(
        long,
        env = "TESSERA_HUB_CROSS_CHECK_PROBABILITY",
        default_value_t = 0.25
    )]
    pub cross_check_probability: f64,
    /// Probability that a verifier also gets a known-answer check (a canary) with its work; a
    /// wrong answer to one is slashed.
    #[arg(long, env = "TESSERA_HUB_CANARY_PROBABILITY", default_value_t = 0.2)]
    pub canary_probability: f64,
    /// Price of a prompt token, in basis points of the provider's price per generated token.
    #[arg(long, env = "TESSERA_HUB_PROMPT_PRICE_BPS", default_value_t = 2500)]
    pub prompt_price_bps: u32,
    /// Price of a batch-tier job (`service_tier: "flex"`), in basis points of the provider's
    /// price: batch jobs run only on idle capacity, so a provider that registers with this hub
    /// sells its idle time at this share of its price (as it accepts the hub's fee).
    #[arg(long, env = "TESSERA_HUB_BATCH_PRICE_BPS", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_price_bps: u32,
    /// The price ceiling per generated token when a request names no `max_price`.
    #[arg(long, env = "TESSERA_HUB_DEFAULT_MAX_PRICE", default_value_t = 1000)]
    pub default_max_price: u64,
    /// Requests one wallet may have in flight at once.
    #[arg(
        long,
        env = "TESSERA_HUB_MAX_CONCURRENT_PER_AGENT",
        default_value_t = 8
    )]
    pub max_concurrent_per_agent: u32,
    /// Requests one wallet may start per minute.
    #[arg(long, env = "TESSERA_HUB_REQUESTS_PER_MINUTE", default_value_t = 600)]
    pub requests_per_minute: u32,
    /// Most choices (`n`) one request may ask for.
    #[arg(long, env = "TESSERA_HUB_MAX_N", default_value_t = 8)]
    pub max_n: u32,
    /// Largest request body accepted, bytes.
    #[arg(long, env = "TESSERA_HUB_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// The vault contract signatures are bound to (EIP-712 `verifyingContract`); without it the
    /// hub binds them to an address derived from its own identity, kept in its database.
    #[arg(long, env = "TESSERA_HUB_VERIFYING_CONTRACT")]
    pub verifying_contract: Option<tessera_protocol::Address>,
    /// Milliseconds before a verification asks again when no further verifier is available.
    #[arg(
        long,
        env = "TESSERA_HUB_VERIFY_RECHECK_MS",
        default_value_t = 2000,
        hide = true
    )]
    pub verify_recheck_ms: u64,
    /// How far in the future a signed message's expiry may lie, seconds.
    #[arg(long, env = "TESSERA_HUB_MAX_SIGNATURE_VALIDITY", default_value_t = tessera_protocol::DEFAULT_MAX_VALIDITY_SECS)]
    pub max_signature_validity_secs: u64,
    /// Seconds a stopping hub waits for the requests and verifications in flight before it
    /// settles or refunds what is left and exits.
    #[arg(long, env = "TESSERA_HUB_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// The chain holding the vault (deposits, withdrawals); none without `--rpc`.
    #[command(flatten)]
    pub chain: crate::chain::ChainConfig,
}

impl HubConfig {
    /// Refuses settings that would break the books or the economics.
    pub fn validate(&self) -> crate::Result<()> {
        let fail = |m: &str| Err(crate::Error::Config(m.into()));
        for (name, p) in [
            ("--verify-probability", self.verify_probability),
            ("--cross-check-probability", self.cross_check_probability),
            ("--canary-probability", self.canary_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return fail(&format!("{name} must be in [0, 1]"));
            }
        }
        if self.fee_bps > 10_000 {
            return fail("--fee-bps must be at most 10000 (100%)");
        }
        if self.verify_fee_bps > 10_000 {
            return fail("--verify-fee-bps must be at most 10000 (100%)");
        }
        if self.min_stake < self.slash_amount {
            return fail("--min-stake must be at least --slash-amount, or a cheater risks less than the slash");
        }
        if self.max_n == 0 {
            return fail("--max-n must be at least 1");
        }
        if self.max_concurrent_per_agent == 0 || self.requests_per_minute == 0 {
            return fail("per-wallet limits must be at least 1");
        }
        Ok(())
    }

    /// Settings for tests: an in-memory-free SQLite path, port 0, dev mode.
    pub fn dev(db: impl Into<String>) -> Self {
        Self {
            config: None,
            db: db.into(),
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            addr_file: None,
            verify_probability: 0.05,
            slash_amount: 1_000_000,
            min_stake: 1_000_000,
            fee_bps: 500,
            unbonding_secs: 7 * 24 * 3600,
            dev: true,
            fast_settle: false,
            chain_id: tessera_protocol::DEFAULT_CHAIN_ID,
            first_token_timeout_secs: 60,
            token_timeout_secs: 30,
            models: Vec::new(),
            catalog: Default::default(),
            allow_unverified: false,
            verify_fee_bps: 4000,
            cross_check_probability: 0.25,
            canary_probability: 0.2,
            prompt_price_bps: 2500,
            batch_price_bps: 5000,
            default_max_price: 1000,
            max_concurrent_per_agent: 8,
            requests_per_minute: 600,
            max_n: 8,
            max_body_bytes: 1 << 20,
            verifying_contract: None,
            verify_recheck_ms: 2000,
            max_signature_validity_secs: tessera_protocol::DEFAULT_MAX_VALIDITY_SECS,
            drain_timeout_secs: 30,
            chain: Default::default(),
        }
    }
}

/// Reads a TOML settings file into `TESSERA_HUB_*` environment variables that are not already
/// set, so that clap then resolves flag > environment > file > default. Call it before parsing
/// the command line, while the process has one thread (it changes the environment).
pub fn load_config_file(path: &std::path::Path) -> crate::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| crate::Error::Config(format!("{}: {e}", path.display())))?;
    for (key, value) in table {
        let var = format!("TESSERA_HUB_{}", key.to_uppercase().replace('-', "_"));
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(crate::Error::Config(format!(
                    "{key}: unsupported value {other:?}"
                )))
            }
        };
        if std::env::var_os(&var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(())
}
