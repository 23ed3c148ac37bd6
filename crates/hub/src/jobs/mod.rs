//! A job's life on the hub: admission (escrow of the maximum cost), dispatch with retries before
//! the first token and the token stream ([`dispatch`]), settlement ([`settle`]) and the
//! verification protocol ([`verify`]).
//!
//! Money: the hub holds the most the job can cost at the highest price among the candidates it
//! will try (never above the request's `max_price`, or the hub's default ceiling when it names
//! none): `max_tokens` generated tokens plus an upper bound of the prompt's tokens at the prompt
//! price. It captures what was delivered at the serving provider's price (fee included) and
//! releases the rest. Every admitted job holds a [`Ticket`]; a ticket dropped before it is
//! settled (the agent hung up, the handler was cancelled) refunds its escrow by itself.

pub mod dispatch;
pub mod settle;
pub mod verify;

use std::sync::Arc;
use std::time::Instant;

use tessera_protocol::Address;
use tessera_types::JobRequest;

use crate::catalog::ModelEntry;
use crate::error::ApiError;
use crate::registry::Connection;
use crate::Hub;

/// Providers tried before a job is given up.
pub const MAX_ATTEMPTS: usize = 3;
/// Tokens a chat template may add around the messages (role markers, a default system prompt),
/// plus a few per message: with the prompt's bytes, an upper bound of its token count.
pub const TEMPLATE_TOKENS: usize = 96;
/// How long a request waits for a free slot when every provider that fits is at capacity.
pub const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Template tokens per message.
pub const TEMPLATE_TOKENS_PER_MESSAGE: usize = 8;
/// How long a batch job waits for idle capacity.
pub const BATCH_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// How a job is scheduled and priced.
///
/// **The batch rule.** A batch job (OpenAI's `service_tier: "flex"`) is dispatched only when a
/// provider that fits has a free slot *and* no interactive request is waiting for one; it waits
/// for that (up to [`BATCH_QUEUE_WAIT`]) otherwise, so interactive requests always go first.
/// It pays `batch_price_bps` of the serving provider's price, and its `max_price` is a bid
/// against that discounted price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tier {
    /// Served first, at the provider's price.
    #[default]
    Interactive,
    /// Served on idle capacity, at a discount.
    Batch,
}

/// What an admitted job's escrow is.
#[derive(Debug, Clone)]
pub struct Hold {
    /// Prefix of every idempotency key of this job; also its public id.
    pub key: String,
    /// The paying agent.
    pub agent: Address,
    /// The ledger escrow; `None` under `--fast-settle`, where the hub reserves the maximum in
    /// memory and settles in one group-committed ledger transaction at the end.
    pub escrow_id: Option<i64>,
    /// Micro-units held.
    pub held: u64,
    /// Its tier (the price it pays).
    pub tier: Tier,
    /// What a session key's spending policy counts for it, settled with the job.
    pub policy: Option<crate::policy::Reservation>,
}

/// An admitted job: its escrow is held until the ticket is settled, or refunded when the ticket
/// is dropped unsettled.
pub struct Ticket {
    hub: Arc<Hub>,
    hold: Option<Hold>,
    /// When the request arrived.
    pub started: Instant,
}

impl Ticket {
    /// The job's key (its public id).
    pub fn key(&self) -> &str {
        &self.hold().key
    }

    /// The escrow.
    pub fn hold(&self) -> &Hold {
        self.hold.as_ref().expect("an open ticket has its hold")
    }

    /// Takes the hold out: the caller now settles or refunds it.
    pub(crate) fn close(mut self) -> Hold {
        self.hold.take().expect("an open ticket has its hold")
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        tracing::info!(job = %hold.key, "job abandoned before settlement; refunding");
        let hub = self.hub.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { hub.refund(&hold).await });
            }
            Err(_) => {
                tracing::error!(job = %hold.key, "no runtime to refund on; the escrow stays open until the next start")
            }
        }
    }
}

/// An admitted job and where it may run.
pub struct Admitted {
    /// The escrow.
    pub ticket: Ticket,
    /// Providers to try, best first.
    pub candidates: Vec<Arc<Connection>>,
    /// The model.
    pub model: Arc<ModelEntry>,
    /// The most prompt tokens this request can have.
    pub prompt_bound: u32,
}

impl Hub {
    /// What a job costs: generated tokens at the provider's price, prompt tokens at
    /// `prompt_price_bps` of it (rounded up).
    pub fn cost(&self, price: u64, completion_tokens: u64, prompt_tokens: u64) -> Option<u64> {
        let completion = u128::from(completion_tokens) * u128::from(price);
        let prompt = (u128::from(prompt_tokens)
            * u128::from(price)
            * u128::from(self.config.prompt_price_bps))
        .div_ceil(10_000);
        u64::try_from(completion + prompt).ok()
    }

    /// What a job of `tier` pays per token on a provider asking `price`.
    pub fn job_price(&self, price: u64, tier: Tier) -> u64 {
        match tier {
            Tier::Interactive => price,
            Tier::Batch => {
                let bps = u128::from(self.config.batch_price_bps);
                u64::try_from((u128::from(price) * bps).div_ceil(10_000)).unwrap_or(u64::MAX)
            }
        }
    }

    /// Finds candidates and escrows the job's maximum cost (an interactive job).
    pub async fn admit(
        self: &Arc<Self>,
        agent: Address,
        model: &str,
        request: &JobRequest,
        max_price: Option<u64>,
    ) -> Result<Admitted, ApiError> {
        self.admit_under(agent, model, request, max_price, None, Tier::Interactive)
            .await
    }

    /// Finds candidates for a job of `tier` and escrows its maximum cost.
    pub async fn admit_tier(
        self: &Arc<Self>,
        agent: Address,
        model: &str,
        request: &JobRequest,
        max_price: Option<u64>,
        tier: Tier,
    ) -> Result<Admitted, ApiError> {
        self.admit_under(agent, model, request, max_price, None, tier)
            .await
    }

    /// [`Hub::admit_tier`] for a session key's `grant`: only its providers, and its
    /// per-request, per-day and total caps counted before anything is held.
    pub async fn admit_under(
        self: &Arc<Self>,
        agent: Address,
        model: &str,
        request: &JobRequest,
        max_price: Option<u64>,
        grant: Option<&crate::policy::Grant>,
        tier: Tier,
    ) -> Result<Admitted, ApiError> {
        let Some(entry) = self.config.catalog.lookup(model) else {
            return Err(ApiError::model_not_found(model));
        };
        let bid = max_price.unwrap_or(self.config.default_max_price);
        // The dearest provider whose price for this tier is within the bid.
        let max_price = match tier {
            Tier::Interactive => bid,
            Tier::Batch => u64::try_from(
                u128::from(bid) * 10_000 / u128::from(self.config.batch_price_bps.max(1)),
            )
            .unwrap_or(u64::MAX),
        };
        let allow = self.config.allow_unverified;
        let free = |hub: &Self| {
            let candidates = hub
                .registry
                .candidates(&entry.sha256, max_price, agent, allow);
            // A batch job takes a free slot only when no interactive request waits for one.
            if tier == Tier::Batch
                && hub
                    .interactive_waiting
                    .load(std::sync::atomic::Ordering::SeqCst)
                    > 0
            {
                return Vec::new();
            }
            candidates
        };
        let mut candidates = free(self);
        // Every provider that fits is at capacity: wait a while for a free slot.
        let queued = Instant::now();
        let (wait, _waiting) = match tier {
            Tier::Interactive => (QUEUE_WAIT, Some(Waiting::new(self))),
            Tier::Batch => (BATCH_QUEUE_WAIT, None),
        };
        while candidates.is_empty()
            && queued.elapsed() < wait
            && self
                .registry
                .all_busy(&entry.sha256, max_price, agent, allow)
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            candidates = free(self);
        }
        if let Some(g) = grant {
            let before = candidates.len();
            candidates.retain(|c| g.allows_provider(c.address));
            if before > 0 && candidates.is_empty() {
                return Err(crate::policy::breach(
                    "providers",
                    format!(
                        "The spending policy allows only the providers {:?}, and none of them serves `{model}` now.",
                        g.policy.providers
                    ),
                ));
            }
        }
        let messages = request.messages.len().max(1);
        let prompt_bound =
            request.prompt_bytes() + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages;
        let prompt_bound = u32::try_from(prompt_bound).unwrap_or(u32::MAX);
        // A registrant whose price makes the job's maximum cost overflow can never be paid: it
        // is left out, so it cannot break the request for everyone else.
        candidates.retain(|c| {
            self.cost(
                self.job_price(c.price, tier),
                u64::from(request.max_tokens),
                u64::from(prompt_bound),
            )
            .is_some()
        });
        candidates.truncate(MAX_ATTEMPTS);
        if candidates.is_empty() {
            return Err(if !self.registry.serves(&entry.sha256) {
                ApiError::model_not_found(model)
            } else if !self
                .registry
                .candidates(&entry.sha256, max_price, agent, true)
                .is_empty()
            {
                ApiError::unavailable(
                    "no_verifiable_provider",
                    format!("No provider of `{model}` can be verified by another right now, so none is scheduled."),
                )
            } else {
                ApiError::unavailable(
                    "no_provider_within_max_price",
                    format!("No provider of `{model}` is free at or below max_price {max_price}."),
                )
            });
        }
        if request.max_tokens >= entry.context_length {
            return Err(ApiError {
                param: Some("max_tokens"),
                ..ApiError::invalid(
                    "context_length_exceeded",
                    format!(
                        "max_tokens is {} but this model's maximum context length is {} tokens.",
                        request.max_tokens, entry.context_length
                    ),
                )
            });
        }
        let messages = request.messages.len().max(1);
        let prompt_bound =
            request.prompt_bytes() + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages;
        let prompt_bound = u32::try_from(prompt_bound).unwrap_or(u32::MAX);
        // The most any candidate it will try could charge, with checked arithmetic: one
        // registrant's absurd price cannot overflow the hold (it is then simply refused).
        let price_cap = candidates
            .iter()
            .map(|c| self.job_price(c.price, tier))
            .max()
            .unwrap_or(0);
        let held = self
            .cost(
                price_cap,
                u64::from(request.max_tokens),
                u64::from(prompt_bound),
            )
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "max_price",
                    "The request's maximum cost overflows; lower max_price or max_tokens.",
                )
            })?
            .max(1);
        let key = format!(
            "job-{}-{}",
            self.run_id,
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let reservation = match grant {
            Some(g) => {
                g.check_request(held, "This request's maximum cost")?;
                Some(self.policies.reserve(g, held).await?)
            }
            None => None,
        };
        let escrow_id = match self.hold_escrow(&key, agent, held).await {
            Ok(id) => id,
            Err(e) => {
                if let Some(r) = &reservation {
                    self.policies.settle(r, 0).await;
                }
                return Err(e);
            }
        };
        let ticket = Ticket {
            hub: self.clone(),
            hold: Some(Hold {
                key,
                agent,
                escrow_id,
                held,
                tier,
                policy: reservation,
            }),
            started: Instant::now(),
        };
        tracing::debug!(job = %ticket.key(), %agent, model, held, "job admitted");
        Ok(Admitted {
            ticket,
            candidates,
            model: entry,
            prompt_bound,
        })
    }
}

/// An interactive request waiting for a free slot: batch jobs hold back while one exists.
struct Waiting<'a>(&'a Hub);

impl<'a> Waiting<'a> {
    fn new(hub: &'a Hub) -> Self {
        hub.interactive_waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(hub)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .interactive_waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Hub {
    async fn hold_escrow(
        &self,
        key: &str,
        agent: Address,
        held: u64,
    ) -> Result<Option<i64>, ApiError> {
        let quota = |needed: u64, available: u64| {
            ApiError::insufficient_quota(format!("Your balance of {available} micro-units cannot cover this request's maximum cost of {needed}."))
        };
        if self.config.fast_settle {
            // The cached balance is a lower bound (this hub is the only debitor in this mode and
            // subtracts what it settles), so it can admit without a database read; when it is not
            // enough, the database has the final word.
            let reserve = |balance: u64| {
                let mut reserved = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
                let mine = reserved.entry(agent).or_insert(0);
                if balance < mine.saturating_add(held) {
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
            return Ok(None);
        }
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
        Ok(Some(escrow.value.escrow_id))
    }

    /// Returns a hold in full.
    pub async fn refund(&self, hold: &Hold) {
        if let Some(r) = &hold.policy {
            self.policies.settle(r, 0).await;
        }
        let Some(escrow_id) = hold.escrow_id else {
            return self.unreserve(hold);
        };
        if let Err(e) = self
            .ledger
            .release(&format!("{}:release", hold.key), escrow_id)
            .await
        {
            tracing::error!(job = %hold.key, error = %e, "refund failed; the escrow stays open until the next start")
        }
    }

    /// Lowers the cached balance of a `--fast-settle` agent by what was just debited.
    pub(crate) fn debited(&self, agent: Address, amount: u64) {
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
    pub(crate) fn unreserve(&self, hold: &Hold) {
        let mut reserved = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = reserved.get_mut(&hold.agent) {
            *r = r.saturating_sub(hold.held);
            if *r == 0 {
                reserved.remove(&hold.agent);
            }
        }
    }

    /// Money reserved in memory for `--fast-settle` jobs in flight (0 otherwise).
    pub fn reserved(&self) -> u64 {
        self.reservations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}
