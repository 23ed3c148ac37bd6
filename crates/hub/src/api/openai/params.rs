//! Which request parameters the OpenAI endpoints honour, accept as harmless, or refuse.
//!
//! The rule (from the OpenAI API reference, <https://platform.openai.com/docs/api-reference/chat/create>):
//! a parameter that would change which tokens are chosen or what the response means is either
//! implemented or refused with 400 `unsupported_parameter` naming it: never silently ignored.
//! Parameters that change nothing here (`user`, `metadata`, `store: false`) are
//! accepted. A parameter at its neutral value (`store: false`, `best_of: 1`,
//! `response_format: {"type": "text"}`, `tools: []`, …) is accepted, since it asks for nothing.
//! Names OpenAI does not define are refused as OpenAI refuses them (`unknown_parameter`).
//! Limits come first, so `top_logprobs: 50` is told its range whether or not logprobs are served.

use serde_json::{Map, Value};
use tessera_types::Grammar;

use super::Kind;
use crate::error::ApiError;

/// Most `top_logprobs` a request may ask for (as OpenAI).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most `logprobs` a legacy completion may ask for (as OpenAI).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// What this hub does with a parameter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Treatment {
    /// Read by the typed request and honoured.
    Honoured,
    /// Changes nothing here; accepted and not used.
    Harmless,
    /// Honoured only at its neutral value; any other value is refused as unsupported.
    NeutralOnly(fn(&Value) -> bool),
    /// Changes meaning and is not implemented: refused whatever its value (null aside).
    Unsupported,
}

use Treatment::{Harmless, Honoured, NeutralOnly, Unsupported};

pub(super) fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_one(v: &Value) -> bool {
    v.as_u64() == Some(1)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn is_none_choice(v: &Value) -> bool {
    v.as_str() == Some("none")
}

fn is_text_only(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

/// The parameters both endpoints define, and what each one gets.
const COMMON: &[(&str, Treatment)] = &[
    ("model", Honoured),
    ("max_tokens", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("seed", Honoured),
    ("stop", Honoured),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("n", Honoured),
    // Tessera's extensions.
    ("top_k", Honoured),
    ("max_price", Honoured),
    ("user", Harmless),
    ("metadata", Harmless),
    // `flex` is the batch tier (idle capacity, a discount); `auto` and `default` interactive.
    ("service_tier", Honoured),
    ("store", NeutralOnly(is_false)),
    ("presence_penalty", Honoured),
    ("frequency_penalty", Honoured),
    ("logit_bias", Honoured),
];

/// Parameters only chat completions define.
const CHAT: &[(&str, Treatment)] = &[
    ("messages", Honoured),
    ("max_completion_tokens", Honoured),
    ("logprobs", Honoured),
    ("top_logprobs", Honoured),
    ("response_format", Honoured),
    ("tools", Honoured),
    ("tool_choice", Honoured),
    ("parallel_tool_calls", Honoured),
    // The deprecated forms of `tools` and `tool_choice`.
    ("functions", NeutralOnly(is_empty)),
    ("function_call", NeutralOnly(is_none_choice)),
    ("modalities", NeutralOnly(is_text_only)),
    ("audio", Unsupported),
    ("prediction", Unsupported),
    ("reasoning_effort", Unsupported),
    ("web_search_options", Unsupported),
];

/// Parameters only legacy completions define.
const COMPLETION: &[(&str, Treatment)] = &[
    ("prompt", Honoured),
    ("logprobs", Honoured),
    ("echo", NeutralOnly(is_false)),
    ("best_of", NeutralOnly(is_one)),
    ("suffix", NeutralOnly(is_empty)),
];

fn treatment(kind: Kind, name: &str) -> Option<(&'static str, Treatment)> {
    let own = match kind {
        Kind::Chat => CHAT,
        Kind::Completion => COMPLETION,
    };
    COMMON.iter().chain(own).find(|(n, _)| *n == name).copied()
}

/// Refuses what this hub would otherwise ignore, and values outside OpenAI's limits.
pub fn check(body: &Map<String, Value>, kind: Kind, max_n: u32) -> Result<(), ApiError> {
    limits(body, kind, max_n)?;
    for (name, value) in body {
        let Some((name, treatment)) = treatment(kind, name) else {
            return Err(ApiError::invalid(
                "unknown_parameter",
                format!("Unrecognized request argument supplied: {name}"),
            ));
        };
        let refused = match treatment {
            Honoured | Harmless => false,
            _ if value.is_null() => false,
            NeutralOnly(neutral) => !neutral(value),
            Unsupported => true,
        };
        if refused {
            return Err(ApiError::unsupported_param(
                name,
                format!("`{name}` with this value is not supported by this hub."),
            ));
        }
    }
    Ok(())
}

/// Largest JSON Schema accepted, bytes of compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 16 * 1024;
/// Deepest nesting of a JSON Schema accepted (objects and arrays).
pub const MAX_SCHEMA_DEPTH: usize = 24;

/// How deep objects and arrays nest in a JSON value.
pub(super) fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `logit_bias` (already range-checked by [`check`]) as the rule's sorted list.
pub fn logit_bias(bias: Option<&std::collections::HashMap<String, f32>>) -> Vec<(u32, f32)> {
    let mut out: Vec<(u32, f32)> = bias
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.parse().ok()?, *v)))
        .filter(|(_, v)| *v != 0.0)
        .collect();
    out.sort_by_key(|(t, _)| *t);
    out
}

fn bad_format(message: impl Into<String>) -> ApiError {
    ApiError {
        param: Some("response_format"),
        ..ApiError::invalid("invalid_json_schema", message)
    }
}

/// `response_format` (<https://platform.openai.com/docs/guides/structured-outputs>) as the
/// grammar of the sampling rule. The hub checks only the shape, size and depth of a schema;
/// the provider compiles it (and refuses, before any token, one it cannot compile).
pub fn grammar(response_format: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(format) = response_format.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").and_then(Value::as_object) else {
                return Err(bad_format(
                    "response_format.json_schema must be an object with `name` and `schema`.",
                ));
            };
            let name_ok = spec.get("name").and_then(Value::as_str).is_some_and(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
            if !name_ok {
                return Err(bad_format(
                    "response_format.json_schema.name must be 1 to 64 letters, digits, `_` or `-`.",
                ));
            }
            if spec
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return Err(bad_format(
                    "response_format.json_schema.strict must be a boolean.",
                ));
            }
            let Some(schema) = spec.get("schema").filter(|s| s.is_object()) else {
                return Err(bad_format(
                    "response_format.json_schema.schema must be a JSON Schema object.",
                ));
            };
            let text = schema.to_string();
            if text.len() > MAX_SCHEMA_BYTES {
                return Err(bad_format(format!(
                    "The JSON Schema has {} bytes; at most {MAX_SCHEMA_BYTES} are accepted.",
                    text.len()
                )));
            }
            if depth(schema) > MAX_SCHEMA_DEPTH {
                return Err(bad_format(format!(
                    "The JSON Schema nests deeper than {MAX_SCHEMA_DEPTH} levels."
                )));
            }
            // Structured output is always enforced, `strict` or not: the grammar is the rule.
            Ok(Some(Grammar::JsonSchema { schema: text }))
        }
        _ => Err(ApiError::invalid_param(
            "response_format",
            "response_format.type must be `text`, `json_object` or `json_schema`.",
        )),
    }
}

fn number(body: &Map<String, Value>, name: &str) -> Option<f64> {
    body.get(name).and_then(Value::as_f64)
}

/// OpenAI's ranges, each a 400 naming the parameter.
fn limits(body: &Map<String, Value>, kind: Kind, max_n: u32) -> Result<(), ApiError> {
    if let Some(n) = body.get("n").filter(|v| !v.is_null()) {
        if !n.as_u64().is_some_and(|n| (1..=max_n as u64).contains(&n)) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be an integer from 1 to {max_n}."),
            ));
        }
    }
    let (logprobs_limit_name, logprobs_limit) = match kind {
        Kind::Chat => ("top_logprobs", MAX_TOP_LOGPROBS),
        Kind::Completion => ("logprobs", MAX_COMPLETION_LOGPROBS),
    };
    if let Some(v) = body.get(logprobs_limit_name).filter(|v| !v.is_null()) {
        if v.as_u64().is_none_or(|k| k > logprobs_limit) {
            return Err(ApiError::invalid_param(
                logprobs_limit_name,
                format!("{logprobs_limit_name} must be an integer from 0 to {logprobs_limit}."),
            ));
        }
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if body.get(name).is_some_and(|v| !v.is_null())
            && !number(body, name).is_some_and(|p| (-2.0..=2.0).contains(&p))
        {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} must be a number from -2 to 2."),
            ));
        }
    }
    if let Some(bias) = body.get("logit_bias").filter(|v| !v.is_null()) {
        let valid = bias.as_object().is_some_and(|m| {
            m.len() <= 300
                && m.iter().all(|(k, v)| {
                    k.parse::<u32>().is_ok()
                        && v.as_f64().is_some_and(|b| (-100.0..=100.0).contains(&b))
                })
        });
        if !valid {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "logit_bias maps token ids to biases from -100 to 100 (at most 300 entries).",
            ));
        }
    }
    if let Some(tier) = body.get("service_tier").filter(|v| !v.is_null()) {
        if !matches!(tier.as_str(), Some("auto" | "default" | "flex")) {
            return Err(ApiError::invalid_param(
                "service_tier",
                "service_tier is `auto` or `default` (interactive) or `flex` (the batch tier: idle capacity at a discount).",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(kind: Kind, body: Value) -> Result<(), ApiError> {
        check(body.as_object().expect("object"), kind, 4)
    }

    fn base() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(mut body: Value, key: &str, value: Value) -> Value {
        body[key] = value;
        body
    }

    #[test]
    fn harmless_and_neutral_parameters_are_accepted() {
        let body = json!({
            "model": "m", "messages": [], "user": "u-1", "metadata": {"k": "v"}, "store": false,
            "service_tier": "auto", "logprobs": false, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "parallel_tool_calls": true, "n": 1, "top_logprobs": null, "modalities": ["text"],
        });
        run(Kind::Chat, body).expect("accepted");
        run(
            Kind::Completion,
            json!({"model": "m", "prompt": "x", "echo": false, "best_of": 1, "logprobs": null}),
        )
        .expect("accepted");
    }

    #[test]
    fn meaning_changing_parameters_are_refused_by_name() {
        for (key, value) in [
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!("auto")),
            ("store", json!(true)),
            ("audio", json!({"voice": "alloy"})),
            ("reasoning_effort", json!("low")),
            ("modalities", json!(["text", "audio"])),
        ] {
            let e = run(Kind::Chat, with(base(), key, value)).expect_err(key);
            assert_eq!(e.code, "unsupported_parameter", "{key}");
            assert_eq!(e.param, Some(key), "{key}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        for (key, value) in [
            ("echo", json!(true)),
            ("best_of", json!(2)),
            ("suffix", json!("!")),
        ] {
            let e = run(
                Kind::Completion,
                json!({"model": "m", "prompt": "x", key: value}),
            )
            .expect_err(key);
            assert_eq!(e.param, Some(key), "{key}");
        }
    }

    #[test]
    fn response_formats_become_grammars_and_bad_schemas_are_named() {
        assert_eq!(grammar(None).unwrap(), None);
        assert_eq!(grammar(Some(&json!({"type": "text"}))).unwrap(), None);
        assert_eq!(
            grammar(Some(&json!({"type": "json_object"}))).unwrap(),
            Some(Grammar::JsonObject)
        );
        let ok = json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true,
            "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}});
        let Some(Grammar::JsonSchema { schema }) = grammar(Some(&ok)).unwrap() else {
            panic!("a schema grammar");
        };
        assert!(schema.contains("\"properties\""), "{schema}");
        let mut deep = json!({"type": "string"});
        for _ in 0..30 {
            deep = json!({"type": "array", "items": deep});
        }
        for bad in [
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}),
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"description": "x".repeat(MAX_SCHEMA_BYTES)}}}),
        ] {
            let e =
                grammar(Some(&bad)).expect_err(&bad.to_string()[..60.min(bad.to_string().len())]);
            assert_eq!(e.code, "invalid_json_schema");
            assert_eq!(e.param, Some("response_format"));
        }
        let e = grammar(Some(&json!({"type": "yaml"}))).unwrap_err();
        assert_eq!(e.param, Some("response_format"));
    }

    #[test]
    fn unknown_parameters_are_refused_not_ignored() {
        let e = run(Kind::Chat, with(base(), "temprature", json!(0.2))).unwrap_err();
        assert_eq!(e.code, "unknown_parameter");
        assert!(e.message.contains("temprature"), "{}", e.message);
        // A chat-only parameter is unknown to legacy completions.
        let e = run(
            Kind::Completion,
            json!({"model": "m", "prompt": "x", "response_format": {"type": "text"}}),
        )
        .unwrap_err();
        assert_eq!(e.code, "unknown_parameter");
    }

    #[test]
    fn limits_name_the_parameter_before_support_is_asked() {
        for (key, value) in [
            ("top_logprobs", json!(50)),
            ("top_logprobs", json!(-1)),
            ("n", json!(5)),
            ("n", json!(0)),
            ("presence_penalty", json!(2.5)),
            ("frequency_penalty", json!("high")),
            ("logit_bias", json!({"abc": 1})),
            ("logit_bias", json!({"1": 101})),
        ] {
            let e = run(Kind::Chat, with(base(), key, value.clone())).expect_err(key);
            assert_eq!(e.code, "invalid_value", "{key} {value}");
            assert_eq!(e.param, Some(key), "{key}");
        }
        let e = run(
            Kind::Completion,
            json!({"model": "m", "prompt": "x", "logprobs": 6}),
        )
        .unwrap_err();
        assert_eq!(e.param, Some("logprobs"));
        run(Kind::Chat, with(base(), "n", json!(4))).expect("n within the configured limit");
    }
}
