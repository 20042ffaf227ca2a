//! phema: post-hoc EMA of neural-network weights (Karras et al., EDM2, 2024, appendix C).
//!
//! Data flows one way: [`profile`] (the math) -> [`solve`] (weights per target) ->
//! [`store`] (what snapshots exist) -> [`engine`] (weighted combination) -> [`writer`]
//! (safetensors output). The Python binding lives in `bindings` behind the `python` feature.

pub mod engine;
pub mod error;
pub mod header;
pub mod meta;
pub mod profile;
pub mod shard;
pub mod solve;
pub mod store;
pub mod writer;

#[cfg(feature = "python")]
mod bindings;

pub use error::{PhemaError, Result};
