//! Quick speed probe (prefill 128 tokens, decode 64) for before/after comparisons of kernels.
use std::time::Instant;
use tessera_engine::*;
fn main() -> anyhow::Result<()> {
    let e = Engine::load("smollm2-135m", None)?;
    let p = e.tokenizer().encode(&"The history of science is the study of the development of science. ".repeat(12))[..128].to_vec();
    let o = GenerateOptions { max_tokens: 64, ignore_eos: true, ..Default::default() };
    e.generate(&p[..8], &o, |_| true)?;
    for _ in 0..2 {
        let s = Instant::now();
        let g = e.generate(&p, &o, |_| true)?;
        let t = s.elapsed().as_secs_f64();
        println!("prefill {:.0} tok/s, decode {:.1} tok/s", 128.0 / g.time_to_first_token, 63.0 / (t - g.time_to_first_token));
    }
    Ok(())
}
