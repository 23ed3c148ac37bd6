//! Sign-then-recover round trips, tampering and every verification failure, per message type.

use tessera_protocol::{
    Address, ApiKeyRegistration, Domain, Error, InferenceRequest, MemoryNonceStore,
    ProviderRegistration, Signed, StakeAction, StakeOrder, TaskAction, TaskClaim, TaskDecision,
    TaskDelivery, TaskFeedback, TaskPosting, TypedMessage, Verifier, Wallet, WithdrawalOrder, B256,
};
use tessera_protocol::{PolicyRevocation, SpendingPolicy};

const NOW: u64 = 1_700_000_000;

fn hash(byte: u8) -> B256 {
    B256::repeat_byte(byte)
}

fn inference_request() -> InferenceRequest {
    InferenceRequest {
        model: hash(1),
        promptHash: hash(2),
        maxTokens: 256,
        maxPricePerToken: 10,
        nonce: 7,
        expiry: NOW + 60,
    }
}
fn api_key_registration() -> ApiKeyRegistration {
    ApiKeyRegistration {
        keyHash: hash(3),
        validUntil: NOW + 3600,
        nonce: 1,
        expiry: NOW + 60,
    }
}
fn stake_order() -> StakeOrder {
    StakeOrder {
        action: StakeAction::Unstake as u8,
        amount: 5_000_000,
        nonce: 2,
        expiry: NOW + 60,
    }
}
fn task_posting() -> TaskPosting {
    TaskPosting {
        taskHash: hash(4),
        reward: 1_000,
        bond: 100,
        nonce: 3,
        expiry: NOW + 60,
    }
}
fn task_claim() -> TaskClaim {
    TaskClaim {
        taskId: hash(5),
        bond: 100,
        nonce: 4,
        expiry: NOW + 60,
    }
}
fn task_delivery() -> TaskDelivery {
    TaskDelivery {
        taskId: hash(5),
        deliveryHash: hash(7),
        nonce: 6,
        expiry: NOW + 60,
    }
}
fn task_decision() -> TaskDecision {
    TaskDecision {
        taskId: hash(5),
        action: TaskAction::Reject as u8,
        nonce: 7,
        expiry: NOW + 60,
    }
}
fn task_feedback() -> TaskFeedback {
    TaskFeedback {
        taskId: hash(5),
        score: 90,
        tag: "quality".into(),
        nonce: 8,
        expiry: NOW + 60,
    }
}
fn spending_policy() -> SpendingPolicy {
    SpendingPolicy {
        session: Address::repeat_byte(9),
        maxPricePerToken: 10,
        perRequestCap: 5_000,
        perDayCap: 20_000,
        totalCap: 100_000,
        models: vec!["smollm2-135m".into()],
        providers: vec![Address::repeat_byte(3)],
        taskKinds: vec!["writing".into()],
        validUntil: NOW + 3600,
        nonce: 9,
        expiry: NOW + 60,
    }
}
fn policy_revocation() -> PolicyRevocation {
    PolicyRevocation {
        session: Address::repeat_byte(9),
        nonce: 10,
        expiry: NOW + 60,
    }
}
fn provider_registration() -> ProviderRegistration {
    ProviderRegistration {
        model: hash(6),
        pricePerToken: 3,
        capacity: 8,
        nonce: 5,
        expiry: NOW + 60,
    }
}

fn withdrawal_order() -> WithdrawalOrder {
    WithdrawalOrder {
        to: Address::repeat_byte(7),
        amount: 2_500_000,
        nonce: 6,
        expiry: NOW + 60,
    }
}

/// Sign, serialise through JSON, and recover the signer.
fn round_trip<T: TypedMessage + PartialEq + std::fmt::Debug>(message: T) {
    let wallet = Wallet::random();
    let signed = wallet.sign(message.clone(), Domain::default()).unwrap();
    let json = serde_json::to_string(&signed).unwrap();
    let back: Signed<T> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, signed);
    assert_eq!(back.message, message);
    assert_eq!(back.recover().unwrap(), wallet.address());
    assert_eq!(
        Verifier::default().check(&back, NOW).unwrap(),
        wallet.address()
    );
}

/// Any change to the signed contents must make the signature recover to someone else.
fn tamper<T: TypedMessage>(message: T, edit: impl FnOnce(&mut T)) {
    let wallet = Wallet::random();
    let mut signed = wallet.sign(message, Domain::default()).unwrap();
    edit(&mut signed.message);
    match Verifier::default().check(&signed, NOW) {
        Err(Error::WrongSigner { claimed, recovered }) => {
            assert_eq!(claimed, wallet.address());
            assert_ne!(recovered, wallet.address());
        }
        other => panic!("tampered message accepted or wrong error: {other:?}"),
    }
}

macro_rules! per_type {
    ($($name:ident: $make:expr, |$m:ident| $edit:expr;)*) => {
        mod round_trip {
            use super::*;
            $(#[test] fn $name() { round_trip($make); })*
        }
        mod tamper {
            use super::*;
            $(#[test] fn $name() { tamper($make, |$m| { $edit; }); })*
        }
    };
}

per_type! {
    inference_request: crate::inference_request(), |m| m.maxPricePerToken += 1;
    api_key_registration: crate::api_key_registration(), |m| m.keyHash = hash(9);
    stake_order: crate::stake_order(), |m| m.action = StakeAction::Withdraw as u8;
    task_posting: crate::task_posting(), |m| m.reward *= 2;
    task_claim: crate::task_claim(), |m| m.bond = 0;
    task_delivery: crate::task_delivery(), |m| m.deliveryHash = hash(8);
    task_decision: crate::task_decision(), |m| m.action = TaskAction::Accept as u8;
    task_feedback: crate::task_feedback(), |m| m.tag = "speed".into();
    spending_policy: crate::spending_policy(), |m| m.models.push("other".into());
    policy_revocation: crate::policy_revocation(), |m| m.session = Address::repeat_byte(8);
    provider_registration: crate::provider_registration(), |m| m.capacity += 1;
    withdrawal_order: crate::withdrawal_order(), |m| m.to = Address::repeat_byte(8);
}

#[test]
fn chain_id_is_part_of_the_signing_hash() {
    // The domain separator must commit to name, version, chain id and contract: signing under
    // another chain gives another hash.
    let message = inference_request();
    let a = Signed::sign(message.clone(), Domain::new(1), Wallet::random().signer()).unwrap();
    let b = Signed::sign(message, Domain::new(2), Wallet::random().signer()).unwrap();
    assert_ne!(a.signing_hash(), b.signing_hash());
}

#[test]
fn claimed_signer_that_did_not_sign_is_rejected() {
    let wallet = Wallet::random();
    let mut signed = wallet.sign(task_claim(), Domain::default()).unwrap();
    let impostor = Wallet::random().address();
    signed.signer = impostor;
    assert!(matches!(
        Verifier::default().check(&signed, NOW),
        Err(Error::WrongSigner { claimed, .. }) if claimed == impostor
    ));
}

#[test]
fn expired_message_is_rejected() {
    let signed = Wallet::random()
        .sign(inference_request(), Domain::default())
        .unwrap();
    let expiry = signed.message.expiry;
    assert!(
        Verifier::default().check(&signed, expiry).is_ok(),
        "valid through its expiry second"
    );
    assert!(matches!(
        Verifier::default().check(&signed, expiry + 1),
        Err(Error::Expired { expiry: e, now }) if e == expiry && now == expiry + 1
    ));
}

#[test]
fn wrong_chain_is_rejected() {
    let signed = Wallet::random()
        .sign(stake_order(), Domain::new(1))
        .unwrap();
    assert!(matches!(
        Verifier::new(Domain::new(31337)).check(&signed, NOW),
        Err(Error::WrongDomain {
            expected_chain: 31337,
            got_chain: 1,
            ..
        })
    ));
}

#[test]
fn domain_relabelled_after_signing_is_rejected() {
    // Signed for chain 1, then the envelope is edited to claim chain 31337.
    let mut signed = Wallet::random()
        .sign(stake_order(), Domain::new(1))
        .unwrap();
    signed.domain = Domain::default();
    assert!(matches!(
        Verifier::default().check(&signed, NOW),
        Err(Error::WrongSigner { .. })
    ));
}

#[test]
fn wrong_verifying_contract_is_rejected() {
    let domain = Domain {
        chain_id: 31337,
        verifying_contract: Address::repeat_byte(0xaa),
    };
    let signed = Wallet::random().sign(task_posting(), domain).unwrap();
    assert!(matches!(
        Verifier::default().check(&signed, NOW),
        Err(Error::WrongDomain { .. })
    ));
}

#[test]
fn malformed_signature_is_rejected() {
    let mut signed = Wallet::random()
        .sign(task_posting(), Domain::default())
        .unwrap();
    signed.signature.0[..64].fill(0);
    assert!(matches!(
        Verifier::default().check(&signed, NOW),
        Err(Error::MalformedSignature(_))
    ));
}

#[tokio::test]
async fn replayed_nonce_is_rejected_and_scoped_per_type() {
    let wallet = Wallet::random();
    let store = MemoryNonceStore::default();
    let verifier = Verifier::default();
    let request = wallet.sign(inference_request(), Domain::default()).unwrap();
    assert_eq!(
        verifier.verify(&request, NOW, &store).await.unwrap(),
        wallet.address()
    );
    assert!(matches!(
        verifier.verify(&request, NOW, &store).await,
        Err(Error::ReplayedNonce {
            nonce: 7,
            scope: "InferenceRequest",
            ..
        })
    ));
    // The same nonce under another message type is a different scope.
    let claim = TaskClaim {
        nonce: 7,
        ..task_claim()
    };
    let claim = wallet.sign(claim, Domain::default()).unwrap();
    verifier.verify(&claim, NOW, &store).await.unwrap();
    // Another signer may use nonce 7 too.
    let other = Wallet::random()
        .sign(inference_request(), Domain::default())
        .unwrap();
    verifier.verify(&other, NOW, &store).await.unwrap();
}

#[tokio::test]
async fn rejected_message_does_not_burn_the_nonce() {
    let wallet = Wallet::random();
    let store = MemoryNonceStore::default();
    let signed = wallet.sign(inference_request(), Domain::default()).unwrap();
    let late = signed.message.expiry + 1;
    assert!(Verifier::default()
        .verify(&signed, late, &store)
        .await
        .is_err());
    Verifier::default()
        .verify(&signed, NOW, &store)
        .await
        .unwrap();
}

#[test]
fn stake_action_codes() {
    assert_eq!(stake_order().stake_action().unwrap(), StakeAction::Unstake);
    let bad = StakeOrder {
        action: 9,
        ..stake_order()
    };
    assert!(matches!(
        bad.stake_action(),
        Err(Error::UnknownStakeAction(9))
    ));
}

#[test]
fn keystore_round_trip_and_wrong_password() {
    let dir = tempfile::tempdir().unwrap();
    let (wallet, path) =
        Wallet::create_keystore(dir.path(), "agent.json", "correct horse").unwrap();
    let json = std::fs::read_to_string(&path).unwrap();
    assert!(json.contains("\"crypto\""), "Web3 Secret Storage layout");
    assert!(
        !json.contains(&format!("{:x}", wallet.signer().to_bytes())),
        "key stored in clear"
    );
    let loaded = Wallet::load_keystore(&path, "correct horse").unwrap();
    assert_eq!(loaded.address(), wallet.address());
    assert!(matches!(
        Wallet::load_keystore(&path, "wrong"),
        Err(Error::Keystore(_))
    ));
}

#[test]
fn private_key_import() {
    // The well-known first anvil/hardhat development key.
    let key = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    let wallet = Wallet::from_private_key_hex(key).unwrap();
    assert_eq!(
        wallet.address(),
        "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
            .parse::<Address>()
            .unwrap()
    );
    assert!(matches!(
        Wallet::from_private_key_hex("0x1234"),
        Err(Error::InvalidKey(_))
    ));
    assert!(
        !format!("{wallet:?}").contains("ac0974"),
        "Debug must not leak the key"
    );
}

#[test]
fn task_action_codes() {
    assert_eq!(task_decision().task_action().unwrap(), TaskAction::Reject);
    let bad = TaskDecision {
        action: 9,
        ..task_decision()
    };
    assert!(matches!(
        bad.task_action(),
        Err(Error::UnknownTaskAction(9))
    ));
}
