"""Type stubs of the Rust extension `phema._core` (rust/bindings.rs)."""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, TypedDict

import numpy as np
from typing_extensions import NotRequired

__version__: str
NOISE_FLOAT16: float
NOISE_BFLOAT16: float
NOISE_FLOAT32: float
CHUNK: int
POOR_CDF_ERROR: float
POOR_NOISE: float
MAX_STORED_STEPS: int
RAW_MIN_RESOLUTION: float

ProfileSpec = tuple[str, float, float, float]  # (power|beta|halflife, t, value, dt)

class PhemaError(Exception):
    """The base of every error phema raises for a value, file or store it cannot use."""

class StoreError(PhemaError, ValueError):
    """A store, snapshot or output file is unusable; the message names the file."""

class InvalidValueError(PhemaError, ValueError):
    """A value given to phema is out of range or cannot be used; the message names it."""

class StorageError(PhemaError, OSError):
    """Reading or writing a file failed; the message names the file and the cause."""

class Cancelled(PhemaError):
    """The work was cancelled (`EngineProgress.cancel`); nothing was written."""

class OutputRequest(TypedDict):
    """One output the engine writes."""

    path: str
    dtype: str  # F16, BF16 or F32
    metadata: Mapping[str, str]
    shard_size: NotRequired[int | None]
    stem: NotRequired[str | None]  # shard names' stem (default `model`)
    shard: NotRequired[int]  # write only this shard (a distributed task)

class Described(TypedDict):
    """One input as `Sources.describe` gives it."""

    path: str
    files: list[str]
    sharded: bool
    metadata: dict[str, str]
    file_size: int
    tensors: list[tuple[str, str, list[int]]]  # (name, dtype, shape)

class SnapshotListing(Described):
    """One snapshot as `scan_store` lists it."""

    t: float
    gamma: float | None
    kind: str  # power, raw or steps
    sigma_rel: NotRequired[float]  # kind steps: its width
    steps: NotRequired[tuple[list[float], list[float]]]  # kind steps: (edges, weights)

class EngineStats(TypedDict):
    """What one engine run read and found."""

    read: list[int]
    bytes_read: int
    raw_mismatch: list[str]
    nonfinite: list[str]

def sigma_rel_to_gamma(sigma_rel: float) -> float: ...
def gamma_to_sigma_rel(gamma: float) -> float: ...
def profile_density(spec: ProfileSpec, tau: np.ndarray) -> np.ndarray: ...
def profile_info(spec: ProfileSpec) -> tuple[float, float]: ...
def inner(p: ProfileSpec, q: ProfileSpec) -> float: ...
def solve(
    snapshot_t: Sequence[float],
    snapshot_gamma: Sequence[float],
    targets: Sequence[ProfileSpec],
    noise: float,
    causal: bool = False,
) -> dict[str, np.ndarray]: ...
def solve_kernels(
    snapshots: Sequence[tuple[str, float, float, tuple[Sequence[float], Sequence[float]] | None]],
    kernels: Sequence[tuple[str, float, Sequence[float], str]],
    noise: float,
    causal: bool = False,
) -> dict[str, np.ndarray]:
    """Snapshots `(power|raw|steps, t, gamma, (edges, weights) | None)`; kernels
    `(kind, t, params, shape)`: power [gamma], beta [beta, dt], halflife [halflife],
    window [width], last [count], merge [width] + shape (shape `table`: [width, f(0), ...,
    f(1)], f sampled evenly), bema [tau, phi, kappa, eta, rho, gamma]."""

def solve_raw(
    times: Sequence[float], targets: Sequence[ProfileSpec], causal: bool = False
) -> dict[str, np.ndarray]:
    """Weights on plain checkpoints at `times` for every target: `weights`, `fit_error`,
    `resolution`, `extrapolated_mass`, `initial_mass`, `sigma_rel`, and `poor` (fewer than
    `RAW_MIN_RESOLUTION` checkpoints per target width)."""

def shard_layout(
    path: str | PathLike[str],
) -> tuple[int, int, dict[str, tuple[list[int], list[int]]]] | None: ...
def write_snapshot(
    path: str | PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    dtype: str,
    metadata: Mapping[str, str],
) -> list[str]: ...
def scan_store(
    path: str | PathLike[str],
) -> tuple[Sources, list[SnapshotListing], list[tuple[str, str]], list[str], list[str]]: ...

class EngineProgress:
    def __init__(self) -> None: ...
    @property
    def bytes_done(self) -> int: ...
    def cancel(self) -> None: ...

class Sources:
    def __init__(
        self, inputs: Sequence[Sequence[str | PathLike[str]]], local: bool = False
    ) -> None: ...
    def __len__(self) -> int: ...
    def describe(self) -> list[Described]: ...
    def files(self) -> list[list[str]]: ...
    def select(self, indices: Sequence[int]) -> Sources: ...
    def combine_to_files(
        self,
        weights: np.ndarray,
        outputs: Sequence[OutputRequest],
        progress: EngineProgress,
        copy_from: int | None = None,
        mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
        verify: bool = True,
    ) -> tuple[list[list[str]], EngineStats]: ...
    def output_files(
        self, weights: np.ndarray, output: OutputRequest
    ) -> tuple[list[tuple[str, list[str]]], str | None]: ...
    def commit_staged(
        self,
        weights: np.ndarray,
        finals: Sequence[OutputRequest],
        staged: Sequence[OutputRequest],
    ) -> list[list[str]]: ...
    def combine_to_memory(
        self,
        weights: np.ndarray,
        buffers: Sequence[Sequence[np.ndarray]],
        progress: EngineProgress,
        copy_from: int | None = None,
        mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
        verify: bool = True,
    ) -> EngineStats: ...

def write_file(path: str | PathLike[str], data: bytes) -> None: ...
def is_url(location: object) -> bool: ...
def check_location(location: str) -> None: ...
def remote_list(url: str) -> tuple[list[tuple[str, int]], list[str]]: ...
def remote_read(url: str) -> bytes: ...
def remote_exists(url: str) -> bool: ...
def remote_delete(urls: Sequence[str]) -> None: ...
def publish(files: Sequence[tuple[str | PathLike[str], str]], create: bool) -> None: ...
def claim(url: str, content: bytes) -> bytes | None: ...
def copy_file(source: str | PathLike[str], path: str | PathLike[str]) -> None: ...
def move_files(
    paths: Sequence[str | PathLike[str]], directory: str | PathLike[str]
) -> list[str]: ...
def verify_checksum(path: str | PathLike[str]) -> tuple[str, str | None, str | None]: ...
def per_rank_to_files(
    inputs: Sequence[Sequence[Sequence[str | PathLike[str]]]],
    weights: np.ndarray,
    outputs: Sequence[Sequence[Mapping[str, Any]]],
    progress: EngineProgress,
    copy_from: int | None = None,
    mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
    verify: bool = True,
) -> tuple[list[list[list[str]]], EngineStats]: ...
