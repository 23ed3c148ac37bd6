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
///
/// Stake: the ledger moves a provider's balance into stake, starts its unbonding and returns
/// matured unbonded stake to the balance; the operator records each movement here under the
/// ledger transaction's id (`applied[id]` makes each one count once). Stake never leaves the
/// vault's holdings: `stakeOf` and `unbondingOf` label part of what the vault holds, so the
/// holdings still equal deposits minus withdrawals, and anyone can read a provider's bonded
/// stake on-chain. Slashes the ledger recorded are applied once per epoch (`slash`, one id per
/// epoch), reducing the slashed providers' `stakeOf`; what was slashed stays in the vault,
/// owed to the accounts the ledger shared it to.
contract TesseraVault {
    IERC20 public immutable token;
    address public operator;
    /// Withdrawal ids already paid.
    mapping(bytes32 => bool) public paid;
    /// Stake movements and slash epochs already applied.
    mapping(bytes32 => bool) public applied;
    /// A provider's bonded stake.
    mapping(address => uint256) public stakeOf;
    /// A provider's unbonding stake (not yet returned to its balance).
    mapping(address => uint256) public unbondingOf;
    /// Sum of `stakeOf`.
    uint256 public totalStaked;
    /// Sum of `unbondingOf`.
    uint256 public totalUnbonding;

    event Deposited(address indexed account, address indexed from, uint256 amount);
    event Withdrawn(bytes32 indexed id, address indexed to, uint256 amount);
    event OperatorChanged(address indexed previous, address indexed next);
    event Staked(bytes32 indexed id, address indexed provider, uint256 amount);
    event Unstaked(bytes32 indexed id, address indexed provider, uint256 amount);
    event Unbonded(bytes32 indexed id, address indexed provider, uint256 amount);
    event Slashed(bytes32 indexed epoch, address indexed provider, uint256 amount);

    modifier onlyOperator() {
        require(msg.sender == operator, "TesseraVault: caller is not the operator");
        _;
    }

    modifier once(bytes32 id) {
        require(!applied[id], "TesseraVault: already applied");
        applied[id] = true;
        _;
    }

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
    function withdraw(bytes32 id, address to, uint256 amount) external onlyOperator {
        require(!paid[id], "TesseraVault: withdrawal already paid");
        paid[id] = true;
        require(token.transfer(to, amount), "TesseraVault: transfer failed");
        emit Withdrawn(id, to, amount);
    }

    /// Records `amount` of `provider`'s balance bonded as stake (ledger transaction `id`).
    function stake(bytes32 id, address provider, uint256 amount) external onlyOperator once(id) {
        stakeOf[provider] += amount;
        totalStaked += amount;
        emit Staked(id, provider, amount);
    }

    /// Records `amount` of `provider`'s stake starting to unbond (ledger transaction `id`).
    function unstake(bytes32 id, address provider, uint256 amount) external onlyOperator once(id) {
        stakeOf[provider] -= amount;
        totalStaked -= amount;
        unbondingOf[provider] += amount;
        totalUnbonding += amount;
        emit Unstaked(id, provider, amount);
    }

    /// Records `amount` of matured unbonding stake returned to `provider`'s balance.
    function unbond(bytes32 id, address provider, uint256 amount) external onlyOperator once(id) {
        unbondingOf[provider] -= amount;
        totalUnbonding -= amount;
        emit Unbonded(id, provider, amount);
    }

    /// Applies one epoch's slashes: `amounts[i]` taken from `providers[i]`'s stake. Once per epoch.
    function slash(bytes32 epoch, address[] calldata providers, uint256[] calldata amounts)
        external
        onlyOperator
        once(epoch)
    {
        require(providers.length == amounts.length, "TesseraVault: length mismatch");
        for (uint256 i = 0; i < providers.length; i++) {
            stakeOf[providers[i]] -= amounts[i];
            totalStaked -= amounts[i];
            emit Slashed(epoch, providers[i], amounts[i]);
        }
    }

    /// Hands the operator role to a new key.
    function setOperator(address next) external onlyOperator {
        require(next != address(0), "TesseraVault: zero operator");
        emit OperatorChanged(operator, next);
        operator = next;
    }

    /// Token units the vault holds: what the audit reconciles with the ledger.
    function holdings() external view returns (uint256) {
        return token.balanceOf(address(this));
    }
}
