//! The safetensors header of one file: parsed and validated without touching tensor data
//! (docs/store-format.md). Every size in it is checked against the file's size before use.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{PhemaError, Result};

/// Where one tensor lives inside a file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    /// Name as in `state_dict()`.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: u64,
}

impl TensorEntry {
    /// Number of elements (validated when the entry was made: it does not overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parsed header of one safetensors file.
#[derive(Clone, Debug)]
pub struct Header {
    /// The file.
    pub path: PathBuf,
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order.
    pub tensors: Vec<TensorEntry>,
    /// File size in bytes.
    pub file_size: u64,
    /// On object storage, the version (ETag) the header was read from: the data is read from
    /// that version only (docs/storage.md).
    pub version: Option<String>,
}

/// Headers larger than this are refused (safetensors uses the same bound).
pub const MAX_HEADER: u64 = 100_000_000;

/// Whether tensors of this dtype are averaged (floats) or copied (everything else).
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

fn corrupt(path: &Path, reason: String) -> PhemaError {
    PhemaError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// The header length a file of `file_size` bytes starting with `prefix` declares, checked to fit.
pub(crate) fn header_len(path: &Path, prefix: [u8; 8], file_size: u64) -> Result<u64> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER || n > file_size.saturating_sub(8) {
        return Err(corrupt(
            path,
            format!("header of {n} bytes does not fit in the file of {file_size} bytes"),
        ));
    }
    Ok(n)
}

/// Reads and validates the header of a local safetensors file without touching its data.
/// Anything but a regular file (a FIFO, a device) is refused without blocking on it.
/// (`remote::read_header` takes an object-storage URL too.)
pub fn read_header(path: &Path) -> Result<Header> {
    Ok(read_open(path, &open_regular(path)?)?.0)
}

/// Opens `path` for reading, refusing anything but a regular file without blocking on it.
pub fn open_regular(path: &Path) -> Result<File> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| PhemaError::io(path, e))?;
    let meta = file.metadata().map_err(|e| PhemaError::io(path, e))?;
    if !meta.is_file() {
        return Err(corrupt(path, "not a regular file".into()));
    }
    Ok(file)
}

/// The header of `file` (opened from `path`) and its JSON as stored. Read from the open file, it
/// describes the very data later read from it, whatever replaces `path` meanwhile.
pub fn read_open(path: &Path, file: &File) -> Result<(Header, Vec<u8>)> {
    let file_size = file.metadata().map_err(|e| PhemaError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0).map_err(|_| {
        corrupt(
            path,
            format!("only {file_size} bytes, shorter than a header"),
        )
    })?;
    let n = header_len(path, prefix, file_size)?;
    // `n` was bounded by MAX_HEADER.
    let mut json = vec![0u8; n as usize];
    file.read_exact_at(&mut json, 8)
        .map_err(|_| corrupt(path, "the file shrank while its header was read".into()))?;
    Ok((parse(path, n, &json, file_size)?, json))
}

/// Parses the header of a whole safetensors file held in `bytes` (`path` names it in errors):
/// what [`read_header`] does for a file on disk.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let file_size = bytes.len() as u64;
    let Some((prefix, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(corrupt(
            path,
            format!("only {file_size} bytes, shorter than a header"),
        ));
    };
    let n = header_len(path, *prefix, file_size)?;
    // `n <= file_size - 8 = rest.len()` was checked.
    parse(path, n, &rest[..n as usize], file_size)
}

/// The header from its JSON (`n` bytes, after the 8-byte length) in a file of `file_size` bytes.
pub(crate) fn parse(path: &Path, n: u64, json: &[u8], file_size: u64) -> Result<Header> {
    let corrupt = |reason: String| corrupt(path, reason);
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
    // Bytes available for tensor data.
    let data_size = file_size - 8 - n;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (key, value) in raw {
        if key == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| corrupt(format!("__metadata__ is not a string map: {e}")))?;
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("entry for tensor `{key}`: {e}")))?;
        if !info.dtype.bitsize().is_multiple_of(8) {
            // Sub-byte dtypes (fp4, fp6) pack several elements a byte: not read element-wise.
            return Err(corrupt(format!(
                "tensor `{key}`: dtype {:?} is not supported (elements smaller than a byte)",
                info.dtype
            )));
        }
        let (start, end) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| corrupt(format!("tensor `{key}`: shape overflows")))?;
        let expected = numel
            .checked_mul(info.dtype.bitsize())
            .map(|b| b / 8)
            .ok_or_else(|| corrupt(format!("tensor `{key}`: size overflows")))?;
        if end < start || end - start != expected {
            return Err(corrupt(format!(
                "tensor `{key}`: data offsets {start}..{end} do not match shape {:?} of {:?}",
                info.shape, info.dtype
            )));
        }
        if end as u64 > data_size {
            return Err(corrupt(format!(
                "tensor `{key}`: data offsets {start}..{end} lie past the end of the file \
                 ({data_size} data bytes)"
            )));
        }
        tensors.push(TensorEntry {
            name: key,
            dtype: info.dtype,
            shape: info.shape,
            // Both terms are within the file: `8 + n + end <= file_size`.
            offset: 8 + n + start as u64,
            nbytes: expected as u64,
        });
    }
    // Empty tensors (an uneven shard's empty block) share their offset with the next tensor:
    // they go first, by name, so the order is the same on every read.
    tensors.sort_by(|a, b| (a.offset, a.nbytes, &a.name).cmp(&(b.offset, b.nbytes, &b.name)));
    // Data must tile the data section exactly: no holes, overlaps or bytes past the end.
    let mut cursor = 8 + n;
    for t in &tensors {
        if t.offset != cursor {
            return Err(corrupt(format!(
                "tensor `{}` does not start where the previous one ends",
                t.name
            )));
        }
        cursor += t.nbytes;
    }
    if cursor != file_size {
        return Err(corrupt(format!(
            "data ends at byte {cursor} but the file has {file_size} bytes (truncated?)"
        )));
    }
    Ok(Header {
        path: path.to_path_buf(),
        metadata,
        tensors,
        file_size,
        version: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `json` as header and `data` bytes after it.
    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    #[test]
    fn data_offsets_past_the_end_are_refused_without_overflow() {
        // Offsets near 2^64: adding the header length must not wrap.
        let big = u64::MAX - 3;
        let json = format!(
            r#"{{"w":{{"dtype":"U8","shape":[4],"data_offsets":[{},{}]}}}}"#,
            big - 4,
            big
        );
        let err = parse_header(Path::new("x.safetensors"), &file(&json, 4))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("past the end"),
            "{err}"
        );
        let ok = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let h = parse_header(Path::new("x.safetensors"), &file(ok, 4)).unwrap();
        assert_eq!(h.tensors[0].nbytes, 4);
        // Half-byte elements would be copied as zero bytes each.
        let f4 = r#"{"w":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        let err = parse_header(Path::new("x.safetensors"), &file(f4, 2)).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_header(&p).unwrap_err().to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("not a regular file"),
            "{err}"
        );
    }
}
