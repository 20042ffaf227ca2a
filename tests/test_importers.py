"""Importers (docs/importers.md): files built to the exact formats of EDM2, ema-pytorch,
Lightning and timm become phema stores whose snapshots hold the same tensors, times and
profiles; nothing in a pickle runs; failures leave nothing behind."""

from __future__ import annotations

import math
import os
import pickle
import sys

import import_formats as formats
import numpy as np
import pytest
import torch
from safetensors import safe_open

import phema
from phema import _core, importers
from phema.cli import main
from phema.importers import SourceError, import_store

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
import fuzz_importers  # noqa: E402


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The file the embedded class source (or any exploit) would leave if it ran."""
    path = tmp_path / "marker"
    monkeypatch.setenv(formats.MARKER_ENV, str(path))
    yield path
    assert not path.exists(), "code from an imported file ran"


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _meta(path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata())


def _edm2_run(root, marker) -> dict[tuple[int, float], torch.nn.Module]:
    """Snapshot pickles at two times for two profiles, and a training state at the first time."""
    os.makedirs(root, exist_ok=True)
    nets = {}
    for i, nimg in enumerate((2**21, 2**22)):  # 2097152 and 4194304 images
        for j, s in enumerate((0.05, 0.1)):
            net = formats.edm2_network(10 * i + j)
            nets[nimg, s] = net
            formats.write_edm2_pickle(
                os.path.join(root, f"network-snapshot-{nimg // 1000:07d}-{s:.3f}.pkl"), net
            )
    state = [formats.edm2_network(100), formats.edm2_network(101)]
    formats.write_edm2_state(
        os.path.join(root, f"training-state-{2**21 // 1000:07d}.pt"), 2**21, state, [0.05, 0.1]
    )
    nets[2**21, 0.05], nets[2**21, 0.1] = state  # the fp32 state replaces the fp16 pickles
    return nets


def test_edm2_snapshots_import_with_names_times_and_profiles_without_running_their_source(
    tmp_path, marker
):
    nets = _edm2_run(tmp_path / "run", marker)
    written = import_store(tmp_path / "store", tmp_path / "run", kind="edm2")
    store = phema.open_store(tmp_path / "store")
    assert len(written) == len(store) == 4
    for snap in store.snapshots:
        net = nets[int(snap.t), round(snap.sigma_rel, 6)]
        assert snap.gamma == pytest.approx(phema.sigma_rel_to_gamma(snap.sigma_rel))
        expected = {k: v.float() for k, v in net.state_dict().items()}
        got = _tensors(snap.path)
        # The module tree's names; the non-persistent buffer is not part of a state dict.
        assert set(got) == set(expected) and "unet.emb_fourier.scratch" not in got
        for k, v in expected.items():
            torch.testing.assert_close(got[k].float(), v, rtol=0, atol=0)
        meta = snap.metadata
        assert meta["phema.imported_from"] == "edm2" and len(meta["phema.run_id"]) == 16
        # The training state holds the same averages in float32: kept over the pickles.
        assert snap.dtype == ("F32" if snap.t == 2**21 else "F16")
        assert meta["phema.source"].startswith("training-state" if snap.t == 2**21 else "network")
    # A phema store like any other: post-hoc EMA works on it.
    sol = phema.solve(store, sigma_rels=[0.07])
    assert sol.weights.sum() == pytest.approx(1.0)


def test_edm2_times_are_the_multiples_of_1024_images_the_names_stand_for():
    for nimg in range(1024, 50_000_000, 1024 * 997):
        assert importers.kimg_to_images(nimg // 1000) == nimg
    assert importers.kimg_to_images(5) == 5120  # 5120 // 1000 == 5
    # A kimg no multiple of 1024 gives (none here: 1024 > 1000 always has one): kimg * 1000.


def test_a_pickle_running_os_system_is_refused_naming_file_and_class(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    bad = run / "network-snapshot-0001024-0.050.pkl"
    formats.write_malicious_pickle(str(bad), str(marker))
    with pytest.raises(
        SourceError, match=r"network-snapshot-0001024-0\.050\.pkl.*(posix|os)\.system"
    ):
        import_store(tmp_path / "store", run, kind="edm2")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.GLOBAL + b"builtins\neval\n" + b"(S'1'\ntR.",
        pickle.GLOBAL + b"collections\nCounter\n" + b")R.",
        pickle.GLOBAL + b"torch\nload\n" + b")R.",
        pickle.GLOBAL + b"torch_utils.persistence\npersistent_class\n" + b")R.",
    ],
)
def test_classes_outside_the_allow_list_are_refused(tmp_path, marker, payload):
    path = tmp_path / "network-snapshot-0001024-0.050.pkl"
    path.write_bytes(payload)
    name = payload[1:].split(b"\n")[:2]
    with pytest.raises(SourceError, match=f"{path}.*{b'.'.join(name).decode()}"):
        importers.load_edm2_pickle(path)


def test_fuzzed_edm2_pickles_and_torch_files_fail_cleanly_naming_the_file(tmp_path, marker):
    net = formats.edm2_network(0)
    pkl = tmp_path / "network-snapshot-0001024-0.050.pkl"
    formats.write_edm2_pickle(str(pkl), net)
    pt = tmp_path / "training-state-0001024.pt"
    formats.write_edm2_state(str(pt), 1024 * 1000, [net, net], [0.05, 0.1])
    cases = [
        (pkl, importers._edm2_pickle_tensors),
        (pt, lambda p: [i.read() for i in importers._edm2_state_items(p, 1024)]),
    ]
    for path, load in cases:
        counts = fuzz_importers.fuzz(
            path.read_bytes(), path.name, load, 150, seed=7, marker=str(marker)
        )
        assert counts["refused"] > 50  # the mutations do reach the refusals


def _ema_pytorch_run(root, sigma_rels, update_every, steps, every):
    """An ema-pytorch PostHocEMA folder: KarrasEMA per profile, `{ind}.{step}.pt` fp16 state
    dicts every `every` calls, over a model trained with SGD."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    emas = [formats.KarrasEMA(model, phema.sigma_rel_to_gamma(s)) for s in sigma_rels]
    os.makedirs(root, exist_ok=True)
    saved = {}
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = (model(x) - x[:, :2]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for e in emas:
            e.update(model, update_every)
        step = int(emas[0].step)
        if step % every == 0:
            for ind, e in enumerate(emas):
                import copy

                sd = copy.deepcopy(e).to(torch.float16).state_dict()
                torch.save(sd, os.path.join(root, f"{ind}.{step}.pt"))
                saved[ind, step] = sd
    return saved


def test_ema_pytorch_folders_store_the_profile_update_every_really_tracked(tmp_path):
    saved = _ema_pytorch_run(tmp_path / "phema-ckpt", (0.05, 0.08), 4, 120, 40)
    paths = import_store(
        tmp_path / "store",
        tmp_path / "phema-ckpt",
        kind="ema-pytorch",
        sigma_rels=[0.05, 0.08],
        update_every=4,
    )
    store = phema.open_store(tmp_path / "store")
    assert len(paths) == len(store) == 6
    for snap in store.snapshots:
        requested = float(snap.metadata["phema.import_sigma_rel"])
        ind = [0.05, 0.08].index(requested)
        gamma = phema.sigma_rel_to_gamma(requested)
        assert snap.gamma == pytest.approx((gamma + 1) / 4 - 1)
        assert snap.metadata["phema.step"] == str(int(snap.t))
        error = float(snap.metadata["phema.import_profile_error"])
        assert error == pytest.approx(
            importers.ema_pytorch_profile_error(gamma, 4, int(snap.t)), rel=1e-3
        )
        got = _tensors(snap.path)
        sd = saved[ind, int(snap.t)]
        assert set(got) == {k.removeprefix("ema_model.") for k in sd if k.startswith("ema_model.")}
        for k, v in got.items():
            assert torch.equal(v, sd["ema_model." + k])


def test_sigma_rel_005_every_10_steps_is_0246():
    gamma = importers.ema_pytorch_gamma(phema.sigma_rel_to_gamma(0.05), 10)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(0.246, abs=5e-4)


@pytest.mark.parametrize("update_every", [1, 3, 10])
def test_ema_pytorch_weights_are_those_of_its_update_rule(update_every):
    """A model whose only weight is a one-hot of the step: the average KarrasEMA.update makes
    of it is the weight of each step."""
    steps = 200
    gamma = phema.sigma_rel_to_gamma(0.05)
    model = torch.nn.Linear(steps, 1, bias=False, dtype=torch.float64)
    ema = formats.KarrasEMA(model, gamma)
    for s in range(steps):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, s] = 1.0  # the weights the call at step s sees
        ema.update(model, update_every)
    realized = ema.ema_model.weight[0].numpy()
    expected = np.zeros(steps)
    expected[::update_every] = importers.ema_pytorch_weights(gamma, update_every, steps)
    np.testing.assert_allclose(realized, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("update_every", [1, 2, 10])
def test_recorded_profile_error_matches_a_fine_grid_integral(update_every):
    gamma = phema.sigma_rel_to_gamma(0.05)
    steps = 300
    w = importers.ema_pytorch_weights(gamma, update_every, steps)
    g = importers.ema_pytorch_gamma(gamma, update_every)
    # Each call's weight spread over the update_every steps up to the next call, counted back
    # from the snapshot.
    x = (np.arange(2_000_000) + 0.5) * steps / 2_000_000
    edges = steps - update_every * np.arange(len(w), -1, -1, dtype=float)
    edges[0] = 0.0
    which = np.searchsorted(edges, x, side="right") - 1
    density = w[which] / np.diff(edges)[which]
    power = (g + 1) * x**g / steps ** (g + 1)
    expected = np.sqrt(np.mean((density - power) ** 2) / np.mean(power**2))
    got = importers.ema_pytorch_profile_error(gamma, update_every, steps)
    assert got == pytest.approx(expected, rel=2e-3)
    # The uncorrected profile (gamma as requested) is far worse when update_every > 1.
    if update_every > 1:
        wrong = (gamma + 1) * x**gamma / steps ** (gamma + 1)
        naive = np.sqrt(np.mean((density - wrong) ** 2) / np.mean(wrong**2))
        assert naive > 20 * got


def test_ema_pytorch_needs_sigma_rels_and_update_every(tmp_path):
    _ema_pytorch_run(tmp_path / "ck", (0.05, 0.1), 1, 20, 10)
    with pytest.raises(ValueError, match="sigma_rel"):
        import_store(tmp_path / "s", tmp_path / "ck", kind="ema-pytorch", update_every=1)
    with pytest.raises(ValueError, match="update_every"):
        import_store(tmp_path / "s", tmp_path / "ck", kind="ema-pytorch", sigma_rels=[0.05, 0.1])
    with pytest.raises(ValueError, match="ema index 1, but 1 sigma_rels"):
        import_store(
            tmp_path / "s", tmp_path / "ck", kind="ema-pytorch", sigma_rels=[0.05], update_every=1
        )
    os.rename(tmp_path / "ck" / "1.20.pt", tmp_path / "ck" / "1.30.pt")
    with pytest.raises(SourceError, match=r"1\.30\.pt: its step counter is 20"):
        import_store(
            tmp_path / "s",
            tmp_path / "ck",
            kind="ema-pytorch",
            sigma_rels=[0.05, 0.1],
            update_every=1,
        )
    assert not (tmp_path / "s").exists()


def test_timm_checkpoints_become_a_raw_store_timed_by_epochs_completed(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "timm"
    src.mkdir()
    sds = {}
    for epoch in range(3):
        sd = {
            "fc.weight": torch.randn(3, 4),
            "fc.bias": torch.randn(3),
            "bn.num_batches_tracked": torch.tensor(epoch),
        }
        sds[epoch + 1] = sd
        torch.save(
            {"epoch": epoch, "arch": "tiny", "state_dict": sd, "optimizer": {}, "version": 2},
            src / f"checkpoint-{epoch}.pth.tar",
        )
    import_store(tmp_path / "store", src, kind="timm", dtype="f32")
    store = phema.open_store(tmp_path / "store")
    assert [s.t for s in store.snapshots] == [1, 2, 3]
    assert {s.kind for s in store.snapshots} == {"raw"}
    for snap in store.snapshots:
        got = _tensors(snap.path)
        for k, v in sds[int(snap.t)].items():
            assert torch.equal(got[k], v)
    # Plain checkpoints: post-hoc EMA over them works like --checkpoints.
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.2, allow_poor_fit=True)
    assert set(sd) == set(sds[1])


def test_lightning_checkpoints_import_with_their_global_step_and_model_prefix_stripped(tmp_path):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(4, 2)

        def training_step(self, batch, i):
            return self.model(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4
    )
    ckpts = tmp_path / "ckpts"
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1)
        ],
    )
    trainer.fit(Module(), data)
    files = sorted(os.listdir(ckpts))
    import_store(tmp_path / "store", ckpts, kind="lightning", strip_prefix="model.", dtype="f32")
    store = phema.open_store(tmp_path / "store")
    assert [s.t for s in store.snapshots] == [2, 4, 6]
    for snap in store.snapshots:
        [name] = [f for f in files if f"step={int(snap.t)}" in f]
        ckpt = torch.load(ckpts / name, weights_only=True)
        expected = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        got = _tensors(snap.path)
        assert set(got) == {"weight", "bias"}
        for k in got:
            assert torch.equal(got[k], expected[k])


def test_torch_files_holding_other_classes_are_refused_naming_the_class(tmp_path):
    import fractions

    src = tmp_path / "ck"
    src.mkdir()
    torch.save(
        {"global_step": 1, "state_dict": {"w": torch.ones(2)}, "x": fractions.Fraction(1, 2)},
        src / "a-1.ckpt",
    )
    with pytest.raises(SourceError, match=r"a-1\.ckpt: holds fractions\.Fraction"):
        import_store(tmp_path / "store", src, kind="lightning")
    assert not (tmp_path / "store").exists()


def test_a_failure_midway_leaves_no_store_and_appending_is_explicit(tmp_path, marker):
    run = tmp_path / "run"
    _edm2_run(run, marker)
    good = run / "network-snapshot-0004194-0.100.pkl"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # the last file to be written is truncated
    with pytest.raises(SourceError, match="0004194-0.100.pkl"):
        import_store(tmp_path / "store", run, kind="edm2")
    assert not (tmp_path / "store").exists()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="0004194-0.100.pkl"):
        import_store(tmp_path / "existing", run, kind="edm2", append=True)
    assert os.listdir(tmp_path / "existing") == ["notes.txt"]

    good.write_bytes(data)
    os.rename(good, tmp_path / good.name)  # imported later, into the same run
    first = import_store(tmp_path / "store", run, kind="edm2")
    with pytest.raises(ValueError, match="not empty.*append"):
        import_store(tmp_path / "store", tmp_path / good.name, kind="edm2")
    with pytest.raises(ValueError, match="already holds the snapshot"):
        import_store(tmp_path / "store", run, kind="edm2", append=True)
    [more] = import_store(tmp_path / "store", tmp_path / good.name, kind="edm2", append=True)
    assert _meta(more)["phema.run_id"] == _meta(first[0])["phema.run_id"]
    assert len(phema.open_store(tmp_path / "store")) == 4


def test_the_store_may_not_be_inside_the_source(tmp_path, marker):
    _edm2_run(tmp_path / "run", marker)
    with pytest.raises(ValueError, match="inside the input"):
        import_store(tmp_path / "run" / "phema", tmp_path / "run", kind="edm2")


def test_cli_import_prints_one_line_and_errors_are_one_line(tmp_path, marker, capsys):
    _ema_pytorch_run(tmp_path / "ck", (0.05, 0.1), 2, 20, 10)
    argv = ["import", "ema-pytorch", str(tmp_path / "ck"), str(tmp_path / "store")]
    assert main(argv + ["--sigma-rel", "0.05,0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phema import: error:") and "update_every" in err and "\n" not in err
    assert main(argv + ["--sigma-rel", "0.05,0.1", "--update-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "imported 4 snapshots" in out and "phema.import_profile_error" in out
    assert main(["import", "edm2", str(tmp_path / "nowhere"), str(tmp_path / "s2")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_ctrl_c_midway_leaves_no_store(tmp_path, marker, monkeypatch):
    _edm2_run(tmp_path / "run", marker)
    calls = []
    real = importers._edm2_pickle_tensors

    def interrupted(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(importers, "_edm2_pickle_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_store(tmp_path / "store", tmp_path / "run", kind="edm2")
    assert not (tmp_path / "store").exists() and len(calls) == 2


def test_a_malicious_torch_file_is_refused_by_the_safe_loader(tmp_path, marker):
    src = tmp_path / "ck"
    src.mkdir()
    torch.save(
        {"global_step": 1, "state_dict": {"w": formats.MaliciousReduce(str(marker))}},
        src / "evil-1.ckpt",
    )
    with pytest.raises(SourceError, match=r"evil-1\.ckpt: holds (posix|os)\.system"):
        import_store(tmp_path / "store", src, kind="lightning")


def test_bad_arguments_are_one_error_each(tmp_path, marker):
    _edm2_run(tmp_path / "run", marker)
    with pytest.raises(ValueError, match="kind='edm3'"):
        import_store(tmp_path / "s", tmp_path / "run", kind="edm3")
    with pytest.raises(ValueError, match="sigma_rels is for ema-pytorch"):
        import_store(tmp_path / "s", tmp_path / "run", kind="edm2", sigma_rels=[0.1])
    with pytest.raises(ValueError, match="times are for plain checkpoints"):
        import_store(tmp_path / "s", tmp_path / "run", kind="edm2", times=[1, 2])
    with pytest.raises(ValueError, match="dtype='f8'"):
        import_store(tmp_path / "s", tmp_path / "run", kind="edm2", dtype="f8")
    with pytest.raises(ValueError, match="no EDM2 files"):
        import_store(tmp_path / "s", tmp_path, kind="edm2")
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "network-snapshot-0001024-0.500.pkl").write_bytes(b"")
    with pytest.raises(SourceError, match=r"0\.500\.pkl: sigma_rel 0\.500"):
        import_store(tmp_path / "s", tmp_path / "wide", kind="edm2")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "wide" / "a.pth")
    with pytest.raises(ValueError, match="3 times for 1 checkpoints"):
        import_store(tmp_path / "s", tmp_path / "wide" / "a.pth", kind="timm", times=[1, 2, 3])
    with pytest.raises(SourceError, match=r"a\.pth: no training time"):
        import_store(tmp_path / "s", tmp_path / "wide" / "a.pth", kind="timm")
    assert not (tmp_path / "s").exists()


def test_profile_error_of_long_runs_is_extrapolated_as_one_over_calls(monkeypatch):
    gamma = phema.sigma_rel_to_gamma(0.05)
    exact = importers.ema_pytorch_profile_error(gamma, 3, 30_000)
    monkeypatch.setattr(importers, "MAX_PROFILE_CALLS", 2_000)
    assert importers.ema_pytorch_profile_error(gamma, 3, 30_000) == pytest.approx(exact, rel=0.02)


def test_an_imported_update_every_run_reconstructs_what_phema_would_have_tracked(tmp_path):
    """ema-pytorch averaging every 4th step, imported with --update-every 4: the sigma_rel 0.15
    rebuilt from it matches a phema tracker's exact 0.15 average of the same run; imported as
    if it averaged every step, it is far off."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    sigma_rels, every = (0.05, 0.08), 4
    emas = [formats.KarrasEMA(model, phema.sigma_rel_to_gamma(s)) for s in sigma_rels]
    exact = phema.PostHocEMA(model, None, sigma_rels=(0.15,), write=False)
    (tmp_path / "ck").mkdir()
    for _ in range(800):
        x = torch.randn(16, 8)
        opt.zero_grad()
        (model(x) - x[:, :4]).square().mean().backward()
        opt.step()
        for e in emas:
            e.update(model, every)
        exact.update()
        step = int(emas[0].step)
        if step % 80 == 0:
            for ind, e in enumerate(emas):
                torch.save(e.state_dict(), tmp_path / "ck" / f"{ind}.{step}.pt")
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with exact.swapped(sigma_rel=0.15):
        truth = {k: v.clone() for k, v in model.state_dict().items()}

    def error(update_every: int) -> float:
        store = tmp_path / f"store-{update_every}"
        import_store(
            store,
            tmp_path / "ck",
            kind="ema-pytorch",
            sigma_rels=sigma_rels,
            update_every=update_every,
        )
        sd = phema.reconstruct_state_dict(store, sigma_rel=0.15, allow_poor_fit=True)
        num = sum((sd[k] - truth[k]).square().sum() for k in truth)
        return float((num / sum((raw[k] - truth[k]).square().sum() for k in truth)).sqrt())

    corrected, naive = error(every), error(1)
    assert corrected < 0.05  # of the distance between the average and the raw weights
    assert naive > 20 * corrected


def test_a_nan_in_a_source_is_an_error_naming_that_file_and_nothing_is_left(tmp_path):
    src = tmp_path / "timm"
    src.mkdir()
    for epoch, bad in enumerate([1.0, math.nan]):
        sd = {"fc.weight": torch.tensor([[1.0, bad]])}
        torch.save({"epoch": epoch, "state_dict": sd}, src / f"checkpoint-{epoch}.pth.tar")
    with pytest.raises(SourceError, match=r"checkpoint-1\.pth\.tar: tensor `fc.weight` holds NaN"):
        import_store(tmp_path / "store", src, kind="timm")
    assert not (tmp_path / "store").exists()


def test_a_stride_0_tensor_is_refused_not_expanded(tmp_path):
    # 4 bytes of data declared as 40 MB: bounded by what the file can hold.
    src = tmp_path / "timm"
    src.mkdir()
    sd = {"fc.weight": torch.zeros(1).expand(10_000_000)}
    torch.save({"epoch": 0, "state_dict": sd}, src / "checkpoint-0.pth.tar")
    assert os.path.getsize(src / "checkpoint-0.pth.tar") < 4096
    with pytest.raises(SourceError, match=r"checkpoint-0\.pth\.tar: `fc.weight` declares 10000000"):
        import_store(tmp_path / "store", src, kind="timm")
    assert not (tmp_path / "store").exists()


def test_ema_pytorch_default_update_every_is_stored_as_its_weights_per_step(tmp_path):
    """A real ema-pytorch PostHocEMA with its default update_every (100), whose profiles are no
    power function: imported as the weights per step it applied, then reconstructed at a
    sigma_rel against the exact float64 average of the recorded trajectory."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    steps, every, sigma_rel = 2000, 200, 0.1
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ema_pytorch.PostHocEMA(
        model,
        sigma_rels=(0.05, 0.28),
        checkpoint_every_num_steps=every,
        checkpoint_folder=str(tmp_path / "ck"),
        checkpoint_dtype=torch.float32,
    )
    assert ema.ema_models[0].update_every == 100
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    exact = {n: 0.0 for n, _ in model.named_parameters()}
    for k in range(1, steps + 1):
        x = torch.randn(16, 4)
        loss = (model(x) - x[:, :2]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        w = (k / steps) ** (gamma + 1) - ((k - 1) / steps) ** (gamma + 1)
        for n, p in model.named_parameters():
            exact[n] = exact[n] + w * p.detach().double().numpy()
    import_store(
        tmp_path / "store",
        tmp_path / "ck",
        kind="ema-pytorch",
        sigma_rels=[0.05, 0.28],
        update_every=100,
    )
    store = phema.open_store(tmp_path / "store")
    assert len(store) == 20 and {s.kind for s in store.snapshots} == {"steps"}
    for snap in store.snapshots:
        run_gamma = phema.sigma_rel_to_gamma(float(snap.metadata["phema.import_sigma_rel"]))
        edges, weights = importers.ema_pytorch_steps(run_gamma, 100, int(snap.t))
        np.testing.assert_allclose(snap.steps[0], edges, rtol=1e-15)
        np.testing.assert_allclose(snap.steps[1], weights, rtol=1e-12)
    sol = phema.solve(store, sigma_rels=sigma_rel)
    assert not sol.poor[0] and abs(sol.mass[0] - 1) < 1e-9
    ours = phema.reconstruct_state_dict(store, sigma_rel=sigma_rel, dtype=torch.float64)
    theirs = ema.synthesize_ema_model(sigma_rel=sigma_rel).ema_model.state_dict()
    last = model.state_dict()
    err = {
        name: _rel_l2({n: v.double().numpy() for n, v in sd.items()}, exact)
        for name, sd in (("phema", ours), ("ema-pytorch", theirs), ("last", last))
    }
    # docs/importers.md gives these figures (phema 0.0067, ema-pytorch 0.69, last 0.027).
    assert err["phema"] < 0.01 and err["phema"] < err["last"] / 3, err
    assert err["ema-pytorch"] > 50 * err["phema"], err


@pytest.mark.parametrize("noise", [0.0, "auto"])
def test_fit_errors_over_stepwise_profiles_are_their_residual_at_large_gains(noise):
    """The fit error phema reports over ema-pytorch's stepwise profiles (default update_every
    100, a snapshot every 200 steps) is the residual of the weights it gives, integrated here
    over the steps: windows starting on the 100-step grid are exactly representable, with gains
    in the thousands, where the Gram-matrix formula reads its own rounding (0 or ~1e-5)."""
    records = []
    for s in (0.05, 0.28):
        for t in range(200, 2001, 200):
            edges, w = importers.ema_pytorch_steps(phema.sigma_rel_to_gamma(s), 100, t)
            records.append({"t": float(t), "kind": "steps", "steps": (edges, w), "dtype": "F32"})
    widths = [200.0, 400.0, 1000.0, 400.0 + 1e-6, 400.0 + 1e-2, 250.0]
    sol = phema.solve(records, windows=widths, noise=noise)
    cuts = np.union1d(np.arange(0.0, 2001.0, 100.0), [2000.0 - w for w in widths])
    mid = (cuts[1:] + cuts[:-1]) / 2
    # Each snapshot's density at the piece midpoints (0 past its end).
    dens = np.zeros((len(records), len(mid)))
    for i, r in enumerate(records):
        edges, w = r["steps"]
        j = np.searchsorted(edges, mid) - 1
        inside = (j >= 0) & (j < len(w))
        dens[i, inside] = (w / np.diff(edges))[j[inside]]
    for k, width in enumerate(widths):
        target = np.where(mid > 2000.0 - width, 1.0 / width, 0.0)
        residual = sol.weights[:, k] @ dens - target
        want = math.sqrt(np.sum(residual**2 * np.diff(cuts)) * width)
        got = float(sol.fit_error[k])
        assert abs(got - want) <= 1e-3 * want + 1e-10, (width, got, want, sol.gain[k])
    if noise == 0.0:
        assert sol.gain.max() > 1000 and sol.fit_error[:3].max() < 1e-5


def _rel_l2(got: dict, want: dict) -> float:
    num = sum(float(np.sum((got[n] - w) ** 2)) for n, w in want.items())
    return (num / sum(float(np.sum(w**2)) for w in want.values())) ** 0.5


def test_ema_pytorch_profiles_of_more_calls_than_a_store_keeps_are_grouped():
    calls = 2 * _core.MAX_STORED_STEPS + 7
    gamma = phema.sigma_rel_to_gamma(0.2)
    edges, weights = importers.ema_pytorch_steps(gamma, 1, calls)
    assert len(weights) <= _core.MAX_STORED_STEPS and edges[0] == 0 and edges[-1] == calls
    assert abs(weights.sum() - 1) < 1e-12 and np.all(np.diff(edges) > 0)
    # The mass up to every group edge is the ungrouped profile's there.
    w = importers.ema_pytorch_weights(gamma, 1, calls)
    full = np.concatenate([[0.0], np.cumsum(w)])
    np.testing.assert_allclose(np.cumsum(weights), full[edges[1:].astype(int)], atol=1e-12)


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ('{"edges": [0, 50, 100], "weights": [0.7, 0.7]}', "summing to 1.4"),
        ('{"edges": [0, 50, 100], "weights": [1.2, -0.2]}', "-0.2"),
        ('{"edges": [0, 50], "weights": [1]}', "ends at 50"),
        ("[0, 1]", "is not"),
    ],
)
def test_a_bad_stepwise_profile_is_one_error_naming_its_file(tmp_path, steps, why):
    from phema.store import write_snapshot

    tmp_path.joinpath("s").mkdir()
    path = tmp_path / "s" / "bad.safetensors"
    meta = {"phema.kind": "steps", "phema.t": "100", "phema.steps": steps}
    write_snapshot(path, {"w": np.zeros(3, np.float32)}, "float32", meta)
    with pytest.raises(ValueError, match="bad.safetensors") as info:
        phema.open_store(tmp_path / "s")
    assert "phema.steps" in str(info.value) and why in str(info.value)
