//! `tessera verify …`: check a saved job, calibrate thresholds, write sample jobs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use tessera_engine::{registry, Engine};
#[cfg(feature = "adversary")]
use tessera_engine::{LoadOptions, Variant};
#[cfg(feature = "adversary")]
use tessera_proof::{cheat, Adversary, CheatEngines};
use tessera_proof::{serve, tasks, verify, Thresholds};

/// Verification commands.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VerifyArgs {
    #[command(subcommand)]
    command: Option<VerifyCommand>,
    /// A saved job (request, output, commitment) to check.
    job: Option<PathBuf>,
    /// Thresholds file (default: the calibrated one in the cache, else built-in defaults).
    #[arg(long)]
    thresholds: Option<PathBuf>,
    /// Print the verdict as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum VerifyCommand {
    /// Measure honest variation (threads, batch sizes, incremental vs teacher-forced, kernels) and
    /// write the thresholds derived from it.
    Calibrate {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Honest jobs per provider set-up.
        #[arg(long, default_value_t = 40)]
        jobs: usize,
        #[arg(long, default_value_t = 48)]
        max_tokens: u32,
        /// Where to write the thresholds.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write a job served by an honest provider, or by a cheating one with --adversary.
    Sample {
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// other-model, requantized-q4-0, skipped-layers, edited-token, truncated-answer,
        /// dropped-system-prompt, wrong-seed, wrong-temperature, replay.
        #[arg(long)]
        adversary: Option<String>,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn thresholds_path() -> PathBuf {
    registry::cache_dir()
        .parent()
        .map(|p| p.join("thresholds.json"))
        .unwrap_or_else(|| PathBuf::from("thresholds.json"))
}

/// Thresholds from a file, the calibrated cache file, or the defaults.
pub fn load_thresholds(path: Option<&PathBuf>) -> anyhow::Result<Thresholds> {
    let p = path.cloned().unwrap_or_else(thresholds_path);
    match std::fs::read_to_string(&p) {
        Ok(s) => serde_json::from_str(&s)
            .with_context(|| format!("reading thresholds from {}", p.display())),
        Err(_) if path.is_none() => Ok(Thresholds::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

#[cfg(feature = "adversary")]
pub fn adversary_by_name(name: &str) -> anyhow::Result<Adversary> {
    let normal = name.replace('-', "_");
    serde_json::from_value(serde_json::Value::String(normal)).map_err(|_| {
        anyhow::anyhow!(
            "unknown adversary `{name}`; one of: {}",
            Adversary::ALL
                .map(|a| serde_json::to_string(&a).unwrap_or_default())
                .join(", ")
        )
    })
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    match args.command {
        Some(VerifyCommand::Calibrate {
            model,
            jobs,
            max_tokens,
            out,
            json,
        }) => {
            registry::fetch(&model).ok();
            let cal = tessera_proof::calibrate(&model, jobs, max_tokens)?;
            let out = out.unwrap_or_else(thresholds_path);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&cal.thresholds)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cal)?);
            } else {
                println!("| provider set-up (verifier: teacher-forced, default kernels) | jobs | flagged | max abs Δ | worst job mean Δ | worst token deficit |");
                println!("|---|---|---|---|---|---|");
                for c in &cal.conditions {
                    println!(
                        "| {} | {} | {} | {:.4} | {:.5} | {:.4} |",
                        c.name, c.jobs, c.flagged, c.max_abs, c.mean_abs, c.worst_deficit
                    );
                }
                let t = cal.thresholds;
                println!(
                    "\nthresholds: max |Δ| {:.3}, mean |Δ| {:.3}, token slack {:.3}  -> {}",
                    t.max_abs,
                    t.mean_abs,
                    t.token_slack,
                    out.display()
                );
            }
            Ok(())
        }
        Some(VerifyCommand::Sample {
            model,
            adversary,
            max_tokens,
            seed,
            out,
        }) => {
            registry::fetch(&model).ok();
            let honest = Engine::load(&model, None)?;
            let task = tasks(1, max_tokens, seed);
            let job = match adversary {
                None => serve(&honest, &[task[0].spec(&honest)])?.remove(0),
                #[cfg(not(feature = "adversary"))]
                Some(_) => anyhow::bail!(
                    "this build has no adversaries; build with `--features adversary`"
                ),
                #[cfg(feature = "adversary")]
                Some(name) => {
                    let adversary = adversary_by_name(&name)?;
                    let load = |variant| {
                        Engine::load_with(
                            &model,
                            &LoadOptions {
                                threads: None,
                                variant,
                                ..Default::default()
                            },
                        )
                    };
                    let other_name = tessera_proof::other_model(&model);
                    registry::fetch(other_name).ok();
                    let other = Engine::load(other_name, None)?;
                    let (requantized, skipped) = (
                        load(Variant::RequantizedQ4_0)?,
                        load(Variant::SkipLastLayers(2))?,
                    );
                    let engines = CheatEngines {
                        honest: &honest,
                        other: &other,
                        requantized: &requantized,
                        skipped: &skipped,
                    };
                    let mut t = task.clone();
                    if adversary.needs_sampling() && t[0].sampling.is_greedy() {
                        t[0].sampling = tessera_engine::SamplingParams::seeded(0.8, seed);
                    }
                    cheat(adversary, &engines, &t, seed)?.remove(0)
                }
            };
            std::fs::write(&out, serde_json::to_string_pretty(&job)?)?;
            println!(
                "wrote {} ({} output tokens)",
                out.display(),
                job.claim.output_tokens.len()
            );
            Ok(())
        }
        None => {
            let path = args
                .job
                .context("give a job file (tessera verify JOB.json) or a subcommand")?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let job = tessera_proof::read_job(&text)?;
            let thresholds = load_thresholds(args.thresholds.as_ref())?;
            let engine = Engine::load(&job.model, None)?;
            let verdict = verify(&engine, &job, &thresholds)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&verdict)?);
            } else {
                match &verdict.reason {
                    None => println!(
                        "PASS  {} positions, max |Δ| {:.4}, mean |Δ| {:.5}",
                        verdict.stats.positions, verdict.stats.max_abs, verdict.stats.mean_abs
                    ),
                    Some(r) => println!("FAIL  {r}"),
                }
            }
            if verdict.passed {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
