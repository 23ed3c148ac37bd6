//! The provider side of the hub: the WebSocket endpoint nodes connect to, registration checks
//! (domain, signature, nonce, model file in the catalog, stake) and the routing of their messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tessera_wire::{HubMessage, NodeMessage};
use tokio::sync::mpsc;

use crate::registry::{Connection, JobEvent};
use crate::{now_secs, Hub};

/// How long a new connection may take to register before it is dropped.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /v1/providers/connect`: upgrades to the provider WebSocket.
pub async fn connect(State(hub): State<Arc<Hub>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(1 << 20)
        .on_upgrade(move |socket| session(hub, socket))
}

async fn session(hub: Arc<Hub>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = HubMessage::Hello {
        domain: hub.verifier.domain(),
    };
    if sink
        .send(Frame::Text(hello.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    // Registration: the first text frame, within a bound (an idle socket holds nothing).
    let first = tokio::time::timeout(REGISTRATION_TIMEOUT, async {
        loop {
            match stream.next().await {
                Some(Ok(Frame::Text(text))) => return Some(text),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    let first = match first {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            tracing::warn!("a provider connection sent no registration in time; closed");
            let _ = sink.close().await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<HubMessage>();
    let connection = match register(&hub, &first, tx).await {
        Ok(c) => c,
        Err(message) => {
            tracing::warn!(%message, "provider registration rejected");
            let _ = sink
                .send(Frame::Text(
                    HubMessage::Rejected { message }.to_json().into(),
                ))
                .await;
            let _ = sink.close().await;
            return;
        }
    };
    let welcome = HubMessage::Registered {
        provider: connection.address,
        staked: connection.stake.load(Ordering::Relaxed),
        model: connection.model.name.clone(),
    };
    if sink
        .send(Frame::Text(welcome.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    hub.registry.insert(connection.clone());
    tracing::info!(provider = %connection.address, model = %connection.model.name, price = connection.price, capacity = connection.capacity, "provider connected");
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink
                .send(Frame::Text(message.to_json().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(frame) = stream.next().await {
        let text = match frame {
            Ok(Frame::Text(text)) => text,
            Ok(Frame::Close(_)) | Err(_) => break,
            Ok(_) => {
                connection.touch();
                continue;
            }
        };
        connection.touch();
        match serde_json::from_str::<NodeMessage>(&text) {
            Ok(NodeMessage::Token {
                job,
                token,
                values,
                logprobs,
            }) => {
                if !connection.deliver(job, JobEvent::Token(token, values, logprobs)) {
                    // Nobody waits (the agent left, or the job overflowed): stop the work.
                    connection.cancel_job(job);
                }
            }
            Ok(NodeMessage::Done {
                job,
                prompt_tokens,
                prompt_hash,
                finish,
            }) => {
                connection.deliver(
                    job,
                    JobEvent::Done {
                        prompt_tokens,
                        prompt_hash,
                        finish,
                    },
                );
            }
            Ok(NodeMessage::Failed {
                job,
                kind,
                message,
                prompt_hash,
            }) => {
                connection.deliver(
                    job,
                    JobEvent::Failed {
                        kind,
                        message,
                        prompt_hash,
                    },
                );
            }
            Ok(NodeMessage::Scored { id, verdict }) => connection.deliver_verdict(id, verdict),
            Ok(NodeMessage::Heartbeat { .. }) => {}
            Ok(NodeMessage::Register { .. }) => {
                tracing::warn!(provider = %connection.address, "second registration ignored")
            }
            Err(e) => {
                tracing::warn!(provider = %connection.address, error = %e, "unreadable provider message")
            }
        }
    }
    tracing::warn!(provider = %connection.address, "provider disconnected");
    hub.registry.remove(&connection);
    writer.abort();
}

/// Checks a registration: signature and domain, nonce (no replay), model file, stake.
async fn register(
    hub: &Hub,
    text: &str,
    tx: mpsc::UnboundedSender<HubMessage>,
) -> Result<Arc<Connection>, String> {
    let Ok(NodeMessage::Register {
        registration,
        dev_stake,
        engine,
    }) = serde_json::from_str::<NodeMessage>(text)
    else {
        return Err("the first message must be a registration".into());
    };
    let m = &registration.message;
    let sha256 = hex::encode(m.model.0);
    // The model first: no nonce is spent on a registration that cannot serve here.
    let model = hub.config.catalog.by_sha256(&sha256).ok_or_else(|| {
        format!("model file {sha256} is not in this hub's catalog (ask the operator to add it with --model NAME=PATH)")
    })?;
    let provider = hub
        .verifier
        .verify(&registration, now_secs(), &hub.ledger)
        .await
        .map_err(|e| format!("invalid registration signature: {e}"))?;
    if hub.registry.quarantined(provider) {
        return Err(format!("provider {provider} is quarantined"));
    }
    let mut staked = hub
        .ledger
        .staked(provider)
        .await
        .map_err(|e| format!("ledger: {e}"))?;
    if staked < hub.config.min_stake && dev_stake {
        let faucet = hub
            .ledger
            .faucet()
            .ok_or("dev staking needs a hub started with --dev")?;
        let missing = hub.config.min_stake - staked;
        let key = format!("dev-stake:{provider:#x}:{}", registration.message.nonce);
        faucet
            .mint(&format!("{key}:mint"), provider, missing)
            .await
            .map_err(|e| format!("faucet: {e}"))?;
        hub.ledger
            .stake(&format!("{key}:stake"), provider, missing)
            .await
            .map_err(|e| format!("stake: {e}"))?;
        staked += missing;
        tracing::info!(%provider, amount = missing, "dev faucet funded and staked a provider");
    }
    if staked < hub.config.min_stake {
        return Err(format!(
            "provider {provider} has {staked} staked; registering needs at least {}",
            hub.config.min_stake
        ));
    }
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Arc::new(
        Connection::new(id, provider, model, m.pricePerToken, m.capacity, staked, tx)
            .with_engine(engine),
    ))
}
