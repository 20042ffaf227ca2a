"""Lightning with phema's callback: a tiny LightningModule on CPU, a few steps.

Updates once per optimizer step under gradient accumulation, validation on the average with the
trained weights back after it, the tracker's state in the .ckpt so that a resumed fit ends with
the averages of an uninterrupted one, and a last snapshot at the end."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

pl = pytest.importorskip("lightning.pytorch")

import phema  # noqa: E402
from phema.integrations.lightning import PostHocEMACallback  # noqa: E402

STEPS = 12  # 3 epochs of 8 batches, 2 per optimizer step


class Net(pl.LightningModule):
    """A linear model; checks in validation that it holds the tracker's average."""

    def __init__(self, callback: PostHocEMACallback | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.callback = callback
        self.raw: dict[str, torch.Tensor] | None = None
        self.validated = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # After the callbacks' hook: the trained weights, before any validation.
        self.raw = {k: v.clone() for k, v in self.state_dict().items()}

    def validation_step(self, batch, batch_idx):
        if self.callback is None or self.trainer.sanity_checking:
            return
        average = self.callback.ema.state_dict()["averages"][0]
        assert all(torch.equal(self.state_dict()[k], v) for k, v in average.items())
        assert not all(torch.equal(self.raw[k], v) for k, v in average.items())
        self.validated += 1

    def on_validation_end(self):
        # After the callbacks' hook: the trained weights are back.
        if self.raw is not None:
            assert all(torch.equal(self.state_dict()[k], v) for k, v in self.raw.items())


def loader(n: int = 32, seed: int = 1) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def trainer(root, callbacks, max_steps: int = STEPS, **kw) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(root),
        max_steps=max_steps,
        accelerator="cpu",
        accumulate_grad_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"logger": False, **kw},
    )


class Stop(pl.Callback):
    """Ends fit after optimizer step `at` (an interrupted attempt)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:
            trainer.should_stop = True


def averages(cb: PostHocEMACallback) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in a.items()} for a in cb.ema.state_dict()["averages"]]


def test_updates_per_optimizer_step_validates_the_average_and_ends_with_a_snapshot(tmp_path):
    cb = PostHocEMACallback(snapshot_every=5, raw=True)
    model = Net(cb)
    trainer(tmp_path, [cb], enable_checkpointing=False, check_val_every_n_epoch=1).fit(
        model, loader(), loader(8, 2)
    )
    # 24 batches, 2 per optimizer step: 12 updates at t = 1..12.
    assert (cb.ema.step, cb.ema.t) == (STEPS, STEPS)
    assert model.validated == 3 * 2  # after each of 3 epochs, 2 validation batches each
    store = phema.open_store(tmp_path / "phema")
    assert sorted({s.t for s in store.snapshots}) == [5, 10, 12]  # every 5 steps and the end
    # raw=True goes to the tracker: the trained weights beside the averages at every snapshot.
    raw = [s for s in store.snapshots if s.kind == "raw"]
    assert [s.t for s in raw] == [5, 10, 12]
    with safe_open(raw[-1].path, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in model.raw.items())


def test_resume_from_ckpt_continues_the_averages_exactly(tmp_path):
    whole = PostHocEMACallback(snapshot_every=3)
    trainer(tmp_path / "whole", [whole], enable_checkpointing=False).fit(Net(), loader())

    root = tmp_path / "resumed"
    saves = pl.callbacks.ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    first = PostHocEMACallback(snapshot_every=3)
    trainer(root, [first, Stop(7), saves]).fit(Net(), loader())
    assert first.ema.t == 7 and sorted(os.listdir(root / "ckpt")) == ["step=4.ckpt"]
    second = PostHocEMACallback(snapshot_every=3)
    trainer(root, [second], enable_checkpointing=False).fit(
        Net(), loader(), ckpt_path=root / "ckpt" / "step=4.ckpt"
    )
    assert (second.ema.t, second.ema.step, second.ema.run_id) == (STEPS, STEPS, first.ema.run_id)
    for a, b in zip(averages(whole), averages(second), strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)

    # One run in the store: what the attempt wrote after step 4 (6 and its last, 7) set aside.
    store = phema.open_store(root / "phema")
    reference = phema.open_store(tmp_path / "whole" / "phema")
    assert [s.t for s in store.snapshots] == [s.t for s in reference.snapshots]
    assert sorted({s.t for s in store.snapshots}) == [3, 6, 9, 12]
    moved = sorted(os.listdir(root / "phema" / "superseded"))
    stems = [f"00000000000{t}-0.{s}.safetensors" for t in (6, 7) for s in ("050", "100")]
    assert moved == [*stems, "NOTE.txt"]


def test_time_in_samples_counts_every_batch(tmp_path):
    cb = PostHocEMACallback(time="samples", snapshot_every=2)
    trainer(tmp_path, [cb], max_steps=5, enable_checkpointing=False).fit(Net(), loader(18))
    # Batches of 4, 4, 4, 4, 2 per epoch; a step after every second batch and at an epoch's end.
    sizes, seen, times = [4, 4, 4, 4, 2], 0, []
    for _epoch in range(2):
        for i, n in enumerate(sizes):
            seen += n
            if i % 2 == 1 or i == len(sizes) - 1:
                times.append(seen)
    assert times[:5] == [8, 16, 18, 26, 34]
    assert (cb.ema.step, cb.ema.t) == (5, times[4])
    snapshots = sorted({s.t for s in phema.open_store(tmp_path / "phema").snapshots})
    assert snapshots == [times[1], times[3], times[4]]  # steps 2, 4 and the end


def test_a_callback_used_for_a_second_fit_starts_a_new_run(tmp_path):
    cb = PostHocEMACallback(snapshot_every=2)
    trainer(tmp_path / "a", [cb], max_steps=2, enable_checkpointing=False).fit(Net(), loader())
    first = cb.ema
    trainer(tmp_path / "b", [cb], max_steps=3, enable_checkpointing=False).fit(Net(), loader())
    assert (cb.ema.t, cb.ema.step) == (3, 3) and cb.ema.run_id != first.run_id
    assert sorted({s.t for s in phema.open_store(tmp_path / "b" / "phema").snapshots}) == [2, 3]


def test_resuming_from_a_checkpoint_without_the_tracker_state_is_refused(tmp_path):
    saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, filename="{step}")
    trainer(tmp_path, [saves], max_steps=2).fit(Net(), loader())
    cb = PostHocEMACallback()
    with pytest.raises(ValueError, match="resumes at step 2, but the checkpoint holds no Post"):
        trainer(tmp_path, [cb], max_steps=4, enable_checkpointing=False).fit(
            Net(), loader(), ckpt_path=tmp_path / "step=2.ckpt"
        )
    assert cb.ema.step == 0 and not os.listdir(tmp_path / "phema")


def test_a_damaged_checkpoint_entry_is_refused():
    cb = PostHocEMACallback()
    with pytest.raises(ValueError, match="expected the keys global_step, samples and tracker"):
        cb.load_state_dict({"tracker": {}})
    with pytest.raises(ValueError, match="global_step=-1"):
        cb.load_state_dict({"tracker": {}, "global_step": -1, "samples": 0})


class Logged(Net):
    """Logs its validation loss with `self.log` and keeps the weights each validation ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.validated_on: dict[int, dict[str, torch.Tensor]] = {}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.validated_on[self.global_step] = {
                k: v.clone() for k, v in self.state_dict().items()
            }
        return loss


def test_validation_on_the_average_goes_to_the_trainers_logger(tmp_path):
    """`self.log` in validation reaches the Lightning logger (TensorBoard's event files, read
    back with TensorBoard's own reader) with the score of the average: the loss the weights
    recorded during validation give, computed again here, and the last of them the tracker's
    final average."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = PostHocEMACallback(snapshot_every=5)
    model = Logged()
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(
        tmp_path, [cb], enable_checkpointing=False, check_val_every_n_epoch=1, logger=logger,
        num_sanity_val_steps=0,
    ).fit(model, loader(), loader(8, 2))  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    # One validation per epoch, after optimizer steps 4, 8 and 12; Lightning writes each at the
    # index of the last step (counting from 0).
    logged = {e.step + 1: e.value for e in events.Scalars("val_loss")}
    assert sorted(logged) == sorted(model.validated_on) == [4, 8, 12]
    (x, y), (x2, y2) = loader(8, 2)  # both validation batches, of 4 each
    probe = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    for step, weights in model.validated_on.items():
        probe.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
        with torch.no_grad():
            # The epoch's value: the mean of the two batches' losses (equal batch sizes).
            want = (((probe(x) - y) ** 2).mean() + ((probe(x2) - y2) ** 2).mean()) / 2
        assert logged[step] == pytest.approx(float(want), rel=1e-6), step
    final = cb.ema.state_dict()["averages"][0]
    assert all(torch.equal(model.validated_on[STEPS][k], v) for k, v in final.items())
