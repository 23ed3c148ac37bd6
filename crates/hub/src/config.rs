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
    /// Seconds a stopping hub waits for the requests and verifications in flight before it
    /// settles or refunds what is left and exits.
    #[arg(long, env = "TESSERA_HUB_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

impl HubConfig {
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
            dev: true,
            fast_settle: false,
            chain_id: tessera_protocol::DEFAULT_CHAIN_ID,
            first_token_timeout_secs: 60,
            drain_timeout_secs: 30,
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
