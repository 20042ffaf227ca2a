//! The operations the bindings and the benchmarks call: a combination of inputs written to files
//! or into memory. Each is one way through: check the plan against the inputs' layout, create
//! the outputs, run the engine, commit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::engine::memory::MemorySink;
use crate::engine::{combine, output_layout, Plan, Progress, Source, Stats};
use crate::error::{PhemaError, Result};
use crate::format::header::TensorEntry;
use crate::format::meta::SHARD_KEYS;
use crate::output::{self, FileSink, OutputRequest};

/// Writes every output of `plan` to the file (or directory of shards) its request names; returns
/// the paths written per output and what was read. Nothing is committed unless all succeed.
pub fn to_files(
    inputs: &[Source],
    plan: &Plan,
    requests: &[OutputRequest],
    progress: &Progress,
) -> Result<(Vec<Vec<PathBuf>>, Stats)> {
    let layout = output_layout(inputs, &plan.weights)?;
    check_outputs(plan, requests.len())?;
    let sink = FileSink::create(&layout, requests)?;
    let stats = combine(inputs, plan, &sink, progress)?;
    Ok((sink.finish(&progress.cancel)?, stats))
}

/// Writes every output of `plan` once per rank of a sharded run: `inputs[rank]` are that rank's
/// files (taken as they are, local blocks) and `requests[rank]` its outputs. Every rank's engine
/// run completes before any file is committed, and then all are committed together, so a
/// failure on one rank leaves no rank's output behind. Returns the paths per rank and output,
/// and what was read over all ranks.
pub fn per_rank_to_files(
    inputs: &[Vec<Source>],
    plan: &Plan,
    requests: &[Vec<OutputRequest>],
    progress: &Progress,
) -> Result<(Vec<Vec<Vec<PathBuf>>>, Stats)> {
    if inputs.len() != requests.len() {
        return Err(PhemaError::Invalid(format!(
            "{} ranks of inputs for {} ranks of outputs",
            inputs.len(),
            requests.len()
        )));
    }
    let mut sinks = Vec::with_capacity(inputs.len());
    let mut total = Stats::default();
    for (rank_inputs, rank_requests) in inputs.iter().zip(requests) {
        let layout = output_layout(rank_inputs, &plan.weights)?;
        check_outputs(plan, rank_requests.len())?;
        // Each output says which part of the run it is, as the rank's snapshots do.
        let first = rank_inputs
            .iter()
            .zip(&plan.weights)
            .find(|(_, w)| w.iter().any(|&x| x != 0.0))
            .and_then(|(s, _)| s.files.first());
        let mut rank_requests = rank_requests.clone();
        for req in &mut rank_requests {
            for key in SHARD_KEYS {
                if let Some(v) = first.and_then(|h| h.metadata.get(key)) {
                    req.metadata.insert(key.to_string(), v.clone());
                }
            }
        }
        let sink = FileSink::create(&layout, &rank_requests)?;
        let stats = combine(rank_inputs, plan, &sink, progress)?;
        total.bytes_read += stats.bytes_read;
        total.read = stats.read;
        for (all, more) in [
            (&mut total.raw_mismatch, stats.raw_mismatch),
            (&mut total.nonfinite, stats.nonfinite),
        ] {
            all.extend(more);
            all.sort();
            all.dedup();
        }
        sinks.push(sink);
    }
    let per_output = FileSink::merge(sinks).finish(&progress.cancel)?;
    let outputs = plan.outputs();
    let per_rank = per_output
        .chunks(outputs.max(1))
        .map(<[Vec<PathBuf>]>::to_vec)
        .collect();
    Ok((per_rank, total))
}

/// Writes every output of `plan` into `buffers[output][tensor]` (float tensors as f32, others in
/// their stored dtype, tensors in the order of [`layout`]).
pub fn to_memory(
    inputs: &[Source],
    plan: &Plan,
    buffers: Vec<Vec<&mut [u8]>>,
    progress: &Progress,
) -> Result<Stats> {
    let layout = output_layout(inputs, &plan.weights)?;
    check_outputs(plan, buffers.len())?;
    let sink = MemorySink::new(buffers, &layout)?;
    combine(inputs, plan, &sink, progress)
}

/// One shard of an output: its path and the names of its tensors.
pub type Shard = (PathBuf, Vec<String>);

/// The files `request` makes of the outputs of these weights: each shard's path and tensor
/// names, and the index path when sharded (to plan a distributed run, one task per shard).
pub fn output_files(
    inputs: &[Source],
    weights: &[Vec<f64>],
    request: &OutputRequest,
) -> Result<(Vec<Shard>, Option<PathBuf>)> {
    let layout = output_layout(inputs, weights)?;
    let files = output::output_files(&layout, request)?;
    let shards = files
        .shards
        .into_iter()
        .map(|(p, members)| (p, members.iter().map(|&i| layout[i].name.clone()).collect()))
        .collect();
    Ok((shards, files.index.map(|(p, _)| p)))
}

/// Commits a distributed run: every shard its workers wrote under `staged` (the same outputs
/// with other paths) moves to the place `finals` gives it, then each sharded output's index is
/// written, all as one commit (`output::commit_files`). Returns each output's paths, the index
/// first when sharded.
pub fn commit_staged(
    inputs: &[Source],
    weights: &[Vec<f64>],
    finals: &[OutputRequest],
    staged: &[OutputRequest],
) -> Result<Vec<Vec<PathBuf>>> {
    if finals.len() != staged.len() {
        return Err(PhemaError::Invalid(format!(
            "{} outputs but {} staged ones",
            finals.len(),
            staged.len()
        )));
    }
    let layout = output_layout(inputs, weights)?;
    let mut moves = Vec::new();
    let mut indexes = Vec::new();
    let mut written = Vec::with_capacity(finals.len());
    for (final_, stage) in finals.iter().zip(staged) {
        let to = output::output_files(&layout, final_)?;
        let from = output::output_files(&layout, stage)?;
        let mut paths: Vec<PathBuf> = to.shards.iter().map(|(p, _)| p.clone()).collect();
        moves.extend(
            from.shards
                .into_iter()
                .map(|(p, _)| p)
                .zip(paths.iter().cloned()),
        );
        if let Some((path, bytes)) = to.index {
            paths.insert(0, path.clone());
            indexes.push((path, bytes));
        }
        written.push(paths);
    }
    output::commit_files(&moves, &indexes)?;
    Ok(written)
}

/// Which column each output's tensors take: output `k` takes column `defaults[k]` for every
/// tensor but those `overrides[k]` names.
#[derive(Clone, Debug, Default)]
pub struct Mix {
    pub defaults: Vec<usize>,
    pub overrides: Vec<BTreeMap<String, usize>>,
}

/// The plan for `weights` (`[input][column]`): one output per column, or the outputs `mix`
/// describes; non-float tensors from input `copy_from` (default: the last input read).
pub fn plan(
    inputs: &[Source],
    weights: Vec<Vec<f64>>,
    copy_from: Option<usize>,
    mix: Option<&Mix>,
) -> Result<Plan> {
    let mut plan = Plan::new(weights, copy_from);
    if let Some(mix) = mix {
        let layout = output_layout(inputs, &plan.weights)?;
        plan.routes = routes(&layout, &mix.defaults, &mix.overrides)?;
    }
    Ok(plan)
}

/// Output `k` takes column `defaults[k]` for every tensor but those `overrides[k]` names; a name
/// the inputs do not hold is an error.
fn routes(
    layout: &[TensorEntry],
    defaults: &[usize],
    overrides: &[BTreeMap<String, usize>],
) -> Result<Vec<Vec<usize>>> {
    if defaults.len() != overrides.len() {
        return Err(PhemaError::Invalid(format!(
            "{} default columns for {} outputs",
            defaults.len(),
            overrides.len()
        )));
    }
    defaults
        .iter()
        .zip(overrides)
        .map(|(&d, over)| {
            if let Some(name) = over.keys().find(|n| !layout.iter().any(|t| &t.name == *n)) {
                return Err(PhemaError::Invalid(format!(
                    "tensor `{name}` is not in the snapshots"
                )));
            }
            Ok(layout
                .iter()
                .map(|t| over.get(&t.name).copied().unwrap_or(d))
                .collect())
        })
        .collect()
}

fn check_outputs(plan: &Plan, given: usize) -> Result<()> {
    if given != plan.outputs() {
        return Err(PhemaError::Invalid(format!(
            "{given} outputs given for a plan of {}",
            plan.outputs()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::read_header;
    use crate::output::{write_snapshot, TensorData};
    use safetensors::Dtype;

    /// Two snapshots holding tensors `a` (3 values) and `b` (2 values), all equal to `v`.
    fn inputs(dir: &std::path::Path) -> Vec<Source> {
        [1.0f32, 2.0]
            .iter()
            .map(|&v| {
                let p = dir.join(format!("{v}.safetensors"));
                let (a, b) = (vec![v; 3], vec![v; 2]);
                write_snapshot(
                    &p,
                    &[
                        ("a".into(), vec![3], TensorData::F32(&a)),
                        ("b".into(), vec![2], TensorData::F32(&b)),
                    ],
                    Dtype::F32,
                    &BTreeMap::new(),
                )
                .unwrap();
                Source::single(read_header(&p).unwrap())
            })
            .collect()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn outputs_take_each_tensor_from_the_column_their_mix_names() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = inputs(dir.path());
        // Column 0: 0.25 * first + 0.75 * second = 1.75; column 1: the second = 2.
        let weights = vec![vec![0.25, 0.0], vec![0.75, 1.0]];
        let mix = Mix {
            defaults: vec![0, 1, 1],
            overrides: vec![
                BTreeMap::from([("b".to_string(), 1)]),
                BTreeMap::new(),
                BTreeMap::from([("a".to_string(), 0)]),
            ],
        };
        let plan = plan(&inputs, weights, None, Some(&mix)).unwrap();
        let mut bufs = vec![[vec![0u8; 12], vec![0u8; 8]]; 3];
        let views = bufs
            .iter_mut()
            .map(|[a, b]| vec![a.as_mut_slice(), b.as_mut_slice()])
            .collect();
        to_memory(&inputs, &plan, views, &Progress::default()).unwrap();
        let got: Vec<(Vec<f32>, Vec<f32>)> =
            bufs.iter().map(|[a, b]| (floats(a), floats(b))).collect();
        assert_eq!(got[0], (vec![1.75; 3], vec![2.0; 2]));
        assert_eq!(got[1], (vec![2.0; 3], vec![2.0; 2]));
        assert_eq!(got[2], (vec![1.75; 3], vec![2.0; 2]));
    }

    #[test]
    fn a_mix_naming_an_unknown_tensor_or_column_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = inputs(dir.path());
        let weights = vec![vec![1.0], vec![0.0]];
        let unknown = Mix {
            defaults: vec![0],
            overrides: vec![BTreeMap::from([("c".to_string(), 0)])],
        };
        let err = plan(&inputs, weights.clone(), None, Some(&unknown)).unwrap_err();
        assert!(err.to_string().contains("tensor `c`"), "{err}");
        let column = Mix {
            defaults: vec![3],
            overrides: vec![BTreeMap::new()],
        };
        let p = plan(&inputs, weights, None, Some(&column)).unwrap();
        let mut a = vec![0u8; 12];
        let mut b = vec![0u8; 8];
        let err = to_memory(
            &inputs,
            &p,
            vec![vec![&mut a, &mut b]],
            &Progress::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("column 3"), "{err}");
    }

    /// Takes only tensor `a`; anything else delivered is a failure.
    struct OnlyA(std::sync::Mutex<Vec<usize>>);
    impl crate::engine::Sink for OnlyA {
        fn dtype(&self, _: usize, _: usize) -> Dtype {
            Dtype::F32
        }
        fn put(&self, _: usize, tensor: usize, _: usize, _: &[u8]) -> Result<()> {
            self.0.lock().unwrap().push(tensor);
            Ok(())
        }
        fn put_raw(&self, _: usize, tensor: usize, _: &[u8]) -> Result<()> {
            self.0.lock().unwrap().push(tensor);
            Ok(())
        }
        fn wants(&self, _: usize, tensor: usize) -> bool {
            tensor == 0
        }
    }

    #[test]
    fn shards_written_one_by_one_and_the_index_equal_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = inputs(dir.path());
        let weights = vec![vec![0.25], vec![0.75]];
        let request = |path: &str, shard| OutputRequest {
            path: dir.path().join(path),
            dtype: Dtype::F16,
            metadata: BTreeMap::new(),
            shard_size: Some(6),
            shard,
            stem: None,
        };
        let plan = Plan::new(weights.clone(), None);
        let (whole, _) = to_files(
            &inputs,
            &plan,
            &[request("one", None)],
            &Progress::default(),
        )
        .unwrap();
        let (shards, index) = output_files(&inputs, &weights, &request("staged", None)).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].1, vec!["a".to_string()]);
        for i in 0..shards.len() {
            let (paths, stats) = to_files(
                &inputs,
                &plan,
                &[request("staged", Some(i))],
                &Progress::default(),
            )
            .unwrap();
            assert_eq!(paths[0], vec![shards[i].0.clone()]);
            // Only this shard's tensor is read: 3 or 2 f32 values from each input.
            assert_eq!(stats.bytes_read, [24, 16][i]);
        }
        assert!(!index.as_ref().unwrap().exists()); // the client writes it, last
        let committed = commit_staged(
            &inputs,
            &weights,
            &[request("parts", None)],
            &[request("staged", None)],
        )
        .unwrap();
        let (final_shards, final_index) =
            output_files(&inputs, &weights, &request("parts", None)).unwrap();
        let mut expected = vec![final_index.unwrap()];
        expected.extend(final_shards.into_iter().map(|(p, _)| p));
        assert_eq!(committed, vec![expected]);
        assert!(shards.iter().all(|(p, _)| !p.exists())); // moved, not copied
        for p in &whole[0] {
            let name = p.file_name().unwrap();
            let other = dir.path().join("parts").join(name);
            assert_eq!(
                std::fs::read(p).unwrap(),
                std::fs::read(other).unwrap(),
                "{name:?}"
            );
        }
        let err = to_files(
            &inputs,
            &plan,
            &[request("x", Some(2))],
            &Progress::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("has 2 shards"), "{err}");
    }

    #[test]
    fn tensors_no_output_wants_are_not_computed() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = inputs(dir.path());
        let sink = OnlyA(std::sync::Mutex::new(Vec::new()));
        let plan = Plan::new(vec![vec![0.5], vec![0.5]], None);
        combine(&inputs, &plan, &sink, &Progress::default()).unwrap();
        assert_eq!(sink.0.into_inner().unwrap(), vec![0]);
    }
}
