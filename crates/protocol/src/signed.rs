//! Signed envelopes and their verification (EIP-712 typed-data signatures).

use std::{borrow::Cow, collections::HashSet, future::Future, sync::Mutex};

use alloy_primitives::{address, Address, FixedBytes, Signature, B256, U256};
use alloy_signer::SignerSync;
use alloy_sol_types::Eip712Domain;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, TypedMessage};

/// EIP-712 domain name of every Tessera message.
pub const DOMAIN_NAME: &str = "Tessera";
/// EIP-712 domain version; bump it when a message type changes incompatibly.
pub const DOMAIN_VERSION: &str = "1";
/// The chain id of a local development network (anvil, hardhat).
pub const DEFAULT_CHAIN_ID: u64 = 31337;
/// The verifying contract of the default domain (tests and examples only). A hub binds its domain
/// to its own address ([`Domain::for_hub`]) or to its vault contract, so that a message signed for
/// one hub does not replay at another.
pub const VERIFYING_CONTRACT: Address = address!("7e55e4a000000000000000000000000000000001");
/// How far in the future a message's expiry may lie, by default (one day).
pub const DEFAULT_MAX_VALIDITY_SECS: u64 = 24 * 3600;

/// The parts of the EIP-712 domain that vary between deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Address of the verifying contract.
    pub verifying_contract: Address,
}

impl Default for Domain {
    fn default() -> Self {
        Self::new(DEFAULT_CHAIN_ID)
    }
}

impl Domain {
    /// The Tessera domain on `chain_id` with the fixed [`VERIFYING_CONTRACT`].
    pub const fn new(chain_id: u64) -> Self {
        Self {
            chain_id,
            verifying_contract: VERIFYING_CONTRACT,
        }
    }

    /// The domain of one hub: `verifying_contract` is its vault contract when it has one, or an
    /// address derived from the hub's identity (see the hub's `identity`).
    pub const fn for_hub(chain_id: u64, verifying_contract: Address) -> Self {
        Self {
            chain_id,
            verifying_contract,
        }
    }

    /// The full EIP-712 domain separator input.
    pub fn eip712(&self) -> Eip712Domain {
        Eip712Domain {
            name: Some(Cow::Borrowed(DOMAIN_NAME)),
            version: Some(Cow::Borrowed(DOMAIN_VERSION)),
            chain_id: Some(U256::from(self.chain_id)),
            verifying_contract: Some(self.verifying_contract),
            salt: None,
        }
    }
}

/// A typed message with its signature and the signer it claims.
///
/// The domain travels with the message so a verifier can tell "signed for another chain" apart
/// from "signed by someone else": both would otherwise just recover to a wrong address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// The signed message.
    pub message: T,
    /// The domain it was signed under.
    pub domain: Domain,
    /// The address that claims to have signed it.
    pub signer: Address,
    /// The 65-byte `r ‖ s ‖ v` signature over the EIP-712 signing hash.
    pub signature: FixedBytes<65>,
}

impl<T: TypedMessage> Signed<T> {
    /// Signs `message` under `domain` with `signer`.
    pub fn sign<S: SignerSync + alloy_signer::Signer>(
        message: T,
        domain: Domain,
        signer: &S,
    ) -> Result<Self> {
        let hash = message.eip712_signing_hash(&domain.eip712());
        let signature = signer.sign_hash_sync(&hash)?;
        Ok(Self {
            message,
            domain,
            signer: alloy_signer::Signer::address(signer),
            signature: FixedBytes(signature.as_bytes()),
        })
    }

    /// The EIP-712 hash that was signed: `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(message))`.
    pub fn signing_hash(&self) -> B256 {
        self.message.eip712_signing_hash(&self.domain.eip712())
    }

    /// The address the signature recovers to, whatever the claimed signer.
    pub fn recover(&self) -> Result<Address> {
        let signature = Signature::from_raw_array(&self.signature.0)?;
        Ok(signature.recover_address_from_prehash(&self.signing_hash())?)
    }
}

/// Consume-once storage of nonces, keyed by signer and message type.
///
/// The ledger implements it on its database so a nonce is consumed atomically across hub
/// replicas; [`MemoryNonceStore`] serves tests and single-process tools.
pub trait NonceStore {
    /// The store's own failure.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Marks `nonce` used for `(signer, scope)`. Returns `true` if it was fresh, `false` if it had
    /// been used before; must be atomic under concurrency.
    fn consume(
        &self,
        signer: Address,
        scope: &'static str,
        nonce: u64,
    ) -> impl Future<Output = std::result::Result<bool, Self::Error>> + Send;
}

/// An in-memory [`NonceStore`].
#[derive(Debug, Default)]
pub struct MemoryNonceStore {
    used: Mutex<HashSet<(Address, &'static str, u64)>>,
}

impl NonceStore for MemoryNonceStore {
    type Error = std::convert::Infallible;

    async fn consume(
        &self,
        signer: Address,
        scope: &'static str,
        nonce: u64,
    ) -> std::result::Result<bool, Self::Error> {
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(used.insert((signer, scope, nonce)))
    }
}

/// Checks signed messages against one domain.
#[derive(Debug, Clone, Copy)]
pub struct Verifier {
    domain: Domain,
    max_validity_secs: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new(Domain::default())
    }
}

impl Verifier {
    /// A verifier that accepts messages signed under `domain` only, expiring at most
    /// [`DEFAULT_MAX_VALIDITY_SECS`] after they are checked.
    pub const fn new(domain: Domain) -> Self {
        Self {
            domain,
            max_validity_secs: DEFAULT_MAX_VALIDITY_SECS,
        }
    }

    /// The same, with another cap on how far in the future an expiry may lie (a signed message
    /// with a far expiry is a bearer token that never dies).
    pub const fn with_max_validity(mut self, secs: u64) -> Self {
        self.max_validity_secs = secs;
        self
    }

    /// The domain this verifier accepts.
    pub const fn domain(&self) -> Domain {
        self.domain
    }

    /// Stateless checks, cheapest first: domain, expiry (`now` in unix seconds; a message is
    /// valid up to and including its expiry second), then the signature. Returns the signer.
    /// Does not touch the nonce; see [`Verifier::verify`].
    pub fn check<T: TypedMessage>(&self, signed: &Signed<T>, now: u64) -> Result<Address> {
        if signed.domain != self.domain {
            return Err(Error::WrongDomain {
                expected_chain: self.domain.chain_id,
                expected_contract: self.domain.verifying_contract,
                got_chain: signed.domain.chain_id,
                got_contract: signed.domain.verifying_contract,
            });
        }
        let expiry = signed.message.expiry();
        if now > expiry {
            return Err(Error::Expired { expiry, now });
        }
        if expiry.saturating_sub(now) > self.max_validity_secs {
            return Err(Error::ExpiryTooFar {
                expiry,
                max: now.saturating_add(self.max_validity_secs),
            });
        }
        let recovered = signed.recover()?;
        if recovered != signed.signer {
            return Err(Error::WrongSigner {
                claimed: signed.signer,
                recovered,
            });
        }
        Ok(recovered)
    }

    /// [`Verifier::check`], then consumes the nonce in `nonces`. The nonce is consumed last so
    /// that a forged or expired message cannot burn a signer's nonce.
    pub async fn verify<T: TypedMessage, N: NonceStore>(
        &self,
        signed: &Signed<T>,
        now: u64,
        nonces: &N,
    ) -> Result<Address> {
        let signer = self.check(signed, now)?;
        let nonce = signed.message.nonce();
        let fresh = nonces
            .consume(signer, T::NAME, nonce)
            .await
            .map_err(|e| Error::NonceStore(Box::new(e)))?;
        if !fresh {
            tracing::debug!(%signer, scope = T::NAME, nonce, "replayed nonce rejected");
            return Err(Error::ReplayedNonce {
                signer,
                scope: T::NAME,
                nonce,
            });
        }
        Ok(signer)
    }
}
