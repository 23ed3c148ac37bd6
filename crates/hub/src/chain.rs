//! The hub's side of the chain: settings, the deposit watcher and withdrawals.
//!
//! - **Deposits**: the watcher polls the vault's `Deposited` events and credits each once its
//!   block has `--confirmations` blocks on top, under the idempotency key naming the deposit
//!   (transaction hash and log index). The last block scanned is kept in the database so a
//!   restart resumes there; a deposit seen again (a restart between credit and cursor update,
//!   a replica) is a replayed ledger transaction and credits nothing.
//! - **Withdrawals**: a signed [`WithdrawalOrder`] is recorded as pending, debited from the
//!   ledger (idempotency key from signer and nonce), then paid by the hub's operator key through
//!   the vault's `withdraw(id, to, amount)`, which pays each id once. A restart pays every
//!   debited withdrawal not yet marked paid; one whose debit never committed is dropped.
//!   Re-orgs deeper than the confirmations are not handled (a deposit credited then re-orged
//!   away stays credited): choose the confirmations for the network.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyPool, Row};
use tessera_chain::{Chain, Contracts};
use tessera_protocol::{Address, Signed, WithdrawalOrder, B256};

use crate::{Error, Hub, Result};

/// `--rpc` and friends: the chain that holds the vault. Without `--rpc` the hub has no chain
/// (money only from the dev faucet).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChainConfig {
    /// JSON-RPC URL of the EVM chain holding the vault (`http://127.0.0.1:8545` for anvil).
    #[arg(long = "rpc", env = "TESSERA_HUB_RPC", value_name = "URL")]
    pub rpc: Option<String>,
    /// The vault contract's address.
    #[arg(long, env = "TESSERA_HUB_VAULT", requires = "rpc")]
    pub vault: Option<Address>,
    /// The stablecoin contract's address.
    #[arg(long, env = "TESSERA_HUB_TOKEN", requires = "rpc")]
    pub token: Option<Address>,
    /// Blocks that must sit on top of a deposit's block before it is credited.
    #[arg(long, env = "TESSERA_HUB_CONFIRMATIONS", default_value_t = 2)]
    pub confirmations: u64,
    /// File holding the hex private key of the vault's operator, which pays withdrawals.
    #[arg(long, env = "TESSERA_HUB_OPERATOR_KEY_FILE", requires = "rpc")]
    pub operator_key_file: Option<PathBuf>,
    /// First block to scan for deposits (the vault's deployment block).
    #[arg(long, env = "TESSERA_HUB_START_BLOCK", default_value_t = 0)]
    pub start_block: u64,
    /// Milliseconds between polls of the chain.
    #[arg(long, env = "TESSERA_HUB_CHAIN_POLL_MS", default_value_t = 1000)]
    pub chain_poll_ms: u64,
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS hub_chain_cursor (vault TEXT PRIMARY KEY, scanned BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_withdrawals (id TEXT PRIMARY KEY, account TEXT NOT NULL, \
     recipient TEXT NOT NULL, amount BIGINT NOT NULL, ledger_key TEXT NOT NULL, state TEXT NOT NULL, \
     tx_hash TEXT)",
];

/// Where a withdrawal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawalState {
    /// Recorded; the debit may or may not have committed.
    Pending,
    /// Paid on-chain.
    Paid,
}

/// A withdrawal as answered to its owner.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Withdrawal {
    /// The id the vault pays it under.
    pub id: B256,
    /// The account debited.
    pub account: Address,
    /// The on-chain recipient.
    pub to: Address,
    /// Micro-units.
    pub amount: u64,
    /// Where it stands.
    pub state: WithdrawalState,
    /// The paying transaction, once known (`None` when a retry found it paid before).
    pub tx_hash: Option<B256>,
}

/// The hub's connection to its chain.
pub struct ChainLink {
    /// The chain, with the operator key when one is configured.
    pub chain: Chain,
    confirmations: u64,
    start_block: u64,
    poll: Duration,
    pool: AnyPool,
    paying: tokio::sync::Mutex<()>,
    /// What x402 payments must be (the token's EIP-712 domain, the vault as payee); `None`
    /// without an operator key, which settles them.
    pub offer: Option<tessera_chain::x402::Offer>,
}

impl ChainLink {
    /// Connects when `--rpc` is set; `None` otherwise.
    pub async fn open(config: &ChainConfig, db: &str) -> Result<Option<Self>> {
        let Some(rpc) = &config.rpc else {
            return Ok(None);
        };
        let (Some(vault), Some(token)) = (config.vault, config.token) else {
            return Err(Error::Config("--rpc needs --vault and --token".into()));
        };
        let signer = match &config.operator_key_file {
            Some(path) => Some(tessera_chain::read_key_file(path).map_err(chain_config_error)?),
            None => None,
        };
        let chain = Chain::connect(rpc, Contracts { token, vault }, signer)
            .await
            .map_err(chain_config_error)?;
        let offer = match chain.sender() {
            Some(_) => Some(
                tessera_chain::x402::Offer::for_chain(&chain)
                    .await
                    .map_err(chain_config_error)?,
            ),
            None => None,
        };
        let (_, pool) = tessera_ledger::connect(db, 4).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        tracing::info!(%rpc, %vault, %token, confirmations = config.confirmations, operator = ?chain.sender(), "chain configured");
        Ok(Some(Self {
            chain,
            confirmations: config.confirmations,
            start_block: config.start_block,
            poll: Duration::from_millis(config.chain_poll_ms.max(10)),
            pool,
            paying: tokio::sync::Mutex::new(()),
            offer,
        }))
    }

    async fn scanned(&self) -> Result<Option<u64>> {
        let scanned: Option<i64> =
            sqlx::query_scalar("SELECT scanned FROM hub_chain_cursor WHERE vault = $1")
                .bind(format!("{:#x}", self.chain.contracts().vault))
                .fetch_optional(&self.pool)
                .await?;
        Ok(scanned.map(|b| b.max(0) as u64))
    }

    async fn set_scanned(&self, block: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO hub_chain_cursor (vault, scanned) VALUES ($1, $2) \
             ON CONFLICT (vault) DO UPDATE SET scanned = excluded.scanned",
        )
        .bind(format!("{:#x}", self.chain.contracts().vault))
        .bind(block as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a new pending withdrawal; `false` if its id is recorded already.
    async fn insert_withdrawal(&self, w: &Withdrawal, ledger_key: &str) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO hub_withdrawals (id, account, recipient, amount, ledger_key, state) \
             VALUES ($1, $2, $3, $4, $5, 'pending') ON CONFLICT (id) DO NOTHING",
        )
        .bind(format!("{:#x}", w.id))
        .bind(format!("{:#x}", w.account))
        .bind(format!("{:#x}", w.to))
        .bind(w.amount as i64)
        .bind(ledger_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_paid(&self, w: &Withdrawal) -> Result<()> {
        sqlx::query("UPDATE hub_withdrawals SET state = 'paid', tx_hash = COALESCE($2, tx_hash) WHERE id = $1")
            .bind(format!("{:#x}", w.id))
            .bind(w.tx_hash.map(|h| format!("{h:#x}")))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_pending(&self, id: B256) -> Result<()> {
        sqlx::query("DELETE FROM hub_withdrawals WHERE id = $1 AND state = 'pending'")
            .bind(format!("{id:#x}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Withdrawals with their ledger keys: one by id, or every pending one.
    async fn withdrawals(&self, id: Option<B256>) -> Result<Vec<(Withdrawal, String)>> {
        let rows = sqlx::query(
            "SELECT id, account, recipient, amount, ledger_key, state, tx_hash FROM hub_withdrawals \
             WHERE id = $1 OR ($1 = '' AND state = 'pending') ORDER BY id",
        )
        .bind(id.map(|id| format!("{id:#x}")).unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        let corrupt = |what: &str| Error::Config(format!("hub_withdrawals: bad {what}"));
        rows.into_iter()
            .map(|row| {
                let text = |i: usize| -> Result<String> { Ok(row.try_get::<String, _>(i)?) };
                let tx_hash: Option<String> = row.try_get(6)?;
                let withdrawal = Withdrawal {
                    id: text(0)?.parse().map_err(|_| corrupt("id"))?,
                    account: text(1)?.parse().map_err(|_| corrupt("account"))?,
                    to: text(2)?.parse().map_err(|_| corrupt("recipient"))?,
                    amount: row.try_get::<i64, _>(3)?.max(0) as u64,
                    state: if text(5)? == "paid" {
                        WithdrawalState::Paid
                    } else {
                        WithdrawalState::Pending
                    },
                    tx_hash: tx_hash.and_then(|h| h.parse().ok()),
                };
                Ok((withdrawal, text(4)?))
            })
            .collect()
    }
}

fn chain_config_error(e: tessera_chain::Error) -> Error {
    Error::Config(format!("chain: {e}"))
}

/// A chain failure inside the hub (logged; the next poll tries again).
fn chain_error(e: tessera_chain::Error) -> Error {
    Error::Chain(e.to_string())
}

/// The ledger key of a withdrawal: one per signer and nonce, so a replayed order replays.
fn withdrawal_key(signer: Address, nonce: u64) -> String {
    format!("chain-withdrawal:{signer:#x}:{nonce}")
}

/// What a withdrawal order was refused for.
#[derive(Debug, thiserror::Error)]
pub enum WithdrawalRefused {
    /// This hub has no chain.
    #[error("this hub has no chain configured (start it with --rpc)")]
    NoChain,
    /// The amount is zero.
    #[error("amount must be positive")]
    ZeroAmount,
    /// The recipient is the zero address.
    #[error("the recipient must not be the zero address")]
    ZeroRecipient,
    /// The order's nonce was used for a withdrawal with another recipient or amount.
    #[error("this nonce was already used for another withdrawal")]
    NonceReused,
    /// The ledger refused the debit (insufficient funds, a nonce reused for another order).
    #[error(transparent)]
    Ledger(#[from] tessera_ledger::Error),
    /// Anything else.
    #[error(transparent)]
    Hub(#[from] Error),
}

impl Hub {
    /// Credits every deposit with enough confirmations that is not credited yet; returns how
    /// many were credited now.
    pub async fn sync_deposits(&self) -> Result<usize> {
        let Some(link) = &self.chain else {
            return Ok(0);
        };
        let head = link.chain.head().await.map_err(chain_error)?;
        let Some(safe) = head.checked_sub(link.confirmations) else {
            return Ok(0);
        };
        let from = match link.scanned().await? {
            Some(scanned) => scanned + 1,
            None => link.start_block,
        };
        if from > safe {
            return Ok(0);
        }
        let mut credited = 0;
        for deposit in link.chain.deposits(from, safe).await.map_err(chain_error)? {
            let receipt = self
                .ledger
                .credit_deposit(&deposit.ledger_key(), deposit.account, deposit.amount)
                .await?;
            if !receipt.replayed {
                credited += 1;
                tracing::info!(account = %deposit.account, amount = deposit.amount, block = deposit.block, tx = %deposit.tx_hash, "deposit credited");
            }
        }
        link.set_scanned(safe).await?;
        Ok(credited)
    }

    /// Debits and pays a signed withdrawal order. A replay of the same order returns the same
    /// withdrawal and pays nothing again; the same nonce with other terms is refused.
    pub async fn withdraw(
        &self,
        order: &Signed<WithdrawalOrder>,
    ) -> std::result::Result<Withdrawal, WithdrawalRefused> {
        let link = self.chain.as_ref().ok_or(WithdrawalRefused::NoChain)?;
        let m = &order.message;
        if m.amount == 0 {
            return Err(WithdrawalRefused::ZeroAmount);
        }
        if m.to == Address::ZERO {
            return Err(WithdrawalRefused::ZeroRecipient);
        }
        let key = withdrawal_key(order.signer, m.nonce);
        let mut withdrawal = Withdrawal {
            id: tessera_chain::withdrawal_id(&key),
            account: order.signer,
            to: m.to,
            amount: m.amount,
            state: WithdrawalState::Pending,
            tx_hash: None,
        };
        // Recorded before the debit, so a crash after the debit leaves a row to pay from.
        if !link.insert_withdrawal(&withdrawal, &key).await? {
            let (existing, _) = link
                .withdrawals(Some(withdrawal.id))
                .await?
                .pop()
                .ok_or_else(|| Error::Config("withdrawal row vanished".into()))?;
            if (existing.to, existing.amount) != (withdrawal.to, withdrawal.amount) {
                return Err(WithdrawalRefused::NonceReused);
            }
            if existing.state == WithdrawalState::Paid {
                return Ok(existing);
            }
        }
        if let Err(e) = self
            .ledger
            .debit_withdrawal(&key, order.signer, m.amount)
            .await
        {
            if self.ledger.transaction(&key).await?.is_none() {
                link.delete_pending(withdrawal.id).await?;
            }
            return Err(e.into());
        }
        // Debited: from here the withdrawal is owed. If the chain refuses or is unreachable, it
        // stays pending and the watcher pays it on a later poll.
        if let Err(e) = self.pay(link, &mut withdrawal).await {
            tracing::warn!(id = %withdrawal.id, error = %e, "withdrawal debited but not paid yet; retrying");
        }
        Ok(withdrawal)
    }

    async fn pay(&self, link: &ChainLink, w: &mut Withdrawal) -> Result<()> {
        // One payment at a time: a concurrent retry then finds the id paid instead of sending a
        // second transaction the vault would revert.
        let _paying = link.paying.lock().await;
        w.tx_hash = link
            .chain
            .pay_withdrawal(w.id, w.to, w.amount)
            .await
            .map_err(chain_error)?;
        w.state = WithdrawalState::Paid;
        link.mark_paid(w).await?;
        tracing::info!(id = %w.id, account = %w.account, to = %w.to, amount = w.amount, tx = ?w.tx_hash, "withdrawal paid");
        Ok(())
    }

    /// Pays the withdrawals that were debited but not paid (a crash, or the chain refused the
    /// payment); returns how many were paid now. At start-up (`at_start`, when no order is in
    /// flight) it also drops the pending rows whose debit never committed.
    pub async fn resume_withdrawals(&self, at_start: bool) -> Result<usize> {
        let Some(link) = &self.chain else {
            return Ok(0);
        };
        let mut paid = 0;
        for (mut w, key) in link.withdrawals(None).await? {
            if self.ledger.transaction(&key).await?.is_some() {
                self.pay(link, &mut w).await?;
                paid += 1;
            } else if at_start {
                link.delete_pending(w.id).await?;
            }
        }
        Ok(paid)
    }
}

/// Runs the watcher until the hub stops: credits deposits and pays debited withdrawals that are
/// not paid yet. Call [`Hub::resume_withdrawals`] with `at_start` before serving.
pub fn spawn_watcher(hub: Arc<Hub>) -> Option<tokio::task::JoinHandle<()>> {
    let poll = hub.chain.as_ref()?.poll;
    Some(tokio::spawn(async move {
        loop {
            if let Err(e) = hub.sync_deposits().await {
                tracing::warn!(error = %e, "deposit sync failed; retrying");
            }
            if let Err(e) = hub.resume_withdrawals(false).await {
                tracing::warn!(error = %e, "paying pending withdrawals failed; retrying");
            }
            tokio::time::sleep(poll).await;
        }
    }))
}
