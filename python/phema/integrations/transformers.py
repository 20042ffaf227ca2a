"""Hugging Face: `PostHocEMACallback`, a `PostHocEMA` over a `Trainer.train` run
(docs/integrations.md)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from phema import files, naming
from phema.errors import InvalidValueError
from phema.integrations._driver import Driver
from phema.tracker import PostHocEMA

# The tracker's state in a checkpoint-N/ directory (a rank suffix per rank of a sharded run).
STATE_STEM = "phema-ema"


class PostHocEMACallback(TrainerCallback):
    """Tracks power-function EMA profiles of the Trainer's model and writes snapshots for
    post-hoc EMA.

    The tracker (``ema``, a `phema.PostHocEMA`) is made when training starts and updated after
    every optimizer step (``on_step_end``: once per step with gradient accumulation), at time
    ``t`` = the global step or, with ``time="samples"``, the global step times the total train
    batch size (per-device batch x accumulation steps x processes). A snapshot is written every
    ``snapshot_every`` optimizer steps (default: a 32nd of ``max_steps``) and at the end of
    training, into ``store`` (default ``args.output_dir/phema``). Evaluations during training
    see the average of ``eval_sigma_rel`` (default: the first tracked profile; the trained
    weights are restored after it) unless ``swap_for_eval=False``. Every ``checkpoint-N/`` gets
    the tracker's state (``phema-ema.pt``), and ``train(resume_from_checkpoint=...)`` continues
    the averages from it exactly; it is looked for in ``args.resume_from_checkpoint`` and in
    ``args.output_dir/checkpoint-N`` (``resume_from=`` names another directory). Other keywords
    go to `PostHocEMA` (``dtype``, ``include``, ``exclude``, ``offload``, ``raw``, ``cumulative``,
    ...).
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
        resume_from: str | os.PathLike[str] | None = None,
        **tracker_options: Any,
    ) -> None:
        """Check the options; the tracker itself is made when training starts."""
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
        self._resume_from = None if resume_from is None else os.fspath(resume_from)
        self._state_name = f"{STATE_STEM}.pt"

    @property
    def ema(self) -> PostHocEMA | None:
        """The tracker of the current (or last) training run; None before training starts."""
        return self._driver.ema

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Make the tracker; a resumed run (global step > 0) loads its checkpoint's state."""
        if model is None:
            raise InvalidValueError("PostHocEMACallback needs the Trainer's model (got none)")
        ema = self._driver.start(model, os.path.join(args.output_dir, "phema"), state.max_steps)
        self._state_name = _state_name(ema)
        if state.global_step > 0:
            path = self._saved_state(args, state)
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file
                raise InvalidValueError(
                    f"{path}: not a readable phema tracker state ({e})"
                ) from None
            try:
                ema.load_state_dict(saved)
            except ValueError as e:
                raise InvalidValueError(f"{path}: {e}") from None
            if ema.t != self._t(args, state.global_step):
                raise InvalidValueError(
                    f"{path}: the tracker state is at t={ema.t!r}, the Trainer resumes at step "
                    f"{state.global_step} (t={self._t(args, state.global_step)!r} with "
                    f"time={self._driver.time!r}): the state of another checkpoint"
                )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Update after the optimizer step; the average goes in when an evaluation follows."""
        self._driver.step(state.global_step, self._t(args, state.global_step))
        if control.should_evaluate:
            self._driver.swap_in()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The average goes in when an end-of-epoch evaluation follows."""
        if control.should_evaluate:
            self._driver.swap_in()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After an evaluation: the trained weights back (before a checkpoint is saved)."""
        self._driver.swap_out()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the tracker's state into the checkpoint-N/ directory the Trainer just saved."""
        ema = self._driver.ema
        if ema is None:
            return
        sharded = self._state_name != f"{STATE_STEM}.pt"
        if not (sharded or state.is_world_process_zero):
            return  # one state for all ranks of an unsharded run, written once
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"{folder} does not exist after the Trainer saved step {state.global_step}: "
                "PostHocEMACallback keeps its state in the Trainer's checkpoint directories"
            )
        # Complete or absent, never half-written.
        buf = io.BytesIO()
        torch.save(ema.state_dict(), buf)
        files.write_atomically(os.path.join(folder, self._state_name), buf.getvalue())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The last snapshot, every write done."""
        self._driver.finish(None)

    def _t(self, args: TrainingArguments, global_step: int) -> int:
        """The tracker's time at a global step."""
        if self._driver.time == "steps":
            return global_step
        return (
            global_step
            * args.train_batch_size
            * args.gradient_accumulation_steps
            * max(args.world_size, 1)
        )

    def _saved_state(self, args: TrainingArguments, state: TrainerState) -> str:
        """The tracker state file of the checkpoint the Trainer resumes from."""
        step_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._resume_from is not None:
            candidates = [self._resume_from]
        else:
            given = args.resume_from_checkpoint
            candidates = [*([given] if isinstance(given, str) else []), step_dir]
        name = self._state_name
        for folder in candidates:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise InvalidValueError(
            f"the Trainer resumes at step {state.global_step}, but no {name} (the phema tracker's "
            f"state) is in {' or '.join(candidates)}: give PostHocEMACallback(resume_from=...) "
            "the checkpoint directory it is in (a tracker cannot continue averages it has not "
            "seen; a run that did not track from the start needs a fresh store and run)"
        )


def _state_name(ema: PostHocEMA) -> str:
    """phema-ema.pt, or this rank's phema-ema.rankR-of-W.pt in a sharded run."""
    sharding = ema.state_dict()["sharding"]
    if sharding is None:
        return f"{STATE_STEM}.pt"
    return f"{STATE_STEM}{naming.rank_suffix(sharding['rank'], sharding['world_size'])}.pt"
