//! The EIP-712 typed messages of the protocol (<https://eips.ethereum.org/EIPS/eip-712>).
//!
//! Each struct's Solidity definition is its EIP-712 type: field names and order are part of the
//! type hash, so renaming a field invalidates every signature made before. Money is in integer
//! micro-units; times are unix seconds.

use alloy_sol_types::{sol, SolStruct};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Error, Result};

sol! {
    /// An agent's request for inference, signed before the hub escrows its maximum cost.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct InferenceRequest {
        /// SHA-256 of the model's GGUF file.
        bytes32 model;
        /// SHA-256 of the prompt (the messages as sent).
        bytes32 promptHash;
        /// Maximum tokens to generate.
        uint32 maxTokens;
        /// Maximum price per generated token, in micro-units.
        uint64 maxPricePerToken;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the request is void.
        uint64 expiry;
    }

    /// Registers an API key (by its hash) so plain OpenAI clients can spend from the wallet.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct ApiKeyRegistration {
        /// SHA-256 of the API key; the key itself never leaves the agent.
        bytes32 keyHash;
        /// Unix seconds after which the key no longer authenticates.
        uint64 validUntil;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the registration is void.
        uint64 expiry;
    }

    /// Revokes an API key the signer registered.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct ApiKeyRevocation {
        /// SHA-256 of the API key.
        bytes32 keyHash;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the revocation is void.
        uint64 expiry;
    }

    /// A provider's order to stake, unstake or withdraw unbonded stake.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct StakeOrder {
        /// A [`StakeAction`] code: 0 stake, 1 unstake, 2 withdraw.
        uint8 action;
        /// Amount in micro-units (ignored by withdraw, which takes everything matured).
        uint64 amount;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the order is void.
        uint64 expiry;
    }

    /// An agent posts a task to the task market with a reward and a bond.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct TaskPosting {
        /// SHA-256 of the task specification.
        bytes32 taskHash;
        /// Reward paid on completion, in micro-units.
        uint64 reward;
        /// Bond the poster locks, in micro-units.
        uint64 bond;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the posting is void.
        uint64 expiry;
    }

    /// A worker claims a posted task, locking a bond.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct TaskClaim {
        /// The task's id as assigned by the hub.
        bytes32 taskId;
        /// Bond the claimer locks, in micro-units.
        uint64 bond;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the claim is void.
        uint64 expiry;
    }

    /// A worker delivers its work on a task it claimed.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct TaskDelivery {
        /// The task's id as assigned by the hub.
        bytes32 taskId;
        /// SHA-256 of the delivered text.
        bytes32 deliveryHash;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the delivery is void.
        uint64 expiry;
    }

    /// A party's decision on a task: the poster accepts, rejects or cancels, the worker disputes.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct TaskDecision {
        /// The task's id as assigned by the hub.
        bytes32 taskId;
        /// A [`TaskAction`] code: 0 accept, 1 reject, 2 dispute, 3 cancel.
        uint8 action;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the decision is void.
        uint64 expiry;
    }

    /// Feedback on an agent, left by its counterparty on a finished task (after ERC-8004).
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct TaskFeedback {
        /// The finished task.
        bytes32 taskId;
        /// 0 to 100.
        uint8 score;
        /// A short tag (`quality`, `speed`, ...), UTF-8, at most 32 bytes.
        string tag;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the feedback is void.
        uint64 expiry;
    }

    /// An owner delegates a session key (another address) to spend its balance within limits
    /// (after ERC-7715 permissions and session keys). The hub enforces every limit on inference,
    /// task posting and claiming. A session key acts only for its owner, and a later grant to
    /// the same session replaces the earlier one.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct SpendingPolicy {
        /// The delegated address.
        address session;
        /// Most micro-units per generated token an inference may pay.
        uint64 maxPricePerToken;
        /// Most micro-units one request may hold: an inference's maximum cost, a posting's
        /// bounty plus bond, a claim's bond.
        uint64 perRequestCap;
        /// Most micro-units held per UTC day, counted cumulatively (inference at its charged
        /// cost, postings and claims at what they hold).
        uint64 perDayCap;
        /// Most micro-units over the policy's life (a sponsor's budget).
        uint64 totalCap;
        /// Model names or sha256s it may use; empty: any.
        string[] models;
        /// Providers it may be served by; empty: any.
        address[] providers;
        /// Task kinds it may post or claim; empty: any.
        string[] taskKinds;
        /// Unix seconds after which the session key may no longer act.
        uint64 validUntil;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the grant is void.
        uint64 expiry;
    }

    /// An owner revokes the policy of a session key it granted.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct PolicyRevocation {
        /// The delegated address.
        address session;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the revocation is void.
        uint64 expiry;
    }

    /// A provider announces a model it serves, its price and its capacity.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct ProviderRegistration {
        /// SHA-256 of the model's GGUF file.
        bytes32 model;
        /// Price per generated token, in micro-units.
        uint64 pricePerToken;
        /// Concurrent jobs the provider accepts.
        uint32 capacity;
        /// Consumed once per signer and message type.
        uint64 nonce;
        /// Unix seconds after which the registration is void.
        uint64 expiry;
    }

    /// An account holder's order to pay `amount` of its balance out of the vault to `to` on-chain.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct WithdrawalOrder {
        /// The on-chain address that receives the tokens.
        address to;
        /// Micro-units (token units) to pay out.
        uint64 amount;
        /// Consumed once per signer and message type; also names the withdrawal on-chain.
        uint64 nonce;
        /// Unix seconds after which the order is void.
        uint64 expiry;
    }
}

/// A message type that can be signed: an EIP-712 struct with a nonce and an expiry.
pub trait TypedMessage: SolStruct + Clone + Serialize + DeserializeOwned + Send + Sync {
    /// The nonce, consumed once per signer and [`SolStruct::NAME`].
    fn nonce(&self) -> u64;
    /// Unix seconds after which the message is void.
    fn expiry(&self) -> u64;
}

macro_rules! typed_message {
    ($($ty:ty),*) => {$(
        impl TypedMessage for $ty {
            fn nonce(&self) -> u64 {
                self.nonce
            }
            fn expiry(&self) -> u64 {
                self.expiry
            }
        }
    )*};
}
typed_message!(
    InferenceRequest,
    ApiKeyRegistration,
    ApiKeyRevocation,
    StakeOrder,
    TaskPosting,
    TaskClaim,
    TaskDelivery,
    TaskDecision,
    TaskFeedback,
    ProviderRegistration,
    WithdrawalOrder,
    SpendingPolicy,
    PolicyRevocation
);

/// What a [`StakeOrder`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum StakeAction {
    /// Move balance into stake.
    Stake = 0,
    /// Start unbonding stake; it can be withdrawn after the unbonding period.
    Unstake = 1,
    /// Withdraw every matured unbonding back to the balance.
    Withdraw = 2,
}

impl TryFrom<u8> for StakeAction {
    type Error = Error;
    fn try_from(code: u8) -> Result<Self> {
        match code {
            0 => Ok(Self::Stake),
            1 => Ok(Self::Unstake),
            2 => Ok(Self::Withdraw),
            other => Err(Error::UnknownStakeAction(other)),
        }
    }
}

impl StakeOrder {
    /// The order's action, or an error for an unknown code.
    pub fn stake_action(&self) -> Result<StakeAction> {
        StakeAction::try_from(self.action)
    }
}

/// What a [`TaskDecision`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum TaskAction {
    /// The poster accepts the delivery: the worker is paid.
    Accept = 0,
    /// The poster rejects the delivery (the worker may dispute).
    Reject = 1,
    /// The worker disputes a rejection: the network decides.
    Dispute = 2,
    /// The poster withdraws a task nobody has claimed.
    Cancel = 3,
}

impl TryFrom<u8> for TaskAction {
    type Error = Error;
    fn try_from(code: u8) -> Result<Self> {
        match code {
            0 => Ok(Self::Accept),
            1 => Ok(Self::Reject),
            2 => Ok(Self::Dispute),
            3 => Ok(Self::Cancel),
            other => Err(Error::UnknownTaskAction(other)),
        }
    }
}

impl TaskDecision {
    /// The decision's action, or an error for an unknown code.
    pub fn task_action(&self) -> Result<TaskAction> {
        TaskAction::try_from(self.action)
    }
}
