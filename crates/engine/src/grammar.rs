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
        let top = match grammar {
            Grammar::ToolCalls {
                functions,
                required,
                parallel,
            } => TopLevelGrammar::from_lark(tool_calls_lark(functions, *required, *parallel)?),
            Grammar::JsonObject | Grammar::JsonSchema { .. } => {
                TopLevelGrammar::from_json_schema(fixed_layout(text)?)
            }
        };
        let parser = self
            .factory
            .create_parser(top)
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

/// A JSON Schema's text with llguidance's layout options: no free whitespace, Python's
/// separators.
fn fixed_layout(text: &str) -> Result<serde_json::Value> {
    let mut schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::Grammar(format!("not JSON: {e}")))?;
    let Some(object) = schema.as_object_mut() else {
        return Err(Error::Grammar("a JSON Schema must be an object".into()));
    };
    object.insert(
        "x-guidance".into(),
        serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Ok(schema)
}

/// The Lark grammar (llguidance's dialect,
/// <https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md>) of
/// [`Grammar::ToolCalls`]: Qwen2.5's (Hermes') call format with each function's name fixed and
/// its arguments under its parameter schema (`%json`), in the fixed layout of
/// [`fixed_layout`]. Without `required`, the alternative is free text that does not start with
/// `<tool_call>`, so the first tokens decide which branch the output takes.
pub fn tool_calls_lark(functions: &str, required: bool, parallel: bool) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Function {
        name: String,
        parameters: serde_json::Value,
    }
    let functions: Vec<Function> = serde_json::from_str(functions)
        .map_err(|e| Error::Grammar(format!("the functions are not a JSON list: {e}")))?;
    if functions.is_empty() {
        return Err(Error::Grammar("no functions to call".into()));
    }
    let mut rules = Vec::new();
    let mut alternatives = Vec::new();
    for (i, f) in functions.iter().enumerate() {
        let valid = !f.name.is_empty()
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(Error::Grammar(format!(
                "the function name `{}` is not letters, digits, `_` or `-`",
                f.name
            )));
        }
        let schema = fixed_layout(&f.parameters.to_string())?;
        // Lark string literals take JSON's escapes: `\n` is the newline, `\"` a quote.
        rules.push(format!(
            r#"call_{i}: "<tool_call>\n{{\"name\": \"{name}\", \"arguments\": " args_{i} "}}\n</tool_call>""#,
            name = f.name
        ));
        rules.push(format!("args_{i}: %json {schema}"));
        alternatives.push(format!("call_{i}"));
    }
    let calls = if parallel {
        r#"calls: call ("\n" call)*"#
    } else {
        "calls: call"
    };
    let start = if required {
        "start: calls"
    } else {
        "start: TEXT | calls\nTEXT: /(?s:.+)/ & ~/(?s:<tool_call>.*)/"
    };
    Ok(format!(
        "{start}\n{calls}\ncall: {}\n{}\n",
        alternatives.join(" | "),
        rules.join("\n")
    ))
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
