//! Node errors.

/// Everything that stops a provider node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The wallet could not be loaded or could not sign.
    #[error("wallet: {0}")]
    Wallet(#[from] tessera_protocol::Error),
    /// The model could not be loaded.
    #[error("engine: {0}")]
    Engine(#[from] tessera_engine::Error),
    /// The WebSocket connection failed.
    #[error("connection: {0}")]
    Connection(#[from] tokio_tungstenite::tungstenite::Error),
    /// The hub refused the registration (no stake, bad signature, …); retrying would not help.
    #[error("hub rejected the registration: {0}")]
    Rejected(String),
    /// The hub broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Bad configuration.
    #[error("config: {0}")]
    Config(String),
    /// A stop asked by a signal could not finish cleanly within its bound.
    #[error("shutdown: {0}")]
    Shutdown(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
