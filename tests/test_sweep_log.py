"""`sweep(..., log_to=...)`: the rows in the user's experiment tracker, one run per sweep and a
step per target, read back with each tracker's own reader (TensorBoard event files, MLflow's
local file store, a W&B offline run): no server, no network."""

from __future__ import annotations

import glob
import struct
import sys
import time

import pytest
import torch

import phema


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    x = torch.linspace(-1, 1, 30).reshape(10, 3)
    with torch.no_grad():
        return {"mse": float(((model(x) - x.sum(1, keepdim=True)) ** 2).mean())}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny tracked run, its model and a sweep of two targets with the raw baseline."""
    root = tmp_path_factory.mktemp("log")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    g = torch.Generator().manual_seed(3)
    with phema.PostHocEMA(model, root / "store", (0.05, 0.15), snapshot_every=10) as ema:
        for _ in range(40):
            with torch.no_grad():
                model.weight += 0.1 * torch.randn(model.weight.shape, generator=g)
            ema.update()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    return root / "store", model, raw


def run_sweep(swept, **log):
    store, model, raw = swept
    return phema.sweep(
        store, model, evaluate, sigma_rels=[0.05, 0.1], raw=raw, progress=False, **log
    )


def test_tensorboard_event_files_hold_a_step_per_target(swept, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_sweep(swept, log_to="tensorboard", log_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    mse = events.Scalars("metric/mse")
    assert [e.step for e in mse] == [0, 1]
    for e, row in zip(mse, result.rows, strict=True):
        assert e.value == pytest.approx(row.metrics["mse"], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("sigma_rel")] == pytest.approx([0.05, 0.1])
    [raw] = events.Scalars("raw/mse")
    assert raw.step == 0 and raw.value == pytest.approx(result.raw.metrics["mse"], rel=1e-6)


def test_mlflow_file_store_holds_one_run_with_a_step_per_target(swept, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database
    uri = (tmp_path / "mlruns").as_uri()
    result = run_sweep(swept, log_to="mlflow", log_dir=uri)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs(experiment_ids=["0"])
    history = client.get_metric_history(run.info.run_id, "metric/mse")
    assert [(m.step, m.value) for m in history] == [
        (k, row.metrics["mse"]) for k, row in enumerate(result.rows)
    ]
    assert run.data.params["store"] == result.store.path
    assert run.data.metrics["raw/mse"] == result.raw.metrics["mse"]


def wandb_records(path: str) -> list[bytes]:
    """The records of a `.wandb` file: a 7-byte file header, then 32 KiB blocks of records, each
    a 7-byte header (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last part), as LevelDB's
    log format; W&B 0.31 ships no reader for it."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, part, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            break
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(part)
            part = b""
    return out


def test_wandb_offline_run_holds_a_step_per_target(swept, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_sweep(swept, log_to="wandb", log_dir=tmp_path)
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # W&B's service process writes the file: wait for the run's exit record.
    records: list = []
    for _ in range(300):
        records = [wandb_internal_pb2.Record.FromString(d) for d in wandb_records(path)]
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            logged[int(items["_step"])] = items
    assert sorted(logged) == [0, 1]
    for k, row in enumerate(result.rows):
        assert float(logged[k]["metric/mse"]) == row.metrics["mse"]
    assert float(logged[0]["raw/mse"]) == result.raw.metrics["mse"]


def test_a_missing_tracker_names_its_extra_before_any_work(swept, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'phema-rs\[wandb\]'"):
        run_sweep(swept, log_to="wandb", results=tmp_path / "sweep.csv")
    assert not (tmp_path / "sweep.csv").exists()
    with pytest.raises(ValueError, match="log_to='neptune'"):
        run_sweep(swept, log_to="neptune")
