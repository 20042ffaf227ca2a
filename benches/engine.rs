//! The engine alone (docs/design.md, "many targets in one pass vs one target"), without Python and,
//! with a sink that discards the encoded outputs, without any output I/O: what one pass over
//! the snapshots costs for 1 and for 16 targets. Uses the store `bench_reconstruct.py` writes.
//!
//! Run: `cargo bench --bench engine` (after `.venv/bin/python benches/bench_reconstruct.py`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use phema::math::profile::{sigma_rel_to_gamma, Profile};
use phema::math::solve::{solve, SolveOptions};
use phema::ops;
use phema::output::OutputRequest;
use phema::store::scan;
use phema::{combine, Plan, Progress, Sink, Source};
use safetensors::Dtype;

const STORE: &str = "bench-data/reconstruct-25M-fp16";
const ROUNDS: usize = 5;

/// Takes fp16 outputs and drops them.
struct Discard;

impl Sink for Discard {
    fn dtype(&self, _: usize, _: usize) -> Dtype {
        Dtype::F16
    }
    fn put(&self, _: usize, _: usize, _: usize, bytes: &[u8]) -> phema::Result<()> {
        std::hint::black_box(bytes);
        Ok(())
    }
    fn put_raw(&self, _: usize, _: usize, _: &[u8]) -> phema::Result<()> {
        Ok(())
    }
}

/// Weights `[snapshot][target]` for power targets of these widths at the last time.
fn weights(profiles: &[Profile], sigma_rels: &[f64]) -> phema::Result<Vec<Vec<f64>>> {
    let t = profiles.iter().map(Profile::t).fold(0.0, f64::max);
    let targets = sigma_rels
        .iter()
        .map(|&s| Profile::power(t, sigma_rel_to_gamma(s)?))
        .collect::<phema::Result<Vec<_>>>()?;
    let fits = solve(profiles, &targets, &SolveOptions::default())?;
    Ok((0..profiles.len())
        .map(|i| fits.iter().map(|f| f.weights[i]).collect())
        .collect())
}

/// Seconds of one run into `sink`, or into fp16 files under `out` when given.
fn run(sources: &[Source], w: &[Vec<f64>], out: Option<&Path>) -> phema::Result<f64> {
    let k = w[0].len();
    let start = Instant::now();
    let plan = Plan::new(w.to_vec(), None);
    match out {
        None => {
            combine(sources, &plan, &Discard, &Progress::default())?;
        }
        Some(dir) => {
            let requests: Vec<OutputRequest> = (0..k)
                .map(|j| OutputRequest {
                    path: dir.join(format!("target-{j}.safetensors")),
                    dtype: Dtype::F16,
                    metadata: BTreeMap::new(),
                    shard_size: None,
                    shard: None,
                    stem: None,
                })
                .collect();
            let (paths, _) = ops::to_files(sources, &plan, &requests, &Progress::default())?;
            for p in paths.iter().flatten() {
                std::fs::remove_file(p).map_err(|e| phema::PhemaError::io(p, e))?;
            }
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> phema::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(STORE);
    if !dir.is_dir() {
        println!(
            "no store at {}: run `.venv/bin/python benches/bench_reconstruct.py` first",
            dir.display()
        );
        return Ok(());
    }
    let found = scan(&dir)?;
    let snapshots = found.snapshots;
    let profiles: Vec<Profile> = snapshots.iter().filter_map(|s| s.profile()).collect();
    let sources: Vec<Source> = snapshots
        .iter()
        .map(|s| Source::new(s.files.clone(), false))
        .collect::<phema::Result<_>>()?;
    let many: Vec<f64> = (0..16).map(|i| 0.03 + 0.22 * i as f64 / 15.0).collect();
    let one = weights(&profiles, &[0.08])?;
    let sixteen = weights(&profiles, &many)?;
    let tmp = Path::new("/dev/shm");
    let tmpfs = tmp.is_dir().then_some(tmp);
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("1 target, outputs discarded", vec![]),
        ("16 targets, outputs discarded", vec![]),
        ("1 target, fp16 file on tmpfs", vec![]),
        ("16 targets, fp16 files on tmpfs", vec![]),
    ];
    run(&sources, &one, None)?; // warms the page cache
    for _ in 0..ROUNDS {
        rows[0].1.push(run(&sources, &one, None)?);
        rows[1].1.push(run(&sources, &sixteen, None)?);
        if let Some(t) = tmpfs {
            rows[2].1.push(run(&sources, &one, Some(t))?);
            rows[3].1.push(run(&sources, &sixteen, Some(t))?);
        }
    }
    println!(
        "engine on {} snapshots ({} threads), median of {ROUNDS}",
        sources.len(),
        rayon::current_num_threads()
    );
    for (label, v) in rows.iter().filter(|(_, v)| !v.is_empty()) {
        println!("  {label:<34} {:8.3} s", median(v.clone()));
    }
    let ratio = |a: usize, b: usize| {
        median(
            rows[a]
                .1
                .iter()
                .zip(&rows[b].1)
                .map(|(x, y)| x / y)
                .collect(),
        )
    };
    println!(
        "  16 targets / 1 target, outputs discarded: {:.2}x",
        ratio(1, 0)
    );
    if tmpfs.is_some() {
        println!(
            "  16 targets / 1 target, files on tmpfs:   {:.2}x",
            ratio(3, 2)
        );
    }
    Ok(())
}
