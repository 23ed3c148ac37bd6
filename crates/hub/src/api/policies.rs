//! `/v1/policies`: spending policies of session keys (see [`crate::policy`]). A grant and a
//! revocation are the owner's EIP-712 signatures; reading a policy is public (it names limits,
//! not secrets), so an agent can check what its session key may still spend.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tessera_protocol::{Address, PolicyRevocation, Signed, SpendingPolicy};

use crate::error::ApiError;
use crate::Hub;

/// The policy routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/policies", post(grant))
        .route("/v1/policies/{session}", get(show))
        .route("/v1/policies/{session}/revoke", post(revoke))
}

fn parse<T: DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("Expected a signed {what}: {e}")))
}

fn session(text: &str) -> Result<Address, ApiError> {
    text.parse()
        .map_err(|_| ApiError::invalid_param("session", "Not an address."))
}

fn answer(result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn grant(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    match parse::<Signed<SpendingPolicy>>(&body, "SpendingPolicy") {
        Ok(signed) => answer(hub.grant_policy(&signed).await),
        Err(e) => e.into_response(),
    }
}

async fn show(State(hub): State<Arc<Hub>>, Path(text): Path<String>) -> Response {
    match session(&text) {
        Ok(s) => answer(hub.show_policy(s).await),
        Err(e) => e.into_response(),
    }
}

async fn revoke(State(hub): State<Arc<Hub>>, Path(text): Path<String>, body: Bytes) -> Response {
    let signed = match parse::<Signed<PolicyRevocation>>(&body, "PolicyRevocation") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match session(&text) {
        Ok(s) if s == signed.message.session => answer(hub.revoke_policy(&signed).await),
        Ok(_) => {
            ApiError::bad_signature("The revocation names another session key.").into_response()
        }
        Err(e) => e.into_response(),
    }
}
