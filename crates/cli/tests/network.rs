//! The network end to end: a real `tessera hub` and real `tessera node` processes on loopback
//! ports, a temporary SQLite ledger and the real SmolLM2-135M model.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{ApiKeyRegistration, Domain, Wallet};

mod support {
    pub mod network;
    pub mod python;
}
use support::network::{http, start_hub, start_strict_hub, Hub, Proc, BIN};

fn question(max_tokens: u32) -> Value {
    json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn header_u64(headers: &ureq::http::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[test]
fn chat_completion_non_streaming_and_streaming() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 7, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;

    let models = hub.get("/v1/models")?;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2-135m");

    // Non-streaming.
    let (status, headers, body) = hub.chat(&key, &question(12))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?;
    assert!(text.contains("Paris"), "{text}");
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().context("usage")?;
    let prompt = usage["prompt_tokens"].as_u64().context("usage")?;
    assert!((1..=12).contains(&completion) && prompt > 5, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    let cost = header_u64(&headers, "x-tessera-cost").context("x-tessera-cost")?;
    // Generated tokens at the price, prompt tokens at a quarter of it (rounded up).
    let prompt_cost = (prompt * 7 * 2500).div_ceil(10_000);
    assert_eq!(cost, completion * 7 + prompt_cost);
    assert_eq!(body["tessera"]["cost"].as_u64(), Some(cost));
    let named = headers
        .get("x-tessera-provider")
        .context("x-tessera-provider")?
        .to_str()?;
    assert!(named.eq_ignore_ascii_case(&format!("{:#x}", provider.address())));
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - cost);

    // Streaming, with the usage chunk.
    let mut request = question(12);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(&request)?;
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .get("content-type")
        .context("content-type")?
        .to_str()?
        .starts_with("text/event-stream"));
    let mut chunks = Vec::new();
    let mut done = false;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        chunks.push(serde_json::from_str::<Value>(data)?);
    }
    assert!(done, "the stream must end with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, text,
        "greedy streaming must match the non-streaming answer"
    );
    let usage_chunk = chunks.last().context("usage chunk")?;
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"].as_u64(),
        Some(completion)
    );
    let finish = &chunks[chunks.len() - 2];
    assert!(finish["choices"][0]["finish_reason"].is_string());
    let stream_cost = finish["tessera"]["cost"]
        .as_u64()
        .context("cost in the last chunk")?;
    assert_eq!(usage_chunk["usage"]["prompt_tokens"].as_u64(), Some(prompt));
    assert_eq!(stream_cost, completion * 7 + prompt_cost);
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - cost - stream_cost);

    // The provider got paid minus the 5% fee.
    let (paid, staked) = hub.account(&provider)?;
    assert_eq!(
        paid,
        (cost - cost * 500 / 10_000) + (stream_cost - stream_cost * 500 / 10_000)
    );
    assert_eq!(staked, 1_000_000);

    // Concurrent jobs are decoded together on the node (capacity 2) and all answered.
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let jobs: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| hub.chat(&key, &question(6)).map(|r| r.0)))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("thread").unwrap_or(0))
            .collect()
    });
    assert_eq!(answers, vec![200, 200, 200]);
    let metrics = http()
        .get(format!("{}/metrics", hub.url))
        .call()?
        .body_mut()
        .read_to_string()?;
    assert!(
        metrics.contains("tessera_jobs_total{outcome=\"completed\"} 5"),
        "{metrics}"
    );
    assert_eq!(hub.get("/health")?["status"], "ok");
    hub.audit()
}

#[test]
fn cheating_provider_is_slashed_and_quarantined() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1", "--slash-amount", "500000"])?;
    let honest_a = Wallet::random();
    let honest_b = Wallet::random();
    let cheater = Wallet::random();
    // The cheater undercuts the honest providers, so the scheduler picks it first.
    let _a = hub.node("honest-a", &honest_a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &honest_b, 12, &["--dev-stake"])?;
    let _cheater = hub.node(
        "cheater",
        &cheater,
        5,
        &["--dev-stake", "--cheat", "requantized-q4-0"],
    )?;
    hub.wait_connected(3)?;
    let (agent, key) = hub.agent(1_000_000)?;

    let (status, headers, body) = hub.chat(&key, &question(16))?;
    assert_eq!(status, 200, "{body}");
    let served_by = headers
        .get("x-tessera-provider")
        .context("provider header")?
        .to_str()?
        .to_owned();
    assert!(
        served_by.eq_ignore_ascii_case(&format!("{:#x}", cheater.address())),
        "the cheaper provider serves first"
    );
    assert_eq!(body["tessera"]["verification"], "pending");

    // The verdict comes in the background: both honest providers must find the fault (a fail
    // is acted on only once confirmed by a second verifier).
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub.provider(&cheater)?["quarantined"] != json!(true)
        || hub.provider(&cheater)?["slashed"] != json!(500_000)
    {
        if Instant::now() > deadline {
            bail!(
                "the cheater was not quarantined and slashed: {}",
                hub.provider(&cheater)?
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let c = hub.provider(&cheater)?;
    assert_eq!(c["verified_failed"], 1);
    assert_eq!(c["slashed"], 500_000);
    assert_eq!(
        hub.account(&cheater)?.1,
        500_000,
        "half the cheater's stake is gone"
    );
    // The agent got the job refunded and 30% of the slash as compensation; the verifier that
    // caught it first 20%; both were paid their checking fees.
    assert_eq!(hub.account(&agent)?.0, 1_000_000 + 150_000);
    let fees: u64 = [&honest_a, &honest_b]
        .iter()
        .map(|w| {
            hub.provider(w)
                .map(|p| p["verify_fees"].as_u64().unwrap_or(0))
        })
        .sum::<Result<u64>>()?;
    assert_eq!(
        hub.account(&honest_a)?.0 + hub.account(&honest_b)?.0,
        100_000 + fees
    );

    // The next job goes to an honest provider, checked by the other.
    let (status, headers, body) = hub.chat(&key, &question(8))?;
    assert_eq!(status, 200, "{body}");
    let served_by = headers
        .get("x-tessera-provider")
        .context("provider header")?
        .to_str()?
        .to_owned();
    assert!(served_by.eq_ignore_ascii_case(&format!("{:#x}", honest_a.address())));
    for honest in [&honest_a, &honest_b] {
        let h = hub.provider(honest)?;
        assert_eq!(h["quarantined"], false);
        assert_eq!(h["verified_failed"], 0);
        assert_eq!(
            hub.account(honest)?.1,
            1_000_000,
            "the honest stake is untouched"
        );
    }
    let models = hub.get("/v1/models")?;
    assert_eq!(
        models["data"][0]["tessera"]["providers"], 2,
        "a quarantined provider is not offered"
    );
    let metrics = http()
        .get(format!("{}/metrics", hub.url))
        .call()?
        .body_mut()
        .read_to_string()?;
    assert!(metrics.contains("tessera_slashes_total 1"), "{metrics}");
    hub.audit()
}

#[test]
fn bad_input_gives_openai_errors_and_changes_nothing() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000)?;
    let check = |status: u16, body: &Value, want_status: u16, want_code: &str| {
        assert_eq!(status, want_status, "{body}");
        assert_eq!(body["error"]["code"], want_code, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(body["error"]["type"].is_string());
    };

    // Malformed JSON.
    let mut r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .content_type("application/json")
        .send("{\"model\": ")?;
    check(
        r.status().as_u16(),
        &r.body_mut().read_json()?,
        400,
        "invalid_json",
    );
    // Unknown model.
    let mut body = question(4);
    body["model"] = json!("gpt-17");
    let (s, _, b) = hub.chat(&key, &body)?;
    check(s, &b, 404, "model_not_found");
    // Bad and missing API keys.
    let (s, _, b) = hub.chat("sk-nope", &question(4))?;
    check(s, &b, 401, "invalid_api_key");
    let mut r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .send_json(question(4))?;
    check(
        r.status().as_u16(),
        &r.body_mut().read_json()?,
        401,
        "invalid_api_key",
    );
    // Above the balance: 1,000 micro-units cannot cover 200 tokens at 10.
    let (s, _, b) = hub.chat(&key, &question(200))?;
    check(s, &b, 429, "insufficient_quota");
    // Above the context window.
    let (s, _, b) = hub.chat(&key, &question(1_000_000))?;
    check(s, &b, 400, "context_length_exceeded");
    // A replayed key registration.
    let (s, b) = hub.register_key(&agent, "sk-another", 1)?;
    check(s, &b, 401, "invalid_signature");
    // Above max_price.
    let mut body = question(4);
    body["max_price"] = json!(3);
    let (s, _, b) = hub.chat(&key, &body)?;
    check(s, &b, 503, "no_provider_within_max_price");

    assert_eq!(
        hub.account(&agent)?.0,
        1_000,
        "no bad request costs anything"
    );
    assert_eq!(hub.account(&provider)?.0, 0);

    // A node without stake is refused and exits.
    let unstaked = Wallet::random();
    let mut node = hub.node("unstaked", &unstaked, 1, &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = node.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("an unstaked node must be refused");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(hub.dir().join("unstaked.log"))?;
    assert!(log.contains("staked"), "{log}");
    assert_eq!(
        hub.providers()?
            .iter()
            .filter(|p| p["connected"] == json!(true))
            .count(),
        1
    );
    hub.audit()
}

/// A virtual environment with the official `openai` package, made once per target directory.
fn openai_python() -> Result<std::path::PathBuf> {
    support::python::venv("openai-venv", "import openai", &["openai"])
}

#[test]
fn official_openai_python_client() -> Result<()> {
    let python = openai_python()?;
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 3, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(100_000)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .env("TESSERA_HUB", &hub.url)
        .env("TESSERA_KEY", &key)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim())?;
    assert!(report["text"].as_str().is_some_and(|t| t.contains("Paris")));
    assert!(hub.account(&agent)?.0 < 100_000);
    hub.audit()
}

#[test]
fn node_killed_mid_stream_charges_only_delivered_tokens() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0", "--fast-settle"])?;
    let provider = Wallet::random();
    let mut node = hub.node("node", &provider, 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let request = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": true,
    });
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(&request)?;
    assert_eq!(r.status(), 200);
    let max_cost = r
        .headers()
        .get("x-tessera-max-cost")
        .context("max cost header")?
        .to_str()?
        .parse::<u64>()?;
    // 1000 tokens at 10, plus the prompt's upper bound (its bytes and the template's) at 2.5.
    assert!((10_000..11_000).contains(&max_cost), "{max_cost}");
    let mut content_chunks = 0u64;
    let mut error = None;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert_ne!(data, "[DONE]", "a broken stream must not end with [DONE]");
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            error = Some(v);
            break;
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            content_chunks += 1;
            if content_chunks == 5 {
                node.0.kill()?;
            }
        }
    }
    let error = error.context("the stream must end with an error")?;
    assert_eq!(error["error"]["code"], "provider_failed");
    let cost = error["tessera"]["cost"].as_u64().context("cost")?;
    let tokens = cost / 10;
    // Tokens whose text is empty (a partial UTF-8 character) send no chunk; allow a couple.
    assert!(
        tokens >= content_chunks && tokens <= content_chunks + 3,
        "charged {tokens} tokens, received {content_chunks} chunks"
    );
    assert!(tokens < 1000);
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - cost);
    assert_eq!(hub.account(&provider)?.0, cost - cost * 500 / 10_000);
    hub.audit()
}

#[test]
fn failure_before_first_token_is_retried_elsewhere() -> Result<()> {
    // Also covers --fast-settle: reservation in memory, one group-committed settlement.
    let hub = start_hub(&["--verify-probability", "0", "--fast-settle"])?;
    let flaky = Wallet::random();
    let good = Wallet::random();
    // The cheaper node is tried first and refuses; the job must land on the other at no charge.
    let _flaky = hub.node("flaky", &flaky, 1, &["--dev-stake", "--refuse-jobs"])?;
    let _good = hub.node("good", &good, 10, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let (status, headers, body) = hub.chat(&key, &question(8))?;
    assert_eq!(status, 200, "{body}");
    let served_by = headers
        .get("x-tessera-provider")
        .context("provider header")?
        .to_str()?
        .to_owned();
    assert!(served_by.eq_ignore_ascii_case(&format!("{:#x}", good.address())));
    let cost = body["tessera"]["cost"].as_u64().context("cost")?;
    let usage = |k: &str| body["usage"][k].as_u64().context("usage");
    assert_eq!(
        cost,
        usage("completion_tokens")? * 10 + (usage("prompt_tokens")? * 10 * 2500).div_ceil(10_000)
    );
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - cost);
    assert_eq!(hub.account(&flaky)?.0, 0);
    let metrics = http()
        .get(format!("{}/metrics", hub.url))
        .call()?
        .body_mut()
        .read_to_string()?;
    assert!(metrics.contains("tessera_retries_total 1"), "{metrics}");
    // The fast path's in-memory reservation refuses what the balance cannot cover.
    let (poor, poor_key) = hub.agent(50)?;
    let (status, _, body) = hub.chat(&poor_key, &question(8))?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("insufficient_quota")),
        "{body}"
    );
    assert_eq!(hub.account(&poor)?.0, 50);
    hub.audit()
}

#[test]
fn sigterm_drains_the_stream_in_flight() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    // A drain long enough for the whole answer on a busy machine.
    let mut node = hub.node(
        "node",
        &provider,
        10,
        &["--dev-stake", "--drain-timeout-secs", "300"],
    )?;
    hub.wait_connected(1)?;
    let (_agent, key) = hub.agent(1_000_000)?;
    let request = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
        "max_tokens": 150,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(&request)?;
    assert_eq!(r.status(), 200);
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    // Ask the node to stop as soon as the stream has begun.
    let first = lines.next().context("first line")??;
    assert!(first.starts_with("data: "));
    let status = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()?;
    assert!(status.success());
    let rest: Vec<String> = lines.collect::<std::io::Result<_>>()?;
    assert!(
        rest.iter().any(|l| l == "data: [DONE]"),
        "the job in flight finishes: {rest:?}"
    );
    let usage = rest
        .iter()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .find_map(|d| {
            serde_json::from_str::<Value>(d)
                .ok()
                .filter(|v| v.get("usage").is_some())
        });
    let completion = usage.context("usage chunk")?["usage"]["completion_tokens"]
        .as_u64()
        .context("tokens")?;
    assert!(
        completion > 20,
        "the stream was still running when SIGTERM came ({completion} tokens)"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let exit = loop {
        if let Some(status) = node.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the node did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "a drained node exits cleanly: {exit}");
    hub.audit()
}

#[test]
fn hub_crash_and_restart_loses_no_acknowledged_job_or_payment() -> Result<()> {
    let mut hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let (status, _, body) = hub.chat(&key, &question(8))?;
    assert_eq!(status, 200, "{body}");
    let acknowledged = body["tessera"]["cost"].as_u64().context("cost")?;

    // A long stream in flight when the hub dies.
    let request = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": true,
    });
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(&request)?;
    assert_eq!(r.status(), 200);
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    for _ in 0..4 {
        lines.next().context("stream line")??;
    }
    hub.crash_and_restart()?;
    drop(lines);

    // The key survived, the node reconnected, the acknowledged job stays paid and the cut-off
    // one is refunded.
    hub.wait_connected(1)?;
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - acknowledged);
    assert_eq!(
        hub.account(&provider)?.0,
        acknowledged - acknowledged * 500 / 10_000
    );
    let (status, _, body) = hub.chat(&key, &question(8))?;
    assert_eq!(status, 200, "{body}");
    let second = body["tessera"]["cost"].as_u64().context("cost")?;
    assert_eq!(hub.account(&agent)?.0, 1_000_000 - acknowledged - second);
    hub.audit()
}

#[test]
fn bench_hub_routes_and_settles_synthetic_jobs() -> Result<()> {
    let out = Command::new(BIN)
        .args([
            "bench",
            "hub",
            "--requests",
            "200",
            "--concurrency",
            "4",
            "--providers",
            "2",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Value = serde_json::from_slice(&out.stdout)?;
    for r in reports.as_array().context("reports")? {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["requests_per_s"].as_f64().is_some_and(|x| x > 0.0));
    }
    Ok(())
}

#[test]
fn signed_request_pays_without_an_api_key_and_cannot_be_replayed() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let agent = Wallet::random();
    http()
        .post(format!("{}/v1/dev/faucet", hub.url))
        .send_json(json!({"address": agent.address(), "amount": 10_000}))?;
    let sha = hub.get("/v1/models")?["data"][0]["tessera"]["sha256"]
        .as_str()
        .context("model sha")?
        .to_owned();
    let body = serde_json::to_vec(&question(8))?;
    let sign = |body: &[u8], nonce: u64| -> Result<String> {
        let request = tessera_protocol::InferenceRequest {
            model: sha.parse()?,
            promptHash: <[u8; 32]>::from(Sha256::digest(body)).into(),
            maxTokens: 8,
            maxPricePerToken: 20,
            nonce,
            expiry: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 600,
        };
        Ok(serde_json::to_string(&agent.sign(request, hub.domain()?)?)?)
    };
    let post = |signature: &str, body: &[u8]| -> Result<(u16, Value)> {
        let mut r = http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .header("x-tessera-signature", signature)
            .content_type("application/json")
            .send(body)?;
        Ok((r.status().as_u16(), r.body_mut().read_json()?))
    };
    let signature = sign(&body, 1)?;
    let (status, reply) = post(&signature, &body)?;
    assert_eq!(status, 200, "{reply}");
    let cost = reply["tessera"]["cost"].as_u64().context("cost")?;
    assert_eq!(hub.account(&agent)?.0, 10_000 - cost);
    // Replayed, or attached to another body: refused, nothing charged.
    let (status, reply) = post(&signature, &body)?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("invalid_signature")),
        "{reply}"
    );
    let other = serde_json::to_vec(&question(4))?;
    let (status, reply) = post(&sign(&body, 2)?, &other)?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("invalid_signature")),
        "{reply}"
    );
    assert_eq!(hub.account(&agent)?.0, 10_000 - cost);
    hub.audit()
}

#[test]
fn hub_reads_a_toml_config_file_below_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        "verify_probability = 0.25\nslash_amount = 1234\nmin_stake = 5000\n",
    )?;
    let file = file.display().to_string();
    let hub = start_hub(&["--config", &file, "--slash-amount", "777"])?;
    let v = hub.get("/v1/providers")?;
    assert_eq!(v["verify_probability"], 0.25, "from the file");
    assert_eq!(v["slash_amount"], 777, "the flag wins over the file");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Issue 10: regression tests named after its findings, through real hub and node processes.

/// Posts a chat body of `bytes` bytes the way a careful client does (`Expect: 100-continue`), so
/// the hub's early 413 is read instead of racing the upload: a hub that closes the connection
/// while a client still writes a large body gives that client a broken pipe, not the error.
fn oversized_chat(hub: &Hub, key: &str, bytes: usize) -> Result<(u16, Value)> {
    use std::io::Read;
    let body = serde_json::to_vec(&json!({"model": "smollm2-135m",
        "messages": [{"role": "user", "content": "x".repeat(bytes)}]}))?;
    let address = hub.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response);
        if text.starts_with("HTTP/1.1 100") && text.contains("\r\n\r\n") {
            // The hub asked for the body after all: send it and read the final answer.
            response.clear();
            let _ = stream.write_all(&body);
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let json_start = text
        .find('{')
        .with_context(|| format!("no body in {text:?}"))?;
    let json_end = text.rfind('}').context("body end")?;
    Ok((status, serde_json::from_str(&text[json_start..=json_end])?))
}

#[test]
fn finding_1_model_names_are_pinned_to_files_and_unverifiable_providers_are_not_scheduled(
) -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "0"])?;
    let honest = Wallet::random();
    let _honest = hub.node("honest", &honest, 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (_agent, key) = hub.agent(100_000)?;
    // Alone, nobody could check it: not scheduled.
    let (status, _, body) = hub.chat(&key, &question(4))?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_verifiable_provider")),
        "{body}"
    );
    // A node serving another file (here the real model with bytes appended: a fresh sha256)
    // cannot register under any name.
    let real = tessera_engine::registry::fetch("smollm2-135m")?;
    let forged = hub.dir().join("forged.gguf");
    std::fs::copy(&real, &forged)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&forged)?
        .write_all(b"not the pinned file")?;
    let mut forger = hub.node(
        "forger",
        &Wallet::random(),
        1,
        &["--dev-stake", "--model", forged.to_str().context("path")?],
    )?;
    let status = wait_exit(&mut forger, Duration::from_secs(90))?;
    assert!(!status.success(), "a rejected node exits with an error");
    let log = std::fs::read_to_string(hub.dir().join("forger.log"))?;
    assert!(log.contains("not in this hub's catalog"), "{log}");
    // A second honest provider of the pinned file makes both verifiable.
    let _second = hub.node("second", &Wallet::random(), 11, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (status, _, body) = hub.chat(&key, &question(4))?;
    assert_eq!(status, 200, "{body}");
    let models = hub.get("/v1/models")?;
    assert_eq!(
        models["data"][0]["tessera"]["context_length"], 8192,
        "from the file, not the node"
    );
    hub.audit()
}

/// Waits for a child to exit.
fn wait_exit(proc: &mut Proc, within: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proc.0.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("the process did not exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The content of a streamed chat answer, and the final chunk's `tessera` object.
fn stream_chat(hub: &Hub, key: &str, body: &Value) -> Result<(String, Value)> {
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(body)?;
    let mut text = String::new();
    let mut tessera = Value::Null;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if v.get("tessera").is_some() {
            tessera = v["tessera"].clone();
        }
    }
    Ok((text, tessera))
}

#[test]
fn finding_2_the_text_delivered_is_the_hubs_decoding_of_the_committed_tokens() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let _node = hub.node("node", &Wallet::random(), 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (_agent, key) = hub.agent(1_000_000)?;
    // The stop string is withheld while it might still form, so a stream never leaks it.
    let mut body = question(24);
    body["stop"] = json!(["Paris"]);
    let (status, _, plain) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{plain}");
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .context("text")?;
    assert!(
        !text.contains("Paris") && text.contains("capital"),
        "{text}"
    );
    body["stream"] = json!(true);
    let (streamed, _) = stream_chat(&hub, &key, &body)?;
    assert_eq!(
        streamed, text,
        "streamed text is the same decoding, stop string withheld"
    );
    hub.audit()
}

#[test]
fn finding_3_tokens_beyond_what_was_generated_are_never_paid() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let padder = Wallet::random();
    let _node = hub.node(
        "padder",
        &padder,
        10,
        &["--dev-stake", "--cheat", "pad-tokens"],
    )?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let (status, _, body) = hub.chat(&key, &question(8))?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("provider_failed")),
        "{body}"
    );
    assert_eq!(hub.account(&agent)?.0, 1_000_000, "nothing charged");
    assert_eq!(hub.account(&padder)?.0, 0, "nothing paid");
    assert_eq!(hub.provider(&padder)?["quarantined"], true);
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

#[test]
fn finding_4_lazy_and_lying_verifiers_are_slashed_and_honest_providers_never() -> Result<()> {
    let hub = start_strict_hub(&[
        "--verify-probability",
        "1",
        "--cross-check-probability",
        "1",
        "--canary-probability",
        "1",
        "--verify-recheck-ms",
        "200",
    ])?;
    // Three honest providers: two of them agreeing on a third's job make a known-pass check,
    // which is what exposes a liar (its lone "fail" never acts by itself).
    let honest_a = Wallet::random();
    let honest_b = Wallet::random();
    let honest_c = Wallet::random();
    let lazy = Wallet::random();
    let liar = Wallet::random();
    let _a = hub.node("honest-a", &honest_a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &honest_b, 11, &["--dev-stake"])?;
    let _c = hub.node("honest-c", &honest_c, 12, &["--dev-stake"])?;
    let _lazy = hub.node(
        "lazy",
        &lazy,
        13,
        &["--dev-stake", "--cheat", "lazy-verifier"],
    )?;
    let _liar = hub.node(
        "liar",
        &liar,
        14,
        &["--dev-stake", "--cheat", "lying-verifier"],
    )?;
    hub.wait_connected(5)?;
    let (_agent, key) = hub.agent(10_000_000)?;
    let caught =
        |w: &Wallet| -> Result<bool> { Ok(hub.provider(w)?["quarantined"] == json!(true)) };
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut requests = 0;
    // Honest verifiers' fees come from protocol fees, which exist once jobs have settled: go on
    // until both cheats are caught and some honest check has been paid.
    let honest_fees = || -> Result<u64> {
        let mut fees = 0;
        for w in [&honest_a, &honest_b, &honest_c] {
            fees += hub.provider(w)?["verify_fees"].as_u64().unwrap_or(0);
        }
        Ok(fees)
    };
    while !(caught(&lazy)? && caught(&liar)? && honest_fees()? > 0) {
        if Instant::now() > deadline {
            bail!(
                "after {requests} requests: lazy {} liar {}",
                hub.provider(&lazy)?,
                hub.provider(&liar)?
            );
        }
        let (status, _, body) = hub.chat(&key, &question(6))?;
        assert_eq!(status, 200, "{body}");
        requests += 1;
        hub.wait_no_holds(Duration::from_secs(60))?;
    }
    for cheat in [&lazy, &liar] {
        let p = hub.provider(cheat)?;
        assert!(p["canaries_failed"].as_u64() >= Some(1), "{p}");
        assert_eq!(p["slashed"], 1_000_000, "{p}");
    }
    let mut fees = 0;
    for honest in [&honest_a, &honest_b, &honest_c] {
        let p = hub.provider(honest)?;
        assert_eq!(
            (p["quarantined"].clone(), p["slashed"].clone()),
            (json!(false), json!(0)),
            "{p}"
        );
        assert_eq!(p["canaries_failed"], 0, "{p}");
        fees += p["verify_fees"].as_u64().unwrap_or(0);
        assert_eq!(hub.account(honest)?.1, 1_000_000);
    }
    assert!(fees > 0, "checks are paid");
    // The economics the hub reports: cheating on a job costs more than it can gain.
    let providers = hub.get("/v1/providers")?;
    for p in providers["providers"].as_array().context("providers")? {
        if p["quarantined"] == json!(false) {
            assert_eq!(p["cheating_deterred"], true, "{p}");
        }
    }
    hub.audit()
}

#[test]
fn finding_5_a_client_that_hangs_up_leaves_no_hold_open() -> Result<()> {
    for mode in [&[][..], &["--fast-settle"][..]] {
        let mut args = vec!["--verify-probability", "0"];
        args.extend_from_slice(mode);
        let hub = start_hub(&args)?;
        let _node = hub.node("node", &Wallet::random(), 10, &["--dev-stake"])?;
        hub.wait_connected(1)?;
        let (agent, key) = hub.agent(1_000_000)?;
        // Mid-dispatch: the client gives up before the first token (a long prompt to prefill).
        let long = "Describe the history of bread in great detail. ".repeat(60);
        let impatient: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(150)))
            .build()
            .into();
        let r = impatient
            .post(format!("{}/v1/chat/completions", hub.url))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": long}], "max_tokens": 64}));
        assert!(r.is_err(), "the client timed out");
        hub.wait_no_holds(Duration::from_secs(30))?;
        assert_eq!(
            hub.account(&agent)?.0,
            1_000_000,
            "refunded in full ({mode:?})"
        );
        // Mid-stream: the client reads two pieces of text and hangs up.
        let r = http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 400, "stream": true}))?;
        assert_eq!(r.status(), 200);
        let mut lines = BufReader::new(r.into_body().into_reader()).lines();
        let mut pieces = 0;
        let mut seen = Vec::new();
        while pieces < 3 {
            let line = lines
                .next()
                .with_context(|| format!("stream ended: {seen:?}"))??;
            seen.push(line.clone());
            if line.contains("\"content\"") {
                pieces += 1;
            }
        }
        drop(lines);
        hub.wait_no_holds(Duration::from_secs(30))?;
        let spent = 1_000_000 - hub.account(&agent)?.0;
        assert!(
            spent > 0 && spent < 400 * 10,
            "paid only what was delivered: {spent} ({mode:?})"
        );
        hub.audit()?;
    }
    Ok(())
}

#[test]
fn finding_7_an_absurd_registrant_breaks_no_request() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let _greedy = hub.node("greedy", &Wallet::random(), u64::MAX, &["--dev-stake"])?;
    let honest = Wallet::random();
    let _honest = hub.node("honest", &honest, 10, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (agent, key) = hub.agent(1_000_000)?;
    for max_price in [None, Some(u64::MAX)] {
        let mut body = question(4);
        if let Some(p) = max_price {
            body["max_price"] = json!(p);
        }
        let (status, headers, body) = hub.chat(&key, &body)?;
        assert_eq!(status, 200, "{body}");
        let by = headers
            .get("x-tessera-provider")
            .context("provider")?
            .to_str()?;
        assert!(by.eq_ignore_ascii_case(&format!("{:#x}", honest.address())));
    }
    assert!(hub.account(&agent)?.0 > 1_000_000 - 1_000);
    hub.audit()
}

#[test]
fn finding_8_signatures_for_one_hub_do_not_replay_at_another() -> Result<()> {
    let a = start_hub(&[])?;
    let b = start_hub(&[])?;
    assert_ne!(a.domain()?, b.domain()?, "each hub has its own domain");
    let wallet = Wallet::random();
    let signed = a.signed_key(&wallet, "sk-one-hub", 1, 3600)?;
    let (status, body) = b.post_key(&signed)?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_signature")),
        "{body}"
    );
    let (status, body) = a.post_key(&signed)?;
    assert_eq!(status, 200, "{body}");
    // The fixed default domain is accepted by no hub.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let message = ApiKeyRegistration {
        keyHash: <[u8; 32]>::from(Sha256::digest(b"sk-default")).into(),
        validUntil: now + 3600,
        nonce: 2,
        expiry: now + 600,
    };
    let (status, _) = a.post_key(&wallet.sign(message.clone(), Domain::default())?)?;
    assert_eq!(status, 401);
    // A signature may not be valid for longer than the hub allows (a day by default).
    let far = ApiKeyRegistration {
        expiry: now + 10 * 24 * 3600,
        nonce: 3,
        ..message
    };
    let (status, body) = a.post_key(&wallet.sign(far, a.domain()?)?)?;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too far")),
        "{body}"
    );
    Ok(())
}

#[test]
fn finding_9_per_wallet_limits_and_openai_error_shapes() -> Result<()> {
    let hub = start_hub(&[
        "--verify-probability",
        "0",
        "--max-concurrent-per-agent",
        "1",
        "--requests-per-minute",
        "3",
    ])?;
    let _node = hub.node("node", &Wallet::random(), 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    // One in flight (a stream held open): a second is refused.
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200, "stream": true}))?;
    let (status, _, body) = hub.chat(&key, &question(4))?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded")),
        "{body}"
    );
    drop(r);
    hub.wait_no_holds(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, body) = hub.chat(&key, &question(4))?;
    assert_eq!(status, 200, "{body}");
    // Three started this minute (the refused one did not start): the fourth waits.
    let (status, _, _) = hub.chat(&key, &question(4))?;
    assert_eq!(status, 200);
    let (status, _, body) = hub.chat(&key, &question(4))?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded")),
        "{body}"
    );
    // Too many stop strings, a wrong method, an oversized body: OpenAI-shaped errors.
    let (_, other_key) = hub.agent(1_000)?;
    let mut many = question(4);
    many["stop"] = json!(["a", "b", "c", "d", "e"]);
    let (status, _, body) = hub.chat(&other_key, &many)?;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("stop")),
        "{body}"
    );
    let mut r = http()
        .get(format!("{}/v1/chat/completions", hub.url))
        .call()?;
    assert_eq!(r.status(), 405);
    let v: Value = r.body_mut().read_json()?;
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (status, v) = oversized_chat(&hub, &other_key, 2 << 20)?;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large");
    assert!(hub.account(&agent)?.0 < 1_000_000);
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

#[test]
fn finding_12_keys_expire_and_revoke_a_refused_request_keeps_its_nonce_and_fees_are_bounded(
) -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let _node = hub.node("node", &Wallet::random(), 10, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let wallet = Wallet::random();
    http()
        .post(format!("{}/v1/dev/faucet", hub.url))
        .send_json(json!({"address": wallet.address(), "amount": 100_000}))?;
    // A key valid for two seconds works, then does not.
    let short = hub.signed_key(&wallet, "sk-short", 1, 2)?;
    assert_eq!(hub.post_key(&short)?.0, 200);
    assert_eq!(hub.chat("sk-short", &question(2))?.0, 200);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hub.chat("sk-short", &question(2))?.0, 401);
    // A revoked key stops at once.
    assert_eq!(hub.register_key(&wallet, "sk-revoked", 2)?.0, 200);
    assert_eq!(hub.chat("sk-revoked", &question(2))?.0, 200);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let revocation = tessera_protocol::ApiKeyRevocation {
        keyHash: <[u8; 32]>::from(Sha256::digest(b"sk-revoked")).into(),
        nonce: 1,
        expiry: now + 600,
    };
    let mut r = http()
        .post(format!("{}/v1/keys/revoke", hub.url))
        .send_json(&wallet.sign(revocation, hub.domain()?)?)?;
    assert_eq!(r.status(), 200, "{}", r.body_mut().read_to_string()?);
    assert_eq!(hub.chat("sk-revoked", &question(2))?.0, 401);
    // A signed request refused for want of money keeps its nonce: funded, the same one runs.
    let poor = Wallet::random();
    let sha = hub.get("/v1/models")?["data"][0]["tessera"]["sha256"]
        .as_str()
        .context("sha")?
        .to_owned();
    let body = serde_json::to_vec(&question(4))?;
    let request = tessera_protocol::InferenceRequest {
        model: sha.parse()?,
        promptHash: <[u8; 32]>::from(Sha256::digest(&body)).into(),
        maxTokens: 4,
        maxPricePerToken: 20,
        nonce: 7,
        expiry: now + 600,
    };
    let signature = serde_json::to_string(&poor.sign(request, hub.domain()?)?)?;
    let post = || -> Result<u16> {
        Ok(http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .header("x-tessera-signature", &signature)
            .content_type("application/json")
            .send(&body[..])?
            .status()
            .as_u16())
    };
    assert_eq!(post()?, 429);
    http()
        .post(format!("{}/v1/dev/faucet", hub.url))
        .send_json(json!({"address": poor.address(), "amount": 10_000}))?;
    assert_eq!(post()?, 200);
    assert_eq!(post()?, 401, "and now it is spent");
    // A fee above 100% is refused at start.
    let out = Command::new(BIN)
        .args([
            "hub",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--fee-bps",
            "20000",
            "--db",
        ])
        .arg(format!("sqlite://{}", hub.dir().join("other.db").display()))
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fee-bps"));
    hub.audit()
}

#[test]
fn bench_attack_round_prevents_every_exploit() -> Result<()> {
    let out = Command::new(BIN)
        .args(["bench", "attack", "--rounds", "2", "--json"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert!(rows.len() >= 7, "{rows:?}");
    for r in &rows {
        assert!(r["attempts"].as_u64() > Some(0), "{r}");
        assert_eq!(r["prevented"], r["attempts"], "{r}");
        assert!(r["attacker_gain"].as_i64() <= Some(0), "{r}");
        assert_eq!(r["honest_slashed"], 0, "{r}");
    }
    Ok(())
}

/// Runs `tessera task ...` as `wallet` against the hub and parses what it prints.
fn task_cli(hub: &Hub, wallet: Option<&Wallet>, args: &[&str]) -> Result<Value> {
    let mut command = Command::new(BIN);
    command.arg("task").args(args).args(["--hub", &hub.url]);
    if let Some(w) = wallet {
        command.args(["--private-key", &hex::encode(w.signer().to_bytes())]);
    }
    let out = command.output()?;
    if !out.status.success() {
        bail!(
            "tessera task {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn write_spec(hub: &Hub, name: &str, spec: &Value) -> Result<String> {
    let path = hub.dir().join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(spec)?)?;
    Ok(path.display().to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn wait_task_state(hub: &Hub, id: &str, state: &str, within: Duration) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let t = hub.get(&format!("/v1/tasks/{id}"))?;
        if t["state"] == state && t["settled"] == true {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("task {id} never reached {state}: {t}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn task_market_full_cycle_with_a_writer_using_network_inference() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 5, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (poster, _) = hub.agent(100_000)?;
    let (writer, writer_key) = hub.agent(10_000)?;
    let spec = json!({
        "kind": "writing", "title": "One capital", "description": "Answer in one word.",
        "input": "What is the capital of France?", "deadline": unix_now() + 600,
        "worker_bond": 2_000, "review_secs": 600, "acceptance": {"by": "poster"},
    });
    let path = write_spec(&hub, "spec", &spec)?;
    let task = task_cli(
        &hub,
        Some(&poster),
        &[
            "post", "--spec", &path, "--bounty", "20000", "--bond", "5000",
        ],
    )?;
    let id = task["id"].as_str().context("id")?.to_owned();
    assert_eq!(task["state"], "open");
    assert_eq!(hub.account(&poster)?.0, 75_000, "bounty and bond held");
    let listed = task_cli(&hub, None, &["list", "--kind", "writing"])?;
    assert!(listed["data"]
        .as_array()
        .context("data")?
        .iter()
        .any(|t| t["id"] == id.as_str()));

    let claimed = task_cli(&hub, Some(&writer), &["claim", &id])?;
    assert_eq!(claimed["state"], "claimed");
    assert_eq!(hub.account(&writer)?.0, 8_000);
    // The writer does the work with inference on the network, paid like any request.
    let (status, _, answer) = hub.chat(&writer_key, &question(8))?;
    assert_eq!(status, 200, "{answer}");
    let inference_cost = answer["tessera"]["cost"].as_u64().context("cost")?;
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .context("text")?;
    let delivered = task_cli(&hub, Some(&writer), &["deliver", &id, "--text", text])?;
    assert_eq!(delivered["state"], "delivered");
    assert_eq!(delivered["delivery"], text);
    let accepted = task_cli(&hub, Some(&poster), &["accept", &id])?;
    assert_eq!(
        (accepted["state"].as_str(), accepted["settled"].as_bool()),
        (Some("accepted"), Some(true))
    );
    let fee_bps = 500; // the hub's default protocol fee
    let bounty_paid = 20_000 - 20_000 * fee_bps / 10_000;
    assert_eq!(
        hub.account(&writer)?.0,
        10_000 - inference_cost + bounty_paid
    );
    assert_eq!(hub.account(&poster)?.0, 80_000, "the bond came back");
    // A second accept, or a cancel now, changes nothing.
    assert!(task_cli(&hub, Some(&poster), &["accept", &id]).is_err());
    assert!(task_cli(&hub, Some(&poster), &["cancel", &id]).is_err());
    // Feedback only from a counterparty, once; the reputation summarises it.
    task_cli(
        &hub,
        Some(&poster),
        &["feedback", &id, "--score", "90", "--tag", "quality"],
    )?;
    let stranger = Wallet::random();
    assert!(task_cli(&hub, Some(&stranger), &["feedback", &id, "--score", "0"]).is_err());
    assert!(task_cli(&hub, Some(&poster), &["feedback", &id, "--score", "10"]).is_err());
    let reputation = task_cli(
        &hub,
        None,
        &["reputation", &format!("{:#x}", writer.address())],
    )?;
    assert_eq!(reputation["feedback_count"], 1);
    assert_eq!(reputation["average_score"], 90.0);
    assert_eq!(reputation["tasks_accepted"], 1);
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

#[test]
fn task_dispute_is_decided_by_re_execution_and_the_loser_pays() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 5, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (poster, _) = hub.agent(200_000)?;
    let (honest, honest_key) = hub.agent(20_000)?;
    let (lazy, _) = hub.agent(20_000)?;
    let messages = json!([{"role": "user", "content": "Name a primary color."}]);
    let spec = json!({
        "kind": "inference", "title": "Run the reference", "deadline": unix_now() + 600,
        "worker_bond": 3_000, "review_secs": 600, "acceptance": {"by": "poster"},
        "reference": {"model": "smollm2-135m", "request": {
            "messages": messages, "max_tokens": 8, "sampling": {"temperature": 0.0, "seed": 3}, "stop": []}},
    });
    let path = write_spec(&hub, "spec", &spec)?;
    let post = || {
        task_cli(
            &hub,
            Some(&poster),
            &[
                "post", "--spec", &path, "--bounty", "10000", "--bond", "4000",
            ],
        )
    };
    let (first, second) = (post()?, post()?);
    let (first, second) = (
        first["id"].as_str().context("id")?,
        second["id"].as_str().context("id")?,
    );

    // The honest worker runs the reference; the poster rejects it anyway; the network sides
    // with the worker, who gets the bounty and the poster's bond.
    task_cli(&hub, Some(&honest), &["claim", first])?;
    let body = json!({"model": "smollm2-135m", "messages": messages, "max_tokens": 8, "temperature": 0, "seed": 3});
    let (status, _, answer) = hub.chat(&honest_key, &body)?;
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .context("text")?;
    task_cli(&hub, Some(&honest), &["deliver", first, "--text", text])?;
    task_cli(&hub, Some(&poster), &["reject", first])?;
    let before = hub.account(&honest)?.0;
    task_cli(&hub, Some(&honest), &["dispute", first])?;
    let won = wait_task_state(&hub, first, "worker_won", Duration::from_secs(60))?;
    assert!(
        won["outcome"]
            .as_str()
            .unwrap_or("")
            .contains("is the reference's output"),
        "{won}"
    );
    let honest_after = hub.account(&honest)?.0;
    assert!(
        honest_after > before + 10_000,
        "bounty and bond, less fees and the re-run: {before} → {honest_after}"
    );

    // The lazy worker delivers junk, is rejected, disputes and loses its bond to the poster.
    task_cli(&hub, Some(&lazy), &["claim", second])?;
    task_cli(
        &hub,
        Some(&lazy),
        &["deliver", second, "--text", "lorem ipsum"],
    )?;
    task_cli(&hub, Some(&poster), &["reject", second])?;
    task_cli(&hub, Some(&lazy), &["dispute", second])?;
    let lost = wait_task_state(&hub, second, "poster_won", Duration::from_secs(60))?;
    assert!(
        lost["outcome"]
            .as_str()
            .unwrap_or("")
            .contains("not the reference's output"),
        "{lost}"
    );
    let lazy_after = hub.account(&lazy)?.0;
    assert!(
        lazy_after < 20_000 - 3_000,
        "the bond and the re-run are gone: {lazy_after}"
    );
    let reputation = task_cli(
        &hub,
        None,
        &["reputation", &format!("{:#x}", lazy.address())],
    )?;
    assert_eq!(reputation["disputes_lost"], 1);
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

#[test]
fn task_review_window_lapse_pays_and_deadlines_refund() -> Result<()> {
    let hub = start_hub(&[])?;
    let (poster, _) = hub.agent(100_000)?;
    let (worker, _) = hub.agent(10_000)?;
    let spec = |deadline_in: u64| {
        json!({"kind": "labeling", "title": "Label", "deadline": unix_now() + deadline_in,
               "worker_bond": 1_000, "review_secs": 1, "acceptance": {"by": "poster"}})
    };
    let lapsing = write_spec(&hub, "lapsing", &spec(600))?;
    let expiring = write_spec(&hub, "expiring", &spec(3))?;
    let late = write_spec(&hub, "late", &spec(4))?;
    let id = |v: Value| v["id"].as_str().map(str::to_owned).context("id");
    let lapsing = id(task_cli(
        &hub,
        Some(&poster),
        &["post", "--spec", &lapsing, "--bounty", "5000"],
    )?)?;
    let expiring = id(task_cli(
        &hub,
        Some(&poster),
        &["post", "--spec", &expiring, "--bounty", "7000"],
    )?)?;
    let late = id(task_cli(
        &hub,
        Some(&poster),
        &["post", "--spec", &late, "--bounty", "9000"],
    )?)?;
    task_cli(&hub, Some(&worker), &["claim", &lapsing])?;
    task_cli(&hub, Some(&worker), &["deliver", &lapsing, "--text", "cat"])?;
    task_cli(&hub, Some(&worker), &["claim", &late])?;
    // The poster stays silent: the review window lapses and the worker is paid.
    wait_task_state(&hub, &lapsing, "accepted", Duration::from_secs(20))?;
    // Nobody claims one; the other is never delivered: both bounties come back, and the late
    // worker's bond goes to the poster.
    wait_task_state(&hub, &expiring, "expired", Duration::from_secs(20))?;
    wait_task_state(&hub, &late, "late", Duration::from_secs(20))?;
    // Delivering after the deadline is refused.
    assert!(task_cli(
        &hub,
        Some(&worker),
        &["deliver", &late, "--text", "too late"]
    )
    .is_err());
    let paid = 5_000 - 5_000 * 500 / 10_000;
    assert_eq!(hub.account(&worker)?.0, 10_000 + paid - 1_000);
    // The forfeited bond is a capture like any payment: the protocol keeps its fee.
    assert_eq!(
        hub.account(&poster)?.0,
        100_000 - 5_000 + 1_000 - 1_000 * 500 / 10_000
    );
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

#[test]
fn task_escrows_survive_a_hub_crash_and_the_cycle_finishes_after_restart() -> Result<()> {
    let mut hub = start_hub(&[])?;
    let (poster, _) = hub.agent(50_000)?;
    let (worker, _) = hub.agent(5_000)?;
    let spec = json!({"kind": "writing", "title": "Survive", "deadline": unix_now() + 600,
                      "worker_bond": 2_000, "review_secs": 600, "acceptance": {"by": "poster"}});
    let path = write_spec(&hub, "spec", &spec)?;
    let task = task_cli(
        &hub,
        Some(&poster),
        &[
            "post", "--spec", &path, "--bounty", "10000", "--bond", "1000",
        ],
    )?;
    let id = task["id"].as_str().context("id")?.to_owned();
    task_cli(&hub, Some(&worker), &["claim", &id])?;
    // A restart's recovery refunds the escrows of cut-off jobs, never the market's.
    hub.crash_and_restart()?;
    let t = hub.get(&format!("/v1/tasks/{id}"))?;
    assert_eq!(t["state"], "claimed", "{t}");
    assert_eq!(hub.account(&poster)?.0, 39_000);
    assert_eq!(hub.account(&worker)?.0, 3_000);
    task_cli(
        &hub,
        Some(&worker),
        &["deliver", &id, "--text", "still here"],
    )?;
    task_cli(&hub, Some(&poster), &["accept", &id])?;
    assert_eq!(hub.account(&worker)?.0, 5_000 + 10_000 - 500);
    assert_eq!(hub.account(&poster)?.0, 40_000);
    hub.wait_no_holds(Duration::from_secs(10))?;
    hub.audit()
}

/// Issue 12: a parameter that would change the answer is honoured or refused by name (never
/// silently ignored), harmless ones are accepted, limits are 400s naming the parameter, and no
/// refusal moves money. `GET /v1/models/{id}`, `system_fingerprint` and the seed echo.
#[test]
fn issue_12_parameters_are_honoured_or_refused_by_name_and_refusals_cost_nothing() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0", "--max-n", "3"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 5, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(100_000)?;

    let refused = [
        (
            "functions",
            json!([{"name": "f", "parameters": {}}]),
            "unsupported_parameter",
        ),
        (
            "audio",
            json!({"voice": "alloy", "format": "wav"}),
            "unsupported_parameter",
        ),
        ("store", json!(true), "unsupported_parameter"),
        ("top_logprobs", json!(50), "invalid_value"),
        ("n", json!(4), "invalid_value"),
        ("presence_penalty", json!(3), "invalid_value"),
        ("stop", json!(["a", "b", "c", "d", "e"]), "invalid_value"),
    ];
    for (param, value, code) in refused {
        let mut body = question(4);
        body[param] = value;
        let (status, _, b) = hub.chat(&key, &body)?;
        assert_eq!(status, 400, "{param}: {b}");
        assert_eq!(b["error"]["code"], code, "{param}: {b}");
        assert_eq!(b["error"]["param"], param, "{param}: {b}");
    }
    let mut body = question(4);
    body["temprature"] = json!(0.5);
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (400, Some("unknown_parameter")),
        "{b}"
    );
    assert_eq!(hub.account(&agent)?.0, 100_000, "no refusal costs anything");

    // Harmless parameters change nothing; the answer names model file and engine, and the seed.
    let mut body = question(6);
    for (k, v) in [
        ("user", json!("u-42")),
        ("metadata", json!({"run": "7"})),
        ("store", json!(false)),
        ("service_tier", json!("auto")),
        ("logprobs", json!(false)),
        ("seed", json!(1234)),
    ] {
        body[k] = v;
    }
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["tessera"]["seed"], 1234);
    let model = hub.get("/v1/models/smollm2-135m")?;
    assert_eq!(model["id"], "smollm2-135m");
    assert_eq!(model["object"], "model");
    let sha = model["tessera"]["sha256"].as_str().context("sha256")?;
    let fingerprint = b["system_fingerprint"].as_str().context("fingerprint")?;
    assert!(
        fingerprint.starts_with(&format!("fp_{}_tessera-engine-", &sha[..16])),
        "{fingerprint}"
    );
    // Penalties and biases are honoured (part of the verified rule), not refused.
    let mut body = question(6);
    body["presence_penalty"] = json!(0.5);
    body["frequency_penalty"] = json!(1.5);
    body["logit_bias"] = json!({"0": -100, "2": 3});
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{b}");
    let mut r = http().get(format!("{}/v1/models/gpt-17", hub.url)).call()?;
    assert_eq!(r.status(), 404);
    let missing: Value = r.body_mut().read_json()?;
    assert_eq!(missing["error"]["code"], "model_not_found", "{missing}");
    hub.audit()
}

/// Runs a Python script with the official `openai` client against `hub` as `key`.
fn run_openai_script(hub: &Hub, key: &str, script: &str, env: &[(&str, &str)]) -> Result<Value> {
    run_python_script(&openai_python()?, hub, key, script, env)
}

/// Runs a Python script from `tests/` with `python` against `hub` as `key`; its last line of
/// output is a JSON report.
fn run_python_script(
    python: &Path,
    hub: &Hub,
    key: &str,
    script: &str,
    env: &[(&str, &str)],
) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new(python)
        .arg(script)
        .env("TESSERA_HUB", &hub.url)
        .env("TESSERA_KEY", key)
        .envs(env.iter().copied())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(
        stdout.trim().lines().last().unwrap_or(""),
    )?)
}

/// Issue 12: `response_format` `json_schema` (strict) and `json_object` by grammar-constrained
/// decoding, through the official client; unusable schemas are 400s that move no money.
#[test]
fn issue_12_structured_output_parses_and_validates_through_the_openai_client() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 2, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let started = Instant::now();
    let report = run_openai_script(
        &hub,
        &key,
        "structured_output.py",
        &[("TESSERA_REQUESTS", "20")],
    )?;
    eprintln!("structured output: {report} in {:?}", started.elapsed());
    let spent = 1_000_000 - hub.account(&agent)?.0;
    assert!(spent > 0, "the answers were paid for");
    // An unusable schema costs nothing: measured alone.
    let before = hub.account(&agent)?.0;
    let mut body = question(8);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "bad",
        "schema": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}});
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_json_schema", "{b}");
    assert_eq!(
        hub.account(&agent)?.0,
        before,
        "a refused schema moves no money"
    );
    hub.audit()
}

/// Issue 12: function calling through the official client on `model`, served by one node
/// started with `node_args` (see `tools.py`: a named call's round trip, `required`, `none`,
/// `auto`, streamed call deltas, the Responses API's function calls, and refused tool requests
/// that move no money).
fn run_tools_script(model: &str, node_args: &[&str]) -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let mut args = vec!["--dev-stake"];
    args.extend_from_slice(node_args);
    let _node = hub.node("node", &provider, 2, &args)?;
    hub.wait_connected(1)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let started = Instant::now();
    let address = format!("{:#x}", agent.address());
    let report = run_openai_script(
        &hub,
        &key,
        "tools.py",
        &[("TESSERA_MODEL", model), ("TESSERA_AGENT", &address)],
    )?;
    eprintln!("tools on {model}: {report} in {:?}", started.elapsed());
    assert!(report["named"]["city"].is_string(), "{report}");
    assert_eq!(
        report["refused"].as_array().map(Vec::len),
        Some(5),
        "{report}"
    );
    hub.audit()
}

/// Issue 12: tools on SmolLM2, whose template has no tool format (the generic rendering).
#[test]
fn issue_12_tools_round_trip_through_the_openai_client() -> Result<()> {
    run_tools_script("smollm2-135m", &[])
}

/// Issue 12: tools on Qwen2.5, rendered as its own chat template renders them.
#[test]
fn issue_12_tools_round_trip_on_qwen_with_its_tool_template() -> Result<()> {
    run_tools_script("qwen2.5-coder-0.5b", &["--model", "qwen2.5-coder-0.5b"])
}

/// Issue 12: LangChain's `with_structured_output`, by `response_format` (its default) and by
/// function calling, returns a valid instance of the Pydantic model.
#[test]
fn issue_12_langchain_with_structured_output() -> Result<()> {
    let hub = start_hub(&["--verify-probability", "0"])?;
    let provider = Wallet::random();
    let _node = hub.node("node", &provider, 2, &["--dev-stake"])?;
    hub.wait_connected(1)?;
    let (_, key) = hub.agent(1_000_000)?;
    let python = support::python::venv(
        "langchain-venv",
        "import langchain_openai",
        &["openai", "langchain-openai"],
    )?;
    let report = run_python_script(
        &python,
        &hub,
        &key,
        "langchain_structured.py",
        &[("TESSERA_MODEL", "smollm2-135m")],
    )?;
    eprintln!("langchain: {report}");
    hub.audit()
}

/// Issue 12: the grammar is part of the verified rule. A provider that ignores `response_format`
/// is caught by the verifiers and slashed; an honest constrained job then passes its check.
#[test]
fn issue_12_a_provider_ignoring_the_schema_fails_verification() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1", "--slash-amount", "500000"])?;
    let honest_a = Wallet::random();
    let honest_b = Wallet::random();
    let cheater = Wallet::random();
    let _a = hub.node("honest-a", &honest_a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &honest_b, 12, &["--dev-stake"])?;
    let _cheater = hub.node(
        "cheater",
        &cheater,
        5,
        &["--dev-stake", "--cheat", "ignore-grammar"],
    )?;
    hub.wait_connected(3)?;
    let (_, key) = hub.agent(1_000_000)?;
    let mut body = question(24);
    body["messages"] = json!([{"role": "user", "content": "Tell me about Paris."}]);
    body["response_format"] = json!({"type": "json_object"});
    let served_by = |headers: &ureq::http::HeaderMap| -> Result<String> {
        Ok(headers
            .get("x-tessera-provider")
            .context("provider header")?
            .to_str()?
            .to_lowercase())
    };
    let (status, headers, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{b}");
    assert_eq!(
        served_by(&headers)?,
        format!("{:#x}", cheater.address()),
        "the cheaper provider serves first"
    );
    let text = b["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(
        !text.starts_with('{'),
        "the cheater ignored the grammar: {text}"
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub.provider(&cheater)?["quarantined"] != json!(true) {
        if Instant::now() > deadline {
            bail!("the cheater was not caught: {}", hub.provider(&cheater)?);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(hub.provider(&cheater)?["slashed"], 500_000);

    let (status, headers, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{b}");
    assert_eq!(served_by(&headers)?, format!("{:#x}", honest_a.address()));
    let text = b["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?;
    assert!(text.starts_with('{'), "{text}");
    if b["choices"][0]["finish_reason"] == "stop" {
        serde_json::from_str::<serde_json::Map<String, Value>>(text).context("a JSON object")?;
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub.provider(&honest_a)?["verified_passed"] != json!(1) {
        if Instant::now() > deadline {
            bail!(
                "the honest constrained job did not pass: {}",
                hub.provider(&honest_a)?
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(hub.provider(&honest_a)?["verified_failed"], 0);
    hub.audit()
}

/// Issue 12: a provider that ignores `frequency_penalty` and `presence_penalty` (sampling with the
/// plain rule while the commitment claims the penalised one) is caught and slashed.
#[test]
fn issue_12_a_provider_ignoring_penalties_fails_verification() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1", "--slash-amount", "500000"])?;
    let (a, b, cheater) = (Wallet::random(), Wallet::random(), Wallet::random());
    let _a = hub.node("honest-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &b, 12, &["--dev-stake"])?;
    let _cheater = hub.node(
        "cheater",
        &cheater,
        5,
        &["--dev-stake", "--cheat", "ignore-penalties"],
    )?;
    hub.wait_connected(3)?;
    let (_, key) = hub.agent(1_000_000)?;
    let mut body = question(48);
    body["messages"] =
        json!([{"role": "user", "content": "Write a story about the sea and the sea shore."}]);
    body["frequency_penalty"] = json!(2.0);
    body["presence_penalty"] = json!(1.0);
    let (status, _, answer) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub.provider(&cheater)?["quarantined"] != json!(true) {
        if Instant::now() > deadline {
            bail!("the cheater was not caught: {}", hub.provider(&cheater)?);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(hub.provider(&cheater)?["slashed"], 500_000);
    hub.audit()
}

/// Issue 12: `logprobs` / `top_logprobs` through the official client on chat (streamed and not)
/// and legacy completions, consistent with the text; every job is verified, the reported values
/// recomputed by another provider, and they pass. Out-of-range requests move no money.
#[test]
fn issue_12_logprobs_through_the_openai_client_are_verified() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1"])?;
    let (a, b) = (Wallet::random(), Wallet::random());
    let _a = hub.node("honest-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &b, 12, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let started = Instant::now();
    let report = run_openai_script(&hub, &key, "logprobs.py", &[])?;
    eprintln!("logprobs: {report} in {:?}", started.elapsed());
    assert!(
        report["positions"].as_u64().is_some_and(|n| n >= 20),
        "{report}"
    );
    // Six jobs with logprobs ran; each is checked by the other provider.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (pa, pb) = (hub.provider(&a)?, hub.provider(&b)?);
        let passed = pa["verified_passed"].as_u64().unwrap_or(0)
            + pb["verified_passed"].as_u64().unwrap_or(0);
        assert_eq!(pa["verified_failed"], 0, "{pa}");
        assert_eq!(pb["verified_failed"], 0, "{pb}");
        if passed >= 6 {
            break;
        }
        if Instant::now() > deadline {
            bail!("honest logprobs jobs did not all pass: {pa} {pb}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let before = hub.account(&agent)?.0;
    let mut body = question(8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(50);
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["error"]["param"], "top_logprobs", "{b}");
    assert_eq!(
        hub.account(&agent)?.0,
        before,
        "a refused request moves no money"
    );
    hub.audit()
}

/// Issue 12: a provider that reports invented log-probabilities is caught by the verifier's
/// recomputation and slashed, though its tokens are honest.
#[test]
fn issue_12_a_provider_faking_logprobs_fails_verification() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1", "--slash-amount", "500000"])?;
    let (a, b, cheater) = (Wallet::random(), Wallet::random(), Wallet::random());
    let _a = hub.node("honest-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &b, 12, &["--dev-stake"])?;
    let _cheater = hub.node(
        "cheater",
        &cheater,
        5,
        &["--dev-stake", "--cheat", "fake-logprobs"],
    )?;
    hub.wait_connected(3)?;
    let (_, key) = hub.agent(1_000_000)?;
    let mut body = question(24);
    body["temperature"] = json!(0.8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, headers, answer) = hub.chat(&key, &body)?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        headers
            .get("x-tessera-provider")
            .context("provider header")?
            .to_str()?
            .to_lowercase(),
        format!("{:#x}", cheater.address()),
        "the cheaper provider serves first"
    );
    let first = &answer["choices"][0]["logprobs"]["content"][0];
    assert_eq!(
        first["logprob"],
        json!(-0.01),
        "the invented value: {first}"
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub.provider(&cheater)?["quarantined"] != json!(true) {
        if Instant::now() > deadline {
            bail!("the cheater was not caught: {}", hub.provider(&cheater)?);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(hub.provider(&cheater)?["slashed"], 500_000);
    hub.audit()
}

/// Issue 12: `n` > 1 through the official client: each choice its own job with its own seed,
/// billed each (the agent's balance falls by exactly the sum of the choices' costs, the provider
/// is paid for every job) and verified each.
#[test]
fn issue_12_n_choices_are_separate_jobs_billed_and_verified_each() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1"])?;
    let (a, b) = (Wallet::random(), Wallet::random());
    let _a = hub.node("honest-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &b, 12, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let started = Instant::now();
    let report = run_openai_script(&hub, &key, "choices.py", &[])?;
    eprintln!("n choices: {report} in {:?}", started.elapsed());
    let jobs = report["jobs"].as_u64().context("jobs")?;
    let cost = report["cost"].as_u64().context("cost")?;
    // Every job is checked by the other provider, then settled.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (pa, pb) = (hub.provider(&a)?, hub.provider(&b)?);
        let count = |key: &str| pa[key].as_u64().unwrap_or(0) + pb[key].as_u64().unwrap_or(0);
        assert_eq!(count("verified_failed"), 0, "{pa} {pb}");
        if count("verified_passed") >= jobs && count("jobs") == jobs {
            break;
        }
        if Instant::now() > deadline {
            bail!("the {jobs} jobs were not all verified: {pa} {pb}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Settlement follows the verdicts: the agent ends up paying exactly the choices' costs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while 1_000_000 - hub.account(&agent)?.0 != cost {
        if Instant::now() > deadline {
            bail!(
                "the agent paid {} for choices costing {cost}",
                1_000_000 - hub.account(&agent)?.0
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut body = question(4);
    body["n"] = json!(9);
    let (status, _, b) = hub.chat(&key, &body)?;
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["error"]["param"], "n", "{b}");
    hub.audit()
}

/// Issue 12: `POST /v1/responses` through the official client (`client.responses.create`):
/// text, JSON under a schema, the typed event stream; each answer a job verified like a chat.
#[test]
fn issue_12_the_responses_api_through_the_openai_client() -> Result<()> {
    let hub = start_strict_hub(&["--verify-probability", "1"])?;
    let (a, b) = (Wallet::random(), Wallet::random());
    let _a = hub.node("honest-a", &a, 10, &["--dev-stake"])?;
    let _b = hub.node("honest-b", &b, 12, &["--dev-stake"])?;
    hub.wait_connected(2)?;
    let (agent, key) = hub.agent(1_000_000)?;
    let started = Instant::now();
    let report = run_openai_script(&hub, &key, "responses.py", &[])?;
    eprintln!("responses: {report} in {:?}", started.elapsed());
    // Four answers ran, each checked by the other provider.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (pa, pb) = (hub.provider(&a)?, hub.provider(&b)?);
        let count = |key: &str| pa[key].as_u64().unwrap_or(0) + pb[key].as_u64().unwrap_or(0);
        assert_eq!(count("verified_failed"), 0, "{pa} {pb}");
        if count("verified_passed") >= 4 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the responses were not verified: {pa} {pb}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        hub.account(&agent)?.0 < 1_000_000,
        "the answers were paid for"
    );
    hub.audit()
}
