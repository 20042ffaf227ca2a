//! Outputs on disk or object storage: [`writer`] writes one safetensors file crash-safely,
//! [`layout`] decides an output's files and shards, [`sink`] fills them from the engine, and
//! [`commit`] gives files their final names all at once (docs/store-format.md).

pub mod commit;
pub mod layout;
pub mod sink;
pub mod writer;

pub use commit::{commit_files, copy_file, move_files, sync_dir, temporary_path, write_file};
pub use layout::{output_files, OutputFiles, OutputRequest};
pub use sink::FileSink;
pub use writer::{write_snapshot, SafetensorsWriter, TensorData, TensorSpec};

#[cfg(test)]
mod tests;
