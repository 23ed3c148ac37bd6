//! Chat templates, chosen from the GGUF's `tokenizer.chat_template`.
//!
//! Rather than run Jinja, the two template families these models use are rendered directly, matching
//! the shipped templates: ChatML (SmolLM2: a default system prompt when none is given) and Gemma's
//! turns (the system prompt is folded into the first user turn; the assistant's role is `model`).

pub use tessera_types::{Message, Role};

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
        let mut out = Vec::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if messages.first().map(|m| m.role) != Some(Role::System) {
                    if let Some(sys) = default_system {
                        out.push(Segment::Markup(format!(
                            "<|im_start|>system\n{sys}<|im_end|>\n"
                        )));
                    }
                }
                for m in messages {
                    let role = match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    out.push(Segment::Markup(format!("<|im_start|>{role}\n")));
                    out.push(Segment::Content(m.content.clone()));
                    out.push(Segment::Markup("<|im_end|>\n".into()));
                }
                out.push(Segment::Markup("<|im_start|>assistant\n".into()));
            }
            ChatTemplate::Gemma => {
                out.push(Segment::Markup("<bos>".into()));
                let mut system: Option<&str> = None;
                let mut first_user = true;
                for m in messages {
                    match m.role {
                        Role::System => system = Some(&m.content),
                        Role::User | Role::Assistant => {
                            let role = if m.role == Role::User {
                                "user"
                            } else {
                                "model"
                            };
                            out.push(Segment::Markup(format!("<start_of_turn>{role}\n")));
                            if m.role == Role::User && first_user {
                                if let Some(sys) = system.take() {
                                    out.push(Segment::Content(format!("{sys}\n\n")));
                                }
                                first_user = false;
                            }
                            out.push(Segment::Content(m.content.clone()));
                            out.push(Segment::Markup("<end_of_turn>\n".into()));
                        }
                    }
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
