//! Files and objects: the commit rule's moves and copies, object-storage listing, reading,
//! publishing and claims, checksums.

use super::*;

/// Moves files into `directory`, never replacing one there (`output::move_files`).
#[pyfunction]
fn move_files(py: Python<'_>, paths: Vec<PathBuf>, directory: PathBuf) -> PyResult<Vec<PathBuf>> {
    py.detach(|| output::move_files(&paths, &directory))
        .map_err(err)
}

/// Copies `source` to `path` by the same rule (`output::copy_file`).
#[pyfunction]
fn copy_file(py: Python<'_>, source: PathBuf, path: PathBuf) -> PyResult<()> {
    py.detach(|| output::copy_file(&source, &path)).map_err(err)
}

/// Whether `location` is an object-storage URL (`remote::is_url`); anything but a string (a
/// `PathLike`, None) is not.
#[pyfunction]
fn is_url(location: &Bound<'_, PyAny>) -> bool {
    location
        .extract::<String>()
        .is_ok_and(|s| crate::remote::is_url(&s))
}

/// The scheme of a URL phema does not read (`http`, `az`, ...), or None.
#[pyfunction]
fn unsupported_scheme(location: &str) -> Option<String> {
    crate::remote::unsupported_scheme(location).map(str::to_string)
}

/// Objects `(name, size)` and sub-prefixes under a prefix.
type RemoteListing = (Vec<(String, u64)>, Vec<String>);

/// What is directly under the prefix `url`: `([(name, size)], [sub-prefix])`.
#[pyfunction]
fn remote_list(py: Python<'_>, url: &str) -> PyResult<RemoteListing> {
    let listing = py
        .detach(|| crate::remote::Object::parse(url)?.list())
        .map_err(err)?;
    let files = listing.files.into_iter().map(|(n, s, _)| (n, s)).collect();
    Ok((files, listing.dirs))
}

/// The whole (small) object at `url`.
#[pyfunction]
fn remote_read<'py>(py: Python<'py>, url: &str) -> PyResult<Bound<'py, PyBytes>> {
    let bytes = py
        .detach(|| crate::remote::Object::parse(url)?.read_small())
        .map_err(err)?;
    Ok(PyBytes::new(py, &bytes))
}

/// Whether the object at `url` exists.
#[pyfunction]
fn remote_exists(py: Python<'_>, url: &str) -> PyResult<bool> {
    py.detach(|| crate::remote::Object::parse(url)?.exists())
        .map_err(err)
}

/// Deletes the objects at `urls` (absent ones are fine).
#[pyfunction]
fn remote_delete(py: Python<'_>, urls: Vec<String>) -> PyResult<()> {
    py.detach(|| {
        urls.iter()
            .try_for_each(|u| crate::remote::Object::parse(u)?.delete())
    })
    .map_err(err)
}

/// Uploads staged local files to their URLs in order (`remote::publish`).
#[pyfunction]
fn publish(py: Python<'_>, files: Vec<(PathBuf, String)>, create: bool) -> PyResult<()> {
    py.detach(|| crate::remote::publish(&files, create))
        .map_err(err)
}

/// Creates the claim object `url` holding `content` unless one is there; returns what an
/// existing claim holds (`remote::claim`).
#[pyfunction]
fn claim<'py>(py: Python<'py>, url: &str, content: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let found = py
        .detach(|| crate::remote::claim(url, content))
        .map_err(err)?;
    Ok(found.map(|b| PyBytes::new(py, &b)))
}

/// Replaces the file at `path` with `data` in one step (`output::write_file`).
#[pyfunction]
fn write_file(py: Python<'_>, path: PathBuf, data: &[u8]) -> PyResult<()> {
    py.detach(|| output::write_file(&path, data)).map_err(err)
}

/// Verifies the checksum a snapshot records (docs/store-format.md): `("ok" | "not recorded" |
/// "mismatch", recorded, computed)`.
#[pyfunction]
fn verify_checksum(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(&'static str, Option<String>, Option<String>)> {
    use crate::format::checksum::{verify, Verified};
    let found = py.detach(|| verify(&path)).map_err(err)?;
    Ok(match found {
        Verified::Ok => ("ok", None, None),
        Verified::NotRecorded => ("not recorded", None, None),
        Verified::Mismatch { recorded, computed } => ("mismatch", Some(recorded), Some(computed)),
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(verify_checksum, m)?)?;
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(is_url, m)?)?;
    m.add_function(wrap_pyfunction!(unsupported_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(remote_list, m)?)?;
    m.add_function(wrap_pyfunction!(remote_read, m)?)?;
    m.add_function(wrap_pyfunction!(remote_exists, m)?)?;
    m.add_function(wrap_pyfunction!(remote_delete, m)?)?;
    m.add_function(wrap_pyfunction!(publish, m)?)?;
    m.add_function(wrap_pyfunction!(claim, m)?)?;
    m.add_function(wrap_pyfunction!(copy_file, m)?)?;
    m.add_function(wrap_pyfunction!(move_files, m)?)?;
    Ok(())
}
