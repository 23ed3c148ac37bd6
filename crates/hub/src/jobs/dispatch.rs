//! Dispatch: the job goes to the best candidate that answers, retried elsewhere while no token
//! has been produced; then the token stream, decoded by the hub itself.
//!
//! A provider streams token ids with their committed values, never text: the hub decodes the ids
//! with the model's own vocabulary (holding back what may become a stop string), so the text an
//! agent reads is exactly the tokens the commitment covers, and the hub builds the commitment from
//! the stream. Only tokens actually delivered are billed, never more than `max_tokens`; a token
//! outside the vocabulary, a token after an end-of-turn token, or more tokens than asked for is a
//! protocol violation that is not paid.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_types::commitment::CommitmentBuilder;
use tessera_types::{
    Commitment, FailureKind, Finish, JobRequest, JobSpec, TextDecoder, TokenLogprobs,
};
use tokio::sync::mpsc;

use crate::catalog::ModelEntry;
use crate::error::ApiError;
use crate::jobs::{Admitted, Hold, Ticket};
use crate::metrics::inc;
use crate::registry::{Connection, JobEvent};
use crate::Hub;

/// A job whose provider has produced its first event.
pub struct Running {
    ticket: Option<Ticket>,
    /// The serving provider.
    pub provider: Arc<Connection>,
    /// The model.
    pub model: Arc<ModelEntry>,
    /// What was asked.
    pub request: JobRequest,
    /// The most prompt tokens the request can have (a provider claiming more is capped).
    pub prompt_bound: u32,
    job: u64,
    first: Option<JobEvent>,
    events: mpsc::Receiver<JobEvent>,
    decoder: TextDecoder,
    builder: CommitmentBuilder,
    /// The log-probabilities of the delivered tokens, when the job asked for them.
    logprobs: Vec<TokenLogprobs>,
    token_timeout: Duration,
    finished: bool,
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The provider finished, for this reason.
    Finished(Finish),
    /// The provider failed, went silent or disconnected mid-generation.
    Broken(String),
    /// The agent went away.
    ClientGone,
    /// The provider broke the protocol; nothing is paid.
    Violation(String),
}

/// What a stream produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Text delivered to the agent.
    pub text: String,
    /// Tokens delivered (the billed completion tokens).
    pub tokens: Vec<u32>,
    /// Prompt tokens the provider claimed (checked by verifiers), when it finished.
    pub prompt_tokens: Option<u32>,
    /// The prompt tokens billed: the claim, capped at what the request can have.
    pub billed_prompt_tokens: u64,
    /// How it ended.
    pub end: End,
    /// The commitment to the delivered tokens, built by the hub from the stream.
    pub commitment: Commitment,
    /// The provider's log-probabilities of the delivered tokens (one per token), when the job
    /// asked for them: reported to the agent and recomputed by a verifier.
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

impl Outcome {
    /// Whether the job broke off before finishing (its check is a partial one).
    pub fn partial(&self) -> bool {
        !matches!(self.end, End::Finished(_))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            // Whatever the reason (the agent left, the handler was cancelled), stop the work.
            self.provider.cancel_job(self.job);
        }
    }
}

impl Hub {
    /// Sends the job to the best candidate that answers; retries elsewhere while no token has
    /// been produced. Refunds the escrow when every candidate fails.
    pub async fn dispatch(
        &self,
        admitted: Admitted,
        request: &JobRequest,
    ) -> Result<Running, ApiError> {
        let Admitted {
            ticket,
            candidates,
            model,
            prompt_bound,
        } = admitted;
        let timeout = Duration::from_secs(self.config.first_token_timeout_secs);
        for (attempt, provider) in candidates.into_iter().enumerate() {
            if attempt > 0 {
                inc(&self.metrics.retries);
            }
            let job = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(mut events) = provider.start_job(job, request.clone()) else {
                continue;
            };
            let sent = Instant::now();
            match tokio::time::timeout(timeout, events.recv()).await {
                Ok(Some(first @ (JobEvent::Token(..) | JobEvent::Done { .. }))) => {
                    let ms = sent.elapsed().as_secs_f64() * 1e3;
                    self.registry.update(provider.address, |r| {
                        r.latency_ms = if r.latency_ms == 0.0 {
                            ms
                        } else {
                            0.8 * r.latency_ms + 0.2 * ms
                        }
                    });
                    tracing::debug!(job = %ticket.key(), provider = %provider.address, first_token_ms = ms as u64, "job started");
                    let spec = JobSpec {
                        model_sha256: model.sha256.clone(),
                        prompt_tokens: Vec::new(),
                        sampling: request.sampling.clone(),
                        max_tokens: request.max_tokens,
                        stop: request.stop.clone(),
                    };
                    return Ok(Running {
                        ticket: Some(ticket),
                        provider,
                        decoder: TextDecoder::new(&request.stop),
                        builder: CommitmentBuilder::for_prompt_hash(&spec, String::new()),
                        logprobs: Vec::new(),
                        model,
                        request: request.clone(),
                        prompt_bound,
                        job,
                        first: Some(first),
                        events,
                        token_timeout: Duration::from_secs(self.config.token_timeout_secs),
                        finished: false,
                    });
                }
                Ok(Some(JobEvent::Failed {
                    kind: FailureKind::ContextLength,
                    message,
                    ..
                })) => {
                    self.refund(&ticket.close()).await;
                    return Err(ApiError {
                        param: Some("messages"),
                        ..ApiError::invalid("context_length_exceeded", message)
                    });
                }
                Ok(Some(JobEvent::Failed {
                    kind: FailureKind::InvalidGrammar,
                    message,
                    ..
                })) => {
                    // Every provider compiles the same grammar the same way: no retry.
                    self.refund(&ticket.close()).await;
                    let tools = matches!(
                        request.sampling.grammar,
                        Some(tessera_types::Grammar::ToolCalls { .. })
                    );
                    return Err(ApiError {
                        param: Some(if tools { "tools" } else { "response_format" }),
                        ..ApiError::invalid(
                            "invalid_json_schema",
                            format!(
                                "The JSON Schema cannot be used for structured output: {message}"
                            ),
                        )
                    });
                }
                Ok(Some(JobEvent::Failed { kind, message, .. })) => {
                    tracing::warn!(job = %ticket.key(), provider = %provider.address, ?kind, %message, "provider failed before the first token; retrying elsewhere");
                }
                Ok(None) => {
                    tracing::warn!(job = %ticket.key(), provider = %provider.address, "provider lost before the first token; retrying elsewhere")
                }
                Err(_) => {
                    tracing::warn!(job = %ticket.key(), provider = %provider.address, "no first token in time; retrying elsewhere")
                }
            }
            provider.cancel_job(job);
        }
        self.refund(&ticket.close()).await;
        inc(&self.metrics.jobs_failed);
        Err(ApiError::unavailable(
            "provider_unavailable",
            "No provider could serve the request; nothing was charged.",
        ))
    }
}

impl Running {
    /// The job's key (its public id).
    pub fn key(&self) -> &str {
        self.ticket.as_ref().map_or("", Ticket::key)
    }

    /// What the job pays per generated token: the provider's price for the job's tier.
    pub fn price(&self) -> u64 {
        self.ticket.as_ref().map_or(self.provider.price, |t| {
            t.hub.job_price(self.provider.price, t.hold().tier)
        })
    }

    /// Micro-units held for the job.
    pub fn held(&self) -> u64 {
        self.ticket.as_ref().map_or(0, |t| t.hold().held)
    }

    /// Takes the escrow out for settlement, with the time the request arrived.
    pub(crate) fn take_hold(&mut self) -> Option<(Hold, Instant)> {
        let ticket = self.ticket.take()?;
        let started = ticket.started;
        Some((ticket.close(), started))
    }

    /// Consumes the job's events, passing each piece of decoded text to `on_text` with the
    /// tokens delivered since the previous piece and their log-probabilities (empty unless the
    /// job asked for them); `on_text` returning `false` (the agent went away) cancels the job on
    /// the provider.
    pub async fn drive(
        &mut self,
        mut on_text: impl FnMut(&str, &[u32], &[TokenLogprobs]) -> bool,
    ) -> Outcome {
        let mut prompt_tokens = None;
        // Tokens delivered before the current piece of text.
        let mut told = 0usize;
        let mut after_control = false;
        let end = loop {
            let event = match self.first.take() {
                Some(e) => Some(e),
                None => match tokio::time::timeout(self.token_timeout, self.events.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        break End::Broken(format!(
                            "the provider sent nothing for {} s",
                            self.token_timeout.as_secs()
                        ))
                    }
                },
            };
            match event {
                Some(JobEvent::Token(token, values, logprobs)) => {
                    if self.decoder.stopped() {
                        // Past a stop string: not delivered, not billed (an honest provider
                        // stops itself at the same token).
                        continue;
                    }
                    if after_control {
                        break End::Violation("a token after an end-of-turn token".into());
                    }
                    if self.builder.tokens().len() >= self.request.max_tokens as usize {
                        break End::Violation(format!(
                            "more than max_tokens ({}) tokens",
                            self.request.max_tokens
                        ));
                    }
                    let text = match self.decoder.push(&self.model.vocab, token) {
                        Ok(text) => text,
                        Err(e) => break End::Violation(e.to_string()),
                    };
                    after_control = self.model.vocab.control.get(token as usize) == Some(&true);
                    match (self.request.logprobs, logprobs) {
                        (None, _) => {}
                        (Some(k), Some(lp)) if lp.top.len() == k as usize => self.logprobs.push(lp),
                        (Some(k), _) => {
                            break End::Violation(format!(
                                "a token without the {k} alternatives' logprobs asked for"
                            ))
                        }
                    }
                    self.builder.push_bits(token, values);
                    if !text.is_empty() {
                        let tokens = &self.builder.tokens()[told..];
                        let logprobs = self.logprobs.get(told..).unwrap_or_default();
                        told = self.builder.tokens().len();
                        if !on_text(&text, tokens, logprobs) {
                            break End::ClientGone;
                        }
                    }
                }
                Some(JobEvent::Done {
                    prompt_tokens: claimed,
                    prompt_hash,
                    finish,
                }) => {
                    self.builder.set_prompt_hash(prompt_hash);
                    prompt_tokens = Some(claimed);
                    self.finished = true;
                    break End::Finished(finish);
                }
                Some(JobEvent::Failed {
                    message,
                    prompt_hash,
                    ..
                }) => {
                    if let Some(hash) = prompt_hash {
                        self.builder.set_prompt_hash(hash);
                    }
                    self.finished = true;
                    break End::Broken(message);
                }
                None => break End::Broken("the provider disconnected mid-generation".into()),
            }
        };
        if !matches!(end, End::ClientGone | End::Violation(_)) {
            let rest = self.decoder.finish();
            let tokens = &self.builder.tokens()[told.min(self.builder.tokens().len())..];
            if !rest.is_empty() || !tokens.is_empty() {
                on_text(&rest, tokens, self.logprobs.get(told..).unwrap_or_default());
            }
        }
        let finish = match &end {
            End::Finished(f) => *f,
            _ => Finish::Cancelled,
        };
        let tokens = self.builder.tokens().to_vec();
        Outcome {
            text: self.decoder.text().to_owned(),
            billed_prompt_tokens: u64::from(prompt_tokens.unwrap_or(0).min(self.prompt_bound)),
            prompt_tokens,
            commitment: self.builder.commitment(finish),
            logprobs: self.request.logprobs.map(|_| self.logprobs.clone()),
            tokens,
            end,
        }
    }
}
