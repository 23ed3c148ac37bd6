//! Quantized matrices and the matrix products the forward pass runs on.
//!
//! The shipped SmolLM2 model stores its layers as GGML `Q4_1` (32 weights per block, `w = d·q + m`
//! with a 4-bit `q`) and its embedding as `Q8_0`. candle has no SIMD kernel for `Q4_1`, so this module
//! keeps those two formats in a structure-of-arrays layout (scales widened to f32 once, at load time,
//! which is exact) and multiplies them against activations quantized to 8 bits per 32-block, the way
//! llama.cpp does (`Q8_1`-style: a scale and the block sum). Other GGML formats (the K-quants of
//! Gemma 3, `Q5_0`, ...) are widened to f32 at load time (see [`QMatrix::from_qtensor`]).
//!
//! Determinism matters more than usual here, because verification compares a provider's logits with a
//! verifier's: every output element is computed by the same sequence of operations whatever the batch
//! size, the number of rows in flight or the thread count. Rows are independent and the per-row
//! accumulation order is fixed, so an incremental (KV-cached) pass and a batched teacher-forced pass
//! produce bitwise-identical products on the same machine.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Number of weights in one GGML block for the formats handled here.
pub const BLOCK: usize = 32;

/// Activation rows computed together against one weight row (the register tile).
pub const GROUP: usize = 8;

/// Activations quantized to signed 16 bits per 32-element block, with the block's exact f32 sum.
///
/// llama.cpp quantizes activations to 8 bits for these formats; measured on SmolLM2 that shifts
/// logits by up to ~0.8 against exact arithmetic, enough to flip near-tied greedy choices. With 16 bits
/// the integer products stay exact and the error is ~256x smaller, at little cost on AVX-512 VNNI
/// (`vpdpwssd` multiplies a whole 32-element block of 16-bit pairs in one instruction).
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    blocks_per_row: usize,
    /// One scale per block.
    scales: Vec<f32>,
    /// Per block: the sum of the original values (for formats with a minimum, `Q4_1`).
    sums: Vec<f32>,
    /// `rows * blocks_per_row * 32` quantized values.
    values: Vec<i16>,
}

impl QuantizedActivations {
    /// Quantizes `rows` rows of `cols` values each (`cols` a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert_eq!(cols % BLOCK, 0);
        let blocks_per_row = cols / BLOCK;
        let n = rows * blocks_per_row;
        let mut scales = vec![0f32; n];
        let mut sums = vec![0f32; n];
        let mut values = vec![0i16; n * BLOCK];
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (o, v) in values[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
                *o = (v * inv).round() as i16;
            }
            scales[b] = d;
            sums[b] = dot_f32(block, &[1.0; BLOCK]);
        }
        Self { blocks_per_row, scales, sums, values }
    }

    fn block(&self, row: usize, b: usize) -> (f32, f32, &[i16]) {
        let i = row * self.blocks_per_row + b;
        (self.scales[i], self.sums[i], &self.values[i * BLOCK..(i + 1) * BLOCK])
    }
}

/// A weight matrix of `rows` outputs by `cols` inputs, in one of the supported storage formats.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// A GGML `Q4_1` block, byte for byte: `w = d·q + m`, `q` in 0..16, low nibbles are elements 0..16.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// A GGML `Q8_0` block, byte for byte: `w = d·q`, `q` a signed byte.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; 32],
}

/// Weights stay in GGML's own block layout (one contiguous stream, f16 scales): decoding one token
/// is bound by memory bandwidth, so every byte read per weight counts.
enum Storage {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    /// Plain f32, row-major.
    F32(Vec<f32>),
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}x{}, {})", self.rows, self.cols, self.format())
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl QMatrix {
    /// Builds a matrix from a GGML tensor of shape `(rows, cols)` (candle's order: outputs first).
    pub fn from_qtensor(name: &str, tensor: QTensor) -> Result<Self> {
        let dims = tensor.shape().dims().to_vec();
        let (rows, cols) = match dims.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => return Err(Error::BadTensor { name: name.into(), reason: format!("expected a matrix, got shape {dims:?}") }),
        };
        let dtype = tensor.dtype();
        let storage = match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q8_0 if cols % BLOCK == 0 => {
                let bytes = tensor.data()?;
                let n = rows * cols / BLOCK;
                if dtype == GgmlDType::Q4_1 {
                    if bytes.len() != n * 20 {
                        return Err(Error::BadTensor { name: name.into(), reason: "Q4_1 data has the wrong length".into() });
                    }
                    let blocks = bytes
                        .chunks_exact(20)
                        .map(|b| BlockQ4_1 { d: f16_at(b, 0), m: f16_at(b, 2), qs: b[4..20].try_into().expect("16 bytes") })
                        .collect();
                    Storage::Q4_1(blocks)
                } else {
                    if bytes.len() != n * 34 {
                        return Err(Error::BadTensor { name: name.into(), reason: "Q8_0 data has the wrong length".into() });
                    }
                    let blocks = bytes
                        .chunks_exact(34)
                        .map(|b| {
                            let mut qs = [0i8; 32];
                            for (o, x) in qs.iter_mut().zip(&b[2..34]) {
                                *o = *x as i8;
                            }
                            BlockQ8_0 { d: f16_at(b, 0), qs }
                        })
                        .collect();
                    Storage::Q8_0(blocks)
                }
            }
            // Everything else (F16, the K-quants, Q5_0, ...) is widened to f32 once, exactly. candle's
            // kernels for these quantize activations to 8 bits and take different paths for one row
            // and many, which made Gemma's incremental and teacher-forced logits differ by up to 2.1;
            // verification needs them to agree, so exactness wins over speed for these formats.
            _ => {
                let t = tensor.dequantize(&Device::Cpu)?.flatten_all()?;
                Storage::F32(t.to_vec1::<f32>()?)
            }
        };
        Ok(Self { rows, cols, storage })
    }

    /// Re-quantizes this matrix to GGML `Q4_0` (4 bits, no minimum: a lower-quality copy of a `Q4_1`
    /// model). `Q4_0`'s `w = d·(q − 8)` is stored exactly as `Q4_1` with `m = −8d`, so it runs on the
    /// same kernel. Used to simulate a provider that serves a cheaper quantization.
    pub fn requantize_q4_0(&self) -> Result<QMatrix> {
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.row(r, &mut w[r * self.cols..(r + 1) * self.cols])?;
        }
        let t = candle_core::Tensor::from_slice(&w, (self.rows, self.cols), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::Q4_0)?;
        let bytes = q.data()?;
        let n = self.rows * self.cols / BLOCK;
        let blocks: Vec<BlockQ4_1> = bytes
            .chunks_exact(18)
            .map(|b| {
                let d = f16_at(b, 0);
                // -8d is exact in f16 (a power-of-two multiple).
                BlockQ4_1 { d, m: f16::from_f32(-8.0 * d.to_f32()), qs: b[2..18].try_into().expect("16 bytes") }
            })
            .collect();
        debug_assert_eq!(blocks.len(), n);
        Ok(QMatrix { rows: self.rows, cols: self.cols, storage: Storage::Q4_1(blocks) })
    }

    /// Stacks matrices with the same input width and format into one (e.g. Q, K and V projections),
    /// so one product replaces several. Returns `None` when the formats differ or are not ours.
    pub fn concat_rows(parts: Vec<QMatrix>) -> std::result::Result<QMatrix, Vec<QMatrix>> {
        let cols = parts[0].cols;
        let same = parts.iter().all(|p| p.cols == cols)
            && (parts.iter().all(|p| matches!(p.storage, Storage::Q4_1(_))) || parts.iter().all(|p| matches!(p.storage, Storage::Q8_0(_))));
        if !same {
            return Err(parts);
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let storage = match parts[0].storage {
            Storage::Q4_1(_) => Storage::Q4_1(
                parts.into_iter().flat_map(|p| if let Storage::Q4_1(b) = p.storage { b } else { Vec::new() }).collect(),
            ),
            _ => Storage::Q8_0(parts.into_iter().flat_map(|p| if let Storage::Q8_0(b) = p.storage { b } else { Vec::new() }).collect()),
        };
        Ok(QMatrix { rows, cols, storage })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format, for reports.
    pub fn format(&self) -> &'static str {
        match &self.storage {
            Storage::Q4_1(_) => "Q4_1",
            Storage::Q8_0(_) => "Q8_0",
            Storage::F32(_) => "F32",
        }
    }

    /// Dequantizes row `r` (used for embedding look-ups).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let bpr = self.cols / BLOCK;
        match &self.storage {
            Storage::Q4_1(blocks) => {
                for (b, blk) in blocks[r * bpr..(r + 1) * bpr].iter().enumerate() {
                    let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
                    for (j, byte) in blk.qs.iter().enumerate() {
                        out[b * BLOCK + j] = d * (byte & 0x0F) as f32 + m;
                        out[b * BLOCK + j + 16] = d * (byte >> 4) as f32 + m;
                    }
                }
            }
            Storage::Q8_0(blocks) => {
                for (b, blk) in blocks[r * bpr..(r + 1) * bpr].iter().enumerate() {
                    let d = blk.d.to_f32();
                    for (j, q) in blk.qs.iter().enumerate() {
                        out[b * BLOCK + j] = d * *q as f32;
                    }
                }
            }
            Storage::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
        }
        Ok(())
    }

    /// `y = x · Wᵀ` for `n` rows of `x` (`n × cols`), giving `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), n * self.cols);
        if std::env::var("TESSERA_EXACT_MATMUL").is_ok_and(|v| v == self.format() || v == "all") {
            return Ok(self.run_rows(n, |o, r0, out| {
                let mut w = vec![0f32; self.cols];
                self.row(o, &mut w).expect("row");
                for (k, y) in out.iter_mut().enumerate() {
                    let r = r0 + k;
                    *y = dot_f32(&w, &x[r * self.cols..(r + 1) * self.cols]);
                }
            }));
        }
        match &self.storage {
            Storage::F32(w) => Ok(self.run_rows(n, |o, r0, out| {
                for (k, y) in out.iter_mut().enumerate() {
                    let r = r0 + k;
                    *y = dot_f32(&w[o * self.cols..(o + 1) * self.cols], &x[r * self.cols..(r + 1) * self.cols]);
                }
            })),
            Storage::Q4_1(blocks) => {
                let a = QuantizedActivations::quantize(x, n, self.cols);
                let bpr = self.cols / BLOCK;
                Ok(self.run_rows(n, |o, r0, out| kernels::q4_1_rows(&blocks[o * bpr..(o + 1) * bpr], &a, r0, out)))
            }
            Storage::Q8_0(blocks) => {
                let a = QuantizedActivations::quantize(x, n, self.cols);
                let bpr = self.cols / BLOCK;
                Ok(self.run_rows(n, |o, r0, out| kernels::q8_0_rows(&blocks[o * bpr..(o + 1) * bpr], &a, r0, out)))
            }
        }
    }

    /// Runs `f(output_row, first_activation_row, out)` for every output row and every group of at
    /// most [`GROUP`] activation rows, in parallel over output rows, and returns `n × rows`.
    /// Work is split by output row only, so the thread count never changes a value. Within a task the
    /// activation group is the outer loop, so it stays in L1 while the task's weight rows pass over it.
    fn run_rows(&self, n: usize, f: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
        const ROWS_PER_TASK: usize = 16;
        let mut by_output = vec![0f32; self.rows * n];
        by_output.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, chunk)| {
            let task_rows = chunk.len() / n;
            for r0 in (0..n).step_by(GROUP) {
                let g = GROUP.min(n - r0);
                for k in 0..task_rows {
                    f(task * ROWS_PER_TASK + k, r0, &mut chunk[k * n + r0..k * n + r0 + g]);
                }
            }
        });
        if n == 1 {
            return by_output;
        }
        let mut y = vec![0f32; n * self.rows];
        for o in 0..self.rows {
            for r in 0..n {
                y[r * self.rows + o] = by_output[o * n + r];
            }
        }
        y
    }
}

/// Dot product with a fixed association order (eight lanes, then a fixed reduction), which the
/// compiler vectorises and which gives the same result for the same inputs everywhere it runs.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

mod kernels {
    //! Block dot products against 16-bit activations. A portable version, an AVX2 version and an
    //! AVX-512 VNNI version, chosen at run time; all sum the same exact integer products per block.
    use super::{BlockQ4_1, BlockQ8_0, QuantizedActivations};

    #[derive(Clone, Copy, PartialEq)]
    #[repr(u8)]
    enum Isa {
        Avx512Vnni,
        Avx2,
        Portable,
    }

    /// 0 = not chosen yet; otherwise `Isa as u8 + 1`. An atomic rather than a `OnceLock` so that
    /// calibration can compare instruction sets within one process.
    static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TESSERA_NO_AVX512").is_none()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    fn isa() -> Isa {
        let v = CHOSEN.load(std::sync::atomic::Ordering::Relaxed);
        let isa = match v {
            1 => Isa::Avx512Vnni,
            2 => Isa::Avx2,
            3 => Isa::Portable,
            _ => {
                let isa = detect();
                CHOSEN.store(isa as u8 + 1, std::sync::atomic::Ordering::Relaxed);
                isa
            }
        };
        isa
    }

    /// Uses a less capable instruction set than detected (`avx2`, `portable`), or back to the
    /// detected one (`auto`). Returns false when the name is unknown or not supported here.
    pub fn set_isa(name: &str) -> bool {
        let best = detect();
        let want = match name {
            "auto" => best,
            "avx512-vnni" if best == Isa::Avx512Vnni => Isa::Avx512Vnni,
            "avx2" if best != Isa::Portable => Isa::Avx2,
            "portable" => Isa::Portable,
            _ => return false,
        };
        CHOSEN.store(want as u8 + 1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// The instruction set the kernels use on this machine.
    pub fn isa_name() -> &'static str {
        match isa() {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// One weight row in `Q4_1` against the activation rows `r0..r0 + out.len()`.
    pub fn q4_1_rows(w: &[BlockQ4_1], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match isa() {
            // SAFETY: the features were detected by `isa()`.
            Isa::Avx512Vnni => return unsafe { x86::q4_1_rows_vnni(w, a, r0, out) },
            Isa::Avx2 => return unsafe { x86::q4_1_rows_avx2(w, a, r0, out) },
            Isa::Portable => {}
        }
        for (r, y) in out.iter_mut().enumerate() {
            let (mut acc, mut mins) = (0f32, 0f32);
            for (b, blk) in w.iter().enumerate() {
                let (ad, asum, aq) = a.block(r0 + r, b);
                mins = blk.m.to_f32().mul_add(asum, mins);
                let mut s = 0i32;
                for j in 0..16 {
                    s += (blk.qs[j] & 0x0F) as i32 * aq[j] as i32 + (blk.qs[j] >> 4) as i32 * aq[j + 16] as i32;
                }
                acc += blk.d.to_f32() * ad * s as f32;
            }
            *y = acc + mins;
        }
    }

    /// One weight row in `Q8_0` against the activation rows `r0..r0 + out.len()`.
    pub fn q8_0_rows(w: &[BlockQ8_0], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match isa() {
            // SAFETY: the features were detected by `isa()`.
            Isa::Avx512Vnni => return unsafe { x86::q8_0_rows_vnni(w, a, r0, out) },
            Isa::Avx2 => return unsafe { x86::q8_0_rows_avx2(w, a, r0, out) },
            Isa::Portable => {}
        }
        for (r, y) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, blk) in w.iter().enumerate() {
                let (ad, _, aq) = a.block(r0 + r, b);
                let s: i32 = (0..32).map(|j| blk.qs[j] as i32 * aq[j] as i32).sum();
                acc += blk.d.to_f32() * ad * s as f32;
            }
            *y = acc;
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::{BlockQ4_1, BlockQ8_0, QuantizedActivations};
        use crate::quant::GROUP;
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn hsum256(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// The 32 weights of a `Q4_1` block as unsigned bytes, elements 0..16 in the low lane.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn unpack_q4(q: &[u8; 16]) -> __m256i {
            // SAFETY: 16 readable bytes.
            let raw = unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) };
            let low = _mm_set1_epi8(0x0F);
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(raw), low), _mm_and_si128(raw, low))
        }

        /// Pointers to the scales and values of the activation rows; every index used is in range
        /// because callers pass `r0 + out.len() <= rows` and `w.len() == blocks per row`.
        #[inline]
        fn act(a: &QuantizedActivations) -> (*const f32, *const i16) {
            (a.scales.as_ptr(), a.values.as_ptr())
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn q4_1_rows_avx2(w: &[BlockQ4_1], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
            let (g, bpr, base) = (out.len(), w.len(), r0 * w.len());
            let (scales, values) = act(a);
            let sums = a.sums.as_ptr();
            let mut mins = [0f32; GROUP];
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for (b, blk) in w.iter().enumerate() {
                let q = unpack_q4(&blk.qs);
                let (w0, w1) = (_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q)));
                let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
                for (k, (acc, mins)) in acc.iter_mut().zip(mins.iter_mut()).enumerate().take(g) {
                    let i = base + k * bpr + b;
                    // SAFETY: see `act`.
                    let (ad, x0, x1) = unsafe {
                        let p = values.add(i * 32);
                        (*scales.add(i), _mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(16) as *const __m256i))
                    };
                    // SAFETY: as above.
                    *mins = m.mul_add(unsafe { *sums.add(i) }, *mins);
                    let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ad), _mm256_cvtepi32_ps(p), *acc);
                }
            }
            for (k, y) in out.iter_mut().enumerate() {
                *y = hsum256(acc[k]) + mins[k];
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn q8_0_rows_avx2(w: &[BlockQ8_0], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
            let (g, bpr, base) = (out.len(), w.len(), r0 * w.len());
            let (scales, values) = act(a);
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for (b, blk) in w.iter().enumerate() {
                // SAFETY: 32 readable bytes.
                let q = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
                let (w0, w1) = (_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(q)));
                let d = blk.d.to_f32();
                for (k, acc) in acc.iter_mut().enumerate().take(g) {
                    let i = base + k * bpr + b;
                    // SAFETY: see `act`.
                    let (ad, x0, x1) = unsafe {
                        let p = values.add(i * 32);
                        (*scales.add(i), _mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(16) as *const __m256i))
                    };
                    let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ad), _mm256_cvtepi32_ps(p), *acc);
                }
            }
            for (k, y) in out.iter_mut().enumerate() {
                *y = hsum256(acc[k]);
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
        pub unsafe fn q4_1_rows_vnni(w: &[BlockQ4_1], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
            let (g, bpr, base) = (out.len(), w.len(), r0 * w.len());
            let (scales, values) = act(a);
            let sums = a.sums.as_ptr();
            let mut mins = [0f32; GROUP];
            let mut acc = [_mm512_setzero_ps(); GROUP];
            for (b, blk) in w.iter().enumerate() {
                let q = _mm512_cvtepu8_epi16(unpack_q4(&blk.qs));
                let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
                for (k, (acc, mins)) in acc.iter_mut().zip(mins.iter_mut()).enumerate().take(g) {
                    let i = base + k * bpr + b;
                    // SAFETY: see `act`.
                    let (ad, x) = unsafe { (*scales.add(i), _mm512_loadu_si512(values.add(i * 32) as *const _)) };
                    // SAFETY: as above.
                    *mins = m.mul_add(unsafe { *sums.add(i) }, *mins);
                    let p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q, x);
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(d * ad), _mm512_cvtepi32_ps(p), *acc);
                }
            }
            for (k, y) in out.iter_mut().enumerate() {
                *y = _mm512_reduce_add_ps(acc[k]) + mins[k];
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
        pub unsafe fn q8_0_rows_vnni(w: &[BlockQ8_0], a: &QuantizedActivations, r0: usize, out: &mut [f32]) {
            let (g, bpr, base) = (out.len(), w.len(), r0 * w.len());
            let (scales, values) = act(a);
            let mut acc = [_mm512_setzero_ps(); GROUP];
            for (b, blk) in w.iter().enumerate() {
                // SAFETY: 32 readable bytes.
                let q = _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) });
                let d = blk.d.to_f32();
                for (k, acc) in acc.iter_mut().enumerate().take(g) {
                    let i = base + k * bpr + b;
                    // SAFETY: see `act`.
                    let (ad, x) = unsafe { (*scales.add(i), _mm512_loadu_si512(values.add(i * 32) as *const _)) };
                    let p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q, x);
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(d * ad), _mm512_cvtepi32_ps(p), *acc);
                }
            }
            for (k, y) in out.iter_mut().enumerate() {
                *y = _mm512_reduce_add_ps(acc[k]);
            }
        }
    }
}

/// The instruction set the quantized kernels use on this machine (`avx512-vnni`, `avx2`, `portable`).
pub fn kernel_isa() -> &'static str {
    kernels::isa_name()
}

/// Switches the kernels' instruction set for the whole process (`auto`, `avx512-vnni`, `avx2`,
/// `portable`); used to calibrate verification across hardware. False if unsupported here.
pub fn set_kernel_isa(name: &str) -> bool {
    kernels::set_isa(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn check_format(dtype: GgmlDType) {
        let (rows, cols, n) = (37, 96, 5);
        let w = rand_vec(rows * cols, 1);
        let x = rand_vec(n * cols, 2);
        let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let m = QMatrix::from_qtensor("w", q).unwrap();
        assert_eq!(m.format(), format!("{dtype:?}").replace("Q4_1", "Q4_1"));
        let y = m.matmul(&x, n).unwrap();
        for r in 0..n {
            for o in 0..rows {
                let exact = dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                let got = y[r * rows + o];
                assert!((exact - got).abs() < 0.02, "{dtype:?} row {r} out {o}: {exact} vs {got}");
            }
        }
        // Each output is independent of how many rows are in the batch.
        for r in 0..n {
            let single = m.matmul(&x[r * cols..(r + 1) * cols], 1).unwrap();
            assert_eq!(&single[..], &y[r * rows..(r + 1) * rows]);
        }
        // Dequantized rows match candle's dequantization exactly.
        let mut row = vec![0f32; cols];
        m.row(3, &mut row).unwrap();
        assert_eq!(&row[..], &deq[3 * cols..4 * cols]);
    }

    #[test]
    fn q4_1_matches_dequantized_product_and_is_batch_invariant() {
        check_format(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matches_dequantized_product_and_is_batch_invariant() {
        check_format(GgmlDType::Q8_0);
    }

    #[test]
    fn other_formats_match_dequantized_product() {
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let (rows, cols, n) = (8, 512, 3);
            let w = rand_vec(rows * cols, 1);
            let x = rand_vec(n * cols, 2);
            let q = QTensor::quantize(&Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap(), dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            let y = m.matmul(&x, n).unwrap();
            for r in 0..n {
                for o in 0..rows {
                    let exact = dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                    assert!((exact - y[r * rows + o]).abs() < 1e-4, "{dtype:?} {r} {o}: {exact} vs {}", y[r * rows + o]);
                }
            }
        }
    }

    #[test]
    fn concat_rows_stacks_outputs() {
        let (cols, n) = (64, 3);
        let mk = |rows, seed| {
            let w = rand_vec(rows * cols, seed);
            let t = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
            QMatrix::from_qtensor("w", QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()).unwrap()
        };
        let x = rand_vec(n * cols, 9);
        let (a, b) = (mk(5, 3), mk(7, 4));
        let (ya, yb) = (a.matmul(&x, n).unwrap(), b.matmul(&x, n).unwrap());
        let ab = QMatrix::concat_rows(vec![a, b]).unwrap();
        let y = ab.matmul(&x, n).unwrap();
        for r in 0..n {
            assert_eq!(&y[r * 12..r * 12 + 5], &ya[r * 5..r * 5 + 5]);
            assert_eq!(&y[r * 12 + 5..r * 12 + 12], &yb[r * 7..r * 7 + 7]);
        }
    }
}
