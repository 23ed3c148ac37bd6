//! The web dashboard: a page served at `/` (HTML, JavaScript and CSS compiled into the binary,
//! no build step and no CDN), fed by `GET /v1/dashboard` (one snapshot) and
//! `GET /v1/dashboard/events` (a snapshot every second over server-sent events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tessera_ledger::SystemAccount;

use crate::tasks::TaskQuery;
use crate::Hub;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// How often the event stream sends a snapshot.
const PUSH_EVERY: Duration = Duration::from_secs(1);

/// The dashboard's routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/v1/dashboard", get(snapshot_json))
        .route("/v1/dashboard/events", get(events))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn snapshot_json(State(hub): State<Arc<Hub>>) -> Json<Value> {
    Json(snapshot(&hub).await)
}

async fn events(
    State(hub): State<Arc<Hub>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold((hub, true), |(hub, first)| async move {
        if !first {
            tokio::time::sleep(PUSH_EVERY).await;
        }
        let event = Event::default()
            .event("snapshot")
            .data(snapshot(&hub).await.to_string());
        Some((Ok(event), (hub, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Everything the page shows, as of now.
pub async fn snapshot(hub: &Hub) -> Value {
    let providers: Vec<Value> = hub
        .registry
        .views()
        .iter()
        .map(|v| serde_json::to_value(v).unwrap_or_default())
        .collect();
    let (jobs, slashes, series, runs) = hub.activity.snapshot();
    let all_tasks = hub
        .tasks
        .list(&TaskQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    let mut task_states = std::collections::BTreeMap::new();
    for t in &all_tasks {
        *task_states.entry(t.state.as_str()).or_insert(0u64) += 1;
    }
    let tasks: Vec<Value> = all_tasks
        .iter()
        .take(20)
        .map(|t| {
            let v = t.to_json(None);
            json!({"id": v["id"], "state": v["state"], "bounty": v["bounty"], "kind": v["spec"]["kind"],
                   "poster": v["poster"], "worker": v["worker"]})
        })
        .collect();
    let balance = |a: SystemAccount| async move { hub.ledger.balance(a).await.unwrap_or(0) };
    let ledger = json!({
        "fees": balance(SystemAccount::Fees).await,
        "treasury": balance(SystemAccount::Treasury).await,
        "escrow": balance(SystemAccount::Escrow).await,
        "stake": balance(SystemAccount::Stake).await,
    });
    let chain = match &hub.chain {
        Some(link) => {
            let holdings = link.chain.vault_holdings().await.ok();
            let owed = hub.ledger.chain_liabilities().await.ok();
            json!({"vault_holdings": holdings, "ledger_liabilities": owed,
                   "reconciled": holdings.zip(owed).map(|(h, o)| i128::from(h) == i128::from(o))})
        }
        None => Value::Null,
    };
    let m = &hub.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "at": crate::now_secs(),
        "totals": {
            "jobs": get(&m.jobs_completed),
            "tokens": get(&m.completion_tokens),
            "spend": get(&m.captured),
            "verifications_passed": get(&m.verifications_passed),
            "verifications_failed": get(&m.verifications_failed),
            "slashes": get(&m.slashes),
            "slashed": get(&m.slashed),
        },
        "providers": providers,
        "jobs": jobs,
        "slashes": slashes,
        "series": series,
        "runs": runs,
        "tasks": {"states": task_states, "recent": tasks},
        "ledger": ledger,
        "chain": chain,
    })
}
