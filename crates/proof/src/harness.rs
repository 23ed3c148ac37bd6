//! Providers and verifiers on a real engine: an honest provider that generates and commits, the
//! cheating behaviours verification must catch, and the verifier's teacher-forced check. Tests, the
//! `tessera verify` commands and the adversarial benchmark all use these.

use serde::{Deserialize, Serialize};
use tessera_engine::{Engine, FinishReason, GenerateOptions, Message, Role, SamplingParams};

use crate::check::{check, Claim, Reason, Thresholds, Verdict};
use crate::commitment::{position_values, Commitment, CommitmentBuilder, Finish, JobSpec};
use crate::error::{Error, Result};

/// A saved job: what was asked, what was delivered and the provider's commitment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The model to verify with: a known name or a path (its sha256 must match the spec).
    pub model: String,
    /// The request.
    pub spec: JobSpec,
    /// The delivered output.
    pub claim: Claim,
    /// The provider's commitment.
    pub commitment: Commitment,
    /// The output as text (for people; not trusted).
    #[serde(default)]
    pub output_text: String,
}

/// A chat task: messages plus sampling, from which a [`JobSpec`] is built.
#[derive(Debug, Clone)]
pub struct Task {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling rule.
    pub sampling: SamplingParams,
    /// Token budget.
    pub max_tokens: u32,
}

impl Task {
    /// The job spec for this task on an engine's model.
    pub fn spec(&self, engine: &Engine) -> JobSpec {
        JobSpec {
            model_sha256: engine.info().sha256.clone(),
            prompt_tokens: engine.chat_prompt(&self.messages),
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: Vec::new(),
        }
    }
}

/// One generation to run: what is actually generated, and the spec it is claimed to answer.
struct Run {
    prompt: Vec<u32>,
    sampling: SamplingParams,
    spec: JobSpec,
}

/// A generated job plus the logits of every generated position (which a cheater may use).
pub struct Served {
    /// The job.
    pub job: Job,
    /// Logits rows of the generated positions, as the provider saw them.
    pub logits: Vec<Vec<f32>>,
}

fn finish_of(engine: &Engine, reason: FinishReason, tokens: &[u32]) -> Finish {
    match reason {
        FinishReason::Stop if tokens.last().is_some_and(|t| engine.stop_tokens().contains(t)) => Finish::Eos,
        FinishReason::Stop => Finish::StopSequence,
        FinishReason::Length => Finish::Length,
        FinishReason::Cancelled => Finish::Cancelled,
    }
}

fn generate_runs(engine: &Engine, runs: Vec<Run>, keep_logits: bool) -> Result<Vec<Served>> {
    let requests: Vec<(Vec<u32>, GenerateOptions)> = runs
        .iter()
        .map(|r| {
            let options = GenerateOptions { max_tokens: r.spec.max_tokens as usize, sampling: r.sampling.clone(), stop: r.spec.stop.clone(), ignore_eos: false };
            (r.prompt.clone(), options)
        })
        .collect();
    let mut builders: Vec<CommitmentBuilder> = runs.iter().map(|r| CommitmentBuilder::new(r.spec.clone())).collect();
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); runs.len()];
    let generations = engine.generate_batch(&requests, |s| {
        builders[s.sequence].push(s.logits, s.token);
        if keep_logits {
            logits[s.sequence].push(s.logits.to_vec());
        }
        true
    })?;
    Ok(generations
        .into_iter()
        .zip(builders)
        .zip(logits)
        .zip(runs)
        .map(|(((g, b), logits), run)| {
            let finish = finish_of(engine, g.finish_reason, &g.tokens);
            let commitment = b.finish(finish);
            let stop_sequence_seen = finish == Finish::StopSequence;
            Served {
                job: Job {
                    model: engine.info().name.clone(),
                    spec: run.spec,
                    claim: Claim { output_tokens: g.tokens, stop_sequence_seen },
                    commitment,
                    output_text: g.text,
                },
                logits,
            }
        })
        .collect())
}

/// An honest provider: generates every spec (decoded together) and commits to what it computed.
pub fn serve(engine: &Engine, specs: &[JobSpec]) -> Result<Vec<Job>> {
    let runs = specs.iter().map(|s| Run { prompt: s.prompt_tokens.clone(), sampling: s.sampling.clone(), spec: s.clone() }).collect();
    Ok(generate_runs(engine, runs, false)?.into_iter().map(|s| s.job).collect())
}

/// Like [`serve`], keeping the logits of each generated position.
pub fn serve_with_logits(engine: &Engine, specs: &[JobSpec]) -> Result<Vec<Served>> {
    let runs = specs.iter().map(|s| Run { prompt: s.prompt_tokens.clone(), sampling: s.sampling.clone(), spec: s.clone() }).collect();
    generate_runs(engine, runs, true)
}

/// The verifier: one teacher-forced pass over prompt + output on its own copy of the model, then
/// [`check`]. The engine must hold the model the job names.
pub fn verify(engine: &Engine, job: &Job, thresholds: &Thresholds) -> Result<Verdict> {
    if engine.info().sha256 != job.spec.model_sha256 {
        return Ok(Verdict {
            passed: false,
            reason: Some(Reason::WrongModel { expected: job.spec.model_sha256.clone(), found: engine.info().sha256.clone() }),
            stats: Default::default(),
        });
    }
    // Binding first: a malformed or misbound commitment needs no forward pass.
    if let Err(reason) = crate::check::check_binding(&job.spec, &job.claim, &job.commitment) {
        return Ok(Verdict { passed: false, reason: Some(reason), stats: Default::default() });
    }
    let output = &job.claim.output_tokens;
    if output.is_empty() {
        return Ok(Verdict { passed: job.commitment.positions == 0, reason: None, stats: Default::default() });
    }
    let vocab = engine.vocab_size();
    if let Some(&bad) = job.spec.prompt_tokens.iter().chain(output).find(|&&t| t as usize >= vocab) {
        let reason = Reason::Malformed { detail: format!("token id {bad} is outside the vocabulary") };
        return Ok(Verdict { passed: false, reason: Some(reason), stats: Default::default() });
    }
    let mut all = job.spec.prompt_tokens.clone();
    all.extend(output);
    let prompt_len = job.spec.prompt_tokens.len();
    // Row i of the pass predicts token i + 1: the output's rows start at prompt_len - 1, and the
    // last token's own row is not needed.
    let logits = engine.score_from(&all[..all.len() - 1], prompt_len - 1)?;
    let text = engine.tokenizer().decode(output, true);
    let claim = Claim { output_tokens: output.clone(), stop_sequence_seen: job.spec.stop.iter().any(|s| !s.is_empty() && text.contains(s.as_str())) };
    Ok(check(&job.spec, &claim, &job.commitment, &logits, vocab, engine.stop_tokens(), thresholds))
}

/// Reads a saved job.
pub fn read_job(json: &str) -> Result<Job> {
    serde_json::from_str(json).map_err(|e| Error::BadJob(e.to_string()))
}

/// A cheating provider's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adversary {
    /// Another, cheaper model answers (Gemma 3 270M for SmolLM2, re-tokenized).
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
}

impl Adversary {
    /// Every behaviour, in report order.
    pub const ALL: [Adversary; 9] = [
        Adversary::OtherModel,
        Adversary::RequantizedQ4_0,
        Adversary::SkippedLayers,
        Adversary::EditedToken,
        Adversary::TruncatedAnswer,
        Adversary::DroppedSystemPrompt,
        Adversary::WrongSeed,
        Adversary::WrongTemperature,
        Adversary::Replay,
    ];

    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Adversary::OtherModel => "other model (gemma3-270m)",
            Adversary::RequantizedQ4_0 => "re-quantized to Q4_0",
            Adversary::SkippedLayers => "last 2 layers skipped",
            Adversary::EditedToken => "one edited token",
            Adversary::TruncatedAnswer => "truncated, claimed complete",
            Adversary::DroppedSystemPrompt => "system prompt dropped",
            Adversary::WrongSeed => "wrong seed",
            Adversary::WrongTemperature => "wrong temperature",
            Adversary::Replay => "replayed output",
        }
    }

    /// Whether this behaviour needs sampled (not greedy) requests to exist at all.
    pub fn needs_sampling(&self) -> bool {
        matches!(self, Adversary::WrongSeed)
    }
}

/// The engines a cheating provider runs besides the honest model.
pub struct CheatEngines<'a> {
    /// The honest model (for behaviours that edit honest output).
    pub honest: &'a Engine,
    /// Another model (Gemma 3).
    pub other: &'a Engine,
    /// The honest model re-quantized to Q4_0.
    pub requantized: &'a Engine,
    /// The honest model with its last layers skipped.
    pub skipped: &'a Engine,
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Produces cheating jobs for `tasks` (all specs on the honest model). `salt` varies random choices.
pub fn cheat(adversary: Adversary, engines: &CheatEngines<'_>, tasks: &[Task], salt: u64) -> Result<Vec<Job>> {
    let honest = engines.honest;
    let specs: Vec<JobSpec> = tasks.iter().map(|t| t.spec(honest)).collect();
    let same = |engine: &Engine| -> Result<Vec<Job>> {
        let runs = specs.iter().map(|s| Run { prompt: s.prompt_tokens.clone(), sampling: s.sampling.clone(), spec: s.clone() }).collect();
        Ok(generate_runs(engine, runs, false)?.into_iter().map(|s| s.job).collect())
    };
    match adversary {
        Adversary::RequantizedQ4_0 => same(engines.requantized),
        Adversary::SkippedLayers => same(engines.skipped),
        Adversary::DroppedSystemPrompt => {
            let runs = tasks
                .iter()
                .zip(&specs)
                .map(|(t, s)| {
                    let kept: Vec<Message> = t.messages.iter().filter(|m| m.role != Role::System).cloned().collect();
                    // ChatML models insert a default system prompt when none is given: drop the whole turn.
                    let mut prompt = honest.chat_prompt(&kept);
                    if let Some(start) = honest.tokenizer().token_id("<|im_start|>") {
                        let turns: Vec<usize> = prompt.iter().enumerate().filter(|(_, &t)| t == start).map(|(i, _)| i).collect();
                        if turns.len() > 2 && kept.len() + 1 < turns.len() {
                            prompt.drain(turns[0]..turns[1]);
                        }
                    }
                    Run { prompt, sampling: s.sampling.clone(), spec: s.clone() }
                })
                .collect();
            Ok(generate_runs(honest, runs, false)?.into_iter().map(|s| s.job).collect())
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
                        sampling.temperature = if sampling.temperature > 0.6 { sampling.temperature * 0.5 } else { sampling.temperature * 2.0 };
                    }
                    Run { prompt: s.prompt_tokens.clone(), sampling, spec: s.clone() }
                })
                .collect();
            Ok(generate_runs(honest, runs, false)?.into_iter().map(|s| s.job).collect())
        }
        Adversary::OtherModel => {
            let other = engines.other;
            let runs = tasks
                .iter()
                .zip(&specs)
                .map(|(t, s)| {
                    let mut spec = s.clone();
                    spec.model_sha256 = other.info().sha256.clone();
                    Run { prompt: other.chat_prompt(&t.messages), sampling: s.sampling.clone(), spec }
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
                        claim: Claim { output_tokens: tokens, stop_sequence_seen: false },
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
                            if t != tokens[at] && !honest.stop_tokens().contains(&t) && !honest.tokenizer().is_control(t) {
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
                        let ov = other.job.commitment.decode_values().map_err(Error::BadJob)?;
                        let budget = spec.max_tokens as usize;
                        for (&t, v) in other.job.claim.output_tokens.iter().zip(&ov).take(budget) {
                            b.push_values(t, *v);
                        }
                        finish = if b.tokens().len() < other.job.claim.output_tokens.len() { Finish::Length } else { other.job.commitment.finish };
                    }
                }
                let output_tokens = b.tokens().to_vec();
                let commitment = b.finish(finish);
                out.push(Job {
                    model: honest.info().name.clone(),
                    spec,
                    claim: Claim { output_tokens, stop_sequence_seen: false },
                    commitment,
                    output_text: String::new(),
                });
            }
            Ok(out)
        }
    }
}

/// A varied set of chat tasks for tests, calibration and the benchmark: `n` tasks, a third greedy
/// and the rest seeded sampling at several temperatures, most with a system prompt.
pub fn tasks(n: usize, max_tokens: u32, salt: u64) -> Vec<Task> {
    const TOPICS: [&str; 20] = [
        "the moon", "volcanoes", "photosynthesis", "the Roman Empire", "black holes", "honey bees", "the internet", "rainbows",
        "chess", "the ocean tides", "electric cars", "the human heart", "glaciers", "coffee", "the printing press", "earthquakes",
        "penguins", "solar panels", "the Great Wall of China", "vaccines",
    ];
    const ASKS: [&str; 6] = [
        "Explain {} to a child.",
        "Write a short poem about {}.",
        "List three facts about {}.",
        "What is the most surprising thing about {}?",
        "Describe {} in one paragraph.",
        "Give me a quiz question about {} and its answer.",
    ];
    const SYSTEMS: [&str; 3] = ["You are a concise assistant.", "You are a friendly teacher who answers clearly.", "Answer like a careful scientist."];
    (0..n)
        .map(|i| {
            let h = mix(salt ^ i as u64);
            let topic = TOPICS[(h % TOPICS.len() as u64) as usize];
            let ask = ASKS[((h >> 8) % ASKS.len() as u64) as usize].replace("{}", topic);
            let mut messages = Vec::new();
            if !(h >> 16).is_multiple_of(5) {
                messages.push(Message::new(Role::System, SYSTEMS[((h >> 20) % 3) as usize]));
            }
            messages.push(Message::new(Role::User, ask));
            let sampling = match i % 3 {
                0 => SamplingParams::greedy(),
                1 => SamplingParams::seeded(0.7, h >> 24),
                _ => SamplingParams { top_k: Some(40), top_p: Some(0.95), ..SamplingParams::seeded(1.0, h >> 28) },
            };
            Task { messages, sampling, max_tokens }
        })
        .collect()
}
