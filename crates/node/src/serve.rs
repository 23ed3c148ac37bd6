//! The work a node does for the hub: a job through the batching engine service with a commitment
//! built from the logits it computed, and a verification by one teacher-forced pass.

use std::sync::atomic::{AtomicBool, Ordering};

use tessera_engine::{Event, FinishReason, GenerateOptions};
use tessera_proof::commitment::{hash_tokens, position_bits};
use tessera_proof::{Claim, Finish, JobSpec, Thresholds};
use tessera_types::logprobs::token_logprobs;
use tessera_wire::{Commitment, FailureKind, JobRequest, NodeMessage, TokenLogprobs, Verdict};
use tokio::sync::mpsc::UnboundedSender;

use crate::Node;

impl Node {
    /// The check itself; a test-only lazy or lying verifier answers without it.
    fn check(&self, job: &tessera_proof::Job) -> tessera_proof::Result<tessera_proof::Verdict> {
        #[cfg(feature = "adversary")]
        if let Some(verdict) = crate::adversary::scripted_verdict(self.config.cheat) {
            return Ok(verdict);
        }
        tessera_proof::verify(&self.engine, job, &Thresholds::default())
    }

    /// The prompt tokens of a request under this node's model and template.
    /// Refuses prompts over the engine's text limit before tokenizing any of it.
    fn prompt_tokens(&self, request: &JobRequest) -> tessera_engine::Result<Vec<u32>> {
        match &request.prompt {
            Some(text) => self.engine.try_completion_prompt(text),
            None => self.engine.try_chat_prompt(request),
        }
    }

    fn spec(&self, request: &JobRequest, prompt_tokens: Vec<u32>) -> JobSpec {
        JobSpec {
            model_sha256: self.engine.info().sha256.clone(),
            prompt_tokens,
            sampling: request.sampling.clone(),
            max_tokens: request.max_tokens,
            stop: request.stop.clone(),
        }
    }
}

/// Runs one job to completion (or cancellation), sending its tokens and result on `tx`.
pub(crate) fn job(
    node: &Node,
    job: u64,
    request: JobRequest,
    tx: &UnboundedSender<NodeMessage>,
    cancel: &AtomicBool,
) {
    let prompt = match node.prompt_tokens(&request) {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(NodeMessage::Failed {
                job,
                kind: FailureKind::ContextLength,
                message: e.to_string(),
                prompt_hash: None,
            });
            return;
        }
    };
    let prompt_hash = hash_tokens(&prompt);
    let fail = |kind, message: String| {
        let _ = tx.send(NodeMessage::Failed {
            job,
            kind,
            message,
            prompt_hash: Some(prompt_hash.clone()),
        });
    };
    let context = node.engine.info().context_length;
    if prompt.len() + request.max_tokens as usize > context {
        let message = format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the messages, {} in the completion).",
            prompt.len() + request.max_tokens as usize,
            prompt.len(),
            request.max_tokens
        );
        return fail(FailureKind::ContextLength, message);
    }
    // A grammar that does not compile is refused before any token (and so before any charge).
    if let Some(grammar) = &request.sampling.grammar {
        if let Err(e) = node.engine.grammar().and_then(|g| g.compile(grammar)) {
            return fail(FailureKind::InvalidGrammar, e.to_string());
        }
    }
    #[allow(unused_mut)]
    let mut options = GenerateOptions {
        max_tokens: request.max_tokens as usize,
        sampling: request.sampling.clone(),
        stop: request.stop.clone(),
        ignore_eos: false,
    };
    #[cfg(feature = "adversary")]
    if node.config.cheat == Some(crate::Cheat::IgnoreGrammar) {
        options.sampling.grammar = None;
    }
    #[cfg(feature = "adversary")]
    if node.config.cheat == Some(crate::Cheat::IgnorePenalties) {
        options.sampling.presence_penalty = 0.0;
        options.sampling.frequency_penalty = 0.0;
        options.sampling.logit_bias.clear();
    }
    let events = match node.service.submit(prompt.clone(), options, true) {
        Ok(events) => events,
        Err(e) => return fail(FailureKind::Unavailable, e.to_string()),
    };
    #[cfg(feature = "adversary")]
    let mut sent: Vec<(u32, [u16; 5])> = Vec::new();
    // The output so far, for the penalties in the reported log-probabilities.
    let mut history: Vec<u32> = Vec::new();
    for event in events.iter() {
        if cancel.load(Ordering::Relaxed) {
            tracing::info!(job, "job cancelled by the hub");
            return; // dropping `events` cancels the sequence in the engine
        }
        match event {
            Event::Token { token, logits, .. } => {
                let Some(logits) = logits else {
                    return fail(FailureKind::Engine, "the engine gave no logits".into());
                };
                let values = position_bits(&logits, token);
                #[cfg(feature = "adversary")]
                sent.push((token, values));
                #[allow(unused_mut)]
                let mut logprobs = request.logprobs.map(|k| {
                    token_logprobs(&logits, &request.sampling, &history, token, k as usize)
                });
                #[cfg(feature = "adversary")]
                if node.config.cheat == Some(crate::Cheat::FakeLogprobs) {
                    logprobs = logprobs.map(crate::adversary::fake_logprobs);
                }
                if request.logprobs.is_some() {
                    history.push(token);
                }
                let message = NodeMessage::Token {
                    job,
                    token,
                    values,
                    logprobs,
                };
                if tx.send(message).is_err() {
                    return;
                }
            }
            Event::Done(generation) => {
                let finish = match generation.finish_reason {
                    FinishReason::Stop
                        if generation
                            .tokens
                            .last()
                            .is_some_and(|t| node.engine.stop_tokens().contains(t)) =>
                    {
                        Finish::Eos
                    }
                    FinishReason::Stop => Finish::StopSequence,
                    FinishReason::Length => Finish::Length,
                    FinishReason::Cancelled => Finish::Cancelled,
                };
                tracing::info!(job, tokens = generation.tokens.len(), ?finish, "job done");
                #[cfg(feature = "adversary")]
                if node.config.cheat == Some(crate::Cheat::PadTokens) {
                    for &(token, values) in &sent {
                        let logprobs = None;
                        let _ = tx.send(NodeMessage::Token {
                            job,
                            token,
                            values,
                            logprobs,
                        });
                    }
                }
                let _ = tx.send(NodeMessage::Done {
                    job,
                    prompt_tokens: prompt.len() as u32,
                    prompt_hash,
                    finish,
                });
                return;
            }
            Event::Failed(message) => return fail(FailureKind::Engine, message),
        }
    }
    fail(FailureKind::Engine, "the engine stopped".into());
}

/// What a scoring request asks: a claimed generation and its commitment.
pub(crate) struct ScoreRequest {
    pub id: u64,
    pub request: JobRequest,
    pub output_tokens: Vec<u32>,
    pub commitment: Commitment,
    pub partial: bool,
    pub prompt_tokens: Option<u32>,
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

/// Checks a claimed generation against this node's copy of the model by one teacher-forced pass.
pub(crate) fn score(node: &Node, score: ScoreRequest) -> NodeMessage {
    let ScoreRequest {
        id,
        request,
        output_tokens,
        commitment,
        partial,
        prompt_tokens,
        logprobs,
    } = score;
    let request = &request;
    let _one_at_a_time = node.verify_lock.lock().unwrap_or_else(|p| p.into_inner());
    let prompt = match node.prompt_tokens(request) {
        Ok(p) => p,
        Err(e) => {
            let verdict = Verdict::Inconclusive {
                error: e.to_string(),
            };
            return NodeMessage::Scored { id, verdict };
        }
    };
    let spec = node.spec(request, prompt);
    let job = tessera_proof::Job {
        model: node.engine.info().name.clone(),
        spec,
        claim: Claim {
            output_tokens,
            stop_sequence_seen: false,
            partial,
            prompt_tokens,
            logprobs,
        },
        commitment,
        output_text: String::new(),
    };
    let verdict = match node.check(&job) {
        Ok(outcome) if outcome.passed => Verdict::Pass,
        Ok(outcome) => Verdict::Fail {
            reason: outcome
                .reason
                .map_or_else(|| "failed".to_owned(), |r| r.to_string()),
        },
        Err(e) => Verdict::Inconclusive {
            error: e.to_string(),
        },
    };
    tracing::info!(id, ?verdict, "scored a claimed generation");
    NodeMessage::Scored { id, verdict }
}
