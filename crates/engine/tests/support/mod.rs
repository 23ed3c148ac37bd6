//! Shared helpers of the engine's integration tests: the real models (fetched once, safely in
//! parallel) and a tiny random-weight GGUF written on the fly for error-path tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tessera_engine::{
    registry, Compute, Engine, EngineService, Event, GenerateOptions, LoadOptions, Message, Role,
    SamplingParams,
};

/// The real SmolLM2-135M model, loaded once per test binary.
pub fn smollm() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    load_once(&E, "smollm2-135m", Compute::Cpu)
}

/// The real Gemma 3 270M model, loaded once per test binary.
pub fn gemma() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    load_once(&E, "gemma3-270m", Compute::Cpu)
}

/// The real Qwen2.5-Coder-0.5B-Instruct model (Q4_K_M), loaded once per test binary.
pub fn qwen() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    load_once(&E, "qwen2.5-coder-0.5b", Compute::Cpu)
}

/// Qwen2.5-Coder-1.5B-Instruct when it is already cached (it is kept out of CI: 1.1 GB); `None`
/// otherwise, and the tests that want it skip (saying so).
pub fn qwen_1_5b() -> Option<&'static Engine> {
    static E: OnceLock<Engine> = OnceLock::new();
    if E.get().is_none() && registry::resolve("qwen2.5-coder-1.5b").is_err() {
        eprintln!(
            "skipped: qwen2.5-coder-1.5b is not cached (`tessera model fetch qwen2.5-coder-1.5b`)"
        );
        return None;
    }
    Some(load_once(&E, "qwen2.5-coder-1.5b", Compute::Cpu))
}

/// The real SmolLM2-135M model on another compute device, loaded once per test binary and device
/// (`Compute::Cpu` is [`smollm`]).
pub fn smollm_on(compute: Compute) -> &'static Engine {
    static CANDLE_CPU: OnceLock<Engine> = OnceLock::new();
    static CUDA: OnceLock<Engine> = OnceLock::new();
    match compute {
        Compute::Cpu => smollm(),
        Compute::CandleCpu => load_once(&CANDLE_CPU, "smollm2-135m", compute),
        Compute::Cuda(_) => load_once(&CUDA, "smollm2-135m", compute),
    }
}

/// The real Gemma 3 270M model on another compute device, loaded once per test binary and device
/// (`Compute::Cpu` is [`gemma`]).
pub fn gemma_on(compute: Compute) -> &'static Engine {
    static CANDLE_CPU: OnceLock<Engine> = OnceLock::new();
    static CUDA: OnceLock<Engine> = OnceLock::new();
    match compute {
        Compute::Cpu => gemma(),
        Compute::CandleCpu => load_once(&CANDLE_CPU, "gemma3-270m", compute),
        Compute::Cuda(_) => load_once(&CUDA, "gemma3-270m", compute),
    }
}

/// Fetches (once, safely in parallel) and loads a known model into `cell`.
fn load_once(cell: &'static OnceLock<Engine>, name: &str, compute: Compute) -> &'static Engine {
    cell.get_or_init(|| {
        registry::fetch(name).unwrap_or_else(|e| panic!("fetch {name}: {e}"));
        Engine::load_with(
            name,
            &LoadOptions {
                device: compute,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("load {name} on {compute}: {e}"))
    })
}

/// Submits `questions` all at once to an [`EngineService`] that owns `engine`, and checks that each
/// answer equals `reference` (the same model) answering alone.
pub fn service_answers_match_alone(
    engine: Engine,
    reference: &Engine,
    questions: &[&str],
    options: &GenerateOptions,
) {
    let service = EngineService::spawn(engine, 8);
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| reference.chat_prompt(&[Message::new(Role::User, *q)]))
        .collect();
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| service.submit(p.clone(), options.clone(), false).unwrap())
        .collect();
    for (prompt, rx) in prompts.iter().zip(receivers) {
        let done = rx
            .iter()
            .find_map(|ev| match ev {
                Event::Done(g) => Some(g),
                Event::Failed(err) => panic!("{err}"),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            done.tokens,
            reference
                .generate(prompt, options, |_| true)
                .unwrap()
                .tokens
        );
    }
}

/// Teacher-forced logits (one batched pass) against the logits seen while decoding with the KV cache.
pub fn teacher_forced_matches_incremental(
    engine: &Engine,
    question: &str,
    sampling: SamplingParams,
) -> f32 {
    let prompt = engine.chat_prompt(&[Message::new(Role::User, question)]);
    let mut seen: Vec<Vec<f32>> = Vec::new();
    let opts = GenerateOptions {
        max_tokens: 48,
        sampling,
        ignore_eos: true,
        ..Default::default()
    };
    let out = engine
        .generate(&prompt, &opts, |s| {
            seen.push(s.logits.to_vec());
            true
        })
        .unwrap();
    let mut all = prompt.clone();
    all.extend(&out.tokens);
    let scored = engine.score(&all).unwrap();
    let v = engine.vocab_size();
    let mut max_diff = 0f32;
    for (i, logits) in seen.iter().enumerate() {
        let row = &scored[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
        for (a, b) in logits.iter().zip(row) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    eprintln!(
        "{} on {}: max |incremental - teacher-forced| over {} positions = {max_diff:e}",
        engine.info().name,
        engine.compute(),
        seen.len()
    );
    max_diff
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * scale
        })
        .collect()
}

/// Writes a tiny Llama-architecture GGUF with random weights (Q4_1 layers, Q8_0 embedding) and a
/// byte-level tokenizer: 64 wide, 2 layers, a 64-token context.
pub fn write_tiny_gguf(path: &Path, architecture: &str) {
    let (d, ffn, layers, heads, kv_heads, ctx) = (64usize, 128usize, 2usize, 2usize, 1usize, 64u32);
    // Vocabulary: the 256 byte characters of GPT-2's map, then the chat markers.
    let mut tokens: Vec<String> = Vec::new();
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(next).unwrap();
            next += 1;
            c
        };
        tokens.push(c.to_string());
    }
    tokens.extend(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "he",
            "ll",
            "hell",
            "hello",
        ]
        .map(String::from),
    );
    let mut types = vec![1i32; tokens.len()];
    for t in &mut types[256..259] {
        *t = 3;
    }
    let vocab = tokens.len();
    let merges = ["h e", "l l", "he ll", "hell o"];
    let s = |x: &str| Value::String(x.to_string());
    let u = Value::U32;
    let k = |x: &str| format!("{architecture}.{x}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(architecture)),
        (k("block_count"), u(layers as u32)),
        (k("context_length"), u(ctx)),
        (k("embedding_length"), u(d as u32)),
        (k("feed_forward_length"), u(ffn as u32)),
        (k("attention.head_count"), u(heads as u32)),
        (k("attention.head_count_kv"), u(kv_heads as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(257)),
        ("tokenizer.ggml.eos_token_id".into(), u(258)),
        ("tokenizer.chat_template".into(), s("<|im_start|>")),
    ];
    let q = |shape: (usize, usize), seed: u64, dtype: GgmlDType| {
        let t =
            Tensor::from_slice(&random(shape.0 * shape.1, seed, 0.4), shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let hd = d / heads;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q((vocab, d), 1, GgmlDType::Q8_0),
        ),
        ("output_norm.weight".into(), ones(d)),
    ];
    for l in 0..layers {
        let n = |x: &str| format!("blk.{l}.{x}.weight");
        let seed = 100 * (l as u64 + 1);
        tensors.push((n("attn_norm"), ones(d)));
        tensors.push((n("attn_q"), q((heads * hd, d), seed + 1, GgmlDType::Q4_1)));
        tensors.push((
            n("attn_k"),
            q((kv_heads * hd, d), seed + 2, GgmlDType::Q4_1),
        ));
        tensors.push((
            n("attn_v"),
            q((kv_heads * hd, d), seed + 3, GgmlDType::Q4_1),
        ));
        tensors.push((
            n("attn_output"),
            q((d, heads * hd), seed + 4, GgmlDType::Q4_1),
        ));
        tensors.push((n("ffn_norm"), ones(d)));
        tensors.push((n("ffn_gate"), q((ffn, d), seed + 5, GgmlDType::Q4_1)));
        tensors.push((n("ffn_up"), q((ffn, d), seed + 6, GgmlDType::Q4_1)));
        tensors.push((n("ffn_down"), q((d, ffn), seed + 7, GgmlDType::Q4_1)));
    }
    let mut file = std::fs::File::create(path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts).unwrap();
}
