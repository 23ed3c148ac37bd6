//! Measures settlements per second: `cargo run --release -p tessera-ledger --example
//! bench_settlements -- [URL] [N] [CONCURRENCY]` (default: a temporary SQLite file, 20000, 16).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = tempfile::tempdir()?;
    let url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let n = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let concurrency = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let report = tessera_ledger::bench_settlements(&url, n, concurrency).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
