//! The transformer forward pass for the Llama, Qwen2 and Gemma 3 architectures, read from GGUF.
//!
//! One [`Transformer::forward`] call runs any mix of sequences, each with its own KV cache and its own
//! number of new tokens: a prompt being prefilled, a single decode token, or a whole prompt + answer
//! being scored (teacher forcing). All rows of all sequences go through each weight matrix together
//! (the matrix-matrix path), and attention is computed per row against that row's own cache. This is
//! what makes continuous batching and all-position scoring the same code path.
//!
//! Differences between the architectures (Touvron et al. 2023; Gemma Team 2025):
//! - RoPE: GGUF stores Llama's Q/K permuted so that adjacent pairs rotate (ggml "normal" mode); Gemma 3
//!   rotates dimension `i` with `i + d/2` ("neox" mode).
//! - Gemma 3 scales embeddings by `sqrt(width)`, normalises Q and K per head, normalises the output of
//!   attention and of the MLP before the residual add, uses GELU (tanh) gating, and alternates five
//!   sliding-window layers (RoPE base 10k) with one global layer (RoPE base from the file).
//!   GGUF already stores Gemma's RMSNorm weights as `1 + w`.
//! - Qwen2 (Yang et al. 2024) is Llama with biases on the Q, K and V projections, "neox" RoPE (GGUF
//!   does not permute Qwen's Q/K), a RoPE base of 1e6, and the output head usually tied to the embedding.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::device::DeviceCache;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::quant::{dot_f32, QMatrix};

/// A supported architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama (SmolLM2 and friends).
    Llama,
    /// Gemma 3.
    Gemma3,
    /// Qwen2 / Qwen2.5.
    Qwen2,
}

impl Architecture {
    /// The GGUF `general.architecture` name.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Whether RoPE rotates dimension `i` with `i + d/2` (ggml's "neox" mode) rather than adjacent pairs.
    pub(crate) fn neox_rope(self) -> bool {
        matches!(self, Architecture::Gemma3 | Architecture::Qwen2)
    }
}

/// Hyper-parameters read from GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    /// Architecture.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP width.
    pub ffn: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base of global layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers.
    pub rope_base_local: f32,
    /// Sliding window, for architectures that have one.
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer is global (the others slide).
    pub global_every: usize,
    /// Context length.
    pub context_length: usize,
    /// Attention scale.
    pub attn_scale: f32,
}

impl Config {
    /// Reads the configuration.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?.to_owned();
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "gemma3" => Architecture::Gemma3,
            "qwen2" => Architecture::Qwen2,
            other => return Err(Error::UnsupportedArchitecture(other.into())),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = file.usize(&k("embedding_length"))?;
        let heads = file.usize(&k("attention.head_count"))?;
        let head_dim = file.usize_or(&k("attention.key_length"), hidden / heads);
        let gemma = architecture == Architecture::Gemma3;
        let vocab_size = file
            .metadata()
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| Error::MissingKey {
                key: "tokenizer.ggml.tokens".into(),
            })?;
        Ok(Self {
            architecture,
            vocab_size,
            hidden,
            layers: file.usize(&k("block_count"))?,
            heads,
            kv_heads: file.usize_or(&k("attention.head_count_kv"), heads),
            head_dim,
            ffn: file.usize(&k("feed_forward_length"))?,
            eps: file.f32(&k("attention.layer_norm_rms_epsilon"))?,
            rope_base: file.f32_or(
                &k("rope.freq_base"),
                if gemma { 1_000_000.0 } else { 10_000.0 },
            ),
            rope_base_local: 10_000.0,
            sliding_window: if gemma {
                Some(file.usize_or(&k("attention.sliding_window"), 512))
            } else {
                None
            },
            global_every: if gemma { 6 } else { 1 },
            context_length: file.usize_or(&k("context_length"), 2048),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    pub(crate) fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub(crate) fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && !(layer + 1).is_multiple_of(self.global_every)
    }
}

/// Several projections applied to the same input; stored fused when their formats allow it.
#[derive(Debug)]
enum Projection {
    Fused(QMatrix),
    Separate(Vec<QMatrix>),
}

impl Projection {
    fn new(parts: Vec<QMatrix>) -> Self {
        match QMatrix::concat_rows(parts) {
            Ok(m) => Projection::Fused(m),
            Err(parts) => Projection::Separate(parts),
        }
    }

    /// `n × (sum of widths)`, parts side by side in each row.
    fn apply(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match self {
            Projection::Fused(m) => m.matmul(x, n),
            Projection::Separate(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.matmul(x, n))
                    .collect::<Result<Vec<_>>>()?;
                let width: usize = parts.iter().map(|p| p.rows()).sum();
                let mut y = Vec::with_capacity(n * width);
                for r in 0..n {
                    for (p, o) in parts.iter().zip(&outs) {
                        y.extend_from_slice(&o[r * p.rows()..(r + 1) * p.rows()]);
                    }
                }
                Ok(y)
            }
        }
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: Vec<f32>,
    qkv: Projection,
    /// Q, K and V biases side by side (Qwen2).
    qkv_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    attn_out: QMatrix,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate_up: Projection,
    down: QMatrix,
    post_ffn_norm: Option<Vec<f32>>,
}

/// The KV cache of one sequence. Truncating it rolls the sequence back (e.g. to reuse a prompt).
///
/// A cache holds host vectors for the native forward pass ([`KvCache::new`]) or device tensors for
/// the candle backend ([`crate::device`]); the engine makes the kind its model runs on.
///
/// Native caches hold keys and values as f16 (as llama.cpp does by default), half the memory of
/// f32: attention reads them back widened, the same way in a KV-cached and a teacher-forced pass.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    kv_dim: usize,
    len: usize,
    /// The tensors of a cache that belongs to a device-backend model.
    pub(crate) device: Option<DeviceCache>,
}

impl KvCache {
    /// An empty cache for a model.
    pub fn new(config: &Config) -> Self {
        Self {
            keys: vec![Vec::new(); config.layers],
            values: vec![Vec::new(); config.layers],
            kv_dim: config.kv_dim(),
            len: 0,
            device: None,
        }
    }

    /// An empty cache for a model on the device backend ([`crate::device::DeviceTransformer`]): its
    /// keys and values live in device tensors, allocated by the first forward pass.
    pub fn on_device() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            kv_dim: 0,
            len: 0,
            device: Some(DeviceCache::default()),
        }
    }

    /// Counts `n` positions appended by the device backend.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops positions from `len` on. (A device cache keeps its tensors: positions past `len` are
    /// overwritten by the next forward pass.)
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for l in 0..self.keys.len() {
                self.keys[l].truncate(len * self.kv_dim);
                self.values[l].truncate(len * self.kv_dim);
            }
            self.len = len;
        }
    }
}

/// One sequence's part of a forward call.
pub struct SequenceStep<'a> {
    /// The sequence's cache; the new tokens are appended to it.
    pub cache: &'a mut KvCache,
    /// New tokens (at least one).
    pub tokens: &'a [u32],
    /// Return logits for the new tokens from this index on (scoring), instead of only the last one.
    pub logits_from: Option<usize>,
}

/// Weights of a loaded model.
#[derive(Debug)]
pub struct Transformer {
    config: Config,
    embedding: QMatrix,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `None` when the output head is tied to the embedding.
    output: Option<QMatrix>,
}

impl Transformer {
    /// Loads the weights of a validated GGUF file.
    pub fn from_gguf(file: &mut GgufFile) -> Result<Self> {
        let config = Config::from_gguf(file)?;
        let gemma = config.architecture == Architecture::Gemma3;
        let mat =
            |file: &mut GgufFile, name: &str| -> Result<QMatrix> { QMatrix::from_gguf(file, name) };
        let embedding = mat(file, "token_embd.weight")?;
        if embedding.cols() != config.hidden || embedding.rows() != config.vocab_size {
            return Err(Error::BadTensor {
                name: "token_embd.weight".into(),
                reason: "shape does not match the metadata".into(),
            });
        }
        let mut blocks = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let q = mat(file, &n("attn_q"))?;
            let k = mat(file, &n("attn_k"))?;
            let v = mat(file, &n("attn_v"))?;
            if q.rows() != config.q_dim()
                || k.rows() != config.kv_dim()
                || v.rows() != config.kv_dim()
            {
                return Err(Error::BadTensor {
                    name: n("attn_q"),
                    reason: "attention shapes do not match the metadata".into(),
                });
            }
            let gate = mat(file, &n("ffn_gate"))?;
            let up = mat(file, &n("ffn_up"))?;
            let opt = |file: &mut GgufFile, s: &str| -> Result<Option<Vec<f32>>> {
                if gemma {
                    file.vector(&n(s)).map(Some)
                } else {
                    Ok(None)
                }
            };
            let qkv_bias = if config.architecture == Architecture::Qwen2 {
                let mut bias = Vec::with_capacity(config.q_dim() + 2 * config.kv_dim());
                for (part, width) in [
                    ("attn_q", config.q_dim()),
                    ("attn_k", config.kv_dim()),
                    ("attn_v", config.kv_dim()),
                ] {
                    let name = format!("blk.{l}.{part}.bias");
                    let b = file.vector(&name)?;
                    if b.len() != width {
                        return Err(Error::BadTensor {
                            name,
                            reason: format!("expected {width} values, got {}", b.len()),
                        });
                    }
                    bias.extend(b);
                }
                Some(bias)
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: file.vector(&n("attn_norm"))?,
                qkv: Projection::new(vec![q, k, v]),
                qkv_bias,
                q_norm: opt(file, "attn_q_norm")?,
                k_norm: opt(file, "attn_k_norm")?,
                attn_out: mat(file, &n("attn_output"))?,
                post_attn_norm: opt(file, "post_attention_norm")?,
                ffn_norm: file.vector(&n("ffn_norm"))?,
                gate_up: Projection::new(vec![gate, up]),
                down: mat(file, &n("ffn_down"))?,
                post_ffn_norm: opt(file, "post_ffw_norm")?,
            });
        }
        let output_norm = file.vector("output_norm.weight")?;
        let output = if file.has_tensor("output.weight") {
            Some(mat(file, "output.weight")?)
        } else {
            None
        };
        Ok(Self {
            config,
            embedding,
            blocks,
            output_norm,
            output,
        })
    }

    /// Replaces every quantized block matrix by a `Q4_0` re-quantization (a cheaper, lower-quality
    /// copy). Every format counts: on a model without `Q4_1` matrices (Qwen's `Q5_0`/`Q4_K`/`Q6_K`)
    /// a `Q4_1`-only swap changed nothing, and the "adversary" was an honest provider.
    pub fn requantize_q4_0(&mut self) -> Result<()> {
        fn requant(m: &mut QMatrix) -> Result<()> {
            if m.format() != "F32" {
                *m = m.requantize_q4_0()?;
            }
            Ok(())
        }
        for b in &mut self.blocks {
            for p in [&mut b.qkv, &mut b.gate_up] {
                match p {
                    Projection::Fused(m) => requant(m)?,
                    Projection::Separate(ms) => ms.iter_mut().try_for_each(requant)?,
                }
            }
            requant(&mut b.attn_out)?;
            requant(&mut b.down)?;
        }
        Ok(())
    }

    /// Drops the last `n` blocks (a cheaper, wrong model).
    pub fn skip_last_layers(&mut self, n: usize) {
        let keep = self.blocks.len().saturating_sub(n).max(1);
        self.blocks.truncate(keep);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Weight formats in use, for reports.
    pub fn formats(&self) -> Vec<&'static str> {
        let mut f = vec![self.embedding.format(), self.blocks[0].down.format()];
        f.dedup();
        f
    }

    /// Runs new tokens of several sequences through the model, appending them to their caches.
    /// Returns per sequence `vocab` logits per requested position (the last, or all when scoring).
    pub fn forward(&self, steps: &mut [SequenceStep<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (d, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let rows = step_rows(c, steps, false)?;
        let n = rows.len();
        let mut x = vec![0f32; n * d];
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        for (r, &tok) in tokens.iter().enumerate() {
            self.embedding
                .row(tok as usize, &mut x[r * d..(r + 1) * d])?;
        }
        if c.architecture == Architecture::Gemma3 {
            let scale = (d as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let rope_global = Rope::new(c.head_dim, c.rope_base, &rows);
        let rope_local = Rope::new(c.head_dim, c.rope_base_local, &rows);
        let neox = c.architecture.neox_rope();
        let gelu = c.architecture == Architecture::Gemma3;

        for (l, block) in self.blocks.iter().enumerate() {
            let h = rms_norm_rows(&x, &block.attn_norm, c.eps);
            let mut qkv = block.qkv.apply(&h, n)?;
            let rope = if c.is_sliding(l) {
                &rope_local
            } else {
                &rope_global
            };
            let width = qd + 2 * kvd;
            qkv.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
                if let Some(bias) = &block.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                let (q, rest) = row.split_at_mut(qd);
                let k = &mut rest[..kvd];
                for head in q.chunks_mut(c.head_dim) {
                    if let Some(w) = &block.q_norm {
                        rms_norm_in_place(head, w, c.eps);
                    }
                    rope.apply(r, head, neox);
                }
                for head in k.chunks_mut(c.head_dim) {
                    if let Some(w) = &block.k_norm {
                        rms_norm_in_place(head, w, c.eps);
                    }
                    rope.apply(r, head, neox);
                }
            });
            for (r, &(s, _)) in rows.iter().enumerate() {
                let row = &qkv[r * width..(r + 1) * width];
                let cache = &mut *steps[s].cache;
                append_f16(&mut cache.keys[l], &row[qd..qd + kvd]);
                append_f16(&mut cache.values[l], &row[qd + kvd..]);
            }
            let caches: Vec<&KvCache> = steps.iter().map(|s| &*s.cache).collect();
            let window = if c.is_sliding(l) {
                c.sliding_window
            } else {
                None
            };
            // One task per row and key/value head (the query heads sharing it are contiguous), so
            // a single decoded token's attention runs on every thread too. Each head's output is
            // the same computation however the work is split.
            let mut attn = vec![0f32; n * qd];
            attn.par_chunks_mut(qd / c.kv_heads)
                .enumerate()
                .for_each(|(task, out)| {
                    let (r, kv_head) = (task / c.kv_heads, task % c.kv_heads);
                    let (s, pos) = rows[r];
                    let cache = caches[s];
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    attend(
                        c,
                        &qkv[r * width..r * width + qd],
                        &cache.keys[l],
                        &cache.values[l],
                        lo..pos + 1,
                        kv_head,
                        out,
                    );
                });
            let mut o = block.attn_out.matmul(&attn, n)?;
            if let Some(w) = &block.post_attn_norm {
                o = rms_norm_rows(&o, w, c.eps);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let h = rms_norm_rows(&x, &block.ffn_norm, c.eps);
            let gu = block.gate_up.apply(&h, n)?;
            let mut act = vec![0f32; n * c.ffn];
            // Elementwise, in pieces within a row too, so that one decoded token uses every thread.
            act.par_chunks_mut(c.ffn)
                .zip(gu.par_chunks(2 * c.ffn))
                .for_each(|(a, gu)| {
                    let (g, u) = gu.split_at(c.ffn);
                    a.par_chunks_mut(ACTIVATION_PIECE)
                        .zip(g.par_chunks(ACTIVATION_PIECE))
                        .zip(u.par_chunks(ACTIVATION_PIECE))
                        .for_each(|((a, g), u)| {
                            for i in 0..a.len() {
                                let gated = if gelu { gelu_tanh(g[i]) } else { silu(g[i]) };
                                a[i] = gated * u[i];
                            }
                        });
                });
            let mut down = block.down.matmul(&act, n)?;
            if let Some(w) = &block.post_ffn_norm {
                down = rms_norm_rows(&down, w, c.eps);
            }
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        for step in steps.iter_mut() {
            step.cache.len += step.tokens.len();
        }

        // Logits only for the rows asked for.
        let wanted = logit_rows(steps);
        let mut selected = Vec::new();
        for take in &wanted {
            selected.extend_from_slice(&x[take.start * d..take.end * d]);
        }
        let h = rms_norm_rows(&selected, &self.output_norm, c.eps);
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        let logits = head.matmul(&h, h.len() / d)?;
        Ok(split_logits(&logits, &wanted, c.vocab_size))
    }
}

/// Checks the steps of a forward call (at least one token each, within the context and the
/// vocabulary, a cache of the kind the pass uses: `device` or native) and says where each new row
/// lives: (sequence, absolute position), sequences in order.
pub(crate) fn step_rows(
    c: &Config,
    steps: &[SequenceStep<'_>],
    device: bool,
) -> Result<Vec<(usize, usize)>> {
    let mut rows = Vec::new();
    for (s, step) in steps.iter().enumerate() {
        if step.tokens.is_empty() {
            return Err(Error::InvalidRequest(
                "a sequence step needs at least one token".into(),
            ));
        }
        if step.cache.device.is_some() != device {
            let owner = if device {
                "native-path"
            } else {
                "device-backend"
            };
            return Err(Error::InvalidRequest(format!(
                "this KV cache belongs to a {owner} model"
            )));
        }
        let end = step.cache.len() + step.tokens.len();
        if end > c.context_length {
            return Err(Error::ContextOverflow {
                tokens: end,
                context: c.context_length,
            });
        }
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::BadToken(t));
        }
        rows.extend((0..step.tokens.len()).map(|t| (s, step.cache.len() + t)));
    }
    Ok(rows)
}

/// Per sequence, the rows of the call (indices into all new rows) whose logits are returned: the
/// last, or all from `logits_from`.
pub(crate) fn logit_rows(steps: &[SequenceStep<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut offset = 0;
    steps
        .iter()
        .map(|step| {
            let len = step.tokens.len();
            let first = step.logits_from.map_or(len - 1, |f| f.min(len - 1));
            let take = offset + first..offset + len;
            offset += len;
            take
        })
        .collect()
}

/// Splits the logits of the rows `wanted` (stacked, `vocab` each) into one vector per sequence.
pub(crate) fn split_logits(
    logits: &[f32],
    wanted: &[std::ops::Range<usize>],
    vocab: usize,
) -> Vec<Vec<f32>> {
    let mut at = 0;
    wanted
        .iter()
        .map(|take| {
            let rows = &logits[at * vocab..(at + take.len()) * vocab];
            at += take.len();
            rows.to_vec()
        })
        .collect()
}

/// Values of the gated activation one task computes.
const ACTIVATION_PIECE: usize = 512;

/// Scaled dot-product attention of one query row's heads that share key/value head `kv_head`,
/// against cached positions `span`; `out` is those query heads' output (`heads / kv_heads ×
/// head_dim` values). The heads of a group are handled together, so each cached key is read
/// once. Common head sizes get a copy of the code with the size fixed, so that a head's running
/// output stays in registers.
fn attend(
    c: &Config,
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    span: std::ops::Range<usize>,
    kv_head: usize,
    out: &mut [f32],
) {
    match c.head_dim {
        64 => attend_sized::<64>(c, q, keys, values, span, kv_head, out),
        128 => attend_sized::<128>(c, q, keys, values, span, kv_head, out),
        256 => attend_sized::<256>(c, q, keys, values, span, kv_head, out),
        _ => attend_sized::<0>(c, q, keys, values, span, kv_head, out),
    }
}

/// Appends `x` to a cache vector, rounded to f16.
fn append_f16(cache: &mut Vec<f16>, x: &[f32]) {
    let start = cache.len();
    cache.resize(start + x.len(), f16::ZERO);
    cache[start..].convert_from_f32_slice(x);
}

/// [`attend`] for heads of `HD` values (0: any size, read from the config).
fn attend_sized<const HD: usize>(
    c: &Config,
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    span: std::ops::Range<usize>,
    kvh: usize,
    out: &mut [f32],
) {
    let hd = if HD == 0 { c.head_dim } else { HD };
    let kvd = c.kv_dim();
    let group = c.heads / c.kv_heads;
    let (lo, hi) = (span.start, span.end);
    let len = hi - lo;
    let mut scores = vec![0f32; group * len];
    // Only the any-size copy needs a heap buffer; the sized copies keep the output on the stack.
    let mut running = if HD == 0 { vec![0f32; hd] } else { Vec::new() };
    let heads = kvh * group..(kvh + 1) * group;
    let mut sized = [0f32; HD];
    let mut any = if HD == 0 { vec![0f32; hd] } else { Vec::new() };
    let k = if HD == 0 {
        &mut any[..]
    } else {
        &mut sized[..]
    };
    for (i, p) in (lo..hi).enumerate() {
        keys[p * kvd + kvh * hd..][..hd].convert_to_f32_slice(k);
        for (g, h) in heads.clone().enumerate() {
            scores[g * len + i] = dot_f32(&q[h * hd..][..hd], k) * c.attn_scale;
        }
    }
    for g in 0..group {
        let s = &mut scores[g * len..(g + 1) * len];
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        // The exponentials first (a loop the compiler vectorises), then the sum in element order.
        s.iter_mut().for_each(|v| *v = exp_f32(*v - max));
        let sum = s.iter().fold(0f32, |acc, &v| acc + v);
        if HD == 0 {
            running.fill(0.0);
            weigh_values(s, sum, values, lo, kvd, kvh * hd, &mut running, k);
            out[g * hd..(g + 1) * hd].copy_from_slice(&running);
        } else {
            let mut o = [0f32; HD];
            weigh_values(s, sum, values, lo, kvd, kvh * hd, &mut o, k);
            out[g * hd..(g + 1) * hd].copy_from_slice(&o);
        }
    }
}

/// `o = Σ (weights[i] / sum) · values[lo + i]` over one head's slice of the value rows.
#[inline(always)]
fn weigh_values(
    weights: &[f32],
    sum: f32,
    values: &[f16],
    lo: usize,
    kvd: usize,
    offset: usize,
    o: &mut [f32],
    v: &mut [f32],
) {
    let hd = o.len();
    for (i, &e) in weights.iter().enumerate() {
        let w = e / sum;
        values[(lo + i) * kvd + offset..][..hd].convert_to_f32_slice(v);
        for (a, b) in o.iter_mut().zip(v.iter()) {
            *a = w.mul_add(*b, *a);
        }
    }
}

/// Rotary position embedding tables for the rows of one forward call (`rows × head_dim / 2`).
pub(crate) struct Rope {
    half: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, base: f32, rows: &[(usize, usize)]) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(rows.len() * half);
        let mut sin = Vec::with_capacity(rows.len() * half);
        for &(_, pos) in rows {
            for i in 0..half {
                let inv_freq = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    fn apply(&self, row: usize, x: &mut [f32], neox: bool) {
        let (cos, sin) = (
            &self.cos[row * self.half..(row + 1) * self.half],
            &self.sin[row * self.half..(row + 1) * self.half],
        );
        for i in 0..self.half {
            let (a, b) = if neox {
                (i, i + self.half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos[i] - x1 * sin[i];
            x[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = 1.0 / (dot_f32(x, x) / x.len() as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(w) {
        *v = *v * scale * w;
    }
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(w.len())
        .for_each(|row| rms_norm_in_place(row, w, eps));
    y
}

/// `e^x` from f32 multiplies, adds and bit operations only, so that loops of it vectorise and give
/// the same bits on every machine (the C library's `expf` and `tanhf` differ between versions, and
/// are called one value at a time). `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (`n` rounded by adding
/// and subtracting 1.5·2²³, `ln 2` in two parts), then a degree-6 Taylor polynomial for `e^r`
/// (error below 1.3e-7 relative) times `2ⁿ` built in the exponent bits. Inputs are clamped to
/// [−87, 88], where `2ⁿ` stays a normal number: below, the result is at most 1.7e-38 instead of 0.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    // 355/512 (nine significant bits, so `n · LN2_HI` is exact for |n| ≤ 128), and the rest.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0).min(88.0);
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// GELU with the tanh approximation, `tanh(y) = 1 − 2 / (e^{2y} + 1)` by [`exp_f32`].
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    0.5 * x * (2.0 - 2.0 / (exp_f32(2.0 * y) + 1.0))
}

#[cfg(test)]
mod tests {
    use super::{exp_f32, gelu_tanh, silu};

    #[test]
    fn exp_silu_and_gelu_are_accurate_over_the_range_that_matters() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.0044; // −88 … 88
            let exact = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if x > -87.0 {
                assert!(
                    ((got - exact) / exact).abs() < 3e-7,
                    "exp({x}) = {got}, not {exact}"
                );
            } else {
                assert!(got < 2e-38, "exp({x}) = {got}");
            }
        }
        for i in -3_000..=3_000 {
            let x = i as f32 * 0.01; // −30 … 30
            let xd = x as f64;
            let silu_exact = xd / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - silu_exact).abs() < 1e-6 * (1.0 + silu_exact.abs()));
            let y = 0.797_884_560_802_865_4 * (xd + 0.044_715 * xd * xd * xd);
            let gelu_exact = 0.5 * xd * (1.0 + y.tanh());
            assert!(
                (gelu_tanh(x) as f64 - gelu_exact).abs() < 1e-6 * (1.0 + gelu_exact.abs()),
                "gelu({x}) = {}, not {gelu_exact}",
                gelu_tanh(x)
            );
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), exp_f32(-87.0));
        assert!(exp_f32(f32::INFINITY).is_finite());
    }
}
