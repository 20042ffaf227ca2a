//! Everything phema reads from a file, from bytes: the safetensors header, the `phema.*`
//! metadata, `phema.shards`, the recorded checksum and the assembly of a sharded snapshot
//! (docs/fuzzing.md).
//!
//! An input is one to four files, each preceded by its length as 4 little-endian bytes (the
//! last file takes the rest). Besides "no panic, no abort, bounded memory", every assembled
//! layout is checked: each segment lies inside its file and the segments tile the tensor.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use phema::engine::Source;
use phema::format::header::{is_float, parse_header, Header};
use phema::format::{checksum, meta, shard};
use phema::store;

fn files(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < 4 {
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            out.push(data);
            break;
        };
        let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
        let (file, rest) = if out.len() == 3 {
            (rest, &rest[rest.len()..])
        } else {
            rest.split_at(n)
        };
        out.push(file);
        data = rest;
    }
    out
}

fn check_layout(source: &Source) {
    let Ok(layout) = source.layout() else { return };
    for (entry, segments) in layout {
        let mut cursor = 0usize;
        for s in &segments {
            assert_eq!(s.start, cursor, "segments tile `{}`", entry.name);
            cursor += s.len;
            let size = (s.dtype.bitsize() / 8) as u64;
            let end = s.byte_offset + s.len as u64 * size;
            assert!(end <= source.files[s.file].file_size, "segment inside its file");
        }
        assert_eq!(cursor, entry.numel(), "segments cover `{}`", entry.name);
        let size = entry.dtype.bitsize() / 8;
        if !is_float(entry.dtype) || !source.sharded {
            assert_eq!(entry.nbytes, (entry.numel() * size) as u64);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let inputs = files(data);
    for (i, f) in inputs.iter().enumerate() {
        let _ = checksum::verify_bytes(&PathBuf::from(format!("f{i}.safetensors")), f);
    }
    let headers: Vec<Header> = inputs
        .iter()
        .enumerate()
        .filter_map(|(i, f)| parse_header(&PathBuf::from(format!("f{i}.safetensors")), f).ok())
        .collect();
    for h in &headers {
        let _ = meta::blocks(h);
        let _ = store::snapshot_from_header(h.clone());
    }
    if headers.is_empty() {
        return;
    }
    let _ = shard::assemble(&headers);
    for local in [false, true] {
        if let Ok(source) = Source::new(headers.clone(), local) {
            check_layout(&source);
        }
    }
});
