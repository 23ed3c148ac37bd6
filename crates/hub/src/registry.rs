//! The provider registry and the scheduler.
//!
//! A [`Connection`] is a live WebSocket session of one provider; its [`Record`] (reputation,
//! counters, quarantine) is kept by address so it survives reconnects. The scheduler ranks the
//! live, unquarantined providers of a model by price, load, measured latency and reputation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tessera_protocol::Address;
use tessera_wire::{FailureKind, HubMessage, JobResult};
use tokio::sync::{mpsc, oneshot};

/// A provider is considered dead when it has sent nothing (heartbeats included) for this long.
const DEAD_AFTER: Duration = Duration::from_secs(30);
/// Starting reputation of a new provider, in [0, 1].
const NEW_REPUTATION: f64 = 0.5;

/// What a provider streams back for one job.
#[derive(Debug)]
pub enum JobEvent {
    /// A token's text.
    Token(String),
    /// The job finished.
    Done(Box<JobResult>),
    /// The job failed or was refused.
    Failed(FailureKind, String),
}

/// A verifier's answer.
#[derive(Debug, Clone)]
pub struct VerdictReport {
    /// Whether the job passed.
    pub passed: bool,
    /// Why not.
    pub reason: Option<String>,
    /// The verifier could not check (inconclusive).
    pub error: Option<String>,
}

/// One live provider session.
pub struct Connection {
    /// Session id (unique per hub process).
    pub id: u64,
    /// The provider's address, recovered from its signed registration.
    pub address: Address,
    /// Model short name.
    pub model_name: String,
    /// Model file sha256 (hex).
    pub sha256: String,
    /// Price per generated token, micro-units.
    pub price: u64,
    /// Concurrent jobs advertised.
    pub capacity: u32,
    /// Context window of the model, tokens.
    pub context_length: u32,
    outgoing: mpsc::UnboundedSender<HubMessage>,
    jobs: Mutex<HashMap<u64, mpsc::UnboundedSender<JobEvent>>>,
    verifications: Mutex<HashMap<u64, oneshot::Sender<VerdictReport>>>,
    active: AtomicU32,
    last_seen: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// A new session that sends on `outgoing`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        address: Address,
        model_name: String,
        sha256: String,
        price: u64,
        capacity: u32,
        context_length: u32,
        outgoing: mpsc::UnboundedSender<HubMessage>,
    ) -> Self {
        Self {
            id,
            address,
            model_name,
            sha256,
            price,
            capacity: capacity.max(1),
            context_length,
            outgoing,
            jobs: Mutex::default(),
            verifications: Mutex::default(),
            active: AtomicU32::new(0),
            last_seen: Mutex::new(Instant::now()),
        }
    }

    /// Sends a job; its events arrive on the returned receiver, which ends when the provider
    /// disconnects.
    pub fn start_job(
        &self,
        job: u64,
        request: tessera_wire::JobRequest,
    ) -> Option<mpsc::UnboundedReceiver<JobEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.jobs).insert(job, tx);
        self.active.fetch_add(1, Ordering::Relaxed);
        if self
            .outgoing
            .send(HubMessage::Job { job, request })
            .is_err()
        {
            self.end_job(job);
            return None;
        }
        Some(rx)
    }

    /// Forgets a job (finished, failed or abandoned).
    pub fn end_job(&self, job: u64) {
        if lock(&self.jobs).remove(&job).is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Asks the provider to stop a job and forgets it.
    pub fn cancel_job(&self, job: u64) {
        let _ = self.outgoing.send(HubMessage::Cancel { job });
        self.end_job(job);
    }

    /// Routes a provider's job event; `false` if nobody waits for that job.
    pub fn deliver(&self, job: u64, event: JobEvent) -> bool {
        let done = !matches!(event, JobEvent::Token(_));
        let delivered = lock(&self.jobs)
            .get(&job)
            .is_some_and(|tx| tx.send(event).is_ok());
        if done {
            self.end_job(job);
        }
        delivered
    }

    /// Sends a verification request; the verdict arrives on the returned receiver.
    pub fn start_verification(
        &self,
        id: u64,
        message: HubMessage,
    ) -> Option<oneshot::Receiver<VerdictReport>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.verifications).insert(id, tx);
        if self.outgoing.send(message).is_err() {
            lock(&self.verifications).remove(&id);
            return None;
        }
        Some(rx)
    }

    /// Routes a verdict.
    pub fn deliver_verdict(&self, id: u64, report: VerdictReport) {
        if let Some(tx) = lock(&self.verifications).remove(&id) {
            let _ = tx.send(report);
        }
    }

    /// Marks the provider alive now.
    pub fn touch(&self) {
        *lock(&self.last_seen) = Instant::now();
    }

    /// Jobs in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    fn alive(&self) -> bool {
        lock(&self.last_seen).elapsed() < DEAD_AFTER && !self.outgoing.is_closed()
    }

    /// Drops every waiting job and verification, which their waiters see as a lost provider.
    pub fn abandon_all(&self) {
        lock(&self.jobs).clear();
        lock(&self.verifications).clear();
        self.active.store(0, Ordering::Relaxed);
    }

    /// Sends any message.
    pub fn send(&self, message: HubMessage) -> bool {
        self.outgoing.send(message).is_ok()
    }
}

/// What the hub remembers about a provider across sessions (and, in the database, restarts).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    /// In [0, 1]; 0.5 for a new provider.
    pub reputation: f64,
    /// Jobs completed.
    pub jobs: u64,
    /// Tokens delivered.
    pub tokens: u64,
    /// Verifications of its jobs that passed.
    pub verified_passed: u64,
    /// Verifications of its jobs that failed.
    pub verified_failed: u64,
    /// Verifications it performed for others.
    pub verifications_done: u64,
    /// Micro-units slashed from it.
    pub slashed: u64,
    /// Quarantined providers are never scheduled nor asked to verify.
    pub quarantined: bool,
    /// Exponentially weighted time to first token, milliseconds.
    pub latency_ms: f64,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            reputation: NEW_REPUTATION,
            jobs: 0,
            tokens: 0,
            verified_passed: 0,
            verified_failed: 0,
            verifications_done: 0,
            slashed: 0,
            quarantined: false,
            latency_ms: 0.0,
        }
    }
}

/// One provider as `GET /v1/providers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderView {
    /// Address.
    pub address: Address,
    /// Whether a session is open.
    pub connected: bool,
    /// Model name.
    pub model: Option<String>,
    /// Model sha256.
    pub sha256: Option<String>,
    /// Price per token.
    pub price_per_token: Option<u64>,
    /// Jobs in flight.
    pub active_jobs: u32,
    /// The record.
    #[serde(flatten)]
    pub record: Record,
}

/// Live sessions and records.
#[derive(Default)]
pub struct Registry {
    live: RwLock<HashMap<Address, Arc<Connection>>>,
    records: Mutex<HashMap<Address, Record>>,
}

impl Registry {
    /// Adds a session, replacing an older one of the same provider.
    pub fn insert(&self, connection: Arc<Connection>) {
        lock(&self.records).entry(connection.address).or_default();
        let old = self
            .live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(connection.address, connection);
        if let Some(old) = old {
            old.abandon_all();
        }
    }

    /// Removes a session if it is still the current one of its provider.
    pub fn remove(&self, connection: &Connection) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        if live
            .get(&connection.address)
            .is_some_and(|c| c.id == connection.id)
        {
            live.remove(&connection.address);
        }
        connection.abandon_all();
    }

    /// Live connections.
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A provider's record (default if unknown).
    pub fn record(&self, address: Address) -> Record {
        lock(&self.records)
            .get(&address)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes a provider's record.
    pub fn update(&self, address: Address, f: impl FnOnce(&mut Record)) {
        f(lock(&self.records).entry(address).or_default());
    }

    /// Whether the provider is quarantined.
    pub fn quarantined(&self, address: Address) -> bool {
        lock(&self.records)
            .get(&address)
            .is_some_and(|r| r.quarantined)
    }

    /// Live, unquarantined providers of `model` (name or sha256) at or below `max_price`, best
    /// first. The score is the price inflated by load and latency and discounted by reputation:
    /// cheap, idle, fast, trusted providers win, and a busy one yields to the next.
    pub fn candidates(&self, model: &str, max_price: u64) -> Vec<Arc<Connection>> {
        let records = lock(&self.records);
        let mut ranked: Vec<(f64, Arc<Connection>)> = self
            .connections()
            .into_iter()
            .filter(|c| {
                (c.model_name == model || c.sha256 == model) && c.price <= max_price && c.alive()
            })
            .filter_map(|c| {
                let r = records.get(&c.address).cloned().unwrap_or_default();
                if r.quarantined {
                    return None;
                }
                let load = f64::from(c.active()) / f64::from(c.capacity);
                let score = (c.price as f64 + 1.0) * (1.0 + load) * (1.0 + r.latency_ms / 10_000.0)
                    / (0.5 + r.reputation);
                Some((score, c))
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        ranked.into_iter().map(|(_, c)| c).collect()
    }

    /// Whether any live provider serves `model` (at any price).
    pub fn serves(&self, model: &str) -> bool {
        self.connections()
            .iter()
            .any(|c| (c.model_name == model || c.sha256 == model) && !self.quarantined(c.address))
    }

    /// Live, unquarantined providers of the model `sha256`, except those in `exclude`, most
    /// trusted and least busy first: candidates to verify a job.
    pub fn verifiers(&self, sha256: &str, exclude: &[Address]) -> Vec<Arc<Connection>> {
        let records = lock(&self.records);
        let mut v: Vec<(f64, Arc<Connection>)> = self
            .connections()
            .into_iter()
            .filter(|c| c.sha256 == sha256 && !exclude.contains(&c.address) && c.alive())
            .filter_map(|c| {
                let r = records.get(&c.address).cloned().unwrap_or_default();
                (!r.quarantined).then(|| (r.reputation - f64::from(c.active()) * 0.01, c))
            })
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// Every provider ever seen, for the API.
    pub fn views(&self) -> Vec<ProviderView> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        let records = lock(&self.records).clone();
        let mut views: Vec<ProviderView> = records
            .into_iter()
            .map(|(address, record)| {
                let c = live.get(&address);
                ProviderView {
                    address,
                    connected: c.is_some(),
                    model: c.map(|c| c.model_name.clone()),
                    sha256: c.map(|c| c.sha256.clone()),
                    price_per_token: c.map(|c| c.price),
                    active_jobs: c.map_or(0, |c| c.active()),
                    record,
                }
            })
            .collect();
        views.sort_by_key(|v| v.address);
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(
        registry: &Registry,
        id: u64,
        price: u64,
    ) -> (Arc<Connection>, mpsc::UnboundedReceiver<HubMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let address = Address::with_last_byte(id as u8);
        let c = Arc::new(Connection::new(
            id,
            address,
            "m".into(),
            "sha".into(),
            price,
            2,
            1024,
            tx,
        ));
        registry.insert(c.clone());
        (c, rx)
    }

    #[test]
    fn candidates_rank_by_price_load_and_reputation_and_skip_quarantined() {
        let registry = Registry::default();
        let (cheap, _a) = provider(&registry, 1, 5);
        let (dear, _b) = provider(&registry, 2, 10);
        let (banned, _c) = provider(&registry, 3, 1);
        registry.update(banned.address, |r| r.quarantined = true);
        let order: Vec<u64> = registry
            .candidates("m", u64::MAX)
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(order, vec![cheap.id, dear.id]);
        // Busy at capacity, the cheap one yields.
        cheap.start_job(
            100,
            tessera_wire::JobRequest {
                messages: vec![],
                prompt: None,
                max_tokens: 1,
                sampling: Default::default(),
                stop: vec![],
            },
        );
        cheap.start_job(
            101,
            tessera_wire::JobRequest {
                messages: vec![],
                prompt: None,
                max_tokens: 1,
                sampling: Default::default(),
                stop: vec![],
            },
        );
        assert_eq!(registry.candidates("m", u64::MAX)[0].id, dear.id);
        // max_price filters, and an unknown model has no candidates.
        assert!(registry.candidates("m", 4).is_empty());
        assert!(registry.candidates("other", u64::MAX).is_empty());
        assert!(registry.serves("m") && !registry.serves("other"));
    }

    #[test]
    fn verifiers_exclude_the_checked_provider_and_the_quarantined() {
        let registry = Registry::default();
        let (a, _a) = provider(&registry, 1, 5);
        let (b, _b) = provider(&registry, 2, 5);
        let (c, _c) = provider(&registry, 3, 5);
        registry.update(c.address, |r| r.quarantined = true);
        let v: Vec<u64> = registry
            .verifiers("sha", &[a.address])
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(v, vec![b.id]);
        assert!(registry
            .verifiers("sha", &[a.address, b.address])
            .is_empty());
    }

    #[test]
    fn a_lost_session_ends_its_jobs() {
        let registry = Registry::default();
        let (a, _rx) = provider(&registry, 1, 5);
        let mut events = a
            .start_job(
                7,
                tessera_wire::JobRequest {
                    messages: vec![],
                    prompt: None,
                    max_tokens: 1,
                    sampling: Default::default(),
                    stop: vec![],
                },
            )
            .expect("sent");
        assert!(a.deliver(7, JobEvent::Token("x".into())));
        registry.remove(&a);
        assert!(matches!(events.try_recv(), Ok(JobEvent::Token(_))));
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(registry.connections().is_empty());
    }
}
