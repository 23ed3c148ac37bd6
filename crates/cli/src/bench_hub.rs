//! `tessera bench hub`: the hub's own overhead. An in-process hub routes chat completions to
//! synthetic providers (a benchmark double that answers at once), so what is measured is
//! authentication, scheduling, escrow, the WebSocket round trip, settlement and the HTTP
//! response: requests per second and the latency the hub adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tessera_hub::{Hub, HubConfig, ModelEntry};
use tessera_node::synthetic::{run_synthetic, synthetic_sha256, SYNTHETIC_MODEL};
use tessera_protocol::Wallet;
use tessera_types::Vocabulary;

/// The benchmark double's model: one token, "x".
fn synthetic_model() -> ModelEntry {
    ModelEntry {
        name: SYNTHETIC_MODEL.into(),
        sha256: hex::encode(synthetic_sha256()),
        context_length: 1 << 20,
        vocab: Arc::new(Vocabulary {
            tokens: vec![b"x".to_vec()],
            control: vec![false],
        }),
    }
}

/// Options of `tessera bench hub`.
#[derive(clap::Args, Debug, Clone)]
pub struct HubBenchArgs {
    /// Measured requests.
    #[arg(long, default_value_t = 5_000)]
    pub requests: usize,
    /// Concurrent clients (each with its own agent and keep-alive connection).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Synthetic providers.
    #[arg(long, default_value_t = 8)]
    pub providers: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 4)]
    pub tokens: u32,
    /// Ledger database (default: a temporary SQLite file).
    #[arg(long)]
    pub db: Option<String>,
    /// Measure only this settlement mode (default: both).
    #[arg(long, value_parser = ["escrow", "fast"])]
    pub mode: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct HubBenchReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// `escrow` (a ledger escrow per job) or `fast` (`--fast-settle`).
    pub mode: String,
    /// Requests measured.
    pub requests: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests per second, routed and settled.
    pub requests_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests that did not return 200.
    pub errors: usize,
}

/// Runs the benchmark in each settlement mode.
pub fn run(args: HubBenchArgs) -> anyhow::Result<()> {
    let modes: Vec<&str> = match args.mode.as_deref() {
        Some(m) => vec![m],
        None => vec!["escrow", "fast"],
    };
    let reports = modes
        .into_iter()
        .map(|m| measure(&args, m == "fast"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!("backend   mode    requests  clients     req/s   p50 ms   p99 ms  errors");
        for r in &reports {
            println!(
                "{:<9} {:<7} {:>8} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>7}",
                r.backend,
                r.mode,
                r.requests,
                r.concurrency,
                r.requests_per_s,
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
        }
        println!("(latency: the whole request through the hub to a provider that answers at once; ledger audit clean)");
    }
    Ok(())
}

fn measure(args: &HubBenchArgs, fast_settle: bool) -> anyhow::Result<HubBenchReport> {
    let temp = tempfile::tempdir()?;
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", temp.path().join("bench.db").display()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (url, hub) = runtime.block_on(async {
        let mut config = HubConfig::dev(db.clone());
        config.verify_probability = 0.0;
        config.fast_settle = fast_settle;
        // The benchmark double's "model": a vocabulary of one token, and no verifier needed.
        config.catalog.insert(synthetic_model());
        config.allow_unverified = true;
        config.max_concurrent_per_agent = u32::MAX;
        config.requests_per_minute = u32::MAX;
        let hub = Hub::open(config).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(tessera_hub::serve(
            hub.clone(),
            listener,
            std::future::pending(),
        ));
        for _ in 0..args.providers {
            let (url, wallet, tokens) = (url.clone(), Wallet::random(), args.tokens);
            tokio::spawn(async move {
                if let Err(e) = run_synthetic(&url, &wallet, 1, 64, tokens).await {
                    tracing::error!(error = %e, "synthetic provider stopped");
                }
            });
        }
        anyhow::Ok((url, hub))
    })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while hub.registry.connections().len() < args.providers {
        anyhow::ensure!(
            Instant::now() < deadline,
            "synthetic providers did not connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let keys: Vec<String> = (0..args.concurrency)
        .map(|i| {
            let wallet = Wallet::random();
            let key = format!("sk-bench-{i}-{}", hex::encode(wallet.address()));
            http()
                .post(format!("{url}/v1/dev/faucet"))
                .send_json(json!({"address": wallet.address(), "amount": 1u64 << 50}))?;
            crate::client::register_key(&url, &wallet, &key, 1, Duration::from_secs(3600))?;
            Ok(key)
        })
        .collect::<anyhow::Result<_>>()?;
    let body = json!({"model": SYNTHETIC_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.tokens, "temperature": 0});
    let per_client = args.requests.div_ceil(args.concurrency);
    let warmup = 20.min(per_client);
    let barrier = Arc::new(std::sync::Barrier::new(args.concurrency + 1));
    let threads: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (url, body, barrier) = (url.clone(), body.clone(), barrier.clone());
            std::thread::spawn(move || {
                let agent = http();
                let call = |latencies: &mut Vec<f64>, errors: &mut usize| {
                    let t = Instant::now();
                    let ok = agent
                        .post(format!("{url}/v1/chat/completions"))
                        .header("Authorization", &format!("Bearer {key}"))
                        .send_json(&body)
                        .is_ok_and(|mut r| r.status() == 200 && r.body_mut().read_to_vec().is_ok());
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    *errors += usize::from(!ok);
                };
                let (mut scratch, mut ignored) = (Vec::new(), 0);
                for _ in 0..warmup {
                    call(&mut scratch, &mut ignored);
                }
                barrier.wait();
                let (mut latencies, mut errors) = (Vec::with_capacity(per_client), 0);
                for _ in 0..per_client {
                    call(&mut latencies, &mut errors);
                }
                (latencies, errors)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let report = HubBenchReport {
        backend: if db.starts_with("sqlite") {
            "sqlite".into()
        } else {
            "postgres".into()
        },
        mode: if fast_settle {
            "fast".into()
        } else {
            "escrow".into()
        },
        requests: latencies.len(),
        concurrency: args.concurrency,
        requests_per_s: latencies.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    };
    let audit = runtime.block_on(hub.ledger.audit()).context("auditing")?;
    anyhow::ensure!(
        audit.is_clean(),
        "the ledger audit failed after the benchmark: {:?}",
        audit.problems()
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(report)
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}
