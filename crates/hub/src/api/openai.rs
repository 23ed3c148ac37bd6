//! The OpenAI-compatible API (<https://platform.openai.com/docs/api-reference/chat>):
//! `POST /v1/chat/completions`, `POST /v1/completions` (both also streaming over server-sent
//! events, each chunk a `data: {json}` line, ending with `data: [DONE]`), `POST /v1/responses`
//! (see [`responses`]) and `GET /v1/models`. `n` > 1 runs one job per choice, each with its own
//! seed, billed and verified on its own; `logprobs` are the provider's, recomputed by verifiers.
//!
//! Extensions, all optional: a request may carry `max_price` (micro-units per token, never
//! exceeded) and `top_k`; each response names the provider and cost in `x-tessera-provider` /
//! `x-tessera-cost` headers and in a `tessera` object. A stream names the provider in its headers
//! (the cost is not known before the last token) and the cost in its last chunk.
//!
//! Payment: see [`crate::api::auth`]. The text in every response is the hub's own decoding of
//! the token ids the provider committed to (see [`crate::jobs::dispatch`]). Usage counts the
//! prompt tokens billed and the completion tokens delivered.
//!
//! A provider that dies mid-stream: the agent pays for the tokens it received and the stream ends
//! with an `error` object instead of `[DONE]`; a non-streaming request then fails with 502 and
//! is not charged.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_protocol::Address;
use tessera_types::{Finish, Grammar, JobRequest, Message, Role, SamplingParams, ToolCall};

use crate::api::auth::{authenticate, check_signed, consume_nonce, Auth};
use crate::error::ApiError;
use crate::jobs::dispatch::{End, Running};
use crate::jobs::settle::Charge;
use crate::jobs::Tier;
use crate::metrics::inc;
use crate::{now_secs, Hub};

mod logprobs;
mod params;
mod responses;
mod tools;

/// Stop strings a request may give (as OpenAI).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string or a list of content parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant message's calls.
    #[serde(default)]
    tool_calls: Option<Vec<InCall>>,
    /// The call a tool message answers.
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// A call in an earlier assistant message (`{"id", "type": "function", "function": {…}}`).
#[derive(Debug, Deserialize)]
struct InCall {
    id: String,
    function: InFunction,
}

#[derive(Debug, Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    max_price: Option<u64>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    user: Option<String>,
    /// Chat: a boolean; legacy completions: how many alternatives (0–5).
    #[serde(default)]
    logprobs: Option<Value>,
    /// Chat only: alternatives per token (0–20), with `logprobs: true`.
    #[serde(default)]
    top_logprobs: Option<u8>,
    /// Chat only: functions the model may call (see [`tools`]).
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint, for response framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Parses a request body after [`params::check`] has refused what this hub would not honour.
fn parse<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    kind: Kind,
    max_n: u32,
) -> Result<T, ApiError> {
    let fields = json_object(body)?;
    params::check(&fields, kind, max_n)?;
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::invalid("invalid_request", format!("Invalid request: {e}")))
}

impl Common {
    /// Alternatives per token to report, when log-probabilities are asked for (ranges are
    /// checked by [`params::check`] first).
    fn logprobs(&self, kind: Kind) -> Result<Option<u8>, ApiError> {
        let value = self.logprobs.as_ref().filter(|v| !v.is_null());
        match kind {
            Kind::Chat => {
                let on = match value {
                    None => false,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        ApiError::invalid_param("logprobs", "logprobs must be a boolean.")
                    })?,
                };
                match (on, self.top_logprobs) {
                    (true, k) => Ok(Some(k.unwrap_or(0))),
                    (false, Some(k)) if k > 0 => Err(ApiError::invalid_param(
                        "top_logprobs",
                        "top_logprobs needs logprobs to be true.",
                    )),
                    (false, _) => Ok(None),
                }
            }
            Kind::Completion => match value {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|k| u8::try_from(k).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "logprobs",
                            "logprobs must be an integer from 0 to 5.",
                        )
                    }),
            },
        }
    }

    fn job(
        &self,
        kind: Kind,
        messages: Vec<Message>,
        prompt: Option<String>,
        default_max_tokens: u32,
    ) -> Result<JobRequest, ApiError> {
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max_tokens);
        if max_tokens == 0 {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1.",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                "temperature must be between 0 and 2.",
            ));
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(ApiError::invalid_param("top_p", "top_p must be in (0, 1]."));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param(
                "stop",
                format!("At most {MAX_STOP_STRINGS} stop sequences are allowed."),
            ));
        }
        if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid_param(
                "stop",
                format!("A stop sequence may be at most {MAX_STOP_BYTES} bytes."),
            ));
        }
        let (tools, tool_grammar) = tools::parse(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )?;
        let grammar = match (params::grammar(self.response_format.as_ref())?, tool_grammar) {
            (Some(_), Some(_)) => {
                return Err(ApiError::unsupported_param(
                    "response_format",
                    "response_format cannot be combined with callable tools on this hub (set tool_choice to `none`, or drop one).",
                ))
            }
            (format, calls) => format.or(calls),
        };
        Ok(JobRequest {
            messages,
            tools,
            prompt,
            max_tokens,
            // Without a seed the hub assigns one, so a verifier can replay the sampling.
            sampling: SamplingParams {
                temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed.unwrap_or_else(rand::random),
                grammar,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logit_bias: params::logit_bias(self.logit_bias.as_ref()),
            },
            stop,
            logprobs: self.logprobs(kind)?,
        })
    }
}

fn messages(raw: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty.",
        ));
    }
    raw.into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("Unsupported role `{other}`."),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!("Unsupported content part `{}`.", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            let mut message = Message::new(role, content);
            if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
                if role != Role::Assistant {
                    return Err(ApiError::invalid_param(
                        "messages",
                        "Only assistant messages may carry tool_calls.",
                    ));
                }
                message.tool_calls = calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: c.id,
                        name: c.function.name,
                        arguments: c.function.arguments,
                    })
                    .collect();
            }
            if role == Role::Tool {
                let Some(id) = m.tool_call_id else {
                    return Err(ApiError::invalid_param(
                        "messages",
                        "A tool message needs the tool_call_id of the call it answers.",
                    ));
                };
                message.tool_call_id = Some(id);
            }
            Ok(message)
        })
        .collect()
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    let agent = match authenticate(&hub, &headers).await {
        Ok(a) => a,
        Err(e) => return reject(&hub, e),
    };
    let prepared = (|| {
        let request: ChatRequest = parse(&body, Kind::Chat, hub.config.max_n)?;
        let job = request
            .common
            .job(Kind::Chat, messages(request.messages)?, None, 256)?;
        let n = request.common.n.unwrap_or(1);
        Ok::<_, ApiError>((request.common, choices(job, n)))
    })();
    match prepared {
        Ok((common, jobs)) => serve(hub, Kind::Chat, agent, &body, common, jobs, None).await,
        Err(e) => reject(&hub, e),
    }
}

/// `POST /v1/completions`.
pub async fn completions(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    let agent = match authenticate(&hub, &headers).await {
        Ok(a) => a,
        Err(e) => return reject(&hub, e),
    };
    let prepared = (|| {
        let request: CompletionRequest = parse(&body, Kind::Completion, hub.config.max_n)?;
        let prompt = match request.prompt {
            Prompt::One(p) => p,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(_) => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "Only one prompt per request is supported.",
                ))
            }
        };
        let job = request
            .common
            .job(Kind::Completion, Vec::new(), Some(prompt), 16)?;
        let n = request.common.n.unwrap_or(1);
        Ok::<_, ApiError>((request.common, choices(job, n)))
    })();
    match prepared {
        Ok((common, jobs)) => serve(hub, Kind::Completion, agent, &body, common, jobs, None).await,
        Err(e) => reject(&hub, e),
    }
}

/// `POST /v1/responses`: translated into the chat completion it means (see [`responses`]).
pub async fn create_response(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let agent = match authenticate(&hub, &headers).await {
        Ok(a) => a,
        Err(e) => return reject(&hub, e),
    };
    let prepared = (|| {
        let fields = &json_object(&body)?;
        let chat = Bytes::from(responses::to_chat(fields)?.to_string());
        let request: ChatRequest = parse(&chat, Kind::Chat, 1)?;
        let job = request
            .common
            .job(Kind::Chat, messages(request.messages)?, None, 256)?;
        let given = |k: &str| fields.get(k).cloned().unwrap_or(Value::Null);
        let echo = responses::Echo {
            id: String::new(),
            created_at: 0,
            model: request.common.model.clone(),
            instructions: given("instructions"),
            format: responses::format_of(fields),
            max_output_tokens: given("max_output_tokens"),
            temperature: given("temperature"),
            top_p: given("top_p"),
            metadata: fields.get("metadata").cloned().unwrap_or_else(|| json!({})),
            tools: fields.get("tools").cloned().unwrap_or_else(|| json!([])),
            tool_choice: fields
                .get("tool_choice")
                .cloned()
                .unwrap_or_else(|| json!("auto")),
        };
        Ok::<_, ApiError>((request.common, choices(job, 1), echo))
    })();
    match prepared {
        Ok((common, jobs, echo)) => {
            serve(hub, Kind::Chat, agent, &body, common, jobs, Some(echo)).await
        }
        Err(e) => reject(&hub, e),
    }
}

fn reject(hub: &Hub, e: ApiError) -> Response {
    inc(&hub.metrics.requests_rejected);
    e.into_response()
}

fn finish_reason(finish: Option<Finish>) -> &'static str {
    match finish {
        Some(Finish::Length) => "length",
        _ => "stop",
    }
}

/// Whether a job's output is read as function calls (its grammar is [`Grammar::ToolCalls`]).
fn calls_tools(job: &JobRequest) -> bool {
    matches!(job.sampling.grammar, Some(Grammar::ToolCalls { .. }))
}

struct Frame {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    /// Set for `/v1/responses`: the response object's echo of its request, and Responses API
    /// framing instead of chat completion chunks.
    response: Option<responses::Echo>,
}

impl Frame {
    /// A chat chunk carrying one piece of a streamed answer that may call tools.
    fn delta_chunk(&self, delta: &tools::Delta) -> Value {
        let delta = match delta {
            tools::Delta::Text(text) => json!({"content": text}),
            tools::Delta::Open { index, id, name } => {
                json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]})
            }
            tools::Delta::Arguments { index, fragment } => {
                json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            }
        };
        let mut chunk = self.chunk(None, None, false);
        chunk["choices"][0]["delta"] = delta;
        chunk
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "system_fingerprint": self.fingerprint,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "system_fingerprint": self.fingerprint, "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
            }
        }
    }
}

impl Frame {
    /// The `logprobs` object of a choice (or a chunk's piece of it) in this endpoint's shape.
    fn logprobs(
        &self,
        vocab: &tessera_types::Vocabulary,
        tokens: &[u32],
        lps: &[tessera_types::TokenLogprobs],
        offset: usize,
    ) -> Value {
        match self.kind {
            Kind::Chat => {
                json!({"content": logprobs::chat_content(vocab, tokens, lps), "refusal": null})
            }
            Kind::Completion => logprobs::completion(vocab, tokens, lps, offset),
        }
    }
}

/// The request body as a JSON object, or OpenAI's error for a body that is not one.
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::invalid(
            "invalid_request",
            "The request body must be a JSON object.",
        )),
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The `tessera` object of a response: who served the job, what it cost, and what pins the
/// result (the model file, the seed, the digest of the provider's commitment), so a client can
/// record each result's provenance.
fn extension(
    running_provider: Address,
    price: u64,
    job: &str,
    charge: &Charge,
    commitment: &tessera_types::Commitment,
) -> Value {
    json!({"provider": running_provider, "price_per_token": price, "cost": charge.cost, "job_id": job, "verification": charge.verification.as_str(),
           "model_sha256": commitment.model_sha256, "seed": commitment.sampling.seed, "commitment_digest": hex::encode(commitment.digest())})
}

/// The jobs of a request: one per choice (`n`), each with its own seed. Choice 0 keeps the
/// request's seed, so `n = 1` is unchanged; the others derive theirs from it and their index
/// (SplitMix64), so a seeded request is reproducible choice by choice.
fn choices(job: JobRequest, n: u32) -> Vec<JobRequest> {
    (0..n.max(1))
        .map(|i| {
            let mut choice = job.clone();
            if i > 0 {
                let mut z = job.sampling.seed ^ u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                choice.sampling.seed = z ^ (z >> 31);
            }
            choice
        })
        .collect()
}

async fn serve(
    hub: Arc<Hub>,
    kind: Kind,
    auth: Auth,
    body: &Bytes,
    common: Common,
    jobs: Vec<JobRequest>,
    mut response: Option<responses::Echo>,
) -> Response {
    // A signed request pins the exact model file (by sha256) and caps the price.
    let (agent, model_key, max_price, signed) = match auth {
        Auth::Key(agent) => (agent, common.model.clone(), common.max_price, None),
        Auth::Signed(signed) => match check_signed(&hub, &signed, body, &jobs[0]) {
            Ok(agent) => (
                agent,
                hex::encode(signed.message.model.0),
                Some(
                    common
                        .max_price
                        .unwrap_or(u64::MAX)
                        .min(signed.message.maxPricePerToken),
                ),
                Some(signed),
            ),
            Err(e) => return reject(&hub, e),
        },
    };
    // A session key spends its owner's balance under the owner's policy.
    let (agent, grant) = match hub.principal(agent).await {
        Ok(p) => (p.payer, p.grant),
        Err(e) => return reject(&hub, e),
    };
    let max_price = match &grant {
        Some(g) => match g
            .check_model(&hub, &model_key)
            .and_then(|()| g.price_cap(max_price))
        {
            Ok(cap) => Some(cap),
            Err(e) => return reject(&hub, e),
        },
        None => max_price,
    };
    let _slot = match hub.limits.acquire(
        agent,
        hub.config.max_concurrent_per_agent,
        hub.config.requests_per_minute,
    ) {
        Ok(slot) => slot,
        Err(e) => {
            inc(&hub.metrics.rate_limited);
            return reject(&hub, e);
        }
    };
    let tier = match common.service_tier.as_deref() {
        Some("flex") => Tier::Batch,
        _ => Tier::Interactive,
    };
    // Every choice is escrowed before any runs: a request the balance cannot cover in full is
    // refused whole, with nothing moved.
    let mut admitted = Vec::with_capacity(jobs.len());
    for job in &jobs {
        match hub
            .admit_under(agent, &model_key, job, max_price, grant.as_ref(), tier)
            .await
        {
            Ok(a) => {
                if let Some(user) = &common.user {
                    // What the agent says the job is for (a synthetic-data run), for the dashboard.
                    hub.activity.label(a.ticket.key(), user);
                }
                admitted.push(a)
            }
            Err(e) => {
                for a in admitted {
                    hub.refund(&a.ticket.close()).await;
                }
                return reject(&hub, e);
            }
        }
    }
    if let Some(signed) = &signed {
        // The nonce is spent only by a request that is going to run.
        if let Err(e) = consume_nonce(&hub, signed).await {
            for a in admitted {
                hub.refund(&a.ticket.close()).await;
            }
            return reject(&hub, e);
        }
    }
    let dispatched = futures_util::future::join_all(
        admitted
            .into_iter()
            .zip(&jobs)
            .map(|(a, job)| hub.dispatch(a, job)),
    )
    .await;
    let mut running = Vec::with_capacity(dispatched.len());
    let mut failed = None;
    for d in dispatched {
        match d {
            Ok(r) => running.push(r),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        // One choice could not start: the request fails whole; the others are stopped, unpaid.
        for r in running {
            hub.abandon(r).await;
        }
        return e.into_response();
    }
    let first = &running[0];
    let prefix = match (kind, &response) {
        (_, Some(_)) => "resp",
        (Kind::Chat, None) => "chatcmpl",
        (Kind::Completion, None) => "cmpl",
    };
    let id = format!("{prefix}-{}", first.key());
    let created = now_secs();
    if let Some(echo) = &mut response {
        echo.id = id.clone();
        echo.created_at = created;
    }
    let frame = Frame {
        kind,
        id,
        created,
        model: common.model.clone(),
        fingerprint: first.provider.fingerprint(),
        response,
    };
    let mut headers = HeaderMap::new();
    let provider = first.provider.address;
    if let Ok(v) = HeaderValue::from_str(&format!("{provider:#x}")) {
        headers.insert("x-tessera-provider", v);
    }
    if let Ok(v) = HeaderValue::from_str(first.key()) {
        headers.insert("x-tessera-job", v);
    }
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        let held: u64 = running.iter().map(Running::held).sum();
        if let Ok(v) = HeaderValue::from_str(&held.to_string()) {
            headers.insert("x-tessera-max-cost", v);
        }
        return (headers, stream(hub, running, frame, include_usage, _slot)).into_response();
    }
    let outcomes =
        futures_util::future::join_all(running.iter_mut().map(|r| r.drive(|_, _, _| true))).await;
    if let Some(broken) = outcomes
        .iter()
        .find(|o| !matches!(o.end, End::Finished(_)))
        .map(|o| o.end.clone())
    {
        // The agent received nothing: nothing is charged (and a protocol violation is punished).
        for (r, outcome) in running.into_iter().zip(&outcomes) {
            if matches!(outcome.end, End::Violation(_)) {
                hub.conclude(r, outcome).await;
            } else {
                hub.abandon(r).await;
            }
        }
        return ApiError::provider_failed(format!(
            "The provider failed mid-generation ({broken:?}); nothing was charged."
        ))
        .into_response();
    }
    let mut choices = Vec::with_capacity(outcomes.len());
    let mut extensions = Vec::with_capacity(outcomes.len());
    let (mut prompt, mut completion, mut cost) = (0, 0, 0);
    let mut incomplete = false;
    let mut parsed = Vec::with_capacity(outcomes.len());
    for (index, (r, outcome)) in running.into_iter().zip(&outcomes).enumerate() {
        let (model, address, price, key) = (
            r.model.clone(),
            r.provider.address,
            r.price(),
            r.key().to_owned(),
        );
        let calls = if kind == Kind::Chat && calls_tools(&r.request) {
            tools::parse_output(&key, &outcome.text)
        } else {
            None
        };
        let charge = hub.conclude(r, outcome).await;
        let End::Finished(finish) = outcome.end else {
            unreachable!("every outcome finished")
        };
        incomplete |= finish == Finish::Length;
        let finish = if calls.is_some() {
            "tool_calls"
        } else {
            finish_reason(Some(finish))
        };
        let logprobs = outcome.logprobs.as_deref().map_or(Value::Null, |lps| {
            frame.logprobs(&model.vocab, &outcome.tokens, lps, 0)
        });
        choices.push(match (kind, &calls) {
            (Kind::Chat, Some(calls)) => {
                let calls: Vec<Value> = calls.iter().map(tools::Call::to_json).collect();
                json!({"index": index, "message": {"role": "assistant", "content": null, "tool_calls": calls, "refusal": null}, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, None) => {
                json!({"index": index, "message": {"role": "assistant", "content": outcome.text, "refusal": null}, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Completion, _) => {
                json!({"index": index, "text": outcome.text, "logprobs": logprobs, "finish_reason": finish})
            }
        });
        parsed.push(calls);
        prompt += outcome.billed_prompt_tokens;
        completion += outcome.tokens.len() as u64;
        cost += charge.cost;
        extensions.push(extension(
            address,
            price,
            &key,
            &charge,
            &outcome.commitment,
        ));
    }
    if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
        headers.insert("x-tessera-cost", v);
    }
    if let Some(echo) = &frame.response {
        let items = match &parsed[0] {
            Some(calls) => calls.iter().map(responses::function_call_item).collect(),
            None => vec![responses::message_item(
                &format!("msg-{}", frame.id),
                &outcomes[0].text,
                true,
            )],
        };
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        let mut body = echo.object(status, items, responses::usage(prompt, completion));
        body["tessera"] = combined(extensions, cost);
        return (headers, Json(body)).into_response();
    }
    let body = json!({
        "id": frame.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": frame.created,
        "model": frame.model,
        "system_fingerprint": frame.fingerprint,
        "choices": choices,
        "usage": usage(prompt, completion),
        "tessera": combined(extensions, cost),
    });
    (headers, Json(body)).into_response()
}

/// The `tessera` object of a response of several choices: the first choice's, with the total
/// cost and every choice's own (each its own job, billed and verified on its own).
fn combined(mut extensions: Vec<Value>, cost: u64) -> Value {
    if extensions.len() == 1 {
        return extensions.remove(0);
    }
    let mut first = extensions[0].clone();
    first["cost"] = json!(cost);
    first["choices"] = Value::Array(extensions);
    first
}

/// What one streamed choice delivered.
struct Streamed {
    finished: bool,
    prompt: u64,
    completion: u64,
}

fn stream(
    hub: Arc<Hub>,
    running: Vec<Running>,
    frame: Frame,
    include_usage: bool,
    slot: crate::api::limits::Slot,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let frame = Arc::new(frame);
    let data = |v: Value| Event::default().data(v.to_string());
    let tasks: Vec<_> = running
        .into_iter()
        .enumerate()
        .map(|(index, running)| {
            let (hub, tx, frame) = (hub.clone(), tx.clone(), frame.clone());
            tokio::spawn(stream_choice(hub, running, frame, index, tx))
        })
        .collect();
    tokio::spawn(async move {
        let _slot = slot;
        let mut all = Vec::with_capacity(tasks.len());
        for t in tasks {
            all.push(t.await.unwrap_or(Streamed {
                finished: false,
                prompt: 0,
                completion: 0,
            }));
        }
        // A choice that broke off has sent its error object: the stream ends without `[DONE]`.
        // A Responses API stream ends with its `response.completed` event instead.
        if frame.response.is_none() && all.iter().all(|s| s.finished) {
            if include_usage {
                let mut u = frame.chunk(None, None, false);
                u["choices"] = json!([]);
                u["usage"] = usage(
                    all.iter().map(|s| s.prompt).sum(),
                    all.iter().map(|s| s.completion).sum(),
                );
                let _ = tx.send(data(u));
            }
            let _ = tx.send(Event::default().data("[DONE]"));
        }
    });
    let events =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(events)
}

/// Streams one choice's chunks (each carrying its `index`), settles its job, and ends with its
/// finishing chunk or, when it broke off, an error object.
async fn stream_choice(
    hub: Arc<Hub>,
    mut running: Running,
    frame: Arc<Frame>,
    index: usize,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Streamed {
    let send = |mut v: Value| {
        if let Some(choice) = v["choices"].get_mut(0) {
            choice["index"] = json!(index);
        }
        tx.send(Event::default().data(v.to_string())).is_ok()
    };
    // The Responses API's typed events, numbered in order.
    let sequence = std::sync::atomic::AtomicU64::new(0);
    let event = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        tx.send(Event::default().event(kind).data(v.to_string()))
            .is_ok()
    };
    let item_id = format!("msg-{}", frame.id);
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let at = |mut v: Value| {
        v["item_id"] = json!(item_id);
        v["output_index"] = json!(0);
        v["content_index"] = json!(0);
        v
    };
    let open_message = || {
        let item = responses::message_item(&item_id, "", false);
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        event("response.content_part.added", at(json!({"part": part("")})));
    };
    // A Responses stream that may call functions is sent whole at the end, once the output is
    // known to be calls or a message.
    let buffered = frame.response.is_some() && calls_tools(&running.request);
    if let Some(echo) = &frame.response {
        let object = echo.object("in_progress", vec![], Value::Null);
        event("response.created", json!({"response": object}));
        event("response.in_progress", json!({"response": object}));
        if !buffered {
            open_message();
        }
    } else if frame.kind == Kind::Chat {
        send(frame.chunk(Some(""), None, true));
    }
    let model = running.model.clone();
    let asked = running.request.logprobs.is_some();
    let mut offset = 0;
    // Output that may be function calls is sent as call deltas (without logprobs).
    let mut calls = (frame.response.is_none() && calls_tools(&running.request))
        .then(|| tools::CallStream::new(running.key()));
    let outcome = running
        .drive(|text, tokens, lps| {
            if let Some(calls) = calls.as_mut() {
                return calls.push(text).iter().all(|d| send(frame.delta_chunk(d)));
            }
            if buffered {
                return true;
            }
            let listed = asked && logprobs::any_listed(&model.vocab, tokens, lps);
            if text.is_empty() && !listed {
                return true;
            }
            if frame.response.is_some() {
                return event(
                    "response.output_text.delta",
                    at(json!({"delta": text, "logprobs": []})),
                );
            }
            let mut chunk = frame.chunk(Some(text), None, false);
            if asked {
                chunk["choices"][0]["logprobs"] = frame.logprobs(&model.vocab, tokens, lps, offset);
            }
            offset += text.len();
            send(chunk)
        })
        .await;
    let provider = running.provider.address;
    let price = running.price();
    let key = running.key().to_owned();
    let completion = outcome.tokens.len() as u64;
    let charge = hub.conclude(running, &outcome).await;
    let finished = match (&outcome.end, &frame.response) {
        (End::Finished(finish), Some(echo)) => {
            let text = outcome.text.as_str();
            let calls = buffered.then(|| tools::parse_output(&key, text)).flatten();
            let items = match calls {
                Some(calls) => calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        let item = responses::function_call_item(call);
                        let mut open = item.clone();
                        open["arguments"] = json!("");
                        open["status"] = json!("in_progress");
                        event(
                            "response.output_item.added",
                            json!({"output_index": i, "item": open}),
                        );
                        let on = json!({"item_id": item["id"], "output_index": i});
                        let mut delta = on.clone();
                        delta["delta"] = json!(call.arguments);
                        event("response.function_call_arguments.delta", delta);
                        let mut done = on;
                        done["arguments"] = json!(call.arguments);
                        event("response.function_call_arguments.done", done);
                        event(
                            "response.output_item.done",
                            json!({"output_index": i, "item": item.clone()}),
                        );
                        item
                    })
                    .collect(),
                None => {
                    if buffered {
                        open_message();
                        event(
                            "response.output_text.delta",
                            at(json!({"delta": text, "logprobs": []})),
                        );
                    }
                    event(
                        "response.output_text.done",
                        at(json!({"text": text, "logprobs": []})),
                    );
                    event(
                        "response.content_part.done",
                        at(json!({"part": part(text)})),
                    );
                    let item = responses::message_item(&item_id, text, true);
                    event(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": item.clone()}),
                    );
                    vec![item]
                }
            };
            let status = if *finish == Finish::Length {
                "incomplete"
            } else {
                "completed"
            };
            let usage = responses::usage(outcome.billed_prompt_tokens, completion);
            let mut object = echo.object(status, items, usage);
            object["tessera"] = extension(provider, price, &key, &charge, &outcome.commitment);
            event(
                if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                },
                json!({"response": object}),
            );
            true
        }
        (End::Finished(finish), None) => {
            let mut reason = finish_reason(Some(*finish));
            if let Some(calls) = calls.as_mut() {
                let (rest, parsed) = calls.finish();
                for d in &rest {
                    send(frame.delta_chunk(d));
                }
                if parsed.is_some() {
                    reason = "tool_calls";
                }
            }
            let mut last = frame.chunk(None, Some(reason), false);
            if frame.kind == Kind::Chat {
                last["choices"][0]["delta"] = json!({});
            }
            last["tessera"] = extension(provider, price, &key, &charge, &outcome.commitment);
            send(last);
            true
        }
        (end, _) => {
            let message = format!(
                "The provider failed mid-stream ({end:?}); you were charged {} for the {} tokens delivered.",
                charge.cost, completion
            );
            let mut body = ApiError::provider_failed(message).body();
            body["tessera"] = extension(provider, price, &key, &charge, &outcome.commitment);
            let _ = tx.send(Event::default().data(body.to_string()));
            false
        }
    };
    Streamed {
        finished,
        prompt: outcome.billed_prompt_tokens,
        completion,
    }
}

/// The model objects (<https://platform.openai.com/docs/api-reference/models/object>) of the
/// catalog's models that live, unquarantined providers serve.
fn live_models(hub: &Hub) -> Vec<(String, Value)> {
    let connections = hub.registry.connections();
    hub.config
        .catalog
        .entries()
        .iter()
        .filter_map(|m| {
            let live: Vec<_> = connections
                .iter()
                .filter(|c| c.model.sha256 == m.sha256 && !hub.registry.quarantined(c.address))
                .collect();
            let min_price = live.iter().map(|c| c.price).min()?;
            Some((m.name.clone(), json!({"id": m.name, "object": "model", "created": 0, "owned_by": "tessera",
                   "tessera": {"sha256": m.sha256, "context_length": m.context_length, "providers": live.len(), "min_price_per_token": min_price, "prompt_price_bps": hub.config.prompt_price_bps}})))
        })
        .collect()
}

/// `GET /v1/models`: the catalog's models that live providers serve.
pub async fn models(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let data: Vec<Value> = live_models(&hub).into_iter().map(|(_, m)| m).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one served model, or 404 `model_not_found` in OpenAI's shape.
pub async fn model(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Response {
    match live_models(&hub).into_iter().find(|(name, _)| *name == id) {
        Some((_, m)) => Json(m).into_response(),
        None => ApiError::model_not_found(&id).into_response(),
    }
}
