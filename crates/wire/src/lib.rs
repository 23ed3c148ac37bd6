//! The hub ↔ provider protocol: JSON text frames over one WebSocket that the provider opens
//! outward to the hub (so providers behind NAT can serve).
//!
//! A session: the hub greets with [`HubMessage::Hello`] (the EIP-712 domain its signatures are
//! bound to); the node sends [`NodeMessage::Register`] with a signed `ProviderRegistration`; the
//! hub answers [`HubMessage::Registered`] (with the model's public name, from the hub's own
//! catalog of pinned files) or [`HubMessage::Rejected`]. Then the hub sends [`HubMessage::Job`]s
//! and [`HubMessage::Score`] requests, each with an id the node echoes in its replies. A job
//! streams [`NodeMessage::Token`]s, each a token *id* with its five committed logits, and ends
//! with [`NodeMessage::Done`] or [`NodeMessage::Failed`]. The hub never takes text from a
//! provider: it decodes the committed ids itself, and builds the commitment from what was
//! streamed, so what the agent reads is exactly what a verifier checks.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
use tessera_protocol::{Address, Domain, ProviderRegistration, Signed};
pub use tessera_types::{
    Commitment, FailureKind, Finish, JobRequest, Message, Role, SamplingParams, TokenLogprobs,
    Verdict,
};

/// The WebSocket path on the hub that nodes connect to.
pub const CONNECT_PATH: &str = "/v1/providers/connect";

/// Node → hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    /// First message of a session, after the hub's [`HubMessage::Hello`].
    Register {
        /// The signed registration (model sha256, price, capacity), under the hub's domain.
        registration: Signed<ProviderRegistration>,
        /// Development only: ask the hub's faucet to fund and stake this provider.
        #[serde(default)]
        dev_stake: bool,
        /// The engine and its version (`tessera-engine 0.1.0`), named in responses'
        /// `system_fingerprint`; unsigned, informational.
        #[serde(default)]
        engine: String,
    },
    /// Liveness and load.
    Heartbeat {
        /// Jobs in progress.
        active_jobs: u32,
    },
    /// A generated token, with the values the commitment records for its position.
    Token {
        /// The job.
        job: u64,
        /// The token id.
        token: u32,
        /// IEEE half-float bits of the emitted token's logit and the top four logits.
        values: [u16; 5],
        /// The token's log-probabilities, when the job asked for them (from the same logits).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<TokenLogprobs>,
    },
    /// A job finished.
    Done {
        /// The job.
        job: u64,
        /// Prompt tokens under the model's template (billed, and checked by verifiers).
        prompt_tokens: u32,
        /// sha256 of the prompt tokens (the commitment's `prompt_hash`).
        prompt_hash: String,
        /// Why generation ended.
        finish: Finish,
    },
    /// A job failed or was refused.
    Failed {
        /// The job.
        job: u64,
        /// What kind of failure.
        kind: FailureKind,
        /// Human-readable detail.
        message: String,
        /// sha256 of the prompt tokens, when the failure came after the prompt was read (lets
        /// the hub verify the tokens delivered before the failure).
        #[serde(default)]
        prompt_hash: Option<String>,
    },
    /// The outcome of a scoring request.
    Scored {
        /// The request's id.
        id: u64,
        /// What the check found.
        verdict: Verdict,
    },
}

/// Hub → node.
// A message lives only between its creation and its serialization: boxing the large variants
// would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubMessage {
    /// First message of a session: the domain a registration must be signed under.
    Hello {
        /// The hub's EIP-712 domain.
        domain: Domain,
    },
    /// Registration accepted.
    Registered {
        /// The provider's address, as recovered from the signature.
        provider: Address,
        /// Its stake in the ledger.
        staked: u64,
        /// The public name the hub serves this model file under.
        model: String,
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
    /// Score a claimed generation by one teacher-forced pass and check it against its
    /// commitment. Verifications of other providers' jobs and the hub's known-answer checks
    /// both arrive as this one message.
    Score {
        /// The request's id.
        id: u64,
        /// The job as the agent asked it.
        request: JobRequest,
        /// The output tokens delivered.
        output_tokens: Vec<u32>,
        /// The commitment to them.
        commitment: Commitment,
        /// The job broke off (provider failure or lost connection) before it finished: its
        /// finish is `cancelled`, and its prompt hash may be unknown (empty).
        #[serde(default)]
        partial: bool,
        /// Prompt tokens the provider billed, to be checked against the prompt.
        #[serde(default)]
        prompt_tokens: Option<u32>,
        /// The log-probabilities the provider reported, one per output token, to be recomputed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<Vec<TokenLogprobs>>,
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
            prompt_hash: None,
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
        let t = NodeMessage::Token {
            job: 1,
            token: 42,
            values: [1, 2, 3, 4, 5],
            logprobs: None,
        };
        assert_eq!(
            t.to_json(),
            r#"{"type":"token","job":1,"token":42,"values":[1,2,3,4,5]}"#
        );
        let v: NodeMessage =
            serde_json::from_str(r#"{"type":"scored","id":1,"verdict":{"verdict":"pass"}}"#)
                .expect("parses");
        assert!(matches!(
            v,
            NodeMessage::Scored {
                verdict: Verdict::Pass,
                ..
            }
        ));
    }
}
