//! The engine's sink for outputs written to files: every target's files created up front under
//! temporary names and filled in place as pieces complete.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use safetensors::Dtype;

use super::commit::{write_file, Commit};
use super::layout::{output_files, OutputRequest};
use super::writer::{sync_all, SafetensorsWriter, TensorSpec};
use crate::engine::Sink;
use crate::error::{PhemaError, Result};
use crate::format::header::TensorEntry;

pub(super) struct TargetFiles {
    pub(super) writers: Vec<SafetensorsWriter>,
    /// For every layout tensor this sink writes: (writer, index inside it, stored dtype).
    pub(super) place: Vec<Option<(usize, usize, Dtype)>>,
    /// The dtype of float tensors.
    pub(super) dtype: Dtype,
    pub(super) index: Option<(PathBuf, Vec<u8>)>,
}

/// Output files of every target, filled by the engine through [`Sink`].
pub struct FileSink {
    pub(super) targets: Vec<TargetFiles>,
}

impl FileSink {
    /// Creates every output file (under temporary names) for tensors laid out as `layout`.
    pub fn create(layout: &[TensorEntry], requests: &[OutputRequest]) -> Result<Self> {
        let mut targets = Vec::with_capacity(requests.len());
        for req in requests {
            let files = output_files(layout, req)?;
            let n = files.shards.len();
            if let Some(i) = req.shard.filter(|&i| i >= n) {
                return Err(PhemaError::Invalid(format!(
                    "shard {i} of {}: the output has {n} shards",
                    req.path.display()
                )));
            }
            if req.shard_size.is_some() {
                std::fs::create_dir_all(&req.path).map_err(|e| PhemaError::io(&req.path, e))?;
            }
            let mut place = vec![None; files.specs.len()];
            let mut writers = Vec::with_capacity(n);
            for (i, (path, members)) in files.shards.iter().enumerate() {
                if req.shard.is_some_and(|only| only != i) {
                    continue;
                }
                let sub: Vec<TensorSpec> =
                    members.iter().map(|&t| files.specs[t].clone()).collect();
                for (j, &t) in members.iter().enumerate() {
                    place[t] = Some((writers.len(), j, files.specs[t].dtype));
                }
                writers.push(SafetensorsWriter::create(path, &sub, &req.metadata)?);
            }
            targets.push(TargetFiles {
                writers,
                place,
                dtype: req.dtype,
                index: if req.shard.is_some() {
                    None
                } else {
                    files.index
                },
            });
        }
        Ok(FileSink { targets })
    }

    /// One sink committing the outputs of all of `sinks` together (their targets in order), so
    /// that outputs written by several engine runs (one per rank) have one commit point.
    pub fn merge(sinks: Vec<FileSink>) -> FileSink {
        FileSink {
            targets: sinks.into_iter().flat_map(|s| s.targets).collect(),
        }
    }

    /// Completes every file and returns, per target, the paths written (the index first when
    /// sharded). Called only after the engine succeeded; dropping the sink instead removes all.
    /// A `cancel` set while the data is synced still commits nothing.
    pub fn finish(mut self, cancel: &AtomicBool) -> Result<Vec<Vec<PathBuf>>> {
        // All data reaches the disk before any file takes its final name; a file already at a
        // final name is set aside first, and if a rename then fails the outputs already renamed
        // are removed and what they replaced is put back, so no partial set is left and no
        // earlier output is lost. A sharded output's index is written after its shards.
        // The files are synced in parallel, so the device sees all their writeback at once.
        let writers: Vec<&SafetensorsWriter> =
            self.targets.iter().flat_map(|t| &t.writers).collect();
        sync_all(&writers)?;
        if cancel.load(Ordering::Relaxed) {
            return Err(PhemaError::Cancelled);
        }
        let mut commit = Commit::default();
        let mut out = Vec::with_capacity(self.targets.len());
        let result = (|| {
            for t in &mut self.targets {
                let mut paths = Vec::new();
                for w in &mut t.writers {
                    let path = w.path.clone();
                    paths.push(commit.place(&path, || w.commit(true))?);
                }
                if let Some((path, bytes)) = &t.index {
                    paths.insert(
                        0,
                        commit.place(path, || write_file(path, bytes).map(|_| path.clone()))?,
                    );
                }
                out.push(paths);
            }
            Ok(())
        })();
        commit.end(result)?;
        Ok(out)
    }
}

impl FileSink {
    pub(super) fn place(&self, target: usize, tensor: usize) -> Result<(usize, usize, Dtype)> {
        self.targets
            .get(target)
            .and_then(|t| t.place.get(tensor).copied().flatten())
            .ok_or_else(|| PhemaError::Invalid(format!("output {target} takes no tensor {tensor}")))
    }
}

impl Sink for FileSink {
    fn dtype(&self, target: usize, tensor: usize) -> Dtype {
        let t = &self.targets[target];
        t.place[tensor].map_or(t.dtype, |p| p.2)
    }

    fn put(&self, target: usize, tensor: usize, elem_offset: usize, bytes: &[u8]) -> Result<()> {
        let (w, j, dtype) = self.place(target, tensor)?;
        self.targets[target].writers[w].write_at(j, elem_offset * dtype.bitsize() / 8, bytes)
    }

    fn put_raw(&self, target: usize, tensor: usize, bytes: &[u8]) -> Result<()> {
        let (w, j, _) = self.place(target, tensor)?;
        self.targets[target].writers[w].write_at(j, 0, bytes)
    }

    fn wants(&self, target: usize, tensor: usize) -> bool {
        self.targets[target].place[tensor].is_some()
    }
}
