//! Batched settlement ([`Ledger::settle_many`], and `settle` under group commit) must decide
//! every job exactly as settling it alone would.

use rand::{rngs::StdRng, Rng, SeedableRng};
use tessera_ledger::{Ledger, LedgerConfig, Receipt, Result, SettleRequest, Settlement};

use crate::{
    both_backends,
    support::{assert_clean, wallet},
};

both_backends! {
    settle_many_matches_one_by_one => crate::batches::settle_many_matches_one_by_one;
}

/// A result reduced to what must agree between the two paths.
fn outcome(result: &Result<Receipt<Settlement>>) -> String {
    match result {
        Ok(receipt) => format!("ok {:?} replayed={}", receipt.value, receipt.replayed),
        Err(e) => format!("err {e}"),
    }
}

fn requests(seed: u64) -> Vec<SettleRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<SettleRequest> = Vec::new();
    for i in 0..150 {
        // Wallets 1..=6 are funded (unevenly), 7 never is: unknown payer.
        let payer = wallet(rng.random_range(1..=7));
        let payee = wallet(rng.random_range(1..=8));
        let max_cost = rng.random_range(1..=4_000u64);
        let used = if rng.random_bool(0.05) {
            max_cost + 1
        } else {
            rng.random_range(0..=max_cost)
        };
        let request = match rng.random_range(0..10) {
            // Same key, same request, as an earlier job of this list.
            0 if !out.is_empty() => out[rng.random_range(0..out.len())].clone(),
            // Same key as an earlier job but other arguments.
            1 if !out.is_empty() => {
                let mut r = out[rng.random_range(0..out.len())].clone();
                r.used = r.used.wrapping_add(1).min(r.max_cost);
                r.max_cost += 1;
                r
            }
            // A key settled by an earlier call.
            2 => SettleRequest {
                key: format!("earlier-{}", rng.random_range(0..5)),
                payer: wallet(1),
                payee: wallet(2),
                max_cost: 10,
                used: 5,
            },
            _ => SettleRequest {
                key: format!("{seed}-{i}"),
                payer,
                payee,
                max_cost,
                used,
            },
        };
        out.push(request);
    }
    out
}

async fn fund(ledger: &Ledger) {
    let faucet = ledger.faucet().unwrap();
    for w in 1..=6u8 {
        faucet
            .mint(&format!("fund-{w}"), wallet(w), u64::from(w) * 6_000)
            .await
            .unwrap();
    }
    for k in 0..5 {
        ledger
            .settle(&format!("earlier-{k}"), wallet(1), wallet(2), 10, 5)
            .await
            .unwrap();
    }
}

pub async fn settle_many_matches_one_by_one(url: String) {
    let batched = Ledger::open(&url, LedgerConfig::dev()).await.unwrap();
    let alone_db = crate::support::sqlite();
    let alone = Ledger::open(
        &alone_db.url,
        LedgerConfig {
            group_commit: false,
            ..LedgerConfig::dev()
        },
    )
    .await
    .unwrap();
    fund(&batched).await;
    fund(&alone).await;
    for seed in 0..4 {
        let requests = requests(seed);
        let many = batched.settle_many(&requests).await;
        assert_eq!(many.len(), requests.len());
        for (i, (request, got)) in requests.iter().zip(&many).enumerate() {
            let single = alone
                .settle(
                    &request.key,
                    request.payer,
                    request.payee,
                    request.max_cost,
                    request.used,
                )
                .await;
            assert_eq!(
                outcome(got),
                outcome(&single),
                "seed {seed}, job {i}: {request:?}"
            );
        }
        for w in 1..=8u8 {
            assert_eq!(
                batched.balance(wallet(w)).await.ok(),
                alone.balance(wallet(w)).await.ok(),
                "seed {seed}: balance of wallet {w}"
            );
        }
        assert_clean(&batched).await;
        assert_clean(&alone).await;
    }
    let stats = batched.batch_stats();
    assert_eq!(
        stats.fallbacks, 0,
        "the database refused a batch the ledger decided"
    );
    assert!(stats.batches >= 8, "settle_many did not batch: {stats:?}");
}
