//! `tessera synth SPEC.toml --out DIR`: makes a dataset from a spec through a hub (`--hub URL
//! --wallet FILE`), or through a network of its own on this machine (a hub and nodes as child
//! processes, the agent funded from the dev faucet with the spec's budget). The first Ctrl-C
//! or SIGTERM finishes the rows in flight, keeps every finished row and writes the dataset; a
//! second one stops at once (exit status 130); a re-run continues where it stopped.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tessera_agent::Client;
use tessera_protocol::Wallet;
use tessera_synth::{Ending, Observer, Progress, Spec};

use crate::client::http;
use crate::local::{self, Children, StopOnDrop};

/// `tessera synth` options.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// The dataset spec (TOML).
    spec: PathBuf,
    /// The output directory: the row store, data.jsonl, data.parquet, manifest.json, README.md.
    #[arg(long)]
    out: PathBuf,
    /// A hub to use; without one, a network is started on this machine.
    #[arg(long, env = "TESSERA_HUB_URL", requires = "wallet")]
    hub: Option<String>,
    /// The paying wallet's keystore (password from TESSERA_WALLET_PASSWORD or a prompt).
    #[arg(long)]
    wallet: Option<PathBuf>,
    /// Nodes of the local network.
    #[arg(long, default_value_t = 2)]
    local_nodes: usize,
    /// Compute threads per local node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Probability that the local hub verifies a job.
    #[arg(long, default_value_t = 0.1)]
    verify_probability: f64,
}

/// Plain progress lines on stderr (a terminal gets a bar).
struct Lines {
    bar: Option<indicatif::ProgressBar>,
}

impl Lines {
    fn new(rows: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(rows);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} rows  {msg}  eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }
}

impl Observer for Lines {
    fn progress(&self, p: &Progress) {
        let tok_s = p.completion_tokens as f64 / p.elapsed.as_secs_f64().max(1e-3);
        let msg = format!(
            "{} rejected, {} failed, spent {}/{}, {tok_s:.1} tok/s",
            p.rejected, p.failed, p.spent, p.cap
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(p.accepted);
                bar.set_message(msg);
            }
            None => eprintln!(
                "synth: {}/{} rows accepted, {msg}",
                p.accepted, p.rows_wanted
            ),
        }
    }
}

/// First signal: finish the rows in flight and keep them; second: stop at once.
fn graceful_stop(stop: Arc<AtomicBool>, children: Children) -> anyhow::Result<()> {
    crate::signals::on_signals(
        move |name| {
            eprintln!("\n{name}: finishing the rows in flight and keeping every finished row (again to stop at once)");
            stop.store(true, Ordering::SeqCst);
            crate::signals::AfterFirst::Continue
        },
        move |name| {
            eprintln!("\n{name}: stopping at once");
            children.kill();
        },
    )
}

/// Runs `tessera synth`.
pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    // Every mistake in the spec is refused here, before any hub is contacted.
    let spec = Spec::load(&args.spec)?;
    let children = Children::default();
    let stop = Arc::new(AtomicBool::new(false));
    graceful_stop(stop.clone(), children.clone())?;
    let network = tempfile::tempdir()?;
    let _stop_children = StopOnDrop(children.clone());
    let client = match (&args.hub, &args.wallet) {
        (Some(url), Some(file)) => {
            let wallet =
                Wallet::load_keystore(file, &crate::wallet::password("Wallet password: ")?)
                    .with_context(|| format!("decrypting {} (wrong password?)", file.display()))?;
            Client::new(url, &wallet)?
        }
        _ => local_network(
            &LocalNetwork {
                nodes: args.local_nodes,
                threads: args.threads,
                verify_probability: args.verify_probability,
                price: spec.budget.max_price.min(10),
                funds: spec.budget.max_spend,
            },
            &children,
            network.path(),
        )?,
    };
    let observer = Lines::new(spec.rows);
    let report = tessera_synth::run(&spec, &client, &args.out, &stop, &observer)?;
    if let Some(bar) = &observer.bar {
        bar.finish_and_clear();
    }
    tessera_synth::output::write_dataset(&spec, &report, &args.out)?;
    let rows = report.accepted().count();
    println!(
        "{rows} of {} rows in {} (spent {} micro-units, {} this run; rejected {:?}; failed {:?}; {:.1} s)",
        spec.rows,
        args.out.display(),
        report.spent,
        report.spent_this_run,
        report.rejected(),
        report.failed,
        report.elapsed.as_secs_f64()
    );
    match report.ending {
        Ending::Complete => Ok(()),
        Ending::Interrupted => {
            eprintln!("interrupted: run the same command again to continue");
            // `exit` runs no destructors: stop the local network first.
            children.stop(local::CHILD_STOP_TIMEOUT);
            std::process::exit(130)
        }
        Ending::BudgetExhausted => anyhow::bail!("the budget ran out after {rows} rows"),
        Ending::CandidatesExhausted => anyhow::bail!(
            "{} candidates tried and only {rows} rows accepted (raise max_candidates or loosen the filters)",
            spec.max_candidates
        ),
    }
}

/// How a local network is made.
pub struct LocalNetwork {
    /// Provider nodes.
    pub nodes: usize,
    /// Compute threads per node.
    pub threads: usize,
    /// The hub's verification probability.
    pub verify_probability: f64,
    /// Each node's price per generated token.
    pub price: u64,
    /// Micro-units the agent is funded with.
    pub funds: u64,
}

/// Starts a hub and nodes as children, funds a fresh agent from the dev faucet.
pub fn local_network(
    network: &LocalNetwork,
    children: &Children,
    dir: &std::path::Path,
) -> anyhow::Result<Client> {
    let nodes = network.nodes.max(1);
    let mut hub_args = vec![
        "--dev".to_owned(),
        "--verify-probability".to_owned(),
        network.verify_probability.to_string(),
    ];
    if nodes == 1 {
        // No other provider could verify the only one.
        hub_args.push("--allow-unverified".into());
    }
    let hub_args: Vec<&str> = hub_args.iter().map(String::as_str).collect();
    let (url, _db) = local::start_hub(children, dir, &hub_args)?;
    for i in 0..nodes {
        local::start_node(
            children,
            dir,
            &url,
            &local::NodeSpec {
                name: &format!("node-{i}"),
                wallet: &Wallet::random(),
                price: network.price,
                threads: network.threads,
                extra: &["--capacity", "2", "--dev-stake"],
            },
        )?;
    }
    local::wait_providers(&url, nodes as u64, Duration::from_secs(180), dir)?;
    let agent = Wallet::random();
    let r = http()
        .post(format!("{url}/v1/dev/faucet"))
        .send_json(json!({"address": agent.address(), "amount": network.funds}))?;
    anyhow::ensure!(r.status() == 200, "the local faucet refused");
    eprintln!(
        "synth: local network at {url} with {nodes} node(s) (logs in {})",
        dir.display()
    );
    Ok(Client::new(&url, &agent)?)
}
