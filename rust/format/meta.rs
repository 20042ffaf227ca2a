//! The only reader of the `phema.*` keys of a snapshot's `__metadata__`: each is parsed into a
//! typed value, finite and within the bounds of docs/store-format.md, with the file named when
//! it is not.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{PhemaError, Result};
use crate::format::header::Header;
use crate::math::kernel::{Density, Steps};
use crate::math::profile::SIGMA_REL_MAX;

/// Most ranks a sharded snapshot may have (docs/store-format.md).
pub const MAX_WORLD_SIZE: usize = 1 << 16;
/// The keys saying which part of a sharded run a file is: carried into per-rank outputs.
pub const SHARD_KEYS: [&str; 3] = ["phema.rank", "phema.world_size", "phema.shards"];
/// The key of the checksum a snapshot records of itself (see `checksum`).
pub const CHECKSUM: &str = "phema.checksum";
/// Latest `phema.t` a snapshot may have (docs/store-format.md).
pub const MAX_T: f64 = 1e15;
/// Largest `phema.gamma` a snapshot may have (docs/store-format.md).
pub const MAX_GAMMA: f64 = 1e6;
/// Most dimensions a tensor of `phema.shards` may have.
pub const MAX_DIMS: usize = 64;
/// Most steps `phema.steps` may hold: every snapshot's header is read to list a store.
pub const MAX_STORED_STEPS: usize = 100_000;
/// How far the weights of `phema.steps` may sum from 1 (they are written as decimals).
pub const STEPS_SUM_TOL: f64 = 1e-9;

/// What a snapshot holds over training time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A power-function average.
    Power {
        /// Its exponent.
        gamma: f64,
    },
    /// The plain weights at time `t`.
    Raw,
    /// An average of known weights per step (`phema.steps`, read by [`steps`]), e.g. an
    /// ema-pytorch average updated every `k` steps; its width tells two apart.
    Steps {
        /// Its standard deviation over `t`.
        sigma_rel: f64,
    },
}

/// Which part of a sharded snapshot a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardId {
    /// The rank that wrote it.
    pub rank: usize,
    /// How many ranks wrote parts of the same snapshot (at most [`MAX_WORLD_SIZE`]).
    pub world_size: usize,
}

/// The typed `phema.*` metadata of a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SnapshotMeta {
    /// `phema.t`.
    pub t: f64,
    /// `phema.kind` (with `phema.gamma` for a power average).
    pub kind: Kind,
    /// `phema.rank` and `phema.world_size`, for a rank file of sharded training.
    pub shard: Option<ShardId>,
}

/// The place of a local block in its global tensor, from `phema.shards`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Block {
    /// Global shape.
    pub shape: Vec<usize>,
    /// Global index of the block's first element, per dimension.
    pub offset: Vec<usize>,
}

fn bad(header: &Header, key: &str, raw: &str, why: &str) -> PhemaError {
    PhemaError::Metadata {
        path: header.path.clone(),
        key: key.to_string(),
        reason: format!("= {:?} {why}", clip(raw)),
    }
}

/// A value as quoted in messages: long values cut, so one bad file gives one readable line.
fn clip(raw: &str) -> String {
    const MAX: usize = 60;
    match raw.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &raw[..i]),
        None => raw.to_string(),
    }
}

/// `key` as a normal (not subnormal) number up to `max`, or 0 as well with `zero`.
fn number(header: &Header, key: &str, max: f64, zero: bool) -> Result<f64> {
    let raw = header
        .metadata
        .get(key)
        .ok_or_else(|| PhemaError::Metadata {
            path: header.path.clone(),
            key: key.to_string(),
            reason: "is missing".into(),
        })?;
    let v: f64 = raw
        .trim()
        .parse()
        .map_err(|_| bad(header, key, raw, "is not a number"))?;
    // Subnormal values (5e-324) lose their precision in the profiles' powers: no fit is
    // meaningful there.
    if !((v >= f64::MIN_POSITIVE || (zero && v == 0.0)) && v <= max) {
        let low = if zero {
            "0".to_string()
        } else {
            format!("{:e}", f64::MIN_POSITIVE)
        };
        return Err(bad(
            header,
            key,
            raw,
            &format!("must lie in [{low}, {max:e}]"),
        ));
    }
    Ok(v)
}

/// The snapshot metadata of a file; `Ok(None)` when it has no `phema.kind` (not a snapshot).
pub fn snapshot(header: &Header) -> Result<Option<SnapshotMeta>> {
    let Some(kind) = header.metadata.get("phema.kind") else {
        return Ok(None);
    };
    let kind = match kind.as_str() {
        // gamma = 0 is the running mean over (0, t] (docs/kernels.md).
        "power" => Kind::Power {
            gamma: number(header, "phema.gamma", MAX_GAMMA, true)?,
        },
        "raw" => Kind::Raw,
        "steps" => Kind::Steps {
            sigma_rel: Density::Steps(Arc::new(steps(header)?)).sigma_rel(),
        },
        other => {
            return Err(bad(
                header,
                "phema.kind",
                other,
                "is unknown (expected power, raw or steps)",
            ))
        }
    };
    // Raw weights may be the initial ones (t = 0), which BEMA's default burn-in reads.
    let t = number(header, "phema.t", MAX_T, kind == Kind::Raw)?;
    if let Some(raw) = header.metadata.get("phema.sigma_rel") {
        let s: f64 = raw
            .trim()
            .parse()
            .map_err(|_| bad(header, "phema.sigma_rel", raw, "is not a number"))?;
        if !(s > 0.0 && s <= SIGMA_REL_MAX) {
            return Err(bad(
                header,
                "phema.sigma_rel",
                raw,
                &format!("must lie in (0, {SIGMA_REL_MAX:.4}]"),
            ));
        }
    }
    Ok(Some(SnapshotMeta {
        t,
        kind,
        shard: shard_id(header)?,
    }))
}

/// `phema.steps` as written (docs/store-format.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepsJson {
    edges: Vec<f64>,
    weights: Vec<f64>,
}

/// The weights per step of a snapshot of kind `steps`: `phema.steps`, a JSON object
/// `{"edges": [...], "weights": [...]}` of at most [`MAX_STORED_STEPS`] steps, its edges
/// strictly increasing from `>= 0` to `phema.t`, its weights finite, `>= 0`, summing to 1.
pub fn steps(header: &Header) -> Result<Steps> {
    const KEY: &str = "phema.steps";
    let fail = |reason: String| PhemaError::Metadata {
        path: header.path.clone(),
        key: KEY.into(),
        reason,
    };
    let raw = header
        .metadata
        .get(KEY)
        .ok_or_else(|| fail("is missing (a snapshot of kind steps needs it)".into()))?;
    // Bounded before parsing: the header itself may hold 100 MB.
    if raw.len() > 64 * MAX_STORED_STEPS {
        return Err(fail(format!(
            "is {} bytes: at most {MAX_STORED_STEPS} steps are stored",
            raw.len()
        )));
    }
    let json: StepsJson = serde_json::from_str(raw).map_err(|e| {
        fail(format!(
            "is not {{\"edges\": [...], \"weights\": [...]}} ({})",
            clip(&e.to_string())
        ))
    })?;
    if json.weights.len() > MAX_STORED_STEPS {
        return Err(fail(format!(
            "holds {} steps: at most {MAX_STORED_STEPS}",
            json.weights.len()
        )));
    }
    let sum: f64 = json.weights.iter().sum();
    if (sum - 1.0).abs() > STEPS_SUM_TOL {
        return Err(fail(format!(
            "has weights summing to {sum}, not 1 (within {STEPS_SUM_TOL:e})"
        )));
    }
    let t = number(header, "phema.t", MAX_T, false)?;
    if json.edges.last().is_some_and(|&e| (e - t).abs() > 1e-9 * t) {
        return Err(fail(format!(
            "ends at {}, not at phema.t = {t}",
            json.edges[json.edges.len() - 1]
        )));
    }
    Steps::new(json.edges, json.weights).map_err(|e| fail(e.to_string()))
}

/// The rank and world size of a rank file; `Ok(None)` for an ordinary (whole) file.
pub fn shard_id(header: &Header) -> Result<Option<ShardId>> {
    let get = |key: &str| header.metadata.get(key);
    let (rank, world) = match (get("phema.rank"), get("phema.world_size")) {
        (None, None) => return Ok(None),
        (Some(r), Some(w)) => (r, w),
        (r, _) => {
            let (has, lacks) = if r.is_some() {
                ("phema.rank", "phema.world_size")
            } else {
                ("phema.world_size", "phema.rank")
            };
            return Err(PhemaError::Metadata {
                path: header.path.clone(),
                key: has.into(),
                reason: format!("is set but `{lacks}` is not"),
            });
        }
    };
    let whole = |key: &str, raw: &str| {
        raw.trim()
            .parse::<u64>()
            .map_err(|_| bad(header, key, raw, "is not a whole number"))
    };
    let world_size = whole("phema.world_size", world)?;
    if world_size == 0 || world_size > MAX_WORLD_SIZE as u64 {
        return Err(bad(
            header,
            "phema.world_size",
            world,
            &format!("must lie in 1..={MAX_WORLD_SIZE}"),
        ));
    }
    let r = whole("phema.rank", rank)?;
    if r >= world_size {
        return Err(bad(
            header,
            "phema.rank",
            rank,
            &format!("must be below the world size {world_size}"),
        ));
    }
    // Both are at most MAX_WORLD_SIZE.
    Ok(Some(ShardId {
        rank: r as usize,
        world_size: world_size as usize,
    }))
}

/// The blocks of `phema.shards`, by tensor name (empty when absent).
pub fn blocks(header: &Header) -> Result<HashMap<String, Block>> {
    let Some(json) = header.metadata.get("phema.shards") else {
        return Ok(HashMap::new());
    };
    let table: HashMap<String, Block> =
        serde_json::from_str(json).map_err(|e| PhemaError::Metadata {
            path: header.path.clone(),
            key: "phema.shards".into(),
            reason: format!("is not valid shard metadata ({e})"),
        })?;
    if let Some((name, _)) = table
        .iter()
        .find(|(_, b)| b.shape.len() > MAX_DIMS || b.offset.len() > MAX_DIMS)
    {
        return Err(PhemaError::Metadata {
            path: header.path.clone(),
            key: "phema.shards".into(),
            reason: format!("tensor `{name}` has more than {MAX_DIMS} dimensions"),
        });
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn header(pairs: &[(&str, &str)]) -> Header {
        Header {
            path: PathBuf::from("/store/x.safetensors"),
            metadata: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            tensors: Vec::new(),
            file_size: 8,
            version: None,
        }
    }

    fn power(t: &str, gamma: &str) -> Header {
        header(&[
            ("phema.kind", "power"),
            ("phema.t", t),
            ("phema.gamma", gamma),
        ])
    }

    #[test]
    fn absurd_times_and_gammas_are_errors_naming_the_file_and_key() {
        for (t, g, key) in [
            ("1e308", "6.9", "phema.t"),
            ("inf", "6.9", "phema.t"),
            ("NaN", "6.9", "phema.t"),
            ("-5", "6.9", "phema.t"),
            ("5e-324", "6.9", "phema.t"),
            ("1e-310", "6.9", "phema.t"),
            ("100", "1e300", "phema.gamma"),
            ("100", "-1e-9", "phema.gamma"),
            ("0", "6.9", "phema.t"),
            ("100", "nan", "phema.gamma"),
        ] {
            let err = snapshot(&power(t, g)).unwrap_err().to_string();
            assert!(
                err.contains("/store/x.safetensors") && err.contains(key),
                "{t} {g}: {err}"
            );
        }
        let ok = snapshot(&power("4096", "6.94")).unwrap().unwrap();
        assert_eq!((ok.t, ok.kind), (4096.0, Kind::Power { gamma: 6.94 }));
        let cumulative = snapshot(&power("4096", "0")).unwrap().unwrap();
        assert_eq!(cumulative.kind, Kind::Power { gamma: 0.0 });
        let initial = header(&[("phema.kind", "raw"), ("phema.t", "0")]);
        assert_eq!(snapshot(&initial).unwrap().unwrap().t, 0.0);
        let mut h = power("4096", "6.94");
        h.metadata.insert("phema.sigma_rel".into(), "1e300".into());
        assert!(snapshot(&h)
            .unwrap_err()
            .to_string()
            .contains("phema.sigma_rel"));
    }

    #[test]
    fn stepwise_profiles_are_read_checked_and_told_apart_by_width() {
        let steps = |t: &str, json: &str| {
            header(&[
                ("phema.kind", "steps"),
                ("phema.t", t),
                ("phema.steps", json),
            ])
        };
        let ok = snapshot(&steps(
            "300",
            r#"{"edges": [0, 100, 300], "weights": [0.25, 0.75]}"#,
        ))
        .unwrap()
        .unwrap();
        // Mass 1/4 uniform on (0, 100], 3/4 on (100, 300]: moments by hand.
        let m1 = 0.25 * 50.0 + 0.75 * 200.0;
        let m2 = 0.25 * 100.0f64.powi(2) / 3.0
            + 0.75 * (100.0 * 100.0 + 100.0 * 300.0 + 300.0 * 300.0) / 3.0;
        let Kind::Steps { sigma_rel } = ok.kind else {
            panic!("{:?}", ok.kind)
        };
        assert!((sigma_rel - (m2 - m1 * m1).sqrt() / 300.0).abs() < 1e-14);
        let long = format!(
            r#"{{"edges": [{}], "weights": [{}]}}"#,
            (0..=MAX_STORED_STEPS + 1)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            vec!["0"; MAX_STORED_STEPS + 1].join(",")
        );
        for (t, json, why) in [
            (
                "300",
                r#"{"edges": [0, 100, 300], "weights": [0.5, 0.6]}"#,
                "summing to 1.1",
            ),
            (
                "300",
                r#"{"edges": [0, 100, 300], "weights": [1.5, -0.5]}"#,
                "-0.5",
            ),
            (
                "300",
                r#"{"edges": [0, 200, 100, 300], "weights": [0.3, 0.3, 0.4]}"#,
                "increasing",
            ),
            (
                "300",
                r#"{"edges": [0, 100, 200], "weights": [0.5, 0.5]}"#,
                "ends at 200",
            ),
            (
                "300",
                r#"{"edges": [0, 300], "weights": [1], "x": 1}"#,
                "unknown field",
            ),
            ("300", r#"{"edges": [0, 300], "weights": [NaN]}"#, "is not"),
            (
                "300",
                r#"{"edges": [0, 100, 300], "weights": [1]}"#,
                "one more edge",
            ),
            ("300", &long, "at most 100000"),
        ] {
            let e = snapshot(&steps(t, json)).unwrap_err().to_string();
            assert!(
                e.contains("x.safetensors") && e.contains("phema.steps") && e.contains(why),
                "{json:.80}: {e}"
            );
        }
        let missing = header(&[("phema.kind", "steps"), ("phema.t", "3")]);
        assert!(snapshot(&missing)
            .unwrap_err()
            .to_string()
            .contains("is missing"));
    }

    #[test]
    fn absurd_world_sizes_are_one_short_error() {
        for world in [
            "100000000000000000",
            "18446744073709551615",
            "1e17",
            "1000000",
            "0",
        ] {
            let h = header(&[("phema.rank", "0"), ("phema.world_size", world)]);
            let err = shard_id(&h).unwrap_err().to_string();
            assert!(
                err.contains("phema.world_size") && err.contains("x.safetensors"),
                "{world}: {err}"
            );
            assert!(err.len() < 200, "{err}");
        }
        let long = "9".repeat(10_000);
        let h = header(&[("phema.rank", "0"), ("phema.world_size", &long)]);
        assert!(shard_id(&h).unwrap_err().to_string().len() < 200);
        let h = header(&[("phema.rank", "3"), ("phema.world_size", "4")]);
        assert_eq!(
            shard_id(&h).unwrap(),
            Some(ShardId {
                rank: 3,
                world_size: 4
            })
        );
        let h = header(&[("phema.rank", "4"), ("phema.world_size", "4")]);
        assert!(shard_id(&h).unwrap_err().to_string().contains("phema.rank"));
    }
}
