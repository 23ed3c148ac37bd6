//! [`Chain`]: the vault and token as seen through a JSON-RPC endpoint (anvil or any EVM
//! network), with the hub's operator key when it sends transactions.

use alloy_network::{EthereumWallet, TransactionBuilder};
use alloy_primitives::{Address, Bytes, B256, U256};
use alloy_provider::{DynProvider, Provider, ProviderBuilder};
use alloy_rpc_types_eth::{Filter, TransactionReceipt, TransactionRequest};
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::{SolCall, SolEvent, SolValue};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::contracts::{creation_code, TesseraVault, TestUsd, VaultConstructor};
use crate::{Error, Result};

/// Where the contracts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contracts {
    /// The stablecoin the vault holds.
    pub token: Address,
    /// The vault.
    pub vault: Address,
}

/// A deposit the vault recorded (`Deposited` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposit {
    /// The ledger account credited.
    pub account: Address,
    /// Who paid the tokens in.
    pub from: Address,
    /// Token units (= micro-units).
    pub amount: u64,
    /// The block it is in.
    pub block: u64,
    /// The transaction.
    pub tx_hash: B256,
    /// The log's index in its block.
    pub log_index: u64,
}

impl Deposit {
    /// The ledger idempotency key naming this deposit once, across restarts and replicas.
    pub fn ledger_key(&self) -> String {
        format!("chain-deposit:{:#x}:{}", self.tx_hash, self.log_index)
    }
}

/// A movement of stake the ledger made, as the vault records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StakeMove {
    /// Balance bonded as stake (`stake`).
    Stake,
    /// Stake started unbonding (`unstake`).
    Unstake,
    /// Matured unbonding stake returned to the balance (`unbond`).
    Unbond,
}

/// A provider's stake as the vault records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnChainStake {
    /// Bonded stake.
    pub staked: u64,
    /// Stake unbonding, not yet returned to the balance.
    pub unbonding: u64,
}

/// A connection to the chain with the contracts' addresses.
#[derive(Clone)]
pub struct Chain {
    provider: DynProvider,
    contracts: Contracts,
    sender: Option<Address>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("contracts", &self.contracts)
            .field("sender", &self.sender)
            .finish()
    }
}

/// Seconds to wait for a sent transaction's receipt before giving up (it may still be mined; the
/// callers' retries are safe because the contracts refuse a second payment).
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(60);

async fn provider(rpc_url: &str, signer: Option<PrivateKeySigner>) -> Result<DynProvider> {
    // The nonce is read from the chain for every transaction (not cached): a transaction the
    // node refused must not leave a gap that stalls every later one.
    let builder = ProviderBuilder::default()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id();
    Ok(match signer {
        Some(signer) => builder
            .wallet(EthereumWallet::from(signer))
            .connect(rpc_url)
            .await?
            .erased(),
        None => builder.connect(rpc_url).await?.erased(),
    })
}

fn to_micro(value: U256) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::AmountTooLarge(value))
}

async fn send_tx(provider: &DynProvider, tx: TransactionRequest) -> Result<TransactionReceipt> {
    let receipt = provider
        .send_transaction(tx)
        .await?
        .with_timeout(Some(RECEIPT_TIMEOUT))
        .get_receipt()
        .await
        .map_err(|e| Error::Rpc(e.to_string()))?;
    if !receipt.status() {
        return Err(Error::Reverted(receipt.transaction_hash));
    }
    Ok(receipt)
}

/// Deploys a fresh test token and a vault whose operator is `operator`, from `deployer`.
pub async fn deploy(
    rpc_url: &str,
    deployer: PrivateKeySigner,
    operator: Address,
) -> Result<Contracts> {
    let provider = provider(rpc_url, Some(deployer)).await?;
    let deploy_one = |name: &'static str, code: Bytes| {
        let provider = provider.clone();
        async move {
            let receipt = send_tx(
                &provider,
                TransactionRequest::default().with_deploy_code(code),
            )
            .await?;
            receipt
                .contract_address
                .ok_or(Error::NoContractAddress(name))
        }
    };
    let token = deploy_one("TestUsd", creation_code("TestUsd")?).await?;
    let mut vault_code = creation_code("TesseraVault")?.to_vec();
    vault_code.extend(VaultConstructor { token, operator }.abi_encode_sequence());
    let vault = deploy_one("TesseraVault", vault_code.into()).await?;
    tracing::info!(%token, %vault, %operator, "contracts deployed");
    Ok(Contracts { token, vault })
}

impl Chain {
    /// Connects to `rpc_url`; transactions are sent from `signer` when one is given.
    pub async fn connect(
        rpc_url: &str,
        contracts: Contracts,
        signer: Option<PrivateKeySigner>,
    ) -> Result<Self> {
        let sender = signer.as_ref().map(|s| s.address());
        Ok(Self {
            provider: provider(rpc_url, signer).await?,
            contracts,
            sender,
        })
    }

    /// The contracts' addresses.
    pub fn contracts(&self) -> Contracts {
        self.contracts
    }

    /// The address transactions are sent from, if a signer is configured.
    pub fn sender(&self) -> Option<Address> {
        self.sender
    }

    /// The chain id the endpoint reports.
    pub async fn chain_id(&self) -> Result<u64> {
        Ok(self.provider.get_chain_id().await?)
    }

    /// The latest block number.
    pub async fn head(&self) -> Result<u64> {
        Ok(self.provider.get_block_number().await?)
    }

    pub(crate) async fn view<C: SolCall>(&self, to: Address, call: C) -> Result<C::Return> {
        let tx = TransactionRequest::default()
            .with_to(to)
            .with_input(call.abi_encode());
        let out = self.provider.call(tx).await?;
        Ok(C::abi_decode_returns(&out)?)
    }

    pub(crate) async fn send<C: SolCall>(
        &self,
        to: Address,
        call: C,
    ) -> Result<TransactionReceipt> {
        let from = self.sender.ok_or(Error::NoSigner)?;
        let tx = TransactionRequest::default()
            .with_from(from)
            .with_to(to)
            .with_input(call.abi_encode());
        send_tx(&self.provider, tx).await
    }

    /// Token units the vault holds: what the ledger's deposits minus withdrawals must equal.
    pub async fn vault_holdings(&self) -> Result<u64> {
        to_micro(
            self.view(self.contracts.vault, TesseraVault::holdingsCall {})
                .await?,
        )
    }

    /// An address's token balance.
    pub async fn token_balance(&self, who: Address) -> Result<u64> {
        to_micro(
            self.view(
                self.contracts.token,
                TestUsd::balanceOfCall { account: who },
            )
            .await?,
        )
    }

    /// The vault's `Deposited` events in blocks `from..=to`, in chain order.
    pub async fn deposits(&self, from: u64, to: u64) -> Result<Vec<Deposit>> {
        let filter = Filter::new()
            .address(self.contracts.vault)
            .event_signature(TesseraVault::Deposited::SIGNATURE_HASH)
            .from_block(from)
            .to_block(to);
        let mut deposits = Vec::new();
        for log in self.provider.get_logs(&filter).await? {
            let decoded = log.log_decode::<TesseraVault::Deposited>()?;
            let (Some(block), Some(tx_hash), Some(log_index)) =
                (log.block_number, log.transaction_hash, log.log_index)
            else {
                continue; // a pending log; it is read again once mined
            };
            let event = decoded.inner.data;
            deposits.push(Deposit {
                account: event.account,
                from: event.from,
                amount: to_micro(event.amount)?,
                block,
                tx_hash,
                log_index,
            });
        }
        Ok(deposits)
    }

    /// Whether the vault has paid withdrawal `id`.
    pub async fn withdrawal_paid(&self, id: B256) -> Result<bool> {
        self.view(self.contracts.vault, TesseraVault::paidCall { id })
            .await
    }

    /// Pays withdrawal `id` from the vault (operator only), unless it is already paid: the
    /// contract refuses a second payment of one id, so a retry after a crash never pays twice.
    /// Returns the paying transaction's hash, or `None` when it was paid before.
    pub async fn pay_withdrawal(&self, id: B256, to: Address, amount: u64) -> Result<Option<B256>> {
        if self.withdrawal_paid(id).await? {
            return Ok(None);
        }
        let call = TesseraVault::withdrawCall {
            id,
            to,
            amount: U256::from(amount),
        };
        Ok(Some(
            self.send(self.contracts.vault, call)
                .await?
                .transaction_hash,
        ))
    }

    /// Whether the vault has applied stake movement or slash epoch `id`.
    pub async fn applied(&self, id: B256) -> Result<bool> {
        self.view(self.contracts.vault, TesseraVault::appliedCall { id })
            .await
    }

    /// Records a stake movement of the ledger in the vault (operator only), unless movement
    /// `id` is applied already: the vault applies each id once, so a retry after a crash never
    /// counts twice. Returns the transaction's hash, or `None` when it was applied before.
    pub async fn apply_stake_move(
        &self,
        id: B256,
        kind: StakeMove,
        provider: Address,
        amount: u64,
    ) -> Result<Option<B256>> {
        if self.applied(id).await? {
            return Ok(None);
        }
        let amount = U256::from(amount);
        let vault = self.contracts.vault;
        let receipt = match kind {
            StakeMove::Stake => {
                self.send(
                    vault,
                    TesseraVault::stakeCall {
                        id,
                        provider,
                        amount,
                    },
                )
                .await?
            }
            StakeMove::Unstake => {
                self.send(
                    vault,
                    TesseraVault::unstakeCall {
                        id,
                        provider,
                        amount,
                    },
                )
                .await?
            }
            StakeMove::Unbond => {
                self.send(
                    vault,
                    TesseraVault::unbondCall {
                        id,
                        provider,
                        amount,
                    },
                )
                .await?
            }
        };
        Ok(Some(receipt.transaction_hash))
    }

    /// Applies one epoch's slashes (`(provider, amount)` pairs) to the vault's stake records,
    /// once per `epoch` id; `None` when that epoch was applied before.
    pub async fn apply_slashes(
        &self,
        epoch: B256,
        slashes: &[(Address, u64)],
    ) -> Result<Option<B256>> {
        if self.applied(epoch).await? {
            return Ok(None);
        }
        let call = TesseraVault::slashCall {
            epoch,
            providers: slashes.iter().map(|(p, _)| *p).collect(),
            amounts: slashes.iter().map(|(_, a)| U256::from(*a)).collect(),
        };
        Ok(Some(
            self.send(self.contracts.vault, call)
                .await?
                .transaction_hash,
        ))
    }

    /// A provider's stake as the vault records it.
    pub async fn stake_of(&self, provider: Address) -> Result<OnChainStake> {
        let vault = self.contracts.vault;
        Ok(OnChainStake {
            staked: to_micro(
                self.view(vault, TesseraVault::stakeOfCall { provider })
                    .await?,
            )?,
            unbonding: to_micro(
                self.view(vault, TesseraVault::unbondingOfCall { provider })
                    .await?,
            )?,
        })
    }

    /// Every provider's stake together, as the vault records it: what the audit reconciles
    /// with the ledger's stake and unbonding accounts.
    pub async fn total_stake(&self) -> Result<OnChainStake> {
        let vault = self.contracts.vault;
        Ok(OnChainStake {
            staked: to_micro(self.view(vault, TesseraVault::totalStakedCall {}).await?)?,
            unbonding: to_micro(
                self.view(vault, TesseraVault::totalUnbondingCall {})
                    .await?,
            )?,
        })
    }

    /// Deposits `amount` of the sender's tokens for `account`: approves the vault, then calls
    /// `deposit`. Returns the deposit's transaction hash and block.
    pub async fn deposit(&self, account: Address, amount: u64) -> Result<(B256, u64)> {
        let amount = U256::from(amount);
        let approve = TestUsd::approveCall {
            spender: self.contracts.vault,
            value: amount,
        };
        self.send(self.contracts.token, approve).await?;
        let receipt = self
            .send(
                self.contracts.vault,
                TesseraVault::depositCall { account, amount },
            )
            .await?;
        Ok((
            receipt.transaction_hash,
            receipt.block_number.unwrap_or_default(),
        ))
    }

    /// Mints test tokens (the test token lets anyone mint; see `TestUsd.sol`).
    pub async fn mint_test_tokens(&self, to: Address, amount: u64) -> Result<()> {
        let call = TestUsd::mintCall {
            to,
            value: U256::from(amount),
        };
        self.send(self.contracts.token, call).await.map(|_| ())
    }

    /// Mines `blocks` empty blocks (anvil's `anvil_mine`; development chains only).
    pub async fn mine(&self, blocks: u64) -> Result<()> {
        let _: serde_json::Value = self
            .provider
            .raw_request("anvil_mine".into(), (U256::from(blocks),))
            .await?;
        Ok(())
    }
}
