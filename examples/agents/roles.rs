//! The example agents of the task market, as functions over the `tessera-agent` SDK:
//!
//! - the **curator** posts tasks to build a small dataset (each task names a reference inference,
//!   so a dispute is settled by re-executing it), checks every delivery by running the reference
//!   itself, accepts the good and rejects the bad;
//! - the **writer** claims a task, does the work with inference on the network and delivers it;
//! - the **lazy writer** claims, delivers junk, disputes the rejection, and loses its bond when
//!   the network re-executes the reference.
//!
//! [`run_market`] plays one round of all three; `market.rs` runs it against a hub and prints
//! the money flowing; the integration test `crates/cli/tests/agents.rs` runs the same round
//! and checks every balance.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tessera_agent::{ChatMessage, ChatRequest, Client, Task};
use tessera_protocol::Wallet;

/// An error of an example agent.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The model every agent here uses.
pub const MODEL: &str = "smollm2-135m";
/// What the curator pays per accepted row.
pub const BOUNTY: u64 = 10_000;
/// What a writer bonds to claim.
pub const WORKER_BOND: u64 = 3_000;
/// What the curator bonds per task (lost to a worker whose dispute it loses).
pub const POSTER_BOND: u64 = 1_000;

/// What one round did, for the printout and the test.
#[derive(Debug, Default)]
pub struct Round {
    /// The dataset the curator kept: one JSON object per accepted delivery.
    pub dataset: Vec<Value>,
    /// The honest writer's task and its final state.
    pub good: (String, String),
    /// The lazy writer's task and its final state.
    pub bad: (String, String),
    /// What the writer's inference cost it.
    pub writer_inference: u64,
    /// What the curator's checks cost it.
    pub curator_checks: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The inference a task names as its reference, as a chat request.
fn reference_chat(task: &Task) -> Result<ChatRequest, BoxError> {
    let r = &task.spec["reference"]["request"];
    let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone())?;
    Ok(ChatRequest {
        model: task.spec["reference"]["model"]
            .as_str()
            .unwrap_or(MODEL)
            .to_owned(),
        messages,
        max_tokens: r["max_tokens"].as_u64().map(|n| n as u32),
        temperature: r["sampling"]["temperature"].as_f64().map(|t| t as f32),
        seed: r["sampling"]["seed"].as_u64(),
        ..Default::default()
    })
}

/// The curator posts one task: write the answer to `prompt`, as the reference inference would.
pub fn post(curator: &Client, prompt: &str, seed: u64) -> Result<Task, BoxError> {
    let spec = json!({
        "kind": "writing",
        "title": format!("Dataset row: {prompt}"),
        "description": "Answer the prompt with the reference model and settings.",
        "input": prompt,
        "deadline": now() + 600,
        "worker_bond": WORKER_BOND,
        "review_secs": 600,
        "acceptance": {"by": "poster"},
        "reference": {"model": MODEL, "request": {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 12, "sampling": {"temperature": 0.0, "seed": seed}, "stop": []}},
    });
    Ok(curator.post_task(&spec.to_string(), BOUNTY, POSTER_BOND)?)
}

/// The writer claims a task, runs its reference on the network and delivers the text; returns
/// what the inference cost.
pub fn write(writer: &Client, id: &str) -> Result<u64, BoxError> {
    let task = writer.claim(id)?;
    let answer = writer.chat(&reference_chat(&task)?)?;
    writer.deliver(id, &answer.text)?;
    Ok(answer.receipt.cost)
}

/// The lazy writer claims and delivers junk.
pub fn write_junk(lazy: &Client, id: &str) -> Result<(), BoxError> {
    lazy.claim(id)?;
    lazy.deliver(id, "lorem ipsum dolor sit amet")?;
    Ok(())
}

/// The curator checks a delivery by running the reference itself: accepts a match (keeping the
/// row), rejects anything else. Returns whether it accepted and what the check cost.
pub fn review(
    curator: &Client,
    id: &str,
    dataset: &mut Vec<Value>,
) -> Result<(bool, u64), BoxError> {
    let task = curator.task(id)?;
    let expected = curator.chat(&reference_chat(&task)?)?;
    let delivered = task.delivery.clone().unwrap_or_default();
    let good = delivered.trim() == expected.text.trim();
    if good {
        curator.accept(id)?;
        dataset.push(json!({"prompt": task.spec["input"], "completion": delivered}));
    } else {
        curator.reject(id)?;
    }
    Ok((good, expected.receipt.cost))
}

/// Waits until a task is settled; returns its final state.
pub fn settled(client: &Client, id: &str, within: Duration) -> Result<String, BoxError> {
    let deadline = Instant::now() + within;
    loop {
        let t = client.task(id)?;
        if t.settled {
            return Ok(t.state);
        }
        if Instant::now() > deadline {
            return Err(format!("task {id} is still {} after {within:?}", t.state).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One round: the curator posts two rows, the writer takes one, the lazy writer the other; the
/// curator reviews both; the lazy writer disputes and the network decides. `say` gets each step.
pub fn run_market(
    hub: &str,
    curator: &Wallet,
    writer: &Wallet,
    lazy: &Wallet,
    mut say: impl FnMut(String),
) -> Result<Round, BoxError> {
    let (c, w, l) = (
        Client::new(hub, curator)?,
        Client::new(hub, writer)?,
        Client::new(hub, lazy)?,
    );
    let mut round = Round::default();
    let good = post(&c, "Name a primary color.", 3)?;
    let bad = post(&c, "Name a large ocean.", 4)?;
    say(format!(
        "curator posted {} and {}: {BOUNTY} bounty + {POSTER_BOND} bond each, held in escrow",
        &good.id[..10],
        &bad.id[..10]
    ));
    round.writer_inference = write(&w, &good.id)?;
    say(format!(
        "writer claimed {} (bond {WORKER_BOND}), ran the reference for {} and delivered",
        &good.id[..10],
        round.writer_inference
    ));
    write_junk(&l, &bad.id)?;
    say(format!(
        "lazy writer claimed {} (bond {WORKER_BOND}) and delivered junk",
        &bad.id[..10]
    ));
    for id in [&good.id, &bad.id] {
        let (accepted, cost) = review(&c, id, &mut round.dataset)?;
        round.curator_checks += cost;
        say(format!(
            "curator re-ran {} for {cost}: {}",
            &id[..10],
            if accepted {
                "it matches, accepted"
            } else {
                "junk, rejected"
            }
        ));
    }
    l.dispute(&bad.id)?;
    say(format!(
        "lazy writer disputed {}; the network re-executes the reference",
        &bad.id[..10]
    ));
    round.good = (
        good.id.clone(),
        settled(&c, &good.id, Duration::from_secs(60))?,
    );
    round.bad = (
        bad.id.clone(),
        settled(&c, &bad.id, Duration::from_secs(90))?,
    );
    say(format!(
        "{} is {}; {} is {}",
        &good.id[..10],
        round.good.1,
        &bad.id[..10],
        round.bad.1
    ));
    Ok(round)
}
