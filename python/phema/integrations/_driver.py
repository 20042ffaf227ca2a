"""What the framework callbacks share: their options, the tracker's life in a training run
(made when training starts, resumed from a framework checkpoint, a snapshot every so many
optimizer steps, closed with a last snapshot at the end) and the swap for evaluation."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from phema.errors import InvalidTypeError, InvalidValueError
from phema.tracker import PostHocEMA
from phema.tracker.profiles import Profiles

TIMES = ("steps", "samples")
# Snapshots over a run whose length is known, when snapshot_every is not given.
SNAPSHOTS_PER_RUN = 32
# PostHocEMA keywords the callbacks set themselves.
_OWN = {"self", "model", "store", "sigma_rels", "gammas", "snapshot_every"}
TRACKER_OPTIONS = frozenset(inspect.signature(PostHocEMA.__init__).parameters) - _OWN


class Driver:
    """One tracker over one training run, driven by a callback's hooks."""

    def __init__(
        self,
        store: str | os.PathLike[str] | None,
        sigma_rels: float | Sequence[float] | None,
        gammas: float | Sequence[float] | None,
        snapshot_every: int | None,
        time: str,
        eval_sigma_rel: float | None,
        swap_for_eval: bool,
        tracker_options: dict[str, Any],
    ) -> None:
        """Check every option now, so that a mistake shows before training starts."""
        self.profiles = Profiles.of(sigma_rels, gammas)
        self._given = {"sigma_rels": sigma_rels, "gammas": gammas}
        if time not in TIMES:
            raise InvalidValueError(f"time={time!r}: expected one of {', '.join(map(repr, TIMES))}")
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int)
        ):
            raise InvalidTypeError(f"snapshot_every={snapshot_every!r}: expected a number of steps")
        if snapshot_every is not None and snapshot_every < 1:
            raise InvalidValueError(f"snapshot_every={snapshot_every!r}: expected at least 1 step")
        unknown = sorted(set(tracker_options) - TRACKER_OPTIONS)
        if unknown:
            raise InvalidTypeError(
                f"unknown option(s) {', '.join(unknown)}; PostHocEMA takes "
                f"{', '.join(sorted(TRACKER_OPTIONS))}"
            )
        self.eval_gamma = (
            self.profiles.gammas[
                0 if eval_sigma_rel is None else self.profiles.index(eval_sigma_rel, None)
            ]
            if swap_for_eval
            else None
        )
        self.store = store
        self.time = time
        self.snapshot_every = snapshot_every
        self.every = snapshot_every
        self.options = tracker_options
        self.ema: PostHocEMA | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded before the tracker exists
        self._swap: contextlib.ExitStack | None = None

    def start(self, model: nn.Module, default_store: str, total_steps: float) -> PostHocEMA:
        """Make the tracker of this run (the model has its final device and dtype now), from a
        state loaded earlier if there is one. `total_steps` sets the default snapshot interval."""
        if self.snapshot_every is None:
            if not (isinstance(total_steps, (int, float)) and math.isfinite(total_steps)):
                raise InvalidValueError(
                    "the number of training steps is not known (an iterable dataset without "
                    "max_steps?): give PostHocEMACallback(snapshot_every=STEPS)"
                )
            self.every = max(int(total_steps) // SNAPSHOTS_PER_RUN, 1)
        store = default_store if self.store is None else self.store
        self.ema = PostHocEMA(model, store, **self._given, **self.options)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.ema.load_state_dict(state)
        return self.ema

    def step(self, global_step: int, t: float) -> None:
        """After optimizer step `global_step`: update at time t, snapshot when one is due."""
        assert self.ema is not None
        self.ema.update(t=t)
        if global_step % self.every == 0:
            self.ema.snapshot()

    def swap_in(self) -> None:
        """Put the evaluation profile's average into the model until swap_out()."""
        ema = self.ema
        if self.eval_gamma is None or ema is None or ema.step == 0 or self._swap is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(ema.swapped(gamma=self.eval_gamma))
        self._swap = stack

    def swap_out(self) -> None:
        """Restore the trained weights, if swap_in() replaced them."""
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def finish(self, snapshot: bool | None) -> None:
        """End of the run: trained weights back, the last snapshot (unless `snapshot` is
        False), every write done."""
        self.swap_out()
        if self.ema is not None:
            self.ema.close(snapshot=snapshot)

    def state_dict(self) -> dict[str, Any] | None:
        """The tracker's state, or the one waiting to be loaded; None before either exists."""
        return self.ema.state_dict() if self.ema is not None else self._pending

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the tracker from `state`, now or when start() makes it."""
        if self.ema is None:
            self._pending = state
        else:
            self.ema.load_state_dict(state)
