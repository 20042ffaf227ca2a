//! The Python extension `phema._core`: type conversion and releasing the interpreter around long
//! work. No logic of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use numpy::{
    IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArray1,
    PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};
use safetensors::Dtype;

use crate::engine::{self, Progress, Source};
use crate::error::PhemaError as CoreError;
use crate::math::kernel::{self, Kernel};
use crate::math::profile::{self, Profile};
use crate::math::solve::{self as solver, SolveOptions};
use crate::ops;
use crate::output::{self, OutputRequest, TensorData};
use crate::store::{self, Header};

create_exception!(
    phema,
    PhemaError,
    PyException,
    "The base of every error phema raises for a value, file or store it cannot use; the message \
     names it."
);

create_exception!(
    phema,
    Cancelled,
    PhemaError,
    "The work was cancelled (`EngineProgress.cancel`); nothing was written."
);

/// The error classes with a builtin base beside `PhemaError`, so that `except ValueError` and
/// `except OSError` code written before the base existed keeps catching them.
struct Errors {
    store: Py<PyType>,
    invalid: Py<PyType>,
    storage: Py<PyType>,
}

static ERRORS: PyOnceLock<Errors> = PyOnceLock::new();

/// `class NAME(PhemaError, BUILTIN)` in module `phema`.
fn subclass(
    py: Python<'_>,
    name: &str,
    builtin: Bound<'_, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, [py.get_type::<PhemaError>(), builtin])?;
    let dict = PyDict::new(py);
    dict.set_item("__doc__", doc)?;
    dict.set_item("__module__", "phema")?;
    let made = py.get_type::<PyType>().call1((name, bases, dict))?;
    Ok(made.cast_into::<PyType>()?.unbind())
}

fn errors(py: Python<'_>) -> PyResult<&Errors> {
    ERRORS.get_or_try_init(py, || {
        Ok(Errors {
            store: subclass(
                py,
                "StoreError",
                py.get_type::<PyValueError>(),
                "A store, snapshot or output file is unusable; the message names the file.",
            )?,
            invalid: subclass(
                py,
                "InvalidValueError",
                py.get_type::<PyValueError>(),
                "A value given to phema is out of range or cannot be used; the message names it.",
            )?,
            storage: subclass(
                py,
                "StorageError",
                py.get_type::<PyOSError>(),
                "Reading or writing a file failed; the message names the file and the cause.",
            )?,
        })
    })
}

/// A value the caller passed that the binding cannot convert, as `InvalidValueError`.
fn invalid(message: impl Into<String>) -> PyErr {
    err(CoreError::Invalid(message.into()))
}

fn err(e: CoreError) -> PyErr {
    Python::attach(|py| {
        let ty = match errors(py) {
            Ok(errors) => match e {
                CoreError::Io { .. } | CoreError::Remote { .. } => &errors.storage,
                CoreError::Corrupt { .. }
                | CoreError::Store(_)
                | CoreError::Metadata { .. }
                | CoreError::Overflow { .. } => &errors.store,
                CoreError::Cancelled => return Cancelled::new_err(e.to_string()),
                CoreError::OutOfRange { .. } | CoreError::Invalid(_) | CoreError::Unsolvable(_) => {
                    &errors.invalid
                }
            },
            Err(made) => return made,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| invalid(format!("unknown safetensors dtype {name:?}")))
}

fn dtype_name(d: Dtype) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{d:?}"))
}

mod math;
mod sources;
mod storage;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let py = m.py();
    m.add("PhemaError", py.get_type::<PhemaError>())?;
    let errors = errors(py)?;
    m.add("StoreError", errors.store.bind(py))?;
    m.add("InvalidValueError", errors.invalid.bind(py))?;
    m.add("StorageError", errors.storage.bind(py))?;
    m.add("Cancelled", m.py().get_type::<Cancelled>())?;
    m.add("NOISE_FLOAT16", solver::NOISE_FLOAT16)?;
    m.add("NOISE_BFLOAT16", solver::NOISE_BFLOAT16)?;
    m.add("NOISE_FLOAT32", solver::NOISE_FLOAT32)?;
    m.add("CHUNK", engine::CHUNK)?;
    m.add("POOR_CDF_ERROR", solver::POOR_CDF_ERROR)?;
    m.add("POOR_NOISE", solver::POOR_NOISE)?;
    m.add("MAX_STORED_STEPS", crate::format::meta::MAX_STORED_STEPS)?;
    m.add("RAW_MIN_RESOLUTION", solver::RAW_MIN_RESOLUTION)?;
    math::register(m)?;
    sources::register(m)?;
    storage::register(m)?;
    Ok(())
}
