//! The work a node does for the hub: a job through the batching engine service with a commitment
//! built from the logits it computed, and a verification by one teacher-forced pass.

use std::sync::atomic::{AtomicBool, Ordering};

use tessera_engine::{Event, FinishReason, GenerateOptions};
use tessera_proof::{Claim, CommitmentBuilder, Finish, JobSpec, Thresholds};
use tessera_wire::{Commitment, FailureKind, JobRequest, JobResult, NodeMessage};
use tokio::sync::mpsc::UnboundedSender;

use crate::Node;

impl Node {
    /// The prompt tokens of a request under this node's model and template.
    fn prompt_tokens(&self, request: &JobRequest) -> Vec<u32> {
        match &request.prompt {
            Some(text) => self.engine.completion_prompt(text),
            None => self.engine.chat_prompt(&request.messages),
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
    let fail = |kind, message: String| {
        let _ = tx.send(NodeMessage::Failed { job, kind, message });
    };
    let prompt = node.prompt_tokens(&request);
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
    let options = GenerateOptions {
        max_tokens: request.max_tokens as usize,
        sampling: request.sampling.clone(),
        stop: request.stop.clone(),
        ignore_eos: false,
    };
    let mut builder = CommitmentBuilder::new(node.spec(&request, prompt.clone()));
    let events = match node.service.submit(prompt.clone(), options, true) {
        Ok(events) => events,
        Err(e) => return fail(FailureKind::Unavailable, e.to_string()),
    };
    for event in events.iter() {
        if cancel.load(Ordering::Relaxed) {
            tracing::info!(job, "job cancelled by the hub");
            return; // dropping `events` cancels the sequence in the engine
        }
        match event {
            Event::Token {
                token,
                text,
                logits,
            } => {
                if let Some(logits) = logits {
                    builder.push(&logits, token);
                }
                if tx.send(NodeMessage::Token { job, text }).is_err() {
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
                let result = JobResult {
                    prompt_tokens: prompt.len() as u32,
                    output_tokens: generation.tokens,
                    text: generation.text,
                    finish,
                    commitment: builder.finish(finish),
                };
                tracing::info!(
                    job,
                    tokens = result.output_tokens.len(),
                    ?finish,
                    "job done"
                );
                let _ = tx.send(NodeMessage::Done { job, result });
                return;
            }
            Event::Failed(message) => return fail(FailureKind::Engine, message),
        }
    }
    fail(FailureKind::Engine, "the engine stopped".into());
}

/// Checks another provider's job against this node's copy of the model.
pub(crate) fn verify(
    node: &Node,
    id: u64,
    request: &JobRequest,
    output_tokens: Vec<u32>,
    commitment: Commitment,
) -> NodeMessage {
    let _one_at_a_time = node.verify_lock.lock().unwrap_or_else(|p| p.into_inner());
    let spec = node.spec(request, node.prompt_tokens(request));
    let job = tessera_proof::Job {
        model: node.engine.info().name.clone(),
        spec,
        claim: Claim {
            output_tokens,
            stop_sequence_seen: false,
        },
        commitment,
        output_text: String::new(),
    };
    match tessera_proof::verify(&node.engine, &job, &Thresholds::default()) {
        Ok(verdict) => {
            tracing::info!(id, passed = verdict.passed, reason = ?verdict.reason, "verified a job");
            NodeMessage::Verdict {
                id,
                passed: verdict.passed,
                reason: verdict.reason.map(|r| r.to_string()),
                error: None,
            }
        }
        Err(e) => NodeMessage::Verdict {
            id,
            passed: false,
            reason: None,
            error: Some(e.to_string()),
        },
    }
}
