//! `tessera wallet`: wallets as encrypted JSON keystores (Web3 Secret Storage), and their
//! balance in the ledger.
//!
//! Passwords come from `TESSERA_WALLET_PASSWORD` or a hidden prompt; private keys for import
//! from `TESSERA_PRIVATE_KEY` or a hidden prompt. Neither is ever printed or taken as an
//! argument (arguments end up in shell history and `ps`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tessera_ledger::{Ledger, LedgerConfig};
use tessera_protocol::{Address, Wallet};

/// Env var read for the keystore password.
pub const PASSWORD_ENV: &str = "TESSERA_WALLET_PASSWORD";
/// Env var read for `wallet import`.
pub const PRIVATE_KEY_ENV: &str = "TESSERA_PRIVATE_KEY";

/// Where wallets live and which one to use.
#[derive(clap::Args, Debug, Clone)]
pub struct WalletArgs {
    /// Wallet name: the keystore is `<keystore-dir>/<name>.json`.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Keystore directory (default: ~/.tessera/keystore).
    #[arg(long, env = "TESSERA_KEYSTORE_DIR")]
    pub keystore_dir: Option<PathBuf>,
}

/// `tessera wallet …`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum WalletCommand {
    /// Create a new random key and store it encrypted.
    New(WalletArgs),
    /// Store an existing private key (from TESSERA_PRIVATE_KEY or a hidden prompt) encrypted.
    Import(WalletArgs),
    /// Print the wallet's address.
    Show(WalletArgs),
    /// Print the wallet's balance and stake in the ledger.
    Balance {
        #[command(flatten)]
        wallet: WalletArgs,
        /// Ledger database URL (default: sqlite://~/.tessera/ledger.db).
        #[arg(long, env = "TESSERA_LEDGER_URL")]
        ledger: Option<String>,
    },
}

/// `~/.tessera`, or `./.tessera` without a home directory.
pub fn tessera_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".tessera")
}

/// The default ledger: SQLite in `~/.tessera/ledger.db`.
pub fn default_ledger_url() -> String {
    format!("sqlite://{}", tessera_home().join("ledger.db").display())
}

impl WalletArgs {
    fn dir(&self) -> PathBuf {
        self.keystore_dir
            .clone()
            .unwrap_or_else(|| tessera_home().join("keystore"))
    }
    fn keystore(&self) -> PathBuf {
        self.dir().join(format!("{}.json", self.name))
    }
    /// The address is kept beside the keystore so `show` and `balance` need no password.
    fn address_file(&self) -> PathBuf {
        self.dir().join(format!("{}.address", self.name))
    }
}

/// Runs a wallet subcommand.
pub async fn run(cmd: WalletCommand) -> anyhow::Result<()> {
    match cmd {
        WalletCommand::New(args) => {
            refuse_overwrite(&args)?;
            let password = new_password()?;
            let wallet = Wallet::random();
            save(&args, &wallet, &password)?;
            println!("created wallet {:?}: {}", args.name, wallet.address());
            println!("keystore: {}", args.keystore().display());
        }
        WalletCommand::Import(args) => {
            refuse_overwrite(&args)?;
            let key = match std::env::var(PRIVATE_KEY_ENV) {
                Ok(key) => key,
                Err(_) => rpassword::prompt_password("Private key (hex): ")
                    .context("reading private key")?,
            };
            let wallet = Wallet::from_private_key_hex(&key).context("importing private key")?;
            let password = new_password()?;
            save(&args, &wallet, &password)?;
            println!("imported wallet {:?}: {}", args.name, wallet.address());
        }
        WalletCommand::Show(args) => {
            println!("{}", address(&args)?);
        }
        WalletCommand::Balance { wallet, ledger } => {
            let address = address(&wallet)?;
            let url = ledger.unwrap_or_else(default_ledger_url);
            if let Some(path) = url.strip_prefix("sqlite://") {
                if let Some(parent) = Path::new(path).parent() {
                    std::fs::create_dir_all(parent).ok();
                }
            }
            let ledger = Ledger::open(&url, LedgerConfig::default())
                .await
                .context("opening the ledger")?;
            let balance = match ledger.balance(address).await {
                Ok(balance) => balance,
                Err(tessera_ledger::Error::UnknownAccount(_)) => 0,
                Err(e) => return Err(e.into()),
            };
            let staked = ledger.staked(address).await?;
            println!("address  {address}");
            println!(
                "balance  {} ({} micro-units)",
                format_units(balance),
                balance
            );
            println!("staked   {} ({} micro-units)", format_units(staked), staked);
            ledger.close().await;
        }
    }
    Ok(())
}

/// Micro-units as a decimal amount: 1 unit = 1,000,000 micro-units.
pub fn format_units(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn refuse_overwrite(args: &WalletArgs) -> anyhow::Result<()> {
    if args.keystore().exists() {
        bail!(
            "wallet {:?} already exists at {}",
            args.name,
            args.keystore().display()
        );
    }
    Ok(())
}

fn save(args: &WalletArgs, wallet: &Wallet, password: &str) -> anyhow::Result<()> {
    let path = wallet
        .save_keystore(&args.dir(), &format!("{}.json", args.name), password)
        .context("writing keystore")?;
    std::fs::write(args.address_file(), format!("{}\n", wallet.address()))
        .with_context(|| format!("writing {}", args.address_file().display()))?;
    tracing::debug!(path = %path.display(), "keystore saved");
    Ok(())
}

/// Decrypts a wallet's keystore (password from `TESSERA_WALLET_PASSWORD` or a prompt).
pub fn load(args: &WalletArgs) -> anyhow::Result<Wallet> {
    Wallet::load_keystore(&args.keystore(), &password("Password: ")?)
        .with_context(|| format!("decrypting {} (wrong password?)", args.keystore().display()))
}

fn address(args: &WalletArgs) -> anyhow::Result<Address> {
    if let Ok(text) = std::fs::read_to_string(args.address_file()) {
        return text
            .trim()
            .parse()
            .context("reading the wallet's address file");
    }
    if !args.keystore().exists() {
        bail!(
            "no wallet {:?} in {} (create one with `tessera wallet new`)",
            args.name,
            args.dir().display()
        );
    }
    let wallet = Wallet::load_keystore(&args.keystore(), &password("Password: ")?)
        .context("decrypting keystore (wrong password?)")?;
    Ok(wallet.address())
}

pub fn password(prompt: &str) -> anyhow::Result<String> {
    match std::env::var(PASSWORD_ENV) {
        Ok(password) => Ok(password),
        Err(_) => rpassword::prompt_password(prompt).context("reading password"),
    }
}

/// A password for a new keystore: from the env var, or typed twice.
fn new_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        return Ok(password);
    }
    let first = rpassword::prompt_password("New password: ").context("reading password")?;
    let second = rpassword::prompt_password("Repeat password: ").context("reading password")?;
    if first != second {
        bail!("passwords differ");
    }
    if first.is_empty() {
        bail!("empty password");
    }
    Ok(first)
}
