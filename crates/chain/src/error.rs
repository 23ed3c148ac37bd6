//! The chain crate's errors.

/// What can go wrong talking to the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The JSON-RPC endpoint failed or refused a call (a reverted transaction included).
    #[error("chain RPC: {0}")]
    Rpc(String),
    /// A transaction was mined but reverted.
    #[error("transaction {0} reverted")]
    Reverted(alloy_primitives::B256),
    /// A call's return data or a log did not decode.
    #[error("decoding chain data: {0}")]
    Decode(#[from] alloy_sol_types::Error),
    /// An on-chain amount does not fit the ledger's micro-units.
    #[error("on-chain amount {0} does not fit in micro-units")]
    AmountTooLarge(alloy_primitives::U256),
    /// Sending a transaction needs a signer and none was configured.
    #[error("no signer configured for sending transactions")]
    NoSigner,
    /// The local chain (anvil) could not be started.
    #[error("starting anvil: {0}")]
    Anvil(String),
    /// The contract artifacts are malformed.
    #[error("contract artifacts: {0}")]
    Artifacts(String),
    /// A deployment's transaction receipt names no contract.
    #[error("deployment of {0} produced no contract address")]
    NoContractAddress(&'static str),
    /// File or process I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl<E: std::fmt::Display> From<alloy_provider::transport::RpcError<E>> for Error {
    fn from(e: alloy_provider::transport::RpcError<E>) -> Self {
        Self::Rpc(e.to_string())
    }
}

/// The chain crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
