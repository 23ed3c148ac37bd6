//! 10,000 concurrent operations from 16 tasks: no lost update, no negative balance, audit clean.

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use tessera_ledger::{Ledger, SystemAccount};
use tessera_protocol::Address;

use crate::{
    both_backends,
    support::{assert_clean, open, wallet},
};

const TASKS: usize = 16;
const OPS: usize = 10_000;
const HOT: u8 = 4;
const START: u64 = 1_000_000_000;

both_backends! {
    ten_thousand_operations_from_sixteen_tasks => crate::concurrency::ten_thousand_operations;
}

/// Net change each task expects on each account it touched.
type Deltas = HashMap<Address, i128>;

pub async fn ten_thousand_operations(url: String) {
    let ledger = open(&url).await;
    let faucet = ledger.faucet().unwrap();
    // Hot accounts every task moves money between: contention on the same rows.
    for h in 0..HOT {
        faucet
            .mint(&format!("fund-hot-{h}"), wallet(100 + h), START)
            .await
            .unwrap();
    }
    for t in 0..TASKS {
        faucet
            .mint(&format!("fund-task-{t}"), wallet(t as u8 + 1), START)
            .await
            .unwrap();
    }
    let provider = wallet(200);
    let fee_bps = i128::from(ledger.config().fee_bps);

    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let ledger: Ledger = ledger.clone();
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(t as u64);
            let me = wallet(t as u8 + 1);
            let mut deltas = Deltas::new();
            let mut fees = 0i128;
            let mut ops = 0;
            let mut commits = 0;
            let mut i = 0;
            while ops < OPS / TASKS {
                let key = format!("task-{t}-op-{i}");
                i += 1;
                match rng.random_range(0..10) {
                    0..=3 => {
                        let from = wallet(100 + rng.random_range(0..HOT));
                        let to = wallet(100 + rng.random_range(0..HOT));
                        let amount = rng.random_range(1..=50u64);
                        ledger.transfer(&key, from, to, amount).await.unwrap();
                        *deltas.entry(from).or_default() -= i128::from(amount);
                        *deltas.entry(to).or_default() += i128::from(amount);
                        ops += 1;
                        commits += 1;
                    }
                    4..=6 => {
                        let used = rng.random_range(0..=1_000u64);
                        let s = ledger
                            .settle(&key, me, provider, 1_000, used)
                            .await
                            .unwrap()
                            .value;
                        assert_eq!(i128::from(s.fee), i128::from(used) * fee_bps / 10_000);
                        *deltas.entry(me).or_default() -= i128::from(used);
                        *deltas.entry(provider).or_default() += i128::from(s.paid);
                        fees += i128::from(s.fee);
                        ops += 1;
                        commits += 1;
                    }
                    7 => {
                        let hold = ledger.hold(&key, me, 700).await.unwrap().value;
                        let f = ledger
                            .finish(&format!("{key}-finish"), hold.escrow_id, provider, 300)
                            .await
                            .unwrap()
                            .value;
                        *deltas.entry(me).or_default() -= 300;
                        *deltas.entry(provider).or_default() += i128::from(f.paid);
                        fees += i128::from(f.fee);
                        ops += 2;
                        commits += 2;
                    }
                    _ => {
                        // A retried key must change nothing.
                        ledger.transfer(&key, me, me, 1).await.unwrap();
                        let again = ledger.transfer(&key, me, me, 1).await.unwrap();
                        assert!(again.replayed);
                        ops += 2;
                        commits += 1;
                    }
                }
            }
            (deltas, fees, ops, commits)
        });
    }
    let mut expected: HashMap<Address, i128> = HashMap::new();
    let mut fees = 0i128;
    let mut ops = 0;
    let mut commits = 0;
    while let Some(done) = tasks.join_next().await {
        let (deltas, task_fees, task_ops, task_commits) = done.expect("task panicked");
        for (account, delta) in deltas {
            *expected.entry(account).or_default() += delta;
        }
        fees += task_fees;
        ops += task_ops;
        commits += task_commits;
    }
    assert!(ops >= OPS);

    // No lost update: every balance is exactly what the acknowledged operations imply.
    for (account, delta) in &expected {
        let start = if *account == provider {
            0
        } else {
            i128::from(START)
        };
        let balance = ledger.balance(*account).await.unwrap();
        assert_eq!(i128::from(balance), start + delta, "balance of {account}");
    }
    assert_eq!(
        i128::from(ledger.balance(SystemAccount::Fees).await.unwrap()),
        fees
    );
    let report = assert_clean(&ledger).await;
    assert!(report.negative_balances.is_empty());
    // Exactly one journal transaction per committed operation plus the funding mints.
    assert_eq!(report.transactions as usize, commits + TASKS + HOT as usize);
}
