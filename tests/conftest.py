"""Shared fixtures: small synthetic stores written through phema's own writer."""

from __future__ import annotations

import os

# The tests are tiny and run two at a time on a 2-core machine (`make test`: pytest -n 2): a
# second OpenMP thread per process only spins against the other worker (2.7x the CPU time).
# Set before anything imports torch; the ranks and CLIs the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import phema
from phema.store import write_snapshot

SIGMA_RELS = (0.05, 0.10)


def snapshot_metadata(t: float, gamma: float) -> dict[str, str]:
    """docs/store-format.md metadata of a power snapshot."""
    return {
        "phema.version": "1",
        "phema.kind": "power",
        "phema.t": str(t),
        "phema.gamma": repr(gamma),
        "phema.sigma_rel": repr(phema.gamma_to_sigma_rel(gamma)),
    }


def make_store(
    path: str | os.PathLike[str],
    times: list[int],
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    dtype: str = "float16",
) -> dict[tuple[float, float], dict[str, np.ndarray]]:
    """Writes snapshots with random contents; returns {(t, gamma): tensors} as stored (fp32)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    written = {}
    for t in times:
        for s in SIGMA_RELS:
            g = phema.sigma_rel_to_gamma(s)
            tensors = {
                n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()
            }
            tensors["step"] = np.array([t], dtype=np.int64)
            write_snapshot(
                os.path.join(path, f"{t:012d}-{s:.3f}.safetensors"),
                tensors,
                dtype=dtype,
                metadata=snapshot_metadata(t, g),
            )
            written[(float(t), g)] = tensors
    return written


def listing(root) -> dict[str, bytes]:
    """Every file under `root` with its contents."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="session")
def dask_client():
    """One Dask cluster of 2 worker processes for the whole session (starting one takes seconds):
    the tests that kill a worker wait for both again before they end."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture
def small_store(tmp_path):
    """8 times x 2 profiles of a model with a few tensors, one crossing an engine chunk."""
    shapes = {"layer.weight": (64, 33), "layer.bias": (33,), "big": (phema._core.CHUNK + 77,)}
    data = make_store(tmp_path / "store", [100 * i for i in range(1, 9)], shapes)
    return tmp_path / "store", data
