//! `/v1/tasks`: the task market over HTTP. Every change is a signed EIP-712 message (see
//! [`crate::tasks`]); reads of a private task's input need the API key of a party.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tessera_protocol::{Address, Signed, TaskDelivery, TaskPosting};

use crate::error::ApiError;
use crate::tasks::TaskQuery;
use crate::Hub;

/// The market's routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/tasks", post(post_task).get(list))
        .route("/v1/tasks/{id}", get(show))
        .route("/v1/tasks/{id}/claim", post(claim))
        .route("/v1/tasks/{id}/deliver", post(deliver))
        .route("/v1/tasks/{id}/decide", post(decide))
        .route("/v1/tasks/{id}/feedback", post(feedback))
        .route("/v1/agents/{address}/reputation", get(reputation))
}

fn parse<T: DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("Expected {what}: {e}")))
}

/// The agent behind the request's API key, if it sent a valid one.
async fn viewer(hub: &Hub, headers: &HeaderMap) -> Option<Address> {
    let key = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    let agent = hub.agent_for_key(key).await?;
    // A session key reads what its owner may.
    hub.principal(agent).await.ok().map(|p| p.payer)
}

fn answer(result: Result<crate::tasks::Task, ApiError>, viewer: Option<Address>) -> Response {
    match result {
        Ok(task) => Json(task.to_json(viewer)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct Posting {
    /// The spec's JSON text, exactly as hashed into `posting.message.taskHash`.
    spec: String,
    posting: Signed<TaskPosting>,
}

async fn post_task(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let p: Posting = match parse(&body, "{\"spec\": TEXT, \"posting\": Signed<TaskPosting>}") {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let poster = p.posting.signer;
    answer(hub.post_task(&p.posting, &p.spec).await, Some(poster))
}

async fn list(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Query(mut q): Query<TaskQuery>,
) -> Response {
    if q.state.is_none() && q.party.is_none() {
        q.state = Some("open".into());
    }
    let viewer = viewer(&hub, &headers).await;
    match hub.tasks.list(&q).await {
        Ok(tasks) => Json(json!({
            "object": "list",
            "data": tasks.iter().map(|t| t.to_json(viewer)).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn show(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let viewer = viewer(&hub, &headers).await;
    match hub.tasks.get(&id).await {
        Ok(Some(t)) => Json(t.to_json(viewer)).into_response(),
        Ok(None) => ApiError::status(
            axum::http::StatusCode::NOT_FOUND,
            "task_not_found",
            "No such task.",
        )
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn claim(State(hub): State<Arc<Hub>>, Path(id): Path<String>, body: Bytes) -> Response {
    let signed: Signed<tessera_protocol::TaskClaim> = match parse(&body, "a Signed<TaskClaim>") {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    answer(hub.claim_task(&id, &signed).await, Some(signed.signer))
}

#[derive(Deserialize)]
struct Delivery {
    /// The delivered text, exactly as hashed into `signed.message.deliveryHash`.
    delivery: String,
    signed: Signed<TaskDelivery>,
}

async fn deliver(State(hub): State<Arc<Hub>>, Path(id): Path<String>, body: Bytes) -> Response {
    let d: Delivery = match parse(
        &body,
        "{\"delivery\": TEXT, \"signed\": Signed<TaskDelivery>}",
    ) {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    answer(
        hub.deliver_task(&id, &d.signed, &d.delivery).await,
        Some(d.signed.signer),
    )
}

async fn decide(State(hub): State<Arc<Hub>>, Path(id): Path<String>, body: Bytes) -> Response {
    let signed: Signed<tessera_protocol::TaskDecision> =
        match parse(&body, "a Signed<TaskDecision>") {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        };
    answer(hub.decide_task(&id, &signed).await, Some(signed.signer))
}

async fn feedback(State(hub): State<Arc<Hub>>, Path(id): Path<String>, body: Bytes) -> Response {
    let signed: Signed<tessera_protocol::TaskFeedback> =
        match parse(&body, "a Signed<TaskFeedback>") {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        };
    match hub.task_feedback(&id, &signed).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ReputationQuery {
    /// Only feedback left by this agent.
    author: Option<Address>,
}

async fn reputation(
    State(hub): State<Arc<Hub>>,
    Path(address): Path<String>,
    Query(q): Query<ReputationQuery>,
) -> Response {
    let Ok(agent) = address.parse::<Address>() else {
        return ApiError::invalid_param("address", "Not an address.").into_response();
    };
    match hub.agent_reputation(agent, q.author).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
