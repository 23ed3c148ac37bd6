//! A network on this machine: a hub and provider nodes as child processes of this command
//! (`tessera demo`, and `tessera synth` without `--hub`). Each child runs in its own process
//! group, so a terminal's Ctrl-C reaches only this command, which then stops them itself; none
//! is left behind (issue 17).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use tessera_protocol::Wallet;

use crate::client::http;

/// How long the children get to drain (`--drain-timeout-secs` of the hub and the nodes).
pub const CHILD_DRAIN_SECS: u64 = 5;
/// How long the demo waits for its children to exit after SIGTERM before it kills them.
pub const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(CHILD_DRAIN_SECS + 5);

/// The hub and node processes the demo started. Each runs in its own process group, so a
/// terminal's Ctrl-C reaches only the demo, which then stops them itself: SIGTERM, up to
/// [`CHILD_STOP_TIMEOUT`] to exit, then SIGKILL, and every one is reaped. Once stopping, no
/// further child is started, so none can slip past the stop.
#[derive(Clone, Default)]
pub struct Children(Arc<Mutex<ChildSet>>);

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

    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<()> {
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let mut set = self.lock();
        if set.stopping {
            bail!("interrupted");
        }
        set.running.push(cmd.spawn()?);
        Ok(())
    }

    pub fn interrupted(&self) -> bool {
        self.lock().interrupted
    }

    /// Asks every child to stop, waits up to `grace` for them, kills the rest; returns once all
    /// are reaped. Safe to call from several threads.
    pub fn stop(&self, grace: Duration) {
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
    pub fn kill(&self) {
        let mut set = self.lock();
        set.stopping = true;
        for mut child in set.running.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the children on the first Ctrl-C or SIGTERM (kills them at once on a second one),
    /// then exits with status 130. Returns once the handlers are installed.
    pub fn stop_on_signal(&self) -> anyhow::Result<()> {
        let (stopping, killing) = (self.clone(), self.clone());
        crate::signals::on_signals(
            move |name| {
                stopping.lock().interrupted = true;
                eprintln!(
                    "\n{name}: stopping the hub and nodes (up to {} s; again to kill them at once)",
                    CHILD_STOP_TIMEOUT.as_secs()
                );
                stopping.stop(CHILD_STOP_TIMEOUT);
                crate::signals::AfterFirst::Exit
            },
            move |_| killing.kill(),
        )
    }
}

/// Stops the children when the demo returns, by success or by any error.
pub struct StopOnDrop(pub Children);

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

pub fn log(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::File::create(
        dir.join(format!("{name}.log")),
    )?))
}

/// Starts `tessera hub` (loopback, SQLite in `dir`) with `args` (`--dev` for the faucet and dev
/// staking); returns its URL and database URL once it listens.
pub fn start_hub(
    children: &Children,
    dir: &Path,
    args: &[&str],
) -> anyhow::Result<(String, String)> {
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
                "--listen",
                "127.0.0.1:0",
                "--db",
                &db,
            ])
            .args(args)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(log(dir, "hub")?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return Ok((format!("http://{}", a.trim()), db));
        }
        if Instant::now() > deadline {
            bail!(
                "the hub did not start; see {}",
                dir.join("hub.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A provider node to start.
pub struct NodeSpec<'a> {
    /// Its log's name (`dir/NAME.log`).
    pub name: &'a str,
    /// Its wallet.
    pub wallet: &'a Wallet,
    /// Micro-units per generated token.
    pub price: u64,
    /// Compute threads.
    pub threads: usize,
    /// Further `tessera node` flags (`--dev-stake` to be staked by a dev hub's faucet).
    pub extra: &'a [&'a str],
}

/// Starts `tessera node`, connected to the hub at `url`.
pub fn start_node(
    children: &Children,
    dir: &Path,
    url: &str,
    node: &NodeSpec,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "node",
        "--hub",
        url,
        "--price",
        &node.price.to_string(),
        "--threads",
        &node.threads.to_string(),
        "--drain-timeout-secs",
        &CHILD_DRAIN_SECS.to_string(),
    ])
    .args(node.extra)
    .env(
        "TESSERA_PRIVATE_KEY",
        hex::encode(node.wallet.signer().to_bytes()),
    )
    .stdout(Stdio::null())
    .stderr(log(dir, node.name)?);
    children.spawn(&mut cmd)
}

/// Waits until `n` providers are connected to the hub at `url`.
pub fn wait_providers(url: &str, n: u64, timeout: Duration, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let v: Value = http()
            .get(format!("{url}/health"))
            .call()?
            .body_mut()
            .read_json()?;
        if v["providers"].as_u64() >= Some(n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nodes did not connect; see the logs in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A local chain `tessera chain up` runs (anvil with the test stablecoin and the vault).
pub struct LocalChain {
    /// The JSON-RPC URL.
    pub rpc: String,
    /// The contracts.
    pub contracts: tessera_chain::Contracts,
    /// The vault operator's key file (the hub's `--operator-key-file`).
    pub operator_key_file: std::path::PathBuf,
    /// A funded development account's key file (pays gas for deposits and mints test tokens).
    pub dev_key_file: std::path::PathBuf,
}

impl LocalChain {
    /// The hub's flags for this chain; the first six (RPC, vault, token) are also what
    /// `tessera ledger audit` takes to reconcile the vault.
    pub fn hub_flags(&self) -> Vec<String> {
        [
            ("--rpc", self.rpc.clone()),
            ("--vault", self.contracts.vault.to_string()),
            ("--token", self.contracts.token.to_string()),
            (
                "--operator-key-file",
                self.operator_key_file.display().to_string(),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }
}

/// Starts `tessera chain up --dir DIR/chain` with `anvil` and returns the chain once the
/// contracts are deployed (it writes `chain.env` then).
pub fn start_chain(children: &Children, dir: &Path, anvil: &Path) -> anyhow::Result<LocalChain> {
    let chain_dir = dir.join("chain");
    std::fs::create_dir_all(&chain_dir)?;
    let env_file = chain_dir.join("chain.env");
    let _ = std::fs::remove_file(&env_file);
    children.spawn(
        Command::new(std::env::current_exe()?)
            .args(["chain", "up", "--dir"])
            .arg(&chain_dir)
            .env(tessera_chain::ANVIL_ENV, anvil)
            .stdout(Stdio::null())
            .stderr(log(dir, "chain")?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&env_file) {
            if text.lines().count() >= 4 {
                break text;
            }
        }
        let log = std::fs::read_to_string(dir.join("chain.log")).unwrap_or_default();
        if let Some(error) = log.lines().find(|l| l.starts_with("error:")) {
            bail!("the local chain did not start: {error}");
        }
        if Instant::now() > deadline {
            bail!(
                "the local chain did not start; see {}",
                dir.join("chain.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("chain.env has no {name}"))
    };
    Ok(LocalChain {
        rpc: field("TESSERA_HUB_RPC")?,
        contracts: tessera_chain::Contracts {
            vault: field("TESSERA_HUB_VAULT")?.parse()?,
            token: field("TESSERA_HUB_TOKEN")?.parse()?,
        },
        operator_key_file: field("TESSERA_HUB_OPERATOR_KEY_FILE")?.into(),
        dev_key_file: chain_dir.join("dev.key"),
    })
}
