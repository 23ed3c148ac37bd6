//! A benchmark double: a provider that speaks the real protocol but answers every job at once
//! with fixed tokens and a well-formed (meaningless) commitment, and passes every verification.
//! `tessera bench hub` runs many of them to measure the hub's own overhead; it must never serve
//! real agents.

use futures_util::{SinkExt, StreamExt};
use tessera_engine::SamplingParams;
use tessera_proof::{CommitmentBuilder, Finish, JobSpec};
use tessera_protocol::{Domain, ProviderRegistration, Wallet, B256};
use tessera_wire::{HubMessage, JobResult, NodeMessage, CONNECT_PATH};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::{Error, Result};

/// The model name synthetic providers register under.
pub const SYNTHETIC_MODEL: &str = "synthetic";

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
    let sha = B256::from(sha2_of(SYNTHETIC_MODEL));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let registration = ProviderRegistration {
        model: sha,
        pricePerToken: price,
        capacity,
        nonce: now.as_nanos() as u64,
        expiry: now.as_secs() + 300,
    };
    let register = NodeMessage::Register {
        registration: wallet.sign(registration, Domain::default())?,
        model_name: SYNTHETIC_MODEL.into(),
        context_length: 1 << 20,
        dev_stake: true,
    };
    sink.send(Frame::text(register.to_json())).await?;
    let mut commitments = std::collections::HashMap::new();
    while let Some(frame) = stream.next().await {
        let Frame::Text(text) = frame? else { continue };
        match serde_json::from_str::<HubMessage>(&text) {
            Ok(HubMessage::Rejected { message }) => return Err(Error::Rejected(message)),
            Ok(HubMessage::Job { job, request }) => {
                let n = tokens.min(request.max_tokens).max(1);
                let commitment = commitments
                    .entry(n)
                    .or_insert_with(|| {
                        let spec = JobSpec {
                            model_sha256: hex::encode(sha.0),
                            prompt_tokens: vec![0],
                            sampling: SamplingParams::greedy(),
                            max_tokens: n,
                            stop: Vec::new(),
                        };
                        let mut builder = CommitmentBuilder::new(spec);
                        for _ in 0..n {
                            builder.push_values(0, [0.0; 5]);
                        }
                        builder.finish(Finish::Length)
                    })
                    .clone();
                for _ in 0..n {
                    sink.feed(Frame::text(
                        NodeMessage::Token {
                            job,
                            text: "x".into(),
                        }
                        .to_json(),
                    ))
                    .await?;
                }
                let result = JobResult {
                    prompt_tokens: 1,
                    output_tokens: vec![0; n as usize],
                    text: "x".repeat(n as usize),
                    finish: Finish::Length,
                    commitment,
                };
                sink.send(Frame::text(NodeMessage::Done { job, result }.to_json()))
                    .await?;
            }
            Ok(HubMessage::Verify { id, .. }) => {
                sink.send(Frame::text(
                    NodeMessage::Verdict {
                        id,
                        passed: true,
                        reason: None,
                        error: None,
                    }
                    .to_json(),
                ))
                .await?;
            }
            Ok(_) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
    }
    Ok(())
}

fn sha2_of(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}
