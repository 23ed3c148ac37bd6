use tessera_engine::*;
fn main() -> anyhow::Result<()> {
    let e = Engine::load("gemma3-270m", None)?;
    for text in ["The capital of France is", "1, 2, 3, 4, 5,", "def fibonacci(n):", "The Eiffel Tower is located in the city of"] {
        let p = e.completion_prompt(text);
        let g = e.generate(&p, &GenerateOptions { max_tokens: 24, ..Default::default() }, |_| true)?;
        println!("{text:?} -> {:?}", g.text);
    }
    Ok(())
}
