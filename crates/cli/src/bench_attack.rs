//! `tessera bench attack`: a scripted attack round against a local network of three honest
//! providers (real hub and node processes, the real model, real signatures). Each attack is an
//! exploit of issue 10 tried for real; the table says how often it was tried, how often it was
//! prevented, what the attacker gained (its balance plus stake at the end, less at the start:
//! must be 0 or negative) and how much honest providers lost to slashes (must be 0).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{ApiKeyRegistration, Wallet};

use crate::client::{domain, http, register_key};

/// `tessera bench attack` options.
#[derive(clap::Args, Debug)]
pub struct AttackArgs {
    /// Requests per attack that needs traffic.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Compute threads per node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep logs and the ledger here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One attack's outcome.
#[derive(Debug, Serialize)]
pub struct AttackRow {
    /// What was tried.
    pub attack: &'static str,
    /// The finding of issue 10 it exploits.
    pub finding: &'static str,
    /// Times it was tried.
    pub attempts: u32,
    /// Times it failed to reach its goal.
    pub prevented: u32,
    /// The attacker's balance plus stake at the end, less at the start (micro-units).
    pub attacker_gain: i64,
    /// Micro-units slashed from honest providers during the attack.
    pub honest_slashed: u64,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Network {
    exe: PathBuf,
    dir: PathBuf,
    url: String,
    threads: usize,
    procs: Vec<Proc>,
    honest: Vec<Wallet>,
    key: String,
}

fn log(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::File::create(
        dir.join(format!("{name}.log")),
    )?))
}

fn start_hub(exe: &Path, dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
    let addr = dir.join(format!("{name}.addr"));
    let _ = std::fs::remove_file(&addr);
    let db = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    let child = Command::new(exe)
        .args([
            "hub",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--addr-file",
        ])
        .arg(&addr)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log(dir, name)?)
        .spawn()?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr) {
            return Ok((proc, format!("http://{}", a.trim())));
        }
        if Instant::now() > deadline {
            bail!(
                "hub {name} did not start; see {}",
                dir.join(format!("{name}.log")).display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Network {
    fn node(
        &self,
        name: &str,
        wallet: &Wallet,
        price: u64,
        extra: &[&str],
    ) -> anyhow::Result<Proc> {
        let child = Command::new(&self.exe)
            .args([
                "node",
                "--hub",
                &self.url,
                "--price",
                &price.to_string(),
                "--threads",
                &self.threads.to_string(),
                "--capacity",
                "2",
                "--dev-stake",
            ])
            .args(extra)
            .env(
                "TESSERA_PRIVATE_KEY",
                hex::encode(wallet.signer().to_bytes()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log(&self.dir, name)?)
            .spawn()?;
        Ok(Proc(child))
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(http()
            .get(format!("{}{path}", self.url))
            .call()?
            .body_mut()
            .read_json()?)
    }

    fn provider(&self, w: &Wallet) -> anyhow::Result<Value> {
        let me = format!("{:#x}", w.address());
        Ok(self.get("/v1/providers")?["providers"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| {
                        p["address"]
                            .as_str()
                            .is_some_and(|a| a.eq_ignore_ascii_case(&me))
                    })
                    .cloned()
            })
            .unwrap_or(Value::Null))
    }

    /// Balance plus stake.
    fn worth(&self, w: &Wallet) -> anyhow::Result<i64> {
        let a = self.get(&format!("/v1/accounts/{:#x}", w.address()))?;
        Ok(a["balance"].as_i64().unwrap_or(0) + a["staked"].as_i64().unwrap_or(0))
    }

    fn honest_slashed(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for w in &self.honest {
            total += self.provider(w)?["slashed"].as_u64().unwrap_or(0);
        }
        Ok(total)
    }

    fn connected(&self) -> anyhow::Result<usize> {
        Ok(self.get("/health")?["providers"].as_u64().unwrap_or(0) as usize)
    }

    fn wait_connected(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.connected()? < n {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} providers connected; logs in {}",
                    self.connected()?,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits until no money is held for jobs in flight (verdicts landed).
    fn settle(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = http()
                .get(format!("{}/metrics", self.url))
                .call()?
                .body_mut()
                .read_to_string()?;
            let held = |name: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name} ")))
                    .map(|v| v.trim() != "0")
            };
            if held("tessera_balance_escrow_micro") == Some(false)
                && held("tessera_reserved_micro") == Some(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("money still held after two minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One chat request; returns (status, provider address, cost).
    fn chat(&self, max_tokens: u32) -> anyhow::Result<(u16, String, u64)> {
        let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": max_tokens, "temperature": 0});
        let mut r = http()
            .post(format!("{}/v1/chat/completions", self.url))
            .header("Authorization", &format!("Bearer {}", self.key))
            .send_json(&body)?;
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().unwrap_or_default();
        let provider = v["tessera"]["provider"]
            .as_str()
            .unwrap_or("")
            .to_lowercase();
        Ok((status, provider, v["tessera"]["cost"].as_u64().unwrap_or(0)))
    }
}

/// Runs the round and prints the table (or JSON).
pub fn run(args: AttackArgs) -> anyhow::Result<()> {
    let rows = attack_round(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| attack | finding | attempts | prevented | attacker gain (µ) | honest slashed (µ) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.attack, r.finding, r.attempts, r.prevented, r.attacker_gain, r.honest_slashed
        );
    }
    Ok(())
}

/// The attacks, one after another, on one network.
pub fn attack_round(args: &AttackArgs) -> anyhow::Result<Vec<AttackRow>> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let hub_flags = [
        "--verify-probability",
        "1",
        "--cross-check-probability",
        "1",
        "--canary-probability",
        "1",
        "--verify-recheck-ms",
        "200",
        "--requests-per-minute",
        "100000",
    ];
    let (hub, url) = start_hub(&exe, &dir, "hub", &hub_flags)?;
    let mut net = Network {
        exe,
        dir,
        url,
        threads: args.threads,
        procs: vec![hub],
        honest: Vec::new(),
        key: String::new(),
    };
    for (i, price) in [10u64, 11, 12].into_iter().enumerate() {
        let w = Wallet::random();
        net.procs
            .push(net.node(&format!("honest-{i}"), &w, price, &[])?);
        net.honest.push(w);
    }
    net.wait_connected(3)?;
    let agent = Wallet::random();
    http()
        .post(format!("{}/v1/dev/faucet", net.url))
        .send_json(json!({"address": agent.address(), "amount": 100_000_000u64}))?;
    net.key = format!("sk-attack-{}", hex::encode(agent.address()));
    register_key(&net.url, &agent, &net.key, 1, Duration::from_secs(3600))?;
    let mut rows = Vec::new();

    // 1. Serve another file under the known name (no verifier could ever hold it).
    {
        let before = net.honest_slashed()?;
        let real = tessera_engine::registry::fetch("smollm2-135m")?;
        let forged = net.dir.join("forged.gguf");
        std::fs::copy(&real, &forged)?;
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&forged)?
            .write_all(b"another file")?;
        let w = Wallet::random();
        let mut p = net.node(
            "forger",
            &w,
            1,
            &["--model", forged.to_str().context("path")?],
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = p.0.try_wait()? {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let refused = status.is_some_and(|s| !s.success()) && net.provider(&w)?.is_null();
        rows.push(AttackRow {
            attack: "serve another model file under a known name",
            finding: "1",
            attempts: 1,
            prevented: u32::from(refused),
            attacker_gain: net.worth(&w)?,
            honest_slashed: net.honest_slashed()? - before,
        });
    }

    // 2. Pad answers with tokens never generated (bill more than delivered / than max_tokens).
    rows.push(cheating_provider(
        &net,
        args.rounds,
        "pad answers with tokens never generated",
        "2, 3",
        "pad-tokens",
    )?);
    // 3. Serve cheaper weights under the pinned file's hash.
    rows.push(cheating_provider(
        &net,
        args.rounds,
        "serve re-quantized weights",
        "verification",
        "requantized-q4-0",
    )?);
    // 4. Verify lazily or lie as a verifier.
    rows.push(cheating_verifier(
        &net,
        args.rounds,
        "verify lazily (pass without checking)",
        "lazy-verifier",
    )?);
    rows.push(cheating_verifier(
        &net,
        args.rounds,
        "lie as a verifier (fail honest work)",
        "lying-verifier",
    )?);

    // 5. Hang up mid-stream to leave the agent's money locked.
    {
        let before = net.honest_slashed()?;
        let mut prevented = 0;
        for _ in 0..args.rounds {
            let r = http()
                .post(format!("{}/v1/chat/completions", net.url))
                .header("Authorization", &format!("Bearer {}", net.key))
                .send_json(json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200, "stream": true}))?;
            let mut reader = std::io::BufReader::new(r.into_body().into_reader());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line)?;
            drop(reader);
            prevented += u32::from(net.settle().is_ok());
        }
        rows.push(AttackRow {
            attack: "hang up mid-stream to lock the agent's money",
            finding: "5",
            attempts: args.rounds,
            prevented,
            attacker_gain: 0,
            honest_slashed: net.honest_slashed()? - before,
        });
    }

    // 6. Register at an absurd price to break admission for everyone.
    {
        let before = net.honest_slashed()?;
        let w = Wallet::random();
        let connected = net.connected()?;
        let p = net.node("absurd", &w, u64::MAX, &[])?;
        net.wait_connected(connected + 1)?;
        let mut prevented = 0;
        for _ in 0..args.rounds {
            let (status, _, _) = net.chat(4)?;
            prevented += u32::from(status == 200);
        }
        net.settle()?;
        // Its gain is what it earned serving (the fees it earns checking others' work are pay
        // for honest work, not for the attack).
        let served = net.provider(&w)?["revenue"].as_i64().unwrap_or(0);
        rows.push(AttackRow {
            attack: "register at price u64::MAX",
            finding: "7",
            attempts: args.rounds,
            prevented,
            attacker_gain: served,
            honest_slashed: net.honest_slashed()? - before,
        });
        drop(p);
    }

    // 7. Replay a signature made for this hub at another hub.
    {
        let (other, other_url) = start_hub(&net.exe, &net.dir, "other-hub", &[])?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let signed = agent.sign(
            ApiKeyRegistration {
                keyHash: <[u8; 32]>::from(Sha256::digest(b"sk-replayed")).into(),
                validUntil: now + 3600,
                nonce: 99,
                expiry: now + 600,
            },
            domain(&net.url)?,
        )?;
        let status = http()
            .post(format!("{other_url}/v1/keys"))
            .send_json(&signed)?
            .status()
            .as_u16();
        drop(other);
        rows.push(AttackRow {
            attack: "replay a signed message at another hub",
            finding: "8",
            attempts: 1,
            prevented: u32::from(status == 401),
            attacker_gain: 0,
            honest_slashed: 0,
        });
    }
    Ok(rows)
}

/// A provider that cheats on every job, cheapest so that it serves first.
fn cheating_provider(
    net: &Network,
    rounds: u32,
    attack: &'static str,
    finding: &'static str,
    cheat: &str,
) -> anyhow::Result<AttackRow> {
    let before = net.honest_slashed()?;
    let w = Wallet::random();
    let connected = net.connected()?;
    let _p = net.node(cheat, &w, 1, &["--cheat", cheat])?;
    net.wait_connected(connected + 1)?;
    let start = 1_000_000; // the dev stake it was funded with
    let me = format!("{:#x}", w.address());
    let mut attempts = 0;
    for _ in 0..rounds {
        let (_, by, _) = net.chat(8)?;
        attempts += u32::from(by == me || by.is_empty());
        net.settle()?;
    }
    let gain = net.worth(&w)? - start;
    let p = net.provider(&w)?;
    let prevented = if gain <= 0 && p["quarantined"] == json!(true) {
        attempts
    } else {
        0
    };
    Ok(AttackRow {
        attack,
        finding,
        attempts,
        prevented,
        attacker_gain: gain,
        honest_slashed: net.honest_slashed()? - before,
    })
}

/// A provider that cheats as a verifier; honest providers serve.
fn cheating_verifier(
    net: &Network,
    rounds: u32,
    attack: &'static str,
    cheat: &str,
) -> anyhow::Result<AttackRow> {
    let before = net.honest_slashed()?;
    let w = Wallet::random();
    let connected = net.connected()?;
    let _p = net.node(cheat, &w, 50, &["--cheat", cheat])?;
    net.wait_connected(connected + 1)?;
    let start = 1_000_000;
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while attempts < rounds.max(1) * 10
        && net.provider(&w)?["quarantined"] != json!(true)
        && Instant::now() < deadline
    {
        net.chat(6)?;
        net.settle()?;
        attempts += 1;
    }
    let p = net.provider(&w)?;
    let gain = net.worth(&w)? - start;
    // Its attempts are the checks it answered; each is foiled if it ends caught and out of pocket.
    let checks = p["verifications_done"].as_u64().unwrap_or(0) as u32;
    let prevented = if p["quarantined"] == json!(true) && gain <= 0 {
        checks
    } else {
        0
    };
    let _ = attempts;
    Ok(AttackRow {
        attack,
        finding: "4",
        attempts: checks,
        prevented,
        attacker_gain: gain,
        honest_slashed: net.honest_slashed()? - before,
    })
}
