//! Calibration: how much do honest results vary between provider and verifier set-ups, and which
//! thresholds follow from that.
//!
//! Honest conditions measured: thread count 1 vs 2, batch 1 vs 8 (continuous batching), incremental
//! (KV-cache) decoding vs the verifier's single teacher-forced pass, and the kernels' instruction set
//! (AVX2 vs AVX-512 VNNI, and the portable fallback). The verifier always runs its default set-up.

use serde::{Deserialize, Serialize};
use tessera_engine::{quant, Engine, LoadOptions};

use crate::check::Thresholds;
use crate::error::Result;
use crate::harness::{serve, tasks, verify};

/// Honest variation under one provider set-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Condition {
    /// The provider set-up.
    pub name: String,
    /// Jobs checked.
    pub jobs: usize,
    /// Jobs flagged with the thresholds in force (should be 0).
    pub flagged: usize,
    /// Largest |committed − recomputed| seen.
    pub max_abs: f32,
    /// Largest per-job mean |committed − recomputed|.
    pub mean_abs: f32,
    /// Largest token deficit seen.
    pub worst_deficit: f32,
    /// Largest per-job fraction of tokens that were not exactly the rule's choice.
    #[serde(default)]
    pub inexact_fraction: f32,
}

/// The outcome of calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// The model.
    pub model: String,
    /// Per set-up figures.
    pub conditions: Vec<Condition>,
    /// Thresholds derived: 4× the worst honest figure, never below the floors of
    /// [`Thresholds::default`] (which leave room for hardware not measured here).
    pub thresholds: Thresholds,
}

/// Runs `jobs_per_condition` honest jobs under each set-up and derives thresholds.
pub fn calibrate(model: &str, jobs_per_condition: usize, max_tokens: u32) -> Result<Calibration> {
    let verifier = Engine::load(model, None)?;
    let one_thread = Engine::load_with(
        model,
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )?;
    let floors = Thresholds::default();
    let set_ups: [(&str, &Engine, usize, &str); 5] = [
        ("threads=1 batch=1 (incremental)", &one_thread, 1, "auto"),
        ("threads=2 batch=1 (incremental)", &verifier, 1, "auto"),
        ("threads=2 batch=8 (incremental)", &verifier, 8, "auto"),
        ("avx2 kernels, batch=8", &verifier, 8, "avx2"),
        ("portable kernels, batch=8", &verifier, 8, "portable"),
    ];
    let mut conditions = Vec::new();
    for (i, (name, provider, batch, isa)) in set_ups.into_iter().enumerate() {
        if !quant::set_kernel_isa(isa) {
            tracing::warn!(isa, "instruction set not available here; skipped");
            continue;
        }
        let ts = tasks(jobs_per_condition, max_tokens, 1000 + i as u64);
        let specs: Vec<_> = ts.iter().map(|t| t.spec(provider)).collect();
        let mut jobs = Vec::new();
        for chunk in specs.chunks(batch) {
            jobs.extend(serve(provider, chunk)?);
        }
        quant::set_kernel_isa("auto");
        let mut c = Condition {
            name: name.into(),
            jobs: jobs.len(),
            flagged: 0,
            max_abs: 0.0,
            mean_abs: 0.0,
            worst_deficit: 0.0,
            inexact_fraction: 0.0,
        };
        for job in &jobs {
            let v = verify(&verifier, job, &floors)?;
            c.flagged += usize::from(!v.passed);
            c.max_abs = c.max_abs.max(v.stats.max_abs);
            c.mean_abs = c.mean_abs.max(v.stats.mean_abs);
            c.worst_deficit = c.worst_deficit.max(v.stats.worst_deficit);
            if v.stats.positions > 0 {
                c.inexact_fraction = c
                    .inexact_fraction
                    .max(v.stats.inexact as f32 / v.stats.positions as f32);
            }
        }
        tracing::info!(
            condition = name,
            max_abs = c.max_abs,
            mean_abs = c.mean_abs,
            deficit = c.worst_deficit,
            "calibrated"
        );
        conditions.push(c);
    }
    quant::set_kernel_isa("auto");
    let worst = |f: fn(&Condition) -> f32| conditions.iter().map(f).fold(0f32, f32::max);
    let thresholds = Thresholds {
        max_abs: (4.0 * worst(|c| c.max_abs)).max(floors.max_abs),
        mean_abs: (4.0 * worst(|c| c.mean_abs)).max(floors.mean_abs),
        token_slack: (4.0 * worst(|c| c.worst_deficit)).max(floors.token_slack),
        max_inexact_fraction: (4.0 * worst(|c| c.inexact_fraction))
            .max(floors.max_inexact_fraction),
        free_inexact: floors.free_inexact,
        logprob_slack: floors.logprob_slack,
    };
    Ok(Calibration {
        model: model.into(),
        conditions,
        thresholds,
    })
}
