//! The snapshot store (SPEC §2): a directory of safetensors files, one average each, described by
//! their `__metadata__`. Listing reads headers only.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{PhemaError, Result};
use crate::profile::Profile;
use crate::shard::{assemble, shard_id, ShardId};

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
    /// Number of elements.
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
}

/// Headers larger than this are refused (safetensors uses the same bound).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and validates the header of a safetensors file without touching its data.
pub fn read_header(path: &Path) -> Result<Header> {
    let corrupt = |reason: String| PhemaError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| PhemaError::io(path, e))?;
    let file_size = file.metadata().map_err(|e| PhemaError::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| corrupt(format!("only {file_size} bytes, shorter than a header")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > file_size {
        return Err(corrupt(format!(
            "header of {n} bytes does not fit in the file of {file_size} bytes"
        )));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json)
        .map_err(|e| PhemaError::io(path, e))?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
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
        let (start, end) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| corrupt(format!("tensor `{key}`: shape overflows")))?;
        let expected = numel
            .checked_mul(info.dtype.bitsize())
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| corrupt(format!("tensor `{key}`: size overflows")))?;
        if end < start || end - start != expected {
            return Err(corrupt(format!(
                "tensor `{key}`: data offsets {start}..{end} do not match shape {:?} of {:?}",
                info.shape, info.dtype
            )));
        }
        tensors.push(TensorEntry {
            name: key,
            dtype: info.dtype,
            shape: info.shape,
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
    })
}

/// What a snapshot holds over training time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A power-function average (SPEC §1).
    Power {
        /// Its exponent.
        gamma: f64,
    },
    /// The plain weights at time `t`.
    Raw,
}

/// One snapshot of a store.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Time of the snapshot.
    pub t: f64,
    /// What it averages.
    pub kind: Kind,
    /// Its file, or for a snapshot of sharded training its ranks' files in rank order.
    pub files: Vec<Header>,
    /// The (global) tensors it holds, in file order.
    pub tensors: Vec<TensorEntry>,
}

impl Snapshot {
    /// Its (first) file's header, which carries the snapshot's metadata.
    pub fn header(&self) -> &Header {
        &self.files[0]
    }

    /// The profile this snapshot represents, where it is a power average.
    pub fn profile(&self) -> Option<Profile> {
        match self.kind {
            Kind::Power { gamma } => Some(Profile::Power { t: self.t, gamma }),
            Kind::Raw => None,
        }
    }
}

/// The result of listing a store.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Valid snapshots sorted by time, then gamma.
    pub snapshots: Vec<Snapshot>,
    /// Files that are not snapshots, with the reason they were skipped.
    pub ignored: Vec<(PathBuf, String)>,
    /// Problems that make the store unusable as it is (corrupt files, duplicates, disagreement).
    pub problems: Vec<String>,
    /// Snapshots of sharded training that lack some rank's file (still being written, or lost):
    /// not in `snapshots`.
    pub incomplete: Vec<String>,
}

fn parse_number(header: &Header, key: &str) -> std::result::Result<f64, String> {
    let raw = header
        .metadata
        .get(key)
        .ok_or_else(|| format!("{}: metadata lacks `{key}`", header.path.display()))?;
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            format!(
                "{}: `{key}` = {raw:?} is not a number",
                header.path.display()
            )
        })
}

/// Interprets a header as a snapshot; `Ok(None)` when the file is not a phema snapshot.
pub fn snapshot_from_header(header: Header) -> std::result::Result<Option<Snapshot>, String> {
    let Some(kind) = header.metadata.get("phema.kind").cloned() else {
        return Ok(None);
    };
    let t = parse_number(&header, "phema.t")?;
    if t <= 0.0 {
        return Err(format!(
            "{}: phema.t = {t} must be > 0",
            header.path.display()
        ));
    }
    let kind = match kind.as_str() {
        "power" => {
            let gamma = parse_number(&header, "phema.gamma")?;
            if gamma <= 0.0 {
                return Err(format!(
                    "{}: phema.gamma = {gamma} must be > 0",
                    header.path.display()
                ));
            }
            Kind::Power { gamma }
        }
        "raw" => Kind::Raw,
        other => {
            return Err(format!(
                "{}: unknown phema.kind {other:?} (expected power or raw)",
                header.path.display()
            ))
        }
    };
    Ok(Some(Snapshot {
        t,
        kind,
        tensors: header.tensors.clone(),
        files: vec![header],
    }))
}

/// Lists a store directory: every `*.safetensors` file's header, in parallel.
pub fn scan(dir: &Path) -> Result<Scan> {
    let entries = std::fs::read_dir(dir).map_err(|e| PhemaError::io(dir, e))?;
    let mut files = Vec::new();
    let mut out = Scan::default();
    for entry in entries {
        let entry = entry.map_err(|e| PhemaError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            out.ignored
                .push((path, "unfinished write (temporary file)".into()));
        } else if path.is_dir() {
            out.ignored.push((path, "directory".into()));
        } else if name.ends_with(".safetensors") {
            files.push(path);
        } else {
            out.ignored.push((path, "not a .safetensors file".into()));
        }
    }
    let parsed: Vec<(PathBuf, std::result::Result<Option<Snapshot>, String>)> = files
        .into_par_iter()
        .map(|p| {
            let r = read_header(&p)
                .map_err(|e| e.to_string())
                .and_then(snapshot_from_header);
            (p, r)
        })
        .collect();
    let mut ranked: BTreeMap<(u64, u64), Vec<(ShardId, Snapshot)>> = BTreeMap::new();
    for (path, r) in parsed {
        let s = match r {
            Ok(Some(s)) => s,
            Ok(None) => {
                out.ignored
                    .push((path, "safetensors without phema metadata".into()));
                continue;
            }
            Err(problem) => {
                out.problems.push(problem);
                continue;
            }
        };
        match shard_id(s.header()) {
            Ok(None) => out.snapshots.push(s),
            Ok(Some(id)) => ranked
                .entry((s.t.to_bits(), gamma_key(&s).to_bits()))
                .or_default()
                .push((id, s)),
            Err(problem) => out.problems.push(problem),
        }
    }
    for parts in ranked.into_values() {
        match join_ranks(parts) {
            Ok(s) => out.snapshots.push(s),
            Err(Partial::Incomplete(why)) => out.incomplete.push(why),
            Err(Partial::Problem(why)) => out.problems.push(why),
        }
    }
    out.ignored.sort();
    out.snapshots.sort_by(|a, b| {
        a.t.total_cmp(&b.t)
            .then(gamma_key(a).total_cmp(&gamma_key(b)))
            .then(a.header().path.cmp(&b.header().path))
    });
    out.problems.extend(check_consistency(&out.snapshots));
    out.problems.sort();
    out.incomplete.sort();
    Ok(out)
}

/// Why rank files do not make a snapshot.
enum Partial {
    /// Some rank's file is not (yet) there.
    Incomplete(String),
    /// The files contradict each other.
    Problem(String),
}

/// One snapshot of sharded training from its ranks' files (same `t` and profile).
fn join_ranks(mut parts: Vec<(ShardId, Snapshot)>) -> std::result::Result<Snapshot, Partial> {
    parts.sort_by_key(|(id, s)| (id.rank, s.header().path.clone()));
    let (first_id, first) = &parts[0];
    let world = first_id.world_size;
    let name = |s: &Snapshot| s.header().path.display().to_string();
    if let Some((id, s)) = parts.iter().find(|(id, _)| id.world_size != world) {
        return Err(Partial::Problem(format!(
            "rank files of one snapshot disagree on the world size: {} says {world}, {} says {}",
            name(first),
            name(s),
            id.world_size
        )));
    }
    if let Some(pair) = parts.windows(2).find(|p| p[0].0.rank == p[1].0.rank) {
        return Err(Partial::Problem(format!(
            "two files for rank {} of the same snapshot: {} and {}",
            pair[0].0.rank,
            name(&pair[0].1),
            name(&pair[1].1)
        )));
    }
    if parts.len() < world {
        let have: Vec<usize> = parts.iter().map(|(id, _)| id.rank).collect();
        let missing: Vec<String> = (0..world)
            .filter(|r| !have.contains(r))
            .map(|r| r.to_string())
            .collect();
        return Err(Partial::Incomplete(format!(
            "incomplete snapshot t={} ({}): rank {} of {world} missing, only {} of its files present \
             (e.g. {})",
            first.t,
            match first.kind {
                Kind::Power { gamma } => format!("gamma={gamma}"),
                Kind::Raw => "kind raw".into(),
            },
            missing.join(", "),
            parts.len(),
            name(first)
        )));
    }
    let (t, kind) = (first.t, first.kind);
    let files: Vec<Header> = parts.into_iter().flat_map(|(_, s)| s.files).collect();
    let tensors = assemble(&files)
        .map_err(|e| Partial::Problem(e.to_string()))?
        .into_iter()
        .map(|(entry, _)| entry)
        .collect();
    Ok(Snapshot {
        t,
        kind,
        files,
        tensors,
    })
}

fn gamma_key(s: &Snapshot) -> f64 {
    match s.kind {
        Kind::Power { gamma } => gamma,
        Kind::Raw => f64::INFINITY,
    }
}

/// Duplicated `(t, gamma)` and tensors whose names, shapes or kinds disagree between snapshots.
pub fn check_consistency(snapshots: &[Snapshot]) -> Vec<String> {
    let mut problems = Vec::new();
    for pair in snapshots.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.t == b.t && a.kind == b.kind {
            problems.push(format!(
                "two snapshots with the same t={} and {}: {} and {}",
                a.t,
                match a.kind {
                    Kind::Power { gamma } => format!("gamma={gamma}"),
                    Kind::Raw => "kind raw".into(),
                },
                a.header().path.display(),
                b.header().path.display()
            ));
        }
    }
    if let Some(first) = snapshots.first() {
        let layout: HashMap<&str, (&Vec<usize>, bool)> = first
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), (&t.shape, is_float(t.dtype))))
            .collect();
        for s in &snapshots[1..] {
            let mut seen = 0;
            for t in &s.tensors {
                match layout.get(t.name.as_str()) {
                    None => problems.push(format!(
                        "tensor `{}` is in {} but not in {}",
                        t.name,
                        s.header().path.display(),
                        first.header().path.display()
                    )),
                    Some((shape, float)) => {
                        seen += 1;
                        if *shape != &t.shape || *float != is_float(t.dtype) {
                            problems.push(format!(
                                "tensor `{}` is {:?} {:?} in {} but {:?} in {}",
                                t.name,
                                t.dtype,
                                t.shape,
                                s.header().path.display(),
                                shape,
                                first.header().path.display()
                            ));
                        }
                    }
                }
            }
            if seen != layout.len() {
                let have: std::collections::HashSet<&str> =
                    s.tensors.iter().map(|t| t.name.as_str()).collect();
                let missing = layout.keys().find(|n| !have.contains(**n)).copied();
                problems.push(format!(
                    "tensor `{}` is in {} but missing from {}",
                    missing.unwrap_or("?"),
                    first.header().path.display(),
                    s.header().path.display()
                ));
            }
        }
    }
    problems
}

/// Whether tensors of this dtype are averaged (floats) or copied (everything else).
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{write_snapshot, TensorData};

    fn write(dir: &Path, name: &str, t: f64, gamma: f64, shape: Vec<usize>) -> PathBuf {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let meta = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("phema.version".to_string(), "1".to_string()),
            ("phema.kind".to_string(), "power".to_string()),
            ("phema.t".to_string(), t.to_string()),
            ("phema.gamma".to_string(), gamma.to_string()),
        ]);
        let path = dir.join(name);
        write_snapshot(
            &path,
            &[("w".into(), shape, TensorData::F32(&v))],
            Dtype::F16,
            &meta,
        )
        .unwrap();
        path
    }

    #[test]
    fn scan_sorts_by_time_and_notes_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.safetensors", 200.0, 6.9, vec![3]);
        write(dir.path(), "a.safetensors", 100.0, 6.9, vec![3]);
        write(dir.path(), "c.safetensors", 100.0, 16.9, vec![3]);
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        let s = scan(dir.path()).unwrap();
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let ts: Vec<(f64, Kind)> = s.snapshots.iter().map(|s| (s.t, s.kind)).collect();
        assert_eq!(
            ts,
            vec![
                (100.0, Kind::Power { gamma: 6.9 }),
                (100.0, Kind::Power { gamma: 16.9 }),
                (200.0, Kind::Power { gamma: 6.9 })
            ]
        );
        assert_eq!(s.ignored.len(), 1);
    }

    #[test]
    fn duplicates_and_disagreeing_shapes_name_the_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.safetensors", 100.0, 6.9, vec![3]);
        write(dir.path(), "b.safetensors", 100.0, 6.9, vec![3]);
        write(dir.path(), "c.safetensors", 300.0, 6.9, vec![4]);
        let s = scan(dir.path()).unwrap();
        let all = s.problems.join("\n");
        assert!(
            all.contains("a.safetensors") && all.contains("b.safetensors"),
            "{all}"
        );
        assert!(
            all.contains("`w`") && all.contains("c.safetensors"),
            "{all}"
        );
    }

    #[test]
    fn truncated_file_is_a_problem_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.safetensors", 100.0, 6.9, vec![300]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.problems.len(), 1);
        assert!(s.problems[0].contains("a.safetensors"), "{:?}", s.problems);
        std::fs::write(&p, &bytes[..5]).unwrap();
        let err = read_header(&p).unwrap_err().to_string();
        assert!(err.contains("a.safetensors"), "{err}");
    }
}
