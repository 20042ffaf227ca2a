"""What a tracker follows in the model: tensors by state_dict name, tied aliases, wrappers
unwrapped, and the check that the model still holds them as they were."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from phema import naming
from phema.errors import InvalidValueError
from phema.tracker.distributed import dtensor_class, local
from phema.tracker.profiles import as_tuple


class Tracked:
    """The tracked tensors of a model: floating ones (averaged) and others (copied as they are).

    ``include`` / ``exclude`` are globs on state_dict names; tied tensors are kept once, under
    their first name, the aliases in ``tied`` ({alias: name})."""

    def __init__(
        self,
        module: nn.Module,
        include: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
    ) -> None:
        """Select the tensors of `module` (already unwrapped); ValueError when none is floating."""
        includes = as_tuple(("*",) if include is None else include)
        excludes = as_tuple(() if exclude is None else exclude)
        self.names: list[str] = []
        self.floats: list[torch.Tensor] = []
        self.int_names: list[str] = []
        self.ints: list[torch.Tensor] = []
        self.tied: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, x in module.state_dict(keep_vars=True).items():
            if not isinstance(x, torch.Tensor):  # get_extra_state() entries
                continue
            if not any(naming.matches(name, p) for p in includes) or any(
                naming.matches(name, p) for p in excludes
            ):
                continue
            canonical = first_name.setdefault(id(x), name)
            if canonical != name:
                self.tied[name] = canonical
            elif x.is_floating_point():
                self.names.append(name)
                self.floats.append(x)
            else:
                self.int_names.append(name)
                self.ints.append(x)
        if not self.names:
            raise InvalidValueError(
                f"no floating tensor of {type(module).__name__} is tracked "
                f"(include={include!r}, exclude={exclude!r})"
            )
        self._slots = _slots(module, self.all_names, self.all_tensors)
        self._turn = 0  # the first slot the next update checks
        where = {id(x): (c, k) for c, k, x in self._slots}
        self._expected = [
            (name, x, local([x])[0].dtype, local([x])[0].device, where.get(id(x), (None, "")))
            for name, x in zip(self.all_names, self.all_tensors, strict=True)
        ]

    @property
    def all_names(self) -> list[str]:
        """Names of the floating, then the other tensors."""
        return self.names + self.int_names

    @property
    def all_tensors(self) -> list[torch.Tensor]:
        """The floating, then the other tensors."""
        return self.floats + self.ints

    def check(self, full: bool = True) -> None:
        """Raise if a tracked tensor is no longer the model's, or changed dtype or device: the
        tracker would average a stale tensor, or fail in a fused op with a cryptic error.

        An update checks the identity of a few tensors only, in turn (`full=False`: a constant
        cost per update, every tensor within len/ROTATION updates); everything (dtype and
        device too) is checked at every snapshot, in swapped() and when a fused op fails, so
        no snapshot is written from a stale tensor."""
        if not full:
            n = len(self._slots)
            turn = self._turn
            self._turn = (turn + ROTATION) % max(n, 1)
            if all(
                c.get(k) is x
                for c, k, x in (self._slots[j % n] for j in range(turn, turn + min(n, ROTATION)))
            ):
                return
        for name, x, dtype, device, (container, key) in self._expected:
            now = x if container is None else container.get(key)
            here = local([now])[0] if isinstance(now, torch.Tensor) else None
            if here is not None and (here.dtype != dtype or here.device != device):
                raise RuntimeError(
                    f"{name} is now {here.dtype} on {here.device}, but was {dtype} on "
                    f"{device} when PostHocEMA was created (model.half() or .to() after it): "
                    "create the tracker once the model has its final dtype and device"
                )
            if now is not x:
                raise RuntimeError(
                    f"{name} was replaced in the model after PostHocEMA was created (a new "
                    "Parameter or buffer), so its average would follow the old tensor: create "
                    "the tracker once the model is built"
                )


#: Tracked tensors whose identity one update checks (Tracked.check).
ROTATION = 4


def _slots(
    module: nn.Module, names: list[str], tensors: list[torch.Tensor]
) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Where each tracked plain tensor lives in the model: (its module's parameter or buffer
    dict, key, tensor), for Tracked.check to see that it is still there.

    DTensors are left out (FSDP2 swaps sharded and gathered ones in and out), and so are names
    a custom state_dict() made up."""
    dtensor = dtensor_class()
    out = []
    for name, x in zip(names, tensors, strict=True):
        if dtensor is not None and isinstance(x, dtensor):
            continue
        prefix, _, key = name.rpartition(".")
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            continue
        for container in (owner._parameters, owner._buffers):
            if container.get(key) is x:
                out.append((container, key, x))
                break
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and (Distributed)DataParallel wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_name(module: nn.Module) -> str:
    """The module's class name, not that of the FSDP<Name> class fully_shard() swaps in."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls.__name__
    return type(module).__name__
