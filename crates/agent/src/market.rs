//! The task market and spending policies: every change signed by the client's wallet
//! (EIP-712, bound to the hub's domain) and sent to `/v1/tasks` or `/v1/policies`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{
    Address, PolicyRevocation, SpendingPolicy, TaskAction, TaskClaim, TaskDecision, TaskDelivery,
    TaskFeedback, TaskPosting, TypedMessage, B256,
};

use crate::{decode, read_json, Client, Error, Result};

/// How long a signed message stays valid.
const MESSAGE_VALIDITY_SECS: u64 = 300;

/// A task as the hub shows it (`GET /v1/tasks/{id}`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Task {
    /// `0x` + 64 hex digits.
    pub id: String,
    /// Who posted it (an owner, when a session key posted).
    pub poster: Address,
    /// Who claimed it.
    pub worker: Option<Address>,
    /// `open`, `claimed`, `delivered`, `accepted`, `poster_won`, ...
    pub state: String,
    /// Paid to the worker on acceptance.
    pub bounty: u64,
    /// The poster's bond.
    pub poster_bond: u64,
    /// The spec (its `input` is null for a private task a non-party reads).
    pub spec: Value,
    /// The delivered text (hidden from non-parties of a private task).
    pub delivery: Option<String>,
    /// Why it ended as it did.
    pub outcome: Option<String>,
    /// Whether its money has moved to its final owners.
    pub settled: bool,
}

impl Task {
    /// Whether the task is over and its money settled.
    pub fn is_settled(&self) -> bool {
        self.settled
    }
}

/// A search of the market (`GET /v1/tasks`); all fields optional.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    /// Only tasks in this state (`open` when neither this nor `party` is given).
    pub state: Option<String>,
    /// Only tasks of this kind.
    pub kind: Option<String>,
    /// Only bounties of at least this much.
    pub min_bounty: Option<u64>,
    /// Only tasks this agent posted or works on.
    pub party: Option<Address>,
}

/// The limits of a spending policy to grant; `Default` is no limit but the expiry.
#[derive(Debug, Clone)]
pub struct PolicyLimits {
    /// Most micro-units per generated token.
    pub max_price_per_token: u64,
    /// Most one request may hold.
    pub per_request_cap: u64,
    /// Most held per UTC day, cumulatively.
    pub per_day_cap: u64,
    /// Most over the policy's life (a sponsor's budget).
    pub total_cap: u64,
    /// Model names or sha256s (empty: any).
    pub models: Vec<String>,
    /// Providers (empty: any).
    pub providers: Vec<Address>,
    /// Task kinds (empty: any).
    pub task_kinds: Vec<String>,
    /// Seconds from now the session key may act.
    pub valid_for_secs: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            max_price_per_token: u64::MAX,
            per_request_cap: u64::MAX,
            per_day_cap: u64::MAX,
            total_cap: u64::MAX,
            models: Vec::new(),
            providers: Vec::new(),
            task_kinds: Vec::new(),
            valid_for_secs: 24 * 3600,
        }
    }
}

/// A spending policy as the hub shows it (`GET /v1/policies/{session}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Policy {
    /// Who pays.
    pub owner: Address,
    /// The session key.
    pub session: Address,
    /// Most micro-units per generated token.
    pub max_price_per_token: u64,
    /// Most one request may hold.
    pub per_request_cap: u64,
    /// Most held per UTC day.
    pub per_day_cap: u64,
    /// Most over its life.
    pub total_cap: u64,
    /// Allowed models (empty: any).
    pub models: Vec<String>,
    /// Allowed providers (empty: any).
    pub providers: Vec<Address>,
    /// Allowed task kinds (empty: any).
    pub task_kinds: Vec<String>,
    /// Unix seconds after which the key may not act.
    pub valid_until: u64,
    /// Whether the owner revoked it.
    pub revoked: bool,
    /// Counted today.
    pub spent_today: u64,
    /// Counted over its life.
    pub spent_total: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn sha(bytes: &[u8]) -> B256 {
    <[u8; 32]>::from(Sha256::digest(bytes)).into()
}

fn task_id(id: &str) -> Result<B256> {
    id.parse()
        .map_err(|_| Error::Decode(format!("`{id}` is not a task id")))
}

/// A fresh nonce and a near expiry for a message signed now.
fn fresh() -> (u64, u64) {
    (rand::random::<u64>() >> 1, now() + MESSAGE_VALIDITY_SECS)
}

impl Client {
    fn sign<T: TypedMessage>(&self, message: T) -> Result<Value> {
        let wallet = self.wallet.as_ref().ok_or(Error::NoWallet)?;
        let signed = wallet.sign(message, self.domain()?)?;
        serde_json::to_value(signed).map_err(|e| Error::Decode(e.to_string()))
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        read_json(
            self.authorized(self.http.post(format!("{}{path}", self.url)))
                .send_json(body)?,
        )
    }

    fn get_json(&self, path: &str) -> Result<Value> {
        read_json(
            self.authorized(self.http.get(format!("{}{path}", self.url)))
                .call()?,
        )
    }

    /// Posts a task (`spec` is the spec's JSON text, hashed as sent), holding `bounty` and the
    /// poster's `bond` in escrow.
    pub fn post_task(&self, spec: &str, bounty: u64, bond: u64) -> Result<Task> {
        let (nonce, expiry) = fresh();
        let posting = self.sign(TaskPosting {
            taskHash: sha(spec.as_bytes()),
            reward: bounty,
            bond,
            nonce,
            expiry,
        })?;
        decode(self.post_json("/v1/tasks", &json!({"spec": spec, "posting": posting}))?)
    }

    /// One task (its private input only when this client's key is a party's).
    pub fn task(&self, id: &str) -> Result<Task> {
        decode(self.get_json(&format!("/v1/tasks/{id}"))?)
    }

    /// Tasks matching `query`, newest first.
    pub fn tasks(&self, query: &TaskQuery) -> Result<Vec<Task>> {
        let mut q = Vec::new();
        if let Some(s) = &query.state {
            q.push(format!("state={s}"));
        }
        if let Some(k) = &query.kind {
            q.push(format!("kind={k}"));
        }
        if let Some(b) = query.min_bounty {
            q.push(format!("min_bounty={b}"));
        }
        if let Some(p) = query.party {
            q.push(format!("party={p:#x}"));
        }
        let v = self.get_json(&format!("/v1/tasks?{}", q.join("&")))?;
        decode(v["data"].clone())
    }

    /// Claims a task, posting the bond it asks.
    pub fn claim(&self, id: &str) -> Result<Task> {
        let bond = self.task(id)?.spec["worker_bond"]
            .as_u64()
            .ok_or_else(|| Error::Decode("a task without worker_bond".into()))?;
        let (nonce, expiry) = fresh();
        let signed = self.sign(TaskClaim {
            taskId: task_id(id)?,
            bond,
            nonce,
            expiry,
        })?;
        decode(self.post_json(&format!("/v1/tasks/{id}/claim"), &signed)?)
    }

    /// Delivers the work of a claimed task.
    pub fn deliver(&self, id: &str, delivery: &str) -> Result<Task> {
        let (nonce, expiry) = fresh();
        let signed = self.sign(TaskDelivery {
            taskId: task_id(id)?,
            deliveryHash: sha(delivery.as_bytes()),
            nonce,
            expiry,
        })?;
        decode(self.post_json(
            &format!("/v1/tasks/{id}/deliver"),
            &json!({"delivery": delivery, "signed": signed}),
        )?)
    }

    /// A party's decision: accept, reject, cancel (the poster) or dispute (the worker).
    pub fn decide(&self, id: &str, action: TaskAction) -> Result<Task> {
        let (nonce, expiry) = fresh();
        let signed = self.sign(TaskDecision {
            taskId: task_id(id)?,
            action: action as u8,
            nonce,
            expiry,
        })?;
        decode(self.post_json(&format!("/v1/tasks/{id}/decide"), &signed)?)
    }

    /// Accepts a delivery: the worker is paid.
    pub fn accept(&self, id: &str) -> Result<Task> {
        self.decide(id, TaskAction::Accept)
    }

    /// Rejects a delivery: the worker may dispute.
    pub fn reject(&self, id: &str) -> Result<Task> {
        self.decide(id, TaskAction::Reject)
    }

    /// Disputes a rejection: the network re-executes the task's reference.
    pub fn dispute(&self, id: &str) -> Result<Task> {
        self.decide(id, TaskAction::Dispute)
    }

    /// Withdraws a task nobody claimed.
    pub fn cancel(&self, id: &str) -> Result<Task> {
        self.decide(id, TaskAction::Cancel)
    }

    /// Leaves feedback (0 to 100, a short tag) on the counterparty of a decided task.
    pub fn feedback(&self, id: &str, score: u8, tag: &str) -> Result<Value> {
        let (nonce, expiry) = fresh();
        let signed = self.sign(TaskFeedback {
            taskId: task_id(id)?,
            score,
            tag: tag.to_owned(),
            nonce,
            expiry,
        })?;
        self.post_json(&format!("/v1/tasks/{id}/feedback"), &signed)
    }

    /// An agent's reputation, optionally only the feedback `author` left.
    pub fn reputation(&self, agent: Address, author: Option<Address>) -> Result<Value> {
        let filter = author
            .map(|a| format!("?author={a:#x}"))
            .unwrap_or_default();
        self.get_json(&format!("/v1/agents/{agent:#x}/reputation{filter}"))
    }

    /// Grants `session` a spending policy on this wallet's balance (a later grant to the same
    /// session replaces it).
    pub fn grant_policy(&self, session: Address, limits: &PolicyLimits) -> Result<Policy> {
        let (nonce, expiry) = fresh();
        let signed = self.sign(SpendingPolicy {
            session,
            maxPricePerToken: limits.max_price_per_token,
            perRequestCap: limits.per_request_cap,
            perDayCap: limits.per_day_cap,
            totalCap: limits.total_cap,
            models: limits.models.clone(),
            providers: limits.providers.clone(),
            taskKinds: limits.task_kinds.clone(),
            validUntil: now() + limits.valid_for_secs,
            nonce,
            expiry,
        })?;
        decode(self.post_json("/v1/policies", &signed)?)
    }

    /// The policy of a session key, with what it has spent.
    pub fn policy(&self, session: Address) -> Result<Policy> {
        decode(self.get_json(&format!("/v1/policies/{session:#x}"))?)
    }

    /// Revokes a session key this wallet granted.
    pub fn revoke_policy(&self, session: Address) -> Result<Policy> {
        let (nonce, expiry) = fresh();
        let signed = self.sign(PolicyRevocation {
            session,
            nonce,
            expiry,
        })?;
        decode(self.post_json(&format!("/v1/policies/{session:#x}/revoke"), &signed)?)
    }
}
