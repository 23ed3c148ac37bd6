//! Times the quantized matrix products alone on random weights: `cargo run --release -p tessera-engine --example kernel_bench`.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;
use tessera_engine::quant::QMatrix;

/// Deterministic values in [-0.5, 0.5] that look random enough for timing.
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as f64 * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).fract() as f32 * 0.5
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    // SmolLM2's layer shapes (fused QKV, gate, up, down, output), LAYERS layers (default 30) per
    // pass, so that the weights stream from memory as they do when decoding. THREADS, NS: threads
    // and batch sizes, REPS (default 5) timed passes (the best is kept).
    // FORMATS (default all) picks formats; the K-quants and Q5_0 run Qwen2.5-1.5B's shapes (their
    // inputs are multiples of 256), LAYERS (default 4) layers of them. SHAPES overrides the shapes.
    let smollm = [
        (960, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
        (576, 576),
    ];
    let qwen = [
        (2048, 1536),
        (8960, 1536),
        (8960, 1536),
        (1536, 8960),
        (1536, 1536),
    ];
    // SHAPES="ROWSxCOLS,..." replaces the model's shapes (to see how the input width matters).
    let custom: Option<Vec<(usize, usize)>> = std::env::var("SHAPES").ok().map(|v| {
        v.split(',')
            .map(|rc| {
                let (r, c) = rc.split_once('x').expect("SHAPES: ROWSxCOLS,...");
                (r.parse().unwrap(), c.parse().unwrap())
            })
            .collect()
    });
    let formats = std::env::var("FORMATS").unwrap_or_else(|_| "Q4_1,Q8_0,Q5_0,Q4K,Q6K".into());
    let all = [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];
    for dtype in all
        .into_iter()
        .filter(|d| formats.split(',').any(|f| f == format!("{d:?}")))
    {
        let big = !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0);
        let shapes: &[(usize, usize)] = match &custom {
            Some(s) => s,
            None if big => &qwen,
            None => &smollm,
        };
        let layers: usize = std::env::var("LAYERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if big { 4 } else { 30 });
        let mats: Vec<_> = (0..layers)
            .flat_map(|l| shapes.iter().map(move |&(r, c)| (l, r, c)))
            .map(|(l, r, c)| {
                let w = rand_vec(r * c, l as u64 * 7 + r as u64);
                QMatrix::from_qtensor(
                    "w",
                    QTensor::quantize(
                        &Tensor::from_slice(&w, (r, c), &Device::Cpu).unwrap(),
                        dtype,
                    )
                    .unwrap(),
                )
                .unwrap()
            })
            .collect();
        let weights: usize = mats.iter().map(|m| m.rows() * m.cols()).sum();
        for n in std::env::var("NS")
            .map(|v| {
                v.split(',')
                    .map(|x| x.parse().unwrap())
                    .collect::<Vec<usize>>()
            })
            .unwrap_or(vec![1, 8, 128])
        {
            let xs: Vec<Vec<f32>> = mats.iter().map(|m| rand_vec(n * m.cols(), 5)).collect();
            // A hash of every output's bits: equal between two builds means bitwise-equal products.
            let mut checksum = 0u64;
            for (m, x) in mats.iter().zip(&xs) {
                for v in pool.install(|| m.matmul(x, n))? {
                    checksum = checksum.rotate_left(5) ^ u64::from(v.to_bits());
                }
            }
            let mut best = f64::MAX;
            let reps: usize = std::env::var("REPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(5);
            for _ in 0..reps {
                let t = Instant::now();
                pool.install(|| -> anyhow::Result<()> {
                    for (m, x) in mats.iter().zip(&xs) {
                        std::hint::black_box(m.matmul(x, n)?);
                    }
                    Ok(())
                })?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{dtype:?} n={n:<4} {:.2} ms/pass  {:.1} Gweight-rows/s  checksum {checksum:016x}",
                best * 1e3,
                (weights * n) as f64 / best / 1e9
            );
        }
    }
    Ok(())
}
