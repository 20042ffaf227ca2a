//! phema: post-hoc EMA of neural-network weights (Karras et al., EDM2, 2024, appendix C).
//!
//! Data flows one way: [`header`] and [`meta`] (what a file holds, validated once) ->
//! [`store`] (what snapshots exist) and [`solve`] (weights per target, from [`profile`]) ->
//! [`engine`] (weighted combination, encoding by [`codec`]) -> [`writer`] (safetensors output).
//! `docs/design.md` draws the modules. The Python binding lives in `bindings` behind the
//! `python` feature.

pub mod checksum;
pub mod codec;
pub mod engine;
pub mod error;
pub mod header;
pub mod kernel;
pub mod memory;
pub mod meta;
pub mod ops;
pub mod profile;
pub mod remote;
pub mod shard;
pub mod solve;
pub mod store;
pub mod writer;

#[cfg(feature = "python")]
mod bindings;

pub use error::{PhemaError, Result};
