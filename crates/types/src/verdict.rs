//! A verifier's answer about one job, and why a job failed its check.

use serde::{Deserialize, Serialize};

use crate::commitment::VERSION;

/// What a verifier reports about one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The job is what the requested model and rule produce.
    Pass,
    /// The job failed the check.
    Fail {
        /// Why.
        reason: String,
    },
    /// The verifier could not check at all (its own failure); counts for no one.
    Inconclusive {
        /// What went wrong.
        error: String,
    },
}

impl Verdict {
    /// Whether this is a pass.
    pub fn passed(&self) -> bool {
        matches!(self, Verdict::Pass)
    }
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// The commitment cannot be read.
    Malformed {
        /// Details.
        detail: String,
    },
    /// A format version this verifier does not know.
    WrongVersion {
        /// The version found.
        found: u8,
    },
    /// Committed to another model than the job asked for.
    WrongModel {
        /// The model the job asked for.
        expected: String,
        /// The commitment's model.
        found: String,
    },
    /// The commitment is for other prompt tokens.
    PromptMismatch,
    /// The commitment does not cover the delivered output.
    OutputMismatch,
    /// Sampling parameters, seed, token budget or stop strings differ from the request.
    ParamsMismatch {
        /// Which.
        field: String,
    },
    /// The committed logits are not those of the requested model on this input.
    LogitsDiverge {
        /// Largest difference.
        max_abs: f32,
        /// Mean difference.
        mean_abs: f32,
    },
    /// A token the requested rule would not have produced.
    TokenInconsistent {
        /// Index in the output.
        index: usize,
        /// Its score deficit (logit units).
        deficit: f32,
    },
    /// A token the job's grammar does not allow at its position (a provider that ignored the
    /// requested `response_format`).
    GrammarViolation {
        /// Index in the output.
        index: usize,
    },
    /// The reported log-probabilities (`logprobs`) are not the model's: invented, or computed
    /// from other logits.
    LogprobsMismatch {
        /// Index in the output.
        index: usize,
        /// What differs.
        detail: String,
    },
    /// The finish reason is false.
    FalseFinish {
        /// Details.
        detail: String,
    },
    /// Too many tokens are near-tie deviations from the rule's choice: an honest provider's
    /// tokens are exactly the rule's except where measured noise flips a near-tie, which is rare;
    /// one that generated from another context or model and re-scored its tokens flips often.
    TooManyNearTies {
        /// Tokens that were not exactly the rule's choice.
        inexact: usize,
        /// Tokens checked.
        positions: usize,
    },
    /// The prompt token count billed is not the prompt's.
    PromptLengthMismatch {
        /// Tokens the provider claimed.
        claimed: u32,
        /// Tokens the prompt has under the model's template.
        actual: u32,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Malformed { detail } => write!(f, "malformed commitment: {detail}"),
            Reason::WrongVersion { found } => write!(
                f,
                "unsupported commitment version {found} (this verifier reads {VERSION})"
            ),
            Reason::WrongModel { expected, found } => {
                write!(f, "committed to model {found}, job asked for {expected}")
            }
            Reason::PromptMismatch => write!(f, "commitment is for a different prompt"),
            Reason::OutputMismatch => write!(f, "commitment does not match the delivered output"),
            Reason::ParamsMismatch { field } => {
                write!(f, "commitment's {field} differs from the request")
            }
            Reason::LogitsDiverge { max_abs, mean_abs } => {
                write!(f, "committed logits diverge from the model's (max |Δ| {max_abs:.3}, mean |Δ| {mean_abs:.4})")
            }
            Reason::TokenInconsistent { index, deficit } => {
                write!(
                    f,
                    "token {index} is not what the sampling rule selects (deficit {deficit:.3})"
                )
            }
            Reason::FalseFinish { detail } => write!(f, "false finish reason: {detail}"),
            Reason::LogprobsMismatch { index, detail } => {
                write!(
                    f,
                    "the logprobs reported for output token {index} are not the model's: {detail}"
                )
            }
            Reason::GrammarViolation { index } => write!(
                f,
                "output token {index} is not allowed by the requested grammar (response_format)"
            ),
            Reason::TooManyNearTies { inexact, positions } => {
                write!(f, "{inexact} of {positions} tokens deviate from the rule's choice (near ties); honest noise flips far fewer")
            }
            Reason::PromptLengthMismatch { claimed, actual } => {
                write!(
                    f,
                    "billed {claimed} prompt tokens but the prompt has {actual}"
                )
            }
        }
    }
}
