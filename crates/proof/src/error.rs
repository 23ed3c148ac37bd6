//! Errors of the proof crate (running the engine for a check or a simulated provider).

/// What can go wrong outside the verdict itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] tessera_engine::Error),
    /// A saved job could not be read.
    #[error("bad job file: {0}")]
    BadJob(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
