//! What a safetensors file of a store holds (docs/store-format.md), each rule in one place:
//! [`header`] (the header, bounded before it is read), [`meta`] (every `phema.*` key),
//! [`shard`] (rank files of a sharded snapshot), [`checksum`] (data checksums), [`codec`]
//! (float encodings).

pub mod checksum;
pub mod codec;
pub mod header;
pub mod meta;
pub mod shard;
