//! Property test: random sequences of operations (valid, invalid and retried) keep every
//! invariant — audit clean after each step, refused operations change nothing, retries replay.

use proptest::prelude::*;
use tessera_ledger::{AccountId, Ledger, Receipt, SystemAccount};
use tessera_protocol::Address;

use crate::support::{open, wallet, ManualClock};

const WALLETS: u8 = 4;

#[derive(Debug, Clone)]
enum Op {
    Mint(u8, u64),
    Transfer(u8, u8, u64),
    Hold(u8, u64),
    Capture(usize, u8, u64),
    Release(usize),
    Finish(usize, u8, u64),
    Settle(u8, u8, u64, u64),
    Stake(u8, u64),
    Unstake(u8, u64),
    Withdraw(u8),
    Slash(u8, u64, Option<u8>, Option<u8>),
    Burn(u8, u64),
    Tick(u64),
    /// Re-run the operation at this index of the sequence with its original key.
    Retry(usize),
}

fn who() -> impl Strategy<Value = u8> {
    1..=WALLETS
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..3_000u64, 1 => Just(u64::MAX), 1 => Just(i64::MAX as u64)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (who(), 0..5_000u64).prop_map(|(w, a)| Op::Mint(w, a)),
        4 => (who(), who(), amount()).prop_map(|(f, t, a)| Op::Transfer(f, t, a)),
        3 => (who(), amount()).prop_map(|(w, a)| Op::Hold(w, a)),
        2 => (0..8usize, who(), amount()).prop_map(|(e, w, a)| Op::Capture(e, w, a)),
        2 => (0..8usize).prop_map(Op::Release),
        2 => (0..8usize, who(), 0..2_000u64).prop_map(|(e, w, a)| Op::Finish(e, w, a)),
        3 => (who(), who(), amount(), 0..2_000u64).prop_map(|(p, q, m, u)| Op::Settle(p, q, m, u)),
        2 => (who(), amount()).prop_map(|(w, a)| Op::Stake(w, a)),
        2 => (who(), amount()).prop_map(|(w, a)| Op::Unstake(w, a)),
        1 => who().prop_map(Op::Withdraw),
        1 => (who(), amount(), proptest::option::of(who()), proptest::option::of(who()))
            .prop_map(|(w, a, v, h)| Op::Slash(w, a, v, h)),
        1 => (who(), amount()).prop_map(|(w, a)| Op::Burn(w, a)),
        1 => (0..200u64).prop_map(Op::Tick),
        2 => (0..40usize).prop_map(Op::Retry),
    ]
}

/// Every balance and stake, to compare before and after an operation.
async fn state(ledger: &Ledger) -> Vec<(Option<u64>, u64)> {
    let mut out = Vec::new();
    for w in 1..=WALLETS {
        out.push((
            ledger.balance(wallet(w)).await.ok(),
            ledger.staked(wallet(w)).await.unwrap(),
        ));
    }
    for s in SystemAccount::ALL {
        if s != SystemAccount::Issuance {
            out.push((ledger.balance(AccountId::System(s)).await.ok(), 0));
        }
    }
    out
}

fn receipt<T>(r: tessera_ledger::Result<Receipt<T>>) -> tessera_ledger::Result<(i64, bool)> {
    r.map(|r| (r.tx_id, r.replayed))
}

async fn apply(
    ledger: &Ledger,
    clock: &ManualClock,
    escrows: &[i64],
    key: &str,
    op: &Op,
) -> tessera_ledger::Result<(i64, bool)> {
    let w = |n: &u8| -> Address { wallet(*n) };
    let escrow = |i: &usize| escrows.get(*i).copied().unwrap_or(1_000_000 + *i as i64);
    match op {
        Op::Mint(to, a) => receipt(ledger.faucet().unwrap().mint(key, w(to), *a).await),
        Op::Transfer(f, t, a) => receipt(ledger.transfer(key, w(f), w(t), *a).await),
        Op::Hold(p, a) => receipt(ledger.hold(key, w(p), *a).await),
        Op::Capture(e, p, a) => receipt(ledger.capture(key, escrow(e), w(p), *a).await),
        Op::Release(e) => receipt(ledger.release(key, escrow(e)).await),
        Op::Finish(e, p, a) => receipt(ledger.finish(key, escrow(e), w(p), *a).await),
        Op::Settle(p, q, m, u) => receipt(ledger.settle(key, w(p), w(q), *m, *u).await),
        Op::Stake(p, a) => receipt(ledger.stake(key, w(p), *a).await),
        Op::Unstake(p, a) => receipt(ledger.unstake(key, w(p), *a).await),
        Op::Withdraw(p) => receipt(ledger.withdraw(key, w(p)).await),
        Op::Slash(p, a, v, h) => receipt(
            ledger
                .slash(key, w(p), *a, v.as_ref().map(w), h.as_ref().map(w))
                .await,
        ),
        Op::Burn(p, a) => receipt(ledger.burn(key, w(p), *a).await),
        Op::Tick(s) => {
            clock.advance(*s);
            Ok((0, false))
        }
        Op::Retry(_) => unreachable!("resolved by the caller"),
    }
}

/// The index of the operation a (chain of) retries re-runs.
fn root(ops: &[Op], mut i: usize) -> usize {
    while let Op::Retry(j) = ops[i] {
        if j >= i {
            break;
        }
        i = j;
    }
    i
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = crate::support::sqlite();
    let clock = ManualClock::default();
    let ledger = clock.install(open(&db.url).await);
    let mut escrows = Vec::new();
    // Root indexes of operations that committed.
    let mut committed = std::collections::HashSet::new();
    for i in 0..ops.len() {
        let r = root(&ops, i);
        let op = ops[r].clone();
        if matches!(op, Op::Retry(_)) {
            continue; // a retry of itself or of a later op: nothing to re-run
        }
        let key = format!("op-{r}");
        let before = state(&ledger).await;
        let result = apply(&ledger, &clock, &escrows, &key, &op).await;
        let after = state(&ledger).await;
        match &result {
            Err(e) => {
                // Refusals are typed business errors; a database error means a check was
                // left to a constraint (or worse).
                prop_assert!(
                    !matches!(
                        e,
                        tessera_ledger::Error::Database(_) | tessera_ledger::Error::Corrupt(_)
                    ),
                    "{:?} failed with {}",
                    op,
                    e
                );
                prop_assert!(
                    !committed.contains(&r),
                    "retry of committed {:?} failed: {}",
                    op,
                    e
                );
                prop_assert_eq!(&before, &after, "refused {:?} ({}) changed state", op, e);
            }
            Ok((_, true)) => {
                prop_assert!(committed.contains(&r), "fresh key {} replayed", key);
                prop_assert_eq!(&before, &after, "replay of {:?} changed state", op);
            }
            Ok((_, false)) => {
                if !matches!(op, Op::Tick(_)) {
                    prop_assert!(
                        committed.insert(r),
                        "{:?} under key {} applied twice",
                        op,
                        key
                    );
                }
                if let Op::Hold(..) = op {
                    let record = ledger.transaction(&key).await.unwrap().unwrap();
                    let hold: tessera_ledger::Hold = serde_json::from_str(&record.result).unwrap();
                    escrows.push(hold.escrow_id);
                }
            }
        }
        let report = ledger.audit().await.unwrap();
        prop_assert!(
            report.is_clean(),
            "after {:?}: {:?}",
            ops[i],
            report.problems()
        );
    }
    ledger.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operation_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops))?;
    }
}
