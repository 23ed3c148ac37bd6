//! Tessera's books: accounts, a double-entry journal, escrow, stake with unbonding, slashing,
//! protocol fees and a development faucet, over SQLite (WAL, the embedded default) or
//! PostgreSQL with the same code.
//!
//! Money is integer micro-units. Every mutating operation takes an idempotency key and runs in
//! one database transaction that also writes its journal rows, which sum to zero; balances are
//! checked in SQL (`UPDATE … WHERE balance >= needed`) so concurrent operations cannot lose an
//! update or overdraw. [`Ledger::audit`] re-derives every balance from the journal.
#![deny(missing_docs)]

mod account;
mod audit;
mod batch;
mod bench;
mod error;
mod ops;
mod store;

pub use account::{AccountId, SystemAccount};
pub use audit::AuditReport;
pub use batch::SettleRequest;
pub use bench::{bench_settlements, BenchReport};
pub use error::{Error, Result};
pub use ops::{
    Capture, Escrow, Faucet, Hold, Release, Settlement, Slash, StakeEntry, StakeKind, Unbonding,
    CHAIN_DEPOSIT, CHAIN_WITHDRAWAL,
};
pub use store::{connect, Backend, BatchStats, Ledger, LedgerConfig, Receipt, SlashSplit};

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tessera_protocol::{Address, NonceStore};

use store::to_u64;

/// A committed journal transaction, looked up by idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRecord {
    /// The transaction's id.
    pub id: i64,
    /// The operation (`transfer`, `settle`, …).
    pub kind: String,
    /// The operation's result as JSON.
    pub result: String,
}

impl Ledger {
    /// An account's balance; [`Error::UnknownAccount`] if it never received money.
    pub async fn balance(&self, account: impl Into<AccountId>) -> Result<u64> {
        let key = account.into().key();
        let balance: Option<i64> = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
            .bind(&key)
            .fetch_optional(&self.pool)
            .await?;
        match balance {
            Some(balance) => to_u64(balance),
            None => Err(Error::UnknownAccount(key)),
        }
    }

    /// A provider's bonded stake (zero if it never staked).
    pub async fn staked(&self, provider: Address) -> Result<u64> {
        let staked: Option<i64> =
            sqlx::query_scalar("SELECT amount FROM stakes WHERE account = $1")
                .bind(AccountId::from(provider).key())
                .fetch_optional(&self.pool)
                .await?;
        to_u64(staked.unwrap_or(0))
    }

    /// An escrow by id.
    pub async fn escrow(&self, escrow_id: i64) -> Result<Escrow> {
        let mut conn = self.pool.acquire().await?;
        ops::escrow_row(&mut conn, escrow_id).await
    }

    /// Ids of every open escrow, oldest first: what a restarted hub must settle or refund.
    pub async fn open_escrows(&self) -> Result<Vec<i64>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM escrows WHERE is_open = 1 ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The transaction committed under an idempotency key, if any.
    pub async fn transaction(&self, key: &str) -> Result<Option<TransactionRecord>> {
        let row = sqlx::query("SELECT id, kind, result FROM transactions WHERE idem_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(TransactionRecord {
                id: row.try_get(0)?,
                kind: row.try_get(1)?,
                result: row.try_get(2)?,
            })
        })
        .transpose()
    }

    /// Marks a signed message's nonce used, atomically; `false` if it was used before.
    /// Nonces are stored as the bits of the `u64`, so the whole range is accepted.
    pub async fn consume_nonce(&self, signer: Address, scope: &str, nonce: u64) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO nonces (signer, scope, nonce) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(AccountId::from(signer).key())
        .bind(scope)
        .bind(nonce as i64)
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    /// [`Ledger::consume_nonce`] with a replay as [`Error::ReplayedNonce`].
    pub async fn use_nonce(&self, signer: Address, scope: &str, nonce: u64) -> Result<()> {
        if self.consume_nonce(signer, scope, nonce).await? {
            Ok(())
        } else {
            Err(Error::ReplayedNonce {
                signer: AccountId::from(signer).key(),
                scope: scope.to_owned(),
                nonce,
            })
        }
    }
}

impl NonceStore for Ledger {
    type Error = Error;

    async fn consume(&self, signer: Address, scope: &'static str, nonce: u64) -> Result<bool> {
        self.consume_nonce(signer, scope, nonce).await
    }
}
