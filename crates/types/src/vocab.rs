//! Token ids to text, on the hub's side: the text an agent receives is the hub's own decoding of
//! the token ids the provider committed to, never text the provider chose.

/// The bytes each token id stands for, from the model file's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vocabulary {
    /// Bytes of each token (control tokens: their literal text, never emitted as output).
    pub tokens: Vec<Vec<u8>>,
    /// Whether each token is a control token (end of turn, BOS, ...): it decodes to nothing.
    pub control: Vec<bool>,
}

/// A token id outside the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownToken(pub u32);

impl std::fmt::Display for UnknownToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token id {} is outside the model's vocabulary", self.0)
    }
}

impl std::error::Error for UnknownToken {}

impl Vocabulary {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The bytes of a token (empty for control tokens).
    pub fn bytes(&self, token: u32) -> Result<&[u8], UnknownToken> {
        let i = token as usize;
        match (self.tokens.get(i), self.control.get(i)) {
            (Some(_), Some(true)) => Ok(&[]),
            (Some(b), _) => Ok(b),
            (None, _) => Err(UnknownToken(token)),
        }
    }
}

/// Incremental decoding with stop strings, as the engine decodes: text is released once its UTF-8
/// bytes are complete; a stop string ends the text before it; text that could still become the
/// start of a stop string is held back until it cannot.
#[derive(Debug, Clone)]
pub struct TextDecoder {
    stop: Vec<String>,
    pending: Vec<u8>,
    text: String,
    released: usize,
    stopped: bool,
}

impl TextDecoder {
    /// A decoder that ends the text at the first of `stop` (empty strings are ignored).
    pub fn new(stop: &[String]) -> Self {
        Self {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: Vec::new(),
            text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// Whether a stop string has appeared (later tokens add nothing).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token; returns the text that may be released now.
    pub fn push(&mut self, vocab: &Vocabulary, token: u32) -> Result<String, UnknownToken> {
        let bytes = vocab.bytes(token)?;
        if self.stopped {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                self.text.push_str(s);
                self.pending.clear();
            }
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                self.text
                    .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                self.pending.drain(..valid);
            }
            Err(_) => {
                self.text.push_str(&String::from_utf8_lossy(&self.pending));
                self.pending.clear();
            }
        }
        Ok(self.release(false))
    }

    /// Ends the text (the job finished or broke off): releases what was held back.
    pub fn finish(&mut self) -> String {
        if !self.stopped && !self.pending.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
        self.release(true)
    }

    /// Every character released so far.
    pub fn text(&self) -> &str {
        &self.text[..self.released]
    }

    fn release(&mut self, all: bool) -> String {
        if !self.stopped {
            // The earliest stop string, searched from where a new one could start.
            let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
            let mut from = self.released.saturating_sub(longest);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(at) = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
                .min()
            {
                self.text.truncate(at.max(self.released));
                self.stopped = true;
            }
        }
        let end = if self.stopped || all {
            self.text.len()
        } else {
            self.text.len() - self.held_back()
        };
        let out = self.text[self.released..end].to_owned();
        self.released = end;
        out
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        hold.min(self.text.len() - self.released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        let words = ["Hel", "lo", " Par", "is", ".", "<eot>", "\u{e9}"];
        let mut tokens: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        // Token 7 and 8: the two bytes of "é" split across tokens.
        tokens.push(vec![0xC3]);
        tokens.push(vec![0xA9]);
        let mut control = vec![false; tokens.len()];
        control[5] = true;
        Vocabulary { tokens, control }
    }

    fn run(stop: &[&str], tokens: &[u32]) -> (Vec<String>, String, bool) {
        let v = vocab();
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut d = TextDecoder::new(&stop);
        let mut pieces: Vec<String> = tokens
            .iter()
            .map(|&t| d.push(&v, t).expect("known"))
            .collect();
        pieces.push(d.finish());
        (pieces, d.text().to_owned(), d.stopped())
    }

    #[test]
    fn decodes_split_characters_and_skips_control_tokens() {
        let (pieces, text, stopped) = run(&[], &[0, 1, 7, 8, 5]);
        assert_eq!(text, "Hello\u{e9}");
        assert_eq!(pieces, vec!["Hel", "lo", "", "\u{e9}", "", ""]);
        assert!(!stopped);
    }

    #[test]
    fn a_stop_string_ends_the_text_and_its_prefix_is_held_back() {
        // " Paris" then "." with stop "is.": " Par" is released, "is" held back, then cut.
        let (pieces, text, stopped) = run(&["is."], &[0, 1, 2, 3, 4, 1]);
        assert_eq!(text, "Hello Par");
        assert_eq!(pieces.concat(), "Hello Par");
        assert_eq!(pieces[3], "", "\"is\" may start the stop string");
        assert!(stopped);
        // A held-back prefix that never completes is released at the end.
        let (_, text, stopped) = run(&["is."], &[2, 3]);
        assert_eq!((text.as_str(), stopped), (" Paris", false));
    }

    #[test]
    fn unknown_tokens_are_errors() {
        let mut d = TextDecoder::new(&[]);
        assert_eq!(d.push(&vocab(), 99), Err(UnknownToken(99)));
    }
}
