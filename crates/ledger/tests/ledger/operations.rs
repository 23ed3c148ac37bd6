//! Each operation's happy path and each bad input: a typed error and no state change.

use tessera_ledger::{AccountId, Error, Ledger, LedgerConfig, SystemAccount};
use tessera_protocol::{Domain, InferenceRequest, Verifier, Wallet, B256};

use crate::{
    both_backends,
    support::{assert_clean, open, wallet, ManualClock},
};

both_backends! {
    transfers_and_idempotent_retries => crate::operations::transfers_and_idempotent_retries;
    bad_inputs_are_typed_errors_without_state_change => crate::operations::bad_inputs;
    escrow_hold_capture_release => crate::operations::escrow;
    settle_and_finish => crate::operations::settle_and_finish;
    stake_unbond_withdraw_slash => crate::operations::stake;
    replayed_nonce_is_rejected => crate::operations::nonces;
    audit_detects_tampering => crate::operations::tampering;
    faucet_only_in_dev_mode => crate::operations::faucet_only_in_dev_mode;
    chain_deposits_and_withdrawals_once => crate::operations::chain_money;
}

/// Every balance the tests touch, to compare before and after a refused operation.
async fn snapshot(ledger: &Ledger) -> Vec<Option<u64>> {
    let mut accounts: Vec<AccountId> = (1..=4).map(|n| wallet(n).into()).collect();
    accounts.extend(
        SystemAccount::ALL
            .into_iter()
            .filter(|a| *a != SystemAccount::Issuance)
            .map(AccountId::from),
    );
    let mut balances = Vec::new();
    for account in accounts {
        balances.push(ledger.balance(account).await.ok());
    }
    balances
}

pub async fn transfers_and_idempotent_retries(url: String) {
    let ledger = open(&url).await;
    let faucet = ledger.faucet().unwrap();
    faucet.mint("mint-1", wallet(1), 1_000).await.unwrap();
    let first = ledger
        .transfer("t-1", wallet(1), wallet(2), 400)
        .await
        .unwrap();
    assert!(!first.replayed);
    let again = ledger
        .transfer("t-1", wallet(1), wallet(2), 400)
        .await
        .unwrap();
    assert!(again.replayed, "retry must replay, not charge again");
    assert_eq!(again.tx_id, first.tx_id);
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 600);
    assert_eq!(ledger.balance(wallet(2)).await.unwrap(), 400);
    // A replayed mint mints nothing.
    assert!(
        faucet
            .mint("mint-1", wallet(1), 1_000)
            .await
            .unwrap()
            .replayed
    );
    // Same key, other arguments: refused.
    assert!(matches!(
        ledger.transfer("t-1", wallet(1), wallet(2), 401).await,
        Err(Error::IdempotencyConflict { .. })
    ));
    assert!(ledger.transaction("t-1").await.unwrap().is_some());
    assert!(ledger.transaction("t-unknown").await.unwrap().is_none());
    ledger
        .transfer("t-2", wallet(2), SystemAccount::Treasury, 100)
        .await
        .unwrap();
    let report = assert_clean(&ledger).await;
    assert_eq!(
        (report.minted, report.burned, report.supply),
        (1_000, 0, 1_000)
    );
    ledger.burn("b-1", wallet(2), 50).await.unwrap();
    let report = assert_clean(&ledger).await;
    assert_eq!(
        (report.minted, report.burned, report.supply),
        (1_000, 50, 950)
    );
}

pub async fn bad_inputs(url: String) {
    let ledger = open(&url).await;
    let faucet = ledger.faucet().unwrap();
    faucet.mint("m", wallet(1), 1_000).await.unwrap();
    ledger.stake("s", wallet(1), 100).await.unwrap();
    let before = snapshot(&ledger).await;

    // Overspending.
    match ledger.transfer("x1", wallet(1), wallet(2), 901).await {
        Err(Error::InsufficientFunds {
            needed: 901,
            available: 900,
            ..
        }) => {}
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    assert!(matches!(
        ledger.hold("x2", wallet(1), 5_000).await,
        Err(Error::InsufficientFunds { .. })
    ));
    assert!(matches!(
        ledger.settle("x3", wallet(1), wallet(2), 901, 1).await,
        Err(Error::InsufficientFunds { needed: 901, .. })
    ));
    // Unknown account.
    assert!(matches!(
        ledger.transfer("x4", wallet(3), wallet(1), 1).await,
        Err(Error::UnknownAccount(_))
    ));
    assert!(matches!(
        ledger.balance(wallet(4)).await,
        Err(Error::UnknownAccount(_))
    ));
    // Overflowing amounts.
    assert!(matches!(
        ledger.transfer("x5", wallet(1), wallet(2), u64::MAX).await,
        Err(Error::Overflow)
    ));
    assert!(matches!(
        faucet.mint("x6", wallet(2), i64::MAX as u64).await,
        Err(Error::Overflow)
    ));
    assert!(matches!(
        ledger.stake("x7", wallet(1), 1 << 63).await,
        Err(Error::Overflow)
    ));
    // Zero, restricted accounts, unknown escrow, too much unstaked.
    assert!(matches!(
        ledger.transfer("x8", wallet(1), wallet(2), 0).await,
        Err(Error::ZeroAmount)
    ));
    assert!(matches!(
        ledger
            .transfer("x9", SystemAccount::Escrow, wallet(2), 1)
            .await,
        Err(Error::RestrictedAccount(_))
    ));
    assert!(matches!(
        ledger.release("x10", 999).await,
        Err(Error::UnknownEscrow(999))
    ));
    assert!(matches!(
        ledger.unstake("x11", wallet(1), 101).await,
        Err(Error::InsufficientStake {
            needed: 101,
            staked: 100,
            ..
        })
    ));
    assert!(matches!(
        ledger.settle("x12", wallet(1), wallet(2), 10, 11).await,
        Err(Error::EscrowExceeded { .. })
    ));

    assert_eq!(
        snapshot(&ledger).await,
        before,
        "a refused operation changed balances"
    );
    for key in [
        "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12",
    ] {
        assert!(
            ledger.transaction(key).await.unwrap().is_none(),
            "{key} left a journal row"
        );
    }
    // A refused key is not burned: the same key succeeds once the request is valid.
    ledger
        .transfer("x1", wallet(1), wallet(2), 900)
        .await
        .unwrap();
    assert_clean(&ledger).await;
}

pub async fn escrow(url: String) {
    let ledger = open(&url).await;
    ledger
        .faucet()
        .unwrap()
        .mint("m", wallet(1), 10_000)
        .await
        .unwrap();
    let hold = ledger.hold("h", wallet(1), 1_000).await.unwrap().value;
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 9_000);
    assert_eq!(ledger.balance(SystemAccount::Escrow).await.unwrap(), 1_000);
    let capture = ledger
        .capture("c1", hold.escrow_id, wallet(2), 300)
        .await
        .unwrap()
        .value;
    assert_eq!((capture.paid, capture.fee), (285, 15), "5% protocol fee");
    ledger
        .capture("c2", hold.escrow_id, wallet(3), 100)
        .await
        .unwrap();
    assert!(matches!(
        ledger.capture("c3", hold.escrow_id, wallet(2), 601).await,
        Err(Error::EscrowExceeded {
            remaining: 600,
            requested: 601,
            ..
        })
    ));
    assert_clean(&ledger).await;
    let release = ledger.release("r", hold.escrow_id).await.unwrap().value;
    assert_eq!(release.refunded, 600);
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 9_600);
    assert_eq!(ledger.balance(SystemAccount::Escrow).await.unwrap(), 0);
    assert_eq!(ledger.balance(SystemAccount::Fees).await.unwrap(), 20);
    let escrow = ledger.escrow(hold.escrow_id).await.unwrap();
    assert_eq!(
        (escrow.held, escrow.captured, escrow.released, escrow.open),
        (1_000, 400, 600, false)
    );
    assert!(matches!(
        ledger.capture("c4", hold.escrow_id, wallet(2), 1).await,
        Err(Error::EscrowClosed(_))
    ));
    assert!(matches!(
        ledger.release("r2", hold.escrow_id).await,
        Err(Error::EscrowClosed(_))
    ));
    assert!(ledger.release("r", hold.escrow_id).await.unwrap().replayed);
    assert_clean(&ledger).await;
}

pub async fn settle_and_finish(url: String) {
    let ledger = open(&url).await;
    ledger
        .faucet()
        .unwrap()
        .mint("m", wallet(1), 10_000)
        .await
        .unwrap();
    let s = ledger
        .settle("s1", wallet(1), wallet(2), 1_000, 200)
        .await
        .unwrap()
        .value;
    assert_eq!(
        (s.paid, s.fee, s.refunded, s.escrow_id),
        (190, 10, 800, None)
    );
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 9_800);
    let s = ledger
        .settle("s2", wallet(1), wallet(2), 1_000, 0)
        .await
        .unwrap()
        .value;
    assert_eq!((s.paid, s.refunded), (0, 1_000));
    let hold = ledger.hold("h", wallet(1), 500).await.unwrap().value;
    let f = ledger
        .finish("f", hold.escrow_id, wallet(3), 500)
        .await
        .unwrap()
        .value;
    assert_eq!((f.paid, f.fee, f.refunded), (475, 25, 0));
    assert!(
        ledger
            .finish("f", hold.escrow_id, wallet(3), 500)
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 9_300);
    assert_eq!(ledger.balance(wallet(2)).await.unwrap(), 190);
    assert_eq!(ledger.balance(wallet(3)).await.unwrap(), 475);
    assert_clean(&ledger).await;
}

pub async fn stake(url: String) {
    let clock = ManualClock::default();
    clock.advance(1_000);
    let ledger = clock.install(open(&url).await);
    ledger
        .faucet()
        .unwrap()
        .mint("m", wallet(1), 20_000)
        .await
        .unwrap();
    ledger.stake("s", wallet(1), 10_000).await.unwrap();
    assert_eq!(ledger.staked(wallet(1)).await.unwrap(), 10_000);
    let unbonding = ledger.unstake("u", wallet(1), 3_000).await.unwrap().value;
    assert_eq!(unbonding.release_at, 1_100);
    assert_eq!(ledger.stake_totals().await.unwrap(), (7_000, 3_000));
    assert!(matches!(
        ledger.withdraw("w", wallet(1)).await,
        Err(Error::NothingToWithdraw(_))
    ));
    clock.advance(100);
    assert_eq!(ledger.withdraw("w", wallet(1)).await.unwrap().value, 3_000);
    assert!(matches!(
        ledger.withdraw("w2", wallet(1)).await,
        Err(Error::NothingToWithdraw(_))
    ));
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 13_000);
    assert_clean(&ledger).await;

    // 20% to the verifier, 30% to the harmed agent, the rest to the treasury.
    let slash = ledger
        .slash("x", wallet(1), 4_000, Some(wallet(2)), Some(wallet(3)))
        .await
        .unwrap()
        .value;
    assert_eq!(
        (
            slash.slashed,
            slash.to_verifier,
            slash.to_agent,
            slash.to_treasury
        ),
        (4_000, 800, 1_200, 2_000)
    );
    assert_eq!(ledger.staked(wallet(1)).await.unwrap(), 3_000);
    // Without a verifier or agent, their shares go to the treasury; more than staked takes all.
    let slash = ledger
        .slash("y", wallet(1), 1_000_000, None, None)
        .await
        .unwrap()
        .value;
    assert_eq!((slash.slashed, slash.to_treasury), (3_000, 3_000));
    assert!(matches!(
        ledger.slash("z", wallet(1), 1, None, None).await,
        Err(Error::InsufficientStake { staked: 0, .. })
    ));
    assert_eq!(
        ledger.balance(SystemAccount::Treasury).await.unwrap(),
        5_000
    );
    assert_clean(&ledger).await;

    // The stake journal the hub records in the vault: every movement in order, with the amount
    // that moved (the second slash asked for 1,000,000 and took the 3,000 staked).
    use tessera_ledger::StakeKind::{Slash, Stake, Unstake, Withdraw};
    let journal = ledger.stake_journal(0, 100).await.unwrap();
    let moves: Vec<_> = journal
        .iter()
        .map(|e| (e.kind, e.provider, e.amount, e.key.as_str()))
        .collect();
    let w = wallet(1);
    assert_eq!(
        moves,
        [
            (Stake, w, 10_000, "s"),
            (Unstake, w, 3_000, "u"),
            (Withdraw, w, 3_000, "w"),
            (Slash, w, 4_000, "x"),
            (Slash, w, 3_000, "y"),
        ]
    );
    let rest = ledger.stake_journal(journal[2].tx_id, 1).await.unwrap();
    assert_eq!((rest.len(), rest[0].key.as_str()), (1, "x"));
    assert_eq!(ledger.stake_totals().await.unwrap(), (0, 0));
}

pub async fn nonces(url: String) {
    let ledger = open(&url).await;
    let agent = Wallet::random();
    let request = InferenceRequest {
        model: B256::repeat_byte(1),
        promptHash: B256::repeat_byte(2),
        maxTokens: 16,
        maxPricePerToken: 3,
        nonce: u64::MAX,
        expiry: 2_000_000_000,
    };
    let signed = agent.sign(request, Domain::default()).unwrap();
    let verifier = Verifier::default();
    assert_eq!(
        verifier
            .verify(&signed, 1_999_990_000, &ledger)
            .await
            .unwrap(),
        agent.address()
    );
    assert!(matches!(
        verifier.verify(&signed, 1_999_990_000, &ledger).await,
        Err(tessera_protocol::Error::ReplayedNonce { .. })
    ));
    // A bad signature is refused before the nonce store is touched.
    let mut forged = signed.clone();
    forged.message.nonce = 1;
    assert!(matches!(
        verifier.verify(&forged, 1_999_990_000, &ledger).await,
        Err(tessera_protocol::Error::WrongSigner { .. })
    ));
    assert!(ledger
        .consume_nonce(agent.address(), "InferenceRequest", 1)
        .await
        .unwrap());
    assert!(matches!(
        ledger
            .use_nonce(agent.address(), "InferenceRequest", 1)
            .await,
        Err(Error::ReplayedNonce { nonce: 1, .. })
    ));
}

pub async fn tampering(url: String) {
    let ledger = open(&url).await;
    ledger
        .faucet()
        .unwrap()
        .mint("m", wallet(1), 1_000)
        .await
        .unwrap();
    ledger
        .transfer("t", wallet(1), wallet(2), 100)
        .await
        .unwrap();
    assert_clean(&ledger).await;
    // Edit a balance behind the ledger's back: the audit must notice.
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
        .bind(tessera_ledger::AccountId::from(wallet(2)).key())
        .execute(&pool)
        .await
        .unwrap();
    let report = ledger.audit().await.unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.balance_mismatches.len(), 1);
    assert!(report.problems().iter().any(|p| p.contains("supply")));
    // An unbalanced journal row is caught too.
    sqlx::query("UPDATE entries SET amount = amount + 5 WHERE seq = 0 AND tx_id = (SELECT MIN(tx_id) FROM entries)")
        .execute(&pool)
        .await
        .unwrap();
    let report = ledger.audit().await.unwrap();
    assert_eq!(report.unbalanced_transactions.len(), 1);
    pool.close().await;
}

pub async fn faucet_only_in_dev_mode(url: String) {
    let ledger = Ledger::open(&url, LedgerConfig::default()).await.unwrap();
    assert!(ledger.faucet().is_none());
    assert_clean(&ledger).await;
}

pub async fn chain_money(url: String) {
    let ledger = open(&url).await;
    let credited = ledger
        .credit_deposit("deposit:0xaa:0", wallet(1), 5_000)
        .await
        .unwrap();
    assert!(!credited.replayed);
    // The same on-chain deposit seen again (a restarted watcher) credits nothing.
    assert!(
        ledger
            .credit_deposit("deposit:0xaa:0", wallet(1), 5_000)
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(ledger.balance(wallet(1)).await.unwrap(), 5_000);
    ledger
        .debit_withdrawal("withdraw:1", wallet(1), 1_200)
        .await
        .unwrap();
    assert!(
        ledger
            .debit_withdrawal("withdraw:1", wallet(1), 1_200)
            .await
            .unwrap()
            .replayed
    );
    // More than the balance: refused, nothing moves.
    let before = snapshot(&ledger).await;
    assert!(matches!(
        ledger
            .debit_withdrawal("withdraw:2", wallet(1), 3_801)
            .await,
        Err(Error::InsufficientFunds { .. })
    ));
    assert_eq!(snapshot(&ledger).await, before);
    // Faucet money is not owed to the vault.
    ledger
        .faucet()
        .unwrap()
        .mint("mint-1", wallet(2), 700)
        .await
        .unwrap();
    assert_eq!(ledger.chain_liabilities().await.unwrap(), 3_800);
    let report = assert_clean(&ledger).await;
    assert_eq!((report.minted, report.burned), (5_700, 1_200));
}
