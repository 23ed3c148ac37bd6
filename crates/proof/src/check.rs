//! The verifier's decision, as a pure function of the job, the claimed output, the commitment and
//! the verifier's own teacher-forced logits.
//!
//! A response passes when (1) the commitment is well formed and bound to this job, (2) the committed
//! values agree with the recomputed ones within calibrated thresholds, and (3) every emitted token is
//! what the requested rule would pick under the verifier's logits, allowing near-ties: for greedy the
//! token's logit is within `token_slack` of the maximum; for seeded sampling its Gumbel-perturbed score
//! `logit/T + G(seed, position, token)` is within `token_slack / T` of the best candidate's, and it lies
//! inside the top-k / top-p set up to the same slack at the boundary. (4) The claimed finish is true:
//! `eos` needs an end-of-turn token last, `length` needs `max_tokens` tokens, and no end-of-turn token
//! may appear earlier (that would be padding a bill); `cancelled` only for a job the hub itself
//! reports as broken off. (5) Near-tie deviations are rare: an honest provider's tokens are exactly
//! the rule's choice except where measured noise flips a near tie, so a job whose tokens deviate
//! (within the slack) more often than `max_inexact_fraction` fails as a substitution.

use half::f16;
use serde::{Deserialize, Serialize};
use tessera_types::logprobs::logprobs_disagree;
use tessera_types::sampling::{self, TokenMask};
pub use tessera_types::Reason;
use tessera_types::TokenLogprobs;

use crate::commitment::{
    hash_stop, hash_tokens, position_values, Commitment, Finish, JobSpec, VALUES_PER_POSITION,
    VERSION,
};

/// Decision thresholds, derived by calibration on honest runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Largest allowed |committed − recomputed| over all committed values of a job.
    pub max_abs: f32,
    /// Largest allowed mean |committed − recomputed| of a job.
    pub mean_abs: f32,
    /// Largest allowed score deficit of an emitted token (in logit units).
    pub token_slack: f32,
    /// Largest allowed fraction of tokens that are not exactly the rule's choice (any deficit
    /// above zero), beyond a free allowance of [`Thresholds::free_inexact`] tokens.
    #[serde(default = "default_max_inexact_fraction")]
    pub max_inexact_fraction: f32,
    /// Tokens per job that may deviate within the slack without counting against the fraction.
    #[serde(default = "default_free_inexact")]
    pub free_inexact: u32,
    /// Largest allowed |reported − recomputed| of a reported log-probability (`logprobs`).
    #[serde(default = "default_logprob_slack")]
    pub logprob_slack: f32,
}

fn default_logprob_slack() -> f32 {
    // A log-probability is a logit minus the row's log-sum-exp: twice the measured logit noise
    // (0.031) bounds its honest variation; this leaves a margin, and an invented value is
    // typically off by whole units.
    0.1
}

fn default_max_inexact_fraction() -> f32 {
    0.05
}

fn default_free_inexact() -> u32 {
    2
}

impl Default for Thresholds {
    /// Calibrated on SmolLM2-135M (`tessera verify calibrate`, see the README): honest variation
    /// across thread counts, batch sizes, incremental vs teacher-forced and AVX2 vs AVX-512 kernels
    /// was at most one f16 step; these leave a wide margin for other hardware.
    fn default() -> Self {
        // Honest noise measured across instruction sets is at most 0.031 logits (0 on one
        // instruction set); the slack is three times that, not the eightfold it once was, because
        // a slack is a free choice for a provider that substitutes tokens.
        Self {
            max_abs: 0.25,
            mean_abs: 0.05,
            token_slack: 0.1,
            max_inexact_fraction: default_max_inexact_fraction(),
            free_inexact: default_free_inexact(),
            logprob_slack: default_logprob_slack(),
        }
    }
}

/// Figures of one check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckStats {
    /// Positions compared.
    pub positions: usize,
    /// Largest |committed − recomputed|.
    pub max_abs: f32,
    /// Mean |committed − recomputed|.
    pub mean_abs: f32,
    /// Largest token score deficit.
    pub worst_deficit: f32,
    /// Tokens that were not exactly the rule's choice.
    #[serde(default)]
    pub inexact: usize,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether the job passed.
    pub passed: bool,
    /// Why not, when it failed.
    pub reason: Option<Reason>,
    /// Figures.
    pub stats: CheckStats,
}

impl Verdict {
    fn fail(reason: Reason, stats: CheckStats) -> Self {
        Self {
            passed: false,
            reason: Some(reason),
            stats,
        }
    }
}

/// The claimed result of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// Output tokens as delivered.
    pub output_tokens: Vec<u32>,
    /// Whether the output text contains one of the stop strings (decided by the caller, who has the
    /// tokenizer; only consulted for a `stop_sequence` finish).
    #[serde(default)]
    pub stop_sequence_seen: bool,
    /// The job broke off before it finished (the hub says so, not the provider): its finish must
    /// be `cancelled`, and an empty prompt hash means the hub never learned it.
    #[serde(default)]
    pub partial: bool,
    /// Prompt tokens the provider billed; must equal the prompt's count.
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    /// The log-probabilities reported to the agent, one per output token, when it asked for
    /// them; each must be what the verifier's own logits give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

/// Checks the header of a commitment against the job and the delivered output.
pub fn check_binding(spec: &JobSpec, claim: &Claim, c: &Commitment) -> Result<(), Reason> {
    if c.version != VERSION {
        return Err(Reason::WrongVersion { found: c.version });
    }
    if c.model_sha256 != spec.model_sha256 {
        return Err(Reason::WrongModel {
            expected: spec.model_sha256.clone(),
            found: c.model_sha256.clone(),
        });
    }
    let unknown_prompt = claim.partial && c.prompt_hash.is_empty();
    if !unknown_prompt && c.prompt_hash != hash_tokens(&spec.prompt_tokens) {
        return Err(Reason::PromptMismatch);
    }
    if let Some(claimed) = claim.prompt_tokens {
        let actual = spec.prompt_tokens.len() as u32;
        if claimed != actual {
            return Err(Reason::PromptLengthMismatch { claimed, actual });
        }
    }
    if c.output_hash != hash_tokens(&claim.output_tokens)
        || c.positions as usize != claim.output_tokens.len()
    {
        return Err(Reason::OutputMismatch);
    }
    let s = &spec.sampling;
    let field = if c.sampling.temperature.to_bits() != s.temperature.to_bits() {
        Some("temperature")
    } else if c.sampling.seed != s.seed && !s.is_greedy() {
        Some("seed")
    } else if c.sampling.top_k != s.top_k {
        Some("top_k")
    } else if c.sampling.top_p.map(f32::to_bits) != s.top_p.map(f32::to_bits) {
        Some("top_p")
    } else if c.sampling.grammar != s.grammar {
        Some("grammar")
    } else if c.sampling.presence_penalty.to_bits() != s.presence_penalty.to_bits() {
        Some("presence_penalty")
    } else if c.sampling.frequency_penalty.to_bits() != s.frequency_penalty.to_bits() {
        Some("frequency_penalty")
    } else if c.sampling.logit_bias != s.logit_bias {
        Some("logit_bias")
    } else if c.max_tokens != spec.max_tokens {
        Some("max_tokens")
    } else if c.stop_hash != hash_stop(&spec.stop) {
        Some("stop")
    } else {
        None
    };
    if let Some(field) = field {
        return Err(Reason::ParamsMismatch {
            field: field.into(),
        });
    }
    if claim.output_tokens.len() > spec.max_tokens as usize {
        return Err(Reason::FalseFinish {
            detail: format!(
                "{} tokens exceed max_tokens {}",
                claim.output_tokens.len(),
                spec.max_tokens
            ),
        });
    }
    Ok(())
}

/// Full check. `logits` are the verifier's teacher-forced logits for the output positions only:
/// row `i` (of `vocab` values) is the distribution the `i`-th output token was drawn from, i.e. the
/// rows from position `prompt_len − 1` of a pass over prompt + output. `stop_tokens` are the model's
/// end-of-turn tokens.
pub fn check(
    spec: &JobSpec,
    claim: &Claim,
    c: &Commitment,
    logits: &[f32],
    vocab: usize,
    stop_tokens: &[u32],
    t: &Thresholds,
) -> Verdict {
    check_constrained(spec, claim, c, logits, vocab, stop_tokens, t, None)
}

/// [`check`] for a job whose rule has a grammar: `masks[i]` holds the tokens the grammar allows
/// at output position `i` (from replaying the claimed tokens through the same grammar; fewer masks
/// than tokens means the replay stopped at a disallowed token). Each token must be allowed, and the
/// rule's choice (within the slack) among the allowed tokens. The committed values stay the raw
/// logits of the forward pass: the mask changes only which token the rule picks.
#[allow(clippy::too_many_arguments)]
pub fn check_constrained(
    spec: &JobSpec,
    claim: &Claim,
    c: &Commitment,
    logits: &[f32],
    vocab: usize,
    stop_tokens: &[u32],
    t: &Thresholds,
    masks: Option<&[TokenMask]>,
) -> Verdict {
    let mut stats = CheckStats::default();
    if spec.sampling.grammar.is_some() != masks.is_some() {
        let detail = "the grammar's token masks must be given exactly when the rule has a grammar";
        return Verdict::fail(
            Reason::Malformed {
                detail: detail.into(),
            },
            stats,
        );
    }
    if let Err(r) = check_binding(spec, claim, c) {
        return Verdict::fail(r, stats);
    }
    let committed = match c.decode_values() {
        Ok(v) => v,
        Err(detail) => return Verdict::fail(Reason::Malformed { detail }, stats),
    };
    let n = claim.output_tokens.len();
    if logits.len() != n * vocab {
        return Verdict::fail(
            Reason::Malformed {
                detail: format!(
                    "verifier supplied {} logits for {n} positions",
                    logits.len()
                ),
            },
            stats,
        );
    }
    if committed.iter().flatten().any(|v| !v.is_finite()) {
        return Verdict::fail(
            Reason::Malformed {
                detail: "non-finite committed value".into(),
            },
            stats,
        );
    }

    // The finish reason.
    let last = claim.output_tokens.last().copied();
    let finish_problem = match c.finish {
        Finish::Eos if !last.is_some_and(|t| stop_tokens.contains(&t)) => {
            Some("claims an end-of-turn token but the output does not end with one".to_string())
        }
        Finish::Length if n != spec.max_tokens as usize => Some(format!(
            "claims the token budget was reached with {n} of {} tokens",
            spec.max_tokens
        )),
        Finish::StopSequence if !claim.stop_sequence_seen => {
            Some("claims a stop string that the output does not contain".to_string())
        }
        Finish::Cancelled if !claim.partial => {
            Some("claims the job was cancelled, but the hub never cancelled it".to_string())
        }
        _ if claim.partial && c.finish != Finish::Cancelled => {
            Some("a job that broke off must be committed as cancelled".to_string())
        }
        _ => None,
    };
    if let Some(detail) = finish_problem {
        return Verdict::fail(Reason::FalseFinish { detail }, stats);
    }
    if let Some(i) = claim.output_tokens[..n.saturating_sub(1)]
        .iter()
        .position(|t| stop_tokens.contains(t))
    {
        return Verdict::fail(
            Reason::FalseFinish {
                detail: format!("an end-of-turn token at {i} is followed by more output"),
            },
            stats,
        );
    }

    if let Some(reported) = &claim.logprobs {
        if reported.len() != n {
            let detail = format!("{} positions reported for {n} tokens", reported.len());
            return Verdict::fail(Reason::LogprobsMismatch { index: 0, detail }, stats);
        }
        for (i, (lp, &token)) in reported.iter().zip(&claim.output_tokens).enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let history = &claim.output_tokens[..i];
            if let Some(detail) =
                logprobs_disagree(lp, row, &spec.sampling, history, token, t.logprob_slack)
            {
                return Verdict::fail(Reason::LogprobsMismatch { index: i, detail }, stats);
            }
        }
    }

    // Committed values against recomputed ones (both rounded to f16, as committed).
    let mut sum = 0f64;
    let mut count = 0usize;
    let params = &spec.sampling;
    let position0 = spec.prompt_tokens.len() as u64;
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&token, values)) in claim.output_tokens.iter().zip(&committed).enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        if token as usize >= vocab {
            return Verdict::fail(
                Reason::TokenInconsistent {
                    index: i,
                    deficit: f32::INFINITY,
                },
                stats,
            );
        }
        let mine = position_values(row, token);
        for k in 0..VALUES_PER_POSITION {
            let d = (f16::from_f32(mine[k]).to_f32() - values[k]).abs();
            stats.max_abs = stats.max_abs.max(d);
            sum += d as f64;
            count += 1;
        }
        // The rule chooses from the adjusted logits (penalties over the output so far, biases),
        // restricted to the grammar's tokens; the committed values are the raw ones.
        let adjusted = params.adjusted(row, &claim.output_tokens[..i]);
        let row_for_rule = adjusted.as_deref().unwrap_or(row);
        let masked;
        let rule_row = match masks {
            None => row_for_rule,
            Some(masks) => match masks.get(i).filter(|m| m.allows(token)) {
                Some(mask) => {
                    masked = mask.apply(row_for_rule);
                    &masked
                }
                None => return Verdict::fail(Reason::GrammarViolation { index: i }, stats),
            },
        };
        let deficit = token_deficit(rule_row, params, position0 + i as u64, token);
        stats.worst_deficit = stats.worst_deficit.max(deficit);
        if deficit > 0.0 {
            stats.inexact += 1;
        }
        if deficit > t.token_slack && worst.is_none_or(|(_, d)| deficit > d) {
            worst = Some((i, deficit));
        }
    }
    stats.positions = n;
    stats.mean_abs = if count > 0 {
        (sum / count as f64) as f32
    } else {
        0.0
    };
    if stats.max_abs > t.max_abs || stats.mean_abs > t.mean_abs {
        let (max_abs, mean_abs) = (stats.max_abs, stats.mean_abs);
        return Verdict::fail(Reason::LogitsDiverge { max_abs, mean_abs }, stats);
    }
    if let Some((index, deficit)) = worst {
        return Verdict::fail(Reason::TokenInconsistent { index, deficit }, stats);
    }
    let allowed = t.free_inexact as usize + (t.max_inexact_fraction * n as f32).floor() as usize;
    if stats.inexact > allowed {
        return Verdict::fail(
            Reason::TooManyNearTies {
                inexact: stats.inexact,
                positions: n,
            },
            stats,
        );
    }
    Verdict {
        passed: true,
        reason: None,
        stats,
    }
}

/// How far (in logit units) an emitted token falls short of what the rule would pick.
/// 0 when it is exactly the rule's choice.
pub fn token_deficit(
    logits: &[f32],
    params: &sampling::SamplingParams,
    position: u64,
    token: u32,
) -> f32 {
    let own = logits[token as usize];
    if params.is_greedy() {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        return max - own;
    }
    let temperature = params.temperature;
    let (boundary_deficit, candidates) = match sampling::candidates(logits, params) {
        None => (0.0, None),
        Some(ids) => {
            let lowest = ids
                .iter()
                .map(|&i| logits[i as usize])
                .fold(f32::INFINITY, f32::min);
            (
                if ids.contains(&token) {
                    0.0
                } else {
                    (lowest - own).max(0.0)
                },
                Some(ids),
            )
        }
    };
    let own_score = sampling::score(logits, params, position, token);
    let best = match &candidates {
        None => (0..logits.len() as u32)
            .map(|i| sampling::score(logits, params, position, i))
            .fold(f32::NEG_INFINITY, f32::max),
        Some(ids) => ids
            .iter()
            .map(|&i| sampling::score(logits, params, position, i))
            .fold(f32::NEG_INFINITY, f32::max),
    };
    // Scores are logits / T plus noise: multiply back by T to compare in logit units.
    boundary_deficit.max((best - own_score).max(0.0) * temperature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commitment::CommitmentBuilder;
    use tessera_types::SamplingParams;

    const VOCAB: usize = 8;

    /// Logits where token `best` leads by `lead` over token `best + 1`, the rest far behind.
    fn row(best: usize, lead: f32) -> Vec<f32> {
        let mut r = vec![-10.0; VOCAB];
        r[best] = 5.0;
        r[(best + 1) % VOCAB] = 5.0 - lead;
        r
    }

    /// A greedy job of `n` positions whose emitted tokens are `pick(i)`, committed honestly
    /// against `logits` (a provider that re-scored its tokens with the real model).
    fn job(
        rows: &[Vec<f32>],
        tokens: &[u32],
        finish: Finish,
    ) -> (JobSpec, Claim, Commitment, Vec<f32>) {
        let spec = JobSpec {
            model_sha256: "m".into(),
            prompt_tokens: vec![1, 2],
            sampling: SamplingParams::greedy(),
            max_tokens: tokens.len() as u32,
            stop: vec![],
        };
        let mut b = CommitmentBuilder::new(spec.clone());
        for (r, &t) in rows.iter().zip(tokens) {
            b.push(r, t);
        }
        let claim = Claim {
            output_tokens: tokens.to_vec(),
            ..Claim::default()
        };
        (spec, claim, b.finish(finish), rows.concat())
    }

    #[test]
    fn finding_11_substituted_near_tie_tokens_are_caught_by_their_count() {
        // 40 positions, each a near tie (lead 0.05, inside the slack of 0.1).
        let rows: Vec<Vec<f32>> = (0..40).map(|i| row(i % VOCAB, 0.05)).collect();
        let honest: Vec<u32> = (0..40).map(|i| (i % VOCAB) as u32).collect();
        let (spec, claim, c, logits) = job(&rows, &honest, Finish::Length);
        let t = Thresholds::default();
        assert!(check(&spec, &claim, &c, &logits, VOCAB, &[], &t).passed);
        // A provider that generated from something else and re-scored: the runner-up every time.
        let substituted: Vec<u32> = (0..40).map(|i| ((i + 1) % VOCAB) as u32).collect();
        let (spec, claim, c, logits) = job(&rows, &substituted, Finish::Length);
        let v = check(&spec, &claim, &c, &logits, VOCAB, &[], &t);
        assert!(
            matches!(
                v.reason,
                Some(Reason::TooManyNearTies {
                    inexact: 40,
                    positions: 40
                })
            ),
            "{v:?}"
        );
        // Two flips in 40 (what measured noise can do) still pass.
        let mut two = honest.clone();
        two[3] = 4;
        two[20] = 5;
        let (spec, claim, c, logits) = job(&rows, &two, Finish::Length);
        assert!(check(&spec, &claim, &c, &logits, VOCAB, &[], &t).passed);
        // The slack itself is tight: a deficit of 0.2 is no near tie any more.
        let rows: Vec<Vec<f32>> = (0..4).map(|i| row(i, 0.2)).collect();
        let (spec, claim, c, logits) = job(&rows, &[1, 2, 3, 4], Finish::Length);
        assert!(matches!(
            check(&spec, &claim, &c, &logits, VOCAB, &[], &t).reason,
            Some(Reason::TokenInconsistent { .. })
        ));
    }

    #[test]
    fn finding_12_a_cancelled_finish_needs_the_hub_to_have_cut_the_job() {
        let rows: Vec<Vec<f32>> = (0..3).map(|i| row(i, 1.0)).collect();
        let (spec, claim, c, logits) = job(&rows, &[0, 1, 2], Finish::Cancelled);
        let t = Thresholds::default();
        let v = check(&spec, &claim, &c, &logits, VOCAB, &[], &t);
        assert!(
            matches!(v.reason, Some(Reason::FalseFinish { .. })),
            "{v:?}"
        );
        // The hub says the job broke off: a partial check, with its prompt hash unknown.
        let mut c = c;
        c.prompt_hash = String::new();
        let partial = Claim {
            partial: true,
            ..claim.clone()
        };
        assert!(check(&spec, &partial, &c, &logits, VOCAB, &[], &t).passed);
        // A partial job must be committed as cancelled, whatever the provider claims.
        let (spec, _, c, logits) = job(&rows, &[0, 1, 2], Finish::Length);
        let v = check(&spec, &partial, &c, &logits, VOCAB, &[], &t);
        assert!(
            matches!(v.reason, Some(Reason::FalseFinish { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn finding_6_billed_prompt_tokens_must_be_the_prompts() {
        let rows: Vec<Vec<f32>> = (0..2).map(|i| row(i, 1.0)).collect();
        let (spec, claim, c, logits) = job(&rows, &[0, 1], Finish::Length);
        let t = Thresholds::default();
        let honest = Claim {
            prompt_tokens: Some(2),
            ..claim.clone()
        };
        assert!(check(&spec, &honest, &c, &logits, VOCAB, &[], &t).passed);
        let padded = Claim {
            prompt_tokens: Some(900),
            ..claim
        };
        let v = check(&spec, &padded, &c, &logits, VOCAB, &[], &t);
        assert_eq!(
            v.reason,
            Some(Reason::PromptLengthMismatch {
                claimed: 900,
                actual: 2
            })
        );
    }

    #[test]
    fn reported_logprobs_are_recomputed_and_invented_ones_fail() {
        use tessera_types::logprobs::token_logprobs;
        let rows: Vec<Vec<f32>> = (0..6).map(|i| row(i % VOCAB, 1.0)).collect();
        let tokens: Vec<u32> = (0..6).map(|i| (i % VOCAB) as u32).collect();
        let (spec, claim, c, logits) = job(&rows, &tokens, Finish::Length);
        let honest: Vec<_> = rows
            .iter()
            .zip(&tokens)
            .enumerate()
            .map(|(i, (r, &t))| token_logprobs(r, &spec.sampling, &tokens[..i], t, 3))
            .collect();
        let t = Thresholds::default();
        let with = |lps: Vec<TokenLogprobs>| Claim {
            logprobs: Some(lps),
            ..claim.clone()
        };
        assert!(check(&spec, &with(honest.clone()), &c, &logits, VOCAB, &[], &t).passed);
        let mut invented = honest.clone();
        invented[4].logprob = -0.01;
        let v = check(&spec, &with(invented), &c, &logits, VOCAB, &[], &t);
        assert!(
            matches!(v.reason, Some(Reason::LogprobsMismatch { index: 4, .. })),
            "{v:?}"
        );
        let mut short = honest;
        short.pop();
        let v = check(&spec, &with(short), &c, &logits, VOCAB, &[], &t);
        assert!(
            matches!(v.reason, Some(Reason::LogprobsMismatch { .. })),
            "{v:?}"
        );
    }
}
