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
//! - **Stake**: the ledger is the authority; the vault records what it did. Every stake,
//!   unstake and matured-unbonding withdrawal the ledger commits (signed `StakeOrder`s, dev
//!   staking) is sent to the vault in journal order under the id keccak256(ledger key), which
//!   the vault applies once; a cursor (the last journal id recorded) resumes after a crash, and
//!   an id found applied is skipped. Tokens never move for stake: it is a labelled part of the
//!   vault's holdings.
//! - **Slashes**: every `--slash-epoch-secs` the slashes the ledger committed since the last
//!   epoch (a fixed journal range, stored before sending) go to the vault in one `slash` call,
//!   once per epoch id; a pending epoch is sent again after a crash. Until its epoch, a slash
//!   shows on-chain as stake the ledger no longer has.
//!   Re-orgs deeper than the confirmations are not handled (a deposit credited then re-orged
//!   away stays credited): choose the confirmations for the network.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use sqlx::{AnyPool, Row};
use tessera_chain::{Chain, Contracts, OnChainStake, StakeMove};
use tessera_ledger::{StakeKind, Unbonding};
use tessera_protocol::{Address, Signed, StakeAction, StakeOrder, WithdrawalOrder, B256};

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
    /// Withdrawals above this many micro-units wait `--withdrawal-delay-secs` after their debit
    /// before the vault pays them (a window to notice a stolen key); none wait without it.
    #[arg(long, env = "TESSERA_HUB_WITHDRAWAL_DELAY_ABOVE", requires = "rpc")]
    pub withdrawal_delay_above: Option<u64>,
    /// How long a large withdrawal waits, seconds.
    #[arg(
        long,
        env = "TESSERA_HUB_WITHDRAWAL_DELAY_SECS",
        default_value_t = 3600
    )]
    pub withdrawal_delay_secs: u64,
    /// Seconds between slash epochs: each epoch submits the slashes the ledger recorded since
    /// the last one to the vault in one transaction.
    #[arg(long, env = "TESSERA_HUB_SLASH_EPOCH_SECS", default_value_t = 600)]
    pub slash_epoch_secs: u64,
}

const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS hub_chain_cursor (vault TEXT PRIMARY KEY, scanned BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hub_slash_epochs (vault TEXT NOT NULL, epoch BIGINT NOT NULL, \
     first_tx BIGINT NOT NULL, last_tx BIGINT NOT NULL, state TEXT NOT NULL, tx_hash TEXT, \
     PRIMARY KEY (vault, epoch))",
    "CREATE TABLE IF NOT EXISTS hub_withdrawals (id TEXT PRIMARY KEY, account TEXT NOT NULL, \
     recipient TEXT NOT NULL, amount BIGINT NOT NULL, ledger_key TEXT NOT NULL, state TEXT NOT NULL, \
     tx_hash TEXT)",
];

/// Added to `hub_withdrawals` after its first release; a database that has it already refuses
/// the statement, which is then ignored.
const ADD_PAY_AFTER: &str = "ALTER TABLE hub_withdrawals ADD COLUMN pay_after BIGINT";

/// Where a withdrawal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawalState {
    /// Recorded; the debit may or may not have committed.
    Pending,
    /// Debited, and large: paid once its delay (`pay_after`) has passed.
    Delayed,
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
    /// Unix second from which a delayed withdrawal is paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pay_after: Option<u64>,
}

/// The hub's connection to its chain.
pub struct ChainLink {
    /// The chain, with the operator key when one is configured.
    pub chain: Chain,
    confirmations: u64,
    start_block: u64,
    poll: Duration,
    slash_epoch: Duration,
    /// (threshold, seconds): withdrawals above the threshold wait that long.
    withdrawal_delay: Option<(u64, u64)>,
    pool: AnyPool,
    /// Held while the operator key sends a transaction: one at a time, so a concurrent retry
    /// finds the id done instead of sending a second transaction the vault would revert.
    pub(crate) sending: tokio::sync::Mutex<()>,
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
        if let Err(e) = sqlx::query(ADD_PAY_AFTER).execute(&pool).await {
            tracing::debug!(error = %e, "hub_withdrawals.pay_after exists already");
        }
        tracing::info!(%rpc, %vault, %token, confirmations = config.confirmations, operator = ?chain.sender(), "chain configured");
        Ok(Some(Self {
            chain,
            confirmations: config.confirmations,
            start_block: config.start_block,
            poll: Duration::from_millis(config.chain_poll_ms.max(10)),
            slash_epoch: Duration::from_secs(config.slash_epoch_secs.max(1)),
            withdrawal_delay: config
                .withdrawal_delay_above
                .map(|above| (above, config.withdrawal_delay_secs)),
            pool,
            sending: tokio::sync::Mutex::new(()),
            offer,
        }))
    }

    /// A cursor's name in `hub_chain_cursor`: the vault, with a suffix for the stake journal.
    fn cursor_name(&self, suffix: &str) -> String {
        format!("{:#x}{suffix}", self.chain.contracts().vault)
    }

    async fn cursor(&self, suffix: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT scanned FROM hub_chain_cursor WHERE vault = $1")
                .bind(self.cursor_name(suffix))
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_cursor(&self, suffix: &str, value: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO hub_chain_cursor (vault, scanned) VALUES ($1, $2) \
             ON CONFLICT (vault) DO UPDATE SET scanned = excluded.scanned",
        )
        .bind(self.cursor_name(suffix))
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last block scanned for deposits.
    async fn scanned(&self) -> Result<Option<u64>> {
        Ok(self.cursor("").await?.map(|b| b.max(0) as u64))
    }

    async fn set_scanned(&self, block: u64) -> Result<()> {
        self.set_cursor("", block as i64).await
    }

    /// The last stake journal transaction recorded in the vault (0: none).
    async fn stake_cursor(&self) -> Result<i64> {
        Ok(self.cursor(":stake").await?.unwrap_or(0))
    }

    /// The latest slash epoch: (epoch, first_tx, last_tx, pending).
    async fn last_epoch(&self) -> Result<Option<(i64, i64, i64, bool)>> {
        let row = sqlx::query(
            "SELECT epoch, first_tx, last_tx, state FROM hub_slash_epochs WHERE vault = $1 \
             ORDER BY epoch DESC LIMIT 1",
        )
        .bind(self.cursor_name(""))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get::<String, _>(3)? == "pending",
            ))
        })
        .transpose()
    }

    /// Records a new pending epoch covering journal transactions `first_tx..=last_tx`.
    async fn open_epoch(&self, epoch: i64, first_tx: i64, last_tx: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO hub_slash_epochs (vault, epoch, first_tx, last_tx, state) \
             VALUES ($1, $2, $3, $4, 'pending')",
        )
        .bind(self.cursor_name(""))
        .bind(epoch)
        .bind(first_tx)
        .bind(last_tx)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn close_epoch(&self, epoch: i64, tx_hash: Option<B256>) -> Result<()> {
        sqlx::query(
            "UPDATE hub_slash_epochs SET state = 'applied', tx_hash = $3 WHERE vault = $1 AND epoch = $2",
        )
        .bind(self.cursor_name(""))
        .bind(epoch)
        .bind(tx_hash.map(|h| format!("{h:#x}")))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a new pending withdrawal; `false` if its id is recorded already.
    async fn insert_withdrawal(&self, w: &Withdrawal, ledger_key: &str) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO hub_withdrawals (id, account, recipient, amount, ledger_key, state, pay_after) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(format!("{:#x}", w.id))
        .bind(format!("{:#x}", w.account))
        .bind(format!("{:#x}", w.to))
        .bind(w.amount as i64)
        .bind(ledger_key)
        .bind(w.pay_after.map(|t| t as i64))
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
            "SELECT id, account, recipient, amount, ledger_key, state, tx_hash, pay_after FROM hub_withdrawals \
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
                let pay_after = row.try_get::<Option<i64>, _>(7)?.map(|t| t.max(0) as u64);
                let withdrawal = Withdrawal {
                    id: text(0)?.parse().map_err(|_| corrupt("id"))?,
                    account: text(1)?.parse().map_err(|_| corrupt("account"))?,
                    to: text(2)?.parse().map_err(|_| corrupt("recipient"))?,
                    amount: row.try_get::<i64, _>(3)?.max(0) as u64,
                    state: if text(5)? == "paid" {
                        WithdrawalState::Paid
                    } else if pay_after.is_some_and(|t| t > crate::now_secs()) {
                        WithdrawalState::Delayed
                    } else {
                        WithdrawalState::Pending
                    },
                    tx_hash: tx_hash.and_then(|h| h.parse().ok()),
                    pay_after,
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

    /// A withdrawal by its vault id, if this hub recorded it.
    pub async fn withdrawal(&self, id: B256) -> Result<Option<Withdrawal>> {
        let Some(link) = &self.chain else {
            return Ok(None);
        };
        Ok(link.withdrawals(Some(id)).await?.pop().map(|(w, _)| w))
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
            pay_after: link
                .withdrawal_delay
                .filter(|(above, _)| m.amount > *above)
                .map(|(_, secs)| crate::now_secs().saturating_add(secs)),
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
            if existing.state != WithdrawalState::Pending {
                return Ok(existing);
            }
            withdrawal.pay_after = existing.pay_after;
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
        // Debited: from here the withdrawal is owed. A large one waits for its delay; if the
        // chain refuses or is unreachable, it stays pending. The watcher pays both later.
        if withdrawal.pay_after.is_some_and(|t| t > crate::now_secs()) {
            withdrawal.state = WithdrawalState::Delayed;
            tracing::info!(id = %withdrawal.id, amount = m.amount, pay_after = ?withdrawal.pay_after, "large withdrawal debited; paid after its delay");
            return Ok(withdrawal);
        }
        if let Err(e) = self.pay(link, &mut withdrawal).await {
            tracing::warn!(id = %withdrawal.id, error = %e, "withdrawal debited but not paid yet; retrying");
        }
        Ok(withdrawal)
    }

    async fn pay(&self, link: &ChainLink, w: &mut Withdrawal) -> Result<()> {
        let _sending = link.sending.lock().await;
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
            if w.state == WithdrawalState::Delayed {
                continue;
            }
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

/// What a stake order was refused for.
#[derive(Debug, thiserror::Error)]
pub enum StakeRefused {
    /// The action code is none of stake, unstake, withdraw.
    #[error(transparent)]
    Action(#[from] tessera_protocol::Error),
    /// Stake and unstake need a positive amount.
    #[error("amount must be positive")]
    ZeroAmount,
    /// The ledger refused (insufficient balance or stake, nothing matured, a nonce reused).
    #[error(transparent)]
    Ledger(#[from] tessera_ledger::Error),
    /// Anything else.
    #[error(transparent)]
    Hub(#[from] Error),
}

/// What a stake order did, as answered to the provider.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StakeReceipt {
    /// `stake`, `unstake` or `withdraw`.
    pub action: &'static str,
    /// Micro-units staked, unstaked or returned to the balance.
    pub amount: u64,
    /// The unbonding an unstake started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unbonding: Option<Unbonding>,
    /// Whether this was a replay of an order already carried out.
    pub replayed: bool,
    /// The provider's bonded stake in the ledger now.
    pub staked: u64,
    /// The provider's stake as the vault records it, when the hub has a chain and the vault is
    /// up to date (`None` while the chain is unreachable; the watcher records it later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_chain: Option<OnChainStake>,
}

/// The ledger key of a stake order: one per signer and nonce, so a replayed order replays.
fn stake_order_key(signer: Address, nonce: u64) -> String {
    format!("stake-order:{signer:#x}:{nonce}")
}

/// The vault's id of slash epoch `epoch`.
fn epoch_id(epoch: i64) -> B256 {
    tessera_chain::withdrawal_id(&format!("slash-epoch:{epoch}"))
}

/// A slash epoch sent to the vault.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlashEpoch {
    /// The epoch's number (1, 2, …).
    pub epoch: i64,
    /// Micro-units taken from each provider's stake.
    pub slashes: Vec<(Address, u64)>,
    /// The transaction, `None` when the vault had applied it before.
    pub tx_hash: Option<B256>,
}

impl Hub {
    /// Carries out a signed stake order on the ledger (stake from the balance, unstake into the
    /// unbonding period, or withdraw every matured unbonding), then records it in the vault
    /// when the hub has a chain. A replay of the same order returns the same result.
    pub async fn stake_order(
        &self,
        order: &Signed<StakeOrder>,
    ) -> std::result::Result<StakeReceipt, StakeRefused> {
        let m = &order.message;
        let action = m.stake_action()?;
        let provider = order.signer;
        let key = stake_order_key(provider, m.nonce);
        if action != StakeAction::Withdraw && m.amount == 0 {
            return Err(StakeRefused::ZeroAmount);
        }
        let (name, amount, unbonding, replayed) = match action {
            StakeAction::Stake => {
                let r = self.ledger.stake(&key, provider, m.amount).await?;
                ("stake", r.value, None, r.replayed)
            }
            StakeAction::Unstake => {
                let r = self.ledger.unstake(&key, provider, m.amount).await?;
                ("unstake", r.value.amount, Some(r.value), r.replayed)
            }
            StakeAction::Withdraw => {
                let r = self.ledger.withdraw(&key, provider).await?;
                ("withdraw", r.value, None, r.replayed)
            }
        };
        tracing::info!(%provider, action = name, amount, replayed, "stake order carried out");
        let on_chain = match &self.chain {
            Some(link) => match self.mirror_stake().await {
                Ok(_) => link.chain.stake_of(provider).await.ok(),
                Err(e) => {
                    tracing::warn!(error = %e, "recording stake in the vault failed; retrying");
                    None
                }
            },
            None => None,
        };
        Ok(StakeReceipt {
            action: name,
            amount,
            unbonding,
            replayed,
            staked: self.ledger.staked(provider).await.map_err(Error::from)?,
            on_chain,
        })
    }

    /// Records in the vault every stake movement the ledger committed since the last one
    /// recorded (slashes excepted: [`Hub::flush_slashes`] sends those per epoch); returns how
    /// many were sent now. Stops at the first failure, to resume there on the next poll.
    pub async fn mirror_stake(&self) -> Result<usize> {
        let Some(link) = &self.chain else {
            return Ok(0);
        };
        let _sending = link.sending.lock().await;
        let mut cursor = link.stake_cursor().await?;
        let mut sent = 0;
        loop {
            let entries = self.ledger.stake_journal(cursor, 100).await?;
            let Some(last) = entries.last().map(|e| e.tx_id) else {
                return Ok(sent);
            };
            for entry in entries {
                let kind = match entry.kind {
                    StakeKind::Stake => Some(StakeMove::Stake),
                    StakeKind::Unstake => Some(StakeMove::Unstake),
                    StakeKind::Withdraw => Some(StakeMove::Unbond),
                    StakeKind::Slash => None,
                };
                if let Some(kind) = kind {
                    let id = tessera_chain::withdrawal_id(&entry.key);
                    let tx = link
                        .chain
                        .apply_stake_move(id, kind, entry.provider, entry.amount)
                        .await
                        .map_err(chain_error)?;
                    sent += usize::from(tx.is_some());
                    tracing::info!(provider = %entry.provider, ?kind, amount = entry.amount, ?tx, "stake recorded in the vault");
                    link.set_cursor(":stake", entry.tx_id).await?;
                }
                cursor = entry.tx_id;
            }
            link.set_cursor(":stake", last).await?;
        }
    }

    /// Sends the pending slash epoch to the vault, if one is pending (a crash or a failure
    /// left it); then, with `open_new`, opens and sends a new epoch of the slashes committed
    /// since the last one, if there are any. Returns the epoch sent last.
    pub async fn flush_slashes(&self, open_new: bool) -> Result<Option<SlashEpoch>> {
        let Some(link) = &self.chain else {
            return Ok(None);
        };
        // The movements first: every slash then finds the stake it takes recorded.
        self.mirror_stake().await?;
        let _sending = link.sending.lock().await;
        let (epoch, first_tx, last_tx) = match link.last_epoch().await? {
            Some((epoch, first, last, true)) => (epoch, first, last),
            last if open_new => {
                let (previous, after) = last.map(|(e, _, l, _)| (e, l)).unwrap_or((0, 0));
                // Up to the stake cursor: every movement before these slashes is recorded.
                let upto = link.stake_cursor().await?;
                if upto <= after || self.slashes_between(after, upto).await?.is_empty() {
                    return Ok(None);
                }
                link.open_epoch(previous + 1, after + 1, upto).await?;
                (previous + 1, after + 1, upto)
            }
            _ => return Ok(None),
        };
        let slashes: Vec<(Address, u64)> = self
            .slashes_between(first_tx - 1, last_tx)
            .await?
            .into_iter()
            .collect();
        let tx_hash = link
            .chain
            .apply_slashes(epoch_id(epoch), &slashes)
            .await
            .map_err(chain_error)?;
        link.close_epoch(epoch, tx_hash).await?;
        tracing::info!(epoch, ?slashes, tx = ?tx_hash, "slash epoch recorded in the vault");
        Ok(Some(SlashEpoch {
            epoch,
            slashes,
            tx_hash,
        }))
    }

    /// Micro-units slashed per provider in journal transactions `after+1..=upto`.
    async fn slashes_between(&self, after: i64, upto: i64) -> Result<BTreeMap<Address, u64>> {
        let mut slashes = BTreeMap::new();
        let mut cursor = after;
        while cursor < upto {
            let entries = self.ledger.stake_journal(cursor, 500).await?;
            let Some(last) = entries.last().map(|e| e.tx_id) else {
                break;
            };
            for e in entries.iter().filter(|e| e.tx_id <= upto) {
                if e.kind == StakeKind::Slash {
                    let total: &mut u64 = slashes.entry(e.provider).or_default();
                    *total = total.saturating_add(e.amount);
                }
            }
            cursor = last;
        }
        Ok(slashes)
    }
}

/// Runs the watcher until the hub stops: credits deposits, pays debited withdrawals that are
/// not paid yet, records stake movements in the vault and, once per slash epoch, the slashes.
/// Call [`Hub::resume_withdrawals`] with `at_start` before serving.
pub fn spawn_watcher(hub: Arc<Hub>) -> Option<tokio::task::JoinHandle<()>> {
    let link = hub.chain.as_ref()?;
    let (poll, slash_epoch) = (link.poll, link.slash_epoch);
    Some(tokio::spawn(async move {
        let mut epoch_started = tokio::time::Instant::now();
        loop {
            if let Err(e) = hub.sync_deposits().await {
                tracing::warn!(error = %e, "deposit sync failed; retrying");
            }
            if let Err(e) = hub.resume_withdrawals(false).await {
                tracing::warn!(error = %e, "paying pending withdrawals failed; retrying");
            }
            if let Err(e) = hub.mirror_stake().await {
                tracing::warn!(error = %e, "recording stake in the vault failed; retrying");
            }
            let open_new = epoch_started.elapsed() >= slash_epoch;
            if open_new {
                epoch_started = tokio::time::Instant::now();
            }
            if let Err(e) = hub.flush_slashes(open_new).await {
                tracing::warn!(error = %e, "recording slashes in the vault failed; retrying");
            }
            tokio::time::sleep(poll).await;
        }
    }))
}
