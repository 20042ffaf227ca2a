use super::simd::*;
use super::source::*;
use super::*;
use crate::output::{write_snapshot, TensorData};
use crate::store::read_header;
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// Collects outputs in memory, as f32.
pub(crate) struct VecSink(pub(crate) Mutex<Vec<Vec<Vec<f32>>>>);
impl Sink for VecSink {
    fn dtype(&self, _: usize, _: usize) -> Dtype {
        Dtype::F32
    }
    fn put(&self, k: usize, t: usize, off: usize, b: &[u8]) -> Result<()> {
        let mut g = self.0.lock().unwrap();
        for (o, c) in g[k][t][off..].iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
    fn put_raw(&self, k: usize, t: usize, b: &[u8]) -> Result<()> {
        let mut g = self.0.lock().unwrap();
        g[k][t] = b.iter().map(|&x| x as f32).collect();
        Ok(())
    }
}

#[test]
fn combination_matches_direct_sum_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    let n = CHUNK + 1000; // crosses a chunk boundary
    let mut headers = Vec::new();
    let mut values = Vec::new();
    for i in 0..4 {
        let a: Vec<f32> = (0..n)
            .map(|j| ((j * 7 + i * 13) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..6).map(|j| (i * j) as f32).collect();
        let p = dir.path().join(format!("{i}.safetensors"));
        let dtype = if i == 2 { Dtype::BF16 } else { Dtype::F16 };
        let step = [i as u8];
        write_snapshot(
            &p,
            &[
                ("a".into(), vec![n], TensorData::F32(&a)),
                ("b".into(), vec![2, 3], TensorData::F32(&b)),
                ("step".into(), vec![1], TensorData::Raw(Dtype::U8, &step)),
            ],
            dtype,
            &BTreeMap::new(),
        )
        .unwrap();
        headers.push(Source::single(read_header(&p).unwrap()));
        values.push((a, b, dtype));
    }
    let weights = vec![
        vec![0.5, 0.0],
        vec![0.0, 0.0],
        vec![-1.5, 1.0],
        vec![2.0, 0.25],
    ];
    let sink = VecSink(Mutex::new(vec![
        vec![vec![0.0; n], vec![0.0; 6], vec![]];
        2
    ]));
    let plan = Plan::new(weights.clone(), None);
    let stats = combine(&headers, &plan, &sink, &Progress::default()).unwrap();
    assert_eq!(stats.read, vec![0, 2, 3]);
    assert_eq!(stats.raw_mismatch, vec!["step".to_string()]);
    let out = sink.0.into_inner().unwrap();
    let round = |x: f32, d: Dtype| match d {
        Dtype::BF16 => bf16::from_f32(x).to_f32() as f64,
        _ => f16::from_f32(x).to_f32() as f64,
    };
    for k in 0..2 {
        for j in (0..n).step_by(997) {
            let want: f64 = (0..4)
                .map(|i| weights[i][k] * round(values[i].0[j], values[i].2))
                .sum();
            assert!((out[k][0][j] as f64 - want).abs() < 1e-5, "{k} {j}");
        }
        assert_eq!(out[k][2], vec![3.0]); // copied from the last input read
    }
}

#[test]
fn a_file_shrinking_while_read_is_an_error_naming_it_not_a_crash() {
    // Mapped, this read would raise SIGBUS and kill the process (a Python interpreter
    // with it); read with pread it is an ordinary error.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let a = vec![0.5f32; 5000];
    write_snapshot(
        &p,
        &[("a".into(), vec![a.len()], TensorData::F32(&a))],
        Dtype::F16,
        &BTreeMap::new(),
    )
    .unwrap();
    let h = read_header(&p).unwrap();
    let source = Source::single(h.clone());
    let opened = Opened {
        files: vec![open(&h).unwrap()],
        segments: source.align(&layout_of(&source).unwrap()).unwrap(),
    };
    let mut buf = Vec::new();
    assert_eq!(opened.read(0, 0, 5000, &mut buf).unwrap(), Dtype::F16);
    assert!(buf
        .chunks(2)
        .all(|c| f16::from_le_bytes([c[0], c[1]]).to_f32() == 0.5));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(h.file_size / 2)
        .unwrap();
    let err = opened.read(0, 0, 5000, &mut buf).unwrap_err().to_string();
    assert!(
        err.contains("x.safetensors") && err.contains("changed"),
        "{err}"
    );
}

fn two_tensor_snapshot(p: &Path, scale: f32) -> Source {
    let a: Vec<f32> = (0..CHUNK + 3000)
        .map(|j| (j % 113) as f32 * scale)
        .collect();
    let step = [7u8, 0, 0, 0, 0, 0, 0, 0];
    let meta = BTreeMap::from([("phema.t".to_string(), "100".to_string())]);
    write_snapshot(
        p,
        &[
            ("a".into(), vec![a.len()], TensorData::F32(&a)),
            ("step".into(), vec![1], TensorData::Raw(Dtype::I64, &step)),
        ],
        Dtype::F16,
        &meta,
    )
    .unwrap();
    Source::single(read_header(p).unwrap())
}

#[test]
fn a_changed_data_byte_is_an_error_naming_the_file_unless_verification_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<Source> = (0..3)
        .map(|i| two_tensor_snapshot(&dir.path().join(format!("{i}.st")), 0.01 * i as f32))
        .collect();
    let n = inputs[0].files[0]
        .tensors
        .iter()
        .map(|t| t.numel())
        .max()
        .unwrap();
    let run = |skip_verify: bool| {
        let sink = VecSink(Mutex::new(vec![vec![vec![0.0; n], vec![]]]));
        let mut plan = Plan::new(vec![vec![0.25], vec![0.25], vec![0.5]], None);
        plan.skip_verify = skip_verify;
        combine(&inputs, &plan, &sink, &Progress::default()).map(|_| sink.0.into_inner().unwrap())
    };
    let clean = run(false).unwrap();
    // One bit of one element in the middle of the second file's data.
    let h = &inputs[1].files[0];
    let a = h.tensors.iter().find(|t| t.name == "a").unwrap();
    let at = a.offset + 2 * 70000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&h.path)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    let err = run(false).unwrap_err().to_string();
    assert!(err.contains("1.st") && err.contains("checksum"), "{err}");
    let dirty = run(true).unwrap();
    let i = 70000 - a.offset as usize % 2;
    assert_ne!(clean[0][0][i], dirty[0][0][i]);
}

#[test]
fn a_file_replaced_after_listing_by_one_of_the_same_size_and_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.st");
    let listed = two_tensor_snapshot(&p, 0.5);
    std::fs::remove_file(&p).unwrap();
    let now = two_tensor_snapshot(&p, 0.25);
    assert_eq!(now.files[0].tensors, listed.files[0].tensors);
    assert_eq!(now.files[0].file_size, listed.files[0].file_size);
    let n = listed.files[0]
        .tensors
        .iter()
        .map(|t| t.numel())
        .max()
        .unwrap();
    let sink = VecSink(Mutex::new(vec![vec![vec![0.0; n], vec![]]]));
    let mut plan = Plan::new(vec![vec![1.0]], None);
    plan.skip_verify = true;
    let err = combine(&[listed], &plan, &sink, &Progress::default()).unwrap_err();
    assert!(
        err.to_string().contains("x.st") && err.to_string().contains("changed"),
        "{err}"
    );
}

#[test]
fn a_file_changed_after_listing_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let a = vec![1.0f32; 10];
    let write = |v: &[f32]| {
        // Snapshots are never written over: another writer replaces the file.
        let _ = std::fs::remove_file(&p);
        write_snapshot(
            &p,
            &[("a".into(), vec![v.len()], TensorData::F32(v))],
            Dtype::F16,
            &BTreeMap::new(),
        )
        .unwrap()
    };
    write(&a);
    let h = read_header(&p).unwrap();
    write(&a[..5]);
    let sink = VecSink(Mutex::new(vec![vec![vec![0.0; 10]]]));
    let plan = Plan::new(vec![vec![1.0]], None);
    let err = combine(&[Source::single(h)], &plan, &sink, &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("x.safetensors"), "{err}");
}

#[test]
fn every_instruction_set_gives_bit_identical_results() {
    // 23 inputs x 21 targets (groups of 8 plus a remainder), zero weights scattered
    // (skipped, as the reference loop does), a length that is not a multiple of 16; then
    // 150 inputs, whose block length of 13 x 16 ends the AVX-512 kernel with a half step.
    bit_identical_across_instruction_sets(23, 21, 300);
    assert_eq!(block_len(150) % 32, 16);
    bit_identical_across_instruction_sets(150, 9, 500);
}

fn bit_identical_across_instruction_sets(nm: usize, kk: usize, len: usize) {
    let bs = block_len(nm);
    let mut w = vec![0f32; nm * kk];
    for (i, x) in w.iter_mut().enumerate() {
        if i % 7 != 3 {
            *x = ((i * 37 % 101) as f32 - 50.0) / 17.0;
        }
    }
    for k in 0..kk {
        w[5 * kk + k] = 0.0; // one input unused by every target
    }
    let bytes: Vec<Vec<u8>> = (0..nm)
        .map(|m| {
            (0..len)
                .flat_map(|j| {
                    let v = ((j * 31 + m * 7) % 97) as f32 / 13.0 - 3.5;
                    if m % 2 == 0 {
                        f16::from_f32(v).to_le_bytes()
                    } else {
                        bf16::from_f32(v).to_le_bytes()
                    }
                })
                .collect()
        })
        .collect();
    let run = |isa: Isa| {
        let kernel = Kernel::new(isa, &w, nm, kk);
        let mut staged = vec![0f32; nm * bs];
        let mut rows = vec![f32::NAN; kk * len];
        let mut b0 = 0;
        while b0 < len {
            let bl = bs.min(len - b0);
            for (m, x) in staged.chunks_exact_mut(bs).enumerate() {
                let dtype = if m % 2 == 0 { Dtype::F16 } else { Dtype::BF16 };
                decode(
                    isa != Isa::Portable,
                    dtype,
                    &bytes[m][b0 * 2..(b0 + bl) * 2],
                    &mut x[..bl],
                );
            }
            kernel.run(&staged, bs, bl, &mut rows, len, b0);
            b0 += bl;
        }
        rows
    };
    // The reference: the pre-tiling loop order (inputs outer, fma per target, zeros skipped).
    let mut want = vec![0f32; kk * len];
    for m in 0..nm {
        for j in 0..len {
            let c = [bytes[m][2 * j], bytes[m][2 * j + 1]];
            let x = if m % 2 == 0 {
                f16::from_le_bytes(c).to_f32()
            } else {
                bf16::from_le_bytes(c).to_f32()
            };
            for k in 0..kk {
                let wk = w[m * kk + k];
                if wk != 0.0 {
                    want[k * len + j] = x.mul_add(wk, want[k * len + j]);
                }
            }
        }
    }
    let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
    for isa in Isa::available() {
        let got: Vec<u32> = run(isa).iter().map(|x| x.to_bits()).collect();
        assert!(got == want, "{isa:?} differs");
    }
}

fn one_tensor_file(dir: &Path, name: &str, values: &[f32], dtype: Dtype) -> Source {
    let p = dir.join(name);
    write_snapshot(
        &p,
        &[("a".into(), vec![values.len()], TensorData::F32(values))],
        dtype,
        &BTreeMap::new(),
    )
    .unwrap();
    Source::single(read_header(&p).unwrap())
}

#[test]
fn outputs_that_overflow_fp16_or_hold_nan_are_reported_by_name() {
    use crate::output::{FileSink, OutputRequest};
    let dir = tempfile::tempdir().unwrap();
    // Kept in fp32 by the snapshot writer: 70000 does not fit fp16.
    let big = one_tensor_file(
        dir.path(),
        "big.safetensors",
        &[1.0, 70000.0, 2.0],
        Dtype::F16,
    );
    let small = one_tensor_file(
        dir.path(),
        "small.safetensors",
        &[1.0, 2.0, 3.0],
        Dtype::F16,
    );
    let run = |inputs: &[Source], dtype: Dtype| {
        let out = dir.path().join(format!("out-{dtype:?}.safetensors"));
        let requests = [OutputRequest {
            path: out,
            dtype,
            metadata: BTreeMap::new(),
            shard_size: None,
            shard: None,
            stem: None,
        }];
        let w: Vec<Vec<f64>> = inputs.iter().map(|_| vec![1.0]).collect();
        let sink = FileSink::create(&layout_of(&inputs[0]).unwrap(), &requests).unwrap();
        // The NaN is written behind the writer's back: its checksum no longer matches.
        let mut plan = Plan::new(w, None);
        plan.skip_verify = true;
        let stats = combine(inputs, &plan, &sink, &Progress::default()).unwrap();
        sink.finish(&AtomicBool::new(false)).unwrap();
        stats.nonfinite
    };
    assert_eq!(
        run(std::slice::from_ref(&big), Dtype::F16),
        vec!["a".to_string()]
    );
    assert!(run(std::slice::from_ref(&big), Dtype::F32).is_empty());
    assert!(run(&[small.clone(), small.clone()], Dtype::F16).is_empty());
    // NaN in a snapshot's data (written behind the writer's back) passes to every output.
    let p = dir.path().join("nan.safetensors");
    std::fs::copy(&small.files[0].path, &p).unwrap();
    let h = read_header(&p).unwrap();
    let nan = f16::NAN.to_le_bytes();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(&nan, h.tensors[0].offset + 2)
        .unwrap();
    let nan = Source::single(h);
    assert_eq!(run(&[small, nan], Dtype::BF16), vec!["a".to_string()]);
}

#[test]
fn cancellation_is_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = one_tensor_file(dir.path(), "a.safetensors", &[1.0; 10], Dtype::F16);
    let sink = VecSink(Mutex::new(vec![vec![vec![0.0; 10]]]));
    let progress = Progress::default();
    progress.cancel.store(true, Ordering::Relaxed);
    let plan = Plan::new(vec![vec![1.0]], None);
    let err = combine(&[s], &plan, &sink, &progress).unwrap_err();
    assert!(matches!(err, PhemaError::Cancelled), "{err}");
}

#[test]
fn a_weight_matrix_of_the_wrong_shape_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = one_tensor_file(dir.path(), "a.safetensors", &[1.0; 10], Dtype::F16);
    let inputs = [s.clone(), s];
    for w in [
        vec![vec![0.0], vec![0.0], vec![1.0]],
        vec![vec![1.0]],
        vec![vec![1.0], vec![1.0, 2.0]],
        vec![],
    ] {
        let err = output_layout(&inputs, &w).unwrap_err().to_string();
        assert!(err.contains("weights must be 2 x (targets)"), "{err}");
    }
    let err = output_layout(&inputs, &[vec![0.0], vec![0.0]]).unwrap_err();
    assert!(err.to_string().contains("every weight is zero"), "{err}");
    let layout = output_layout(&inputs, &[vec![0.0], vec![2.0]]).unwrap();
    assert_eq!(layout[0].name, "a");
}
