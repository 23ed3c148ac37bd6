//! `tessera synth` end to end: real hub and node processes on loopback, the real SmolLM2-135M
//! model, the agent paying from a keystore wallet; datasets checked against the ledger.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tessera_protocol::Wallet;

const PASSWORD: &str = "synth-test-password";

mod support {
    pub mod network;
    pub mod python;
}
use support::network::{http, start_hub, Hub, Proc, BIN};

/// A hub with providers and a funded agent whose keystore the synth command opens.
struct Network {
    hub: Hub,
    agent: Wallet,
    keystore: PathBuf,
    funds: u64,
    _nodes: Vec<Proc>,
}

/// A provider node to start: its price and extra arguments.
struct NodeSpec {
    price: u64,
    args: &'static [&'static str],
    wallet: Wallet,
}

impl NodeSpec {
    fn new(price: u64, args: &'static [&'static str]) -> Self {
        Self {
            price,
            args,
            wallet: Wallet::random(),
        }
    }
}

impl Network {
    /// One honest provider, nothing sampled for verification.
    fn start(funds: u64) -> Result<Self> {
        Self::with(
            funds,
            &["--verify-probability", "0"],
            &[NodeSpec::new(10, &[])],
        )
    }

    fn with(funds: u64, hub_args: &[&str], nodes: &[NodeSpec]) -> Result<Self> {
        let hub = start_hub(hub_args)?;
        let nodes_started = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let args = [&["--dev-stake"], node.args].concat();
                hub.node(&format!("node{i}"), &node.wallet, node.price, &args)
            })
            .collect::<Result<Vec<_>>>()?;
        hub.wait_connected(nodes.len())?;
        let agent = Wallet::random();
        hub.fund(&agent, funds)?;
        let keystore = agent.save_keystore(hub.dir(), "agent.json", PASSWORD)?;
        Ok(Self {
            hub,
            agent,
            keystore,
            funds,
            _nodes: nodes_started,
        })
    }

    fn balance(&self) -> Result<u64> {
        self.hub.balance(&self.agent)
    }

    /// The hub's view of a provider.
    fn provider(&self, wallet: &Wallet) -> Result<Value> {
        self.hub.provider(wallet)
    }

    /// What the agent has paid, from the ledger, once no escrow is open.
    fn spent(&self) -> Result<u64> {
        Ok(self.funds - self.settled_balance()?)
    }

    /// The agent's balance once no escrow is open.
    fn settled_balance(&self) -> Result<u64> {
        self.hub.wait_no_holds(Duration::from_secs(30))?;
        self.balance()
    }

    fn synth(&self, spec: &Path, out: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("synth")
            .arg(spec)
            .arg("--out")
            .arg(out)
            .args(["--hub", &self.hub.url, "--wallet"])
            .arg(&self.keystore)
            .env("TESSERA_WALLET_PASSWORD", PASSWORD)
            .env("RUST_LOG", "tessera=info,tessera_synth=debug");
        cmd
    }

    fn audit(&self) -> Result<()> {
        self.hub.audit()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_spec(dir: &Path, body: &str) -> Result<PathBuf> {
    let path = dir.join("spec.toml");
    std::fs::write(&path, body)?;
    Ok(path)
}

fn jsonl(path: &Path) -> Result<Vec<Value>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn manifest(out: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        out.join("manifest.json"),
    )?)?)
}

/// Waits until a running synth has stored `n` rows (and is still running).
fn wait_stored(store: &Path, n: usize, run: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while std::fs::read_to_string(store).map_or(0, |s| s.lines().count()) < n {
        anyhow::ensure!(Instant::now() < deadline, "no rows were stored");
        anyhow::ensure!(
            run.try_wait()?.is_none(),
            "the run ended before it could be stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A virtual environment with Hugging Face `datasets`, made once per target directory.
fn datasets_python() -> Result<PathBuf> {
    support::python::venv(
        "datasets-venv",
        "import datasets, yaml",
        &["datasets", "pyyaml"],
    )
}

const QA_SPEC: &str = r#"
name = "tiny-qa"
description = "Questions about a few topics and their answers."
license = "apache-2.0"
task_categories = ["question-answering"]
model = "smollm2-135m"
rows = 3
seed = 7
concurrency = 2

[sampling]
temperature = 0.8
max_tokens = 8

[budget]
max_spend = 200000
max_price = 10

[variables]
topic = ["the sea", "bread", "trains"]

[[steps]]
name = "question"
prompt = "Ask one short question about {topic}."

[[steps]]
name = "answer"
system = "You answer in one short sentence."
prompt = "{question}"

[dedup]
near_threshold = 0.9
"#;

#[test]
fn synth_makes_a_multi_step_dataset_that_python_datasets_loads() -> Result<()> {
    let python = datasets_python()?;
    let net = Network::start(1_000_000)?;
    let spec = write_spec(net.hub.dir(), QA_SPEC)?;
    let out = net.hub.dir().join("out");
    let run = net.synth(&spec, &out).output()?;
    assert!(run.status.success(), "{}", text(&run));

    let rows = jsonl(&out.join("data.jsonl"))?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let ids: HashSet<_> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), 3);
    for r in &rows {
        assert!(
            r["topic"].is_string() && r["question"].is_string() && r["answer"].is_string(),
            "{r}"
        );
        assert_eq!(r["job_ids"].as_array().map(Vec::len), Some(2), "{r}");
        assert_eq!(r["model_sha256"].as_str().map(str::len), Some(64), "{r}");
        for d in r["commitment_digests"].as_array().context("digests")? {
            assert_eq!(d.as_str().map(str::len), Some(64), "{r}");
        }
        assert!(r["cost"].as_u64().is_some_and(|c| c > 0), "{r}");
    }
    let m = manifest(&out)?;
    let spent = net.spent()?;
    assert_eq!(
        m["spend"].as_u64(),
        Some(spent),
        "manifest and ledger agree: {m}"
    );
    assert!(spent <= 200_000);
    assert_eq!(m["rows"], 3);

    let check = r#"
import json, sys, yaml, datasets
out = sys.argv[1]
ds = datasets.load_dataset("parquet", data_files=out + "/data.parquet", split="train")
card = open(out + "/README.md").read()
header = yaml.safe_load(card.split("---")[1])
print(json.dumps({"rows": ds.num_rows, "columns": ds.column_names, "card": header}))
"#;
    let py = Command::new(&python)
        .args(["-c", check])
        .arg(&out)
        .output()?;
    assert!(py.status.success(), "{}", text(&py));
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&py.stdout).trim())?;
    assert_eq!(v["rows"], 3);
    let columns: Vec<&str> = v["columns"]
        .as_array()
        .context("columns")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        columns,
        [
            "id",
            "topic",
            "question",
            "answer",
            "seed",
            "model_sha256",
            "job_ids",
            "providers",
            "commitment_digests",
            "verifications",
            "cost"
        ]
    );
    let card = &v["card"];
    assert_eq!(card["license"], "apache-2.0");
    assert_eq!(card["task_categories"], json!(["question-answering"]));
    assert_eq!(card["size_categories"], json!(["n<1K"]));
    assert_eq!(card["configs"][0]["data_files"][0]["path"], "data.parquet");

    // A second run of the finished spec pays nothing.
    let again = net.synth(&spec, &out).output()?;
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(net.spent()?, spent);
    assert_eq!(jsonl(&out.join("data.jsonl"))?, rows);
    net.audit()
}

#[test]
fn synth_killed_mid_run_resumes_without_paying_twice() -> Result<()> {
    let net = Network::start(1_000_000)?;
    // On the batch tier: the provider asks 10, the hub's batch discount halves it.
    let spec = write_spec(
        net.hub.dir(),
        &QA_SPEC
            .replace("rows = 3", "rows = 6\ntier = \"batch\"")
            .replace("[[steps]]\nname = \"answer\"\nsystem = \"You answer in one short sentence.\"\nprompt = \"{question}\"\n", ""),
    )?;
    let out = net.hub.dir().join("out");
    let mut first = net
        .synth(&spec, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let store = out.join("rows.jsonl");
    wait_stored(&store, 2, &mut first)?;
    first.kill()?; // SIGKILL: no chance to clean up.
    first.wait()?;
    assert!(
        !out.join("manifest.json").exists(),
        "killed before it finished"
    );

    let second = net.synth(&spec, &out).output()?;
    assert!(second.status.success(), "{}", text(&second));
    let rows = jsonl(&out.join("data.jsonl"))?;
    assert_eq!(rows.len(), 6);
    let ids: HashSet<_> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids.len(), 6, "no duplicate rows");
    let stored = jsonl(&store)?;
    let keys: HashSet<_> = stored
        .iter()
        .map(|r| r["key"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(keys.len(), stored.len(), "no row paid for twice");
    for r in &stored {
        assert_eq!(
            r["steps"][0]["receipt"]["price_per_token"], 5,
            "batch jobs pay the batch price: {r}"
        );
    }
    let m = manifest(&out)?;
    assert_eq!(
        m["spend"].as_u64(),
        Some(net.spent()?),
        "ledger and manifest agree to the micro-unit: {m}"
    );
    net.audit()
}

#[test]
fn synth_drops_and_replaces_every_row_of_a_provider_caught_cheating() -> Result<()> {
    // Every job is checked; the cheater undercuts the honest pair, so it serves first, until
    // two honest verifiers confirm its fault and it is slashed and quarantined.
    let nodes = [
        NodeSpec::new(10, &[]),
        NodeSpec::new(12, &[]),
        NodeSpec::new(5, &["--cheat", "requantized-q4-0"]),
    ];
    let cheater = nodes[2].wallet.address();
    let net = Network::with(
        1_000_000,
        &["--verify-probability", "1", "--slash-amount", "500000"],
        &nodes,
    )?;
    let spec = write_spec(
        net.hub.dir(),
        &QA_SPEC
            .replace("rows = 3", "rows = 4\nverify_wait_secs = 150")
            .replace("[[steps]]\nname = \"answer\"\nsystem = \"You answer in one short sentence.\"\nprompt = \"{question}\"\n", ""),
    )?;
    let out = net.hub.dir().join("out");
    let run = net.synth(&spec, &out).output()?;
    assert!(run.status.success(), "{}", text(&run));

    let c = net.provider(&nodes[2].wallet)?;
    assert_eq!(c["quarantined"], json!(true), "{c}");
    // Each of its jobs in flight when it was caught is a confirmed failure and a slash.
    assert!(c["slashed"].as_u64() >= Some(500_000), "{c}");
    let is_cheater = |p: &Value| {
        p.as_str()
            .is_some_and(|a| a.eq_ignore_ascii_case(&format!("{cheater:#x}")))
    };
    // The cheater did make rows (it was cheapest), and the store remembers them as dropped.
    let stored = jsonl(&out.join("rows.jsonl"))?;
    let by_cheater: Vec<&Value> = stored
        .iter()
        .filter(|r| is_cheater(&r["steps"][0]["receipt"]["provider"]))
        .collect();
    assert!(
        !by_cheater.is_empty(),
        "the cheater served no row: the test proves nothing"
    );
    let rows = jsonl(&out.join("data.jsonl"))?;
    assert_eq!(rows.len(), 4, "the dataset is whole again: {rows:?}");
    for row in &rows {
        let providers = row["providers"].as_array().context("providers")?;
        assert!(
            !providers.iter().any(is_cheater),
            "a cheater's row remains: {row}"
        );
        for v in row["verifications"].as_array().context("verifications")? {
            assert_eq!(
                v, "passed",
                "every kept row's job was checked and passed: {row}"
            );
        }
    }
    let m = manifest(&out)?;
    let dropped = m["rejected"]["failed_verification"].as_u64().unwrap_or(0)
        + m["rejected"]["provider_slashed"].as_u64().unwrap_or(0);
    assert!(dropped >= 1, "{m}");
    // The refunds are off the spend, and the cheater's slash paid the agent compensation.
    let compensation = m["compensation"].as_u64().context("compensation")?;
    assert!(compensation > 0, "{m}");
    // Compensation can exceed what the rows cost: compare what came in with what went out.
    assert_eq!(
        net.settled_balance()? + m["spend"].as_u64().context("spend")?,
        net.funds + compensation,
        "ledger and manifest agree to the micro-unit: {m}"
    );
    assert!(m["spend"].as_u64() <= m["max_spend"].as_u64());
    net.audit()
}

#[test]
fn synth_refuses_bad_specs_before_money_moves() -> Result<()> {
    let net = Network::start(1_000_000)?;
    let dir = net.hub.dir();
    std::fs::write(dir.join("seeds.txt"), "one\ntwo\n")?;
    let cases = [
        (QA_SPEC.replace("prompt = \"{question}\"", "prompt = \"{questoin}\""), 29, "unknown variable `{questoin}`"),
        (
            format!("{QA_SPEC}\n[output]\nformat = \"json\"\nschema = {{ type = \"obejct\" }}\n"),
            36,
            "invalid JSON Schema",
        ),
        (
            format!("{QA_SPEC}\n[filters]\nchecker = {{ run = \"python3\", script = \"missing_check.py\" }}\n"),
            35,
            "does not exist",
        ),
        (QA_SPEC.replace("max_spend = 200000", "max_spend = 50"), 16, "below the price of one row"),
        (QA_SPEC.replace("model = \"smollm2-135m\"", "model = \"no-such-model\""), 6, "no-such-model"),
    ];
    for (body, line, message) in cases {
        let spec = write_spec(dir, &body)?;
        let out = dir.join("refused");
        let run = net.synth(&spec, &out).output()?;
        let said = text(&run);
        assert!(!run.status.success(), "{said}");
        assert!(
            said.contains(&format!("spec.toml:{line}:")) && said.contains(message),
            "line {line}, {message}: {said}"
        );
        assert!(!out.join("rows.jsonl").exists(), "nothing stored");
    }
    assert_eq!(net.balance()?, 1_000_000, "no money moved");
    net.audit()
}

#[test]
fn synth_budget_cap_holds_under_concurrency() -> Result<()> {
    let net = Network::start(1_000_000)?;
    let cap = 2_000;
    let spec = write_spec(
        net.hub.dir(),
        &QA_SPEC
            .replace("rows = 3", "rows = 40")
            .replace("concurrency = 2", "concurrency = 4")
            .replace("max_spend = 200000", &format!("max_spend = {cap}")),
    )?;
    let out = net.hub.dir().join("out");
    let run = net.synth(&spec, &out).output()?;
    let said = text(&run);
    assert!(
        !run.status.success() && said.contains("the budget ran out"),
        "{said}"
    );
    let spent = net.spent()?;
    assert!(spent <= cap, "spent {spent} of a cap of {cap}");
    let m = manifest(&out)?;
    assert_eq!(m["spend"].as_u64(), Some(spent), "{m}");
    assert_eq!(m["ending"], "budget_exhausted");
    assert!(m["rows_paid"].as_u64().is_some_and(|n| n >= 1), "{m}");
    net.audit()
}

#[test]
fn synth_on_its_own_local_network_stops_gracefully_on_ctrl_c_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        dir.path(),
        &QA_SPEC
            .replace("rows = 3", "rows = 5")
            .replace("[[steps]]\nname = \"answer\"\nsystem = \"You answer in one short sentence.\"\nprompt = \"{question}\"\n", ""),
    )?;
    let out = dir.path().join("out");
    let local = |cmd: &mut Command| {
        cmd.arg("synth")
            .arg(&spec)
            .arg("--out")
            .arg(&out)
            .args(["--local-nodes", "1"])
            .env("RUST_LOG", "tessera=info");
    };
    let mut first = Command::new(BIN);
    local(&mut first);
    let mut first = first
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let store = out.join("rows.jsonl");
    wait_stored(&store, 1, &mut first)?;
    let pid = i32::try_from(first.id())?;
    // SAFETY: kill(2) with our own child's pid, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let interrupted = first.wait_with_output()?;
    assert_eq!(
        interrupted.status.code(),
        Some(130),
        "{}",
        text(&interrupted)
    );
    let said = text(&interrupted);
    let url = said
        .split("local network at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("the local network's address")?;
    assert!(
        http().get(format!("{url}/health")).call().is_err(),
        "the local hub stopped with the run"
    );
    let m = manifest(&out)?;
    assert_eq!(m["ending"], "interrupted", "{m}");
    let kept = jsonl(&out.join("data.jsonl"))?;
    let stored = jsonl(&store)?;
    let accepted = stored
        .iter()
        .filter(|r| r["verdict"]["outcome"] == "accepted")
        .count();
    assert!(
        !kept.is_empty() && kept.len() == accepted && kept.len() < 5,
        "every finished row kept: {m}"
    );

    // A re-run, on a network of its own again, continues from the store.
    let mut second = Command::new(BIN);
    local(&mut second);
    let second = second.output()?;
    assert!(second.status.success(), "{}", text(&second));
    let rows = jsonl(&out.join("data.jsonl"))?;
    assert_eq!(rows.len(), 5);
    for old in &kept {
        assert!(rows.contains(old), "a kept row stays as it was");
    }
    Ok(())
}

#[test]
fn bench_synth_measures_one_and_two_providers() -> Result<()> {
    let out = Command::new(BIN)
        .args([
            "bench",
            "synth",
            "--rows",
            "2",
            "--max-tokens",
            "4",
            "--json",
        ])
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?;
    let runs = v["runs"].as_array().context("runs")?;
    assert_eq!(runs.len(), 2);
    for (run, providers) in runs.iter().zip([1, 2]) {
        assert_eq!(run["providers"], providers);
        assert_eq!(run["rows"], 2, "{v}");
        assert!(run["rows_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
        assert!(
            run["cost_per_1000_rows"].as_f64().is_some_and(|c| c > 0.0),
            "{v}"
        );
    }
    let ratio = runs[1]["rows_per_s"].as_f64().unwrap_or(0.0)
        / runs[0]["rows_per_s"].as_f64().unwrap_or(1.0);
    assert!(
        (v["scaling_ratio"].as_f64().unwrap_or(0.0) - ratio).abs() < 1e-9,
        "{v}"
    );
    Ok(())
}
