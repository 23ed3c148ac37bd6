//! `tessera-engine` runs small GGUF language models on the CPU: it reads the weights through candle's
//! GGUF support, builds the tokenizer and chat template from the file's metadata, and runs a forward
//! pass that serves generation (KV cache, continuous batching) and teacher-forced scoring (logits of
//! every position in one pass) from the same code. A second forward pass on candle tensors
//! ([`device`]) runs the same models on an NVIDIA GPU (the `cuda` feature) or on candle's CPU backend.
//!
//! ```no_run
//! use tessera_engine::{Engine, GenerateOptions, Message, Role};
//! let engine = Engine::load("smollm2-135m", None)?;
//! let prompt = engine.chat_prompt(&[Message::new(Role::User, "What is the capital of France?")]);
//! let out = engine.generate(&prompt, &GenerateOptions::default(), |_| true)?;
//! println!("{}", out.text);
//! # Ok::<(), tessera_engine::Error>(())
//! ```
#![deny(missing_docs)]

pub mod chat;
pub mod device;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod model;
pub mod quant;
pub mod registry;
pub mod sampling;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message, Role};
pub use device::Compute;
pub use engine::{
    Engine, EngineService, Event, FinishReason, GenerateOptions, Generation, LoadOptions,
    ModelInfo, Step, Variant, PREFILL_CHUNK,
};
pub use error::{Error, Result};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;

/// This engine's version, as providers report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
