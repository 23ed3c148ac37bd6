//! The forward pass on candle tensors, for any candle [`Device`]: the same code runs on the CPU
//! (`Compute::CandleCpu`, which is how it is tested) and on an NVIDIA GPU (`Compute::Cuda`, built with
//! the `cuda` feature).
//!
//! It has exactly the semantics of the native [`crate::model::Transformer::forward`] — one call runs
//! any mix of sequences with their own caches; all rows of all sequences go through each weight
//! matrix together; attention runs per sequence against its cache — but different numerics: every
//! GGUF tensor is dequantized once to f32 (candle's `QTensor::dequantize`) and moved to the device,
//! and products are plain f32 matrix products, where the native path multiplies the quantized blocks
//! against 16-bit activations. Logits therefore differ from the native path's by a few hundredths
//! (measured in `tests/device_backend.rs`), and neither batch- nor thread-invariance is promised:
//! the device libraries choose their own reduction orders. A verifier should use the native path.
//!
//! f32 rather than f16/bf16 keeps the pass close to the native one; the models served are small
//! enough (SmolLM2-135M: 0.5 GiB as f32) that weight memory is not the constraint.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};

use crate::engine::Variant;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{logit_rows, split_logits, step_rows, Architecture, Config, Rope, SequenceStep};

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compute {
    /// The native path: this crate's kernels on the file's quantized weights, on the CPU.
    /// Batch- and thread-invariant, bitwise reproducible; what verification relies on.
    #[default]
    Cpu,
    /// The candle backend on the CPU: the device code path without a GPU (tests, comparisons).
    CandleCpu,
    /// The candle backend on the NVIDIA GPU with this ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl Compute {
    /// The candle device of the device backend, or `None` for the native path. Fails with
    /// [`Error::DeviceUnavailable`] when CUDA was not compiled in or cannot be initialised.
    pub fn device(self) -> Result<Option<Device>> {
        match self {
            Compute::Cpu => Ok(None),
            Compute::CandleCpu => Ok(Some(Device::Cpu)),
            Compute::Cuda(ordinal) => cuda_device(ordinal).map(Some),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::DeviceUnavailable {
        device: Compute::Cuda(ordinal).to_string(),
        reason: format!("CUDA initialisation failed: {e}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::DeviceUnavailable {
        device: Compute::Cuda(ordinal).to_string(),
        reason: "this build has no CUDA support: rebuild with the `cuda` feature (`--features tessera-engine/cuda`)".into(),
    })
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compute::Cpu => f.write_str("cpu"),
            Compute::CandleCpu => f.write_str("candle-cpu"),
            Compute::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Compute {
    type Err = Error;

    /// `cpu`, `candle-cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidRequest(format!(
                "unknown device `{s}` (expected cpu, candle-cpu, cuda or cuda:N)"
            ))
        };
        match s {
            "cpu" => Ok(Compute::Cpu),
            "candle-cpu" => Ok(Compute::CandleCpu),
            "cuda" => Ok(Compute::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Compute::Cuda)
                .ok_or_else(bad),
        }
    }
}

/// One sequence's keys and values on the device: per layer, keys and values of shape
/// `kv_heads × capacity × head_dim`, of which the owning [`crate::model::KvCache`]'s first `len`
/// positions are valid. Capacity grows by doubling. Clones share the tensors until one of them
/// writes, which then copies them first (new positions are written in place).
#[derive(Clone, Default)]
pub struct DeviceCache {
    layers: Arc<Vec<(Tensor, Tensor)>>,
    capacity: usize,
}

impl fmt::Debug for DeviceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCache")
            .field("layers", &self.layers.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl DeviceCache {
    /// Makes room for `needed` positions of which the first `len` are kept, and makes the tensors
    /// this cache's own.
    fn reserve(
        &mut self,
        len: usize,
        needed: usize,
        layers: usize,
        c: &Config,
        device: &Device,
    ) -> Result<()> {
        let shared = Arc::strong_count(&self.layers) > 1;
        if needed <= self.capacity && !shared && self.layers.len() == layers {
            return Ok(());
        }
        if len > 0 && self.layers.len() != layers {
            return Err(Error::InvalidRequest(
                "this KV cache belongs to another model".into(),
            ));
        }
        let capacity = if needed <= self.capacity {
            self.capacity
        } else {
            needed
                .next_power_of_two()
                .clamp(64, c.context_length.max(needed))
        };
        let mut fresh = Vec::with_capacity(layers);
        for l in 0..layers {
            let k = Tensor::zeros((c.kv_heads, capacity, c.head_dim), DType::F32, device)?;
            let v = Tensor::zeros((c.kv_heads, capacity, c.head_dim), DType::F32, device)?;
            if len > 0 {
                let (old_k, old_v) = &self.layers[l];
                k.slice_set(&old_k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old_v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            fresh.push((k, v));
        }
        self.layers = Arc::new(fresh);
        self.capacity = capacity;
        Ok(())
    }
}

/// One block's weights on the device. Matrices are `outputs × inputs`, as in GGUF.
struct DeviceBlock {
    attn_norm: Tensor,
    /// Q, K and V stacked.
    qkv: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    attn_out: Tensor,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate and up stacked.
    gate_up: Tensor,
    down: Tensor,
    post_ffn_norm: Option<Tensor>,
}

/// A model's weights dequantized to f32 on a candle device, and its forward pass.
pub struct DeviceTransformer {
    config: Config,
    device: Device,
    embedding: Tensor,
    blocks: Vec<DeviceBlock>,
    output_norm: Tensor,
    /// `None` when the output head is tied to the embedding.
    output: Option<Tensor>,
}

impl fmt::Debug for DeviceTransformer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTransformer")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish()
    }
}

impl DeviceTransformer {
    /// Loads the weights of a validated GGUF file onto `device`, altered as `variant` says (the
    /// same alterations as the native path: `Q4_1` matrices re-quantized to `Q4_0`, last blocks
    /// dropped).
    pub fn from_gguf(file: &mut GgufFile, device: &Device, variant: Variant) -> Result<Self> {
        let started = Instant::now();
        let config = Config::from_gguf(file)?;
        if config.architecture == Architecture::Qwen2 {
            // The device pass has no Q/K/V biases or neox RoPE for Qwen yet: refuse rather than run wrong.
            return Err(Error::UnsupportedArchitecture(
                "qwen2 on the device backend (use the native CPU path)".into(),
            ));
        }
        let gemma = config.architecture == Architecture::Gemma3;
        let requantize = variant == Variant::RequantizedQ4_0;
        let mat = |file: &mut GgufFile, name: &str| -> Result<Tensor> {
            let q = file.tensor(name)?;
            let mut t = q.dequantize(&Device::Cpu)?;
            if requantize && q.dtype() == GgmlDType::Q4_1 {
                t = QTensor::quantize(&t, GgmlDType::Q4_0)?.dequantize(&Device::Cpu)?;
            }
            if t.rank() != 2 {
                return Err(Error::BadTensor {
                    name: name.into(),
                    reason: format!("expected a matrix, got shape {:?}", t.dims()),
                });
            }
            Ok(t.to_device(device)?)
        };
        // Norm weights as the native path reads them (GGUF stores Gemma's as `1 + w` already).
        let vector = |file: &mut GgufFile, name: &str| -> Result<Tensor> {
            let v = file.vector(name)?;
            let n = v.len();
            Ok(Tensor::from_vec(v, n, device)?)
        };
        let embedding = mat(file, "token_embd.weight")?;
        if embedding.dims() != [config.vocab_size, config.hidden] {
            return Err(Error::BadTensor {
                name: "token_embd.weight".into(),
                reason: "shape does not match the metadata".into(),
            });
        }
        let layers = match variant {
            Variant::SkipLastLayers(n) => config.layers.saturating_sub(n).max(1),
            _ => config.layers,
        };
        let mut blocks = Vec::with_capacity(layers);
        for l in 0..layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let q = mat(file, &n("attn_q"))?;
            let k = mat(file, &n("attn_k"))?;
            let v = mat(file, &n("attn_v"))?;
            if q.dim(0)? != config.q_dim()
                || k.dim(0)? != config.kv_dim()
                || v.dim(0)? != config.kv_dim()
            {
                return Err(Error::BadTensor {
                    name: n("attn_q"),
                    reason: "attention shapes do not match the metadata".into(),
                });
            }
            let gate = mat(file, &n("ffn_gate"))?;
            let up = mat(file, &n("ffn_up"))?;
            let opt = |file: &mut GgufFile, s: &str| -> Result<Option<Tensor>> {
                if gemma {
                    vector(file, &n(s)).map(Some)
                } else {
                    Ok(None)
                }
            };
            blocks.push(DeviceBlock {
                attn_norm: vector(file, &n("attn_norm"))?,
                qkv: Tensor::cat(&[q, k, v], 0)?,
                q_norm: opt(file, "attn_q_norm")?,
                k_norm: opt(file, "attn_k_norm")?,
                attn_out: mat(file, &n("attn_output"))?,
                post_attn_norm: opt(file, "post_attention_norm")?,
                ffn_norm: vector(file, &n("ffn_norm"))?,
                gate_up: Tensor::cat(&[gate, up], 0)?,
                down: mat(file, &n("ffn_down"))?,
                post_ffn_norm: opt(file, "post_ffw_norm")?,
            });
        }
        let output_norm = vector(file, "output_norm.weight")?;
        let output = if file.has_tensor("output.weight") {
            Some(mat(file, "output.weight")?)
        } else {
            None
        };
        tracing::info!(device = ?device, layers, seconds = started.elapsed().as_secs_f64(), "weights dequantized to f32 on the device");
        Ok(Self {
            config,
            device: device.clone(),
            embedding,
            blocks,
            output_norm,
            output,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The candle device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs new tokens of several sequences through the model, appending them to their caches
    /// (made by [`crate::model::KvCache::on_device`]). Returns per sequence
    /// `vocab` logits per requested position (the last, or all from `logits_from` when scoring),
    /// exactly as [`crate::model::Transformer::forward`] does.
    pub fn forward(&self, steps: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let dev = &self.device;
        let (d, qd, kvd, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        let rows = step_rows(c, steps, true)?;
        for step in steps.iter_mut() {
            let (len, needed) = (step.cache.len(), step.cache.len() + step.tokens.len());
            if let Some(cache) = step.cache.device.as_mut() {
                cache.reserve(len, needed, self.blocks.len(), c, dev)?;
            }
        }
        let n = rows.len();
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut x = self
            .embedding
            .index_select(&Tensor::from_vec(tokens, n, dev)?, 0)?;
        let gemma = c.architecture == Architecture::Gemma3;
        if gemma {
            x = x.affine(f64::from((d as f32).sqrt()), 0.0)?;
        }
        let table = |base: f32| -> Result<(Tensor, Tensor)> {
            let rope = Rope::new(hd, base, &rows);
            Ok((
                Tensor::from_slice(&rope.cos, (n, hd / 2), dev)?,
                Tensor::from_slice(&rope.sin, (n, hd / 2), dev)?,
            ))
        };
        let rope_global = table(c.rope_base)?;
        let rope_local = table(c.rope_base_local)?;
        // Per sequence, the attention masks of global and of sliding-window layers.
        let masks = steps
            .iter()
            .map(|step| {
                let (past, m) = (step.cache.len(), step.tokens.len());
                Ok((
                    causal_mask(past, m, None, dev)?,
                    causal_mask(past, m, c.sliding_window, dev)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;

        for (l, block) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &block.attn_norm, c.eps)?;
            let qkv = linear(&h, &block.qkv)?;
            let mut q = qkv.narrow(1, 0, qd)?.reshape((n, c.heads, hd))?;
            let mut k = qkv.narrow(1, qd, kvd)?.reshape((n, c.kv_heads, hd))?;
            let v = qkv.narrow(1, qd + kvd, kvd)?.reshape((n, c.kv_heads, hd))?;
            if let Some(w) = &block.q_norm {
                q = rms_norm(&q, w, c.eps)?;
            }
            if let Some(w) = &block.k_norm {
                k = rms_norm(&k, w, c.eps)?;
            }
            let (cos, sin) = if c.is_sliding(l) {
                &rope_local
            } else {
                &rope_global
            };
            let q = rope(&q, cos, sin, gemma)?;
            let k = rope(&k, cos, sin, gemma)?;

            let mut outs = Vec::with_capacity(steps.len());
            let mut start = 0;
            for (step, (global, local)) in steps.iter().zip(&masks) {
                let m = step.tokens.len();
                let past = step.cache.len();
                let cache = step
                    .cache
                    .device
                    .as_ref()
                    .ok_or_else(|| Error::InvalidRequest("missing device cache".into()))?;
                let (keys, values) = &cache.layers[l];
                keys.slice_set(
                    &k.narrow(0, start, m)?.transpose(0, 1)?.contiguous()?,
                    1,
                    past,
                )?;
                values.slice_set(
                    &v.narrow(0, start, m)?.transpose(0, 1)?.contiguous()?,
                    1,
                    past,
                )?;
                let total = past + m;
                let mask = if c.is_sliding(l) { local } else { global };
                outs.push(attend(
                    c,
                    &q.narrow(0, start, m)?,
                    &keys.narrow(1, 0, total)?,
                    &values.narrow(1, 0, total)?,
                    mask.as_ref(),
                )?);
                start += m;
            }
            let attn = Tensor::cat(&outs, 0)?;
            let mut o = linear(&attn, &block.attn_out)?;
            if let Some(w) = &block.post_attn_norm {
                o = rms_norm(&o, w, c.eps)?;
            }
            x = (x + o)?;

            let h = rms_norm(&x, &block.ffn_norm, c.eps)?;
            let gu = linear(&h, &block.gate_up)?;
            let g = gu.narrow(1, 0, c.ffn)?;
            let u = gu.narrow(1, c.ffn, c.ffn)?;
            let gated = if gemma { g.gelu()? } else { g.silu()? };
            let mut down = linear(&(gated * u)?, &block.down)?;
            if let Some(w) = &block.post_ffn_norm {
                down = rms_norm(&down, w, c.eps)?;
            }
            x = (x + down)?;
        }
        for step in steps.iter_mut() {
            step.cache.advance(step.tokens.len());
        }

        // Logits only for the rows asked for.
        let wanted = logit_rows(steps);
        let selected: Vec<u32> = wanted
            .iter()
            .flat_map(|take| take.clone().map(|r| r as u32))
            .collect();
        let picked = selected.len();
        let h = rms_norm(
            &x.index_select(&Tensor::from_vec(selected, picked, dev)?, 0)?,
            &self.output_norm,
            c.eps,
        )?;
        let logits = linear(&h, self.output.as_ref().unwrap_or(&self.embedding))?;
        let logits = logits
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(split_logits(&logits, &wanted, c.vocab_size))
    }
}

/// `x · Wᵀ` for `W` stored `outputs × inputs`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// RMSNorm over the last dimension, times `w` (Zhang & Sennrich 2019).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(eps))?
        .sqrt()?
        .recip()?;
    Ok(x.broadcast_mul(&scale)?.broadcast_mul(w)?)
}

/// Rotary position embedding (Su et al. 2021) of `x` (`rows × heads × head_dim`) with per-row
/// tables `rows × head_dim/2`: dimension `i` with `i + head_dim/2` ("neox", Gemma 3), or adjacent
/// pairs (GGUF's permuted Llama Q/K).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    let (n, heads, hd) = x.dims3()?;
    let half = hd / 2;
    let rotate =
        |x0: &Tensor, x1: &Tensor, cos: &Tensor, sin: &Tensor| -> Result<(Tensor, Tensor)> {
            let a = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let b = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Ok((a, b))
        };
    if neox {
        let (cos, sin) = (cos.reshape((n, 1, half))?, sin.reshape((n, 1, half))?);
        let (a, b) = rotate(
            &x.narrow(2, 0, half)?,
            &x.narrow(2, half, half)?,
            &cos,
            &sin,
        )?;
        Ok(Tensor::cat(&[a, b], 2)?)
    } else {
        let pairs = x.reshape((n, heads, half, 2))?;
        let (cos, sin) = (cos.reshape((n, 1, half, 1))?, sin.reshape((n, 1, half, 1))?);
        let (a, b) = rotate(&pairs.narrow(3, 0, 1)?, &pairs.narrow(3, 1, 1)?, &cos, &sin)?;
        Ok(Tensor::cat(&[a, b], 3)?.reshape((n, heads, hd))?)
    }
}

/// The additive attention mask (`m × (past + m)`: 0 or −∞) of `m` new rows at positions
/// `past..past + m`: row `i` sees positions `lo..=past + i`, where `lo` is 0 or, with a sliding
/// `window`, `past + i + 1 − window`. `None` when it would mask nothing (one new row, window not
/// reached).
fn causal_mask(
    past: usize,
    m: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let total = past + m;
    let lowest = |i: usize| window.map_or(0, |w| (past + i + 1).saturating_sub(w));
    if m == 1 && lowest(0) == 0 {
        return Ok(None);
    }
    let mut mask = vec![0f32; m * total];
    for i in 0..m {
        for (j, v) in mask[i * total..(i + 1) * total].iter_mut().enumerate() {
            if j > past + i || j < lowest(i) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(mask, (m, total), dev)?))
}

/// Grouped-query attention of one sequence's `m` new query rows (`m × heads × head_dim`) against
/// its cached keys and values (`kv_heads × total × head_dim`, the new rows included), with the
/// sequence's [`causal_mask`]. Query heads sharing a key/value head are stacked into one matrix
/// product. Returns `m × (heads · head_dim)`.
fn attend(
    c: &Config,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (m, hd, kvh) = (q.dim(0)?, c.head_dim, c.kv_heads);
    let group = c.heads / kvh;
    let total = keys.dim(1)?;
    // Head h = kv_head · group + g, as in the native path.
    let q = q
        .reshape((m, kvh, group, hd))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((kvh, group * m, hd))?;
    let mut scores = (q.matmul(&keys.t()?)? * f64::from(c.attn_scale))?;
    if let Some(mask) = mask {
        scores = scores
            .reshape((kvh, group, m, total))?
            .broadcast_add(mask)?
            .reshape((kvh, group * m, total))?;
    }
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let o = p.matmul(values)?;
    Ok(o.reshape((kvh, group, m, hd))?
        .permute((2, 0, 1, 3))?
        .reshape((m, kvh * group * hd))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden: 8,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            ffn: 16,
            eps: 1e-5,
            rope_base: 10_000.0,
            rope_base_local: 10_000.0,
            sliding_window: None,
            global_every: 1,
            context_length: 512,
            attn_scale: 0.5,
        }
    }

    /// Writes `value` at `position` of layer 0's keys.
    fn write(cache: &DeviceCache, position: usize, value: f32) {
        let row = Tensor::full(value, (1, 1, 4), &Device::Cpu).unwrap();
        cache.layers[0].0.slice_set(&row, 1, position).unwrap();
    }

    fn key(cache: &DeviceCache, position: usize) -> f32 {
        cache.layers[0]
            .0
            .narrow(1, position, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn cache_grows_keeping_its_positions_and_clones_copy_before_writing() {
        let c = config();
        let mut cache = DeviceCache::default();
        cache.reserve(0, 3, 2, &c, &Device::Cpu).unwrap();
        assert_eq!(cache.capacity, 64);
        for p in 0..3 {
            write(&cache, p, p as f32 + 1.0);
        }
        let mut clone = cache.clone();
        clone.reserve(3, 4, 2, &c, &Device::Cpu).unwrap();
        write(&clone, 0, 9.0);
        assert_eq!(
            (key(&cache, 0), key(&clone, 0), key(&clone, 2)),
            (1.0, 9.0, 3.0)
        );
        cache.reserve(3, 100, 2, &c, &Device::Cpu).unwrap();
        assert_eq!(cache.capacity, 128);
        assert_eq!(
            (0..3).map(|p| key(&cache, p)).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0]
        );
        assert!(
            cache.reserve(3, 4, 1, &c, &Device::Cpu).is_err(),
            "a cache of another model's depth"
        );
    }
}
