//! A benchmark double: a provider that speaks the real protocol but answers every job at once
//! with token 0 and meaningless committed values, and passes every check it is asked for.
//! `tessera bench hub` runs many of them against a hub whose catalog has the [`SYNTHETIC_MODEL`]
//! (a one-token vocabulary) to measure the hub's own overhead; it must never serve real agents.

use futures_util::{SinkExt, StreamExt};
use tessera_protocol::{ProviderRegistration, Wallet, B256};
use tessera_wire::{Finish, HubMessage, NodeMessage, Verdict, CONNECT_PATH};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::{Error, Result};

/// The model name synthetic providers serve.
pub const SYNTHETIC_MODEL: &str = "synthetic";

/// The "file hash" of the synthetic model: sha256 of its name.
pub fn synthetic_sha256() -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(SYNTHETIC_MODEL.as_bytes()).into()
}

/// Connects a synthetic provider to `hub` (a `--dev` hub funds and stakes it) and serves until
/// the connection closes. Each job gets `tokens` tokens (at most its `max_tokens`).
pub async fn run_synthetic(
    hub: &str,
    wallet: &Wallet,
    price: u64,
    capacity: u32,
    tokens: u32,
) -> Result<()> {
    let url = format!(
        "{}{CONNECT_PATH}",
        hub.trim_end_matches('/').replacen("http://", "ws://", 1)
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut sink, mut stream) = ws.split();
    let domain = loop {
        let Some(frame) = stream.next().await else {
            return Err(Error::Protocol("closed before the greeting".into()));
        };
        if let Frame::Text(text) = frame? {
            match serde_json::from_str::<HubMessage>(&text) {
                Ok(HubMessage::Hello { domain }) => break domain,
                other => {
                    return Err(Error::Protocol(format!(
                        "expected a greeting, got {other:?}"
                    )))
                }
            }
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let registration = ProviderRegistration {
        model: B256::from(synthetic_sha256()),
        pricePerToken: price,
        capacity,
        nonce: now.as_nanos() as u64,
        expiry: now.as_secs() + 300,
    };
    let register = NodeMessage::Register {
        registration: wallet.sign(registration, domain)?,
        dev_stake: true,
        engine: "tessera-synthetic".into(),
    };
    sink.send(Frame::text(register.to_json())).await?;
    let prompt_hash = tessera_proof::commitment::hash_tokens(&[0]);
    while let Some(frame) = stream.next().await {
        let Frame::Text(text) = frame? else { continue };
        match serde_json::from_str::<HubMessage>(&text) {
            Ok(HubMessage::Rejected { message }) => return Err(Error::Rejected(message)),
            Ok(HubMessage::Job { job, request }) => {
                let n = tokens.min(request.max_tokens).max(1);
                for _ in 0..n {
                    sink.feed(Frame::text(
                        NodeMessage::Token {
                            job,
                            token: 0,
                            values: [0; 5],
                            logprobs: None,
                        }
                        .to_json(),
                    ))
                    .await?;
                }
                let done = NodeMessage::Done {
                    job,
                    prompt_tokens: 1,
                    prompt_hash: prompt_hash.clone(),
                    finish: Finish::Length,
                };
                sink.send(Frame::text(done.to_json())).await?;
            }
            Ok(HubMessage::Score { id, .. }) => {
                let scored = NodeMessage::Scored {
                    id,
                    verdict: Verdict::Pass,
                };
                sink.send(Frame::text(scored.to_json())).await?;
            }
            Ok(_) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
    }
    Ok(())
}
