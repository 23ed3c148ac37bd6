//! Grammar-constrained decoding (OpenAI's `response_format`) with llguidance
//! (<https://github.com/guidance-ai/llguidance>): a JSON Schema is compiled against this model's
//! own vocabulary (a token trie of each token's bytes) into a matcher that gives, at every
//! position, the set of tokens that keep the output a prefix of a valid document.
//!
//! Both sides of verification run this module: the provider masks its logits before the sampling
//! rule picks, and the verifier replays the claimed tokens through the same matcher to get the same
//! masks. Everything here is deterministic in the grammar text and the token sequence. The JSON
//! layout is fixed (`", "` and `": "` separators, no free whitespace), so a small model cannot
//! spend its budget on whitespace and both sides compile the same grammar.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use tessera_types::sampling::{Grammar, TokenMask};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Largest schema text compiled, bytes (the hub refuses larger ones first).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Compiles grammars for one model's vocabulary (built once per engine: the token trie and
/// llguidance's slicer are the costly part).
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab: usize,
    stop_tokens: Vec<u32>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler over `tokenizer`'s vocabulary; `stop_tokens` end a finished document (the
    /// first is the grammar's end-of-sequence token).
    pub fn new(tokenizer: &Tokenizer, vocab: usize, stop_tokens: &[u32]) -> Result<Self> {
        let eos = *stop_tokens
            .first()
            .ok_or_else(|| Error::Grammar("the model has no end-of-turn token".into()))?;
        // Control tokens get llguidance's special-token marker, so no grammar matches them as
        // text; every other token is its bytes.
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) || stop_tokens.contains(&id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend(bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let trie =
            TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words).with_eos_tokens(stop_tokens);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Grammar(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory,
            vocab,
            stop_tokens: stop_tokens.to_vec(),
        })
    }

    /// A fresh matcher for `grammar`, or why it does not compile.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let text = grammar.schema_text();
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(Error::Grammar(format!(
                "the schema has {} bytes, more than {MAX_SCHEMA_BYTES}",
                text.len()
            )));
        }
        let mut schema: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Grammar(format!("not JSON: {e}")))?;
        let Some(object) = schema.as_object_mut() else {
            return Err(Error::Grammar("a JSON Schema must be an object".into()));
        };
        object.insert(
            "x-guidance".into(),
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| Error::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Grammar(e));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            stop_tokens: self.stop_tokens.clone(),
        })
    }

    /// The mask at every position of `tokens` under `grammar`, as a verifier needs them. Stops
    /// early (fewer masks than tokens) at the first token the grammar does not allow.
    pub fn masks(&self, grammar: &Grammar, tokens: &[u32]) -> Result<Vec<TokenMask>> {
        let mut constraint = self.compile(grammar)?;
        let mut masks = Vec::with_capacity(tokens.len());
        for &token in tokens {
            let mask = constraint.next_mask();
            let allowed = mask.allows(token);
            masks.push(mask);
            if !allowed {
                break;
            }
            constraint.accept(token);
        }
        Ok(masks)
    }
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    stop_tokens: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next. A finished document allows only the end-of-turn tokens; a
    /// matcher in error (it cannot be, as only allowed tokens are accepted) ends the output the
    /// same way, so provider and verifier agree in every case.
    pub fn next_mask(&mut self) -> TokenMask {
        let end = || TokenMask::only(self.vocab, &self.stop_tokens);
        if self.matcher.is_stopped() {
            return end();
        }
        match self.matcher.compute_mask() {
            Ok(vob) => {
                let mut words = vob.as_slice().to_vec();
                words.resize(self.vocab.div_ceil(32), 0);
                if words.iter().any(|w| *w != 0) {
                    TokenMask::from_words(words)
                } else {
                    end()
                }
            }
            Err(_) => end(),
        }
    }

    /// Advances past `token` (one the last mask allowed).
    pub fn accept(&mut self, token: u32) {
        if !self.matcher.is_stopped() {
            // An error leaves the matcher stopped, which `next_mask` handles.
            let _ = self.matcher.consume_token(token);
        }
    }
}
