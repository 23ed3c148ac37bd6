//! Batched settlement: many [`Ledger::settle`] calls in one database transaction, with a handful
//! of statements per batch instead of per job.
//!
//! Decisions (replay, unknown payer, insufficient funds) are made in Rust against balances read
//! inside the batch's transaction; the database still enforces them (`CHECK (balance >= 0)` and
//! guarded upserts). If the database disagrees, or anything else goes wrong, the batch is rolled
//! back and every job runs alone through the ordinary path, so a batch never decides a result the
//! single path would not.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::Ordering,
};

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row};
use tessera_protocol::Address;
use tokio::sync::{mpsc, oneshot};

use crate::{
    store::{to_i64, to_u64, Leg},
    Error, Ledger, Receipt, Result, Settlement,
};

/// Largest batch: bounds statement size (parameters) and the latency of one commit.
const MAX_BATCH: usize = 128;

/// One job to settle: see [`Ledger::settle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleRequest {
    /// Idempotency key.
    pub key: String,
    /// Who pays (must have `max_cost` available).
    pub payer: Address,
    /// Who is paid for `used`, less the protocol fee.
    pub payee: Address,
    /// What is held.
    pub max_cost: u64,
    /// What is captured; the rest goes back to the payer.
    pub used: u64,
}

/// A settlement with its arguments checked and its journal rows worked out.
#[derive(Debug, Clone)]
pub(crate) struct PreparedSettle {
    pub key: String,
    pub request: String,
    pub payer: String,
    pub max: i64,
    pub legs: Vec<Leg>,
    pub value: Settlement,
}

type Job = (PreparedSettle, oneshot::Sender<Result<Receipt<Settlement>>>);
pub(crate) type SettleQueue = mpsc::Sender<Job>;

/// Starts the writer task that group-commits queued settlements. It ends when every sender
/// (every clone of the owning [`Ledger`]) is dropped; `ledger` itself carries no sender.
pub(crate) fn spawn_settler(ledger: Ledger) -> SettleQueue {
    let (queue, mut jobs) = mpsc::channel::<Job>(4 * MAX_BATCH);
    tokio::spawn(async move {
        while let Some(first) = jobs.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let (prepared, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let results = ledger.settle_prepared_many(&prepared).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
    });
    queue
}

/// What the batch decided for one job.
enum Slot {
    Done(Result<Receipt<Settlement>>),
    /// Committed by this batch: index into the fresh jobs.
    Fresh(usize),
    /// Same key and request as an earlier job of this batch.
    SameAs(usize),
}

impl Ledger {
    /// Settles many jobs, in batches of one transaction each; results in request order.
    /// Each job behaves exactly as [`Ledger::settle`] would alone.
    pub async fn settle_many(
        &self,
        requests: &[SettleRequest],
    ) -> Vec<Result<Receipt<Settlement>>> {
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(MAX_BATCH) {
            let mut prepared = Vec::with_capacity(chunk.len());
            let mut slots: Vec<Option<Result<Receipt<Settlement>>>> =
                Vec::with_capacity(chunk.len());
            for r in chunk {
                match self.prepare_settle(r) {
                    Ok(p) => {
                        prepared.push(p);
                        slots.push(None);
                    }
                    Err(e) => slots.push(Some(Err(e))),
                }
            }
            let mut results = self.settle_prepared_many(&prepared).await.into_iter();
            for slot in slots {
                out.push(match slot {
                    Some(err) => err,
                    None => results.next().expect("one result per prepared job"),
                });
            }
        }
        out
    }

    pub(crate) async fn settle_prepared_many(
        &self,
        jobs: &[PreparedSettle],
    ) -> Vec<Result<Receipt<Settlement>>> {
        if jobs.is_empty() {
            return Vec::new();
        }
        let mut attempt = 0;
        loop {
            match self.try_batch(jobs).await {
                Ok(results) => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    return results;
                }
                Err(e) if e.is_retryable() && attempt < 10 => attempt += 1,
                Err(e) => {
                    self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, jobs = jobs.len(), "batch fell back to single settlements");
                    let mut out = Vec::with_capacity(jobs.len());
                    for job in jobs {
                        out.push(self.settle_prepared(job).await);
                    }
                    return out;
                }
            }
        }
    }

    async fn try_batch(&self, jobs: &[PreparedSettle]) -> Result<Vec<Result<Receipt<Settlement>>>> {
        let mut tx = self.pool.begin().await?;

        // Keys committed before.
        let mut existing: HashMap<String, (i64, String, String, String)> = HashMap::new();
        let sql = format!(
            "SELECT idem_key, id, kind, request, result FROM transactions WHERE idem_key IN ({})",
            placeholders(1, jobs.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for job in jobs {
            query = query.bind(job.key.clone());
        }
        for row in query.fetch_all(&mut *tx).await? {
            existing.insert(
                row.try_get(0)?,
                (
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                    row.try_get(4)?,
                ),
            );
        }

        // Balances of every account the jobs touch, kept up to date as the batch is decided in
        // order: a payee credited by an earlier job may pay in a later one, as it could alone.
        let mut payers: Vec<&str> = jobs
            .iter()
            .flat_map(|j| j.legs.iter().map(|leg| leg.account.as_str()))
            .collect();
        payers.sort_unstable();
        payers.dedup();
        let sql = format!(
            "SELECT id, balance FROM accounts WHERE id IN ({})",
            placeholders(1, payers.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for payer in &payers {
            query = query.bind(payer.to_string());
        }
        let mut available: HashMap<String, i64> = HashMap::new();
        for row in query.fetch_all(&mut *tx).await? {
            available.insert(row.try_get(0)?, row.try_get(1)?);
        }

        let mut slots = Vec::with_capacity(jobs.len());
        let mut fresh: Vec<&PreparedSettle> = Vec::new();
        let mut seen: HashMap<&str, (usize, &str)> = HashMap::new();
        for job in jobs {
            if let Some((id, kind, request, result)) = existing.get(&job.key) {
                slots.push(Slot::Done(if kind != "settle" || *request != job.request {
                    Err(Error::IdempotencyConflict {
                        key: job.key.clone(),
                    })
                } else {
                    serde_json::from_str(result)
                        .map(|value| Receipt {
                            tx_id: *id,
                            replayed: true,
                            value,
                        })
                        .map_err(|e| Error::Corrupt(format!("stored result of {:?}: {e}", job.key)))
                }));
                continue;
            }
            if let Some((first, request)) = seen.get(job.key.as_str()) {
                slots.push(if *request == job.request {
                    Slot::SameAs(*first)
                } else {
                    Slot::Done(Err(Error::IdempotencyConflict {
                        key: job.key.clone(),
                    }))
                });
                continue;
            }
            let Some(balance) = available.get(&job.payer).copied() else {
                slots.push(Slot::Done(Err(Error::UnknownAccount(job.payer.clone()))));
                continue;
            };
            if balance < job.max {
                slots.push(Slot::Done(Err(Error::InsufficientFunds {
                    account: job.payer.clone(),
                    needed: to_u64(job.max)?,
                    available: to_u64(balance)?,
                })));
                continue;
            }
            for leg in &job.legs {
                let b = available.entry(leg.account.clone()).or_insert(0);
                *b = b.checked_add(leg.amount).ok_or(Error::Overflow)?;
            }
            seen.insert(&job.key, (fresh.len(), &job.request));
            slots.push(Slot::Fresh(fresh.len()));
            fresh.push(job);
        }

        let mut ids: HashMap<String, i64> = HashMap::new();
        if !fresh.is_empty() {
            // Net change per account, applied in one guarded upsert (in id order, for locks).
            let mut net: BTreeMap<&str, i64> = BTreeMap::new();
            for leg in fresh.iter().flat_map(|job| &job.legs) {
                let n = net.entry(&leg.account).or_insert(0);
                *n = n.checked_add(leg.amount).ok_or(Error::Overflow)?;
            }
            // Debits: one UPDATE guarded per row. (Not an upsert: SQLite checks the candidate
            // row's CHECK constraint before resolving the conflict.)
            let debits: Vec<(&str, i64)> = net
                .iter()
                .filter(|(_, n)| **n < 0)
                .map(|(a, n)| (*a, *n))
                .collect();
            if !debits.is_empty() {
                let cases: String = (0..debits.len())
                    .map(|i| format!(" WHEN ${} THEN ${}", 2 * i + 1, 2 * i + 2))
                    .collect();
                let ids = (0..debits.len())
                    .map(|i| format!("${}", 2 * i + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "UPDATE accounts SET balance = balance + (CASE id{cases} END) \
                     WHERE id IN ({ids}) AND balance + (CASE id{cases} END) >= 0 RETURNING id"
                );
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for (account, n) in &debits {
                    query = query.bind(account.to_string()).bind(*n);
                }
                if query.fetch_all(&mut *tx).await?.len() != debits.len() {
                    return Err(Error::Corrupt("batch debit guard refused an update".into()));
                }
            }
            // Credits: one upsert (payees may be new accounts), guarded against overflow.
            let credits: Vec<(&str, i64)> = net
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(a, n)| (*a, *n))
                .collect();
            if !credits.is_empty() {
                let sql = format!(
                    "INSERT INTO accounts (id, balance) VALUES {} ON CONFLICT (id) DO UPDATE \
                     SET balance = accounts.balance + excluded.balance \
                     WHERE accounts.balance <= {} - excluded.balance RETURNING id",
                    tuples(1, credits.len(), 2),
                    i64::MAX
                );
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for (account, n) in &credits {
                    query = query.bind(account.to_string()).bind(*n);
                }
                if query.fetch_all(&mut *tx).await?.len() != credits.len() {
                    return Err(Error::Corrupt(
                        "batch credit guard refused an update".into(),
                    ));
                }
            }

            let now = to_i64(self.now())?;
            let sql = format!(
                "INSERT INTO transactions (idem_key, kind, request, result, created_at) VALUES {} \
                 RETURNING id, idem_key",
                tuples(1, fresh.len(), 5)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for job in &fresh {
                let result = serde_json::to_string(&job.value)
                    .map_err(|e| Error::Corrupt(format!("result not serialisable: {e}")))?;
                query = query
                    .bind(job.key.clone())
                    .bind("settle")
                    .bind(job.request.clone())
                    .bind(result)
                    .bind(now);
            }
            for row in query.fetch_all(&mut *tx).await? {
                ids.insert(row.try_get(1)?, row.try_get(0)?);
            }

            let rows: Vec<(i64, i64, &Leg)> = fresh
                .iter()
                .flat_map(|job| {
                    let id = ids.get(&job.key).copied().unwrap_or(-1);
                    job.legs
                        .iter()
                        .enumerate()
                        .map(move |(seq, leg)| (id, seq as i64, leg))
                })
                .collect();
            if rows.iter().any(|(id, _, _)| *id < 0) {
                return Err(Error::Corrupt("batch insert returned fewer ids".into()));
            }
            let sql = format!(
                "INSERT INTO entries (tx_id, seq, account, amount) VALUES {}",
                tuples(1, rows.len(), 4)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (id, seq, leg) in rows {
                query = query
                    .bind(id)
                    .bind(seq)
                    .bind(leg.account.clone())
                    .bind(leg.amount);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;

        let receipts: Vec<Receipt<Settlement>> = fresh
            .iter()
            .map(|job| Receipt {
                tx_id: ids[&job.key],
                replayed: false,
                value: job.value,
            })
            .collect();
        Ok(slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Done(result) => result,
                Slot::Fresh(i) => Ok(receipts[i].clone()),
                Slot::SameAs(i) => Ok(Receipt {
                    replayed: true,
                    ..receipts[i].clone()
                }),
            })
            .collect())
    }
}

/// `$first, $first+1, …` for `n` parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `n` tuples of `width` parameters each, numbered from `first`.
fn tuples(first: usize, n: usize, width: usize) -> String {
    (0..n)
        .map(|row| format!("({})", placeholders(first + row * width, width)))
        .collect::<Vec<_>>()
        .join(", ")
}
