//! Counters and a latency histogram, rendered in the Prometheus text exposition format
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the job latency histogram, seconds.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The hub's metrics.
#[derive(Default)]
pub struct Metrics {
    /// Jobs completed.
    pub jobs_completed: AtomicU64,
    /// Jobs failed (no provider, provider failure).
    pub jobs_failed: AtomicU64,
    /// Requests refused before a job started (auth, validation, balance).
    pub requests_rejected: AtomicU64,
    /// Completion tokens delivered.
    pub completion_tokens: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Retries on another provider.
    pub retries: AtomicU64,
    /// Verifications passed.
    pub verifications_passed: AtomicU64,
    /// Verifications failed.
    pub verifications_failed: AtomicU64,
    /// Verifications inconclusive or without a verifier.
    pub verifications_skipped: AtomicU64,
    /// Failed verifications that were outvoted or never confirmed (settled unslashed).
    pub verifications_unconfirmed: AtomicU64,
    /// Verification fees paid.
    pub verify_fees_paid: AtomicU64,
    /// Known-answer checks answered.
    pub canaries: AtomicU64,
    /// Known-answer checks answered wrong (the verifier slashed).
    pub canaries_failed: AtomicU64,
    /// Requests refused by a per-wallet rate or concurrency limit.
    pub rate_limited: AtomicU64,
    /// Slashes.
    pub slashes: AtomicU64,
    /// Micro-units slashed.
    pub slashed: AtomicU64,
    /// Micro-units captured from agents (fees included).
    pub captured: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Records one job's latency.
    pub fn observe_latency(&self, seconds: f64) {
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The exposition text; `gauges` are extra `(name, help, value)` lines.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, labels: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {value}"
            );
        };
        counter(
            "tessera_jobs_total",
            "Jobs completed.",
            "{outcome=\"completed\"}",
            get(&self.jobs_completed),
        );
        counter(
            "tessera_jobs_failed_total",
            "Jobs that failed after admission.",
            "",
            get(&self.jobs_failed),
        );
        counter(
            "tessera_requests_rejected_total",
            "Requests refused before a job started.",
            "",
            get(&self.requests_rejected),
        );
        counter(
            "tessera_completion_tokens_total",
            "Completion tokens delivered.",
            "",
            get(&self.completion_tokens),
        );
        counter(
            "tessera_prompt_tokens_total",
            "Prompt tokens processed.",
            "",
            get(&self.prompt_tokens),
        );
        counter(
            "tessera_retries_total",
            "Jobs retried on another provider.",
            "",
            get(&self.retries),
        );
        counter(
            "tessera_verifications_passed_total",
            "Verifications passed.",
            "",
            get(&self.verifications_passed),
        );
        counter(
            "tessera_verifications_failed_total",
            "Verifications failed.",
            "",
            get(&self.verifications_failed),
        );
        counter(
            "tessera_verifications_skipped_total",
            "Verifications inconclusive or without a verifier.",
            "",
            get(&self.verifications_skipped),
        );
        counter(
            "tessera_verifications_unconfirmed_total",
            "Failed verifications outvoted or never confirmed (settled unslashed).",
            "",
            get(&self.verifications_unconfirmed),
        );
        counter(
            "tessera_verify_fees_paid_total",
            "Verification fees paid.",
            "",
            get(&self.verify_fees_paid),
        );
        counter(
            "tessera_canaries_total",
            "Known-answer checks answered.",
            "",
            get(&self.canaries),
        );
        counter(
            "tessera_canaries_failed_total",
            "Known-answer checks answered wrong.",
            "",
            get(&self.canaries_failed),
        );
        counter(
            "tessera_rate_limited_total",
            "Requests refused by a per-wallet limit.",
            "",
            get(&self.rate_limited),
        );
        counter(
            "tessera_slashes_total",
            "Providers slashed.",
            "",
            get(&self.slashes),
        );
        counter(
            "tessera_slashed_micro_total",
            "Micro-units slashed.",
            "",
            get(&self.slashed),
        );
        counter(
            "tessera_captured_micro_total",
            "Micro-units captured from agents.",
            "",
            get(&self.captured),
        );
        let _ = writeln!(out, "# HELP tessera_job_seconds Job latency, request to last token.\n# TYPE tessera_job_seconds histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "tessera_job_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.latency_count);
        let _ = writeln!(out, "tessera_job_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "tessera_job_seconds_sum {}",
            get(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "tessera_job_seconds_count {count}");
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_a_cumulative_histogram() {
        let m = Metrics::default();
        inc(&m.jobs_completed);
        m.observe_latency(0.2);
        m.observe_latency(3.0);
        let text = m.render(&[("tessera_x", "A gauge.", 2.0)]);
        assert!(text.contains("tessera_jobs_total{outcome=\"completed\"} 1"));
        assert!(text.contains("tessera_job_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("tessera_job_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("tessera_job_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("# TYPE tessera_x gauge\ntessera_x 2"));
    }
}
