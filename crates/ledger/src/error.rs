//! Ledger errors. Every business error leaves the books untouched: the operation's database
//! transaction is rolled back before the error is returned.

/// Everything a ledger operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The account would go below zero.
    #[error("insufficient funds in {account}: needs {needed}, has {available}")]
    InsufficientFunds {
        /// The account debited.
        account: String,
        /// The amount the operation needs available.
        needed: u64,
        /// The balance it has.
        available: u64,
    },
    /// The account has never received money.
    #[error("unknown account {0}")]
    UnknownAccount(String),
    /// No escrow with this id.
    #[error("unknown escrow {0}")]
    UnknownEscrow(i64),
    /// The escrow was already released.
    #[error("escrow {0} is closed")]
    EscrowClosed(i64),
    /// A capture larger than what the escrow (or a settlement's hold) still holds.
    #[error("escrow {escrow:?} holds {remaining}, cannot capture {requested}")]
    EscrowExceeded {
        /// The escrow (`None` for a one-shot [`crate::Ledger::settle`]).
        escrow: Option<i64>,
        /// What it still holds.
        remaining: u64,
        /// What was asked for.
        requested: u64,
    },
    /// Unstaking or slashing more than is staked.
    #[error("{account} has {staked} staked, needs {needed}")]
    InsufficientStake {
        /// The staker.
        account: String,
        /// Amount requested.
        needed: u64,
        /// Amount staked.
        staked: u64,
    },
    /// No unbonding of this account has matured yet.
    #[error("nothing to withdraw for {0}")]
    NothingToWithdraw(String),
    /// An amount or a sum of amounts does not fit in the ledger's signed 64-bit micro-units.
    #[error("amount overflow")]
    Overflow,
    /// Amounts must be positive.
    #[error("amount must be positive")]
    ZeroAmount,
    /// The operation may not move money on this account directly (issuance, escrow, stake and
    /// unbonding are backed by their own tables).
    #[error("account {0} cannot be used here")]
    RestrictedAccount(String),
    /// An account id that is neither a 0x address nor a known system account.
    #[error("invalid account id {0:?}")]
    InvalidAccount(String),
    /// A signed message's nonce was already consumed.
    #[error("replayed nonce {nonce} for {signer} ({scope})")]
    ReplayedNonce {
        /// The signer.
        signer: String,
        /// The message type the nonce is scoped to.
        scope: String,
        /// The nonce.
        nonce: u64,
    },
    /// The idempotency key was used before for a different operation or different arguments.
    #[error("idempotency key {key:?} was already used for another request")]
    IdempotencyConflict {
        /// The reused key.
        key: String,
    },
    /// A row changed under a concurrent operation; the operation is retried internally and this
    /// only surfaces if retries run out.
    #[error("concurrent update conflict")]
    Conflict,
    /// The ledger URL names neither SQLite nor PostgreSQL.
    #[error("unsupported database URL {0:?} (use sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// The stored data contradicts itself (a bug or tampering); found by a read, not by audit.
    #[error("ledger corrupt: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Transient database conflicts worth retrying the whole operation for: PostgreSQL
    /// serialization failures, deadlocks and a concurrent insert of the same idempotency key;
    /// SQLite busy/locked.
    pub(crate) fn is_retryable(&self) -> bool {
        let Error::Database(sqlx::Error::Database(db)) = self else {
            return matches!(self, Error::Conflict);
        };
        matches!(
            db.code().as_deref(),
            Some("40001" | "40P01" | "23505" | "5" | "6" | "261" | "517")
        )
    }
}
