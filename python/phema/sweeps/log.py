"""A sweep's numbers in the user's experiment tracker (`sweep(..., log_to=...)`): one run per
sweep, one step per target in the order of the rows, the raw baseline at step 0 under `raw/`."""

from __future__ import annotations

import os
import time
from typing import Any

from phema.errors import InvalidValueError
from phema.sweeps.result import SweepResult

# log_to= value -> (module to import, the pip extra that installs it)
TRACKERS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def require(log_to: str) -> Any:
    """The tracker's module, or one clear error naming the extra that installs it; checked
    before the sweep does any work."""
    if log_to not in TRACKERS:
        raise InvalidValueError(f"log_to={log_to!r}: expected one of {', '.join(TRACKERS)}")
    module, extra = TRACKERS[log_to]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:  # the optional extra is not installed
        raise ImportError(
            f"log_to={log_to!r} needs {extra}: pip install 'phema-rs[{extra}]'"
        ) from None


def _steps(result: SweepResult) -> list[tuple[int, str, dict[str, float]]]:
    """(step, target label, scalars) per row: its metrics, sigma_rel, time and fit error."""
    out = []
    for k, row in enumerate(result.rows):
        scalars = {f"metric/{m}": float(v) for m, v in row.metrics.items()}
        scalars |= {"sigma_rel": row.sigma_rel, "t": row.t, "fit_error": row.fit_error}
        out.append((k, row.label, scalars))
    return out


def log_sweep(result: SweepResult, log_to: str, log_dir: str | os.PathLike[str] | None) -> str:
    """Writes the sweep as one run of `log_to`; returns where it went (a directory or run id).

    `log_dir`: TensorBoard's event directory (default `runs/phema-sweep-<time>`), MLflow's
    tracking URI (default: MLflow's own, `MLFLOW_TRACKING_URI` or `./mlruns`), the directory
    W&B writes into (default: W&B's own; `WANDB_MODE=offline` keeps it off the network)."""
    module = require(log_to)
    steps = _steps(result)
    raw = {f"raw/{m}": float(v) for m, v in (result.raw.metrics if result.raw else {}).items()}
    labels = "\n".join(f"{k}: {label}" for k, label, _ in steps)
    if log_to == "tensorboard":
        where = os.fspath(log_dir or os.path.join("runs", f"phema-sweep-{int(time.time())}"))
        writer = module.SummaryWriter(log_dir=where)
        try:
            for k, _, scalars in steps:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, k)
            for tag, value in raw.items():
                writer.add_scalar(tag, value, 0)
            writer.add_text("targets", labels.replace("\n", "  \n"), 0)
        finally:
            writer.close()
        return where
    if log_to == "mlflow":
        if log_dir is not None:
            module.set_tracking_uri(os.fspath(log_dir))
        with module.start_run(run_name="phema-sweep") as run:
            module.log_param("store", result.store.path)
            for k, _, scalars in steps:
                module.log_metrics(scalars, step=k)
            if raw:
                module.log_metrics(raw, step=0)
            module.log_text(labels + "\n", "targets.txt")
            return str(run.info.run_id)
    run = module.init(
        project="phema",
        job_type="sweep",
        dir=None if log_dir is None else os.fspath(log_dir),
        config={"store": result.store.path},
        reinit=True,
    )
    try:
        for k, _, scalars in steps:
            run.log(scalars | (raw if k == 0 else {}), step=k)
        run.summary["targets"] = labels
    finally:
        run.finish()
    return str(run.dir)
