//! Providers and verifiers on a real engine: an honest provider that generates and commits, the
//! cheating behaviours verification must catch, and the verifier's teacher-forced check. Tests, the
//! `tessera verify` commands and the adversarial benchmark all use these.

use serde::{Deserialize, Serialize};
use tessera_engine::{Engine, FinishReason, GenerateOptions, Message, Role, SamplingParams};

use crate::check::{check_constrained, Claim, Reason, Thresholds, Verdict};
use crate::commitment::{Commitment, CommitmentBuilder, Finish, JobSpec};
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
pub(crate) struct Run {
    pub(crate) prompt: Vec<u32>,
    pub(crate) sampling: SamplingParams,
    pub(crate) spec: JobSpec,
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
        FinishReason::Stop
            if tokens
                .last()
                .is_some_and(|t| engine.stop_tokens().contains(t)) =>
        {
            Finish::Eos
        }
        FinishReason::Stop => Finish::StopSequence,
        FinishReason::Length => Finish::Length,
        FinishReason::Cancelled => Finish::Cancelled,
    }
}

pub(crate) fn generate_runs(
    engine: &Engine,
    runs: Vec<Run>,
    keep_logits: bool,
) -> Result<Vec<Served>> {
    let requests: Vec<(Vec<u32>, GenerateOptions)> = runs
        .iter()
        .map(|r| {
            let options = GenerateOptions {
                max_tokens: r.spec.max_tokens as usize,
                sampling: r.sampling.clone(),
                stop: r.spec.stop.clone(),
                ignore_eos: false,
            };
            (r.prompt.clone(), options)
        })
        .collect();
    let mut builders: Vec<CommitmentBuilder> = runs
        .iter()
        .map(|r| CommitmentBuilder::new(r.spec.clone()))
        .collect();
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
                    claim: Claim {
                        output_tokens: g.tokens,
                        stop_sequence_seen,
                        ..Claim::default()
                    },
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
}

/// Like [`serve`], keeping the logits of each generated position.
pub fn serve_with_logits(engine: &Engine, specs: &[JobSpec]) -> Result<Vec<Served>> {
    let runs = specs
        .iter()
        .map(|s| Run {
            prompt: s.prompt_tokens.clone(),
            sampling: s.sampling.clone(),
            spec: s.clone(),
        })
        .collect();
    generate_runs(engine, runs, true)
}

/// The log-probabilities an honest provider reports for a served job (`top` alternatives per
/// token), from the logits it generated with.
pub fn logprobs_of(
    job: &Job,
    logits: &[Vec<f32>],
    top: usize,
) -> Vec<tessera_types::TokenLogprobs> {
    let tokens = &job.claim.output_tokens;
    tokens
        .iter()
        .zip(logits)
        .enumerate()
        .map(|(i, (&t, row))| {
            tessera_types::logprobs::token_logprobs(row, &job.spec.sampling, &tokens[..i], t, top)
        })
        .collect()
}

/// The verifier: one teacher-forced pass over prompt + output on its own copy of the model, then
/// [`check`]. The engine must hold the model the job names.
pub fn verify(engine: &Engine, job: &Job, thresholds: &Thresholds) -> Result<Verdict> {
    if engine.info().sha256 != job.spec.model_sha256 {
        return Ok(Verdict {
            passed: false,
            reason: Some(Reason::WrongModel {
                expected: job.spec.model_sha256.clone(),
                found: engine.info().sha256.clone(),
            }),
            stats: Default::default(),
        });
    }
    // Binding first: a malformed or misbound commitment needs no forward pass.
    if let Err(reason) = crate::check::check_binding(&job.spec, &job.claim, &job.commitment) {
        return Ok(Verdict {
            passed: false,
            reason: Some(reason),
            stats: Default::default(),
        });
    }
    let output = &job.claim.output_tokens;
    if output.is_empty() {
        let reason = crate::check::check_binding(&job.spec, &job.claim, &job.commitment).err();
        return Ok(Verdict {
            passed: reason.is_none(),
            reason,
            stats: Default::default(),
        });
    }
    let vocab = engine.vocab_size();
    if let Some(&bad) = job
        .spec
        .prompt_tokens
        .iter()
        .chain(output)
        .find(|&&t| t as usize >= vocab)
    {
        let reason = Reason::Malformed {
            detail: format!("token id {bad} is outside the vocabulary"),
        };
        return Ok(Verdict {
            passed: false,
            reason: Some(reason),
            stats: Default::default(),
        });
    }
    let mut all = job.spec.prompt_tokens.clone();
    all.extend(output);
    let prompt_len = job.spec.prompt_tokens.len();
    // Row i of the pass predicts token i + 1: the output's rows start at prompt_len - 1, and the
    // last token's own row is not needed.
    let logits = engine.score_from(&all[..all.len() - 1], prompt_len - 1)?;
    let text = engine.tokenizer().decode(output, true);
    let claim = Claim {
        stop_sequence_seen: job
            .spec
            .stop
            .iter()
            .any(|s| !s.is_empty() && text.contains(s.as_str())),
        ..job.claim.clone()
    };
    // A grammar is replayed over the claimed tokens for the masks the provider had to respect.
    // One that does not compile here could not have been honestly served.
    let masks = match &job.spec.sampling.grammar {
        None => None,
        Some(grammar) => match engine.grammar_masks(grammar, output) {
            Ok(masks) => Some(masks),
            Err(e) => {
                return Ok(Verdict {
                    passed: false,
                    reason: Some(Reason::Malformed {
                        detail: e.to_string(),
                    }),
                    stats: Default::default(),
                })
            }
        },
    };
    Ok(check_constrained(
        &job.spec,
        &claim,
        &job.commitment,
        &logits,
        vocab,
        engine.stop_tokens(),
        thresholds,
        masks.as_deref(),
    ))
}

/// Reads a saved job.
pub fn read_job(json: &str) -> Result<Job> {
    serde_json::from_str(json).map_err(|e| Error::BadJob(e.to_string()))
}

/// A SplitMix64 finaliser: a cheap, well-mixed hash of a counter.
pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A varied set of chat tasks for tests, calibration and the benchmark: `n` tasks, a third greedy
/// and the rest seeded sampling at several temperatures, most with a system prompt.
pub fn tasks(n: usize, max_tokens: u32, salt: u64) -> Vec<Task> {
    const TOPICS: [&str; 20] = [
        "the moon",
        "volcanoes",
        "photosynthesis",
        "the Roman Empire",
        "black holes",
        "honey bees",
        "the internet",
        "rainbows",
        "chess",
        "the ocean tides",
        "electric cars",
        "the human heart",
        "glaciers",
        "coffee",
        "the printing press",
        "earthquakes",
        "penguins",
        "solar panels",
        "the Great Wall of China",
        "vaccines",
    ];
    const ASKS: [&str; 6] = [
        "Explain {} to a child.",
        "Write a short poem about {}.",
        "List three facts about {}.",
        "What is the most surprising thing about {}?",
        "Describe {} in one paragraph.",
        "Give me a quiz question about {} and its answer.",
    ];
    const SYSTEMS: [&str; 3] = [
        "You are a concise assistant.",
        "You are a friendly teacher who answers clearly.",
        "Answer like a careful scientist.",
    ];
    (0..n)
        .map(|i| {
            let h = mix(salt ^ i as u64);
            let topic = TOPICS[(h % TOPICS.len() as u64) as usize];
            let ask = ASKS[((h >> 8) % ASKS.len() as u64) as usize].replace("{}", topic);
            let mut messages = Vec::new();
            if !(h >> 16).is_multiple_of(5) {
                messages.push(Message::new(
                    Role::System,
                    SYSTEMS[((h >> 20) % 3) as usize],
                ));
            }
            messages.push(Message::new(Role::User, ask));
            let sampling = match i % 3 {
                0 => SamplingParams::greedy(),
                1 => SamplingParams::seeded(0.7, h >> 24),
                _ => SamplingParams {
                    top_k: Some(40),
                    top_p: Some(0.95),
                    ..SamplingParams::seeded(1.0, h >> 28)
                },
            };
            Task {
                messages,
                sampling,
                max_tokens,
            }
        })
        .collect()
}
