//! What can go wrong making a dataset.

use std::path::PathBuf;

/// An error of a synth run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is wrong; nothing was sent and no money moved.
    #[error("{}:{line}: {message}", path.display())]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// 1-based line of the offending value.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The spec is fine but cannot run on this hub (the model is not served, the budget cannot
    /// pay for one row at the hub's prices); nothing was sent and no money moved.
    #[error("{}:{line}: {message}", path.display())]
    Unrunnable {
        /// The spec file.
        path: PathBuf,
        /// 1-based line of the value that cannot be met.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing the output directory.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The row store holds a line that is not a row (other than a torn last line).
    #[error("{path}:{line}: not a row of this store: {message}", path = path.display())]
    Store {
        /// The store file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parse error.
        message: String,
    },
    /// The hub.
    #[error(transparent)]
    Agent(#[from] tessera_agent::Error),
    /// Writing Parquet.
    #[error("writing parquet: {0}")]
    Parquet(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
