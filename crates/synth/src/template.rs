//! Prompt templates: text with `{name}` placeholders (`{{` and `}}` for literal braces).

use std::collections::BTreeMap;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Variable(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `source`; an unclosed `{`, a stray `}` or an empty or malformed name is an error.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed `{{{name}` in the template")),
                        }
                    }
                    let name = name.trim().to_owned();
                    if name.is_empty()
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(format!(
                            "`{{{name}}}` is not a variable name (letters, digits, `_`, `-`; write `{{{{` for a literal brace)"
                        ));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Variable(name));
                }
                '}' => {
                    return Err("a stray `}` in the template (write `}}` for a literal one)".into())
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self {
            source: source.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The variables it names, in order of first use.
    pub fn variables(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for p in &self.pieces {
            if let Piece::Variable(v) = p {
                if !names.contains(&v.as_str()) {
                    names.push(v);
                }
            }
        }
        names
    }

    /// The bytes of its literal text alone (a lower bound of any rendering's length).
    pub fn literal_len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Variable(_) => 0,
            })
            .sum()
    }

    /// Fills in the values; a name without a value renders as nothing (specs are checked so
    /// that this cannot happen).
    pub fn render(&self, values: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Variable(v) => out.push_str(values.get(v).map_or("", String::as_str)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_variables_and_literal_braces() {
        let t = Template::parse("Sum {a} and {b}; {{not}} {a}.").unwrap();
        assert_eq!(t.variables(), vec!["a", "b"]);
        let values = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(t.render(&values), "Sum 1 and 2; {not} 1.");
        assert_eq!(t.literal_len(), "Sum  and ; {not} .".len());
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["{unclosed", "a } b", "{}", "{two words}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
