//! Synthetic datasets over a Tessera hub. A TOML [`Spec`] names the model, prompt templates
//! with variables, the rows wanted, sampling, filters (length, pattern, JSON Schema, a checker
//! command), deduplication, a spending cap and concurrency; [`run`] fans the rows out through
//! the hub's public API with the agent SDK, judges and stores each one content-addressed (so a
//! re-run never pays twice), and [`output::write_dataset`] writes JSONL, Parquet, a manifest
//! and a Hugging Face dataset card with every row's provenance.
#![deny(missing_docs)]

pub mod budget;
pub mod dedup;
mod error;
pub mod filter;
pub mod output;
pub mod plan;
pub mod run;
pub mod schema;
pub mod spec;
pub mod store;
pub mod template;

pub use error::{Error, Result};
pub use run::{run, Ending, Observer, Progress, Quiet, Report};
pub use spec::Spec;
