"""Loading averaged weights into a torch model: plain, wrapped or sharded (FSDP2, DTensor)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from phema import _core, naming
from phema.errors import InvalidTypeError, InvalidValueError
from phema.files import checkpoint_files
from phema.tracker.distributed import dtensor_class, sharding
from phema.tracker.model import unwrap


def _load_source(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(source, Mapping):
        return dict(source), {}
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for path in checkpoint_files(source):
        f = _open_weights(path)
        meta = f.metadata() or {}
        try:
            sd.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
        except Exception as e:  # safetensors' errors do not name the file
            raise InvalidValueError(f"{path}: unreadable safetensors data ({e})") from None
    return sd, meta


def _as_tensors(sd: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    """A state dict's entries as tensors (numpy arrays taken as they are); anything else is one
    error naming the entry."""
    out = {}
    for name, v in sd.items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(name, str):
            raise InvalidTypeError(f"state dict key {name!r} is a {type(name).__name__}, not a str")
        if not isinstance(v, torch.Tensor):
            raise InvalidTypeError(
                f"state dict entry {name!r} is a {type(v).__name__}: load_into takes a mapping "
                "of names (str) to tensors or numpy arrays"
            )
        out[name] = v
    return out


def load_into(
    model: torch.nn.Module,
    source: Any,
    strict: bool = True,
    *,
    prefix: str = "",
    strip_prefix: str = "",
) -> torch.nn.Module:
    """Loads averaged weights (a file, a directory with one or a sharded index — a `like=`
    output, a transformers, diffusers or Trainer checkpoint directory — or a state dict) into
    `model`, casting to each parameter's dtype and device. Missing or unexpected names and
    shape mismatches are one clear error.

    `strip_prefix` removes a prefix the file's names carry and the model's lack (a Lightning
    checkpoint's `model.`); `prefix` adds one the model's names carry (loading a plain model's
    weights into the LightningModule that wraps it as `self.model`).

    A sharded model (FSDP2, DTensor parameters) gets its local blocks: each rank reads only its
    slices of a full (consolidated) reconstruction, or its own file of a `per_rank` one (given
    any rank's file, the sibling file of this rank is used)."""
    own = unwrap(model).state_dict()
    dtensor = dtensor_class()
    sharded = dtensor is not None and any(isinstance(v, dtensor) for v in own.values())
    for name, value in (("prefix", prefix), ("strip_prefix", strip_prefix)):
        if not isinstance(value, str):
            raise InvalidValueError(f"{name}={value!r}: expected a string")

    def rename(name: str) -> str:
        return prefix + (name[len(strip_prefix) :] if name.startswith(strip_prefix) else name)

    if isinstance(source, Mapping):
        source = _as_tensors(source)
    reader = _ShardedReader(source, own, rename) if sharded else _PlainReader(source, rename)
    shapes = reader.shapes
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    bad_shape = [
        f"{k}: file {shapes[k]} vs model {tuple(own[k].shape)}"
        for k in own
        if k in shapes and shapes[k] != tuple(own[k].shape)
    ]
    if bad_shape:
        raise InvalidValueError("shape mismatch: " + "; ".join(bad_shape[:5]))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise InvalidValueError("state dict does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            if k in shapes:
                dst = v._local_tensor if sharded and isinstance(v, dtensor) else v
                src = reader.block(k, tuple(dst.shape))
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype), non_blocking=True)
    return model


class _PlainReader:
    """A whole state dict (from a file, a directory, or given), tied aliases filled in."""

    def __init__(self, source: Any, rename: Callable[[str], str]) -> None:
        sd, meta = _load_source(source)
        for alias, canonical in json.loads(meta.get("phema.tied", "{}")).items():
            if alias not in sd and canonical in sd:
                sd[alias] = sd[canonical]
        self.sd = _renamed(sd, rename)
        self.shapes = {k: tuple(v.shape) for k, v in self.sd.items()}

    def block(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.sd[name]


class _ShardedReader:
    """The tensors of `source` as this rank of a sharded model needs them: global shapes for the
    checks, and each tensor's local block, sliced lazily from the files (only what the rank
    holds is read)."""

    def __init__(self, source: Any, own: Mapping[str, Any], rename: Callable[[str], str]) -> None:
        layout = sharding(list(own), list(own.values()), None)
        self.rank = layout.rank if layout else 0
        self.world = layout.world_size if layout else 1
        self.blocks = layout.shards if layout else {}
        self.rename = rename
        self.given: dict[str, Any] = _renamed(source, rename) if isinstance(source, Mapping) else {}
        self.handles: dict[str, Any] = {}  # tensor name -> safe_open handle of its file
        self.stored: dict[str, str] = {}  # tensor name -> its name in the file
        self.file_blocks: dict[str, Any] = {}  # a per-rank file's blocks: name -> block
        self.shapes = {k: tuple(v.shape) for k, v in self.given.items()}
        if not isinstance(source, Mapping):
            for path in checkpoint_files(source):
                self._open(path)

    def _open(self, path: str) -> None:
        handle = _open_weights(path)
        layout = _core.shard_layout(path)
        if layout is not None:
            rank, world, blocks = layout
            if world != self.world:
                raise InvalidValueError(
                    f"{path} is rank {rank}'s part of a {world}-rank reconstruction, but this "
                    f"model is sharded over {self.world} ranks: reconstruct full tensors "
                    "(without per_rank) to load them here"
                )
            if rank != self.rank:
                mine = path.replace(
                    naming.rank_suffix(rank, world) + ".",
                    naming.rank_suffix(self.rank, world) + ".",
                )
                if mine == path or not os.path.exists(mine):
                    raise FileNotFoundError(
                        f"{path} is rank {rank}'s part; this process is rank {self.rank} and "
                        f"{mine} does not exist"
                    )
                return self._open(mine)
            self.file_blocks = {
                self.rename(name): {"shape": shape, "offset": offset}
                for name, (shape, offset) in blocks.items()
            }
        for stored_name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            name = self.rename(stored_name)
            if name in self.handles:
                raise InvalidValueError(f"{path}: two tensors load into `{name}`")
            self.handles[name] = handle
            self.stored[name] = stored_name
            stored = tuple(handle.get_slice(stored_name).get_shape())
            self.shapes[name] = tuple(self.file_blocks.get(name, {}).get("shape", stored))

    def block(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's block of tensor `name`, of local shape `shape`."""
        mine = self.blocks.get(name)
        theirs = self.file_blocks.get(name)
        if theirs is not None or (mine is None and name in self.handles):
            if (mine and mine["offset"]) != (theirs and theirs["offset"]):
                raise InvalidValueError(
                    f"{name}: the file holds the block at {theirs and theirs['offset']}, this "
                    f"rank holds the one at {mine and mine['offset']}: the model is sharded "
                    "differently from the run that wrote the file"
                )
            return self.handles[name].get_tensor(self.stored[name])
        whole = (
            self.handles[name].get_slice(self.stored[name])
            if name in self.handles
            else self.given[name]
        )
        if mine is None:
            return whole[...]
        return whole[tuple(slice(o, o + n) for o, n in zip(mine["offset"], shape, strict=True))]


def _renamed(sd: Mapping[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """`sd` under the model's names; two names that become one are an error."""
    out: dict[str, Any] = {}
    for name, x in sd.items():
        mine = rename(name)
        if mine in out:
            raise InvalidValueError(f"two tensors load into `{mine}` (one of them `{name}`)")
        out[mine] = x
    return out


def _open_weights(path: str) -> Any:
    """A safetensors handle on `path`; anything else (a .pt, text, a truncated file) is one
    ValueError naming the file."""
    from safetensors import safe_open

    try:
        return safe_open(path, "pt")
    except Exception as e:  # SafetensorError (no file name), OSError, ...
        raise InvalidValueError(f"{path}: not a readable safetensors file ({e})") from None
