//! An output's files: one `.safetensors` file, or shards named as Hugging Face names them with
//! their index.

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::Dtype;

use super::writer::TensorSpec;
use crate::error::{PhemaError, Result};
use crate::format::header::{is_float, TensorEntry};

/// One output to produce: a single file, or a directory of shards with a Hugging Face style
/// `model.safetensors.index.json` when `shard_size` is set and the tensors do not fit in one.
#[derive(Clone, Debug)]
pub struct OutputRequest {
    /// The `.safetensors` file, or the directory when `shard_size` is set.
    pub path: PathBuf,
    /// Dtype of the float tensors (non-float tensors keep theirs).
    pub dtype: Dtype,
    /// `__metadata__` of every file written.
    pub metadata: BTreeMap<String, String>,
    /// Largest shard in bytes.
    pub shard_size: Option<u64>,
    /// Only this shard (0-based) and no index: one task of a distributed run, whose client
    /// commits every shard and writes the index (`ops::commit_staged`).
    pub shard: Option<usize>,
    /// File stem of a sharded output: `model` as transformers names it (`model.safetensors`,
    /// `model-00001-of-00002.safetensors`, `model.safetensors.index.json`), or
    /// `diffusion_pytorch_model` as diffusers does. None: `model`.
    pub stem: Option<String>,
}

impl OutputRequest {
    pub(super) fn stem(&self) -> Result<&str> {
        let stem = self.stem.as_deref().unwrap_or("model");
        if stem.is_empty()
            || stem.len() > 200
            || stem.contains(['/', '\\', '\0'])
            || stem.starts_with('.')
        {
            return Err(PhemaError::Invalid(format!(
                "output file stem {stem:?}: expected a plain file name"
            )));
        }
        Ok(stem)
    }
}

/// Name of shard `i` (0-based) of `n`, as Hugging Face names them.
pub(super) fn shard_name(stem: &str, i: usize, n: usize) -> String {
    format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// The files of one output: every shard's path and tensors (layout indices), and the index
/// (its path and contents) when there are several shards.
pub struct OutputFiles {
    pub shards: Vec<(PathBuf, Vec<usize>)>,
    pub specs: Vec<TensorSpec>,
    pub index: Option<(PathBuf, Vec<u8>)>,
}

/// Where the tensors of `layout` go for `req`: greedy sharding in layout order (a tensor larger
/// than a shard gets one of its own), the same for every caller.
pub fn output_files(layout: &[TensorEntry], req: &OutputRequest) -> Result<OutputFiles> {
    if !matches!(req.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(PhemaError::Invalid(format!(
            "output dtype {:?} is not one of float16, bfloat16, float32",
            req.dtype
        )));
    }
    let specs: Vec<TensorSpec> = layout
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if is_float(t.dtype) {
                req.dtype
            } else {
                t.dtype
            },
            shape: t.shape.clone(),
        })
        .collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let b = s.nbytes() as u64;
        if let Some(limit) = req.shard_size {
            if size > 0 && size.saturating_add(b) > limit {
                members.push(Vec::new());
                size = 0;
            }
        }
        if let Some(last) = members.last_mut() {
            last.push(i);
        }
        size = size.saturating_add(b);
    }
    let n = members.len();
    let stem = req.stem()?;
    let paths: Vec<PathBuf> = match (req.shard_size, n) {
        (None, _) => vec![req.path.clone()],
        (Some(_), 1) => vec![req.path.join(format!("{stem}.safetensors"))],
        (Some(_), _) => (0..n)
            .map(|i| req.path.join(shard_name(stem, i, n)))
            .collect(),
    };
    let index = (n > 1).then(|| {
        let mut weight_map = serde_json::Map::new();
        for (m, path) in members.iter().zip(&paths) {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
            for &i in m {
                weight_map.insert(
                    specs[i].name.clone(),
                    file.clone().unwrap_or_default().into(),
                );
            }
        }
        let total: u64 = specs.iter().map(|s| s.nbytes() as u64).sum();
        let mut meta = serde_json::Map::new();
        meta.insert("total_size".into(), total.into());
        // Loaders that read only the index must still learn which names share a tensor.
        if let Some(tied) = req.metadata.get("phema.tied") {
            meta.insert("phema.tied".into(), tied.clone().into());
        }
        let json = serde_json::json!({"metadata": meta, "weight_map": weight_map});
        let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
        (
            req.path.join(format!("{stem}.safetensors.index.json")),
            bytes,
        )
    });
    Ok(OutputFiles {
        shards: paths.into_iter().zip(members).collect(),
        specs,
        index,
    })
}
