//! The task market: agents post work with a bounty, other agents claim it by posting a bond,
//! deliver, and are paid when the delivery is accepted.
//!
//! Every state change is a signed EIP-712 message and ledger transactions with idempotency keys
//! derived from the task's id, so a change interrupted by a crash is finished by the next run
//! ([`Hub::recover_tasks`]) and never applied twice.
//!
//! **Money.** Posting holds the poster's bounty and bond in one escrow; claiming holds the
//! worker's bond in another. Accepted (or a lapsed review window, or a dispute the worker wins):
//! the bounty goes to the worker (less the protocol fee), the worker's bond comes back, and a
//! poster who lost a dispute also loses its bond to the worker. A dispute the poster wins, or a
//! claimed task not delivered by its deadline: the bounty and the poster's bond come back and
//! the worker's bond goes to the poster. A rejection the worker does not dispute in time: both
//! escrows are released. An unclaimed task past its deadline, or cancelled: the escrow is
//! released.
//!
//! **Acceptance.** `poster`: the poster accepts or rejects within `review_secs` of delivery;
//! silence accepts. `schema`: the hub checks the delivery against a JSON Schema at once.
//! **Disputes** (of a poster's rejection, by the worker, within `review_secs`) are decided on the
//! network, never by the parties: when the task names a `reference` inference, the hub re-runs it
//! on a provider that is neither party (the sampling is seeded and our kernels batch-invariant, so
//! an honest delivery is the same text), paid by the disputing worker like any job; the loser's
//! bond goes to the winner.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tessera_protocol::{
    Address, Signed, TaskAction, TaskClaim, TaskDecision, TaskDelivery, TaskFeedback, TaskPosting,
    B256,
};
use tessera_types::JobRequest;

use crate::error::ApiError;
use crate::{now_secs, Hub};

/// The most bytes of a task's spec (input included).
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// The most bytes of a delivery.
pub const MAX_DELIVERY_BYTES: usize = 256 * 1024;
/// The longest review window a poster may ask for.
pub const MAX_REVIEW_SECS: u64 = 7 * 24 * 3600;

/// What a poster publishes (its JSON text is what `TaskPosting.taskHash` hashes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// What sort of work (`writing`, `labeling`, `code`, ...), for search.
    pub kind: String,
    /// One line.
    pub title: String,
    /// What to do.
    #[serde(default)]
    pub description: String,
    /// The work's input.
    #[serde(default)]
    pub input: String,
    /// Only the poster and the worker who claimed it may read the input.
    #[serde(default)]
    pub private: bool,
    /// Unix seconds by which the work must be delivered.
    pub deadline: u64,
    /// The bond a worker must post to claim.
    pub worker_bond: u64,
    /// Seconds the poster has to review a delivery (and the worker to dispute a rejection).
    pub review_secs: u64,
    /// How a delivery is accepted.
    pub acceptance: Acceptance,
    /// An inference the delivery must be the output of; disputes re-run it.
    #[serde(default)]
    pub reference: Option<Reference>,
}

/// How a delivery is accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case", deny_unknown_fields)]
pub enum Acceptance {
    /// The poster reviews it.
    Poster,
    /// The hub checks it against a JSON Schema on delivery.
    Schema {
        /// The schema the delivery (JSON text) must satisfy.
        schema: Value,
    },
    /// A judge model on the network decides, by the rubric: one verified inference on a
    /// provider that is neither party, paid by the poster, whose answer (constrained to
    /// `{"verdict": "pass" | "fail"}`) accepts or refuses the delivery.
    Judge {
        /// A model name or sha256 the hub serves.
        model: String,
        /// What a delivery must do to pass.
        rubric: String,
    },
}

/// The most bytes of a judge's rubric.
pub const MAX_RUBRIC_BYTES: usize = 8 * 1024;

/// The judge's answer must follow this schema (constrained decoding): nothing else to parse.
const JUDGE_SCHEMA: &str = r#"{"type":"object","properties":{"verdict":{"type":"string","enum":["pass","fail"]}},"required":["verdict"],"additionalProperties":false}"#;

/// The judge's job for `delivery` under `rubric`: greedy, seeded by the task, its output
/// constrained to the verdict object.
fn judge_request(task_id: &str, rubric: &str, delivery: &str) -> JobRequest {
    use tessera_types::{Grammar, Message, Role, SamplingParams};
    let seed = u64::from_le_bytes(
        Sha256::digest(task_id.as_bytes())[..8]
            .try_into()
            .unwrap_or_default(),
    );
    JobRequest {
        tools: Vec::new(),
        messages: vec![
            Message::new(
                Role::System,
                "You are a strict judge. Read the rubric and the delivery, then answer with the JSON object {\"verdict\": \"pass\"} if the delivery meets the rubric, or {\"verdict\": \"fail\"} if it does not.",
            ),
            Message::new(
                Role::User,
                format!("Rubric:\n{rubric}\n\nDelivery:\n{delivery}"),
            ),
        ],
        prompt: None,
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed,
            grammar: Some(Grammar::JsonSchema {
                schema: JUDGE_SCHEMA.to_owned(),
            }),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        },
        stop: Vec::new(),
        logprobs: None,
    }
}

/// The verdict in a judge's answer: `Some(true)` pass, `Some(false)` fail, `None` unreadable.
fn judge_verdict(answer: &str) -> Option<bool> {
    let v: Value = serde_json::from_str(answer.trim()).ok()?;
    match v["verdict"].as_str()? {
        "pass" => Some(true),
        "fail" => Some(false),
        _ => None,
    }
}

/// An inference on the network whose output is the expected delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// A model name or sha256 the hub serves.
    pub model: String,
    /// The job, with its seed.
    pub request: JobRequest,
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Posted; the poster's escrow is being held.
    Posting,
    /// Open to claims.
    Open,
    /// A worker's bond is being held.
    Claiming,
    /// Claimed: waiting for the delivery.
    Claimed,
    /// Delivered: waiting for the poster (or the review window).
    Delivered,
    /// Rejected by the poster: the worker may dispute.
    Rejected,
    /// Disputed: the network decides.
    Disputed,
    /// Accepted: the worker was paid.
    Accepted,
    /// A dispute the worker won: paid, plus the poster's bond.
    WorkerWon,
    /// A dispute the poster won: the worker's bond went to the poster.
    PosterWon,
    /// A rejection not disputed in time: both sides got their money back.
    Refused,
    /// Claimed but not delivered by the deadline: the worker's bond went to the poster.
    Late,
    /// Nobody claimed it by the deadline.
    Expired,
    /// Withdrawn by the poster before anyone claimed it.
    Cancelled,
}

impl TaskState {
    /// The state's name (as the API shows it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Posting => "posting",
            Self::Open => "open",
            Self::Claiming => "claiming",
            Self::Claimed => "claimed",
            Self::Delivered => "delivered",
            Self::Rejected => "rejected",
            Self::Disputed => "disputed",
            Self::Accepted => "accepted",
            Self::WorkerWon => "worker_won",
            Self::PosterWon => "poster_won",
            Self::Refused => "refused",
            Self::Late => "late",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Posting,
            Self::Open,
            Self::Claiming,
            Self::Claimed,
            Self::Delivered,
            Self::Rejected,
            Self::Disputed,
            Self::Accepted,
            Self::WorkerWon,
            Self::PosterWon,
            Self::Refused,
            Self::Late,
            Self::Expired,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    /// Whether the task is over (its money moved or moving to its final owners).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Accepted
                | Self::WorkerWon
                | Self::PosterWon
                | Self::Refused
                | Self::Late
                | Self::Expired
                | Self::Cancelled
        )
    }
}

/// A task as the hub keeps it.
#[derive(Debug, Clone)]
pub struct Task {
    /// `0x` + 64 hex digits.
    pub id: String,
    /// Who posted it.
    pub poster: Address,
    /// Who claimed it.
    pub worker: Option<Address>,
    /// The spec's JSON text.
    pub spec_text: String,
    /// The spec.
    pub spec: TaskSpec,
    /// Paid to the worker on acceptance.
    pub bounty: u64,
    /// The poster's bond (lost in a dispute it loses).
    pub poster_bond: u64,
    /// Where it stands.
    pub state: TaskState,
    /// Holds bounty and poster bond.
    pub poster_escrow: Option<i64>,
    /// Holds the worker's bond.
    pub worker_escrow: Option<i64>,
    /// The delivered text.
    pub delivery: Option<String>,
    /// When the state last changed (unix seconds).
    pub updated_at: u64,
    /// When it was posted.
    pub created_at: u64,
    /// Whether the final state's money has moved.
    pub settled: bool,
    /// Why it ended as it did.
    pub outcome: Option<String>,
}

impl Task {
    /// Its public JSON: the input only for `viewer`s that are a party, when private.
    pub fn to_json(&self, viewer: Option<Address>) -> Value {
        let party = viewer.is_some_and(|v| v == self.poster || Some(v) == self.worker);
        let mut spec = serde_json::to_value(&self.spec).unwrap_or(Value::Null);
        if self.spec.private && !party {
            spec["input"] = Value::Null;
        }
        json!({
            "id": self.id,
            "object": "task",
            "poster": self.poster,
            "worker": self.worker,
            "state": self.state,
            "bounty": self.bounty,
            "poster_bond": self.poster_bond,
            "spec": spec,
            "delivery": if party || !self.spec.private { self.delivery.clone() } else { None },
            "outcome": self.outcome,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "settled": self.settled,
        })
    }
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS hub_tasks (id TEXT PRIMARY KEY, poster TEXT NOT NULL, worker TEXT, \
     kind TEXT NOT NULL, spec TEXT NOT NULL, bounty BIGINT NOT NULL, poster_bond BIGINT NOT NULL, \
     state TEXT NOT NULL, poster_escrow BIGINT, worker_escrow BIGINT, delivery TEXT, \
     updated_at BIGINT NOT NULL, created_at BIGINT NOT NULL, settled BIGINT NOT NULL DEFAULT 0, outcome TEXT)",
    "CREATE TABLE IF NOT EXISTS hub_task_feedback (task_id TEXT NOT NULL, author TEXT NOT NULL, \
     subject TEXT NOT NULL, score BIGINT NOT NULL, tag TEXT NOT NULL, created_at BIGINT NOT NULL, \
     PRIMARY KEY (task_id, author))",
];

fn addr_text(a: Address) -> String {
    format!("{a:#x}")
}

fn parse_addr(s: &str) -> Option<Address> {
    s.parse().ok()
}

fn task_from_row(row: &sqlx::any::AnyRow) -> crate::Result<Task> {
    let spec_text: String = row.try_get("spec")?;
    let spec: TaskSpec = serde_json::from_str(&spec_text)
        .map_err(|e| crate::Error::Corrupt(format!("task spec: {e}")))?;
    let state: String = row.try_get("state")?;
    let worker: Option<String> = row.try_get("worker")?;
    Ok(Task {
        id: row.try_get("id")?,
        poster: parse_addr(&row.try_get::<String, _>("poster")?)
            .ok_or_else(|| crate::Error::Corrupt("task poster".into()))?,
        worker: worker.as_deref().and_then(parse_addr),
        spec_text,
        spec,
        bounty: row.try_get::<i64, _>("bounty")? as u64,
        poster_bond: row.try_get::<i64, _>("poster_bond")? as u64,
        state: TaskState::parse(&state)
            .ok_or_else(|| crate::Error::Corrupt(format!("task state {state}")))?,
        poster_escrow: row.try_get("poster_escrow")?,
        worker_escrow: row.try_get("worker_escrow")?,
        delivery: row.try_get("delivery")?,
        updated_at: row.try_get::<i64, _>("updated_at")? as u64,
        created_at: row.try_get::<i64, _>("created_at")? as u64,
        settled: row.try_get::<i64, _>("settled")? != 0,
        outcome: row.try_get("outcome")?,
    })
}

/// A search of the market.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct TaskQuery {
    /// Only tasks in this state (`open` by default when listing).
    pub state: Option<String>,
    /// Only tasks of this kind.
    pub kind: Option<String>,
    /// Only bounties of at least this much.
    pub min_bounty: Option<u64>,
    /// Only tasks this agent posted or works on.
    pub party: Option<Address>,
    /// At most this many (100 by default).
    pub limit: Option<usize>,
}

/// The hub's task tables.
#[derive(Clone)]
pub struct TaskStore {
    pool: sqlx::AnyPool,
    /// Disputes being decided now (one re-execution each at a time).
    resolving: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl TaskStore {
    /// Creates the tables.
    pub async fn open(pool: sqlx::AnyPool) -> crate::Result<Self> {
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Self {
            pool,
            resolving: Arc::default(),
        })
    }

    async fn insert(&self, t: &Task) -> crate::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO hub_tasks (id, poster, kind, spec, bounty, poster_bond, state, updated_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(addr_text(t.poster))
        .bind(&t.spec.kind)
        .bind(&t.spec_text)
        .bind(t.bounty as i64)
        .bind(t.poster_bond as i64)
        .bind(t.state.as_str())
        .bind(t.updated_at as i64)
        .bind(t.created_at as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One task.
    pub async fn get(&self, id: &str) -> crate::Result<Option<Task>> {
        let row = sqlx::query("SELECT * FROM hub_tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(task_from_row).transpose()
    }

    /// Tasks matching a query, newest first.
    pub async fn list(&self, q: &TaskQuery) -> crate::Result<Vec<Task>> {
        let rows = sqlx::query("SELECT * FROM hub_tasks ORDER BY created_at DESC")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for row in &rows {
            let t = task_from_row(row)?;
            let state_ok = q.state.as_deref().is_none_or(|s| t.state.as_str() == s);
            let kind_ok = q.kind.as_deref().is_none_or(|k| t.spec.kind == k);
            let bounty_ok = q.min_bounty.is_none_or(|b| t.bounty >= b);
            let party_ok = q.party.is_none_or(|p| t.poster == p || t.worker == Some(p));
            if state_ok && kind_ok && bounty_ok && party_ok {
                out.push(t);
            }
            if out.len() >= q.limit.unwrap_or(100) {
                break;
            }
        }
        Ok(out)
    }

    /// Tasks not yet settled (the sweeper's work list).
    async fn unsettled(&self) -> crate::Result<Vec<Task>> {
        let rows = sqlx::query("SELECT * FROM hub_tasks WHERE settled = 0")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    /// Moves a task from `from` to `to` (with the given column updates), only if it is still in
    /// `from`: the one place state changes, so two racing changes cannot both apply.
    async fn transition(
        &self,
        id: &str,
        from: TaskState,
        to: TaskState,
        set: &Set,
    ) -> crate::Result<bool> {
        let done = sqlx::query(
            "UPDATE hub_tasks SET state = $1, updated_at = $2, \
             poster_escrow = COALESCE($4, poster_escrow), \
             worker_escrow = COALESCE($5, worker_escrow), delivery = COALESCE($6, delivery), \
             outcome = COALESCE($7, outcome), \
             worker = CASE WHEN $8 = 1 THEN NULL ELSE COALESCE($3, worker) END \
             WHERE id = $9 AND state = $10",
        )
        .bind(to.as_str())
        .bind(now_secs() as i64)
        .bind(set.worker.map(addr_text))
        .bind(set.poster_escrow)
        .bind(set.worker_escrow)
        .bind(set.delivery.clone())
        .bind(set.outcome.clone())
        .bind(i64::from(set.clear_worker))
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_settled(&self, id: &str) -> crate::Result<()> {
        sqlx::query("UPDATE hub_tasks SET settled = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Escrow ids of tasks still holding money (never refunded by a restart's recovery).
    pub async fn live_escrows(&self) -> crate::Result<Vec<i64>> {
        let rows =
            sqlx::query("SELECT poster_escrow, worker_escrow FROM hub_tasks WHERE settled = 0")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for row in rows {
            for column in ["poster_escrow", "worker_escrow"] {
                if let Some(id) = row.try_get::<Option<i64>, _>(column)? {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    async fn put_feedback(
        &self,
        task: &str,
        author: Address,
        subject: Address,
        score: u8,
        tag: &str,
    ) -> crate::Result<bool> {
        let done = sqlx::query(
            "INSERT INTO hub_task_feedback (task_id, author, subject, score, tag, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task_id, author) DO NOTHING",
        )
        .bind(task)
        .bind(addr_text(author))
        .bind(addr_text(subject))
        .bind(i64::from(score))
        .bind(tag)
        .bind(now_secs() as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Feedback left on `subject`, optionally only by `author`.
    pub async fn feedback(
        &self,
        subject: Address,
        author: Option<Address>,
    ) -> crate::Result<Vec<Value>> {
        let rows = sqlx::query(
            "SELECT task_id, author, score, tag, created_at FROM hub_task_feedback WHERE subject = $1 ORDER BY created_at",
        )
        .bind(addr_text(subject))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let by: String = row.try_get("author")?;
            if author.is_some_and(|a| Some(a) != parse_addr(&by)) {
                continue;
            }
            out.push(json!({
                "task": row.try_get::<String, _>("task_id")?,
                "author": by,
                "score": row.try_get::<i64, _>("score")?,
                "tag": row.try_get::<String, _>("tag")?,
                "created_at": row.try_get::<i64, _>("created_at")?,
            }));
        }
        Ok(out)
    }
}

/// Columns a transition sets (None: unchanged).
#[derive(Default)]
struct Set {
    worker: Option<Address>,
    clear_worker: bool,
    poster_escrow: Option<i64>,
    worker_escrow: Option<i64>,
    delivery: Option<String>,
    outcome: Option<String>,
}

/// A task's id: sha256 of the poster, the spec hash and the posting's nonce.
pub fn task_id(poster: Address, task_hash: &B256, nonce: u64) -> String {
    let mut h = Sha256::new();
    h.update(poster.as_slice());
    h.update(task_hash.as_slice());
    h.update(nonce.to_be_bytes());
    format!("0x{}", hex::encode(h.finalize()))
}

fn id_bytes(id: &str) -> Option<B256> {
    id.parse().ok()
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::status(
        axum::http::StatusCode::CONFLICT,
        "task_state_conflict",
        message,
    )
}

fn not_found() -> ApiError {
    ApiError::status(
        axum::http::StatusCode::NOT_FOUND,
        "task_not_found",
        "No such task.",
    )
}

/// Checks a spec before any money moves.
fn check_spec(spec: &TaskSpec, hub: &Hub, now: u64) -> Result<(), ApiError> {
    if spec.kind.is_empty() || spec.kind.len() > 64 {
        return Err(ApiError::invalid_param(
            "spec.kind",
            "kind must be 1 to 64 bytes.",
        ));
    }
    if spec.deadline <= now {
        return Err(ApiError::invalid_param(
            "spec.deadline",
            "The deadline has passed.",
        ));
    }
    if spec.review_secs == 0 || spec.review_secs > MAX_REVIEW_SECS {
        return Err(ApiError::invalid_param(
            "spec.review_secs",
            format!("review_secs must be 1 to {MAX_REVIEW_SECS}."),
        ));
    }
    if let Acceptance::Schema { schema } = &spec.acceptance {
        jsonschema::validator_for(schema).map_err(|e| {
            ApiError::invalid_param(
                "spec.acceptance.schema",
                format!("Invalid JSON Schema: {e}"),
            )
        })?;
    }
    if let Acceptance::Judge { model, rubric } = &spec.acceptance {
        if hub.config.catalog.lookup(model).is_none() {
            return Err(ApiError::invalid_param(
                "spec.acceptance.model",
                format!("The hub serves no model `{model}`."),
            ));
        }
        if rubric.trim().is_empty() || rubric.len() > MAX_RUBRIC_BYTES {
            return Err(ApiError::invalid_param(
                "spec.acceptance.rubric",
                format!("The rubric must be 1 to {MAX_RUBRIC_BYTES} bytes."),
            ));
        }
    }
    if let Some(r) = &spec.reference {
        if hub.config.catalog.lookup(&r.model).is_none() {
            return Err(ApiError::invalid_param(
                "spec.reference.model",
                format!("The hub serves no model `{}`.", r.model),
            ));
        }
        if r.request.max_tokens == 0 || r.request.max_tokens > 4096 {
            return Err(ApiError::invalid_param(
                "spec.reference.request.max_tokens",
                "max_tokens must be 1 to 4096.",
            ));
        }
    }
    Ok(())
}

/// Whether a delivery satisfies a schema (`Err` says why not).
fn schema_verdict(schema: &Value, delivery: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(delivery).map_err(|e| format!("the delivery is not JSON: {e}"))?;
    let validator = jsonschema::validator_for(schema).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .take(3)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the delivery breaks the schema: {}",
            errors.join("; ")
        ))
    }
}

impl Hub {
    fn check_signed<T: tessera_protocol::TypedMessage>(
        &self,
        signed: &Signed<T>,
    ) -> Result<Address, ApiError> {
        self.verifier
            .check(signed, now_secs())
            .map_err(|e| ApiError::bad_signature(format!("Invalid signature: {e}")))
    }

    async fn spend_nonce<T: tessera_protocol::TypedMessage>(
        &self,
        signed: &Signed<T>,
    ) -> Result<Address, ApiError> {
        self.verifier
            .verify(signed, now_secs(), &self.ledger)
            .await
            .map_err(|e| ApiError::bad_signature(format!("Invalid signature: {e}")))
    }

    async fn spendable(&self, agent: Address) -> Result<u64, ApiError> {
        match self.ledger.balance(agent).await {
            Ok(b) => Ok(b),
            Err(tessera_ledger::Error::UnknownAccount(_)) => Ok(0),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    async fn task_or_404(&self, id: &str) -> Result<Task, ApiError> {
        self.tasks
            .get(id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(not_found)
    }

    /// Posts a task: checks the spec and the signature, then holds bounty and bond.
    pub async fn post_task(
        self: &Arc<Self>,
        posting: &Signed<TaskPosting>,
        spec_text: &str,
    ) -> Result<Task, ApiError> {
        if spec_text.len() > MAX_SPEC_BYTES {
            return Err(ApiError::invalid_param(
                "spec",
                format!("The spec may be at most {MAX_SPEC_BYTES} bytes."),
            ));
        }
        let spec: TaskSpec = serde_json::from_str(spec_text)
            .map_err(|e| ApiError::invalid_param("spec", format!("Invalid task spec: {e}")))?;
        let now = now_secs();
        check_spec(&spec, self, now)?;
        let m = &posting.message;
        let hash: [u8; 32] = Sha256::digest(spec_text.as_bytes()).into();
        if m.taskHash.0 != hash {
            return Err(ApiError::bad_signature(
                "The signed taskHash is not the sha256 of this spec.",
            ));
        }
        if m.reward == 0 {
            return Err(ApiError::invalid_param(
                "reward",
                "The bounty must be positive.",
            ));
        }
        let signer = self.check_signed(posting)?;
        let principal = self.principal(signer).await?;
        let poster = principal.payer;
        let total = m
            .reward
            .checked_add(m.bond)
            .ok_or_else(|| ApiError::invalid_param("bond", "bounty + bond overflows."))?;
        let available = self.spendable(poster).await?;
        if available < total {
            return Err(ApiError::insufficient_quota(format!(
                "Posting holds the bounty and bond ({total}); the balance is {available}."
            )));
        }
        let reservation = match &principal.grant {
            Some(g) => {
                g.check_kind(&spec.kind)?;
                g.check_request(total, "Posting (bounty + bond)")?;
                Some(self.policies.reserve(g, total).await?)
            }
            None => None,
        };
        let posted = self
            .hold_posting(posting, signer, poster, spec, spec_text, now)
            .await;
        if let (Err(_), Some(r)) = (&posted, &reservation) {
            self.policies.settle(r, 0).await;
        }
        posted
    }

    /// The money half of [`Hub::post_task`], once every check passed.
    async fn hold_posting(
        self: &Arc<Self>,
        posting: &Signed<TaskPosting>,
        signer: Address,
        poster: Address,
        spec: TaskSpec,
        spec_text: &str,
        now: u64,
    ) -> Result<Task, ApiError> {
        let m = &posting.message;
        let total = m.reward + m.bond;
        self.spend_nonce(posting).await?;
        let task = Task {
            id: task_id(signer, &m.taskHash, m.nonce),
            poster,
            worker: None,
            spec_text: spec_text.to_owned(),
            spec,
            bounty: m.reward,
            poster_bond: m.bond,
            state: TaskState::Posting,
            poster_escrow: None,
            worker_escrow: None,
            delivery: None,
            updated_at: now,
            created_at: now,
            settled: false,
            outcome: None,
        };
        if !self.tasks.insert(&task).await.map_err(ApiError::internal)? {
            return Err(conflict("This task was already posted."));
        }
        match self
            .ledger
            .hold(&format!("task:{}:post", task.id), poster, total)
            .await
        {
            Ok(r) => {
                let set = Set {
                    poster_escrow: Some(r.value.escrow_id),
                    ..Set::default()
                };
                self.move_task(&task.id, TaskState::Posting, TaskState::Open, set)
                    .await?;
            }
            Err(e) => {
                let set = Set {
                    outcome: Some(format!("the bounty could not be held: {e}")),
                    ..Set::default()
                };
                self.move_task(&task.id, TaskState::Posting, TaskState::Cancelled, set)
                    .await?;
                self.settle_task(&task.id).await;
                return Err(match e {
                    tessera_ledger::Error::InsufficientFunds { .. } => {
                        ApiError::insufficient_quota(format!("Posting needs {total}: {e}"))
                    }
                    e => ApiError::internal(e),
                });
            }
        }
        tracing::info!(task = %task.id, %poster, bounty = m.reward, kind = %task.spec.kind, "task posted");
        self.task_or_404(&task.id).await
    }

    async fn move_task(
        &self,
        id: &str,
        from: TaskState,
        to: TaskState,
        set: Set,
    ) -> Result<bool, ApiError> {
        let moved = self
            .tasks
            .transition(id, from, to, &set)
            .await
            .map_err(ApiError::internal)?;
        if moved {
            tracing::info!(task = %id, from = from.as_str(), to = to.as_str(), "task state changed");
        }
        Ok(moved)
    }

    /// Claims an open task by holding the worker's bond.
    pub async fn claim_task(
        self: &Arc<Self>,
        id: &str,
        claim: &Signed<TaskClaim>,
    ) -> Result<Task, ApiError> {
        let task = self.task_or_404(id).await?;
        if id_bytes(id) != Some(claim.message.taskId) {
            return Err(ApiError::bad_signature("The claim names another task."));
        }
        let signer = self.check_signed(claim)?;
        let principal = self.principal(signer).await?;
        let worker = principal.payer;
        if worker == task.poster {
            return Err(ApiError::forbidden("A poster cannot claim its own task."));
        }
        if task.state != TaskState::Open {
            return Err(conflict(format!(
                "The task is {}, not open.",
                task.state.as_str()
            )));
        }
        if now_secs() >= task.spec.deadline {
            return Err(conflict("The task's deadline has passed."));
        }
        if claim.message.bond != task.spec.worker_bond {
            return Err(ApiError::invalid_param(
                "bond",
                format!("This task asks a bond of {}.", task.spec.worker_bond),
            ));
        }
        let available = self.spendable(worker).await?;
        if available < task.spec.worker_bond {
            return Err(ApiError::insufficient_quota(format!(
                "Claiming holds the bond ({}); the balance is {available}.",
                task.spec.worker_bond
            )));
        }
        let reservation = match &principal.grant {
            Some(g) => {
                g.check_kind(&task.spec.kind)?;
                g.check_request(task.spec.worker_bond, "Claiming (the bond)")?;
                Some(self.policies.reserve(g, task.spec.worker_bond).await?)
            }
            None => None,
        };
        let claimed = self.hold_claim(id, &task, claim, worker).await;
        if let (Err(_), Some(r)) = (&claimed, &reservation) {
            self.policies.settle(r, 0).await;
        }
        claimed
    }

    /// The money half of [`Hub::claim_task`], once every check passed.
    async fn hold_claim(
        self: &Arc<Self>,
        id: &str,
        task: &Task,
        claim: &Signed<TaskClaim>,
        worker: Address,
    ) -> Result<Task, ApiError> {
        self.spend_nonce(claim).await?;
        let set = Set {
            worker: Some(worker),
            ..Set::default()
        };
        if !self
            .move_task(id, TaskState::Open, TaskState::Claiming, set)
            .await?
        {
            return Err(conflict("Someone else claimed the task first."));
        }
        let key = format!("task:{id}:claim:{worker:#x}");
        if task.spec.worker_bond == 0 {
            // Nothing to hold.
            self.move_task(id, TaskState::Claiming, TaskState::Claimed, Set::default())
                .await?;
            tracing::info!(task = %id, %worker, "task claimed without a bond");
            return self.task_or_404(id).await;
        }
        match self.ledger.hold(&key, worker, task.spec.worker_bond).await {
            Ok(r) => {
                let set = Set {
                    worker_escrow: Some(r.value.escrow_id),
                    ..Set::default()
                };
                self.move_task(id, TaskState::Claiming, TaskState::Claimed, set)
                    .await?;
            }
            Err(e) => {
                let set = Set {
                    clear_worker: true,
                    ..Set::default()
                };
                self.move_task(id, TaskState::Claiming, TaskState::Open, set)
                    .await?;
                return Err(match e {
                    tessera_ledger::Error::InsufficientFunds { .. } => {
                        ApiError::insufficient_quota(format!("Claiming needs the bond: {e}"))
                    }
                    e => ApiError::internal(e),
                });
            }
        }
        tracing::info!(task = %id, %worker, bond = task.spec.worker_bond, "task claimed");
        self.task_or_404(id).await
    }

    /// Delivers the work of a claimed task; a schema task is decided at once.
    pub async fn deliver_task(
        self: &Arc<Self>,
        id: &str,
        delivery: &Signed<TaskDelivery>,
        text: &str,
    ) -> Result<Task, ApiError> {
        let task = self.task_or_404(id).await?;
        if id_bytes(id) != Some(delivery.message.taskId) {
            return Err(ApiError::bad_signature("The delivery names another task."));
        }
        if text.len() > MAX_DELIVERY_BYTES {
            return Err(ApiError::invalid_param(
                "delivery",
                format!("A delivery may be at most {MAX_DELIVERY_BYTES} bytes."),
            ));
        }
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if delivery.message.deliveryHash.0 != hash {
            return Err(ApiError::bad_signature(
                "The signed deliveryHash is not the sha256 of this delivery.",
            ));
        }
        let signer = self.check_signed(delivery)?;
        let signer = self.principal(signer).await?.payer;
        if Some(signer) != task.worker {
            return Err(ApiError::forbidden(
                "Only the worker who claimed the task may deliver.",
            ));
        }
        if task.state != TaskState::Claimed {
            return Err(conflict(format!(
                "The task is {}: there is nothing to deliver.",
                task.state.as_str()
            )));
        }
        if now_secs() >= task.spec.deadline {
            return Err(conflict("The task's deadline has passed."));
        }
        self.spend_nonce(delivery).await?;
        let set = Set {
            delivery: Some(text.to_owned()),
            ..Set::default()
        };
        if !self
            .move_task(id, TaskState::Claimed, TaskState::Delivered, set)
            .await?
        {
            return Err(conflict("The task changed while delivering."));
        }
        tracing::info!(task = %id, worker = %signer, bytes = text.len(), "task delivered");
        if let Acceptance::Schema { schema } = &task.spec.acceptance {
            let (to, outcome) = match schema_verdict(schema, text) {
                Ok(()) => (
                    TaskState::Accepted,
                    "the delivery satisfies the schema".to_owned(),
                ),
                Err(why) => (TaskState::Refused, why),
            };
            let set = Set {
                outcome: Some(outcome),
                ..Set::default()
            };
            self.move_task(id, TaskState::Delivered, to, set).await?;
            self.settle_task(id).await;
        }
        if let Acceptance::Judge { .. } = &task.spec.acceptance {
            let (hub, id) = (self.clone(), id.to_owned());
            tokio::spawn(async move { hub.judge_task(&id).await });
        }
        self.task_or_404(id).await
    }

    /// Has the task's judge model decide its delivery. A judge that cannot run (the poster
    /// cannot pay it, no independent provider, a broken answer) decides nothing: the review
    /// window then lapses and silence accepts, as with a poster who does not answer.
    async fn judge_task(self: &Arc<Self>, id: &str) {
        let Ok(Some(task)) = self.tasks.get(id).await else {
            return;
        };
        let (Acceptance::Judge { model, rubric }, Some(worker), TaskState::Delivered) =
            (&task.spec.acceptance, task.worker, task.state)
        else {
            return;
        };
        let delivery = task.delivery.clone().unwrap_or_default();
        let request = judge_request(id, rubric, &delivery);
        let judged = match self
            .rerun(model, &request, task.poster, &[task.poster, worker])
            .await
        {
            Ok(judged) => judged,
            Err(e) => {
                tracing::warn!(task = %id, error = %e.message, "the judge could not run; the review window decides");
                return;
            }
        };
        let Some(pass) = judge_verdict(&judged.text) else {
            tracing::warn!(task = %id, answer = %judged.text, "the judge's answer is unreadable; the review window decides");
            return;
        };
        let (to, verdict) = if pass {
            (TaskState::Accepted, "pass")
        } else {
            (TaskState::Refused, "fail")
        };
        let set = Set {
            outcome: Some(format!(
                "judged {verdict} by {model} on {:#x} (job {})",
                judged.provider, judged.job
            )),
            ..Set::default()
        };
        match self.move_task(id, TaskState::Delivered, to, set).await {
            Ok(true) => self.settle_task(id).await,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(task = %id, error = %e.message, "recording the judge's verdict failed")
            }
        }
    }

    /// Applies a party's decision: accept, reject, cancel (the poster) or dispute (the worker).
    pub async fn decide_task(
        self: &Arc<Self>,
        id: &str,
        decision: &Signed<TaskDecision>,
    ) -> Result<Task, ApiError> {
        let task = self.task_or_404(id).await?;
        if id_bytes(id) != Some(decision.message.taskId) {
            return Err(ApiError::bad_signature("The decision names another task."));
        }
        let action = decision
            .message
            .task_action()
            .map_err(|e| ApiError::invalid_param("action", e.to_string()))?;
        let signer = self.check_signed(decision)?;
        let signer = self.principal(signer).await?.payer;
        let (from, to, who) = match action {
            TaskAction::Accept => (TaskState::Delivered, TaskState::Accepted, task.poster),
            TaskAction::Reject => (TaskState::Delivered, TaskState::Rejected, task.poster),
            TaskAction::Cancel => (TaskState::Open, TaskState::Cancelled, task.poster),
            TaskAction::Dispute => {
                if task.spec.reference.is_none() {
                    return Err(conflict(
                        "This task names no reference inference, so a rejection cannot be disputed.",
                    ));
                }
                (
                    TaskState::Rejected,
                    TaskState::Disputed,
                    task.worker.unwrap_or_default(),
                )
            }
        };
        if signer != who {
            return Err(ApiError::forbidden(format!(
                "Only the task's {} may {action:?} it.",
                if who == task.poster {
                    "poster"
                } else {
                    "worker"
                }
            )));
        }
        if matches!(action, TaskAction::Accept | TaskAction::Reject)
            && !matches!(task.spec.acceptance, Acceptance::Poster)
        {
            return Err(conflict(
                "This task's deliveries are decided by its checker.",
            ));
        }
        if task.state != from {
            return Err(conflict(format!(
                "The task is {}; {action:?} needs it {}.",
                task.state.as_str(),
                from.as_str()
            )));
        }
        self.spend_nonce(decision).await?;
        if !self.move_task(id, from, to, Set::default()).await? {
            return Err(conflict("The task changed meanwhile."));
        }
        match to {
            TaskState::Disputed => {
                let hub = self.clone();
                let id = id.to_owned();
                tokio::spawn(async move { hub.resolve_dispute(&id).await });
            }
            to if to.is_final() => self.settle_task(id).await,
            _ => {}
        }
        self.task_or_404(id).await
    }

    /// Leaves feedback on the counterparty of a finished task (once per party and task).
    pub async fn task_feedback(
        &self,
        id: &str,
        feedback: &Signed<TaskFeedback>,
    ) -> Result<Value, ApiError> {
        let task = self.task_or_404(id).await?;
        if id_bytes(id) != Some(feedback.message.taskId) {
            return Err(ApiError::bad_signature("The feedback names another task."));
        }
        let m = &feedback.message;
        if m.score > 100 || m.tag.len() > 32 {
            return Err(ApiError::invalid_param(
                "score",
                "score is 0 to 100 and tag at most 32 bytes.",
            ));
        }
        let author = self.check_signed(feedback)?;
        let author = self.principal(author).await?.payer;
        let Some(worker) = task.worker else {
            return Err(conflict("Nobody worked on this task."));
        };
        let subject = if author == task.poster {
            worker
        } else if author == worker {
            task.poster
        } else {
            return Err(ApiError::forbidden(
                "Only a counterparty of the task may leave feedback.",
            ));
        };
        if !matches!(
            task.state,
            TaskState::Accepted | TaskState::WorkerWon | TaskState::PosterWon | TaskState::Refused
        ) {
            return Err(conflict(
                "Feedback is left once a delivered task is decided.",
            ));
        }
        self.spend_nonce(feedback).await?;
        if !self
            .tasks
            .put_feedback(id, author, subject, m.score, &m.tag)
            .await
            .map_err(ApiError::internal)?
        {
            return Err(conflict("Feedback on this task was already left."));
        }
        Ok(
            json!({"task": id, "author": author, "subject": subject, "score": m.score, "tag": m.tag}),
        )
    }

    /// The feedback on an agent, summarised, with the raw entries (optionally by one author).
    pub async fn agent_reputation(
        &self,
        agent: Address,
        author: Option<Address>,
    ) -> Result<Value, ApiError> {
        let entries = self
            .tasks
            .feedback(agent, author)
            .await
            .map_err(ApiError::internal)?;
        let scores: Vec<f64> = entries.iter().filter_map(|e| e["score"].as_f64()).collect();
        let average =
            (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64);
        let finished = self
            .tasks
            .list(&TaskQuery {
                party: Some(agent),
                limit: Some(10_000),
                ..TaskQuery::default()
            })
            .await
            .map_err(ApiError::internal)?;
        let count = |s: TaskState| {
            finished
                .iter()
                .filter(|t| t.state == s && t.worker == Some(agent))
                .count()
        };
        Ok(json!({
            "agent": agent,
            "feedback_count": scores.len(),
            "average_score": average,
            "tasks_accepted": count(TaskState::Accepted) + count(TaskState::WorkerWon),
            "disputes_lost": count(TaskState::PosterWon),
            "late": count(TaskState::Late),
            "feedback": entries,
        }))
    }

    /// Decides a dispute by re-running the task's reference inference on a provider that is
    /// neither party, paid by the worker; retried by the sweeper while no provider can run it.
    async fn resolve_dispute(self: &Arc<Self>, id: &str) {
        let resolving = self.tasks.resolving.clone();
        if !resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned())
        {
            return;
        }
        self.try_resolve_dispute(id).await;
        resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    async fn try_resolve_dispute(self: &Arc<Self>, id: &str) {
        let Ok(Some(task)) = self.tasks.get(id).await else {
            return;
        };
        if task.state != TaskState::Disputed {
            return;
        }
        let (Some(reference), Some(worker)) = (&task.spec.reference, task.worker) else {
            return;
        };
        let rerun = match self
            .rerun(
                &reference.model,
                &reference.request,
                worker,
                &[task.poster, worker],
            )
            .await
        {
            Ok(rerun) => rerun,
            Err(e) if e.code == "insufficient_quota" => {
                // The disputing worker pays the re-execution; one who cannot has lost it.
                let set = Set {
                    outcome: Some(format!(
                        "the worker could not pay the re-execution: {}",
                        e.message
                    )),
                    ..Set::default()
                };
                if let Ok(true) = self
                    .move_task(id, TaskState::Disputed, TaskState::PosterWon, set)
                    .await
                {
                    self.settle_task(id).await;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e.message, "a dispute could not be re-run yet; retrying later");
                return;
            }
        };
        let delivered = task.delivery.clone().unwrap_or_default();
        let matches = rerun.text.trim() == delivered.trim();
        let (to, outcome) = if matches {
            (
                TaskState::WorkerWon,
                format!(
                    "re-executed by {:#x} (job {}): the delivery is the reference's output",
                    rerun.provider, rerun.job
                ),
            )
        } else {
            (
                TaskState::PosterWon,
                format!(
                    "re-executed by {:#x} (job {}): the delivery is not the reference's output",
                    rerun.provider, rerun.job
                ),
            )
        };
        let set = Set {
            outcome: Some(outcome),
            ..Set::default()
        };
        match self.move_task(id, TaskState::Disputed, to, set).await {
            Ok(true) => self.settle_task(id).await,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(task = %id, error = %e.message, "recording a dispute's outcome failed")
            }
        }
    }

    /// Runs one inference on the network for `payer`, on a provider not in `exclude`.
    async fn rerun(
        self: &Arc<Self>,
        model: &str,
        request: &JobRequest,
        payer: Address,
        exclude: &[Address],
    ) -> Result<Rerun, ApiError> {
        let mut admitted = self.admit(payer, model, request, None).await?;
        admitted
            .candidates
            .retain(|c| !exclude.contains(&c.address));
        {
            use rand::seq::SliceRandom;
            admitted.candidates.shuffle(&mut rand::rng());
        }
        if admitted.candidates.is_empty() {
            return Err(ApiError::unavailable(
                "no_independent_provider",
                "No provider other than the parties serves the reference model.",
            ));
        }
        let mut running = self.dispatch(admitted, request).await?;
        let provider = running.provider.address;
        let job = running.key().to_owned();
        let outcome = running.drive(|_, _, _| true).await;
        self.conclude(running, &outcome).await;
        if !matches!(outcome.end, crate::jobs::dispatch::End::Finished(_)) {
            return Err(ApiError::provider_failed(format!(
                "the re-execution broke off: {:?}",
                outcome.end
            )));
        }
        Ok(Rerun {
            text: outcome.text,
            provider,
            job,
        })
    }

    /// Moves a final task's money to its owners (idempotent: every step has its own key).
    pub async fn settle_task(&self, id: &str) {
        if let Err(e) = self.try_settle_task(id).await {
            tracing::error!(task = %id, error = %e, "settling a task failed; the sweeper retries");
        }
    }

    async fn try_settle_task(&self, id: &str) -> crate::Result<()> {
        let Some(task) = self.tasks.get(id).await? else {
            return Ok(());
        };
        if task.settled || !task.state.is_final() {
            return Ok(());
        }
        let key = |step: &str| format!("task:{id}:{step}");
        let pay_worker =
            |extra: u64| -> Option<Payout> { task.worker.map(|w| (w, task.bounty + extra)) };
        // (escrow, payee and amount to capture before releasing the rest)
        let (poster_side, worker_side): (Option<Payout>, Option<Payout>) = match task.state {
            TaskState::Accepted => (pay_worker(0), None),
            TaskState::WorkerWon => (pay_worker(task.poster_bond), None),
            TaskState::PosterWon | TaskState::Late => {
                (None, Some((task.poster, task.spec.worker_bond)))
            }
            _ => (None, None),
        };
        if let Some(escrow) = task.poster_escrow {
            close_escrow(self, &key("poster-escrow"), escrow, poster_side).await?;
        }
        if let Some(escrow) = task.worker_escrow {
            close_escrow(self, &key("worker-escrow"), escrow, worker_side).await?;
        }
        self.tasks.mark_settled(id).await?;
        tracing::info!(task = %id, state = task.state.as_str(), "task settled");
        Ok(())
    }

    /// One pass of the task clock: deadlines, lapsed review windows, disputes to retry and
    /// settlements a crash interrupted.
    pub async fn sweep_tasks(self: &Arc<Self>) -> crate::Result<()> {
        let now = now_secs();
        for task in self.tasks.unsettled().await? {
            let since = now.saturating_sub(task.updated_at);
            let lapse = |from, to, why: &str| (from, to, why.to_owned());
            let change = match task.state {
                TaskState::Posting => {
                    // A crash between recording and holding: hold again (same key) or give up.
                    self.finish_posting(&task).await;
                    None
                }
                TaskState::Claiming => {
                    self.finish_claiming(&task).await;
                    None
                }
                TaskState::Open if now >= task.spec.deadline => Some(lapse(
                    TaskState::Open,
                    TaskState::Expired,
                    "nobody claimed it by the deadline",
                )),
                TaskState::Claimed if now >= task.spec.deadline => Some(lapse(
                    TaskState::Claimed,
                    TaskState::Late,
                    "not delivered by the deadline",
                )),
                TaskState::Delivered if since >= task.spec.review_secs => Some(lapse(
                    TaskState::Delivered,
                    TaskState::Accepted,
                    "the review window lapsed",
                )),
                TaskState::Rejected if since >= task.spec.review_secs => Some(lapse(
                    TaskState::Rejected,
                    TaskState::Refused,
                    "rejected, and not disputed in time",
                )),
                TaskState::Disputed => {
                    let hub = self.clone();
                    let id = task.id.clone();
                    tokio::spawn(async move { hub.resolve_dispute(&id).await });
                    None
                }
                s if s.is_final() => {
                    self.settle_task(&task.id).await;
                    None
                }
                _ => None,
            };
            if let Some((from, to, why)) = change {
                let set = Set {
                    outcome: Some(why),
                    ..Set::default()
                };
                if self.tasks.transition(&task.id, from, to, &set).await? {
                    tracing::info!(task = %task.id, to = to.as_str(), "task clock");
                    self.settle_task(&task.id).await;
                }
            }
        }
        Ok(())
    }

    async fn finish_posting(&self, task: &Task) {
        let key = format!("task:{}:post", task.id);
        let set = match self.ledger.transaction(&key).await {
            Ok(Some(tx)) => match serde_json::from_str::<tessera_ledger::Hold>(&tx.result) {
                Ok(hold) => (
                    TaskState::Open,
                    Set {
                        poster_escrow: Some(hold.escrow_id),
                        ..Set::default()
                    },
                ),
                Err(_) => return,
            },
            Ok(None) => (
                TaskState::Cancelled,
                Set {
                    outcome: Some("posting was interrupted before its bounty was held".into()),
                    ..Set::default()
                },
            ),
            Err(_) => return,
        };
        if let Err(e) = self
            .move_task(&task.id, TaskState::Posting, set.0, set.1)
            .await
        {
            tracing::error!(task = %task.id, error = %e.message, "finishing a posting failed");
        }
        self.settle_task(&task.id).await;
    }

    async fn finish_claiming(&self, task: &Task) {
        let Some(worker) = task.worker else { return };
        let key = format!("task:{}:claim:{worker:#x}", task.id);
        let (to, set) = match self.ledger.transaction(&key).await {
            Ok(Some(tx)) => match serde_json::from_str::<tessera_ledger::Hold>(&tx.result) {
                Ok(hold) => (
                    TaskState::Claimed,
                    Set {
                        worker_escrow: Some(hold.escrow_id),
                        ..Set::default()
                    },
                ),
                Err(_) => return,
            },
            Ok(None) if task.spec.worker_bond == 0 => (TaskState::Claimed, Set::default()),
            Ok(None) => (
                TaskState::Open,
                Set {
                    clear_worker: true,
                    ..Set::default()
                },
            ),
            Err(_) => return,
        };
        if let Err(e) = self.move_task(&task.id, TaskState::Claiming, to, set).await {
            tracing::error!(task = %task.id, error = %e.message, "finishing a claim failed");
        }
    }
}

/// How often the task clock runs.
pub const CLOCK: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the task clock ([`Hub::sweep_tasks`]) until aborted.
pub async fn run_clock(hub: Arc<Hub>) {
    loop {
        if let Err(e) = hub.sweep_tasks().await {
            tracing::error!(error = %e, "the task clock failed; retrying");
        }
        tokio::time::sleep(CLOCK).await;
    }
}

/// Who is paid out of an escrow, and how much, before the rest is released.
type Payout = (Address, u64);

/// What a re-execution produced.
struct Rerun {
    text: String,
    provider: Address,
    job: String,
}

/// Captures `pay` out of an escrow (if any) and releases the rest; a closed escrow is done.
async fn close_escrow(hub: &Hub, key: &str, escrow: i64, pay: Option<Payout>) -> crate::Result<()> {
    let (payee, amount) = pay.unwrap_or((Address::ZERO, 0));
    let result = if amount > 0 {
        hub.ledger
            .finish(key, escrow, payee, amount)
            .await
            .map(|_| ())
    } else {
        hub.ledger.release(key, escrow).await.map(|_| ())
    };
    match result {
        Ok(()) | Err(tessera_ledger::Error::EscrowClosed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HubConfig;
    use rand::{Rng, SeedableRng};
    use tessera_protocol::{TypedMessage, Wallet};

    async fn hub() -> (Arc<Hub>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = HubConfig::dev(format!("sqlite://{}", dir.path().join("hub.db").display()));
        (Hub::open(config).await.expect("hub"), dir)
    }

    /// A funded poster, a funded worker and a stranger.
    async fn parties(hub: &Hub, poster_funds: u64, worker_funds: u64) -> (Wallet, Wallet, Wallet) {
        let faucet = hub.ledger.faucet().expect("dev");
        let wallets = (Wallet::random(), Wallet::random(), Wallet::random());
        faucet
            .mint("p", wallets.0.address(), poster_funds)
            .await
            .expect("mint");
        faucet
            .mint("w", wallets.1.address(), worker_funds)
            .await
            .expect("mint");
        wallets
    }

    fn sign<T: TypedMessage>(hub: &Hub, wallet: &Wallet, m: T) -> Signed<T> {
        wallet.sign(m, hub.verifier.domain()).expect("sign")
    }

    fn spec(deadline_in: u64, bond: u64, acceptance: Acceptance) -> String {
        serde_json::to_string(&TaskSpec {
            kind: "writing".into(),
            title: "a haiku".into(),
            description: "Write a haiku about ledgers.".into(),
            input: "ledgers".into(),
            private: false,
            deadline: now_secs() + deadline_in,
            worker_bond: bond,
            review_secs: 1,
            acceptance,
            reference: None,
        })
        .expect("spec")
    }

    async fn post(
        hub: &Arc<Hub>,
        poster: &Wallet,
        text: &str,
        bounty: u64,
        bond: u64,
    ) -> Result<Task, ApiError> {
        let posting = sign(
            hub,
            poster,
            TaskPosting {
                taskHash: B256::from(<[u8; 32]>::from(Sha256::digest(text.as_bytes()))),
                reward: bounty,
                bond,
                nonce: rand::random::<u64>() >> 1,
                expiry: now_secs() + 60,
            },
        );
        hub.post_task(&posting, text).await
    }

    fn id_of(t: &Task) -> B256 {
        t.id.parse().expect("id")
    }

    async fn claim(hub: &Arc<Hub>, w: &Wallet, t: &Task, bond: u64) -> Result<Task, ApiError> {
        let m = TaskClaim {
            taskId: id_of(t),
            bond,
            nonce: rand::random::<u64>() >> 1,
            expiry: now_secs() + 60,
        };
        hub.claim_task(&t.id, &sign(hub, w, m)).await
    }

    async fn deliver(hub: &Arc<Hub>, w: &Wallet, t: &Task, text: &str) -> Result<Task, ApiError> {
        let m = TaskDelivery {
            taskId: id_of(t),
            deliveryHash: B256::from(<[u8; 32]>::from(Sha256::digest(text.as_bytes()))),
            nonce: rand::random::<u64>() >> 1,
            expiry: now_secs() + 60,
        };
        hub.deliver_task(&t.id, &sign(hub, w, m), text).await
    }

    async fn decide(
        hub: &Arc<Hub>,
        w: &Wallet,
        t: &Task,
        action: TaskAction,
    ) -> Result<Task, ApiError> {
        let m = TaskDecision {
            taskId: id_of(t),
            action: action as u8,
            nonce: rand::random::<u64>() >> 1,
            expiry: now_secs() + 60,
        };
        hub.decide_task(&t.id, &sign(hub, w, m)).await
    }

    async fn balance(hub: &Hub, w: &Wallet) -> u64 {
        hub.spendable(w.address()).await.expect("balance")
    }

    #[tokio::test]
    async fn accept_pays_the_worker_and_returns_both_bonds() {
        let (hub, _dir) = hub().await;
        let (poster, worker, _) = parties(&hub, 10_000, 1_000).await;
        let t = post(
            &hub,
            &poster,
            &spec(60, 300, Acceptance::Poster),
            2_000,
            500,
        )
        .await
        .expect("post");
        assert_eq!(t.state, TaskState::Open);
        assert_eq!(balance(&hub, &poster).await, 7_500);
        claim(&hub, &worker, &t, 300).await.expect("claim");
        assert_eq!(balance(&hub, &worker).await, 700);
        deliver(&hub, &worker, &t, "ledger lines in rows")
            .await
            .expect("deliver");
        let t = decide(&hub, &poster, &t, TaskAction::Accept)
            .await
            .expect("accept");
        assert_eq!((t.state, t.settled), (TaskState::Accepted, true));
        // The bounty less the protocol fee (fee_bps of the dev config).
        let fee = 2_000 * u64::from(hub.config.fee_bps) / 10_000;
        assert_eq!(balance(&hub, &worker).await, 1_000 + 2_000 - fee);
        assert_eq!(balance(&hub, &poster).await, 8_000);
        assert!(hub.ledger.open_escrows().await.expect("escrows").is_empty());
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn what_is_refused_changes_nothing() {
        let (hub, _dir) = hub().await;
        let (poster, worker, other) = parties(&hub, 10_000, 100).await;
        // Overspending the bounty, an invalid schema, a past deadline.
        assert_eq!(
            post(&hub, &poster, &spec(60, 10, Acceptance::Poster), 20_000, 0)
                .await
                .unwrap_err()
                .code,
            "insufficient_quota"
        );
        let bad_schema = Acceptance::Schema {
            schema: json!({"type": 12}),
        };
        assert_eq!(
            post(&hub, &poster, &spec(60, 10, bad_schema), 100, 0)
                .await
                .unwrap_err()
                .param,
            Some("spec.acceptance.schema")
        );
        let t = post(&hub, &poster, &spec(60, 300, Acceptance::Poster), 1_000, 0)
            .await
            .expect("post");
        // A claim without the bond's funds, with another bond, by the poster.
        assert_eq!(
            claim(&hub, &worker, &t, 300).await.unwrap_err().code,
            "insufficient_quota"
        );
        assert_eq!(
            claim(&hub, &worker, &t, 1).await.unwrap_err().param,
            Some("bond")
        );
        assert_eq!(
            claim(&hub, &poster, &t, 300).await.unwrap_err().code,
            "forbidden"
        );
        hub.ledger
            .faucet()
            .expect("dev")
            .mint("w2", worker.address(), 1_000)
            .await
            .expect("mint");
        claim(&hub, &worker, &t, 300).await.expect("claim");
        assert_eq!(
            claim(&hub, &other, &t, 300).await.unwrap_err().code,
            "task_state_conflict"
        );
        // The poster cannot withdraw a claimed bounty; nobody but the worker delivers.
        assert_eq!(
            decide(&hub, &poster, &t, TaskAction::Cancel)
                .await
                .unwrap_err()
                .code,
            "task_state_conflict"
        );
        assert_eq!(
            deliver(&hub, &other, &t, "x").await.unwrap_err().code,
            "forbidden"
        );
        deliver(&hub, &worker, &t, "done").await.expect("deliver");
        assert_eq!(
            deliver(&hub, &worker, &t, "again").await.unwrap_err().code,
            "task_state_conflict"
        );
        // Only the poster decides; a dispute needs a reference.
        assert_eq!(
            decide(&hub, &worker, &t, TaskAction::Accept)
                .await
                .unwrap_err()
                .code,
            "forbidden"
        );
        decide(&hub, &poster, &t, TaskAction::Reject)
            .await
            .expect("reject");
        assert_eq!(
            decide(&hub, &worker, &t, TaskAction::Dispute)
                .await
                .unwrap_err()
                .code,
            "task_state_conflict"
        );
        // A replayed posting is refused (and holds nothing twice).
        let text = spec(60, 0, Acceptance::Poster);
        let posting = sign(
            &hub,
            &poster,
            TaskPosting {
                taskHash: B256::from(<[u8; 32]>::from(Sha256::digest(text.as_bytes()))),
                reward: 500,
                bond: 0,
                nonce: 5,
                expiry: now_secs() + 60,
            },
        );
        hub.post_task(&posting, &text).await.expect("post");
        assert_eq!(
            hub.post_task(&posting, &text).await.unwrap_err().code,
            "invalid_signature"
        );
        // A spec other than the signed one is refused.
        let other_text = spec(61, 0, Acceptance::Poster);
        assert_eq!(
            hub.post_task(&posting, &other_text).await.unwrap_err().code,
            "invalid_signature"
        );
        assert_eq!(
            balance(&hub, &poster).await,
            8_500,
            "the two bounties are still held"
        );
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn a_private_input_is_shown_only_to_the_parties() {
        let (hub, _dir) = hub().await;
        let (poster, worker, other) = parties(&hub, 10_000, 1_000).await;
        let mut s: TaskSpec = serde_json::from_str(&spec(60, 0, Acceptance::Poster)).expect("spec");
        s.private = true;
        s.input = "the secret".into();
        let t = post(
            &hub,
            &poster,
            &serde_json::to_string(&s).expect("json"),
            100,
            0,
        )
        .await
        .expect("post");
        assert_eq!(
            t.to_json(Some(other.address()))["spec"]["input"],
            Value::Null
        );
        assert_eq!(t.to_json(None)["spec"]["input"], Value::Null);
        assert_eq!(
            t.to_json(Some(poster.address()))["spec"]["input"],
            "the secret"
        );
        let t = claim(&hub, &worker, &t, 0).await.expect("claim");
        assert_eq!(
            t.to_json(Some(worker.address()))["spec"]["input"],
            "the secret"
        );
    }

    /// Random interleavings of every operation (and the clock) keep the books balanced, and
    /// every escrow is closed once all tasks are over.
    #[tokio::test]
    async fn random_interleavings_conserve_money_and_close_every_escrow() {
        let (hub, _dir) = hub().await;
        let faucet = hub.ledger.faucet().expect("dev");
        let wallets: Vec<Wallet> = (0..5).map(|_| Wallet::random()).collect();
        for (i, w) in wallets.iter().enumerate() {
            faucet
                .mint(&format!("m{i}"), w.address(), 20_000)
                .await
                .expect("mint");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut tasks: Vec<Task> = Vec::new();
        for step in 0..300 {
            let actor = &wallets[rng.random_range(0..wallets.len())];
            let op = rng.random_range(0..6);
            if op == 0 || tasks.is_empty() {
                let acceptance = if rng.random_bool(0.3) {
                    Acceptance::Schema {
                        schema: json!({"type": "object", "required": ["a"]}),
                    }
                } else {
                    Acceptance::Poster
                };
                let text = spec(rng.random_range(1..4), rng.random_range(0..800), acceptance);
                if let Ok(t) = post(
                    &hub,
                    actor,
                    &text,
                    rng.random_range(1..3_000),
                    rng.random_range(0..500),
                )
                .await
                {
                    tasks.push(t);
                }
                continue;
            }
            let t = tasks[rng.random_range(0..tasks.len())].clone();
            let _ = match op {
                1 => claim(&hub, actor, &t, t.spec.worker_bond).await,
                2 => {
                    let text = if rng.random_bool(0.5) {
                        "{\"a\": 1}"
                    } else {
                        "junk"
                    };
                    deliver(&hub, actor, &t, text).await
                }
                3 => decide(&hub, actor, &t, TaskAction::Accept).await,
                4 => decide(&hub, actor, &t, TaskAction::Reject).await,
                _ => decide(&hub, actor, &t, TaskAction::Cancel).await,
            };
            if step % 25 == 0 {
                hub.sweep_tasks().await.expect("sweep");
                let audit = hub.ledger.audit().await.expect("audit");
                assert!(audit.is_clean(), "{:?}", audit.problems());
            }
        }
        // Every deadline and review window lapses; the clock ends every task.
        tokio::time::sleep(std::time::Duration::from_millis(4_200)).await;
        for _ in 0..3 {
            hub.sweep_tasks().await.expect("sweep");
            tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        }
        for t in &tasks {
            let t = hub.tasks.get(&t.id).await.expect("get").expect("task");
            assert!(t.state.is_final() && t.settled, "{} is {:?}", t.id, t.state);
        }
        assert!(hub.ledger.open_escrows().await.expect("escrows").is_empty());
        let audit = hub.ledger.audit().await.expect("audit");
        assert!(audit.is_clean(), "{:?}", audit.problems());
        let mut total = 0;
        for w in &wallets {
            total += balance(&hub, w).await;
        }
        let fees = hub
            .ledger
            .balance(tessera_ledger::SystemAccount::Fees)
            .await
            .unwrap_or(0);
        assert_eq!(total + fees, 5 * 20_000, "nothing created or lost");
        assert!(tasks.len() > 20, "the walk posted {} tasks", tasks.len());
    }
}
