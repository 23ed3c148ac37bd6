//! `tessera demo`: a whole network on this machine. Starts a hub and three provider nodes (one of
//! them cheating with re-quantized weights) as child processes, funds an agent, sends chat
//! requests through the OpenAI-compatible API and shows the cheater being caught and slashed.
//!
//! Ctrl-C or SIGTERM (and any error) stops every child process before the demo exits: none is
//! left behind (issue 17).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tessera_protocol::Wallet;

use crate::client::http;

/// `tessera demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Chat requests to send.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_tokens: u32,
    /// Probability that a job is verified.
    #[arg(long, default_value_t = 1.0)]
    verify_probability: f64,
    /// Compute threads per node.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep the hub's database and logs here instead of a temporary directory.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// How long the children get to drain (`--drain-timeout-secs` of the hub and the nodes).
const CHILD_DRAIN_SECS: u64 = 5;
/// How long the demo waits for its children to exit after SIGTERM before it kills them.
const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(CHILD_DRAIN_SECS + 5);

/// The hub and node processes the demo started. Each runs in its own process group, so a
/// terminal's Ctrl-C reaches only the demo, which then stops them itself: SIGTERM, up to
/// [`CHILD_STOP_TIMEOUT`] to exit, then SIGKILL, and every one is reaped. Once stopping, no
/// further child is started, so none can slip past the stop.
#[derive(Clone, Default)]
struct Children(Arc<Mutex<ChildSet>>);

#[derive(Default)]
struct ChildSet {
    running: Vec<Child>,
    stopping: bool,
    interrupted: bool,
}

impl Children {
    fn lock(&self) -> MutexGuard<'_, ChildSet> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, cmd: &mut Command) -> anyhow::Result<()> {
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let mut set = self.lock();
        if set.stopping {
            bail!("interrupted");
        }
        set.running.push(cmd.spawn()?);
        Ok(())
    }

    fn interrupted(&self) -> bool {
        self.lock().interrupted
    }

    /// Asks every child to stop, waits up to `grace` for them, kills the rest; returns once all
    /// are reaped. Safe to call from several threads.
    fn stop(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        {
            let mut set = self.lock();
            if !set.stopping {
                set.stopping = true;
                for child in &mut set.running {
                    terminate(child);
                }
            }
        }
        loop {
            let mut set = self.lock();
            set.running
                .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
            if set.running.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                drop(set);
                return self.kill();
            }
            drop(set);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills every child at once and reaps it.
    fn kill(&self) {
        let mut set = self.lock();
        set.stopping = true;
        for mut child in set.running.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the children on the first Ctrl-C or SIGTERM (kills them at once on a second one),
    /// then exits with status 130. Returns once the handlers are installed.
    fn stop_on_signal(&self) -> anyhow::Result<()> {
        let children = self.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let mut signals = match crate::signals::Signals::install() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let name = signals.next().await;
                children.lock().interrupted = true;
                eprintln!(
                    "\n{name}: stopping the hub and nodes (up to {} s; again to kill them at once)",
                    CHILD_STOP_TIMEOUT.as_secs()
                );
                let stopping = children.clone();
                let stopped =
                    tokio::task::spawn_blocking(move || stopping.stop(CHILD_STOP_TIMEOUT));
                tokio::select! {
                    _ = stopped => {}
                    _ = signals.next() => children.kill(),
                }
                std::process::exit(130);
            });
        });
        ready_rx
            .recv()
            .context("the signal thread ended")?
            .context("installing the signal handlers")
    }
}

/// Stops the children when the demo returns, by success or by any error.
struct StopOnDrop(Children);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(CHILD_STOP_TIMEOUT);
    }
}

#[cfg(unix)]
fn terminate(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped, so the
        // id cannot belong to another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

#[cfg(not(unix))]
fn terminate(child: &mut Child) {
    let _ = child.kill();
}

fn log(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::File::create(
        dir.join(format!("{name}.log")),
    )?))
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !cfg!(feature = "adversary") {
        bail!("the demo runs a cheating node; build with `--features adversary` (cargo run --release --features adversary -- demo)");
    }
    let children = Children::default();
    children.stop_on_signal()?;
    let result = demo(args, &children);
    if children.interrupted() {
        // Interrupted: the signal thread reports and exits; the error is only its echo.
        children.stop(CHILD_STOP_TIMEOUT);
        std::process::exit(130);
    }
    result
}

fn demo(args: DemoArgs, children: &Children) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    // Declared after `temp`, so the children stop before their directory is removed.
    let _stop = StopOnDrop(children.clone());
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let db = format!("sqlite://{}", dir.join("hub.db").display());
    let addr_file = dir.join("hub.addr");
    let _ = std::fs::remove_file(&addr_file);
    children.spawn(
        Command::new(&exe)
            .args([
                "hub",
                "--drain-timeout-secs",
                &CHILD_DRAIN_SECS.to_string(),
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &db,
                "--verify-probability",
                &args.verify_probability.to_string(),
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(log(&dir, "hub")?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break format!("http://{}", a.trim());
        }
        if Instant::now() > deadline {
            bail!(
                "the hub did not start; see {}",
                dir.join("hub.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("hub        {url}   (logs and ledger in {})", dir.display());
    let nodes = [
        ("honest-a", 10u64, None),
        ("honest-b", 12, None),
        ("cheater", 6, Some("requantized-q4-0")),
    ];
    let mut wallets = Vec::new();
    for (name, price, cheat) in nodes {
        let wallet = Wallet::random();
        let mut cmd = Command::new(&exe);
        cmd.args([
            "node",
            "--hub",
            &url,
            "--price",
            &price.to_string(),
            "--threads",
            &args.threads.to_string(),
            "--dev-stake",
            "--drain-timeout-secs",
            &CHILD_DRAIN_SECS.to_string(),
        ])
        .env(
            "TESSERA_PRIVATE_KEY",
            hex::encode(wallet.signer().to_bytes()),
        )
        .stdout(Stdio::null())
        .stderr(log(&dir, name)?);
        if let Some(cheat) = cheat {
            cmd.args(["--cheat", cheat]);
        }
        children.spawn(&mut cmd)?;
        println!(
            "node       {name:<9} {:#x}  price {price}/token{}",
            wallet.address(),
            if cheat.is_some() {
                "  (cheats: Q4_0 weights)"
            } else {
                ""
            }
        );
        wallets.push((name, wallet));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Value = http()
            .get(format!("{url}/health"))
            .call()?
            .body_mut()
            .read_json()?;
        if v["providers"].as_u64() == Some(3) {
            break;
        }
        if Instant::now() > deadline {
            bail!("nodes did not connect; see the logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    let agent = Wallet::random();
    http()
        .post(format!("{url}/v1/dev/faucet"))
        .send_json(json!({"address": agent.address(), "amount": 1_000_000}))?;
    let key = format!("sk-demo-{}", hex::encode(agent.address()));
    crate::client::register_key(&url, &agent, &key, 1, Duration::from_secs(24 * 3600))?;
    println!(
        "agent      {:#x}  funded 1000000, API key {key}\n",
        agent.address()
    );

    let questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    for i in 0..args.requests {
        let q = questions[i % questions.len()];
        let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens, "temperature": 0});
        let mut r = http()
            .post(format!("{url}/v1/chat/completions"))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(&body)?;
        let v: Value = r.body_mut().read_json()?;
        if r.status() != 200 {
            println!("> {q}\n  error: {}", v["error"]["message"]);
            continue;
        }
        let provider = v["tessera"]["provider"]
            .as_str()
            .unwrap_or("?")
            .to_lowercase();
        let name = wallets
            .iter()
            .find(|(_, w)| format!("{:#x}", w.address()) == provider)
            .map_or("?", |(n, _)| n);
        println!(
            "> {q}\n  {}\n  served by {name}, cost {}, verification {}",
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .trim(),
            v["tessera"]["cost"],
            v["tessera"]["verification"]
        );
        // Let the verdict land, so the next job sees the cheater quarantined.
        wait_verifications(&url, Duration::from_secs(120))?;
    }

    let providers: Value = http()
        .get(format!("{url}/v1/providers"))
        .call()?
        .body_mut()
        .read_json()?;
    println!(
        "\nverification p = {}, slash S = {}, a cheater's expected loss per job p·S = {}",
        providers["verify_probability"],
        providers["slash_amount"],
        providers["cheater_expected_loss_per_job"]
    );
    println!(
        "{:<9} {:>6} {:>5} {:>7} {:>7} {:>9} {:>10} {:>10}",
        "node", "rep", "jobs", "passed", "failed", "slashed", "balance", "stake"
    );
    for (name, wallet) in &wallets {
        let p = providers["providers"]
            .as_array()
            .and_then(|ps| {
                ps.iter().find(|p| {
                    p["address"].as_str().is_some_and(|a| {
                        a.eq_ignore_ascii_case(&format!("{:#x}", wallet.address()))
                    })
                })
            })
            .cloned()
            .unwrap_or_default();
        let a: Value = http()
            .get(format!("{url}/v1/accounts/{:#x}", wallet.address()))
            .call()?
            .body_mut()
            .read_json()?;
        println!(
            "{name:<9} {:>6.2} {:>5} {:>7} {:>7} {:>9} {:>10} {:>10}{}",
            p["reputation"].as_f64().unwrap_or(0.0),
            p["jobs"].to_string(),
            p["verified_passed"].to_string(),
            p["verified_failed"].to_string(),
            p["slashed"].to_string(),
            a["balance"].to_string(),
            a["staked"].to_string(),
            if p["quarantined"] == json!(true) {
                "  QUARANTINED"
            } else {
                ""
            }
        );
    }
    let a: Value = http()
        .get(format!("{url}/v1/accounts/{:#x}", agent.address()))
        .call()?
        .body_mut()
        .read_json()?;
    println!("agent balance {}", a["balance"]);
    let audit = Command::new(&exe)
        .args(["ledger", "audit", "--url", &db])
        .output()?;
    println!(
        "ledger audit: {}",
        if audit.status.success() {
            "clean"
        } else {
            "FAILED"
        }
    );
    if !audit.status.success() {
        bail!("{}", String::from_utf8_lossy(&audit.stdout));
    }
    Ok(())
}

/// Waits until no verification is pending (every escrow is closed).
fn wait_verifications(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = http()
            .get(format!("{url}/metrics"))
            .call()?
            .body_mut()
            .read_to_string()?;
        let escrow = metrics
            .lines()
            .find_map(|l| l.strip_prefix("tessera_balance_escrow_micro "))
            .context("escrow gauge")?;
        if escrow.trim() == "0" || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
