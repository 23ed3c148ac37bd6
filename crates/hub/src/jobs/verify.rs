//! Verification: a paid duty with consequences.
//!
//! - **Who checks**: verifiers are drawn at random among the eligible providers of the same file,
//!   weighted by stake, never the checked provider or the paying agent; a provider cannot predict
//!   or arrange who checks it.
//! - **Paid**: a check whose verdict the outcome agrees with earns the verifier a fee
//!   (`verify_fee_bps` of the job's cost, at least one micro-unit) from the protocol's fees, so
//!   running the model is worth its cost and a lie earns nothing. A verifier whose reputation has
//!   fallen below [`SIDELINED_BELOW`] (outvoted again and again) is no longer asked.
//! - **Never slashed on one voice**: a "fail" is acted on only when a second, independent verifier
//!   confirms it (and fails outnumber passes); a disagreement asks further voices, and when none
//!   is to be had the job is re-checked later, and in the end settled unslashed.
//! - **Cross-checked passes**: a fraction of passes is asked of a second verifier too; two
//!   agreeing passes make the job a known-answer check.
//! - **Known-answer checks (canaries)**: with probability `canary_probability` a verifier also gets
//!   a job whose right verdict the hub knows: a confirmed pass, or a real job with one token
//!   replaced (which fails by construction). They arrive as the same `Score` message as any other
//!   work. A lazy verifier (always "pass") fails the tampered ones, a lying one (always "fail") the
//!   confirmed ones; a wrong answer to a canary is slashed and quarantines the verifier.
//! - **Dissent is tested at once**: a verifier outvoted or left unconfirmed is sent the kind of
//!   known-answer check that exposes its answer (a known pass after a lone "fail", a known fail
//!   after a lone "pass"); when the pool has none yet, it owes one and gets the next that is
//!   made. A liar cannot wait out the test by being sidelined first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tessera_ledger::SystemAccount;
use tessera_protocol::Address;
use tessera_types::commitment::hash_tokens;
use tessera_types::{Commitment, JobRequest, TokenLogprobs, Verdict};
use tessera_wire::HubMessage;

use crate::jobs::Hold;
use crate::metrics::inc;
use crate::registry::Connection;
use crate::store::JobVerdict;
use crate::Hub;

/// How long a verifier may take to answer.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(180);
/// Rounds (asks or waits, `verify_recheck_ms` apart) before an unresolved verification is
/// settled unslashed.
pub const MAX_ROUNDS: usize = 6;
/// Reputation below which a provider is no longer asked to verify.
pub const SIDELINED_BELOW: f64 = 0.05;
/// Known-answer checks kept per model and kind.
const POOL: usize = 16;

/// A claimed generation, as a verifier gets it.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job as the agent asked it.
    pub request: JobRequest,
    /// The tokens delivered.
    pub output_tokens: Vec<u32>,
    /// The commitment to them.
    pub commitment: Commitment,
    /// Broke off before finishing.
    pub partial: bool,
    /// Prompt tokens the provider claimed.
    pub prompt_tokens: Option<u32>,
    /// The log-probabilities reported to the agent, when it asked for them.
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

impl Claimed {
    fn message(&self, id: u64) -> HubMessage {
        HubMessage::Score {
            id,
            request: self.request.clone(),
            output_tokens: self.output_tokens.clone(),
            commitment: self.commitment.clone(),
            partial: self.partial,
            prompt_tokens: self.prompt_tokens,
            logprobs: self.logprobs.clone(),
        }
    }
}

/// A known-answer check.
#[derive(Debug, Clone)]
struct Canary {
    /// Whose job it came from (never sent back to it).
    provider: Address,
    claimed: Claimed,
    /// The cost of the job it came from (the verification fee is based on it).
    cost: u64,
    /// The right verdict.
    passes: bool,
}

/// Known passes and known fails of one model file.
type CanaryPools = (VecDeque<Canary>, VecDeque<Canary>);
/// Verifiers owed a known-answer check, and the verdict it must get right.
type Owed = Vec<(Arc<Connection>, bool)>;

/// Known-answer checks, per model file.
#[derive(Default)]
pub struct Canaries {
    pool: Mutex<HashMap<String, CanaryPools>>,
    /// Verifiers owed a check of a kind the pool did not have: (verifier, right verdict wanted).
    owed: Mutex<HashMap<String, Owed>>,
}

fn push(queue: &mut VecDeque<Canary>, canary: Canary) {
    if queue.len() >= POOL {
        queue.pop_front();
    }
    queue.push_back(canary);
}

impl Canaries {
    /// Makes a known-fail check out of a delivered job: one token in the middle replaced by
    /// another, the commitment re-bound to the new tokens. No honest check passes it: the
    /// replaced token is not the rule's choice and its committed value is another token's.
    pub fn offer(&self, provider: &Connection, claimed: &Claimed, cost: u64) {
        let vocab = provider.model.vocab.len() as u32;
        if claimed.output_tokens.len() < 2 || vocab < 2 {
            return;
        }
        let mut tampered = claimed.clone();
        let at = tampered.output_tokens.len() / 2;
        let old = tampered.output_tokens[at];
        let new = (old + rand::rng().random_range(1..vocab)) % vocab;
        tampered.output_tokens[at] = new;
        tampered.commitment.output_hash = hash_tokens(&tampered.output_tokens);
        let canary = Canary {
            provider: provider.address,
            claimed: tampered,
            cost,
            passes: false,
        };
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        push(
            &mut pool.entry(provider.model.sha256.clone()).or_default().1,
            canary,
        );
    }

    /// Keeps a job two verifiers passed as a known-pass check.
    fn confirmed(&self, sha256: &str, provider: Address, claimed: &Claimed, cost: u64) {
        let canary = Canary {
            provider,
            claimed: claimed.clone(),
            cost,
            passes: true,
        };
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        push(&mut pool.entry(sha256.to_owned()).or_default().0, canary);
    }

    /// A random known-answer check for a verifier (not from its own jobs): of the kind asked
    /// for (`Some(true)` a known pass), or else a known pass or fail, half and half when both
    /// exist.
    fn draw(&self, sha256: &str, verifier: Address, kind: Option<bool>) -> Option<Canary> {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let (passes, fails) = pool.get(sha256)?;
        let pick = |q: &VecDeque<Canary>| {
            let own: Vec<&Canary> = q.iter().filter(|c| c.provider != verifier).collect();
            (!own.is_empty()).then(|| own[rand::rng().random_range(0..own.len())].clone())
        };
        match kind {
            Some(true) => pick(passes),
            Some(false) => pick(fails),
            None => {
                let (a, b) = if rand::random::<bool>() {
                    (passes, fails)
                } else {
                    (fails, passes)
                };
                pick(a).or_else(|| pick(b))
            }
        }
    }

    /// Remembers that `verifier` owes a check whose right verdict is `passes`.
    fn owe(&self, sha256: &str, verifier: &Arc<Connection>, passes: bool) {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        let list = owed.entry(sha256.to_owned()).or_default();
        if !list
            .iter()
            .any(|(v, p)| v.address == verifier.address && *p == passes)
        {
            list.push((verifier.clone(), passes));
        }
    }

    /// The verifiers owed a check of this kind, forgotten as they are returned.
    fn take_owed(&self, sha256: &str, passes: bool) -> Vec<Arc<Connection>> {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = owed.get_mut(sha256) else {
            return Vec::new();
        };
        let (due, rest): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, p)| *p == passes);
        *list = rest;
        due.into_iter().map(|(v, _)| v).collect()
    }

    /// Checks in the pool: (known passes, known fails).
    pub fn counts(&self) -> (usize, usize) {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.values()
            .fold((0, 0), |(a, b), (p, f)| (a + p.len(), b + f.len()))
    }
}

impl Hub {
    /// Sends a scoring request and waits for the verdict; `None` if the verifier did not answer
    /// in time or could not check.
    async fn ask(&self, verifier: &Connection, claimed: &Claimed) -> Option<Verdict> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = verifier.start_score(id, claimed.message(id))?;
        let verdict = match tokio::time::timeout(VERIFY_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            _ => {
                verifier.abandon_score(id);
                tracing::warn!(verifier = %verifier.address, "a verifier did not answer in time");
                return None;
            }
        };
        if let Verdict::Inconclusive { error } = &verdict {
            tracing::warn!(verifier = %verifier.address, %error, "a verifier could not check");
            return None;
        }
        self.registry
            .update(verifier.address, |r| r.verifications_done += 1);
        Some(verdict)
    }

    /// Pays a verifier its fee from protocol fees (or the treasury when fees run short).
    async fn pay_verifier(&self, verifier: Address, job_cost: u64, key: &str) {
        let fee =
            (u128::from(job_cost) * u128::from(self.config.verify_fee_bps) / 10_000).max(1) as u64;
        for source in [SystemAccount::Fees, SystemAccount::Treasury] {
            match self.ledger.transfer(key, source, verifier, fee).await {
                Ok(_) => {
                    self.registry.update(verifier, |r| r.verify_fees += fee);
                    inc(&self.metrics.verify_fees_paid);
                    return;
                }
                Err(tessera_ledger::Error::InsufficientFunds { .. }) => continue,
                Err(e) => {
                    tracing::error!(%verifier, error = %e, "paying a verification fee failed");
                    return;
                }
            }
        }
        tracing::warn!(%verifier, fee, "no protocol money to pay a verification fee");
    }

    /// With probability `canary_probability`, also sends the verifier a known-answer check;
    /// a wrong answer is slashed.
    fn maybe_canary(self: &Arc<Self>, verifier: &Arc<Connection>) {
        if rand::random::<f64>() >= self.config.canary_probability {
            return;
        }
        self.send_canary(verifier);
    }

    /// Sends a verifier a known-answer check now (in the background).
    pub fn send_canary(self: &Arc<Self>, verifier: &Arc<Connection>) {
        if let Some(canary) = self
            .canaries
            .draw(&verifier.model.sha256, verifier.address, None)
        {
            self.spawn_canary(verifier, canary);
        }
    }

    fn spawn_canary(self: &Arc<Self>, verifier: &Arc<Connection>, canary: Canary) {
        let (hub, verifier) = (self.clone(), verifier.clone());
        tokio::spawn(async move { hub.run_canary(verifier, canary).await });
    }

    /// Tests a verifier whose answer the outcome did not agree with: with a known-answer check
    /// whose right verdict is `passes` (the opposite of its answer), now or as soon as the pool
    /// has one.
    fn test_dissenter(self: &Arc<Self>, verifier: &Arc<Connection>, passes: bool) {
        let sha = &verifier.model.sha256;
        match self.canaries.draw(sha, verifier.address, Some(passes)) {
            Some(canary) => self.spawn_canary(verifier, canary),
            None => self.canaries.owe(sha, verifier, passes),
        }
    }

    /// Keeps a delivered job, one token replaced, as a known-fail check (and sends it to
    /// verifiers owed one).
    pub(crate) fn offer_canary(
        self: &Arc<Self>,
        provider: &Connection,
        claimed: &Claimed,
        cost: u64,
    ) {
        self.canaries.offer(provider, claimed, cost);
        self.pay_owed(&provider.model.sha256, false);
    }

    /// Keeps a job two verifiers passed as a known-pass check (and sends it to verifiers owed
    /// one).
    fn keep_known_pass(
        self: &Arc<Self>,
        sha256: &str,
        provider: Address,
        claimed: &Claimed,
        cost: u64,
    ) {
        self.canaries.confirmed(sha256, provider, claimed, cost);
        self.pay_owed(sha256, true);
    }

    fn pay_owed(self: &Arc<Self>, sha256: &str, passes: bool) {
        for verifier in self.canaries.take_owed(sha256, passes) {
            if self.registry.quarantined(verifier.address) {
                continue;
            }
            self.test_dissenter(&verifier, passes);
        }
    }

    async fn run_canary(self: Arc<Self>, verifier: Arc<Connection>, canary: Canary) {
        let key = format!(
            "canary-{}-{}",
            self.run_id,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let Some(verdict) = self.ask(&verifier, &canary.claimed).await else {
            return;
        };
        inc(&self.metrics.canaries);
        if verdict.passed() == canary.passes {
            self.registry
                .update(verifier.address, |r| r.canaries_passed += 1);
            self.pay_verifier(verifier.address, canary.cost, &format!("{key}:fee"))
                .await;
            tracing::debug!(verifier = %verifier.address, "known-answer check answered right");
            return;
        }
        inc(&self.metrics.canaries_failed);
        tracing::warn!(verifier = %verifier.address, expected_pass = canary.passes, ?verdict, "a verifier answered a known-answer check WRONG: slashing, quarantining");
        self.registry.update(verifier.address, |r| {
            r.canaries_failed += 1;
            r.reputation = 0.0;
            r.quarantined = true;
        });
        self.slash_provider(&verifier, &format!("{key}:slash"), None, None)
            .await;
    }

    /// Takes the slash from a provider's stake (a share to `verifier` and `agent` if given).
    async fn slash_provider(
        &self,
        provider: &Connection,
        key: &str,
        verifier: Option<Address>,
        agent: Option<Address>,
    ) -> u64 {
        let to_agent = match self
            .ledger
            .slash(
                key,
                provider.address,
                self.config.slash_amount,
                verifier,
                agent,
            )
            .await
        {
            Ok(receipt) => {
                inc(&self.metrics.slashes);
                let slashed = receipt.value.slashed;
                self.metrics.slashed.fetch_add(slashed, Ordering::Relaxed);
                let _ = provider
                    .stake
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                        Some(s.saturating_sub(slashed))
                    });
                self.registry
                    .update(provider.address, |r| r.slashed += slashed);
                self.activity.slash(crate::activity::SlashEntry {
                    at: crate::now_secs(),
                    provider: provider.address,
                    amount: slashed,
                    reason: if agent.is_some() {
                        "failed a job check".into()
                    } else {
                        "failed a known-answer check".into()
                    },
                });
                tracing::warn!(provider = %provider.address, slashed, to_verifier = receipt.value.to_verifier, to_agent = receipt.value.to_agent, "provider slashed");
                receipt.value.to_agent
            }
            Err(e) => {
                tracing::error!(provider = %provider.address, error = %e, "slash failed");
                0
            }
        };
        self.persist_record(provider.address).await;
        to_agent
    }

    /// Has other providers check the job, then settles it: capture on a pass, refund and slash
    /// on a confirmed failure (see the module's rules).
    pub(crate) async fn verify(
        self: Arc<Self>,
        hold: Hold,
        provider: Arc<Connection>,
        claimed: Claimed,
        cost: u64,
    ) {
        let sha = provider.model.sha256.clone();
        let mut asked = vec![provider.address, hold.agent];
        let mut passes: Vec<Arc<Connection>> = Vec::new();
        let mut fails: Vec<(Arc<Connection>, String)> = Vec::new();
        let mut cross_check = rand::random::<f64>() < self.config.cross_check_probability;
        for _ in 0..MAX_ROUNDS {
            let needed = if !fails.is_empty() {
                // A fail stands only when confirmed and not outvoted.
                !(fails.len() >= 2 && fails.len() > passes.len()
                    || passes.len() >= 2 && passes.len() > fails.len())
            } else {
                passes.is_empty() || (cross_check && passes.len() < 2)
            };
            if !needed {
                break;
            }
            let Some(verifier) = self.registry.draw_verifier(&sha, &asked) else {
                // Nobody (else) to ask now: wait and re-check later.
                tokio::time::sleep(Duration::from_millis(self.config.verify_recheck_ms)).await;
                if passes.len() == 1 && fails.is_empty() {
                    // A cross-check that cannot happen now is not worth holding the money.
                    cross_check = false;
                }
                continue;
            };
            asked.push(verifier.address);
            self.maybe_canary(&verifier);
            match self.ask(&verifier, &claimed).await {
                Some(Verdict::Pass) => passes.push(verifier),
                Some(Verdict::Fail { reason }) => fails.push((verifier, reason)),
                Some(Verdict::Inconclusive { .. }) | None => {}
            }
        }
        let confirmed_fail = fails.len() >= 2 && fails.len() > passes.len();
        // Fees go to the voices the outcome agrees with: a lie earns nothing.
        let paid: Vec<Address> = if confirmed_fail {
            fails.iter().map(|(v, _)| v.address).collect()
        } else if fails.is_empty() || passes.len() > fails.len() {
            passes.iter().map(|v| v.address).collect()
        } else {
            Vec::new()
        };
        for v in paid {
            self.pay_verifier(v, cost, &format!("{}:fee:{v:#x}", hold.key))
                .await;
        }
        if !confirmed_fail {
            if passes.len() >= 2 && passes.len() > fails.len() {
                // Two or more agreeing passes that outnumber any fail: a known pass.
                self.keep_known_pass(&sha, provider.address, &claimed, cost);
            }
            if !fails.is_empty() {
                // Outvoted or unconfirmed: never slashed on one voice. The dissenters are tested.
                inc(&self.metrics.verifications_unconfirmed);
                tracing::warn!(job = %hold.key, fails = fails.len(), passes = passes.len(), "a failed verification was not confirmed; settled unslashed, dissenting verifiers get known-answer checks");
                for (v, _) in &fails {
                    self.registry.update(v.address, |r| r.reputation *= 0.5);
                    self.persist_record(v.address).await;
                    self.test_dissenter(v, true);
                }
            }
            if passes.is_empty() && fails.is_empty() {
                inc(&self.metrics.verifications_skipped);
                tracing::warn!(job = %hold.key, "no verifier answered; settled unchecked");
            } else {
                inc(&self.metrics.verifications_passed);
                self.registry.update(provider.address, |r| {
                    r.verified_passed += 1;
                    r.reputation += (1.0 - r.reputation) * 0.1;
                });
                for v in &passes {
                    self.registry
                        .update(v.address, |r| r.reputation += (1.0 - r.reputation) * 0.02);
                }
                self.persist_record(provider.address).await;
                tracing::info!(job = %hold.key, provider = %provider.address, passes = passes.len(), "verification passed");
            }
            // Settled without a confirmed failure: a pass only if some check passed.
            let verdict = if passes.is_empty() {
                JobVerdict::Unchecked
            } else {
                JobVerdict::Passed
            };
            self.record_verdict(&hold, provider.address, verdict).await;
            self.settle(&hold, provider.address, cost).await;
            return self.forget_verified(&hold).await;
        }
        inc(&self.metrics.verifications_failed);
        let (first, reason) = &fails[0];
        tracing::warn!(job = %hold.key, provider = %provider.address, verifier = %first.address, confirmations = fails.len(), %reason, "verification FAILED and confirmed: refunding, slashing, quarantining");
        self.registry.update(provider.address, |r| {
            r.verified_failed += 1;
            r.reputation = 0.0;
            r.quarantined = true;
        });
        for v in &passes {
            // Passed a job others confirmed failing: tested at once.
            self.registry.update(v.address, |r| r.reputation *= 0.5);
            self.test_dissenter(v, false);
        }
        self.record_verdict(&hold, provider.address, JobVerdict::Failed)
            .await;
        self.refund(&hold).await;
        self.forget_verified(&hold).await;
        let compensation = self
            .slash_provider(
                &provider,
                &format!("{}:slash", hold.key),
                Some(first.address),
                Some(hold.agent),
            )
            .await;
        if let Err(e) = self.store.job_compensated(&hold.key, compensation).await {
            tracing::error!(job = %hold.key, error = %e, "recording the agent's compensation failed");
        }
    }

    /// Records a verified job's verdict for `GET /v1/jobs/{id}`, before its open row is forgotten
    /// (so the job is always either pending or decided).
    async fn record_verdict(&self, hold: &Hold, provider: Address, verdict: JobVerdict) {
        if let Err(e) = self
            .store
            .job_verdict(&hold.key, hold.agent, provider, verdict)
            .await
        {
            tracing::error!(job = %hold.key, error = %e, "recording a verdict failed");
        }
        self.activity.verdict(&hold.key, verdict.as_str());
    }

    /// Forgets a verified job's row once its escrow is closed.
    async fn forget_verified(&self, hold: &Hold) {
        if let Err(e) = self.store.job_closed(&hold.key).await {
            tracing::error!(job = %hold.key, error = %e, "forgetting a verified job failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ModelEntry;
    use crate::HubConfig;
    use tessera_types::commitment::CommitmentBuilder;
    use tessera_types::{Finish, JobSpec, SamplingParams, Vocabulary};
    use tokio::sync::mpsc;

    /// How a fake verifier answers.
    #[derive(Clone, Copy)]
    enum Answers {
        /// Pass exactly the true outputs, fail anything else.
        Honest,
        /// Always pass without looking.
        Lazy,
        /// Always fail.
        Lying,
    }

    fn model() -> Arc<ModelEntry> {
        Arc::new(ModelEntry {
            name: "m".into(),
            sha256: "sha".into(),
            context_length: 1024,
            vocab: Arc::new(Vocabulary {
                tokens: (0..100u8).map(|b| vec![b'a' + b % 26]).collect(),
                control: vec![false; 100],
            }),
        })
    }

    const TRUTH: [u32; 4] = [1, 2, 3, 4];

    async fn setup(canary_probability: f64) -> (Arc<Hub>, tempfile::TempDir, Address) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config =
            HubConfig::dev(format!("sqlite://{}", dir.path().join("hub.db").display()));
        config.catalog.insert((*model()).clone());
        config.verify_recheck_ms = 0;
        config.cross_check_probability = 0.0;
        config.canary_probability = canary_probability;
        let hub = Hub::open(config).await.expect("hub");
        let faucet = hub.ledger.faucet().expect("dev");
        let agent = Address::with_last_byte(200);
        faucet.mint("agent", agent, 100_000).await.expect("mint");
        for id in 1..=4u8 {
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

    fn fake(hub: &Hub, id: u8, answers: Answers) -> Arc<Connection> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = Arc::new(Connection::new(
            u64::from(id),
            Address::with_last_byte(id),
            model(),
            10,
            4,
            1_000_000,
            tx,
        ));
        hub.registry.insert(c.clone());
        let session = c.clone();
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if let HubMessage::Score {
                    id, output_tokens, ..
                } = message
                {
                    let pass = match answers {
                        Answers::Honest => output_tokens == TRUTH,
                        Answers::Lazy => true,
                        Answers::Lying => false,
                    };
                    let verdict = if pass {
                        Verdict::Pass
                    } else {
                        Verdict::Fail {
                            reason: "mismatch".into(),
                        }
                    };
                    session.deliver_verdict(id, verdict);
                }
            }
        });
        c
    }

    fn claimed(tokens: &[u32]) -> Claimed {
        let request = JobRequest {
            tools: Vec::new(),
            messages: vec![],
            prompt: Some("x".into()),
            max_tokens: 4,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            logprobs: None,
        };
        let spec = JobSpec {
            model_sha256: "sha".into(),
            prompt_tokens: vec![1],
            sampling: SamplingParams::greedy(),
            max_tokens: 4,
            stop: vec![],
        };
        let mut b = CommitmentBuilder::new(spec);
        for &t in tokens {
            b.push_values(t, [1.0; 5]);
        }
        Claimed {
            request,
            output_tokens: tokens.to_vec(),
            commitment: b.finish(Finish::Length),
            partial: false,
            prompt_tokens: Some(1),
            logprobs: None,
        }
    }

    async fn hold(hub: &Arc<Hub>, agent: Address) -> Hold {
        let admitted = hub
            .admit(agent, "m", &claimed(&TRUTH).request, None)
            .await
            .expect("admitted");
        admitted.ticket.close()
    }

    #[tokio::test]
    async fn batch_jobs_pay_the_discount_and_yield_to_interactive_requests() {
        use crate::jobs::Tier;
        use std::sync::atomic::Ordering::SeqCst;
        let (hub, _dir, agent) = setup(0.0).await;
        let _a = fake(&hub, 1, Answers::Honest);
        let _b = fake(&hub, 2, Answers::Honest);
        let request = claimed(&TRUTH).request;
        // Providers ask 10; the batch tier pays half, so a bid of 6 finds them, interactively not.
        assert_eq!(hub.job_price(10, Tier::Batch), 5);
        assert!(hub.admit(agent, "m", &request, Some(6)).await.is_err());
        let batch = hub
            .admit_tier(agent, "m", &request, Some(6), Tier::Batch)
            .await
            .expect("batch admitted");
        let interactive = hub
            .admit(agent, "m", &request, Some(10))
            .await
            .expect("interactive admitted");
        assert_eq!(batch.ticket.hold().tier, Tier::Batch);
        assert!(
            batch.ticket.hold().held < interactive.ticket.hold().held,
            "the batch escrow is at the discounted price"
        );
        drop((batch, interactive));
        // While an interactive request waits for a slot, a batch job is not dispatched.
        hub.interactive_waiting.fetch_add(1, SeqCst);
        let waiting = {
            let hub = hub.clone();
            let request = request.clone();
            tokio::spawn(async move {
                hub.admit_tier(agent, "m", &request, Some(6), Tier::Batch)
                    .await
                    .map(|a| a.ticket.hold().tier)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the batch job held back");
        hub.interactive_waiting.fetch_sub(1, SeqCst);
        let tier = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once nothing interactive waits")
            .expect("task")
            .expect("admitted");
        assert_eq!(tier, Tier::Batch);
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    /// Verifies one honest job of `provider` and asserts that the network passed it.
    async fn verify_honest_job(hub: &Arc<Hub>, agent: Address, provider: &Arc<Connection>) {
        let hold = hold(hub, agent).await;
        let key = hold.key.clone();
        hub.clone()
            .verify(hold, provider.clone(), claimed(&TRUTH), 40)
            .await;
        assert!(matches!(
            hub.store.job_standing(&key).await.expect("standing"),
            Some(crate::store::JobStanding::Decided {
                verdict: JobVerdict::Passed,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn finding_4_one_lying_voice_never_slashes_an_honest_provider() {
        let (hub, _dir, agent) = setup(0.0).await;
        let provider = fake(&hub, 1, Answers::Honest);
        let liar = fake(&hub, 2, Answers::Lying);
        let _honest = fake(&hub, 3, Answers::Honest);
        // Verifiers are drawn at random: go on until the liar has been asked twice.
        let mut jobs = 0;
        while hub.registry.record(liar.address).verifications_done < 2 {
            assert!(jobs < 200, "the liar is never drawn");
            verify_honest_job(&hub, agent, &provider).await;
            jobs += 1;
        }
        assert!(!hub.registry.record(provider.address).quarantined);
        assert_eq!(
            hub.ledger.staked(provider.address).await.expect("stake"),
            1_000_000
        );
        assert_eq!(
            hub.ledger.balance(provider.address).await.expect("paid"),
            jobs * 38
        );
        assert!(
            hub.registry.record(liar.address).reputation < 0.5,
            "a dissenting voice loses reputation"
        );
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn finding_4_an_unconfirmed_fail_is_settled_unslashed() {
        // The only other provider lies; nobody can confirm it: re-checked, then settled.
        let (hub, _dir, agent) = setup(0.0).await;
        let provider = fake(&hub, 1, Answers::Honest);
        let _liar = fake(&hub, 2, Answers::Lying);
        let hold = hold(&hub, agent).await;
        hub.clone()
            .verify(hold, provider.clone(), claimed(&TRUTH), 40)
            .await;
        assert!(!hub.registry.record(provider.address).quarantined);
        assert_eq!(
            hub.ledger.staked(provider.address).await.expect("stake"),
            1_000_000
        );
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn finding_4_a_confirmed_failure_refunds_slashes_and_quarantines() {
        let (hub, _dir, agent) = setup(0.0).await;
        let cheater = fake(&hub, 1, Answers::Honest);
        let v1 = fake(&hub, 2, Answers::Honest);
        let v2 = fake(&hub, 3, Answers::Honest);
        let hold = hold(&hub, agent).await;
        let key = hold.key.clone();
        hub.store
            .job_verifying(&key, 0, agent, cheater.address, 40)
            .await
            .expect("open row");
        assert!(matches!(
            hub.store.job_standing(&key).await.expect("standing"),
            Some(crate::store::JobStanding::Pending { .. })
        ));
        hub.clone()
            .verify(hold, cheater.clone(), claimed(&[9, 9, 9, 9]), 40)
            .await;
        // What `GET /v1/jobs/{id}` shows the agent: failed, refunded, with its share of the slash.
        assert_eq!(
            hub.store.job_standing(&key).await.expect("standing"),
            Some(crate::store::JobStanding::Decided {
                agent,
                provider: cheater.address,
                verdict: JobVerdict::Failed,
                compensation: 300_000,
            })
        );
        let record = hub.registry.record(cheater.address);
        assert!(record.quarantined && record.slashed == 1_000_000);
        assert_eq!(hub.ledger.staked(cheater.address).await.expect("stake"), 0);
        // Refunded in full, plus 30% of the slash; the first verifier that caught it gets 20%.
        assert_eq!(
            hub.ledger.balance(agent).await.expect("agent"),
            100_000 + 300_000
        );
        let paid: u64 = [v1.address, v2.address]
            .iter()
            .map(|a| hub.registry.record(*a).verify_fees)
            .sum();
        let balances = hub.ledger.balance(v1.address).await.unwrap_or(0)
            + hub.ledger.balance(v2.address).await.unwrap_or(0);
        assert_eq!(
            balances,
            200_000 + paid,
            "one verifier's share, plus the fees paid"
        );
        assert!(hub
            .registry
            .candidates("sha", u64::MAX, agent, false)
            .iter()
            .all(|c| c.address != cheater.address));
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn finding_4_lazy_and_lying_verifiers_fail_known_answer_checks_and_are_slashed() {
        let (hub, _dir, agent) = setup(0.0).await;
        let provider = fake(&hub, 1, Answers::Honest);
        let lazy = fake(&hub, 2, Answers::Lazy);
        let liar = fake(&hub, 3, Answers::Lying);
        let honest = fake(&hub, 4, Answers::Honest);
        // A delivered job makes a known-fail check; two agreeing passes a known-pass one.
        hub.canaries.offer(&provider, &claimed(&TRUTH), 40);
        hub.canaries
            .confirmed("sha", provider.address, &claimed(&TRUTH), 40);
        for _ in 0..40 {
            for v in [&lazy, &liar, &honest] {
                if !hub.registry.quarantined(v.address) {
                    hub.send_canary(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for cheat in [&lazy, &liar] {
            let r = hub.registry.record(cheat.address);
            assert!(
                r.quarantined && r.canaries_failed >= 1 && r.slashed == 1_000_000,
                "{r:?}"
            );
        }
        let r = hub.registry.record(honest.address);
        assert!(
            !r.quarantined && r.canaries_failed == 0 && r.canaries_passed > 0,
            "{r:?}"
        );
        assert_eq!(
            hub.ledger.staked(honest.address).await.expect("stake"),
            1_000_000
        );
        let _ = agent;
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn finding_4_a_liar_dissenting_before_any_known_pass_exists_is_still_caught() {
        // The pool holds only known fails (which a liar answers right); the liar's lone "fail"
        // is left unconfirmed. It owes a known-pass check and gets the first one that is made.
        let (hub, _dir, agent) = setup(0.0).await;
        let provider = fake(&hub, 1, Answers::Honest);
        let liar = fake(&hub, 2, Answers::Lying);
        let _honest = fake(&hub, 3, Answers::Honest);
        hub.canaries.offer(&provider, &claimed(&TRUTH), 40);
        let mut jobs = 0;
        while hub.registry.record(liar.address).verifications_done == 0 {
            assert!(jobs < 200, "the liar is never drawn");
            verify_honest_job(&hub, agent, &provider).await;
            jobs += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = hub.registry.record(liar.address);
        assert!(
            !r.quarantined && r.canaries_failed == 0,
            "no known pass yet: {r:?}"
        );
        hub.keep_known_pass("sha", provider.address, &claimed(&TRUTH), 40);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = hub.registry.record(liar.address);
        assert!(
            r.quarantined && r.canaries_failed == 1 && r.slashed == 1_000_000,
            "{r:?}"
        );
        assert!(!hub.registry.record(provider.address).quarantined);
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }

    #[tokio::test]
    async fn finding_4_verifiers_are_paid_per_check() {
        let (hub, _dir, agent) = setup(0.0).await;
        let provider = fake(&hub, 1, Answers::Honest);
        let verifier = fake(&hub, 2, Answers::Honest);
        // Protocol fees exist once a job has settled.
        for _ in 0..3 {
            let earlier = hold(&hub, agent).await;
            hub.settle(&earlier, provider.address, 200).await;
        }
        let before = hub.ledger.balance(verifier.address).await.expect("balance");
        let hold = hold(&hub, agent).await;
        hub.clone()
            .verify(hold, provider.clone(), claimed(&TRUTH), 40)
            .await;
        let fee = hub.registry.record(verifier.address).verify_fees;
        assert_eq!(fee, 16, "40% of the job's 40");
        assert_eq!(
            hub.ledger.balance(verifier.address).await.expect("balance"),
            before + fee
        );
        assert!(hub.ledger.audit().await.expect("audit").is_clean());
    }
}
