//! Snapshots written by sharded training (FSDP2 / DTensor): one file per rank, each holding that
//! rank's local block of every sharded tensor. This module joins the rank files of a snapshot and
//! works out where every element of the full (global) tensors lives, so the engine can assemble
//! them while streaming, never holding a whole tensor (docs/sharded-snapshots.md).
//!
//! Metadata of a rank file, parsed by [`crate::format::meta`]: `phema.rank`, `phema.world_size`, and
//! `phema.shards`, a JSON object `{name: {"shape": [global dims], "offset": [global index of the
//! local block's first element]}}` for the tensors that are sharded; the others are whole in
//! every rank's file. Every position is computed without overflow (docs/store-format.md).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use safetensors::Dtype;

use crate::error::{PhemaError, Result};
use crate::format::header::{is_float, Header, TensorEntry};
use crate::format::meta::{blocks, Block, ShardId};

/// Why a set of rank files is not one complete sharded snapshot.
#[derive(Debug)]
pub enum RankSetError {
    /// Some ranks' files are not (yet) there: `"rank 1 of 2 missing"`, the first few named.
    Incomplete(String),
    /// The files contradict each other (world sizes, two files for one rank).
    Problem(PhemaError),
}

/// Ranks named in a message about missing ones; the rest are counted.
const NAMED_RANKS: usize = 5;

/// The positions of `ids` in rank order, checking they are the ranks `0..W` of one world size
/// `W` exactly once each (`paths[i]` names file `i` in messages). Memory is bounded by the
/// number of files, whatever world size they claim.
pub fn order_ranks(
    ids: &[ShardId],
    paths: &[&Path],
) -> std::result::Result<Vec<usize>, RankSetError> {
    let problem = |s: String| RankSetError::Problem(PhemaError::Store(s));
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (ids[i].rank, paths[i]));
    let Some(&first) = order.first() else {
        return Err(problem("a sharded snapshot without files".into()));
    };
    let world = ids[first].world_size;
    if let Some(&i) = order.iter().find(|&&i| ids[i].world_size != world) {
        return Err(problem(format!(
            "rank files of one snapshot disagree on the world size: {} says {world}, {} says {}",
            paths[first].display(),
            paths[i].display(),
            ids[i].world_size
        )));
    }
    if let Some(pair) = order.windows(2).find(|p| ids[p[0]].rank == ids[p[1]].rank) {
        return Err(problem(format!(
            "two files for rank {} of the same snapshot: {} and {}",
            ids[pair[0]].rank,
            paths[pair[0]].display(),
            paths[pair[1]].display()
        )));
    }
    // Ranks are distinct and below `world`: all are there when there are `world` of them.
    if order.len() < world {
        let mut have = order.iter().map(|&i| ids[i].rank).peekable();
        let mut named = Vec::new();
        for r in 0..world {
            if have.peek() == Some(&r) {
                have.next();
            } else if named.len() < NAMED_RANKS {
                named.push(r.to_string());
            } else {
                break;
            }
        }
        let missing = world - order.len();
        let mut list = format!(
            "{} {}",
            if missing == 1 { "rank" } else { "ranks" },
            named.join(", ")
        );
        if missing > named.len() {
            list += &format!(" and {} more", missing - named.len());
        }
        return Err(RankSetError::Incomplete(format!(
            "{list} of {world} missing, only {} of its files present (e.g. {})",
            order.len(),
            paths[first].display()
        )));
    }
    Ok(order)
}

/// A run of consecutive elements of a (global) tensor stored consecutively in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First element, as a flat index into the global tensor.
    pub start: usize,
    /// Number of elements.
    pub len: usize,
    /// Index of the file (in the source's file list).
    pub file: usize,
    /// Absolute byte offset in that file of element `start`.
    pub byte_offset: u64,
    /// How the elements are stored.
    pub dtype: Dtype,
}

/// The element runs of a local block `local` placed at `offset` in a global tensor `global`,
/// as `(global flat start, local flat start, len)`, in global order; `None` when the block does
/// not lie inside the global tensor or a position does not fit in `usize`.
fn runs(global: &[usize], offset: &[usize], local: &[usize]) -> Option<Vec<(usize, usize, usize)>> {
    let dims = global.len();
    if offset.len() != dims || local.len() != dims {
        return None;
    }
    for d in 0..dims {
        if offset[d].checked_add(local[d])? > global[d] {
            return None;
        }
    }
    if local.contains(&0) {
        return Some(Vec::new());
    }
    // No dimension is 0 (the block is inside): a fitting product fits for every suffix.
    let numel = global.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    // The innermost dimension the block does not span: runs are contiguous below it.
    let Some(k) = (0..dims).rev().find(|&d| local[d] != global[d]) else {
        return Some(vec![(0, 0, numel)]);
    };
    let mut stride = vec![1usize; dims];
    for d in (0..dims.saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * global[d + 1];
    }
    // Every position below is that of an element of the block, so below `numel`.
    let run = local[k] * stride[k];
    let count: usize = local[..k].iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; k];
    for r in 0..count {
        let start = (0..k)
            .map(|d| (offset[d] + index[d]) * stride[d])
            .sum::<usize>()
            + offset[k] * stride[k];
        out.push((start, r * run, run));
        // Row-major increment of the outer index.
        for d in (0..k).rev() {
            index[d] += 1;
            if index[d] < local[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

/// One tensor of an assembled sharded snapshot: its global entry and where its elements are.
pub type Assembled = (TensorEntry, Vec<Segment>);

/// Assembles the global tensors of a sharded snapshot from its rank files (`files[r]` is rank
/// `r`'s). Blocks that are identical on several ranks (replicas) are read from the lowest rank;
/// the distinct blocks must tile each global tensor exactly.
pub fn assemble(files: &[Header]) -> Result<Vec<Assembled>> {
    let Some((first, others)) = files.split_first() else {
        return Err(PhemaError::Invalid(
            "a sharded snapshot without files".into(),
        ));
    };
    let tables = files.iter().map(blocks).collect::<Result<Vec<_>>>()?;
    let names: HashSet<&str> = first.tensors.iter().map(|t| t.name.as_str()).collect();
    for h in others {
        let theirs: HashSet<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        if let Some(n) = names.symmetric_difference(&theirs).next() {
            return Err(PhemaError::Store(format!(
                "tensor `{n}` is in only some rank files of the snapshot {} and {}",
                first.path.display(),
                h.path.display()
            )));
        }
    }
    let index: Vec<HashMap<&str, &TensorEntry>> = files
        .iter()
        .map(|h| h.tensors.iter().map(|t| (t.name.as_str(), t)).collect())
        .collect();
    first
        .tensors
        .iter()
        .map(|t| assemble_tensor(t, files, &tables, &index))
        .collect()
}

fn assemble_tensor(
    first: &TensorEntry,
    files: &[Header],
    tables: &[HashMap<String, Block>],
    index: &[HashMap<&str, &TensorEntry>],
) -> Result<Assembled> {
    let name = first.name.as_str();
    let bad = |f: usize, why: String| {
        PhemaError::Store(format!(
            "tensor `{name}` in {}: {why}",
            files[f].path.display()
        ))
    };
    let overflow = |f: usize, what: &str| PhemaError::Overflow {
        path: files[f].path.clone(),
        what: format!("{what} of tensor `{name}`"),
    };
    let mut global: Option<Vec<usize>> = None;
    let mut seen: HashSet<(Vec<usize>, Vec<usize>)> = HashSet::new();
    let mut segments = Vec::new();
    for (f, file_index) in index.iter().enumerate() {
        let Some(&local) = file_index.get(name) else {
            return Err(bad(f, "missing from this rank file".into()));
        };
        let (shape, offset) = match tables[f].get(name) {
            Some(b) => (b.shape.clone(), b.offset.clone()),
            None => (local.shape.clone(), vec![0; local.shape.len()]),
        };
        if shape.len() != local.shape.len() || offset.len() != local.shape.len() {
            return Err(bad(
                f,
                format!(
                    "shard metadata shape {shape:?} / offset {offset:?} do not match the stored \
                     shape {:?}",
                    local.shape
                ),
            ));
        }
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(local.dtype.bitsize() / 8))
            .is_none()
        {
            return Err(overflow(
                f,
                &format!("the size of the global shape {shape:?}"),
            ));
        }
        match &global {
            None => global = Some(shape.clone()),
            Some(g) if *g != shape => {
                return Err(bad(
                    f,
                    format!("global shape {shape:?}, but {g:?} in another rank's file"),
                ))
            }
            Some(_) => {}
        }
        if is_float(local.dtype) != is_float(first.dtype) {
            return Err(bad(f, "float in some rank files, not in others".into()));
        }
        let Some(runs) = runs(&shape, &offset, &local.shape) else {
            return Err(bad(
                f,
                format!(
                    "block {:?} at {offset:?} lies outside the global shape {shape:?}",
                    local.shape
                ),
            ));
        };
        // A block already read from a lower rank is a replica.
        if !seen.insert((offset, local.shape.clone())) {
            continue;
        }
        let size = (local.dtype.bitsize() / 8) as u64;
        for (start, local_start, len) in runs {
            // Inside the local tensor, whose bytes lie inside its file.
            let byte_offset = (local_start as u64)
                .checked_mul(size)
                .and_then(|b| b.checked_add(local.offset))
                .ok_or_else(|| overflow(f, "a byte offset"))?;
            segments.push(Segment {
                start,
                len,
                file: f,
                byte_offset,
                dtype: local.dtype,
            });
        }
    }
    let shape = global.unwrap_or_default();
    // Checked above for every file's global shape.
    let numel: usize = shape.iter().product();
    segments.sort_by_key(|s| s.start);
    let mut cursor = 0;
    for s in &segments {
        if s.start != cursor {
            let why = if s.start < cursor {
                "blocks of different ranks overlap"
            } else {
                "the ranks' blocks leave a gap"
            };
            return Err(PhemaError::Store(format!(
                "tensor `{name}` of the sharded snapshot {}: {why} at element {cursor}",
                files[0].path.display()
            )));
        }
        // Runs lie inside the global tensor: `s.start + s.len <= numel`.
        cursor += s.len;
    }
    if cursor != numel {
        return Err(PhemaError::Store(format!(
            "tensor `{name}` of the sharded snapshot {}: the ranks' blocks cover {cursor} of \
             {numel} elements",
            files[0].path.display()
        )));
    }
    let dtype = first.dtype;
    let entry = TensorEntry {
        name: name.to_string(),
        dtype,
        // `cursor` elements are stored in the files: their bytes fit.
        nbytes: (numel * (dtype.bitsize() / 8)) as u64,
        shape,
        offset: 0,
    };
    Ok((entry, segments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::VecSink;
    use crate::engine::{combine, Progress, Source};
    use crate::output::{write_snapshot, TensorData};
    use crate::store::{read_header, scan};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// A global tensor's values, and where each rank's block of it sits.
    struct Global {
        name: &'static str,
        shape: Vec<usize>,
        /// Per rank: (offset, local shape); `None` = not sharded (whole on every rank).
        blocks: Option<[(Vec<usize>, Vec<usize>); 2]>,
    }

    fn values(name: &str, n: usize) -> Vec<f32> {
        let salt = name.len() as f32;
        (0..n).map(|i| i as f32 * 0.25 + salt).collect()
    }

    /// The block of `full` at `offset` with shape `local`, element by element.
    fn cut(full: &[f32], global: &[usize], offset: &[usize], local: &[usize]) -> Vec<f32> {
        let n: usize = local.iter().product();
        (0..n)
            .map(|mut i| {
                let (mut flat, mut scale) = (0, 1);
                for d in (0..local.len()).rev() {
                    flat += (offset[d] + i % local[d]) * scale;
                    i /= local[d];
                    scale *= global[d];
                }
                full[flat]
            })
            .collect()
    }

    fn tensors() -> Vec<Global> {
        vec![
            // FSDP2-style dim-0 sharding of 5 rows: 3 + 2.
            Global {
                name: "a",
                shape: vec![5, 3],
                blocks: Some([(vec![0, 0], vec![3, 3]), (vec![3, 0], vec![2, 3])]),
            },
            // Tensor-parallel row-wise: dim 1 split.
            Global {
                name: "b",
                shape: vec![4, 6],
                blocks: Some([(vec![0, 0], vec![4, 3]), (vec![0, 3], vec![4, 3])]),
            },
            // Replicated DTensor.
            Global {
                name: "c",
                shape: vec![4],
                blocks: Some([(vec![0], vec![4]), (vec![0], vec![4])]),
            },
            // One row over two ranks: the second block is empty.
            Global {
                name: "d",
                shape: vec![1, 2],
                blocks: Some([(vec![0, 0], vec![1, 2]), (vec![1, 0], vec![0, 2])]),
            },
            // A plain tensor, whole in every file.
            Global {
                name: "e",
                shape: vec![3],
                blocks: None,
            },
        ]
    }

    fn meta(t: f64, rank: Option<usize>, shards: &str) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            ("phema.kind".to_string(), "power".to_string()),
            ("phema.t".to_string(), t.to_string()),
            ("phema.gamma".to_string(), "6.9".to_string()),
        ]);
        if let Some(r) = rank {
            m.insert("phema.rank".into(), r.to_string());
            m.insert("phema.world_size".into(), "2".into());
            m.insert("phema.shards".into(), shards.to_string());
        }
        m
    }

    /// Writes the rank files of one sharded snapshot and the unsharded file of the same values.
    fn write_both(dir: &Path, t: f64) -> (Vec<PathBuf>, PathBuf) {
        let globals = tensors();
        let full: Vec<Vec<f32>> = globals
            .iter()
            .map(|g| values(g.name, g.shape.iter().product()))
            .collect();
        let step = [7u8];
        let mut ranks = Vec::new();
        for r in 0..2 {
            let mut shards = serde_json::Map::new();
            let local: Vec<(String, Vec<usize>, Vec<f32>)> = globals
                .iter()
                .zip(&full)
                .map(|(g, v)| match &g.blocks {
                    None => (g.name.to_string(), g.shape.clone(), v.clone()),
                    Some(b) => {
                        let (offset, shape) = &b[r];
                        shards.insert(
                            g.name.into(),
                            serde_json::json!({"shape": g.shape, "offset": offset}),
                        );
                        (
                            g.name.into(),
                            shape.clone(),
                            cut(v, &g.shape, offset, shape),
                        )
                    }
                })
                .collect();
            let mut data: Vec<(String, Vec<usize>, TensorData<'_>)> = local
                .iter()
                .map(|(n, s, v)| (n.clone(), s.clone(), TensorData::F32(v)))
                .collect();
            data.push(("step".into(), vec![1], TensorData::Raw(Dtype::U8, &step)));
            let path = dir.join(format!("{t}.rank{r}.safetensors"));
            let json = serde_json::Value::Object(shards).to_string();
            write_snapshot(&path, &data, Dtype::F32, &meta(t, Some(r), &json)).unwrap();
            ranks.push(path);
        }
        let mut data: Vec<(String, Vec<usize>, TensorData<'_>)> = globals
            .iter()
            .zip(&full)
            .map(|(g, v)| (g.name.to_string(), g.shape.clone(), TensorData::F32(v)))
            .collect();
        data.push(("step".into(), vec![1], TensorData::Raw(Dtype::U8, &step)));
        let plain = dir.join(format!("plain-{t}.safetensors"));
        write_snapshot(&plain, &data, Dtype::F32, &meta(t, None, "")).unwrap();
        (ranks, plain)
    }

    fn run(sources: &[Source], weights: &[Vec<f64>]) -> Vec<Vec<f32>> {
        let layout = crate::engine::layout_of(&sources[0]).unwrap();
        let empty = layout.iter().map(|t| vec![0.0; t.numel()]).collect();
        let sink = VecSink(Mutex::new(vec![empty]));
        let plan = crate::engine::Plan::new(weights.to_vec(), None);
        combine(sources, &plan, &sink, &Progress::default()).unwrap();
        sink.0.into_inner().unwrap().remove(0)
    }

    #[test]
    fn rank_files_assemble_to_the_unsharded_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (ranks, plain) = write_both(dir.path(), 10.0);
        // Given in reverse: the source orders the files by rank.
        let headers = ranks
            .iter()
            .rev()
            .map(|p| read_header(p).unwrap())
            .collect();
        let sharded = Source::new(headers, false).unwrap();
        assert!(sharded.sharded);
        let plain = Source::single(read_header(&plain).unwrap());
        let layout = crate::engine::layout_of(&sharded).unwrap();
        let want = crate::engine::layout_of(&plain).unwrap();
        let shapes = |l: &[TensorEntry]| -> Vec<(String, Vec<usize>)> {
            l.iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect()
        };
        assert_eq!(shapes(&layout), shapes(&want));
        assert_eq!(
            run(std::slice::from_ref(&sharded), &[vec![1.0]]),
            run(std::slice::from_ref(&plain), &[vec![1.0]])
        );
        // Mixed with an unsharded input: every element is the sum of both.
        let both = run(&[sharded, plain.clone()], &[vec![0.5], vec![0.5]]);
        assert_eq!(both, run(&[plain], &[vec![1.0]]));
    }

    #[test]
    fn local_rank_files_are_taken_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let (ranks, _) = write_both(dir.path(), 10.0);
        let one = Source::new(vec![read_header(&ranks[1]).unwrap()], true).unwrap();
        let out = run(&[one], &[vec![2.0]]);
        let full = values("a", 15);
        let want: Vec<f32> = full[9..].iter().map(|x| 2.0 * x).collect();
        assert_eq!(out[0], want, "rank 1 holds rows 3..5 of `a`");
    }

    #[test]
    fn a_missing_rank_is_incomplete_and_bad_blocks_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ranks, plain) = write_both(dir.path(), 10.0);
        std::fs::remove_file(&plain).unwrap();
        write_both(dir.path(), 20.0);
        std::fs::remove_file(dir.path().join("20.rank1.safetensors")).unwrap();
        std::fs::remove_file(dir.path().join("plain-20.safetensors")).unwrap();
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.snapshots.len(), 1, "only the complete snapshot is listed");
        assert_eq!(s.snapshots[0].files.len(), 2);
        assert_eq!(s.snapshots[0].tensors[0].shape, vec![5, 3]);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(s.incomplete.len(), 1);
        assert!(
            s.incomplete[0].contains("rank 1 of 2 missing"),
            "{}",
            s.incomplete[0]
        );

        let h0 = read_header(&ranks[0]).unwrap();
        let err = Source::new(vec![h0.clone()], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("incomplete") && err.contains("rank 1 of 2"),
            "{err}"
        );
        // Rank 1 claiming rows 2..4 overlaps rank 0's rows 0..3.
        let mut h1 = read_header(&ranks[1]).unwrap();
        let shards = h1.metadata["phema.shards"].replace("[3,0]", "[2,0]");
        h1.metadata.insert("phema.shards".into(), shards);
        let err = assemble(&[h0, h1]).unwrap_err().to_string();
        assert!(
            err.contains("tensor `a`") && err.contains("overlap"),
            "{err}"
        );
    }

    /// The global flat indices a block covers, computed element by element.
    fn covered(global: &[usize], offset: &[usize], local: &[usize]) -> Vec<usize> {
        let numel: usize = local.iter().product();
        (0..numel)
            .map(|mut i| {
                let mut flat = 0;
                let mut scale = 1;
                for d in (0..local.len()).rev() {
                    flat += (offset[d] + i % local[d]) * scale;
                    i /= local[d];
                    scale *= global[d];
                }
                flat
            })
            .collect()
    }

    #[test]
    fn runs_cover_exactly_the_elements_of_the_block() {
        let cases: &[(&[usize], &[usize], &[usize])] = &[
            (&[10, 4], &[6, 0], &[4, 4]), // dim-0 shard
            (&[6, 8], &[0, 4], &[6, 4]),  // dim-1 shard (tensor parallel, row-wise)
            (&[3, 4, 5], &[1, 2, 0], &[2, 2, 5]),
            (&[3, 4, 5], &[0, 0, 3], &[3, 4, 2]),
            (&[7], &[5], &[2]),
            (&[4, 4], &[0, 0], &[4, 4]), // replica
            (&[5, 3], &[5, 0], &[0, 3]), // empty block of an uneven shard
        ];
        for &(global, offset, local) in cases {
            let mut from_runs = Vec::new();
            let mut local_next = 0;
            for (start, local_start, len) in runs(global, offset, local).unwrap() {
                assert_eq!(local_start, local_next, "local runs are consecutive");
                local_next += len;
                from_runs.extend(start..start + len);
            }
            assert_eq!(
                from_runs,
                covered(global, offset, local),
                "{global:?} {offset:?}"
            );
        }
    }

    #[test]
    fn runs_of_random_blocks_match_the_element_by_element_placement() {
        // xorshift: reproducible random shapes, offsets and blocks of 1 to 4 dimensions.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..2000 {
            let dims = 1 + next(4);
            let global: Vec<usize> = (0..dims).map(|_| 1 + next(6)).collect();
            let offset: Vec<usize> = global.iter().map(|&g| next(g + 1)).collect();
            let local: Vec<usize> = global
                .iter()
                .zip(&offset)
                .map(|(&g, &o)| next(g - o + 1))
                .collect();
            let found = runs(&global, &offset, &local).unwrap();
            let mut from_runs = Vec::new();
            let mut local_next = 0;
            for (start, local_start, len) in found {
                assert_eq!(local_start, local_next);
                local_next += len;
                from_runs.extend(start..start + len);
            }
            let want = if local.contains(&0) {
                Vec::new()
            } else {
                covered(&global, &offset, &local)
            };
            assert_eq!(from_runs, want, "{global:?} {offset:?} {local:?}");
            // A block reaching one past the global shape in any dimension is refused.
            let d = next(dims);
            let mut past = local.clone();
            past[d] = global[d] - offset[d] + 1;
            assert_eq!(
                runs(&global, &offset, &past),
                None,
                "{global:?} {offset:?} {past:?}"
            );
        }
        // Positions that do not fit in usize are refused, not wrapped.
        assert_eq!(runs(&[usize::MAX], &[usize::MAX], &[1]), None);
        assert_eq!(runs(&[1 << 32, 1 << 32], &[0, 0], &[1, 1]), None);
    }

    #[test]
    fn a_global_shape_that_overflows_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (ranks, _) = write_both(dir.path(), 10.0);
        let h0 = read_header(&ranks[0]).unwrap();
        let mut h1 = read_header(&ranks[1]).unwrap();
        let shards = h1.metadata["phema.shards"].replace("[5,3]", "[4294967296,4294967296]");
        h1.metadata.insert("phema.shards".into(), shards);
        let err = assemble(&[h0.clone(), h1]).unwrap_err();
        assert!(matches!(err, PhemaError::Overflow { .. }), "{err}");
        assert!(
            err.to_string().contains(&ranks[1].display().to_string()),
            "{err}"
        );
        // 2^31 x 2^31 elements fit in 64 bits, but the blocks cannot cover them.
        let mut h1 = read_header(&ranks[1]).unwrap();
        let shards = h1.metadata["phema.shards"].replace("[5,3]", "[2147483648,2147483648]");
        h1.metadata.insert("phema.shards".into(), shards);
        let err = assemble(&[h0, h1]).unwrap_err().to_string();
        assert!(err.contains("tensor `a`"), "{err}");
    }

    #[test]
    fn missing_ranks_of_an_absurd_world_are_counted_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let (ranks, _) = write_both(dir.path(), 10.0);
        for world in ["65536", "1000000", "18446744073709551615", "1e17"] {
            let mut h = read_header(&ranks[0]).unwrap();
            h.metadata.insert("phema.world_size".into(), world.into());
            let err = Source::new(vec![h], false).unwrap_err().to_string();
            assert!(err.len() < 400, "{world}: {} bytes", err.len());
            if world == "65536" {
                assert!(
                    err.contains("ranks 1, 2, 3, 4, 5 and 65530 more of 65536 missing"),
                    "{err}"
                );
            } else {
                assert!(err.contains("phema.world_size"), "{err}");
            }
        }
        // Through a store: one line per incomplete snapshot, one problem per absurd file.
        let path = dir.path().join("10.rank0.safetensors");
        let h = read_header(&path).unwrap();
        let mut meta = h.metadata.clone();
        meta.insert("phema.world_size".into(), "65536".into());
        meta.insert("phema.t".into(), "30".into());
        let v = values("a", 9);
        write_snapshot(
            &dir.path().join("30.rank0.safetensors"),
            &[("a".into(), vec![3, 3], TensorData::F32(&v))],
            Dtype::F32,
            &meta,
        )
        .unwrap();
        meta.insert("phema.world_size".into(), "18446744073709551615".into());
        meta.insert("phema.t".into(), "40".into());
        write_snapshot(
            &dir.path().join("40.rank0.safetensors"),
            &[("a".into(), vec![3, 3], TensorData::F32(&v))],
            Dtype::F32,
            &meta,
        )
        .unwrap();
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.incomplete.len(), 1, "{:?}", s.incomplete);
        assert!(
            s.incomplete[0].contains("and 65530 more of 65536"),
            "{:?}",
            s.incomplete
        );
        let world = s.problems.iter().filter(|p| p.contains("phema.world_size"));
        assert_eq!(world.count(), 1, "{:?}", s.problems);
        assert!(s.problems.iter().all(|p| p.len() < 400), "{:?}", s.problems);
    }
}
