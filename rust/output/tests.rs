use super::commit::*;
use super::layout::*;
use super::sink::*;
use super::writer::*;
use crate::engine::Sink;
use crate::format::header::TensorEntry;
use half::f16;
use safetensors::Dtype;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn meta() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

#[test]
fn snapshot_round_trips_through_the_safetensors_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let w: Vec<f32> = (0..1000).map(|i| i as f32 * 0.37 - 100.0).collect();
    let big = [1e5f32, -3.0];
    let steps = 7i64.to_le_bytes();
    let tensors = vec![
        ("w".to_string(), vec![10, 100], TensorData::F32(&w)),
        ("big".to_string(), vec![2], TensorData::F32(&big)),
        (
            "steps".to_string(),
            vec![],
            TensorData::Raw(Dtype::I64, &steps),
        ),
    ];
    let promoted = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap();
    assert_eq!(promoted, vec!["big".to_string()]);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("w").unwrap();
    assert_eq!(t.dtype(), Dtype::F16);
    assert_eq!(t.shape(), &[10, 100]);
    for (i, c) in t.data().chunks(2).enumerate() {
        let v = f16::from_le_bytes([c[0], c[1]]).to_f32();
        assert!((v - w[i]).abs() <= w[i].abs() * 1e-3, "{i}");
    }
    assert_eq!(st.tensor("big").unwrap().dtype(), Dtype::F32);
    assert_eq!(st.tensor("steps").unwrap().data(), &steps);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
    // Only the final file is left.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn nan_is_refused_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let bad = [1.0f32, f32::NAN];
    let tensors = vec![("layer.bias".to_string(), vec![2], TensorData::F32(&bad))];
    let err = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap_err();
    assert!(err.to_string().contains("layer.bias"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn dropped_writer_removes_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let spec = TensorSpec {
        name: "x".into(),
        dtype: Dtype::F32,
        shape: vec![4],
    };
    let w = SafetensorsWriter::create(&path, &[spec], &meta()).unwrap();
    let names = || -> Vec<String> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        matches!(names().as_slice(), [n] if n.starts_with(".a.safetensors.tmp-")),
        "{:?}",
        names()
    );
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn unwritable_directory_is_an_error_naming_the_file() {
    let path = Path::new("/nonexistent-dir/x.safetensors");
    let err = write_snapshot(path, &[], Dtype::F16, &meta()).unwrap_err();
    assert!(err.to_string().contains("nonexistent-dir"), "{err}");
}

#[test]
fn temporary_names_are_unique_per_writer_and_carry_host_and_pid() {
    let path = Path::new("/d/a.safetensors");
    let names: std::collections::HashSet<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..100).map(|_| temporary_path(path)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(names.len(), 400);
    let one = temporary_path(path);
    let name = one.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with(&format!(".a.safetensors.tmp-{}-", host())),
        "{name}"
    );
    assert_eq!(temporary_pid(name), Some(std::process::id() as i32));
    assert_eq!(temporary_pid(".a.safetensors.tmp-otherhost-12-0"), None);
    assert_eq!(temporary_pid("a.safetensors"), None);
}

#[test]
fn a_snapshot_never_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    std::fs::write(&path, b"another writer's").unwrap();
    let v = [1.0f32];
    let tensors = vec![("w".to_string(), vec![1], TensorData::F32(&v))];
    let err = write_snapshot(&path, &tensors, Dtype::F16, &meta()).unwrap_err();
    assert!(err.to_string().contains("a.safetensors"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"another writer's");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // The fallback for file systems without RENAME_NOREPLACE behaves the same.
    let tmp = dir.path().join("t");
    std::fs::write(&tmp, b"new").unwrap();
    assert!(rename_no_replace(&tmp, &path).is_err());
    rename_no_replace(&tmp, &dir.path().join("b")).unwrap();
    assert!(!tmp.exists());
}

#[test]
fn temporaries_of_dead_writers_on_this_host_are_removed_others_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let host = host();
    let me = std::process::id();
    let stale = format!(".a.safetensors.tmp-{host}-{dead}-3");
    let kept = [
        format!(".a.safetensors.tmp-{host}-{me}-7"),
        format!(".a.safetensors.tmp-{host}-1-0"),
        format!(".a.safetensors.tmp-not{host}-{dead}-3"),
        format!(".a.safetensors.tmp-{dead}"),
        "x.safetensors".to_string(),
    ];
    for n in kept.iter().chain([&stale]) {
        std::fs::write(dir.path().join(n), b"x").unwrap();
    }
    let spec = TensorSpec {
        name: "x".into(),
        dtype: Dtype::F32,
        shape: vec![1],
    };
    let w = SafetensorsWriter::create(&dir.path().join("b.safetensors"), &[spec], &meta()).unwrap();
    drop(w);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want = kept.to_vec();
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn a_failed_commit_puts_back_the_outputs_it_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let layout = vec![TensorEntry {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![4],
        offset: 0,
        nbytes: 16,
    }];
    let request = |name: &str| OutputRequest {
        path: dir.path().join(name),
        dtype: Dtype::F32,
        metadata: meta(),
        shard_size: None,
        shard: None,
        stem: None,
    };
    std::fs::write(dir.path().join("a.safetensors"), b"earlier output").unwrap();
    let sink = FileSink::create(
        &layout,
        &[request("a.safetensors"), request("b.safetensors")],
    )
    .unwrap();
    for k in 0..2 {
        sink.put(k, 0, 0, &[0u8; 16]).unwrap();
    }
    // Target b's temporary file vanishes before the commit: its rename fails.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with(".b.safetensors.tmp-") {
            std::fs::remove_file(dir.path().join(name)).unwrap();
        }
    }
    assert!(sink.finish(&AtomicBool::new(false)).is_err());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["a.safetensors".to_string()]);
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        b"earlier output"
    );
}
