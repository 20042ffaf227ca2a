"""Lightning: `PostHocEMACallback`, a `PostHocEMA` over a `Trainer.fit` run (docs/integrations.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from phema.errors import InvalidValueError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError:  # the standalone package of the same framework
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.data import extract_batch_size

from phema.integrations._driver import Driver
from phema.tracker import PostHocEMA


class PostHocEMACallback(pl.Callback):
    """Tracks power-function EMA profiles of the LightningModule during ``fit`` and writes
    snapshots for post-hoc EMA.

    The tracker (``ema``, a `phema.PostHocEMA`) is made when fit starts, updated after every
    optimizer step (once per step with gradient accumulation; never for a batch whose step was
    skipped), at time ``t`` = the global step or, with ``time="samples"``, the samples seen
    (each batch's size times the number of processes). A snapshot is written every
    ``snapshot_every`` optimizer steps (default: a 32nd of the run's estimated steps) and at
    the end of fit, into ``store`` (default ``trainer.default_root_dir/phema``). Validation
    sees the average of ``eval_sigma_rel`` (default: the first tracked profile; the trained
    weights are restored after it) unless ``swap_for_eval=False``. The tracker's state goes
    into Lightning's checkpoints, so ``fit(ckpt_path=...)`` continues the averages exactly.
    Other keywords go to `PostHocEMA` (``dtype``, ``include``, ``exclude``, ``offload``,
    ``raw``, ``cumulative``, ...).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        sigma_rels: float | Sequence[float] | None = None,
        *,
        gammas: float | Sequence[float] | None = None,
        snapshot_every: int | None = None,
        time: str = "steps",
        eval_sigma_rel: float | None = None,
        swap_for_eval: bool = True,
        **tracker_options: Any,
    ) -> None:
        """Check the options; the tracker itself is made when fit starts."""
        self._driver = Driver(
            store,
            sigma_rels,
            gammas,
            snapshot_every,
            time,
            eval_sigma_rel,
            swap_for_eval,
            tracker_options,
        )
        self._last_step = 0  # the global step of the last update
        self._samples = 0  # samples seen, for time="samples"
        self._restored = False  # load_state_dict() gave the two above for this fit

    @property
    def ema(self) -> PostHocEMA | None:
        """The tracker of the current (or last) fit; None before fit starts."""
        return self._driver.ema

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the tracker: the module has its device and dtype, its checkpoint is loaded."""
        if not self._restored:  # a fit from the start, also when this callback ran one before
            self._last_step = self._samples = 0
        self._restored = False
        store = os.path.join(trainer.default_root_dir, "phema")
        self._driver.start(pl_module, store, trainer.estimated_stepping_batches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The loops are restored now: a resumed fit must resume the tracker at its step."""
        if trainer.global_step != self._last_step:
            raise InvalidValueError(
                f"fit resumes at step {trainer.global_step}, but the checkpoint holds "
                + (
                    f"the {type(self).__name__} state of step {self._last_step}"
                    if self._last_step
                    else f"no {type(self).__name__} state"
                )
                + ": a tracker cannot continue averages it has not seen; resume from a "
                "checkpoint saved with the callback, or start a fresh fit with another store"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Update after an optimizer step: the global step moved since the last update."""
        if self._driver.time == "samples":
            self._samples += extract_batch_size(batch) * trainer.world_size
        if trainer.global_step > self._last_step:
            t = trainer.global_step if self._driver.time == "steps" else self._samples
            self._driver.step(trainer.global_step, t)
            self._last_step = trainer.global_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The average into the module for validation (not in the sanity check: no average)."""
        if not trainer.sanity_checking:
            self._driver.swap_in()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trained weights back."""
        self._driver.swap_out()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last snapshot, every write done."""
        self._driver.finish(None)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Trained weights back and pending writes done, without a last snapshot: the run did
        not end (a resume from a checkpoint supersedes what it wrote after that)."""
        self._driver.finish(False)

    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint keeps of this callback."""
        tracker = self._driver.state_dict()
        if tracker is None:
            return {}
        return {"tracker": tracker, "global_step": self._last_step, "samples": self._samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a checkpoint's state_dict() (loaded before fit starts)."""
        if not state_dict:  # saved before fit made the tracker
            return
        keys = {"tracker", "global_step", "samples"}
        if not isinstance(state_dict, Mapping) or not keys <= set(state_dict):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)
            raise InvalidValueError(
                f"checkpoint entry of {type(self).__name__}: expected the keys global_step, "
                f"samples and tracker, got {got}"
            )
        step, samples = state_dict["global_step"], state_dict["samples"]
        for key, value in (("global_step", step), ("samples", samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidValueError(
                    f"checkpoint entry of {type(self).__name__}: {key}={value!r}, expected an "
                    "integer >= 0"
                )
        self._driver.load_state_dict(state_dict["tracker"])
        self._last_step, self._samples = step, samples
        self._restored = True
