//! Generation for medvl: where a model comes from ([`source`]), how its prompt is built, how tokens are chosen
//! ([`sampling`]) and the prefill-then-decode loop with streaming and timings ([`generate`]).
//!
//! This is the only crate that loops over tokens: the CLI, the server, eval and bench all generate through it.
//! It depends on `medvl-model` and never on the server or the bins.

pub mod error;
pub mod generate;
pub mod plan;
pub mod sampling;
#[cfg(feature = "cuda")]
pub mod share;
pub mod source;

pub use error::{EngineError, Result};
pub use generate::{Engine, FinishReason, GenerateParams, Generation, Request, Timings};
pub use plan::{DecodePlan, PlanConfig, Prefilled};
pub use sampling::{Sampler, SamplingParams};
pub use source::ModelSource;
