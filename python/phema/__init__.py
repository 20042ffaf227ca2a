"""phema: post-hoc EMA of neural-network weights.

Track a couple of power-function averages during training (`PostHocEMA`), then rebuild the
weights any EMA length or classic decay would have given (`solve`, `reconstruct`), out-of-core.
"""

from __future__ import annotations

import typing

from phema._core import __version__ as __version__
from phema.average import average
from phema.errors import (
    Cancelled,
    InvalidTypeError,
    InvalidValueError,
    PhemaError,
    SourceError,
    StorageError,
    StoreError,
)
from phema.importers import import_store
from phema.reconstruction import (
    Reconstruction,
    reconstruct,
    reconstruct_state_dict,
    reconstruct_state_dicts,
)
from phema.solver import (
    PoorFitError,
    Solution,
    Target,
    feasible_sigma_rels,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)
from phema.store import SnapshotRecord, Store, open_checkpoints, open_store
from phema.targets import Targets, solve

if typing.TYPE_CHECKING:
    from phema.load import load_into
    from phema.sweeps import SweepResult, sweep
    from phema.tracker import PostHocEMA, SnapshotWriteError

__all__ = [
    "Cancelled",
    "InvalidTypeError",
    "InvalidValueError",
    "PhemaError",
    "PoorFitError",
    "PostHocEMA",
    "Reconstruction",
    "SnapshotRecord",
    "SnapshotWriteError",
    "Solution",
    "SourceError",
    "StorageError",
    "Store",
    "StoreError",
    "SweepResult",
    "Target",
    "Targets",
    "average",
    "feasible_sigma_rels",
    "gamma_to_sigma_rel",
    "import_store",
    "load_into",
    "open_checkpoints",
    "open_store",
    "reconstruct",
    "reconstruct_state_dict",
    "reconstruct_state_dicts",
    "sigma_rel_to_gamma",
    "solve",
    "sweep",
]

# Names whose modules import torch: loaded on first use so `import phema` and the CLI stay fast.
_LAZY = {
    "PostHocEMA": "phema.tracker",
    "SnapshotWriteError": "phema.tracker",
    "load_into": "phema.load",
    "sweep": "phema.sweeps",
    "SweepResult": "phema.sweeps",
}


def __getattr__(name: str) -> typing.Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phema' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"} | {n for n in globals() if n.startswith("__")})
