//! `tessera`: the one command line of the network.

mod bench;
#[cfg(feature = "adversary")]
mod bench_attack;
mod bench_hub;
mod bench_synth;
mod catalog;
mod chain_cmd;
mod client;
mod demo;
mod ledger;
mod local;
mod model_cmd;
mod signals;
mod synth_cmd;
mod task_cmd;
mod verify_cmd;
mod wallet;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_engine::{
    Compute, Engine, GenerateOptions, LoadOptions, Message, Role, SamplingParams,
};

/// Tessera: verifiable inference of small language models on anyone's hardware.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch and list models.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Generate a chat answer locally and stream it to stdout.
    Generate(GenerateArgs),
    /// Wallets: Ethereum keys in encrypted keystores.
    Wallet {
        #[command(subcommand)]
        command: wallet::WalletCommand,
    },
    /// The books.
    Ledger {
        #[command(subcommand)]
        command: ledger::LedgerCommand,
    },
    /// Check a saved job's commitment by one teacher-forced pass; calibrate; write sample jobs.
    Verify(verify_cmd::VerifyArgs),
    /// A whole network on this machine: a hub, two honest nodes and a cheater, an agent's requests, a slash.
    Demo(demo::DemoArgs),
    /// Make a dataset from a spec through a hub (or a network of its own on this machine).
    Synth(synth_cmd::SynthArgs),
    /// Run the hub: OpenAI-compatible API, provider registry, settlement, verification.
    Hub(Box<tessera_hub::HubConfig>),
    /// Run a provider node that connects to a hub and serves a model.
    Node(tessera_node::NodeConfig),
    /// The task market: post, list, show, claim, deliver, accept, reject, dispute, cancel.
    Task {
        #[command(subcommand)]
        command: task_cmd::TaskCommand,
    },
    /// Spending policies: delegate a session key to spend the wallet's balance within limits.
    Policy {
        #[command(subcommand)]
        command: task_cmd::PolicyCommand,
    },
    /// API keys registered by the wallet's signature.
    Key {
        #[command(subcommand)]
        command: task_cmd::KeyCommand,
    },
    /// An account's balance, holds and stake, through the hub's API.
    Account(task_cmd::AccountArgs),
    /// A local development chain (anvil) with the vault and test stablecoin deployed.
    Chain {
        #[command(subcommand)]
        command: chain_cmd::ChainCommand,
    },
    /// Deposit stablecoin into a hub's vault for an account (credited after confirmations).
    Deposit(chain_cmd::DepositArgs),
    /// Withdraw from the ledger to an on-chain address (the hub debits, then its vault pays).
    Withdraw(chain_cmd::WithdrawArgs),
    /// Bond part of the account's balance as provider stake (recorded in the hub's vault).
    Stake(chain_cmd::StakeArgs),
    /// Start unbonding stake, or with --withdraw return every matured unbonding to the balance.
    Unstake(chain_cmd::UnstakeArgs),
    /// Benchmarks; each prints a table, or JSON with --json.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The user message.
    prompt: String,
    /// A known model name or a path to a .gguf file.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k filter.
    #[arg(long)]
    top_k: Option<u32>,
    /// Top-p (nucleus) filter.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop sequence (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs: `cpu` (the native kernels), `cuda[:N]` (an NVIDIA GPU; needs a build
    /// with `--features cuda`) or `candle-cpu` (the GPU code path on the CPU).
    #[arg(long, default_value = "cpu")]
    device: Compute,
    /// Fetch the model if it is a known name and not cached.
    #[arg(long)]
    fetch: bool,
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.fetch && tessera_engine::registry::known(&args.model).is_some() {
        tessera_engine::registry::fetch(&args.model)?;
    }
    let engine = Engine::load_with(
        &args.model,
        &LoadOptions {
            threads: args.threads,
            device: args.device,
            ..Default::default()
        },
    )?;
    let mut messages = Vec::new();
    if let Some(s) = args.system {
        messages.push(Message::new(Role::System, s));
    }
    messages.push(Message::new(Role::User, args.prompt));
    let prompt = engine.chat_prompt(&messages);
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: args.stop,
        ignore_eos: false,
    };
    let mut stdout = std::io::stdout().lock();
    let out = engine.generate(&prompt, &options, |step| {
        let _ = stdout.write_all(step.text.as_bytes());
        let _ = stdout.flush();
        true
    })?;
    writeln!(stdout)?;
    tracing::info!(
        prompt_tokens = out.prompt_tokens.len(),
        tokens = out.tokens.len(),
        finish = ?out.finish_reason,
        tok_per_s = out.tokens.len() as f64 / out.elapsed,
        "done"
    );
    Ok(())
}

/// `tessera hub --config FILE`: the file's settings become environment defaults before clap
/// parses the command line, so flags and the environment still win.
fn hub_config_file() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("hub") {
        return Ok(());
    }
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_owned))
        })
        .or_else(|| std::env::var("TESSERA_HUB_CONFIG").ok());
    match path {
        Some(path) => tessera_hub::load_config_file(std::path::Path::new(&path))
            .context("reading the hub config file"),
        None => Ok(()),
    }
}

/// Runs an async command on a fresh multi-threaded runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model_cmd::run(command),
        Command::Generate(args) => generate(args).context("generate"),
        Command::Verify(args) => verify_cmd::run(args),
        Command::Wallet { command } => block_on(wallet::run(command)),
        Command::Ledger { command } => block_on(ledger::run(command)),
        Command::Bench { command } => bench::run(command),
        Command::Task { command } => task_cmd::run(command),
        Command::Policy { command } => task_cmd::run_policy(command),
        Command::Key { command } => task_cmd::run_key(command),
        Command::Account(args) => task_cmd::run_account(args),
        Command::Chain { command } => block_on(chain_cmd::run(command)),
        Command::Deposit(args) => block_on(chain_cmd::deposit(args)),
        Command::Withdraw(args) => chain_cmd::withdraw(args),
        Command::Stake(args) => chain_cmd::stake(args),
        Command::Unstake(args) => chain_cmd::unstake(args),
        Command::Demo(args) => demo::run(args),
        Command::Synth(args) => synth_cmd::run(args),
        Command::Hub(mut config) => {
            config.catalog = catalog::build(&config.models).context("the hub's model catalog")?;
            signals::run_service(async {
                Ok(tessera_hub::run(*config, signals::stop_signal()).await?)
            })
            .context("hub")
        }
        Command::Node(config) => signals::run_service(async {
            Ok(tessera_node::run(config, signals::stop_signal()).await?)
        })
        .context("node"),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tessera=info,tessera_engine=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = hub_config_file() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
