//! Money in and out through a real chain: `tessera chain up` (anvil with the contracts), a real
//! `tessera hub --rpc …`, `tessera deposit` and `tessera withdraw`, and `tessera ledger audit`
//! reconciling the vault with the ledger. Anvil and solc come from npm via
//! `scripts/setup-chain.sh`, which the tests run themselves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tessera_chain::{Chain, Contracts, DevTools};
use tessera_protocol::{Address, Domain, Wallet, WithdrawalOrder};

mod support {
    pub mod python;
}

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn tools() -> &'static DevTools {
    static TOOLS: OnceLock<DevTools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-chain.sh");
        tessera_chain::install_dev_tools(&script).expect("scripts/setup-chain.sh")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().expect("runtime"))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    runtime().block_on(f)
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A child process stopped on drop: SIGTERM first, so `tessera chain up` takes its anvil down.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tessera chain up` in a temporary directory.
struct LocalChain {
    _proc: Proc,
    rpc: String,
    contracts: Contracts,
    operator_key: PathBuf,
    dev_key: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalChain {
    fn up() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(BIN)
            .args(["chain", "up", "--dir"])
            .arg(dir.path())
            .env("TESSERA_ANVIL", &tools().anvil)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let proc = Proc(child);
        let mut fields = std::collections::HashMap::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            if let (Some(name), Some(value)) = (words.next(), words.next()) {
                fields.insert(name.to_owned(), value.to_owned());
            }
            if line.starts_with("hub flags") {
                break;
            }
        }
        let field = |name: &str| {
            fields
                .get(name)
                .cloned()
                .with_context(|| format!("`tessera chain up` printed no {name}"))
        };
        Ok(Self {
            rpc: field("chain")?,
            contracts: Contracts {
                token: field("token")?.parse()?,
                vault: field("vault")?.parse()?,
            },
            operator_key: dir.path().join("operator.key"),
            dev_key: dir.path().join("dev.key"),
            _proc: proc,
            dir,
        })
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--rpc".into(),
            self.rpc.clone(),
            "--vault".into(),
            self.contracts.vault.to_string(),
            "--token".into(),
            self.contracts.token.to_string(),
            "--operator-key-file".into(),
            self.operator_key.display().to_string(),
        ]
    }

    fn chain(&self) -> Chain {
        block_on(Chain::connect(&self.rpc, self.contracts, None)).expect("chain")
    }

    fn rpc(&self, method: &str, params: Value) -> Result<Value> {
        let mut r = http().post(&self.rpc).send_json(json!({
            "jsonrpc": "2.0", "id": 1, "method": method, "params": params
        }))?;
        let v: Value = r.body_mut().read_json()?;
        if v.get("error").is_some() {
            bail!("{method}: {v}");
        }
        Ok(v["result"].clone())
    }

    fn mine(&self, blocks: u64) -> Result<()> {
        self.rpc("anvil_mine", json!([format!("{blocks:#x}")]))
            .map(|_| ())
    }

    fn token_balance(&self, who: Address) -> u64 {
        block_on(self.chain().token_balance(who)).expect("balanceOf")
    }

    fn vault_holdings(&self) -> u64 {
        block_on(self.chain().vault_holdings()).expect("holdings")
    }

    /// `tessera deposit` from the funded dev account, minting the test tokens first.
    fn deposit(&self, account: Address, amount: u64) -> Result<()> {
        let out = Command::new(BIN)
            .args(["deposit", "--rpc", &self.rpc])
            .args(["--vault", &self.contracts.vault.to_string()])
            .args(["--token", &self.contracts.token.to_string()])
            .arg("--key-file")
            .arg(&self.dev_key)
            .args(["--amount", &amount.to_string(), "--mint"])
            .args(["--account", &account.to_string()])
            .output()?;
        if !out.status.success() {
            bail!(
                "tessera deposit failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

struct Hub {
    proc: Option<Proc>,
    args: Vec<String>,
    url: String,
    db: String,
    dir: tempfile::TempDir,
}

impl Hub {
    fn start(args: Vec<String>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = format!("sqlite://{}", dir.path().join("hub.db").display());
        let mut hub = Self {
            proc: None,
            args,
            url: String::new(),
            db,
            dir,
        };
        hub.spawn("127.0.0.1:0")?;
        Ok(hub)
    }

    fn spawn(&mut self, listen: &str) -> Result<()> {
        let addr_file = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hub.log"))?;
        let child = Command::new(BIN)
            .args(["hub", "--db", &self.db, "--listen", listen, "--addr-file"])
            .arg(&addr_file)
            .args(["--chain-poll-ms", "100"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                self.url = format!("http://{}", addr.trim());
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the hub did not start: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    /// SIGKILL, then a start on the same address and database.
    fn crash_and_restart(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.0.kill()?;
            proc.0.wait()?;
            std::mem::forget(proc);
        }
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.spawn(&listen)
    }

    fn get(&self, path: &str) -> Result<(u16, Value)> {
        let mut r = http().get(format!("{}{path}", self.url)).call()?;
        Ok((r.status().as_u16(), r.body_mut().read_json()?))
    }

    fn balance(&self, who: Address) -> Result<u64> {
        let (_, v) = self.get(&format!("/v1/accounts/{who}"))?;
        Ok(v["balance"].as_u64().unwrap_or(0))
    }

    fn wait_balance(&self, who: Address, expected: u64, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let balance = self.balance(who)?;
            if balance == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "balance of {who} is {balance}, expected {expected}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn domain(&self) -> Result<Domain> {
        let (_, v) = self.get("/v1/domain")?;
        Ok(Domain::for_hub(
            v["chainId"].as_u64().context("chainId")?,
            v["verifyingContract"]
                .as_str()
                .context("verifyingContract")?
                .parse()?,
        ))
    }

    fn post_withdrawal(&self, signed: &impl serde::Serialize) -> Result<(u16, Value)> {
        let mut r = http()
            .post(format!("{}/v1/withdrawals", self.url))
            .send_json(signed)?;
        Ok((r.status().as_u16(), r.body_mut().read_json()?))
    }

    fn withdraw(
        &self,
        wallet: &Wallet,
        to: Address,
        amount: u64,
        nonce: u64,
    ) -> Result<(u16, Value)> {
        let order = WithdrawalOrder {
            to,
            amount,
            nonce,
            expiry: now() + 600,
        };
        self.post_withdrawal(&wallet.sign(order, self.domain()?)?)
    }

    /// `tessera ledger audit` with the chain: the books and the vault reconciliation.
    fn audit(&self, chain: &LocalChain) -> Result<String> {
        let out = Command::new(BIN)
            .args(["ledger", "audit", "--url", &self.db])
            .args(chain.flags().iter().take(6))
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "ledger audit failed:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn chain_hub(chain: &LocalChain, confirmations: u64) -> Result<Hub> {
    let mut args = chain.flags();
    args.extend(["--confirmations".into(), confirmations.to_string()]);
    Hub::start(args)
}

#[test]
fn deposit_is_credited_once_after_confirmations_even_across_hub_restarts() -> Result<()> {
    let chain = LocalChain::up()?;
    let mut hub = chain_hub(&chain, 3)?;
    let agent = Wallet::random().address();
    chain.deposit(agent, 2_500_000)?;
    assert_eq!(chain.vault_holdings(), 2_500_000);

    // Zero confirmations on top: not credited, however long the hub looks.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(hub.balance(agent)?, 0);
    chain.mine(1)?;
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(hub.balance(agent)?, 0, "credited with 1 of 3 confirmations");

    // The hub dies mid-confirmation; the deposit is credited once the restarted hub sees 3.
    hub.crash_and_restart()?;
    chain.mine(2)?;
    hub.wait_balance(agent, 2_500_000, Duration::from_secs(10))?;

    // Restarts and more blocks credit nothing again.
    hub.crash_and_restart()?;
    chain.mine(5)?;
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(hub.balance(agent)?, 2_500_000);

    let (status, v) = hub.get("/v1/chain")?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["vault_holdings"], 2_500_000);
    assert_eq!(v["ledger_liabilities"], 2_500_000);
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");

    // Tokens that reach the vault without a deposit are owed to no account: the audit says so.
    mint(&chain, chain.contracts.vault, 1)?;
    let refused = hub
        .audit(&chain)
        .expect_err("a vault holding more than the ledger owes");
    assert!(format!("{refused:#}").contains("MISMATCH"), "{refused:#}");
    Ok(())
}

#[test]
fn withdrawal_is_debited_then_paid_once_and_bad_orders_move_nothing() -> Result<()> {
    let chain = LocalChain::up()?;
    let hub = chain_hub(&chain, 0)?;
    let agent = Wallet::random();
    chain.deposit(agent.address(), 3_000_000)?;
    hub.wait_balance(agent.address(), 3_000_000, Duration::from_secs(10))?;
    let recipient = Wallet::random().address();

    let (status, paid) = hub.withdraw(&agent, recipient, 1_000_000, 7)?;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["state"], "paid");
    assert!(paid["tx_hash"].is_string(), "{paid}");
    assert_eq!(chain.token_balance(recipient), 1_000_000);
    assert_eq!(hub.balance(agent.address())?, 2_000_000);

    // The same order again (a client retry): the same withdrawal, nothing paid or debited twice.
    let (status, again) = hub.withdraw(&agent, recipient, 1_000_000, 7)?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], paid["id"]);
    assert_eq!(chain.token_balance(recipient), 1_000_000);
    assert_eq!(hub.balance(agent.address())?, 2_000_000);

    let before = (hub.balance(agent.address())?, chain.vault_holdings());
    // The same nonce with another amount, more than the balance, zero, the zero address, and a
    // signature for another hub's domain: each refused, nothing moves.
    let refusals = [
        (
            hub.withdraw(&agent, recipient, 999, 7)?,
            409,
            "nonce_reused",
        ),
        (
            hub.withdraw(&agent, recipient, 2_000_001, 8)?,
            429,
            "insufficient_quota",
        ),
        (
            hub.withdraw(&agent, recipient, 0, 9)?,
            400,
            "invalid_withdrawal",
        ),
        (
            hub.withdraw(&agent, Address::ZERO, 5, 10)?,
            400,
            "invalid_withdrawal",
        ),
        (
            hub.post_withdrawal(&agent.sign(
                WithdrawalOrder {
                    to: recipient,
                    amount: 5,
                    nonce: 11,
                    expiry: now() + 600,
                },
                Domain::for_hub(31337, Address::repeat_byte(9)),
            )?)?,
            401,
            "invalid_signature",
        ),
        (
            hub.withdraw(&Wallet::random(), recipient, 5, 12)?,
            429,
            "insufficient_quota",
        ),
    ];
    for ((status, body), want_status, want_code) in refusals {
        assert_eq!(status, want_status, "{body}");
        assert_eq!(body["error"]["code"], want_code, "{body}");
    }
    assert_eq!(
        (hub.balance(agent.address())?, chain.vault_holdings()),
        before
    );
    assert_eq!(chain.token_balance(recipient), 1_000_000);

    // The CLI verb pays too.
    let key_file = chain.dir.path().join("agent.key");
    std::fs::write(&key_file, hex::encode(agent.signer().to_bytes()))?;
    let out = Command::new(BIN)
        .args([
            "withdraw",
            "--hub",
            &hub.url,
            "--amount",
            "500000",
            "--to",
            &recipient.to_string(),
        ])
        .arg("--key-file")
        .arg(&key_file)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(chain.token_balance(recipient), 1_500_000);
    assert_eq!(hub.balance(agent.address())?, 1_500_000);

    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");
    Ok(())
}

#[test]
fn a_withdrawal_debited_but_unpaid_is_paid_once_after_a_crash() -> Result<()> {
    let chain = LocalChain::up()?;
    let mut hub = chain_hub(&chain, 0)?;
    let agent = Wallet::random();
    chain.deposit(agent.address(), 2_000_000)?;
    hub.wait_balance(agent.address(), 2_000_000, Duration::from_secs(10))?;
    let recipient = Wallet::random().address();

    // The operator has no ether for gas: the debit commits, the payment cannot be sent.
    let operator = tessera_chain::read_key_file(&chain.operator_key)?.address();
    let funds = chain.rpc("eth_getBalance", json!([operator.to_string(), "latest"]))?;
    chain.rpc("anvil_setBalance", json!([operator.to_string(), "0x0"]))?;
    let (status, pending) = hub.withdraw(&agent, recipient, 800_000, 1)?;
    assert_eq!(status, 200, "{pending}");
    assert_eq!(pending["state"], "pending");
    assert_eq!(hub.balance(agent.address())?, 1_200_000);
    assert_eq!(chain.token_balance(recipient), 0);

    // The hub is killed with the withdrawal owed; the restarted hub pays it, once.
    hub.crash_and_restart()?;
    chain.rpc("anvil_setBalance", json!([operator.to_string(), funds]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while chain.token_balance(recipient) == 0 {
        assert!(Instant::now() < deadline, "never paid:\n{}", hub.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    hub.crash_and_restart()?;
    std::thread::sleep(Duration::from_millis(600));
    // A retry of the order after all that replays it as paid.
    let (status, again) = hub.withdraw(&agent, recipient, 800_000, 1)?;
    assert_eq!(
        (status, again["state"].as_str()),
        (200, Some("paid")),
        "{again}"
    );
    assert_eq!(chain.token_balance(recipient), 800_000);
    assert_eq!(hub.balance(agent.address())?, 1_200_000);
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");
    Ok(())
}

#[test]
fn a_dev_hub_without_a_chain_answers_that_it_has_none() -> Result<()> {
    let hub = Hub::start(vec!["--dev".into()])?;
    let (status, v) = hub.get("/v1/chain")?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("no_chain")),
        "{v}"
    );
    let (status, v) = hub.withdraw(&Wallet::random(), Address::repeat_byte(1), 5, 1)?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("no_chain")),
        "{v}"
    );
    Ok(())
}

/// A virtual environment with the official `x402` package (v2, EVM and requests extras).
fn x402_python() -> Result<PathBuf> {
    support::python::venv(
        "x402-venv",
        "import x402.http.clients, eth_account",
        &["x402[evm,requests]>=2,<3"],
    )
}

/// A hub with a chain, dev staking and one real node serving smollm2-135m.
fn paid_network(chain: &LocalChain) -> Result<(Hub, Proc)> {
    let mut args = chain.flags();
    args.extend(
        [
            "--confirmations",
            "0",
            "--dev",
            "--allow-unverified",
            "--verify-probability",
            "0",
        ]
        .map(String::from),
    );
    let hub = Hub::start(args)?;
    let provider = Wallet::random();
    let log = std::fs::File::create(hub.dir.path().join("node.log"))?;
    let node = Proc(
        Command::new(BIN)
            .args(["node", "--hub", &hub.url, "--private-key"])
            .arg(hex::encode(provider.signer().to_bytes()))
            .args([
                "--price",
                "3",
                "--capacity",
                "2",
                "--threads",
                "1",
                "--dev-stake",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = hub.get("/v1/providers")?;
        if v["providers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["connected"] == json!(true)))
        {
            return Ok((hub, node));
        }
        anyhow::ensure!(Instant::now() < deadline, "the node did not connect");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Mints test tokens to `to` from the funded dev account.
fn mint(chain: &LocalChain, to: Address, amount: u64) -> Result<()> {
    let dev = tessera_chain::read_key_file(&chain.dev_key)?;
    let sender = block_on(Chain::connect(&chain.rpc, chain.contracts, Some(dev)))?;
    Ok(block_on(sender.mint_test_tokens(to, amount))?)
}

fn decode_header<T: serde::de::DeserializeOwned>(
    headers: &ureq::http::HeaderMap,
    name: &str,
) -> Result<T> {
    use base64::Engine;
    let value = headers
        .get(name)
        .with_context(|| format!("no {name} header"))?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.as_bytes())?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[test]
fn official_x402_client_pays_for_a_chat_completion() -> Result<()> {
    let python = x402_python()?;
    let chain = LocalChain::up()?;
    let (hub, _node) = paid_network(&chain)?;
    let payer = Wallet::random();
    mint(&chain, payer.address(), 5_000_000)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("x402_client.py");
    let out = Command::new(python)
        .arg(script)
        .env("TESSERA_HUB", &hub.url)
        .env("TESSERA_NETWORK", "eip155:31337")
        .env(
            "TESSERA_PAYER_KEY",
            format!("0x{}", hex::encode(payer.signer().to_bytes())),
        )
        .env("TESSERA_TOKEN", chain.contracts.token.to_string())
        .env("TESSERA_SPEND_CAP", "2000000")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        hub.log()
    );
    let report: Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(report["status"], 200, "{report}");
    assert!(
        report["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{report}"
    );
    let settlement = &report["settlement"];
    assert_eq!(settlement["success"], true, "{report}");
    assert_eq!(settlement["network"], "eip155:31337");
    assert!(
        settlement["transaction"]
            .as_str()
            .is_some_and(|t| t.len() == 66),
        "{report}"
    );

    // The payer paid the maximum cost on-chain; the vault holds it; the ledger charged the
    // job's cost and left the unused rest on the payer's account.
    let paid = 5_000_000 - chain.token_balance(payer.address());
    assert!(paid > 0);
    assert_eq!(chain.vault_holdings(), paid);
    let cost = report["body"]["tessera"]["cost"]
        .as_u64()
        .context("tessera.cost")?;
    assert!(cost > 0 && cost < paid, "cost {cost}, paid {paid}");
    assert_eq!(hub.balance(payer.address())?, paid - cost);
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");
    Ok(())
}

#[test]
fn bad_x402_payments_are_refused_with_x402_errors_and_move_no_money() -> Result<()> {
    use tessera_chain::x402::{self, PaymentRequired, SettlementResponse};
    let chain = LocalChain::up()?;
    let (hub, _node) = paid_network(&chain)?;
    let payer = Wallet::random();
    mint(&chain, payer.address(), 5_000_000)?;
    let body = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
    });
    let post = |payment: Option<String>| -> Result<(u16, ureq::http::HeaderMap, Value)> {
        let mut request = http().post(format!("{}/v1/chat/completions", hub.url));
        if let Some(p) = payment {
            request = request.header("PAYMENT-SIGNATURE", p);
        }
        let mut r = request.send_json(&body)?;
        let headers = r.headers().clone();
        Ok((r.status().as_u16(), headers, r.body_mut().read_json()?))
    };

    // No key, no payment: 402 with the requirements.
    let (status, headers, _) = post(None)?;
    assert_eq!(status, 402);
    let required: PaymentRequired = decode_header(&headers, "payment-required")?;
    let req = required.accepts[0].clone();
    assert_eq!(
        (req.scheme.as_str(), req.network.as_str()),
        ("exact", "eip155:31337")
    );
    assert_eq!(
        (req.asset, req.pay_to),
        (chain.contracts.token, chain.contracts.vault)
    );
    let amount: u64 = req.amount.parse()?;
    assert!(amount > 0);

    let signer = payer.signer().clone();
    let valid = now() + 300;
    let nonce = |n: u8| tessera_protocol::B256::repeat_byte(n);
    let header = |p: &x402::PaymentPayload| x402::encode_header(p);
    let mut wrong_asset = req.clone();
    wrong_asset.asset = Address::repeat_byte(0xaa);
    let mut wrong_network = req.clone();
    wrong_network.network = "eip155:1".into();
    let good = x402::sign_payment(&signer, &req, amount, valid, nonce(1))?;
    let cases = [
        (
            x402::sign_payment(&signer, &req, amount - 1, valid, nonce(2))?,
            "invalid_exact_evm_payload_authorization_value",
        ),
        (
            x402::sign_payment(&signer, &req, amount, now() - 1, nonce(3))?,
            "invalid_exact_evm_payload_authorization_valid_before",
        ),
        (
            x402::sign_payment(&signer, &wrong_asset, amount, valid, nonce(4))?,
            "invalid_payment_requirements",
        ),
        (
            x402::sign_payment(&signer, &wrong_network, amount, valid, nonce(5))?,
            "invalid_network",
        ),
        (
            {
                // Signed by someone else but claiming the payer.
                let mut forged =
                    x402::sign_payment(Wallet::random().signer(), &req, amount, valid, nonce(6))?;
                forged.payload.authorization.from = payer.address();
                forged
            },
            "invalid_exact_evm_payload_signature",
        ),
        (
            x402::sign_payment(Wallet::random().signer(), &req, amount, valid, nonce(7))?,
            "insufficient_funds",
        ),
    ];
    let snapshot = || -> Result<(u64, u64, u64)> {
        Ok((
            chain.token_balance(payer.address()),
            chain.vault_holdings(),
            hub.balance(payer.address())?,
        ))
    };
    let before = snapshot()?;
    for (payment, code) in &cases {
        let (status, headers, _) = post(Some(header(payment)))?;
        assert_eq!(status, 402, "{code}");
        let required: PaymentRequired = decode_header(&headers, "payment-required")?;
        assert_eq!(required.error, *code);
    }
    let (status, _, _) = post(Some("bm90IGpzb24=".into()))?;
    assert_eq!(status, 402);
    assert_eq!(snapshot()?, before, "a refused payment moved money");

    // A good payment is served; the same authorization again is a replay, refused.
    let (status, headers, v) = post(Some(header(&good)))?;
    assert_eq!(status, 200, "{v}");
    let settlement: SettlementResponse = decode_header(&headers, "payment-response")?;
    assert!(settlement.success);
    let after_good = snapshot()?;
    assert_eq!(after_good.0, before.0 - amount);
    let (status, headers, _) = post(Some(header(&good)))?;
    assert_eq!(status, 402);
    let required: PaymentRequired = decode_header(&headers, "payment-required")?;
    assert_eq!(
        required.error,
        "invalid_exact_evm_payload_authorization_nonce"
    );
    assert_eq!(snapshot()?, after_good, "a replay moved money");

    // A streaming request pays the same way: the settlement in the headers, the final cost in
    // the last chunk, the unused rest on the payer's balance.
    let streaming = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "stream": true,
    });
    let (status, _, _) = {
        let mut r = http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .send_json(&streaming)?;
        (r.status().as_u16(), (), r.body_mut().read_to_string()?)
    };
    assert_eq!(status, 402, "the streaming body bounds its own price");
    let stream_required: PaymentRequired = {
        let r = http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .send_json(&streaming)?;
        decode_header(r.headers(), "payment-required")?
    };
    let stream_amount: u64 = stream_required.accepts[0].amount.parse()?;
    let paid_stream = x402::sign_payment(
        &signer,
        &stream_required.accepts[0],
        stream_amount,
        valid,
        nonce(8),
    )?;
    let balance_before = hub.balance(payer.address())?;
    let mut r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("PAYMENT-SIGNATURE", header(&paid_stream))
        .send_json(&streaming)?;
    assert_eq!(r.status().as_u16(), 200);
    let settlement: SettlementResponse = decode_header(r.headers(), "payment-response")?;
    assert!(settlement.success);
    let text = r.body_mut().read_to_string()?;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let last: Value = text
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("tessera").is_some())
        .context("no chunk with the cost")?;
    let cost = last["tessera"]["cost"].as_u64().context("tessera.cost")?;
    assert!(cost > 0 && cost < stream_amount);
    hub.wait_balance(
        payer.address(),
        balance_before + stream_amount - cost,
        Duration::from_secs(10),
    )?;

    // The facilitator endpoints answer the same.
    let (status, v) = hub.get("/v1/x402/supported")?;
    assert_eq!(
        (status, v["kinds"][0]["network"].as_str()),
        (200, Some("eip155:31337")),
        "{v}"
    );
    let mut r = http()
        .post(format!("{}/v1/x402/verify", hub.url))
        .send_json(json!({
            "x402Version": 2,
            "paymentPayload": good,
            "paymentRequirements": req,
        }))?;
    let v: Value = r.body_mut().read_json()?;
    assert_eq!(
        (v["isValid"].as_bool(), v["invalidReason"].as_str()),
        (
            Some(false),
            Some("invalid_exact_evm_payload_authorization_nonce")
        ),
        "{v}"
    );
    // A keyed request whose account cannot cover it is told how to pay (402, not 429), and
    // paying with the same wallet serves it.
    let keyed = Wallet::random();
    mint(&chain, keyed.address(), 5_000_000)?;
    let out = Command::new(BIN)
        .args(["key", "create", "--hub", &hub.url, "--private-key"])
        .arg(hex::encode(keyed.signer().to_bytes()))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api_key = String::from_utf8(out.stdout)?.trim().to_owned();
    let keyed_post = |payment: Option<String>| -> Result<(u16, ureq::http::HeaderMap, Value)> {
        let mut request = http()
            .post(format!("{}/v1/chat/completions", hub.url))
            .header("Authorization", &format!("Bearer {api_key}"));
        if let Some(p) = payment {
            request = request.header("PAYMENT-SIGNATURE", p);
        }
        let mut r = request.send_json(&body)?;
        let headers = r.headers().clone();
        Ok((r.status().as_u16(), headers, r.body_mut().read_json()?))
    };
    let (status, headers, v) = keyed_post(None)?;
    assert_eq!(status, 402, "{v}");
    let required: PaymentRequired = decode_header(&headers, "payment-required")?;
    assert!(
        required.error.starts_with("insufficient_funds"),
        "{}",
        required.error
    );
    let keyed_req = required.accepts[0].clone();
    let keyed_amount: u64 = keyed_req.amount.parse()?;
    let paid = x402::sign_payment(keyed.signer(), &keyed_req, keyed_amount, valid, nonce(40))?;
    let (status, _, v) = keyed_post(Some(header(&paid)))?;
    assert_eq!(status, 200, "{v}");
    assert!(
        hub.balance(keyed.address())? < keyed_amount,
        "the job was paid from the payment"
    );

    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");
    Ok(())
}

/// Writes `wallet`'s key where the CLI's `--key-file` reads it.
fn key_file(dir: &Path, wallet: &Wallet) -> Result<PathBuf> {
    let path = dir.join(format!("{:#x}.key", wallet.address()));
    std::fs::write(&path, hex::encode(wallet.signer().to_bytes()))?;
    Ok(path)
}

/// `tessera stake|unstake … --hub URL --key-file KEY`: the hub's JSON answer, or the refusal.
fn stake_cli(hub: &Hub, key: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(BIN)
        .args(args)
        .args(["--hub", &hub.url, "--key-file"])
        .arg(key)
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The vault's record of a provider's stake: (staked, unbonding).
fn vault_stake(chain: &LocalChain, provider: Address) -> (u64, u64) {
    let s = block_on(chain.chain().stake_of(provider)).expect("stakeOf");
    (s.staked, s.unbonding)
}

fn wait_vault_stake(
    chain: &LocalChain,
    hub: &Hub,
    provider: Address,
    expected: (u64, u64),
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    while vault_stake(chain, provider) != expected {
        if Instant::now() > deadline {
            bail!(
                "the vault records {:?} for {provider}, expected {expected:?}:\n{}",
                vault_stake(chain, provider),
                hub.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn stake_and_unstake_move_through_the_vault_and_reconcile() -> Result<()> {
    let chain = LocalChain::up()?;
    let mut args = chain.flags();
    args.extend(["--confirmations", "0", "--unbonding-secs", "2"].map(String::from));
    let mut hub = Hub::start(args)?;
    let provider = Wallet::random();
    let p = provider.address();
    chain.deposit(p, 3_000_000)?;
    hub.wait_balance(p, 3_000_000, Duration::from_secs(10))?;
    let key = key_file(chain.dir.path(), &provider)?;

    // Stake: the ledger bonds it and the vault records it; no token moves.
    let staked = stake_cli(
        &hub,
        &key,
        &["stake", "--amount", "2000000", "--nonce", "1"],
    )?;
    assert_eq!(
        (&staked["action"], &staked["staked"], &staked["replayed"]),
        (&json!("stake"), &json!(2_000_000), &json!(false)),
        "{staked}"
    );
    assert_eq!(staked["on_chain"]["staked"], 2_000_000, "{staked}");
    assert_eq!(vault_stake(&chain, p), (2_000_000, 0));
    assert_eq!(hub.balance(p)?, 1_000_000);
    assert_eq!(chain.vault_holdings(), 3_000_000);
    // The same order again: replayed, nothing recorded twice.
    let again = stake_cli(
        &hub,
        &key,
        &["stake", "--amount", "2000000", "--nonce", "1"],
    )?;
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(vault_stake(&chain, p), (2_000_000, 0));
    // More than the balance, or the nonce reused for another amount: refused, nothing moves.
    let short = stake_cli(
        &hub,
        &key,
        &["stake", "--amount", "1000001", "--nonce", "2"],
    )
    .expect_err("staking more than the balance");
    assert!(format!("{short}").contains("429"), "{short}");
    let reused = stake_cli(&hub, &key, &["stake", "--amount", "5", "--nonce", "1"])
        .expect_err("a reused nonce");
    assert!(format!("{reused}").contains("409"), "{reused}");
    assert_eq!(
        (hub.balance(p)?, vault_stake(&chain, p)),
        (1_000_000, (2_000_000, 0))
    );

    // Unstake: the stake starts unbonding in the ledger and in the vault.
    let unstaked = stake_cli(
        &hub,
        &key,
        &["unstake", "--amount", "500000", "--nonce", "3"],
    )?;
    assert_eq!(unstaked["unbonding"]["amount"], 500_000, "{unstaked}");
    assert_eq!(vault_stake(&chain, p), (1_500_000, 500_000));
    let early = stake_cli(&hub, &key, &["unstake", "--withdraw", "--nonce", "4"])
        .expect_err("withdrawing before the unbonding period ends");
    assert!(
        format!("{early}").contains("finished its unbonding period"),
        "{early}"
    );
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("stake         reconciled"), "{audit}");

    // After the unbonding period the matured stake returns to the balance, and to the vault's.
    std::thread::sleep(Duration::from_millis(2_100));
    let released = stake_cli(&hub, &key, &["unstake", "--withdraw", "--nonce", "5"])?;
    assert_eq!(
        (&released["action"], &released["amount"]),
        (&json!("withdraw"), &json!(500_000)),
        "{released}"
    );
    assert_eq!(vault_stake(&chain, p), (1_500_000, 0));
    assert_eq!(hub.balance(p)?, 1_500_000);

    // The chain refuses the operator's transaction (no gas) and the hub is killed: the stake is
    // bonded in the ledger, and the restarted hub records it in the vault, once.
    let operator = tessera_chain::read_key_file(&chain.operator_key)?.address();
    let funds = chain.rpc("eth_getBalance", json!([operator.to_string(), "latest"]))?;
    chain.rpc("anvil_setBalance", json!([operator.to_string(), "0x0"]))?;
    let pending = stake_cli(&hub, &key, &["stake", "--amount", "100000", "--nonce", "6"])?;
    assert_eq!(pending["staked"], 1_600_000, "{pending}");
    assert!(pending.get("on_chain").is_none(), "{pending}");
    assert_eq!(vault_stake(&chain, p), (1_500_000, 0));
    hub.crash_and_restart()?;
    chain.rpc("anvil_setBalance", json!([operator.to_string(), funds]))?;
    wait_vault_stake(&chain, &hub, p, (1_600_000, 0), Duration::from_secs(10))?;
    hub.crash_and_restart()?;
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(vault_stake(&chain, p), (1_600_000, 0));

    // The free balance can still leave; the stake stays in the vault.
    let recipient = Wallet::random().address();
    let (status, paid) = hub.withdraw(&provider, recipient, 1_400_000, 7)?;
    assert_eq!(
        (status, paid["state"].as_str()),
        (200, Some("paid")),
        "{paid}"
    );
    assert_eq!(chain.vault_holdings(), 1_600_000);
    let (status, v) = hub.get("/v1/chain")?;
    assert_eq!((status, &v["reconciled"]), (200, &json!(true)), "{v}");
    assert_eq!(v["vault_stake"]["staked"], 1_600_000, "{v}");
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("stake         reconciled"), "{audit}");
    Ok(())
}

/// A cheating provider staked through the vault is caught and slashed; the next slash epoch
/// takes the slash from its stake on-chain. Needs the node's cheats (`--features adversary`).
#[cfg(feature = "adversary")]
#[test]
fn a_slashed_providers_on_chain_stake_is_reduced_in_the_next_slash_epoch() -> Result<()> {
    let chain = LocalChain::up()?;
    let mut args = chain.flags();
    args.extend(
        [
            "--confirmations",
            "0",
            "--dev",
            "--verify-probability",
            "1",
            "--slash-amount",
            "500000",
            "--slash-epoch-secs",
            "2",
        ]
        .map(String::from),
    );
    let hub = Hub::start(args)?;
    let node = |name: &str, wallet: &Wallet, price: &str, extra: &[&str]| -> Result<Proc> {
        let log = std::fs::File::create(hub.dir.path().join(format!("{name}.log")))?;
        Ok(Proc(
            Command::new(BIN)
                .args(["node", "--hub", &hub.url, "--private-key"])
                .arg(hex::encode(wallet.signer().to_bytes()))
                .args(["--price", price, "--capacity", "2", "--threads", "1"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()?,
        ))
    };
    // The cheater's stake is real money: deposited on-chain, staked by a signed order.
    let cheater = Wallet::random();
    chain.deposit(cheater.address(), 1_000_000)?;
    hub.wait_balance(cheater.address(), 1_000_000, Duration::from_secs(10))?;
    let key = key_file(chain.dir.path(), &cheater)?;
    stake_cli(
        &hub,
        &key,
        &["stake", "--amount", "1000000", "--nonce", "1"],
    )?;
    assert_eq!(vault_stake(&chain, cheater.address()), (1_000_000, 0));
    let (honest_a, honest_b) = (Wallet::random(), Wallet::random());
    let _a = node("honest-a", &honest_a, "10", &["--dev-stake"])?;
    let _b = node("honest-b", &honest_b, "12", &["--dev-stake"])?;
    // It undercuts the honest providers, so it serves first.
    let _cheater = node("cheater", &cheater, "5", &["--cheat", "requantized-q4-0"])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = hub.get("/v1/providers")?;
        let connected = v["providers"].as_array().map_or(0, |p| {
            p.iter().filter(|p| p["connected"] == json!(true)).count()
        });
        if connected == 3 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{connected} of 3 nodes connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let agent = Wallet::random();
    let r = http()
        .post(format!("{}/v1/dev/faucet", hub.url))
        .send_json(json!({"address": agent.address(), "amount": 1_000_000}))?;
    assert_eq!(r.status(), 200);
    let out = Command::new(BIN)
        .args(["key", "create", "--hub", &hub.url, "--private-key"])
        .arg(hex::encode(agent.signer().to_bytes()))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api_key = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut r = http()
        .post(format!("{}/v1/chat/completions", hub.url))
        .header("Authorization", &format!("Bearer {api_key}"))
        .send_json(json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }))?;
    let served_by = r
        .headers()
        .get("x-tessera-provider")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let body: Value = r.body_mut().read_json()?;
    assert_eq!(
        served_by.map(|s| s.to_lowercase()),
        Some(format!("{:#x}", cheater.address())),
        "{body}"
    );

    // The verifiers catch it and the ledger slashes half its stake; the vault follows in the
    // next epoch, and the honest stakes (dev-staked, recorded too) stay whole.
    let deadline = Instant::now() + Duration::from_secs(150);
    while hub
        .get(&format!("/v1/accounts/{:#x}", cheater.address()))?
        .1["staked"]
        != 500_000
    {
        anyhow::ensure!(Instant::now() < deadline, "never slashed:\n{}", hub.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let slashed = Instant::now();
    wait_vault_stake(
        &chain,
        &hub,
        cheater.address(),
        (500_000, 0),
        Duration::from_secs(10),
    )?;
    eprintln!(
        "slash on-chain {:?} after the ledger's (epoch 2 s)",
        slashed.elapsed()
    );
    for honest in [&honest_a, &honest_b] {
        assert_eq!(vault_stake(&chain, honest.address()), (1_000_000, 0));
    }
    assert!(hub.log().contains("slash epoch recorded in the vault"));
    let (status, v) = hub.get("/v1/chain")?;
    assert_eq!((status, &v["reconciled"]), (200, &json!(true)), "{v}");
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("stake         reconciled"), "{audit}");
    Ok(())
}

#[test]
fn a_large_withdrawal_waits_its_delay_then_is_paid_once() -> Result<()> {
    let chain = LocalChain::up()?;
    let mut args = chain.flags();
    args.extend(
        [
            "--confirmations",
            "0",
            "--withdrawal-delay-above",
            "1000000",
            "--withdrawal-delay-secs",
            "15",
        ]
        .map(String::from),
    );
    let mut hub = Hub::start(args)?;
    let agent = Wallet::random();
    chain.deposit(agent.address(), 5_000_000)?;
    hub.wait_balance(agent.address(), 5_000_000, Duration::from_secs(10))?;
    let recipient = Wallet::random().address();

    // At the threshold: paid at once.
    let (status, small) = hub.withdraw(&agent, recipient, 1_000_000, 1)?;
    assert_eq!(
        (status, small["state"].as_str()),
        (200, Some("paid")),
        "{small}"
    );
    // Above it: debited now, visible as delayed, paid only once the delay has passed.
    let started = Instant::now();
    let (status, large) = hub.withdraw(&agent, recipient, 2_000_000, 2)?;
    assert_eq!(
        (status, large["state"].as_str()),
        (200, Some("delayed")),
        "{large}"
    );
    assert!(
        large["pay_after"].as_u64().is_some_and(|t| t >= now() + 13),
        "{large}"
    );
    assert_eq!(hub.balance(agent.address())?, 2_000_000);
    let id = large["id"].as_str().context("id")?.to_owned();
    let (status, v) = hub.get(&format!("/v1/withdrawals/{id}"))?;
    assert_eq!((status, v["state"].as_str()), (200, Some("delayed")), "{v}");
    let (status, v) = hub.get(&format!("/v1/withdrawals/0x{}", "ab".repeat(32)))?;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("unknown_withdrawal")),
        "{v}"
    );

    // A crash during the delay changes nothing: still owed, still waiting.
    hub.crash_and_restart()?;
    std::thread::sleep(Duration::from_millis(500));
    anyhow::ensure!(
        started.elapsed() < Duration::from_secs(13),
        "the restart took too long to check the wait"
    );
    assert_eq!(
        chain.token_balance(recipient),
        1_000_000,
        "paid before its delay"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while chain.token_balance(recipient) != 3_000_000 {
        assert!(Instant::now() < deadline, "never paid:\n{}", hub.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(14),
        "{:?}",
        started.elapsed()
    );
    let (status, v) = hub.get(&format!("/v1/withdrawals/{id}"))?;
    assert_eq!((status, v["state"].as_str()), (200, Some("paid")), "{v}");
    // The order again replays it as paid; nothing is paid twice.
    let (status, again) = hub.withdraw(&agent, recipient, 2_000_000, 2)?;
    assert_eq!(
        (status, again["state"].as_str()),
        (200, Some("paid")),
        "{again}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(chain.token_balance(recipient), 3_000_000);
    assert_eq!(hub.balance(agent.address())?, 2_000_000);
    let audit = hub.audit(&chain)?;
    assert!(audit.contains("reconciled"), "{audit}");
    Ok(())
}
