//! The chain's endpoints: `GET /v1/chain` (the contracts, the confirmations, and the vault's
//! holdings beside what the ledger owes it) and `POST /v1/withdrawals` (a signed
//! `WithdrawalOrder`, debited then paid by the vault; see [`crate::chain`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tessera_protocol::{Signed, WithdrawalOrder};

use crate::chain::WithdrawalRefused;
use crate::error::ApiError;
use crate::{now_secs, Hub};

/// The chain's routes, merged into the hub's router.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/chain", get(chain_status))
        .route("/v1/withdrawals", post(withdraw))
}

fn no_chain() -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "no_chain",
        "This hub has no chain configured (start it with --rpc).",
    )
}

async fn chain_status(State(hub): State<Arc<Hub>>) -> Response {
    let Some(link) = &hub.chain else {
        return no_chain().into_response();
    };
    let holdings = link.chain.vault_holdings().await;
    let owed = hub.ledger.chain_liabilities().await;
    match (holdings, owed) {
        (Ok(holdings), Ok(owed)) => Json(json!({
            "contracts": link.chain.contracts(),
            "operator": link.chain.sender(),
            "vault_holdings": holdings,
            "ledger_liabilities": owed,
            "reconciled": i128::from(holdings) == i128::from(owed),
        }))
        .into_response(),
        (Err(e), _) => ApiError::internal(e).into_response(),
        (_, Err(e)) => ApiError::internal(e).into_response(),
    }
}

async fn withdraw(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let order: Signed<WithdrawalOrder> = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => {
            return ApiError::invalid(
                "invalid_json",
                format!("Expected a signed WithdrawalOrder: {e}"),
            )
            .into_response()
        }
    };
    // The signature, domain and expiry; the nonce is not consumed: the ledger's idempotency key
    // (signer and nonce) makes a replayed order return the same withdrawal instead.
    if let Err(e) = hub.verifier.check(&order, now_secs()) {
        return ApiError::bad_signature(format!("Invalid signature: {e}")).into_response();
    }
    match hub.withdraw(&order).await {
        Ok(w) => Json(w).into_response(),
        Err(WithdrawalRefused::NoChain) => no_chain().into_response(),
        Err(e @ (WithdrawalRefused::ZeroAmount | WithdrawalRefused::ZeroRecipient)) => {
            ApiError::invalid("invalid_withdrawal", e.to_string()).into_response()
        }
        Err(e @ WithdrawalRefused::NonceReused) => {
            ApiError::status(StatusCode::CONFLICT, "nonce_reused", e.to_string()).into_response()
        }
        Err(WithdrawalRefused::Ledger(tessera_ledger::Error::InsufficientFunds { .. })) => {
            ApiError::insufficient_quota("The balance is smaller than the withdrawal.")
                .into_response()
        }
        Err(WithdrawalRefused::Ledger(tessera_ledger::Error::UnknownAccount(_))) => {
            ApiError::insufficient_quota("This account has no balance.").into_response()
        }
        Err(WithdrawalRefused::Ledger(tessera_ledger::Error::IdempotencyConflict { .. })) => {
            ApiError::status(
                StatusCode::CONFLICT,
                "nonce_reused",
                "this nonce was already used for another withdrawal",
            )
            .into_response()
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}
