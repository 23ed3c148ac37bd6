//! The `tessera` binary end to end: generation on the real model, saved jobs checked by
//! `tessera verify` (honest passes, a cheat fails with exit code 1), wallets and the ledger audit.

use std::process::{Command, Output};

use serde_json::json;

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

/// `tessera demo` as a user runs it, on the local chain: its JSON report (`--json-report`, the
/// same figures as the printed one) shows the cheater caught, slashed and quarantined, the
/// honest providers paid, the synthetic dataset written, the lazy writer's dispute lost with its
/// bond, the x402 request paid and settled on-chain, the agent funded by a deposit and its
/// balance accounted for, the audit clean and the vault reconciled with the ledger.
#[test]
fn demo_runs_end_to_end_and_its_report_checks_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_text = dir.path().to_string_lossy().into_owned();
    let report_path = dir.path().join("report.json");
    let out = tessera(
        &[
            "demo",
            "--requests",
            "2",
            "--max-tokens",
            "16",
            "--rows",
            "1",
            "--dir",
            &dir_text,
            "--json-report",
            report_path.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    let printed = stdout(&out);
    assert!(
        out.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("dashboard  http://"), "{printed}");
    assert!(printed.contains("ledger audit: clean"), "{printed}");
    assert!(printed.contains("chain reconciliation: clean"), "{printed}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("the JSON report"))
            .expect("report json");
    let context = format!("{printed}\n{report:#}");
    let provider = |name: &str| {
        report["providers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("no provider {name}: {context}"))
            .clone()
    };
    let u64_of = |v: &serde_json::Value| v.as_u64().unwrap_or(0);

    // The cheater: caught, its whole stake slashed, quarantined.
    let cheater = provider("cheater");
    assert_eq!(cheater["cheats"], true);
    assert_eq!(cheater["quarantined"], true, "{context}");
    assert!(u64_of(&cheater["slashed"]) >= 1_000_000, "{context}");
    assert_eq!(cheater["staked"], 0, "{context}");
    // The honest providers: staked on-chain, paid for their jobs and checks, never slashed.
    for name in ["honest-a", "honest-b"] {
        let p = provider(name);
        assert_eq!(
            (&p["quarantined"], &p["slashed"], &p["staked"]),
            (&json!(false), &json!(0), &json!(1_000_000)),
            "{name}: {context}"
        );
        assert!(u64_of(&p["earned"]) > 0, "{name} was paid: {context}");
        assert!(u64_of(&p["balance"]) > 0, "{name} was paid: {context}");
    }
    assert!(u64_of(&report["totals"]["verifications_failed"]) >= 1);
    assert!(u64_of(&report["totals"]["verifications_passed"]) >= 1);

    // The agent: funded by an on-chain deposit; its balance is its spend, refunds and
    // compensation to the micro-unit.
    let agent = &report["agent"];
    assert_eq!(agent["funding"], "deposit", "{context}");
    assert_eq!(agent["adds_up"], true, "{context}");
    assert!(u64_of(&agent["spent"]) > 0, "{context}");

    // x402: one request paid by a signed authorization, settled on-chain, served.
    let x402 = &report["x402"];
    assert_eq!(
        (&x402["settled"], &x402["status"]),
        (&json!(true), &json!(200)),
        "{context}"
    );
    let (paid, cost) = (u64_of(&x402["paid"]), u64_of(&x402["cost"]));
    assert!(cost > 0 && cost <= paid, "{context}");
    assert_eq!(u64_of(&x402["payer_balance"]), paid - cost, "{context}");
    assert_eq!(x402["transaction"].as_str().map(str::len), Some(66));

    // The market: the good delivery accepted, the lazy writer's dispute lost with its bond.
    let market = &report["market"];
    assert_eq!(market["good"]["state"], "accepted", "{context}");
    assert_eq!(market["bad"]["state"], "poster_won", "{context}");
    assert_eq!(market["bond_lost"], true, "{context}");
    assert!(u64_of(&market["lazy_lost"]) >= u64_of(&market["worker_bond"]));

    // The dataset.
    assert_eq!(report["dataset"]["rows"], 1, "{context}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dataset/manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(manifest["rows"], 1);
    assert!(dir.path().join("dataset/data.parquet").exists());

    // The books: the audit clean, the vault holding what the ledger owes and recording its
    // stake (the slash included).
    assert_eq!(report["audit"]["clean"], true, "{context}");
    let chain = &report["chain"];
    assert_eq!(chain["reconciled"], true, "{context}");
    assert_eq!(chain["vault_holdings"], chain["ledger_liabilities"]);
    assert_eq!(chain["vault_stake"]["staked"], 2_000_000, "{context}");
}
