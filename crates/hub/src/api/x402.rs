//! x402 pay-per-request (<https://github.com/coinbase/x402>, v2; v1's `X-PAYMENT` accepted).
//!
//! A chat or completion request with no API key and no signature, or one whose account cannot
//! cover its maximum cost (instead of OpenAI's 429 `insufficient_quota`), gets HTTP 402 with the
//! payment requirements in `PAYMENT-REQUIRED` (and the body): the `exact` scheme on this hub's
//! chain (`eip155:<chain id>`), the vault's stablecoin, the vault as `payTo`, and the request's
//! maximum cost (its `max_tokens` and prompt bytes at `max_price`, else the default price cap).
//! The client retries with a signed EIP-3009 authorization in `PAYMENT-SIGNATURE`; the hub, as
//! its own facilitator, verifies it, settles it on-chain (`transferWithAuthorization` to the
//! vault), credits the payer's account with what it paid (a deposit, so the audit reconciles
//! it), and serves the request from that account: the job escrows its maximum cost and
//! refunds what it did not use to the payer's balance, which later requests, with an API key,
//! or a withdrawal can spend. The response carries the settlement in `PAYMENT-RESPONSE`. A
//! streaming response is paid the same way: the settlement header is sent before the first
//! token, and the final cost is in the stream's usage chunk (`tessera.cost`), the unused rest
//! credited to the payer's balance.
//!
//! `POST /v1/x402/verify`, `/v1/x402/settle` and `GET /v1/x402/supported` are the facilitator's
//! endpoints, as the spec names them. A refused payment moves no money and answers 402 with
//! x402's error code.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_chain::x402::{
    self, PaymentPayload, PaymentRequired, PaymentRequirements, Refusal, ResourceInfo,
    SettlementResponse, VerifiedPayment,
};
use tessera_protocol::Address;

use crate::api::auth::SIGNATURE_HEADER;
use crate::error::ApiError;
use crate::jobs::{TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_MESSAGE};
use crate::{now_secs, Hub};

/// The internal header that names the payer of a settled x402 payment to the OpenAI handlers.
/// The middleware removes it from every incoming request, so only a settlement can set it.
pub const PAYER_HEADER: &str = "x-tessera-x402-payer";

/// The facilitator's routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/x402/supported", get(supported))
        .route("/v1/x402/verify", post(verify_endpoint))
        .route("/v1/x402/settle", post(settle_endpoint))
}

/// The fields that bound a request's cost.
#[derive(Deserialize)]
struct CostFields {
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    max_price: Option<u64>,
    #[serde(default)]
    messages: Vec<Value>,
}

/// The most a request can cost: every token at the price cap, the whole body as prompt.
fn max_cost(hub: &Hub, path: &str, body: &[u8]) -> Option<u64> {
    let fields: CostFields = serde_json::from_slice(body).ok()?;
    let default_tokens = if path.ends_with("/chat/completions") {
        256
    } else {
        16
    };
    let max_tokens = fields
        .max_completion_tokens
        .or(fields.max_tokens)
        .unwrap_or(default_tokens);
    let price = fields.max_price.unwrap_or(hub.config.default_max_price);
    let prompt =
        body.len() + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * fields.messages.len().max(1);
    hub.cost(price, u64::from(max_tokens), prompt as u64)
}

fn payment_required(requirements: PaymentRequirements, url: String, error: String) -> Response {
    let required = PaymentRequired {
        x402_version: 2,
        error,
        resource: ResourceInfo {
            url,
            description: "Tessera inference".into(),
            mime_type: "application/json".into(),
        },
        accepts: vec![requirements],
    };
    let mut response = (StatusCode::PAYMENT_REQUIRED, Json(&required)).into_response();
    if let Ok(v) = HeaderValue::from_str(&x402::encode_header(&required)) {
        response
            .headers_mut()
            .insert(x402::PAYMENT_REQUIRED_HEADER, v);
    }
    response
}

/// Verifies, settles and credits a payment; the money moves only if all of it succeeds up to
/// the on-chain settlement (the credit is then idempotent per payer and nonce).
async fn pay(
    hub: &Hub,
    required: &PaymentRequirements,
    payment: &PaymentPayload,
) -> Result<(VerifiedPayment, SettlementResponse), Refusal> {
    let link = hub.chain.as_ref().ok_or(Refusal::InvalidNetwork)?;
    let offer = link.offer.as_ref().ok_or(Refusal::InvalidNetwork)?;
    let verified = x402::verify(&link.chain, offer, required, payment, now_secs()).await?;
    // The operator key sends one transaction at a time (withdrawals and stake records too): two
    // at once would read the same account nonce.
    let tx = {
        let _sending = link.sending.lock().await;
        x402::settle(&link.chain, &verified).await?
    };
    hub.ledger
        .credit_deposit(&verified.ledger_key(), verified.payer, verified.value)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, payer = %verified.payer, "crediting a settled x402 payment failed");
            Refusal::SettleError
        })?;
    tracing::info!(payer = %verified.payer, value = verified.value, %tx, "x402 payment settled");
    let settlement = SettlementResponse {
        success: true,
        error_reason: None,
        transaction: format!("{tx:#x}"),
        network: offer.network.clone(),
        payer: Some(verified.payer),
    };
    Ok((verified, settlement))
}

/// The middleware on the paid endpoints; see the module's documentation.
pub async fn pay_per_request(
    State(hub): State<Arc<Hub>>,
    mut request: Request,
    next: Next,
) -> Response {
    request.headers_mut().remove(PAYER_HEADER);
    let path = request.uri().path().to_owned();
    let paid_path = path == "/v1/chat/completions" || path == "/v1/completions";
    let offer = hub.chain.as_ref().and_then(|l| l.offer.clone());
    let (Some(offer), true, true) = (offer, paid_path, request.method() == Method::POST) else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let payment_header = headers
        .get(x402::PAYMENT_SIGNATURE_HEADER)
        .or_else(|| headers.get(x402::X_PAYMENT_HEADER))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authenticated =
        headers.contains_key(header::AUTHORIZATION) || headers.contains_key(SIGNATURE_HEADER);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let url = format!("http://{host}{path}");
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, hub.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "The request body is larger than this hub accepts.",
            )
            .into_response()
        }
    };
    if payment_header.is_none() && authenticated {
        // A keyed (or signed) request is served from its account; one its balance cannot cover
        // is told how to pay for it instead: 402 with the requirements, not a bare 429.
        let amount = max_cost(&hub, &path, &body);
        let response = next.run(Request::from_parts(parts, Body::from(body))).await;
        let Some(amount) = amount.filter(|_| response.status() == StatusCode::TOO_MANY_REQUESTS)
        else {
            return response;
        };
        let (head, answer) = response.into_parts();
        let answer = axum::body::to_bytes(answer, 64 * 1024)
            .await
            .unwrap_or_default();
        let out_of_balance = serde_json::from_slice::<Value>(&answer)
            .is_ok_and(|v| v["error"]["code"] == "insufficient_quota");
        if !out_of_balance {
            return Response::from_parts(head, Body::from(answer));
        }
        return payment_required(
            offer.requirements(amount),
            url,
            "insufficient_funds: the account's balance cannot cover this request; pay for it with PAYMENT-SIGNATURE".into(),
        );
    }
    let Some(amount) = max_cost(&hub, &path, &body) else {
        // Not a request whose cost can be bounded: the handler explains what is wrong with it.
        return next.run(Request::from_parts(parts, Body::from(body))).await;
    };
    let requirements = offer.requirements(amount);
    let Some(payment_header) = payment_header else {
        return payment_required(
            requirements,
            url,
            "PAYMENT-SIGNATURE header is required".into(),
        );
    };
    let payment = match x402::decode_header(&payment_header) {
        Ok(p) => p,
        Err(refusal) => return payment_required(requirements, url, refusal.code()),
    };
    let (verified, settlement) = match pay(&hub, &requirements, &payment).await {
        Ok(paid) => paid,
        Err(refusal) => return payment_required(requirements, url, refusal.code()),
    };
    let mut request = Request::from_parts(parts, Body::from(body));
    if let Ok(v) = HeaderValue::from_str(&format!("{:#x}", verified.payer)) {
        request.headers_mut().insert(PAYER_HEADER, v);
    }
    let mut response = next.run(request).await;
    if let Ok(v) = HeaderValue::from_str(&x402::encode_header(&settlement)) {
        response
            .headers_mut()
            .insert(x402::PAYMENT_RESPONSE_HEADER, v);
    }
    response
}

/// The payer a settled payment named (set only by [`pay_per_request`]).
pub fn payer(headers: &axum::http::HeaderMap) -> Option<Address> {
    headers.get(PAYER_HEADER)?.to_str().ok()?.parse().ok()
}

async fn supported(State(hub): State<Arc<Hub>>) -> Json<Value> {
    let kinds: Vec<Value> = hub
        .chain
        .as_ref()
        .and_then(|l| l.offer.as_ref())
        .map(|o| {
            vec![json!({"x402Version": 2, "scheme": x402::SCHEME_EXACT, "network": o.network})]
        })
        .unwrap_or_default();
    Json(json!({"kinds": kinds, "extensions": [], "signers": {}}))
}

/// The facilitator's request body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FacilitatorRequest {
    payment_payload: PaymentPayload,
    payment_requirements: PaymentRequirements,
}

fn invalid_facilitator_request() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"isValid": false, "invalidReason": Refusal::InvalidPayload.code()})),
    )
        .into_response()
}

async fn verify_endpoint(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<FacilitatorRequest>(&body) else {
        return invalid_facilitator_request();
    };
    let Some((link, offer)) = hub
        .chain
        .as_ref()
        .and_then(|l| Some((l, l.offer.as_ref()?)))
    else {
        return Json(json!({"isValid": false, "invalidReason": Refusal::InvalidNetwork.code()}))
            .into_response();
    };
    match x402::verify(
        &link.chain,
        offer,
        &request.payment_requirements,
        &request.payment_payload,
        now_secs(),
    )
    .await
    {
        Ok(v) => Json(json!({"isValid": true, "payer": v.payer})).into_response(),
        Err(refusal) => {
            Json(json!({"isValid": false, "invalidReason": refusal.code()})).into_response()
        }
    }
}

async fn settle_endpoint(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<FacilitatorRequest>(&body) else {
        return invalid_facilitator_request();
    };
    let network = request.payment_requirements.network.clone();
    match pay(
        &hub,
        &request.payment_requirements,
        &request.payment_payload,
    )
    .await
    {
        Ok((_, settlement)) => Json(settlement).into_response(),
        Err(refusal) => Json(SettlementResponse {
            success: false,
            error_reason: Some(refusal.code()),
            transaction: String::new(),
            network,
            payer: None,
        })
        .into_response(),
    }
}
