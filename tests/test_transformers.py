"""Hugging Face Trainer with phema's callback: a tiny GPT-2 from a config, CPU, a few steps.

Updates once per optimizer step under gradient accumulation, evaluation on the average with the
trained weights back after it, the tracker's state in checkpoint-N/ so that a resumed run ends
with the averages of an uninterrupted one, and a last snapshot at the end."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import phema  # noqa: E402
from phema.integrations.transformers import PostHocEMACallback  # noqa: E402

STEPS = 10


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the same for every run."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def trainer(out, callbacks, max_steps: int = STEPS, **kw) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **{"logging_strategy": "no", "report_to": "none", **kw},
    )
    return transformers.Trainer(
        model=gpt2(), args=args, train_dataset=Tokens(64, 1), eval_dataset=Tokens(4, 2),
        callbacks=callbacks,
    )  # fmt: skip


class Probe(transformers.TrainerCallback):
    """Placed before phema's callback: sees the weights of every step before any swap, checks
    that evaluation runs on the average and that the next step starts from the trained weights.
    Stops the run at `stop` (an interrupted attempt)."""

    def __init__(self, ema_callback: PostHocEMACallback, stop: int | None = None) -> None:
        self.cb = ema_callback
        self.stop = stop
        self.steps_seen = 0
        self.raw: dict[str, torch.Tensor] | None = None
        self.evaluated = 0

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps_seen += 1
        self.raw = {k: v.clone() for k, v in model.state_dict().items()}
        if state.global_step == self.stop:
            control.should_training_stop = True

    def on_prediction_step(self, args, state, control, model=None, **kw):
        average = self.cb.ema.state_dict()["averages"][0]
        weights = model.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in average.items())
        assert not all(torch.equal(self.raw[k], v) for k, v in average.items())
        self.evaluated += 1

    def on_step_begin(self, args, state, control, model=None, **kw):
        if self.raw is not None:
            weights = model.state_dict()
            assert all(torch.equal(weights[k], v) for k, v in self.raw.items())


def averages(cb: PostHocEMACallback) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in a.items()} for a in cb.ema.state_dict()["averages"]]


def test_updates_per_optimizer_step_evaluates_the_average_and_ends_with_a_snapshot(tmp_path):
    cb = PostHocEMACallback(snapshot_every=4)
    probe = Probe(cb)
    t = trainer(tmp_path, [probe, cb], eval_strategy="steps", eval_steps=3)
    t.train()
    # 10 optimizer steps of 2 micro-batches each: 10 updates at t = 1..10.
    assert (cb.ema.step, cb.ema.t) == (STEPS, STEPS) and probe.steps_seen == STEPS
    assert probe.evaluated == 4  # evaluations at steps 3, 6, 9 and the last; one batch each
    store = phema.open_store(tmp_path / "phema")
    assert sorted({s.t for s in store.snapshots}) == [4, 8, 10]  # every 4 steps and the end
    for step in (4, 8):
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / "phema-ema.pt")
    state = torch.load(tmp_path / "checkpoint-8" / "phema-ema.pt", weights_only=True)
    assert (state["t"], state["step"], state["run_id"]) == (8, 8, cb.ema.run_id)


def test_an_end_of_epoch_evaluation_sees_the_average_too(tmp_path):
    cb = PostHocEMACallback()
    probe = Probe(cb)
    trainer(tmp_path, [probe, cb], max_steps=3, eval_strategy="epoch").train()
    assert probe.evaluated == 1  # the run ends inside the first epoch: one evaluation at its end


def test_resume_from_checkpoint_continues_the_averages_exactly(tmp_path):
    whole = PostHocEMACallback(snapshot_every=3)
    trainer(tmp_path / "whole", [whole]).train()

    first = PostHocEMACallback(snapshot_every=3)
    trainer(tmp_path / "resumed", [Probe(first, stop=6), first]).train()  # stops at step 6
    assert first.ema.t == 6
    second = PostHocEMACallback(snapshot_every=3)
    trainer(tmp_path / "resumed", [second]).train(resume_from_checkpoint=True)  # checkpoint-4
    assert (second.ema.t, second.ema.run_id) == (STEPS, first.ema.run_id)
    for a, b in zip(averages(whole), averages(second), strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)

    # One run in the store: the snapshots the attempt wrote after step 4 were set aside.
    store = phema.open_store(tmp_path / "resumed" / "phema")
    assert sorted({s.t for s in store.snapshots}) == [3, 6, 9, 10]
    assert sorted(os.listdir(tmp_path / "resumed" / "phema" / "superseded")) == [
        "000000000006-0.050.safetensors",
        "000000000006-0.100.safetensors",
        "NOTE.txt",
    ]
    reference = phema.open_store(tmp_path / "whole" / "phema")
    assert [s.t for s in store.snapshots] == [s.t for s in reference.snapshots]


def test_time_in_samples(tmp_path):
    cb = PostHocEMACallback(time="samples", snapshot_every=5)
    trainer(tmp_path, [cb], max_steps=5).train()
    assert (cb.ema.step, cb.ema.t) == (5, 5 * 2 * 2)  # batch 2 x accumulation 2 per step
    assert [s.t for s in phema.open_store(tmp_path / "phema").snapshots] == [20, 20]


def test_resuming_without_the_tracker_state_is_refused(tmp_path):
    trainer(tmp_path, [], max_steps=4).train()  # checkpoint-4, no callback
    cb = PostHocEMACallback()
    with pytest.raises(ValueError, match="no phema-ema.pt .*checkpoint-4"):
        trainer(tmp_path, [cb], max_steps=6).train(resume_from_checkpoint=True)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run of 4 steps with the callback: checkpoint-4 holds the tracker's state."""
    out = tmp_path_factory.mktemp("checkpointed")
    trainer(out, [PostHocEMACallback()], max_steps=4).train()
    return out


def damage(path, how: str) -> None:
    if how in ("empty", "text"):
        path.write_bytes(b"" if how == "empty" else b"not a pickle")
        return
    state = torch.load(path, weights_only=True)
    if how == "other profiles":
        state["gammas"] = [1.0, 2.0]
    else:  # the state of another step
        state["t"], state["step"], state["last_snapshot_t"] = 3, 3, None
    torch.save(state, path)


@pytest.mark.parametrize(
    "how, message",
    [
        ("empty", "not a readable phema tracker state"),
        ("text", "not a readable phema tracker state"),
        ("other profiles", "state tracks gammas"),
        ("other step", "at t=3, the Trainer resumes at step 4"),
    ],
)
def test_a_damaged_state_in_the_checkpoint_is_named(checkpointed, tmp_path, how, message):
    shutil.copytree(checkpointed, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "checkpoint-4" / "phema-ema.pt"
    damage(path, how)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        trainer(tmp_path, [PostHocEMACallback()], max_steps=6).train(resume_from_checkpoint=True)


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="time='epochs'"):
        PostHocEMACallback(time="epochs")
    with pytest.raises(ValueError, match="snapshot_every=0"):
        PostHocEMACallback(snapshot_every=0)
    with pytest.raises(TypeError, match="unknown option.*snapshot_evry"):
        PostHocEMACallback(snapshot_evry=3)
    with pytest.raises(ValueError, match="sigma_rel=0.3 is not tracked"):
        PostHocEMACallback(eval_sigma_rel=0.3)


def test_evaluations_on_the_average_go_to_the_trainers_report_to_loggers(tmp_path):
    """report_to="tensorboard": the eval loss the Trainer logs is that of the average (the
    weights recorded during each evaluation, scored again here by a fresh model), read back from
    the event files with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Record(transformers.TrainerCallback):
        """The weights each evaluation runs on."""

        def __init__(self) -> None:
            self.evaluated: dict[int, dict[str, torch.Tensor]] = {}

        def on_prediction_step(self, args, state, control, model=None, **kw):
            self.evaluated[state.global_step] = {
                k: v.clone() for k, v in model.state_dict().items()
            }

    class FirstLabelIgnored(Tokens):
        """The first token is never predicted: its label -100 makes the Trainer's token count
        (labels other than -100) that of the predicted tokens, the count a mean divides by."""

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            labels = self.ids[i].clone()
            labels[0] = -100
            return {"input_ids": self.ids[i], "labels": labels}

    cb = PostHocEMACallback(snapshot_every=4)
    record = Record()
    t = trainer(
        tmp_path, [cb, record], eval_strategy="steps", eval_steps=3, report_to="tensorboard"
    )
    t.eval_dataset = FirstLabelIgnored(4, 2)  # one batch
    t.train()
    # The Trainer's TensorBoard directory: output_dir/runs/<date and host>/.
    [event_file] = tmp_path.glob("runs/*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert sorted(logged) == sorted(record.evaluated) == [3, 6, 9, 10]
    ids = t.eval_dataset.ids
    model = gpt2().eval()

    def loss(weights: dict[str, torch.Tensor]) -> float:
        """Next-token cross-entropy, averaged over every predicted token."""
        model.load_state_dict(weights)
        with torch.no_grad():
            logits = model(ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))

    # The last evaluation ran on the tracker's final average of the first profile.
    for k, v in cb.ema.state_dict()["averages"][0].items():
        assert torch.equal(record.evaluated[STEPS][k], v), k
    for step, weights in record.evaluated.items():
        assert logged[step] == pytest.approx(loss(weights), rel=1e-5), step
    # The trained weights are back in the model after training, and they are not the average.
    trained = t.model.state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in record.evaluated[STEPS].items())
