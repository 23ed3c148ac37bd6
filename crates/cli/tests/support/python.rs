//! Python virtual environments for the tests that drive the hub with official clients.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// A virtual environment `name` in the target's temporary directory with `packages` installed,
/// made once: reused while `python -c IMPORT_CHECK` succeeds in it.
pub fn venv(name: &str, import_check: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin").join("python");
    let ready = Command::new(&python)
        .args(["-c", import_check])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let status = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        anyhow::ensure!(status.success(), "python3 -m venv failed");
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages)
            .status()?;
        anyhow::ensure!(status.success(), "pip install {packages:?} failed");
    }
    Ok(python)
}
