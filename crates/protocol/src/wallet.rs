//! Wallet keys: secp256k1 private keys kept in encrypted JSON keystores
//! (Web3 Secret Storage Definition, scrypt + AES-128-CTR), readable by geth and other tools.

use std::path::{Path, PathBuf};

use alloy_primitives::{Address, B256};
use alloy_signer_local::PrivateKeySigner;

use crate::{Domain, Error, Result, Signed, TypedMessage};

/// A wallet: one secp256k1 key and its Ethereum address.
///
/// The key never appears in `Debug` output.
#[derive(Clone)]
pub struct Wallet {
    signer: PrivateKeySigner,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

impl Wallet {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn random() -> Self {
        Self {
            signer: PrivateKeySigner::random(),
        }
    }

    /// A wallet from a hex private key (with or without `0x`).
    pub fn from_private_key_hex(hex_key: &str) -> Result<Self> {
        let bytes: B256 = hex_key
            .trim()
            .parse()
            .map_err(|e| Error::InvalidKey(format!("{e}")))?;
        let signer =
            PrivateKeySigner::from_bytes(&bytes).map_err(|e| Error::InvalidKey(e.to_string()))?;
        Ok(Self { signer })
    }

    /// The wallet's 0x address.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// The underlying alloy signer, for callers that sign other things (transactions).
    pub fn signer(&self) -> &PrivateKeySigner {
        &self.signer
    }

    /// Signs a typed message under `domain`.
    pub fn sign<T: TypedMessage>(&self, message: T, domain: Domain) -> Result<Signed<T>> {
        Signed::sign(message, domain, &self.signer)
    }

    /// Creates a new random key and writes it encrypted with `password` to `dir/name`.
    pub fn create_keystore(dir: &Path, name: &str, password: &str) -> Result<(Self, PathBuf)> {
        let wallet = Self::random();
        let path = wallet.save_keystore(dir, name, password)?;
        Ok((wallet, path))
    }

    /// Writes this key encrypted with `password` to `dir/name` and returns the file's path.
    pub fn save_keystore(&self, dir: &Path, name: &str, password: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Keystore(e.into()))?;
        let mut rng = rand::thread_rng();
        PrivateKeySigner::encrypt_keystore(
            dir,
            &mut rng,
            self.signer.to_bytes(),
            password,
            Some(name),
        )?;
        tracing::debug!(address = %self.address(), dir = %dir.display(), "keystore written");
        Ok(dir.join(name))
    }

    /// Decrypts the keystore at `path` with `password`; a wrong password is an error.
    pub fn load_keystore(path: &Path, password: &str) -> Result<Self> {
        Ok(Self {
            signer: PrivateKeySigner::decrypt_keystore(path, password)?,
        })
    }
}
