//! A real network for integration tests: a `tessera hub --dev` process on a loopback port with a
//! temporary SQLite ledger, and `tessera node` processes serving the real SmolLM2-135M model.
//! Each process is killed when its handle drops, so a failing test leaves nothing running.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_protocol::{ApiKeyRegistration, Domain, Wallet};

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
    /// The arguments it was started with (beyond the database, address and `--dev`).
    args: Vec<String>,
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

/// A hub for tests of one provider: `--allow-unverified` lets it schedule a provider that no
/// other could verify. Trust tests use [`start_strict_hub`].
pub fn start_hub(args: &[&str]) -> Result<Hub> {
    let mut all = vec!["--allow-unverified"];
    all.extend_from_slice(args);
    start_strict_hub(&all)
}

/// A `--dev` hub with the production rule: a provider is scheduled only if another could verify it.
pub fn start_strict_hub(args: &[&str]) -> Result<Hub> {
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("hub.db").display());
    let (proc, url) = spawn_hub(dir.path(), &db, "127.0.0.1:0", args)?;
    Ok(Hub {
        proc,
        args: args.iter().map(|s| s.to_string()).collect(),
        url,
        db,
        dir,
    })
}

/// Starts `tessera hub --dev` on `listen` and waits for it to announce its address.
pub fn spawn_hub(dir: &Path, db: &str, listen: &str, args: &[&str]) -> Result<(Proc, String)> {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let child = Command::new(BIN)
        .args(["hub", "--db", db, "--listen", listen, "--dev"])
        .arg("--addr-file")
        .arg(&addr_file)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log_file(dir, &format!("hub-{}", listen.replace(':', "_"))))
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
    Ok((proc, format!("http://{}", addr.trim())))
}

impl Hub {
    /// The hub's temporary directory (logs, specs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the hub (SIGKILL: no shutdown) and starts it again on the same address and database.
    pub fn crash_and_restart(&mut self) -> Result<()> {
        self.proc.0.kill()?;
        self.proc.0.wait()?;
        let listen = self.url.trim_start_matches("http://").to_owned();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (proc, url) = spawn_hub(self.dir.path(), &self.db, &listen, &args)?;
        assert_eq!(url, self.url);
        self.proc = proc;
        Ok(())
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

    /// `GET /v1/providers`.
    pub fn providers(&self) -> Result<Vec<Value>> {
        Ok(self.get("/v1/providers")?["providers"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// One provider's entry in `GET /v1/providers`.
    pub fn provider(&self, wallet: &Wallet) -> Result<Value> {
        let me = format!("{:#x}", wallet.address());
        self.providers()?
            .into_iter()
            .find(|p| {
                p["address"]
                    .as_str()
                    .is_some_and(|a| a.eq_ignore_ascii_case(&me))
            })
            .context("provider not listed")
    }

    /// Waits until `n` providers are connected.
    pub fn wait_connected(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let connected = self
                .providers()?
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

    /// A wallet's balance and stake.
    pub fn account(&self, wallet: &Wallet) -> Result<(u64, u64)> {
        let a = self.get(&format!("/v1/accounts/{:#x}", wallet.address()))?;
        Ok((
            a["balance"].as_u64().context("balance")?,
            a["staked"].as_u64().context("staked")?,
        ))
    }

    /// A new agent, funded with `funds` by the faucet, with a registered API key.
    pub fn agent(&self, funds: u64) -> Result<(Wallet, String)> {
        let wallet = Wallet::random();
        if funds > 0 {
            self.fund(&wallet, funds)?;
        }
        let key = format!("sk-test-{}", hex::encode(wallet.address()));
        let r = self.register_key(&wallet, &key, 1)?;
        assert_eq!(r.0, 200, "{}", r.1);
        Ok((wallet, key))
    }

    /// The EIP-712 domain this hub binds signatures to.
    pub fn domain(&self) -> Result<Domain> {
        let d = self.get("/v1/domain")?;
        Ok(Domain::for_hub(
            d["chainId"].as_u64().context("chainId")?,
            d["verifyingContract"]
                .as_str()
                .context("verifyingContract")?
                .parse()?,
        ))
    }

    /// Registers `key` for `wallet` (valid for an hour).
    pub fn register_key(&self, wallet: &Wallet, key: &str, nonce: u64) -> Result<(u16, Value)> {
        let signed = self.signed_key(wallet, key, nonce, 3600)?;
        self.post_key(&signed)
    }

    /// A signed registration of `key`, valid for `valid_for` seconds.
    pub fn signed_key(
        &self,
        wallet: &Wallet,
        key: &str,
        nonce: u64,
        valid_for: u64,
    ) -> Result<tessera_protocol::Signed<ApiKeyRegistration>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let message = ApiKeyRegistration {
            keyHash: <[u8; 32]>::from(Sha256::digest(key.as_bytes())).into(),
            validUntil: now + valid_for,
            nonce,
            expiry: now + 600,
        };
        Ok(wallet.sign(message, self.domain()?)?)
    }

    /// `POST /v1/keys`.
    pub fn post_key(&self, signed: &impl serde::Serialize) -> Result<(u16, Value)> {
        let mut r = http()
            .post(format!("{}/v1/keys", self.url))
            .send_json(signed)?;
        Ok((r.status().as_u16(), r.body_mut().read_json()?))
    }

    /// `POST /v1/chat/completions` with an API key: status, headers and body.
    pub fn chat(&self, key: &str, body: &Value) -> Result<(u16, ureq::http::HeaderMap, Value)> {
        let mut r = http()
            .post(format!("{}/v1/chat/completions", self.url))
            .header("Authorization", &format!("Bearer {key}"))
            .send_json(body)?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Ok((status, headers, r.body_mut().read_json()?))
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

    /// Waits until no money is held for jobs in flight.
    pub fn wait_no_holds(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let h = self.holds()?;
            if h == (0, 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("holds still open: escrow {} reserved {}", h.0, h.1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
