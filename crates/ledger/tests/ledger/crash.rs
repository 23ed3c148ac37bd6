//! Crash safety: a child process doing transfers and settlements is SIGKILLed at random points, 20 times.
//! After each kill the books must audit clean and every operation the child acknowledged
//! (printed after its commit returned) must be in the journal.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use tessera_ledger::{Ledger, LedgerConfig};

use crate::support::{assert_clean, wallet};

const CHILD_DB: &str = "TESSERA_CRASH_CHILD_DB";
const CHILD_START: &str = "TESSERA_CRASH_CHILD_START";
const SEED: u64 = 1_000_000;

/// The child's body. Runs only when re-invoked by [`sigkill_at_random_points`] with the env
/// vars set; as an ordinary test it returns at once.
#[tokio::test]
async fn child_process_entry_point() {
    let (Ok(url), Ok(start)) = (std::env::var(CHILD_DB), std::env::var(CHILD_START)) else {
        return;
    };
    let start: u64 = start.parse().unwrap();
    let ledger = Ledger::open(&url, LedgerConfig::dev()).await.unwrap();
    let faucet = ledger.faucet().unwrap();
    faucet.mint("seed-a", wallet(1), SEED).await.unwrap();
    faucet.mint("seed-b", wallet(2), SEED).await.unwrap();
    for i in start.. {
        let (from, to) = if i % 2 == 0 {
            (wallet(1), wallet(2))
        } else {
            (wallet(2), wallet(1))
        };
        let key = format!("op-{i}");
        if i % 3 == 2 {
            // A settlement too, so the group-commit path is killed mid-batch as well.
            ledger.settle(&key, from, to, 20, i % 21).await.unwrap();
        } else {
            ledger.transfer(&key, from, to, i % 7 + 1).await.unwrap();
        }
        println!("ACK {i}");
    }
}

#[tokio::test]
async fn sigkill_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for round in 0..20 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::child_process_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &url)
            .env(CHILD_START, next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let acks = acks.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(i) = line.strip_prefix("ACK ") {
                        acks.lock().unwrap().push(i.trim().parse::<u64>().unwrap());
                    }
                }
            })
        };
        // Let it run a random while (start-up included), then SIGKILL it mid-flight.
        let ran_for = Duration::from_millis(rng.random_range(50..400));
        tokio::time::sleep(ran_for).await;
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        let acks = acks.lock().unwrap().clone();
        acknowledged.extend(&acks);

        let ledger = Ledger::open(&url, LedgerConfig::dev()).await.unwrap();
        let report = assert_clean(&ledger).await;
        for i in &acknowledged {
            assert!(
                ledger
                    .transaction(&format!("op-{i}"))
                    .await
                    .unwrap()
                    .is_some(),
                "round {round}: acknowledged op-{i} lost"
            );
        }
        if report.transactions > 0 {
            // Conservation: transfers and settlements only move money between the two wallets
            // and the fees account.
            let fees = ledger
                .balance(tessera_ledger::SystemAccount::Fees)
                .await
                .unwrap();
            let total = ledger.balance(wallet(1)).await.unwrap()
                + ledger.balance(wallet(2)).await.unwrap()
                + fees;
            assert_eq!(total, report.supply as u64);
        }
        ledger.close().await;
        // Restart a few operations back: those retries must replay, not apply twice.
        if let Some(last) = acks.last() {
            next = last.saturating_sub(3);
        }
    }
    assert!(
        acknowledged.len() > 20,
        "the child made too little progress to test anything"
    );
    // Every op id is in the journal at most once and the count matches the distinct ids seen.
    let ledger = Ledger::open(&url, LedgerConfig::dev()).await.unwrap();
    let mut distinct = acknowledged.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let report = assert_clean(&ledger).await;
    // Two seeds plus at least every distinct acknowledged transfer (a killed in-flight one may
    // have committed without being acknowledged).
    assert!(report.transactions as usize >= distinct.len() + 2);
}
