//! `tessera task`, `tessera key` and `tessera account`: the task market, API keys and balances
//! through a hub's HTTP API, signed with the agent's wallet.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{
    TaskAction, TaskClaim, TaskDecision, TaskDelivery, TaskFeedback, TaskPosting, TypedMessage,
    Wallet, B256,
};

use crate::client::{domain, http, register_key};

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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn sha(bytes: &[u8]) -> B256 {
    <[u8; 32]>::from(Sha256::digest(bytes)).into()
}

fn task_id(id: &str) -> anyhow::Result<B256> {
    id.parse()
        .with_context(|| format!("`{id}` is not a task id"))
}

/// A fresh nonce and a near expiry for a message signed now.
pub fn fresh() -> (u64, u64) {
    (rand::random::<u64>() >> 1, now() + 300)
}

fn sign<T: TypedMessage>(agent: &AgentArgs, message: T) -> anyhow::Result<Value> {
    let wallet = agent.wallet()?;
    Ok(serde_json::to_value(
        wallet.sign(message, domain(&agent.hub)?)?,
    )?)
}

fn call(method: &str, url: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let agent = http();
    let mut response = match (method, body) {
        ("GET", _) => agent.get(url).call()?,
        (_, Some(b)) => agent.post(url).send_json(b)?,
        _ => agent.post(url).send_empty()?,
    };
    let status = response.status();
    let value: Value = response.body_mut().read_json().unwrap_or(Value::Null);
    if status != 200 {
        let message = value["error"]["message"].as_str().unwrap_or("no message");
        bail!("the hub refused ({status}): {message}");
    }
    Ok(value)
}

fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a `tessera task` command.
pub fn run(command: TaskCommand) -> anyhow::Result<()> {
    let decide = |d: &Decision, action: TaskAction| -> anyhow::Result<Value> {
        let (nonce, expiry) = fresh();
        let signed = sign(
            &d.agent,
            TaskDecision {
                taskId: task_id(&d.id)?,
                action: action as u8,
                nonce,
                expiry,
            },
        )?;
        call(
            "POST",
            &format!("{}/v1/tasks/{}/decide", d.agent.hub, d.id),
            Some(&signed),
        )
    };
    let out = match command {
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
            let (nonce, expiry) = fresh();
            let posting = sign(
                &agent,
                TaskPosting {
                    taskHash: sha(text.as_bytes()),
                    reward: bounty,
                    bond,
                    nonce,
                    expiry,
                },
            )?;
            call(
                "POST",
                &format!("{}/v1/tasks", agent.hub),
                Some(&json!({"spec": text, "posting": posting})),
            )?
        }
        TaskCommand::List {
            hub,
            state,
            kind,
            min_bounty,
        } => {
            let mut query = Vec::new();
            if let Some(s) = state {
                query.push(format!("state={s}"));
            }
            if let Some(k) = kind {
                query.push(format!("kind={k}"));
            }
            if let Some(b) = min_bounty {
                query.push(format!("min_bounty={b}"));
            }
            call("GET", &format!("{hub}/v1/tasks?{}", query.join("&")), None)?
        }
        TaskCommand::Show { hub, id, key } => {
            let url = format!("{hub}/v1/tasks/{id}");
            let mut request = http().get(&url);
            if let Some(k) = key {
                request = request.header("authorization", &format!("Bearer {k}"));
            }
            let mut response = request.call()?;
            let value: Value = response.body_mut().read_json()?;
            if response.status() != 200 {
                bail!("the hub refused: {}", value["error"]["message"]);
            }
            value
        }
        TaskCommand::Claim { agent, id } => {
            let task = call("GET", &format!("{}/v1/tasks/{id}", agent.hub), None)?;
            let bond = task["spec"]["worker_bond"]
                .as_u64()
                .context("the task names no worker bond")?;
            let (nonce, expiry) = fresh();
            let signed = sign(
                &agent,
                TaskClaim {
                    taskId: task_id(&id)?,
                    bond,
                    nonce,
                    expiry,
                },
            )?;
            call(
                "POST",
                &format!("{}/v1/tasks/{id}/claim", agent.hub),
                Some(&signed),
            )?
        }
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
            let (nonce, expiry) = fresh();
            let signed = sign(
                &agent,
                TaskDelivery {
                    taskId: task_id(&id)?,
                    deliveryHash: sha(delivery.as_bytes()),
                    nonce,
                    expiry,
                },
            )?;
            call(
                "POST",
                &format!("{}/v1/tasks/{id}/deliver", agent.hub),
                Some(&json!({"delivery": delivery, "signed": signed})),
            )?
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
        } => {
            let (nonce, expiry) = fresh();
            let signed = sign(
                &agent,
                TaskFeedback {
                    taskId: task_id(&id)?,
                    score,
                    tag,
                    nonce,
                    expiry,
                },
            )?;
            call(
                "POST",
                &format!("{}/v1/tasks/{id}/feedback", agent.hub),
                Some(&signed),
            )?
        }
        TaskCommand::Reputation {
            hub,
            address,
            author,
        } => {
            let filter = author.map(|a| format!("?author={a}")).unwrap_or_default();
            call(
                "GET",
                &format!("{hub}/v1/agents/{address}/reputation{filter}"),
                None,
            )?
        }
    };
    print(&out)
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
    let address = match (&args.address, &args.wallet) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => format!(
            "{:#x}",
            Wallet::load_keystore(path, &args.password)?.address()
        ),
        (None, None) => bail!("give an address or --wallet"),
    };
    let account = call("GET", &format!("{}/v1/accounts/{address}", args.hub), None)?;
    print(&account)
}
