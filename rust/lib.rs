//! phema: post-hoc EMA of neural-network weights (Karras et al., EDM2, 2024, appendix C).
//!
//! Data flows one way, each floor using only those below it (`docs/design.md` draws them):
//! [`error`], [`failpoint`], [`threads`] -> [`math`] (profiles, averaging kernels, the solver: no files) -> [`format`] (what a
//! safetensors file of a store holds, validated once: header, metadata, shards, checksums, float
//! encodings) -> [`remote`] (objects on S3 / GCS) -> [`store`] (what snapshots exist) ->
//! [`engine`] (the weighted combination, read in bounded chunks) -> [`output`] (safetensors files
//! and the commit rule) -> [`ops`] (one operation, start to commit). The Python binding lives in
//! `bindings` behind the `python` feature and only converts types.

pub mod engine;
pub mod error;
pub mod failpoint;
pub mod format;
pub mod math;
pub mod ops;
pub mod output;
pub mod remote;
pub mod store;
pub mod threads;

#[cfg(feature = "python")]
mod bindings;

pub use engine::{combine, Plan, Progress, Sink, Source, Stats};
pub use error::{PhemaError, Result};
pub use math::profile::Profile;
pub use math::solve::{solve, SolveOptions};
pub use output::{write_snapshot, OutputRequest, TensorData};
pub use store::{scan, Snapshot};
