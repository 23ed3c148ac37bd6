//! The `logprobs` objects of responses, in OpenAI's two shapes: chat completions'
//! (`{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal"}`,
//! <https://platform.openai.com/docs/api-reference/chat/object>) and legacy completions'
//! (`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`).
//!
//! The values are the provider's, and a verifier recomputes them from its own pass (see
//! `tessera_types::logprobs`); the token strings are the hub's own decoding of the ids. End-of-turn
//! tokens decode to nothing and are not listed, so the listed tokens concatenate to the text.

use serde_json::{json, Map, Value};
use tessera_types::{TokenLogprobs, Vocabulary};

/// An f32 as the f64 its shortest decimal form reads as (`-0.01`, not `-0.009999999776482582`).
fn short(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// A token's text and bytes, as listed (control tokens by their literal text).
fn piece(vocab: &Vocabulary, token: u32) -> (String, Vec<u8>) {
    let bytes = vocab
        .tokens
        .get(token as usize)
        .cloned()
        .unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The delivered tokens that are listed (not control tokens), with their log-probabilities.
fn listed<'a>(
    vocab: &'a Vocabulary,
    tokens: &'a [u32],
    logprobs: &'a [TokenLogprobs],
) -> impl Iterator<Item = (u32, &'a TokenLogprobs)> + 'a {
    tokens
        .iter()
        .zip(logprobs)
        .filter(|(t, _)| vocab.control.get(**t as usize) != Some(&true))
        .map(|(t, lp)| (*t, lp))
}

/// The `content` entries of a chat `logprobs` object.
pub fn chat_content(vocab: &Vocabulary, tokens: &[u32], logprobs: &[TokenLogprobs]) -> Vec<Value> {
    let entry = |token: u32, logprob: f32| {
        let (text, bytes) = piece(vocab, token);
        json!({"token": text, "logprob": short(logprob), "bytes": bytes})
    };
    listed(vocab, tokens, logprobs)
        .map(|(token, lp)| {
            let mut e = entry(token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(t, v)| entry(t, v)).collect();
            e
        })
        .collect()
}

/// Whether any of these tokens is listed (a stream sends no empty piece without one).
pub fn any_listed(vocab: &Vocabulary, tokens: &[u32], logprobs: &[TokenLogprobs]) -> bool {
    listed(vocab, tokens, logprobs).next().is_some()
}

/// A legacy completion's `logprobs` object; `offset` is the text's length before these tokens.
pub fn completion(
    vocab: &Vocabulary,
    tokens: &[u32],
    logprobs: &[TokenLogprobs],
    mut offset: usize,
) -> Value {
    let (mut texts, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (token, lp) in listed(vocab, tokens, logprobs) {
        let (text, _) = piece(vocab, token);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        values.push(short(lp.logprob));
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|&(t, v)| (piece(vocab, t).0, json!(short(v))))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_list_the_visible_tokens_in_order() {
        let vocab = Vocabulary {
            tokens: vec![b"Hi".to_vec(), b" there".to_vec(), b"<|end|>".to_vec()],
            control: vec![false, false, true],
        };
        let lps = [
            TokenLogprobs {
                logprob: -0.5,
                top: vec![(0, -0.5), (1, -1.5)],
            },
            TokenLogprobs {
                logprob: -0.25,
                top: vec![(1, -0.25), (2, -2.0)],
            },
            TokenLogprobs {
                logprob: -0.1,
                top: vec![(2, -0.1), (0, -3.0)],
            },
        ];
        let content = chat_content(&vocab, &[0, 1, 2], &lps);
        assert_eq!(content.len(), 2, "the end-of-turn token is not listed");
        assert_eq!(content[1]["token"], " there");
        assert_eq!(content[1]["bytes"], json!(b" there".to_vec()));
        assert_eq!(content[1]["top_logprobs"][1]["token"], "<|end|>");
        let legacy = completion(&vocab, &[0, 1, 2], &lps, 0);
        assert_eq!(legacy["tokens"], json!(["Hi", " there"]));
        assert_eq!(legacy["text_offset"], json!([0, 2]));
        assert_eq!(legacy["top_logprobs"][0][" there"], json!(-1.5));
        assert!(!any_listed(&vocab, &[2], &lps[2..]));
    }
}
