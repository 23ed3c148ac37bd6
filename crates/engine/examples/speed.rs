//! Quick speed probe (prefill 128 tokens, decode 64) for before/after comparisons of kernels.
//! `cargo run --example speed -p tessera-engine -- [MODEL] [THREADS]` (default smollm2-135m, all cores);
//! prints tok/s, the weight formats and the peak RSS.
use std::time::Instant;
use tessera_engine::*;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "smollm2-135m".into());
    let threads = args.next().map(|t| t.parse()).transpose()?;
    registry::fetch(&name).ok();
    let e = Engine::load(&name, threads)?;
    // PROMPT (default 128): prompt tokens, e.g. 8 to profile decoding alone.
    let prompt: usize = std::env::var("PROMPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let p = e
        .tokenizer()
        .encode(&"The history of science is the study of the development of science. ".repeat(40))
        [..prompt]
        .to_vec();
    let o = GenerateOptions {
        max_tokens: 64,
        ignore_eos: true,
        ..Default::default()
    };
    e.generate(&p[..8], &o, |_| true)?;
    for _ in 0..2 {
        let s = Instant::now();
        let g = e.generate(&p, &o, |_| true)?;
        let t = s.elapsed().as_secs_f64();
        println!(
            "{name} ({} threads, {}, {:?}): prefill {:.0} tok/s, decode {:.1} tok/s, peak RSS {:.0} MiB",
            e.threads(),
            quant::kernel_isa(),
            e.info().formats,
            prompt as f64 / g.time_to_first_token,
            63.0 / (t - g.time_to_first_token),
            peak_rss_mib()
        );
    }
    Ok(())
}
