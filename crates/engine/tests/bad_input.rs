//! Bad input gets a clear error, never a panic: corrupt and truncated files, unknown architectures,
//! prompts beyond the context window, missing models. A tiny random-weight model stands in where a
//! real one is not needed, beside the real-model checks.

mod support;

use tessera_engine::{Engine, Error, GenerateOptions, Message, Role};

fn tiny(dir: &tempfile::TempDir, arch: &str) -> std::path::PathBuf {
    let path = dir.path().join(format!("tiny-{arch}.gguf"));
    support::write_tiny_gguf(&path, arch);
    path
}

#[test]
fn tiny_random_model_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::load(tiny(&dir, "llama").to_str().unwrap(), Some(1)).unwrap();
    assert_eq!(
        e.tokenizer().encode("hello"),
        vec![e.tokenizer().token_id("hello").unwrap()]
    );
    let p = e.chat_prompt(&[Message::new(Role::User, "hello")]);
    let out = e
        .generate(
            &p,
            &GenerateOptions {
                max_tokens: 8,
                ignore_eos: true,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(out.tokens.len(), 8);
}

#[test]
fn truncated_gguf_is_rejected_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(&dir, "llama");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [10, bytes.len() / 3, bytes.len() - 100] {
        let cut = dir.path().join(format!("cut-{keep}.gguf"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = Engine::load(cut.to_str().unwrap(), Some(1)).unwrap_err();
        assert!(matches!(err, Error::BadGguf { .. }), "{keep}: {err}");
        assert!(err.to_string().contains("not a valid GGUF file"), "{err}");
    }
}

#[test]
fn the_real_model_truncated_is_rejected() {
    support::smollm();
    let real = tessera_engine::registry::resolve("smollm2-135m").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("smollm-cut.gguf");
    let bytes = std::fs::read(&real).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Engine::load(cut.to_str().unwrap(), Some(1)).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn corrupt_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all, just text").unwrap();
    assert!(matches!(
        Engine::load(junk.to_str().unwrap(), Some(1)).unwrap_err(),
        Error::BadGguf { .. }
    ));
    // Right magic, garbage after it.
    let path = tiny(&dir, "llama");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes[8..64].iter_mut() {
        *b = 0xFF;
    }
    let bad = dir.path().join("flipped.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(Engine::load(bad.to_str().unwrap(), Some(1)).is_err());
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Engine::load(tiny(&dir, "mamba").to_str().unwrap(), Some(1)).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(a) if a == "mamba"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::load(tiny(&dir, "llama").to_str().unwrap(), Some(1)).unwrap();
    let long = vec![104u32; 100];
    let err = e
        .generate(&long, &GenerateOptions::default(), |_| true)
        .unwrap_err();
    assert!(
        matches!(err, Error::ContextOverflow { context: 64, .. }),
        "{err}"
    );
    assert!(matches!(
        e.score(&long).unwrap_err(),
        Error::ContextOverflow { .. }
    ));
    // Generation stops at the end of the window instead of overflowing it.
    let out = e
        .generate(
            &vec![104u32; 60],
            &GenerateOptions {
                max_tokens: 50,
                ignore_eos: true,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(out.tokens.len(), 4);
    // The real model too: 8,192 tokens of context.
    let real = support::smollm();
    let err = real
        .generate(&vec![198u32; 9000], &GenerateOptions::default(), |_| true)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("exceed the model's context window of 8192"),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_tokens_are_refused() {
    let real = support::smollm();
    assert!(matches!(
        real.score(&[1, 2, 999_999]).unwrap_err(),
        Error::BadToken(999_999)
    ));
}

#[test]
fn missing_model_says_how_to_fetch_it() {
    let err = tessera_engine::registry::resolve_in(
        std::path::Path::new("/nonexistent/cache"),
        "smollm2-135m",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("tessera model fetch smollm2-135m"),
        "{err}"
    );
    let err = Engine::load("/no/such/file.gguf", Some(1)).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }));
}
