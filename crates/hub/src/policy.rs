//! Spending policies: an owner delegates a session key to spend its balance within limits
//! (after ERC-7715 permissions and session keys, and the allow-lists of Coinbase's policy engine).
//!
//! The owner signs an EIP-712 [`SpendingPolicy`] naming the session address and its limits; a
//! [`PolicyRevocation`] ends it. While the grant stands, every act of the session key (an
//! inference by its API key or its signed requests, a task posting, claim, delivery or decision)
//! is the owner's: the owner's balance pays and is paid. A revoked or expired session key is
//! refused everything: it is a delegate, never an account of its own.
//!
//! **Limits** (each refusal is a 403 `policy_violation` whose `param` names the limit, and moves
//! no money): `maxPricePerToken` caps an inference's price; `perRequestCap` the most one request
//! may hold (an inference's maximum cost, a posting's bounty plus bond, a claim's bond);
//! `perDayCap` what is held per UTC day and `totalCap` over the grant's life, both counted
//! cumulatively in the database (an inference counts its maximum cost while it runs and its
//! charged cost once settled; a posting or claim counts what it holds, refunds included, as
//! money committed); `models`, `providers` and `taskKinds` are allow-lists (empty: any);
//! `validUntil` ends the grant.
//!
//! **Sponsors.** A sponsor is an owner whose session key is a key another agent holds: that agent
//! then works on the sponsor's money within `totalCap` (its budget) and the other limits, e.g.
//! inference for its own tasks, while claiming and earning with its own wallet.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::Row;
use tessera_protocol::{Address, PolicyRevocation, Signed, SpendingPolicy};

use crate::error::ApiError;
use crate::{now_secs, Hub};

/// How long "this address has no policy" is cached (a grant made on another replica reaches
/// this one within it; grants made here clear it at once).
const NONE_CACHE: Duration = Duration::from_secs(30);

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS hub_policies (session TEXT PRIMARY KEY, owner TEXT NOT NULL, \
     grant_json TEXT NOT NULL, revoked BIGINT NOT NULL DEFAULT 0, spent_total BIGINT NOT NULL DEFAULT 0, \
     granted_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_policy_days (session TEXT NOT NULL, day BIGINT NOT NULL, \
     spent BIGINT NOT NULL, PRIMARY KEY (session, day))",
];

/// A policy as the hub keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    /// Who pays.
    pub owner: Address,
    /// The signed limits.
    pub policy: SpendingPolicy,
    /// Whether the owner revoked it.
    pub revoked: bool,
    /// Counted over its life.
    pub spent_total: u64,
}

/// Who an act is for: the payer, and the grant it acts under (`None`: the signer itself).
#[derive(Debug, Clone)]
pub struct Principal {
    /// Whose balance pays and is paid.
    pub payer: Address,
    /// The session key's grant, when the signer is one.
    pub grant: Option<Grant>,
}

/// Money counted against a grant by an act in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The session key.
    pub session: Address,
    /// The UTC day (unix seconds / 86 400) it counts in.
    pub day: u64,
    /// Micro-units counted.
    pub amount: u64,
}

/// A refusal naming the limit it breaks.
pub fn breach(limit: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        param: Some(limit),
        ..ApiError::status(StatusCode::FORBIDDEN, "policy_violation", message)
    }
}

fn db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn addr_text(a: Address) -> String {
    format!("{a:#x}")
}

impl Grant {
    /// Refuses a model outside `models` (matched by name or sha256 through the catalog).
    pub fn check_model(&self, hub: &Hub, model: &str) -> Result<(), ApiError> {
        let models = &self.policy.models;
        if models.is_empty() {
            return Ok(());
        }
        let wanted = hub.config.catalog.lookup(model).map(|e| e.sha256.clone());
        let allowed = models.iter().any(|m| {
            m == model
                || hub
                    .config
                    .catalog
                    .lookup(m)
                    .is_some_and(|e| Some(&e.sha256) == wanted.as_ref())
        });
        if allowed {
            Ok(())
        } else {
            Err(breach(
                "models",
                format!(
                    "The spending policy allows the models {models:?}, not `{model}` (limit: models)."
                ),
            ))
        }
    }

    /// The price cap an inference runs under: the request's own, which may not exceed the
    /// policy's `maxPricePerToken`, or the policy's.
    pub fn price_cap(&self, asked: Option<u64>) -> Result<u64, ApiError> {
        let cap = self.policy.maxPricePerToken;
        match asked {
            Some(p) if p > cap => Err(breach(
                "maxPricePerToken",
                format!(
                    "The request allows {p} per token; the spending policy's maxPricePerToken is {cap}."
                ),
            )),
            Some(p) => Ok(p),
            None => Ok(cap),
        }
    }

    /// Whether a provider is allowed.
    pub fn allows_provider(&self, provider: Address) -> bool {
        self.policy.providers.is_empty() || self.policy.providers.contains(&provider)
    }

    /// Refuses a task kind outside `taskKinds`.
    pub fn check_kind(&self, kind: &str) -> Result<(), ApiError> {
        let kinds = &self.policy.taskKinds;
        if kinds.is_empty() || kinds.iter().any(|k| k == kind) {
            Ok(())
        } else {
            Err(breach(
                "taskKinds",
                format!("The spending policy allows the task kinds {kinds:?}, not `{kind}` (limit: taskKinds)."),
            ))
        }
    }

    /// Refuses one request holding more than `perRequestCap`.
    pub fn check_request(&self, amount: u64, what: &str) -> Result<(), ApiError> {
        let cap = self.policy.perRequestCap;
        if amount > cap {
            return Err(breach(
                "perRequestCap",
                format!("{what} holds {amount}; the spending policy's perRequestCap is {cap}."),
            ));
        }
        Ok(())
    }

    /// The grant as JSON (`GET /v1/policies/{session}`).
    pub fn to_json(&self, spent_today: u64) -> Value {
        let p = &self.policy;
        json!({
            "object": "spending_policy",
            "owner": self.owner,
            "session": p.session,
            "max_price_per_token": p.maxPricePerToken,
            "per_request_cap": p.perRequestCap,
            "per_day_cap": p.perDayCap,
            "total_cap": p.totalCap,
            "models": p.models,
            "providers": p.providers,
            "task_kinds": p.taskKinds,
            "valid_until": p.validUntil,
            "revoked": self.revoked,
            "spent_today": spent_today,
            "spent_total": self.spent_total,
        })
    }
}

/// The hub's policy tables.
pub struct PolicyStore {
    pool: sqlx::AnyPool,
    /// Addresses known to hold no policy, and since when.
    none: RwLock<HashMap<Address, Instant>>,
}

impl PolicyStore {
    /// Creates the tables.
    pub async fn open(pool: sqlx::AnyPool) -> crate::Result<Self> {
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Self {
            pool,
            none: RwLock::default(),
        })
    }

    /// The grant of a session key, revoked or not.
    pub async fn get(&self, session: Address) -> crate::Result<Option<Grant>> {
        let fresh_none = self
            .none
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .is_some_and(|at| at.elapsed() < NONE_CACHE);
        if fresh_none {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT owner, grant_json, revoked, spent_total FROM hub_policies WHERE session = $1",
        )
        .bind(addr_text(session))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            self.none
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(session, Instant::now());
            return Ok(None);
        };
        let owner: String = row.try_get("owner")?;
        let text: String = row.try_get("grant_json")?;
        Ok(Some(Grant {
            owner: owner
                .parse()
                .map_err(|_| crate::Error::Corrupt("policy owner".into()))?,
            policy: serde_json::from_str(&text)
                .map_err(|e| crate::Error::Corrupt(format!("policy: {e}")))?,
            revoked: row.try_get::<i64, _>("revoked")? != 0,
            spent_total: row.try_get::<i64, _>("spent_total")? as u64,
        }))
    }

    /// Micro-units counted against `session` on `day`.
    pub async fn spent_on(&self, session: Address, day: u64) -> crate::Result<u64> {
        let row = sqlx::query("SELECT spent FROM hub_policy_days WHERE session = $1 AND day = $2")
            .bind(addr_text(session))
            .bind(db(day))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<i64, _>("spent")? as u64,
            None => 0,
        })
    }

    /// Records (or replaces, for the same owner) a grant; `false` when another owner holds the
    /// session, or it was revoked.
    async fn put(&self, owner: Address, policy: &SpendingPolicy) -> crate::Result<bool> {
        let text = serde_json::to_string(policy)
            .map_err(|e| crate::Error::Corrupt(format!("policy: {e}")))?;
        let done = sqlx::query(
            "INSERT INTO hub_policies (session, owner, grant_json, granted_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (session) DO UPDATE SET grant_json = excluded.grant_json, granted_at = excluded.granted_at \
             WHERE hub_policies.owner = excluded.owner AND hub_policies.revoked = 0",
        )
        .bind(addr_text(policy.session))
        .bind(addr_text(owner))
        .bind(text)
        .bind(db(now_secs()))
        .execute(&self.pool)
        .await?;
        self.none
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&policy.session);
        Ok(done.rows_affected() == 1)
    }

    async fn revoke(&self, owner: Address, session: Address) -> crate::Result<bool> {
        let done = sqlx::query(
            "UPDATE hub_policies SET revoked = 1 WHERE session = $1 AND owner = $2 AND revoked = 0",
        )
        .bind(addr_text(session))
        .bind(addr_text(owner))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Counts `amount` against the grant's day and life, atomically, or says which cap it
    /// breaks (then nothing is counted).
    pub async fn reserve(&self, grant: &Grant, amount: u64) -> Result<Reservation, ApiError> {
        let p = &grant.policy;
        let session = addr_text(p.session);
        let day = now_secs() / 86_400;
        let mut tx = self.pool.begin().await.map_err(ApiError::internal)?;
        sqlx::query(
            "INSERT INTO hub_policy_days (session, day, spent) VALUES ($1, $2, 0) \
             ON CONFLICT (session, day) DO NOTHING",
        )
        .bind(&session)
        .bind(db(day))
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
        let today = sqlx::query(
            "UPDATE hub_policy_days SET spent = spent + $1 WHERE session = $2 AND day = $3 AND spent + $1 <= $4",
        )
        .bind(db(amount))
        .bind(&session)
        .bind(db(day))
        .bind(db(p.perDayCap))
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
        if today.rows_affected() != 1 {
            drop(tx);
            let spent = self
                .spent_on(p.session, day)
                .await
                .map_err(ApiError::internal)?;
            return Err(breach(
                "perDayCap",
                format!(
                    "This needs {amount}; {spent} of the spending policy's perDayCap {} is already used today.",
                    p.perDayCap
                ),
            ));
        }
        let life = sqlx::query(
            "UPDATE hub_policies SET spent_total = spent_total + $1 \
             WHERE session = $2 AND revoked = 0 AND spent_total + $1 <= $3",
        )
        .bind(db(amount))
        .bind(&session)
        .bind(db(p.totalCap))
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
        if life.rows_affected() != 1 {
            drop(tx);
            return Err(breach(
                "totalCap",
                format!(
                    "This needs {amount}; {} of the spending policy's totalCap {} is already used.",
                    grant.spent_total, p.totalCap
                ),
            ));
        }
        tx.commit().await.map_err(ApiError::internal)?;
        Ok(Reservation {
            session: p.session,
            day,
            amount,
        })
    }

    /// Settles a reservation at what was really spent (`used` ≤ its amount), giving back the rest.
    pub async fn settle(&self, r: &Reservation, used: u64) {
        let back = db(r.amount.saturating_sub(used));
        if back == 0 {
            return;
        }
        let session = addr_text(r.session);
        let result = async {
            sqlx::query(
                "UPDATE hub_policy_days SET spent = spent - $1 WHERE session = $2 AND day = $3",
            )
            .bind(back)
            .bind(&session)
            .bind(db(r.day))
            .execute(&self.pool)
            .await?;
            sqlx::query("UPDATE hub_policies SET spent_total = spent_total - $1 WHERE session = $2")
                .bind(back)
                .bind(&session)
                .execute(&self.pool)
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::error!(session = %r.session, error = %e, "settling a policy reservation failed; it stays counted");
        }
    }
}

impl Hub {
    /// Who `signer` acts for: itself, or the owner of its standing grant. A session key whose
    /// grant was revoked or has expired is refused.
    pub async fn principal(&self, signer: Address) -> Result<Principal, ApiError> {
        let Some(grant) = self
            .policies
            .get(signer)
            .await
            .map_err(ApiError::internal)?
        else {
            return Ok(Principal {
                payer: signer,
                grant: None,
            });
        };
        if grant.revoked {
            return Err(breach(
                "revoked",
                format!("The spending policy of session key {signer:#x} was revoked by its owner."),
            ));
        }
        if now_secs() > grant.policy.validUntil {
            return Err(breach(
                "validUntil",
                format!(
                    "The spending policy of session key {signer:#x} expired at {} (limit: validUntil).",
                    grant.policy.validUntil
                ),
            ));
        }
        Ok(Principal {
            payer: grant.owner,
            grant: Some(grant),
        })
    }

    /// Records an owner's signed grant (`POST /v1/policies`).
    pub async fn grant_policy(&self, signed: &Signed<SpendingPolicy>) -> Result<Value, ApiError> {
        let p = &signed.message;
        let owner = self
            .verifier
            .check(signed, now_secs())
            .map_err(|e| ApiError::bad_signature(format!("Invalid signature: {e}")))?;
        if p.session == owner || p.session == Address::ZERO {
            return Err(ApiError::invalid_param(
                "session",
                "The session key must be another, non-zero address.",
            ));
        }
        if p.validUntil <= now_secs() {
            return Err(ApiError::invalid_param(
                "validUntil",
                "validUntil must be in the future.",
            ));
        }
        if p.models.len() + p.providers.len() + p.taskKinds.len() > 256 {
            return Err(ApiError::invalid_param(
                "models",
                "At most 256 allow-list entries.",
            ));
        }
        // An owner may not itself be a session key: delegation does not chain.
        let owner_grant = self.policies.get(owner).await.map_err(ApiError::internal)?;
        if owner_grant.is_some() {
            return Err(ApiError::forbidden(
                "A session key cannot grant a spending policy.",
            ));
        }
        self.verifier
            .verify(signed, now_secs(), &self.ledger)
            .await
            .map_err(|e| ApiError::bad_signature(format!("Invalid signature: {e}")))?;
        if !self
            .policies
            .put(owner, p)
            .await
            .map_err(ApiError::internal)?
        {
            return Err(ApiError::status(
                StatusCode::CONFLICT,
                "policy_conflict",
                "This session key belongs to another owner's policy, or its policy was revoked; use a new key.",
            ));
        }
        tracing::info!(%owner, session = %p.session, per_day = p.perDayCap, total = p.totalCap, "spending policy granted");
        self.show_policy(p.session).await
    }

    /// Revokes a grant by its owner's signature (`POST /v1/policies/{session}/revoke`).
    pub async fn revoke_policy(
        &self,
        signed: &Signed<PolicyRevocation>,
    ) -> Result<Value, ApiError> {
        let owner = self
            .verifier
            .verify(signed, now_secs(), &self.ledger)
            .await
            .map_err(|e| ApiError::bad_signature(format!("Invalid signature: {e}")))?;
        let session = signed.message.session;
        if !self
            .policies
            .revoke(owner, session)
            .await
            .map_err(ApiError::internal)?
        {
            return Err(ApiError::status(
                StatusCode::NOT_FOUND,
                "policy_not_found",
                "This wallet granted no standing policy to that session key.",
            ));
        }
        tracing::info!(%owner, %session, "spending policy revoked");
        self.show_policy(session).await
    }

    /// A grant with what it has used (`GET /v1/policies/{session}`).
    pub async fn show_policy(&self, session: Address) -> Result<Value, ApiError> {
        let grant = self
            .policies
            .get(session)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                ApiError::status(
                    StatusCode::NOT_FOUND,
                    "policy_not_found",
                    "No spending policy names that session key.",
                )
            })?;
        let today = self
            .policies
            .spent_on(session, now_secs() / 86_400)
            .await
            .map_err(ApiError::internal)?;
        Ok(grant.to_json(today))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Acceptance, TaskSpec, TaskState};
    use crate::HubConfig;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use tessera_protocol::{TaskClaim, TaskPosting, TypedMessage, Wallet, B256};

    async fn hub_at(dir: &tempfile::TempDir) -> Arc<Hub> {
        let config = HubConfig::dev(format!("sqlite://{}", dir.path().join("hub.db").display()));
        Hub::open(config).await.expect("hub")
    }

    fn sign<T: TypedMessage>(hub: &Hub, wallet: &Wallet, m: T) -> Signed<T> {
        wallet.sign(m, hub.verifier.domain()).expect("sign")
    }

    fn policy(session: Address) -> SpendingPolicy {
        SpendingPolicy {
            session,
            maxPricePerToken: 10,
            perRequestCap: 3_000,
            perDayCap: 5_000,
            totalCap: 1_000_000,
            models: vec![],
            providers: vec![],
            taskKinds: vec!["writing".into()],
            validUntil: now_secs() + 3_600,
            nonce: rand::random::<u64>() >> 1,
            expiry: now_secs() + 60,
        }
    }

    fn spec(kind: &str) -> String {
        serde_json::to_string(&TaskSpec {
            kind: kind.into(),
            title: "a haiku".into(),
            description: String::new(),
            input: format!("{}", rand::random::<u64>()),
            private: false,
            deadline: now_secs() + 60,
            worker_bond: 300,
            review_secs: 5,
            acceptance: Acceptance::Poster,
            reference: None,
        })
        .expect("spec")
    }

    async fn post(
        hub: &Arc<Hub>,
        w: &Wallet,
        kind: &str,
        bounty: u64,
    ) -> Result<crate::tasks::Task, ApiError> {
        let text = spec(kind);
        let posting = sign(
            hub,
            w,
            TaskPosting {
                taskHash: B256::from(<[u8; 32]>::from(Sha256::digest(text.as_bytes()))),
                reward: bounty,
                bond: 0,
                nonce: rand::random::<u64>() >> 1,
                expiry: now_secs() + 60,
            },
        );
        hub.post_task(&posting, &text).await
    }

    async fn claim(hub: &Arc<Hub>, w: &Wallet, id: &str) -> Result<crate::tasks::Task, ApiError> {
        let m = TaskClaim {
            taskId: id.parse().expect("id"),
            bond: 300,
            nonce: rand::random::<u64>() >> 1,
            expiry: now_secs() + 60,
        };
        hub.claim_task(id, &sign(hub, w, m)).await
    }

    async fn balance(hub: &Hub, a: Address) -> u64 {
        hub.ledger.balance(a).await.unwrap_or(0)
    }

    fn limit(e: ApiError) -> &'static str {
        assert_eq!(
            (e.status.as_u16(), e.code),
            (403, "policy_violation"),
            "{}",
            e.message
        );
        e.param.expect("the refusal names its limit")
    }

    /// A session key posts and claims for its owner; each limit refuses with its name and moves
    /// no money; the day's count survives a restart; revocation and expiry end the key.
    #[tokio::test]
    async fn session_keys_spend_their_owners_money_within_every_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = hub_at(&dir).await;
        let (owner, session, worker_owner, worker_session) = (
            Wallet::random(),
            Wallet::random(),
            Wallet::random(),
            Wallet::random(),
        );
        let faucet = hub.ledger.faucet().expect("dev");
        faucet
            .mint("o", owner.address(), 20_000)
            .await
            .expect("mint");
        faucet
            .mint("w", worker_owner.address(), 2_000)
            .await
            .expect("mint");
        hub.grant_policy(&sign(&hub, &owner, policy(session.address())))
            .await
            .expect("grant");
        let mut wp = policy(worker_session.address());
        wp.perRequestCap = 200;
        hub.grant_policy(&sign(&hub, &worker_owner, wp.clone()))
            .await
            .expect("grant");

        let t = post(&hub, &session, "writing", 2_000).await.expect("post");
        assert_eq!(t.poster, owner.address(), "the owner is the poster");
        assert_eq!(balance(&hub, owner.address()).await, 18_000);
        assert_eq!(balance(&hub, session.address()).await, 0);

        // Refusals: kind, per request, per day (2 000 + 2 000 + 2 000 > 5 000).
        assert_eq!(
            limit(post(&hub, &session, "code", 100).await.unwrap_err()),
            "taskKinds"
        );
        assert_eq!(
            limit(post(&hub, &session, "writing", 3_001).await.unwrap_err()),
            "perRequestCap"
        );
        post(&hub, &session, "writing", 2_000)
            .await
            .expect("second post");
        assert_eq!(
            limit(post(&hub, &session, "writing", 2_000).await.unwrap_err()),
            "perDayCap"
        );
        assert_eq!(
            balance(&hub, owner.address()).await,
            16_000,
            "refusals moved nothing"
        );

        // The worker's session key: its bond of 300 is over its perRequestCap of 200.
        assert_eq!(
            limit(claim(&hub, &worker_session, &t.id).await.unwrap_err()),
            "perRequestCap"
        );
        wp.perRequestCap = 300;
        wp.nonce += 1;
        hub.grant_policy(&sign(&hub, &worker_owner, wp))
            .await
            .expect("a replacing grant");
        let claimed = claim(&hub, &worker_session, &t.id).await.expect("claim");
        assert_eq!(claimed.worker, Some(worker_owner.address()));
        assert_eq!(claimed.state, TaskState::Claimed);
        assert_eq!(balance(&hub, worker_owner.address()).await, 1_700);

        // Another owner cannot take over a session key; a session key cannot grant.
        let thief = Wallet::random();
        assert_eq!(
            hub.grant_policy(&sign(&hub, &thief, policy(session.address())))
                .await
                .unwrap_err()
                .code,
            "policy_conflict"
        );
        assert_eq!(
            hub.grant_policy(&sign(&hub, &session, policy(thief.address())))
                .await
                .unwrap_err()
                .code,
            "forbidden"
        );

        // The day's count is in the database: a restarted hub refuses the same post.
        let shown = hub.show_policy(session.address()).await.expect("show");
        assert_eq!(shown["spent_today"], 4_000);
        hub.close().await.expect("close");
        drop(hub);
        let hub = hub_at(&dir).await;
        assert_eq!(
            limit(post(&hub, &session, "writing", 1_001).await.unwrap_err()),
            "perDayCap"
        );
        post(&hub, &session, "writing", 1_000)
            .await
            .expect("within the day's cap");

        // Revocation ends the key for everything (here, a claim).
        let revoke = PolicyRevocation {
            session: session.address(),
            nonce: 1,
            expiry: now_secs() + 60,
        };
        assert_eq!(
            hub.revoke_policy(&sign(&hub, &thief, revoke.clone()))
                .await
                .unwrap_err()
                .code,
            "policy_not_found",
            "only the owner revokes"
        );
        hub.revoke_policy(&sign(&hub, &owner, revoke))
            .await
            .expect("revoke");
        assert_eq!(
            limit(post(&hub, &session, "writing", 10).await.unwrap_err()),
            "revoked"
        );

        // Expiry: a key valid for two seconds is refused after it.
        let short = Wallet::random();
        let mut p = policy(short.address());
        p.validUntil = now_secs() + 2;
        hub.grant_policy(&sign(&hub, &owner, p))
            .await
            .expect("grant");
        tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
        assert_eq!(
            limit(post(&hub, &short, "writing", 10).await.unwrap_err()),
            "validUntil"
        );

        assert_eq!(balance(&hub, owner.address()).await, 15_000);
        let audit = hub.ledger.audit().await.expect("audit");
        assert!(audit.is_clean(), "{:?}", audit.problems());
    }

    /// A sponsor's budget (`totalCap`) holds across days' caps and kinds of spending.
    #[tokio::test]
    async fn a_sponsors_total_budget_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = hub_at(&dir).await;
        let (sponsor, agent) = (Wallet::random(), Wallet::random());
        hub.ledger
            .faucet()
            .expect("dev")
            .mint("s", sponsor.address(), 50_000)
            .await
            .expect("mint");
        let mut p = policy(agent.address());
        p.perDayCap = u64::MAX;
        p.totalCap = 2_500;
        hub.grant_policy(&sign(&hub, &sponsor, p))
            .await
            .expect("grant");
        post(&hub, &agent, "writing", 1_500).await.expect("post");
        assert_eq!(
            limit(post(&hub, &agent, "writing", 1_001).await.unwrap_err()),
            "totalCap"
        );
        post(&hub, &agent, "writing", 1_000)
            .await
            .expect("the rest of the budget");
        assert_eq!(
            limit(post(&hub, &agent, "writing", 1).await.unwrap_err()),
            "totalCap"
        );
        assert_eq!(balance(&hub, sponsor.address()).await, 47_500);
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[test]
    fn the_price_cap_is_the_policys_unless_the_request_asks_less() {
        let g = Grant {
            owner: Address::with_last_byte(1),
            policy: policy(Address::with_last_byte(2)),
            revoked: false,
            spent_total: 0,
        };
        assert_eq!(g.price_cap(None).expect("cap"), 10);
        assert_eq!(g.price_cap(Some(4)).expect("cap"), 4);
        assert_eq!(
            g.price_cap(Some(11)).unwrap_err().param,
            Some("maxPricePerToken")
        );
        assert!(g.allows_provider(Address::with_last_byte(9)), "empty: any");
    }
}
