//! `POST /v1/responses` (<https://platform.openai.com/docs/api-reference/responses>): the newer
//! OpenAI API that the Agents SDK and recent clients speak, text in and text or JSON out.
//!
//! A request is translated into the chat completion it means (`instructions` as the system
//! message, `input` as the conversation, `max_output_tokens`, `text.format` as
//! `response_format`) and runs as one: the same admission, job, commitment and verification.
//! Parameters follow the chat policy: honoured, harmless, or refused 400 by name; what needs
//! state this hub does not keep (`previous_response_id`, `conversation`, `background`,
//! `store: true`) is refused. A stream sends the Responses API's typed events
//! (`response.created` … `response.output_text.delta` … `response.completed`).

use serde_json::{json, Map, Value};

use crate::error::ApiError;

use super::params::{is_false, Treatment};
use Treatment::{Harmless, Honoured, NeutralOnly, Unsupported};

fn is_empty(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty)
}

fn is_disabled(v: &Value) -> bool {
    v.as_str() == Some("disabled")
}

const PARAMS: &[(&str, Treatment)] = &[
    ("model", Honoured),
    ("input", Honoured),
    ("instructions", Honoured),
    ("max_output_tokens", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("stream", Honoured),
    ("text", Honoured),
    // Tessera's extensions, as on chat.
    ("seed", Honoured),
    ("top_k", Honoured),
    ("max_price", Honoured),
    ("user", Harmless),
    ("metadata", Harmless),
    ("service_tier", Harmless),
    ("safety_identifier", Harmless),
    ("prompt_cache_key", Harmless),
    ("parallel_tool_calls", Honoured),
    ("store", NeutralOnly(is_false)),
    ("tools", Honoured),
    ("tool_choice", Honoured),
    ("include", NeutralOnly(is_empty)),
    ("truncation", NeutralOnly(is_disabled)),
    ("previous_response_id", Unsupported),
    ("conversation", Unsupported),
    ("background", Unsupported),
    ("prompt", Unsupported),
    ("reasoning", Unsupported),
    ("max_tool_calls", Unsupported),
    ("top_logprobs", Unsupported),
    ("stream_options", Unsupported),
];

fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => {
                        return Err(ApiError::invalid_param(
                            "input",
                            format!("Unsupported content part `{}`.", other.unwrap_or("?")),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid_param(
            "input",
            "A message's content must be a string or a list of text parts.",
        )),
    }
}

/// The chat completion request a Responses API request means, or the 400 it gets.
pub fn to_chat(body: &Map<String, Value>) -> Result<Value, ApiError> {
    for (name, value) in body {
        let Some((name, treatment)) = PARAMS.iter().find(|(n, _)| n == name).copied() else {
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
    let mut messages = Vec::new();
    if let Some(instructions) = body.get("instructions").filter(|v| !v.is_null()) {
        let text = instructions.as_str().ok_or_else(|| {
            ApiError::invalid_param("instructions", "instructions must be a string.")
        })?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match body.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let field = |k: &str| item.get(k).cloned().unwrap_or(Value::Null);
                match item.get("type").and_then(Value::as_str) {
                    None | Some("message") => {}
                    Some("function_call") => {
                        // The model's calls: consecutive ones are one assistant message.
                        let call = json!({"id": field("call_id"), "type": "function",
                            "function": {"name": field("name"), "arguments": field("arguments")}});
                        match messages.last_mut() {
                            Some(m) if m["role"] == "assistant" && m.get("tool_calls").is_some() => {
                                m["tool_calls"].as_array_mut().expect("a list").push(call)
                            }
                            _ => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                        continue;
                    }
                    Some("function_call_output") => {
                        let output = text_of(item.get("output").unwrap_or(&Value::Null))?;
                        messages.push(json!({"role": "tool", "tool_call_id": field("call_id"), "content": output}));
                        continue;
                    }
                    Some(_) => {
                        return Err(ApiError::unsupported_param(
                            "input",
                            "Only message, function_call and function_call_output items are supported in `input`.",
                        ))
                    }
                }
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let content = text_of(item.get("content").unwrap_or(&Value::Null))?;
                messages.push(json!({"role": role, "content": content}));
            }
        }
        _ => {
            return Err(ApiError::invalid_param(
                "input",
                "input must be a string or a list of messages.",
            ))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [
        ("model", "model"),
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
        ("seed", "seed"),
        ("top_k", "top_k"),
        ("max_price", "max_price"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = body.get("tool_choice").filter(|c| !c.is_null()) {
        let choice = match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                json!({"type": "function", "function": {"name": choice.get("name")}})
            }
            _ => choice.clone(),
        };
        chat.insert("tool_choice".into(), choice);
    }
    if let Some(format) = body
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
    {
        let format = match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let mut spec = Map::new();
                for key in ["name", "schema", "strict", "description"] {
                    if let Some(v) = format.get(key) {
                        spec.insert(key.into(), v.clone());
                    }
                }
                json!({"type": "json_schema", "json_schema": spec})
            }
            _ => format.clone(),
        };
        chat.insert("response_format".into(), format);
    }
    Ok(Value::Object(chat))
}

/// Responses function tools (`{"type": "function", "name", "description", "parameters"}`) in
/// chat's shape (the function in a `function` object); other tool types are refused.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(ApiError::invalid_param(
            "tools",
            "tools must be a list of function tools.",
        ));
    };
    list.iter()
        .map(|t| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::unsupported_param(
                    "tools",
                    "Only tools of type `function` are supported.",
                ));
            }
            let mut function = Map::new();
            for key in ["name", "description", "parameters"] {
                if let Some(v) = t.get(key) {
                    function.insert(key.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// The `text.format` a response echoes.
pub fn format_of(body: &Map<String, Value>) -> Value {
    body.get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "text"}))
}

/// A response's usage object.
pub fn usage(input: u64, output: u64) -> Value {
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
           "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
           "total_tokens": input + output})
}

/// The assistant message item of a response's `output`.
pub fn message_item(id: &str, text: &str, done: bool) -> Value {
    let content = if done {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({"type": "message", "id": id, "status": if done { "completed" } else { "in_progress" },
           "role": "assistant", "content": content})
}

/// A `function_call` item of a response's `output`.
pub fn function_call_item(call: &super::tools::Call) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", &call.id["call_".len()..]), "call_id": call.id,
           "name": call.name, "arguments": call.arguments, "status": "completed"})
}

/// What a response echoes of its request and its own identity.
pub struct Echo {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The model name asked for.
    pub model: String,
    /// `instructions`, as given.
    pub instructions: Value,
    /// `text.format`, as given (or `text`).
    pub format: Value,
    /// `max_output_tokens`, as given.
    pub max_output_tokens: Value,
    /// `temperature`, as given.
    pub temperature: Value,
    /// `top_p`, as given.
    pub top_p: Value,
    /// `metadata`, as given.
    pub metadata: Value,
    /// `tools`, as given (or `[]`).
    pub tools: Value,
    /// `tool_choice`, as given (or `auto`).
    pub tool_choice: Value,
}

impl Echo {
    /// The response object: `status` `in_progress`, `completed` or `incomplete` (the token budget
    /// ran out), with its output items and usage once known.
    pub fn object(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
        json!({"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
               "error": null, "incomplete_details": incomplete, "instructions": self.instructions,
               "max_output_tokens": self.max_output_tokens, "model": self.model, "output": output,
               "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
               "store": false, "temperature": self.temperature, "text": {"format": self.format},
               "tool_choice": self.tool_choice, "tools": self.tools, "top_p": self.top_p, "truncation": "disabled",
               "usage": usage, "user": null, "metadata": self.metadata})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, ApiError> {
        to_chat(body.as_object().expect("object"))
    }

    #[test]
    fn a_request_becomes_the_chat_completion_it_means() {
        let c = chat(json!({"model": "m", "instructions": "Be brief.", "input": "Hi", "max_output_tokens": 9,
            "text": {"format": {"type": "json_schema", "name": "x", "strict": true, "schema": {"type": "object"}}},
            "store": false, "metadata": {"k": "v"}, "tools": []}))
        .unwrap();
        assert_eq!(
            c["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        );
        assert_eq!(c["max_completion_tokens"], 9);
        assert_eq!(c["response_format"]["json_schema"]["name"], "x");
        assert_eq!(c["response_format"]["json_schema"]["strict"], true);
        let c = chat(json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "c"}]}]}))
        .unwrap();
        assert_eq!(c["messages"][0]["content"], "ab");
        assert_eq!(c["messages"][1]["role"], "assistant");
    }

    #[test]
    fn stateful_or_unknown_parameters_are_refused_by_name() {
        for (key, value) in [
            ("previous_response_id", json!("resp_1")),
            ("store", json!(true)),
            ("background", json!(true)),
            ("tools", json!([{"type": "web_search"}])),
            ("tools", json!([{"type": "file_search"}])),
        ] {
            let e = chat(json!({"model": "m", "input": "x", key: value})).unwrap_err();
            assert_eq!(e.code, "unsupported_parameter", "{key}");
            assert_eq!(e.param, Some(key));
        }
        let e = chat(json!({"model": "m", "input": "x", "temprature": 1})).unwrap_err();
        assert_eq!(e.code, "unknown_parameter");
        let e = chat(json!({"model": "m", "input": 3})).unwrap_err();
        assert_eq!(e.param, Some("input"));
        let e = chat(json!({"model": "m", "input": [{"type": "reasoning"}]})).unwrap_err();
        assert_eq!(e.param, Some("input"));
    }

    #[test]
    fn function_tools_and_call_items_become_chat_tools_and_messages() {
        let c = chat(json!({"model": "m", "tools": [{"type": "function", "name": "f", "description": "d",
                "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
            "input": [{"role": "user", "content": "go"},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "f", "arguments": "{\"a\": 1}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]}))
        .unwrap();
        assert_eq!(
            c["tools"],
            json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            c["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(c["parallel_tool_calls"], false);
        let m = &c["messages"];
        assert_eq!(m[1]["role"], "assistant");
        assert_eq!(m[1]["tool_calls"][1]["function"]["arguments"], "{\"a\": 1}");
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "call_1", "content": "ok"})
        );
    }
}
