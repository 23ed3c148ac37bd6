//! Token selection (greedy, seeded Gumbel-max sampling): the rule lives in `tessera-types`, so a
//! verifier and the hub apply exactly the function the engine samples with.

pub use tessera_types::sampling::*;
