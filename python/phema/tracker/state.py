"""A tracker's state_dict(): what it holds, and every entry checked before it is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from phema.errors import InvalidValueError
from phema.tracker.distributed import Sharding
from phema.tracker.profiles import Profiles, is_number


@dataclass
class Resume:
    """A checked state: where the run resumes."""

    t: int | float
    step: int
    last_snapshot_t: int | float | None
    averages: list[list[torch.Tensor]]  # [profile][tensor], in the tracker's order
    run_id: str | None  # None in states saved before run ids


def make_state(
    resume: Resume, profiles: Profiles, names: list[str], sharding: Sharding | None
) -> dict[str, Any]:
    """The state_dict() of a tracker at `resume`; the averages are the live tensors."""
    # The snapshot schedule needs no entry: the next one is due at the next multiple above t.
    return {
        "t": resume.t,
        "step": resume.step,
        "gammas": list(profiles.gammas),
        "last_snapshot_t": resume.last_snapshot_t,
        "sharding": None if sharding is None else sharding.state(),
        "averages": [dict(zip(names, accs, strict=True)) for accs in resume.averages],
        "run_id": resume.run_id,
    }


def checked_state(
    state: Any,
    profiles: Profiles,
    names: list[str],
    shapes: list[tuple[int, ...]],
    sharding: Sharding | None,
) -> Resume:
    """The entries of a state_dict(), each checked against this tracker's profiles, tensors
    (`names` of `shapes`) and sharding: a ValueError names the entry at fault."""
    if not isinstance(state, Mapping):
        raise InvalidValueError(f"state_dict: expected the dict of state_dict(), not {type(state)}")
    need = ("t", "step", "gammas", "last_snapshot_t", "averages")
    missing = [k for k in need if k not in state]
    if missing:
        raise InvalidValueError(
            f"state_dict lacks {', '.join(map(repr, missing))}: not a PostHocEMA state"
        )
    t, step, last = state["t"], state["step"], state["last_snapshot_t"]
    if not (is_number(t) and math.isfinite(t) and t >= 0):
        raise InvalidValueError(f"state_dict['t']={t!r}: expected a finite time >= 0")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidValueError(f"state_dict['step']={step!r}: expected an integer >= 0")
    if last is not None and not (is_number(last) and 0 < last <= t):
        raise InvalidValueError(
            f"state_dict['last_snapshot_t']={last!r}: expected None or a time in (0, t]"
        )
    gammas = state["gammas"]
    if not profiles.matches(gammas):
        raise InvalidValueError(
            f"state tracks gammas {gammas!r}, this tracker {list(profiles.gammas)}"
        )
    check_sharding(state.get("sharding"), sharding)
    run_id = state.get("run_id")  # absent in states saved before run ids
    if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum()):
        raise InvalidValueError(f"state_dict['run_id']={run_id!r}: expected the id of a run")
    averages = state["averages"]
    if not isinstance(averages, (list, tuple)) or len(averages) != len(profiles):
        raise InvalidValueError(
            f"state_dict['averages']: expected a list of {len(profiles)} dicts (one per profile)"
        )
    sources = []
    known = set(names)
    for i, profile in enumerate(averages):
        if not isinstance(profile, Mapping):
            raise InvalidValueError(f"state_dict['averages'][{i}]: expected a dict of tensors")
        missing = [n for n in names if n not in profile]
        unexpected = [n for n in profile if n not in known]
        if missing or unexpected:
            raise InvalidValueError(
                f"state tracks other tensors: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, shape in zip(names, shapes, strict=True):
            x = profile[name]
            where = f"state_dict['averages'][{i}][{name!r}]"
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise InvalidValueError(f"{where}: expected a floating tensor, not {type(x)}")
            if tuple(x.shape) != tuple(shape):
                raise InvalidValueError(
                    f"state has {name} of shape {tuple(x.shape)}, the model {tuple(shape)}"
                )
            if not bool(torch.isfinite(x).all()):
                raise InvalidValueError(f"{where} holds NaN or infinite values")
        sources.append([profile[n] for n in names])
    return Resume(t, step, last, sources, run_id)


def check_sharding(saved: dict[str, Any] | None, sharding: Sharding | None) -> None:
    """Raise ValueError unless a state saved with sharding `saved` fits this rank exactly."""
    saved_as = None if saved is None else Sharding(**saved)
    if saved_as == sharding:
        return
    was = (
        "an unsharded model (whole tensors)"
        if saved_as is None
        else f"{saved_as.describe()} of a sharded model"
    )
    here = "an unsharded model" if sharding is None else f"{sharding.describe()} of a sharded model"
    if saved_as is None:
        need = "load it into a tracker on an unsharded model"
    elif sharding is None or saved_as.world_size != sharding.world_size:
        need = f"resume on {saved_as.world_size} ranks with the same sharding"
    else:
        need = f"load rank {saved_as.rank}'s own state, saved with the same sharding"
    raise InvalidValueError(
        f"state_dict holds the averages of {was}, this tracker is {here}: {need}, or "
        "reconstruct the averages from the store (phema reconstruct) and start a fresh "
        "PostHocEMA"
    )
