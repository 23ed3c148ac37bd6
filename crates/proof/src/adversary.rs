//! Cheating providers, for tests, benchmarks and the demo only (the `adversary` feature): the
//! behaviours verification must catch.

use serde::{Deserialize, Serialize};
use tessera_engine::sampling::Grammar;
use tessera_engine::{Engine, Message, Role, SamplingParams};

use crate::check::Claim;
use crate::commitment::{position_values, CommitmentBuilder, Finish, JobSpec};
use crate::error::{Error, Result};
use crate::harness::{generate_runs, logprobs_of, mix, serve_with_logits, Job, Run, Task};

/// A cheating provider's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adversary {
    /// Another, cheaper model answers, re-tokenized ([`other_model`]: Gemma 3 270M for SmolLM2,
    /// SmolLM2 for the others).
    OtherModel,
    /// The same model re-quantized to Q4_0.
    RequantizedQ4_0,
    /// The same model with its last layers skipped.
    SkippedLayers,
    /// One token of a long answer replaced by one the model would not emit.
    EditedToken,
    /// The answer cut in half and ended with an end-of-turn token, presented as complete.
    TruncatedAnswer,
    /// The system prompt silently dropped.
    DroppedSystemPrompt,
    /// Sampled with another seed than requested.
    WrongSeed,
    /// Sampled at another temperature than requested (or sampled when greedy was requested).
    WrongTemperature,
    /// Another job's output and commitment values replayed for this job.
    Replay,
    /// Generated without the requested grammar (`response_format: json_object`), claimed under it.
    IgnoredGrammar,
    /// Generated without the requested penalties and `logit_bias` (a bias of −100 against the
    /// token the model would start with, and frequency/presence penalties), claimed under them.
    IgnoredPenalties,
    /// Honest tokens and commitment, but invented log-probabilities (`logprobs`) reported.
    FakeLogprobs,
}

impl Adversary {
    /// Every behaviour, in report order.
    pub const ALL: [Adversary; 12] = [
        Adversary::OtherModel,
        Adversary::RequantizedQ4_0,
        Adversary::SkippedLayers,
        Adversary::EditedToken,
        Adversary::TruncatedAnswer,
        Adversary::DroppedSystemPrompt,
        Adversary::WrongSeed,
        Adversary::WrongTemperature,
        Adversary::Replay,
        Adversary::IgnoredGrammar,
        Adversary::IgnoredPenalties,
        Adversary::FakeLogprobs,
    ];

    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Adversary::OtherModel => "other model",
            Adversary::RequantizedQ4_0 => "re-quantized to Q4_0",
            Adversary::SkippedLayers => "last 2 layers skipped",
            Adversary::EditedToken => "one edited token",
            Adversary::TruncatedAnswer => "truncated, claimed complete",
            Adversary::DroppedSystemPrompt => "system prompt dropped",
            Adversary::WrongSeed => "wrong seed",
            Adversary::WrongTemperature => "wrong temperature",
            Adversary::Replay => "replayed output",
            Adversary::IgnoredGrammar => "JSON grammar ignored",
            Adversary::IgnoredPenalties => "penalties and logit_bias ignored",
            Adversary::FakeLogprobs => "invented logprobs",
        }
    }

    /// Whether this behaviour needs sampled (not greedy) requests to exist at all.
    pub fn needs_sampling(&self) -> bool {
        matches!(self, Adversary::WrongSeed)
    }
}

/// The cheaper model an [`Adversary::OtherModel`] provider serves instead of `model`: Gemma 3
/// 270M for SmolLM2 (the smallest model has no cheaper one, so a different one of similar cost),
/// and SmolLM2 135M, the cheapest, for every other model (the Qwen2.5 models).
pub fn other_model(model: &str) -> &'static str {
    if model == "smollm2-135m" {
        "gemma3-270m"
    } else {
        "smollm2-135m"
    }
}

/// The engines a cheating provider runs besides the honest model.
pub struct CheatEngines<'a> {
    /// The honest model (for behaviours that edit honest output).
    pub honest: &'a Engine,
    /// Another model ([`other_model`]).
    pub other: &'a Engine,
    /// The honest model re-quantized to Q4_0.
    pub requantized: &'a Engine,
    /// The honest model with its last layers skipped.
    pub skipped: &'a Engine,
}

/// Produces cheating jobs for `tasks` (all specs on the honest model). `salt` varies random choices.
pub fn cheat(
    adversary: Adversary,
    engines: &CheatEngines<'_>,
    tasks: &[Task],
    salt: u64,
) -> Result<Vec<Job>> {
    let honest = engines.honest;
    let specs: Vec<JobSpec> = tasks.iter().map(|t| t.spec(honest)).collect();
    let same = |engine: &Engine| -> Result<Vec<Job>> {
        let runs = specs
            .iter()
            .map(|s| Run {
                prompt: s.prompt_tokens.clone(),
                sampling: s.sampling.clone(),
                spec: s.clone(),
            })
            .collect();
        Ok(generate_runs(engine, runs, false)?
            .into_iter()
            .map(|s| s.job)
            .collect())
    };
    match adversary {
        Adversary::RequantizedQ4_0 => same(engines.requantized),
        Adversary::IgnoredGrammar => {
            // The job asks for a JSON object; the cheater samples freely and claims the grammar.
            let runs = specs
                .iter()
                .map(|s| {
                    let mut spec = s.clone();
                    spec.sampling.grammar = Some(Grammar::JsonObject);
                    Run {
                        prompt: s.prompt_tokens.clone(),
                        sampling: s.sampling.clone(),
                        spec,
                    }
                })
                .collect();
            Ok(generate_runs(honest, runs, false)?
                .into_iter()
                .map(|s| s.job)
                .collect())
        }
        Adversary::IgnoredPenalties => {
            // Sampled with the plain rule; the claimed rule penalises repeats and bans (bias
            // −100) the very token the plain rule starts with.
            let mut jobs = same(honest)?;
            for job in &mut jobs {
                let first = job.claim.output_tokens.first().copied().unwrap_or(0);
                let sampling = &mut job.spec.sampling;
                sampling.frequency_penalty = 1.0;
                sampling.presence_penalty = 1.0;
                sampling.logit_bias = vec![(first, -100.0)];
                job.commitment.sampling = sampling.clone();
            }
            Ok(jobs)
        }
        Adversary::FakeLogprobs => {
            let served = serve_with_logits(honest, &specs)?;
            Ok(served
                .into_iter()
                .map(|s| {
                    let mut job = s.job;
                    let honest = logprobs_of(&job, &s.logits, 3);
                    // Every token near certain, the alternatives equally likely.
                    let fake = honest
                        .into_iter()
                        .map(|mut lp| {
                            lp.logprob = -0.01;
                            for (_, v) in &mut lp.top {
                                *v = -(3f32.ln());
                            }
                            lp
                        })
                        .collect();
                    job.claim.logprobs = Some(fake);
                    job
                })
                .collect())
        }
        Adversary::SkippedLayers => same(engines.skipped),
        Adversary::DroppedSystemPrompt => {
            let runs = tasks
                .iter()
                .zip(&specs)
                .map(|(t, s)| {
                    let kept: Vec<Message> = t
                        .messages
                        .iter()
                        .filter(|m| m.role != Role::System)
                        .cloned()
                        .collect();
                    // ChatML models insert a default system prompt when none is given: drop the whole turn.
                    let mut prompt = honest.chat_prompt(&kept);
                    if let Some(start) = honest.tokenizer().token_id("<|im_start|>") {
                        let turns: Vec<usize> = prompt
                            .iter()
                            .enumerate()
                            .filter(|(_, &t)| t == start)
                            .map(|(i, _)| i)
                            .collect();
                        if turns.len() > 2 && kept.len() + 1 < turns.len() {
                            prompt.drain(turns[0]..turns[1]);
                        }
                    }
                    Run {
                        prompt,
                        sampling: s.sampling.clone(),
                        spec: s.clone(),
                    }
                })
                .collect();
            Ok(generate_runs(honest, runs, false)?
                .into_iter()
                .map(|s| s.job)
                .collect())
        }
        Adversary::WrongSeed | Adversary::WrongTemperature => {
            let runs = specs
                .iter()
                .map(|s| {
                    let mut sampling = s.sampling.clone();
                    if adversary == Adversary::WrongSeed {
                        sampling.seed = s.sampling.seed.wrapping_add(1 + salt);
                    } else if sampling.is_greedy() {
                        sampling = SamplingParams::seeded(0.8, mix(salt));
                    } else {
                        sampling.temperature = if sampling.temperature > 0.6 {
                            sampling.temperature * 0.5
                        } else {
                            sampling.temperature * 2.0
                        };
                    }
                    Run {
                        prompt: s.prompt_tokens.clone(),
                        sampling,
                        spec: s.clone(),
                    }
                })
                .collect();
            Ok(generate_runs(honest, runs, false)?
                .into_iter()
                .map(|s| s.job)
                .collect())
        }
        Adversary::OtherModel => {
            let other = engines.other;
            let runs = tasks
                .iter()
                .zip(&specs)
                .map(|(t, s)| {
                    let mut spec = s.clone();
                    spec.model_sha256 = other.info().sha256.clone();
                    Run {
                        prompt: other.chat_prompt(&t.messages),
                        sampling: s.sampling.clone(),
                        spec,
                    }
                })
                .collect();
            let served = generate_runs(other, runs, true)?;
            Ok(served
                .into_iter()
                .zip(&specs)
                .map(|(s, spec)| {
                    // Re-tokenize the other model's text for the claimed model; commit the other
                    // model's logit values position by position (all the cheater has).
                    let mut tokens = honest.tokenizer().encode(&s.job.output_text);
                    tokens.truncate(spec.max_tokens as usize - 1);
                    tokens.push(honest.stop_tokens()[honest.stop_tokens().len() - 1]);
                    let mut b = CommitmentBuilder::new(spec.clone());
                    for (i, &t) in tokens.iter().enumerate() {
                        let row = &s.logits[i.min(s.logits.len() - 1)];
                        let mut v = position_values(row, 0);
                        v[0] = v[1];
                        b.push_values(t, v);
                    }
                    let commitment = b.finish(Finish::Eos);
                    Job {
                        model: honest.info().name.clone(),
                        spec: spec.clone(),
                        claim: Claim {
                            output_tokens: tokens,
                            stop_sequence_seen: false,
                            ..Claim::default()
                        },
                        commitment,
                        output_text: s.job.output_text,
                    }
                })
                .collect())
        }
        Adversary::EditedToken | Adversary::TruncatedAnswer | Adversary::Replay => {
            let served = serve_with_logits(honest, &specs)?;
            let vocab = honest.vocab_size() as u64;
            let mut out = Vec::with_capacity(served.len());
            for (k, s) in served.iter().enumerate() {
                let tokens = &s.job.claim.output_tokens;
                let values = s.job.commitment.decode_values().map_err(Error::BadJob)?;
                let spec = s.job.spec.clone();
                let mut b = CommitmentBuilder::new(spec.clone());
                let finish;
                match adversary {
                    Adversary::EditedToken => {
                        let at = tokens.len() / 2;
                        let mut r = mix(salt ^ (k as u64) << 20);
                        let replacement = loop {
                            let t = (r % vocab) as u32;
                            if t != tokens[at]
                                && !honest.stop_tokens().contains(&t)
                                && !honest.tokenizer().is_control(t)
                            {
                                break t;
                            }
                            r = mix(r);
                        };
                        for (i, (&t, v)) in tokens.iter().zip(&values).enumerate() {
                            if i == at {
                                // The cheater knows the true logits at the edited position.
                                b.push(&s.logits[i], replacement);
                            } else {
                                b.push_values(t, *v);
                            }
                        }
                        finish = s.job.commitment.finish;
                    }
                    Adversary::TruncatedAnswer => {
                        let cut = (tokens.len() / 2).max(1);
                        for (&t, v) in tokens[..cut].iter().zip(&values) {
                            b.push_values(t, *v);
                        }
                        let eos = honest.stop_tokens()[honest.stop_tokens().len() - 1];
                        if cut < s.logits.len() {
                            b.push(&s.logits[cut], eos);
                        } else {
                            b.push(&s.logits[cut - 1], eos);
                        }
                        finish = Finish::Eos;
                    }
                    _ => {
                        // Replay the next job's output and commitment values.
                        let other = &served[(k + 1) % served.len()];
                        let ov = other
                            .job
                            .commitment
                            .decode_values()
                            .map_err(Error::BadJob)?;
                        let budget = spec.max_tokens as usize;
                        for (&t, v) in other.job.claim.output_tokens.iter().zip(&ov).take(budget) {
                            b.push_values(t, *v);
                        }
                        finish = if b.tokens().len() < other.job.claim.output_tokens.len() {
                            Finish::Length
                        } else {
                            other.job.commitment.finish
                        };
                    }
                }
                let output_tokens = b.tokens().to_vec();
                let commitment = b.finish(finish);
                out.push(Job {
                    model: honest.info().name.clone(),
                    spec,
                    claim: Claim {
                        output_tokens,
                        stop_sequence_seen: false,
                        ..Claim::default()
                    },
                    commitment,
                    output_text: String::new(),
                });
            }
            Ok(out)
        }
    }
}
