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
    ByteLevelBpe {
        split_digits: bool,
    },
    /// Byte-level BPE behind the `qwen2` pre-tokenizer ([`pretokenize_qwen2`]).
    Qwen2Bpe,
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
    /// Whether some special token starts with this byte.
    special_starts: [bool; 256],
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

/// The longest text a prompt may have, in bytes (4 MiB): far more than any supported context window
/// holds (32k tokens are ~130 kB of text), so only abusive requests hit it. Tokenizing is
/// `O(n log n)` anyway; the bound keeps one request's tokenizing work small (issue 10, finding 6).
pub const MAX_TEXT_BYTES: usize = 4 << 20;

/// [`Error::PromptTooLong`] when `bytes` exceeds [`MAX_TEXT_BYTES`].
pub(crate) fn check_text_len(bytes: usize) -> Result<()> {
    if bytes > MAX_TEXT_BYTES {
        return Err(Error::PromptTooLong {
            bytes,
            max: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
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
        let arr = |key: &str| {
            file.value(key).and_then(|v| {
                v.to_vec()
                    .map_err(|_| Error::MissingKey { key: key.into() })
            })
        };
        let tokens: Vec<String> = arr("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| Error::Tokenizer("token is not a string".into()))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match arr("tokenizer.ggml.token_type") {
            Ok(v) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            Err(_) => vec![1; tokens.len()],
        };
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let pre = file.string("tokenizer.ggml.pre").unwrap_or_default();
        let family = match model {
            "gpt2" if pre == "qwen2" => Family::Qwen2Bpe,
            "gpt2" => Family::ByteLevelBpe { split_digits: true },
            "llama" => Family::SentencePiece,
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported tokenizer model `{other}`"
                )))
            }
        };
        let mut merges = HashMap::new();
        if let Family::ByteLevelBpe { .. } | Family::Qwen2Bpe = family {
            for (rank, m) in arr("tokenizer.ggml.merges")?.iter().enumerate() {
                let m = m
                    .to_string()
                    .map_err(|_| Error::Tokenizer("merge is not a string".into()))?;
                let (a, b) = m
                    .split_once(' ')
                    .ok_or_else(|| Error::Tokenizer(format!("bad merge `{m}`")))?;
                if let (Some(&a), Some(&b), Some(&ab)) =
                    (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
                {
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
                !t.is_empty()
                    && (ty == TYPE_CONTROL
                        || (ty == TYPE_USER_DEFINED && t.starts_with('<') && t.ends_with('>')))
            })
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let mut special_starts = [false; 256];
        for (s, _) in &specials {
            special_starts[s.as_bytes()[0] as usize] = true;
        }
        let mut byte_tokens = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TYPE_BYTE || (t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')) {
                if let Ok(b) = u8::from_str_radix(&t[3..5], 16) {
                    byte_tokens[b as usize] = Some(i as u32);
                }
            }
        }
        let byte_to_char = bytes_to_chars();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let id = |key: &str| file.usize(key).ok().map(|x| x as u32);
        let add_bos = file
            .value("tokenizer.ggml.add_bos_token")
            .ok()
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            family,
            tokens,
            types,
            ids,
            merges,
            scores,
            specials,
            special_starts,
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
        self.types
            .get(id as usize)
            .is_some_and(|t| *t == TYPE_CONTROL)
    }

    /// Encodes plain text: special-token strings in it are treated as text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_text(text, &mut out);
        out
    }

    /// [`Tokenizer::encode`], refusing texts longer than [`MAX_TEXT_BYTES`] with
    /// [`Error::PromptTooLong`]: what callers that take text from the network should use.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>> {
        check_text_len(text.len())?;
        Ok(self.encode(text))
    }

    /// The number of tokens `text` encodes to (plain text, as [`Tokenizer::encode`]).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.encode(text).len()
    }

    /// Encodes text in which special-token strings (e.g. `<|im_start|>`) become their tokens.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            // Only bytes that start some special token are tried, so long texts stay linear.
            for (i, _) in rest
                .char_indices()
                .filter(|(i, _)| self.special_starts[rest.as_bytes()[*i] as usize])
            {
                if let Some((s, id)) = self
                    .specials
                    .iter()
                    .find(|(s, _)| rest[i..].starts_with(s.as_str()))
                {
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
            Family::ByteLevelBpe { .. } | Family::Qwen2Bpe => {
                let pieces = match self.family {
                    Family::ByteLevelBpe { split_digits } => pretokenize_gpt2(text, split_digits),
                    _ => pretokenize_qwen2(text),
                };
                for piece in pieces {
                    let symbols: Vec<u32> = piece
                        .bytes()
                        .map(|b| {
                            let c = self.byte_to_char[b as usize];
                            self.ids
                                .get(c.encode_utf8(&mut [0; 4]) as &str)
                                .copied()
                                .unwrap_or(0)
                        })
                        .collect();
                    out.extend(self.merge_ranked(symbols));
                }
            }
            Family::SentencePiece => self.encode_sentencepiece(&text.replace(' ', "\u{2581}"), out),
        }
    }

    /// Applies the lowest-ranked merge repeatedly (GPT-2 BPE), leftmost first among equal ranks.
    ///
    /// A pre-token can be arbitrarily long (a 2 MB run of letters is one piece), so this must not be
    /// quadratic (issue 10, finding 6). Symbols form a linked list and candidate pairs sit in a
    /// min-heap ordered by `(rank, left position)`; entries whose symbols have since merged are
    /// skipped when popped. That picks exactly the pair the naive "scan for the best pair" loop
    /// picks at every step (the live pairs are all in the heap, and positions keep their order), so
    /// the token ids are unchanged, in `O(n log n)`. llama.cpp's BPE works the same way.
    fn merge_ranked(&self, symbols: Vec<u32>) -> Vec<u32> {
        self.merge_ranked_counting(symbols).0
    }

    /// [`Tokenizer::merge_ranked`], also returning the number of heap entries popped (the work done).
    fn merge_ranked_counting(&self, mut symbols: Vec<u32>) -> (Vec<u32>, usize) {
        use std::cmp::Reverse;
        let n = symbols.len();
        if n < 2 {
            return (symbols, 0);
        }
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        // (rank, left, right, left id, right id, merged id)
        #[allow(clippy::type_complexity)] // the tuple described above, ordered as a tuple
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize, u32, u32, u32)>> = BinaryHeap::new();
        let candidate = |symbols: &[u32], left: usize, right: usize| {
            self.merges
                .get(&(symbols[left], symbols[right]))
                .map(|&(rank, id)| Reverse((rank, left, right, symbols[left], symbols[right], id)))
        };
        for i in 0..n - 1 {
            heap.extend(candidate(&symbols, i, i + 1));
        }
        let mut pops = 0;
        while let Some(Reverse((_, left, right, a, b, id))) = heap.pop() {
            pops += 1;
            if !alive[left]
                || !alive[right]
                || next[left] != right
                || symbols[left] != a
                || symbols[right] != b
            {
                continue; // stale: one of its symbols has merged since
            }
            symbols[left] = id;
            alive[right] = false;
            next[left] = next[right];
            if next[right] != NONE {
                prev[next[right]] = left;
            }
            if prev[left] != NONE {
                heap.extend(candidate(&symbols, prev[left], left));
            }
            if next[left] != NONE {
                heap.extend(candidate(&symbols, left, next[left]));
            }
        }
        let out = symbols
            .iter()
            .zip(&alive)
            .filter(|(_, a)| **a)
            .map(|(s, _)| *s)
            .collect();
        (out, pops)
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
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Cand>, syms: &[Sym], left: usize| {
            if let Some(right) = syms[left].next {
                let (s, e) = (syms[left].start, syms[right].start + syms[right].len);
                if let Some(&id) = self.ids.get(&text[s..e]) {
                    heap.push(Cand {
                        score: self.scores[id as usize],
                        left,
                        len: e - s,
                    });
                }
            }
        };
        for i in 0..syms.len() {
            push(&mut heap, &syms, i);
        }
        while let Some(c) = heap.pop() {
            let Some(right) = syms[c.left].next else {
                continue;
            };
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
        let Some(tok) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.family {
            Family::ByteLevelBpe { .. } | Family::Qwen2Bpe => {
                if self.types[id as usize] == TYPE_CONTROL {
                    return tok.as_bytes().to_vec();
                }
                tok.chars()
                    .map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?'))
                    .collect()
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

/// [`class`] by Unicode general category (`\p{L}`, `\p{N}`), as llama.cpp's regex classes are:
/// combining marks (Thai vowel signs, ...) are not letters, though `char::is_alphabetic` says they are.
fn unicode_class(c: char) -> Class {
    use unicode_categories::UnicodeCategories;
    if c.is_whitespace() {
        Class::Space
    } else if c.is_letter() {
        Class::Letter
    } else if c.is_number() {
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

/// Qwen2's pre-tokenizer (llama.cpp's `qwen2` pre-type, Hugging Face's `Split` of Qwen2's
/// `tokenizer.json`):
/// `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
/// matched by hand (the look-ahead is beyond the `regex` crate), in one linear pass: each branch
/// below is one alternative, tried in the regex's order.
pub fn pretokenize_qwen2(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |k: usize| if k < n { chars[k].0 } else { text.len() };
    let cls = |k: usize| unicode_class(chars[k].1);
    let newline = |k: usize| matches!(chars[k].1, '\r' | '\n');
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions, ASCII case-insensitive.
        if c == '\'' {
            let lower: String = chars[i + 1..n.min(i + 3)]
                .iter()
                .map(|(_, c)| c.to_ascii_lowercase())
                .collect();
            if let Some(len) = ["re", "ve", "ll", "s", "t", "m", "d"]
                .iter()
                .find(|p| lower.starts_with(**p))
                .map(|p| p.len())
            {
                out.push(&text[at(i)..at(i + 1 + len)]);
                i += 1 + len;
                continue;
            }
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        let lead = cls(i) != Class::Letter && cls(i) != Class::Number && !newline(i);
        let body = if lead { i + 1 } else { i };
        if body < n && cls(body) == Class::Letter {
            let mut j = body + 1;
            while j < n && cls(j) == Class::Letter {
                j += 1;
            }
            out.push(&text[at(i)..at(j)]);
            i = j;
            continue;
        }
        // `\p{N}`: one digit at a time.
        if cls(i) == Class::Number {
            out.push(&text[at(i)..at(i + 1)]);
            i += 1;
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let body = if c == ' ' { i + 1 } else { i };
        if body < n && cls(body) == Class::Other {
            let mut j = body + 1;
            while j < n && cls(j) == Class::Other {
                j += 1;
            }
            while j < n && newline(j) {
                j += 1;
            }
            out.push(&text[at(i)..at(j)]);
            i = j;
            continue;
        }
        // Whitespace (the only class left): `\s*[\r\n]+` ends after the run's last newline.
        let mut run = i;
        while run < n && cls(run) == Class::Space {
            run += 1;
        }
        if let Some(last) = (i..run).rev().find(|&k| newline(k)) {
            out.push(&text[at(i)..at(last + 1)]);
            i = last + 1;
            continue;
        }
        // `\s+(?!\S)`, else `\s+`: leave the run's last space to prefix the next word.
        let end = if run < n && run - i > 1 { run - 1 } else { run };
        out.push(&text[at(i)..at(end)]);
        i = end;
    }
    out
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
            if let Some(len) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
                .iter()
                .find(|p| rest.starts_with(**p))
                .map(|p| p.len())
            {
                out.push(&rest[..len]);
                i += len; // all ASCII
                continue;
            }
        }
        // ` ?X+` for letters, numbers and other symbols.
        let (body, start) = if c == ' ' && i + 1 < n && class(chars[i + 1].1) != Class::Space {
            (i + 1, i)
        } else {
            (i, i)
        };
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
        assert_eq!(
            pretokenize_gpt2("Hello world", false),
            vec!["Hello", " world"]
        );
        assert_eq!(
            pretokenize_gpt2("it's  ok!\n\nYes", false),
            vec!["it", "'s", " ", " ok", "!", "\n", "\n", "Yes"]
        );
        assert_eq!(pretokenize_gpt2("a   b", false), vec!["a", "  ", " b"]);
        assert_eq!(pretokenize_gpt2("x \n y", false), vec!["x", " \n", " y"]);
        assert_eq!(
            pretokenize_gpt2("trailing  ", false),
            vec!["trailing", "  "]
        );
    }

    /// A byte-level BPE tokenizer over the 256 byte symbols plus `merges` (in rank order).
    fn toy_bpe(merges: &[(&str, &str)]) -> Tokenizer {
        let byte_to_char = bytes_to_chars();
        let mut tokens: Vec<String> = byte_to_char.iter().map(|c| c.to_string()).collect();
        for (a, b) in merges {
            tokens.push(format!("{a}{b}"));
        }
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(r, (a, b))| ((ids[*a], ids[*b]), (r as u32, ids[&format!("{a}{b}")])))
            .collect();
        Tokenizer {
            family: Family::ByteLevelBpe { split_digits: true },
            types: vec![1; tokens.len()],
            scores: vec![0.0; tokens.len()],
            tokens,
            ids,
            merges,
            specials: Vec::new(),
            special_starts: [false; 256],
            byte_tokens: [None; 256],
            char_to_byte: byte_to_char
                .iter()
                .enumerate()
                .map(|(b, c)| (*c, b as u8))
                .collect(),
            byte_to_char,
            bos: None,
            eos: None,
            add_bos: false,
        }
    }

    /// The merge loop as it was: scan for the lowest-ranked pair, leftmost first, merge, repeat.
    fn naive_merge(t: &Tokenizer, mut symbols: Vec<u32>) -> Vec<u32> {
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    t.merges
                        .get(&(w[0], w[1]))
                        .map(|(rank, id)| (*rank, i, *id))
                })
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

    const TOY_MERGES: &[(&str, &str)] = &[
        ("a", "a"),
        ("a", "b"),
        ("b", "a"),
        ("aa", "aa"),
        ("ab", "a"),
        ("b", "b"),
        ("aa", "b"),
        ("aaaa", "aaaa"),
        ("ba", "ab"),
        ("bb", "a"),
    ];

    #[test]
    fn heap_merge_gives_the_same_tokens_as_the_naive_loop() {
        let t = toy_bpe(TOY_MERGES);
        let mut seed = 7u64;
        for len in 0..200 {
            let text: String = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ['a', 'b', 'c'][(seed >> 33) as usize % 3]
                })
                .collect();
            let symbols: Vec<u32> = text
                .bytes()
                .map(|b| t.ids[&t.byte_to_char[b as usize].to_string()])
                .collect();
            assert_eq!(
                t.merge_ranked(symbols.clone()),
                naive_merge(&t, symbols),
                "{text}"
            );
        }
    }

    /// Issue 10, finding 6: a long run of letters is one pre-token, and the merge loop was quadratic
    /// in it (a 2 MB prompt kept a node busy for hours). Now the work is linear in the merges done.
    #[test]
    fn finding_6_two_megabytes_of_letters_tokenize_in_linear_work() {
        let t = toy_bpe(TOY_MERGES);
        let n = 2 << 20;
        let text = "ab".repeat(n / 4) + &"a".repeat(n / 2);
        let start = std::time::Instant::now();
        let symbols: Vec<u32> = text
            .bytes()
            .map(|b| t.ids[&t.byte_to_char[b as usize].to_string()])
            .collect();
        let (merged, pops) = t.merge_ranked_counting(symbols);
        // Every pop is an initial pair or one of the (at most two) pairs a merge creates.
        assert!(pops <= 3 * n, "{pops} heap pops for {n} symbols");
        assert!(merged.len() < n / 2);
        // The whole path, pre-tokenizer included (one piece: all letters).
        assert_eq!(pretokenize_gpt2(&text, true).len(), 1);
        let ids = t.encode(&text);
        assert_eq!(ids, merged);
        // Generous: seconds in an optimised build, even on a loaded machine (it took hours before).
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{:?}",
            start.elapsed()
        );
        // Over the cap, a typed error instead of work.
        let huge = "a".repeat(MAX_TEXT_BYTES + 1);
        assert!(matches!(
            t.try_encode(&huge),
            Err(Error::PromptTooLong {
                max: MAX_TEXT_BYTES,
                ..
            })
        ));
        assert_eq!(t.try_encode("abab").unwrap(), t.encode("abab"));
        assert_eq!(t.count_tokens("abab"), t.encode("abab").len());
    }

    #[test]
    fn qwen2_pretokenizer_matches_the_regex() {
        let p = pretokenize_qwen2;
        assert_eq!(p("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            p("it's  OK'S!\n\nYes"),
            vec!["it", "'s", " ", " OK", "'S", "!\n\n", "Yes"]
        );
        assert_eq!(p("year 2024!"), vec!["year", " ", "2", "0", "2", "4", "!"]);
        assert_eq!(p("a   b"), vec!["a", "  ", " b"]);
        assert_eq!(p("x \n y"), vec!["x", " \n", " y"]);
        assert_eq!(
            p("def f(x):\n\treturn x+1"),
            vec!["def", " f", "(x", "):\n", "\treturn", " x", "+", "1"]
        );
        assert_eq!(p("trailing  "), vec!["trailing", "  "]);
        assert_eq!(p("(hello"), vec!["(hello"]);
        assert_eq!(p("日本語 テキスト"), vec!["日本語", " テキスト"]);
        assert_eq!(p("🙂🙂 ok"), vec!["🙂🙂", " ok"]);
        assert_eq!(p("a\n\n  b"), vec!["a", "\n\n", " ", " b"]);
    }

    #[test]
    fn digits_are_split_one_by_one() {
        assert_eq!(
            pretokenize_gpt2("year 2024!", true),
            vec!["year", " ", "2", "0", "2", "4", "!"]
        );
    }
}
