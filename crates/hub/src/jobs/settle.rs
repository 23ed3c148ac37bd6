//! Settlement: the agent pays for the tokens it received at the serving provider's price (prompt
//! tokens at the prompt price), the protocol takes its fee, the rest of the hold is refunded. A
//! job sampled for verification, finished or broken off alike, is settled once its verdict is in.

use std::sync::Arc;

use tessera_protocol::Address;
use tessera_types::VerificationStatus;

use crate::jobs::dispatch::{End, Outcome, Running};
use crate::jobs::verify::Claimed;
use crate::jobs::Hold;
use crate::metrics::inc;
use crate::Hub;

/// What the agent is told about money and checking.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Micro-units charged (or to be charged once verification passes).
    pub cost: u64,
    /// Where the job stands with verification.
    pub verification: VerificationStatus,
}

impl Hub {
    /// Settles a job from what its stream produced, and decides whether to verify it.
    /// Verification settles later, in the background.
    pub async fn conclude(self: &Arc<Self>, running: Running, outcome: &Outcome) -> Charge {
        let (id, provider, model) = (
            running.key().to_owned(),
            running.provider.address,
            running.provider.model.name.clone(),
        );
        let charge = self.settle_outcome(running, outcome).await;
        self.activity.job(crate::activity::JobEntry {
            id,
            at: crate::now_secs(),
            provider,
            model,
            tokens: outcome.tokens.len() as u64,
            cost: charge.cost,
            verification: charge.verification.as_str().to_owned(),
            label: None,
        });
        charge
    }

    async fn settle_outcome(self: &Arc<Self>, mut running: Running, outcome: &Outcome) -> Charge {
        let provider = running.provider.clone();
        let request = running.request.clone();
        let Some(mut hold) = running.take_hold() else {
            return Charge {
                cost: 0,
                verification: VerificationStatus::None,
            };
        };
        drop(running);
        self.metrics.observe_latency(hold.1.elapsed().as_secs_f64());
        let hold_ref = &mut hold.0;
        if let End::Violation(why) = &outcome.end {
            inc(&self.metrics.jobs_failed);
            tracing::warn!(job = %hold_ref.key, provider = %provider.address, %why, "protocol violation: nothing paid, provider quarantined");
            self.registry.update(provider.address, |r| {
                r.quarantined = true;
                r.reputation = 0.0;
            });
            self.persist_record(provider.address).await;
            self.refund(hold_ref).await;
            return Charge {
                cost: 0,
                verification: VerificationStatus::None,
            };
        }
        let completion = outcome.tokens.len() as u64;
        let cost = self
            .cost(
                self.job_price(provider.price, hold_ref.tier),
                completion,
                outcome.billed_prompt_tokens,
            )
            .unwrap_or(u64::MAX)
            .min(hold_ref.held);
        // A session key's policy counts what was charged, not the maximum held at admission.
        if let Some(r) = hold_ref.policy.take() {
            self.policies.settle(&r, cost).await;
        }
        self.metrics
            .completion_tokens
            .fetch_add(completion, std::sync::atomic::Ordering::Relaxed);
        self.metrics.prompt_tokens.fetch_add(
            outcome.billed_prompt_tokens,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.registry.update(provider.address, |r| {
            r.jobs += 1;
            r.tokens += completion;
            r.revenue += cost;
        });
        if matches!(outcome.end, End::Finished(_)) {
            inc(&self.metrics.jobs_completed);
        } else {
            inc(&self.metrics.jobs_failed);
            tracing::warn!(job = %hold_ref.key, provider = %provider.address, end = ?outcome.end, completion, "job broke off; the delivered tokens are paid, and checked like any job");
        }
        let claimed = Claimed {
            request,
            output_tokens: outcome.tokens.clone(),
            commitment: outcome.commitment.clone(),
            partial: outcome.partial(),
            prompt_tokens: outcome.prompt_tokens,
            logprobs: outcome.logprobs.clone(),
        };
        if completion > 0 {
            self.offer_canary(&provider, &claimed, cost);
        }
        let reputation = self.registry.record(provider.address).reputation;
        // New and low-reputation providers are checked more often: p·(2 − reputation).
        let p = self.verify_probability_for(reputation);
        let sampled = completion > 0 && p > 0.0 && rand::random::<f64>() < p;
        if sampled && self.registry.verifiable(&provider, hold_ref.agent) {
            if hold_ref.escrow_id.is_none() {
                // --fast-settle: the verdict takes a while, so the cost goes into a real escrow.
                match self
                    .ledger
                    .hold(
                        &format!("{}:hold", hold_ref.key),
                        hold_ref.agent,
                        cost.max(1),
                    )
                    .await
                {
                    Ok(escrow) => {
                        self.debited(hold_ref.agent, cost.max(1));
                        self.unreserve(hold_ref);
                        hold_ref.escrow_id = Some(escrow.value.escrow_id);
                        hold_ref.held = cost.max(1);
                    }
                    Err(e) => {
                        tracing::error!(job = %hold_ref.key, error = %e, "escrow for verification failed")
                    }
                }
            }
            if let Some(escrow_id) = hold_ref.escrow_id {
                if let Err(e) = self
                    .store
                    .job_verifying(
                        &hold_ref.key,
                        escrow_id,
                        hold_ref.agent,
                        provider.address,
                        cost,
                    )
                    .await
                {
                    tracing::error!(job = %hold_ref.key, error = %e, "recording a pending verification failed");
                }
            }
            let hub = self.clone();
            let hold = hold.0;
            tokio::spawn(async move { hub.verify(hold, provider, claimed, cost).await });
            return Charge {
                cost,
                verification: VerificationStatus::Pending,
            };
        }
        if sampled {
            inc(&self.metrics.verifications_skipped);
        }
        self.settle(hold_ref, provider.address, cost).await;
        Charge {
            cost,
            verification: if sampled {
                VerificationStatus::Skipped
            } else {
                VerificationStatus::None
            },
        }
    }

    /// Captures `cost` of a hold for `provider` and releases the rest.
    pub(crate) async fn settle(&self, hold: &Hold, provider: Address, cost: u64) {
        let settled = match hold.escrow_id {
            Some(escrow_id) => {
                self.ledger
                    .finish(&format!("{}:finish", hold.key), escrow_id, provider, cost)
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
                            &format!("{}:settle", hold.key),
                            hold.agent,
                            provider,
                            cost,
                            cost,
                        )
                        .await
                };
                if r.is_ok() {
                    self.debited(hold.agent, cost);
                }
                self.unreserve(hold);
                r
            }
        };
        match settled {
            Ok(receipt) => {
                self.metrics
                    .captured
                    .fetch_add(cost, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(job = %hold.key, %provider, paid = receipt.value.paid, fee = receipt.value.fee, refunded = receipt.value.refunded, "job settled");
            }
            Err(e) => {
                tracing::error!(job = %hold.key, error = %e, "settlement failed; the escrow stays open")
            }
        }
    }
}

impl Hub {
    /// Refunds a job whose agent received nothing (a non-streaming request whose provider broke
    /// off): nothing is paid, so there is nothing to check.
    pub async fn abandon(&self, mut running: Running) {
        if let Some((hold, _)) = running.take_hold() {
            inc(&self.metrics.jobs_failed);
            self.refund(&hold).await;
        }
    }
}
