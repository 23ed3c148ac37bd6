//! `tessera demo`: a whole network on this machine, on real parts. Starts a local chain (anvil,
//! through `tessera chain up`) with the vault, a hub attached to it and three provider nodes
//! (one of them cheating with re-quantized weights) as child processes; each provider deposits
//! on-chain and stakes by a signed order, the agent is funded by an on-chain deposit the hub's
//! watcher credits; it sends chat requests through the OpenAI-compatible API and shows the
//! cheater caught, slashed and quarantined; pays one request by x402 (an EIP-3009
//! authorization signed here, settled by the hub); plays a task-market round in which a lazy
//! writer loses its dispute and its bond; makes a small synthetic dataset; and reports the
//! books: the ledger audit and the vault reconciled with the ledger. `--no-chain` leaves the
//! chain out (faucet money and dev stakes, no x402) and says so.
//!
//! Ctrl-C or SIGTERM (and any error) stops every child process before the demo exits: none is
//! left behind (issue 17).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tessera_chain::{x402, Chain};
use tessera_protocol::{Address, StakeAction, Wallet, B256};

use crate::client::http;
use crate::local::{self, Children, LocalChain, StopOnDrop, CHILD_STOP_TIMEOUT};

#[path = "../../../examples/agents/roles.rs"]
mod roles;

/// `tessera demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Chat requests to send.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_tokens: u32,
    /// Probability that a job is verified.
    #[arg(long, default_value_t = 1.0)]
    verify_probability: f64,
    /// Compute threads per node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep the hub's database and logs here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rows of the synthetic dataset the demo makes (0 skips it).
    #[arg(long, default_value_t = 3)]
    rows: u64,
    /// Leave the network up after the report (until Ctrl-C), with the dashboard and a key.
    #[arg(long)]
    keep: bool,
    /// Leave out the chain (no anvil needed): money from the hub's dev faucet, dev stakes, no
    /// x402 request and no reconciliation; the report says so.
    #[arg(long)]
    no_chain: bool,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json_report: Option<PathBuf>,
}

/// What each provider deposits on-chain and stakes: the hub's default minimum stake (which is
/// also its default slash).
const PROVIDER_STAKE: u64 = 1_000_000;
/// What the chatting agent is funded with.
const AGENT_FUNDS: u64 = 1_000_000;
/// What the market's agents are funded with: the curator, the writer and the lazy writer.
const MARKET_FUNDS: [u64; 3] = [100_000, 10_000, 10_000];
/// The provider nodes: name, price per token, and the cheat of the one that cheats.
const NODES: [(&str, u64, Option<&str>); 3] = [
    ("honest-a", 10, None),
    ("honest-b", 12, None),
    ("cheater", 6, Some("requantized-q4-0")),
];
/// The model every demo node serves (a node's default), fetched first when it is not cached.
const MODEL: &str = "smollm2-135m";
/// Blocks on top of a deposit before the hub credits it.
const CONFIRMATIONS: u64 = 1;

/// The demo's dataset: short instruction/answer pairs, two steps per row.
const DEMO_SPEC: &str = r#"
name = "demo-instructions"
description = "Short instructions and their answers, made by the demo's providers."
license = "apache-2.0"
task_categories = ["text-generation"]
model = "smollm2-135m"
rows = ROWS
seed = 11
concurrency = 2
verify_wait_secs = 120

[sampling]
temperature = 0.8
max_tokens = 20

[budget]
max_spend = 200000
max_price = 20

[variables]
topic = ["cooking", "the weather", "music", "the ocean", "trains", "gardens"]

[[steps]]
name = "instruction"
prompt = "Write one short instruction someone might give an assistant about {topic}."

[[steps]]
name = "answer"
prompt = "{instruction}"

[dedup]
near_threshold = 0.8
"#;

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !cfg!(feature = "adversary") {
        bail!("the demo runs a cheating node; build with `--features adversary` (cargo run --release --features adversary -- demo)");
    }
    let children = Children::default();
    children.stop_on_signal()?;
    let result = demo(args, &children);
    if children.interrupted() {
        // Interrupted: the signal thread reports and exits; the error is only its echo.
        children.stop(CHILD_STOP_TIMEOUT);
        std::process::exit(130);
    }
    result
}

/// A heading for each stage with the time since the demo started, so the run's progress is
/// visible.
fn stage(started: Instant, title: &str) {
    println!("\n== {title}   [{:.0} s]", started.elapsed().as_secs_f64());
}

/// A transaction hash's first 10 hex digits, for a line of the report.
fn short_hash(hash: &str) -> String {
    format!("{}…", hash.get(..12).unwrap_or(hash))
}

/// The money side of the demo: the local chain, and a funded development account that mints
/// test tokens and deposits them into the vault.
struct Bank {
    chain: LocalChain,
    dev: Chain,
    runtime: tokio::runtime::Runtime,
}

impl Bank {
    fn open(chain: LocalChain) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let signer = tessera_chain::read_key_file(&chain.dev_key_file)?;
        let dev = runtime.block_on(Chain::connect(&chain.rpc, chain.contracts, Some(signer)))?;
        Ok(Self {
            chain,
            dev,
            runtime,
        })
    }

    /// Mints test tokens to the development account and deposits `amount` into the vault for
    /// each account (the `tessera deposit --mint` path), then mines the confirmations.
    fn deposit(&self, deposits: &[(&str, Address, u64)]) -> anyhow::Result<()> {
        let sender = self.dev.sender().context("the dev account")?;
        let total = deposits.iter().map(|(_, _, a)| a).sum();
        self.runtime
            .block_on(self.dev.mint_test_tokens(sender, total))
            .context("minting test tokens")?;
        for (name, account, amount) in deposits {
            let (tx, block) = self
                .runtime
                .block_on(self.dev.deposit(*account, *amount))
                .context("depositing into the vault")?;
            println!(
                "deposit    {name:<9} {amount:>9} into the vault in block {block} (tx {})",
                short_hash(&format!("{tx:#x}"))
            );
        }
        // Anvil mines only on a transaction: the confirmations are mined here.
        self.runtime.block_on(self.dev.mine(CONFIRMATIONS))?;
        Ok(())
    }

    /// Mints test tokens to `to` (an x402 payer needs tokens, not gas: the hub settles).
    fn mint(&self, to: Address, amount: u64) -> anyhow::Result<()> {
        Ok(self
            .runtime
            .block_on(self.dev.mint_test_tokens(to, amount))?)
    }
}

/// A wallet of the demo with its name.
struct Named {
    name: &'static str,
    wallet: Wallet,
}

fn find_name<'a>(names: &'a [Named], address: &str) -> Option<&'a str> {
    names
        .iter()
        .find(|n| format!("{:#x}", n.wallet.address()).eq_ignore_ascii_case(address))
        .map(|n| n.name)
}

fn get_json(url: &str) -> anyhow::Result<Value> {
    Ok(http().get(url).call()?.body_mut().read_json()?)
}

fn account(url: &str, address: Address) -> anyhow::Result<Value> {
    get_json(&format!("{url}/v1/accounts/{address:#x}"))
}

/// Waits until each account's balance is at least what was deposited for it.
fn wait_credited(url: &str, deposits: &[(&str, Address, u64)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, address, amount) in deposits {
        while account(url, *address)?["balance"].as_u64().unwrap_or(0) < *amount {
            if Instant::now() > deadline {
                bail!("the hub never credited {name}'s deposit of {amount}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn demo(args: DemoArgs, children: &Children) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp = tempfile::tempdir()?;
    // Declared after `temp`, so the children stop before their directory is removed.
    let _stop = StopOnDrop(children.clone());
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;

    stage(started, "the model");
    let model = tessera_engine::registry::fetch(MODEL)
        .with_context(|| format!("fetching {MODEL} for the demo"))?;
    println!("model      {MODEL}  {}", model.display());

    let bank = if args.no_chain {
        println!("chain      left out (--no-chain): money from the dev faucet, no x402, no reconciliation");
        None
    } else {
        stage(
            started,
            "a local chain: anvil with the test stablecoin and the vault",
        );
        let anvil = crate::chain_cmd::anvil_or_install().context(
            "the demo's chain needs anvil: run scripts/setup-chain.sh (or pass --no-chain to leave the chain out)",
        )?;
        let chain = local::start_chain(children, &dir, &anvil)?;
        println!(
            "chain      {}  vault {}  token {}",
            chain.rpc, chain.contracts.vault, chain.contracts.token
        );
        Some(Bank::open(chain)?)
    };

    stage(started, "the hub");
    let hub_args = hub_args(&args, bank.as_ref());
    let hub_args: Vec<&str> = hub_args.iter().map(String::as_str).collect();
    let (url, db) = local::start_hub(children, &dir, &hub_args)?;
    println!("hub        {url}   (logs and ledger in {})", dir.display());
    println!("dashboard  {url}/   (live: providers, jobs, verifications, slashes, tasks, runs)");

    let providers: Vec<Named> = NODES
        .iter()
        .map(|(name, _, _)| Named {
            name,
            wallet: Wallet::random(),
        })
        .collect();
    let agent = Wallet::random();
    let market: Vec<Named> = ["curator", "writer", "lazy"]
        .into_iter()
        .map(|name| Named {
            name,
            wallet: Wallet::random(),
        })
        .collect();
    let mut funding: Vec<(&str, Address, u64)> = providers
        .iter()
        .map(|p| (p.name, p.wallet.address(), PROVIDER_STAKE))
        .collect();
    funding.push(("agent", agent.address(), AGENT_FUNDS));
    for (m, amount) in market.iter().zip(MARKET_FUNDS) {
        funding.push((m.name, m.wallet.address(), amount));
    }
    fund(started, &url, bank.as_ref(), &funding, &providers)?;

    stage(started, "three provider nodes (one cheating)");
    for (node, p) in NODES.iter().zip(&providers) {
        start_node(children, &dir, &url, node, p, args.threads, bank.is_none())?;
    }
    local::wait_providers(&url, 3, Duration::from_secs(120), &dir)?;

    let key = format!("sk-demo-{}", hex::encode(agent.address()));
    crate::client::register_key(&url, &agent, &key, 1, Duration::from_secs(24 * 3600))?;
    println!(
        "agent      {:#x}  funded {AGENT_FUNDS} ({}), API key {key}",
        agent.address(),
        if bank.is_some() {
            "an on-chain deposit"
        } else {
            "the dev faucet"
        }
    );

    stage(started, "chat through the OpenAI API; every job is checked");
    let client = tessera_agent::Client::with_key(&url, &key, agent.address());
    let jobs = chat(&client, &args, &providers)?;

    let paid = match &bank {
        Some(bank) => {
            stage(
                started,
                "one request paid by x402 (EIP-3009 authorization, settled on-chain by the hub)",
            );
            Some(pay_by_x402(&url, bank, &providers)?)
        }
        None => None,
    };

    stage(
        started,
        "a task-market round: a curator hires writers; the lazy one disputes and loses",
    );
    let market_report = market_round(&url, &market)?;

    let dataset = if args.rows > 0 {
        stage(started, "synthetic data through the network");
        Some(synthesize(&client, &dir, args.rows, &providers)?)
    } else {
        None
    };

    stage(started, "the report");
    let reconciled_chain = match &bank {
        Some(_) => Some(wait_reconciled(&url, Duration::from_secs(30))?),
        None => None,
    };
    let mut books = agent_books(&client, &jobs, dataset.as_ref())?;
    books["funding"] = json!(if bank.is_some() { "deposit" } else { "faucet" });
    let mut report = report(
        &url,
        &db,
        bank.as_ref(),
        &providers,
        &NODES.map(|(_, price, cheat)| (price, cheat.is_some())),
        &books,
        reconciled_chain,
    )?;
    report["x402"] = json!(paid);
    report["market"] = market_report;
    report["dataset"] = json!(dataset);
    report["chain_left_out"] = json!(bank.is_none());
    if let Some(path) = &args.json_report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report     {}", path.display());
    }
    if report["audit"]["clean"] != json!(true) {
        bail!("the ledger audit failed: {}", report["audit"]);
    }
    if bank.is_some() && report["chain"]["reconciled"] != json!(true) {
        bail!(
            "the vault does not reconcile with the ledger: {}",
            report["chain"]
        );
    }
    if args.keep {
        keep(&url, &key, bank.as_ref(), &db, children);
    }
    Ok(())
}

/// The hub's flags: attached to the chain when there is one (its deposits credited after
/// [`CONFIRMATIONS`], slashes recorded in the vault every 2 s so the report can reconcile), else
/// a dev hub with the faucet.
fn hub_args(args: &DemoArgs, bank: Option<&Bank>) -> Vec<String> {
    let mut hub_args = vec![
        "--verify-probability".to_owned(),
        args.verify_probability.to_string(),
    ];
    match bank {
        Some(bank) => {
            hub_args.extend(bank.chain.hub_flags());
            hub_args.extend(
                [
                    "--confirmations",
                    &CONFIRMATIONS.to_string(),
                    "--chain-poll-ms",
                    "200",
                    "--slash-epoch-secs",
                    "2",
                ]
                .map(String::from),
            );
        }
        None => hub_args.push("--dev".into()),
    }
    hub_args
}

/// Funds every account: on-chain deposits the hub credits, and each provider's stake by a
/// signed `StakeOrder` (recorded in the vault); without a chain, the dev faucet for the agents
/// (the providers are staked by it when they register, `--dev-stake`).
fn fund(
    started: Instant,
    url: &str,
    bank: Option<&Bank>,
    funding: &[(&str, Address, u64)],
    providers: &[Named],
) -> anyhow::Result<()> {
    let Some(bank) = bank else {
        for (name, address, amount) in funding.iter().skip(providers.len()) {
            let r = http()
                .post(format!("{url}/v1/dev/faucet"))
                .send_json(json!({"address": address, "amount": amount}))?;
            anyhow::ensure!(r.status() == 200, "the dev faucet refused to fund {name}");
        }
        return Ok(());
    };
    stage(
        started,
        "money on-chain: deposits into the vault, credited by the hub's chain watcher",
    );
    bank.deposit(funding)?;
    wait_credited(url, funding)?;
    println!(
        "credited   all {} deposits after {CONFIRMATIONS} confirmation(s)",
        funding.len()
    );
    for p in providers {
        let answer = crate::chain_cmd::send_stake_order(
            url,
            &p.wallet,
            StakeAction::Stake,
            PROVIDER_STAKE,
            1,
        )?;
        println!(
            "stake      {:<9} {} by a signed StakeOrder; the vault records {}",
            p.name, answer["staked"], answer["on_chain"]["staked"]
        );
    }
    Ok(())
}

/// Starts one provider node of [`NODES`] with its wallet.
fn start_node(
    children: &Children,
    dir: &Path,
    url: &str,
    (name, price, cheat): &(&str, u64, Option<&str>),
    provider: &Named,
    threads: usize,
    dev_stake: bool,
) -> anyhow::Result<()> {
    let mut extra: Vec<&str> = Vec::new();
    if let Some(c) = cheat {
        extra.extend(["--cheat", c]);
    }
    if dev_stake {
        extra.push("--dev-stake");
    }
    local::start_node(
        children,
        dir,
        url,
        &local::NodeSpec {
            name,
            wallet: &provider.wallet,
            price: *price,
            threads,
            extra: &extra,
        },
    )?;
    println!(
        "node       {name:<9} {:#x}  price {price}/token{}",
        provider.wallet.address(),
        if cheat.is_some() {
            "  (cheats: Q4_0 weights)"
        } else {
            ""
        }
    );
    Ok(())
}

/// The agent's chat requests, each followed by its verification, so the next request sees the
/// cheater quarantined once it is caught. Returns each answered job's id and cost.
fn chat(
    client: &tessera_agent::Client,
    args: &DemoArgs,
    providers: &[Named],
) -> anyhow::Result<Vec<(String, u64)>> {
    let questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    let mut jobs = Vec::new();
    for i in 0..args.requests {
        let q = questions[i % questions.len()];
        let request = tessera_agent::ChatRequest {
            model: MODEL.into(),
            messages: vec![tessera_agent::ChatMessage::new("user", q)],
            max_tokens: Some(args.max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        };
        let answer = match client.chat(&request) {
            Ok(a) => a,
            Err(e) => {
                println!("> {q}\n  error: {e}");
                continue;
            }
        };
        let r = &answer.receipt;
        println!(
            "> {q}\n  {}\n  served by {}, cost {}, verification {}",
            answer.text.trim(),
            find_name(providers, &r.provider).unwrap_or("?"),
            r.cost,
            r.verification
        );
        jobs.push((r.job_id.clone(), r.cost));
        wait_verifications(client.url(), Duration::from_secs(120))?;
    }
    Ok(jobs)
}

/// The agent's money: what its chat jobs and dataset cost, net of refunds of the jobs found
/// dishonest, and what the cheater's slash paid it; these account for its balance exactly.
fn agent_books(
    client: &tessera_agent::Client,
    jobs: &[(String, u64)],
    dataset: Option<&Value>,
) -> anyhow::Result<Value> {
    let (mut spent, mut compensation, mut refunded) = (0, 0, 0);
    for (id, cost) in jobs {
        match client.job(id)? {
            Some(status) if status.refunded => {
                refunded += cost;
                compensation += status.compensation;
            }
            Some(status) => {
                spent += cost;
                compensation += status.compensation;
            }
            None => spent += cost,
        }
    }
    if let Some(d) = dataset {
        spent += d["spend"].as_u64().unwrap_or(0);
        compensation += d["compensation"].as_u64().unwrap_or(0);
    }
    let balance = client.balance()?;
    let expected = (AGENT_FUNDS + compensation).checked_sub(spent);
    Ok(
        json!({"address": client.address(), "funded": AGENT_FUNDS, "spent": spent,
              "refunded": refunded, "compensation": compensation, "balance": balance,
              "adds_up": expected == Some(balance)}),
    )
}

fn now_secs() -> anyhow::Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

/// One chat completion paid by x402 with no API key: the hub answers 402 with its payment
/// requirements, the payer signs an EIP-3009 `transferWithAuthorization` of the vault's token
/// for the amount (`tessera_chain::x402::sign_payment`), and the retry carries it in
/// `PAYMENT-SIGNATURE`; the hub settles it on-chain, credits the payer and serves the request.
fn pay_by_x402(url: &str, bank: &Bank, providers: &[Named]) -> anyhow::Result<Value> {
    let payer = Wallet::random();
    let minted = 100_000;
    bank.mint(payer.address(), minted)?;
    println!(
        "payer      {:#x}  holds {minted} test tokens, no account at the hub",
        payer.address()
    );
    let body = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "max_price": 20,
                      "messages": [{"role": "user", "content": "What is the capital of Italy?"}]});
    let chat_url = format!("{url}/v1/chat/completions");
    let mut r = http().post(&chat_url).send_json(&body)?;
    if r.status() != 402 {
        bail!("an unpaid request got {} instead of 402", r.status());
    }
    let required: x402::PaymentRequired = r.body_mut().read_json()?;
    let requirements = required
        .accepts
        .first()
        .context("the 402 offered no way to pay")?;
    let amount: u64 = requirements.amount.parse()?;
    println!(
        "402        pay {amount} of {} to the vault on {} ({})",
        requirements.asset, requirements.network, requirements.scheme
    );
    let payment = x402::sign_payment(
        payer.signer(),
        requirements,
        amount,
        now_secs()? + 300,
        B256::from(rand::random::<[u8; 32]>()),
    )?;
    let mut r = http()
        .post(&chat_url)
        .header(
            x402::PAYMENT_SIGNATURE_HEADER,
            &x402::encode_header(&payment),
        )
        .send_json(&body)?;
    let settlement: Option<x402::SettlementResponse> = r
        .headers()
        .get(x402::PAYMENT_RESPONSE_HEADER)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            use base64::Engine;
            let json = base64::engine::general_purpose::STANDARD.decode(h).ok()?;
            serde_json::from_slice(&json).ok()
        });
    let status = r.status();
    let v: Value = r.body_mut().read_json()?;
    let settlement = match settlement {
        Some(s) if status == 200 && s.success => s,
        _ => bail!("the paid request was not served ({status}): {v}"),
    };
    let cost = v["tessera"]["cost"].as_u64().unwrap_or(0);
    // The job's hold stays open until its verification; then the unused rest is the payer's.
    wait_verifications(url, Duration::from_secs(120))?;
    let balance = account(url, payer.address())?["balance"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "> What is the capital of Italy?\n  {}\n  served by {}, cost {cost}; paid {amount} on-chain (tx {}), {balance} left on the payer's account",
        v["choices"][0]["message"]["content"].as_str().unwrap_or("").trim(),
        find_name(providers, v["tessera"]["provider"].as_str().unwrap_or("?")).unwrap_or("?"),
        short_hash(&settlement.transaction),
    );
    Ok(json!({
        "payer": payer.address(),
        "paid": amount,
        "cost": cost,
        "transaction": settlement.transaction,
        "network": settlement.network,
        "settled": settlement.success,
        "payer_balance": balance,
        "status": status.as_u16(),
    }))
}

/// The example agents' round (`examples/agents/roles.rs`): the curator posts two rows with a
/// reference inference, the writer does one, the lazy writer delivers junk, the curator checks
/// both by re-running the reference, the lazy writer disputes and the network re-executes it.
fn market_round(url: &str, market: &[Named]) -> anyhow::Result<Value> {
    let [curator, writer, lazy] = market else {
        bail!("the market needs a curator, a writer and a lazy writer");
    };
    let balance = |w: &Wallet| -> anyhow::Result<u64> {
        Ok(account(url, w.address())?["balance"].as_u64().unwrap_or(0))
    };
    let before: Vec<u64> = market
        .iter()
        .map(|m| balance(&m.wallet))
        .collect::<anyhow::Result<_>>()?;
    let round = roles::run_market(url, &curator.wallet, &writer.wallet, &lazy.wallet, |line| {
        println!("  {line}")
    })
    .map_err(|e| anyhow::anyhow!("the market round: {e}"))?;
    wait_verifications(url, Duration::from_secs(120))?;
    let after: Vec<u64> = market
        .iter()
        .map(|m| balance(&m.wallet))
        .collect::<anyhow::Result<_>>()?;
    for ((m, b), a) in market.iter().zip(&before).zip(&after) {
        println!("  {:<12} balance {b} -> {a}", m.name);
    }
    let lazy_lost = before[2].saturating_sub(after[2]);
    let bond_lost = round.bad.1 == "poster_won" && lazy_lost >= roles::WORKER_BOND;
    println!(
        "  the lazy writer lost the dispute and {lazy_lost} (its bond {} and the re-execution): {}",
        roles::WORKER_BOND,
        if bond_lost { "bond gone" } else { "BOND KEPT" }
    );
    Ok(json!({
        "good": {"task": round.good.0, "state": round.good.1},
        "bad": {"task": round.bad.0, "state": round.bad.1},
        "rows_kept": round.dataset.len(),
        "bounty": roles::BOUNTY,
        "worker_bond": roles::WORKER_BOND,
        "balances": market.iter().zip(before.iter().zip(&after)).map(|(m, (b, a))| {
            json!({"name": m.name, "address": m.wallet.address(), "before": b, "after": a})
        }).collect::<Vec<_>>(),
        "lazy_lost": lazy_lost,
        "bond_lost": bond_lost,
    }))
}

/// Waits until the vault reconciles with the ledger (`GET /v1/chain`): a slash shows on-chain
/// from the hub's next slash epoch. Returns the last answer, reconciled or not.
fn wait_reconciled(url: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = get_json(&format!("{url}/v1/chain"))?;
        if v["reconciled"] == json!(true) || Instant::now() > deadline {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Prints the report's providers, the network's totals and the books; returns them as JSON.
fn report(
    url: &str,
    db: &str,
    bank: Option<&Bank>,
    providers: &[Named],
    nodes: &[(u64, bool)],
    agent: &Value,
    chain_status: Option<Value>,
) -> anyhow::Result<Value> {
    let standing = get_json(&format!("{url}/v1/providers"))?;
    let totals = get_json(&format!("{url}/v1/dashboard"))?["totals"].clone();
    println!(
        "verification p = {}, slash S = {}, a cheater's expected loss per job p·S = {}",
        standing["verify_probability"],
        standing["slash_amount"],
        standing["cheater_expected_loss_per_job"]
    );
    println!(
        "{:<9} {:>6} {:>5} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10}",
        "node", "rep", "jobs", "passed", "failed", "slashed", "earned", "balance", "stake"
    );
    let mut rows = Vec::new();
    for (p, (price, cheats)) in providers.iter().zip(nodes) {
        let address = format!("{:#x}", p.wallet.address());
        let s = standing["providers"]
            .as_array()
            .and_then(|ps| {
                ps.iter().find(|s| {
                    s["address"]
                        .as_str()
                        .is_some_and(|a| a.eq_ignore_ascii_case(&address))
                })
            })
            .cloned()
            .unwrap_or_default();
        let a = account(url, p.wallet.address())?;
        let earned = s["revenue"].as_u64().unwrap_or(0) + s["verify_fees"].as_u64().unwrap_or(0);
        let quarantined = s["quarantined"] == json!(true);
        println!(
            "{:<9} {:>6.2} {:>5} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10}{}",
            p.name,
            s["reputation"].as_f64().unwrap_or(0.0),
            s["jobs"].to_string(),
            s["verified_passed"].to_string(),
            s["verified_failed"].to_string(),
            s["slashed"].to_string(),
            earned,
            a["balance"].to_string(),
            a["staked"].to_string(),
            if quarantined { "  QUARANTINED" } else { "" }
        );
        rows.push(json!({
            "name": p.name, "address": address, "price": price, "cheats": cheats,
            "reputation": s["reputation"], "jobs": s["jobs"], "tokens": s["tokens"],
            "verified_passed": s["verified_passed"], "verified_failed": s["verified_failed"],
            "verifications_done": s["verifications_done"], "revenue": s["revenue"],
            "verify_fees": s["verify_fees"], "earned": earned, "slashed": s["slashed"],
            "quarantined": quarantined, "balance": a["balance"], "staked": a["staked"],
        }));
    }
    println!("(earned: job revenue and verification fees; a balance also holds a verifier's share of a slash)");
    println!(
        "network    {} jobs, {} tokens generated, spend {}, verifications {} passed / {} failed, slashed {}",
        totals["jobs"],
        totals["tokens"],
        totals["spend"],
        totals["verifications_passed"],
        totals["verifications_failed"],
        totals["slashed"]
    );
    println!(
        "agent      balance {} = funded {} ({}) - spent {} + {} from the cheater's slash ({} refunded){}",
        agent["balance"],
        agent["funded"],
        agent["funding"].as_str().unwrap_or("?"),
        agent["spent"],
        agent["compensation"],
        agent["refunded"],
        if agent["adds_up"] == json!(true) {
            ""
        } else {
            "  DOES NOT ADD UP"
        }
    );
    let audit = audit(db, bank)?;
    println!(
        "ledger audit: {}",
        if audit["clean"] == json!(true) {
            "clean"
        } else {
            "FAILED"
        }
    );
    let chain = match (bank, &audit["chain"]) {
        (Some(bank), reconciliation) => {
            let reconciled = reconciliation["reconciled"] == json!(true);
            println!(
                "chain reconciliation: {} (the vault holds {}, the ledger owes {}; stake on-chain {} staked, in the ledger {})",
                if reconciled { "clean" } else { "MISMATCH" },
                reconciliation["vault_holdings"],
                reconciliation["ledger_liabilities"],
                reconciliation["vault_stake"]["staked"],
                reconciliation["ledger_staked"]
            );
            json!({
                "rpc": bank.chain.rpc, "vault": bank.chain.contracts.vault,
                "token": bank.chain.contracts.token, "reconciled": reconciled,
                "vault_holdings": reconciliation["vault_holdings"],
                "ledger_liabilities": reconciliation["ledger_liabilities"],
                "vault_stake": reconciliation["vault_stake"],
                "ledger_staked": reconciliation["ledger_staked"],
                "ledger_unbonding": reconciliation["ledger_unbonding"],
                "hub": chain_status,
            })
        }
        (None, _) => {
            println!("chain reconciliation: left out (--no-chain)");
            Value::Null
        }
    };
    Ok(json!({
        "dashboard": format!("{url}/"),
        "hub": url,
        "providers": rows,
        "agent": agent,
        "totals": totals,
        "audit": audit,
        "chain": chain,
    }))
}

/// `tessera ledger audit --json` on the hub's database, with the chain when there is one (the
/// vault's holdings and stake records against the ledger).
fn audit(db: &str, bank: Option<&Bank>) -> anyhow::Result<Value> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["ledger", "audit", "--json", "--url", db]);
    if let Some(bank) = bank {
        command.args(&bank.chain.hub_flags()[..6]);
    }
    let out = command.output()?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the ledger audit printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Leaves the network up until Ctrl-C, printing how to use it.
fn keep(url: &str, key: &str, bank: Option<&Bank>, db: &str, children: &Children) {
    println!(
        "\nThe network stays up until Ctrl-C.\n  dashboard: {url}/\n  the agent's API key: {key}\n\n\
         An OpenAI client, ready to paste (pip install openai):\n\n\
         from openai import OpenAI\n\
         client = OpenAI(base_url=\"{url}/v1\", api_key=\"{key}\")\n\
         answer = client.chat.completions.create(model=\"smollm2-135m\", max_tokens=32, messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n\
         print(answer.choices[0].message.content, answer.model_extra[\"tessera\"])\n\n\
         Or with curl:\n\n\
         curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n  \
         -d '{{\"model\": \"smollm2-135m\", \"max_tokens\": 32, \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
    );
    match bank {
        Some(bank) => println!(
            "The books, with the vault reconciled:\n\n  tessera ledger audit --url {db} {}\n",
            bank.chain.hub_flags()[..6].join(" ")
        ),
        None => println!("The books:\n\n  tessera ledger audit --url {db}\n"),
    }
    loop {
        if children.interrupted() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes a small synthetic dataset through the demo's network, paid by the agent.
fn synthesize(
    client: &tessera_agent::Client,
    dir: &Path,
    rows: u64,
    nodes: &[Named],
) -> anyhow::Result<Value> {
    let spec_path = dir.join("demo-spec.toml");
    std::fs::write(&spec_path, DEMO_SPEC.replace("ROWS", &rows.to_string()))?;
    let spec = tessera_synth::Spec::load(&spec_path)?;
    let out = dir.join("dataset");
    println!(
        "synthetic data: {rows} instruction/answer rows (spec {}) ...",
        spec_path.display()
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let report = tessera_synth::run(&spec, client, &out, &stop, &tessera_synth::Quiet)?;
    tessera_synth::output::write_dataset(&spec, &report, &out)?;
    let manifest = tessera_synth::output::manifest(&spec, &report);
    let name = |address: &str| find_name(nodes, address).unwrap_or(address).to_owned();
    let served: Vec<String> = manifest["providers"]
        .as_object()
        .map(|m| m.iter().map(|(a, n)| format!("{} {n}", name(a))).collect())
        .unwrap_or_default();
    println!(
        "  {} rows in {} (data.jsonl, data.parquet, manifest.json, README.md); rejected {}; spend {}; jobs by {}",
        manifest["rows"],
        out.display(),
        manifest["rejected"]
            .as_object()
            .map_or(0, |r| r.values().filter_map(Value::as_u64).sum::<u64>()),
        manifest["spend"],
        served.join(", ")
    );
    for row in report.accepted().take(2) {
        let answer = row.text().replace('\n', " ");
        println!(
            "  e.g. {} -> {:.70}",
            row.steps[0].text.replace('\n', " ").trim(),
            answer.trim()
        );
    }
    Ok(
        json!({"dir": out, "rows": manifest["rows"], "rejected": manifest["rejected"],
              "spend": manifest["spend"], "compensation": manifest["compensation"],
              "providers": manifest["providers"],
              "parquet": out.join("data.parquet").exists()}),
    )
}

/// Waits until no verification is pending (every escrow is closed).
fn wait_verifications(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = http()
            .get(format!("{url}/metrics"))
            .call()?
            .body_mut()
            .read_to_string()?;
        let escrow = metrics
            .lines()
            .find_map(|l| l.strip_prefix("tessera_balance_escrow_micro "))
            .context("escrow gauge")?;
        if escrow.trim() == "0" || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
