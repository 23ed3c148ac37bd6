//! The models this hub serves, each a public name pinned to one file's sha256.
//!
//! A provider signs only the sha256 of the file it runs; the name agents ask for and the
//! context window come from here, never from the provider, so a provider cannot serve another
//! file under a known name (and escape verification, since verifiers must hold the same file).
//! The hub also needs each model's [`Vocabulary`]: the text an agent receives is the hub's own
//! decoding of the token ids a provider committed to.

use std::sync::Arc;

use tessera_types::Vocabulary;

/// One model a hub serves.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// The public name agents request (`smollm2-135m`).
    pub name: String,
    /// sha256 of the GGUF file (hex).
    pub sha256: String,
    /// The model's context window, tokens.
    pub context_length: u32,
    /// Token ids to bytes.
    pub vocab: Arc<Vocabulary>,
}

/// The models a hub serves (the known models the operator has, plus any it added).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: Vec<Arc<ModelEntry>>,
}

impl Catalog {
    /// Adds a model; a later entry with the same name or sha256 replaces the earlier one.
    pub fn insert(&mut self, entry: ModelEntry) {
        self.entries
            .retain(|e| e.name != entry.name && e.sha256 != entry.sha256);
        self.entries.push(Arc::new(entry));
    }

    /// The entry pinned to a file.
    pub fn by_sha256(&self, sha256: &str) -> Option<Arc<ModelEntry>> {
        self.entries.iter().find(|e| e.sha256 == sha256).cloned()
    }

    /// The entry for a name, or for a sha256 (a signed request pins the file).
    pub fn lookup(&self, name_or_sha256: &str) -> Option<Arc<ModelEntry>> {
        self.entries
            .iter()
            .find(|e| e.name == name_or_sha256 || e.sha256 == name_or_sha256)
            .cloned()
    }

    /// Every entry.
    pub fn entries(&self) -> &[Arc<ModelEntry>] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, sha: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            sha256: sha.into(),
            context_length: 8,
            vocab: Arc::default(),
        }
    }

    #[test]
    fn names_and_files_are_pinned_one_to_one() {
        let mut c = Catalog::default();
        c.insert(entry("a", "01"));
        c.insert(entry("b", "02"));
        assert_eq!(c.lookup("a").map(|e| e.sha256.clone()), Some("01".into()));
        assert_eq!(c.lookup("02").map(|e| e.name.clone()), Some("b".into()));
        assert!(c.by_sha256("03").is_none());
        // Re-pinning a name drops the old file.
        c.insert(entry("a", "03"));
        assert!(c.by_sha256("01").is_none());
        assert_eq!(c.entries().len(), 2);
    }
}
