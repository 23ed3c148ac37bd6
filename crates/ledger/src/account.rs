//! Account identities: wallets by 0x address, and the protocol's system accounts.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use tessera_protocol::Address;

use crate::{Error, Result};

/// An account the protocol itself owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemAccount {
    /// Source of minted money and sink of burned money; its balance is `-(minted - burned)`.
    Issuance,
    /// Protocol treasury: the remainder of slashes.
    Treasury,
    /// Protocol fees taken from captured escrow.
    Fees,
    /// Money held in open escrows.
    Escrow,
    /// Money bonded as provider stake.
    Stake,
    /// Stake waiting out its unbonding period.
    Unbonding,
}

impl SystemAccount {
    /// Every system account.
    pub const ALL: [SystemAccount; 6] = [
        Self::Issuance,
        Self::Treasury,
        Self::Fees,
        Self::Escrow,
        Self::Stake,
        Self::Unbonding,
    ];

    /// The account's id in the database, `system:<name>`.
    pub const fn id(self) -> &'static str {
        match self {
            Self::Issuance => "system:issuance",
            Self::Treasury => "system:treasury",
            Self::Fees => "system:fees",
            Self::Escrow => "system:escrow",
            Self::Stake => "system:stake",
            Self::Unbonding => "system:unbonding",
        }
    }
}

/// Any account: a wallet or a system account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountId {
    /// A wallet, by its Ethereum address.
    Wallet(Address),
    /// A protocol-owned account.
    System(SystemAccount),
}

impl AccountId {
    /// The id as stored: lower-case `0x…` for wallets, `system:<name>` otherwise.
    pub fn key(&self) -> String {
        match self {
            Self::Wallet(address) => format!("{address:#x}"),
            Self::System(system) => system.id().to_owned(),
        }
    }
}

impl From<Address> for AccountId {
    fn from(address: Address) -> Self {
        Self::Wallet(address)
    }
}

impl From<SystemAccount> for AccountId {
    fn from(system: SystemAccount) -> Self {
        Self::System(system)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

impl FromStr for AccountId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(system) = SystemAccount::ALL.into_iter().find(|a| a.id() == s) {
            return Ok(Self::System(system));
        }
        s.parse::<Address>()
            .map(Self::Wallet)
            .map_err(|_| Error::InvalidAccount(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in SystemAccount::ALL.map(AccountId::System) {
            assert_eq!(id.key().parse::<AccountId>().unwrap(), id);
        }
        let wallet = AccountId::Wallet(Address::repeat_byte(0xab));
        assert_eq!(wallet.key(), format!("0x{}", "ab".repeat(20)));
        assert_eq!(wallet.key().parse::<AccountId>().unwrap(), wallet);
        assert!(matches!(
            "system:nope".parse::<AccountId>(),
            Err(Error::InvalidAccount(_))
        ));
    }
}
