//! Who pays for a request, and API keys.
//!
//! A request pays either with `Authorization: Bearer KEY`, a key a wallet registered by signing
//! an EIP-712 `ApiKeyRegistration` (`POST /v1/keys`; the hub stores only its sha256, with its
//! expiry; `POST /v1/keys/revoke` takes a signed `ApiKeyRevocation`), or with a per-request
//! EIP-712 `InferenceRequest` in the `x-tessera-signature` header: its `promptHash` is the sha256
//! of the body, its model and price cap are binding, and its nonce is consumed only once the
//! request is admitted (a refused request does not burn it). Every signature is bound to this
//! hub's domain and may not expire further ahead than `--max-signature-validity`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use tessera_protocol::{Address, ApiKeyRegistration, ApiKeyRevocation, InferenceRequest, Signed};
use tessera_types::JobRequest;

use crate::error::ApiError;
use crate::{now_secs, Hub};

/// The header that carries a per-request signature: the compact JSON of a
/// `Signed<InferenceRequest>` whose `promptHash` is the sha256 of the request body.
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";
/// The longest an API key may be valid for.
pub const MAX_KEY_LIFETIME_SECS: u64 = 366 * 24 * 3600;
/// How long a key lookup is cached (a revocation reaches other replicas within this).
const KEY_CACHE: Duration = Duration::from_secs(30);

/// Who pays for a request.
pub enum Auth {
    /// A registered API key's wallet.
    Key(Address),
    /// A per-request EIP-712 signature, checked against the body once it is parsed.
    Signed(Box<Signed<InferenceRequest>>),
}

/// Resolves the payer: a per-request signature if present, else the bearer API key.
pub async fn authenticate(hub: &Hub, headers: &HeaderMap) -> Result<Auth, ApiError> {
    // A request an x402 payment paid for spends from the payer's account (credited with it).
    if let Some(payer) = crate::api::x402::payer(headers) {
        return Ok(Auth::Key(payer));
    }
    if let Some(signature) = headers.get(SIGNATURE_HEADER) {
        let signed: Signed<InferenceRequest> = signature
            .to_str()
            .ok()
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                ApiError::bad_signature(format!(
                    "{SIGNATURE_HEADER} must be the JSON of a signed InferenceRequest."
                ))
            })?;
        return Ok(Auth::Signed(Box::new(signed)));
    }
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(key) = value
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return Err(ApiError::unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer KEY`; register keys with POST /v1/keys."));
    };
    hub.agent_for_key(key)
        .await
        .map(Auth::Key)
        .ok_or_else(|| ApiError::unauthorized("Incorrect, expired or revoked API key provided."))
}

/// Checks a signed request against what it pays for: the body (prompt hash), the token budget,
/// the domain, expiry and signature. The nonce is not touched here ([`consume_nonce`]).
pub fn check_signed(
    hub: &Hub,
    signed: &Signed<InferenceRequest>,
    body: &Bytes,
    job: &JobRequest,
) -> Result<Address, ApiError> {
    let m = &signed.message;
    let body_hash: [u8; 32] = Sha256::digest(body).into();
    if m.promptHash.0 != body_hash {
        return Err(ApiError::bad_signature(
            "The signed promptHash is not the sha256 of this request body.",
        ));
    }
    if job.max_tokens > m.maxTokens {
        return Err(ApiError::bad_signature(format!(
            "max_tokens {} exceeds the signed maxTokens {}.",
            job.max_tokens, m.maxTokens
        )));
    }
    hub.verifier
        .check(signed, now_secs())
        .map_err(|e| ApiError::bad_signature(format!("Invalid request signature: {e}")))
}

/// Consumes a signed request's nonce (after admission: a refused request keeps it).
pub async fn consume_nonce(hub: &Hub, signed: &Signed<InferenceRequest>) -> Result<(), ApiError> {
    hub.verifier
        .verify(signed, now_secs(), &hub.ledger)
        .await
        .map(|_| ())
        .map_err(|e| ApiError::bad_signature(format!("Invalid request signature: {e}")))
}

impl Hub {
    /// The agent an API key belongs to, if it is registered, unexpired and not revoked.
    pub async fn agent_for_key(&self, key: &str) -> Option<Address> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let now = now_secs();
        let cached = self
            .api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .copied();
        let (agent, valid_until) = match cached {
            Some((agent, valid_until, at)) if at.elapsed() < KEY_CACHE => (agent, valid_until),
            _ => {
                let found = self.store.api_key(&hash).await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "API key lookup failed");
                    None
                });
                let mut cache = self.api_keys.write().unwrap_or_else(|p| p.into_inner());
                match found {
                    Some((agent, valid_until)) => {
                        cache.insert(hash, (agent, valid_until, Instant::now()));
                        (agent, valid_until)
                    }
                    None => {
                        cache.remove(&hash);
                        return None;
                    }
                }
            }
        };
        (now <= valid_until).then_some(agent)
    }
}

fn parse_signed<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    what: &str,
) -> Result<Signed<T>, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("Expected a signed {what}: {e}")))
}

/// `POST /v1/keys`: registers an API key by a wallet's signed `ApiKeyRegistration` (the JSON of
/// a `Signed<ApiKeyRegistration>`; the key itself is never sent, only its sha256).
pub async fn register_key(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let signed: Signed<ApiKeyRegistration> = match parse_signed(&body, "ApiKeyRegistration") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let now = now_secs();
    let valid_until = signed.message.validUntil;
    if valid_until <= now || valid_until - now > MAX_KEY_LIFETIME_SECS {
        return ApiError::invalid_param(
            "validUntil",
            format!(
                "validUntil must be in the future and at most {MAX_KEY_LIFETIME_SECS} s ahead."
            ),
        )
        .into_response();
    }
    let agent = match hub.verifier.verify(&signed, now, &hub.ledger).await {
        Ok(a) => a,
        Err(e) => {
            return ApiError::bad_signature(format!("Invalid signature: {e}")).into_response()
        }
    };
    match hub
        .store
        .put_api_key(&signed.message.keyHash.0, agent, valid_until)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return ApiError::forbidden("This key is registered to another wallet, or was revoked.")
                .into_response()
        }
        Err(e) => return ApiError::internal(e).into_response(),
    }
    hub.api_keys
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&signed.message.keyHash.0);
    tracing::info!(%agent, valid_until, "API key registered");
    Json(json!({"address": agent, "valid_until": valid_until})).into_response()
}

/// `POST /v1/keys/revoke`: revokes a key by the owner's signed `ApiKeyRevocation`.
pub async fn revoke_key(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let signed: Signed<ApiKeyRevocation> = match parse_signed(&body, "ApiKeyRevocation") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let agent = match hub.verifier.verify(&signed, now_secs(), &hub.ledger).await {
        Ok(a) => a,
        Err(e) => {
            return ApiError::bad_signature(format!("Invalid signature: {e}")).into_response()
        }
    };
    match hub
        .store
        .revoke_api_key(&signed.message.keyHash.0, agent)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return ApiError::status(
                axum::http::StatusCode::NOT_FOUND,
                "key_not_found",
                "This wallet has no such API key.",
            )
            .into_response()
        }
        Err(e) => return ApiError::internal(e).into_response(),
    }
    hub.api_keys
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&signed.message.keyHash.0);
    tracing::info!(%agent, "API key revoked");
    Json(json!({"address": agent, "revoked": true})).into_response()
}
