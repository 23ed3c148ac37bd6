//! What can go wrong talking to a hub.

/// An error from the hub's API or the way to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hub could not be reached or the connection broke.
    #[error("cannot reach the hub: {0}")]
    Transport(String),
    /// The hub answered with an error in OpenAI's shape.
    #[error("the hub refused ({status} {code}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// OpenAI error code (`insufficient_quota`, `model_not_found`, ...), or the error type.
        code: String,
        /// The hub's message.
        message: String,
    },
    /// A session key's spending policy refused the act; `limit` names the limit
    /// (`perDayCap`, `models`, `revoked`, ...). Nothing was spent.
    #[error("the spending policy refused (limit {limit}): {message}")]
    Policy {
        /// The limit's name, as in the signed `SpendingPolicy`.
        limit: String,
        /// The hub's message.
        message: String,
    },
    /// Signing needs a wallet, and this client has none ([`crate::Client::with_key`]).
    #[error("this client has no wallet to sign with")]
    NoWallet,
    /// The hub answered with something this SDK does not understand.
    #[error("unexpected answer from the hub: {0}")]
    Decode(String),
    /// Signing failed.
    #[error("signing: {0}")]
    Signing(#[from] tessera_protocol::Error),
}

impl Error {
    /// Whether the same request may succeed if sent again later (the provider failed, the
    /// network is busy, the connection broke), as opposed to one that will fail the same way.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(_) => true,
            Error::Api { status, .. } => *status == 429 || *status >= 500,
            Error::Policy { .. } | Error::NoWallet | Error::Decode(_) | Error::Signing(_) => false,
        }
    }

    /// A short, stable name for counting failures by reason.
    pub fn reason(&self) -> String {
        match self {
            Error::Transport(_) => "transport".into(),
            Error::Api { code, .. } => code.clone(),
            Error::Policy { limit, .. } => format!("policy:{limit}"),
            Error::NoWallet => "no_wallet".into(),
            Error::Decode(_) => "decode".into(),
            Error::Signing(_) => "signing".into(),
        }
    }
}

impl From<ureq::Error> for Error {
    fn from(e: ureq::Error) -> Self {
        Error::Transport(e.to_string())
    }
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
