//! Quantized matrices and the matrix products the forward pass runs on.
//!
//! The shipped SmolLM2 model stores its layers as GGML `Q4_1` (32 weights per block, `w = d·q + m`
//! with a 4-bit `q`) and its embedding as `Q8_0`. candle has no SIMD kernel for `Q4_1`, so this module
//! keeps both formats in GGML's own block layout and multiplies them with its own kernels against
//! activations quantized to **16 bits** per 32-block (llama.cpp uses 8; see
//! [`QuantizedActivations`]). On AVX-512 VNNI each 16-bit value is split into a high and a low byte,
//! so that `vpdpbusd` multiplies two blocks per instruction and still yields the exact 16-bit
//! products; AVX2 uses `vpmaddwd`, and a portable version runs anywhere.
//!
//! The formats of Gemma 3 and Qwen2 also stay in GGML's blocks: `Q5_0`, and the K-quants `Q4_K`,
//! `Q5_K` and `Q6_K` (256-weight super-blocks with 6- or 8-bit sub-block scales), with kernels that
//! take exact integer products and accumulate `d·sc·scale_a·product` in a fixed order. The AVX-512
//! VNNI and AVX2 kernels fold each sub-block's scale into its 16-bit weights once per block and add a
//! whole super-block's products up as exact 32-bit integers before one float multiply per row; the
//! portable version takes one product per sub-block.
//! `Q4_0` is repacked exactly into `Q4_1`; what is left (`F16`, `Q2_K`, `Q3_K`, ...) is widened to
//! f32 at load time (see [`QMatrix::from_qtensor`]).
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
use crate::gguf::GgufFile;

/// Number of weights in one GGML block for the formats handled here.
pub const BLOCK: usize = 32;

/// Activation rows computed together against one weight row (the register tile).
pub const GROUP: usize = 8;

/// How a matrix product wants its activations laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Layout {
    /// Signed 16-bit values, 32 per block, in element order (the AVX2 and portable kernels).
    Words,
    /// As [`Layout::Words`], each block's 16 even elements first, then its 16 odd ones: the AVX2
    /// K-quant kernels take a block's weights as 16-bit lanes of two bytes each and split them
    /// into even and odd elements with a mask and shifts, instead of widening bytes (a shuffle).
    EvenOddWords,
    /// Each 16-bit value split into a high byte and a low byte, `x = 256·hi + lo`, so that the
    /// AVX-512 VNNI kernels multiply two blocks per `vpdpbusd` and still get the exact 16-bit
    /// product. Blocks go in pairs: 64 high bytes, then 64 low bytes (see [`PairOrder`]).
    BytePlanes {
        order: PairOrder,
        /// High bytes stored with +128 (unsigned), for weights that are signed (`Q8_0`).
        unsigned_high: bool,
    },
}

/// The order of two blocks' 64 bytes in one 512-bit register, matching how the weights unpack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PairOrder {
    /// Elements 0..16 of both blocks, then elements 16..32 of both (`Q4_1`: low then high nibbles).
    Nibbles,
    /// All 32 elements of the first block, then of the second (`Q8_0`).
    Natural,
}

/// Activations quantized to signed 16 bits per 32-element block, with the block's exact f32 sum.
///
/// llama.cpp quantizes activations to 8 bits for these formats; measured on SmolLM2 that shifts
/// logits by up to ~0.8 against exact arithmetic, enough to flip near-tied greedy choices. With 16 bits
/// the integer products stay exact and the error is ~256x smaller.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    blocks_per_row: usize,
    layout: Layout,
    /// One scale per block.
    scales: Vec<f32>,
    /// Per block: the sum of the original values (for formats with a minimum, `Q4_1`).
    sums: Vec<f32>,
    /// [`Layout::Words`] and [`Layout::EvenOddWords`]: `rows * blocks_per_row * 32` values.
    values: Vec<i16>,
    /// [`Layout::BytePlanes`]: `rows * blocks_per_row * 64` bytes.
    planes: Vec<u8>,
    /// [`Layout::BytePlanes`]: `(scale, sum)` per block, interleaved.
    scale_sums: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes `rows` rows of `cols` values each (`cols` a multiple of `span`) into `layout`,
    /// with one scale per `span` values (32, or 256 for the K-quants), stored once per 32-block.
    ///
    /// A K-quant's 32-weight sub-blocks share one super-block scale `d`; quantizing the activations
    /// with one scale per 256 values as well lets the AVX2 kernels sum a whole super-block's
    /// products as exact integers before one float multiply. Every instruction set reads the same
    /// integers, so they still differ only in the rounding of the float sums.
    pub(crate) fn quantize(
        x: &[f32],
        rows: usize,
        cols: usize,
        layout: Layout,
        span: usize,
    ) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert!(span % BLOCK == 0 && cols % span == 0);
        let bpr = cols / BLOCK;
        let n = rows * bpr;
        let mut scales = vec![0f32; n];
        let mut sums = vec![0f32; n];
        let (words_len, planes_len) = match layout {
            Layout::Words | Layout::EvenOddWords => (n * BLOCK, 0),
            Layout::BytePlanes { .. } => (0, n * 64),
        };
        let mut words = vec![0i16; words_len];
        let mut planes = vec![0u8; planes_len];
        let quantize_row = |x: &[f32],
                            scales: &mut [f32],
                            sums: &mut [f32],
                            words: &mut [i16],
                            planes: &mut [u8]| {
            let mut d = 0f32;
            for (b, block) in x.chunks_exact(BLOCK).enumerate() {
                if b % (span / BLOCK) == 0 {
                    let amax = x[b * BLOCK..b * BLOCK + span]
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()));
                    d = amax / 32767.0;
                }
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q: [i16; BLOCK] = std::array::from_fn(|i| (block[i] * inv).round() as i16);
                scales[b] = d;
                sums[b] = dot_f32(block, &[1.0; BLOCK]);
                match layout {
                    Layout::Words => words[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&q),
                    Layout::EvenOddWords => {
                        let (even, odd) = words[b * BLOCK..(b + 1) * BLOCK].split_at_mut(BLOCK / 2);
                        for m in 0..BLOCK / 2 {
                            (even[m], odd[m]) = (q[2 * m], q[2 * m + 1]);
                        }
                    }
                    Layout::BytePlanes {
                        order,
                        unsigned_high,
                    } => {
                        // Pairs of blocks take 128 bytes (64 high, 64 low); an odd last block, 64.
                        let (pair, in_pair) = (b / 2, b % 2);
                        let paired = pair * 2 + 1 < scales.len();
                        let group = &mut planes[pair * 128..][..if paired { 128 } else { 64 }];
                        let (high, low) = group.split_at_mut(group.len() / 2);
                        for (e, &v) in q.iter().enumerate() {
                            let at = match order {
                                PairOrder::Nibbles if paired => {
                                    (e / 16) * 32 + in_pair * 16 + e % 16
                                }
                                _ => in_pair * BLOCK + e,
                            };
                            let hi = (v >> 8) as i8 as u8;
                            high[at] = if unsigned_high { hi ^ 0x80 } else { hi };
                            low[at] = v as u8;
                        }
                    }
                }
            }
        };
        // Each row's share of every output, so that rows can be quantized in parallel.
        let (wc, pc) = (words_len / rows.max(1), planes_len / rows.max(1));
        let mut parts = Vec::with_capacity(rows);
        let (mut s, mut m, mut w, mut p) = (
            &mut scales[..],
            &mut sums[..],
            &mut words[..],
            &mut planes[..],
        );
        for x in x.chunks(cols) {
            let (s0, s1) = std::mem::take(&mut s).split_at_mut(bpr);
            let (m0, m1) = std::mem::take(&mut m).split_at_mut(bpr);
            let (w0, w1) = std::mem::take(&mut w).split_at_mut(wc);
            let (p0, p1) = std::mem::take(&mut p).split_at_mut(pc);
            parts.push((x, s0, m0, w0, p0));
            (s, m, w, p) = (s1, m1, w1, p1);
        }
        if rows >= 16 {
            parts
                .into_par_iter()
                .for_each(|(x, s, m, w, p)| quantize_row(x, s, m, w, p));
        } else {
            parts
                .into_iter()
                .for_each(|(x, s, m, w, p)| quantize_row(x, s, m, w, p));
        }
        let scale_sums = match layout {
            Layout::Words | Layout::EvenOddWords => Vec::new(),
            Layout::BytePlanes { .. } => scales
                .iter()
                .zip(&sums)
                .flat_map(|(&d, &s)| [d, s])
                .collect(),
        };
        Self {
            blocks_per_row: bpr,
            layout,
            scales,
            sums,
            values: words,
            planes,
            scale_sums,
        }
    }

    fn block(&self, row: usize, b: usize) -> (f32, f32, &[i16]) {
        let i = row * self.blocks_per_row + b;
        (
            self.scales[i],
            self.sums[i],
            &self.values[i * BLOCK..(i + 1) * BLOCK],
        )
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

/// A GGML `Q5_0` block, byte for byte: `w = d·(q − 16)`, `q` 5 bits: the low four in nibbles
/// (low nibbles are elements 0..16), the fifth of element `j` in bit `j` of `qh`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_0 {
    d: f16,
    qh: [u8; 4],
    qs: [u8; 16],
}

impl BlockQ5_0 {
    /// Element `j` as `q − 16`.
    #[inline(always)]
    fn q(&self, j: usize) -> i8 {
        let nibble = if j < 16 {
            self.qs[j] & 0x0F
        } else {
            self.qs[j - 16] >> 4
        };
        let fifth = ((u32::from_le_bytes(self.qh) >> j) & 1) as u8;
        (nibble | (fifth << 4)) as i8 - 16
    }
}

/// Weights in one GGML K-quant super-block.
pub const K_BLOCK: usize = 256;

/// A GGML `Q4_K` block, byte for byte (4.5 bits per weight): eight sub-blocks of 32 with 6-bit
/// scales and minimums, `w = d·sc·q − dmin·m`, `q` in 0..16. Bytes 32j..32j+32 of `qs` hold
/// sub-block 2j in their low nibbles and sub-block 2j + 1 in their high nibbles.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qs: [u8; 128],
}

/// A GGML `Q5_K` block, byte for byte (5.5 bits per weight): `Q4_K` with a fifth bit per weight,
/// `w = d·sc·q − dmin·m`, `q` in 0..32. The low four bits sit in `qs` as in `Q4_K`; the fifth of
/// element `l` of sub-block `j` is bit `j` of `qh[l]`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5K {
    d: f16,
    dmin: f16,
    scales: [u8; 12],
    qh: [u8; 32],
    qs: [u8; 128],
}

/// A GGML `Q6_K` block, byte for byte (6.5625 bits per weight): sixteen sub-blocks of 16 with
/// signed 8-bit scales, `w = d·sc·(q − 32)`, `q` 6 bits (4 in `ql`, 2 in `qh`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: f16,
}

/// The 6-bit scale and minimum of sub-block `j` of a `Q4_K` block (GGML's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight 6-bit scales and minimums of a `Q4_K`/`Q5_K` block at once (as [`scale_min_k4`] for
/// `j` in 0..8), four bytes at a time in 32-bit words: about a dozen integer operations.
#[inline(always)]
fn scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let (low6, low4, top2) = (0x3F3F_3F3Fu32, 0x0F0F_0F0Fu32, 0x0303_0303u32);
    let sc_high = (u2 & low4) | (((u0 >> 6) & top2) << 4);
    let m_high = ((u2 >> 4) & low4) | (((u1 >> 6) & top2) << 4);
    let join = |low: u32, high: u32| (u64::from(low) | (u64::from(high) << 32)).to_le_bytes();
    (join(u0 & low6, sc_high), join(u1 & low6, m_high))
}

impl BlockQ4K {
    fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: b[4..16].try_into().expect("12 bytes"),
            qs: b[16..144].try_into().expect("128 bytes"),
        }
    }

    /// The 256 weights, as candle (and GGML) dequantize them.
    fn dequantize(&self, out: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            let (dj, mj) = (d * sc as f32, min * m as f32);
            let q = &self.qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let shift = if j % 2 == 0 { 0 } else { 4 };
            for (o, q) in out[j * 32..j * 32 + 32].iter_mut().zip(q) {
                *o = dj * ((q >> shift) & 0xF) as f32 - mj;
            }
        }
    }
}

impl BlockQ5K {
    fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: b[4..16].try_into().expect("12 bytes"),
            qh: b[16..48].try_into().expect("32 bytes"),
            qs: b[48..176].try_into().expect("128 bytes"),
        }
    }

    /// Element `l` of sub-block `j`, in 0..32.
    #[inline(always)]
    fn q(&self, j: usize, l: usize) -> u8 {
        let nibble = (self.qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0xF;
        nibble | (((self.qh[l] >> j) & 1) << 4)
    }

    /// The 256 weights, as candle (and GGML) dequantize them.
    fn dequantize(&self, out: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            let (dj, mj) = (d * sc as f32, min * m as f32);
            for (l, o) in out[j * 32..j * 32 + 32].iter_mut().enumerate() {
                *o = dj * self.q(j, l) as f32 - mj;
            }
        }
    }
}

impl BlockQ6K {
    fn from_bytes(b: &[u8]) -> Self {
        let mut scales = [0i8; 16];
        for (s, x) in scales.iter_mut().zip(&b[192..208]) {
            *s = *x as i8;
        }
        Self {
            ql: b[0..128].try_into().expect("128 bytes"),
            qh: b[128..192].try_into().expect("64 bytes"),
            scales,
            d: f16_at(b, 208),
        }
    }

    /// Element `32t + l` (`l < 32`) of 128-element half `h`, as `q − 32`.
    #[inline(always)]
    fn q(&self, h: usize, t: usize, l: usize) -> i8 {
        let (ql, qh) = (&self.ql[64 * h..], self.qh[32 * h + l]);
        let low = match t {
            0 => ql[l] & 0xF,
            1 => ql[l + 32] & 0xF,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        (low | (((qh >> (2 * t)) & 3) << 4)) as i8 - 32
    }

    /// The 256 weights, as candle (and GGML) dequantize them.
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for h in 0..2 {
            for t in 0..4 {
                for l in 0..32 {
                    out[128 * h + 32 * t + l] =
                        d * self.scales[8 * h + 2 * t + l / 16] as f32 * self.q(h, t, l) as f32;
                }
            }
        }
    }
}

/// Twenty bytes of a repacked `Q4_1` row (the size of one block).
///
/// `Q4_1` rows are stored with the same bytes as GGML's, reordered: every group of
/// [`Q4_1_GROUP`] blocks is their four `(d, m)` f16 pairs (16 bytes) followed by their four 16-byte
/// nibble arrays (64 bytes), so one load fetches four blocks' scales and one 64-byte load all their
/// weights. Blocks after the last full group keep GGML's layout (`d, m, qs`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1Slot([u8; 20]);

/// Blocks per repacked `Q4_1` group.
const Q4_1_GROUP: usize = 4;

/// Repacks rows of `bpr` GGML `Q4_1` blocks (see [`Q4_1Slot`]).
fn pack_q4_1(blocks: &[BlockQ4_1], bpr: usize) -> Vec<Q4_1Slot> {
    let mut out = Vec::with_capacity(blocks.len());
    for row in blocks.chunks(bpr) {
        let groups = row.chunks_exact(Q4_1_GROUP);
        let tail = groups.remainder();
        for group in groups {
            let mut bytes = [0u8; 20 * Q4_1_GROUP];
            for (j, blk) in group.iter().enumerate() {
                bytes[j * 4..j * 4 + 2].copy_from_slice(&blk.d.to_le_bytes());
                bytes[j * 4 + 2..j * 4 + 4].copy_from_slice(&blk.m.to_le_bytes());
                bytes[16 + j * 16..32 + j * 16].copy_from_slice(&blk.qs);
            }
            out.extend(
                bytes
                    .chunks_exact(20)
                    .map(|s| Q4_1Slot(s.try_into().expect("20 bytes"))),
            );
        }
        for blk in tail {
            let mut s = [0u8; 20];
            s[0..2].copy_from_slice(&blk.d.to_le_bytes());
            s[2..4].copy_from_slice(&blk.m.to_le_bytes());
            s[4..20].copy_from_slice(&blk.qs);
            out.push(Q4_1Slot(s));
        }
    }
    out
}

/// The bytes of repacked `Q4_1` slots.
fn slot_bytes(slots: &[Q4_1Slot]) -> &[u8] {
    // SAFETY: `Q4_1Slot` is a `repr(C)` wrapper of `[u8; 20]` (alignment 1, no padding), so a slice of
    // them is `20 * len` initialised bytes.
    unsafe { std::slice::from_raw_parts(slots.as_ptr() as *const u8, slots.len() * 20) }
}

/// Where block `b` of a repacked `Q4_1` row of `bpr` blocks lives: the byte offsets of its
/// `(d, m)` and of its 16 nibble bytes. A block in a full group of four has its `(d, m)` at `4j`
/// and its nibbles at `16 + 16j` of the group's 80 bytes; a block after the last full group keeps
/// GGML's 20 bytes.
#[inline(always)]
fn q4_1_place(bpr: usize, b: usize) -> (usize, usize) {
    let full = bpr / Q4_1_GROUP * Q4_1_GROUP;
    if b < full {
        let group = (b / Q4_1_GROUP) * 20 * Q4_1_GROUP;
        let j = b % Q4_1_GROUP;
        (group + 4 * j, group + 4 * Q4_1_GROUP + 16 * j)
    } else {
        (b * 20, b * 20 + 4)
    }
}

/// Block `b` of a repacked `Q4_1` row, in GGML's form.
fn q4_1_block(row: &[Q4_1Slot], b: usize) -> BlockQ4_1 {
    let bytes = slot_bytes(row);
    let (head, qs) = q4_1_place(row.len(), b);
    BlockQ4_1 {
        d: f16_at(bytes, head),
        m: f16_at(bytes, head + 2),
        qs: bytes[qs..qs + 16].try_into().expect("16 bytes"),
    }
}

/// Dequantizes row `r` of a K-quant matrix `cols` wide, one super-block at a time.
fn k_row<B>(blocks: &[B], r: usize, cols: usize, out: &mut [f32], dequantize: fn(&B, &mut [f32])) {
    let bpr = cols / K_BLOCK;
    for (blk, out) in blocks[r * bpr..(r + 1) * bpr]
        .iter()
        .zip(out.chunks_exact_mut(K_BLOCK))
    {
        dequantize(blk, out);
    }
}

/// Weights keep GGML's bytes per weight (one contiguous stream, f16 scales): decoding one token is
/// bound by memory bandwidth, so every byte read per weight counts.
enum Storage {
    Q4_1(Vec<Q4_1Slot>),
    Q8_0(Vec<BlockQ8_0>),
    Q5_0(Vec<BlockQ5_0>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
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

/// Block types whose bytes are GGML's exactly (`repr(C)`, no padding, every bit pattern valid):
/// a file's tensor can be read straight into a `Vec` of them.
///
/// # Safety
/// Implementors must be `repr(C)` aggregates of `f16`/`u8`/`i8` (arrays) with no padding, and
/// `GGML_SIZE` must be their size.
unsafe trait GgmlBytes: Copy {
    /// GGML's size of one block.
    const GGML_SIZE: usize;
    const ZERO: Self;
}

// SAFETY: all four are `repr(C)` structs of f16 and byte arrays; the assertions check there is no padding.
unsafe impl GgmlBytes for BlockQ8_0 {
    const GGML_SIZE: usize = 34;
    const ZERO: Self = Self {
        d: f16::ZERO,
        qs: [0; 32],
    };
}
// SAFETY: as above.
unsafe impl GgmlBytes for BlockQ5_0 {
    const GGML_SIZE: usize = 22;
    const ZERO: Self = Self {
        d: f16::ZERO,
        qh: [0; 4],
        qs: [0; 16],
    };
}
// SAFETY: as above.
unsafe impl GgmlBytes for BlockQ4K {
    const GGML_SIZE: usize = 144;
    const ZERO: Self = Self {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; 12],
        qs: [0; 128],
    };
}
// SAFETY: as above.
unsafe impl GgmlBytes for BlockQ5K {
    const GGML_SIZE: usize = 176;
    const ZERO: Self = Self {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; 12],
        qh: [0; 32],
        qs: [0; 128],
    };
}
// SAFETY: as above.
unsafe impl GgmlBytes for BlockQ6K {
    const GGML_SIZE: usize = 210;
    const ZERO: Self = Self {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: f16::ZERO,
    };
}
const _: () = assert!(
    std::mem::size_of::<BlockQ8_0>() == 34
        && std::mem::size_of::<BlockQ5_0>() == 22
        && std::mem::size_of::<BlockQ4K>() == 144
        && std::mem::size_of::<BlockQ5K>() == 176
        && std::mem::size_of::<BlockQ6K>() == 210
);

/// Reads tensor `name` (`n` blocks) from `file` straight into blocks.
fn read_blocks<B: GgmlBytes>(file: &mut GgufFile, name: &str, n: usize) -> Result<Vec<B>> {
    let mut blocks = vec![B::ZERO; n];
    // SAFETY: `B` is plain bytes without padding (`GgmlBytes`), so its `n` blocks are
    // `n * GGML_SIZE` initialised bytes, and any bytes written make valid blocks.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, n * B::GGML_SIZE) };
    file.read_tensor_bytes(name, bytes)?;
    Ok(blocks)
}

impl QMatrix {
    /// Loads tensor `name` of a GGUF file. Formats kept in GGML's blocks (`Q8_0`, `Q5_0`, `Q4_K`,
    /// `Q5_K`, `Q6_K`) are read from the file straight into place, so peak memory stays near the file's size;
    /// the others go through [`QMatrix::from_qtensor`].
    pub fn from_gguf(file: &mut GgufFile, name: &str) -> Result<Self> {
        let (dtype, dims) = file.tensor_info(name)?;
        let (rows, cols) = match dims.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => {
                return Err(Error::BadTensor {
                    name: name.into(),
                    reason: format!("expected a matrix, got shape {dims:?}"),
                })
            }
        };
        let storage = match dtype {
            GgmlDType::Q8_0 if cols % BLOCK == 0 => {
                Storage::Q8_0(read_blocks(file, name, rows * cols / BLOCK)?)
            }
            GgmlDType::Q5_0 if cols % BLOCK == 0 => {
                Storage::Q5_0(read_blocks(file, name, rows * cols / BLOCK)?)
            }
            GgmlDType::Q4K if cols % K_BLOCK == 0 => {
                Storage::Q4K(read_blocks(file, name, rows * cols / K_BLOCK)?)
            }
            GgmlDType::Q5K if cols % K_BLOCK == 0 => {
                Storage::Q5K(read_blocks(file, name, rows * cols / K_BLOCK)?)
            }
            GgmlDType::Q6K if cols % K_BLOCK == 0 => {
                Storage::Q6K(read_blocks(file, name, rows * cols / K_BLOCK)?)
            }
            _ => return Self::from_qtensor(name, file.tensor(name)?),
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
    }

    /// Builds a matrix from a GGML tensor of shape `(rows, cols)` (candle's order: outputs first).
    pub fn from_qtensor(name: &str, tensor: QTensor) -> Result<Self> {
        let dims = tensor.shape().dims().to_vec();
        let (rows, cols) = match dims.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => {
                return Err(Error::BadTensor {
                    name: name.into(),
                    reason: format!("expected a matrix, got shape {dims:?}"),
                })
            }
        };
        let dtype = tensor.dtype();
        let storage = match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q8_0 if cols % BLOCK == 0 => {
                let bytes = tensor.data()?;
                let n = rows * cols / BLOCK;
                if dtype == GgmlDType::Q4_1 {
                    if bytes.len() != n * 20 {
                        return Err(Error::BadTensor {
                            name: name.into(),
                            reason: "Q4_1 data has the wrong length".into(),
                        });
                    }
                    let blocks: Vec<BlockQ4_1> = bytes
                        .chunks_exact(20)
                        .map(|b| BlockQ4_1 {
                            d: f16_at(b, 0),
                            m: f16_at(b, 2),
                            qs: b[4..20].try_into().expect("16 bytes"),
                        })
                        .collect();
                    Storage::Q4_1(pack_q4_1(&blocks, cols / BLOCK))
                } else {
                    if bytes.len() != n * 34 {
                        return Err(Error::BadTensor {
                            name: name.into(),
                            reason: "Q8_0 data has the wrong length".into(),
                        });
                    }
                    let blocks = bytes
                        .chunks_exact(34)
                        .map(|b| {
                            let mut qs = [0i8; 32];
                            for (o, x) in qs.iter_mut().zip(&b[2..34]) {
                                *o = *x as i8;
                            }
                            BlockQ8_0 {
                                d: f16_at(b, 0),
                                qs,
                            }
                        })
                        .collect();
                    Storage::Q8_0(blocks)
                }
            }
            // `Q4_0` (`w = d·(q − 8)`) is `Q4_1` with `m = −8d`, exact in f16 (a power-of-two multiple).
            GgmlDType::Q4_0 if cols % BLOCK == 0 => {
                let bytes = tensor.data()?;
                if bytes.len() != rows * cols / BLOCK * 18 {
                    return Err(Error::BadTensor {
                        name: name.into(),
                        reason: "Q4_0 data has the wrong length".into(),
                    });
                }
                let blocks: Vec<BlockQ4_1> = bytes
                    .chunks_exact(18)
                    .map(|b| {
                        let d = f16_at(b, 0);
                        BlockQ4_1 {
                            d,
                            m: f16::from_f32(-8.0 * d.to_f32()),
                            qs: b[2..18].try_into().expect("16 bytes"),
                        }
                    })
                    .collect();
                Storage::Q4_1(pack_q4_1(&blocks, cols / BLOCK))
            }
            // `Q5_0` in GGML's own blocks, on its own kernels (5.5 bits per weight, no widening).
            GgmlDType::Q5_0 if cols % BLOCK == 0 => {
                let bytes = tensor.data()?;
                if bytes.len() != rows * cols / BLOCK * 22 {
                    return Err(Error::BadTensor {
                        name: name.into(),
                        reason: "Q5_0 data has the wrong length".into(),
                    });
                }
                Storage::Q5_0(
                    bytes
                        .chunks_exact(22)
                        .map(|b| BlockQ5_0 {
                            d: f16_at(b, 0),
                            qh: b[2..6].try_into().expect("4 bytes"),
                            qs: b[6..22].try_into().expect("16 bytes"),
                        })
                        .collect(),
                )
            }
            // The K-quants in GGML's own blocks, on their own kernels (no widening).
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K if cols % K_BLOCK == 0 => {
                let bytes = tensor.data()?;
                let (size, n) = (
                    match dtype {
                        GgmlDType::Q4K => BlockQ4K::GGML_SIZE,
                        GgmlDType::Q5K => BlockQ5K::GGML_SIZE,
                        _ => BlockQ6K::GGML_SIZE,
                    },
                    rows * cols / K_BLOCK,
                );
                if bytes.len() != n * size {
                    return Err(Error::BadTensor {
                        name: name.into(),
                        reason: format!("{dtype:?} data has the wrong length"),
                    });
                }
                let blocks = bytes.chunks_exact(size);
                match dtype {
                    GgmlDType::Q4K => Storage::Q4K(blocks.map(BlockQ4K::from_bytes).collect()),
                    GgmlDType::Q5K => Storage::Q5K(blocks.map(BlockQ5K::from_bytes).collect()),
                    _ => Storage::Q6K(blocks.map(BlockQ6K::from_bytes).collect()),
                }
            }
            // Everything else (F16, BF16, Q2_K, Q3_K, Q8_K, ...) is widened to f32 once, exactly. candle's
            // kernels for these quantize activations to 8 bits and take different paths for one row
            // and many, which made Gemma's incremental and teacher-forced logits differ by up to 2.1;
            // verification needs them to agree, so exactness wins over speed for these formats.
            _ => {
                let t = tensor.dequantize(&Device::Cpu)?.flatten_all()?;
                Storage::F32(t.to_vec1::<f32>()?)
            }
        };
        Ok(Self {
            rows,
            cols,
            storage,
        })
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
                BlockQ4_1 {
                    d,
                    m: f16::from_f32(-8.0 * d.to_f32()),
                    qs: b[2..18].try_into().expect("16 bytes"),
                }
            })
            .collect();
        debug_assert_eq!(blocks.len(), n);
        Ok(QMatrix {
            rows: self.rows,
            cols: self.cols,
            storage: Storage::Q4_1(pack_q4_1(&blocks, self.cols / BLOCK)),
        })
    }

    /// Stacks matrices with the same input width and format into one (e.g. Q, K and V projections),
    /// so one product replaces several. Returns `None` when the formats differ or are not ours.
    pub fn concat_rows(parts: Vec<QMatrix>) -> std::result::Result<QMatrix, Vec<QMatrix>> {
        let cols = parts[0].cols;
        let kind = std::mem::discriminant(&parts[0].storage);
        let same = parts
            .iter()
            .all(|p| p.cols == cols && std::mem::discriminant(&p.storage) == kind)
            && !matches!(parts[0].storage, Storage::F32(_));
        if !same {
            return Err(parts);
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        /// The blocks of every part, stacked, in the variant they share.
        macro_rules! stack {
            ($($variant:ident),*) => {
                match parts[0].storage {
                    $(Storage::$variant(_) => Storage::$variant(
                        parts
                            .into_iter()
                            .flat_map(|p| match p.storage {
                                Storage::$variant(b) => b,
                                _ => unreachable!("formats checked above"),
                            })
                            .collect(),
                    ),)*
                    Storage::F32(_) => unreachable!("F32 refused above"),
                }
            };
        }
        let storage = stack!(Q4_1, Q8_0, Q5_0, Q4K, Q5K, Q6K);
        Ok(QMatrix {
            rows,
            cols,
            storage,
        })
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
            Storage::Q5_0(_) => "Q5_0",
            Storage::Q4K(_) => "Q4K",
            Storage::Q5K(_) => "Q5K",
            Storage::Q6K(_) => "Q6K",
            Storage::F32(_) => "F32",
        }
    }

    /// Dequantizes row `r` (used for embedding look-ups).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let bpr = self.cols / BLOCK;
        match &self.storage {
            Storage::Q4_1(slots) => {
                let row = &slots[r * bpr..(r + 1) * bpr];
                for b in 0..bpr {
                    let blk = q4_1_block(row, b);
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
            Storage::Q5_0(blocks) => {
                for (b, blk) in blocks[r * bpr..(r + 1) * bpr].iter().enumerate() {
                    let d = blk.d.to_f32();
                    for j in 0..BLOCK {
                        out[b * BLOCK + j] = blk.q(j) as f32 * d;
                    }
                }
            }
            Storage::Q4K(blocks) => k_row(blocks, r, self.cols, out, BlockQ4K::dequantize),
            Storage::Q5K(blocks) => k_row(blocks, r, self.cols, out, BlockQ5K::dequantize),
            Storage::Q6K(blocks) => k_row(blocks, r, self.cols, out, BlockQ6K::dequantize),
            Storage::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
        }
        Ok(())
    }

    /// `y = x · Wᵀ` for `n` rows of `x` (`n × cols`), giving `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.matmul_on(kernels::isa(), x, n)
    }

    /// [`QMatrix::matmul`] on the kernels of one instruction set (which this CPU must support).
    fn matmul_on(&self, isa: kernels::Isa, x: &[f32], n: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), n * self.cols);
        let cols = self.cols;
        // Read once: a decode step runs hundreds of products, and the environment is locked to read.
        static EXACT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let exact = EXACT.get_or_init(|| std::env::var("TESSERA_EXACT_MATMUL").ok());
        if exact
            .as_deref()
            .is_some_and(|v| v == self.format() || v == "all")
        {
            return Ok(self.run_tiles(n, |tile| {
                let mut w = vec![0f32; cols];
                for j in 0..tile.weight_rows {
                    self.row(tile.first_weight_row + j, &mut w).expect("row");
                    for k in 0..tile.activation_rows {
                        let r = tile.first_activation_row + k;
                        tile.write(j, k, dot_f32(&w, &x[r * cols..(r + 1) * cols]));
                    }
                }
            }));
        }
        match &self.storage {
            Storage::F32(w) => Ok(self.run_tiles(n, |tile| {
                for j in 0..tile.weight_rows {
                    let o = tile.first_weight_row + j;
                    for k in 0..tile.activation_rows {
                        let r = tile.first_activation_row + k;
                        tile.write(
                            j,
                            k,
                            dot_f32(&w[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]),
                        );
                    }
                }
            })),
            Storage::Q4_1(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
            Storage::Q8_0(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
            Storage::Q5_0(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
            Storage::Q4K(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
            Storage::Q5K(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
            Storage::Q6K(blocks) => Ok(self.quantized_product(isa, blocks, x, n)),
        }
    }

    /// The product with this matrix's blocks on `isa`'s kernels: activations quantized in the
    /// layout those kernels read, then every tile.
    fn quantized_product<B: kernels::KernelBlock + Sync>(
        &self,
        isa: kernels::Isa,
        blocks: &[B],
        x: &[f32],
        n: usize,
    ) -> Vec<f32> {
        let a =
            QuantizedActivations::quantize(x, n, self.cols, kernels::layout::<B>(isa), B::WEIGHTS);
        let bpr = self.cols / B::WEIGHTS;
        self.run_tiles(n, |tile| {
            kernels::tile(isa, &blocks[tile.first_weight_row * bpr..], bpr, &a, tile)
        })
    }

    /// Runs `f` over tiles of at most [`ROWS_PER_TASK`] weight rows by [`GROUP`] activation rows,
    /// in parallel over weight rows, writing straight into the `n × rows` result.
    /// Work is split by weight row only, so the thread count never changes a value. Within a task the
    /// activation group is the outer loop, so it stays in L1 while the task's weight rows pass over it.
    fn run_tiles(&self, n: usize, f: impl Fn(Tile) + Sync) -> Vec<f32> {
        let mut y = vec![0f32; n * self.rows];
        let out = OutPtr(y.as_mut_ptr());
        let tasks = self.rows.div_ceil(ROWS_PER_TASK);
        (0..tasks).into_par_iter().for_each(|task| {
            let first_weight_row = task * ROWS_PER_TASK;
            let weight_rows = ROWS_PER_TASK.min(self.rows - first_weight_row);
            for r0 in (0..n).step_by(GROUP) {
                let tile = Tile {
                    first_weight_row,
                    weight_rows,
                    first_activation_row: r0,
                    activation_rows: GROUP.min(n - r0),
                    out: out.at(r0 * self.rows + first_weight_row),
                    stride: self.rows,
                };
                f(tile);
            }
        });
        y
    }
}

/// Weight rows one parallel task computes.
const ROWS_PER_TASK: usize = 16;

/// The result's buffer, shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its own weight rows), and the buffer
// outlives the parallel loop that uses it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` places in (callers keep it inside the buffer).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A block of the result: weight rows `first_weight_row..+weight_rows` by activation rows
/// `first_activation_row..+activation_rows`. Element (j, k) lives at `out[k * stride + j]`.
pub(crate) struct Tile {
    first_weight_row: usize,
    weight_rows: usize,
    first_activation_row: usize,
    activation_rows: usize,
    out: *mut f32,
    stride: usize,
}

impl Tile {
    fn write(&self, j: usize, k: usize, v: f32) {
        assert!(j < self.weight_rows && k < self.activation_rows);
        // SAFETY: (j, k) is inside this tile, which `run_tiles` placed inside the result.
        unsafe { *self.out.add(k * self.stride + j) = v };
    }
}

/// Dot product with a fixed association order (four chains of eight lanes, then a fixed
/// reduction), which the compiler vectorises and which gives the same result for the same inputs
/// everywhere it runs. Four chains keep the fused multiply-adds of one dot product overlapping.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [[0f32; 8]; 4];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (c, acc) in acc.iter_mut().enumerate() {
            for k in 0..8 {
                acc[k] = x[c * 8 + k].mul_add(y[c * 8 + k], acc[k]);
            }
        }
    }
    let (ca, cb) = (ra.chunks_exact(8), rb.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for ((x, y), acc) in ca.zip(cb).zip(acc.iter_mut()) {
        for k in 0..8 {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    let s: [f32; 8] = std::array::from_fn(|k| (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

mod kernels {
    //! Block dot products against 16-bit activations. A portable version, an AVX2 version and an
    //! AVX-512 VNNI version, chosen at run time; all sum the same exact integer products per block.
    //!
    //! The SIMD versions compute a register tile of `R` weight rows by `G` activation rows. Every
    //! output element goes through the same operations whatever the tile's shape, so the shape is
    //! free to follow the batch: with few activation rows (decoding) a tile takes several weight rows,
    //! so that independent accumulation chains hide the latency of the fused multiply-adds.
    use super::{
        q4_1_block, q4_1_place, scale_min_k4, scales_mins_k4, BlockQ4K, BlockQ5K, BlockQ5_0,
        BlockQ6K, BlockQ8_0, Layout, PairOrder, Q4_1Slot, QuantizedActivations, Tile, BLOCK,
    };

    /// An instruction set the kernels are written for. Values other than `Portable` are only
    /// made by [`detect`] and [`supported`], so holding one means this CPU supports it.
    #[derive(Clone, Copy, PartialEq, Debug)]
    #[repr(u8)]
    pub enum Isa {
        Avx512Vnni,
        Avx2,
        Portable,
    }

    /// 0 = not chosen yet; otherwise `Isa as u8 + 1`. An atomic rather than a `OnceLock` so that
    /// calibration can compare instruction sets within one process.
    static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

    /// Every target feature the AVX-512 VNNI kernels (and the helpers they call) enable. The
    /// kernels may only run when the CPU has *all* of them: a `#[target_feature]` function run on a
    /// CPU without one of its features is undefined behaviour (issue 10, finding 10). The test
    /// `finding_10_kernel_detection_gates_every_enabled_feature` checks every `enable = "…"` in this
    /// file against these lists.
    pub const VNNI_FEATURES: &[&str] = &[
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni",
        "avx2",
        "fma",
        "f16c",
    ];

    /// Every target feature the AVX2 kernels enable.
    pub const AVX2_FEATURES: &[&str] = &["avx2", "fma", "f16c"];

    /// Whether this CPU has a target feature named as in `#[target_feature(enable = …)]`.
    /// (`is_x86_feature_detected!` wants a literal, hence the match; an unknown name is `false`.)
    #[cfg(target_arch = "x86_64")]
    pub fn has_feature(name: &str) -> bool {
        match name {
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
            "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "f16c" => std::is_x86_feature_detected!("f16c"),
            _ => false,
        }
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TESSERA_NO_AVX512").is_none()
                && VNNI_FEATURES.iter().all(|f| has_feature(f))
            {
                return Isa::Avx512Vnni;
            }
            if AVX2_FEATURES.iter().all(|f| has_feature(f)) {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    pub fn isa() -> Isa {
        let v = CHOSEN.load(std::sync::atomic::Ordering::Relaxed);
        match v {
            1 => Isa::Avx512Vnni,
            2 => Isa::Avx2,
            3 => Isa::Portable,
            _ => {
                let isa = detect();
                CHOSEN.store(isa as u8 + 1, std::sync::atomic::Ordering::Relaxed);
                isa
            }
        }
    }

    /// The instruction sets this CPU can run, best first.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn supported() -> Vec<Isa> {
        match detect() {
            Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
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

    /// The activation layout the kernels of `isa` want for weights in format `B`.
    pub fn layout<B: KernelBlock>(isa: Isa) -> Layout {
        match isa {
            Isa::Avx512Vnni => B::VNNI_LAYOUT,
            Isa::Avx2 => B::AVX2_LAYOUT,
            Isa::Portable => Layout::Words,
        }
    }

    /// A register-tile kernel: `(weights of its row, blocks per row, activations, first activation
    /// row, output, output stride)`.
    #[cfg(target_arch = "x86_64")]
    type TileKernel<B> = unsafe fn(*const B, usize, &QuantizedActivations, usize, *mut f32, usize);

    /// The kernel monomorphized for `g` activation rows.
    #[cfg(target_arch = "x86_64")]
    macro_rules! tile_kernel {
        ($module:ident::$kernel:ident, $g:expr) => {
            match $g {
                1 => $module::$kernel::<1> as TileKernel<_>,
                2 => $module::$kernel::<2>,
                3 => $module::$kernel::<3>,
                4 => $module::$kernel::<4>,
                5 => $module::$kernel::<5>,
                6 => $module::$kernel::<6>,
                7 => $module::$kernel::<7>,
                8 => $module::$kernel::<8>,
                _ => unreachable!("no tile of {} activation rows", $g),
            }
        };
    }

    /// Runs a tile's weight rows, one at a time, through `kernel`.
    ///
    /// # Safety
    /// The kernel must be supported by this CPU and expect `a`'s layout.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run<B: KernelBlock>(
        w: &[B],
        bpr: usize,
        a: &QuantizedActivations,
        tile: &Tile,
        kernel: TileKernel<B>,
    ) {
        let g = tile.activation_rows;
        assert!(tile.weight_rows * bpr <= w.len(), "weights out of range");
        let abpr = a.blocks_per_row;
        assert!(
            abpr * BLOCK == bpr * B::WEIGHTS
                && (tile.first_activation_row + g) * abpr <= a.scales.len(),
            "activations out of range"
        );
        assert!(match a.layout {
            Layout::Words | Layout::EvenOddWords => a.values.len() == a.scales.len() * BLOCK,
            Layout::BytePlanes { .. } =>
                a.planes.len() == a.scales.len() * 64 && a.scale_sums.len() == a.scales.len() * 2,
        });
        for j in 0..tile.weight_rows {
            // SAFETY: row j is in `w`, the activation rows are in `a` (asserted above), and the
            // output elements are inside the tile.
            unsafe {
                kernel(
                    w.as_ptr().add(j * bpr),
                    bpr,
                    a,
                    tile.first_activation_row,
                    tile.out.add(j),
                    tile.stride,
                )
            };
        }
    }

    /// A block format with kernels: the register tiles for each instruction set and a portable
    /// dot product of one weight row with one activation row.
    pub trait KernelBlock: Sized {
        /// Weights per block (32, or 256 for the K-quants).
        const WEIGHTS: usize = BLOCK;
        /// The activation layout its AVX-512 VNNI kernel reads.
        const VNNI_LAYOUT: Layout;
        /// The activation layout its AVX2 kernel reads.
        const AVX2_LAYOUT: Layout = Layout::Words;
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self>;
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self>;
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32;
    }

    impl KernelBlock for Q4_1Slot {
        const VNNI_LAYOUT: Layout = Layout::BytePlanes {
            order: PairOrder::Nibbles,
            unsigned_high: false,
        };
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q4_1_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q4_1_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            let (mut acc, mut mins) = (0f32, 0f32);
            for b in 0..row.len() {
                let blk = q4_1_block(row, b);
                let (ad, asum, aq) = a.block(activation_row, b);
                mins = blk.m.to_f32().mul_add(asum, mins);
                let mut s = 0i32;
                for i in 0..16 {
                    s += (blk.qs[i] & 0x0F) as i32 * aq[i] as i32
                        + (blk.qs[i] >> 4) as i32 * aq[i + 16] as i32;
                }
                acc += blk.d.to_f32() * ad * s as f32;
            }
            acc + mins
        }
    }

    impl KernelBlock for BlockQ8_0 {
        const VNNI_LAYOUT: Layout = Layout::BytePlanes {
            order: PairOrder::Natural,
            unsigned_high: true,
        };
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q8_0_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q8_0_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            let mut acc = 0f32;
            for (b, blk) in row.iter().enumerate() {
                let (ad, _, aq) = a.block(activation_row, b);
                let s: i32 = (0..32).map(|i| blk.qs[i] as i32 * aq[i] as i32).sum();
                acc += blk.d.to_f32() * ad * s as f32;
            }
            acc
        }
    }

    /// `Q5_0`: as `Q8_0` with the signed 5-bit `q − 16` rebuilt per block.
    impl KernelBlock for BlockQ5_0 {
        const VNNI_LAYOUT: Layout = Layout::BytePlanes {
            order: PairOrder::Natural,
            unsigned_high: true,
        };
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q5_0_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q5_0_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            let mut acc = 0f32;
            for (b, blk) in row.iter().enumerate() {
                let (ad, _, aq) = a.block(activation_row, b);
                let s: i32 = (0..32).map(|i| blk.q(i) as i32 * aq[i] as i32).sum();
                acc += blk.d.to_f32() * ad * s as f32;
            }
            acc
        }
    }

    /// `Q4_K`: per 32-weight sub-block, an exact integer dot product with one activation block,
    /// then `d·sc·scale_a·dot` accumulated in sub-block order (and `dmin·m·Σa` apart). The VNNI
    /// kernel reads 16-bit activations, as AVX2 (`vpdpwssd` multiplies 32 weights at once).
    impl KernelBlock for BlockQ4K {
        const WEIGHTS: usize = super::K_BLOCK;
        const VNNI_LAYOUT: Layout = Layout::Words;
        const AVX2_LAYOUT: Layout = Layout::EvenOddWords;
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q4_k_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q4_k_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            k_quant_dot(
                row,
                a,
                activation_row,
                |blk| (blk.d, blk.dmin, &blk.scales),
                |blk, j, i| {
                    let q = blk.qs[(j / 2) * 32 + i];
                    if j % 2 == 0 {
                        q & 0xF
                    } else {
                        q >> 4
                    }
                },
            )
        }
    }

    /// The portable `Q4_K`/`Q5_K` product: per 32-weight sub-block `j`, the exact integer product of
    /// the weights (`weight(block, j, i)`) with the 16-bit activations, accumulated as
    /// `d·sc·scale_a·product` minus `dmin·m·sum_a`, in a fixed order.
    fn k_quant_dot<B>(
        row: &[B],
        a: &QuantizedActivations,
        activation_row: usize,
        header: impl Fn(&B) -> (half::f16, half::f16, &[u8; 12]),
        weight: impl Fn(&B, usize, usize) -> u8,
    ) -> f32 {
        let (mut acc, mut mins) = (0f32, 0f32);
        for (b, blk) in row.iter().enumerate() {
            let (d, dmin, scales) = header(blk);
            let (d, dmin) = (d.to_f32(), dmin.to_f32());
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let (ad, asum, aq) = a.block(activation_row, b * 8 + j);
                let s: i32 = (0..32)
                    .map(|i| weight(blk, j, i) as i32 * aq[i] as i32)
                    .sum();
                mins = (dmin * m as f32).mul_add(asum, mins);
                acc = ((d * sc as f32) * ad).mul_add(s as f32, acc);
            }
        }
        acc - mins
    }

    /// `Q5_K`: as `Q4_K`, with weights in 0..32.
    impl KernelBlock for BlockQ5K {
        const WEIGHTS: usize = super::K_BLOCK;
        const VNNI_LAYOUT: Layout = Layout::Words;
        const AVX2_LAYOUT: Layout = Layout::EvenOddWords;
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q5_k_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q5_k_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            k_quant_dot(
                row,
                a,
                activation_row,
                |blk| (blk.d, blk.dmin, &blk.scales),
                |blk, j, l| blk.q(j, l),
            )
        }
    }

    /// `Q6_K`: per 16-weight sub-block an exact integer dot product, scaled by `d·sc·scale_a` in
    /// element order. The VNNI kernel reads 16-bit activations, as AVX2.
    impl KernelBlock for BlockQ6K {
        const WEIGHTS: usize = super::K_BLOCK;
        const VNNI_LAYOUT: Layout = Layout::Words;
        const AVX2_LAYOUT: Layout = Layout::EvenOddWords;
        #[cfg(target_arch = "x86_64")]
        fn vnni(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q6_k_vnni, g)
        }
        #[cfg(target_arch = "x86_64")]
        fn avx2(g: usize) -> TileKernel<Self> {
            tile_kernel!(x86::q6_k_avx2, g)
        }
        fn portable_dot(row: &[Self], a: &QuantizedActivations, activation_row: usize) -> f32 {
            let mut acc = 0f32;
            for (b, blk) in row.iter().enumerate() {
                let d = blk.d.to_f32();
                for h in 0..2 {
                    for t in 0..4 {
                        let (ad, _, aq) = a.block(activation_row, b * 8 + h * 4 + t);
                        for half in 0..2 {
                            let s: i32 = (16 * half..16 * half + 16)
                                .map(|l| blk.q(h, t, l) as i32 * aq[l] as i32)
                                .sum();
                            acc = ((d * blk.scales[8 * h + 2 * t + half] as f32) * ad)
                                .mul_add(s as f32, acc);
                        }
                    }
                }
            }
            acc
        }
    }

    /// One tile of a matrix whose first weight row starts at `w`, on the kernels of `isa`.
    pub fn tile<B: KernelBlock>(
        isa: Isa,
        w: &[B],
        bpr: usize,
        a: &QuantizedActivations,
        tile: Tile,
    ) {
        assert_eq!(
            a.layout,
            layout::<B>(isa),
            "activations quantized for another kernel"
        );
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: `Isa` values other than `Portable` come from `detect()` (see `supported`).
            Isa::Avx512Vnni => {
                return unsafe { run(w, bpr, a, &tile, B::vnni(tile.activation_rows)) }
            }
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { run(w, bpr, a, &tile, B::avx2(tile.activation_rows)) },
            Isa::Portable => {}
        }
        for j in 0..tile.weight_rows {
            for k in 0..tile.activation_rows {
                tile.write(
                    j,
                    k,
                    B::portable_dot(&w[j * bpr..(j + 1) * bpr], a, tile.first_activation_row + k),
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::needless_range_loop)] // indices run over several parallel arrays
    mod x86 {
        //! Register tiles of one weight row by `G` activation rows. Safety contract of every kernel:
        //! the CPU supports its features, `w` points at a row of `bpr` blocks, activation rows
        //! `r0..r0 + G` exist in the layout the kernel reads, and `out[k * stride]` is writable for
        //! every `k < G`.
        use super::super::Q4_1_GROUP;
        use super::{
            q4_1_place, scales_mins_k4, BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ6K, BlockQ8_0,
            Q4_1Slot, QuantizedActivations,
        };
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn hsum256(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// The 32 weights of a `Q4_1` block as unsigned bytes, elements 0..16 in the low lane.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn unpack_q4(q: &[u8; 16]) -> __m256i {
            // SAFETY: 16 readable bytes.
            let raw = unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) };
            let low = _mm_set1_epi8(0x0F);
            _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16::<4>(raw), low),
                _mm_and_si128(raw, low),
            )
        }

        /// A block's 32 weights as 16-bit integers: elements 0..16, then 16..32.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn words(q: __m256i, signed: bool) -> [__m256i; 2] {
            let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            if signed {
                [_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)]
            } else {
                [_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)]
            }
        }

        /// A 32-weight block's exact integer product with activation block `i`, in eight lanes.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn int_product(w: &[__m256i; 2], values: *const i16, i: usize) -> __m256i {
            // SAFETY: the caller's kernel contract (block `i` of the activations exists).
            let (x0, x1) = unsafe {
                let p = values.add(i * 32);
                (
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(16) as *const __m256i),
                )
            };
            _mm256_add_epi32(_mm256_madd_epi16(w[0], x0), _mm256_madd_epi16(w[1], x1))
        }

        /// Eight blocks of a 32-weight format, decoded once for all the rows of a tile: their weights
        /// as 16-bit integers ([`words`]), their scales `d` and (for `Q4_1`) minimums `m`. A last
        /// group of fewer than eight blocks has zero weights and scales in its empty places.
        struct Group32 {
            weights: [[__m256i; 2]; 8],
            d: __m256,
            m: __m256,
        }

        /// Two blocks' integer products (eight lanes each) half summed: lanes `[a₀+a₂, b₀+b₂, a₁+a₃,
        /// b₁+b₃]` in each 128-bit half. Unpacks and adds, not `vphaddd`, which costs two cycles
        /// a time on Zen 3.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn pair_sums(a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
        }

        /// Four blocks' integer products, from [`pair_sums`] of blocks 0, 1 (`x`) and 2, 3 (`y`):
        /// lane `j` of each 128-bit half is block `j`'s sum over half of its elements.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn quad_sums(x: __m256i, y: __m256i) -> __m256i {
            _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y))
        }

        /// Eight blocks' integer products from two [`quad_sums`] (blocks 0..4 in `low`, 4..8 in
        /// `high`) as one vector whose lane `j` is block `j`'s whole product. All the additions are
        /// exact integer ones, so their order is free.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn block_sums(low: __m256i, high: __m256i) -> __m256i {
            _mm256_add_epi32(
                _mm256_blend_epi32::<0xF0>(low, high),
                _mm256_permute2x128_si256::<0x21>(low, high),
            )
        }

        /// For each of the `G` activation rows `k`, the exact integer products of up to eight blocks
        /// (`$n` of them, weights `$weights[j]`), one lane per block ([`block_sums`]), handed to
        /// `$each(k, sums)`; `$product(weights, k, j)` is block j's product with row k in eight
        /// lanes. Two routes to the same exact values: with several rows and eight blocks, four
        /// blocks' weights at a time stay in registers across the rows; otherwise each row runs
        /// through the blocks. A macro, so that both routes are inlined into every kernel.
        macro_rules! block_products {
            ($g:ident, $weights:expr, $n:expr, $product:expr, $each:expr) => {{
                let (weights, n, product, mut each) = ($weights, $n, $product, $each);
                if $g > 1 && n == 8 {
                    let mut low = [_mm256_setzero_si256(); $g];
                    for h in 0..2 {
                        let w: [_; 4] = std::array::from_fn(|j| weights[4 * h + j]);
                        for k in 0..$g {
                            let p: [__m256i; 4] =
                                std::array::from_fn(|j| product(&w[j], k, 4 * h + j));
                            let quad = quad_sums(pair_sums(p[0], p[1]), pair_sums(p[2], p[3]));
                            if h == 0 {
                                low[k] = quad;
                            } else {
                                each(k, block_sums(low[k], quad));
                            }
                        }
                    }
                } else {
                    for k in 0..$g {
                        let p: [__m256i; 8] = std::array::from_fn(|j| {
                            if j < n {
                                product(&weights[j], k, j)
                            } else {
                                _mm256_setzero_si256()
                            }
                        });
                        let quads = [0, 1].map(|h| {
                            quad_sums(
                                pair_sums(p[4 * h], p[4 * h + 1]),
                                pair_sums(p[4 * h + 2], p[4 * h + 3]),
                            )
                        });
                        each(k, block_sums(quads[0], quads[1]));
                    }
                }
            }};
        }

        /// The kernels of the 32-weight formats (`Q4_1`, `Q8_0`, `Q5_0`), eight blocks at a time:
        /// `decode(b, n)` gives blocks `b..b + n` (`n ≤ 8`, see [`Group32`]). Each row reduces the
        /// eight blocks' exact integer products to one vector ([`block_sums`]) and adds
        /// `(d·a)·p (+ m·Σa)` to its accumulator: one multiply and one or two FMAs per eight blocks,
        /// where there were two per block, and the same operations for every `G`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn rows32<const G: usize, const MIN: bool>(
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
            decode: impl Fn(usize, usize) -> Group32,
        ) {
            let (scales, sums, values) = (a.scales.as_ptr(), a.sums.as_ptr(), a.values.as_ptr());
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mut acc = [_mm256_setzero_ps(); G];
            for b in (0..bpr).step_by(8) {
                let n = (bpr - b).min(8);
                let group = decode(b, n);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
                // SAFETY (the products): the kernel contract (blocks b..b + n of row r0 + k exist).
                let product = |w: &[__m256i; 2], k: usize, j: usize| unsafe {
                    int_product(w, values, (r0 + k) * bpr + b + j)
                };
                block_products!(G, &group.weights, n, product, |k: usize, p: __m256i| {
                    let i = (r0 + k) * bpr + b;
                    // SAFETY: as above; lanes past `n` are not read.
                    let (ad, s) = unsafe {
                        if n == 8 {
                            (_mm256_loadu_ps(scales.add(i)), _mm256_loadu_ps(sums.add(i)))
                        } else {
                            (
                                _mm256_maskload_ps(scales.add(i), mask),
                                _mm256_maskload_ps(sums.add(i), mask),
                            )
                        }
                    };
                    let p = _mm256_cvtepi32_ps(p);
                    acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(group.d, ad), p, acc[k]);
                    if MIN {
                        acc[k] = _mm256_fmadd_ps(group.m, s, acc[k]);
                    }
                });
            }
            for k in 0..G {
                // SAFETY: the kernel contract.
                unsafe { *out.add(k * stride) = hsum256(acc[k]) };
            }
        }

        /// The f16 values at `at(j)` for `j < n` (`n ≤ 8`), widened into one vector with zeros
        /// past `n`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn gather_f16(n: usize, at: impl Fn(usize) -> *const u8) -> __m256 {
            let mut h = [0u16; 8];
            for j in 0..n {
                // SAFETY: the caller passes two readable bytes per place.
                h[j] = unsafe { (at(j) as *const u16).read_unaligned() };
            }
            _mm256_cvtph_ps(_mm_setr_epi16(
                h[0] as i16,
                h[1] as i16,
                h[2] as i16,
                h[3] as i16,
                h[4] as i16,
                h[5] as i16,
                h[6] as i16,
                h[7] as i16,
            ))
        }

        /// A [`Group32`] of a format stored as GGML's blocks `w` (`Q8_0`, `Q5_0`): block `b + j`'s
        /// weights by `weights`, its scale `d` at the block's start.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn ggml_group<B>(
            w: *const B,
            b: usize,
            n: usize,
            weights: impl Fn(&B) -> [__m256i; 2],
        ) -> Group32 {
            let mut group = Group32 {
                weights: [[_mm256_setzero_si256(); 2]; 8],
                // SAFETY: the caller's kernel contract (blocks b..b + n are in the row).
                d: unsafe { gather_f16(n, |j| w.add(b + j) as *const u8) },
                m: _mm256_setzero_ps(),
            };
            for j in 0..n {
                // SAFETY: as above.
                group.weights[j] = weights(unsafe { &*w.add(b + j) });
            }
            group
        }

        /// `Q4_1` on its repacked rows ([`Q4_1Slot`], blocks found by [`q4_1_place`]).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4_1_avx2<const G: usize>(
            w: *const Q4_1Slot,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let row = w as *const u8;
            let decode = |b: usize, n: usize| {
                let mut group = Group32 {
                    weights: [[_mm256_setzero_si256(); 2]; 8],
                    d: _mm256_setzero_ps(),
                    m: _mm256_setzero_ps(),
                };
                if n == 8 {
                    // Two full groups of four ([`Q4_1Slot`]): `(d, m)` × 4 in 16 bytes, then the
                    // four blocks' nibbles in 64; the scales put in order as `d₀..d₈`, `m₀..m₈`.
                    let order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
                    let mut heads = [_mm_setzero_si128(); 2];
                    for half in 0..2 {
                        let at = q4_1_place(bpr, b + 4 * half).0;
                        // SAFETY: the kernel contract (blocks b..b + 8 fill two of the row's full
                        // groups, 80 bytes each from `at`).
                        unsafe {
                            heads[half] = _mm_shuffle_epi8(
                                _mm_loadu_si128(row.add(at) as *const __m128i),
                                order,
                            );
                            for j in 0..4 {
                                let q = &*(row.add(at + 16 + 16 * j) as *const [u8; 16]);
                                group.weights[4 * half + j] = words(unpack_q4(q), false);
                            }
                        }
                    }
                    group.d = _mm256_cvtph_ps(_mm_unpacklo_epi64(heads[0], heads[1]));
                    group.m = _mm256_cvtph_ps(_mm_unpackhi_epi64(heads[0], heads[1]));
                } else {
                    let at = |j: usize| q4_1_place(bpr, b + j);
                    // SAFETY: the kernel contract (the row's `20 · bpr` bytes hold blocks b..b + n).
                    unsafe {
                        group.d = gather_f16(n, |j| row.add(at(j).0));
                        group.m = gather_f16(n, |j| row.add(at(j).0 + 2));
                        for j in 0..n {
                            let q = &*(row.add(at(j).1) as *const [u8; 16]);
                            group.weights[j] = words(unpack_q4(q), false);
                        }
                    }
                }
                group
            };
            // SAFETY: the kernel contract.
            unsafe { rows32::<G, true>(bpr, a, r0, out, stride, decode) }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q8_0_avx2<const G: usize>(
            w: *const BlockQ8_0,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let decode = |b: usize, n: usize| {
                let weights = |blk: &BlockQ8_0| {
                    // SAFETY: 32 readable bytes.
                    let q = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
                    words(q, true)
                };
                // SAFETY: the kernel contract (blocks b..b + n are in the row).
                unsafe { ggml_group(w, b, n, weights) }
            };
            // SAFETY: the kernel contract.
            unsafe { rows32::<G, false>(bpr, a, r0, out, stride, decode) }
        }

        /// The 32 weights of a `Q5_0` block as signed bytes `q − 16`: nibbles unpacked as for
        /// `Q4_1`, the fifth bits spread to bytes (bit `j` of `qh` to byte `j`, as llama.cpp's
        /// `bytes_from_bits_32`).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q5_0_bytes(blk: &BlockQ5_0) -> __m256i {
            let spread = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            );
            let bits =
                _mm256_shuffle_epi8(_mm256_set1_epi32(u32::from_le_bytes(blk.qh) as i32), spread);
            let set = _mm256_cmpeq_epi8(
                _mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                _mm256_set1_epi64x(-1),
            );
            let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
            _mm256_sub_epi8(
                _mm256_or_si256(unpack_q4(&blk.qs), high),
                _mm256_set1_epi8(16),
            )
        }

        /// `Q5_0`: the weights as signed bytes ([`q5_0_bytes`]), then as `q8_0_avx2`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q5_0_avx2<const G: usize>(
            w: *const BlockQ5_0,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let decode = |b: usize, n: usize| {
                // SAFETY: the kernel contract (blocks b..b + n are in the row).
                unsafe { ggml_group(w, b, n, |blk: &BlockQ5_0| words(q5_0_bytes(blk), true)) }
            };
            // SAFETY: the kernel contract.
            unsafe { rows32::<G, false>(bpr, a, r0, out, stride, decode) }
        }

        /// The unsigned weights of sub-blocks `2·pair` and `2·pair + 1` of a `Q5_K` block (0..32):
        /// the nibbles as for `Q4_K`, plus bit `j` of `qh[l]` as bit 4 of element `l` of sub-block `j`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q5_k_pair(blk: &BlockQ5K, pair: usize) -> [__m256i; 2] {
            let mask = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            // SAFETY: 32 readable bytes of `qs` (`pair < 4`) and the 32 of `qh`.
            let (raw, qh) = unsafe {
                (
                    _mm256_loadu_si256(blk.qs.as_ptr().add(pair * 32) as *const __m256i),
                    _mm256_loadu_si256(blk.qh.as_ptr() as *const __m256i),
                )
            };
            // Shifting 16-bit lanes by at most 7 and keeping bit 0 of each byte never mixes bytes;
            // the fifth bit (0 or 1) moved to bit 4 stays in its byte too.
            let fifth = |j: usize| {
                let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)), one);
                _mm256_slli_epi16::<4>(bit)
            };
            [
                _mm256_or_si256(_mm256_and_si256(raw, mask), fifth(2 * pair)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                    fifth(2 * pair + 1),
                ),
            ]
        }

        /// The weights of sub-blocks `2·pair` and `2·pair + 1` of a `Q4_K` block as 16-bit integers,
        /// the even elements and the odd ones of each ([`Layout::EvenOddWords`]): the 32 bytes read
        /// as 16-bit lanes of two bytes, whose four nibbles a mask and shifts take apart.
        ///
        /// [`Layout::EvenOddWords`]: super::super::Layout::EvenOddWords
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q4_k_pair_words16(blk: &BlockQ4K, pair: usize) -> [[__m256i; 2]; 2] {
            // SAFETY: 32 readable bytes of `qs` (`pair < 4`).
            let raw =
                unsafe { _mm256_loadu_si256(blk.qs.as_ptr().add(pair * 32) as *const __m256i) };
            let mask = _mm256_set1_epi16(0x0F);
            [
                [
                    _mm256_and_si256(raw, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<8>(raw), mask),
                ],
                [
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask),
                    _mm256_srli_epi16::<12>(raw),
                ],
            ]
        }

        /// [`q5_k_pair`]'s weights as 16-bit integers, the even elements and the odd ones of each.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q5_k_pair_words16(blk: &BlockQ5K, pair: usize) -> [[__m256i; 2]; 2] {
            q5_k_pair(blk, pair).map(|q| even_odd_u8(q))
        }

        /// 32 unsigned bytes as 16-bit integers: the even elements, then the odd ones.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn even_odd_u8(q: __m256i) -> [__m256i; 2] {
            [
                _mm256_and_si256(q, _mm256_set1_epi16(0xFF)),
                _mm256_srli_epi16::<8>(q),
            ]
        }

        /// Eight unsigned bytes (a K-quant block's sub-block scales), each broadcast to a vector of
        /// sixteen 16-bit lanes by one in-lane byte shuffle, instead of a scalar move per scale.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn broadcast_scales_u8(sc: [u8; 8]) -> [__m256i; 8] {
            let all = _mm256_set1_epi64x(i64::from_le_bytes(sc));
            // Byte j into the low byte of every lane, zero (index bit 7 set) into the high one.
            std::array::from_fn(|j| {
                _mm256_shuffle_epi8(all, _mm256_set1_epi16((0x8000u16 | j as u16) as i16))
            })
        }

        /// Eight unsigned bytes, each broadcast to a vector of eight 32-bit lanes (one in-lane
        /// byte shuffle per scale).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn broadcast_scales_u32(sc: [u8; 8]) -> [__m256i; 8] {
            let all = _mm256_set1_epi64x(i64::from_le_bytes(sc));
            // Byte j into the low byte of every lane, zeros (index bit 7 set) above it.
            std::array::from_fn(|j| {
                _mm256_shuffle_epi8(all, _mm256_set1_epi32((0x8080_8000u32 | j as u32) as i32))
            })
        }

        /// A kernel for the K-quants with a minimum (`Q4_K`, `Q5_K`). The activations have one
        /// scale per super-block (see [`QuantizedActivations::quantize`]). Each sub-block's 32
        /// weights are widened to 16 bits and multiplied by its 6-bit scale once per block for all
        /// `G` rows (at most 63·31 = 1953, exact). Each row then adds a whole super-block's
        /// products up as exact 32-bit integers in eight lanes, one `vpmaddwd` per 16 weights
        /// (each lane sums 32 products, at most 32·1953·32767 < 2³¹), with no reduction across
        /// lanes; per super-block and row, one `d·scale_a` FMA over the lanes and one FMA of the
        /// eight sub-blocks' minimums `−dmin·m·Σa`. With one row there is nothing to share the
        /// scaled weights with, so each sub-block's products are scaled afterwards instead (the same
        /// integers in the same lanes). `$pair` gives two sub-blocks' unsigned weights as 16-bit
        /// integers, even elements and odd ones (the activations are [`Layout::EvenOddWords`]).
        ///
        /// [`Layout::EvenOddWords`]: super::super::Layout::EvenOddWords
        macro_rules! k_min_avx2 {
            ($name:ident, $block:ty, $pair:path) => {
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn $name<const G: usize>(
                    w: *const $block,
                    bpr: usize,
                    a: &QuantizedActivations,
                    r0: usize,
                    out: *mut f32,
                    stride: usize,
                ) {
                    let (scales, sums, values) =
                        (a.scales.as_ptr(), a.sums.as_ptr(), a.values.as_ptr());
                    let abpr = bpr * 8;
                    let mut acc = [_mm256_setzero_ps(); G];
                    for b in 0..bpr {
                        // SAFETY: the kernel contract (block b is in the row).
                        let blk = unsafe { &*w.add(b) };
                        let (d, dmin) = (blk.d.to_f32(), blk.dmin.to_f32());
                        let (sc, m) = scales_mins_k4(&blk.scales);
                        // SAFETY: eight readable bytes.
                        let m = unsafe { _mm_loadl_epi64(m.as_ptr() as *const __m128i) };
                        let mins = _mm256_mul_ps(
                            _mm256_set1_ps(-dmin),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)),
                        );
                        let mut lanes = [_mm256_setzero_si256(); G];
                        if G == 1 {
                            // One row: each sub-block's products first, then its scale once on
                            // the eight 32-bit lanes (`sc·Σqa` = `Σ(sc·q)a`, the same integers
                            // in the same lanes), eight multiplies per super-block fewer.
                            let sc = broadcast_scales_u32(sc);
                            for pair in 0..4 {
                                let q = $pair(blk, pair);
                                for half in 0..2 {
                                    let j = 2 * pair + half;
                                    let i = r0 * abpr + b * 8 + j;
                                    // SAFETY: the kernel contract (sub-block i of row r0).
                                    let p = unsafe { int_product(&q[half], values, i) };
                                    lanes[0] =
                                        _mm256_add_epi32(lanes[0], _mm256_mullo_epi32(p, sc[j]));
                                }
                            }
                        } else {
                            let mut weights = [[_mm256_setzero_si256(); 2]; 8];
                            let sc = broadcast_scales_u8(sc);
                            for pair in 0..4 {
                                let q = $pair(blk, pair);
                                for half in 0..2 {
                                    let j = 2 * pair + half;
                                    weights[j] = q[half].map(|v| _mm256_mullo_epi16(v, sc[j]));
                                }
                            }
                            for j in 0..8 {
                                for k in 0..G {
                                    let i = (r0 + k) * abpr + b * 8 + j;
                                    // SAFETY: the kernel contract (sub-block i of row r0 + k).
                                    let p = unsafe { int_product(&weights[j], values, i) };
                                    lanes[k] = _mm256_add_epi32(lanes[k], p);
                                }
                            }
                        }
                        for k in 0..G {
                            let i = (r0 + k) * abpr + b * 8;
                            // SAFETY: the kernel contract (eight sub-blocks' scales and sums).
                            let (ad, s) = unsafe { (*scales.add(i), _mm256_loadu_ps(sums.add(i))) };
                            acc[k] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * ad),
                                _mm256_cvtepi32_ps(lanes[k]),
                                acc[k],
                            );
                            acc[k] = _mm256_fmadd_ps(mins, s, acc[k]);
                        }
                    }
                    for k in 0..G {
                        // SAFETY: the kernel contract.
                        unsafe { *out.add(k * stride) = hsum256(acc[k]) };
                    }
                }
            };
        }

        k_min_avx2!(q4_k_avx2, BlockQ4K, q4_k_pair_words16);
        k_min_avx2!(q5_k_avx2, BlockQ5K, q5_k_pair_words16);

        /// The four quarters (32 elements each) of half `h` of a `Q6_K` block as signed bytes
        /// `q − 32`: the 6-bit weights rebuilt from `ql`/`qh`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q6_k_quarters(blk: &BlockQ6K, h: usize) -> [__m256i; 4] {
            let (m4, m2, bias) = (
                _mm256_set1_epi8(0x0F),
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(32),
            );
            // SAFETY: 64 bytes of `ql` and 32 of `qh` per half (`h < 2`).
            let (l0, l1, hb) = unsafe {
                let ql = blk.ql.as_ptr().add(64 * h);
                (
                    _mm256_loadu_si256(ql as *const __m256i),
                    _mm256_loadu_si256(ql.add(32) as *const __m256i),
                    _mm256_loadu_si256(blk.qh.as_ptr().add(32 * h) as *const __m256i),
                )
            };
            // Bits 2t..2t+2 of `qh` are bits 4..6 of quarter t (shifts stay inside bytes after the masks).
            let high = [
                _mm256_slli_epi16::<4>(_mm256_and_si256(hb, m2)),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(hb), m2)),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(hb), m2)),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(hb), m2)),
            ];
            [
                _mm256_or_si256(_mm256_and_si256(l0, m4), high[0]),
                _mm256_or_si256(_mm256_and_si256(l1, m4), high[1]),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), high[2]),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), high[3]),
            ]
            .map(|q| _mm256_sub_epi8(q, bias))
        }

        /// Sixteen signed bytes (a `Q6_K` block's sub-block scales), sign-extended to 16 bits, as
        /// one vector per quarter `q`: scale `2q` in the eight low lanes, `2q + 1` in the eight
        /// high ones. One widening, two lane copies and one byte shuffle per quarter.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn quarter_scales_i8(sc: &[i8; 16]) -> [__m256i; 8] {
            // SAFETY: 16 readable bytes.
            let words =
                _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc.as_ptr() as *const __m128i) });
            let halves = [
                _mm256_permute2x128_si256::<0x00>(words, words),
                _mm256_permute2x128_si256::<0x11>(words, words),
            ];
            // The byte pair of word `w` of a lane, in every 16-bit lane.
            let pick = |w: u16| _mm_set1_epi16(((2 * w + 1) << 8 | 2 * w) as i16);
            std::array::from_fn(|q| {
                let t = (q % 4) as u16;
                _mm256_shuffle_epi8(
                    halves[q / 4],
                    _mm256_set_m128i(pick(2 * t + 1), pick(2 * t)),
                )
            })
        }

        /// [`quarter_scales_i8`] as 32-bit lanes: per quarter `q`, scale `2q` in the four low lanes
        /// and `2q + 1` in the four high ones. Two widenings and one lane permutation per quarter.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn quarter_scales_i32(sc: &[i8; 16]) -> [__m256i; 8] {
            // SAFETY: 16 readable bytes.
            let bytes = unsafe { _mm_loadu_si128(sc.as_ptr() as *const __m128i) };
            let halves = [
                _mm256_cvtepi8_epi32(bytes),
                _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(bytes, bytes)),
            ];
            std::array::from_fn(|q| {
                let t = 2 * (q % 4) as i32;
                _mm256_permutevar8x32_epi32(
                    halves[q / 4],
                    _mm256_setr_epi32(t, t, t, t, t + 1, t + 1, t + 1, t + 1),
                )
            })
        }

        /// `Q6_K`: the signed weights of 32 elements in one register ([`q6_k_quarters`]), split into
        /// even and odd elements as 16-bit integers by shifts (the activations are
        /// [`Layout::EvenOddWords`]), each 16-weight sub-block multiplied by its signed 8-bit scale
        /// (at most 32·128, exact), and a half's 128 products summed as exact 32-bit integers (at
        /// most 16·4096·32767 < 2³¹ per lane); then `d·scale_a·sum` once per half. The activations
        /// have one scale per super-block.
        ///
        /// [`Layout::EvenOddWords`]: super::super::Layout::EvenOddWords
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q6_k_avx2<const G: usize>(
            w: *const BlockQ6K,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let (scales, values) = (a.scales.as_ptr(), a.values.as_ptr());
            let abpr = bpr * 8;
            let mut facc = [_mm256_setzero_ps(); G];
            for b in 0..bpr {
                // SAFETY: the kernel contract (block b is in the row).
                let blk = unsafe { &*w.add(b) };
                let d = blk.d.to_f32();
                // With one row, each quarter's products are scaled afterwards, as 32-bit lanes:
                // the same integers in the same lanes, two multiplies per quarter fewer.
                let (sc, sc32) = if G == 1 {
                    ([_mm256_setzero_si256(); 8], quarter_scales_i32(&blk.scales))
                } else {
                    (quarter_scales_i8(&blk.scales), [_mm256_setzero_si256(); 8])
                };
                for h in 0..2 {
                    let mut iacc = [_mm256_setzero_si256(); G];
                    for (t, q) in q6_k_quarters(blk, h).into_iter().enumerate() {
                        // Even and odd elements, sign-extended by shifts: elements 0..16 (sub-block
                        // 2t) in the low 128 bits of each, 16..32 (2t + 1) in the high ones.
                        let (even, odd) = (
                            _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(q)),
                            _mm256_srai_epi16::<8>(q),
                        );
                        if G == 1 {
                            let i = r0 * abpr + b * 8 + h * 4 + t;
                            // SAFETY: the kernel contract.
                            let p = unsafe { int_product(&[even, odd], values, i) };
                            iacc[0] =
                                _mm256_add_epi32(iacc[0], _mm256_mullo_epi32(p, sc32[4 * h + t]));
                            continue;
                        }
                        let (w0, w1) = (
                            _mm256_mullo_epi16(even, sc[4 * h + t]),
                            _mm256_mullo_epi16(odd, sc[4 * h + t]),
                        );
                        for k in 0..G {
                            let i = (r0 + k) * abpr + b * 8 + h * 4 + t;
                            // SAFETY: the kernel contract.
                            let p = unsafe { int_product(&[w0, w1], values, i) };
                            iacc[k] = _mm256_add_epi32(iacc[k], p);
                        }
                    }
                    for k in 0..G {
                        // SAFETY: the kernel contract.
                        let ad = unsafe { *scales.add((r0 + k) * abpr + b * 8) };
                        facc[k] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * ad),
                            _mm256_cvtepi32_ps(iacc[k]),
                            facc[k],
                        );
                    }
                }
            }
            for k in 0..G {
                // SAFETY: the kernel contract.
                unsafe { *out.add(k * stride) = hsum256(facc[k]) };
            }
        }

        /// The first four bytes of two blocks (their f16 scale, and minimum for `Q4_1`), widened:
        /// `[d0, m0, d1, m1]`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn head_pair(first: *const u8, second: *const u8) -> __m128 {
            // SAFETY: callers pass block starts, which have at least four bytes.
            let (h0, h1) = unsafe {
                (
                    (first as *const i32).read_unaligned(),
                    (second as *const i32).read_unaligned(),
                )
            };
            _mm_cvtph_ps(_mm_set_epi32(0, 0, h1, h0))
        }

        /// Lanes 0..4 and 8..12 take element 0 of a 4-vector, lanes 4..8 and 12..16 take element 2.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn nibble_pair_lanes() -> __m512i {
            _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0)
        }

        /// Lanes 0..8 take element 0 of a 4-vector, lanes 8..16 take element 2.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn natural_pair_lanes() -> __m512i {
            _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
        }

        /// `Q4_1` against byte-plane activations (high bytes signed): per pair of blocks, two
        /// `vpdpbusd` give the exact 16-bit products (`256·(w·hi) + w·lo`), then one conversion and
        /// one fused multiply-add apply both blocks' scales at once. Repacked groups of four blocks
        /// (see [`Q4_1Slot`]) load their scales and weights in one instruction each.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub unsafe fn q4_1_vnni<const G: usize>(
            w: *const Q4_1Slot,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let (planes, scale_sums) = (a.planes.as_ptr(), a.scale_sums.as_ptr());
            let row = w as *const u8;
            let mut acc = [_mm512_setzero_ps(); G];
            // Odd lanes gather `m·sum` of the blocks at each position in a group; even lanes are unused.
            let mut mins = [_mm256_setzero_ps(); G];
            let (mask, mask512) = (_mm256_set1_epi8(0x0F), _mm512_set1_epi8(0x0F));
            let (lanes_a, lanes_b) = (
                nibble_pair_lanes(),
                _mm512_add_epi32(nibble_pair_lanes(), _mm512_set1_epi32(4)),
            );
            let groups = bpr / Q4_1_GROUP;
            for gi in 0..groups {
                let b = gi * Q4_1_GROUP;
                // SAFETY: the kernel contract: a full group of 80 bytes.
                let (heads, raw) = unsafe {
                    let p = row.add(b * 20);
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                        _mm512_loadu_si512(p.add(16) as *const _),
                    )
                };
                let low = _mm512_and_si512(raw, mask512);
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask512);
                // Pair (b, b + 1): block b's elements 0..16, block b + 1's, then their 16..32; likewise (b + 2, b + 3).
                let qa = _mm512_shuffle_i64x2::<0b01_00_01_00>(low, high);
                let qb = _mm512_shuffle_i64x2::<0b11_10_11_10>(low, high);
                for k in 0..G {
                    let i = (r0 + k) * bpr + b;
                    // SAFETY: the kernel contract: pairs (b, b + 1) and (b + 2, b + 3) of row r0 + k.
                    let (ha, la, hb, lb, ss) = unsafe {
                        let p = planes.add(i * 64);
                        (
                            _mm512_loadu_si512(p as *const _),
                            _mm512_loadu_si512(p.add(64) as *const _),
                            _mm512_loadu_si512(p.add(128) as *const _),
                            _mm512_loadu_si512(p.add(192) as *const _),
                            _mm256_loadu_ps(scale_sums.add(2 * i)),
                        )
                    };
                    let ta = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qa, ha);
                    let ta = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(ta), la, qa);
                    let tb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qb, hb);
                    let tb = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(tb), lb, qb);
                    let prod = _mm256_mul_ps(heads, ss);
                    mins[k] = _mm256_add_ps(mins[k], prod);
                    let prod = _mm512_castps256_ps512(prod);
                    acc[k] = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(lanes_a, prod),
                        _mm512_cvtepi32_ps(ta),
                        acc[k],
                    );
                    acc[k] = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(lanes_b, prod),
                        _mm512_cvtepi32_ps(tb),
                        acc[k],
                    );
                }
            }
            // The blocks after the last group, in GGML's layout: pairs, then an odd one.
            let mut b = groups * Q4_1_GROUP;
            while b + 2 <= bpr {
                // SAFETY: the kernel contract (blocks b and b + 1 are in the row).
                let (b0, b1) = unsafe { (row.add(b * 20), row.add(b * 20 + 20)) };
                // SAFETY: 16 readable bytes each, after the 4-byte head.
                let raw = unsafe {
                    _mm256_loadu2_m128i(b1.add(4) as *const __m128i, b0.add(4) as *const __m128i)
                };
                let low = _mm256_and_si256(raw, mask);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
                // SAFETY: block starts.
                let dm = unsafe { head_pair(b0, b1) };
                for k in 0..G {
                    let i = (r0 + k) * bpr + b;
                    // SAFETY: the kernel contract: pair (b, b + 1) of row r0 + k.
                    let (hi, lo, ss) = unsafe {
                        let p = planes.add(i * 64);
                        (
                            _mm512_loadu_si512(p as *const _),
                            _mm512_loadu_si512(p.add(64) as *const _),
                            _mm_loadu_ps(scale_sums.add(2 * i)),
                        )
                    };
                    let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, hi);
                    let t = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(t), lo, q);
                    let prod = _mm_mul_ps(dm, ss);
                    mins[k] = _mm256_add_ps(mins[k], _mm256_zextps128_ps256(prod));
                    let scale = _mm512_permutexvar_ps(lanes_a, _mm512_castps128_ps512(prod));
                    acc[k] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(t), acc[k]);
                }
                b += 2;
            }
            if b < bpr {
                // SAFETY: the kernel contract: the last block, in GGML's layout.
                let blk = unsafe { row.add(b * 20) };
                // SAFETY: 16 readable bytes after the head.
                let q =
                    _mm512_zextsi256_si512(unpack_q4(unsafe { &*(blk.add(4) as *const [u8; 16]) }));
                // SAFETY: a block start, twice.
                let dm = unsafe { head_pair(blk, blk) };
                for k in 0..G {
                    let i = (r0 + k) * bpr + b;
                    // SAFETY: the kernel contract: the last block of row r0 + k (32 + 32 bytes).
                    let (hi, lo, ss) = unsafe {
                        let p = planes.add(i * 64);
                        (
                            _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const _)),
                            _mm512_zextsi256_si512(_mm256_loadu_si256(p.add(32) as *const _)),
                            // `scale_sums` is only 4-byte aligned: `movq` has no alignment requirement
                            // (`_mm_load_sd` reads through an `*const f64`, which must be 8-aligned).
                            _mm_castsi128_ps(_mm_loadl_epi64(
                                scale_sums.add(2 * i) as *const __m128i
                            )),
                        )
                    };
                    let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, hi);
                    let t = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(t), lo, q);
                    let prod = _mm_mul_ps(dm, ss);
                    mins[k] = _mm256_add_ps(mins[k], _mm256_zextps128_ps256(prod));
                    acc[k] =
                        _mm512_fmadd_ps(_mm512_broadcastss_ps(prod), _mm512_cvtepi32_ps(t), acc[k]);
                }
            }
            for k in 0..G {
                let m = _mm256_movehdup_ps(mins[k]);
                let m = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehl_ps(m, m)));
                // SAFETY: the kernel contract.
                unsafe { *out.add(k * stride) = _mm512_reduce_add_ps(acc[k]) + m };
            }
        }

        /// A kernel for blocks of 32 signed-byte weights `w = d·q` whose block starts with `d` (f16),
        /// against byte-plane activations (high bytes stored +128, unsigned): as for `Q4_1`, less
        /// `128·Σw`, which depends on the weights alone and is computed once per pair. `$bytes`
        /// gives a block's 32 weights as signed bytes.
        macro_rules! signed_byte_vnni {
            ($name:ident, $block:ty, $bytes:path) => {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
                pub unsafe fn $name<const G: usize>(
                    w: *const $block,
                    bpr: usize,
                    a: &QuantizedActivations,
                    r0: usize,
                    out: *mut f32,
                    stride: usize,
                ) {
                    let (planes, scale_sums) = (a.planes.as_ptr(), a.scale_sums.as_ptr());
                    let mut acc = [_mm512_setzero_ps(); G];
                    let (ones, lanes) = (_mm512_set1_epi8(1), natural_pair_lanes());
                    let mut b = 0;
                    while b + 2 <= bpr {
                        // SAFETY: the kernel contract (blocks b and b + 1 are in the row).
                        let (b0, b1) = unsafe { (&*w.add(b), &*w.add(b + 1)) };
                        let q =
                            _mm512_inserti64x4::<1>(_mm512_castsi256_si512($bytes(b0)), $bytes(b1));
                        let bias = _mm512_slli_epi32::<7>(_mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            ones,
                            q,
                        ));
                        // SAFETY: block starts (`[d0, q0, d1, q1]`; only d0 and d1 are used).
                        let d = unsafe {
                            head_pair(b0 as *const _ as *const u8, b1 as *const _ as *const u8)
                        };
                        for k in 0..G {
                            let i = (r0 + k) * bpr + b;
                            // SAFETY: the kernel contract: pair (b, b + 1) of row r0 + k.
                            let (hi, lo, ss) = unsafe {
                                let p = planes.add(i * 64);
                                (
                                    _mm512_loadu_si512(p as *const _),
                                    _mm512_loadu_si512(p.add(64) as *const _),
                                    _mm_loadu_ps(scale_sums.add(2 * i)),
                                )
                            };
                            let t = _mm512_sub_epi32(
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, q),
                                bias,
                            );
                            let t = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(t), lo, q);
                            let scale = _mm512_permutexvar_ps(
                                lanes,
                                _mm512_castps128_ps512(_mm_mul_ps(d, ss)),
                            );
                            acc[k] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(t), acc[k]);
                        }
                        b += 2;
                    }
                    if b < bpr {
                        // SAFETY: the kernel contract (block b is in the row).
                        let blk = unsafe { &*w.add(b) };
                        let q = _mm512_zextsi256_si512($bytes(blk));
                        let bias = _mm512_slli_epi32::<7>(_mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            ones,
                            q,
                        ));
                        // SAFETY: a block start, twice.
                        let d = unsafe {
                            head_pair(blk as *const _ as *const u8, blk as *const _ as *const u8)
                        };
                        for k in 0..G {
                            let i = (r0 + k) * bpr + b;
                            // SAFETY: the kernel contract: the last block of row r0 + k (32 + 32 bytes).
                            let (hi, lo, ss) = unsafe {
                                let p = planes.add(i * 64);
                                (
                                    _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const _)),
                                    _mm512_zextsi256_si512(_mm256_loadu_si256(
                                        p.add(32) as *const _
                                    )),
                                    // `scale_sums` is only 4-byte aligned: `movq` has no alignment requirement
                                    // (`_mm_load_sd` reads through an `*const f64`, which must be 8-aligned).
                                    _mm_castsi128_ps(_mm_loadl_epi64(
                                        scale_sums.add(2 * i) as *const __m128i
                                    )),
                                )
                            };
                            let t = _mm512_sub_epi32(
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, q),
                                bias,
                            );
                            let t = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(t), lo, q);
                            acc[k] = _mm512_fmadd_ps(
                                _mm512_broadcastss_ps(_mm_mul_ps(d, ss)),
                                _mm512_cvtepi32_ps(t),
                                acc[k],
                            );
                        }
                    }
                    for k in 0..G {
                        // SAFETY: the kernel contract.
                        unsafe { *out.add(k * stride) = _mm512_reduce_add_ps(acc[k]) };
                    }
                }
            };
        }

        /// A super-block's exact integer product with one activation row: `weights[j]` (32 scaled
        /// 16-bit weights) against activation block `i + j` of the words layout, one `vpdpwssd`
        /// each, summed in 16 lanes.
        ///
        /// # Safety
        /// Activation blocks `i..i + 8` exist (32 values each from `values`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn super_block_product(
            weights: &[__m512i; 8],
            values: *const i16,
            i: usize,
        ) -> __m512i {
            let mut lanes = _mm512_setzero_si512();
            for j in 0..8 {
                // SAFETY: the caller's contract.
                let x = unsafe { _mm512_loadu_si512(values.add((i + j) * 32) as *const _) };
                lanes = _mm512_dpwssd_epi32(lanes, weights[j], x);
            }
            lanes
        }

        /// A kernel for the K-quants with a minimum (`Q4_K`, `Q5_K`) against 16-bit activations
        /// (the words layout, as on AVX2): each sub-block's 32 weights widened
        /// to 16 bits and multiplied by its 6-bit scale (at most 63·31 = 1953, exact) once per block
        /// for all `G` rows; then one `vpdpwssd` per sub-block and row adds a whole super-block's
        /// products up as exact 32-bit integers (at most 8·2·1953·32767 < 2³¹ per lane), with no
        /// float operation per sub-block. Per super-block and row, one `d·scale_a` FMA over the
        /// lanes and one FMA of the eight sub-blocks' minimums `−dmin·m·Σa`. `$pair` gives two
        /// sub-blocks' unsigned weights as 16-bit integers.
        macro_rules! k_min_vnni {
            ($name:ident, $block:ty, $pair:path) => {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
                pub unsafe fn $name<const G: usize>(
                    w: *const $block,
                    bpr: usize,
                    a: &QuantizedActivations,
                    r0: usize,
                    out: *mut f32,
                    stride: usize,
                ) {
                    let (scales, sums, values) =
                        (a.scales.as_ptr(), a.sums.as_ptr(), a.values.as_ptr());
                    let abpr = bpr * 8;
                    let mut acc = [_mm512_setzero_ps(); G];
                    for b in 0..bpr {
                        // SAFETY: the kernel contract (block b is in the row).
                        let blk = unsafe { &*w.add(b) };
                        let (d, dmin) = (blk.d.to_f32(), blk.dmin.to_f32());
                        let (sc, m) = scales_mins_k4(&blk.scales);
                        // SAFETY: eight readable bytes.
                        let m = unsafe { _mm_loadl_epi64(m.as_ptr() as *const __m128i) };
                        // `−dmin·m` of the eight sub-blocks in lanes 0..8, zeros above.
                        let mins = _mm512_zextps256_ps512(_mm256_mul_ps(
                            _mm256_set1_ps(-dmin),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)),
                        ));
                        let mut weights = [_mm512_setzero_si512(); 8];
                        for pair in 0..4 {
                            let q = $pair(blk, pair);
                            for half in 0..2 {
                                let j = 2 * pair + half;
                                weights[j] =
                                    _mm512_mullo_epi16(q[half], _mm512_set1_epi16(sc[j] as i16));
                            }
                        }
                        for k in 0..G {
                            let i = (r0 + k) * abpr + b * 8;
                            // SAFETY: the kernel contract (sub-blocks i..i + 8 of row r0 + k).
                            let lanes = unsafe { super_block_product(&weights, values, i) };
                            // SAFETY: the kernel contract (eight sub-blocks' scales and sums; the
                            // masked lanes are not read).
                            let (ad, s) = unsafe {
                                (*scales.add(i), _mm512_maskz_loadu_ps(0xFF, sums.add(i)))
                            };
                            acc[k] = _mm512_fmadd_ps(
                                _mm512_set1_ps(d * ad),
                                _mm512_cvtepi32_ps(lanes),
                                acc[k],
                            );
                            acc[k] = _mm512_fmadd_ps(mins, s, acc[k]);
                        }
                    }
                    for k in 0..G {
                        // SAFETY: the kernel contract.
                        unsafe { *out.add(k * stride) = _mm512_reduce_add_ps(acc[k]) };
                    }
                }
            };
        }

        /// The weights of sub-blocks `2·pair` and `2·pair + 1` of a `Q4_K` block as 16-bit
        /// integers: the 32 bytes widened first, so that each 16-bit lane holds one byte's two
        /// nibbles and one mask and one shift split them.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q4_k_pair_words(blk: &BlockQ4K, pair: usize) -> [__m512i; 2] {
            // SAFETY: 32 readable bytes of `qs` (`pair < 4`).
            let raw =
                unsafe { _mm256_loadu_si256(blk.qs.as_ptr().add(pair * 32) as *const __m256i) };
            let w = _mm512_cvtepu8_epi16(raw);
            [
                _mm512_and_si512(w, _mm512_set1_epi16(0x0F)),
                _mm512_srli_epi16::<4>(w),
            ]
        }

        /// [`q5_k_pair`]'s weights as 16-bit integers.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q5_k_pair_words(blk: &BlockQ5K, pair: usize) -> [__m512i; 2] {
            q5_k_pair(blk, pair).map(|q| _mm512_cvtepu8_epi16(q))
        }

        k_min_vnni!(q4_k_vnni, BlockQ4K, q4_k_pair_words);
        k_min_vnni!(q5_k_vnni, BlockQ5K, q5_k_pair_words);

        /// `Q6_K` against 16-bit activations (the words layout, as on AVX2): each 32-weight quarter's
        /// signed weights `q − 32` widened to 16 bits and multiplied by its two sub-blocks' signed
        /// 8-bit scales (at most 32·128 = 4096, exact) once per block for all `G` rows, then one
        /// `vpdpwssd` per quarter and row adds the whole super-block's products up as exact 32-bit
        /// integers (at most 8·2·4096·32767 = 2,147,418,112 < 2³¹ per lane); one `d·scale_a` FMA
        /// per super-block and row.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub unsafe fn q6_k_vnni<const G: usize>(
            w: *const BlockQ6K,
            bpr: usize,
            a: &QuantizedActivations,
            r0: usize,
            out: *mut f32,
            stride: usize,
        ) {
            let (scales, values) = (a.scales.as_ptr(), a.values.as_ptr());
            let abpr = bpr * 8;
            let mut acc = [_mm512_setzero_ps(); G];
            for b in 0..bpr {
                // SAFETY: the kernel contract (block b is in the row).
                let blk = unsafe { &*w.add(b) };
                let d = blk.d.to_f32();
                let mut weights = [_mm512_setzero_si512(); 8];
                for h in 0..2 {
                    for (t, q) in q6_k_quarters(blk, h).into_iter().enumerate() {
                        // Elements 0..16 take sub-block 2t's scale, 16..32 sub-block 2t + 1's.
                        let s = &blk.scales[8 * h + 2 * t..8 * h + 2 * t + 2];
                        let sc = _mm512_mask_blend_epi16(
                            0xFFFF_0000,
                            _mm512_set1_epi16(s[0] as i16),
                            _mm512_set1_epi16(s[1] as i16),
                        );
                        weights[4 * h + t] = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(q), sc);
                    }
                }
                for k in 0..G {
                    let i = (r0 + k) * abpr + b * 8;
                    // SAFETY: the kernel contract (blocks i..i + 8 of row r0 + k).
                    let lanes = unsafe { super_block_product(&weights, values, i) };
                    // SAFETY: the kernel contract.
                    let ad = unsafe { *scales.add(i) };
                    acc[k] =
                        _mm512_fmadd_ps(_mm512_set1_ps(d * ad), _mm512_cvtepi32_ps(lanes), acc[k]);
                }
            }
            for k in 0..G {
                // SAFETY: the kernel contract.
                unsafe { *out.add(k * stride) = _mm512_reduce_add_ps(acc[k]) };
            }
        }

        /// The 32 weights of a `Q8_0` block.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q8_0_bytes(blk: &BlockQ8_0) -> __m256i {
            // SAFETY: 32 readable bytes.
            unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) }
        }

        signed_byte_vnni!(q8_0_vnni, BlockQ8_0, q8_0_bytes);
        signed_byte_vnni!(q5_0_vnni, BlockQ5_0, q5_0_bytes);
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
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn check_format(dtype: GgmlDType) {
        // 96 columns: three blocks; 128: a repacked group of four; 224: a group and three; 512:
        // two groups of eight blocks (the AVX2 kernels' unit); 608: two and three more. 9 rows: a
        // group of 8 activation rows and 1.
        for (rows, cols, n) in [
            (37, 96, 5),
            (21, 128, 9),
            (13, 224, 3),
            (11, 512, 9),
            (19, 608, 2),
        ] {
            let w = rand_vec(rows * cols, 1);
            let x = rand_vec(n * cols, 2);
            let wt = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            assert_eq!(m.format(), format!("{dtype:?}"));
            let mut first: Option<Vec<f32>> = None;
            for isa in kernels::supported() {
                let y = m.matmul_on(isa, &x, n).unwrap();
                // The instruction sets sum the same exact integer products per block; only the
                // rounding of the float accumulation differs.
                let reference = first.get_or_insert_with(|| y.clone());
                for (a, b) in reference.iter().zip(&y) {
                    assert!((a - b).abs() < 1e-5, "{dtype:?} {isa:?}: {a} vs {b}");
                }
                for r in 0..n {
                    for o in 0..rows {
                        let exact =
                            dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                        let got = y[r * rows + o];
                        assert!(
                            (exact - got).abs() < 0.02,
                            "{dtype:?} {isa:?} row {r} out {o}: {exact} vs {got}"
                        );
                    }
                }
                // Each output is independent of how many rows are in the batch.
                for r in 0..n {
                    let single = m.matmul_on(isa, &x[r * cols..(r + 1) * cols], 1).unwrap();
                    assert_eq!(
                        &single[..],
                        &y[r * rows..(r + 1) * rows],
                        "{dtype:?} {isa:?} row {r}"
                    );
                }
            }
            // Dequantized rows match candle's dequantization exactly.
            let mut row = vec![0f32; cols];
            m.row(3, &mut row).unwrap();
            assert_eq!(&row[..], &deq[3 * cols..4 * cols]);
        }
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
    fn q5_0_and_q4_0_match_dequantized_product_and_are_batch_invariant() {
        // Rows dequantize to exactly candle's values (`Q4_0` repacked as `Q4_1`), and the products
        // are batch-invariant.
        for ((dtype, format), (rows, cols, n)) in
            [(GgmlDType::Q5_0, "Q5_0"), (GgmlDType::Q4_0, "Q4_1")]
                .into_iter()
                .flat_map(|d| [(19, 224, 9), (7, 608, 9)].map(|s| (d, s)))
        {
            let w = rand_vec(rows * cols, 5);
            let x = rand_vec(n * cols, 6);
            let q = QTensor::quantize(
                &Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            assert_eq!(m.format(), format);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.row(r, &mut row).unwrap();
                assert_eq!(
                    &row[..],
                    &deq[r * cols..(r + 1) * cols],
                    "{dtype:?} row {r}"
                );
            }
            for isa in kernels::supported() {
                let y = m.matmul_on(isa, &x, n).unwrap();
                for r in 0..n {
                    for o in 0..rows {
                        let exact =
                            dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                        assert!(
                            (exact - y[r * rows + o]).abs() < 0.02,
                            "{dtype:?} {isa:?} {r} {o}"
                        );
                    }
                    assert_eq!(
                        m.matmul_on(isa, &x[r * cols..(r + 1) * cols], 1).unwrap(),
                        &y[r * rows..(r + 1) * rows]
                    );
                }
            }
        }
    }

    #[test]
    fn all_k4_scales_and_minimums_at_once_equal_ggmls_one_at_a_time() {
        let mut s = 7u64;
        for _ in 0..20_000 {
            let q: [u8; 12] = std::array::from_fn(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            });
            let (sc, m) = scales_mins_k4(&q);
            for j in 0..8 {
                assert_eq!((sc[j], m[j]), scale_min_k4(j, &q), "{q:?} sub-block {j}");
            }
        }
    }

    #[test]
    fn q4_k_matches_dequantized_product_and_is_batch_invariant() {
        check_k_format(GgmlDType::Q4K, "Q4K");
    }

    #[test]
    fn q5_k_matches_dequantized_product_and_is_batch_invariant() {
        check_k_format(GgmlDType::Q5K, "Q5K");
    }

    #[test]
    fn q6_k_matches_dequantized_product_and_is_batch_invariant() {
        check_k_format(GgmlDType::Q6K, "Q6K");
    }

    /// A K-quant on its own kernels: rows dequantize as candle does, products match the dequantized
    /// reference, every instruction set agrees, and each output is independent of the batch and of
    /// the thread count.
    fn check_k_format(dtype: GgmlDType, format: &str) {
        for (rows, cols, n) in [(21, 256, 9), (13, 768, 3)] {
            let w = rand_vec(rows * cols, 11);
            let x = rand_vec(n * cols, 12);
            let q = QTensor::quantize(
                &Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            assert_eq!(m.format(), format);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.row(r, &mut row).unwrap();
                assert_eq!(
                    &row[..],
                    &deq[r * cols..(r + 1) * cols],
                    "{dtype:?} row {r}"
                );
            }
            let mut first: Option<Vec<f32>> = None;
            for isa in kernels::supported() {
                let y = m.matmul_on(isa, &x, n).unwrap();
                let reference = first.get_or_insert_with(|| y.clone());
                for (a, b) in reference.iter().zip(&y) {
                    assert!((a - b).abs() < 1e-4, "{dtype:?} {isa:?}: {a} vs {b}");
                }
                for r in 0..n {
                    for o in 0..rows {
                        let exact =
                            dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                        let got = y[r * rows + o];
                        assert!(
                            (exact - got).abs() < 0.02,
                            "{dtype:?} {isa:?} row {r} out {o}: {exact} vs {got}"
                        );
                    }
                    assert_eq!(
                        m.matmul_on(isa, &x[r * cols..(r + 1) * cols], 1).unwrap(),
                        &y[r * rows..(r + 1) * rows],
                        "{dtype:?} {isa:?} row {r}"
                    );
                }
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    assert_eq!(
                        pool.install(|| m.matmul_on(isa, &x, n).unwrap()),
                        y,
                        "{dtype:?} {isa:?} {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn matrices_read_straight_from_the_file_equal_those_built_from_candles_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let formats = [
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_1,
        ];
        let tensors: Vec<(String, QTensor)> = formats
            .iter()
            .enumerate()
            .map(|(i, &dtype)| {
                let w = rand_vec(6 * 512, i as u64 + 20);
                (
                    format!("t{i}"),
                    QTensor::quantize(
                        &Tensor::from_slice(&w, (6, 512), &Device::Cpu).unwrap(),
                        dtype,
                    )
                    .unwrap(),
                )
            })
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        candle_core::quantized::gguf_file::write(
            &mut std::fs::File::create(&path).unwrap(),
            &[],
            &refs,
        )
        .unwrap();
        let mut file = GgufFile::open(&path).unwrap();
        let x = rand_vec(3 * 512, 30);
        for (name, _) in &tensors {
            let direct = QMatrix::from_gguf(&mut file, name).unwrap();
            let built = QMatrix::from_qtensor(name, file.tensor(name).unwrap()).unwrap();
            assert_eq!(
                (direct.rows(), direct.cols(), direct.format()),
                (built.rows(), built.cols(), built.format())
            );
            assert_eq!(
                direct.matmul(&x, 3).unwrap(),
                built.matmul(&x, 3).unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn other_formats_match_dequantized_product() {
        for dtype in [GgmlDType::F16] {
            let (rows, cols, n) = (8, 512, 3);
            let w = rand_vec(rows * cols, 1);
            let x = rand_vec(n * cols, 2);
            let q = QTensor::quantize(
                &Tensor::from_slice(&w, (rows, cols), &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            let y = m.matmul(&x, n).unwrap();
            for r in 0..n {
                for o in 0..rows {
                    let exact =
                        dot_f32(&deq[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                    assert!(
                        (exact - y[r * rows + o]).abs() < 1e-4,
                        "{dtype:?} {r} {o}: {exact} vs {}",
                        y[r * rows + o]
                    );
                }
            }
        }
    }

    /// The K-quant kernels sum a super-block's products as 32-bit integers: at the largest weights,
    /// scales and activations the formats allow, nothing overflows and every instruction set gives
    /// the exact product.
    #[test]
    fn k_quant_integer_sums_hold_at_the_largest_weights_scales_and_activations() {
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        let one = f16::from_f32(1.0).to_le_bytes();
        // Q4_K: d = 1, dmin = 0, every 6-bit scale 63 and minimum 0, every q 15 (w = 945).
        let mut q4k = vec![one[0], one[1], 0, 0];
        q4k.extend([0xFF; 4].iter().chain(&[0x00; 4]).chain(&[0x0F; 4]));
        q4k.extend([0xFF; 128]);
        // Q5_K: as Q4_K with every fifth bit set (q 31, w = 1953).
        let mut q5k = q4k[..16].to_vec();
        q5k.extend([0xFF; 32]);
        q5k.extend([0xFF; 128]);
        // Q6_K: every q 0 (q − 32 = −32) and every scale −128 (w = 4096).
        let mut q6k = vec![0u8; 192];
        q6k.extend([0x80; 16]);
        q6k.extend(one);
        for (dtype, block, w) in [
            (GgmlDType::Q4K, q4k, 945f32),
            (GgmlDType::Q5K, q5k, 1953.0),
            (GgmlDType::Q6K, q6k, 4096.0),
        ] {
            let (rows, cols) = (2, 512);
            let bytes = block.repeat(rows * cols / K_BLOCK);
            let q = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
            let m = QMatrix::from_qtensor("w", q).unwrap();
            for sign in [1f32, -1.0] {
                let x = vec![sign; cols];
                for isa in kernels::supported() {
                    let y = m.matmul_on(isa, &x, 1).unwrap();
                    for got in y {
                        assert_eq!(got, sign * w * cols as f32, "{dtype:?} {isa:?}");
                    }
                }
            }
        }
    }

    /// Issue 10, finding 10: the kernels enabled target features that run-time detection did not
    /// check, and read an 8-byte value through a pointer that is only 4-byte aligned.
    #[test]
    fn finding_10_kernel_detection_gates_every_enabled_feature() {
        let source = include_str!("quant.rs");
        let marker = concat!("target_feature(enable", " = \"");
        let mut seen = 0;
        for (at, _) in source.match_indices(marker) {
            let rest = &source[at + marker.len()..];
            let features = &rest[..rest.find('"').expect("closing quote")];
            let gate = if features.contains("avx512") {
                kernels::VNNI_FEATURES
            } else {
                kernels::AVX2_FEATURES
            };
            for f in features.split(',') {
                assert!(
                    gate.contains(&f),
                    "`{f}` (in `{features}`) is enabled but not checked at run time"
                );
            }
            seen += 1;
        }
        assert!(seen >= 8, "found only {seen} target_feature attributes");
        // Aligned-load intrinsics need aligned pointers that activations and blocks do not give.
        for aligned in [
            "_load_sd(",
            "_load_ps(",
            "_load_pd(",
            "_load_si128(",
            "_load_si256(",
            "_load_si512(",
            "_load_epi32(",
        ] {
            let name = format!("_mm{aligned}");
            let wide = [format!("_mm256{aligned}"), format!("_mm512{aligned}")];
            assert!(
                !source.contains(&name) && wide.iter().all(|w| !source.contains(w.as_str())),
                "aligned load `{aligned}` in a kernel"
            );
        }
        #[cfg(target_arch = "x86_64")]
        for isa in kernels::supported() {
            let gate = match isa {
                kernels::Isa::Avx512Vnni => kernels::VNNI_FEATURES,
                kernels::Isa::Avx2 => kernels::AVX2_FEATURES,
                kernels::Isa::Portable => &[],
            };
            assert!(
                gate.iter().all(|f| kernels::has_feature(f)),
                "{isa:?} chosen without all of {gate:?}"
            );
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
