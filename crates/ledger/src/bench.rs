//! Settlement throughput benchmark: escrow hold + capture + release per job, the hub's hot path.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tessera_protocol::Address;

use crate::{Backend, Error, Ledger, LedgerConfig, Result};

/// What [`bench_settlements`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The database.
    pub backend: Backend,
    /// Settlements committed.
    pub settlements: u64,
    /// Concurrent tasks issuing them.
    pub concurrency: usize,
    /// Wall-clock seconds for all settlements.
    pub seconds: f64,
    /// Settlements per second.
    pub per_second: f64,
    /// Whether the audit afterwards was clean.
    pub audit_clean: bool,
}

/// Opens a dev-mode ledger at `url` (use a fresh database), funds `concurrency` agents, then
/// runs `n` settlements ([`Ledger::settle`]: hold, capture, release in one transaction) from
/// `concurrency` tasks and audits the result.
pub async fn bench_settlements(url: &str, n: u64, concurrency: usize) -> Result<BenchReport> {
    let concurrency = concurrency.max(1);
    let ledger = Ledger::open(url, LedgerConfig::dev()).await?;
    let faucet = ledger
        .faucet()
        .ok_or(Error::Corrupt("dev ledger without faucet".into()))?;
    let provider = Address::repeat_byte(0xfe);
    // Unique per run, so a bench against a reused PostgreSQL database never replays old keys.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut agents = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut bytes = [0u8; 20];
        bytes[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let agent = Address::from(bytes);
        faucet
            .mint(&format!("bench-{run}-fund-{i}"), agent, 1_000_000_000_000)
            .await?;
        agents.push(agent);
    }
    let per_task = n / concurrency as u64;
    let extra = n % concurrency as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, agent) in agents.into_iter().enumerate() {
        let ledger = ledger.clone();
        let jobs = per_task + u64::from((i as u64) < extra);
        tasks.spawn(async move {
            for j in 0..jobs {
                let key = format!("bench-{run}-{i}-{j}");
                ledger
                    .settle(&key, agent, provider, 1_000, 100 + j % 900)
                    .await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| Error::Corrupt(format!("bench task panicked: {e}")))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let audit_clean = ledger.audit().await?.is_clean();
    ledger.close().await;
    Ok(BenchReport {
        backend: ledger.backend(),
        settlements: n,
        concurrency,
        seconds,
        per_second: n as f64 / seconds.max(f64::EPSILON),
        audit_clean,
    })
}
