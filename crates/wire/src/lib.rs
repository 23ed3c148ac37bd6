//! The hub ↔ provider protocol: JSON text frames over one WebSocket that the provider opens
//! outward to the hub (so providers behind NAT can serve).
//!
//! A session: the node sends [`NodeMessage::Register`] with a signed EIP-712
//! `ProviderRegistration`; the hub answers [`HubMessage::Registered`] or
//! [`HubMessage::Rejected`]. Then the hub sends [`HubMessage::Job`]s and [`HubMessage::Verify`]
//! requests, each with an id the node echoes in its replies; the node streams
//! [`NodeMessage::Token`]s, ends each job with [`NodeMessage::Done`] (output plus commitment) or
//! [`NodeMessage::Failed`], and heartbeats.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
pub use tessera_engine::{Message, Role, SamplingParams};
pub use tessera_proof::{Commitment, Finish};
use tessera_protocol::{Address, ProviderRegistration, Signed};

/// The WebSocket path on the hub that nodes connect to.
pub const CONNECT_PATH: &str = "/v1/providers/connect";

/// What a job asks a provider to run. The prompt goes as messages (or raw text), not tokens: the
/// provider and any verifier tokenize it themselves with the model's own template, so a provider
/// that alters the prompt is caught by the verifier's prompt hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The conversation (chat completions).
    pub messages: Vec<Message>,
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
}

/// A finished job as the provider reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Prompt tokens (for usage).
    pub prompt_tokens: u32,
    /// Generated tokens, including a final end-of-turn token.
    pub output_tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why generation ended.
    pub finish: Finish,
    /// The provider's commitment to the generation.
    pub commitment: Commitment,
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
}

/// Node → hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    /// First message of a session.
    Register {
        /// The signed registration (model sha256, price, capacity).
        registration: Signed<ProviderRegistration>,
        /// The model's short name, as agents request it.
        model_name: String,
        /// The model's context window in tokens.
        context_length: u32,
        /// Development only: ask the hub's faucet to fund and stake this provider.
        #[serde(default)]
        dev_stake: bool,
    },
    /// Liveness and load.
    Heartbeat {
        /// Jobs in progress.
        active_jobs: u32,
    },
    /// A generated token's text.
    Token {
        /// The job.
        job: u64,
        /// Text the token completed (may be empty).
        text: String,
    },
    /// A job finished.
    Done {
        /// The job.
        job: u64,
        /// Its output and commitment.
        result: JobResult,
    },
    /// A job failed or was refused.
    Failed {
        /// The job.
        job: u64,
        /// What kind of failure.
        kind: FailureKind,
        /// Human-readable detail.
        message: String,
    },
    /// The outcome of a verification the hub asked for.
    Verdict {
        /// The verification's id.
        id: u64,
        /// Whether the job passed.
        passed: bool,
        /// Why not.
        #[serde(default)]
        reason: Option<String>,
        /// Set when the verifier could not check at all (its own failure): the verdict is then
        /// inconclusive and must not count against the provider.
        #[serde(default)]
        error: Option<String>,
    },
}

/// Hub → node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubMessage {
    /// Registration accepted.
    Registered {
        /// The provider's address, as recovered from the signature.
        provider: Address,
        /// Its stake in the ledger.
        staked: u64,
    },
    /// Registration refused; the hub closes the connection.
    Rejected {
        /// Why.
        message: String,
    },
    /// Run a job.
    Job {
        /// The job's id in this session.
        job: u64,
        /// What to run.
        request: JobRequest,
    },
    /// Stop a job (the agent went away).
    Cancel {
        /// The job.
        job: u64,
    },
    /// Check another provider's job by one teacher-forced pass.
    Verify {
        /// The verification's id.
        id: u64,
        /// The job as the agent asked it.
        request: JobRequest,
        /// The output the provider delivered.
        output_tokens: Vec<u32>,
        /// The provider's commitment.
        commitment: Commitment,
    },
}

impl NodeMessage {
    /// JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("wire messages serialize")
    }
}

impl HubMessage {
    /// JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("wire messages serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_that_round_trips() {
        let m = NodeMessage::Failed {
            job: 3,
            kind: FailureKind::ContextLength,
            message: "too long".into(),
        };
        let json = m.to_json();
        assert!(
            json.contains("\"type\":\"failed\"") && json.contains("\"kind\":\"context_length\""),
            "{json}"
        );
        assert!(matches!(
            serde_json::from_str::<NodeMessage>(&json),
            Ok(NodeMessage::Failed { job: 3, .. })
        ));
        let h = HubMessage::Cancel { job: 9 };
        assert_eq!(h.to_json(), r#"{"type":"cancel","job":9}"#);
        // A verdict from an older node without `error` still parses.
        let v: NodeMessage =
            serde_json::from_str(r#"{"type":"verdict","id":1,"passed":true}"#).expect("parses");
        assert!(matches!(
            v,
            NodeMessage::Verdict {
                passed: true,
                error: None,
                ..
            }
        ));
    }
}
