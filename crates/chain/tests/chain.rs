//! The contracts on a real anvil: deployment, deposits seen as events, withdrawals paid once,
//! stake records and slash epochs applied once, the operator check, and the committed artifacts matching a fresh solcjs compile.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use alloy_primitives::{Address, B256};
use tessera_chain::{
    deploy, install_dev_tools, Anvil, Chain, DevTools, Error, OnChainStake, StakeMove,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tools() -> &'static DevTools {
    static TOOLS: OnceLock<DevTools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        install_dev_tools(&repo_root().join("scripts/setup-chain.sh")).expect("setup-chain.sh")
    })
}

struct Setup {
    anvil: Anvil,
    operator: Chain,
    user: Chain,
}

async fn setup() -> Setup {
    let anvil = Anvil::start_with(&tools().anvil, 31337, &[]).unwrap();
    let keys = anvil.dev_keys().to_vec();
    let operator_key = keys[1].clone();
    let contracts = deploy(anvil.rpc_url(), keys[0].clone(), operator_key.address())
        .await
        .unwrap();
    let operator = Chain::connect(anvil.rpc_url(), contracts, Some(operator_key))
        .await
        .unwrap();
    let user = Chain::connect(anvil.rpc_url(), contracts, Some(keys[2].clone()))
        .await
        .unwrap();
    Setup {
        anvil,
        operator,
        user,
    }
}

#[tokio::test]
async fn stake_records_and_slash_epochs_apply_once_and_only_from_the_operator() {
    let Setup {
        anvil,
        operator,
        user,
    } = setup().await;
    let provider = Address::repeat_byte(0x51);
    let stake = |staked, unbonding| OnChainStake { staked, unbonding };
    let id = |n: u8| B256::repeat_byte(n);
    assert!(operator
        .apply_stake_move(id(1), StakeMove::Stake, provider, 1_000)
        .await
        .unwrap()
        .is_some());
    // The same id again records nothing.
    assert_eq!(
        operator
            .apply_stake_move(id(1), StakeMove::Stake, provider, 1_000)
            .await
            .unwrap(),
        None
    );
    operator
        .apply_stake_move(id(2), StakeMove::Unstake, provider, 300)
        .await
        .unwrap();
    assert_eq!(operator.stake_of(provider).await.unwrap(), stake(700, 300));
    operator
        .apply_stake_move(id(3), StakeMove::Unbond, provider, 300)
        .await
        .unwrap();
    // Unstaking more than is recorded reverts (checked arithmetic) and changes nothing.
    let over = operator
        .apply_stake_move(id(4), StakeMove::Unstake, provider, 701)
        .await;
    assert!(over.is_err(), "{over:?}");
    assert!(!operator.applied(id(4)).await.unwrap());

    let epoch = id(9);
    operator
        .apply_slashes(epoch, &[(provider, 200)])
        .await
        .unwrap();
    assert_eq!(
        operator
            .apply_slashes(epoch, &[(provider, 200)])
            .await
            .unwrap(),
        None,
        "an epoch applies once"
    );
    assert_eq!(operator.stake_of(provider).await.unwrap(), stake(500, 0));
    assert_eq!(operator.total_stake().await.unwrap(), stake(500, 0));
    // Only the operator records stake; none of it moves tokens.
    let refused = user
        .apply_stake_move(id(5), StakeMove::Stake, provider, 1)
        .await;
    assert!(
        matches!(refused, Err(Error::Rpc(ref m)) if m.contains("not the operator")),
        "{refused:?}"
    );
    assert_eq!(operator.vault_holdings().await.unwrap(), 0);
    drop(anvil);
}

#[tokio::test]
async fn deposits_are_events_and_withdrawals_pay_once() {
    let Setup {
        anvil,
        operator,
        user,
    } = setup().await;
    let me = user.sender().unwrap();
    let account = Address::repeat_byte(0x42);
    user.mint_test_tokens(me, 10_000_000).await.unwrap();
    let (tx_hash, block) = user.deposit(account, 2_500_000).await.unwrap();
    assert_eq!(operator.vault_holdings().await.unwrap(), 2_500_000);
    assert_eq!(user.token_balance(me).await.unwrap(), 7_500_000);

    let deposits = operator
        .deposits(0, operator.head().await.unwrap())
        .await
        .unwrap();
    assert_eq!(deposits.len(), 1);
    let d = deposits[0];
    assert_eq!(
        (d.account, d.from, d.amount, d.block, d.tx_hash),
        (account, me, 2_500_000, block, tx_hash)
    );
    // Blocks before the deposit hold none.
    assert!(operator.deposits(0, block - 1).await.unwrap().is_empty());

    let id = B256::repeat_byte(1);
    let to = Address::repeat_byte(0x77);
    assert!(operator
        .pay_withdrawal(id, to, 1_000_000)
        .await
        .unwrap()
        .is_some());
    assert_eq!(operator.token_balance(to).await.unwrap(), 1_000_000);
    // A retry of the same withdrawal pays nothing.
    assert_eq!(
        operator.pay_withdrawal(id, to, 1_000_000).await.unwrap(),
        None
    );
    assert_eq!(operator.token_balance(to).await.unwrap(), 1_000_000);
    assert_eq!(operator.vault_holdings().await.unwrap(), 1_500_000);

    // Only the operator can pay out.
    let refused = user.pay_withdrawal(B256::repeat_byte(2), me, 1).await;
    assert!(
        matches!(refused, Err(Error::Rpc(ref m)) if m.contains("not the operator")),
        "{refused:?}"
    );
    assert_eq!(operator.vault_holdings().await.unwrap(), 1_500_000);
    drop(anvil);
}

#[tokio::test]
async fn committed_artifacts_match_the_sources() {
    let out = std::env::temp_dir().join(format!("tessera-artifacts-{}.json", std::process::id()));
    let status = std::process::Command::new("node")
        .arg(repo_root().join("crates/chain/contracts/compile.js"))
        .arg(&tools().solcjs)
        .arg(&out)
        .status()
        .expect("node");
    assert!(status.success());
    let fresh = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        fresh == tessera_chain::contracts::artifacts_json(),
        "contracts/artifacts.json is stale: run `node crates/chain/contracts/compile.js $TESSERA_SOLCJS crates/chain/contracts/artifacts.json`"
    );
}
