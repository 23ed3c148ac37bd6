//! The hub's own tables, beside the ledger's in the same database: registered API keys, provider
//! records (reputation, quarantine) and jobs whose escrow is still open. With them a restarted
//! hub keeps its agents, remembers whom it quarantined, and closes every escrow a crash left
//! open: a job acknowledged to its agent and waiting for its verdict is settled, a job cut off
//! before its answer was delivered is refunded.

use sqlx::{AnyPool, Row};
use tessera_protocol::Address;

use crate::registry::Record;
use crate::Result;

const SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS hub_api_keys (key_hash TEXT PRIMARY KEY, agent TEXT NOT NULL, \
     valid_until BIGINT NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS hub_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_providers (address TEXT PRIMARY KEY, record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_jobs (job_key TEXT PRIMARY KEY, escrow_id BIGINT NOT NULL, agent TEXT NOT NULL, \
     provider TEXT, cost BIGINT NOT NULL, state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_job_verdicts (job_key TEXT PRIMARY KEY, agent TEXT NOT NULL, \
     provider TEXT NOT NULL, verdict TEXT NOT NULL, compensation BIGINT NOT NULL DEFAULT 0)",
];

/// How a job sampled for verification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobVerdict {
    /// Checked and passed: paid.
    Passed,
    /// Failed a confirmed check: refunded to the agent, the provider slashed.
    Failed,
    /// No verifier answered: settled unchecked.
    Unchecked,
}

impl JobVerdict {
    /// The verdict as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Unchecked => "unchecked",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Passed, Self::Failed, Self::Unchecked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// Where a sampled job stands with verification, as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStanding {
    /// Answered, its verdict not in yet.
    Pending {
        /// The paying agent.
        agent: Address,
        /// The serving provider.
        provider: Option<Address>,
    },
    /// Verified.
    Decided {
        /// The paying agent.
        agent: Address,
        /// The serving provider.
        provider: Address,
        /// How it ended.
        verdict: JobVerdict,
        /// Micro-units of the provider's slash paid to the agent (a failed job).
        compensation: u64,
    },
}

/// A job whose escrow a previous run left open.
#[derive(Debug, Clone)]
pub struct OpenJob {
    /// Idempotency-key prefix.
    pub key: String,
    /// The escrow.
    pub escrow_id: i64,
    /// `verifying`: answered, waiting for a verdict.
    pub state: String,
    /// The serving provider, once known.
    pub provider: Option<Address>,
    /// The cost to capture when `verifying`.
    pub cost: u64,
}

/// Handle on the hub's tables.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Opens the database (after the ledger created it) and the tables.
    pub async fn open(url: &str) -> Result<Self> {
        let (_, pool) = tessera_ledger::connect(url, 8).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// The connection pool (the task market keeps its tables beside these).
    pub fn pool(&self) -> sqlx::AnyPool {
        self.pool.clone()
    }

    /// This hub's identity: a random value made on first start and kept in the database, so
    /// that a restarted hub keeps its EIP-712 domain and two hubs never share one.
    pub async fn identity(&self) -> Result<String> {
        let fresh = hex::encode(rand::random::<[u8; 16]>());
        sqlx::query("INSERT INTO hub_meta (name, value) VALUES ('identity', $1) ON CONFLICT (name) DO NOTHING")
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        let id: String = sqlx::query_scalar("SELECT value FROM hub_meta WHERE name = 'identity'")
            .fetch_one(&self.pool)
            .await?;
        Ok(id)
    }

    /// Records an API key's owner and validity. A key once revoked stays revoked, and a key
    /// registered by one wallet cannot be taken over by another.
    pub async fn put_api_key(
        &self,
        key_hash: &[u8; 32],
        agent: Address,
        valid_until: u64,
    ) -> Result<bool> {
        let agent = format!("{agent:#x}");
        let done = sqlx::query("INSERT INTO hub_api_keys (key_hash, agent, valid_until, revoked) VALUES ($1, $2, $3, 0) \
             ON CONFLICT (key_hash) DO UPDATE SET valid_until = excluded.valid_until \
             WHERE hub_api_keys.agent = excluded.agent AND hub_api_keys.revoked = 0")
            .bind(hex::encode(key_hash))
            .bind(&agent)
            .bind(valid_until as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes an API key of `agent`; `false` if it has no such key.
    pub async fn revoke_api_key(&self, key_hash: &[u8; 32], agent: Address) -> Result<bool> {
        let done =
            sqlx::query("UPDATE hub_api_keys SET revoked = 1 WHERE key_hash = $1 AND agent = $2")
                .bind(hex::encode(key_hash))
                .bind(format!("{agent:#x}"))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The owner of an API key and when it expires, if registered and not revoked.
    pub async fn api_key(&self, key_hash: &[u8; 32]) -> Result<Option<(Address, u64)>> {
        let row = sqlx::query(
            "SELECT agent, valid_until FROM hub_api_keys WHERE key_hash = $1 AND revoked = 0",
        )
        .bind(hex::encode(key_hash))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|r| {
            let agent: String = r.get(0);
            let valid_until: i64 = r.get(1);
            Some((agent.parse().ok()?, valid_until.max(0) as u64))
        }))
    }

    /// Saves a provider's record.
    pub async fn put_record(&self, address: Address, record: &Record) -> Result<()> {
        let json = serde_json::to_string(record).unwrap_or_default();
        sqlx::query("INSERT INTO hub_providers (address, record) VALUES ($1, $2) ON CONFLICT (address) DO UPDATE SET record = excluded.record")
            .bind(format!("{address:#x}"))
            .bind(json)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every saved provider record.
    pub async fn records(&self) -> Result<Vec<(Address, Record)>> {
        let rows = sqlx::query("SELECT address, record FROM hub_providers")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let address: String = row.try_get(0).ok()?;
                let record: String = row.try_get(1).ok()?;
                Some((address.parse().ok()?, serde_json::from_str(&record).ok()?))
            })
            .collect())
    }

    /// Notes a job answered to its agent and waiting for its verdict. Jobs not being verified
    /// are not written here: an open escrow without a row is a job cut off before its answer.
    pub async fn job_verifying(
        &self,
        key: &str,
        escrow_id: i64,
        agent: Address,
        provider: Address,
        cost: u64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO hub_jobs (job_key, escrow_id, agent, provider, cost, state) VALUES ($1, $2, $3, $4, $5, 'verifying')")
            .bind(key)
            .bind(escrow_id)
            .bind(format!("{agent:#x}"))
            .bind(format!("{provider:#x}"))
            .bind(cost as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records how a verified job ended (once; a repeat keeps the first).
    pub async fn job_verdict(
        &self,
        key: &str,
        agent: Address,
        provider: Address,
        verdict: JobVerdict,
    ) -> Result<()> {
        sqlx::query("INSERT INTO hub_job_verdicts (job_key, agent, provider, verdict) VALUES ($1, $2, $3, $4) ON CONFLICT (job_key) DO NOTHING")
            .bind(key)
            .bind(format!("{agent:#x}"))
            .bind(format!("{provider:#x}"))
            .bind(verdict.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records what the agent of the failed job `key` received of its provider's slash.
    pub async fn job_compensated(&self, key: &str, amount: u64) -> Result<()> {
        sqlx::query("UPDATE hub_job_verdicts SET compensation = $2 WHERE job_key = $1")
            .bind(key)
            .bind(amount as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Where the sampled job `key` stands; `None` for a job never sampled (or unknown).
    pub async fn job_standing(&self, key: &str) -> Result<Option<JobStanding>> {
        let decided = sqlx::query(
            "SELECT agent, provider, verdict, compensation FROM hub_job_verdicts WHERE job_key = $1",
        )
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = decided {
            let (agent, provider, verdict): (String, String, String) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let compensation: i64 = row.try_get(3)?;
            if let (Ok(agent), Ok(provider), Some(verdict)) =
                (agent.parse(), provider.parse(), JobVerdict::parse(&verdict))
            {
                return Ok(Some(JobStanding::Decided {
                    agent,
                    provider,
                    verdict,
                    compensation: compensation.max(0) as u64,
                }));
            }
        }
        let open = sqlx::query("SELECT agent, provider FROM hub_jobs WHERE job_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(open.and_then(|row| {
            let agent: String = row.try_get(0).ok()?;
            let provider: Option<String> = row.try_get(1).ok()?;
            Some(JobStanding::Pending {
                agent: agent.parse().ok()?,
                provider: provider.and_then(|p| p.parse().ok()),
            })
        }))
    }

    /// Closes the pool: waits for the connections in use, then closes every one (on SQLite the
    /// last close checkpoints the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Forgets a job whose escrow is closed.
    pub async fn job_closed(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM hub_jobs WHERE job_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Jobs with an open escrow.
    pub async fn open_jobs(&self) -> Result<Vec<OpenJob>> {
        let rows = sqlx::query("SELECT job_key, escrow_id, state, provider, cost FROM hub_jobs")
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let provider: Option<String> = row.try_get(3)?;
            let cost: i64 = row.try_get(4)?;
            jobs.push(OpenJob {
                key: row.try_get(0)?,
                escrow_id: row.try_get(1)?,
                state: row.try_get(2)?,
                provider: provider.and_then(|p| p.parse().ok()),
                cost: cost.max(0) as u64,
            });
        }
        Ok(jobs)
    }
}
