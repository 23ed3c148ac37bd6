//! The operations that move money. Each takes an idempotency key and runs through
//! [`Ledger::execute`], so it commits whole or not at all, and at most once per key.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tessera_protocol::Address;

use crate::{
    batch::{PreparedSettle, SettleRequest},
    store::{free_account, micro, to_i64, to_u64, Leg},
    AccountId, Error, Ledger, Receipt, Result, SystemAccount,
};

const ISSUANCE: &str = SystemAccount::Issuance.id();
const ESCROW: &str = SystemAccount::Escrow.id();
const FEES: &str = SystemAccount::Fees.id();
const STAKE: &str = SystemAccount::Stake.id();
const UNBONDING: &str = SystemAccount::Unbonding.id();
const TREASURY: &str = SystemAccount::Treasury.id();

/// The journal kind of a deposit credited from the chain ([`Ledger::credit_deposit`]).
pub const CHAIN_DEPOSIT: &str = "chain_deposit";
/// The journal kind of a withdrawal debited for payment on-chain ([`Ledger::debit_withdrawal`]).
pub const CHAIN_WITHDRAWAL: &str = "chain_withdrawal";

/// Money moved into an escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The new escrow's id.
    pub escrow_id: i64,
    /// Micro-units held.
    pub amount: u64,
}

/// Money paid out of an escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    /// The escrow.
    pub escrow_id: i64,
    /// Micro-units the payee received (captured minus fee).
    pub paid: u64,
    /// Protocol fee, to the fees account.
    pub fee: u64,
}

/// An escrow closed, its remainder returned to the payer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The escrow.
    pub escrow_id: i64,
    /// Micro-units returned to the payer.
    pub refunded: u64,
}

/// A job paid for: capture of what was used, then release of the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The escrow, when the job was held with [`Ledger::hold`]; `None` for [`Ledger::settle`].
    pub escrow_id: Option<i64>,
    /// Micro-units the payee received.
    pub paid: u64,
    /// Protocol fee.
    pub fee: u64,
    /// Micro-units returned to the payer.
    pub refunded: u64,
}

/// Stake that started unbonding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbonding {
    /// The unbonding's id.
    pub id: i64,
    /// Micro-units unbonding.
    pub amount: u64,
    /// Unix second from which it can be withdrawn.
    pub release_at: u64,
}

/// What a [`StakeEntry`] did to a provider's stake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StakeKind {
    /// Balance bonded as stake ([`Ledger::stake`]).
    Stake,
    /// Stake started unbonding ([`Ledger::unstake`]).
    Unstake,
    /// Matured unbondings returned to the balance ([`Ledger::withdraw`]).
    Withdraw,
    /// Stake taken by a slash ([`Ledger::slash`]).
    Slash,
}

/// One committed stake movement, from [`Ledger::stake_journal`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StakeEntry {
    /// The journal transaction's id.
    pub tx_id: i64,
    /// Its idempotency key.
    pub key: String,
    /// What it did.
    pub kind: StakeKind,
    /// Whose stake.
    pub provider: Address,
    /// Micro-units moved.
    pub amount: u64,
}

/// Stake taken from a provider that failed verification, and where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slash {
    /// Micro-units taken from the stake.
    pub slashed: u64,
    /// To the verifier.
    pub to_verifier: u64,
    /// To the harmed agent.
    pub to_agent: u64,
    /// To the treasury (the remainder).
    pub to_treasury: u64,
}

/// An escrow as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// The escrow's id.
    pub id: i64,
    /// Who pays.
    pub payer: Address,
    /// Micro-units held at the start.
    pub held: u64,
    /// Micro-units captured so far (fee included).
    pub captured: u64,
    /// Micro-units returned to the payer.
    pub released: u64,
    /// Whether it still holds money.
    pub open: bool,
}

fn bps(amount: i64, bps: u32) -> i64 {
    // amount < 2^63 and bps <= 10_000, so the product fits in i128 and the quotient in i64.
    (i128::from(amount) * i128::from(bps) / 10_000) as i64
}

fn legs(raw: &[(&str, i64)]) -> Vec<Leg> {
    raw.iter()
        .filter(|(_, amount)| *amount != 0)
        .map(|(a, amount)| Leg::new(*a, *amount))
        .collect()
}

impl Ledger {
    /// Moves `amount` from one wallet (or the treasury or fees account) to another.
    pub async fn transfer(
        &self,
        key: &str,
        from: impl Into<AccountId>,
        to: impl Into<AccountId>,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        let (from, to) = (free_account(from.into())?, free_account(to.into())?);
        let amount_i = micro(amount)?;
        let request = format!("{from}>{to}:{amount}");
        self.execute(key, "transfer", request, |_conn| {
            let (from, to) = (from.clone(), to.clone());
            Box::pin(async move {
                Ok((
                    vec![Leg::new(from, -amount_i), Leg::new(to, amount_i)],
                    amount,
                ))
            })
        })
        .await
    }

    /// Holds `amount` of `payer`'s balance in a new escrow (the maximum cost of a job).
    pub async fn hold(&self, key: &str, payer: Address, amount: u64) -> Result<Receipt<Hold>> {
        let payer = AccountId::from(payer).key();
        let amount_i = micro(amount)?;
        let request = format!("{payer}:{amount}");
        self.execute(key, "hold", request, |conn| {
            let payer = payer.clone();
            Box::pin(async move {
                let escrow_id: i64 = sqlx::query_scalar(
                    "INSERT INTO escrows (payer, held) VALUES ($1, $2) RETURNING id",
                )
                .bind(&payer)
                .bind(amount_i)
                .fetch_one(&mut *conn)
                .await?;
                Ok((
                    vec![Leg::new(payer, -amount_i), Leg::new(ESCROW, amount_i)],
                    Hold { escrow_id, amount },
                ))
            })
        })
        .await
    }

    /// Pays `amount` out of an open escrow to `payee`, less the protocol fee. May be called
    /// several times while the escrow holds enough.
    pub async fn capture(
        &self,
        key: &str,
        escrow_id: i64,
        payee: Address,
        amount: u64,
    ) -> Result<Receipt<Capture>> {
        let payee = AccountId::from(payee).key();
        let amount_i = micro(amount)?;
        let fee_bps = self.config.fee_bps;
        let request = format!("{escrow_id}>{payee}:{amount}");
        self.execute(key, "capture", request, |conn| {
            let payee = payee.clone();
            Box::pin(async move {
                capture_escrow(conn, escrow_id, amount_i).await?;
                let fee = bps(amount_i, fee_bps);
                let paid = amount_i - fee;
                let legs = legs(&[(ESCROW, -amount_i), (&payee, paid), (FEES, fee)]);
                Ok((
                    legs,
                    Capture {
                        escrow_id,
                        paid: to_u64(paid)?,
                        fee: to_u64(fee)?,
                    },
                ))
            })
        })
        .await
    }

    /// Closes an escrow and returns what it still holds to the payer.
    pub async fn release(&self, key: &str, escrow_id: i64) -> Result<Receipt<Release>> {
        self.execute(key, "release", escrow_id.to_string(), |conn| {
            Box::pin(async move {
                let (payer, refunded) = release_escrow(conn, escrow_id).await?;
                let legs = legs(&[(ESCROW, -refunded), (&payer, refunded)]);
                Ok((
                    legs,
                    Release {
                        escrow_id,
                        refunded: to_u64(refunded)?,
                    },
                ))
            })
        })
        .await
    }

    /// Capture of `used` to `payee` then release of the rest, in one transaction: how the hub
    /// settles a job that was held with [`Ledger::hold`]. `used` may be zero (nothing produced).
    pub async fn finish(
        &self,
        key: &str,
        escrow_id: i64,
        payee: Address,
        used: u64,
    ) -> Result<Receipt<Settlement>> {
        let payee = AccountId::from(payee).key();
        let used_i = to_i64(used)?;
        let fee_bps = self.config.fee_bps;
        let request = format!("{escrow_id}>{payee}:{used}");
        self.execute(key, "finish", request, |conn| {
            let payee = payee.clone();
            Box::pin(async move {
                if used_i > 0 {
                    capture_escrow(conn, escrow_id, used_i).await?;
                }
                let (payer, refunded) = release_escrow(conn, escrow_id).await?;
                let fee = bps(used_i, fee_bps);
                let paid = used_i - fee;
                let legs = legs(&[
                    (ESCROW, -used_i),
                    (&payee, paid),
                    (FEES, fee),
                    (ESCROW, -refunded),
                    (&payer, refunded),
                ]);
                let settlement = Settlement {
                    escrow_id: Some(escrow_id),
                    paid: to_u64(paid)?,
                    fee: to_u64(fee)?,
                    refunded: to_u64(refunded)?,
                };
                Ok((legs, settlement))
            })
        })
        .await
    }

    /// Hold of `max_cost`, capture of `used` to `payee` and release of the rest, in one
    /// transaction: a job paid for in one step. The payer must have `max_cost` available.
    ///
    /// With `group_commit` (the default), concurrent calls are group-committed: a writer task settles whatever is queued
    /// in one database transaction ([`Ledger::settle_many`]), and each call returns once its
    /// batch is committed.
    pub async fn settle(
        &self,
        key: &str,
        payer: Address,
        payee: Address,
        max_cost: u64,
        used: u64,
    ) -> Result<Receipt<Settlement>> {
        let request = SettleRequest {
            key: key.to_owned(),
            payer,
            payee,
            max_cost,
            used,
        };
        match &self.settler {
            Some(queue) => {
                let prepared = self.prepare_settle(&request)?;
                let (reply, receipt) = tokio::sync::oneshot::channel();
                if queue.send((prepared.clone(), reply)).await.is_err() {
                    return self.settle_prepared(&prepared).await;
                }
                match receipt.await {
                    Ok(result) => result,
                    Err(_) => self.settle_prepared(&prepared).await,
                }
            }
            None => self.settle_prepared(&self.prepare_settle(&request)?).await,
        }
    }

    /// Checks a settlement's arguments and works out its journal rows.
    pub(crate) fn prepare_settle(&self, r: &SettleRequest) -> Result<PreparedSettle> {
        let (payer, payee) = (
            AccountId::from(r.payer).key(),
            AccountId::from(r.payee).key(),
        );
        let max_i = micro(r.max_cost)?;
        let used_i = to_i64(r.used)?;
        if used_i > max_i {
            return Err(Error::EscrowExceeded {
                escrow: None,
                remaining: r.max_cost,
                requested: r.used,
            });
        }
        let fee = bps(used_i, self.config.fee_bps);
        let (paid, refunded) = (used_i - fee, max_i - used_i);
        let legs = legs(&[
            (&payer, -max_i),
            (ESCROW, max_i),
            (ESCROW, -used_i),
            (&payee, paid),
            (FEES, fee),
            (ESCROW, -refunded),
            (&payer, refunded),
        ]);
        let value = Settlement {
            escrow_id: None,
            paid: to_u64(paid)?,
            fee: to_u64(fee)?,
            refunded: to_u64(refunded)?,
        };
        let request = format!("{payer}>{payee}:{}:{}", r.max_cost, r.used);
        Ok(PreparedSettle {
            key: r.key.clone(),
            request,
            payer,
            max: max_i,
            legs,
            value,
        })
    }

    /// One settlement in its own transaction.
    pub(crate) async fn settle_prepared(&self, p: &PreparedSettle) -> Result<Receipt<Settlement>> {
        self.execute(&p.key, "settle", p.request.clone(), |_conn| {
            let (legs, value) = (p.legs.clone(), p.value);
            Box::pin(async move { Ok((legs, value)) })
        })
        .await
    }

    /// Bonds `amount` of the provider's balance as stake.
    pub async fn stake(&self, key: &str, provider: Address, amount: u64) -> Result<Receipt<u64>> {
        let provider = AccountId::from(provider).key();
        let amount_i = micro(amount)?;
        let request = format!("{provider}:{amount}");
        self.execute(key, "stake", request, |conn| {
            let provider = provider.clone();
            Box::pin(async move {
                let staked: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO stakes (account, amount) VALUES ($1, $2) \
                     ON CONFLICT (account) DO UPDATE SET amount = stakes.amount + excluded.amount \
                     WHERE stakes.amount <= $3 RETURNING amount",
                )
                .bind(&provider)
                .bind(amount_i)
                .bind(i64::MAX - amount_i)
                .fetch_optional(&mut *conn)
                .await?;
                if staked.is_none() {
                    return Err(Error::Overflow);
                }
                Ok((
                    vec![Leg::new(provider, -amount_i), Leg::new(STAKE, amount_i)],
                    amount,
                ))
            })
        })
        .await
    }

    /// Starts unbonding `amount` of stake; it can be withdrawn after the unbonding period.
    pub async fn unstake(
        &self,
        key: &str,
        provider: Address,
        amount: u64,
    ) -> Result<Receipt<Unbonding>> {
        let provider = AccountId::from(provider).key();
        let amount_i = micro(amount)?;
        let release_at = self
            .now()
            .checked_add(self.config.unbonding_secs)
            .ok_or(Error::Overflow)?;
        let release_at_i = to_i64(release_at)?;
        let request = format!("{provider}:{amount}");
        self.execute(key, "unstake", request, |conn| {
            let provider = provider.clone();
            Box::pin(async move {
                let left: Option<i64> = sqlx::query_scalar(
                    "UPDATE stakes SET amount = amount - $1 WHERE account = $2 AND amount >= $1 \
                     RETURNING amount",
                )
                .bind(amount_i)
                .bind(&provider)
                .fetch_optional(&mut *conn)
                .await?;
                if left.is_none() {
                    let staked = staked_amount(conn, &provider).await?;
                    return Err(Error::InsufficientStake { account: provider, needed: amount, staked });
                }
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO unbondings (account, amount, release_at) VALUES ($1, $2, $3) RETURNING id",
                )
                .bind(&provider)
                .bind(amount_i)
                .bind(release_at_i)
                .fetch_one(&mut *conn)
                .await?;
                let legs = vec![Leg::new(STAKE, -amount_i), Leg::new(UNBONDING, amount_i)];
                Ok((legs, Unbonding { id, amount, release_at }))
            })
        })
        .await
    }

    /// Returns every matured unbonding of `provider` to its balance.
    pub async fn withdraw(&self, key: &str, provider: Address) -> Result<Receipt<u64>> {
        let provider = AccountId::from(provider).key();
        let now = to_i64(self.now())?;
        self.execute(key, "withdraw", provider.clone(), |conn| {
            let provider = provider.clone();
            Box::pin(async move {
                // UPDATE … RETURNING, not SELECT then UPDATE: two concurrent withdrawals must not
                // both count the same rows.
                let rows = sqlx::query(
                    "UPDATE unbondings SET withdrawn = 1 \
                     WHERE account = $1 AND withdrawn = 0 AND release_at <= $2 RETURNING amount",
                )
                .bind(&provider)
                .bind(now)
                .fetch_all(&mut *conn)
                .await?;
                let mut total = 0i64;
                for row in rows {
                    total = total
                        .checked_add(row.try_get::<i64, _>(0)?)
                        .ok_or(Error::Overflow)?;
                }
                if total == 0 {
                    return Err(Error::NothingToWithdraw(provider));
                }
                Ok((
                    vec![Leg::new(UNBONDING, -total), Leg::new(provider, total)],
                    to_u64(total)?,
                ))
            })
        })
        .await
    }

    /// Takes up to `amount` from the provider's stake and shares it out per the configured
    /// [`crate::SlashSplit`]: to the verifier that caught the fault, to the harmed agent, the rest
    /// to the treasury. Slashing more than is staked takes everything staked.
    pub async fn slash(
        &self,
        key: &str,
        provider: Address,
        amount: u64,
        verifier: Option<Address>,
        harmed_agent: Option<Address>,
    ) -> Result<Receipt<Slash>> {
        let provider = AccountId::from(provider).key();
        let amount_i = micro(amount)?;
        let verifier = verifier.map(|a| AccountId::from(a).key());
        let agent = harmed_agent.map(|a| AccountId::from(a).key());
        let split = self.config.slash_split;
        let request = format!("{provider}:{amount}:{verifier:?}:{agent:?}");
        self.execute(key, "slash", request, |conn| {
            let (provider, verifier, agent) = (provider.clone(), verifier.clone(), agent.clone());
            Box::pin(async move {
                let staked = to_i64(staked_amount(conn, &provider).await?)?;
                let take = amount_i.min(staked);
                if take == 0 {
                    return Err(Error::InsufficientStake {
                        account: provider,
                        needed: amount,
                        staked: 0,
                    });
                }
                // Compare-and-set on the amount read: a concurrent unstake makes this a retry.
                let updated = sqlx::query(
                    "UPDATE stakes SET amount = amount - $1 WHERE account = $2 AND amount = $3",
                )
                .bind(take)
                .bind(&provider)
                .bind(staked)
                .execute(&mut *conn)
                .await?;
                if updated.rows_affected() != 1 {
                    return Err(Error::Conflict);
                }
                let to_verifier = if verifier.is_some() {
                    bps(take, split.verifier_bps)
                } else {
                    0
                };
                let to_agent = if agent.is_some() {
                    bps(take, split.agent_bps)
                } else {
                    0
                };
                let to_treasury = take - to_verifier - to_agent;
                let mut raw = vec![(STAKE, -take), (TREASURY, to_treasury)];
                if let Some(v) = &verifier {
                    raw.push((v.as_str(), to_verifier));
                }
                if let Some(a) = &agent {
                    raw.push((a.as_str(), to_agent));
                }
                let slash = Slash {
                    slashed: to_u64(take)?,
                    to_verifier: to_u64(to_verifier)?,
                    to_agent: to_u64(to_agent)?,
                    to_treasury: to_u64(to_treasury)?,
                };
                Ok((legs(&raw), slash))
            })
        })
        .await
    }

    /// Destroys `amount` of an account's money (counted in the supply's `burned`).
    pub async fn burn(
        &self,
        key: &str,
        from: impl Into<AccountId>,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        self.retire(key, "burn", from.into(), amount).await
    }

    /// Credits a deposit confirmed on-chain: money enters the books (counted in `minted`) as a
    /// transaction of kind [`CHAIN_DEPOSIT`]. The key names the deposit (its transaction hash
    /// and log index), so a deposit seen twice, by a restarted hub or a replica, credits once.
    pub async fn credit_deposit(
        &self,
        key: &str,
        to: impl Into<AccountId>,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        self.issue(key, CHAIN_DEPOSIT, to.into(), amount).await
    }

    /// Debits a withdrawal before it is paid on-chain: money leaves the books (counted in
    /// `burned`) as a transaction of kind [`CHAIN_WITHDRAWAL`]; fails with
    /// [`Error::InsufficientFunds`] and moves nothing if the balance is short.
    pub async fn debit_withdrawal(
        &self,
        key: &str,
        from: impl Into<AccountId>,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        self.retire(key, CHAIN_WITHDRAWAL, from.into(), amount)
            .await
    }

    /// Micro-units the books owe the vault contract: deposits credited minus withdrawals
    /// debited. The audit's on-chain reconciliation compares it with the vault's holdings.
    pub async fn chain_liabilities(&self) -> Result<i64> {
        let owed: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(-e.amount), 0) AS BIGINT) FROM entries e \
             JOIN transactions t ON t.id = e.tx_id \
             WHERE e.account = $1 AND t.kind IN ($2, $3)",
        )
        .bind(ISSUANCE)
        .bind(CHAIN_DEPOSIT)
        .bind(CHAIN_WITHDRAWAL)
        .fetch_one(&self.pool)
        .await?;
        Ok(owed)
    }

    /// The stake movements and slashes committed after transaction `after`, in journal order:
    /// what the hub records in the vault. Each names its provider and the amount that actually
    /// moved (a slash of more than was staked moved only the stake).
    pub async fn stake_journal(&self, after: i64, limit: i64) -> Result<Vec<StakeEntry>> {
        let rows = sqlx::query(
            "SELECT id, idem_key, kind, request, result FROM transactions              WHERE id > $1 AND kind IN ('stake', 'unstake', 'withdraw', 'slash') ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let (tx_id, key, kind, request, result): (i64, String, String, String, String) = (
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get(2)?,
                    row.try_get(3)?,
                    row.try_get(4)?,
                );
                let corrupt =
                    |what: &str| Error::Corrupt(format!("{kind} transaction {tx_id}: {what}"));
                // Every stake operation's request starts with the provider's account id.
                let provider = request
                    .split(':')
                    .next()
                    .and_then(|p| p.parse::<Address>().ok())
                    .ok_or_else(|| corrupt("request names no provider"))?;
                let result: serde_json::Value =
                    serde_json::from_str(&result).map_err(|_| corrupt("result is not JSON"))?;
                let (kind, amount) = match kind.as_str() {
                    "stake" => (StakeKind::Stake, result.as_u64()),
                    "unstake" => (StakeKind::Unstake, result["amount"].as_u64()),
                    "withdraw" => (StakeKind::Withdraw, result.as_u64()),
                    _ => (StakeKind::Slash, result["slashed"].as_u64()),
                };
                Ok(StakeEntry {
                    tx_id,
                    key,
                    kind,
                    provider,
                    amount: amount.ok_or_else(|| corrupt("result has no amount"))?,
                })
            })
            .collect()
    }

    /// Micro-units bonded as stake and unbonding, across every provider: what the audit's
    /// on-chain reconciliation compares with the vault's stake records.
    pub async fn stake_totals(&self) -> Result<(u64, u64)> {
        let staked = self
            .balance(SystemAccount::Stake)
            .await
            .or_else(zero_if_unknown)?;
        let unbonding = self
            .balance(SystemAccount::Unbonding)
            .await
            .or_else(zero_if_unknown)?;
        Ok((staked, unbonding))
    }

    /// Mints new money; reachable only through [`Faucet`].
    async fn mint(&self, key: &str, to: AccountId, amount: u64) -> Result<Receipt<u64>> {
        self.issue(key, "mint", to, amount).await
    }

    /// Money from the issuance account to `to`, counted in the supply's `minted`.
    async fn issue(
        &self,
        key: &str,
        kind: &'static str,
        to: AccountId,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        let to = free_account(to)?;
        let amount_i = micro(amount)?;
        let request = format!("{to}:{amount}");
        self.execute(key, kind, request, |conn| {
            let to = to.clone();
            Box::pin(async move {
                let minted: Option<i64> = sqlx::query_scalar(
                    "UPDATE supply SET minted = minted + $1 WHERE id = 1 AND minted <= $2 RETURNING minted",
                )
                .bind(amount_i)
                .bind(i64::MAX - amount_i)
                .fetch_optional(&mut *conn)
                .await?;
                if minted.is_none() {
                    return Err(Error::Overflow);
                }
                Ok((vec![Leg::new(ISSUANCE, -amount_i), Leg::new(to, amount_i)], amount))
            })
        })
        .await
    }

    /// Money from `from` back to the issuance account, counted in the supply's `burned`.
    async fn retire(
        &self,
        key: &str,
        kind: &'static str,
        from: AccountId,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        let from = free_account(from)?;
        let amount_i = micro(amount)?;
        let request = format!("{from}:{amount}");
        self.execute(key, kind, request, |conn| {
            let from = from.clone();
            Box::pin(async move {
                let burned: Option<i64> = sqlx::query_scalar(
                    "UPDATE supply SET burned = burned + $1 WHERE id = 1 AND burned <= $2 RETURNING burned",
                )
                .bind(amount_i)
                .bind(i64::MAX - amount_i)
                .fetch_optional(&mut *conn)
                .await?;
                if burned.is_none() {
                    return Err(Error::Overflow);
                }
                Ok((vec![Leg::new(from, -amount_i), Leg::new(ISSUANCE, amount_i)], amount))
            })
        })
        .await
    }

    /// The development faucet, or `None` unless the ledger was opened with `dev_mode`.
    pub fn faucet(&self) -> Option<Faucet> {
        self.config.dev_mode.then(|| Faucet {
            ledger: self.clone(),
        })
    }
}

/// Creates money from nothing for development; exists only on a dev-mode ledger.
#[derive(Debug, Clone)]
pub struct Faucet {
    ledger: Ledger,
}

impl Faucet {
    /// Mints `amount` micro-units to `to`.
    pub async fn mint(
        &self,
        key: &str,
        to: impl Into<AccountId>,
        amount: u64,
    ) -> Result<Receipt<u64>> {
        self.ledger.mint(key, to.into(), amount).await
    }
}

fn zero_if_unknown(e: Error) -> Result<u64> {
    match e {
        Error::UnknownAccount(_) => Ok(0),
        e => Err(e),
    }
}

async fn staked_amount(conn: &mut sqlx::AnyConnection, account: &str) -> Result<u64> {
    let staked: Option<i64> = sqlx::query_scalar("SELECT amount FROM stakes WHERE account = $1")
        .bind(account)
        .fetch_optional(&mut *conn)
        .await?;
    to_u64(staked.unwrap_or(0))
}

/// Records a capture on the escrow row, or says why it cannot be made.
async fn capture_escrow(conn: &mut sqlx::AnyConnection, escrow_id: i64, amount: i64) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE escrows SET captured = captured + $1 \
         WHERE id = $2 AND is_open = 1 AND held - captured - released >= $1",
    )
    .bind(amount)
    .bind(escrow_id)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == 1 {
        return Ok(());
    }
    let escrow = escrow_row(conn, escrow_id).await?;
    Err(if !escrow.open {
        Error::EscrowClosed(escrow_id)
    } else {
        Error::EscrowExceeded {
            escrow: Some(escrow_id),
            remaining: escrow.held - escrow.captured - escrow.released,
            requested: to_u64(amount)?,
        }
    })
}

/// Closes the escrow; returns the payer's account and the amount to refund.
async fn release_escrow(conn: &mut sqlx::AnyConnection, escrow_id: i64) -> Result<(String, i64)> {
    let row = sqlx::query(
        "UPDATE escrows SET released = held - captured, is_open = 0 \
         WHERE id = $1 AND is_open = 1 RETURNING payer, released",
    )
    .bind(escrow_id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok((row.try_get(0)?, row.try_get(1)?)),
        None => {
            escrow_row(conn, escrow_id).await?;
            Err(Error::EscrowClosed(escrow_id))
        }
    }
}

pub(crate) async fn escrow_row(conn: &mut sqlx::AnyConnection, escrow_id: i64) -> Result<Escrow> {
    let row =
        sqlx::query("SELECT payer, held, captured, released, is_open FROM escrows WHERE id = $1")
            .bind(escrow_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(Error::UnknownEscrow(escrow_id))?;
    let payer: String = row.try_get(0)?;
    Ok(Escrow {
        id: escrow_id,
        payer: payer
            .parse()
            .map_err(|_| Error::Corrupt(format!("escrow payer {payer:?}")))?,
        held: to_u64(row.try_get(1)?)?,
        captured: to_u64(row.try_get(2)?)?,
        released: to_u64(row.try_get(3)?)?,
        open: row.try_get::<i64, _>(4)? == 1,
    })
}
