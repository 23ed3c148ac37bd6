//! Tokenizers built from GGUF metadata alone (`tokenizer.ggml.*`), so no `tokenizer.json` is needed.
//!
//! Two families are supported, selected by `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE (Radford et al., 2019) with ranked merges. SmolLM2 additionally splits digits
//!   one by one and adds no prefix space; the GPT-2 pre-tokenizer regex is implemented by hand below
//!   (it needs a look-ahead that the `regex` crate does not have).
//! - `llama`: SentencePiece-style BPE (Kudo & Richardson, 2018) that merges the adjacent pair with the
//!   highest score, with byte fallback (`<0xNN>` tokens) for characters outside the vocabulary. Gemma 3.
//!
//! Control tokens (`<|im_start|>`, `<start_of_turn>`, ...) are recognised in text only when the caller
//! asks for it ([`Tokenizer::encode_with_special`]): the chat template does, user content does not, so a
//! user cannot forge a turn boundary by typing one.

use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// GGUF token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    ByteLevelBpe { split_digits: bool },
    SentencePiece,
}

/// A tokenizer read from a GGUF file.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    family: Family,
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    merges: HashMap<(u32, u32), (u32, u32)>,
    scores: Vec<f32>,
    /// Special tokens recognised in text, longest first.
    specials: Vec<(String, u32)>,
    byte_tokens: [Option<u32>; 256],
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether the model expects BOS at the start.
    pub add_bos: bool,
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            let c = char::from_u32(next).expect("valid");
            next += 1;
            c
        };
    }
    map
}

impl Tokenizer {
    /// Reads the tokenizer of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.string("tokenizer.ggml.model")?;
        let arr = |key: &str| file.value(key).and_then(|v| v.to_vec().map_err(|_| Error::MissingKey { key: key.into() }));
        let tokens: Vec<String> = arr("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| Error::Tokenizer("token is not a string".into())))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match arr("tokenizer.ggml.token_type") {
            Ok(v) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            Err(_) => vec![1; tokens.len()],
        };
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let family = match model {
            "gpt2" => Family::ByteLevelBpe { split_digits: true },
            "llama" => Family::SentencePiece,
            other => return Err(Error::Tokenizer(format!("unsupported tokenizer model `{other}`"))),
        };
        let mut merges = HashMap::new();
        if let Family::ByteLevelBpe { .. } = family {
            for (rank, m) in arr("tokenizer.ggml.merges")?.iter().enumerate() {
                let m = m.to_string().map_err(|_| Error::Tokenizer("merge is not a string".into()))?;
                let (a, b) = m.split_once(' ').ok_or_else(|| Error::Tokenizer(format!("bad merge `{m}`")))?;
                if let (Some(&a), Some(&b), Some(&ab)) = (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}"))) {
                    merges.insert((a, b), (rank as u32, ab));
                }
            }
        }
        let scores = match arr("tokenizer.ggml.scores") {
            Ok(v) => v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect(),
            Err(_) => vec![0.0; tokens.len()],
        };
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                let ty = types[*i];
                !t.is_empty() && (ty == TYPE_CONTROL || (ty == TYPE_USER_DEFINED && t.starts_with('<') && t.ends_with('>')))
            })
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let mut byte_tokens = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TYPE_BYTE || (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')) {
                if let Ok(b) = u8::from_str_radix(&t[3..5], 16) {
                    byte_tokens[b as usize] = Some(i as u32);
                }
            }
        }
        let byte_to_char = bytes_to_chars();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, c)| (*c, b as u8)).collect();
        let id = |key: &str| file.usize(key).ok().map(|x| x as u32);
        let add_bos = file.value("tokenizer.ggml.add_bos_token").ok().and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Ok(Self {
            family,
            tokens,
            types,
            ids,
            merges,
            scores,
            specials,
            byte_tokens,
            byte_to_char,
            char_to_byte,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The string of a token id.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    /// Whether a token is a control token (not text).
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize).is_some_and(|t| *t == TYPE_CONTROL)
    }

    /// Encodes plain text: special-token strings in it are treated as text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_text(text, &mut out);
        out
    }

    /// Encodes text in which special-token strings (e.g. `<|im_start|>`) become their tokens.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (i, _) in rest.char_indices() {
                if let Some((s, id)) = self.specials.iter().find(|(s, _)| rest[i..].starts_with(s.as_str())) {
                    self.encode_text(&rest[..i], &mut out);
                    out.push(*id);
                    rest = &rest[i + s.len()..];
                    continue 'outer;
                }
            }
            self.encode_text(rest, &mut out);
            break;
        }
        out
    }

    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match self.family {
            Family::ByteLevelBpe { split_digits } => {
                for piece in pretokenize_gpt2(text, split_digits) {
                    let symbols: Vec<u32> = piece
                        .bytes()
                        .map(|b| {
                            let c = self.byte_to_char[b as usize];
                            self.ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied().unwrap_or(0)
                        })
                        .collect();
                    out.extend(self.merge_ranked(symbols));
                }
            }
            Family::SentencePiece => self.encode_sentencepiece(&text.replace(' ', "\u{2581}"), out),
        }
    }

    /// Applies the lowest-ranked merge repeatedly (GPT-2 BPE). Pieces are short, so quadratic is fine.
    fn merge_ranked(&self, mut symbols: Vec<u32>) -> Vec<u32> {
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|(rank, id)| (*rank, i, *id)))
                .min();
            match best {
                Some((_, i, id)) => {
                    symbols[i] = id;
                    symbols.remove(i + 1);
                }
                None => return symbols,
            }
        }
    }

    /// SentencePiece BPE: merge the adjacent pair with the best score, via a heap of candidate pairs
    /// (stale entries are skipped when popped), so long texts stay `O(n log n)`.
    fn encode_sentencepiece(&self, text: &str, out: &mut Vec<u32>) {
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        #[derive(PartialEq)]
        struct Cand {
            score: f32,
            left: usize,
            len: usize,
        }
        impl Eq for Cand {}
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Cand>, syms: &[Sym], left: usize| {
            if let Some(right) = syms[left].next {
                let (s, e) = (syms[left].start, syms[right].start + syms[right].len);
                if let Some(&id) = self.ids.get(&text[s..e]) {
                    heap.push(Cand { score: self.scores[id as usize], left, len: e - s });
                }
            }
        };
        for i in 0..syms.len() {
            push(&mut heap, &syms, i);
        }
        while let Some(c) = heap.pop() {
            let Some(right) = syms[c.left].next else { continue };
            if syms[c.left].len == 0 || syms[c.left].len + syms[right].len != c.len {
                continue; // stale
            }
            syms[c.left].len = c.len;
            syms[c.left].next = syms[right].next;
            syms[right].len = 0;
            if let Some(n) = syms[right].next {
                syms[n].prev = Some(c.left);
            }
            if let Some(p) = syms[c.left].prev {
                push(&mut heap, &syms, p);
            }
            push(&mut heap, &syms, c.left);
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let piece = &text[syms[k].start..syms[k].start + syms[k].len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_tokens[b as usize].unwrap_or(0));
                    }
                }
            }
            i = syms[k].next;
        }
    }

    /// The bytes a token stands for (control tokens give their literal text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.tokens.get(id as usize) else { return Vec::new() };
        match self.family {
            Family::ByteLevelBpe { .. } => {
                if self.types[id as usize] == TYPE_CONTROL {
                    return tok.as_bytes().to_vec();
                }
                tok.chars().map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?')).collect()
            }
            Family::SentencePiece => {
                if self.types[id as usize] == TYPE_BYTE {
                    if let Ok(b) = u8::from_str_radix(&tok[3..5], 16) {
                        return vec![b];
                    }
                }
                tok.replace('\u{2581}', " ").into_bytes()
            }
        }
    }

    /// Decodes tokens to text; control tokens are skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_control(id) {
                continue;
            }
            bytes.extend(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Incremental decoding for streaming: emits text only once its UTF-8 bytes are complete.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds a token and returns the text that became complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if tokenizer.is_control(id) {
            return String::new();
        }
        self.pending.extend(tokenizer.token_bytes(id));
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) if e.error_len().is_none() => {
                // An incomplete sequence at the end: emit the valid prefix, keep the rest.
                let valid = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                s
            }
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else {
        Class::Other
    }
}

/// GPT-2's pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// optionally after splitting every digit into its own piece (SmolLM2's `Digits(individual_digits)`).
pub fn pretokenize_gpt2(text: &str, split_digits: bool) -> Vec<&str> {
    let mut pieces = Vec::new();
    if split_digits {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                if start < i {
                    split_gpt2(&text[start..i], &mut pieces);
                }
                pieces.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            split_gpt2(&text[start..], &mut pieces);
        }
    } else {
        split_gpt2(text, &mut pieces);
    }
    pieces
}

fn split_gpt2<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |k: usize| if k < n { chars[k].0 } else { text.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' {
            let rest = &text[chars[i].0..];
            if let Some(len) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].iter().find(|p| rest.starts_with(**p)).map(|p| p.len()) {
                out.push(&rest[..len]);
                i += len; // all ASCII
                continue;
            }
        }
        // ` ?X+` for letters, numbers and other symbols.
        let (body, start) = if c == ' ' && i + 1 < n && class(chars[i + 1].1) != Class::Space { (i + 1, i) } else { (i, i) };
        let cls = class(chars[body].1);
        if cls != Class::Space {
            let mut j = body + 1;
            while j < n && class(chars[j].1) == cls {
                j += 1;
            }
            out.push(&text[at(start)..at(j)]);
            i = j;
            continue;
        }
        // Whitespace: `\s+(?!\S)` then `\s+`.
        let mut j = i;
        while j < n && class(chars[j].1) == Class::Space {
            j += 1;
        }
        if j < n && j - i > 1 {
            j -= 1; // leave the last whitespace to prefix the next word
        }
        out.push(&text[at(i)..at(j)]);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pretokenizer_matches_the_regex() {
        assert_eq!(pretokenize_gpt2("Hello world", false), vec!["Hello", " world"]);
        assert_eq!(pretokenize_gpt2("it's  ok!\n\nYes", false), vec!["it", "'s", " ", " ok", "!", "\n", "\n", "Yes"]);
        assert_eq!(pretokenize_gpt2("a   b", false), vec!["a", "  ", " b"]);
        assert_eq!(pretokenize_gpt2("x \n y", false), vec!["x", " \n", " y"]);
        assert_eq!(pretokenize_gpt2("trailing  ", false), vec!["trailing", "  "]);
    }

    #[test]
    fn digits_are_split_one_by_one() {
        assert_eq!(pretokenize_gpt2("year 2024!", true), vec!["year", " ", "2", "0", "2", "4", "!"]);
    }
}
