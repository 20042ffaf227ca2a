"""The averages: fp32 accumulators per profile, updated with fused ops, copied out for
snapshots, swapped into the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from phema.tracker.distributed import drop_gathered, dtensor_class, local

# Host buffers of one snapshot: ([profile][tensor] averages, then with `raw` the weights
# themselves; the other tracked tensors).
HostBuffers = tuple[list[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class _Group:
    """Tracked tensors sharing (device, dtype, accumulator device): one fused op per profile."""

    params: list[torch.Tensor]  # as registered in the model: plain tensors, or all DTensors
    sharded: bool  # params are DTensors: track their local shards
    staging: list[torch.Tensor] | None  # fp32 copies on the accumulator device, when needed
    non_blocking: bool
    accs: list[list[torch.Tensor]]  # [profile][tensor]

    def local(self) -> list[torch.Tensor]:
        """This rank's part of every param, looked up now (FSDP2 may swap a DTensor's shard)."""
        return [p._local_tensor for p in self.params] if self.sharded else self.params


class Accumulators:
    """Fp32 averages of `floats` ([profile][tensor]), whatever the model's dtype, on each
    tensor's device or on `device`; `offload` keeps them in CPU memory and folds each update in
    at the next call, once its non-blocking copy has landed. `ints` (tensors that are not
    averaged) go into snapshots as they are."""

    def __init__(
        self,
        floats: list[torch.Tensor],
        ints: list[torch.Tensor],
        n_profiles: int,
        device: str | torch.device | None,
        offload: bool,
        raw: bool = False,
    ) -> None:
        """Zero accumulators for every tensor of `floats`, one set per profile; with `raw`,
        snapshots also copy out the weights themselves (in fp32)."""
        self.floats = floats
        self.ints = ints
        self.offload = offload
        self.raw = raw
        self.groups, self.averages = _make_groups(
            floats, n_profiles, torch.device("cpu") if offload else device, offload
        )
        self._deferred: tuple[list[Any], list[float]] | None = None
        self._offload_devices = sorted(
            {x.device for x in local(floats) if offload and x.is_cuda}, key=str
        )
        copied = self.averages[0] + local(ints) + (local(floats) if raw else [])
        self._snapshot_devices = sorted({x.device for x in copied if x.is_cuda}, key=str)

    def update(self, weights: list[float]) -> None:
        """ema += w * (theta - ema) with the model's current tensors, w per profile."""
        with torch.no_grad():
            self.settle()
            for g in self.groups:
                if g.staging is not None:
                    torch._foreach_copy_(g.staging, g.local(), non_blocking=g.non_blocking)
            if self.offload:
                # The copy is in flight: fold it in at the next call, when it has landed.
                self._deferred = (_record_events(self._offload_devices), weights)
            else:
                self._lerp(weights)

    def settle(self) -> None:
        """Fold in an offloaded update whose copy was still in flight."""
        if self._deferred is not None:
            events, weights = self._deferred
            self._deferred = None
            for event in events:
                event.synchronize()
            with torch.no_grad():
                self._lerp(weights)

    def _lerp(self, weights: list[float]) -> None:
        """One fused op per profile and group."""
        for g in self.groups:
            src = g.staging if g.staging is not None else g.local()
            for accs, w in zip(g.accs, weights, strict=True):
                torch._foreach_lerp_(accs, src, w)

    def load(self, sources: list[list[torch.Tensor]]) -> None:
        """Set the averages to `sources` ([profile][tensor], checked); a pending update is
        dropped."""
        self._deferred = None
        with torch.no_grad():
            for accs, src in zip(self.averages, sources, strict=True):
                torch._foreach_copy_(accs, src)

    def host_buffers(self) -> HostBuffers:
        """CPU tensors to copy one snapshot into (pinned for CUDA sources, so copies are async)."""

        def like(x: torch.Tensor) -> torch.Tensor:
            return torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)

        sets = self.averages + self.averages[:1] if self.raw else self.averages
        return [[like(a) for a in accs] for accs in sets], [like(x) for x in local(self.ints)]

    def copy_out(self, buffers: HostBuffers) -> list[Any]:
        """Start copying the averages and the other tensors into `buffers`; returns the CUDA
        events to wait on before reading them."""
        self.settle()
        averages, ints = buffers
        non_blocking = bool(self._snapshot_devices)
        with torch.no_grad():
            sources = self.averages + [local(self.floats)] if self.raw else self.averages
            for host, accs in zip(averages, sources, strict=True):
                torch._foreach_copy_(host, accs, non_blocking=non_blocking)
            if ints:
                torch._foreach_copy_(ints, local(self.ints), non_blocking=non_blocking)
        return _record_events(self._snapshot_devices)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, index: int) -> Iterator[None]:
        """Profile `index`'s averages in the model's tensors for the block, then the raw ones."""
        self.settle()
        params = local(self.floats)  # local shards of DTensors: each rank swaps its own
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            drop_gathered(model)
            torch._foreach_copy_(params, self.averages[index])
        try:
            yield
        finally:
            with torch.no_grad():
                drop_gathered(model)
                torch._foreach_copy_(params, raw)


def _make_groups(
    tensors: list[torch.Tensor],
    n_profiles: int,
    acc_device: str | torch.device | None,
    offload: bool,
) -> tuple[list[_Group], list[list[torch.Tensor]]]:
    """Fp32 accumulators ([profile][tensor]) and the groups that update them with fused ops."""
    groups: dict[tuple[Any, ...], _Group] = {}
    placed: list[tuple[torch.Tensor, _Group, torch.device]] = []
    dtensor = dtensor_class()
    for p in tensors:
        sharded = dtensor is not None and isinstance(p, dtensor)
        x = p._local_tensor if sharded else p
        dev = x.device if acc_device is None else torch.device(acc_device)
        key = (x.device, x.dtype, dev, sharded)
        group = groups.get(key)
        if group is None:
            # fp32 tensors on the accumulators' device are lerped towards directly; anything
            # else is first copied (cast, moved) into fp32 staging with one fused copy.
            staged = offload or x.dtype != torch.float32 or x.device != dev
            group = _Group(
                params=[],
                sharded=sharded,
                staging=[] if staged else None,
                non_blocking=offload and x.is_cuda,
                accs=[[] for _ in range(n_profiles)],
            )
            groups[key] = group
        group.params.append(p)
        if group.staging is not None:
            group.staging.append(
                torch.empty(x.shape, dtype=torch.float32, device=dev, pin_memory=group.non_blocking)
            )
        placed.append((x, group, dev))
    # One profile after the other, so that each fused op walks memory allocated in sequence.
    accs: list[list[torch.Tensor]] = [[] for _ in range(n_profiles)]
    for i, profile_accs in enumerate(accs):
        for x, group, dev in placed:
            acc = torch.zeros(x.shape, dtype=torch.float32, device=dev)
            profile_accs.append(acc)
            group.accs[i].append(acc)
    return list(groups.values()), accs


def _record_events(devices: list[torch.device]) -> list[Any]:
    """Mark the work queued so far on each CUDA device, for another thread to wait on."""
    return [torch.cuda.current_stream(d).record_event() for d in devices]
