//! Issue 17: `tessera node`, `tessera hub` and `tessera demo` stop on SIGINT/SIGTERM in every
//! state, within their documented bound, with a clean ledger afterwards and no process left.
//! Real processes on loopback ports, temporary SQLite ledgers and the real SmolLM2-135M model.
//!
//! The start-process helpers are a minimal copy of those in `network.rs` (which stays as it is).

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{ApiKeyRegistration, Domain, Wallet};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// The drain bound the tests give hubs and nodes (`--drain-timeout-secs`).
const DRAIN_SECS: u64 = 2;
/// Slack on top of a bound for a loaded 2-core machine: process exit, closing the database.
const SLACK: Duration = Duration::from_millis(2500);
/// Bound for a process with nothing in flight (connecting, backing off, idle).
const IDLE_BOUND: Duration = Duration::from_millis(2000);

/// A child process killed on drop, so a failing test leaves nothing running.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which is not reaped before `Proc` is dropped.
        assert_eq!(
            unsafe { libc::kill(self.pid(), signal) },
            0,
            "kill {}",
            self.pid()
        );
    }

    /// Waits up to `bound` for the process to exit (and reaps it).
    fn exits_within(&mut self, bound: Duration, what: &str) -> Result<(ExitStatus, Duration)> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok((status, start.elapsed()));
            }
            if start.elapsed() > bound {
                bail!("{what} did not exit within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a process with this id is running (a zombie is not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The ids of the processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file"))
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits until `name`'s log contains `needle`.
fn wait_log(dir: &Path, name: &str, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !read_log(dir, name).contains(needle) {
        if Instant::now() > deadline {
            bail!("{name} never logged {needle:?}:\n{}", read_log(dir, name));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Hub {
    proc: Proc,
    url: String,
    db: String,
    dir: tempfile::TempDir,
}

fn start_hub(args: &[&str]) -> Result<Hub> {
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("hub.db").display());
    let addr_file = dir.path().join("addr");
    let child = Command::new(BIN)
        .args([
            "hub",
            "--db",
            &db,
            "--listen",
            "127.0.0.1:0",
            "--dev",
            "--addr-file",
        ])
        .arg(&addr_file)
        .args(["--drain-timeout-secs", &DRAIN_SECS.to_string()])
        // Small networks: a provider is scheduled even with no other to verify it.
        .arg("--allow-unverified")
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log_file(dir.path(), "hub"))
        .spawn()?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            break addr;
        }
        if Instant::now() > deadline {
            bail!("the hub did not announce its address");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Hub {
        proc,
        url: format!("http://{}", addr.trim()),
        db,
        dir,
    })
}

/// Starts a node of a random wallet against `hub_url`, logging to `dir/NAME.log`.
fn start_node(dir: &Path, hub_url: &str, name: &str, price: u64, extra: &[&str]) -> Result<Proc> {
    let key = hex::encode(Wallet::random().signer().to_bytes());
    let drain = DRAIN_SECS.to_string();
    let drain: &[&str] = if extra.contains(&"--drain-timeout-secs") {
        &[]
    } else {
        &["--drain-timeout-secs", &drain]
    };
    let child = Command::new(BIN)
        .args([
            "node",
            "--hub",
            hub_url,
            "--private-key",
            &key,
            "--price",
            &price.to_string(),
        ])
        .args(["--capacity", "2", "--threads", "1", "--dev-stake"])
        .args(drain)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log_file(dir, name))
        .spawn()?;
    Ok(Proc(child))
}

impl Hub {
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn node(&self, name: &str, price: u64, extra: &[&str]) -> Result<Proc> {
        start_node(self.dir(), &self.url, name, price, extra)
    }

    fn connected(&self) -> Result<usize> {
        let v: Value = http()
            .get(format!("{}/v1/providers", self.url))
            .call()?
            .body_mut()
            .read_json()?;
        Ok(v["providers"].as_array().map_or(0, |ps| {
            ps.iter().filter(|p| p["connected"] == json!(true)).count()
        }))
    }

    fn wait_connected(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.connected()? < n {
            if Instant::now() > deadline {
                bail!(
                    "fewer than {n} providers connected; logs in {}",
                    self.dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A funded agent's API key.
    fn agent(&self) -> Result<String> {
        let wallet = Wallet::random();
        let r = http()
            .post(format!("{}/v1/dev/faucet", self.url))
            .send_json(json!({"address": wallet.address(), "amount": 1_000_000}))?;
        assert_eq!(r.status(), 200);
        let key = format!("sk-test-{}", hex::encode(wallet.address()));
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let message = ApiKeyRegistration {
            keyHash: <[u8; 32]>::from(Sha256::digest(key.as_bytes())).into(),
            validUntil: now + 3600,
            nonce: 1,
            expiry: now + 600,
        };
        let d: Value = http()
            .get(format!("{}/v1/domain", self.url))
            .call()?
            .body_mut()
            .read_json()?;
        let domain = Domain::for_hub(
            d["chainId"].as_u64().context("chainId")?,
            d["verifyingContract"]
                .as_str()
                .context("verifyingContract")?
                .parse()?,
        );
        let signed = wallet.sign(message, domain)?;
        let r = http()
            .post(format!("{}/v1/keys", self.url))
            .send_json(&signed)?;
        assert_eq!(r.status(), 200);
        Ok(key)
    }

    /// Starts a long streaming chat and returns its lines once the first content arrived.
    fn long_stream(&self, key: &str) -> Result<impl Iterator<Item = std::io::Result<String>>> {
        let request = json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
            "max_tokens": 1000,
            "temperature": 0,
            "stream": true,
        });
        let r = http()
            .post(format!("{}/v1/chat/completions", self.url))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(&request)?;
        assert_eq!(r.status(), 200);
        let mut lines = BufReader::new(r.into_body().into_reader()).lines();
        let mut content = 0;
        while content < 3 {
            let line = lines.next().context("the stream ended early")??;
            if line.starts_with("data: {") && line.contains("\"content\":\"") {
                content += 1;
            }
        }
        Ok(lines)
    }

    /// The ledger audit, by the CLI.
    fn audit(&self) -> Result<()> {
        let out = Command::new(BIN)
            .args(["ledger", "audit", "--url", &self.db])
            .output()?;
        if !out.status.success() {
            bail!(
                "ledger audit failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// SIGTERM, then the hub must exit cleanly within its bound.
    fn stop(&mut self, bound: Duration) -> Result<()> {
        self.proc.signal(libc::SIGTERM);
        let (status, _) = self.proc.exits_within(bound, "the hub")?;
        assert!(
            status.success(),
            "hub exit {status}:\n{}",
            read_log(self.dir(), "hub")
        );
        Ok(())
    }
}

/// The rest of a stream: the error chunk it ended with, if any.
fn stream_error(lines: impl Iterator<Item = std::io::Result<String>>) -> Option<Value> {
    lines
        .map_while(|l| l.ok())
        .filter_map(|l| {
            l.strip_prefix("data: ")
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
        })
        .find(|v| v.get("error").is_some())
}

#[test]
fn node_stops_while_connecting_and_while_backing_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A "hub" that accepts TCP connections and never answers the WebSocket upgrade.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let silent_url = format!("http://{}", silent.local_addr()?);
    // A hub that is not there at all: connections are refused and the node backs off.
    let absent_url = format!("http://{}", TcpListener::bind("127.0.0.1:0")?.local_addr()?);
    let mut connecting = start_node(dir.path(), &silent_url, "connecting", 10, &[])?;
    let mut backing_off = start_node(dir.path(), &absent_url, "backing-off", 10, &[])?;

    let (_held, _) = silent.accept()?; // the node is now inside its connection attempt
    std::thread::sleep(Duration::from_millis(200));
    connecting.signal(libc::SIGTERM);
    let (status, took) = connecting.exits_within(IDLE_BOUND, "a connecting node")?;
    assert!(
        status.success(),
        "{status}:\n{}",
        read_log(dir.path(), "connecting")
    );
    assert!(read_log(dir.path(), "connecting").contains("stopped while connecting"));
    eprintln!("connecting node stopped in {took:?}");

    wait_log(
        dir.path(),
        "backing-off",
        "cannot reach hub",
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_millis(100));
    backing_off.signal(libc::SIGINT);
    let (status, took) = backing_off.exits_within(IDLE_BOUND, "a backing-off node")?;
    let log = read_log(dir.path(), "backing-off");
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("stopped while waiting to reconnect"), "{log}");
    eprintln!("backing-off node stopped in {took:?}");
    Ok(())
}

#[test]
fn idle_node_then_idle_hub_stop_cleanly_and_a_second_signal_stops_at_once() -> Result<()> {
    let mut hub = start_hub(&["--verify-probability", "0"])?;
    let mut node = hub.node("node", 10, &[])?;
    let mut stubborn = hub.node("stubborn", 10, &[])?;
    hub.wait_connected(2)?;

    node.signal(libc::SIGTERM);
    let (status, took) = node.exits_within(IDLE_BOUND, "an idle node")?;
    assert!(
        status.success(),
        "{status}:\n{}",
        read_log(hub.dir(), "node")
    );
    eprintln!("idle node stopped in {took:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while hub.connected()? != 1 {
        assert!(
            Instant::now() < deadline,
            "the hub still lists the stopped node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Two signals in a row: the second one does not wait for any drain.
    stubborn.signal(libc::SIGINT);
    stubborn.signal(libc::SIGINT);
    let (status, _) = stubborn.exits_within(IDLE_BOUND, "a node given two signals")?;
    assert!(status.success() || status.code() == Some(130), "{status}");

    let start = Instant::now();
    hub.stop(IDLE_BOUND)?;
    eprintln!("idle hub stopped in {:?}", start.elapsed());
    assert!(read_log(hub.dir(), "hub").contains("hub stopped"));
    hub.audit()
}

#[test]
fn node_stopped_mid_job_drains_then_fails_it_and_charges_only_what_was_delivered() -> Result<()> {
    let mut hub = start_hub(&["--verify-probability", "0"])?;
    let mut node = hub.node("node", 10, &[])?;
    hub.wait_connected(1)?;
    let key = hub.agent()?;
    let lines = hub.long_stream(&key)?;
    node.signal(libc::SIGTERM);
    let start = Instant::now();
    let error =
        stream_error(lines).context("a job cut off by the drain timeout ends with an error")?;
    let cost = error["tessera"]["cost"].as_u64().context("cost")?;
    assert!(
        cost > 0 && cost < 10_000,
        "charged for the delivered tokens only: {error}"
    );
    let (status, _) =
        node.exits_within(Duration::from_secs(DRAIN_SECS) + SLACK, "a serving node")?;
    let log = read_log(hub.dir(), "node");
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        log.contains("draining before shutdown") && log.contains("drain_timeout=2s"),
        "{log}"
    );
    assert!(
        log.contains("drain timeout: failing the jobs still running"),
        "{log}"
    );
    eprintln!("serving node stopped in {:?}", start.elapsed());
    hub.stop(IDLE_BOUND)?;
    hub.audit()
}

#[test]
fn verifier_stopped_mid_verification_finishes_it_and_exits() -> Result<()> {
    let mut hub = start_hub(&["--verify-probability", "1"])?;
    // The cheaper node serves; the other one is the only possible verifier.
    let _server = hub.node("server", 5, &[])?;
    // A bound long enough for the check of a 150-token answer on one thread of a busy machine.
    let mut verifier = hub.node("verifier", 10, &["--drain-timeout-secs", "40"])?;
    hub.wait_connected(2)?;
    let key = hub.agent()?;
    let request = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        "max_tokens": 150,
        "temperature": 0,
    });
    let r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(&request)?;
    assert_eq!(r.status(), 200);
    // The hub asks for the verification as it answers: stop the verifier in the middle of it.
    std::thread::sleep(Duration::from_millis(100));
    verifier.signal(libc::SIGTERM);
    let (status, took) =
        verifier.exits_within(Duration::from_secs(40) + SLACK, "a verifying node")?;
    let log = read_log(hub.dir(), "verifier");
    assert!(status.success(), "{status}:\n{log}");
    if log.contains("verifications=1") {
        assert!(
            log.contains("scored a claimed generation"),
            "a verification in flight is finished:\n{log}"
        );
        eprintln!("verifying node finished its check and stopped in {took:?}");
    } else {
        eprintln!("the verification was over before the signal; stopped in {took:?}:\n{log}");
    }
    hub.stop(Duration::from_secs(DRAIN_SECS) + SLACK)?;
    hub.audit()
}

#[test]
fn hub_stopped_mid_stream_refunds_within_its_bound_and_its_node_then_stops() -> Result<()> {
    let mut hub = start_hub(&["--verify-probability", "0"])?;
    let mut node = hub.node("node", 10, &[])?;
    hub.wait_connected(1)?;
    let key = hub.agent()?;
    let lines = hub.long_stream(&key)?;
    let start = Instant::now();
    hub.stop(Duration::from_secs(DRAIN_SECS) + SLACK)?;
    eprintln!(
        "hub with a stream in flight stopped in {:?}",
        start.elapsed()
    );
    let log = read_log(hub.dir(), "hub");
    assert!(
        log.contains("draining") && log.contains("drain timeout"),
        "{log}"
    );
    drop(lines);
    hub.audit()?;
    // The node lost its hub while serving: it keeps trying to reconnect, and still stops.
    wait_log(hub.dir(), "node", "retry_in", Duration::from_secs(10))?;
    node.signal(libc::SIGTERM);
    let (status, _) = node.exits_within(
        Duration::from_secs(DRAIN_SECS) + SLACK,
        "a node whose hub left",
    )?;
    assert!(
        status.success(),
        "{status}:\n{}",
        read_log(hub.dir(), "node")
    );
    Ok(())
}

#[test]
fn hub_and_nodes_stopped_at_the_same_instant_twenty_rounds() -> Result<()> {
    let bound = Duration::from_secs(DRAIN_SECS) + SLACK + Duration::from_secs(1);
    let (mut clean, mut slowest) = (0, Duration::ZERO);
    for round in 0..20u64 {
        let mut hub = start_hub(&["--verify-probability", "0.5"])?;
        let mut nodes = [hub.node("a", 10, &[])?, hub.node("b", 11, &[])?];
        // Stop at a different moment each round: while the nodes load or connect, once they
        // are registered, or with a stream in flight.
        let mut lines = None;
        let waited = round % 4 != 0;
        match round % 4 {
            0 => std::thread::sleep(Duration::from_millis(50 + 97 * round % 400)),
            1 => hub.wait_connected(2)?,
            _ => {
                hub.wait_connected(2)?;
                lines = Some(hub.long_stream(&hub.agent()?)?);
            }
        }
        let pids: Vec<i32> = std::iter::once(hub.proc.pid())
            .chain(nodes.iter().map(Proc::pid))
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) on our own children, not yet reaped.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
        let (status, _) = hub.proc.exits_within(bound, "the hub")?;
        assert!(
            status.success(),
            "round {round}: hub {status}:\n{}",
            read_log(hub.dir(), "hub")
        );
        for (node, name) in nodes.iter_mut().zip(["a", "b"]) {
            let (status, took) = node.exits_within(bound, "a node")?;
            clean += usize::from(status.success());
            slowest = slowest.max(took);
            // Before its first instructions ran, a process may still die of the signal itself.
            assert!(
                status.success() || !waited,
                "round {round}: node {name} {status}:\n{}",
                read_log(hub.dir(), name)
            );
        }
        drop(lines);
        for pid in pids {
            assert!(!running(pid), "round {round}: process {pid} still running");
        }
        hub.audit().with_context(|| format!("round {round}"))?;
    }
    eprintln!("20 rounds: {clean} of 40 nodes exited 0, the slowest after the hub in {slowest:?}");
    Ok(())
}

#[test]
fn demo_interrupted_mid_run_leaves_no_child_process() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut demo = Proc(
        Command::new(BIN)
            .args(["demo", "--requests", "4", "--max-tokens", "24", "--dir"])
            .arg(dir.path())
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stdout = demo.0.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    // Mid-run: the first answer is in, the second request is on its way.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
        if line.trim_start().starts_with("served by") {
            break;
        }
    }
    let children = children_of(demo.pid());
    assert_eq!(
        children.len(),
        5,
        "the chain (`tessera chain up`), a hub and three nodes: {children:?}"
    );
    // Anvil runs under `tessera chain up`: it must go too.
    let children: Vec<i32> = children
        .iter()
        .flat_map(|&c| std::iter::once(c).chain(children_of(c)))
        .collect();
    demo.signal(libc::SIGINT);
    let (status, took) = demo.exits_within(Duration::from_secs(15), "the demo")?;
    let mut stderr = String::new();
    demo.0
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping the hub and nodes"), "{stderr}");
    for pid in &children {
        assert!(!running(*pid), "child {pid} of the demo is still running");
    }
    eprintln!(
        "demo stopped with its {} children in {took:?}",
        children.len()
    );
    Ok(())
}
