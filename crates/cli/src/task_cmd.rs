//! `tessera task`, `tessera policy`, `tessera key` and `tessera account`: the task market,
//! spending policies, API keys and balances through the agent SDK ([`tessera_agent`]), signed with
//! the agent's wallet.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tessera_agent::{Client, PolicyLimits, Task, TaskAction, TaskQuery};
use tessera_protocol::{Address, Wallet};

use crate::client::register_key;

/// Where the hub is and who signs.
#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// The hub's base URL.
    #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
    pub hub: String,
    /// Keystore file of the agent's wallet (password from `TESSERA_WALLET_PASSWORD`).
    #[arg(long, env = "TESSERA_WALLET", required_unless_present = "private_key")]
    pub wallet: Option<PathBuf>,
    /// The keystore password.
    #[arg(
        long,
        env = "TESSERA_WALLET_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub password: String,
    /// A raw private key instead of a keystore (development).
    #[arg(long, env = "TESSERA_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: Option<String>,
}

impl AgentArgs {
    fn wallet(&self) -> anyhow::Result<Wallet> {
        Ok(match (&self.private_key, &self.wallet) {
            (Some(key), _) => Wallet::from_private_key_hex(key)?,
            (None, Some(path)) => Wallet::load_keystore(path, &self.password)
                .with_context(|| format!("opening the wallet {}", path.display()))?,
            (None, None) => bail!("give --wallet or --private-key"),
        })
    }
}

/// `tessera task ...`
#[derive(clap::Subcommand)]
pub enum TaskCommand {
    /// Post a task: its spec (JSON file), the bounty held in escrow and the poster's bond.
    Post {
        #[command(flatten)]
        agent: AgentArgs,
        /// The task spec (JSON: kind, title, description, input, private, deadline, worker_bond,
        /// review_secs, acceptance, reference).
        #[arg(long)]
        spec: PathBuf,
        /// Micro-units paid to the worker on acceptance.
        #[arg(long)]
        bounty: u64,
        /// Micro-units the poster bonds (lost to the worker in a dispute the poster loses).
        #[arg(long, default_value_t = 0)]
        bond: u64,
    },
    /// List tasks (open ones by default).
    List {
        /// The hub's base URL.
        #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
        /// Only tasks in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only bounties of at least this much.
        #[arg(long)]
        min_bounty: Option<u64>,
    },
    /// Show one task.
    Show {
        /// The hub's base URL.
        #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
        /// The task id.
        id: String,
        /// An API key of a party (to read a private task's input).
        #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
        key: Option<String>,
    },
    /// Claim a task by posting the bond it asks.
    Claim {
        #[command(flatten)]
        agent: AgentArgs,
        /// The task id.
        id: String,
    },
    /// Deliver the work of a task you claimed.
    Deliver {
        #[command(flatten)]
        agent: AgentArgs,
        /// The task id.
        id: String,
        /// The delivery's text.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        /// A file holding the delivery.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Accept a delivery (the poster): the worker is paid.
    Accept(Decision),
    /// Reject a delivery (the poster): the worker may dispute.
    Reject(Decision),
    /// Dispute a rejection (the worker): the network re-executes the task's reference.
    Dispute(Decision),
    /// Withdraw a task nobody claimed (the poster).
    Cancel(Decision),
    /// Leave feedback on the counterparty of a decided task.
    Feedback {
        #[command(flatten)]
        agent: AgentArgs,
        /// The task id.
        id: String,
        /// 0 to 100.
        #[arg(long)]
        score: u8,
        /// A short tag.
        #[arg(long, default_value = "quality")]
        tag: String,
    },
    /// An agent's reputation: feedback summary and entries.
    Reputation {
        /// The hub's base URL.
        #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
        /// The agent's address.
        address: String,
        /// Only feedback left by this address.
        #[arg(long)]
        author: Option<String>,
    },
}

/// A decision on one task.
#[derive(clap::Args)]
pub struct Decision {
    #[command(flatten)]
    agent: AgentArgs,
    /// The task id.
    id: String,
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn address(text: &str) -> anyhow::Result<Address> {
    text.parse()
        .with_context(|| format!("`{text}` is not an address"))
}

/// A fresh nonce and a near expiry for a message signed now.
pub fn fresh() -> (u64, u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    (rand::random::<u64>() >> 1, now + 300)
}

impl AgentArgs {
    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::signer(&self.hub, &self.wallet()?))
    }
}

/// A client that only reads (no wallet, optionally a party's API key).
fn reader(hub: &str, key: Option<String>) -> Client {
    Client::with_key(hub, "", Address::ZERO).with_api_key(key)
}

/// Runs a `tessera task` command.
pub fn run(command: TaskCommand) -> anyhow::Result<()> {
    let decide = |d: &Decision, action: TaskAction| -> anyhow::Result<Task> {
        Ok(d.agent.client()?.decide(&d.id, action)?)
    };
    let task = match command {
        TaskCommand::Post {
            agent,
            spec,
            bounty,
            bond,
        } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            // The hub checks the spec too; a local parse names the line of a typo.
            let _: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", spec.display()))?;
            agent.client()?.post_task(&text, bounty, bond)?
        }
        TaskCommand::List {
            hub,
            state,
            kind,
            min_bounty,
        } => {
            let query = TaskQuery {
                state,
                kind,
                min_bounty,
                party: None,
            };
            let tasks = reader(&hub, None).tasks(&query)?;
            return print(&json!({"object": "list", "data": tasks}));
        }
        TaskCommand::Show { hub, id, key } => reader(&hub, key).task(&id)?,
        TaskCommand::Claim { agent, id } => agent.client()?.claim(&id)?,
        TaskCommand::Deliver {
            agent,
            id,
            text,
            file,
        } => {
            let delivery = match (text, file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => bail!("give --text or --file"),
            };
            agent.client()?.deliver(&id, &delivery)?
        }
        TaskCommand::Accept(d) => decide(&d, TaskAction::Accept)?,
        TaskCommand::Reject(d) => decide(&d, TaskAction::Reject)?,
        TaskCommand::Dispute(d) => decide(&d, TaskAction::Dispute)?,
        TaskCommand::Cancel(d) => decide(&d, TaskAction::Cancel)?,
        TaskCommand::Feedback {
            agent,
            id,
            score,
            tag,
        } => return print(&agent.client()?.feedback(&id, score, &tag)?),
        TaskCommand::Reputation {
            hub,
            address: agent,
            author,
        } => {
            let author = author.as_deref().map(address).transpose()?;
            return print(&reader(&hub, None).reputation(address(&agent)?, author)?);
        }
    };
    print(&task)
}

/// `tessera policy ...`
#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Delegate a session key to spend this wallet's balance within limits (a later grant to
    /// the same key replaces it). Limits left out are unlimited.
    Grant {
        #[command(flatten)]
        agent: AgentArgs,
        /// The session key's address.
        session: String,
        /// Most micro-units per generated token.
        #[arg(long)]
        max_price: Option<u64>,
        /// Most micro-units one request may hold.
        #[arg(long)]
        per_request: Option<u64>,
        /// Most micro-units per UTC day, cumulatively.
        #[arg(long)]
        per_day: Option<u64>,
        /// Most micro-units over the policy's life (a sponsor's budget).
        #[arg(long)]
        total: Option<u64>,
        /// Allowed models (repeat or comma-separate; none: any).
        #[arg(long, value_delimiter = ',')]
        model: Vec<String>,
        /// Allowed providers (none: any).
        #[arg(long, value_delimiter = ',')]
        provider: Vec<String>,
        /// Allowed task kinds (none: any).
        #[arg(long, value_delimiter = ',')]
        task_kind: Vec<String>,
        /// How long the key may act, in hours.
        #[arg(long, default_value_t = 24)]
        hours: u64,
    },
    /// Show a session key's policy and what it has spent.
    Show {
        /// The hub's base URL.
        #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
        hub: String,
        /// The session key's address.
        session: String,
    },
    /// Revoke a session key this wallet granted.
    Revoke {
        #[command(flatten)]
        agent: AgentArgs,
        /// The session key's address.
        session: String,
    },
}

/// Runs a `tessera policy` command.
pub fn run_policy(command: PolicyCommand) -> anyhow::Result<()> {
    let policy = match command {
        PolicyCommand::Grant {
            agent,
            session,
            max_price,
            per_request,
            per_day,
            total,
            model,
            provider,
            task_kind,
            hours,
        } => {
            let unlimited = u64::MAX;
            let limits = PolicyLimits {
                max_price_per_token: max_price.unwrap_or(unlimited),
                per_request_cap: per_request.unwrap_or(unlimited),
                per_day_cap: per_day.unwrap_or(unlimited),
                total_cap: total.unwrap_or(unlimited),
                models: model,
                providers: provider
                    .iter()
                    .map(|p| address(p))
                    .collect::<anyhow::Result<_>>()?,
                task_kinds: task_kind,
                valid_for_secs: hours * 3600,
            };
            agent.client()?.grant_policy(address(&session)?, &limits)?
        }
        PolicyCommand::Show { hub, session } => reader(&hub, None).policy(address(&session)?)?,
        PolicyCommand::Revoke { agent, session } => {
            agent.client()?.revoke_policy(address(&session)?)?
        }
    };
    print(&policy)
}

/// `tessera key ...`
#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// Make an API key and register it with the hub by the wallet's signature; prints the key.
    Create {
        #[command(flatten)]
        agent: AgentArgs,
        /// How long the key stays valid, in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
}

/// Runs a `tessera key` command.
pub fn run_key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create { agent, days } => {
            let wallet = agent.wallet()?;
            let key = format!("tsk-{}", hex::encode(rand::random::<[u8; 24]>()));
            let (nonce, _) = fresh();
            register_key(
                &agent.hub,
                &wallet,
                &key,
                nonce,
                Duration::from_secs(days * 86_400),
            )?;
            println!("{key}");
            eprintln!("registered for {} (valid {days} days)", wallet.address());
            Ok(())
        }
    }
}

/// `tessera account`: balance, holds and stake of an address through the hub's API.
#[derive(clap::Args)]
pub struct AccountArgs {
    /// The hub's base URL.
    #[arg(long, env = "TESSERA_HUB", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// The address (or give --wallet).
    address: Option<String>,
    /// A keystore whose address to show.
    #[arg(long, env = "TESSERA_WALLET")]
    wallet: Option<PathBuf>,
    /// The keystore password.
    #[arg(
        long,
        env = "TESSERA_WALLET_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
}

/// Runs `tessera account`.
pub fn run_account(args: AccountArgs) -> anyhow::Result<()> {
    let who = match (&args.address, &args.wallet) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => format!(
            "{:#x}",
            Wallet::load_keystore(path, &args.password)?.address()
        ),
        (None, None) => bail!("give an address or --wallet"),
    };
    let account = reader(&args.hub, None).account_of(address(&who)?)?;
    print(&account)
}
