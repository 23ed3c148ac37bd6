//! The hub's catalog of models, built where the engine is linked: every known model found in the
//! cache (under its pinned sha256), plus the operator's `--model NAME=PATH.gguf` files (hashed).
//! Only the GGUF metadata is read (the tokenizer's vocabulary and the context window), never the
//! weights.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tessera_engine::gguf::{sha256_file, GgufFile};
use tessera_engine::{registry, Tokenizer};
use tessera_hub::{Catalog, ModelEntry};
use tessera_types::Vocabulary;

/// The catalog for a hub: known models in the cache, then `extra` (`NAME=PATH.gguf`).
pub fn build(extra: &[String]) -> anyhow::Result<Catalog> {
    let mut catalog = Catalog::default();
    for known in registry::KNOWN_MODELS {
        let Ok(path) = registry::resolve(known.name) else {
            tracing::debug!(model = known.name, "not cached; not served by this hub");
            continue;
        };
        match entry(known.name, &path, known.sha256.to_owned()) {
            Ok(e) => catalog.insert(e),
            Err(e) => {
                tracing::warn!(model = known.name, error = %format!("{e:#}"), "cached model unreadable; not served")
            }
        }
    }
    for spec in extra {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--model {spec}: expected NAME=PATH.gguf"))?;
        let path = Path::new(path);
        let sha = sha256_file(path)
            .with_context(|| format!("--model {spec}: reading {}", path.display()))?;
        catalog.insert(entry(name, path, sha).with_context(|| format!("--model {spec}"))?);
    }
    for e in catalog.entries() {
        tracing::info!(model = %e.name, sha256 = %e.sha256, context = e.context_length, vocab = e.vocab.len(), "serving model");
    }
    Ok(catalog)
}

/// One catalog entry from a GGUF file's metadata.
pub fn entry(name: &str, path: &Path, sha256: String) -> anyhow::Result<ModelEntry> {
    let gguf = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let architecture = gguf.string("general.architecture")?.to_owned();
    let context_length = gguf.usize_or(&format!("{architecture}.context_length"), 2048);
    Ok(ModelEntry {
        name: name.to_owned(),
        sha256,
        context_length: u32::try_from(context_length).unwrap_or(u32::MAX),
        vocab: Arc::new(vocabulary(&tokenizer)),
    })
}

/// Token ids to bytes, as the engine decodes them.
pub fn vocabulary(tokenizer: &Tokenizer) -> Vocabulary {
    let n = tokenizer.vocab_size() as u32;
    Vocabulary {
        tokens: (0..n).map(|id| tokenizer.token_bytes(id)).collect(),
        control: (0..n).map(|id| tokenizer.is_control(id)).collect(),
    }
}
