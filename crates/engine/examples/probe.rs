//! Quick manual check: chat answer and incremental-vs-scored agreement for a model.
use tessera_engine::*;
fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or("smollm2-135m".into());
    let e = Engine::load(&name, None)?;
    let o = GenerateOptions {
        max_tokens: 40,
        ..Default::default()
    };
    for q in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
    ] {
        let p = e.chat_prompt(&[Message::new(Role::User, q)]);
        println!(
            "{:?}",
            p.iter()
                .take(12)
                .map(|t| e.tokenizer().token_str(*t).unwrap())
                .collect::<Vec<_>>()
        );
        let g = e.generate(&p, &o, |_| true)?;
        println!("{} tokens -> {:?}", p.len(), g.text);
    }
    Ok(())
}
