//! Per-wallet abuse limits: requests in flight at once, and requests started per minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_protocol::Address;

use crate::error::ApiError;

#[derive(Debug)]
struct Usage {
    in_flight: u32,
    window_start: Instant,
    started: u32,
}

/// Counts each wallet's use.
#[derive(Debug, Default)]
pub struct Limits {
    usage: Mutex<HashMap<Address, Usage>>,
}

/// A request in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    agent: Address,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut usage = self.limits.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = usage.get_mut(&self.agent) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

impl Limits {
    /// Takes a slot for `agent`, or says which limit it hit.
    pub fn acquire(
        self: &Arc<Self>,
        agent: Address,
        max_in_flight: u32,
        per_minute: u32,
    ) -> Result<Slot, ApiError> {
        let now = Instant::now();
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = usage.entry(agent).or_insert(Usage {
            in_flight: 0,
            window_start: now,
            started: 0,
        });
        if now.duration_since(u.window_start) >= Duration::from_secs(60) {
            u.window_start = now;
            u.started = 0;
        }
        if u.in_flight >= max_in_flight {
            return Err(ApiError::rate_limited(format!(
                "This wallet already has {} requests in flight (the limit is {max_in_flight}); wait for one to finish.",
                u.in_flight
            )));
        }
        if u.started >= per_minute {
            return Err(ApiError::rate_limited(format!(
                "This wallet has started {per_minute} requests this minute (the limit); retry later."
            )));
        }
        u.in_flight += 1;
        u.started += 1;
        Ok(Slot {
            limits: self.clone(),
            agent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_9_wallets_are_limited_in_flight_and_per_minute() {
        let limits = Arc::new(Limits::default());
        let a = Address::with_last_byte(1);
        let s1 = limits.acquire(a, 2, 3).expect("first");
        let _s2 = limits.acquire(a, 2, 3).expect("second");
        assert_eq!(
            limits.acquire(a, 2, 3).unwrap_err().code,
            "rate_limit_exceeded"
        );
        // Another wallet is not affected.
        assert!(limits.acquire(Address::with_last_byte(2), 2, 3).is_ok());
        drop(s1);
        let _s3 = limits.acquire(a, 2, 3).expect("a freed slot");
        // Three started this minute: the fourth waits for the next minute.
        let e = limits.acquire(a, 9, 3).unwrap_err();
        assert!(e.message.contains("this minute"), "{}", e.message);
    }
}
