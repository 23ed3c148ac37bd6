//! The OpenAI-compatible API (<https://platform.openai.com/docs/api-reference/chat>):
//! `POST /v1/chat/completions`, `POST /v1/completions` (both also streaming over server-sent
//! events, each chunk a `data: {json}` line, ending with `data: [DONE]`) and `GET /v1/models`.
//!
//! Extensions, all optional: a request may carry `max_price` (micro-units per token, never
//! exceeded) and `top_k`; each response names the provider and cost in `x-tessera-provider` /
//! `x-tessera-cost` headers and in a `tessera` object. A stream names the provider in its headers
//! (the cost is not known before the last token) and the cost in its last chunk.
//!
//! Payment: `Authorization: Bearer KEY` with a key a wallet registered (`POST /v1/keys`), or a
//! per-request EIP-712 `InferenceRequest` in the `x-tessera-signature` header (its `promptHash`
//! is the sha256 of the body, its nonce is consumed, its model and price are binding).
//!
//! A provider that dies mid-stream: the agent pays for the tokens it received and the stream ends
//! with an `error` object instead of `[DONE]`; a non-streaming request then fails with 502 and
//! is not charged.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;
use tessera_protocol::{Address, InferenceRequest, Signed};
use tessera_wire::{Finish, JobRequest, Message, Role, SamplingParams};

use crate::error::ApiError;
use crate::jobs::{Charge, Running};
use crate::metrics::inc;
use crate::{now_secs, Hub};

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

/// Resolves the bearer API key to the agent's address.
/// The header that carries a per-request signature: the compact JSON of a
/// `Signed<InferenceRequest>` whose `promptHash` is the sha256 of the request body.
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";

/// Who pays for a request.
enum Auth {
    /// A registered API key's wallet.
    Key(Address),
    /// A per-request EIP-712 signature, checked against the body once it is parsed.
    Signed(Box<Signed<InferenceRequest>>),
}

/// Resolves the payer: a per-request signature if present, else the bearer API key.
async fn authenticate(hub: &Hub, headers: &HeaderMap) -> Result<Auth, ApiError> {
    if let Some(signature) = headers.get(SIGNATURE_HEADER) {
        let signed: Signed<InferenceRequest> = signature
            .to_str()
            .ok()
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                ApiError::bad_signature(format!(
                    "{SIGNATURE_HEADER} must be the JSON of a signed InferenceRequest."
                ))
            })?;
        return Ok(Auth::Signed(Box::new(signed)));
    }
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(key) = value
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return Err(ApiError::unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer KEY`; register keys with POST /v1/keys."));
    };
    hub.agent_for_key(key)
        .await
        .map(Auth::Key)
        .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
}

/// Checks a signed request against what it pays for: the body (prompt hash), the token budget
/// and then the signature, expiry and nonce (consumed last, so a refused request does not burn
/// it). Returns the payer.
async fn check_signed(
    hub: &Hub,
    signed: &Signed<InferenceRequest>,
    body: &Bytes,
    job: &JobRequest,
) -> Result<Address, ApiError> {
    let m = &signed.message;
    let body_hash: [u8; 32] = sha2::Sha256::digest(body).into();
    if m.promptHash.0 != body_hash {
        return Err(ApiError::bad_signature(
            "The signed promptHash is not the sha256 of this request body.",
        ));
    }
    if job.max_tokens > m.maxTokens {
        return Err(ApiError::bad_signature(format!(
            "max_tokens {} exceeds the signed maxTokens {}.",
            job.max_tokens, m.maxTokens
        )));
    }
    hub.verifier
        .verify(signed, now_secs(), &hub.ledger)
        .await
        .map_err(|e| ApiError::bad_signature(format!("Invalid request signature: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
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
            return Err(ApiError::invalid_param("n", "Only n = 1 is supported."));
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
        let request: ChatRequest = parse(&body)?;
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
        let request: CompletionRequest = parse(&body)?;
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
                       "system_fingerprint": null,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
            }
        }
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn extension(running_provider: Address, price: u64, job: &str, charge: &Charge) -> Value {
    json!({"provider": running_provider, "price_per_token": price, "cost": charge.cost, "job_id": job, "verification": charge.verification})
}

async fn serve(
    hub: Arc<Hub>,
    kind: Kind,
    auth: Auth,
    body: &Bytes,
    common: Common,
    job: JobRequest,
) -> Response {
    let requested_price = common.max_price.unwrap_or(u64::MAX);
    // A signed request pins the exact model file (by sha256) and caps the price.
    let (agent, model_key, max_price) = match auth {
        Auth::Key(agent) => (agent, common.model.clone(), requested_price),
        Auth::Signed(signed) => match check_signed(&hub, &signed, body, &job).await {
            Ok(agent) => (
                agent,
                hex::encode(signed.message.model.0),
                requested_price.min(signed.message.maxPricePerToken),
            ),
            Err(e) => return reject(&hub, e),
        },
    };
    let (ticket, candidates) = match hub.admit(agent, &model_key, &job, max_price).await {
        Ok(x) => x,
        Err(e) => return reject(&hub, e),
    };
    let running = match hub.dispatch(ticket, candidates, &job).await {
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
            running.ticket.key
        ),
        created: now_secs(),
        model: common.model.clone(),
    };
    let mut headers = HeaderMap::new();
    let provider = running.provider.address;
    if let Ok(v) = HeaderValue::from_str(&format!("{provider:#x}")) {
        headers.insert("x-tessera-provider", v);
    }
    if let Ok(v) = HeaderValue::from_str(&running.ticket.key) {
        headers.insert("x-tessera-job", v);
    }
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        if let Ok(v) = HeaderValue::from_str(&running.ticket.held.to_string()) {
            headers.insert("x-tessera-max-cost", v);
        }
        return (headers, stream(hub, running, job, frame, include_usage)).into_response();
    }
    let mut running = running;
    let outcome = running.drive(|_| true).await;
    let price = running.provider.price;
    let key = running.ticket.key.clone();
    let Some(result) = outcome.result.clone() else {
        // The agent received nothing: nothing is charged.
        hub.conclude(running, job, &outcome, 0).await;
        return ApiError::provider_failed(format!(
            "The provider failed mid-generation ({}); nothing was charged.",
            outcome.error.unwrap_or_default()
        ))
        .into_response();
    };
    let completion = result.output_tokens.len() as u64;
    let charge = hub.conclude(running, job, &outcome, completion).await;
    if let Ok(v) = HeaderValue::from_str(&charge.cost.to_string()) {
        headers.insert("x-tessera-cost", v);
    }
    let finish = finish_reason(Some(result.finish));
    let choice = match kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": null}, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": result.text, "logprobs": null, "finish_reason": finish})
        }
    };
    let body = json!({
        "id": frame.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": frame.created,
        "model": frame.model,
        "system_fingerprint": null,
        "choices": [choice],
        "usage": usage(u64::from(result.prompt_tokens), completion),
        "tessera": extension(provider, price, &key, &charge),
    });
    (headers, Json(body)).into_response()
}

fn stream(
    hub: Arc<Hub>,
    mut running: Running,
    job: JobRequest,
    frame: Frame,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let data = |v: Value| Event::default().data(v.to_string());
        if frame.kind == Kind::Chat {
            let _ = tx.send(data(frame.chunk(Some(""), None, true)));
        }
        let outcome = running
            .drive(|text| {
                text.is_empty() || tx.send(data(frame.chunk(Some(text), None, false))).is_ok()
            })
            .await;
        let provider = running.provider.address;
        let price = running.provider.price;
        let key = running.ticket.key.clone();
        let (prompt_tokens, completion, finish) = match &outcome.result {
            Some(r) => (
                u64::from(r.prompt_tokens),
                r.output_tokens.len() as u64,
                Some(r.finish),
            ),
            None => (0, outcome.delivered, None),
        };
        let charge = hub.conclude(running, job, &outcome, completion).await;
        match (&outcome.result, &outcome.error) {
            (Some(_), _) => {
                let mut last = frame.chunk(None, Some(finish_reason(finish)), false);
                if frame.kind == Kind::Chat {
                    last["choices"][0]["delta"] = json!({});
                }
                last["tessera"] = extension(provider, price, &key, &charge);
                let _ = tx.send(data(last));
                if include_usage {
                    let mut u = frame.chunk(None, None, false);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, completion);
                    let _ = tx.send(data(u));
                }
                let _ = tx.send(Event::default().data("[DONE]"));
            }
            (None, error) => {
                let message = format!(
                    "The provider failed mid-stream ({}); you were charged {} for the {} tokens delivered.",
                    error.as_deref().unwrap_or("unknown error"),
                    charge.cost,
                    completion
                );
                let mut body = ApiError::provider_failed(message).body();
                body["tessera"] = extension(provider, price, &key, &charge);
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

/// `GET /v1/models`: the models live providers serve.
pub async fn models(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let mut by_name: std::collections::BTreeMap<String, (String, usize, u64)> = Default::default();
    for c in hub.registry.connections() {
        if hub.registry.quarantined(c.address) {
            continue;
        }
        let e = by_name
            .entry(c.model_name.clone())
            .or_insert((c.sha256.clone(), 0, u64::MAX));
        e.1 += 1;
        e.2 = e.2.min(c.price);
    }
    let data: Vec<Value> = by_name
        .into_iter()
        .map(|(name, (sha, providers, min_price))| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": "tessera",
                   "tessera": {"sha256": sha, "providers": providers, "min_price_per_token": min_price}})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
