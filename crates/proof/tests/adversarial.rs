//! Verification on the real SmolLM2 model: honest work passes under every provider set-up, every
//! cheating behaviour is caught, and malformed commitments are rejected with a reason.

use std::sync::OnceLock;

use tessera_engine::{quant, registry, Engine, LoadOptions, SamplingParams, Variant};
use tessera_proof::{cheat, serve, tasks, verify, Adversary, CheatEngines, Reason, Thresholds};

fn load(name: &str, variant: Variant) -> Engine {
    registry::fetch(name).unwrap();
    Engine::load_with(
        name,
        &LoadOptions {
            threads: None,
            variant,
            ..Default::default()
        },
    )
    .unwrap()
}

fn smollm() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load("smollm2-135m", Variant::Faithful))
}

const MAX_TOKENS: u32 = 32;

#[test]
fn honest_jobs_pass_across_threads_batches_and_kernels() {
    let verifier = smollm();
    let one_thread = Engine::load_with(
        "smollm2-135m",
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let ts = tasks(8, MAX_TOKENS, 1);
    let specs: Vec<_> = ts.iter().map(|t| t.spec(verifier)).collect();
    let mut jobs = serve(verifier, &specs).unwrap(); // batch 8
    jobs.extend(
        specs
            .iter()
            .take(3)
            .flat_map(|s| serve(&one_thread, std::slice::from_ref(s)).unwrap()),
    ); // batch 1, 1 thread
    assert!(quant::set_kernel_isa("avx2") || !std::is_x86_feature_detected!("avx2"));
    jobs.extend(serve(verifier, &specs[..4]).unwrap());
    quant::set_kernel_isa("auto");
    let mut worst = 0f32;
    for job in &jobs {
        let v = verify(verifier, job, &Thresholds::default()).unwrap();
        assert!(
            v.passed,
            "honest job flagged: {:?} ({:?})",
            v.reason, v.stats
        );
        worst = worst.max(v.stats.max_abs);
    }
    eprintln!("honest max |Δ| over {} jobs: {worst}", jobs.len());
}

fn assert_caught(adversary: Adversary, engines: &CheatEngines<'_>, n: usize) {
    let mut ts = tasks(n, MAX_TOKENS, 77);
    if adversary.needs_sampling() {
        for t in &mut ts {
            if t.sampling.is_greedy() {
                t.sampling = SamplingParams::seeded(0.8, 5);
            }
        }
    }
    let jobs = cheat(adversary, engines, &ts, 3).unwrap();
    for job in &jobs {
        let v = verify(engines.honest, job, &Thresholds::default()).unwrap();
        assert!(!v.passed, "{} not caught: {:?}", adversary.name(), v.stats);
        eprintln!("{}: {}", adversary.name(), v.reason.unwrap());
    }
}

#[test]
fn every_adversary_is_caught() {
    let honest = smollm();
    let other = load("gemma3-270m", Variant::Faithful);
    let requantized = load("smollm2-135m", Variant::RequantizedQ4_0);
    let skipped = load("smollm2-135m", Variant::SkipLastLayers(2));
    let engines = CheatEngines {
        honest,
        other: &other,
        requantized: &requantized,
        skipped: &skipped,
    };
    for adversary in Adversary::ALL {
        assert_caught(adversary, &engines, 4);
    }
}

#[test]
fn malformed_commitments_are_rejected_with_a_reason() {
    let e = smollm();
    let spec = tasks(1, 16, 9)[0].spec(e);
    let job = serve(e, std::slice::from_ref(&spec)).unwrap().remove(0);
    let t = Thresholds::default();
    assert!(verify(e, &job, &t).unwrap().passed);

    let reason = |f: &dyn Fn(&mut tessera_proof::Job)| {
        let mut j = job.clone();
        f(&mut j);
        let v = verify(e, &j, &t).unwrap();
        assert!(!v.passed);
        v.reason.unwrap()
    };
    assert_eq!(
        reason(&|j| j.commitment.version = 9),
        Reason::WrongVersion { found: 9 }
    );
    assert!(matches!(
        reason(&|j| j.commitment.model_sha256 = "00".repeat(32)),
        Reason::WrongModel { .. }
    ));
    assert!(matches!(
        reason(&|j| j.spec.model_sha256 = "11".repeat(32)),
        Reason::WrongModel { .. }
    ));
    assert_eq!(
        reason(&|j| j.spec.prompt_tokens.push(42)),
        Reason::PromptMismatch
    );
    assert_eq!(
        reason(&|j| {
            j.claim.output_tokens.pop();
        }),
        Reason::OutputMismatch
    );
    assert!(matches!(
        reason(&|j| j.commitment.values = "!!not base64!!".into()),
        Reason::Malformed { .. }
    ));
    assert!(matches!(
        reason(&|j| j.commitment.values.truncate(8)),
        Reason::Malformed { .. }
    ));
    assert!(matches!(
        reason(&|j| j.spec.sampling.temperature = 0.5),
        Reason::ParamsMismatch { .. }
    ));
    assert!(matches!(
        reason(&|j| j.spec.max_tokens = 3),
        Reason::ParamsMismatch { .. }
    ));
    // A job that does not even parse is a clear error.
    assert!(tessera_proof::read_job("{\"model\": 1").is_err());
    // Round trip through JSON, as `tessera verify JOB.json` reads it.
    let json = serde_json::to_string(&job).unwrap();
    assert!(
        verify(e, &tessera_proof::read_job(&json).unwrap(), &t)
            .unwrap()
            .passed
    );
}

/// Issue 12: constrained decoding under a JSON Schema is honest work that passes, the output is
/// valid JSON, and the same tokens claimed under another grammar fail.
#[test]
fn constrained_jobs_pass_and_follow_their_schema() {
    use tessera_engine::sampling::Grammar;
    let engine = smollm();
    let schema = r#"{"type":"object","properties":{"city":{"type":"string"},"population":{"type":"integer"}},"required":["city","population"],"additionalProperties":false}"#;
    let mut specs = Vec::new();
    for (i, task) in tasks(4, 48, 3).into_iter().enumerate() {
        let mut spec = task.spec(engine);
        spec.sampling.grammar = Some(if i % 2 == 0 {
            Grammar::JsonSchema {
                schema: schema.into(),
            }
        } else {
            Grammar::JsonObject
        });
        specs.push(spec);
    }
    let jobs = serve(engine, &specs).unwrap();
    for job in &jobs {
        let v = verify(engine, job, &Thresholds::default()).unwrap();
        assert!(v.passed, "honest constrained job flagged: {:?}", v.reason);
        assert!(job.output_text.starts_with('{'), "{}", job.output_text);
        if job.commitment.finish == tessera_proof::Finish::Eos {
            let value: serde_json::Value = serde_json::from_str(&job.output_text).unwrap();
            assert!(value.is_object(), "{value}");
            if matches!(job.spec.sampling.grammar, Some(Grammar::JsonSchema { .. })) {
                assert!(
                    value["city"].is_string() && value["population"].is_i64(),
                    "{value}"
                );
            }
        }
    }
    // The schema's output claimed under a stricter schema (an array) fails at its first token.
    let mut forged = jobs[0].clone();
    forged.spec.sampling.grammar = Some(Grammar::JsonSchema {
        schema: r#"{"type":"array"}"#.into(),
    });
    forged.commitment.sampling.grammar = forged.spec.sampling.grammar.clone();
    let v = verify(engine, &forged, &Thresholds::default()).unwrap();
    assert_eq!(v.reason, Some(Reason::GrammarViolation { index: 0 }));
    // A schema that cannot compile is refused by the engine before any token.
    let bad = Grammar::JsonSchema {
        schema: r##"{"type":"object","properties":{"x":{"$ref":"#/nowhere"}}}"##.into(),
    };
    assert!(engine.grammar().unwrap().compile(&bad).is_err());
}

/// Issue 12: a function call constrained by the tools' grammar is honest work that passes and
/// is a well-formed call of a listed function; the same prompt answered without the grammar but
/// claimed under it (a provider ignoring `tools`) fails at the first token the grammar forbids.
#[test]
fn tool_call_jobs_pass_and_ignoring_the_tool_grammar_is_caught() {
    use tessera_engine::chat::{Message, Role, Tool};
    use tessera_engine::sampling::Grammar;
    let engine = smollm();
    let parameters = r#"{"type":"object","properties":{"city":{"type":"string","maxLength":12}},"required":["city"],"additionalProperties":false}"#;
    let tools = [Tool {
        name: "get_weather".into(),
        description: Some("Weather in a city".into()),
        parameters: parameters.into(),
    }];
    let prompt = engine.chat_prompt_with_tools(
        &[Message::new(Role::User, "What is the weather in Paris?")],
        &tools,
    );
    let mut specs = Vec::new();
    for (required, seed) in [(true, 1), (false, 2)] {
        let mut sampling = SamplingParams::seeded(0.7, seed);
        sampling.grammar = Some(Grammar::ToolCalls {
            functions: format!(r#"[{{"name":"get_weather","parameters":{parameters}}}]"#),
            required,
            parallel: true,
        });
        specs.push(tessera_proof::JobSpec {
            model_sha256: engine.info().sha256.clone(),
            prompt_tokens: prompt.clone(),
            sampling,
            max_tokens: 48,
            stop: Vec::new(),
        });
    }
    let jobs = serve(engine, &specs).unwrap();
    for job in &jobs {
        let v = verify(engine, job, &Thresholds::default()).unwrap();
        assert!(v.passed, "honest tool-call job flagged: {:?}", v.reason);
    }
    let call = &jobs[0].output_text;
    let prefix = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"";
    assert!(call.starts_with(prefix), "{call}");
    if jobs[0].commitment.finish == tessera_proof::Finish::Eos {
        assert!(call.ends_with("\"}}\n</tool_call>"), "{call}");
    }
    // Generated freely, claimed under the required-call grammar.
    let mut free = specs[0].clone();
    free.sampling.grammar = None;
    let mut forged = serve(engine, &[free]).unwrap().remove(0);
    assert!(
        !forged.output_text.starts_with(prefix),
        "{}",
        forged.output_text
    );
    forged.spec.sampling.grammar = specs[0].sampling.grammar.clone();
    forged.commitment.sampling.grammar = forged.spec.sampling.grammar.clone();
    let v = verify(engine, &forged, &Thresholds::default()).unwrap();
    assert!(
        matches!(v.reason, Some(Reason::GrammarViolation { .. })),
        "{:?}",
        v.reason
    );
}

/// Issue 12: presence and frequency penalties and logit biases are part of the verified rule:
/// honest penalised and biased jobs pass; the same jobs generated without them but claimed with
/// them fail wherever the output differs.
#[test]
fn penalised_and_biased_jobs_pass_and_ignoring_them_is_caught() {
    let engine = smollm();
    let first_greedy_token = |spec: &tessera_proof::JobSpec| {
        let mut plain = spec.clone();
        plain.sampling = SamplingParams::greedy();
        serve(engine, &[plain]).unwrap()[0].claim.output_tokens[0]
    };
    let mut specs = Vec::new();
    for (i, task) in tasks(4, 40, 9).into_iter().enumerate() {
        let mut spec = task.spec(engine);
        spec.sampling.presence_penalty = 0.6;
        spec.sampling.frequency_penalty = 1.5;
        if i % 2 == 0 {
            // Forbid the token greedy decoding would start with: the output must change.
            spec.sampling.logit_bias = vec![(first_greedy_token(&spec), -100.0)];
        }
        specs.push(spec);
    }
    let honest = serve(engine, &specs).unwrap();
    for job in &honest {
        let v = verify(engine, job, &Thresholds::default()).unwrap();
        assert!(v.passed, "honest penalised job flagged: {:?}", v.reason);
    }
    // The cheater samples with the plain rule and claims the penalised one.
    let plain: Vec<_> = specs
        .iter()
        .map(|s| {
            let mut p = s.clone();
            p.sampling.presence_penalty = 0.0;
            p.sampling.frequency_penalty = 0.0;
            p.sampling.logit_bias.clear();
            p
        })
        .collect();
    let mut caught = 0;
    for ((cheat, spec), honest) in serve(engine, &plain)
        .unwrap()
        .into_iter()
        .zip(&specs)
        .zip(&honest)
    {
        if cheat.claim.output_tokens == honest.claim.output_tokens {
            continue;
        }
        let mut forged = cheat.clone();
        forged.spec = spec.clone();
        forged.commitment.sampling = spec.sampling.clone();
        let v = verify(engine, &forged, &Thresholds::default()).unwrap();
        assert!(!v.passed, "ignored penalties not caught: {:?}", v.stats);
        caught += 1;
    }
    assert!(
        caught >= 2,
        "the biased jobs at least must differ ({caught} did)"
    );
}
