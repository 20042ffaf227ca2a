"""Type stubs of the Rust extension `phema._core` (rust/bindings.rs)."""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np

__version__: str
NOISE_FLOAT16: float
NOISE_BFLOAT16: float
NOISE_FLOAT32: float
CHUNK: int
POOR_CDF_ERROR: float
POOR_NOISE: float

ProfileSpec = tuple[str, float, float, float]  # (power|beta|halflife, t, value, dt)

class StoreError(ValueError):
    """A store, snapshot or output file is unusable; the message names the file."""

class Cancelled(Exception):
    """The work was cancelled (`EngineProgress.cancel`); nothing was written."""

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
def solve_raw(
    times: Sequence[float], targets: Sequence[ProfileSpec], causal: bool = False
) -> dict[str, np.ndarray]: ...
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
) -> tuple[Sources, list[dict[str, Any]], list[tuple[str, str]], list[str], list[str]]: ...

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
    def describe(self) -> list[dict[str, Any]]: ...
    def select(self, indices: Sequence[int]) -> Sources: ...
    def combine_to_files(
        self,
        weights: np.ndarray,
        outputs: Sequence[Mapping[str, Any]],
        progress: EngineProgress,
        copy_from: int | None = None,
        mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
        verify: bool = True,
    ) -> tuple[list[list[str]], dict[str, Any]]: ...
    def combine_to_memory(
        self,
        weights: np.ndarray,
        buffers: Sequence[Sequence[np.ndarray]],
        progress: EngineProgress,
        copy_from: int | None = None,
        mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
        verify: bool = True,
    ) -> dict[str, Any]: ...

def write_file(path: str | PathLike[str], data: bytes) -> None: ...
def verify_checksum(path: str | PathLike[str]) -> tuple[str, str | None, str | None]: ...
def per_rank_to_files(
    inputs: Sequence[Sequence[Sequence[str | PathLike[str]]]],
    weights: np.ndarray,
    outputs: Sequence[Sequence[Mapping[str, Any]]],
    progress: EngineProgress,
    copy_from: int | None = None,
    mix: Sequence[tuple[int, Mapping[str, int]]] | None = None,
    verify: bool = True,
) -> tuple[list[list[list[str]]], dict[str, Any]]: ...
