//! `tessera demo`: a whole network on this machine. Starts a hub and three provider nodes (one of
//! them cheating with re-quantized weights) as child processes, funds an agent, sends chat
//! requests through the OpenAI-compatible API and shows the cheater being caught and slashed.
//!
//! Ctrl-C or SIGTERM (and any error) stops every child process before the demo exits: none is
//! left behind (issue 17).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tessera_protocol::Wallet;

use crate::client::http;
use crate::local::{self, Children, StopOnDrop, CHILD_STOP_TIMEOUT};

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
    dir: Option<std::path::PathBuf>,
    /// Rows of the synthetic dataset the demo makes (0 skips it).
    #[arg(long, default_value_t = 3)]
    rows: u64,
    /// Leave the network up after the report (until Ctrl-C), with the dashboard and a key.
    #[arg(long)]
    keep: bool,
}

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

fn demo(args: DemoArgs, children: &Children) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    // Declared after `temp`, so the children stop before their directory is removed.
    let _stop = StopOnDrop(children.clone());
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let (url, db) = local::start_hub(
        children,
        &dir,
        &["--verify-probability", &args.verify_probability.to_string()],
    )?;
    println!("hub        {url}   (logs and ledger in {})", dir.display());
    println!("dashboard  {url}/   (live: providers, jobs, verifications, slashes, tasks, runs)");
    let nodes = [
        ("honest-a", 10u64, None),
        ("honest-b", 12, None),
        ("cheater", 6, Some("requantized-q4-0")),
    ];
    let mut wallets = Vec::new();
    for (name, price, cheat) in nodes {
        let wallet = Wallet::random();
        let cheat_args = cheat.map(|c| ["--cheat", c]);
        local::start_node(
            children,
            &dir,
            &url,
            &local::NodeSpec {
                name,
                wallet: &wallet,
                price,
                threads: args.threads,
                extra: cheat_args.as_ref().map_or(&[][..], |a| &a[..]),
            },
        )?;
        println!(
            "node       {name:<9} {:#x}  price {price}/token{}",
            wallet.address(),
            if cheat.is_some() {
                "  (cheats: Q4_0 weights)"
            } else {
                ""
            }
        );
        wallets.push((name, wallet));
    }
    local::wait_providers(&url, 3, Duration::from_secs(120), &dir)?;

    let agent = Wallet::random();
    http()
        .post(format!("{url}/v1/dev/faucet"))
        .send_json(json!({"address": agent.address(), "amount": 1_000_000}))?;
    let key = format!("sk-demo-{}", hex::encode(agent.address()));
    crate::client::register_key(&url, &agent, &key, 1, Duration::from_secs(24 * 3600))?;
    println!(
        "agent      {:#x}  funded 1000000, API key {key}\n",
        agent.address()
    );

    let questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    for i in 0..args.requests {
        let q = questions[i % questions.len()];
        let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens, "temperature": 0});
        let mut r = http()
            .post(format!("{url}/v1/chat/completions"))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(&body)?;
        let v: Value = r.body_mut().read_json()?;
        if r.status() != 200 {
            println!("> {q}\n  error: {}", v["error"]["message"]);
            continue;
        }
        let provider = v["tessera"]["provider"]
            .as_str()
            .unwrap_or("?")
            .to_lowercase();
        let name = wallets
            .iter()
            .find(|(_, w)| format!("{:#x}", w.address()) == provider)
            .map_or("?", |(n, _)| n);
        println!(
            "> {q}\n  {}\n  served by {name}, cost {}, verification {}",
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .trim(),
            v["tessera"]["cost"],
            v["tessera"]["verification"]
        );
        // Let the verdict land, so the next job sees the cheater quarantined.
        wait_verifications(&url, Duration::from_secs(120))?;
    }

    if args.rows > 0 {
        synthesize(&url, &agent, &key, &dir, args.rows, &wallets)?;
    }

    let providers: Value = http()
        .get(format!("{url}/v1/providers"))
        .call()?
        .body_mut()
        .read_json()?;
    println!(
        "\nverification p = {}, slash S = {}, a cheater's expected loss per job p·S = {}",
        providers["verify_probability"],
        providers["slash_amount"],
        providers["cheater_expected_loss_per_job"]
    );
    println!(
        "{:<9} {:>6} {:>5} {:>7} {:>7} {:>9} {:>10} {:>10}",
        "node", "rep", "jobs", "passed", "failed", "slashed", "balance", "stake"
    );
    for (name, wallet) in &wallets {
        let p = providers["providers"]
            .as_array()
            .and_then(|ps| {
                ps.iter().find(|p| {
                    p["address"].as_str().is_some_and(|a| {
                        a.eq_ignore_ascii_case(&format!("{:#x}", wallet.address()))
                    })
                })
            })
            .cloned()
            .unwrap_or_default();
        let a: Value = http()
            .get(format!("{url}/v1/accounts/{:#x}", wallet.address()))
            .call()?
            .body_mut()
            .read_json()?;
        println!(
            "{name:<9} {:>6.2} {:>5} {:>7} {:>7} {:>9} {:>10} {:>10}{}",
            p["reputation"].as_f64().unwrap_or(0.0),
            p["jobs"].to_string(),
            p["verified_passed"].to_string(),
            p["verified_failed"].to_string(),
            p["slashed"].to_string(),
            a["balance"].to_string(),
            a["staked"].to_string(),
            if p["quarantined"] == json!(true) {
                "  QUARANTINED"
            } else {
                ""
            }
        );
    }
    let a: Value = http()
        .get(format!("{url}/v1/accounts/{:#x}", agent.address()))
        .call()?
        .body_mut()
        .read_json()?;
    println!("agent balance {}", a["balance"]);
    let audit = Command::new(std::env::current_exe()?)
        .args(["ledger", "audit", "--url", &db])
        .output()?;
    println!(
        "ledger audit: {}",
        if audit.status.success() {
            "clean"
        } else {
            "FAILED"
        }
    );
    if !audit.status.success() {
        bail!("{}", String::from_utf8_lossy(&audit.stdout));
    }
    if args.keep {
        println!(
            "\nThe network stays up until Ctrl-C.\n  dashboard: {url}/\n  an OpenAI client, ready to paste:\n\n\
             from openai import OpenAI\n\
             client = OpenAI(base_url=\"{url}/v1\", api_key=\"{key}\")\n\
             print(client.chat.completions.create(model=\"smollm2-135m\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)\n"
        );
        loop {
            if children.interrupted() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Makes a small synthetic dataset through the demo's network, paid by the agent.
fn synthesize(
    url: &str,
    agent: &Wallet,
    key: &str,
    dir: &std::path::Path,
    rows: u64,
    nodes: &[(&str, Wallet)],
) -> anyhow::Result<()> {
    let spec_path = dir.join("demo-spec.toml");
    std::fs::write(&spec_path, DEMO_SPEC.replace("ROWS", &rows.to_string()))?;
    let spec = tessera_synth::Spec::load(&spec_path)?;
    let client = tessera_agent::Client::with_key(url, key, agent.address());
    let out = dir.join("dataset");
    println!(
        "\nsynthetic data: {rows} instruction/answer rows (spec {}) ...",
        spec_path.display()
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let report = tessera_synth::run(&spec, &client, &out, &stop, &tessera_synth::Quiet)?;
    tessera_synth::output::write_dataset(&spec, &report, &out)?;
    let manifest = tessera_synth::output::manifest(&spec, &report);
    let name = |address: &str| {
        nodes
            .iter()
            .find(|(_, w)| format!("{:#x}", w.address()).eq_ignore_ascii_case(address))
            .map_or(address.to_owned(), |(n, _)| (*n).to_owned())
    };
    let served: Vec<String> = manifest["providers"]
        .as_object()
        .map(|m| m.iter().map(|(a, n)| format!("{} {n}", name(a))).collect())
        .unwrap_or_default();
    println!(
        "  {} rows in {} (data.jsonl, data.parquet, manifest.json, README.md); rejected {}; spend {}; jobs by {}",
        manifest["rows"],
        out.display(),
        manifest["rejected"],
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
    Ok(())
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
