//! The provider registry and the scheduler.
//!
//! A [`Connection`] is a live WebSocket session of one provider; its [`Record`] (reputation,
//! counters, quarantine) is kept by address so it survives reconnects. The scheduler ranks the
//! live, unquarantined providers of a model that have a free slot by price, load, measured
//! latency and reputation. Verifiers are drawn at random, weighted by stake, among the other
//! eligible providers of the same file: a provider cannot predict (or arrange) who checks it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use tessera_protocol::Address;
use tessera_types::{FailureKind, Finish, TokenLogprobs, Verdict};
use tessera_wire::HubMessage;
use tokio::sync::{mpsc, oneshot};

use crate::catalog::ModelEntry;

/// A provider is considered dead when it has sent nothing (heartbeats included) for this long.
const DEAD_AFTER: Duration = Duration::from_secs(30);
/// Starting reputation of a new provider, in [0, 1].
const NEW_REPUTATION: f64 = 0.5;

/// What a provider streams back for one job.
#[derive(Debug)]
pub enum JobEvent {
    /// A token id, the half-float bits of its committed values, and its log-probabilities when
    /// the job asked for them.
    Token(u32, [u16; 5], Option<TokenLogprobs>),
    /// The job finished.
    Done {
        /// Prompt tokens under the template, as the provider counts them.
        prompt_tokens: u32,
        /// sha256 of the prompt tokens.
        prompt_hash: String,
        /// Why it ended.
        finish: Finish,
    },
    /// The job failed or was refused.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// Detail.
        message: String,
        /// sha256 of the prompt tokens, when known.
        prompt_hash: Option<String>,
    },
}

/// One live provider session.
pub struct Connection {
    /// Session id (unique per hub process).
    pub id: u64,
    /// The provider's address, recovered from its signed registration.
    pub address: Address,
    /// The model it serves, from the hub's catalog (by the sha256 it signed).
    pub model: Arc<ModelEntry>,
    /// Price per generated token, micro-units.
    pub price: u64,
    /// Concurrent jobs advertised.
    pub capacity: u32,
    /// Stake held when it registered (lowered when slashed), micro-units.
    pub stake: AtomicU64,
    /// The engine the provider reports running (`tessera-engine 0.1.0`), or empty.
    pub engine: String,
    outgoing: mpsc::UnboundedSender<HubMessage>,
    jobs: Mutex<HashMap<u64, mpsc::Sender<JobEvent>>>,
    scores: Mutex<HashMap<u64, oneshot::Sender<Verdict>>>,
    active: AtomicU32,
    scoring: AtomicU32,
    last_seen: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Largest capacity a provider may advertise.
pub const MAX_CAPACITY: u32 = 256;

impl Connection {
    /// A new session that sends on `outgoing`.
    pub fn new(
        id: u64,
        address: Address,
        model: Arc<ModelEntry>,
        price: u64,
        capacity: u32,
        stake: u64,
        outgoing: mpsc::UnboundedSender<HubMessage>,
    ) -> Self {
        Self {
            id,
            address,
            model,
            price,
            capacity: capacity.clamp(1, MAX_CAPACITY),
            stake: AtomicU64::new(stake),
            engine: String::new(),
            outgoing,
            jobs: Mutex::default(),
            scores: Mutex::default(),
            active: AtomicU32::new(0),
            scoring: AtomicU32::new(0),
            last_seen: Mutex::new(Instant::now()),
        }
    }

    /// Names the engine the provider reports (capped, as it is unsigned and echoed to agents).
    pub fn with_engine(mut self, engine: String) -> Self {
        self.engine = engine
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(64)
            .collect();
        self
    }

    /// The `system_fingerprint` of this provider's responses: the model file's sha256 (first 16
    /// hex digits) and the engine's version.
    pub fn fingerprint(&self) -> String {
        let sha = self.model.sha256.get(..16).unwrap_or(&self.model.sha256);
        let engine = if self.engine.is_empty() {
            "unknown-engine".to_owned()
        } else {
            self.engine.replace(' ', "-")
        };
        format!("fp_{sha}_{engine}")
    }

    /// Sends a job; its events arrive on the returned receiver (bounded: a provider that floods
    /// a job with more events than it may produce loses the job), which ends when the provider
    /// disconnects.
    pub fn start_job(
        &self,
        job: u64,
        request: tessera_types::JobRequest,
    ) -> Option<mpsc::Receiver<JobEvent>> {
        let (tx, rx) = mpsc::channel(request.max_tokens as usize + 4);
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

    /// Routes a provider's job event; `false` if nobody waits for that job (or the provider sent
    /// more than the job can hold, which ends the job).
    pub fn deliver(&self, job: u64, event: JobEvent) -> bool {
        let done = !matches!(event, JobEvent::Token(..));
        let delivered = match lock(&self.jobs).get(&job) {
            Some(tx) => tx.try_send(event).is_ok(),
            None => false,
        };
        if done || !delivered {
            self.end_job(job);
        }
        delivered
    }

    /// Sends a scoring request; the verdict arrives on the returned receiver.
    pub fn start_score(&self, id: u64, message: HubMessage) -> Option<oneshot::Receiver<Verdict>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.scores).insert(id, tx);
        self.scoring.fetch_add(1, Ordering::Relaxed);
        if self.outgoing.send(message).is_err() {
            self.end_score(id);
            return None;
        }
        Some(rx)
    }

    fn end_score(&self, id: u64) {
        if lock(&self.scores).remove(&id).is_some() {
            self.scoring.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Routes a verdict.
    pub fn deliver_verdict(&self, id: u64, verdict: Verdict) {
        let waiter = lock(&self.scores).remove(&id);
        if let Some(tx) = waiter {
            self.scoring.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(verdict);
        }
    }

    /// Forgets a scoring request nobody waits for any more (timed out).
    pub fn abandon_score(&self, id: u64) {
        self.end_score(id);
    }

    /// Marks the provider alive now.
    pub fn touch(&self) {
        *lock(&self.last_seen) = Instant::now();
    }

    /// Jobs in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Jobs and checks in flight.
    pub fn load(&self) -> u32 {
        self.active() + self.scoring.load(Ordering::Relaxed)
    }

    fn alive(&self) -> bool {
        lock(&self.last_seen).elapsed() < DEAD_AFTER && !self.outgoing.is_closed()
    }

    /// Drops every waiting job and verification, which their waiters see as a lost provider.
    pub fn abandon_all(&self) {
        lock(&self.jobs).clear();
        lock(&self.scores).clear();
        self.active.store(0, Ordering::Relaxed);
        self.scoring.store(0, Ordering::Relaxed);
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
    /// Micro-units earned from jobs (before the protocol fee).
    #[serde(default)]
    pub revenue: u64,
    /// Verifications of its jobs that passed.
    pub verified_passed: u64,
    /// Verifications of its jobs that failed.
    pub verified_failed: u64,
    /// Verifications it performed for others.
    pub verifications_done: u64,
    /// Known-answer checks it answered right.
    #[serde(default)]
    pub canaries_passed: u64,
    /// Known-answer checks it answered wrong (each slashed).
    #[serde(default)]
    pub canaries_failed: u64,
    /// Micro-units earned as verification fees.
    #[serde(default)]
    pub verify_fees: u64,
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
            revenue: 0,
            verified_passed: 0,
            verified_failed: 0,
            verifications_done: 0,
            canaries_passed: 0,
            canaries_failed: 0,
            verify_fees: 0,
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
    /// Stake at registration (less slashes since).
    pub stake: Option<u64>,
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

    /// The live session of a provider.
    pub fn connection(&self, address: Address) -> Option<Arc<Connection>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&address)
            .cloned()
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

    /// Live, unquarantined providers of the model `sha256` (any price, any load).
    fn serving(&self, sha256: &str) -> Vec<Arc<Connection>> {
        let records = lock(&self.records);
        self.connections()
            .into_iter()
            .filter(|c| {
                c.model.sha256 == sha256
                    && c.alive()
                    && !records.get(&c.address).is_some_and(|r| r.quarantined)
            })
            .collect()
    }

    /// Whether a provider's jobs could be checked: another live provider of the same file
    /// exists that is neither it nor `agent`.
    pub fn verifiable(&self, provider: &Connection, agent: Address) -> bool {
        self.serving(&provider.model.sha256)
            .iter()
            .any(|c| c.address != provider.address && c.address != agent)
    }

    /// Live, unquarantined providers of the model `sha256` at or below `max_price` with a free
    /// slot, best first (only verifiable ones unless `allow_unverified`). The score is the price
    /// inflated by load and latency and discounted by reputation: cheap, idle, fast, trusted
    /// providers win, and a busy one yields to the next.
    pub fn candidates(
        &self,
        sha256: &str,
        max_price: u64,
        agent: Address,
        allow_unverified: bool,
    ) -> Vec<Arc<Connection>> {
        self.ranked(sha256, max_price, agent, allow_unverified, true)
    }

    /// Whether providers that fit are only busy (a request may wait for a free slot).
    pub fn all_busy(
        &self,
        sha256: &str,
        max_price: u64,
        agent: Address,
        allow_unverified: bool,
    ) -> bool {
        !self
            .ranked(sha256, max_price, agent, allow_unverified, false)
            .is_empty()
    }

    fn ranked(
        &self,
        sha256: &str,
        max_price: u64,
        agent: Address,
        allow_unverified: bool,
        free_slot: bool,
    ) -> Vec<Arc<Connection>> {
        let serving = self.serving(sha256);
        let records = lock(&self.records);
        let mut ranked: Vec<(f64, Arc<Connection>)> = serving
            .iter()
            .filter(|c| {
                c.price <= max_price
                    && (!free_slot || c.active() < c.capacity)
                    && c.address != agent
            })
            .filter(|c| {
                allow_unverified
                    || serving
                        .iter()
                        .any(|v| v.address != c.address && v.address != agent)
            })
            .map(|c| {
                let r = records.get(&c.address).cloned().unwrap_or_default();
                let load = f64::from(c.active()) / f64::from(c.capacity);
                let score = (c.price as f64 + 1.0) * (1.0 + load) * (1.0 + r.latency_ms / 10_000.0)
                    / (0.5 + r.reputation);
                (score, c.clone())
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        ranked.into_iter().map(|(_, c)| c).collect()
    }

    /// Whether any live, unquarantined provider serves the model `sha256`.
    pub fn serves(&self, sha256: &str) -> bool {
        !self.serving(sha256).is_empty()
    }

    /// Eligible verifiers of a job on the model `sha256`: live, unquarantined, holding stake,
    /// not overloaded, and not in `exclude` (the checked provider, the agent, earlier verifiers).
    pub fn eligible_verifiers(&self, sha256: &str, exclude: &[Address]) -> Vec<Arc<Connection>> {
        let serving = self.serving(sha256);
        let records = lock(&self.records);
        serving
            .into_iter()
            .filter(|c| {
                !exclude.contains(&c.address)
                    && records
                        .get(&c.address)
                        .is_none_or(|r| r.reputation >= crate::jobs::verify::SIDELINED_BELOW)
                    && c.stake.load(Ordering::Relaxed) > 0
                    && c.load() < c.capacity.saturating_mul(2)
            })
            .collect()
    }

    /// One verifier drawn at random among the eligible, with probability proportional to stake.
    pub fn draw_verifier(&self, sha256: &str, exclude: &[Address]) -> Option<Arc<Connection>> {
        let pool = self.eligible_verifiers(sha256, exclude);
        let total: u128 = pool
            .iter()
            .map(|c| u128::from(c.stake.load(Ordering::Relaxed)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut pick = rand::rng().random_range(0..total);
        for c in pool {
            let w = u128::from(c.stake.load(Ordering::Relaxed));
            if pick < w {
                return Some(c);
            }
            pick -= w;
        }
        None
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
                    model: c.map(|c| c.model.name.clone()),
                    sha256: c.map(|c| c.model.sha256.clone()),
                    price_per_token: c.map(|c| c.price),
                    stake: c.map(|c| c.stake.load(Ordering::Relaxed)),
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

    fn model() -> Arc<ModelEntry> {
        Arc::new(ModelEntry {
            name: "m".into(),
            sha256: "sha".into(),
            context_length: 1024,
            vocab: Arc::default(),
        })
    }

    fn provider(
        registry: &Registry,
        id: u64,
        price: u64,
        stake: u64,
    ) -> (Arc<Connection>, mpsc::UnboundedReceiver<HubMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let address = Address::with_last_byte(id as u8);
        let c = Arc::new(Connection::new(id, address, model(), price, 2, stake, tx));
        registry.insert(c.clone());
        (c, rx)
    }

    fn request() -> tessera_types::JobRequest {
        tessera_types::JobRequest {
            tools: Vec::new(),
            messages: vec![],
            prompt: None,
            max_tokens: 1,
            sampling: Default::default(),
            stop: vec![],
            logprobs: None,
        }
    }

    const NOBODY: Address = Address::ZERO;

    #[test]
    fn candidates_rank_by_price_load_and_reputation_and_skip_quarantined() {
        let registry = Registry::default();
        let (cheap, _a) = provider(&registry, 1, 5, 10);
        let (dear, _b) = provider(&registry, 2, 10, 10);
        let (banned, _c) = provider(&registry, 3, 1, 10);
        registry.update(banned.address, |r| r.quarantined = true);
        let order: Vec<u64> = registry
            .candidates("sha", u64::MAX, NOBODY, false)
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(order, vec![cheap.id, dear.id]);
        // At capacity, the cheap one is not scheduled at all.
        cheap.start_job(100, request());
        cheap.start_job(101, request());
        let order: Vec<u64> = registry
            .candidates("sha", u64::MAX, NOBODY, false)
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(order, vec![dear.id]);
        // max_price filters, and an unknown model has no candidates.
        assert!(registry.candidates("sha", 4, NOBODY, false).is_empty());
        assert!(registry
            .candidates("other", u64::MAX, NOBODY, false)
            .is_empty());
        assert!(registry.serves("sha") && !registry.serves("other"));
    }

    #[test]
    fn finding_1_a_provider_no_one_can_verify_is_not_scheduled() {
        let registry = Registry::default();
        let (alone, _a) = provider(&registry, 1, 5, 10);
        assert!(registry
            .candidates("sha", u64::MAX, NOBODY, false)
            .is_empty());
        assert!(!registry.verifiable(&alone, NOBODY));
        assert_eq!(registry.candidates("sha", u64::MAX, NOBODY, true).len(), 1);
        // The agent itself is no verifier of the provider it hires.
        let (other, _b) = provider(&registry, 2, 5, 10);
        assert!(registry
            .candidates("sha", u64::MAX, other.address, false)
            .is_empty());
        assert_eq!(registry.candidates("sha", u64::MAX, NOBODY, false).len(), 2);
    }

    #[test]
    fn finding_4_verifiers_are_drawn_by_stake_never_the_provider_or_the_agent() {
        let registry = Registry::default();
        let (checked, _a) = provider(&registry, 1, 5, 1_000);
        let (small, _b) = provider(&registry, 2, 5, 1_000);
        let (large, _c) = provider(&registry, 3, 5, 9_000);
        let (agent, _d) = provider(&registry, 4, 5, 1_000_000);
        let mut counts = HashMap::new();
        for _ in 0..4_000 {
            let v = registry
                .draw_verifier("sha", &[checked.address, agent.address])
                .expect("a verifier");
            *counts.entry(v.address).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 2, "only the two eligible: {counts:?}");
        let share = f64::from(counts[&large.address]) / 4_000.0;
        assert!((0.85..0.95).contains(&share), "stake-weighted, got {share}");
        assert!(counts[&small.address] > 0, "not always the same one");
        // Quarantined and stakeless providers are not eligible.
        registry.update(large.address, |r| r.quarantined = true);
        small.stake.store(0, Ordering::Relaxed);
        assert!(registry
            .draw_verifier("sha", &[checked.address, agent.address])
            .is_none());
    }

    #[test]
    fn a_lost_session_ends_its_jobs() {
        let registry = Registry::default();
        let (a, _rx) = provider(&registry, 1, 5, 10);
        let mut events = a.start_job(7, request()).expect("sent");
        assert!(a.deliver(7, JobEvent::Token(3, [0; 5], None)));
        registry.remove(&a);
        assert!(matches!(events.try_recv(), Ok(JobEvent::Token(3, ..))));
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(registry.connections().is_empty());
    }

    #[test]
    fn finding_9_a_provider_flooding_a_job_loses_it() {
        let registry = Registry::default();
        let (a, _rx) = provider(&registry, 1, 5, 10);
        let _events = a.start_job(7, request()).expect("sent");
        // max_tokens 1: room for the token, the end, and a little slack; then the job is gone.
        let sent = (0..100)
            .take_while(|_| a.deliver(7, JobEvent::Token(1, [0; 5], None)))
            .count();
        assert!(sent <= 5, "{sent} events accepted");
        assert_eq!(a.active(), 0);
    }
}
