//! A local development chain: anvil (from the npm package `@foundry-rs/anvil`, installed by
//! `scripts/setup-chain.sh`) on a free port, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use alloy_signer_local::PrivateKeySigner;

use crate::{Error, Result};

/// The environment variable naming the anvil binary (`scripts/setup-chain.sh` prints it).
pub const ANVIL_ENV: &str = "TESSERA_ANVIL";

/// A running anvil.
pub struct Anvil {
    child: Child,
    rpc_url: String,
    keys: Vec<PrivateKeySigner>,
}

impl std::fmt::Debug for Anvil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anvil")
            .field("rpc_url", &self.rpc_url)
            .finish()
    }
}

/// The anvil binary: `$TESSERA_ANVIL`, else `anvil` on the `PATH`.
pub fn anvil_binary() -> PathBuf {
    std::env::var_os(ANVIL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("anvil"))
}

impl Anvil {
    /// Starts anvil ([`anvil_binary`]) on a free local port with `chain_id`, mining a block per
    /// transaction.
    pub fn start(chain_id: u64) -> Result<Self> {
        Self::start_with(&anvil_binary(), chain_id, &[])
    }

    /// [`Anvil::start`] with a given binary and extra command-line arguments.
    pub fn start_with(binary: &std::path::Path, chain_id: u64, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(["--port", "0", "--host", "127.0.0.1", "--chain-id"])
            .arg(chain_id.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                Error::Anvil(format!(
                    "{}: {e} (run scripts/setup-chain.sh and export {ANVIL_ENV})",
                    binary.display()
                ))
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // Anvil prints its dev accounts' keys, then the address it listens on; afterwards it logs
        // every request, so a thread keeps draining the pipe.
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut keys = Vec::new();
            let mut in_keys = false;
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(tx) = ready.as_ref() else { continue };
                let trimmed = line.trim();
                if trimmed == "Private Keys" {
                    in_keys = true;
                } else if in_keys && trimmed.starts_with('(') {
                    if let Some(key) = trimmed.split_whitespace().nth(1) {
                        keys.push(key.to_owned());
                    }
                } else if !trimmed.starts_with('=') && !trimmed.is_empty() {
                    in_keys = false;
                }
                if let Some(addr) = trimmed.strip_prefix("Listening on ") {
                    let _ = tx.send((addr.to_owned(), std::mem::take(&mut keys)));
                    ready = None;
                }
            }
        });
        let (addr, keys) = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                return Err(Error::Anvil("anvil did not start listening".into()));
            }
        };
        let keys = keys
            .iter()
            .map(|k| {
                k.parse::<PrivateKeySigner>()
                    .map_err(|e| Error::Anvil(format!("anvil printed a bad key: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if keys.is_empty() {
            return Err(Error::Anvil("anvil printed no dev accounts".into()));
        }
        tracing::info!(%addr, "anvil started");
        Ok(Self {
            child,
            rpc_url: format!("http://{addr}"),
            keys,
        })
    }

    /// The JSON-RPC URL.
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// Anvil's funded development accounts, as printed at start (key 0 deploys by convention).
    pub fn dev_keys(&self) -> &[PrivateKeySigner] {
        &self.keys
    }

    /// The process id (tests kill and restart around it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The development tools `scripts/setup-chain.sh` installed.
#[derive(Debug, Clone)]
pub struct DevTools {
    /// The anvil binary.
    pub anvil: PathBuf,
    /// The npm `solc` package directory (solcjs).
    pub solcjs: PathBuf,
}

/// Runs `scripts/setup-chain.sh` (idempotent: installs anvil and solc from npm on first use)
/// and reads the paths from its last line, `export TESSERA_ANVIL=… TESSERA_SOLCJS=…`.
pub fn install_dev_tools(script: &std::path::Path) -> Result<DevTools> {
    let output = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Anvil(format!("{}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(Error::Anvil(format!(
            "{} failed with {}",
            script.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .map(PathBuf::from)
            .ok_or_else(|| Error::Anvil(format!("setup script printed no {name}: {line:?}")))
    };
    Ok(DevTools {
        anvil: value(ANVIL_ENV)?,
        solcjs: value("TESSERA_SOLCJS")?,
    })
}
