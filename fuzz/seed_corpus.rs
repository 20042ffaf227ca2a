//! Writes the fuzzer's seed corpus into the directory given: snapshot files written by phema's
//! own writer (whole, sharded over two ranks, raw, with integer buffers), framed as the fuzz
//! target reads them (docs/fuzzing.md).

use std::collections::BTreeMap;
use std::path::Path;

use phema::output::{write_snapshot, TensorData};
use safetensors::Dtype;

fn meta(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [
        ("format", "pt".to_string()),
        ("phema.version", "1".to_string()),
        ("phema.kind", "power".to_string()),
        ("phema.t", "4096".to_string()),
        ("phema.gamma", "6.94".to_string()),
        ("phema.sigma_rel", "0.1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in pairs {
        m.insert(k.to_string(), v.clone());
    }
    m
}

fn frame(files: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: seed_corpus DIR")?;
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let tmp = out.join(".seed-work");
    std::fs::create_dir_all(&tmp)?;
    let write = |name: &str, tensors: &[(String, Vec<usize>, TensorData<'_>)], dtype, m| {
        let p = tmp.join(name);
        let _ = std::fs::remove_file(&p);
        write_snapshot(&p, tensors, dtype, &m).map(|_| std::fs::read(&p))
    };
    let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let step = 7i64.to_le_bytes();
    let whole = write(
        "whole.safetensors",
        &[
            ("w".into(), vec![4, 6], TensorData::F32(&w)),
            ("b".into(), vec![6], TensorData::F32(&w[..6])),
            ("step".into(), vec![], TensorData::Raw(Dtype::I64, &step)),
        ],
        Dtype::F16,
        meta(&[]),
    )??;
    let raw = write(
        "raw.safetensors",
        &[("w".into(), vec![4, 6], TensorData::F32(&w))],
        Dtype::BF16,
        meta(&[("phema.kind", "raw".into())]),
    )??;
    // Two ranks: `w` split by rows (2 + 2), `b` by columns (4 + 2), `c` replicated.
    let mut ranks = Vec::new();
    for r in 0..2usize {
        let shards = serde_json::json!({
            "w": {"shape": [4, 6], "offset": [2 * r, 0], "placements": "(Shard(dim=0),)"},
            "b": {"shape": [2, 6], "offset": [0, 4 * r], "placements": "(Shard(dim=1),)"},
            "c": {"shape": [3], "offset": [0], "placements": "(Replicate(),)"},
        });
        let cols = if r == 0 { 4 } else { 2 };
        let b: Vec<f32> = (0..2 * cols).map(|i| i as f32).collect();
        ranks.push(write(
            &format!("r{r}.safetensors"),
            &[
                (
                    "w".into(),
                    vec![2, 6],
                    TensorData::F32(&w[12 * r..12 * r + 12]),
                ),
                ("b".into(), vec![2, cols], TensorData::F32(&b)),
                ("c".into(), vec![3], TensorData::F32(&w[..3])),
                (
                    "step".into(),
                    vec![1],
                    TensorData::Raw(Dtype::U8, &step[..1]),
                ),
            ],
            Dtype::F32,
            meta(&[
                ("phema.rank", r.to_string()),
                ("phema.world_size", "2".into()),
                ("phema.shards", shards.to_string()),
            ]),
        )??);
    }
    let seeds = [
        ("whole", frame(std::slice::from_ref(&whole))),
        ("raw", frame(&[raw])),
        ("ranks", frame(&ranks)),
        (
            "ranks-reversed",
            frame(&[ranks[1].clone(), ranks[0].clone()]),
        ),
        ("rank0-alone", frame(&[ranks[0].clone()])),
        ("mixed", frame(&[whole, ranks[0].clone()])),
    ];
    for (name, bytes) in seeds {
        std::fs::write(out.join(name), bytes)?;
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
