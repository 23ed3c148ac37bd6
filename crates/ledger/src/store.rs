//! The ledger handle: connecting, migrating, and the one code path every mutating operation goes
//! through ([`Ledger::execute`]): idempotency lookup, the operation's own rows, balance updates
//! checked in the database, the journal, commit — all in one database transaction.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::{
    any::AnyPoolOptions,
    migrate::{Migration, MigrationType, Migrator},
    AnyConnection, AnyPool, AssertSqlSafe, Row, SqlSafeStr,
};

use crate::{AccountId, Error, Result, SystemAccount};

/// Which database the ledger runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// SQLite in WAL mode: the embedded default, one writer connection.
    Sqlite,
    /// PostgreSQL: for several hub replicas sharing one ledger.
    Postgres,
}

impl Backend {
    /// The backend a URL names: `sqlite:` or `postgres:`/`postgresql:`.
    pub fn from_url(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else {
            Err(Error::UnsupportedUrl(url.to_owned()))
        }
    }
}

/// How slashed stake is shared out, in basis points of the slashed amount. The treasury gets what
/// is left, including rounding and the share of a party that is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlashSplit {
    /// Share of the verifier that caught the fault.
    pub verifier_bps: u32,
    /// Share of the agent harmed by the faulty job, as compensation.
    pub agent_bps: u32,
}

impl Default for SlashSplit {
    fn default() -> Self {
        Self {
            verifier_bps: 2_000,
            agent_bps: 3_000,
        }
    }
}

/// Ledger settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// Enables the development faucet ([`Ledger::faucet`]). Never on in a deployment.
    pub dev_mode: bool,
    /// Protocol fee taken from every capture, in basis points.
    pub fee_bps: u32,
    /// Seconds unstaked money waits before it can be withdrawn.
    pub unbonding_secs: u64,
    /// How slashed stake is shared out.
    pub slash_split: SlashSplit,
    /// Group-commit concurrent [`Ledger::settle`] calls (see [`Ledger::settle_many`]).
    /// Off, every settlement is its own transaction.
    pub group_commit: bool,
    /// Pool size on PostgreSQL. SQLite always uses one connection: it has one writer anyway,
    /// and a single connection avoids `SQLITE_BUSY` entirely.
    pub max_connections: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            dev_mode: false,
            fee_bps: 500,
            unbonding_secs: 7 * 24 * 3600,
            slash_split: SlashSplit::default(),
            group_commit: true,
            max_connections: 16,
        }
    }
}

impl LedgerConfig {
    /// The default settings with the development faucet on.
    pub fn dev() -> Self {
        Self {
            dev_mode: true,
            ..Self::default()
        }
    }
}

/// What a committed (or replayed) operation returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt<T> {
    /// The journal transaction's id.
    pub tx_id: i64,
    /// True when this call found the idempotency key already committed and changed nothing.
    pub replayed: bool,
    /// The operation's result, identical on replay.
    pub value: T,
}

/// One journal row: `amount` micro-units into (positive) or out of (negative) `account`.
#[derive(Debug, Clone)]
pub(crate) struct Leg {
    pub account: String,
    pub amount: i64,
}

impl Leg {
    pub fn new(account: impl Into<String>, amount: i64) -> Self {
        Self {
            account: account.into(),
            amount,
        }
    }
}

pub(crate) type OpFuture<'c, T> = Pin<Box<dyn Future<Output = Result<(Vec<Leg>, T)>> + Send + 'c>>;

type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A handle on the books; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Ledger {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    pub(crate) config: Arc<LedgerConfig>,
    clock: Clock,
    /// Group-commit queue for [`Ledger::settle`] (see `batch.rs`).
    pub(crate) settler: Option<crate::batch::SettleQueue>,
    pub(crate) stats: Arc<BatchCounters>,
}

#[derive(Debug, Default)]
pub(crate) struct BatchCounters {
    pub batches: AtomicU64,
    pub fallbacks: AtomicU64,
}

/// Counters of the batched settlement path, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Batches committed whole.
    pub batches: u64,
    /// Batches the database refused, whose jobs then ran one by one.
    pub fallbacks: u64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .finish()
    }
}

fn migrator(backend: Backend) -> Migrator {
    let sql = match backend {
        Backend::Sqlite => include_str!("../migrations/sqlite/0001_ledger.sql"),
        Backend::Postgres => include_str!("../migrations/postgres/0001_ledger.sql"),
    };
    Migrator::with_migrations(vec![Migration::new(
        1,
        "ledger".into(),
        MigrationType::Simple,
        sql.into_sql_str(),
        false,
    )])
}

/// Connects to `sqlite://PATH` (created if missing; one long-lived connection in WAL mode) or
/// `postgres://…` (a pool of `max_connections`). The ledger and the hub's own tables share this,
/// so both open the same database the same way.
pub async fn connect(url: &str, max_connections: u32) -> Result<(Backend, AnyPool)> {
    sqlx::any::install_default_drivers();
    let backend = Backend::from_url(url)?;
    let pool = match backend {
        Backend::Sqlite => {
            let url = if url.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL + synchronous=NORMAL: a commit survives a process crash (the
                        // case we test); only an OS crash may lose the last commits.
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await?
        }
        Backend::Postgres => {
            AnyPoolOptions::new()
                .max_connections(max_connections.max(1))
                .connect(url)
                .await?
        }
    };
    Ok((backend, pool))
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `url` — `sqlite://PATH` or `postgres://…` — and
    /// runs its migrations.
    pub async fn open(url: &str, config: LedgerConfig) -> Result<Self> {
        let (backend, pool) = connect(url, config.max_connections).await?;
        migrator(backend).run(&pool).await?;
        tracing::info!(?backend, dev_mode = config.dev_mode, "ledger open");
        let group_commit = config.group_commit;
        let mut ledger = Self {
            pool,
            backend,
            config: Arc::new(config),
            clock: Arc::new(unix_now),
            settler: None,
            stats: Arc::default(),
        };
        if group_commit {
            // Batching concurrent settlements into one transaction is what lifts throughput:
            // per-statement round trips dominate on SQLite (one writer), commit flushes on
            // PostgreSQL. Other replicas writing the same rows stay safe: the batch's guarded
            // updates refuse stale decisions and the batch falls back to one-by-one.
            ledger.settler = Some(crate::batch::spawn_settler(ledger.clone()));
        }
        Ok(ledger)
    }

    /// Replaces the clock (unix seconds) that unbonding uses; for tests and simulations.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        if self.settler.is_some() {
            // The writer task must see the same clock.
            let mut plain = self.clone();
            plain.settler = None;
            self.settler = Some(crate::batch::spawn_settler(plain));
        }
        self
    }

    /// How often batched settlement committed whole or fell back to one-by-one.
    pub fn batch_stats(&self) -> BatchStats {
        BatchStats {
            batches: self.stats.batches.load(Ordering::Relaxed),
            fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// The database this ledger runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The ledger's settings.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Closes the connection pool, waiting for connections in use.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Runs one mutating operation exactly once per idempotency `key`.
    ///
    /// `request` fingerprints the arguments: a retry with the same key and request returns the
    /// stored receipt; the same key with another request is [`Error::IdempotencyConflict`].
    /// Transient conflicts (deadlock, serialization failure, a concurrent commit of the same
    /// key) roll back and run the whole operation again.
    pub(crate) async fn execute<T, F>(
        &self,
        key: &str,
        kind: &'static str,
        request: String,
        op: F,
    ) -> Result<Receipt<T>>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> Fn(&'c mut AnyConnection) -> OpFuture<'c, T>,
    {
        let mut attempt = 0u32;
        loop {
            match self.try_execute(key, kind, &request, &op).await {
                Err(e) if e.is_retryable() && attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(key, kind, attempt, error = %e, "retrying operation");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)))).await;
                }
                result => return result,
            }
        }
    }

    async fn try_execute<T, F>(
        &self,
        key: &str,
        kind: &'static str,
        request: &str,
        op: &F,
    ) -> Result<Receipt<T>>
    where
        T: Serialize + DeserializeOwned + Send,
        F: for<'c> Fn(&'c mut AnyConnection) -> OpFuture<'c, T>,
    {
        let mut tx = self.pool.begin().await?;
        let existing =
            sqlx::query("SELECT id, kind, request, result FROM transactions WHERE idem_key = $1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(row) = existing {
            tx.rollback().await?;
            let (id, old_kind, old_request, result): (i64, String, String, String) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            if old_kind != kind || old_request != request {
                return Err(Error::IdempotencyConflict {
                    key: key.to_owned(),
                });
            }
            let value = serde_json::from_str(&result)
                .map_err(|e| Error::Corrupt(format!("stored result of {key:?}: {e}")))?;
            return Ok(Receipt {
                tx_id: id,
                replayed: true,
                value,
            });
        }

        let (legs, value) = op(&mut tx).await?;
        apply_legs(&mut tx, &legs).await?;
        let result = serde_json::to_string(&value)
            .map_err(|e| Error::Corrupt(format!("result of {key:?} not serialisable: {e}")))?;
        let tx_id: i64 = sqlx::query_scalar(
            "INSERT INTO transactions (idem_key, kind, request, result, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(key)
        .bind(kind)
        .bind(request)
        .bind(result)
        .bind(to_i64(self.now())?)
        .fetch_one(&mut *tx)
        .await?;
        insert_entries(&mut tx, tx_id, &legs).await?;
        tx.commit().await?;
        tracing::debug!(key, kind, tx_id, "committed");
        Ok(Receipt {
            tx_id,
            replayed: false,
            value,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A positive amount in the database's signed 64-bit micro-units.
pub(crate) fn micro(amount: u64) -> Result<i64> {
    if amount == 0 {
        return Err(Error::ZeroAmount);
    }
    to_i64(amount)
}

pub(crate) fn to_i64(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Overflow)
}

pub(crate) fn to_u64(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Corrupt(format!("negative amount {value}")))
}

/// Updates balances for `legs`, checking in the database that no account goes negative at any
/// point of the sequence and that nothing overflows. Accounts are updated in id order so that
/// concurrent PostgreSQL transactions lock rows in the same order and cannot deadlock.
async fn apply_legs(conn: &mut AnyConnection, legs: &[Leg]) -> Result<()> {
    let sum = legs
        .iter()
        .try_fold(0i64, |acc, leg| acc.checked_add(leg.amount))
        .ok_or(Error::Overflow)?;
    if sum != 0 {
        return Err(Error::Corrupt(format!(
            "unbalanced journal transaction: {legs:?}"
        )));
    }
    // Per account: net change, and the lowest running total (how much must be there up front).
    let mut accounts: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for leg in legs {
        let (net, low) = accounts.entry(&leg.account).or_insert((0, 0));
        *net = net.checked_add(leg.amount).ok_or(Error::Overflow)?;
        *low = (*low).min(*net);
    }
    for (account, (net, low)) in accounts {
        if account == SystemAccount::Issuance.id() {
            // Bounded by the supply counters, which the mint and burn operations check.
            sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
                .bind(net)
                .bind(account)
                .execute(&mut *conn)
                .await?;
            continue;
        }
        let needed = -low;
        if needed > 0 {
            let ceiling = i64::MAX - net.max(0);
            let updated: Option<i64> = sqlx::query_scalar(
                "UPDATE accounts SET balance = balance + $1 \
                 WHERE id = $2 AND balance >= $3 AND balance <= $4 RETURNING balance",
            )
            .bind(net)
            .bind(account)
            .bind(needed)
            .bind(ceiling)
            .fetch_optional(&mut *conn)
            .await?;
            if updated.is_none() {
                let balance: Option<i64> =
                    sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
                        .bind(account)
                        .fetch_optional(&mut *conn)
                        .await?;
                return Err(match balance {
                    None => Error::UnknownAccount(account.to_owned()),
                    Some(balance) if balance < needed => Error::InsufficientFunds {
                        account: account.to_owned(),
                        needed: to_u64(needed)?,
                        available: to_u64(balance)?,
                    },
                    Some(_) => Error::Overflow,
                });
            }
        } else if net > 0 {
            let updated: Option<i64> = sqlx::query_scalar(
                "INSERT INTO accounts (id, balance) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + excluded.balance \
                 WHERE accounts.balance <= $3 RETURNING balance",
            )
            .bind(account)
            .bind(net)
            .bind(i64::MAX - net)
            .fetch_optional(&mut *conn)
            .await?;
            if updated.is_none() {
                return Err(Error::Overflow);
            }
        }
    }
    Ok(())
}

async fn insert_entries(conn: &mut AnyConnection, tx_id: i64, legs: &[Leg]) -> Result<()> {
    let mut sql = String::from("INSERT INTO entries (tx_id, seq, account, amount) VALUES ");
    for i in 0..legs.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        let p = 3 * i + 2;
        sql.push_str(&format!("($1, ${}, ${}, ${})", p, p + 1, p + 2));
    }
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(tx_id);
    for (seq, leg) in legs.iter().enumerate() {
        query = query
            .bind(seq as i64)
            .bind(leg.account.clone())
            .bind(leg.amount);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// An account that operations may debit or credit freely (not backed by its own table).
pub(crate) fn free_account(account: AccountId) -> Result<String> {
    match account {
        AccountId::Wallet(_) | AccountId::System(SystemAccount::Treasury | SystemAccount::Fees) => {
            Ok(account.key())
        }
        AccountId::System(_) => Err(Error::RestrictedAccount(account.key())),
    }
}
