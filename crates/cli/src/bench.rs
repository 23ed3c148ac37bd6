//! `tessera bench …`: measured figures, printed as a table or as JSON.

use std::time::Instant;

use clap::Subcommand;
use serde::Serialize;
use tessera_engine::{registry, Engine, GenerateOptions, Message, Role};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Engine throughput for each cached model: prompt processing, decode (batch 1 and 8),
    /// teacher-forced scoring, time to first token, peak RSS.
    Engine {
        /// Compute threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Models to measure (default: every cached known model).
        #[arg(long)]
        model: Vec<String>,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Generated tokens per sequence.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct EngineFigures {
    model: String,
    formats: Vec<String>,
    threads: usize,
    prompt_tokens: usize,
    prompt_tok_per_s: f64,
    decode_tok_per_s_batch1: f64,
    decode_tok_per_s_batch8: f64,
    score_tok_per_s: f64,
    time_to_first_token_ms: f64,
    peak_rss_mib: f64,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// A prompt of exactly `n` tokens: chat markup around repeated filler text.
fn prompt_of(engine: &Engine, n: usize) -> Vec<u32> {
    let filler = "The history of science is the study of the development of science and scientific knowledge. ";
    let mut text = String::new();
    loop {
        text.push_str(filler);
        let p = engine.chat_prompt(&[Message::new(Role::User, text.clone())]);
        if p.len() >= n {
            let mut p = p;
            let tail = p.split_off(p.len() - 3); // keep the assistant turn opening
            p.truncate(n - tail.len());
            p.extend(tail);
            return p;
        }
    }
}

fn bench_engine(name: &str, threads: Option<usize>, prompt_tokens: usize, gen_tokens: usize) -> anyhow::Result<EngineFigures> {
    let engine = Engine::load(name, threads)?;
    let prompt = prompt_of(&engine, prompt_tokens);
    let opts = |max_tokens| GenerateOptions { max_tokens, ignore_eos: true, ..Default::default() };
    // Warm-up.
    engine.generate(&prompt[..16], &opts(4), |_| true)?;

    // Prompt processing: time to the first token of a fresh sequence.
    let mut ttft = f64::MAX;
    for _ in 0..3 {
        let g = engine.generate(&prompt, &opts(1), |_| true)?;
        ttft = ttft.min(g.time_to_first_token);
    }
    let g = engine.generate(&prompt, &opts(gen_tokens), |_| true)?;
    let decode1 = (g.tokens.len() - 1) as f64 / (g.elapsed - g.time_to_first_token);

    let requests: Vec<_> = (0..8).map(|i| (prompt[..prompt.len() - i].to_vec(), opts(gen_tokens))).collect();
    let start = Instant::now();
    let mut first_round = None;
    let mut tokens = 0usize;
    engine.generate_batch(&requests, |s| {
        tokens += 1;
        if s.index == 0 && first_round.is_none() && tokens == requests.len() {
            first_round = Some(start.elapsed().as_secs_f64());
        }
        true
    })?;
    let total = start.elapsed().as_secs_f64();
    let decode8 = (tokens - requests.len()) as f64 / (total - first_round.unwrap_or(0.0));

    // Scoring: prompt + answer of 2 × gen_tokens in one teacher-forced pass.
    let mut seq = prompt.clone();
    seq.extend(std::iter::repeat_n(g.tokens.clone(), 2).flatten().take(2 * gen_tokens));
    let start = Instant::now();
    engine.score(&seq)?;
    let score = seq.len() as f64 / start.elapsed().as_secs_f64();

    Ok(EngineFigures {
        model: name.into(),
        formats: engine.info().formats.clone(),
        threads: engine.threads(),
        prompt_tokens: prompt.len(),
        prompt_tok_per_s: prompt.len() as f64 / ttft,
        decode_tok_per_s_batch1: decode1,
        decode_tok_per_s_batch8: decode8,
        score_tok_per_s: score,
        time_to_first_token_ms: ttft * 1000.0,
        peak_rss_mib: peak_rss_mib(),
    })
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Engine { threads, model, prompt_tokens, gen_tokens, json } => {
            let models: Vec<String> =
                if model.is_empty() { registry::list_cached().into_iter().map(|m| m.name).collect() } else { model };
            if models.is_empty() {
                anyhow::bail!("no model is cached; run `tessera model fetch smollm2-135m` first");
            }
            let figures = models.iter().map(|m| bench_engine(m, threads, prompt_tokens, gen_tokens)).collect::<anyhow::Result<Vec<_>>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                println!(
                    "| model | threads | prompt tok/s ({prompt_tokens}) | decode tok/s b=1 | decode tok/s b=8 | score tok/s | TTFT ms | peak RSS MiB |"
                );
                println!("|---|---|---|---|---|---|---|---|");
                for f in &figures {
                    println!(
                        "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                        f.model, f.threads, f.prompt_tok_per_s, f.decode_tok_per_s_batch1, f.decode_tok_per_s_batch8, f.score_tok_per_s,
                        f.time_to_first_token_ms, f.peak_rss_mib
                    );
                }
            }
        }
    }
    Ok(())
}
