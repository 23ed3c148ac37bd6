//! Function calling (<https://platform.openai.com/docs/guides/function-calling>): `tools`,
//! `tool_choice` and `parallel_tool_calls` become the functions the template lists and a
//! [`Grammar::ToolCalls`] in the sampling rule, so the calls are constrained (each name one of
//! the functions, its arguments valid under the function's schema), committed to and replayed by
//! verifiers like any grammar. The hub turns the committed text back into `tool_calls`.
//!
//! The wire format is Qwen2.5's (Hermes'): `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>`,
//! calls separated by a newline, in the grammar's fixed JSON layout. `tool_choice: "none"` lists
//! no tools and constrains nothing (the model cannot call what it is not told of); `auto` lets the
//! output be text or calls (the first tokens decide); `required` and a named function force calls
//! (a named function: exactly one call of it). An output that is not wholly well-formed calls (cut
//! by `max_tokens` or a stop string) is returned as text, with no `tool_calls`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tessera_types::{Grammar, Tool};

use super::params::{depth, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH};
use crate::error::ApiError;

/// Most functions a request may list.
pub const MAX_TOOLS: usize = 32;
/// Largest total of the functions' schemas, bytes of compact JSON (the engine's grammar limit).
pub const MAX_FUNCTIONS_BYTES: usize = 64 * 1024;

const OPEN: &str = "<tool_call>\n{\"name\": \"";
const MID: &str = "\", \"arguments\": ";
const CLOSE: &str = "\n</tool_call>";
const SEPARATOR: &str = "\n";

fn bad_tools(message: impl Into<String>) -> ApiError {
    ApiError::invalid_param("tools", message)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The functions the template lists and the grammar the output follows, from a chat request's
/// `tools`, `tool_choice` and `parallel_tool_calls`; every refusal is a 400 naming the parameter,
/// before anything is admitted or charged.
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<(Vec<Tool>, Option<Grammar>), ApiError> {
    let choice = choice.filter(|c| !c.is_null());
    let listed = match tools.filter(|t| !t.is_null()) {
        None => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad_tools("tools must be a list of function tools.")),
    };
    if listed.is_empty() {
        if choice.is_some_and(|c| c.as_str() != Some("none")) {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "tool_choice is only allowed when tools are specified.",
            ));
        }
        return Ok((Vec::new(), None));
    }
    if listed.len() > MAX_TOOLS {
        return Err(bad_tools(format!(
            "At most {MAX_TOOLS} tools are accepted; {} were given.",
            listed.len()
        )));
    }
    let mut functions = Vec::with_capacity(listed.len());
    let mut schemas = Vec::with_capacity(listed.len());
    for tool in listed {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::unsupported_param(
                "tools",
                "Only tools of type `function` are supported.",
            ));
        }
        let Some(f) = tool.get("function").and_then(Value::as_object) else {
            return Err(bad_tools(
                "A function tool needs a `function` object with a `name`.",
            ));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(bad_tools(
                "A function's name must be 1 to 64 letters, digits, `_` or `-`.",
            ));
        }
        if functions.iter().any(|t: &Tool| t.name == name) {
            return Err(bad_tools(format!("The function `{name}` is listed twice.")));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(bad_tools("A function's description must be a string.")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad_schema(format!(
                    "The parameters of `{name}` must be a JSON Schema object."
                )))
            }
        };
        let text = parameters.to_string();
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(bad_schema(format!(
                "The parameters of `{name}` have {} bytes; at most {MAX_SCHEMA_BYTES} are accepted.",
                text.len()
            )));
        }
        if depth(&parameters) > MAX_SCHEMA_DEPTH {
            return Err(bad_schema(format!(
                "The parameters of `{name}` nest deeper than {MAX_SCHEMA_DEPTH} levels."
            )));
        }
        if let Err(e) = jsonschema::meta::validate(&parameters) {
            return Err(bad_schema(format!(
                "The parameters of `{name}` are not a valid JSON Schema: {e}"
            )));
        }
        schemas.push(json!({"name": name, "parameters": parameters}));
        functions.push(Tool {
            name: name.to_owned(),
            description,
            parameters: text,
        });
    }
    let (required, parallel, callable) = match choice {
        None => (false, parallel.unwrap_or(true), schemas),
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok((Vec::new(), None)),
            "auto" => (false, parallel.unwrap_or(true), schemas),
            "required" => (true, parallel.unwrap_or(true), schemas),
            _ => return Err(bad_choice()),
        },
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad_choice)?;
            let Some(one) = schemas.into_iter().find(|s| s["name"] == name) else {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("tool_choice names the function `{name}`, which is not in tools."),
                ));
            };
            (true, false, vec![one])
        }
        Some(_) => return Err(bad_choice()),
    };
    let functions_text = Value::Array(callable).to_string();
    if functions_text.len() > MAX_FUNCTIONS_BYTES {
        return Err(bad_tools(format!(
            "The tools' schemas total {} bytes; at most {MAX_FUNCTIONS_BYTES} are accepted.",
            functions_text.len()
        )));
    }
    let grammar = Grammar::ToolCalls {
        functions: functions_text,
        required,
        parallel,
    };
    Ok((functions, Some(grammar)))
}

fn bad_schema(message: String) -> ApiError {
    ApiError {
        param: Some("tools"),
        ..ApiError::invalid("invalid_json_schema", message)
    }
}

fn bad_choice() -> ApiError {
    ApiError::invalid_param(
        "tool_choice",
        "tool_choice must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}.",
    )
}

/// The id of a job's `index`-th call: `call_` and 24 hex digits of the job key's hash, so a
/// retried read of one job names its calls the same.
pub fn call_id(job: &str, index: usize) -> String {
    let digest = Sha256::digest(format!("{job}/{index}"));
    format!("call_{}", &hex::encode(digest)[..24])
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `call_…`.
    pub id: String,
    /// The function.
    pub name: String,
    /// The arguments, as the JSON text the model wrote.
    pub arguments: String,
}

impl Call {
    /// The chat completion's `tool_calls` entry.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// What a piece of output text adds to a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Message text.
    Text(String),
    /// A call begins: its index, id and function name (arguments follow).
    Open {
        /// Position among the calls.
        index: usize,
        /// `call_…`.
        id: String,
        /// The function.
        name: String,
    },
    /// More of a call's arguments.
    Arguments {
        /// Position among the calls.
        index: usize,
        /// The next characters of the arguments' JSON text.
        fragment: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything is known: the output may still open a call.
    Start,
    /// Plain text (or output that stopped being well-formed calls).
    Text,
    /// Inside a call's name.
    Name,
    /// Inside a call's arguments, which begin at this offset.
    Arguments(usize),
    /// After a complete call.
    Between,
}

/// Turns output text, as it arrives, into text or call deltas (the wire format of the module
/// docs). Text that could still open a call is held back until it cannot.
#[derive(Debug)]
pub struct CallStream {
    job: String,
    text: String,
    at: usize,
    state: State,
    calls: Vec<Call>,
    emitted: usize,
    broken: bool,
}

impl CallStream {
    /// A parser for job `job`'s output (its key names the calls).
    pub fn new(job: &str) -> Self {
        Self {
            job: job.to_owned(),
            text: String::new(),
            at: 0,
            state: State::Start,
            calls: Vec::new(),
            emitted: 0,
            broken: false,
        }
    }

    fn diverge(&mut self, out: &mut Vec<Delta>) {
        self.broken |= self.state != State::Start;
        self.state = State::Text;
        let rest = self.text[self.at..].to_owned();
        self.at = self.text.len();
        if !rest.is_empty() {
            out.push(Delta::Text(rest));
        }
    }

    /// Adds output text; returns what may be sent now.
    pub fn push(&mut self, piece: &str) -> Vec<Delta> {
        self.text.push_str(piece);
        let mut out = Vec::new();
        loop {
            let rest = &self.text[self.at..];
            match self.state {
                State::Text => {
                    if !rest.is_empty() {
                        out.push(Delta::Text(rest.to_owned()));
                        self.at = self.text.len();
                    }
                    return out;
                }
                State::Start | State::Between => {
                    let open = if self.state == State::Start {
                        OPEN.to_owned()
                    } else {
                        format!("{SEPARATOR}{OPEN}")
                    };
                    if rest.starts_with(&open) {
                        self.at += open.len();
                        self.state = State::Name;
                    } else if open.starts_with(rest) {
                        return out;
                    } else {
                        self.diverge(&mut out);
                    }
                }
                State::Name => {
                    let Some(end) = rest.find('"') else {
                        if rest
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                        {
                            return out;
                        }
                        self.diverge(&mut out);
                        continue;
                    };
                    let name = &rest[..end];
                    let after = &rest[end + 1..];
                    let mid = &MID[1..];
                    if !valid_name(name) || !(after.starts_with(mid) || mid.starts_with(after)) {
                        self.diverge(&mut out);
                        continue;
                    }
                    if !after.starts_with(mid) {
                        return out;
                    }
                    let index = self.calls.len();
                    let call = Call {
                        id: call_id(&self.job, index),
                        name: name.to_owned(),
                        arguments: String::new(),
                    };
                    out.push(Delta::Open {
                        index,
                        id: call.id.clone(),
                        name: call.name.clone(),
                    });
                    self.calls.push(call);
                    self.at += end + MID.len();
                    self.emitted = self.at;
                    self.state = State::Arguments(self.at);
                }
                State::Arguments(start) => {
                    let index = self.calls.len() - 1;
                    // The fixed layout has no raw newline inside JSON: the first one ends the
                    // arguments (and the `}` before it closes the call's object).
                    match self.text[start..].find('\n') {
                        None => {
                            // Hold back the last character: it may be the call's closing `}`.
                            let end = self.text[self.emitted..]
                                .char_indices()
                                .last()
                                .map_or(self.emitted, |(i, _)| self.emitted + i);
                            if end > self.emitted {
                                out.push(Delta::Arguments {
                                    index,
                                    fragment: self.text[self.emitted..end].to_owned(),
                                });
                                self.emitted = end;
                            }
                            return out;
                        }
                        Some(newline) => {
                            let newline = start + newline;
                            let tail = &self.text[newline..];
                            if !(tail.starts_with(CLOSE) || CLOSE.starts_with(tail)) {
                                self.at = self.emitted;
                                self.state = State::Text;
                                self.broken = true;
                                continue;
                            }
                            if !tail.starts_with(CLOSE) {
                                return out;
                            }
                            if !self.text[..newline].ends_with('}') || newline - 1 < start {
                                self.at = self.emitted;
                                self.state = State::Text;
                                self.broken = true;
                                continue;
                            }
                            let end = newline - 1;
                            if end > self.emitted {
                                out.push(Delta::Arguments {
                                    index,
                                    fragment: self.text[self.emitted..end].to_owned(),
                                });
                            }
                            self.calls[index].arguments = self.text[start..end].to_owned();
                            self.at = newline + CLOSE.len();
                            self.state = State::Between;
                        }
                    }
                }
            }
        }
    }

    /// Ends the output: the calls, when it was wholly well-formed calls (each with arguments
    /// that parse as JSON), and the held-back text to send otherwise.
    pub fn finish(&mut self) -> (Vec<Delta>, Option<Vec<Call>>) {
        let complete = self.state == State::Between
            && !self.broken
            && self
                .calls
                .iter()
                .all(|c| serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object()));
        if complete {
            return (Vec::new(), Some(std::mem::take(&mut self.calls)));
        }
        let mut out = Vec::new();
        match self.state {
            State::Arguments(_) if self.emitted < self.text.len() => {
                out.push(Delta::Arguments {
                    index: self.calls.len() - 1,
                    fragment: self.text[self.emitted..].to_owned(),
                });
            }
            State::Arguments(_) => {}
            _ if self.at < self.text.len() => {
                out.push(Delta::Text(self.text[self.at..].to_owned()))
            }
            _ => {}
        }
        (out, None)
    }
}

/// The calls of a whole output, or `None` when it is not wholly well-formed calls.
pub fn parse_output(job: &str, text: &str) -> Option<Vec<Call>> {
    let mut stream = CallStream::new(job);
    stream.push(text);
    stream.finish().1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}])
    }

    #[test]
    fn tool_choices_become_grammars() {
        let (tools, g) = parse(Some(&weather()), None, None).unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0].description.as_deref(), Some("Weather in a city"));
        let Some(Grammar::ToolCalls {
            functions,
            required: false,
            parallel: true,
        }) = g
        else {
            panic!("auto: {g:?}")
        };
        assert!(functions.contains("get_time"), "{functions}");
        let (_, g) = parse(Some(&weather()), Some(&json!("required")), Some(false)).unwrap();
        assert!(matches!(
            g,
            Some(Grammar::ToolCalls {
                required: true,
                parallel: false,
                ..
            })
        ));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let (tools, g) = parse(Some(&weather()), Some(&named), None).unwrap();
        assert_eq!(tools.len(), 2, "every tool is still listed");
        let Some(Grammar::ToolCalls {
            functions,
            required: true,
            parallel: false,
        }) = g
        else {
            panic!("named: {g:?}")
        };
        assert!(!functions.contains("get_time"), "{functions}");
        let (tools, g) = parse(Some(&weather()), Some(&json!("none")), None).unwrap();
        assert!(tools.is_empty() && g.is_none());
        assert_eq!(parse(None, Some(&json!("none")), None).unwrap().1, None);
    }

    #[test]
    fn bad_tools_are_400s_naming_the_parameter() {
        let many: Vec<Value> = (0..MAX_TOOLS + 1)
            .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
            .collect();
        let mut deep = json!({"type": "string"});
        for _ in 0..30 {
            deep = json!({"type": "array", "items": deep});
        }
        let f =
            |p: Value| json!([{"type": "function", "function": {"name": "f", "parameters": p}}]);
        for (tools, choice, param) in [
            (json!(many), None, "tools"),
            (json!([{"type": "web_search"}]), None, "tools"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "tools",
            ),
            (f(json!("object")), None, "tools"),
            (f(json!({"type": 5})), None, "tools"),
            (f(deep), None, "tools"),
            (
                f(json!({"description": "x".repeat(MAX_SCHEMA_BYTES)})),
                None,
                "tools",
            ),
            (
                weather(),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
                "tool_choice",
            ),
            (weather(), Some(json!("sometimes")), "tool_choice"),
            (json!([]), Some(json!("required")), "tool_choice"),
        ] {
            let e = parse(Some(&tools), choice.as_ref(), None).expect_err(param);
            assert_eq!(e.param, Some(param), "{}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn calls_are_parsed_whole_or_not_at_all() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let calls = parse_output("j", one).expect("one call");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city": "Paris"}"#);
        assert_eq!(calls[0].id, call_id("j", 0));
        assert!(calls[0].id.starts_with("call_"));
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>"
        );
        let calls = parse_output("j", &two).expect("two calls");
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("get_time", "{}")
        );
        // Malformed: cut short, trailing text, plain text, arguments that are not an object.
        for bad in [
            &one[..one.len() - 3],
            &format!("{one} and more"),
            "The weather is fine.",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": 3}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [}\n</tool_call>",
        ] {
            assert_eq!(parse_output("j", bad), None, "{bad}");
        }
    }

    #[test]
    fn streamed_calls_arrive_as_openai_deltas() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        for step in [1, 3, 7, text.len()] {
            let mut s = CallStream::new("j");
            let mut deltas = Vec::new();
            let bytes: Vec<char> = text.chars().collect();
            for piece in bytes.chunks(step) {
                deltas.extend(s.push(&piece.iter().collect::<String>()));
            }
            let (rest, calls) = s.finish();
            assert!(rest.is_empty());
            assert_eq!(calls.map(|c| c.len()), Some(1));
            assert_eq!(
                deltas[0],
                Delta::Open {
                    index: 0,
                    id: call_id("j", 0),
                    name: "get_weather".into()
                }
            );
            let arguments: String = deltas[1..]
                .iter()
                .map(|d| match d {
                    Delta::Arguments { index: 0, fragment } => fragment.as_str(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(arguments, r#"{"city": "Paris"}"#, "step {step}");
        }
        // Text is held back only while it could still open a call.
        let mut s = CallStream::new("j");
        assert_eq!(s.push("<tool"), vec![]);
        assert_eq!(s.push("s> are"), vec![Delta::Text("<tools> are".into())]);
        assert_eq!(s.push(" fun"), vec![Delta::Text(" fun".into())]);
        assert_eq!(s.finish(), (vec![], None));
        let mut s = CallStream::new("j");
        assert_eq!(s.push("<tool_"), vec![]);
        assert_eq!(s.finish(), (vec![Delta::Text("<tool_".into())], None));
    }
}
