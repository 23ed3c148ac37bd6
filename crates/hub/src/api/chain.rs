//! The chain's endpoints: `GET /v1/chain` (the contracts, the confirmations, and the vault's
//! holdings beside what the ledger owes it), `POST /v1/withdrawals` (a signed
//! `WithdrawalOrder`, debited then paid by the vault; see [`crate::chain`]),
//! `GET /v1/withdrawals/{id}` (where one stands) and `POST /v1/stake`
//! (a signed `StakeOrder`: stake, unstake or withdraw matured unbonded stake, on the ledger and,
//! with a chain, recorded in the vault).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tessera_protocol::{Signed, StakeOrder, WithdrawalOrder};

use crate::chain::{StakeRefused, WithdrawalRefused};
use crate::error::ApiError;
use crate::{now_secs, Hub};

/// The chain's routes, merged into the hub's router.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/chain", get(chain_status))
        .route("/v1/withdrawals", post(withdraw))
        .route("/v1/withdrawals/{id}", get(withdrawal_status))
        .route("/v1/stake", post(stake))
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
    let on_chain = async {
        Ok::<_, tessera_chain::Error>((
            link.chain.vault_holdings().await?,
            link.chain.total_stake().await?,
        ))
    };
    let books = async {
        Ok::<_, tessera_ledger::Error>((
            hub.ledger.chain_liabilities().await?,
            hub.ledger.stake_totals().await?,
        ))
    };
    match (on_chain.await, books.await) {
        (Ok((holdings, vault_stake)), Ok((owed, (staked, unbonding)))) => Json(json!({
            "contracts": link.chain.contracts(),
            "operator": link.chain.sender(),
            "vault_holdings": holdings,
            "ledger_liabilities": owed,
            "vault_stake": vault_stake,
            "ledger_stake": {"staked": staked, "unbonding": unbonding},
            "reconciled": i128::from(holdings) == i128::from(owed)
                && (vault_stake.staked, vault_stake.unbonding) == (staked, unbonding),
        }))
        .into_response(),
        (Err(e), _) => ApiError::internal(e).into_response(),
        (_, Err(e)) => ApiError::internal(e).into_response(),
    }
}

async fn withdrawal_status(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Response {
    if hub.chain.is_none() {
        return no_chain().into_response();
    }
    let Ok(id) = id.parse() else {
        return ApiError::invalid("invalid_id", "A withdrawal id is 0x and 64 hex digits.")
            .into_response();
    };
    match hub.withdrawal(id).await {
        Ok(Some(w)) => Json(w).into_response(),
        Ok(None) => ApiError::status(
            StatusCode::NOT_FOUND,
            "unknown_withdrawal",
            "This hub recorded no withdrawal with this id.",
        )
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn stake(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let order: Signed<StakeOrder> = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => {
            return ApiError::invalid("invalid_json", format!("Expected a signed StakeOrder: {e}"))
                .into_response()
        }
    };
    // As for withdrawals: the ledger key (signer and nonce) makes a replay return the same result.
    if let Err(e) = hub.verifier.check(&order, now_secs()) {
        return ApiError::bad_signature(format!("Invalid signature: {e}")).into_response();
    }
    use tessera_ledger::Error as L;
    match hub.stake_order(&order).await {
        Ok(receipt) => Json(receipt).into_response(),
        Err(e @ (StakeRefused::Action(_) | StakeRefused::ZeroAmount)) => {
            ApiError::invalid("invalid_stake_order", e.to_string()).into_response()
        }
        Err(StakeRefused::Ledger(L::InsufficientFunds { .. } | L::UnknownAccount(_))) => {
            ApiError::insufficient_quota("The balance is smaller than the stake.").into_response()
        }
        Err(StakeRefused::Ledger(e @ L::InsufficientStake { .. })) => {
            ApiError::invalid("insufficient_stake", e.to_string()).into_response()
        }
        Err(StakeRefused::Ledger(L::NothingToWithdraw(_))) => ApiError::invalid(
            "nothing_to_withdraw",
            "No unbonding stake has finished its unbonding period.",
        )
        .into_response(),
        Err(StakeRefused::Ledger(L::IdempotencyConflict { .. })) => ApiError::status(
            StatusCode::CONFLICT,
            "nonce_reused",
            "this nonce was already used for another stake order",
        )
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
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
