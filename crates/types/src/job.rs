//! What a job asks a provider to run, and the states the hub reports about it.

use serde::{Deserialize, Serialize};

use crate::chat::{Message, Tool};
use crate::sampling::SamplingParams;

/// What a job asks a provider to run. The prompt goes as messages (or raw text), not tokens: the
/// provider and any verifier tokenize it themselves with the model's own template, so a provider
/// that alters the prompt is caught by the verifier's prompt hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The conversation (chat completions).
    pub messages: Vec<Message>,
    /// Functions the template tells the model it may call (OpenAI's `tools`; empty when
    /// `tool_choice` is `none`). The sampling rule's grammar says which calls it may make.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// Raw prompt text (legacy completions); used instead of `messages` when set.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Token budget.
    pub max_tokens: u32,
    /// Sampling rule, with the seed the hub assigned.
    pub sampling: SamplingParams,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Report each output token's log-probability, with this many most likely alternatives
    /// (OpenAI's `logprobs` / `top_logprobs`); `None` reports none. Changes no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
}

impl JobRequest {
    /// Bytes of prompt text: an upper bound of the prompt's token count before the template
    /// (every token of a byte-level or byte-fallback vocabulary covers at least one byte).
    pub fn prompt_bytes(&self) -> usize {
        match &self.prompt {
            Some(p) => p.len(),
            None => {
                let calls = |m: &Message| -> usize {
                    m.tool_calls
                        .iter()
                        .map(|c| c.name.len() + c.arguments.len())
                        .sum()
                };
                let tools: usize = self
                    .tools
                    .iter()
                    .map(|t| {
                        t.name.len()
                            + t.description.as_ref().map_or(0, String::len)
                            + t.parameters.len()
                    })
                    .sum();
                tools
                    + self
                        .messages
                        .iter()
                        .map(|m| m.content.len() + calls(m))
                        .sum::<usize>()
            }
        }
    }
}

/// Why a provider refused or failed a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The prompt plus `max_tokens` does not fit in the model's context window.
    ContextLength,
    /// The engine failed.
    Engine,
    /// The node is shutting down or at capacity.
    Unavailable,
    /// The request's grammar (`response_format` schema) does not compile.
    InvalidGrammar,
}

/// Where a job stands with verification, as the agent is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationStatus {
    /// Not sampled for verification.
    None,
    /// Sampled: settled once the verdict is in.
    Pending,
    /// Sampled, but no verifier was available; settled unchecked.
    Skipped,
}

impl VerificationStatus {
    /// The status as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Skipped => "skipped",
        }
    }
}
