//! x402 payments (<https://github.com/coinbase/x402>, protocol v2, with v1's `X-PAYMENT` payload
//! accepted): the `exact` scheme on EVM, an EIP-3009 `transferWithAuthorization` of the test
//! stablecoin to the vault. The hub is its own facilitator: [`verify`] checks a payment against
//! the requirements and the chain without moving money, [`settle`] submits it.

use alloy_primitives::{Address, Bytes, Signature, B256, U256};
use alloy_sol_types::{eip712_domain, sol, SolStruct};
use serde::{Deserialize, Serialize};

use crate::contracts::TestUsd;
use crate::Chain;

/// `PAYMENT-REQUIRED`: the 402 response's header (base64 of a [`PaymentRequired`]).
pub const PAYMENT_REQUIRED_HEADER: &str = "payment-required";
/// `PAYMENT-SIGNATURE`: the v2 client's payment (base64 of a [`PaymentPayload`]).
pub const PAYMENT_SIGNATURE_HEADER: &str = "payment-signature";
/// `X-PAYMENT`: the v1 client's payment.
pub const X_PAYMENT_HEADER: &str = "x-payment";
/// `PAYMENT-RESPONSE`: the settlement, on the paid response (base64 of a [`SettlementResponse`]).
pub const PAYMENT_RESPONSE_HEADER: &str = "payment-response";
/// The one scheme supported.
pub const SCHEME_EXACT: &str = "exact";
/// Seconds an authorization must still be valid for when it is verified, so that settlement
/// lands before it expires.
const SETTLE_MARGIN_SECS: u64 = 6;

sol! {
    /// EIP-3009's signed message.
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// The resource paid for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    /// The URL.
    pub url: String,
    /// What it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Its MIME type.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mime_type: String,
}

/// One way to pay (an entry of `accepts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// `exact`.
    pub scheme: String,
    /// CAIP-2 network (`eip155:31337`).
    pub network: String,
    /// Atomic token units (= micro-units), as a decimal string.
    #[serde(alias = "maxAmountRequired")]
    pub amount: String,
    /// The token contract.
    pub asset: Address,
    /// Who is paid: the vault.
    pub pay_to: Address,
    /// How long the payment may take.
    pub max_timeout_seconds: u64,
    /// EIP-712 domain of the token: `name` and `version`.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The 402 answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    /// 2.
    pub x402_version: u32,
    /// Why payment is required.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The resource.
    pub resource: ResourceInfo,
    /// The ways to pay.
    pub accepts: Vec<PaymentRequirements>,
}

/// EIP-3009 authorization fields as x402 sends them (numbers as decimal strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// The payer.
    pub from: Address,
    /// The payee.
    pub to: Address,
    /// Atomic units.
    pub value: String,
    /// Unix seconds after which it is valid.
    pub valid_after: String,
    /// Unix seconds before which it is valid.
    pub valid_before: String,
    /// 32 random bytes.
    pub nonce: B256,
}

/// The `exact` EVM scheme's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactPayload {
    /// 65-byte EIP-712 signature.
    pub signature: Bytes,
    /// What was signed.
    pub authorization: Authorization,
}

/// A client's payment: v2 names the requirements it accepted; v1 names scheme and network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    /// 1 or 2.
    pub x402_version: u32,
    /// v2: the requirements accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<PaymentRequirements>,
    /// v1: the scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// v1: the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The signed authorization.
    pub payload: ExactPayload,
}

/// `PAYMENT-RESPONSE` and the facilitator's `/settle` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementResponse {
    /// Whether the payment was settled.
    pub success: bool,
    /// x402's error code when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    /// The settling transaction's hash (empty when none).
    pub transaction: String,
    /// CAIP-2 network.
    pub network: String,
    /// The payer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<Address>,
}

/// Why a payment is refused, as x402's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Malformed payload.
    #[error("invalid_payload")]
    InvalidPayload,
    /// Not x402 version 1 or 2.
    #[error("invalid_x402_version")]
    InvalidVersion,
    /// Not `exact`.
    #[error("unsupported_scheme")]
    UnsupportedScheme,
    /// Another network.
    #[error("invalid_network")]
    InvalidNetwork,
    /// Another asset, or requirements this hub did not offer.
    #[error("invalid_payment_requirements")]
    InvalidRequirements,
    /// Not paid to the vault.
    #[error("invalid_exact_evm_payload_recipient_mismatch")]
    RecipientMismatch,
    /// Less than required.
    #[error("invalid_exact_evm_payload_authorization_value")]
    ValueTooLow,
    /// Not valid yet.
    #[error("invalid_exact_evm_payload_authorization_valid_after")]
    NotYetValid,
    /// Expired, or expiring before it could be settled.
    #[error("invalid_exact_evm_payload_authorization_valid_before")]
    Expired,
    /// The signature is not the payer's.
    #[error("invalid_exact_evm_payload_signature")]
    BadSignature,
    /// The authorization's nonce was used (a replay) or cancelled.
    #[error("invalid_exact_evm_payload_authorization_nonce")]
    NonceUsed,
    /// The payer lacks the tokens.
    #[error("insufficient_funds")]
    InsufficientFunds,
    /// The chain could not be read.
    #[error("unexpected_verify_error")]
    VerifyError,
    /// The settling transaction failed.
    #[error("unexpected_settle_error")]
    SettleError,
}

impl Refusal {
    /// The error code.
    pub fn code(self) -> String {
        self.to_string()
    }
}

/// What the hub offers for a payment of `amount` micro-units.
#[derive(Debug, Clone)]
pub struct Offer {
    /// CAIP-2 network.
    pub network: String,
    /// The token.
    pub asset: Address,
    /// The vault.
    pub pay_to: Address,
    /// The token's EIP-712 name.
    pub token_name: String,
    /// The token's EIP-712 version.
    pub token_version: String,
    /// Seconds a client has to pay.
    pub max_timeout_seconds: u64,
}

impl Offer {
    /// The offer for `chain`: its network, the token's EIP-712 domain read from the token.
    pub async fn for_chain(chain: &Chain) -> crate::Result<Self> {
        let contracts = chain.contracts();
        let token_name = chain.view(contracts.token, TestUsd::nameCall {}).await?;
        let token_version = chain.view(contracts.token, TestUsd::versionCall {}).await?;
        Ok(Self {
            network: format!("eip155:{}", chain.chain_id().await?),
            asset: contracts.token,
            pay_to: contracts.vault,
            token_name,
            token_version,
            max_timeout_seconds: 300,
        })
    }

    /// The requirements for a payment of `amount` micro-units.
    pub fn requirements(&self, amount: u64) -> PaymentRequirements {
        PaymentRequirements {
            scheme: SCHEME_EXACT.into(),
            network: self.network.clone(),
            amount: amount.to_string(),
            asset: self.asset,
            pay_to: self.pay_to,
            max_timeout_seconds: self.max_timeout_seconds,
            extra: serde_json::json!({"name": self.token_name, "version": self.token_version}),
        }
    }

    /// The chain id in the network name.
    fn chain_id(&self) -> Option<u64> {
        self.network.strip_prefix("eip155:")?.parse().ok()
    }
}

/// A payment that passed [`verify`]: who pays how much.
#[derive(Debug, Clone)]
pub struct VerifiedPayment {
    /// The payer.
    pub payer: Address,
    /// Micro-units authorized (at least the requirement).
    pub value: u64,
    /// The authorization's nonce: with the payer, the payment's identity.
    pub nonce: B256,
    payload: ExactPayload,
}

impl VerifiedPayment {
    /// The ledger idempotency key of this payment's credit.
    pub fn ledger_key(&self) -> String {
        format!("x402:{:#x}:{:#x}", self.payer, self.nonce)
    }
}

fn parse_u64(s: &str) -> Result<u64, Refusal> {
    s.parse().map_err(|_| Refusal::InvalidPayload)
}

/// Decodes a `PAYMENT-SIGNATURE` or `X-PAYMENT` header: base64 of the payload's JSON.
pub fn decode_header(value: &str) -> Result<PaymentPayload, Refusal> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| Refusal::InvalidPayload)?;
    serde_json::from_slice(&bytes).map_err(|_| Refusal::InvalidPayload)
}

/// Base64 of a value's JSON, as x402 headers carry it.
pub fn encode_header(value: &impl Serialize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(value).expect("x402 types serialize"))
}

/// Checks a payment against `required` and the chain, moving no money: version, scheme,
/// network, asset, recipient (the vault), amount, validity window, the payer's EIP-712
/// signature under the token's domain, the nonce unused on-chain, and the payer's balance.
pub async fn verify(
    chain: &Chain,
    offer: &Offer,
    required: &PaymentRequirements,
    payment: &PaymentPayload,
    now: u64,
) -> Result<VerifiedPayment, Refusal> {
    let (scheme, network) = match (payment.x402_version, &payment.accepted) {
        (2, Some(accepted)) => {
            if accepted.asset != required.asset || accepted.pay_to != required.pay_to {
                return Err(Refusal::InvalidRequirements);
            }
            (accepted.scheme.as_str(), accepted.network.as_str())
        }
        (1, _) => (
            payment.scheme.as_deref().unwrap_or_default(),
            payment.network.as_deref().unwrap_or_default(),
        ),
        (2, None) => return Err(Refusal::InvalidPayload),
        _ => return Err(Refusal::InvalidVersion),
    };
    if scheme != SCHEME_EXACT {
        return Err(Refusal::UnsupportedScheme);
    }
    if network != required.network || required.network != offer.network {
        return Err(Refusal::InvalidNetwork);
    }
    if required.asset != offer.asset {
        return Err(Refusal::InvalidRequirements);
    }
    let auth = &payment.payload.authorization;
    if auth.to != offer.pay_to || required.pay_to != offer.pay_to {
        return Err(Refusal::RecipientMismatch);
    }
    let value = parse_u64(&auth.value)?;
    if value < parse_u64(&required.amount)? {
        return Err(Refusal::ValueTooLow);
    }
    let (valid_after, valid_before) = (
        parse_u64(&auth.valid_after)?,
        parse_u64(&auth.valid_before)?,
    );
    if valid_after >= now {
        return Err(Refusal::NotYetValid);
    }
    if valid_before <= now + SETTLE_MARGIN_SECS {
        return Err(Refusal::Expired);
    }
    let message = TransferWithAuthorization {
        from: auth.from,
        to: auth.to,
        value: U256::from(value),
        validAfter: U256::from(valid_after),
        validBefore: U256::from(valid_before),
        nonce: auth.nonce,
    };
    let domain = eip712_domain! {
        name: offer.token_name.clone(),
        version: offer.token_version.clone(),
        chain_id: offer.chain_id().ok_or(Refusal::InvalidNetwork)?,
        verifying_contract: offer.asset,
    };
    let signature =
        Signature::from_raw(&payment.payload.signature).map_err(|_| Refusal::BadSignature)?;
    let signer = signature
        .recover_address_from_prehash(&message.eip712_signing_hash(&domain))
        .map_err(|_| Refusal::BadSignature)?;
    if signer != auth.from {
        return Err(Refusal::BadSignature);
    }
    let token = offer.asset;
    let used = chain
        .view(
            token,
            TestUsd::authorizationStateCall {
                authorizer: auth.from,
                nonce: auth.nonce,
            },
        )
        .await
        .map_err(|_| Refusal::VerifyError)?;
    if used {
        return Err(Refusal::NonceUsed);
    }
    let balance = chain
        .view(token, TestUsd::balanceOfCall { account: auth.from })
        .await
        .map_err(|_| Refusal::VerifyError)?;
    if balance < U256::from(value) {
        return Err(Refusal::InsufficientFunds);
    }
    Ok(VerifiedPayment {
        payer: auth.from,
        value,
        nonce: auth.nonce,
        payload: payment.payload.clone(),
    })
}

/// Submits a verified payment on-chain (`transferWithAuthorization`, from the hub's operator
/// key) and returns the transaction hash. The token refuses a nonce used before, so a payment
/// settles at most once.
pub async fn settle(chain: &Chain, payment: &VerifiedPayment) -> Result<B256, Refusal> {
    let auth = &payment.payload.authorization;
    let call = TestUsd::transferWithAuthorizationCall {
        from: auth.from,
        to: auth.to,
        value: U256::from(payment.value),
        validAfter: U256::from(parse_u64(&auth.valid_after)?),
        validBefore: U256::from(parse_u64(&auth.valid_before)?),
        nonce: auth.nonce,
        signature: payment.payload.signature.clone(),
    };
    match chain.send(chain.contracts().token, call).await {
        Ok(receipt) => Ok(receipt.transaction_hash),
        Err(e) => {
            tracing::warn!(error = %e, payer = %payment.payer, "x402 settlement failed");
            Err(Refusal::SettleError)
        }
    }
}

/// The client's side: signs an `exact` payment of `value` for `required` (EIP-3009 under the
/// token's EIP-712 domain from `required.extra`), as an x402 v2 payload.
pub fn sign_payment(
    signer: &alloy_signer_local::PrivateKeySigner,
    required: &PaymentRequirements,
    value: u64,
    valid_before: u64,
    nonce: B256,
) -> crate::Result<PaymentPayload> {
    use alloy_signer::SignerSync;
    let chain_id = required
        .network
        .strip_prefix("eip155:")
        .and_then(|id| id.parse::<u64>().ok())
        .ok_or_else(|| crate::Error::Rpc(format!("not an EVM network: {}", required.network)))?;
    let text = |key: &str| required.extra[key].as_str().unwrap_or_default().to_owned();
    let domain = eip712_domain! {
        name: text("name"),
        version: text("version"),
        chain_id: chain_id,
        verifying_contract: required.asset,
    };
    let message = TransferWithAuthorization {
        from: signer.address(),
        to: required.pay_to,
        value: U256::from(value),
        validAfter: U256::ZERO,
        validBefore: U256::from(valid_before),
        nonce,
    };
    let signature = signer
        .sign_hash_sync(&message.eip712_signing_hash(&domain))
        .map_err(|e| crate::Error::Rpc(format!("signing: {e}")))?;
    Ok(PaymentPayload {
        x402_version: 2,
        accepted: Some(required.clone()),
        scheme: None,
        network: None,
        payload: ExactPayload {
            signature: Bytes::from(signature.as_bytes().to_vec()),
            authorization: Authorization {
                from: signer.address(),
                to: required.pay_to,
                value: value.to_string(),
                valid_after: "0".into(),
                valid_before: valid_before.to_string(),
                nonce,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_garbage_is_invalid_payload() {
        let required = PaymentRequired {
            x402_version: 2,
            error: String::new(),
            resource: ResourceInfo::default(),
            accepts: vec![],
        };
        let back: PaymentRequired = {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encode_header(&required))
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        };
        assert_eq!(back.x402_version, 2);
        assert_eq!(
            decode_header("not base64!").unwrap_err(),
            Refusal::InvalidPayload
        );
        assert_eq!(
            Refusal::ValueTooLow.code(),
            "invalid_exact_evm_payload_authorization_value"
        );
    }
}
