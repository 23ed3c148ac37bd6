//! Log-probabilities of the output tokens (OpenAI's `logprobs` / `top_logprobs`), as a pure
//! function of one position's logits, so that the provider that reports them and the verifier that
//! recomputes them from its own teacher-forced pass compute the very same thing.
//!
//! The distribution is the model's after the request's penalties and `logit_bias`
//! ([`SamplingParams::adjusted`]), at temperature 1 and before top-k, top-p and a grammar mask:
//! what the model thinks of each token, as OpenAI reports it, whatever the temperature.

use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;

/// Most alternatives a position may report (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// One output position's log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// Natural log of the emitted token's probability (≤ 0).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id
    /// first); as many as the request asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
}

/// The log-probabilities at one position: `logits` are the raw logits of the forward pass,
/// `history` the output before this position (for the penalties), `top` the alternatives wanted.
pub fn token_logprobs(
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    token: u32,
    top: usize,
) -> TokenLogprobs {
    let adjusted = params.adjusted(logits, history);
    let row = adjusted.as_deref().unwrap_or(logits);
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: the result must not depend on more than the row's own values.
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |t: u32| {
        row.get(t as usize)
            .map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32)
    };
    let top = top.min(row.len());
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, by_value);
    }
    ids.truncate(top);
    ids.sort_unstable_by(by_value);
    TokenLogprobs {
        logprob: lp(token),
        top: ids.into_iter().map(|t| (t, lp(t))).collect(),
    }
}

/// Why reported log-probabilities are not those of `logits` (the verifier's own row for the
/// position), or `None` when they agree within `slack` (natural-log units): the emitted token's
/// value, the number of alternatives, each alternative's value, their order, and that they are the
/// most likely tokens (one outside the recomputed top may be reported only as a near tie at its
/// boundary).
pub fn logprobs_disagree(
    reported: &TokenLogprobs,
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    token: u32,
    slack: f32,
) -> Option<String> {
    let k = reported.top.len().min(MAX_TOP_LOGPROBS as usize);
    let recomputed = token_logprobs(logits, params, history, token, k);
    // NaN is off too: it compares as neither.
    let off = |a: f32, b: f32| (a - b).abs().partial_cmp(&slack).is_none_or(|o| o.is_gt());
    if off(reported.logprob, recomputed.logprob) {
        return Some(format!(
            "the token's logprob is reported as {} but is {}",
            reported.logprob, recomputed.logprob
        ));
    }
    if reported.top.len() != recomputed.top.len() {
        return Some(format!(
            "{} alternatives reported, at most {} possible",
            reported.top.len(),
            recomputed.top.len()
        ));
    }
    let adjusted = params.adjusted(logits, history);
    let row = adjusted.as_deref().unwrap_or(logits);
    let shift = recomputed.logprob - logits_value(row, token);
    let floor = recomputed.top.last().map_or(f32::NEG_INFINITY, |(_, v)| *v);
    for (i, &(id, v)) in reported.top.iter().enumerate() {
        if id as usize >= row.len() {
            return Some(format!(
                "alternative {i} is token {id}, outside the vocabulary"
            ));
        }
        if i > 0 && v > reported.top[i - 1].1 {
            return Some("the alternatives are not sorted".into());
        }
        if reported.top[..i].iter().any(|(t, _)| *t == id) {
            return Some(format!("token {id} is reported twice"));
        }
        let actual = logits_value(row, id) + shift;
        if off(v, actual) {
            return Some(format!(
                "alternative {id}'s logprob is reported as {v} but is {actual}"
            ));
        }
        if actual < floor - slack {
            return Some(format!(
                "token {id} is reported among the most likely, but is not"
            ));
        }
    }
    None
}

fn logits_value(row: &[f32], token: u32) -> f32 {
    row.get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = token_logprobs(&logits, &SamplingParams::greedy(), &[], 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|(t, _)| *t).collect();
        assert_eq!(ids, vec![1, 3, 2], "ties go to the lower id");
        assert!(lp.top.iter().all(|(_, v)| *v <= 0.0));
        // Penalties change the distribution reported.
        let penalised = SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let lp2 = token_logprobs(&logits, &penalised, &[1], 1, 1);
        assert_eq!(lp2.top[0].0, 3);
        assert!(lp2.logprob < lp.top[0].1);
    }

    #[test]
    fn invented_values_disagree_and_honest_noise_does_not() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin() * 4.0).collect();
        let params = SamplingParams::greedy();
        let honest = token_logprobs(&logits, &params, &[], 7, 5);
        let noisy: Vec<f32> = logits.iter().map(|l| l + 0.01 * (*l).cos()).collect();
        let check = |r: &TokenLogprobs| logprobs_disagree(r, &noisy, &params, &[], 7, 0.05);
        assert_eq!(check(&honest), None);
        let mut fake = honest.clone();
        fake.logprob = 0.0;
        assert!(check(&fake).is_some());
        let mut fake = honest.clone();
        fake.top[4].1 -= 0.5;
        assert!(check(&fake).is_some(), "a value moved");
        let mut fake = honest.clone();
        fake.top.swap(0, 1);
        assert!(check(&fake).is_some(), "out of order");
        // A token that is not among the most likely, reported with its true value.
        let outsider = (0..50u32)
            .min_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
            .unwrap();
        let mut fake = honest.clone();
        fake.top[4] = (
            outsider,
            honest.logprob + logits[outsider as usize] - logits[7],
        );
        fake.top.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert!(check(&fake).is_some(), "an outsider");
        let mut fake = honest;
        fake.top.pop();
        assert_eq!(fake.top.len(), 4);
        // Fewer alternatives is another request (4), and honest for it.
        assert_eq!(check(&fake), None);
    }
}
