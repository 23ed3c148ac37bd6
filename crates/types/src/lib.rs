//! `tessera-types`: the data every part of Tessera exchanges, with no dependency on the engine,
//! the database or the network: chat [`Message`]s, the [`sampling`] rule (the exact function a
//! provider samples with and a verifier replays), [`JobRequest`]s, inference [`Commitment`]s, a
//! verifier's [`Verdict`], and the [`Vocabulary`] with which the hub turns committed token ids into
//! the text an agent receives.
#![deny(missing_docs)]

pub mod commitment;
pub mod job;
pub mod logprobs;
pub mod sampling;
pub mod verdict;
pub mod vocab;

mod chat;

pub use chat::{Message, Role, Tool, ToolCall};
pub use commitment::{Commitment, CommitmentBuilder, Finish, JobSpec};
pub use job::{FailureKind, JobRequest, VerificationStatus};
pub use logprobs::TokenLogprobs;
pub use sampling::{Grammar, SamplingParams};
pub use verdict::{Reason, Verdict};
pub use vocab::{TextDecoder, Vocabulary};
