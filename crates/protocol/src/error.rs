//! Errors of signing, verification and keystores.

use alloy_primitives::Address;

/// Everything that can go wrong while signing or verifying a message or handling a keystore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message was signed for another EIP-712 domain (chain id or verifying contract).
    #[error("wrong domain: expected chain {expected_chain} at {expected_contract}, got chain {got_chain} at {got_contract}")]
    WrongDomain {
        /// Chain id the verifier accepts.
        expected_chain: u64,
        /// Verifying contract the verifier accepts.
        expected_contract: Address,
        /// Chain id claimed by the message.
        got_chain: u64,
        /// Verifying contract claimed by the message.
        got_contract: Address,
    },
    /// The message's expiry (unix seconds) has passed.
    #[error("message expired at {expiry}, now {now}")]
    Expired {
        /// The message's expiry.
        expiry: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The message's expiry lies further in the future than this verifier accepts.
    #[error("message expiry {expiry} is too far in the future (at most {max})")]
    ExpiryTooFar {
        /// The message's expiry.
        expiry: u64,
        /// The latest expiry accepted now.
        max: u64,
    },
    /// The 65 signature bytes are not a valid secp256k1 recoverable signature.
    #[error("malformed signature: {0}")]
    MalformedSignature(#[from] alloy_primitives::SignatureError),
    /// The signature is valid but was made by another key than the claimed signer
    /// (or over other message contents).
    #[error("wrong signer: claimed {claimed}, signature recovers to {recovered}")]
    WrongSigner {
        /// The signer the envelope claims.
        claimed: Address,
        /// The address the signature actually recovers to.
        recovered: Address,
    },
    /// The nonce was already used by this signer for this message type.
    #[error("replayed nonce {nonce} for {signer} ({scope})")]
    ReplayedNonce {
        /// The signer.
        signer: Address,
        /// The EIP-712 primary type the nonce is scoped to.
        scope: &'static str,
        /// The reused nonce.
        nonce: u64,
    },
    /// The nonce store itself failed (for instance its database).
    #[error("nonce store: {0}")]
    NonceStore(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The signer failed to sign.
    #[error("signing failed: {0}")]
    Signing(#[from] alloy_signer::Error),
    /// A keystore could not be created, read or decrypted (a wrong password lands here).
    #[error("keystore: {0}")]
    Keystore(#[from] alloy_signer_local::LocalSignerError),
    /// A private key was not 32 bytes of valid hex or not a valid secp256k1 scalar.
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    /// An unknown stake action code.
    #[error("unknown stake action {0}")]
    UnknownStakeAction(u8),
    /// An unknown task action code.
    #[error("unknown task action {0}")]
    UnknownTaskAction(u8),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
