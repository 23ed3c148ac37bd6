//! Reading GGUF files: metadata, tensors, and the file's identity (its sha256).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. Parsing is candle's; this
//! module adds the checks that turn a truncated or corrupt file into a clear error instead of a panic
//! or a half-loaded model.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// An opened GGUF file whose header and tensor table have been validated.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and validates `path`: the header parses and every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadGguf {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
        for (name, info) in &content.tensor_infos {
            let elems: usize = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(bad(format!(
                    "tensor `{name}` has {elems} elements, not a multiple of its block size"
                )));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(bad(format!(
                    "truncated: tensor `{name}` ends at byte {end} but the file has {len}"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// A metadata value, or an error naming the missing key.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::MissingKey { key: key.into() })
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.value(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|_| Error::MissingKey { key: key.into() })
    }

    /// A required unsigned integer (any integer width).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| Error::MissingKey { key: key.into() })
    }

    /// A required float.
    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.value(key)?;
        v.to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map_err(|_| Error::MissingKey { key: key.into() })
    }

    /// An optional value with a named default.
    pub fn f32_or(&self, key: &str, default: f32) -> f32 {
        self.f32(key).unwrap_or(default)
    }

    /// An optional value with a named default.
    pub fn usize_or(&self, key: &str, default: usize) -> usize {
        self.usize(key).unwrap_or(default)
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads a tensor.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::BadTensor {
                name: name.into(),
                reason: "missing from the file".into(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::BadTensor {
                name: name.into(),
                reason: e.to_string(),
            })
    }

    /// The GGML type and shape (outputs first, as candle orders them) of a tensor.
    pub fn tensor_info(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::BadTensor {
                name: name.into(),
                reason: "missing from the file".into(),
            })?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// Reads a tensor's bytes, as stored, straight into `out` (which must have exactly the tensor's
    /// size), so that a model loads without a second copy of its largest tensor.
    pub fn read_tensor_bytes(&mut self, name: &str, out: &mut [u8]) -> Result<()> {
        let bad = |reason: String| Error::BadTensor {
            name: name.into(),
            reason,
        };
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| bad("missing from the file".into()))?;
        let size =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        if size != out.len() {
            return Err(bad(format!("has {size} bytes, expected {}", out.len())));
        }
        self.reader.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        self.reader.read_exact(out).map_err(|e| bad(e.to_string()))
    }

    /// Reads a 1-D f32 tensor (norm weights).
    pub fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// The sha256 of a file, hex-encoded: a model's identity on the network.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
