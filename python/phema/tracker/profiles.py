"""The tracked profiles (sigma_rel / gamma pairs) and time: per-update lerp weights."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from phema import naming
from phema.errors import InvalidValueError
from phema.solver import gamma_to_sigma_rel, sigma_rel_to_gamma
from phema.targets import _as_list as numbers

# Each profile is a model-sized accumulator.
MAX_PROFILES = 64


@dataclass(frozen=True)
class Profiles:
    """The power-function profiles of one tracker, in the order given."""

    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]

    @classmethod
    def of(
        cls,
        sigma_rels: float | Sequence[float] | None,
        gammas: float | Sequence[float] | None,
        cumulative: bool = False,
    ) -> Profiles:
        """From `sigma_rels` (default 0.05 and 0.10) or `gammas`, and with `cumulative` the
        running mean (`gamma = 0`, docs/kernels.md) after them: ValueError on a bad set."""
        if gammas is not None:
            if sigma_rels is not None:
                raise InvalidValueError("give sigma_rels or gammas, not both")
            gs = tuple(numbers(gammas, "gammas"))
            profiles = cls(tuple(float(gamma_to_sigma_rel(g)) for g in gs), gs)
        else:
            srs = tuple(numbers((0.05, 0.10) if sigma_rels is None else sigma_rels, "sigma_rels"))
            profiles = cls(srs, tuple(float(sigma_rel_to_gamma(s)) for s in srs))
        if cumulative:
            profiles = cls((*profiles.sigma_rels, gamma_to_sigma_rel(0.0)), (*profiles.gammas, 0.0))
        if not profiles.gammas:
            raise InvalidValueError("track at least one profile (sigma_rels or gammas is empty)")
        if len(profiles.gammas) > MAX_PROFILES:
            raise InvalidValueError(
                f"{len(profiles.gammas)} profiles: at most {MAX_PROFILES} (each is a copy of "
                "the model)"
            )
        for i, g in enumerate(profiles.gammas):
            for h in profiles.gammas[:i]:
                if math.isclose(g, h, rel_tol=1e-6):
                    raise InvalidValueError(f"profile gamma={g!r} is given twice")
        return profiles

    def __len__(self) -> int:
        return len(self.gammas)

    def labels(self) -> list[str]:
        """The file-name label of each profile."""
        return naming.profile_labels(self.sigma_rels)

    def lerp_weights(self, t_prev: float, t: float) -> list[float]:
        """Per profile, the w of `ema += w * (theta - ema)` moving the average from t_prev to t."""
        # beta = (t_prev / t)^(gamma+1) over the actual dt (EDM2 eq. 127); t_prev = 0 gives 0.
        ratio = t_prev / t
        return [1.0 - ratio ** (g + 1.0) for g in self.gammas]

    def matches(self, gammas: Any) -> bool:
        """Whether `gammas` (from a saved state) are these profiles' gammas, in order."""
        return (
            isinstance(gammas, (list, tuple))
            and all(is_number(g) for g in gammas)
            and len(gammas) == len(self.gammas)
            and all(
                math.isclose(a, b, rel_tol=1e-9) for a, b in zip(gammas, self.gammas, strict=True)
            )
        )

    def index(self, sigma_rel: float | None, gamma: float | None) -> int:
        """Index of the profile matching `sigma_rel` or `gamma` (relative tolerance 1e-6)."""
        if (sigma_rel is None) == (gamma is None):
            raise InvalidValueError("give sigma_rel or gamma")
        key, value, tracked = (
            ("sigma_rel", sigma_rel, self.sigma_rels)
            if sigma_rel is not None
            else ("gamma", gamma, self.gammas)
        )
        for i, x in enumerate(tracked):
            if math.isclose(x, value, rel_tol=1e-6):
                return i
        raise InvalidValueError(
            f"{key}={value!r} is not tracked; tracked: {', '.join(f'{x:.6g}' for x in tracked)}"
        )


def next_time(t_prev: int | float, t: Any) -> int | float:
    """The time of an update(t) after `t_prev` (t_prev + 1 for None), checked."""
    if t is None:
        return t_prev + 1
    if not is_number(t):
        raise InvalidValueError(f"update(t={t!r}): t must be a number")
    t = t if isinstance(t, int) else float(t)
    if not (t > t_prev and t <= sys.float_info.max):  # a huge int has no float
        raise InvalidValueError(f"update(t={t!r}): t must be finite and > the last t={t_prev!r}")
    return t


def as_tuple(x: Any) -> tuple[Any, ...]:
    """A bare value as a 1-tuple, a sequence as a tuple."""
    return (x,) if isinstance(x, (str, int, float)) else tuple(x)


def is_number(x: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
