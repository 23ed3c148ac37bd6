//! The contracts' Rust bindings and the compiled artifacts.
//!
//! The Solidity sources live in `contracts/`; `contracts/artifacts.json` holds their ABI and
//! creation bytecode as compiled by solcjs (`contracts/compile.js`). The compiled file is
//! committed because `cargo build` must not need Node.js; the `artifacts_are_fresh` test
//! recompiles the sources and fails when the committed file is stale.

use alloy_primitives::Bytes;
use alloy_sol_types::sol;

use crate::{Error, Result};

sol! {
    /// The test stablecoin (`contracts/TestUsd.sol`): ERC-20, EIP-2612, EIP-3009.
    interface TestUsd {
        event Transfer(address indexed from, address indexed to, uint256 value);
        function name() external view returns (string memory);
        function version() external view returns (string memory);
        function balanceOf(address account) external view returns (uint256);
        function mint(address to, uint256 value) external;
        function approve(address spender, uint256 value) external returns (bool);
        function transfer(address to, uint256 value) external returns (bool);
        function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
        function transferWithAuthorization(
            address from,
            address to,
            uint256 value,
            uint256 validAfter,
            uint256 validBefore,
            bytes32 nonce,
            bytes signature
        ) external;
    }

    /// The vault (`contracts/TesseraVault.sol`).
    interface TesseraVault {
        event Deposited(address indexed account, address indexed from, uint256 amount);
        event Withdrawn(bytes32 indexed id, address indexed to, uint256 amount);
        function token() external view returns (address);
        function operator() external view returns (address);
        function paid(bytes32 id) external view returns (bool);
        function deposit(address account, uint256 amount) external;
        function withdraw(bytes32 id, address to, uint256 amount) external;
        function holdings() external view returns (uint256);
        event Staked(bytes32 indexed id, address indexed provider, uint256 amount);
        event Unstaked(bytes32 indexed id, address indexed provider, uint256 amount);
        event Unbonded(bytes32 indexed id, address indexed provider, uint256 amount);
        event Slashed(bytes32 indexed epoch, address indexed provider, uint256 amount);
        function applied(bytes32 id) external view returns (bool);
        function stakeOf(address provider) external view returns (uint256);
        function unbondingOf(address provider) external view returns (uint256);
        function totalStaked() external view returns (uint256);
        function totalUnbonding() external view returns (uint256);
        function stake(bytes32 id, address provider, uint256 amount) external;
        function unstake(bytes32 id, address provider, uint256 amount) external;
        function unbond(bytes32 id, address provider, uint256 amount) external;
        function slash(bytes32 epoch, address[] providers, uint256[] amounts) external;
    }

    /// The vault's constructor arguments.
    struct VaultConstructor {
        address token;
        address operator;
    }
}

/// The committed compiler output.
const ARTIFACTS: &str = include_str!("../contracts/artifacts.json");

/// A contract's creation bytecode from the committed artifacts.
pub fn creation_code(contract: &'static str) -> Result<Bytes> {
    let artifacts: serde_json::Value =
        serde_json::from_str(ARTIFACTS).map_err(|e| Error::Artifacts(e.to_string()))?;
    let hex = artifacts["contracts"][contract]["bytecode"]
        .as_str()
        .ok_or_else(|| Error::Artifacts(format!("no bytecode for {contract}")))?;
    hex.parse()
        .map_err(|e| Error::Artifacts(format!("{contract} bytecode: {e}")))
}

/// The committed artifacts, as text (for the freshness check).
pub fn artifacts_json() -> &'static str {
    ARTIFACTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_contracts_have_bytecode() {
        for name in ["TestUsd", "TesseraVault"] {
            let code = creation_code(name).unwrap();
            assert!(code.len() > 100, "{name} bytecode is {} bytes", code.len());
        }
        assert!(matches!(creation_code("Nope"), Err(Error::Artifacts(_))));
    }
}
