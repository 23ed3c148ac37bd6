//! The audit: re-derives the books from the journal and checks every invariant, in one
//! consistent snapshot.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Backend, Ledger, Result, SystemAccount};

/// What [`Ledger::audit`] found. The books are sound when [`AuditReport::is_clean`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Journal transactions.
    pub transactions: u64,
    /// Journal rows.
    pub entries: u64,
    /// Accounts, system accounts included.
    pub accounts: u64,
    /// Micro-units ever minted.
    pub minted: i64,
    /// Micro-units ever burned.
    pub burned: i64,
    /// Sum of every balance except the issuance account: the money in existence.
    pub supply: i64,
    /// Transactions whose rows do not sum to zero, with their sum.
    pub unbalanced_transactions: Vec<(i64, i64)>,
    /// Accounts whose stored balance differs from the sum of their journal rows:
    /// (account, stored, journal).
    pub balance_mismatches: Vec<(String, i64, i64)>,
    /// Accounts below zero (other than issuance).
    pub negative_balances: Vec<(String, i64)>,
    /// Sub-ledgers that disagree with their system account: (what, account balance, table sum).
    pub subledger_mismatches: Vec<(String, i64, i64)>,
}

impl AuditReport {
    /// True when every invariant holds.
    pub fn is_clean(&self) -> bool {
        self.problems().is_empty()
    }

    /// Each broken invariant, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (tx, sum) in &self.unbalanced_transactions {
            problems.push(format!("transaction {tx} sums to {sum}, not zero"));
        }
        for (account, stored, journal) in &self.balance_mismatches {
            problems.push(format!(
                "{account}: balance {stored} but journal sums to {journal}"
            ));
        }
        for (account, balance) in &self.negative_balances {
            problems.push(format!("{account}: negative balance {balance}"));
        }
        for (what, account, table) in &self.subledger_mismatches {
            problems.push(format!(
                "{what}: account holds {account} but its table sums to {table}"
            ));
        }
        if Some(self.supply) != self.minted.checked_sub(self.burned) {
            problems.push(format!(
                "supply {} != minted {} - burned {}",
                self.supply, self.minted, self.burned
            ));
        }
        problems
    }
}

impl Ledger {
    /// Proves the books: every transaction sums to zero, every balance equals its journal sum,
    /// nothing is negative, escrow/stake/unbonding accounts equal their tables, and the money in
    /// existence equals minted minus burned. Runs in one snapshot, so it is exact under load.
    pub async fn audit(&self) -> Result<AuditReport> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let mut report = AuditReport::default();
        let counts = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM transactions), (SELECT COUNT(*) FROM entries), \
             (SELECT COUNT(*) FROM accounts)",
        )
        .fetch_one(&mut *tx)
        .await?;
        report.transactions = counts.try_get::<i64, _>(0)? as u64;
        report.entries = counts.try_get::<i64, _>(1)? as u64;
        report.accounts = counts.try_get::<i64, _>(2)? as u64;

        for row in sqlx::query(
            "SELECT tx_id, CAST(SUM(amount) AS BIGINT) FROM entries GROUP BY tx_id \
             HAVING SUM(amount) <> 0 ORDER BY tx_id",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            report
                .unbalanced_transactions
                .push((row.try_get(0)?, row.try_get(1)?));
        }
        // Entries may only name existing accounts (a foreign key); a FULL view of both sides
        // still catches a journal row for an account whose row was deleted.
        for row in sqlx::query(
            "SELECT a.id, a.balance, CAST(COALESCE(j.total, 0) AS BIGINT) FROM accounts a \
             LEFT JOIN (SELECT account, SUM(amount) AS total FROM entries GROUP BY account) j \
             ON j.account = a.id WHERE a.balance <> COALESCE(j.total, 0) ORDER BY a.id",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            report
                .balance_mismatches
                .push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
        }
        for row in sqlx::query(
            "SELECT e.account, CAST(SUM(e.amount) AS BIGINT) FROM entries e \
             WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = e.account) GROUP BY e.account",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            let sum: i64 = row.try_get(1)?;
            report.balance_mismatches.push((row.try_get(0)?, 0, sum));
        }
        for row in sqlx::query(
            "SELECT id, balance FROM accounts WHERE balance < 0 AND id <> $1 ORDER BY id",
        )
        .bind(SystemAccount::Issuance.id())
        .fetch_all(&mut *tx)
        .await?
        {
            report
                .negative_balances
                .push((row.try_get(0)?, row.try_get(1)?));
        }
        let supply = sqlx::query("SELECT minted, burned FROM supply WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        report.minted = supply.try_get(0)?;
        report.burned = supply.try_get(1)?;
        report.supply = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM accounts WHERE id <> $1",
        )
        .bind(SystemAccount::Issuance.id())
        .fetch_one(&mut *tx)
        .await?;

        let subledgers: [(&str, SystemAccount, &str); 4] = [
            (
                "escrow",
                SystemAccount::Escrow,
                "SELECT CAST(COALESCE(SUM(held - captured - released), 0) AS BIGINT) FROM escrows",
            ),
            ("stake", SystemAccount::Stake, "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM stakes"),
            (
                "unbonding",
                SystemAccount::Unbonding,
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM unbondings WHERE withdrawn = 0",
            ),
            (
                "issuance",
                SystemAccount::Issuance,
                "SELECT CAST(burned - minted AS BIGINT) FROM supply WHERE id = 1",
            ),
        ];
        for (what, account, sql) in subledgers {
            let table: i64 = sqlx::query_scalar(sql).fetch_one(&mut *tx).await?;
            let balance: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
                .bind(account.id())
                .fetch_one(&mut *tx)
                .await?;
            if table != balance {
                report
                    .subledger_mismatches
                    .push((what.to_owned(), balance, table));
            }
        }
        tx.rollback().await?;
        if !report.is_clean() {
            tracing::warn!(problems = ?report.problems(), "ledger audit failed");
        }
        Ok(report)
    }
}
