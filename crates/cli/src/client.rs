//! The calls to a hub's HTTP API that several commands make live in the agent SDK.

pub use tessera_agent::{domain, http, register_key};
