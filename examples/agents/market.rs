//! One round of the task market against a running hub (see `run.sh`): a curator hires a writer
//! and a lazy writer, keeps the good row, and the lazy writer's bond pays for its junk.
//!
//! `cargo run -p tessera-agent --example agents-market -- http://127.0.0.1:8080`
//! (a `--dev` hub: the agents are funded from its faucet).

#[path = "roles.rs"]
mod roles;

use serde_json::json;
use tessera_protocol::Wallet;

fn main() -> Result<(), roles::BoxError> {
    let hub = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let agents = [
        ("curator", Wallet::random(), 100_000),
        ("writer", Wallet::random(), 10_000),
        ("lazy writer", Wallet::random(), 10_000),
    ];
    let http = tessera_agent::http();
    for (name, wallet, funds) in &agents {
        http.post(format!("{hub}/v1/dev/faucet"))
            .send_json(json!({"address": wallet.address(), "amount": funds}))?;
        println!("{name:12} {:#x} funded with {funds}", wallet.address());
    }
    let balance = |w: &Wallet| -> Result<u64, roles::BoxError> {
        Ok(tessera_agent::Client::signer(&hub, w).balance()?)
    };
    let before: Vec<u64> = agents
        .iter()
        .map(|a| balance(&a.1))
        .collect::<Result<_, _>>()?;
    let round = roles::run_market(&hub, &agents[0].1, &agents[1].1, &agents[2].1, |line| {
        println!("  {line}")
    })?;
    println!("\nmoney moved:");
    for ((name, wallet, _), before) in agents.iter().zip(before) {
        let after = balance(wallet)?;
        println!(
            "{name:12} {before:>8} -> {after:>8}  ({:+})",
            after as i64 - before as i64
        );
    }
    println!("\ndataset ({} rows):", round.dataset.len());
    for row in &round.dataset {
        println!("{row}");
    }
    Ok(())
}
