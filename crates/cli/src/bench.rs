//! `tessera bench …`: measured figures, printed as a table or as JSON.

use std::time::Instant;

use clap::Subcommand;
use serde::Serialize;
#[cfg(feature = "adversary")]
use tessera_engine::{quant, SamplingParams, Variant};
use tessera_engine::{registry, Compute, Engine, GenerateOptions, LoadOptions, Message, Role};
#[cfg(feature = "adversary")]
use tessera_proof::harness::{logprobs_of, serve_with_logits};
#[cfg(feature = "adversary")]
use tessera_proof::{cheat, serve, tasks, verify, Adversary, CheatEngines};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// The hub's own overhead with synthetic providers: requests/s routed and settled, p50/p99 latency.
    Hub(crate::bench_hub::HubBenchArgs),
    /// A scripted attack round against a local three-provider network (issue 10's exploits):
    /// attempts, prevented, the attacker's gain and honest providers wrongly slashed.
    #[cfg(feature = "adversary")]
    Attack(crate::bench_attack::AttackArgs),
    /// Synthetic-data throughput: rows/s and cost per 1,000 rows with 1 and 2 local providers.
    Synth(crate::bench_synth::SynthBenchArgs),
    /// Engine throughput for each cached model: prompt processing, decode (batch 1 and 8),
    /// teacher-forced scoring, time to first token, KV bytes per token, peak RSS. Above
    /// 1,024 prompt tokens the batch-8 and scoring runs are skipped (eight long caches, and the
    /// logits of every position, would measure memory rather than the engine).
    Engine {
        /// Compute threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Where the models run: `cpu` (the native kernels), `cuda[:N]` or `candle-cpu`.
        #[arg(long, default_value = "cpu")]
        device: Compute,
        /// Models to measure (default: every cached known model).
        #[arg(long)]
        model: Vec<String>,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Generated tokens per sequence.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Runs of each measurement; the best is reported (shared machines are noisy).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A folder holding llama.cpp's `llama-bench`: run it on the same GGUF files, threads and
        /// token counts in the same run (before and after ours, its best of both), and print its
        /// figures and the ratios beside ours.
        #[arg(long, value_name = "DIR")]
        compare_llama_cpp: Option<std::path::PathBuf>,
    },
    /// Ledger settlements per second (escrow hold + capture + release) on SQLite, and on
    /// PostgreSQL when a URL is given.
    Ledger {
        #[arg(long, default_value_t = 20_000)]
        settlements: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// PostgreSQL database to measure too.
        #[arg(long, env = "TESSERA_TEST_POSTGRES_URL")]
        postgres_url: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Verification: detection rate per adversary, false positives on honest jobs across provider
    /// set-ups, commitment size, and the cost of a check relative to the generation it checks.
    Verify {
        /// The model served and verified.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Honest jobs (spread over threads 1/2, batch 1/8, AVX2/AVX-512 kernels).
        #[arg(long, default_value_t = 1000)]
        honest: usize,
        /// Jobs per adversary.
        #[arg(long, default_value_t = 200)]
        per_adversary: usize,
        /// Tokens per answer in the detection runs.
        #[arg(long, default_value_t = 48)]
        max_tokens: u32,
        /// Sampling rate p used for the amortized overhead.
        #[arg(long, default_value_t = 0.05)]
        p: f64,
        /// Thresholds file (default: calibrated or built-in).
        #[arg(long)]
        thresholds: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct DetectionRow {
    behaviour: String,
    jobs: usize,
    flagged: usize,
    rate: f64,
}

#[derive(Serialize)]
struct VerifyFigures {
    thresholds: tessera_proof::Thresholds,
    honest: DetectionRow,
    /// Honest jobs under the richer rules: a grammar, penalties with a bias, logprobs reported.
    honest_rules: Vec<DetectionRow>,
    honest_max_abs_delta: f32,
    adversaries: Vec<DetectionRow>,
    commitment_bytes_per_token: f64,
    commitment_json_bytes_per_token: f64,
    cost_prompt_tokens: usize,
    cost_answer_tokens: usize,
    generation_s: f64,
    check_s: f64,
    check_fraction_of_generation: f64,
    sampling_rate_p: f64,
    amortized_overhead: f64,
}

#[cfg(not(feature = "adversary"))]
fn bench_verify(
    _: &str,
    _: usize,
    _: usize,
    _: u32,
    _: f64,
    _: Option<std::path::PathBuf>,
) -> anyhow::Result<VerifyFigures> {
    anyhow::bail!("`bench verify` runs cheating providers; build with `--features adversary`")
}

#[cfg(feature = "adversary")]
fn bench_verify(
    model: &str,
    honest_n: usize,
    per_adversary: usize,
    max_tokens: u32,
    p: f64,
    thresholds: Option<std::path::PathBuf>,
) -> anyhow::Result<VerifyFigures> {
    let thresholds = crate::verify_cmd::load_thresholds(thresholds.as_ref())?;
    let other_name = tessera_proof::other_model(model);
    registry::fetch(model)?;
    registry::fetch(other_name)?;
    let verifier = Engine::load(model, None)?;
    let one_thread = Engine::load_with(
        model,
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )?;

    // Honest jobs under four provider set-ups.
    let set_ups: [(&Engine, usize, &str); 4] = [
        (&verifier, 8, "auto"),
        (&one_thread, 1, "auto"),
        (&verifier, 8, "avx2"),
        (&verifier, 1, "auto"),
    ];
    let mut honest = DetectionRow {
        behaviour: "honest (false positives)".into(),
        jobs: 0,
        flagged: 0,
        rate: 0.0,
    };
    let mut honest_max = 0f32;
    for (i, (engine, batch, isa)) in set_ups.iter().enumerate() {
        let n = honest_n / set_ups.len() + usize::from(i < honest_n % set_ups.len());
        let specs: Vec<_> = tasks(n, max_tokens, 10_000 + i as u64)
            .iter()
            .map(|t| t.spec(engine))
            .collect();
        quant::set_kernel_isa(isa);
        let mut jobs = Vec::new();
        for chunk in specs.chunks(*batch) {
            jobs.extend(serve(engine, chunk)?);
        }
        quant::set_kernel_isa("auto");
        for job in &jobs {
            let v = verify(&verifier, job, &thresholds)?;
            honest.jobs += 1;
            honest.flagged += usize::from(!v.passed);
            honest_max = honest_max.max(v.stats.max_abs);
        }
        tracing::info!(
            set_up = i,
            jobs = honest.jobs,
            flagged = honest.flagged,
            "honest jobs checked"
        );
    }
    honest.rate = honest.flagged as f64 / honest.jobs.max(1) as f64;

    // Honest jobs under the richer rules (false positives of the rule's replay).
    let mut honest_rules = Vec::new();
    for (k, name) in [
        "honest, JSON grammar (json_object)",
        "honest, penalties and logit_bias",
        "honest, logprobs reported (top 5)",
    ]
    .into_iter()
    .enumerate()
    {
        let specs: Vec<_> = tasks(per_adversary, max_tokens, 30_000 + k as u64)
            .iter()
            .map(|t| {
                let mut spec = t.spec(&verifier);
                match k {
                    0 => {
                        spec.sampling.grammar = Some(tessera_engine::sampling::Grammar::JsonObject)
                    }
                    1 => {
                        spec.sampling.frequency_penalty = 0.8;
                        spec.sampling.presence_penalty = 0.4;
                        spec.sampling.logit_bias = vec![(13, 2.0), (30, -5.0)];
                    }
                    _ => {}
                }
                spec
            })
            .collect();
        let mut row = DetectionRow {
            behaviour: name.into(),
            jobs: 0,
            flagged: 0,
            rate: 0.0,
        };
        for chunk in specs.chunks(8) {
            for served in serve_with_logits(&verifier, chunk)? {
                let mut job = served.job;
                if k == 2 {
                    job.claim.logprobs = Some(logprobs_of(&job, &served.logits, 5));
                }
                let v = verify(&verifier, &job, &thresholds)?;
                row.jobs += 1;
                row.flagged += usize::from(!v.passed);
            }
        }
        row.rate = row.flagged as f64 / row.jobs.max(1) as f64;
        tracing::info!(rule = name, rate = row.rate, "honest rule checked");
        honest_rules.push(row);
    }

    let other = Engine::load(other_name, None)?;
    let requantized = Engine::load_with(
        model,
        &LoadOptions {
            threads: None,
            variant: Variant::RequantizedQ4_0,
            ..Default::default()
        },
    )?;
    let skipped = Engine::load_with(
        model,
        &LoadOptions {
            threads: None,
            variant: Variant::SkipLastLayers(2),
            ..Default::default()
        },
    )?;
    let engines = CheatEngines {
        honest: &verifier,
        other: &other,
        requantized: &requantized,
        skipped: &skipped,
    };
    let mut adversaries = Vec::new();
    for (k, adversary) in Adversary::ALL.into_iter().enumerate() {
        let mut row = DetectionRow {
            behaviour: match adversary {
                Adversary::OtherModel => format!("{} ({other_name})", adversary.name()),
                _ => adversary.name().into(),
            },
            jobs: 0,
            flagged: 0,
            rate: 0.0,
        };
        let mut ts = tasks(per_adversary, max_tokens, 20_000 + k as u64);
        if adversary.needs_sampling() {
            for (i, t) in ts.iter_mut().enumerate() {
                if t.sampling.is_greedy() {
                    t.sampling = SamplingParams::seeded(0.8, i as u64);
                }
            }
        }
        for (c, chunk) in ts.chunks(8).enumerate() {
            for job in cheat(adversary, &engines, chunk, c as u64)? {
                let v = verify(&verifier, &job, &thresholds)?;
                row.jobs += 1;
                row.flagged += usize::from(!v.passed);
            }
        }
        row.rate = row.flagged as f64 / row.jobs.max(1) as f64;
        tracing::info!(
            adversary = adversary.name(),
            rate = row.rate,
            "adversary checked"
        );
        adversaries.push(row);
    }

    // Cost of one check against the generation it checks: 128-token prompt, 256-token answer.
    let prompt = prompt_of(&verifier, 128);
    let answer_tokens = 256;
    let mut spec = tasks(1, answer_tokens, 1)[0].spec(&verifier);
    spec.prompt_tokens = prompt;
    spec.sampling = SamplingParams::seeded(0.8, 3);
    let start = Instant::now();
    let opts = GenerateOptions {
        max_tokens: answer_tokens as usize,
        sampling: spec.sampling.clone(),
        ignore_eos: true,
        ..Default::default()
    };
    let g = verifier.generate(&spec.prompt_tokens, &opts, |_| true)?;
    let generation_s = start.elapsed().as_secs_f64();
    let mut all = spec.prompt_tokens.clone();
    all.extend(&g.tokens);
    let start = Instant::now();
    verifier.score_from(&all[..all.len() - 1], spec.prompt_tokens.len() - 1)?;
    let check_s = start.elapsed().as_secs_f64();
    let job = serve(&verifier, std::slice::from_ref(&spec))?.remove(0);
    let json_bytes = job.commitment.values.len() as f64 / job.commitment.positions.max(1) as f64;
    let fraction = check_s / generation_s;
    Ok(VerifyFigures {
        thresholds,
        honest,
        honest_rules,
        honest_max_abs_delta: honest_max,
        adversaries,
        commitment_bytes_per_token: job.commitment.bytes_per_token(),
        commitment_json_bytes_per_token: json_bytes,
        cost_prompt_tokens: spec.prompt_tokens.len(),
        cost_answer_tokens: g.tokens.len(),
        generation_s,
        check_s,
        check_fraction_of_generation: fraction,
        sampling_rate_p: p,
        amortized_overhead: p * fraction,
    })
}

#[derive(Serialize)]
struct EngineFigures {
    model: String,
    /// The GGUF file (for llama.cpp).
    #[serde(skip)]
    path: std::path::PathBuf,
    device: String,
    formats: Vec<String>,
    threads: usize,
    prompt_tokens: usize,
    prompt_tok_per_s: f64,
    decode_tok_per_s_batch1: f64,
    /// `None` when skipped (long prompts).
    decode_tok_per_s_batch8: Option<f64>,
    /// `None` when skipped (long prompts).
    score_tok_per_s: Option<f64>,
    time_to_first_token_ms: f64,
    kv_bytes_per_token: usize,
    /// The GGUF file's size.
    file_mib: f64,
    /// Peak RSS while serving one sequence: loading, the prompt and the batch-1 decode (weights,
    /// one KV cache, one row of logits), before the batch-8 and scoring runs.
    serving_rss_mib: f64,
    /// Peak RSS of the whole run, with 8 KV caches and the scoring pass's logits for every position
    /// (`prompt + 2 × gen` rows of the vocabulary).
    peak_rss_mib: f64,
    /// llama.cpp's figures on the same file, threads and token counts, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    llama_cpp: Option<LlamaCppFigures>,
}

/// `llama-bench` on the same model, and our figures relative to its (above 1: we are faster).
#[derive(Serialize)]
struct LlamaCppFigures {
    prompt_tok_per_s: f64,
    decode_tok_per_s: f64,
    prompt_ratio: f64,
    decode_ratio: f64,
}

/// Prompt tokens above which `bench engine` skips the batch-8 and scoring runs.
const LONG_PROMPT: usize = 1024;

/// Runs `DIR/llama-bench -m MODEL -p P -n G -r R -t T -o json` and reads its prompt (`n_gen` 0)
/// and generation (`n_prompt` 0) rows: tokens per second of the best repetition, as ours.
fn llama_bench(
    dir: &std::path::Path,
    model: &std::path::Path,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
    threads: usize,
) -> anyhow::Result<(f64, f64)> {
    use anyhow::Context;
    let exe = dir.join("llama-bench");
    let out = std::process::Command::new(&exe)
        .arg("-m")
        .arg(model)
        .args(["-p", &prompt_tokens.to_string()])
        .args(["-n", &gen_tokens.to_string()])
        .args(["-r", &repeat.to_string()])
        .args(["-t", &threads.to_string()])
        .args(["-o", "json"])
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} exited with {}",
        exe.display(),
        out.status
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("reading llama-bench's JSON")?;
    let rate = |prompt: bool| {
        rows.iter()
            .find(|r| {
                let (p, g) = (r["n_prompt"].as_u64(), r["n_gen"].as_u64());
                if prompt {
                    p > Some(0) && g == Some(0)
                } else {
                    g > Some(0) && p == Some(0)
                }
            })
            // The best run, as ours is reported (`samples_ts` holds each run; older builds
            // give only the mean).
            .and_then(|r| {
                let best = r["samples_ts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_f64())
                    .reduce(f64::max);
                best.or_else(|| r["avg_ts"].as_f64())
            })
            .context("llama-bench gave no prompt or generation row")
    };
    Ok((rate(true)?, rate(false)?))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
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

fn bench_engine(
    name: &str,
    threads: Option<usize>,
    device: Compute,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
) -> anyhow::Result<EngineFigures> {
    anyhow::ensure!(prompt_tokens >= 16, "--prompt-tokens must be at least 16 (the batch-8 run shortens the prompt by up to 7 tokens)");
    let engine = Engine::load_with(
        name,
        &LoadOptions {
            threads,
            device,
            ..Default::default()
        },
    )?;
    let prompt = prompt_of(&engine, prompt_tokens);
    let opts = |max_tokens| GenerateOptions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    // Warm-up.
    engine.generate(&prompt[..16], &opts(4), |_| true)?;

    // Prompt processing: time to the first token of a fresh sequence.
    let mut ttft = f64::MAX;
    for _ in 0..repeat.max(3) {
        let g = engine.generate(&prompt, &opts(1), |_| true)?;
        ttft = ttft.min(g.time_to_first_token);
    }
    // Decode, batch 1: the tokens after the first, over the time after the first.
    let mut decode1 = 0f64;
    let mut answer = Vec::new();
    for _ in 0..repeat {
        let g = engine.generate(&prompt, &opts(gen_tokens), |_| true)?;
        decode1 = decode1.max((g.tokens.len() - 1) as f64 / (g.elapsed - g.time_to_first_token));
        answer = g.tokens;
    }
    let serving_rss_mib = peak_rss_mib();

    let long = prompt_tokens > LONG_PROMPT;
    // Decode, batch 8: eight prompts of different lengths decoded together, after their first round.
    let requests: Vec<_> = (0..8)
        .map(|i| (prompt[..prompt.len() - i].to_vec(), opts(gen_tokens)))
        .collect();
    let mut decode8 = 0f64;
    for _ in 0..if long { 0 } else { repeat } {
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
        decode8 =
            decode8.max((tokens - requests.len()) as f64 / (total - first_round.unwrap_or(0.0)));
    }

    // Scoring: prompt + answer of 2 × gen_tokens in one teacher-forced pass.
    let mut seq = prompt.clone();
    seq.extend(
        std::iter::repeat_n(answer, 2)
            .flatten()
            .take(2 * gen_tokens),
    );
    let mut score = 0f64;
    for _ in 0..if long { 0 } else { repeat } {
        let start = Instant::now();
        engine.score(&seq)?;
        score = score.max(seq.len() as f64 / start.elapsed().as_secs_f64());
    }

    Ok(EngineFigures {
        model: name.into(),
        path: engine.info().path.clone(),
        device: device.to_string(),
        formats: engine.info().formats.clone(),
        threads: engine.threads(),
        prompt_tokens: prompt.len(),
        prompt_tok_per_s: prompt.len() as f64 / ttft,
        decode_tok_per_s_batch1: decode1,
        decode_tok_per_s_batch8: (!long).then_some(decode8),
        score_tok_per_s: (!long).then_some(score),
        time_to_first_token_ms: ttft * 1000.0,
        kv_bytes_per_token: engine.info().kv_bytes_per_token,
        file_mib: std::fs::metadata(&engine.info().path)
            .map(|m| m.len() as f64 / (1024.0 * 1024.0))
            .unwrap_or(0.0),
        serving_rss_mib,
        peak_rss_mib: peak_rss_mib(),
        llama_cpp: None,
    })
}

/// The `bench engine` table; with llama.cpp's figures, its columns and the ratios too.
fn print_engine_table(figures: &[EngineFigures], prompt_tokens: usize) {
    let compare = figures.iter().any(|f| f.llama_cpp.is_some());
    let optional = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
    print!(
        "| model | device | threads | prompt tok/s ({prompt_tokens}) | decode tok/s b=1 | decode tok/s b=8 | score tok/s | TTFT ms | KV bytes/token | file MiB | RSS b=1 MiB | peak RSS MiB |"
    );
    if compare {
        print!(" llama.cpp pp | ratio | llama.cpp tg | ratio |");
    }
    println!();
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|{}",
        if compare { "---|---|---|---|" } else { "" }
    );
    for f in figures {
        print!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.1} | {} | {:.0} | {:.0} | {:.0} |",
            f.model,
            f.device,
            f.threads,
            f.prompt_tok_per_s,
            f.decode_tok_per_s_batch1,
            optional(f.decode_tok_per_s_batch8),
            optional(f.score_tok_per_s),
            f.time_to_first_token_ms,
            f.kv_bytes_per_token,
            f.file_mib,
            f.serving_rss_mib,
            f.peak_rss_mib
        );
        match &f.llama_cpp {
            Some(l) => print!(
                " {:.1} | {:.2}x | {:.1} | {:.2}x |",
                l.prompt_tok_per_s, l.prompt_ratio, l.decode_tok_per_s, l.decode_ratio
            ),
            None if compare => print!(" – | – | – | – |"),
            None => {}
        }
        println!();
    }
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Hub(args) => crate::bench_hub::run(args)?,
        BenchCommand::Synth(args) => crate::bench_synth::run(args)?,
        #[cfg(feature = "adversary")]
        BenchCommand::Attack(args) => crate::bench_attack::run(args)?,
        BenchCommand::Engine {
            threads,
            device,
            model,
            prompt_tokens,
            gen_tokens,
            repeat,
            json,
            compare_llama_cpp,
        } => {
            let models: Vec<String> = if model.is_empty() {
                registry::list_cached()
                    .into_iter()
                    .map(|m| m.name)
                    .collect()
            } else {
                model
            };
            if models.is_empty() {
                anyhow::bail!("no model is cached; run `tessera model fetch smollm2-135m` first");
            }
            let repeat = repeat.max(1);
            let mut figures = Vec::new();
            for m in &models {
                // llama.cpp runs both before and after ours, and its best of both counts: the VMs
                // drift by 10-30% over minutes, and bracketing our runs keeps a slow spell from
                // favouring either side (if anything, it favours llama.cpp, with twice the runs).
                let threads_used = threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                let before = match &compare_llama_cpp {
                    Some(dir) => Some(llama_bench(
                        dir,
                        &registry::resolve(m)?,
                        prompt_tokens,
                        gen_tokens,
                        repeat,
                        threads_used,
                    )?),
                    None => None,
                };
                let mut f = bench_engine(m, threads, device, prompt_tokens, gen_tokens, repeat)?;
                if let (Some(dir), Some((pp0, tg0))) = (&compare_llama_cpp, before) {
                    let (pp, tg) =
                        llama_bench(dir, &f.path, prompt_tokens, gen_tokens, repeat, f.threads)?;
                    let (pp, tg) = (pp.max(pp0), tg.max(tg0));
                    f.llama_cpp = Some(LlamaCppFigures {
                        prompt_tok_per_s: pp,
                        decode_tok_per_s: tg,
                        prompt_ratio: f.prompt_tok_per_s / pp,
                        decode_ratio: f.decode_tok_per_s_batch1 / tg,
                    });
                }
                figures.push(f);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                print_engine_table(&figures, prompt_tokens);
            }
        }
        BenchCommand::Ledger {
            settlements,
            concurrency,
            postgres_url,
            json,
        } => {
            crate::block_on(crate::ledger::bench(
                json,
                settlements,
                concurrency,
                postgres_url.as_deref(),
            ))?;
        }
        BenchCommand::Verify {
            model,
            honest,
            per_adversary,
            max_tokens,
            p,
            thresholds,
            json,
        } => {
            let f = bench_verify(&model, honest, per_adversary, max_tokens, p, thresholds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                println!("| behaviour | jobs | flagged | rate |");
                println!("|---|---|---|---|");
                for r in std::iter::once(&f.honest)
                    .chain(&f.honest_rules)
                    .chain(&f.adversaries)
                {
                    println!(
                        "| {} | {} | {} | {:.1}% |",
                        r.behaviour,
                        r.jobs,
                        r.flagged,
                        100.0 * r.rate
                    );
                }
                println!();
                println!("| figure | value |");
                println!("|---|---|");
                println!("| honest max abs Δ (f16) | {:.4} |", f.honest_max_abs_delta);
                println!(
                    "| thresholds (max Δ / mean Δ / token slack) | {:.3} / {:.3} / {:.3} |",
                    f.thresholds.max_abs, f.thresholds.mean_abs, f.thresholds.token_slack
                );
                println!(
                    "| commitment bytes per token (binary / JSON base64) | {:.1} / {:.1} |",
                    f.commitment_bytes_per_token, f.commitment_json_bytes_per_token
                );
                println!(
                    "| generation, {} + {} tokens | {:.2} s |",
                    f.cost_prompt_tokens, f.cost_answer_tokens, f.generation_s
                );
                println!("| one check (teacher-forced pass) | {:.2} s |", f.check_s);
                println!(
                    "| check / generation | {:.1}% |",
                    100.0 * f.check_fraction_of_generation
                );
                println!(
                    "| amortized overhead at p = {} | {:.2}% |",
                    f.sampling_rate_p,
                    100.0 * f.amortized_overhead
                );
            }
        }
    }
    Ok(())
}
