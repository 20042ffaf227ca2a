//! The snapshot store (docs/store-format.md): a directory of safetensors files, one average each,
//! described by their `__metadata__`. Listing reads headers only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{PhemaError, Result};
pub use crate::format::header::{is_float, Header, TensorEntry};
pub use crate::format::meta::Kind;
use crate::format::meta::ShardId;
use crate::format::shard::{assemble, order_ranks, RankSetError};
use crate::math::profile::Profile;
pub use crate::remote::read_header;
use crate::remote::{is_url, Object};

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
            Kind::Raw | Kind::Steps { .. } => None,
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

/// Interprets a header as a snapshot (its metadata checked, docs/store-format.md) with its
/// rank, if it is a rank file; `Ok(None)` when the file is not a phema snapshot.
pub fn snapshot_from_header(header: Header) -> Result<Option<(Snapshot, Option<ShardId>)>> {
    let Some(meta) = crate::format::meta::snapshot(&header)? else {
        return Ok(None);
    };
    let snapshot = Snapshot {
        t: meta.t,
        kind: meta.kind,
        tensors: header.tensors.clone(),
        files: vec![header],
    };
    Ok(Some((snapshot, meta.shard)))
}

/// Lists a store directory: every `*.safetensors` file's header, in parallel.
pub fn scan(dir: &Path) -> Result<Scan> {
    crate::threads::ensure_pool()?;
    let (files, mut out) = match dir.to_str().filter(|d| is_url(d)) {
        Some(url) => list_remote(url)?,
        None => list_local(dir)?,
    };
    let read = |files: Vec<PathBuf>| -> Vec<(PathBuf, Parsed)> {
        files
            .into_par_iter()
            .map(|p| {
                let r = read_header(&p).and_then(snapshot_from_header);
                (p, r)
            })
            .collect()
    };
    let parsed = if dir.to_str().is_some_and(is_url) {
        // Two ranged reads per header, each a round trip: many in flight.
        rayon::ThreadPoolBuilder::new()
            .num_threads(REMOTE_LISTING)
            .build()
            .map_err(|e| PhemaError::Invalid(format!("no threads to list with: {e}")))?
            .install(|| read(files))
    } else {
        read(files)
    };
    gather(parsed, &mut out);
    Ok(out)
}

/// A file's header read as a snapshot (None: no phema metadata).
type Parsed = Result<Option<(Snapshot, Option<ShardId>)>>;

/// Headers read at once when listing object storage.
const REMOTE_LISTING: usize = 16;

/// The `*.safetensors` objects under a prefix (their headers are read next); other objects and
/// sub-prefixes are ignored with a reason, as in a directory.
fn list_remote(url: &str) -> Result<(Vec<PathBuf>, Scan)> {
    let listing = Object::parse(url)?.list()?;
    let mut out = Scan::default();
    if listing.files.is_empty() && listing.dirs.is_empty() {
        return Err(PhemaError::Store(format!(
            "{url}: nothing there (a store is a prefix holding snapshots)"
        )));
    }
    let base = url.trim_end_matches('/');
    let mut files = Vec::new();
    for d in listing.dirs {
        out.ignored
            .push((PathBuf::from(format!("{base}/{d}")), "directory".into()));
    }
    for (name, _, _) in listing.files {
        let path = PathBuf::from(format!("{base}/{name}"));
        if !name.ends_with(".safetensors") {
            out.ignored.push((path, "not a .safetensors file".into()));
        } else {
            files.push(path);
        }
    }
    Ok((files, out))
}

/// The `*.safetensors` files of a store directory; the rest is ignored with a reason.
fn list_local(dir: &Path) -> Result<(Vec<PathBuf>, Scan)> {
    if !dir.is_dir() {
        return Err(PhemaError::Store(format!(
            "{}: not a directory (a store is a directory of snapshots)",
            dir.display()
        )));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| PhemaError::io(dir, e))?;
    let mut files = Vec::new();
    let mut out = Scan::default();
    for entry in entries {
        let entry = entry.map_err(|e| PhemaError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The type of what the name leads to, without opening it: a FIFO would block.
        let kind = std::fs::metadata(&path).map(|m| m.file_type());
        if name.starts_with('.') && name.contains(".tmp-") {
            out.ignored
                .push((path, "unfinished write (temporary file)".into()));
        } else if kind.as_ref().is_ok_and(|k| k.is_dir()) {
            out.ignored.push((path, "directory".into()));
        } else if !name.ends_with(".safetensors") {
            out.ignored.push((path, "not a .safetensors file".into()));
        } else if kind.as_ref().is_ok_and(|k| k.is_file()) {
            files.push(path);
        } else {
            match kind {
                Ok(_) => out
                    .ignored
                    .push((path, "not a regular file (a FIFO, socket or device)".into())),
                // A snapshot's name that leads nowhere (a dangling link): its data is lost.
                Err(e) => out.problems.push(PhemaError::io(&path, e).to_string()),
            }
        }
    }
    Ok((files, out))
}

/// Sorts read headers into snapshots (joining the ranks of sharded ones), ignored files and
/// problems.
fn gather(parsed: Vec<(PathBuf, Parsed)>, out: &mut Scan) {
    let mut ranked: BTreeMap<(u64, u64), Vec<(ShardId, Snapshot)>> = BTreeMap::new();
    for (path, r) in parsed {
        let (s, id) = match r {
            Ok(Some(s)) => s,
            Ok(None) => {
                out.ignored
                    .push((path, "safetensors without phema metadata".into()));
                continue;
            }
            Err(problem) => {
                out.problems.push(problem.to_string());
                continue;
            }
        };
        match id {
            None => out.snapshots.push(s),
            Some(id) => ranked
                .entry((s.t.to_bits(), gamma_key(&s).to_bits()))
                .or_default()
                .push((id, s)),
        }
    }
    for parts in ranked.into_values() {
        match join_ranks(parts) {
            Ok(s) => out.snapshots.push(s),
            Err(RankSetError::Incomplete(why)) => out.incomplete.push(why),
            Err(RankSetError::Problem(why)) => out.problems.push(why.to_string()),
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
}

/// One snapshot of sharded training from its ranks' files (same `t` and profile).
fn join_ranks(parts: Vec<(ShardId, Snapshot)>) -> std::result::Result<Snapshot, RankSetError> {
    let ids: Vec<ShardId> = parts.iter().map(|(id, _)| *id).collect();
    let paths: Vec<&Path> = parts
        .iter()
        .map(|(_, s)| s.header().path.as_path())
        .collect();
    let order = order_ranks(&ids, &paths).map_err(|e| match e {
        RankSetError::Incomplete(why) => {
            let s = &parts[0].1;
            RankSetError::Incomplete(format!(
                "incomplete snapshot t={} ({}): {why}",
                s.t,
                describe_kind(s.kind)
            ))
        }
        problem => problem,
    })?;
    let mut slots: Vec<Option<Snapshot>> = parts.into_iter().map(|(_, s)| Some(s)).collect();
    let mut files = Vec::with_capacity(order.len());
    let mut first = None;
    for i in order {
        if let Some(s) = slots.get_mut(i).and_then(Option::take) {
            first.get_or_insert((s.t, s.kind));
            files.extend(s.files);
        }
    }
    let Some((t, kind)) = first else {
        return Err(RankSetError::Problem(PhemaError::Store(
            "a sharded snapshot without files".into(),
        )));
    };
    let tensors = assemble(&files)
        .map_err(RankSetError::Problem)?
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

fn describe_kind(kind: Kind) -> String {
    match kind {
        Kind::Power { gamma } => format!("gamma={gamma}"),
        Kind::Raw => "kind raw".into(),
        Kind::Steps { sigma_rel } => format!("a stepwise profile of sigma_rel={sigma_rel}"),
    }
}

fn gamma_key(s: &Snapshot) -> f64 {
    match s.kind {
        Kind::Power { gamma } => gamma,
        Kind::Raw => f64::INFINITY,
        // Before the power profiles (gamma >= 0), widest first as theirs are.
        Kind::Steps { sigma_rel } => -sigma_rel,
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
                describe_kind(a.kind),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{write_snapshot, TensorData};
    use safetensors::Dtype;

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

    #[test]
    fn absurd_metadata_is_a_problem_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ok.safetensors", 100.0, 6.9, vec![3]);
        write(dir.path(), "gamma.safetensors", 100.0, 1e300, vec![3]);
        write(dir.path(), "t.safetensors", 1e308, 6.9, vec![3]);
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.snapshots.len(), 1);
        assert_eq!(s.problems.len(), 2, "{:?}", s.problems);
        assert!(
            s.problems[0].contains("gamma.safetensors") && s.problems[0].contains("phema.gamma"),
            "{:?}",
            s.problems
        );
        assert!(
            s.problems[1].contains("t.safetensors") && s.problems[1].contains("phema.t"),
            "{:?}",
            s.problems
        );
    }

    #[test]
    fn a_fifo_in_a_store_is_skipped_with_a_note_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.safetensors", 100.0, 6.9, vec![3]);
        let fifo = dir.path().join("b.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.snapshots.len(), 1);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.ignored.len(), 1);
        assert_eq!(s.ignored[0].0, fifo);
        assert!(
            s.ignored[0].1.contains("not a regular file"),
            "{:?}",
            s.ignored
        );
    }
}
