//! The requests and answers of the hub's API, as far as agents use them
//! (<https://platform.openai.com/docs/api-reference/chat> plus the hub's `tessera` extension).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// A chat completion request. Optional fields left `None` are not sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatRequest {
    /// A model name or the sha256 of its file.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 is greedy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Top-k filter (a Tessera extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Sampling seed; without one the hub assigns one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Most micro-units per token the agent pays (a Tessera extension; never exceeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_price: Option<u64>,
    /// OpenAI's `response_format` (`{"type": "json_schema", "json_schema": {...}}`), passed as is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// OpenAI's `service_tier`: `flex` asks for the batch tier (idle capacity, at a discount).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// OpenAI's `user`: what the request is for (the hub's dashboard groups jobs by it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens billed.
    pub prompt_tokens: u64,
    /// Tokens generated and delivered.
    pub completion_tokens: u64,
}

/// The hub's `tessera` object: who served the job and what it cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The hub's job id.
    pub job_id: String,
    /// The serving provider's address.
    pub provider: String,
    /// Its price, micro-units per generated token.
    pub price_per_token: u64,
    /// Micro-units charged.
    pub cost: u64,
    /// Where the job stands with verification (`pending`, `unverified`, ...).
    pub verification: String,
    /// sha256 of the model file that served it (hubs from before this field: `None`).
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// The sampling seed the job ran with.
    #[serde(default)]
    pub seed: Option<u64>,
    /// sha256 of the provider's commitment, hex.
    #[serde(default)]
    pub commitment_digest: Option<String>,
}

/// A chat completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatResponse {
    /// The completion id.
    pub id: String,
    /// The assistant's text.
    pub text: String,
    /// `stop`, `length`, ...
    pub finish_reason: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// The hub's receipt.
    pub receipt: Receipt,
}

fn decode<T: serde::de::DeserializeOwned>(field: &str, value: &Value) -> Result<T> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::Decode(format!("the completion's {field}: {e}")))
}

impl ChatResponse {
    pub(crate) fn from_json(v: Value) -> Result<Self> {
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| Error::Decode("a completion without message content".into()))?
            .to_owned();
        Ok(Self {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            text,
            finish_reason: choice["finish_reason"].as_str().map(str::to_owned),
            usage: decode("usage", &v["usage"])?,
            receipt: decode("tessera receipt", &v["tessera"])?,
        })
    }
}

/// An account on the hub's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Account {
    /// Spendable micro-units.
    pub balance: u64,
    /// Micro-units staked.
    pub staked: u64,
}

/// A model that live providers serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The public name.
    pub id: String,
    /// sha256 of the GGUF file.
    pub sha256: String,
    /// Context window in tokens.
    pub context_length: u64,
    /// Providers serving it now.
    pub providers: u64,
    /// The lowest price among them, micro-units per generated token.
    pub min_price_per_token: u64,
    /// What a prompt token costs relative to a generated one, in basis points (hubs from before
    /// this field: `None`).
    pub prompt_price_bps: Option<u64>,
}

impl ModelInfo {
    pub(crate) fn from_json(v: &Value) -> Result<Self> {
        let t = &v["tessera"];
        let num = |field: &str| {
            t[field]
                .as_u64()
                .ok_or_else(|| Error::Decode(format!("model without tessera.{field}")))
        };
        Ok(Self {
            id: v["id"]
                .as_str()
                .ok_or_else(|| Error::Decode("model without id".into()))?
                .to_owned(),
            sha256: t["sha256"]
                .as_str()
                .ok_or_else(|| Error::Decode("model without tessera.sha256".into()))?
                .to_owned(),
            context_length: num("context_length")?,
            providers: num("providers")?,
            min_price_per_token: num("min_price_per_token")?,
            prompt_price_bps: t["prompt_price_bps"].as_u64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_sends_only_what_is_set() {
        let r = ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage::new("user", "hi")],
            max_tokens: Some(4),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        );
        let r = ChatRequest {
            response_format: Some(json!({"type": "json_schema"})),
            ..r
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap()["response_format"]["type"],
            "json_schema"
        );
    }

    #[test]
    fn a_response_without_content_is_a_decode_error() {
        let e = ChatResponse::from_json(json!({"choices": []})).unwrap_err();
        assert!(matches!(e, Error::Decode(_)), "{e}");
    }
}
