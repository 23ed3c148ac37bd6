//! The provider side of the hub: the WebSocket endpoint nodes connect to, registration checks
//! (signature, nonce, model hash, stake) and the routing of their messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tessera_wire::{HubMessage, NodeMessage};
use tokio::sync::mpsc;

use crate::registry::{Connection, JobEvent, VerdictReport};
use crate::{now_secs, Hub};

/// `GET /v1/providers/connect`: upgrades to the provider WebSocket.
pub async fn connect(State(hub): State<Arc<Hub>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session(hub, socket))
}

async fn session(hub: Arc<Hub>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    // Registration: the first text frame.
    let first = loop {
        match stream.next().await {
            Some(Ok(Frame::Text(text))) => break text,
            Some(Ok(_)) => continue,
            _ => return,
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
    let staked = hub.ledger.staked(connection.address).await.unwrap_or(0);
    let hello = HubMessage::Registered {
        provider: connection.address,
        staked,
    };
    if sink
        .send(Frame::Text(hello.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    hub.registry.insert(connection.clone());
    tracing::info!(provider = %connection.address, model = %connection.model_name, price = connection.price, capacity = connection.capacity, "provider connected");
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
            Ok(NodeMessage::Token { job, text }) => {
                if !connection.deliver(job, JobEvent::Token(text)) {
                    // Nobody waits (the agent left): stop wasting the provider's time.
                    connection.cancel_job(job);
                }
            }
            Ok(NodeMessage::Done { job, result }) => {
                connection.deliver(job, JobEvent::Done(Box::new(result)));
            }
            Ok(NodeMessage::Failed { job, kind, message }) => {
                connection.deliver(job, JobEvent::Failed(kind, message));
            }
            Ok(NodeMessage::Verdict {
                id,
                passed,
                reason,
                error,
            }) => {
                connection.deliver_verdict(
                    id,
                    VerdictReport {
                        passed,
                        reason,
                        error,
                    },
                );
            }
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

/// Checks a registration: signature and domain, nonce (no replay), model hash, stake.
async fn register(
    hub: &Hub,
    text: &str,
    tx: mpsc::UnboundedSender<HubMessage>,
) -> Result<Arc<Connection>, String> {
    let Ok(NodeMessage::Register {
        registration,
        model_name,
        context_length,
        dev_stake,
    }) = serde_json::from_str::<NodeMessage>(text)
    else {
        return Err("the first message must be a registration".into());
    };
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
    let m = &registration.message;
    let sha256 = hex::encode(m.model.0);
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Arc::new(Connection::new(
        id,
        provider,
        model_name,
        sha256,
        m.pricePerToken,
        m.capacity,
        context_length,
        tx,
    )))
}
