"""Training side: track power-function EMA profiles of a model and store snapshots of them.

`PostHocEMA` (module `ema`) is the facade over the modules below it, each one concern:
`profiles` (sigma_rel / gamma, time, lerp weights), `model` (which tensors, wrappers, the
model-still-holds-them check), `accumulators` (the fp32 averages: fused updates, offload,
copy-out, swap), `state` (state_dict and its checks), `writer` (the snapshot thread, its
failures, one run per store) and `distributed` (DTensor shards, meshes, ranks, the run id all
ranks share). Only the names exported here are public.
"""

from phema.tracker.ema import PostHocEMA
from phema.tracker.profiles import MAX_PROFILES
from phema.tracker.writer import MAX_PENDING, SnapshotWriteError

__all__ = ["MAX_PENDING", "MAX_PROFILES", "PostHocEMA", "SnapshotWriteError"]
