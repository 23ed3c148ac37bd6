//! `tessera ledger audit` and `tessera bench ledger`.

use anyhow::{bail, Context};
use tessera_ledger::{bench_settlements, AuditReport, BenchReport, Ledger, LedgerConfig};

/// `tessera ledger …`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum LedgerCommand {
    /// Prove the books: every transaction sums to zero, balances equal the journal, nothing is
    /// negative, supply equals minted minus burned. Exits non-zero if any check fails.
    Audit {
        /// Ledger database URL (default: sqlite://~/.tessera/ledger.db).
        #[arg(long, env = "TESSERA_LEDGER_URL")]
        url: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// With a chain: also prove that the vault holds exactly what the ledger owes it
        /// (deposits credited minus withdrawals debited) and that its stake records equal the
        /// ledger's stake and unbonding. Needs `--vault` and `--token`.
        #[arg(long, value_name = "URL", requires_all = ["vault", "token"])]
        rpc: Option<String>,
        /// The vault contract (with `--rpc`).
        #[arg(long, requires = "rpc")]
        vault: Option<tessera_protocol::Address>,
        /// The stablecoin contract (with `--rpc`).
        #[arg(long, requires = "rpc")]
        token: Option<tessera_protocol::Address>,
    },
}

/// The on-chain side of the audit.
#[derive(Debug, serde::Serialize)]
struct Reconciliation {
    vault_holdings: u64,
    ledger_liabilities: i64,
    /// The vault's record of bonded and unbonding stake, all providers together.
    vault_stake: tessera_chain::OnChainStake,
    /// The ledger's stake and unbonding accounts.
    ledger_staked: u64,
    ledger_unbonding: u64,
}

impl Reconciliation {
    fn holdings_match(&self) -> bool {
        i128::from(self.vault_holdings) == i128::from(self.ledger_liabilities)
    }

    fn stake_matches(&self) -> bool {
        (self.vault_stake.staked, self.vault_stake.unbonding)
            == (self.ledger_staked, self.ledger_unbonding)
    }

    fn is_clean(&self) -> bool {
        self.holdings_match() && self.stake_matches()
    }
}

/// Runs a ledger subcommand.
pub async fn run(cmd: LedgerCommand) -> anyhow::Result<()> {
    match cmd {
        LedgerCommand::Audit {
            url,
            json,
            rpc,
            vault,
            token,
        } => {
            let chain = match (rpc, vault, token) {
                (Some(rpc), Some(vault), Some(token)) => {
                    Some(crate::chain_cmd::ChainArgs { rpc, vault, token })
                }
                _ => None,
            };
            let url = url.unwrap_or_else(crate::wallet::default_ledger_url);
            let ledger = Ledger::open(&url, LedgerConfig::default())
                .await
                .context("opening the ledger")?;
            let report = ledger.audit().await.context("auditing")?;
            let reconciliation = match chain {
                Some(chain) => {
                    let chain = chain.connect(None).await?;
                    // Read the chain first: a deposit the hub credits in between then shows as a
                    // surplus of the vault, never as a shortfall.
                    let vault_holdings =
                        chain.vault_holdings().await.context("reading the vault")?;
                    let vault_stake = chain.total_stake().await.context("reading the vault")?;
                    let ledger_liabilities = ledger.chain_liabilities().await?;
                    let (ledger_staked, ledger_unbonding) = ledger.stake_totals().await?;
                    Some(Reconciliation {
                        vault_holdings,
                        ledger_liabilities,
                        vault_stake,
                        ledger_staked,
                        ledger_unbonding,
                    })
                }
                None => None,
            };
            ledger.close().await;
            if json {
                let mut value = serde_json::to_value(&report)?;
                value["clean"] = report.is_clean().into();
                value["chain"] = serde_json::to_value(&reconciliation)?;
                if let Some(r) = &reconciliation {
                    value["chain"]["reconciled"] = r.is_clean().into();
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_audit(&report);
                if let Some(r) = &reconciliation {
                    let verdict = |ok: bool| if ok { "reconciled" } else { "MISMATCH" };
                    println!("vault holds   {}", r.vault_holdings);
                    println!("ledger owes   {}", r.ledger_liabilities);
                    println!("on-chain      {}", verdict(r.holdings_match()));
                    println!(
                        "vault stake   {} staked, {} unbonding",
                        r.vault_stake.staked, r.vault_stake.unbonding
                    );
                    println!(
                        "ledger stake  {} staked, {} unbonding",
                        r.ledger_staked, r.ledger_unbonding
                    );
                    println!("stake         {}", verdict(r.stake_matches()));
                }
            }
            if !report.is_clean() {
                bail!(
                    "ledger audit failed: {} problem(s)",
                    report.problems().len()
                );
            }
            if let Some(r) = reconciliation.filter(|r| !r.is_clean()) {
                bail!(
                    "on-chain reconciliation failed: the vault holds {} and records {} staked, \
                     {} unbonding; the ledger owes {} and has {} staked, {} unbonding \
                     (a slash shows on-chain only from the hub's next slash epoch)",
                    r.vault_holdings,
                    r.vault_stake.staked,
                    r.vault_stake.unbonding,
                    r.ledger_liabilities,
                    r.ledger_staked,
                    r.ledger_unbonding
                );
            }
        }
    }
    Ok(())
}

fn print_audit(report: &AuditReport) {
    println!("transactions  {}", report.transactions);
    println!("entries       {}", report.entries);
    println!("accounts      {}", report.accounts);
    println!("minted        {}", report.minted);
    println!("burned        {}", report.burned);
    println!("supply        {}", report.supply);
    let problems = report.problems();
    if problems.is_empty() {
        println!("audit         clean");
    } else {
        for problem in problems {
            println!("PROBLEM       {problem}");
        }
    }
}

/// `tessera bench ledger`: settlements per second (escrow hold + capture + release) on a fresh
/// SQLite file, and on PostgreSQL when `postgres_url` is given (a database the bench may write
/// to; it mints its own dev money there). Prints a table, or one JSON object with `json`.
pub async fn bench(
    json: bool,
    settlements: u64,
    concurrency: usize,
    postgres_url: Option<&str>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut reports: Vec<BenchReport> = Vec::new();
    reports.push(
        bench_settlements(&sqlite_url, settlements, concurrency)
            .await
            .context("SQLite bench")?,
    );
    if let Some(url) = postgres_url {
        reports.push(
            bench_settlements(url, settlements, concurrency)
                .await
                .context("PostgreSQL bench")?,
        );
    }
    if json {
        let object = serde_json::json!({
            "bench": "ledger_settlements",
            "goal_per_second_sqlite": 5000,
            "results": reports,
        });
        println!("{}", serde_json::to_string_pretty(&object)?);
    } else {
        println!(
            "{:<10} {:>12} {:>11} {:>10} {:>14} {:>6}",
            "backend", "settlements", "concurrency", "seconds", "settlements/s", "audit"
        );
        for r in &reports {
            println!(
                "{:<10} {:>12} {:>11} {:>10.3} {:>14.0} {:>6}",
                format!("{:?}", r.backend).to_lowercase(),
                r.settlements,
                r.concurrency,
                r.seconds,
                r.per_second,
                if r.audit_clean { "clean" } else { "FAILED" }
            );
        }
    }
    if reports.iter().any(|r| !r.audit_clean) {
        bail!("the ledger audit failed after the benchmark");
    }
    Ok(())
}
