//! The device backend (the forward pass on candle tensors) against the native forward pass, on the
//! real SmolLM2-135M. Every check runs on candle's CPU backend; built with the `cuda` feature, a
//! twin runs on GPU 0.

mod support;

use support::{gemma, gemma_on, smollm, smollm_on};
use tessera_engine::{
    Compute, Engine, GenerateOptions, LoadOptions, Message, Role, SamplingParams,
};

/// A check `$name(engine)` on a model loaded by `$model(compute)` for the device backend: on
/// candle's CPU, and (with the feature) on CUDA.
macro_rules! device_test {
    ($name:ident, $model:ident) => {
        mod $name {
            #[test]
            fn candle_cpu() {
                super::$name(super::$model(tessera_engine::Compute::CandleCpu));
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$name(super::$model(tessera_engine::Compute::Cuda(0)));
            }
        }
    };
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

fn same_greedy_answer_as_native(e: &Engine) {
    let prompt = e.chat_prompt(&[Message::new(Role::User, "What is the capital of France?")]);
    let native = smollm().generate(&prompt, &greedy(32), |_| true).unwrap();
    let device = e.generate(&prompt, &greedy(32), |_| true).unwrap();
    assert_eq!(device.text, "The capital of France is Paris.");
    assert_eq!(device.tokens, native.tokens);
    assert_eq!(device.finish_reason, native.finish_reason);
}
device_test!(same_greedy_answer_as_native, smollm_on);

fn teacher_forced_logits_close_to_native(e: &Engine) {
    let native = smollm();
    let prompt = native.chat_prompt(&[Message::new(Role::User, "Explain photosynthesis briefly.")]);
    let answer = native
        .generate(
            &prompt,
            &GenerateOptions {
                max_tokens: 48,
                ignore_eos: true,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    let mut all = prompt.clone();
    all.extend(&answer.tokens);
    let v = e.vocab_size();
    let (a, b) = (native.score(&all).unwrap(), e.score(&all).unwrap());
    let diff = max_abs_diff(&a, &b);
    let flips = (0..all.len())
        .filter(|&i| argmax(&a[i * v..(i + 1) * v]) != argmax(&b[i * v..(i + 1) * v]))
        .count();
    eprintln!("{}: max |native - device| over {} teacher-forced positions = {diff:e}, argmax differs at {flips}", e.compute(), all.len());
    // The native path multiplies the quantized weights against activations rounded to 16 bits; the
    // device path multiplies dequantized f32 weights by f32 activations. Measured on candle's CPU:
    // 0.026 here, and 8.4e-5 against the native path with exact products (TESSERA_EXACT_MATMUL=all),
    // so the gap is the native path's activation rounding, not a difference in the pass. 0.05 allows
    // for other prompts and devices while a real slip (a wrong norm, RoPE or mask) moves logits by
    // whole units.
    assert!(diff <= 0.05, "max difference {diff}");
    // Scoring from a position returns exactly those rows of the same pass.
    let from = prompt.len();
    let tail = e.score_from(&all, from).unwrap();
    let diff_from = max_abs_diff(&tail, &b[from * v..]);
    eprintln!("{}: max |score_from - score| = {diff_from:e}", e.compute());
    assert!(
        diff_from <= 1e-3,
        "score_from differs from score by {diff_from}"
    );
}
device_test!(teacher_forced_logits_close_to_native, smollm_on);

fn incremental_matches_teacher_forced(e: &Engine) {
    let diff = support::teacher_forced_matches_incremental(
        e,
        "Explain photosynthesis briefly.",
        SamplingParams::seeded(0.8, 3),
    );
    // Both are f32 products of different shapes (one row vs all rows), so summation orders differ:
    // measured 5e-5 on candle's CPU. Not bitwise like the native path.
    assert!(diff <= 1e-3, "max difference {diff}");
}
device_test!(incremental_matches_teacher_forced, smollm_on);

fn batch_equals_one_at_a_time(e: &Engine) {
    let prompts: Vec<Vec<u32>> = ["Hi!", "Say something about the moon and its phases."]
        .iter()
        .map(|q| e.chat_prompt(&[Message::new(Role::User, *q)]))
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len());
    let opts = greedy(16);
    let batch: Vec<_> = prompts.iter().map(|p| (p.clone(), opts.clone())).collect();
    let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 2];
    let outs = e
        .generate_batch(&batch, |s| {
            together[s.sequence].push(s.logits.to_vec());
            true
        })
        .unwrap();
    let mut diff = 0f32;
    for (k, p) in prompts.iter().enumerate() {
        let mut alone = Vec::new();
        let out = e
            .generate(p, &opts, |s| {
                alone.push(s.logits.to_vec());
                true
            })
            .unwrap();
        assert_eq!(out.tokens, outs[k].tokens);
        for (a, b) in alone.iter().zip(&together[k]) {
            diff = diff.max(max_abs_diff(a, b));
        }
    }
    eprintln!("{}: max |batched - one at a time| = {diff:e}", e.compute());
    // As above: f32 products of different shapes; measured 6e-5 on candle's CPU.
    assert!(diff <= 1e-3, "max difference {diff}");
}
device_test!(batch_equals_one_at_a_time, smollm_on);

fn gemma_close_to_native_past_the_sliding_window(e: &Engine) {
    let native = gemma();
    let p = native.completion_prompt("The Eiffel Tower is located in the city of");
    let device = e.generate(&p, &greedy(8), |_| true).unwrap();
    assert_eq!(
        device.tokens,
        native.generate(&p, &greedy(8), |_| true).unwrap().tokens,
        "{:?}",
        device.text
    );
    // Longer than the sliding window of the local layers (512), so the window decides what they see.
    let filler = "The history of science is the study of the development of science and scientific knowledge. ";
    let mut prompt = native.completion_prompt(&filler.repeat(40));
    prompt.truncate(600);
    // A prefill of 600 rows, then decode steps whose single row also sees only the window.
    let logits = |engine: &Engine| {
        let mut seen = Vec::new();
        let options = GenerateOptions {
            max_tokens: 3,
            ignore_eos: true,
            ..Default::default()
        };
        let out = engine
            .generate(&prompt, &options, |s| {
                seen.extend_from_slice(s.logits);
                true
            })
            .unwrap();
        (out.tokens, seen)
    };
    let ((native_tokens, a), (device_tokens, b)) = (logits(native), logits(e));
    assert_eq!(device_tokens, native_tokens);
    let diff = max_abs_diff(&a, &b);
    eprintln!(
        "{}: gemma, max |native - device| at positions {}.. = {diff:e}",
        e.compute(),
        prompt.len() - 1
    );
    // Measured 1.6e-3 on candle's CPU (the native path widens Gemma's K-quants to f32 too); without
    // the window (in the prefill or in a decode step) the logits move by 17 to 19.
    assert!(diff <= 0.05, "max difference {diff}");
}
device_test!(gemma_close_to_native_past_the_sliding_window, gemma_on);

#[test]
fn engine_service_batches_requests_on_the_device_backend() {
    let e = smollm_on(Compute::CandleCpu);
    let engine = Engine::load_with(
        &e.info().path.to_string_lossy(),
        &LoadOptions {
            device: Compute::CandleCpu,
            ..Default::default()
        },
    )
    .unwrap();
    support::service_answers_match_alone(
        engine,
        e,
        &["What is the capital of France?", "Name a colour."],
        &greedy(12),
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    support::smollm();
    let err = Engine::load_with(
        "smollm2-135m",
        &LoadOptions {
            device: Compute::Cuda(0),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, tessera_engine::Error::DeviceUnavailable { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("cuda:0") && message.contains("`cuda` feature"),
        "{message}"
    );
}

#[test]
fn device_names_parse_and_print() {
    for (text, compute) in [
        ("cpu", Compute::Cpu),
        ("candle-cpu", Compute::CandleCpu),
        ("cuda:1", Compute::Cuda(1)),
    ] {
        assert_eq!(text.parse::<Compute>().unwrap(), compute);
        assert_eq!(compute.to_string(), text);
    }
    assert_eq!("cuda".parse::<Compute>().unwrap(), Compute::Cuda(0));
    assert!("gpu".parse::<Compute>().is_err());
    assert!("cuda:x".parse::<Compute>().is_err());
}
