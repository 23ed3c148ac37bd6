//! Errors of the engine.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model name that is neither cached nor a path to a file.
    #[error("model `{name}` is not available locally; fetch it with `tessera model fetch {name}` or pass a path to a .gguf file")]
    ModelNotFound {
        /// The name or path asked for.
        name: String,
    },
    /// The file is not a readable GGUF file (truncated, corrupt, wrong magic).
    #[error("{path}: not a valid GGUF file: {reason}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A metadata key the architecture needs is missing or has the wrong type.
    #[error("GGUF metadata key `{key}` is missing or invalid")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A tensor that cannot be used.
    #[error("tensor `{name}`: {reason}")]
    BadTensor {
        /// The tensor's GGUF name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// The file's `general.architecture` is not one this engine runs.
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    /// The prompt plus the requested tokens do not fit the context window.
    #[error("{tokens} tokens exceed the model's context window of {context} tokens")]
    ContextOverflow {
        /// Tokens needed.
        tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// A prompt's text is longer than the engine tokenizes ([`crate::tokenizer::MAX_TEXT_BYTES`]).
    #[error("the prompt has {bytes} bytes of text, more than the {max} the engine accepts")]
    PromptTooLong {
        /// Bytes of text in the prompt.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    /// A grammar (JSON Schema) that llguidance cannot compile.
    #[error("the grammar cannot be compiled: {0}")]
    Grammar(String),
    /// Invalid request parameters.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The tokenizer metadata is unusable.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Fetching a model failed.
    #[error("fetching `{name}` failed: {reason}")]
    Fetch {
        /// The model name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The compute device asked for cannot be used (no CUDA support in this build, no GPU, a driver
    /// error).
    #[error("compute device `{device}` is unavailable: {reason}")]
    DeviceUnavailable {
        /// The device asked for (`cuda:0`, ...).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The engine thread has stopped.
    #[error("the engine has shut down")]
    EngineStopped,
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
