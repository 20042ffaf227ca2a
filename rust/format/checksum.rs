//! The checksum a snapshot records of itself (`phema.checksum`, docs/store-format.md): XXH3-128
//! of the header JSON, with the checksum's own value zeroed, followed by every byte after it.
//! It is written with the file and verified wherever the engine reads a whole file anyway, and
//! on demand (`phema inspect --verify`): it tells a file changed after it was written (the same
//! size, other data) from the one phema wrote.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use twox_hash::XxHash3_128;

use crate::error::{PhemaError, Result};
use crate::format::header::{parse_header, read_header};
use crate::format::meta::CHECKSUM;

/// The algorithm named in the recorded value.
const ALGORITHM: &str = "xxh3-128:";
/// Hex digits of a digest.
const DIGITS: usize = 32;

/// The value written before the data is known: the same length as the final one, so the header
/// keeps its size when it is filled in.
pub fn placeholder() -> String {
    format!("{ALGORITHM}{}", "0".repeat(DIGITS))
}

/// Hashes a file's bytes in the order they are written.
pub struct Hasher(XxHash3_128);

impl Hasher {
    /// A hasher started on the header JSON (holding the placeholder).
    pub fn new(header_json: &[u8]) -> Self {
        let mut h = XxHash3_128::new();
        h.write(header_json);
        Hasher(h)
    }

    /// Adds the next bytes of data.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The value to record.
    pub fn value(&self) -> String {
        format!(
            "{ALGORITHM}{:0width$x}",
            self.0.finish_128(),
            width = DIGITS
        )
    }
}

/// Where the placeholder's digits sit in `header_json`, if it records a checksum.
pub fn digits_at(header_json: &[u8]) -> Option<usize> {
    let key = format!("\"{CHECKSUM}\":\"{ALGORITHM}");
    header_json
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .map(|p| p + key.len())
        .filter(|&p| p + DIGITS <= header_json.len())
}

/// What verifying a file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verified {
    /// The recorded checksum matches the file.
    Ok,
    /// The file records no checksum (written before phema recorded them, or by another tool).
    NotRecorded,
    /// The file differs from the one that was written.
    Mismatch { recorded: String, computed: String },
}

/// Verifies the checksum `path` records against its contents, reading it in 1 MiB pieces.
pub fn verify(path: &Path) -> Result<Verified> {
    let header = read_header(path)?;
    let Some(recorded) = header.metadata.get(CHECKSUM).cloned() else {
        return Ok(Verified::NotRecorded);
    };
    let io = |e| PhemaError::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(io)?;
    // The length was bounded when the header was read.
    let n = usize::try_from(u64::from_le_bytes(prefix)).unwrap_or(0);
    let mut json = vec![0u8; n];
    file.read_exact(&mut json).map_err(io)?;
    compare(json, recorded, |hasher| {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let got = file.read(&mut buf).map_err(io)?;
            if got == 0 {
                return Ok(());
            }
            hasher.update(&buf[..got]);
        }
    })
}

/// [`verify`] for a whole file held in `bytes` (`path` names it in errors).
pub fn verify_bytes(path: &Path, bytes: &[u8]) -> Result<Verified> {
    let header = parse_header(path, bytes)?;
    let Some(recorded) = header.metadata.get(CHECKSUM).cloned() else {
        return Ok(Verified::NotRecorded);
    };
    // The header parsed, so its declared length fits in `bytes`.
    let n = bytes
        .get(..8)
        .and_then(|p| <[u8; 8]>::try_from(p).ok())
        .map_or(0, |p| usize::try_from(u64::from_le_bytes(p)).unwrap_or(0));
    let (json, rest) = bytes
        .get(8..)
        .unwrap_or_default()
        .split_at(n.min(bytes.len().saturating_sub(8)));
    compare(json.to_vec(), recorded, |hasher| {
        hasher.update(rest);
        Ok(())
    })
}

/// What a mismatch reports when the header holds no checksum digits where the writer puts them.
pub const NOT_IN_PLACE: &str = "(the header does not hold the value where it was written)";

/// A hasher started as the writer started it: on `header_json` with the checksum's digits
/// zeroed (in place). None when the header does not hold them where the writer puts them.
pub fn resume(header_json: &mut [u8]) -> Option<Hasher> {
    let at = digits_at(header_json)?;
    header_json[at..at + DIGITS].fill(b'0');
    Some(Hasher::new(header_json))
}

/// Verifies a file's checksum from the byte ranges a reader takes of it, in any order and from
/// any thread (the engine's work items). The checksum is a hash of the bytes in file order: a
/// range that starts where the hashed prefix ends is hashed at once; for one further on, the
/// bytes before it are read (by `read`) and hashed first, so that nothing is held in memory and
/// a thread that fell behind (descheduled on a busy machine) costs one re-read of its own range,
/// not a copy of every range the others take meanwhile. Ranges the prefix has passed are skipped.
pub struct InOrder {
    recorded: String,
    /// The hasher and where its prefix ends.
    state: Mutex<(Hasher, u64)>,
}

impl InOrder {
    /// The check of a file whose header JSON (as stored, after its 8-byte length) is
    /// `header_json` against `recorded`; None when the header does not hold the checksum's
    /// digits where the writer puts them.
    pub fn new(header_json: &[u8], recorded: String) -> Option<Self> {
        let mut json = header_json.to_vec();
        let hasher = resume(&mut json)?;
        Some(InOrder {
            recorded,
            state: Mutex::new((hasher, 8 + json.len() as u64)),
        })
    }

    /// Takes `bytes`, found at byte `at` of the file; `read(at, buf)` fills `buf` from the file.
    pub fn take(
        &self,
        at: u64,
        bytes: &[u8],
        read: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        let (hasher, cursor) = &mut *st;
        let end = at + bytes.len() as u64;
        if end <= *cursor {
            return Ok(());
        }
        if at > *cursor {
            hash_from(hasher, cursor, at, read)?;
        }
        // `*cursor` is now within `at..end`.
        hasher.update(&bytes[(*cursor - at) as usize..]);
        *cursor = end;
        Ok(())
    }

    /// Hashes the rest of a file of `size` bytes and compares with the recorded value.
    pub fn finish(
        &self,
        size: u64,
        read: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Verified> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        let (hasher, cursor) = &mut *st;
        hash_from(hasher, cursor, size, read)?;
        let computed = hasher.value();
        Ok(if computed == self.recorded {
            Verified::Ok
        } else {
            Verified::Mismatch {
                recorded: self.recorded.clone(),
                computed,
            }
        })
    }
}

/// Reads bytes `*cursor..to` with `read` into `hasher`, in pieces of at most 1 MiB.
fn hash_from(
    hasher: &mut Hasher,
    cursor: &mut u64,
    to: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; to.saturating_sub(*cursor).min(1 << 20) as usize];
    while *cursor < to {
        let n = (to - *cursor).min(buf.len() as u64) as usize;
        read(*cursor, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        *cursor += n as u64;
    }
    Ok(())
}

fn poisoned() -> PhemaError {
    PhemaError::Invalid("a checksum check failed in another thread".into())
}

/// Hashes the header JSON (its checksum digits zeroed) and what `rest` feeds, against `recorded`.
fn compare(
    mut json: Vec<u8>,
    recorded: String,
    rest: impl FnOnce(&mut Hasher) -> Result<()>,
) -> Result<Verified> {
    let Some(mut hasher) = resume(&mut json) else {
        return Ok(Verified::Mismatch {
            recorded,
            computed: NOT_IN_PLACE.into(),
        });
    };
    rest(&mut hasher)?;
    let computed = hasher.value();
    Ok(if computed == recorded {
        Verified::Ok
    } else {
        Verified::Mismatch { recorded, computed }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{write_snapshot, TensorData};
    use safetensors::Dtype;
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileExt;

    fn write(path: &Path) {
        let a: Vec<f32> = (0..3000).map(|i| i as f32 / 7.0).collect();
        let step = 5i64.to_le_bytes();
        let meta = BTreeMap::from([("phema.t".to_string(), "100".to_string())]);
        write_snapshot(
            path,
            &[
                ("a".into(), vec![3000], TensorData::F32(&a)),
                ("step".into(), vec![1], TensorData::Raw(Dtype::I64, &step)),
            ],
            Dtype::F16,
            &meta,
        )
        .unwrap();
    }

    #[test]
    fn a_written_snapshot_verifies_and_any_changed_byte_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        write(&p);
        assert_eq!(verify(&p).unwrap(), Verified::Ok);
        let original = std::fs::read(&p).unwrap();
        assert_eq!(verify_bytes(&p, &original).unwrap(), Verified::Ok);
        let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        let t_at = original
            .windows(13)
            .position(|w| w == b"\"phema.t\":\"10")
            .unwrap();
        // A data byte, the last byte, and a metadata value of the same length.
        for (at, byte) in [
            (8 + header_len + 100, None),
            (original.len() - 1, None),
            (t_at + 12, Some(b'9')),
        ] {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let new = byte.unwrap_or(original[at] ^ 1);
            f.write_all_at(&[new], at as u64).unwrap();
            assert!(
                matches!(verify(&p).unwrap(), Verified::Mismatch { .. }),
                "byte {at}"
            );
            let changed = std::fs::read(&p).unwrap();
            assert!(matches!(
                verify_bytes(&p, &changed).unwrap(),
                Verified::Mismatch { .. }
            ));
            f.write_all_at(&original[at..at + 1], at as u64).unwrap();
            assert_eq!(verify(&p).unwrap(), Verified::Ok);
        }
    }

    /// XXH3-128 (seed 0) of `(31 i + 7) mod 256` for `i < n`, from the reference C library
    /// (xxHash 0.8, `XXH3_128bits`): the values every stored checksum was computed as.
    const REFERENCE: [(usize, &str); 12] = [
        (0, "99aa06d3014798d86001c324468d497f"),
        (1, "495b62073ef70ca44c5cca45d0f4811f"),
        (3, "46f66cb93538156515f7093b173d005c"),
        (16, "650fe308c566747df853dd94614dfa07"),
        (17, "18217300b5132d5a78c349fe81b2f26c"),
        (128, "b4f87b99d2db8a511e04fad9f0cacb4d"),
        (129, "6881633650cd8924c51bc887976aef63"),
        (240, "de57aab31e77a2ff93e173833f75ab66"),
        (241, "92b991a7192f3f080b3b630948ce4a00"),
        (1024, "4c17271c906df79223bc880ebf0d29c6"),
        (1025, "70a4eb1b9691d77fc09fdfbc398c7d82"),
        (100_003, "cb5ebd34f7252f19e0950e66cf107fe8"),
    ];

    #[test]
    fn the_hash_is_the_reference_xxh3_128_fed_whole_or_in_any_pieces() {
        for (n, want) in REFERENCE {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
            let want = format!("{ALGORITHM}{want}");
            assert_eq!(Hasher::new(&bytes).value(), want, "{n} bytes whole");
            // Pieces that straddle the 64-byte stripes and 1024-byte blocks of XXH3.
            for piece in [1, 7, 63, 65, 1000, 4099] {
                let first = piece.min(n);
                let mut h = Hasher::new(&bytes[..first]);
                for chunk in bytes[first..].chunks(piece) {
                    h.update(chunk);
                }
                assert_eq!(h.value(), want, "{n} bytes in pieces of {piece}");
            }
        }
    }

    /// Takes `ranges` of `file` (a written snapshot's bytes) into a fresh check, the ranges
    /// split between `threads` threads; `piece` may change a taken piece. Returns what the
    /// check found and how many bytes it read from `file` itself.
    fn check_ranges(
        file: &[u8],
        ranges: &[(u64, u64)],
        threads: usize,
        piece: impl Fn(u64, &mut Vec<u8>) + Sync,
    ) -> (Verified, u64) {
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let json = &file[8..8 + n];
        let recorded = parse_header(Path::new("x"), file).unwrap().metadata[CHECKSUM].clone();
        let check = InOrder::new(json, recorded).unwrap();
        let reread = std::sync::atomic::AtomicU64::new(0);
        let read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&file[at as usize..at as usize + buf.len()]);
            reread.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        };
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (check, piece) = (&check, &piece);
                scope.spawn(move || {
                    for &(at, len) in ranges.iter().skip(t).step_by(threads) {
                        let mut bytes = file[at as usize..(at + len) as usize].to_vec();
                        piece(at, &mut bytes);
                        check.take(at, &bytes, read).unwrap();
                    }
                });
            }
        });
        let found = check.finish(file.len() as u64, read).unwrap();
        (found, reread.into_inner())
    }

    #[test]
    fn ranges_taken_in_any_order_from_any_thread_verify_and_a_changed_byte_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        write(&p);
        let file = std::fs::read(&p).unwrap();
        let data = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
        let size = file.len() as u64;
        // The data in ranges of 700 bytes, less the last 50 bytes (never taken: read at the end).
        let ranges: Vec<(u64, u64)> = (data..size - 50)
            .step_by(700)
            .map(|at| (at, 700.min(size - 50 - at)))
            .collect();
        let same = |_: u64, _: &mut Vec<u8>| {};
        // In file order nothing is read again but the bytes never taken.
        assert_eq!(check_ranges(&file, &ranges, 1, same), (Verified::Ok, 50));
        // Backwards: the first range taken (the last) reads everything before it.
        let back: Vec<_> = ranges.iter().rev().copied().collect();
        let (found, reread) = check_ranges(&file, &back, 1, same);
        assert_eq!(
            (found, reread),
            (Verified::Ok, size - data - ranges[ranges.len() - 1].1)
        );
        // Shuffled, some taken twice, some overlapping their neighbours, from four threads.
        let mut mixed: Vec<(u64, u64)> = ranges.clone();
        mixed.extend(ranges.iter().step_by(5).map(|&(at, len)| (at + 3, len)));
        mixed.extend(ranges.iter().step_by(7).copied());
        let n = mixed.len();
        let mixed: Vec<_> = (0..n).map(|i| mixed[(i * 37) % n]).collect();
        assert_eq!(check_ranges(&file, &mixed, 4, same).0, Verified::Ok);
        // A changed byte in a taken range that is hashed: in order, and taken first when
        // backwards.
        let target = ranges[ranges.len() - 1].0;
        let flip = |at: u64, b: &mut Vec<u8>| {
            if at == target {
                b[5] ^= 1;
            }
        };
        for order in [&ranges, &back] {
            let (found, _) = check_ranges(&file, order, 1, flip);
            assert!(matches!(found, Verified::Mismatch { .. }));
        }
        // A changed byte in the file where no range is taken, and where one is.
        for at in [size - 10, data + 1000] {
            let mut changed = file.clone();
            changed[at as usize] ^= 0x40;
            let (found, _) = check_ranges(&changed, &back, 3, same);
            assert!(matches!(found, Verified::Mismatch { .. }), "byte {at}");
        }
    }

    #[test]
    fn a_file_without_a_checksum_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain.safetensors");
        let data = safetensors::tensor::TensorView::new(Dtype::U8, vec![2], &[1, 2]).unwrap();
        safetensors::serialize_to_file([("x", data)], None, &p).unwrap();
        assert_eq!(verify(&p).unwrap(), Verified::NotRecorded);
    }
}
