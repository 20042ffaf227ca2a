"""accelerate: a PostHocEMA on `unwrap_model(model)`, registered for checkpointing, goes through
`save_state` / `load_state` and the resumed run continues the averages exactly."""

from __future__ import annotations

import os

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import phema  # noqa: E402


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True).cos()


def setup(store):
    """A script's set-up: model and optimizer prepared, the tracker registered."""
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = phema.PostHocEMA(accelerator.unwrap_model(model), store, snapshot_every=3)
    accelerator.register_for_checkpointing(ema)
    return accelerator, model, optimizer, ema


def train(accelerator, model, optimizer, ema, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        ema.update()


def test_save_state_and_load_state_continue_the_averages_exactly(tmp_path):
    accelerator, model, optimizer, ema = setup(tmp_path / "whole")
    train(accelerator, model, optimizer, ema, range(10))
    ema.close()
    whole = ema.state_dict()

    accelerator, model, optimizer, ema = setup(tmp_path / "store")
    train(accelerator, model, optimizer, ema, range(4))
    accelerator.save_state(tmp_path / "state")
    train(accelerator, model, optimizer, ema, range(4, 7))  # then the run dies
    ema.close(snapshot=False)

    accelerator, model, optimizer, resumed = setup(tmp_path / "store")
    accelerator.load_state(tmp_path / "state")
    assert (resumed.t, resumed.step, resumed.run_id) == (4, 4, ema.run_id)
    train(accelerator, model, optimizer, resumed, range(4, 10))
    resumed.close()
    for a, b in zip(whole["averages"], resumed.state_dict()["averages"], strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    # The snapshot the dead attempt wrote at 6 is superseded by the resumed run's.
    assert sorted(os.listdir(tmp_path / "store" / "superseded")) == [
        "000000000006-0.050.safetensors",
        "000000000006-0.100.safetensors",
        "NOTE.txt",
    ]
    times = [s.t for s in phema.open_store(tmp_path / "store").snapshots]
    assert times == [s.t for s in phema.open_store(tmp_path / "whole").snapshots]
    assert sorted(set(times)) == [3, 6, 9, 10]
