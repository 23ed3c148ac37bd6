//! What the dashboard shows of the hub's recent life: the last jobs with their verification
//! outcome, the slashes, and a time series of the counters (sampled every few seconds), kept in
//! memory in bounded rings. Nothing here is money: the ledger stays the only record of that.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde::Serialize;
use tessera_protocol::Address;

use crate::metrics::Metrics;

/// Jobs kept.
const JOBS: usize = 100;
/// Slashes kept.
const SLASHES: usize = 50;
/// Points of the time series kept (at [`SAMPLE_EVERY`], 30 minutes).
const POINTS: usize = 900;
/// How often the counters are sampled.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A job as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct JobEntry {
    /// The job id.
    pub id: String,
    /// Unix seconds when it was settled or sent for checking.
    pub at: u64,
    /// The serving provider.
    pub provider: Address,
    /// The model's name.
    pub model: String,
    /// Tokens delivered.
    pub tokens: u64,
    /// Micro-units charged.
    pub cost: u64,
    /// `none`, `skipped`, `pending`, then `passed`, `failed` or `unchecked`.
    pub verification: String,
    /// What the agent said the job is for (OpenAI's `user`), e.g. a synthetic-data run.
    pub label: Option<String>,
}

/// A slash as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SlashEntry {
    /// Unix seconds.
    pub at: u64,
    /// Whose stake.
    pub provider: Address,
    /// Micro-units taken.
    pub amount: u64,
    /// Why (a failed job check or a failed known-answer check).
    pub reason: String,
}

/// One sample of the counters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// Unix seconds.
    pub t: u64,
    /// Completion tokens delivered so far.
    pub tokens: u64,
    /// Micro-units captured from agents so far.
    pub spend: u64,
    /// Jobs completed so far.
    pub jobs: u64,
    /// Verifications passed so far.
    pub passed: u64,
    /// Verifications failed so far.
    pub failed: u64,
}

#[derive(Default)]
struct Rings {
    jobs: VecDeque<JobEntry>,
    slashes: VecDeque<SlashEntry>,
    points: VecDeque<Point>,
    labels: HashMap<String, String>,
}

/// The rings, behind one lock (touched once per job).
#[derive(Default)]
pub struct Activity {
    rings: Mutex<Rings>,
}

fn push<T>(ring: &mut VecDeque<T>, cap: usize, item: T) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(item);
}

/// Per-label totals: what each labelled run (a synthetic-data run) has used.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabelTotals {
    /// The label.
    pub label: String,
    /// Jobs among the recent ones.
    pub jobs: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Their cost.
    pub cost: u64,
    /// Of them, failed checks.
    pub failed: u64,
}

impl Activity {
    fn rings(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names what job `id` is for, before it settles.
    pub fn label(&self, id: &str, label: &str) {
        let mut r = self.rings();
        if r.labels.len() > 4 * JOBS {
            r.labels.clear();
        }
        r.labels
            .insert(id.to_owned(), label.chars().take(64).collect());
    }

    /// A job was settled or sent for checking.
    pub fn job(&self, mut entry: JobEntry) {
        let mut r = self.rings();
        entry.label = r.labels.remove(&entry.id);
        push(&mut r.jobs, JOBS, entry);
    }

    /// A checked job's verdict came in.
    pub fn verdict(&self, id: &str, verdict: &str) {
        let mut r = self.rings();
        if let Some(j) = r.jobs.iter_mut().rev().find(|j| j.id == id) {
            j.verification = verdict.to_owned();
        }
    }

    /// A provider was slashed.
    pub fn slash(&self, entry: SlashEntry) {
        push(&mut self.rings().slashes, SLASHES, entry);
    }

    /// Samples the counters.
    pub fn sample(&self, metrics: &Metrics) {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let point = Point {
            t: crate::now_secs(),
            tokens: get(&metrics.completion_tokens),
            spend: get(&metrics.captured),
            jobs: get(&metrics.jobs_completed),
            passed: get(&metrics.verifications_passed),
            failed: get(&metrics.verifications_failed),
        };
        push(&mut self.rings().points, POINTS, point);
    }

    /// Recent jobs (newest first), slashes (newest first), the series (oldest first) and the
    /// per-label totals.
    pub fn snapshot(&self) -> (Vec<JobEntry>, Vec<SlashEntry>, Vec<Point>, Vec<LabelTotals>) {
        let r = self.rings();
        let mut labels: Vec<LabelTotals> = Vec::new();
        for j in &r.jobs {
            let Some(label) = &j.label else { continue };
            let at = match labels.iter().position(|l| &l.label == label) {
                Some(i) => i,
                None => {
                    labels.push(LabelTotals {
                        label: label.clone(),
                        ..Default::default()
                    });
                    labels.len() - 1
                }
            };
            let l = &mut labels[at];
            l.jobs += 1;
            l.tokens += j.tokens;
            l.cost += j.cost;
            l.failed += u64::from(j.verification == "failed");
        }
        (
            r.jobs.iter().rev().cloned().collect(),
            r.slashes.iter().rev().cloned().collect(),
            r.points.iter().copied().collect(),
            labels,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> JobEntry {
        JobEntry {
            id: id.into(),
            at: 1,
            provider: Address::with_last_byte(1),
            model: "m".into(),
            tokens: 3,
            cost: 30,
            verification: "pending".into(),
            label: None,
        }
    }

    #[test]
    fn rings_are_bounded_and_verdicts_and_labels_land_on_their_job() {
        let a = Activity::default();
        a.label("j1", "synth:qa");
        for i in 0..(JOBS + 5) {
            a.job(entry(&format!("j{i}")));
        }
        a.label("j999", "synth:qa");
        a.job(entry("j999"));
        a.verdict("j999", "failed");
        let (jobs, _, _, labels) = a.snapshot();
        assert_eq!(jobs.len(), JOBS);
        assert_eq!(jobs[0].id, "j999");
        assert_eq!(jobs[0].verification, "failed");
        // j1's entry fell out of the ring; only j999 is counted for the label.
        assert_eq!(labels.len(), 1);
        assert_eq!(
            (labels[0].jobs, labels[0].failed, labels[0].cost),
            (1, 1, 30)
        );
        let m = Metrics::default();
        m.completion_tokens.store(7, Ordering::Relaxed);
        a.sample(&m);
        assert_eq!(a.snapshot().2[0].tokens, 7);
    }
}
