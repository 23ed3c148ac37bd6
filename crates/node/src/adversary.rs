//! Misbehaviour on purpose, for tests, benchmarks and the demo: only in builds with the
//! `adversary` feature, so a production node cannot be switched into cheating by a flag.

use tessera_engine::Variant;

/// How a deliberately dishonest node cheats (to demonstrate and test slashing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cheat {
    /// Serve the model re-quantized to Q4_0: cheaper weights, same file hash.
    #[value(name = "requantized-q4-0")]
    RequantizedQ40,
    /// Skip the model's last two layers.
    SkipLayers,
    /// As a verifier, answer "pass" without running the model (saves the check's cost).
    LazyVerifier,
    /// As a verifier, answer "fail" to every check (to get honest providers slashed).
    LyingVerifier,
    /// Pad every answer: after the honest tokens, send as many again (to bill more than it
    /// generated, or more than `max_tokens`).
    PadTokens,
    /// Generate without the request's grammar (`response_format`), as if it were plain text,
    /// while the commitment claims the grammar.
    IgnoreGrammar,
    /// Generate without the request's presence/frequency penalties and logit biases, while the
    /// commitment claims them.
    IgnorePenalties,
    /// Report invented log-probabilities (`logprobs`): every token as near certain, its
    /// alternatives as equally likely.
    FakeLogprobs,
}

impl Cheat {
    /// The engine variant the node serves with.
    pub fn variant(self) -> Variant {
        match self {
            Cheat::RequantizedQ40 => Variant::RequantizedQ4_0,
            Cheat::SkipLayers => Variant::SkipLastLayers(2),
            Cheat::LazyVerifier
            | Cheat::LyingVerifier
            | Cheat::PadTokens
            | Cheat::IgnoreGrammar
            | Cheat::IgnorePenalties
            | Cheat::FakeLogprobs => Variant::Faithful,
        }
    }
}

/// Invented log-probabilities in place of the computed ones (the shape stays right).
pub(crate) fn fake_logprobs(mut lp: tessera_types::TokenLogprobs) -> tessera_types::TokenLogprobs {
    lp.logprob = -0.01;
    let n = lp.top.len().max(1) as f32;
    for (_, v) in &mut lp.top {
        *v = -n.ln();
    }
    lp
}

/// The verdict a cheating verifier gives without checking, if it is one.
pub(crate) fn scripted_verdict(cheat: Option<Cheat>) -> Option<tessera_proof::Verdict> {
    let passed = match cheat? {
        Cheat::LazyVerifier => true,
        Cheat::LyingVerifier => false,
        _ => return None,
    };
    Some(tessera_proof::Verdict {
        passed,
        reason: (!passed).then_some(tessera_proof::Reason::PromptMismatch),
        stats: Default::default(),
    })
}
