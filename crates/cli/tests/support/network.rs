//! A real network for integration tests: a `tessera hub --dev` process on a loopback port with a
//! temporary SQLite ledger, and `tessera node` processes serving the real SmolLM2-135M model.
//! Each process is killed when its handle drops, so a failing test leaves nothing running.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tessera_protocol::Wallet;

/// The CLI binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running hub.
pub struct Hub {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its ledger's URL.
    pub db: String,
    dir: tempfile::TempDir,
}

/// An HTTP agent that returns error statuses instead of failing on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(180)))
        .build()
        .into()
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file"))
}

/// Starts `tessera hub --dev --allow-unverified ARGS` and waits for its address.
pub fn start_hub(args: &[&str]) -> Result<Hub> {
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("hub.db").display());
    let addr_file = dir.path().join("addr");
    let child = Command::new(BIN)
        .args(["hub", "--db", &db, "--listen", "127.0.0.1:0", "--dev"])
        .arg("--allow-unverified")
        .arg("--addr-file")
        .arg(&addr_file)
        .args(args)
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
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Hub {
        proc,
        url: format!("http://{}", addr.trim()),
        db,
        dir,
    })
}

impl Hub {
    /// The hub's temporary directory (logs, specs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a node for `wallet` at `price` per token (`--dev-stake` among `extra` to stake).
    pub fn node(&self, name: &str, wallet: &Wallet, price: u64, extra: &[&str]) -> Result<Proc> {
        let key = hex::encode(wallet.signer().to_bytes());
        let child = Command::new(BIN)
            .args(["node", "--hub", &self.url, "--private-key", &key])
            .args([
                "--price",
                &price.to_string(),
                "--capacity",
                "2",
                "--threads",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file(self.dir(), name))
            .spawn()?;
        Ok(Proc(child))
    }

    /// `GET path` as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        Ok(http()
            .get(format!("{}{path}", self.url))
            .call()?
            .body_mut()
            .read_json()?)
    }

    /// Waits until `n` providers are connected.
    pub fn wait_connected(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let providers = self.get("/v1/providers")?["providers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let connected = providers
                .iter()
                .filter(|p| p["connected"] == json!(true))
                .count();
            if connected >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {connected} of {n} providers connected; logs in {}",
                    self.dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Mints `amount` to `wallet` with the dev faucet.
    pub fn fund(&self, wallet: &Wallet, amount: u64) -> Result<()> {
        let r = http()
            .post(format!("{}/v1/dev/faucet", self.url))
            .send_json(json!({"address": wallet.address(), "amount": amount}))?;
        if r.status() != 200 {
            bail!("the faucet refused: {}", r.status());
        }
        Ok(())
    }

    /// A wallet's spendable balance.
    pub fn balance(&self, wallet: &Wallet) -> Result<u64> {
        let a = self.get(&format!("/v1/accounts/{:#x}", wallet.address()))?;
        a["balance"].as_u64().context("balance")
    }

    /// Escrowed and reserved micro-units, from `/metrics`.
    pub fn holds(&self) -> Result<(u64, u64)> {
        let metrics = http()
            .get(format!("{}/metrics", self.url))
            .call()?
            .body_mut()
            .read_to_string()?;
        let gauge = |name: &str| -> Result<u64> {
            let v = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .with_context(|| format!("gauge {name}"))?;
            Ok(v.trim().parse::<f64>()? as u64)
        };
        Ok((
            gauge("tessera_balance_escrow_micro")?,
            gauge("tessera_reserved_micro")?,
        ))
    }

    /// `tessera ledger audit` on the hub's database.
    pub fn audit(&self) -> Result<()> {
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

    /// Runs `tessera ARGS --hub URL [--private-key KEY]` and parses its JSON output.
    pub fn cli(&self, wallet: Option<&Wallet>, args: &[&str]) -> Result<Value> {
        let mut command = Command::new(BIN);
        command.args(args).args(["--hub", &self.url]);
        if let Some(w) = wallet {
            command.args(["--private-key", &hex::encode(w.signer().to_bytes())]);
        }
        let out = command.output()?;
        if !out.status.success() {
            bail!(
                "tessera {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}
