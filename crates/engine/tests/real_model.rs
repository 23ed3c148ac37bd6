//! The engine on the real models: SmolLM2-135M (Q4_1), Gemma 3 270M (Q4_K_M) and
//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M; 1.5B too when it is cached).

mod support;

use support::{gemma, qwen, qwen_1_5b, smollm, teacher_forced_matches_incremental};
use tessera_engine::{Engine, GenerateOptions, Message, Role, SamplingParams};

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

fn ask(engine: &Engine, question: &str, options: &GenerateOptions) -> tessera_engine::Generation {
    let prompt = engine.chat_prompt(&[Message::new(Role::User, question)]);
    engine.generate(&prompt, options, |_| true).unwrap()
}

#[test]
fn smollm_answers_paris() {
    let out = ask(smollm(), "What is the capital of France?", &greedy(32));
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(out.finish_reason, tessera_engine::FinishReason::Stop);
}

#[test]
fn greedy_output_is_identical_across_runs() {
    let a = ask(smollm(), "Name three colours.", &greedy(40));
    let b = ask(smollm(), "Name three colours.", &greedy(40));
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn seeded_sampling_reproduces_and_seeds_differ() {
    let opts = |seed| GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::seeded(0.9, seed),
        ..Default::default()
    };
    let a = ask(smollm(), "Tell me a story about a dragon.", &opts(7));
    let b = ask(smollm(), "Tell me a story about a dragon.", &opts(7));
    let c = ask(smollm(), "Tell me a story about a dragon.", &opts(8));
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn smollm_teacher_forced_logits_match_incremental() {
    let d = teacher_forced_matches_incremental(
        smollm(),
        "Explain photosynthesis briefly.",
        SamplingParams::seeded(0.8, 3),
    );
    // The kernels compute every row the same way whatever the batch: expected bitwise equal.
    assert!(d <= 1e-4, "max difference {d}");
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let e = smollm();
    let prompts: Vec<Vec<u32>> = [
        "Hi!",
        "What is 2+2?",
        "Name a fruit.",
        "Say something about the moon.",
    ]
    .iter()
    .map(|q| e.chat_prompt(&[Message::new(Role::User, *q)]))
    .collect();
    let opts = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams::seeded(0.7, 11),
        ..Default::default()
    };
    let batch: Vec<_> = prompts.iter().map(|p| (p.clone(), opts.clone())).collect();
    let together = e.generate_batch(&batch, |_| true).unwrap();
    for (p, t) in prompts.iter().zip(&together) {
        let alone = e.generate(p, &opts, |_| true).unwrap();
        assert_eq!(alone.tokens, t.tokens);
    }
}

#[test]
fn stop_sequences_and_max_tokens_end_generation() {
    let e = smollm();
    let out = ask(
        e,
        "What is the capital of France?",
        &GenerateOptions {
            stop: vec!["France".into()],
            ..greedy(32)
        },
    );
    assert_eq!(out.text, "The capital of ");
    let out = ask(e, "Write a long essay about rivers.", &greedy(5));
    assert_eq!(out.tokens.len(), 5);
    assert_eq!(out.finish_reason, tessera_engine::FinishReason::Length);
}

#[test]
fn streaming_callback_sees_every_token_and_can_cancel() {
    let e = smollm();
    let prompt = e.chat_prompt(&[Message::new(Role::User, "Count from one to twenty.")]);
    let mut text = String::new();
    let mut n = 0;
    let out = e
        .generate(&prompt, &greedy(64), |s| {
            text.push_str(s.text);
            n += 1;
            n < 10
        })
        .unwrap();
    assert_eq!(out.tokens.len(), 10);
    assert_eq!(out.finish_reason, tessera_engine::FinishReason::Cancelled);
    assert_eq!(text, out.text);
}

#[test]
fn smollm_tokenizer_round_trips_unicode_and_knows_special_tokens() {
    let t = smollm().tokenizer();
    for text in [
        "Hello, world!",
        "naïve café – 東京 🚀 Ωμέγα",
        "  leading spaces\n\ttabs\r\n",
        "numbers 12345 and 3.14",
        "emoji 👩‍👩‍👧 zwj",
    ] {
        let ids = t.encode(text);
        assert_eq!(t.decode(&ids, false), text);
    }
    // Digits are split one by one, no prefix space.
    let ids = t.encode("2024");
    assert_eq!(ids.len(), 4);
    assert_eq!(t.encode("Hello")[0], t.token_id("Hello").unwrap());
    let im_start = t.token_id("<|im_start|>").unwrap();
    assert_eq!(
        t.encode_with_special("<|im_start|>user"),
        vec![im_start, t.token_id("user").unwrap()]
    );
    // Plain encoding never produces a control token from user text.
    assert!(!t.encode("<|im_start|>").contains(&im_start));
}

#[test]
fn gemma_completes_sensibly() {
    let e = gemma();
    let p = e.completion_prompt("The Eiffel Tower is located in the city of");
    let out = e.generate(&p, &greedy(8), |_| true).unwrap();
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    let p = e.completion_prompt("1, 2, 3, 4, 5,");
    let out = e.generate(&p, &greedy(8), |_| true).unwrap();
    assert!(out.text.starts_with(" 6, 7"), "{:?}", out.text);
}

#[test]
fn gemma_teacher_forced_logits_match_incremental() {
    let d = teacher_forced_matches_incremental(
        gemma(),
        "Explain photosynthesis briefly.",
        SamplingParams::greedy(),
    );
    assert!(d <= 1e-4, "max difference {d}");
}

#[test]
fn gemma_tokenizer_round_trips_and_uses_its_template() {
    let e = gemma();
    let t = e.tokenizer();
    for text in [
        "Hello, world!",
        "naïve café – 東京 🚀",
        "  two spaces\nnew line",
        "x = 12345",
    ] {
        assert_eq!(t.decode(&t.encode(text), false), text);
    }
    let p = e.chat_prompt(&[Message::new(Role::User, "Hi")]);
    assert_eq!(p[0], t.token_id("<bos>").unwrap());
    assert_eq!(p[1], t.token_id("<start_of_turn>").unwrap());
    assert!(e
        .stop_tokens()
        .contains(&t.token_id("<end_of_turn>").unwrap()));
}

#[test]
fn model_identity_is_the_file_sha256() {
    assert_eq!(
        smollm().info().sha256,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(
        gemma().info().sha256,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
}

#[test]
fn engine_service_serves_concurrent_requests_in_one_batch() {
    let engine = Engine::load(&smollm().info().path.to_string_lossy(), None).unwrap();
    support::service_answers_match_alone(
        engine,
        smollm(),
        &[
            "What is the capital of France?",
            "Name a colour.",
            "What is 3+4?",
        ],
        &greedy(24),
    );
}

#[test]
fn qwen_answers_paris() {
    let out = ask(qwen(), "What is the capital of France?", &greedy(24));
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(out.finish_reason, tessera_engine::FinishReason::Stop);
}

/// The first fenced code block of a model's answer (or the whole answer when there is none).
fn code_block(text: &str) -> &str {
    let Some(start) = text.find("```") else {
        return text;
    };
    let body = &text[start + 3..];
    let body = body.strip_prefix("python").unwrap_or(body);
    body.split("```").next().unwrap_or(body)
}

#[test]
fn qwen_writes_a_python_function_that_works() {
    let question = "Write a Python function `is_palindrome(s)` that returns True when the string s reads the same \
                    forwards and backwards. Reply with only the code.";
    let out = ask(qwen(), question, &greedy(120));
    let code = code_block(&out.text);
    let program = format!(
        "{code}\nassert is_palindrome('racecar')\nassert is_palindrome('')\nassert not is_palindrome('python')\nprint('ok')"
    );
    let run = std::process::Command::new("python3")
        .arg("-c")
        .arg(&program)
        .output()
        .expect("python3");
    assert!(
        run.status.success() && String::from_utf8_lossy(&run.stdout).contains("ok"),
        "answer {:?}\nstderr {}",
        out.text,
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn qwen_teacher_forced_logits_match_incremental() {
    let d = teacher_forced_matches_incremental(
        qwen(),
        "Explain recursion briefly.",
        SamplingParams::seeded(0.8, 3),
    );
    // Every row is computed the same way whatever the batch: bitwise equal.
    assert_eq!(d, 0.0, "max difference {d}");
}

#[test]
fn qwen_tokenizer_and_template() {
    let e = qwen();
    let t = e.tokenizer();
    for text in [
        "Hello, world!",
        "naïve café – 東京 🚀 Ωμέγα",
        "  leading spaces\n\ttabs\r\n",
        "def f(x):\n    return x + 12345",
    ] {
        assert_eq!(t.decode(&t.encode(text), false), text);
    }
    // Digits one by one, and a well-known merge.
    assert_eq!(t.encode("2024").len(), 4);
    assert_eq!(t.encode("Hello"), vec![t.token_id("Hello").unwrap()]);
    let im_end = t.token_id("<|im_end|>").unwrap();
    assert_eq!(im_end, 151645);
    assert!(e.stop_tokens().contains(&im_end));
    assert!(!t.encode("<|im_end|>").contains(&im_end));
    // ChatML with Qwen's default system prompt.
    let p = e.chat_prompt(&[Message::new(Role::User, "Hi")]);
    let text = t.decode(&p, false);
    assert!(text.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"), "{text:?}");
    assert!(
        text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text:?}"
    );
    assert_eq!(e.info().architecture, "qwen2");
    assert_eq!(
        e.info().sha256,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    );
}

#[test]
fn qwen_1_5b_loads_and_answers_when_cached() {
    let Some(e) = qwen_1_5b() else { return };
    let out = ask(e, "What is the capital of France?", &greedy(24));
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
}

/// Token ids of `tokenizer_corpus.json` as llama.cpp's `llama-tokenize` gives them
/// (`tests/fixtures/tokenizer_parity.py` regenerates the fixture).
fn tokenizer_matches_llama_cpp(engine: &Engine, model: &str) {
    let corpus: Vec<String> =
        serde_json::from_str(include_str!("fixtures/tokenizer_corpus.json")).unwrap();
    let fixture: std::collections::HashMap<String, Vec<Vec<u32>>> =
        serde_json::from_str(include_str!("fixtures/tokenizer_parity.json")).unwrap();
    let expected = &fixture[model];
    assert!(corpus.len() >= 200 && expected.len() == corpus.len());
    let t = engine.tokenizer();
    let wrong: Vec<(&String, Vec<u32>, &Vec<u32>)> = corpus
        .iter()
        .zip(expected)
        .map(|(s, e)| (s, t.encode(s), e))
        .filter(|(_, got, e)| got != *e)
        .collect();
    for (s, got, e) in wrong.iter().take(10) {
        eprintln!("{model}: {s:?}\n  ours      {got:?}\n  llama.cpp {e:?}");
    }
    assert!(
        wrong.is_empty(),
        "{model}: {} of {} strings tokenize differently from llama.cpp",
        wrong.len(),
        corpus.len()
    );
}

#[test]
fn smollm_tokenizer_matches_llama_cpp_on_the_corpus() {
    tokenizer_matches_llama_cpp(smollm(), "smollm2-135m");
}

#[test]
fn qwen_tokenizer_matches_llama_cpp_on_the_corpus() {
    tokenizer_matches_llama_cpp(qwen(), "qwen2.5-coder-0.5b");
}

/// A prompt longer than one prefill chunk goes through the model in pieces
/// ([`tessera_engine::PREFILL_CHUNK`] tokens each); the logits it yields are bitwise those of a
/// teacher-forced pass over the whole sequence at once.
#[test]
fn long_prompt_prefilled_in_chunks_matches_teacher_forced() {
    let e = smollm();
    let chunk = tessera_engine::PREFILL_CHUNK;
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(chunk / 8);
    let prompt = e.chat_prompt(&[Message::new(Role::User, text)]);
    assert!(
        prompt.len() > chunk + 16,
        "prompt of {} tokens",
        prompt.len()
    );
    let mut seen: Vec<Vec<f32>> = Vec::new();
    let out = e
        .generate(&prompt, &greedy(4), |s| {
            seen.push(s.logits.to_vec());
            true
        })
        .unwrap();
    let mut all = prompt.clone();
    all.extend(&out.tokens);
    let scored = e.score(&all).unwrap();
    let v = e.vocab_size();
    for (i, logits) in seen.iter().enumerate() {
        let row = &scored[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
        assert!(logits == row, "position {i} after the prompt differs");
    }
}
