//! The OpenAI-compatible API (<https://platform.openai.com/docs/api-reference/chat>):
//! `POST /v1/chat/completions`, `POST /v1/completions` (both also streaming over server-sent
//! events, each chunk a `data: {json}` line, ending with `data: [DONE]`) and `GET /v1/models`.
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
use tessera_types::{Finish, JobRequest, Message, Role, SamplingParams};

use crate::api::auth::{authenticate, check_signed, consume_nonce, Auth};
use crate::error::ApiError;
use crate::jobs::dispatch::{End, Running};
use crate::jobs::settle::Charge;
use crate::metrics::inc;
use crate::{now_secs, Hub};

mod params;

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
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::invalid(
            "invalid_request",
            "The request body must be a JSON object.",
        ));
    };
    params::check(fields, kind, max_n)?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid("invalid_request", format!("Invalid request: {e}")))
}

impl Common {
    fn job(
        &self,
        messages: Vec<Message>,
        prompt: Option<String>,
        default_max_tokens: u32,
    ) -> Result<JobRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported_param(
                "n",
                "Only n = 1 is supported by this hub.",
            ));
        }
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
        Ok(JobRequest {
            messages,
            prompt,
            max_tokens,
            // Without a seed the hub assigns one, so a verifier can replay the sampling.
            sampling: SamplingParams {
                temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed.unwrap_or_else(rand::random),
                grammar: params::grammar(self.response_format.as_ref())?,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logit_bias: params::logit_bias(self.logit_bias.as_ref()),
            },
            stop,
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
            Ok(Message::new(role, content))
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
        let job = request.common.job(messages(request.messages)?, None, 256)?;
        Ok::<_, ApiError>((request.common, job))
    })();
    match prepared {
        Ok((common, job)) => serve(hub, Kind::Chat, agent, &body, common, job).await,
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
        let job = request.common.job(Vec::new(), Some(prompt), 16)?;
        Ok::<_, ApiError>((request.common, job))
    })();
    match prepared {
        Ok((common, job)) => serve(hub, Kind::Completion, agent, &body, common, job).await,
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

struct Frame {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Frame {
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

async fn serve(
    hub: Arc<Hub>,
    kind: Kind,
    auth: Auth,
    body: &Bytes,
    common: Common,
    job: JobRequest,
) -> Response {
    // A signed request pins the exact model file (by sha256) and caps the price.
    let (agent, model_key, max_price, signed) = match auth {
        Auth::Key(agent) => (agent, common.model.clone(), common.max_price, None),
        Auth::Signed(signed) => match check_signed(&hub, &signed, body, &job) {
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
    let admitted = match hub
        .admit_under(agent, &model_key, &job, max_price, grant.as_ref())
        .await
    {
        Ok(x) => x,
        Err(e) => return reject(&hub, e),
    };
    if let Some(signed) = &signed {
        // The nonce is spent only by a request that is going to run.
        if let Err(e) = consume_nonce(&hub, signed).await {
            hub.refund(&admitted.ticket.close()).await;
            return reject(&hub, e);
        }
    }
    let running = match hub.dispatch(admitted, &job).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let frame = Frame {
        kind,
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            running.key()
        ),
        created: now_secs(),
        model: common.model.clone(),
        fingerprint: running.provider.fingerprint(),
    };
    let mut headers = HeaderMap::new();
    let provider = running.provider.address;
    if let Ok(v) = HeaderValue::from_str(&format!("{provider:#x}")) {
        headers.insert("x-tessera-provider", v);
    }
    if let Ok(v) = HeaderValue::from_str(running.key()) {
        headers.insert("x-tessera-job", v);
    }
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        if let Ok(v) = HeaderValue::from_str(&running.held().to_string()) {
            headers.insert("x-tessera-max-cost", v);
        }
        return (headers, stream(hub, running, frame, include_usage, _slot)).into_response();
    }
    let mut running = running;
    let outcome = running.drive(|_| true).await;
    let price = running.provider.price;
    let key = running.key().to_owned();
    let End::Finished(finish) = outcome.end.clone() else {
        // The agent received nothing: nothing is charged (and a protocol violation is punished).
        if matches!(outcome.end, End::Violation(_)) {
            hub.conclude(running, &outcome).await;
        } else {
            hub.abandon(running).await;
        }
        return ApiError::provider_failed(format!(
            "The provider failed mid-generation ({:?}); nothing was charged.",
            outcome.end
        ))
        .into_response();
    };
    let charge = hub.conclude(running, &outcome).await;
    if let Ok(v) = HeaderValue::from_str(&charge.cost.to_string()) {
        headers.insert("x-tessera-cost", v);
    }
    let finish = finish_reason(Some(finish));
    let completion = outcome.tokens.len() as u64;
    let choice = match kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": outcome.text, "refusal": null}, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": outcome.text, "logprobs": null, "finish_reason": finish})
        }
    };
    let body = json!({
        "id": frame.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": frame.created,
        "model": frame.model,
        "system_fingerprint": frame.fingerprint,
        "choices": [choice],
        "usage": usage(outcome.billed_prompt_tokens, completion),
        "tessera": extension(provider, price, &key, &charge, &outcome.commitment),
    });
    (headers, Json(body)).into_response()
}

fn stream(
    hub: Arc<Hub>,
    mut running: Running,
    frame: Frame,
    include_usage: bool,
    slot: crate::api::limits::Slot,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let _slot = slot;
        let data = |v: Value| Event::default().data(v.to_string());
        if frame.kind == Kind::Chat {
            let _ = tx.send(data(frame.chunk(Some(""), None, true)));
        }
        let outcome = running
            .drive(|text| tx.send(data(frame.chunk(Some(text), None, false))).is_ok())
            .await;
        let provider = running.provider.address;
        let price = running.provider.price;
        let key = running.key().to_owned();
        let completion = outcome.tokens.len() as u64;
        let charge = hub.conclude(running, &outcome).await;
        match &outcome.end {
            End::Finished(finish) => {
                let mut last = frame.chunk(None, Some(finish_reason(Some(*finish))), false);
                if frame.kind == Kind::Chat {
                    last["choices"][0]["delta"] = json!({});
                }
                last["tessera"] = extension(provider, price, &key, &charge, &outcome.commitment);
                let _ = tx.send(data(last));
                if include_usage {
                    let mut u = frame.chunk(None, None, false);
                    u["choices"] = json!([]);
                    u["usage"] = usage(outcome.billed_prompt_tokens, completion);
                    let _ = tx.send(data(u));
                }
                let _ = tx.send(Event::default().data("[DONE]"));
            }
            end => {
                let message = format!(
                    "The provider failed mid-stream ({end:?}); you were charged {} for the {} tokens delivered.",
                    charge.cost, completion
                );
                let mut body = ApiError::provider_failed(message).body();
                body["tessera"] = extension(provider, price, &key, &charge, &outcome.commitment);
                let _ = tx.send(data(body));
            }
        }
    });
    let events =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(events)
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
