use tessera_engine::*;
fn main() -> anyhow::Result<()> {
    let e = Engine::load("smollm2-135m", None)?;
    let p = e.chat_prompt(&[Message::new(Role::User, "What is the capital of France?")]);
    let s = e.score(&p)?;
    let v = e.vocab_size();
    let r = &s[(p.len()-1)*v..];
    let mut ids: Vec<usize> = (0..v).collect();
    ids.sort_by(|a,b| r[*b].total_cmp(&r[*a]));
    for i in &ids[..4] { println!("{:>8} {:?} {:.4}", i, e.tokenizer().token_str(*i as u32).unwrap(), r[*i]); }
    Ok(())
}
