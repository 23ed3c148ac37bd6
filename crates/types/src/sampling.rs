//! Token selection: greedy, and seeded sampling by the Gumbel-max trick.
//!
//! Sampling draws `argmax_i (logit_i / T + G_i)` where `G_i = -ln(-ln U_i)` and `U_i` comes from a
//! counter-based generator keyed by `(seed, position, token id)` (a SplitMix64 finaliser over the
//! three). This is an exact sample from `softmax(logits / T)` restricted to the top-k / top-p set, and
//! it is cheap to *verify*: a verifier with slightly different logits recomputes the same noise and
//! only disagrees when two candidates' perturbed scores are nearly tied. Inverse-CDF sampling, by
//! contrast, accumulates logit noise along the cumulative sum (see the verification crate's docs).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Temperatures below this are greedy decoding.
pub const MIN_TEMPERATURE: f32 = 0.01;

/// How to pick each token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Below [`MIN_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    /// Keep only the `k` highest logits.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Keep the smallest set whose probability reaches `p`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed of the sampler's noise.
    #[serde(default)]
    pub seed: u64,
    /// A grammar the output must follow: only tokens it allows at a position are candidates
    /// there (the rule above picks among them). Part of the rule a commitment binds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// OpenAI's `presence_penalty` (−2 to 2): subtracted from the logit of every token that
    /// already occurs in the output.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty` (−2 to 2): subtracted once per earlier occurrence in the output.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits (−100 to 100), by ascending token id.
    /// Ids outside the vocabulary are ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

/// A grammar for constrained decoding (OpenAI's `response_format`). The engine compiles it with
/// llguidance over the model's own vocabulary; a verifier compiles the same text and applies the
/// same token mask at every position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Grammar {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// JSON valid under a JSON Schema, given as its canonical text (`serde_json` compact
    /// serialization), so that the hash a commitment binds is one string's.
    JsonSchema {
        /// The schema, as compact JSON text.
        schema: String,
    },
    /// Function calls (OpenAI's `tools` with `tool_choice` other than `none`): one or more
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` blocks, each naming one of
    /// `functions` with arguments valid under that function's parameter schema, or (unless
    /// `required`) free text that does not start with a tool call.
    ToolCalls {
        /// The callable functions, as compact JSON text of `[{"name": …, "parameters": {…}}]`
        /// (a named `tool_choice` leaves only that one).
        functions: String,
        /// A call must be made (`tool_choice` `required` or a named function).
        required: bool,
        /// More than one call may be made (`parallel_tool_calls`).
        parallel: bool,
    },
}

impl Grammar {
    /// The grammar's canonical text: the JSON Schema the output follows (`{"type": "object"}`
    /// for [`Grammar::JsonObject`]), or the functions of [`Grammar::ToolCalls`].
    pub fn schema_text(&self) -> &str {
        match self {
            Grammar::JsonObject => r#"{"type":"object"}"#,
            Grammar::JsonSchema { schema } => schema,
            Grammar::ToolCalls { functions, .. } => functions,
        }
    }

    /// sha256 of the grammar's kind and canonical text: what a commitment binds.
    pub fn hash(&self) -> [u8; 32] {
        let kind: &[u8] = match self {
            Grammar::JsonObject => b"json_object",
            Grammar::JsonSchema { .. } => b"json_schema",
            Grammar::ToolCalls {
                required, parallel, ..
            } => match (required, parallel) {
                (false, false) => b"tool_calls:auto",
                (false, true) => b"tool_calls:auto:parallel",
                (true, false) => b"tool_calls:required",
                (true, true) => b"tool_calls:required:parallel",
            },
        };
        let text = self.schema_text().as_bytes();
        let mut h = Sha256::new();
        h.update((kind.len() as u64).to_le_bytes());
        h.update(kind);
        h.update((text.len() as u64).to_le_bytes());
        h.update(text);
        h.finalize().into()
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }

    /// Seeded sampling at a temperature.
    pub fn seeded(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
            seed,
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }

    /// Whether the rule adjusts logits before choosing (penalties or biases).
    pub fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || !self.logit_bias.is_empty()
    }

    /// The logits the rule chooses from after `history` (the output so far): OpenAI's
    /// `logit − presence·[count > 0] − frequency·count + bias`, or `None` when nothing adjusts.
    pub fn adjusted(&self, logits: &[f32], history: &[u32]) -> Option<Vec<f32>> {
        if !self.adjusts_logits() {
            return None;
        }
        let mut out = logits.to_vec();
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts: std::collections::BTreeMap<u32, u32> = Default::default();
            for &t in history {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = out.get_mut(t as usize) {
                    *l -= self.presence_penalty + self.frequency_penalty * n as f32;
                }
            }
        }
        for &(t, bias) in &self.logit_bias {
            if let Some(l) = out.get_mut(t as usize) {
                *l += bias;
            }
        }
        Some(out)
    }

    /// Whether this is greedy decoding: any temperature below [`MIN_TEMPERATURE`] (or NaN), since
    /// `logit / T` grows without bound as `T` nears 0 and would make the verifier's slack vacuous.
    pub fn is_greedy(&self) -> bool {
        // NaN is greedy too: it compares as neither.
        self.temperature
            .partial_cmp(&MIN_TEMPERATURE)
            .is_none_or(|o| o.is_lt())
    }
}

/// The tokens a grammar allows at one position: a bitset over the vocabulary (bit `t % 32` of
/// word `t / 32`, as llguidance lays out its masks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    /// A mask from its 32-bit words.
    pub fn from_words(words: Vec<u32>) -> Self {
        Self { words }
    }

    /// A mask allowing exactly `tokens` in a vocabulary of `vocab` tokens.
    pub fn only(vocab: usize, tokens: &[u32]) -> Self {
        let mut words = vec![0u32; vocab.div_ceil(32)];
        for &t in tokens {
            if let Some(w) = words.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
        Self { words }
    }

    /// Whether `token` is allowed.
    pub fn allows(&self, token: u32) -> bool {
        self.words
            .get(token as usize / 32)
            .is_some_and(|w| (w >> (token % 32)) & 1 == 1)
    }

    /// The logits with every disallowed token's set to −∞, so that the rule (top-k, top-p and
    /// the Gumbel-max draw) chooses among the allowed tokens only.
    pub fn apply(&self, logits: &[f32]) -> Vec<f32> {
        logits
            .iter()
            .enumerate()
            .map(|(t, &l)| {
                if self.allows(t as u32) {
                    l
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect()
    }
}

/// [`select`] among the tokens `mask` allows (all of them without a mask).
pub fn select_masked(
    logits: &[f32],
    params: &SamplingParams,
    position: u64,
    mask: Option<&TokenMask>,
) -> u32 {
    match mask {
        None => select(logits, params, position),
        Some(mask) => select(&mask.apply(logits), params, position),
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Gumbel noise for one token at one position: a pure function of its inputs.
pub fn gumbel(seed: u64, position: u64, token: u32) -> f32 {
    let h = mix(
        mix(mix(seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_add(position)).wrapping_add(token as u64),
    );
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-(-u.ln()).ln()) as f32
}

/// The tokens eligible under top-k and top-p, or `None` when every token is.
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Option<Vec<u32>> {
    if params.top_k.is_none() && params.top_p.is_none_or(|p| p >= 1.0) {
        return None;
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if let Some(k) = params.top_k.filter(|k| (*k as usize) < ids.len() && *k > 0) {
        ids.select_nth_unstable_by(k as usize - 1, by_logit);
        ids.truncate(k as usize);
    }
    ids.sort_unstable_by(by_logit);
    if let Some(p) = params.top_p.filter(|p| *p < 1.0) {
        let t = params.temperature.max(1e-6);
        let max = logits[ids[0] as usize];
        let weights: Vec<f64> = ids
            .iter()
            .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut keep = ids.len();
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= p as f64 {
                keep = n + 1;
                break;
            }
        }
        ids.truncate(keep.max(1));
    }
    Some(ids)
}

/// The score a token gets under the rule: its logit for greedy, `logit / T + gumbel` when sampling.
pub fn score(logits: &[f32], params: &SamplingParams, position: u64, token: u32) -> f32 {
    let l = logits[token as usize];
    if params.is_greedy() {
        l
    } else {
        l / params.temperature + gumbel(params.seed, position, token)
    }
}

/// Picks the token at `position` (absolute position in the sequence being generated).
/// Ties go to the lowest token id.
pub fn select(logits: &[f32], params: &SamplingParams, position: u64) -> u32 {
    let pick = |ids: &mut dyn Iterator<Item = u32>| {
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for id in ids {
            let s = score(logits, params, position, id);
            if s > best.0 || (s == best.0 && id < best.1) {
                best = (s, id);
            }
        }
        best.1
    };
    match candidates(logits, params) {
        None => pick(&mut (0..logits.len() as u32)),
        Some(ids) => pick(&mut ids.into_iter()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_12_temperatures_below_the_floor_are_greedy() {
        for t in [0.0, 1e-6, 0.009, f32::NAN, -1.0] {
            assert!(SamplingParams::seeded(t, 3).is_greedy(), "{t}");
        }
        assert!(!SamplingParams::seeded(MIN_TEMPERATURE, 3).is_greedy());
        // A near-zero temperature picks the argmax, whatever the noise.
        let logits = [0.0f32, 1.0, 0.999];
        for pos in 0..100 {
            assert_eq!(select(&logits, &SamplingParams::seeded(1e-7, 9), pos), 1);
        }
    }

    #[test]
    fn a_mask_restricts_the_choice_to_allowed_tokens() {
        let logits = [5.0f32, 4.0, 1.0, 0.0];
        let mask = TokenMask::only(4, &[2, 3]);
        assert!(mask.allows(2) && !mask.allows(0) && !mask.allows(99));
        assert_eq!(
            select_masked(&logits, &SamplingParams::greedy(), 0, Some(&mask)),
            2
        );
        let sampled = SamplingParams::seeded(1.0, 5);
        for pos in 0..200 {
            assert!(select_masked(&logits, &sampled, pos, Some(&mask)) >= 2);
        }
        assert_eq!(
            select_masked(&logits, &SamplingParams::greedy(), 0, None),
            0
        );
    }

    #[test]
    fn penalties_and_biases_adjust_the_logits_as_openai_defines() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(0, -100.0), (3, 2.0), (99, 1.0)],
            ..SamplingParams::greedy()
        };
        let adjusted = params.adjusted(&[1.0, 1.0, 1.0, 1.0], &[1, 1, 2]).unwrap();
        assert_eq!(
            adjusted,
            vec![-99.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 3.0]
        );
        assert_eq!(SamplingParams::greedy().adjusted(&[1.0], &[0]), None);
    }

    #[test]
    fn greedy_is_argmax_with_low_id_tie_break() {
        assert_eq!(
            select(&[0.1, 3.0, 3.0, -1.0], &SamplingParams::greedy(), 0),
            1
        );
    }

    #[test]
    fn gumbel_max_samples_the_softmax() {
        // Empirical frequencies over many positions match softmax(logits / T).
        let logits = [1.0f32, 2.0, 0.0, 2.5];
        let params = SamplingParams::seeded(1.0, 7);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for pos in 0..n {
            counts[select(&logits, &params, pos) as usize] += 1;
        }
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for i in 0..4 {
            let expected = logits[i].exp() / z;
            let got = counts[i] as f32 / n as f32;
            assert!(
                (expected - got).abs() < 0.01,
                "token {i}: expected {expected}, got {got}"
            );
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = (0..50)
            .map(|p| select(&logits, &SamplingParams::seeded(1.0, 1), p))
            .collect();
        let b: Vec<u32> = (0..50)
            .map(|p| select(&logits, &SamplingParams::seeded(1.0, 1), p))
            .collect();
        let c: Vec<u32> = (0..50)
            .map(|p| select(&logits, &SamplingParams::seeded(1.0, 2), p))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_set() {
        let logits = [5.0f32, 4.0, 1.0, 0.0, -3.0];
        let k = SamplingParams {
            top_k: Some(2),
            ..SamplingParams::seeded(1.0, 0)
        };
        assert_eq!(candidates(&logits, &k).unwrap(), vec![0, 1]);
        let p = SamplingParams {
            top_p: Some(0.5),
            ..SamplingParams::seeded(1.0, 0)
        };
        assert_eq!(candidates(&logits, &p).unwrap(), vec![0]);
        for pos in 0..200 {
            assert!(select(&logits, &k, pos) < 2);
        }
    }
}
