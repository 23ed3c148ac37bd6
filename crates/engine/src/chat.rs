//! Chat templates, chosen from the GGUF's `tokenizer.chat_template`.
//!
//! Rather than run Jinja, the two template families these models use are rendered directly, matching
//! the shipped templates: ChatML (SmolLM2: a default system prompt when none is given) and Gemma's
//! turns (the system prompt is folded into the first user turn; the assistant's role is `model`).
//!
//! Tools (OpenAI's function calling) are rendered as Qwen2.5's template renders them (the Hermes
//! format): the functions' JSON inside `<tools></tools>` in the system turn, the model's calls as
//! `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`, and results as `<tool_response>`
//! blocks in a user turn. Templates without a tool format (SmolLM2, Gemma) get the same text as
//! their generic rendering: it is plain instructions any instruction-tuned model can follow, and
//! one wire format lets one grammar ([`crate::grammar`]) and one parser serve every model.

pub use tessera_types::{Message, Role, Tool, ToolCall};

/// A template family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n...<|im_end|>\n`, with the model's default system prompt.
    ChatMl {
        /// Used when the conversation has no system message.
        default_system: Option<String>,
    },
    /// `<start_of_turn>user\n...<end_of_turn>\n`, BOS first.
    Gemma,
}

/// One piece of a rendered prompt: template text (may contain special tokens) or message content
/// (never parsed for special tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Template markup.
    Markup(String),
    /// User-supplied content.
    Content(String),
}

impl ChatTemplate {
    /// Picks the family from the GGUF template text.
    pub fn detect(template: Option<&str>, architecture: &str) -> Self {
        let t = template.unwrap_or_default();
        if t.contains("<start_of_turn>") || (t.is_empty() && architecture.starts_with("gemma")) {
            return ChatTemplate::Gemma;
        }
        // SmolLM2's and Qwen2's templates insert a fixed system prompt when the first message is not
        // a system one. Qwen's also opens a system turn with the caller's own text (template code
        // follows it) and one for tool use, so the first literal one is the default.
        // Inside the template's string literals a newline is written `\n` (Qwen) or as itself (SmolLM2).
        let t = t.replace("\\n", "\n");
        let default_system = t
            .split("<|im_start|>system\n")
            .skip(1)
            .filter_map(|rest| rest.split("<|im_end|>").next())
            .find(|s| {
                !s.is_empty()
                    && ["{{", "{%", "' +", "+ '"]
                        .iter()
                        .all(|code| !s.contains(code))
            })
            .map(str::to_owned);
        ChatTemplate::ChatMl { default_system }
    }

    /// Renders a conversation, ending with the opening of the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Vec<Segment> {
        self.render_with_tools(messages, &[])
    }

    /// Renders a conversation in which the model may call `tools` (none: as [`Self::render`]).
    pub fn render_with_tools(&self, messages: &[Message], tools: &[Tool]) -> Vec<Segment> {
        let mut out = Vec::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let mut rest = messages;
                if !tools.is_empty() {
                    // Qwen's template: the caller's system prompt (or the default) heads the
                    // system turn that lists the tools.
                    out.push(Segment::Markup("<|im_start|>system\n".into()));
                    let system = match messages.first() {
                        Some(m) if m.role == Role::System => {
                            rest = &messages[1..];
                            Some(m.content.clone())
                        }
                        _ => default_system.clone(),
                    };
                    if let Some(system) = system {
                        out.push(Segment::Content(system));
                        out.push(Segment::Markup("\n\n".into()));
                    }
                    out.extend(tools_section(tools));
                    out.push(Segment::Markup("<|im_end|>\n".into()));
                } else if messages.first().map(|m| m.role) != Some(Role::System) {
                    if let Some(sys) = default_system {
                        out.push(Segment::Markup(format!(
                            "<|im_start|>system\n{sys}<|im_end|>\n"
                        )));
                    }
                }
                for (i, m) in rest.iter().enumerate() {
                    let tool = |j: usize| rest.get(j).is_some_and(|m| m.role == Role::Tool);
                    match m.role {
                        Role::Tool => {
                            if i == 0 || !tool(i - 1) {
                                out.push(Segment::Markup("<|im_start|>user".into()));
                            }
                            out.extend(tool_response(&m.content));
                            if !tool(i + 1) {
                                out.push(Segment::Markup("<|im_end|>\n".into()));
                            }
                        }
                        Role::Assistant if !m.tool_calls.is_empty() => {
                            out.push(Segment::Markup("<|im_start|>assistant".into()));
                            if !m.content.is_empty() {
                                out.push(Segment::Markup("\n".into()));
                                out.push(Segment::Content(m.content.clone()));
                            }
                            out.extend(calls(&m.tool_calls));
                            out.push(Segment::Markup("<|im_end|>\n".into()));
                        }
                        _ => {
                            let role = match m.role {
                                Role::System => "system",
                                Role::User | Role::Tool => "user",
                                Role::Assistant => "assistant",
                            };
                            out.push(Segment::Markup(format!("<|im_start|>{role}\n")));
                            out.push(Segment::Content(m.content.clone()));
                            out.push(Segment::Markup("<|im_end|>\n".into()));
                        }
                    }
                }
                out.push(Segment::Markup("<|im_start|>assistant\n".into()));
            }
            ChatTemplate::Gemma => {
                out.push(Segment::Markup("<bos>".into()));
                let mut system: Option<&str> = None;
                let mut first_user = true;
                for m in messages {
                    if m.role == Role::System {
                        system = Some(&m.content);
                        continue;
                    }
                    let role = if m.role == Role::Assistant {
                        "model"
                    } else {
                        "user"
                    };
                    out.push(Segment::Markup(format!("<start_of_turn>{role}\n")));
                    if m.role != Role::Assistant && first_user {
                        if let Some(sys) = system.take() {
                            out.push(Segment::Content(format!("{sys}\n\n")));
                        }
                        if !tools.is_empty() {
                            out.extend(tools_section(tools));
                            out.push(Segment::Markup("\n\n".into()));
                        }
                        first_user = false;
                    }
                    match m.role {
                        Role::Tool => out.extend(tool_response(&m.content)),
                        _ => out.push(Segment::Content(m.content.clone())),
                    }
                    out.extend(calls(&m.tool_calls));
                    out.push(Segment::Markup("<end_of_turn>\n".into()));
                }
                out.push(Segment::Markup("<start_of_turn>model\n".into()));
            }
        }
        out
    }

    /// The token text that ends an assistant turn.
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => "<|im_end|>",
            ChatTemplate::Gemma => "<end_of_turn>",
        }
    }
}

/// The tool list and calling instructions, as Qwen2.5's template words them.
fn tools_section(tools: &[Tool]) -> Vec<Segment> {
    let mut out = vec![Segment::Markup(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            .into(),
    )];
    let string = |s: &str| python_json(&serde_json::Value::String(s.to_owned()));
    for tool in tools {
        // The keys in OpenAI's order, as the caller's `tools` list has them.
        let description = tool
            .description
            .as_deref()
            .map(|d| format!(", \"description\": {}", string(d)))
            .unwrap_or_default();
        let parameters = serde_json::from_str(&tool.parameters)
            .map_or_else(|_| string(&tool.parameters), |v| python_json(&v));
        out.push(Segment::Markup("\n".into()));
        out.push(Segment::Content(format!(
            "{{\"type\": \"function\", \"function\": {{\"name\": {}{description}, \"parameters\": {parameters}}}}}",
            string(&tool.name)
        )));
    }
    out.push(Segment::Markup(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
            .into(),
    ));
    out
}

/// An assistant turn's calls, each `\n<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
fn calls(calls: &[ToolCall]) -> Vec<Segment> {
    let mut out = Vec::new();
    for call in calls {
        out.push(Segment::Markup("\n<tool_call>\n{\"name\": \"".into()));
        out.push(Segment::Content(call.name.clone()));
        out.push(Segment::Markup("\", \"arguments\": ".into()));
        // OpenAI sends arguments as JSON text; the template renders them as JSON (`tojson`).
        let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
            .map_or_else(|_| call.arguments.clone(), |v| python_json(&v));
        out.push(Segment::Content(arguments));
        out.push(Segment::Markup("}\n</tool_call>".into()));
    }
    out
}

/// A function's result: `\n<tool_response>\n…\n</tool_response>`.
fn tool_response(content: &str) -> [Segment; 3] {
    [
        Segment::Markup("\n<tool_response>\n".into()),
        Segment::Content(content.to_owned()),
        Segment::Markup("\n</tool_response>".into()),
    ]
}

/// JSON as Jinja's `tojson` (Python's `json.dumps`) writes it: `", "` and `": "` separators.
pub fn python_json(value: &serde_json::Value) -> String {
    struct Python;
    impl serde_json::ser::Formatter for Python {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.begin_array_value(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Python);
    serde::Serialize::serialize(value, &mut ser).expect("a JSON value serializes");
    String::from_utf8(out).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_adds_the_default_system_prompt() {
        let tpl = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}";
        let t = ChatTemplate::detect(Some(tpl), "llama");
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: Some("You are helpful".into())
            }
        );
        let segs = t.render(&[Message::new(Role::User, "Hi")]);
        let text: String = segs
            .iter()
            .map(|s| match s {
                Segment::Markup(x) | Segment::Content(x) => x.as_str(),
            })
            .collect();
        assert_eq!(text, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn chatml_finds_qwens_default_system_prompt_after_its_template_code() {
        let tpl = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\
                   {%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}";
        let t = ChatTemplate::detect(Some(tpl), "qwen2");
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: Some(
                    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into()
                )
            }
        );
    }

    fn text(segs: &[Segment]) -> String {
        segs.iter()
            .map(|s| match s {
                Segment::Markup(x) | Segment::Content(x) => x.as_str(),
            })
            .collect()
    }

    fn tool_conversation() -> (Vec<Message>, Vec<Tool>) {
        let tools = vec![Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: r#"{"properties":{"city":{"type":"string"}},"type":"object"}"#.into(),
        }];
        let mut call = Message::new(Role::Assistant, "");
        call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }];
        let mut result = Message::new(Role::Tool, "sunny");
        result.tool_call_id = Some("call_1".into());
        let messages = vec![Message::new(Role::User, "Weather in Paris?"), call, result];
        (messages, tools)
    }

    /// The text Qwen2.5's shipped Jinja template renders for this conversation (by hand from the
    /// GGUF's `tokenizer.chat_template`).
    #[test]
    fn chatml_renders_tools_calls_and_results_as_qwens_template() {
        let t = ChatTemplate::ChatMl {
            default_system: Some("You are Qwen.".into()),
        };
        let (messages, tools) = tool_conversation();
        let expected = "<|im_start|>system\nYou are Qwen.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
            You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
            {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"type\": \"object\"}}}\n\
            </tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
            <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
            <|im_start|>user\nWeather in Paris?<|im_end|>\n\
            <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
            <|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(text(&t.render_with_tools(&messages, &tools)), expected);
        // The caller's system prompt replaces the default; without tools nothing changes.
        let mut with_system = vec![Message::new(Role::System, "Be brief.")];
        with_system.extend(messages.clone());
        let rendered = text(&t.render_with_tools(&with_system, &tools));
        assert!(
            rendered.starts_with("<|im_start|>system\nBe brief.\n\n# Tools"),
            "{rendered}"
        );
        assert_eq!(rendered.matches("<|im_start|>system").count(), 1);
        let plain = [Message::new(Role::User, "Hi")];
        assert_eq!(t.render_with_tools(&plain, &[]), t.render(&plain));
    }

    #[test]
    fn gemma_renders_tools_in_the_first_user_turn() {
        let t = ChatTemplate::Gemma;
        let (messages, tools) = tool_conversation();
        let rendered = text(&t.render_with_tools(&messages, &tools));
        assert!(
            rendered.starts_with("<bos><start_of_turn>user\n# Tools\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains("</tool_call>\n\nWeather in Paris?<end_of_turn>"),
            "{rendered}"
        );
        assert!(rendered.contains("<start_of_turn>model\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><end_of_turn>"), "{rendered}");
        assert!(rendered.ends_with("<start_of_turn>user\n\n<tool_response>\nsunny\n</tool_response><end_of_turn>\n<start_of_turn>model\n"), "{rendered}");
    }

    #[test]
    fn gemma_folds_the_system_prompt_into_the_first_turn() {
        let t = ChatTemplate::detect(Some("<start_of_turn>"), "gemma3");
        let segs = t.render(&[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
        ]);
        let text: String = segs
            .iter()
            .map(|s| match s {
                Segment::Markup(x) | Segment::Content(x) => x.as_str(),
            })
            .collect();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
