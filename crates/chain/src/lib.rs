//! `tessera-chain`: the bridge between Tessera's ledger and an EVM chain.
//!
//! Money exists on-chain as a stablecoin held by the `TesseraVault` contract
//! (`contracts/TesseraVault.sol`). Deposits are `Deposited` events the hub credits after its
//! confirmations ([`Chain::deposits`]); withdrawals are hub-submitted transfers the vault pays
//! once per id ([`Chain::pay_withdrawal`]). Stake movements and slashes the ledger made are
//! recorded in the vault once per id ([`Chain::apply_stake_move`], [`Chain::apply_slashes`]).
//! For development and tests, [`Anvil`] runs a local chain and [`deploy`] puts a test stablecoin (`contracts/TestUsd.sol`, EIP-2612 and EIP-3009)
//! and a vault on it. This crate reads and writes the chain only; the hub moves the ledger.
#![deny(missing_docs)]

mod anvil;
mod client;
pub mod contracts;
mod error;
pub mod x402;

pub use alloy_signer_local::PrivateKeySigner;
pub use anvil::{anvil_binary, install_dev_tools, Anvil, DevTools, ANVIL_ENV};
pub use client::{deploy, Chain, Contracts, Deposit, OnChainStake, StakeMove};
pub use error::{Error, Result};

/// Reads an operator key file: one hex private key (`0x` optional), whitespace ignored.
pub fn read_key_file(path: &std::path::Path) -> Result<PrivateKeySigner> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a hex private key: {e}", path.display()),
        ))
    })
}

/// The vault's id of a withdrawal or stake movement: keccak256 of the ledger key that made it.
pub fn withdrawal_id(ledger_key: &str) -> alloy_primitives::B256 {
    alloy_primitives::keccak256(ledger_key.as_bytes())
}
