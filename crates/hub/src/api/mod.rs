//! The hub's HTTP API: the OpenAI-compatible endpoints ([`openai`]), payment and API keys
//! ([`auth`]), accounts, providers and metrics ([`accounts`]), per-wallet limits ([`limits`]), the
//! task market ([`tasks`]), spending policies of session keys ([`policies`]).
//! Every error, the router's own 404, 405 and 413 included, is in OpenAI's error shape.

pub mod accounts;
pub mod auth;
pub mod chain;
pub mod dashboard;
pub mod limits;
pub mod openai;
pub mod policies;
pub mod tasks;
pub mod x402;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::Hub;

/// The hub's HTTP routes.
pub fn router(hub: Arc<Hub>) -> Router {
    let limit = hub.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(openai::create_response))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/keys", post(auth::register_key))
        .route("/v1/keys/revoke", post(auth::revoke_key))
        .route("/v1/domain", get(domain))
        .route("/v1/dev/faucet", post(accounts::faucet))
        .route("/v1/accounts/{address}", get(accounts::account))
        .route("/v1/providers", get(accounts::providers))
        .route("/v1/jobs/{id}", get(accounts::job))
        .route(tessera_wire::CONNECT_PATH, get(crate::connect::connect))
        .route("/health", get(accounts::health))
        .route("/metrics", get(accounts::metrics_text))
        .merge(tasks::routes())
        .merge(dashboard::routes())
        .merge(policies::routes())
        .merge(chain::routes())
        .merge(x402::routes())
        .fallback(|| async {
            ApiError::status(StatusCode::NOT_FOUND, "not_found", "Unknown endpoint.")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(openai_shaped_errors))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            x402::pay_per_request,
        ))
        .with_state(hub)
}

/// `GET /v1/domain`: the EIP-712 domain every signature for this hub must use.
async fn domain(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let d = hub.verifier.domain();
    Json(json!({
        "name": tessera_protocol::DOMAIN_NAME,
        "version": tessera_protocol::DOMAIN_VERSION,
        "chainId": d.chain_id,
        "verifyingContract": d.verifying_contract,
        "max_signature_validity_secs": hub.config.max_signature_validity_secs,
    }))
}

/// Rewrites the router's own plain-text rejections (method not allowed, body too large) into
/// OpenAI's error shape.
async fn openai_shaped_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    let status = response.status();
    if is_json || status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
        return response;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This endpoint does not accept that HTTP method.",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "request_too_large",
            "The request body is larger than this hub accepts.",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "Send the body as application/json.",
        ),
        _ => return response,
    };
    ApiError::status(status, code, message).into_response()
}
