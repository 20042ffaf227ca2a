"""phema: post-hoc EMA of neural-network weights.

Track a couple of power-function averages during training (`PostHocEMA`), then rebuild the
weights any EMA length or classic decay would have given (`solve`, `reconstruct`), out-of-core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phema._core import Cancelled, StoreError
from phema._core import __version__ as __version__
from phema.checkpoints import average, open_checkpoints
from phema.solver import (
    PoorFitError,
    Solution,
    Target,
    feasible_sigma_rels,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
    solve,
)
from phema.store import SnapshotRecord, Store, open_store
from phema.targets import Targets

if TYPE_CHECKING:
    from phema.importers import import_store
    from phema.reconstruction import (
        load_into,
        reconstruct,
        reconstruct_state_dict,
        reconstruct_state_dicts,
    )
    from phema.sweeps import SweepResult, sweep
    from phema.tracker import PostHocEMA

__all__ = [
    "Cancelled",
    "PostHocEMA",
    "average",
    "open_checkpoints",
    "PoorFitError",
    "feasible_sigma_rels",
    "Solution",
    "SnapshotRecord",
    "Store",
    "StoreError",
    "Target",
    "gamma_to_sigma_rel",
    "import_store",
    "load_into",
    "open_store",
    "reconstruct",
    "reconstruct_state_dict",
    "reconstruct_state_dicts",
    "sigma_rel_to_gamma",
    "solve",
    "sweep",
    "SweepResult",
    "Targets",
]

# Names whose modules import torch: loaded on first use so `import phema` and the CLI stay fast.
_LAZY = {
    "PostHocEMA": "phema.tracker",
    "reconstruct": "phema.reconstruction",
    "reconstruct_state_dict": "phema.reconstruction",
    "reconstruct_state_dicts": "phema.reconstruction",
    "load_into": "phema.reconstruction",
    "sweep": "phema.sweeps",
    "SweepResult": "phema.sweeps",
    "import_store": "phema.importers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'phema' has no attribute {name!r}")
