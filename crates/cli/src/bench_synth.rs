//! `tessera bench synth`: rows/s and cost per 1,000 rows of a small spec through a local
//! network of 1 and then 2 providers, and the scaling ratio (rows/s with 2 ÷ with 1). On one
//! machine the nodes share its cores, so the ratio shows the hub's fan-out, not the hardware's.

use std::sync::atomic::AtomicBool;

use serde_json::json;
use tessera_synth::Spec;

use crate::local::{Children, StopOnDrop};
use crate::synth_cmd::{local_network, LocalNetwork};

/// `tessera bench synth` options.
#[derive(clap::Args, Debug)]
pub struct SynthBenchArgs {
    /// Rows per measurement.
    #[arg(long, default_value_t = 16)]
    rows: u64,
    /// Tokens per row.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Compute threads per node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measurement.
struct Figure {
    providers: usize,
    rows: usize,
    seconds: f64,
    spent: u64,
}

impl Figure {
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }

    fn cost_per_1000(&self) -> f64 {
        self.spent as f64 * 1000.0 / self.rows.max(1) as f64
    }
}

fn spec_text(args: &SynthBenchArgs, concurrency: usize) -> String {
    format!(
        r#"name = "bench"
model = "smollm2-135m"
rows = {rows}
concurrency = {concurrency}
[sampling]
temperature = 0.8
max_tokens = {max_tokens}
[budget]
max_spend = 100000000
max_price = 10
[variables]
topic = ["bread", "rain", "chess", "tea", "trains", "the moon", "rivers", "bees"]
[[steps]]
name = "text"
prompt = "Write one sentence about {{topic}}."
[dedup]
exact = false
"#,
        rows = args.rows,
        max_tokens = args.max_tokens,
    )
}

fn measure(args: &SynthBenchArgs, providers: usize) -> anyhow::Result<Figure> {
    let dir = tempfile::tempdir()?;
    let children = Children::default();
    let _stop = StopOnDrop(children.clone());
    let client = local_network(
        &LocalNetwork {
            nodes: providers,
            threads: args.threads,
            verify_probability: 0.0,
            price: 10,
            funds: 100_000_000,
        },
        &children,
        dir.path(),
    )?;
    let path = dir.path().join("bench.toml");
    // Two requests in flight per provider (each node serves two at once).
    let text = spec_text(args, 2 * providers);
    std::fs::write(&path, &text)?;
    let spec = Spec::parse(&path, &text)?;
    let report = tessera_synth::run(
        &spec,
        &client,
        &dir.path().join("out"),
        &AtomicBool::new(false),
        &tessera_synth::Quiet,
    )?;
    Ok(Figure {
        providers,
        rows: report.accepted().count(),
        seconds: report.elapsed.as_secs_f64(),
        spent: report.spent_this_run,
    })
}

/// Runs the benchmark.
pub fn run(args: SynthBenchArgs) -> anyhow::Result<()> {
    let one = measure(&args, 1)?;
    let two = measure(&args, 2)?;
    let ratio = two.rows_per_s() / one.rows_per_s().max(1e-9);
    if args.json {
        let figure = |f: &Figure| json!({"providers": f.providers, "rows": f.rows, "seconds": f.seconds, "rows_per_s": f.rows_per_s(), "cost_per_1000_rows": f.cost_per_1000()});
        println!(
            "{}",
            json!({"max_tokens": args.max_tokens, "runs": [figure(&one), figure(&two)], "scaling_ratio": ratio})
        );
        return Ok(());
    }
    println!(
        "{:>9} {:>5} {:>8} {:>7} {:>20}",
        "providers", "rows", "seconds", "rows/s", "cost / 1,000 rows"
    );
    for f in [&one, &two] {
        println!(
            "{:>9} {:>5} {:>8.1} {:>7.2} {:>20.0}",
            f.providers,
            f.rows,
            f.seconds,
            f.rows_per_s(),
            f.cost_per_1000()
        );
    }
    println!("scaling ratio (rows/s with 2 / with 1): {ratio:.2}");
    Ok(())
}
