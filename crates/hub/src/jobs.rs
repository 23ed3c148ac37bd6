//! A job's life on the hub: admission (escrow of the maximum cost), dispatch with retries before
//! the first token, the token stream, settlement and the verification sampler.
//!
//! Money: the hub holds `max_tokens × the highest candidate price` (never above the request's
//! `max_price`), captures `tokens delivered × the serving provider's price` (fee included) and
//! releases the rest. A job picked for verification is settled only once its verdict is in: on a
//! pass it is captured as usual, on a (confirmed) failure the whole escrow is refunded and the
//! provider's stake is slashed, shared between the verifier, the agent and the treasury.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_protocol::Address;
use tessera_wire::{FailureKind, HubMessage, JobRequest, JobResult};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::inc;
use crate::registry::{Connection, JobEvent, VerdictReport};
use crate::Hub;

/// Providers tried before a job is given up.
const MAX_ATTEMPTS: usize = 3;
/// How long a verifier may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(180);

/// An admitted job: its escrow is held.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Prefix of every idempotency key of this job; also its public id.
    pub key: String,
    /// The paying agent.
    pub agent: Address,
    /// The ledger escrow; `None` under `--fast-settle`, where the hub reserves the maximum in
    /// memory and settles in one group-committed ledger transaction at the end.
    pub escrow_id: Option<i64>,
    /// Micro-units held.
    pub held: u64,
    /// When the request arrived.
    pub started: Instant,
}

/// A job whose provider has produced its first event.
pub struct Running {
    /// The ticket.
    pub ticket: Ticket,
    /// The serving provider.
    pub provider: Arc<Connection>,
    /// The job's id on that provider's session.
    pub job: u64,
    first: Option<JobEvent>,
    events: mpsc::UnboundedReceiver<JobEvent>,
}

/// What a finished (or broken) stream produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Text streamed.
    pub text: String,
    /// Token events received.
    pub delivered: u64,
    /// The provider's result, when it finished.
    pub result: Option<JobResult>,
    /// Why it broke, when it did.
    pub error: Option<String>,
}

/// What the agent is told about money and checking.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Micro-units charged (or to be charged once verification passes).
    pub cost: u64,
    /// `none`, `pending` (settled after the verdict) or `skipped` (no other provider).
    pub verification: &'static str,
}

impl Hub {
    /// Finds candidates and escrows the job's maximum cost.
    pub async fn admit(
        &self,
        agent: Address,
        model: &str,
        request: &JobRequest,
        max_price: u64,
    ) -> Result<(Ticket, Vec<Arc<Connection>>), ApiError> {
        let candidates = self.registry.candidates(model, max_price);
        if candidates.is_empty() {
            return Err(if self.registry.serves(model) {
                ApiError::unavailable(
                    "no_provider_within_max_price",
                    format!("No provider of `{model}` is free at or below max_price {max_price}."),
                )
            } else {
                ApiError::model_not_found(model)
            });
        }
        let context = candidates
            .iter()
            .map(|c| c.context_length)
            .min()
            .unwrap_or(0);
        if request.max_tokens > context {
            return Err(ApiError {
                param: Some("max_tokens"),
                ..ApiError::invalid("context_length_exceeded", format!("max_tokens is {} but this model's maximum context length is {context} tokens.", request.max_tokens))
            });
        }
        let price_cap = candidates.iter().map(|c| c.price).max().unwrap_or(0);
        let held = u64::from(request.max_tokens)
            .saturating_mul(price_cap)
            .max(1);
        let key = format!(
            "job-{}-{}",
            self.run_id,
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let quota = |needed: u64, available: u64| {
            ApiError::insufficient_quota(format!("Your balance of {available} micro-units cannot cover this request's maximum cost of {needed}."))
        };
        let escrow_id = if self.config.fast_settle {
            // The cached balance is a lower bound (this hub is the only debitor in this mode and
            // subtracts what it settles), so it can admit without a database read; when it is not
            // enough, the database has the final word.
            let reserve = |balance: u64| {
                let mut reserved = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
                let mine = reserved.entry(agent).or_insert(0);
                if balance < *mine + held {
                    return Err(balance.saturating_sub(*mine));
                }
                *mine += held;
                Ok(())
            };
            let cached = self
                .fast_balances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&agent)
                .copied();
            if cached.is_none_or(|b| reserve(b).is_err()) {
                let balance = match self.ledger.balance(agent).await {
                    Ok(b) => b,
                    Err(tessera_ledger::Error::UnknownAccount(_)) => 0,
                    Err(e) => return Err(ApiError::internal(e)),
                };
                self.fast_balances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(agent, balance);
                reserve(balance).map_err(|available| quota(held, available))?;
            }
            None
        } else {
            let escrow = self
                .ledger
                .hold(&format!("{key}:hold"), agent, held)
                .await
                .map_err(|e| match e {
                    tessera_ledger::Error::InsufficientFunds {
                        needed, available, ..
                    } => quota(needed, available),
                    tessera_ledger::Error::UnknownAccount(_) => {
                        ApiError::insufficient_quota("Your account has no balance; fund it first.")
                    }
                    other => ApiError::internal(other),
                })?;
            Some(escrow.value.escrow_id)
        };
        let ticket = Ticket {
            key,
            agent,
            escrow_id,
            held,
            started: Instant::now(),
        };

        tracing::debug!(job = %ticket.key, %agent, model, held, "job admitted");
        Ok((ticket, candidates))
    }

    /// Returns a ticket's escrow in full.
    pub async fn refund(&self, ticket: &Ticket) {
        let Some(escrow_id) = ticket.escrow_id else {
            return self.unreserve(ticket);
        };
        match self
            .ledger
            .release(&format!("{}:release", ticket.key), escrow_id)
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(job = %ticket.key, error = %e, "refund failed; the escrow stays open until the next start")
            }
        }
    }

    /// Lowers the cached balance of a `--fast-settle` agent by what was just debited.
    fn debited(&self, agent: Address, amount: u64) {
        if let Some(b) = self
            .fast_balances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&agent)
        {
            *b = b.saturating_sub(amount);
        }
    }

    /// Drops a `--fast-settle` reservation.
    fn unreserve(&self, ticket: &Ticket) {
        let mut reserved = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = reserved.get_mut(&ticket.agent) {
            *r = r.saturating_sub(ticket.held);
            if *r == 0 {
                reserved.remove(&ticket.agent);
            }
        }
    }

    /// Forgets a verified job's row once its escrow is closed.
    async fn verified(&self, ticket: &Ticket) {
        if let Err(e) = self.store.job_closed(&ticket.key).await {
            tracing::error!(job = %ticket.key, error = %e, "forgetting a verified job failed");
        }
    }

    /// Sends the job to the best candidate that answers; retries elsewhere while no token has
    /// been produced. Refunds the escrow when every candidate fails.
    pub async fn dispatch(
        &self,
        ticket: Ticket,
        candidates: Vec<Arc<Connection>>,
        request: &JobRequest,
    ) -> Result<Running, ApiError> {
        let timeout = Duration::from_secs(self.config.first_token_timeout_secs);
        for (attempt, provider) in candidates.into_iter().take(MAX_ATTEMPTS).enumerate() {
            if attempt > 0 {
                inc(&self.metrics.retries);
            }
            let job = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(mut events) = provider.start_job(job, request.clone()) else {
                continue;
            };
            let sent = Instant::now();
            match tokio::time::timeout(timeout, events.recv()).await {
                Ok(Some(first @ (JobEvent::Token(_) | JobEvent::Done(_)))) => {
                    let ms = sent.elapsed().as_secs_f64() * 1e3;
                    self.registry.update(provider.address, |r| {
                        r.latency_ms = if r.latency_ms == 0.0 {
                            ms
                        } else {
                            0.8 * r.latency_ms + 0.2 * ms
                        }
                    });
                    tracing::debug!(job = %ticket.key, provider = %provider.address, first_token_ms = ms as u64, "job started");
                    return Ok(Running {
                        ticket,
                        provider,
                        job,
                        first: Some(first),
                        events,
                    });
                }
                Ok(Some(JobEvent::Failed(FailureKind::ContextLength, message))) => {
                    self.refund(&ticket).await;
                    return Err(ApiError {
                        param: Some("messages"),
                        ..ApiError::invalid("context_length_exceeded", message)
                    });
                }
                Ok(Some(JobEvent::Failed(kind, message))) => {
                    tracing::warn!(job = %ticket.key, provider = %provider.address, ?kind, %message, "provider failed before the first token; retrying elsewhere");
                }
                Ok(None) => {
                    tracing::warn!(job = %ticket.key, provider = %provider.address, "provider lost before the first token; retrying elsewhere")
                }
                Err(_) => {
                    tracing::warn!(job = %ticket.key, provider = %provider.address, "no first token in time; retrying elsewhere")
                }
            }
            provider.cancel_job(job);
        }
        self.refund(&ticket).await;
        inc(&self.metrics.jobs_failed);
        Err(ApiError::unavailable(
            "provider_unavailable",
            "No provider could serve the request; nothing was charged.",
        ))
    }
}

impl Running {
    /// Consumes the job's events, passing each token's text to `on_text`; `on_text` returning
    /// `false` (the agent went away) cancels the job on the provider.
    pub async fn drive(&mut self, mut on_text: impl FnMut(&str) -> bool) -> Outcome {
        let mut outcome = Outcome::default();
        loop {
            let event = match self.first.take() {
                Some(e) => Some(e),
                None => self.events.recv().await,
            };
            match event {
                Some(JobEvent::Token(text)) => {
                    outcome.delivered += 1;
                    outcome.text.push_str(&text);
                    if !on_text(&text) {
                        self.provider.cancel_job(self.job);
                        outcome.error = Some("the client disconnected".into());
                        return outcome;
                    }
                }
                Some(JobEvent::Done(result)) => {
                    outcome.result = Some(*result);
                    return outcome;
                }
                Some(JobEvent::Failed(_, message)) => {
                    outcome.error = Some(message);
                    return outcome;
                }
                None => {
                    outcome.error = Some("the provider disconnected mid-generation".into());
                    return outcome;
                }
            }
        }
    }
}

impl Hub {
    /// Settles a job that produced `charged_tokens` the agent received, and decides whether to
    /// verify it. Verification settles later, in the background.
    pub async fn conclude(
        self: &Arc<Self>,
        running: Running,
        request: JobRequest,
        outcome: &Outcome,
        charged_tokens: u64,
    ) -> Charge {
        let Running {
            mut ticket,
            provider,
            ..
        } = running;
        let cost = charged_tokens
            .saturating_mul(provider.price)
            .min(ticket.held);
        self.metrics
            .observe_latency(ticket.started.elapsed().as_secs_f64());
        self.metrics
            .completion_tokens
            .fetch_add(charged_tokens, std::sync::atomic::Ordering::Relaxed);
        self.registry.update(provider.address, |r| {
            r.jobs += 1;
            r.tokens += charged_tokens;
        });
        if let Some(result) = &outcome.result {
            inc(&self.metrics.jobs_completed);
            self.metrics.prompt_tokens.fetch_add(
                u64::from(result.prompt_tokens),
                std::sync::atomic::Ordering::Relaxed,
            );
            let reputation = self.registry.record(provider.address).reputation;
            // New and low-reputation providers are checked more often: p·(2 − reputation).
            let p = (self.config.verify_probability * (2.0 - reputation)).clamp(0.0, 1.0);
            let sampled = p > 0.0 && rand::random::<f64>() < p;
            if sampled
                && !self
                    .registry
                    .verifiers(&provider.sha256, &[provider.address])
                    .is_empty()
            {
                if ticket.escrow_id.is_none() {
                    // --fast-settle: the verdict takes a while, so the cost goes into a real escrow.
                    match self
                        .ledger
                        .hold(&format!("{}:hold", ticket.key), ticket.agent, cost.max(1))
                        .await
                    {
                        Ok(escrow) => {
                            self.debited(ticket.agent, cost.max(1));
                            self.unreserve(&ticket);
                            ticket.escrow_id = Some(escrow.value.escrow_id);
                            ticket.held = cost.max(1);
                        }
                        Err(e) => {
                            tracing::error!(job = %ticket.key, error = %e, "escrow for verification failed")
                        }
                    }
                }
                if let Some(escrow_id) = ticket.escrow_id {
                    if let Err(e) = self
                        .store
                        .job_verifying(&ticket.key, escrow_id, ticket.agent, provider.address, cost)
                        .await
                    {
                        tracing::error!(job = %ticket.key, error = %e, "recording a pending verification failed");
                    }
                }
                let hub = self.clone();
                let result = result.clone();
                tokio::spawn(
                    async move { hub.verify(ticket, provider, request, result, cost).await },
                );
                return Charge {
                    cost,
                    verification: "pending",
                };
            }
            if sampled {
                inc(&self.metrics.verifications_skipped);
            }
            self.settle(&ticket, &provider, cost).await;
            return Charge {
                cost,
                verification: if sampled { "skipped" } else { "none" },
            };
        }
        inc(&self.metrics.jobs_failed);
        tracing::warn!(job = %ticket.key, provider = %provider.address, error = ?outcome.error, charged_tokens, "job broke off");
        self.settle(&ticket, &provider, cost).await;
        Charge {
            cost,
            verification: "none",
        }
    }

    async fn settle(&self, ticket: &Ticket, provider: &Connection, cost: u64) {
        let settled = match ticket.escrow_id {
            Some(escrow_id) => {
                self.ledger
                    .finish(
                        &format!("{}:finish", ticket.key),
                        escrow_id,
                        provider.address,
                        cost,
                    )
                    .await
            }
            None => {
                // One group-committed transaction: hold, capture and release of exactly the cost.
                let r = if cost == 0 {
                    Ok(tessera_ledger::Receipt {
                        tx_id: 0,
                        replayed: false,
                        value: tessera_ledger::Settlement {
                            escrow_id: None,
                            paid: 0,
                            fee: 0,
                            refunded: 0,
                        },
                    })
                } else {
                    self.ledger
                        .settle(
                            &format!("{}:settle", ticket.key),
                            ticket.agent,
                            provider.address,
                            cost,
                            cost,
                        )
                        .await
                };
                if r.is_ok() {
                    self.debited(ticket.agent, cost);
                }
                self.unreserve(ticket);
                r
            }
        };
        match settled {
            Ok(receipt) => {
                self.metrics
                    .captured
                    .fetch_add(cost, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(job = %ticket.key, provider = %provider.address, paid = receipt.value.paid, fee = receipt.value.fee, refunded = receipt.value.refunded, "job settled");
            }
            Err(e) => {
                tracing::error!(job = %ticket.key, error = %e, "settlement failed; the escrow stays open")
            }
        }
    }

    async fn ask(
        &self,
        verifier: &Connection,
        request: &JobRequest,
        result: &JobResult,
    ) -> Option<VerdictReport> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let message = HubMessage::Verify {
            id,
            request: request.clone(),
            output_tokens: result.output_tokens.clone(),
            commitment: result.commitment.clone(),
        };
        let rx = verifier.start_verification(id, message)?;
        let report = tokio::time::timeout(VERIFY_TIMEOUT, rx).await.ok()?.ok()?;
        self.registry
            .update(verifier.address, |r| r.verifications_done += 1);
        report.error.is_none().then_some(report)
    }

    /// Has another provider check the job, then settles it: capture on a pass, refund and slash
    /// on a failure. A failure is confirmed by a second verifier when one exists, so one lying or
    /// broken verifier cannot get an honest provider slashed; a verifier contradicted this way
    /// loses reputation instead.
    async fn verify(
        self: Arc<Self>,
        ticket: Ticket,
        provider: Arc<Connection>,
        request: JobRequest,
        result: JobResult,
        cost: u64,
    ) {
        let Some(first) = self
            .registry
            .verifiers(&provider.sha256, &[provider.address])
            .into_iter()
            .next()
        else {
            inc(&self.metrics.verifications_skipped);
            {
                self.settle(&ticket, &provider, cost).await;
                return self.verified(&ticket).await;
            }
        };
        let Some(verdict) = self.ask(&first, &request, &result).await else {
            tracing::warn!(job = %ticket.key, verifier = %first.address, "verification inconclusive");
            inc(&self.metrics.verifications_skipped);
            {
                self.settle(&ticket, &provider, cost).await;
                return self.verified(&ticket).await;
            }
        };
        let mut failed = !verdict.passed;
        if failed {
            if let Some(second) = self
                .registry
                .verifiers(&provider.sha256, &[provider.address, first.address])
                .into_iter()
                .next()
            {
                if let Some(confirmation) = self.ask(&second, &request, &result).await {
                    if confirmation.passed {
                        tracing::warn!(job = %ticket.key, verifier = %first.address, confirmed_by = %second.address, "a failed verification was contradicted; the verifier loses reputation");
                        self.registry.update(first.address, |r| r.reputation *= 0.5);
                        self.persist_record(first.address).await;
                        failed = false;
                    }
                }
            }
        }
        if !failed {
            inc(&self.metrics.verifications_passed);
            self.registry.update(provider.address, |r| {
                r.verified_passed += 1;
                r.reputation += (1.0 - r.reputation) * 0.1;
            });
            if verdict.passed {
                // A verifier that agreed gains a little; one contradicted lost half above.
                self.registry.update(first.address, |r| {
                    r.reputation += (1.0 - r.reputation) * 0.02
                });
            }
            self.persist_record(provider.address).await;
            tracing::info!(job = %ticket.key, provider = %provider.address, verifier = %first.address, "verification passed");
            {
                self.settle(&ticket, &provider, cost).await;
                return self.verified(&ticket).await;
            }
        }
        inc(&self.metrics.verifications_failed);
        tracing::warn!(job = %ticket.key, provider = %provider.address, verifier = %first.address, reason = ?verdict.reason, "verification FAILED: refunding, slashing, quarantining");
        self.registry.update(provider.address, |r| {
            r.verified_failed += 1;
            r.reputation = 0.0;
            r.quarantined = true;
        });
        self.persist_record(provider.address).await;
        self.refund(&ticket).await;
        self.verified(&ticket).await;
        match self
            .ledger
            .slash(
                &format!("{}:slash", ticket.key),
                provider.address,
                self.config.slash_amount,
                Some(first.address),
                Some(ticket.agent),
            )
            .await
        {
            Ok(receipt) => {
                inc(&self.metrics.slashes);
                self.metrics
                    .slashed
                    .fetch_add(receipt.value.slashed, std::sync::atomic::Ordering::Relaxed);
                self.registry
                    .update(provider.address, |r| r.slashed += receipt.value.slashed);
                self.persist_record(provider.address).await;
                tracing::warn!(job = %ticket.key, provider = %provider.address, slashed = receipt.value.slashed, to_verifier = receipt.value.to_verifier, to_agent = receipt.value.to_agent, "provider slashed");
            }
            Err(e) => {
                tracing::error!(job = %ticket.key, provider = %provider.address, error = %e, "slash failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HubConfig;
    use tessera_proof::{CommitmentBuilder, Finish, JobSpec};
    use tessera_wire::SamplingParams;

    /// A provider session whose verifications answer `verdict`.
    fn fake(hub: &Hub, id: u8, price: u64, verdict: bool) -> Arc<Connection> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = Arc::new(Connection::new(
            u64::from(id),
            Address::with_last_byte(id),
            "m".into(),
            "sha".into(),
            price,
            4,
            1024,
            tx,
        ));
        hub.registry.insert(c.clone());
        let session = c.clone();
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if let HubMessage::Verify { id, .. } = message {
                    session.deliver_verdict(
                        id,
                        VerdictReport {
                            passed: verdict,
                            reason: None,
                            error: None,
                        },
                    );
                }
            }
        });
        c
    }

    async fn setup() -> (Arc<Hub>, tempfile::TempDir, Address) {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = Hub::open(HubConfig::dev(format!(
            "sqlite://{}",
            dir.path().join("hub.db").display()
        )))
        .await
        .expect("hub");
        let faucet = hub.ledger.faucet().expect("dev");
        let agent = Address::with_last_byte(200);
        faucet.mint("agent", agent, 1_000).await.expect("mint");
        for id in 1..=3u8 {
            let a = Address::with_last_byte(id);
            faucet
                .mint(&format!("p{id}"), a, 1_000_000)
                .await
                .expect("mint");
            hub.ledger
                .stake(&format!("s{id}"), a, 1_000_000)
                .await
                .expect("stake");
        }
        (hub, dir, agent)
    }

    fn job() -> (JobRequest, JobResult) {
        let request = JobRequest {
            messages: vec![],
            prompt: Some("x".into()),
            max_tokens: 4,
            sampling: SamplingParams::greedy(),
            stop: vec![],
        };
        let spec = JobSpec {
            model_sha256: "sha".into(),
            prompt_tokens: vec![1],
            sampling: SamplingParams::greedy(),
            max_tokens: 4,
            stop: vec![],
        };
        let commitment = CommitmentBuilder::new(spec).finish(Finish::Length);
        let result = JobResult {
            prompt_tokens: 1,
            output_tokens: vec![],
            text: String::new(),
            finish: Finish::Length,
            commitment,
        };
        (request, result)
    }

    #[tokio::test]
    async fn a_lying_verifier_is_outvoted_and_the_honest_provider_paid() {
        let (hub, _dir, agent) = setup().await;
        let provider = fake(&hub, 1, 10, true);
        let liar = fake(&hub, 2, 10, false);
        let _honest = fake(&hub, 3, 10, true);
        // The liar is asked first.
        hub.registry.update(liar.address, |r| r.reputation = 0.9);
        let (request, result) = job();
        let (ticket, _) = hub
            .admit(agent, "m", &request, u64::MAX)
            .await
            .expect("admitted");
        hub.clone()
            .verify(ticket, provider.clone(), request, result, 40)
            .await;
        assert!(!hub.registry.record(provider.address).quarantined);
        assert_eq!(
            hub.ledger.staked(provider.address).await.expect("stake"),
            1_000_000
        );
        assert_eq!(
            hub.ledger.balance(provider.address).await.expect("paid"),
            38
        );
        assert!((hub.registry.record(liar.address).reputation - 0.45).abs() < 1e-9);
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn a_confirmed_failure_refunds_slashes_and_quarantines() {
        let (hub, _dir, agent) = setup().await;
        let provider = fake(&hub, 1, 10, true);
        let _first = fake(&hub, 2, 10, false);
        let _second = fake(&hub, 3, 10, false);
        let (request, result) = job();
        let (ticket, _) = hub
            .admit(agent, "m", &request, u64::MAX)
            .await
            .expect("admitted");
        hub.clone()
            .verify(ticket, provider.clone(), request, result, 40)
            .await;
        let record = hub.registry.record(provider.address);
        assert!(record.quarantined && record.slashed == 1_000_000);
        assert_eq!(hub.ledger.staked(provider.address).await.expect("stake"), 0);
        // Refunded in full, plus 30% of the slash; the verifier that caught it gets 20%.
        assert_eq!(
            hub.ledger.balance(agent).await.expect("agent"),
            1_000 + 300_000
        );
        assert!(hub
            .registry
            .candidates("m", u64::MAX)
            .iter()
            .all(|c| c.address != provider.address));
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }
}
