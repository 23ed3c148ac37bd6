//! Accounts, providers, health, metrics and the development faucet.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_ledger::SystemAccount;
use tessera_protocol::Address;

use crate::error::ApiError;
use crate::store::{JobStanding, JobVerdict};
use crate::Hub;

#[derive(Deserialize)]
struct FaucetRequest {
    address: Address,
    amount: u64,
}

/// `POST /v1/dev/faucet` (`--dev` only): mints money to an address.
pub async fn faucet(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Some(faucet) = hub.ledger.faucet() else {
        return ApiError::forbidden("The faucet exists only on a hub started with --dev.")
            .into_response();
    };
    let request: FaucetRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::invalid(
                "invalid_json",
                format!("Expected {{\"address\", \"amount\"}}: {e}"),
            )
            .into_response()
        }
    };
    let key = format!(
        "faucet-{}-{}",
        hub.run_id,
        hub.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    if let Err(e) = faucet.mint(&key, request.address, request.amount).await {
        return ApiError::invalid("faucet_refused", e.to_string()).into_response();
    }
    let balance = hub.ledger.balance(request.address).await.unwrap_or(0);
    Json(json!({"address": request.address, "balance": balance})).into_response()
}

/// `GET /v1/accounts/{address}`: balance and stake.
pub async fn account(State(hub): State<Arc<Hub>>, Path(address): Path<String>) -> Response {
    let Ok(address) = address.parse::<Address>() else {
        return ApiError::invalid_param("address", "Not a 0x address.").into_response();
    };
    let balance = match hub.ledger.balance(address).await {
        Ok(b) => b,
        Err(tessera_ledger::Error::UnknownAccount(_)) => 0,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let staked = hub.ledger.staked(address).await.unwrap_or(0);
    Json(json!({"address": address, "balance": balance, "staked": staked})).into_response()
}

/// `GET /v1/jobs/{id}`: where a job sampled for verification stands (`pending`, `passed`,
/// `failed`: refunded to the agent and its provider slashed, `unchecked`: no verifier answered),
/// so a client can refresh the verification status its receipt showed. A job never sampled is
/// a 404: its receipt's status (`none`, `skipped`) is final.
pub async fn job(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Response {
    let standing = match hub.store.job_standing(&id).await {
        Ok(s) => s,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let (verification, provider, refunded, compensation) = match standing {
        None => {
            return ApiError::status(
                axum::http::StatusCode::NOT_FOUND,
                "job_not_found",
                format!(
                    "No job `{id}` was sampled for verification: its receipt's status is final."
                ),
            )
            .into_response()
        }
        Some(JobStanding::Pending { provider, .. }) => ("pending", provider, false, 0),
        Some(JobStanding::Decided {
            provider,
            verdict,
            compensation,
            ..
        }) => (
            verdict.as_str(),
            Some(provider),
            verdict == JobVerdict::Failed,
            compensation,
        ),
    };
    let quarantined = provider.is_some_and(|p| hub.registry.quarantined(p));
    Json(json!({"id": id, "object": "tessera.job", "verification": verification, "refunded": refunded,
                "compensation": compensation, "provider": provider, "provider_quarantined": quarantined}))
    .into_response()
}

/// `GET /v1/providers`: every provider seen, with reputation and quarantine, and the economics
/// of cheating: for each provider the probability `p` that a job of its is checked, the stake `S`
/// a confirmed failure takes, the expected loss `p·S` of cheating on one job, and the most it
/// could gain by cheating on one (its mean revenue per job: a cheater saves at most all of its
/// cost). Honest play is the best reply when `p·S` exceeds the gain.
pub async fn providers(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let views = hub.registry.views();
    let (revenue, jobs) = views.iter().fold((0u64, 0u64), |(r, j), v| {
        (r + v.record.revenue, j + v.record.jobs)
    });
    let providers: Vec<Value> = views
        .iter()
        .map(|v| {
            let p = hub.verify_probability_for(v.record.reputation);
            let stake = v.stake.unwrap_or(0).min(hub.config.slash_amount);
            let loss = p * stake as f64;
            let gain = if v.record.jobs > 0 {
                v.record.revenue as f64 / v.record.jobs as f64
            } else {
                0.0
            };
            let mut value = serde_json::to_value(v).unwrap_or_default();
            value["verify_probability"] = json!(p);
            value["slashable"] = json!(stake);
            value["cheater_expected_loss_per_job"] = json!(loss);
            value["cheater_max_gain_per_job"] = json!(gain);
            value["cheating_deterred"] = json!(loss > gain);
            value
        })
        .collect();
    let (known_passes, known_fails) = hub.canaries.counts();
    Json(json!({
        "verify_probability": hub.config.verify_probability,
        "slash_amount": hub.config.slash_amount,
        "verify_fee_bps": hub.config.verify_fee_bps,
        "cross_check_probability": hub.config.cross_check_probability,
        "canary_probability": hub.config.canary_probability,
        "cheater_expected_loss_per_job": hub.cheater_expected_loss(),
        "mean_revenue_per_job": if jobs > 0 { revenue as f64 / jobs as f64 } else { 0.0 },
        "known_answer_checks": {"passes": known_passes, "fails": known_fails},
        "providers": providers,
    }))
}

/// `GET /health`: liveness and connected providers.
pub async fn health(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(json!({"status": "ok", "providers": hub.registry.connections().len()}))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics_text(State(hub): State<Arc<Hub>>) -> Response {
    let providers = hub.registry.views();
    let connected = providers.iter().filter(|p| p.connected).count() as f64;
    let quarantined = providers.iter().filter(|p| p.record.quarantined).count() as f64;
    let balance = |a: SystemAccount| {
        let ledger = hub.ledger.clone();
        async move { ledger.balance(a).await.unwrap_or(0) as f64 }
    };
    let (fees, treasury, escrow, stake) = (
        balance(SystemAccount::Fees).await,
        balance(SystemAccount::Treasury).await,
        balance(SystemAccount::Escrow).await,
        balance(SystemAccount::Stake).await,
    );
    let text = hub.metrics.render(&[
        (
            "tessera_providers_connected",
            "Providers with an open session.",
            connected,
        ),
        (
            "tessera_providers_quarantined",
            "Providers quarantined.",
            quarantined,
        ),
        (
            "tessera_verify_probability",
            "Base verification probability.",
            hub.config.verify_probability,
        ),
        (
            "tessera_cheater_expected_loss_micro",
            "Expected slash per cheated job (p times S).",
            hub.cheater_expected_loss(),
        ),
        (
            "tessera_balance_fees_micro",
            "Protocol fees collected.",
            fees,
        ),
        (
            "tessera_balance_treasury_micro",
            "Treasury balance.",
            treasury,
        ),
        (
            "tessera_balance_escrow_micro",
            "Money held in open escrows.",
            escrow,
        ),
        (
            "tessera_reserved_micro",
            "Money reserved in memory for --fast-settle jobs in flight.",
            hub.reserved() as f64,
        ),
        (
            "tessera_balance_stake_micro",
            "Money bonded as stake.",
            stake,
        ),
    ]);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}
