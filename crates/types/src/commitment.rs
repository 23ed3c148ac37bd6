//! The inference commitment a provider ships with every result.
//!
//! Per generated position the provider records five logits from its own forward pass, as IEEE
//! half floats: the logit of the token it emitted, then the four largest logits in descending order.
//! That is 10 bytes per generated token. Ids of the top four are not needed: the verifier compares
//! *values* (its own top four, sorted, against the committed ones), and the emitted token's id is the
//! output itself. The header binds the record to the model (file sha256), the exact prompt tokens,
//! the output tokens, the sampling parameters, seed, stop strings and the claimed finish reason, so a
//! commitment cannot be moved to another job. [`Commitment::digest`] is what a provider signs.
//!
//! Why f16 and not bf16: bf16 rounds by up to 0.125 for |logit| in 32–64, as large as honest noise
//! between implementations; f16's step there is 1/32 and 1/64 for 16–32.

use crate::sampling::SamplingParams;
use base64::Engine as _;
use half::f16;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The commitment format version this crate writes and checks.
pub const VERSION: u8 = 1;
/// Logits committed per position: the emitted token's, then the top four.
pub const VALUES_PER_POSITION: usize = 5;

/// Why generation ended, as claimed by the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model emitted an end-of-turn / end-of-sequence token (the last output token).
    Eos,
    /// A requested stop string appeared.
    StopSequence,
    /// `max_tokens` was reached.
    Length,
    /// The client cancelled.
    Cancelled,
}

/// The request a commitment answers, as far as verification is concerned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// sha256 of the model file that must have run.
    pub model_sha256: String,
    /// Prompt tokens.
    pub prompt_tokens: Vec<u32>,
    /// Sampling rule and seed.
    pub sampling: SamplingParams,
    /// Token budget.
    pub max_tokens: u32,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A provider's commitment to one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commitment {
    /// Format version ([`VERSION`]).
    pub version: u8,
    /// sha256 of the model file.
    pub model_sha256: String,
    /// sha256 of the prompt tokens (little-endian u32s).
    pub prompt_hash: String,
    /// sha256 of the output tokens.
    pub output_hash: String,
    /// Sampling rule and seed used.
    pub sampling: SamplingParams,
    /// Token budget.
    pub max_tokens: u32,
    /// sha256 of the stop strings.
    pub stop_hash: String,
    /// Claimed finish reason.
    pub finish: Finish,
    /// Number of generated positions.
    pub positions: u32,
    /// `positions × 5` f16 values, little-endian, base64.
    pub values: String,
}

/// sha256 of a token sequence.
pub fn hash_tokens(tokens: &[u32]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// sha256 of the stop strings (length-prefixed, so the split is unambiguous).
pub fn hash_stop(stop: &[String]) -> String {
    let mut h = Sha256::new();
    for s in stop {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The five values committed for one position: the emitted token's logit and the top four.
pub fn position_values(logits: &[f32], token: u32) -> [f32; VALUES_PER_POSITION] {
    let mut top = [f32::NEG_INFINITY; 4];
    for &v in logits {
        if v > top[3] {
            let mut i = 3;
            while i > 0 && v > top[i - 1] {
                top[i] = top[i - 1];
                i -= 1;
            }
            top[i] = v;
        }
    }
    let own = logits.get(token as usize).copied().unwrap_or(f32::NAN);
    [own, top[0], top[1], top[2], top[3]]
}

/// Builds a commitment incrementally while generating (negligible cost: one pass over the logits).
#[derive(Debug, Clone)]
pub struct CommitmentBuilder {
    model_sha256: String,
    prompt_hash: String,
    sampling: SamplingParams,
    max_tokens: u32,
    stop_hash: String,
    tokens: Vec<u32>,
    bytes: Vec<u8>,
}

/// IEEE half-float bits of the five values committed for a position.
pub fn position_bits(logits: &[f32], token: u32) -> [u16; VALUES_PER_POSITION] {
    position_values(logits, token).map(|v| f16::from_f32(v).to_bits())
}

impl CommitmentBuilder {
    /// Starts a commitment for a job.
    pub fn new(spec: JobSpec) -> Self {
        Self::for_prompt_hash(&spec, hash_tokens(&spec.prompt_tokens))
    }

    /// Starts a commitment whose prompt is known only by its hash (the hub's side: it does not
    /// tokenize; `spec.prompt_tokens` is ignored).
    pub fn for_prompt_hash(spec: &JobSpec, prompt_hash: String) -> Self {
        Self {
            model_sha256: spec.model_sha256.clone(),
            prompt_hash,
            sampling: spec.sampling.clone(),
            max_tokens: spec.max_tokens,
            stop_hash: hash_stop(&spec.stop),
            tokens: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Records one generated token and the logits it was selected from.
    pub fn push(&mut self, logits: &[f32], token: u32) {
        self.push_bits(token, position_bits(logits, token));
    }

    /// Records a token with explicit values (used to simulate forged commitments).
    pub fn push_values(&mut self, token: u32, values: [f32; VALUES_PER_POSITION]) {
        self.push_bits(token, values.map(|v| f16::from_f32(v).to_bits()));
    }

    /// Records a token with the half-float bits of its values, as streamed on the wire.
    pub fn push_bits(&mut self, token: u32, bits: [u16; VALUES_PER_POSITION]) {
        self.tokens.push(token);
        for b in bits {
            self.bytes.extend(b.to_le_bytes());
        }
    }

    /// The tokens recorded so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Replaces the prompt hash (known to the hub only once the provider reports it).
    pub fn set_prompt_hash(&mut self, prompt_hash: String) {
        self.prompt_hash = prompt_hash;
    }

    /// The commitment so far, with a finish reason.
    pub fn commitment(&self, finish: Finish) -> Commitment {
        Commitment {
            version: VERSION,
            model_sha256: self.model_sha256.clone(),
            prompt_hash: self.prompt_hash.clone(),
            output_hash: hash_tokens(&self.tokens),
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop_hash: self.stop_hash.clone(),
            finish,
            positions: self.tokens.len() as u32,
            values: base64::engine::general_purpose::STANDARD.encode(&self.bytes),
        }
    }

    /// Finishes the commitment.
    pub fn finish(self, finish: Finish) -> Commitment {
        self.commitment(finish)
    }
}

impl Commitment {
    /// The per-position values, or why they cannot be read.
    pub fn decode_values(&self) -> Result<Vec<[f32; VALUES_PER_POSITION]>, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.values)
            .map_err(|e| format!("values are not base64: {e}"))?;
        let per = VALUES_PER_POSITION * 2;
        if bytes.len() != self.positions as usize * per {
            return Err(format!(
                "values hold {} bytes, expected {} for {} positions",
                bytes.len(),
                self.positions as usize * per,
                self.positions
            ));
        }
        Ok(bytes
            .chunks_exact(per)
            .map(|c| {
                let mut v = [0f32; VALUES_PER_POSITION];
                for (i, x) in v.iter_mut().enumerate() {
                    *x = f16::from_le_bytes([c[2 * i], c[2 * i + 1]]).to_f32();
                }
                v
            })
            .collect())
    }

    /// Payload bytes per generated token (the binary size of the per-position record).
    pub fn bytes_per_token(&self) -> f64 {
        (VALUES_PER_POSITION * 2) as f64
    }

    /// sha256 over a canonical encoding of the whole commitment: what a provider signs.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([self.version]);
        for s in [
            &self.model_sha256,
            &self.prompt_hash,
            &self.output_hash,
            &self.stop_hash,
            &self.values,
        ] {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        h.update(self.sampling.temperature.to_le_bytes());
        h.update(
            self.sampling
                .top_k
                .map_or(u64::MAX, |k| k as u64)
                .to_le_bytes(),
        );
        h.update(self.sampling.top_p.map_or(f32::NAN, |p| p).to_le_bytes());
        h.update(self.sampling.seed.to_le_bytes());
        h.update(self.max_tokens.to_le_bytes());
        h.update([self.finish as u8]);
        h.update(self.positions.to_le_bytes());
        // Appended only when present, so unconstrained commitments keep their digest.
        if let Some(grammar) = &self.sampling.grammar {
            h.update(b"grammar");
            h.update(grammar.hash());
        }
        if self.sampling.adjusts_logits() {
            h.update(b"penalties");
            h.update(self.sampling.presence_penalty.to_le_bytes());
            h.update(self.sampling.frequency_penalty.to_le_bytes());
            h.update((self.sampling.logit_bias.len() as u64).to_le_bytes());
            for (t, b) in &self.sampling.logit_bias {
                h.update(t.to_le_bytes());
                h.update(b.to_le_bytes());
            }
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_f16() {
        let spec = JobSpec {
            model_sha256: "ab".into(),
            prompt_tokens: vec![1, 2],
            sampling: SamplingParams::greedy(),
            max_tokens: 8,
            stop: vec![],
        };
        let mut b = CommitmentBuilder::new(spec);
        b.push(&[0.5, 3.25, -1.0, 2.0, 1.0, 0.0], 3);
        let c = b.finish(Finish::Length);
        let v = c.decode_values().unwrap();
        assert_eq!(v, vec![[2.0, 3.25, 2.0, 1.0, 0.5]]);
        assert_eq!(c.output_hash, hash_tokens(&[3]));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Commitment>(&json).unwrap(), c);
    }

    #[test]
    fn digest_changes_with_any_field() {
        let spec = JobSpec {
            model_sha256: "ab".into(),
            prompt_tokens: vec![1],
            sampling: SamplingParams::greedy(),
            max_tokens: 8,
            stop: vec![],
        };
        let mut b = CommitmentBuilder::new(spec);
        b.push(&[1.0, 2.0], 1);
        let c = b.finish(Finish::Eos);
        let mut d = c.clone();
        d.sampling.seed = 1;
        assert_ne!(c.digest(), d.digest());
        let mut d = c.clone();
        d.finish = Finish::Length;
        assert_ne!(c.digest(), d.digest());
        let mut d = c.clone();
        d.sampling.grammar = Some(crate::sampling::Grammar::JsonObject);
        let mut e = d.clone();
        e.sampling.grammar = Some(crate::sampling::Grammar::JsonSchema {
            schema: r#"{"type":"array"}"#.into(),
        });
        assert_ne!(c.digest(), d.digest());
        assert_ne!(d.digest(), e.digest());
        let mut d = c.clone();
        d.sampling.frequency_penalty = 0.5;
        assert_ne!(c.digest(), d.digest());
        let mut d = c.clone();
        d.sampling.logit_bias = vec![(1, 5.0)];
        assert_ne!(c.digest(), d.digest());
    }
}
