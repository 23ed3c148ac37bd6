//! Tessera's wire protocol: the EIP-712 typed messages that agents and providers sign, the
//! [`Signed`] envelope that carries them, the [`Verifier`] that checks them, and wallet keys
//! kept in encrypted JSON keystores (Web3 Secret Storage, as geth and every Ethereum tool read).
//!
//! Addresses are ordinary 0x Ethereum addresses and signatures are plain EIP-712 signatures,
//! so any Ethereum tool can check what a Tessera wallet signed.
#![deny(missing_docs)]

mod error;
mod messages;
mod signed;
mod wallet;

pub use alloy_primitives::{Address, B256};
pub use error::{Error, Result};
pub use messages::{
    ApiKeyRegistration, ApiKeyRevocation, InferenceRequest, PolicyRevocation, ProviderRegistration,
    SpendingPolicy, StakeAction, StakeOrder, TaskAction, TaskClaim, TaskDecision, TaskDelivery,
    TaskFeedback, TaskPosting, TypedMessage, WithdrawalOrder,
};
pub use signed::{
    Domain, MemoryNonceStore, NonceStore, Signed, Verifier, DEFAULT_CHAIN_ID,
    DEFAULT_MAX_VALIDITY_SECS, DOMAIN_NAME, DOMAIN_VERSION, VERIFYING_CONTRACT,
};
pub use wallet::Wallet;
