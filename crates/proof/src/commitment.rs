//! The inference commitment (defined in `tessera-types`, shared with the wire and the hub).

pub use tessera_types::commitment::*;
