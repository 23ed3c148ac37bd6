//! A few calls to a hub's HTTP API that several commands make.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_protocol::{ApiKeyRegistration, Domain, Wallet};

/// An HTTP agent that returns error statuses instead of failing on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// The EIP-712 domain a hub's signatures are bound to (`GET /v1/domain`).
pub fn domain(url: &str) -> anyhow::Result<Domain> {
    let v: Value = http()
        .get(format!("{url}/v1/domain"))
        .call()?
        .body_mut()
        .read_json()?;
    Ok(Domain::for_hub(
        v["chainId"].as_u64().context("domain chainId")?,
        v["verifyingContract"]
            .as_str()
            .context("domain verifyingContract")?
            .parse()?,
    ))
}

/// Registers `key` as an API key of `wallet`, valid for `valid_for`.
pub fn register_key(
    url: &str,
    wallet: &Wallet,
    key: &str,
    nonce: u64,
    valid_for: Duration,
) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let signed = wallet.sign(
        ApiKeyRegistration {
            keyHash: <[u8; 32]>::from(Sha256::digest(key.as_bytes())).into(),
            validUntil: now + valid_for.as_secs(),
            nonce,
            expiry: now + 600,
        },
        domain(url)?,
    )?;
    let mut r = http().post(format!("{url}/v1/keys")).send_json(&signed)?;
    anyhow::ensure!(
        r.status() == 200,
        "registering the API key failed: {}",
        r.body_mut().read_to_string()?
    );
    Ok(())
}
