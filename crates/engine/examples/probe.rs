use tessera_engine::*;
fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or("smollm2-135m".into());
    let e = Engine::load(&name, None)?;
    let o = GenerateOptions { max_tokens: 30, ..Default::default() };
    for text in ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                 "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                 "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. The capital of Spain is"] {
        let p = e.tokenizer().encode_with_special(text);
        let g = e.generate(&p, &o, |_| true)?;
        println!("{} tokens -> {:?}", p.len(), g.text);
        // incremental vs scored
        let mut all = p.clone(); all.extend(&g.tokens);
        let s = e.score(&all)?;
        let v = e.vocab_size();
        let am: Vec<u32> = (p.len()-1..all.len()-1).map(|i| { let r=&s[i*v..(i+1)*v]; (0..v).max_by(|a,b| r[*a].total_cmp(&r[*b])).unwrap() as u32}).collect();
        println!("   scored argmax agrees: {}", am[..g.tokens.len()] == g.tokens[..]);
    }
    Ok(())
}
