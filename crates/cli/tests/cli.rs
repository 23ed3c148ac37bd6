//! The `tessera` binary end to end: generation on the real model, saved jobs checked by
//! `tessera verify` (honest passes, a cheat fails with exit code 1), wallets and the ledger audit.

use std::process::{Command, Output};

fn tessera(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run tessera")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn generate_streams_the_answer() {
    let out = tessera(
        &[
            "generate",
            "--fetch",
            "--max-tokens",
            "24",
            "What is the capital of France?",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
}

#[test]
fn generate_runs_on_the_candle_backend_and_rejects_unknown_devices() {
    let out = tessera(
        &[
            "generate",
            "--fetch",
            "--device",
            "candle-cpu",
            "--max-tokens",
            "24",
            "What is the capital of France?",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    let out = tessera(&["generate", "--device", "tpu", "Hi"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `tpu`"));
}

#[test]
fn generate_with_a_missing_model_says_how_to_fetch_it() {
    let home = tempfile::tempdir().unwrap();
    let out = tessera(
        &["generate", "--model", "gemma3-270m", "Hi"],
        &[("TESSERA_HOME", home.path().to_str().unwrap())],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tessera model fetch gemma3-270m"));
}

#[test]
fn verify_passes_an_honest_job_and_fails_an_edited_one() {
    let dir = tempfile::tempdir().unwrap();
    let honest = dir.path().join("honest.json");
    let edited = dir.path().join("edited.json");
    let o = tessera(
        &[
            "verify",
            "sample",
            "--max-tokens",
            "24",
            "--out",
            honest.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tessera(&["verify", honest.to_str().unwrap()], &[]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).starts_with("PASS"));

    let o = tessera(
        &[
            "verify",
            "sample",
            "--max-tokens",
            "24",
            "--adversary",
            "edited-token",
            "--out",
            edited.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tessera(&["verify", edited.to_str().unwrap(), "--json"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let verdict: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(verdict["passed"], false);

    // A corrupt job file is a clear error, not a panic.
    std::fs::write(dir.path().join("bad.json"), "{ not json").unwrap();
    let o = tessera(
        &["verify", dir.path().join("bad.json").to_str().unwrap()],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad job file"));
}

#[test]
fn wallet_keystore_and_ledger_audit() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("keys");
    let env = [
        ("TESSERA_KEYSTORE_DIR", ks.to_str().unwrap()),
        ("TESSERA_WALLET_PASSWORD", "correct horse"),
    ];
    let o = tessera(&["wallet", "new", "--name", "alice"], &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!stdout(&o).contains("correct horse"));
    let address = tessera(&["wallet", "show", "--name", "alice"], &env);
    let address = stdout(&address).trim().to_string();
    assert!(
        address.starts_with("0x") && address.len() == 42,
        "{address}"
    );
    // Creating the same name twice is refused.
    assert!(!tessera(&["wallet", "new", "--name", "alice"], &env)
        .status
        .success());
    // The keystore is standard encrypted JSON.
    let ks_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ks.join("alice.json")).unwrap()).unwrap();
    assert!(ks_json["crypto"].is_object());

    let db = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let o = tessera(
        &["wallet", "balance", "--name", "alice", "--ledger", &db],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("balance"));
    let o = tessera(&["ledger", "audit", "--url", &db], &[]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `tessera demo` as a user runs it: its report shows the cheater caught, slashed and
/// quarantined, the honest providers paid, the synthetic dataset written and the audit clean.
#[test]
fn demo_runs_end_to_end_and_its_report_checks_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_text = dir.path().to_string_lossy().into_owned();
    let out = tessera(
        &[
            "demo",
            "--requests",
            "3",
            "--max-tokens",
            "16",
            "--rows",
            "2",
            "--dir",
            &dir_text,
        ],
        &[],
    );
    let report = stdout(&out);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("dashboard  http://"), "{report}");
    let row = |name: &str| {
        report
            .lines()
            .find(|l| l.starts_with(name) && l.split_whitespace().count() >= 8)
            .unwrap_or_else(|| panic!("no report row for {name}:\n{report}"))
            .to_owned()
    };
    let cheater = row("cheater");
    assert!(cheater.contains("QUARANTINED"), "{cheater}");
    let slashed: u64 = cheater
        .split_whitespace()
        .nth(5)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(slashed > 0, "the cheater was slashed: {cheater}");
    let paid: u64 = ["honest-a", "honest-b"]
        .iter()
        .map(|n| {
            row(n)
                .split_whitespace()
                .nth(6)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(paid > 0, "the honest providers were paid:\n{report}");
    assert!(report.contains("2 rows in"), "{report}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dataset/manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(manifest["rows"], 2);
    assert!(dir.path().join("dataset/data.parquet").exists());
    assert!(report.contains("ledger audit: clean"), "{report}");
}
