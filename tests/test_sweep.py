"""phema.sweep on a real (tiny) training run: every metric equals evaluating that target's
reconstruction by hand, the model comes back untouched, results files resume, per-tensor
sweeps vary one group, and the CLI writes table, CSV, figure and the best checkpoint."""

from __future__ import annotations

import copy
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import load_file

import phema
from phema.cli import main

SIGMAS = [0.03, 0.06, 0.12, 0.2]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    return x, (x[:, :1] * x[:, 1:2]).sin()


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    x, y = data()
    with torch.no_grad():
        err = model(x) - y
    return {"mse": float((err**2).mean()), "mae": float(err.abs().mean())}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A noisy SGD run of 400 steps tracked at sigma_rel 0.05 and 0.15, snapshots every 40."""
    store = tmp_path_factory.mktemp("sweep") / "store"
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = data()
    g = torch.Generator().manual_seed(2)
    with phema.PostHocEMA(model, store, (0.05, 0.15), snapshot_every=40) as ema:
        for _ in range(400):
            i = torch.randint(0, 256, (16,), generator=g)
            loss = ((model(x[i]) - y[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update()
    return store, model


def by_hand(store, model, **target) -> dict[str, float]:
    probe = make_model()
    phema.load_into(probe, phema.reconstruct_state_dict(store, **target))
    return evaluate(probe)


def test_each_metric_is_that_targets_evaluation_and_the_model_is_restored(run, tmp_path):
    store, model = run
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = phema.sweep(store, model, evaluate, sigma_rels=SIGMAS, betas=[0.99], batch=2)
    assert [r["kind"] for r in result.table] == ["sigma_rel"] * 4 + ["beta"]
    for row in result.rows:
        kw = {row.kind: row.value}
        want = by_hand(store, model, **kw)
        assert row.metrics == pytest.approx(want, rel=1e-6), row.label
        assert row.fit_error >= 0 and row.gain >= 1 - 1e-9
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    best = result.best("mse")
    assert best.metrics["mse"] == min(r.metrics["mse"] for r in result.rows)
    assert result.best("mse", mode="max").metrics["mse"] == max(r["mse"] for r in result.table)
    # The best row's weights load and evaluate to its metric.
    probe = make_model()
    phema.load_into(probe, best.state_dict)
    assert evaluate(probe)["mse"] == pytest.approx(best.metrics["mse"], rel=1e-6)


def test_batches_of_any_size_give_the_same_table(run):
    store, model = run
    one = phema.sweep(store, model, evaluate, sigma_rels=SIGMAS, batch=1, progress=False)
    many = phema.sweep(store, model, evaluate, sigma_rels=SIGMAS, batch=64, progress=False)
    assert [r.metrics for r in one.rows] == [r.metrics for r in many.rows]


def test_each_batch_is_one_pass_and_a_stored_profile_reads_its_one_file(run, monkeypatch):
    store, model = run
    import phema.sweeps.run

    passes = []
    real = phema.sweeps.run.state_dicts

    def recording(store_, plan, *args, **kwargs):
        passes.append((len(plan.outputs), len(plan.used)))
        # A pass computes its own targets only: one weight column per output, its own.
        assert plan.weights.shape[1] == len(plan.outputs)
        assert [o.column for o in plan.outputs] == list(range(len(plan.outputs)))
        return real(store_, plan, *args, **kwargs)

    monkeypatch.setattr(phema.sweeps.run, "state_dicts", recording)
    n = len(phema.open_store(store).snapshots)
    result = phema.sweep(store, model, evaluate, sigma_rels=[0.03, 0.05, 0.08, 0.12], batch=2)
    assert len(result.rows) == 4
    # sigma_rel 0.05 is tracked: at the last time its own snapshot is the whole answer.
    assert sorted(passes) == [(1, 1), (1, n), (2, n)]
    # Each row is its own target's reconstruction (the columns were not mixed up).
    for r in result.rows:
        assert r.metrics == pytest.approx(by_hand(store, model, sigma_rel=r.value))


def test_at_most_two_batches_exist_while_evaluate_is_slow(run, monkeypatch):
    """A batch is built only when at most one other is alive: built - fully evaluated <= 1."""
    import time

    import phema.sweeps.run

    store, model = run
    built, evaluated = [], []
    real = phema.sweeps.run.state_dicts

    def building(store_, plan, *args, **kwargs):
        built.append(len(built) - len(evaluated))  # batches alive besides this one
        return real(store_, plan, *args, **kwargs)

    def slow(m):
        time.sleep(0.05)  # the worker would run ahead of a slow evaluate
        out = evaluate(m)
        evaluated.append(1)
        return out

    monkeypatch.setattr(phema.sweeps.run, "state_dicts", building)
    sigmas = [0.03, 0.04, 0.06, 0.08, 0.12, 0.2]
    result = phema.sweep(store, model, slow, sigma_rels=sigmas, batch=1, progress=False)
    assert len(result.rows) == len(built) == len(sigmas)
    assert max(built) == 1 and built[0] == 0


def test_a_results_file_keeps_the_rows_of_other_targets_and_times(run, tmp_path):
    store, model = run
    results = tmp_path / "sweep.csv"
    first = phema.sweep(store, model, evaluate, sigma_rels=[0.06, 0.12], results=results)
    t = phema.open_store(store).snapshots[-5].t
    second = phema.sweep(store, model, evaluate, sigma_rels=[0.12, 0.2], at=t, results=results)
    with open(results) as f:
        lines = list(csv.DictReader(f))
    got = {(r["label"], float(r["t"])): float(r["mse"]) for r in lines}
    want = {(r.label, r.t): r.metrics["mse"] for r in first.rows + second.rows}
    assert got == want and len(lines) == 4
    # A third sweep over the first grid evaluates nothing and keeps every row.
    calls = []
    again = phema.sweep(
        store, model, lambda m: calls.append(1) or evaluate(m), sigma_rels=[0.06], results=results
    )
    assert not calls and again.rows[0].metrics["mse"] == got[("sigma_rel-0.060", first.rows[0].t)]
    with open(results) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_infeasible_and_poor_targets_are_left_out_with_one_note(run):
    store, model = run
    with pytest.warns(UserWarning, match="0.3 left out") as caught:
        result = phema.sweep(store, model, evaluate, sigma_rels=[0.001, 0.1, 0.3])
    assert [r.value for r in result.rows] == [0.1]
    assert "sigma_rel-0.001" in str(caught[0].message)
    assert result.notes and len(caught) == 1
    with pytest.raises(phema.PoorFitError):  # reconstruct keeps refusing them
        phema.reconstruct_state_dict(store, sigma_rel=0.001)


def test_results_file_resumes_and_keeps_rows_done_before_an_interrupt(run, tmp_path):
    store, model = run
    results = tmp_path / "runs" / "sweep.csv"
    calls = []

    def counting(m):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(m)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        phema.sweep(store, model, counting, sigma_rels=SIGMAS, results=results, batch=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with open(results) as f:
        assert [r["label"] for r in csv.DictReader(f)] == ["sigma_rel-0.030", "sigma_rel-0.060"]
    calls.clear()
    result = phema.sweep(store, model, counting, sigma_rels=SIGMAS, results=results)
    assert len(calls) == 2  # only the two not done yet
    assert len(result.rows) == 4
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == SIGMAS
    assert float(rows[0]["mse"]) == pytest.approx(by_hand(store, model, sigma_rel=0.03)["mse"])
    # Another time is another target: evaluated, not taken from the file.
    calls.clear()
    t = phema.open_store(store).snapshots[-3].t
    phema.sweep(store, model, counting, sigma_rels=[0.06], at=t, results=results)
    assert len(calls) == 1


def test_two_sweeps_sharing_a_results_file_keep_each_others_rows(run, tmp_path):
    store, model = run
    results = tmp_path / "shared.csv"
    together = threading.Barrier(2)

    def in_step(m):
        out = evaluate(m)
        together.wait(timeout=60)  # the two sweeps write their rows in the same moments
        return out

    grids = ([0.03, 0.06], [0.12, 0.2])
    errors = []

    def one(grid):
        try:
            phema.sweep(
                store, make_model(), in_step, sigma_rels=grid, batch=1, results=results,
                progress=False,
            )  # fmt: skip
        except Exception as e:  # a thread's failure would not fail the test by itself
            errors.append(e)

    threads = [threading.Thread(target=one, args=(g,)) for g in grids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(results) as f:
        got = sorted(float(r["value"]) for r in csv.DictReader(f))
    assert got == sorted(grids[0] + grids[1])
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_evaluate_errors_propagate_after_the_model_is_restored(run):
    store, model = run
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(m):
        m.eval()
        with torch.no_grad():
            m[0].weight.mul_(0)
        raise RuntimeError("user code failed")

    model.train()
    with pytest.raises(RuntimeError, match="user code failed"):
        phema.sweep(store, model, broken, sigma_rels=SIGMAS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[0].training


def test_bad_arguments_are_one_clear_error(run, tmp_path):
    store, model = run
    with pytest.raises(TypeError, match="not callable"):
        phema.sweep(store, model, "evaluate", sigma_rels=SIGMAS)
    with pytest.raises(TypeError, match="expected a number"):
        phema.sweep(store, model, lambda m: "good", sigma_rels=[0.1])
    with pytest.raises(ValueError, match="another architecture"):
        phema.sweep(store, torch.nn.Linear(2, 2), evaluate, sigma_rels=[0.1])
    with pytest.raises(ValueError, match="batch=0"):
        phema.sweep(store, model, evaluate, sigma_rels=[0.1], batch=0)
    with pytest.raises(ValueError, match="'soon'"):
        phema.sweep(store, model, evaluate, sigma_rels=[0.1], at="soon")
    with pytest.raises(ValueError, match="feasible"):
        phema.sweep(store, model, evaluate, sigma_rels=[0.5])
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="garbage.csv"):
        phema.sweep(store, model, evaluate, sigma_rels=[0.1], results=garbage)
    assert garbage.read_text() == "a,b\n1,2\n"


def test_every_snapshot_time_gives_a_heatmap_and_the_plot_marks_the_best(run, tmp_path):
    store, model = run
    times = [s.t for s in phema.open_store(store).snapshots]
    with pytest.warns(UserWarning, match="t=40: sigma_rel-0.060 left out"):
        result = phema.sweep(store, model, evaluate, sigma_rels=[0.06, 0.12], at="all")
    assert {r.t for r in result.rows} <= set(times)
    assert len({r.t for r in result.rows}) > 3
    png = result.plot(tmp_path / "heat.png", "mae")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # The best power EMA of each time, and the rows of one time.
    per_time = result.best_by_time("mae")
    assert [r.t for r in per_time] == sorted({r.t for r in result.rows})
    for r in per_time:
        at_t = [x.metrics["mae"] for x in result.rows if x.t == r.t]
        assert r.metrics["mae"] == min(at_t) and result.at(r.t).best("mae") is r
    with pytest.raises(ValueError, match="the sweep has rows at"):
        result.at(-1.0)
    curve = phema.sweep(
        store,
        model,
        evaluate,
        sigma_rels=SIGMAS,
        betas=[0.99],
        raw=phema.open_store(store).inputs[-1],
    )
    assert curve.raw is not None and "mse" in curve.raw.metrics
    png = curve.plot(tmp_path / "curve.png")
    assert os.path.getsize(png) > 1000
    # Several metrics, a panel each, with reference lines and titles.
    png = curve.plot(
        tmp_path / "panels.png",
        ["mae", "mse"],
        "min",
        references={"zero model": {"mae": 0.5, "mse": 1e3}},
        labels={"mae": "mean absolute error"},
        title="two metrics",
    )
    assert os.path.getsize(png) > os.path.getsize(tmp_path / "curve.png") / 2
    with pytest.raises(ValueError, match="metric 'fid'"):
        curve.plot(tmp_path / "no.png", ["mae", "fid"])


def test_save_best_writes_the_best_weights(run, tmp_path):
    store, model = run
    result = phema.sweep(store, model, evaluate, sigma_rels=SIGMAS)
    [path] = result.save_best(tmp_path / "best", "mse")
    best = result.best("mse")
    assert os.path.basename(path) == best.label + ".safetensors"
    got = load_file(path)
    want = best.state_dict
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # float32, the model's own dtype


def test_varying_one_group_keeps_the_others_fixed(run):
    store, model = run
    result = phema.sweep(
        store, model, evaluate, sigma_rels=[0.04, 0.2], tensor_sigma_rels={"*": 0.1}, vary="2.*"
    )
    fixed = phema.reconstruct_state_dict(store, sigma_rel=0.1)
    for row in result.rows:
        sd = row.state_dict
        own = phema.reconstruct_state_dict(store, sigma_rel=row.value)
        for k, v in sd.items():
            want = own[k] if k.startswith("2.") else fixed[k]
            assert torch.equal(v, want), (row.label, k)
        probe = make_model()
        phema.load_into(probe, sd)
        assert evaluate(probe) == pytest.approx(row.metrics, rel=1e-6)


CLI_MODULE = """
import torch

def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

def evaluate(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, :1] * x[:, 1:2]).sin()
    with torch.no_grad():
        err = model(x) - y
    return {"mse": float((err**2).mean()), "mae": float(err.abs().mean())}
"""


def test_cli_sweep_writes_table_csv_figure_and_best(run, tmp_path, capsys, monkeypatch):
    store, model = run
    (tmp_path / "sweepmod.py").write_text(textwrap.dedent(CLI_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    args = [
        "sweep",
        str(store),
        "--model",
        "sweepmod:make_model",
        "--eval",
        "sweepmod:evaluate",
        "--sigma-rel",
        "0.03:0.12:0.03",
        "--beta",
        "0.99",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sigma_rel-0.090" in printed and "beta-0.99" in printed and "best mse" in printed
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    best = min(rows, key=lambda r: float(r["mse"]))
    assert (out / f"{best['label']}.safetensors").is_file()
    assert (out / "sweep.png").stat().st_size > 1000
    want = by_hand(store, model, **{best["kind"]: float(best["value"])})["mse"]
    assert float(best["mse"]) == pytest.approx(want, rel=1e-6)
    # User mistakes: one line, no traceback.
    for bad, message in [
        (["--model", "nosuchmod:make_model"], "nosuchmod"),
        (["--model", "sweepmod:nothing"], "nothing"),
        (["--tensor-sigma-rel", "oops"], "PATTERN=SIGMA_REL"),
    ]:
        assert main([*args[:2], *args[2:], *bad]) == 2
        assert message in capsys.readouterr().err
    # A dtype typo is refused before any target is evaluated (no results file is begun).
    typo = [*args[:-1], str(tmp_path / "typo"), "--dtype", "f61"]
    assert main(typo) == 2
    assert "f61" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "sweep.csv").exists()
    del sys.modules["sweepmod"]


def test_the_model_keeps_its_own_tensors_and_a_bf16_model_gets_cast_weights(run):
    store, model = run
    before = [(p, p.data_ptr(), p.clone()) for p in model.parameters()]
    phema.sweep(store, model, evaluate, sigma_rels=[0.06, 0.12], progress=False)
    for p, (q, ptr, value) in zip(model.parameters(), before):
        assert p is q and p.data_ptr() == ptr and torch.equal(p, value)
    half = make_model().to(torch.bfloat16)
    seen = []

    def in_float(m):
        seen.append(m[0].weight.dtype)
        return evaluate(copy.deepcopy(m).float())

    result = phema.sweep(store, half, in_float, sigma_rels=[0.06], progress=False)
    want = make_model()
    sd = phema.reconstruct_state_dict(store, sigma_rel=0.06)
    phema.load_into(want, {k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    assert seen == [torch.bfloat16]
    assert result.rows[0].metrics == evaluate(want)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount")
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(run, tmp_path, capsys):
    store, model = run
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = phema.sweep(store, model, evaluate, sigma_rels=SIGMAS, progress=False)
        with pytest.raises(OSError, match="big.png: No space left on device"):
            result.plot(out / "big.png")  # a figure is tens of kilobytes
        assert os.listdir(out) == []  # no partial image, no temporary file
        # The CSV fits; the figure after it does not: one line, no traceback, the CSV kept.
        sys.modules["sweep_user"] = type(sys)("sweep_user")
        sys.modules["sweep_user"].make_model = make_model
        sys.modules["sweep_user"].evaluate = evaluate
        code = main(
            ["sweep", str(store), "--model", "sweep_user:make_model", "--eval",
             "sweep_user:evaluate", "--sigma-rel", "0.06,0.12", "--out", str(out), "-q"]
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "No space left on device" in err and str(out) in err
        assert not [n for n in os.listdir(out) if ".tmp-" in n]
        assert oct(os.stat(out / "sweep.csv").st_mode & 0o777) == oct(0o666 & ~_umask())
    finally:
        sys.modules.pop("sweep_user", None)
        subprocess.run(["umount", str(out)])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_killed_sweeps_temporary_files_are_removed_by_the_next_write(run, tmp_path):
    """Results, figures and best weights are written like snapshots (docs/store-format.md): a
    temporary name carrying host and pid, which the next writer to the directory removes once
    that pid is dead on this host; a live process's temporary file and other hosts' stay."""
    store, model = run
    host = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"  # as documented
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (a kill -9 mid-write leaves exactly this)
    left = {
        "dead": f".sweep.csv.tmp-{host}-{dead.pid}-0",
        "alive": f".sweep.csv.tmp-{host}-{os.getppid()}-0",
        "other host": f".sweep.csv.tmp-{host}x-{dead.pid}-0",
    }
    for name in left.values():
        (tmp_path / name).write_bytes(b"partial")
    phema.sweep(
        store, model, evaluate, sigma_rels=[0.06], results=tmp_path / "sweep.csv", progress=False
    )
    names = set(os.listdir(tmp_path))
    assert left["dead"] not in names
    assert {left["alive"], left["other host"], "sweep.csv"} <= names
    assert len(names) == 3


def test_a_results_file_of_another_run_or_other_raw_weights_is_not_reused(run, tmp_path):
    # Another run with the same snapshot schedule: same names, same weights, other contents.
    store, _ = run
    other = tmp_path / "other"
    shutil.copytree(store, other)
    calls = []

    def counted(m: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        return evaluate(m)

    results = tmp_path / "r.csv"
    raw = {k: v.clone() for k, v in make_model().state_dict().items()}
    phema.sweep(other, make_model(), counted, sigma_rels=SIGMAS[:2], results=results, raw=raw)
    assert len(calls) == 3
    # The same run resumes (nothing evaluated again) ...
    phema.sweep(other, make_model(), counted, sigma_rels=SIGMAS[:2], results=results, raw=raw)
    assert len(calls) == 3
    # ... but a store whose snapshots differ, and other raw weights, are evaluated afresh.
    for p in sorted(other.glob("*.safetensors")):
        p.unlink()
    model = make_model()
    with phema.PostHocEMA(model, other, (0.05, 0.15), snapshot_every=40) as ema:
        for _ in range(400):
            with torch.no_grad():
                for q in model.parameters():
                    q.add_(0.001)
            ema.update()
    raw2 = {k: v + 1 for k, v in raw.items()}
    got = phema.sweep(
        other, make_model(), counted, sigma_rels=SIGMAS[:2], results=results, raw=raw2
    )
    assert len(calls) == 6
    want = by_hand(other, make_model(), sigma_rel=SIGMAS[0])
    assert got.rows[0].metrics == pytest.approx(want)


@pytest.mark.parametrize("change", ["half", "double", "replace", "delete"])
def test_evaluate_that_changes_the_model_stops_the_sweep_and_the_model_is_as_before(run, change):
    store, _ = run
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = dict(model.named_parameters())

    def hostile(m: torch.nn.Module) -> float:
        if change in ("half", "double"):
            getattr(m, change)()
        elif change == "replace":
            m[0].weight = torch.nn.Parameter(torch.zeros(8, 4))
        else:
            del m[2].bias
        return 0.0

    with pytest.raises(phema.InvalidValueError, match="evaluate changed the model"):
        phema.sweep(store, model, hostile, sigma_rels=SIGMAS[:2])
    after = dict(model.named_parameters())
    assert after.keys() == objects.keys()
    for k, v in after.items():
        assert v is objects[k], k
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
