//! `tessera chain up`, `tessera deposit`, `tessera withdraw`, `tessera stake`, `tessera unstake`:
//! a local chain for development, money into and out of a hub's vault, and provider stake.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::Value;
use tessera_chain::{Anvil, Chain, Contracts, PrivateKeySigner};
use tessera_protocol::{Address, StakeAction, StakeOrder, WithdrawalOrder};

use crate::wallet::WalletArgs;

/// Where the chain is: the flags a hub takes too.
#[derive(clap::Args, Debug, Clone)]
pub struct ChainArgs {
    /// JSON-RPC URL of the chain.
    #[arg(long, env = "TESSERA_HUB_RPC", value_name = "URL")]
    pub rpc: String,
    /// The vault contract.
    #[arg(long, env = "TESSERA_HUB_VAULT")]
    pub vault: Address,
    /// The stablecoin contract.
    #[arg(long, env = "TESSERA_HUB_TOKEN")]
    pub token: Address,
}

impl ChainArgs {
    /// Connects, sending from `signer` if given.
    pub async fn connect(&self, signer: Option<PrivateKeySigner>) -> anyhow::Result<Chain> {
        let contracts = Contracts {
            token: self.token,
            vault: self.vault,
        };
        Chain::connect(&self.rpc, contracts, signer)
            .await
            .with_context(|| format!("connecting to {}", self.rpc))
    }
}

/// `tessera chain …`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ChainCommand {
    /// Start a local anvil chain, deploy the test stablecoin and the vault, write the
    /// operator's key file and a funded dev account's, and print the hub's flags; runs until
    /// Ctrl-C (the chain lives in memory and ends with it).
    Up {
        /// Directory for the operator key file and `chain.env` (default: ~/.tessera/chain).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Chain id (31337 is what Tessera's EIP-712 domain uses by default).
        #[arg(long, default_value_t = tessera_protocol::DEFAULT_CHAIN_ID)]
        chain_id: u64,
    },
}

/// Who signs an on-chain transaction: a key file (anvil's dev keys) or a wallet keystore.
#[derive(clap::Args, Debug, Clone)]
pub struct SignerArgs {
    /// File with the sender's hex private key; without it the wallet keystore signs.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub wallet: WalletArgs,
}

impl SignerArgs {
    fn signer(&self) -> anyhow::Result<PrivateKeySigner> {
        match &self.key_file {
            Some(path) => Ok(tessera_chain::read_key_file(path)?),
            None => Ok(crate::wallet::load(&self.wallet)?.signer().clone()),
        }
    }

    /// The signer as a wallet, for signing Tessera's EIP-712 messages.
    fn wallet(&self) -> anyhow::Result<tessera_protocol::Wallet> {
        let signer = self.signer()?;
        Ok(tessera_protocol::Wallet::from_private_key_hex(
            &hex::encode(signer.to_bytes()),
        )?)
    }
}

/// `tessera deposit`: tokens from the sender into the vault, for an account.
#[derive(clap::Args, Debug, Clone)]
pub struct DepositArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    #[command(flatten)]
    pub signer: SignerArgs,
    /// Micro-units (token units) to deposit.
    #[arg(long)]
    pub amount: u64,
    /// The ledger account to credit (default: the sender).
    #[arg(long)]
    pub account: Option<Address>,
    /// Mint the amount of test tokens to the sender first (the test token only).
    #[arg(long)]
    pub mint: bool,
}

/// `tessera withdraw`: a signed order to the hub, which debits the account and pays on-chain.
#[derive(clap::Args, Debug, Clone)]
pub struct WithdrawArgs {
    /// The hub's URL.
    #[arg(long, env = "TESSERA_HUB_URL", default_value = "http://127.0.0.1:8080")]
    pub hub: String,
    #[command(flatten)]
    pub signer: SignerArgs,
    /// Micro-units to withdraw.
    #[arg(long)]
    pub amount: u64,
    /// The on-chain recipient (default: the signer).
    #[arg(long)]
    pub to: Option<Address>,
    /// The order's nonce (default: random); resending an order with the same nonce pays once.
    #[arg(long)]
    pub nonce: Option<u64>,
}

/// `tessera stake`: a signed order to bond part of the balance as stake.
#[derive(clap::Args, Debug, Clone)]
pub struct StakeArgs {
    /// The hub's URL.
    #[arg(long, env = "TESSERA_HUB_URL", default_value = "http://127.0.0.1:8080")]
    pub hub: String,
    #[command(flatten)]
    pub signer: SignerArgs,
    /// Micro-units to stake.
    #[arg(long)]
    pub amount: u64,
    /// The order's nonce (default: random); resending an order with the same nonce stakes once.
    #[arg(long)]
    pub nonce: Option<u64>,
}

/// `tessera unstake`: start unbonding stake, or withdraw the matured unbondings.
#[derive(clap::Args, Debug, Clone)]
pub struct UnstakeArgs {
    /// The hub's URL.
    #[arg(long, env = "TESSERA_HUB_URL", default_value = "http://127.0.0.1:8080")]
    pub hub: String,
    #[command(flatten)]
    pub signer: SignerArgs,
    /// Micro-units to start unbonding.
    #[arg(
        long,
        required_unless_present = "withdraw",
        conflicts_with = "withdraw"
    )]
    pub amount: Option<u64>,
    /// Return every unbonding whose period has passed to the balance instead.
    #[arg(long)]
    pub withdraw: bool,
    /// The order's nonce (default: random).
    #[arg(long)]
    pub nonce: Option<u64>,
}

/// Runs `tessera chain …`.
pub async fn run(cmd: ChainCommand) -> anyhow::Result<()> {
    match cmd {
        ChainCommand::Up { dir, chain_id } => up(dir, chain_id).await,
    }
}

async fn up(dir: Option<PathBuf>, chain_id: u64) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| crate::wallet::tessera_home().join("chain"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let anvil = Anvil::start_with(&anvil_or_install()?, chain_id, &[])
        .context("starting anvil (scripts/setup-chain.sh installs it)")?;
    let [deployer, operator, funded, ..] = anvil.dev_keys() else {
        bail!("anvil printed fewer than three dev accounts");
    };
    let contracts = tessera_chain::deploy(anvil.rpc_url(), deployer.clone(), operator.address())
        .await
        .context("deploying the contracts")?;
    let key_file = dir.join("operator.key");
    write_secret(
        &key_file,
        &format!("0x{}\n", hex::encode(operator.to_bytes())),
    )?;
    // A funded development account, to pay gas for deposits (`tessera deposit --key-file`).
    let dev_key_file = dir.join("dev.key");
    write_secret(
        &dev_key_file,
        &format!("0x{}\n", hex::encode(funded.to_bytes())),
    )?;
    let flags = format!(
        "--rpc {} --vault {} --token {} --operator-key-file {}",
        anvil.rpc_url(),
        contracts.vault,
        contracts.token,
        key_file.display()
    );
    let env = format!(
        "TESSERA_HUB_RPC={}\nTESSERA_HUB_VAULT={}\nTESSERA_HUB_TOKEN={}\nTESSERA_HUB_OPERATOR_KEY_FILE={}\n",
        anvil.rpc_url(),
        contracts.vault,
        contracts.token,
        key_file.display()
    );
    std::fs::write(dir.join("chain.env"), env)?;
    println!("chain     {} (chain id {chain_id})", anvil.rpc_url());
    println!("token     {}", contracts.token);
    println!("vault     {}", contracts.vault);
    println!(
        "operator  {} (key in {})",
        operator.address(),
        key_file.display()
    );
    println!(
        "dev key   {} ({}, funded with test ether)",
        dev_key_file.display(),
        funded.address()
    );
    println!("hub flags {flags}");
    std::io::Write::flush(&mut std::io::stdout())?;
    crate::signals::stop_signal().await;
    drop(anvil);
    Ok(())
}

/// The anvil binary: `$TESSERA_ANVIL` or `anvil` on the `PATH` when it runs; failing both, the
/// one `scripts/setup-chain.sh` installs from npm into the cache (idempotent), when this binary
/// was built from a checkout that has the script. So `tessera chain up` and `tessera demo` work
/// on a fresh machine without a separate setup step.
pub fn anvil_or_install() -> anyhow::Result<PathBuf> {
    let named = tessera_chain::anvil_binary();
    let runs = std::process::Command::new(&named)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return Ok(named);
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-chain.sh");
    if !script.exists() {
        bail!(
            "no anvil ({}): install it with scripts/setup-chain.sh from a Tessera checkout and \
             export {}",
            named.display(),
            tessera_chain::ANVIL_ENV
        );
    }
    eprintln!(
        "installing anvil with {} (once, into the cache)",
        script.display()
    );
    Ok(tessera_chain::install_dev_tools(&script)
        .with_context(|| format!("no anvil, and {} failed", script.display()))?
        .anvil)
}

/// Writes a file only its owner can read.
pub fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Runs `tessera deposit`.
pub async fn deposit(args: DepositArgs) -> anyhow::Result<()> {
    if args.amount == 0 {
        bail!("--amount must be positive");
    }
    let signer = args.signer.signer()?;
    let sender = signer.address();
    let account = args.account.unwrap_or(sender);
    let chain = args.chain.connect(Some(signer)).await?;
    if args.mint {
        chain
            .mint_test_tokens(sender, args.amount)
            .await
            .context("minting test tokens")?;
    }
    let (tx, block) = chain
        .deposit(account, args.amount)
        .await
        .context("depositing into the vault")?;
    println!(
        "deposited {} micro-units for {account} in block {block} (tx {tx})",
        args.amount
    );
    println!("the hub credits it after its confirmations");
    Ok(())
}

/// Runs `tessera withdraw`.
pub fn withdraw(args: WithdrawArgs) -> anyhow::Result<()> {
    let wallet = args.signer.wallet()?;
    let order = WithdrawalOrder {
        to: args.to.unwrap_or(wallet.address()),
        amount: args.amount,
        nonce: args.nonce.unwrap_or_else(rand_nonce),
        expiry: expiry()?,
    };
    print_answer(&post_order(
        &args.hub,
        "/v1/withdrawals",
        "withdrawal",
        &wallet,
        order,
    )?)
}

/// Runs `tessera stake`.
pub fn stake(args: StakeArgs) -> anyhow::Result<()> {
    stake_order(
        &args.hub,
        &args.signer,
        StakeAction::Stake,
        args.amount,
        args.nonce,
    )
}

/// Runs `tessera unstake`.
pub fn unstake(args: UnstakeArgs) -> anyhow::Result<()> {
    let action = if args.withdraw {
        StakeAction::Withdraw
    } else {
        StakeAction::Unstake
    };
    let amount = args.amount.unwrap_or(0);
    stake_order(&args.hub, &args.signer, action, amount, args.nonce)
}

/// Signs and sends one `StakeOrder`, printing the hub's answer.
fn stake_order(
    hub: &str,
    signer: &SignerArgs,
    action: StakeAction,
    amount: u64,
    nonce: Option<u64>,
) -> anyhow::Result<()> {
    print_answer(&send_stake_order(
        hub,
        &signer.wallet()?,
        action,
        amount,
        nonce.unwrap_or_else(rand_nonce),
    )?)
}

/// Signs a `StakeOrder` with `wallet` for the hub's domain and sends it to `POST /v1/stake`;
/// returns the hub's answer (the stake, and what the vault recorded).
pub fn send_stake_order(
    hub: &str,
    wallet: &tessera_protocol::Wallet,
    action: StakeAction,
    amount: u64,
    nonce: u64,
) -> anyhow::Result<Value> {
    let order = StakeOrder {
        action: action as u8,
        amount,
        nonce,
        expiry: expiry()?,
    };
    post_order(hub, "/v1/stake", "stake order", wallet, order)
}

fn print_answer(answer: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(answer)?);
    Ok(())
}

/// Ten minutes from now: how long a signed order stays valid.
fn expiry() -> anyhow::Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 600)
}

/// Signs `order` for the hub's domain, posts it to `path` and returns the answer.
fn post_order<M: tessera_protocol::TypedMessage + serde::Serialize>(
    hub: &str,
    path: &str,
    what: &str,
    wallet: &tessera_protocol::Wallet,
    order: M,
) -> anyhow::Result<Value> {
    let signed = wallet.sign(order, crate::client::domain(hub)?)?;
    let mut response = crate::client::http()
        .post(format!("{hub}{path}"))
        .send_json(&signed)?;
    let status = response.status();
    let body: Value = response.body_mut().read_json()?;
    if status != 200 {
        bail!(
            "the hub refused the {what} ({status}): {}",
            body["error"]["message"].as_str().unwrap_or("no message")
        );
    }
    Ok(body)
}

fn rand_nonce() -> u64 {
    // Nanoseconds since the epoch: distinct per order from one machine, and no RNG dependency.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}
