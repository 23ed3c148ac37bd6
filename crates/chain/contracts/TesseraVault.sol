// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.26;

interface IERC20 {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
    function balanceOf(address account) external view returns (uint256);
}

/// @title TesseraVault: where a Tessera hub's money lives on-chain.
/// @notice Holds the stablecoin behind the hub's ledger. Anyone deposits for an account; the hub
/// credits the account after its confirmations. Withdrawals are hub-submitted transfers: the
/// hub debits the ledger first, then its operator key calls `withdraw` with the ledger's
/// withdrawal id; `paid[id]` makes each withdrawal payable once, whatever the hub retries after
/// a crash. The operator is set at deployment and can hand over to a new key; no key is built
/// in. x402 payments name this vault as their pay-to address, so they land here too.
contract TesseraVault {
    IERC20 public immutable token;
    address public operator;
    /// Withdrawal ids already paid.
    mapping(bytes32 => bool) public paid;

    event Deposited(address indexed account, address indexed from, uint256 amount);
    event Withdrawn(bytes32 indexed id, address indexed to, uint256 amount);
    event OperatorChanged(address indexed previous, address indexed next);

    constructor(IERC20 token_, address operator_) {
        require(operator_ != address(0), "TesseraVault: zero operator");
        token = token_;
        operator = operator_;
    }

    /// Moves `amount` from the caller (who approved the vault) into the vault, for `account`.
    function deposit(address account, uint256 amount) external {
        require(account != address(0), "TesseraVault: zero account");
        require(amount > 0, "TesseraVault: zero amount");
        require(token.transferFrom(msg.sender, address(this), amount), "TesseraVault: transfer failed");
        emit Deposited(account, msg.sender, amount);
    }

    /// Pays withdrawal `id`, which the hub has already debited from the ledger. Once per id.
    function withdraw(bytes32 id, address to, uint256 amount) external {
        require(msg.sender == operator, "TesseraVault: caller is not the operator");
        require(!paid[id], "TesseraVault: withdrawal already paid");
        paid[id] = true;
        require(token.transfer(to, amount), "TesseraVault: transfer failed");
        emit Withdrawn(id, to, amount);
    }

    /// Hands the operator role to a new key.
    function setOperator(address next) external {
        require(msg.sender == operator, "TesseraVault: caller is not the operator");
        require(next != address(0), "TesseraVault: zero operator");
        emit OperatorChanged(operator, next);
        operator = next;
    }

    /// Token units the vault holds: what the audit reconciles with the ledger.
    function holdings() external view returns (uint256) {
        return token.balanceOf(address(this));
    }
}
