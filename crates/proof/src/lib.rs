//! `tessera-proof`: cheap, statistical verification of small-model inference.
//!
//! Zero-knowledge proofs of LLM inference cost 10²–10⁵× the inference; bit-exact re-execution breaks
//! on floating-point differences between hardware. This crate follows the tolerance-based approach of
//! TOPLOC (Ong et al., Prime Intellect, 2025): the provider ships a compact [`Commitment`] with every
//! result (10 bytes per generated token: five logits as f16), and a verifier re-runs the prompt plus
//! the claimed output as *one* teacher-forced pass of the requested model and [`check`]s that
//!
//! 1. the commitment is bound to this model, prompt, output, sampling parameters, seed and finish;
//! 2. the committed logits match the recomputed ones within calibrated thresholds (another model,
//!    another quantization, skipped layers, an edited context all move them);
//! 3. every emitted token is what the requested rule selects under the verifier's logits, allowing
//!    near-ties — greedy: the argmax; sampling: the Gumbel-max choice with the seeded counter-based
//!    noise of `tessera_engine::sampling`, which a verifier can recompute exactly.
//!
//! The engine computes each row identically whatever the batch or thread count, so on the same
//! instruction set honest and recomputed logits are bitwise equal; across AVX2/AVX-512/portable
//! kernels they differ by about one f16 step. Calibration ([`calibrate`]) measures this.
//!
//! # Limits (what a clever cheater could still do)
//! - **Commit-after-the-fact**: a provider who generates with a cheap model and then runs the real
//!   model teacher-forced to fill in the commitment still fails check 3 wherever the cheap model's
//!   tokens are not the real model's choice; to pass, its tokens must *be* the real model's choices,
//!   which is the honest computation (a prefill over the output costs less than generation, but the
//!   tokens have to come from the real model's decoding, so nothing is saved).
//! - **Near-tie swaps**: replacing a token by one whose score is within the slack of the best passes
//!   (harmless by construction: the model nearly chose it).
//! - **Higher precision copies**: a Q8_0 or f16 copy of a Q4_1 model gives logits within thresholds
//!   on some positions but not all; it is no quality harm and not pursued.
//! - **Sampling**: only the sampled fraction *p* of jobs is checked; economics (stake *S*, slash) make
//!   cheating a losing bet when `p·S > gain` — see the README.

#![deny(missing_docs)]

#[cfg(feature = "adversary")]
pub mod adversary;
pub mod calibrate;
pub mod check;
pub mod commitment;
pub mod error;
pub mod harness;

#[cfg(feature = "adversary")]
pub use adversary::{cheat, other_model, Adversary, CheatEngines};
pub use calibrate::{calibrate, Calibration};
pub use check::{check, Claim, Reason, Thresholds, Verdict};
pub use commitment::{Commitment, CommitmentBuilder, Finish, JobSpec};
pub use error::{Error, Result};
pub use harness::{read_job, serve, tasks, verify, Job, Task};
