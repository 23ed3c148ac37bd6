//! Agents with wallets on a real network (a `tessera hub` and a `tessera node` process, the real
//! SmolLM2-135M model): spending policies of session keys refuse every limit by name and move
//! no money, a sponsor's budget holds, and the example agents' market moves money as it should.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tessera_agent::{ChatMessage, ChatRequest, Client, Error, PolicyLimits};
use tessera_protocol::{Address, Wallet};

mod support {
    pub mod network;
}
use support::network::start_hub;

fn question(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: "smollm2-135m".into(),
        messages: vec![ChatMessage::new("user", "What is the capital of France?")],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// The limit a refusal names, or an error for anything else.
fn refused_by<T: std::fmt::Debug>(result: tessera_agent::Result<T>) -> Result<String> {
    match result {
        Err(Error::Policy { limit, .. }) => Ok(limit),
        other => bail!("expected a policy refusal, got {other:?}"),
    }
}

fn writing_spec() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    json!({"kind": "writing", "title": "one line", "deadline": now + 600, "worker_bond": 100,
           "review_secs": 600, "acceptance": {"by": "poster"}})
    .to_string()
}

/// One network, every limit: price per token, per request, per day (cumulative, counted at the
/// charged cost), model, provider, task kind, expiry and revocation each refuse by name with the
/// owner's balance unchanged; a session key's spending is its owner's; a sponsor's budget holds;
/// the CLI's `policy grant|show|revoke` go through the same API; the audit is clean.
#[test]
fn spending_policies_refuse_every_limit_by_name_and_a_sponsors_budget_holds() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 5, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let owner_wallet = Wallet::random();
    hub.fund(&owner_wallet, 100_000)?;
    let owner = Client::signer(&hub.url, &owner_wallet);
    let session_wallet = Wallet::random();
    let session_hex = format!("{:#x}", session_wallet.address());

    // The grant through the CLI.
    let granted = hub.cli(
        Some(&owner_wallet),
        &[
            "policy",
            "grant",
            &session_hex,
            "--max-price",
            "5",
            "--per-request",
            "1500",
            "--per-day",
            "50000",
            "--model",
            "smollm2-135m",
            "--task-kind",
            "writing",
        ],
    )?;
    assert_eq!(granted["owner"], format!("{:#x}", owner_wallet.address()));
    let session = Client::new(&hub.url, &session_wallet)?;

    // Within the limits: the owner pays, the session key holds nothing.
    let answer = session.chat(&question(8))?;
    assert!(answer.receipt.cost > 0);
    let mut charged = answer.receipt.cost;
    assert_eq!(hub.balance(&owner_wallet)?, 100_000 - charged);
    assert_eq!(hub.balance(&session_wallet)?, 0);
    hub.wait_no_holds(Duration::from_secs(15))?;
    let shown = hub.cli(None, &["policy", "show", &session_hex])?;
    assert_eq!(
        shown["spent_today"], charged,
        "the day counts the charged cost"
    );

    let before = hub.balance(&owner_wallet)?;
    let refusals = [
        (
            "maxPricePerToken",
            session.chat(&ChatRequest {
                max_price: Some(6),
                ..question(8)
            }),
        ),
        (
            "models",
            session.chat(&ChatRequest {
                model: "another-model".into(),
                ..question(8)
            }),
        ),
        ("perRequestCap", session.chat(&question(400))),
    ];
    for (limit, result) in refusals {
        assert_eq!(refused_by(result)?, limit);
    }
    let spec = writing_spec();
    let code_spec = spec.replace("\"writing\"", "\"code\"");
    assert_eq!(
        refused_by(session.post_task(&code_spec, 500, 0))?,
        "taskKinds"
    );
    assert_eq!(
        refused_by(session.post_task(&spec, 1_501, 0))?,
        "perRequestCap"
    );
    assert_eq!(
        hub.balance(&owner_wallet)?,
        before,
        "refusals moved nothing"
    );

    // The session posts and cancels for its owner.
    let task = session.post_task(&spec, 1_000, 0)?;
    assert_eq!(task.poster, owner_wallet.address());
    assert_eq!(hub.balance(&owner_wallet)?, before - 1_000);
    assert_eq!(session.cancel(&task.id)?.state, "cancelled");
    assert_eq!(hub.balance(&owner_wallet)?, before);
    charged += 1_000; // a posting counts what it held

    // Per day, cumulatively: a replacing grant whose day cap leaves less than a request holds.
    let spent = session.policy(session_wallet.address())?.spent_today;
    assert_eq!(spent, charged);
    let mut limits = PolicyLimits {
        max_price_per_token: 5,
        per_request_cap: 1_500,
        per_day_cap: spent + 10,
        models: vec!["smollm2-135m".into()],
        ..PolicyLimits::default()
    };
    owner.grant_policy(session_wallet.address(), &limits)?;
    assert_eq!(refused_by(session.chat(&question(8)))?, "perDayCap");
    // Providers: only one that is not serving.
    limits.per_day_cap = u64::MAX;
    limits.providers = vec![Address::repeat_byte(0x42)];
    owner.grant_policy(session_wallet.address(), &limits)?;
    assert_eq!(refused_by(session.chat(&question(8)))?, "providers");
    limits.providers = vec![provider.address()];
    owner.grant_policy(session_wallet.address(), &limits)?;
    session.chat(&question(4))?;
    let before = hub.balance(&owner_wallet)?;

    // Revocation through the CLI ends the key for everything.
    let revoked = hub.cli(Some(&owner_wallet), &["policy", "revoke", &session_hex])?;
    assert_eq!(revoked["revoked"], true);
    assert_eq!(refused_by(session.chat(&question(4)))?, "revoked");
    assert_eq!(refused_by(session.post_task(&spec, 100, 0))?, "revoked");
    // Expiry: a key valid for two seconds.
    let short_wallet = Wallet::random();
    owner.grant_policy(
        short_wallet.address(),
        &PolicyLimits {
            valid_for_secs: 2,
            ..PolicyLimits::default()
        },
    )?;
    let short = Client::new(&hub.url, &short_wallet)?;
    std::thread::sleep(Duration::from_millis(3_100));
    assert_eq!(refused_by(short.chat(&question(4)))?, "validUntil");
    assert_eq!(
        hub.balance(&owner_wallet)?,
        before,
        "refusals moved nothing"
    );

    // A sponsor funds a writer's inference within a budget; the writer's own wallet is untouched.
    let sponsor_wallet = Wallet::random();
    hub.fund(&sponsor_wallet, 50_000)?;
    let writer_wallet = Wallet::random();
    hub.fund(&writer_wallet, 7_000)?;
    let sponsored_key = Wallet::random();
    let budget = 1_200;
    Client::signer(&hub.url, &sponsor_wallet).grant_policy(
        sponsored_key.address(),
        &PolicyLimits {
            max_price_per_token: 5,
            total_cap: budget,
            ..PolicyLimits::default()
        },
    )?;
    let sponsored = Client::new(&hub.url, &sponsored_key)?;
    let mut paid = 0;
    let limit = loop {
        match sponsored.chat(&question(4)) {
            Ok(a) => paid += a.receipt.cost,
            Err(Error::Policy { limit, .. }) => break limit,
            Err(e) => return Err(e).context("a sponsored chat"),
        }
        if paid > budget {
            bail!("the sponsor paid {paid}, over its budget {budget}");
        }
    };
    assert_eq!(limit, "totalCap");
    assert!(paid > 0 && paid <= budget, "paid {paid}");
    assert_eq!(hub.balance(&sponsor_wallet)?, 50_000 - paid);
    assert_eq!(hub.balance(&writer_wallet)?, 7_000);
    assert_eq!(sponsored.policy(sponsored_key.address())?.spent_total, paid);

    hub.wait_no_holds(Duration::from_secs(15))?;
    hub.audit()
}

#[path = "../../../examples/agents/roles.rs"]
mod roles;

/// The example agents' round (what `examples/agents/run.sh` prints): the curator pays the honest
/// writer and keeps its row, rejects the junk; the lazy writer disputes, the network re-executes
/// the reference, and the lazy writer's bond goes to the curator. Every balance is checked to
/// the micro-unit where it is known (fees are 5 %), and the audit is clean.
#[test]
fn example_agents_hire_check_pay_and_the_lazy_writer_loses_its_bond() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 5, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (curator, writer, lazy) = (Wallet::random(), Wallet::random(), Wallet::random());
    hub.fund(&curator, 100_000)?;
    hub.fund(&writer, 10_000)?;
    hub.fund(&lazy, 10_000)?;
    let round = roles::run_market(&hub.url, &curator, &writer, &lazy, |line| {
        eprintln!("{line}")
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(round.good.1, "accepted");
    assert_eq!(round.bad.1, "poster_won");
    assert_eq!(round.dataset.len(), 1, "{:?}", round.dataset);
    let fee = |amount: u64| amount * 500 / 10_000;
    assert_eq!(
        hub.balance(&writer)?,
        10_000 - round.writer_inference + roles::BOUNTY - fee(roles::BOUNTY),
        "the bounty less the fee, the bond back, the inference paid"
    );
    assert_eq!(
        hub.balance(&curator)?,
        100_000 - roles::BOUNTY - round.curator_checks + roles::WORKER_BOND
            - fee(roles::WORKER_BOND),
        "one bounty paid, both poster bonds back, the lazy writer's bond won"
    );
    let lazy_after = hub.balance(&lazy)?;
    assert!(
        lazy_after < 10_000 - roles::WORKER_BOND
            && lazy_after > 10_000 - roles::WORKER_BOND - 2_000,
        "the bond and the re-execution are gone: {lazy_after}"
    );
    hub.wait_no_holds(Duration::from_secs(15))?;

    // Acceptance by a judge model: one verified inference on a provider that is neither party,
    // paid by the poster, decides the delivery; an unknown judge model is refused at posting.
    let poster = Client::new(&hub.url, &curator)?;
    let worker = Client::new(&hub.url, &writer)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let judged_spec = |model: &str| {
        json!({"kind": "writing", "title": "a sentence about the sea", "deadline": now + 600,
               "worker_bond": 100, "review_secs": 600,
               "acceptance": {"by": "judge", "model": model,
                              "rubric": "The delivery is one English sentence about the sea."}})
        .to_string()
    };
    let before = hub.balance(&curator)?;
    match poster.post_task(&judged_spec("no-such-model"), 500, 0) {
        Err(Error::Api {
            status: 400,
            message,
            ..
        }) => {
            assert!(message.contains("no-such-model"), "{message}")
        }
        other => bail!("an unknown judge model was not refused: {other:?}"),
    }
    assert_eq!(
        hub.balance(&curator)?,
        before,
        "a refused posting moved money"
    );
    let task = poster.post_task(&judged_spec("smollm2-135m"), 500, 0)?;
    worker.claim(&task.id)?;
    worker.deliver(&task.id, "The sea is wide, deep and blue.")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let decided = loop {
        let t = poster.task(&task.id)?;
        if t.settled {
            break t;
        }
        if std::time::Instant::now() > deadline {
            bail!("the judge never decided: {t:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        ["accepted", "refused"].contains(&decided.state.as_str()),
        "{decided:?}"
    );
    let outcome = decided.outcome.clone().unwrap_or_default();
    eprintln!("judged task: {} ({outcome})", decided.state);
    assert!(
        outcome.starts_with("judged ") && outcome.contains(&format!("{:#x}", provider.address())),
        "decided by the judge on the independent provider: {outcome}"
    );
    assert!(
        hub.balance(&curator)? < before,
        "the poster paid the judge (and the bounty if it passed)"
    );
    hub.wait_no_holds(Duration::from_secs(15))?;
    hub.audit()
}
