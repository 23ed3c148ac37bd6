//! The spending cap. Before each request the run reserves the most that request can cost (the
//! hub's own escrow bound at the spec's `max_price`); the reservation becomes the receipt's
//! actual cost when the answer comes, or is released when the request fails. Spent plus
//! reserved never exceeds the cap, so no interleaving of concurrent requests can overspend.

use std::sync::Mutex;

/// What a request may cost at most, as the hub escrows it (`crates/hub/src/jobs/mod.rs`):
/// `max_tokens` generated tokens at the price, plus an upper bound of the prompt's tokens (its
/// bytes, 96 tokens of chat template and 8 per message) at `prompt_price_bps` of the price,
/// rounded up.
pub fn max_request_cost(
    price: u64,
    max_tokens: u32,
    prompt_bytes: usize,
    messages: usize,
    prompt_price_bps: u64,
) -> u64 {
    let prompt_bound =
        (prompt_bytes + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages.max(1)) as u128;
    let completion = u128::from(max_tokens) * u128::from(price);
    let prompt = (prompt_bound * u128::from(price) * u128::from(prompt_price_bps)).div_ceil(10_000);
    u64::try_from(completion + prompt).unwrap_or(u64::MAX)
}

/// Chat-template tokens the hub allows for around the messages.
pub const TEMPLATE_TOKENS: usize = 96;
/// And per message.
pub const TEMPLATE_TOKENS_PER_MESSAGE: usize = 8;

#[derive(Debug, Default)]
struct Books {
    spent: u64,
    reserved: u64,
}

/// The cap and what is spent and reserved against it.
#[derive(Debug)]
pub struct Budget {
    cap: u64,
    books: Mutex<Books>,
}

/// Money set aside for one request.
#[derive(Debug)]
#[must_use = "a reservation is settled or released"]
pub struct Reservation {
    amount: u64,
}

/// The actual cost came out above the reservation: the hub's escrow bound and ours differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a request cost {actual}, more than the {reserved} reserved for it")]
pub struct Overrun {
    /// What was reserved.
    pub reserved: u64,
    /// What it cost.
    pub actual: u64,
}

impl Budget {
    /// A cap of `cap` micro-units of which `spent` are already spent (by earlier runs).
    pub fn new(cap: u64, spent: u64) -> Self {
        Self {
            cap,
            books: Mutex::new(Books { spent, reserved: 0 }),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets `amount` aside, or `None` when spent + reserved + amount would pass the cap.
    pub fn reserve(&self, amount: u64) -> Option<Reservation> {
        let mut b = self.books();
        let total = b.spent.checked_add(b.reserved)?.checked_add(amount)?;
        (total <= self.cap).then(|| {
            b.reserved += amount;
            Reservation { amount }
        })
    }

    /// The request cost `actual`.
    pub fn settle(&self, r: Reservation, actual: u64) -> Result<(), Overrun> {
        let mut b = self.books();
        b.reserved -= r.amount;
        b.spent += actual;
        if actual > r.amount {
            return Err(Overrun {
                reserved: r.amount,
                actual,
            });
        }
        Ok(())
    }

    /// The request failed and cost nothing.
    pub fn release(&self, r: Reservation) {
        self.books().reserved -= r.amount;
    }

    /// `amount` already spent came back (the hub refunded a job that failed verification).
    pub fn refund(&self, amount: u64) {
        let mut b = self.books();
        b.spent = b.spent.saturating_sub(amount);
    }

    /// Micro-units spent.
    pub fn spent(&self) -> u64 {
        self.books().spent
    }

    /// Micro-units reserved by requests in flight.
    pub fn reserved(&self) -> u64 {
        self.books().reserved
    }

    /// The cap.
    pub fn cap(&self) -> u64 {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_bound_at_a_quarter_price_for_prompts() {
        // 10 generated tokens at 7, (20 + 96 + 8) prompt tokens at 7 × 0.25, rounded up.
        assert_eq!(
            max_request_cost(7, 10, 20, 1, 2500),
            70 + (124 * 7 * 2500u64).div_ceil(10_000)
        );
    }

    #[test]
    fn reservations_never_pass_the_cap_even_from_many_threads() {
        let budget = std::sync::Arc::new(Budget::new(1000, 100));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = budget.clone();
                std::thread::spawn(move || {
                    let mut paid = 0;
                    while let Some(r) = b.reserve(30) {
                        assert!(b.spent() + b.reserved() <= 1000);
                        b.settle(r, 20).unwrap();
                        paid += 20;
                    }
                    paid
                })
            })
            .collect();
        let paid: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(budget.spent(), 100 + paid);
        assert!(budget.spent() <= 1000 && budget.spent() > 1000 - 30);
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn an_overrun_is_reported() {
        let b = Budget::new(100, 0);
        let r = b.reserve(10).unwrap();
        assert_eq!(
            b.settle(r, 11),
            Err(Overrun {
                reserved: 10,
                actual: 11
            })
        );
        let r = b.reserve(50).unwrap();
        b.release(r);
        assert_eq!((b.spent(), b.reserved()), (11, 0));
    }
}
