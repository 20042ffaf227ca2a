"""PyTorch Distributed Checkpoint (DCP) directories as inputs (docs/importers.md): written here by
`torch.distributed.checkpoint.save` in one process (tests/test_fsdp.py writes them from 2 gloo
ranks holding sharded DTensors); averaged, reconstructed and imported by phema against torch's own
loading of the same files; and crafted or damaged files refused, naming the file, with nothing run
and nothing written."""

from __future__ import annotations

import gc
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import phema
from phema.cli import main
from phema.errors import SourceError

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is unavailable", allow_module_level=True)
import torch.distributed.checkpoint as dcp  # noqa: E402

SHAPES = {"enc.weight": (5, 3), "enc.bias": (5,), "dec.weight": (2, 5), "gain": (4,)}


def state(seed: int) -> dict[str, Any]:
    """A small state dict: float32 weights, a bfloat16 tensor, an integer buffer and a
    non-tensor entry (a DCP bytes item)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    sd["gain"] = sd["gain"].bfloat16()
    sd["seen"] = torch.tensor(7, dtype=torch.int64)
    sd["step"] = 100 * (seed + 1)
    return sd


def save_dcp(sd: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=str(path))


def load_dcp(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as torch's own DCP loader gives them."""
    sd = {n: torch.empty(s) for n, s in SHAPES.items()}
    sd["gain"] = sd["gain"].bfloat16()
    sd["seen"] = torch.zeros((), dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(path))
    return sd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dcp")
    for i in range(3):
        save_dcp(state(i), root / f"step-{100 * (i + 1)}")
    return root


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_average_equals_torch_and_safetensors_route(checkpoints, tmp_path, monkeypatch) -> None:
    staged = tmp_path / "tmp"
    staged.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staged))
    dirs = sorted(checkpoints.iterdir())
    loaded = [load_dcp(d) for d in dirs]
    # Two checkpoints, equal weights: (a + b) / 2 is one rounding in float32 for torch and phema.
    out = Path(phema.average(dirs[:2], out=tmp_path / "two", dtype="float32")[0])
    got = tensors(out)
    for name in SHAPES:
        expect = (loaded[0][name].double() + loaded[1][name].double()) / 2
        assert torch.equal(got[name], expect.float()), name
    assert torch.equal(got["seen"], loaded[0]["seen"])
    assert "step" not in got  # a bytes item, not a tensor
    # Three, unequal weights: bit-identical to phema's average of the same tensors written as
    # safetensors, and within float32 rounding of torch's float64 average.
    weights = [0.5, 0.3, 0.2]
    plain = []
    for i, sd in enumerate(loaded):
        plain.append(tmp_path / f"plain{i}.safetensors")
        save_file(sd, str(plain[-1]))
    a = tensors(Path(phema.average(dirs, weights=weights, out=tmp_path / "dcp")[0]))
    b = tensors(Path(phema.average(plain, weights=weights, out=tmp_path / "st")[0]))
    assert a.keys() == b.keys() == {*SHAPES, "seen"}
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("enc.weight", "enc.bias", "dec.weight"):
        expect = sum(w * sd[name].double() for w, sd in zip(weights, loaded))
        torch.testing.assert_close(a[name].double(), expect, rtol=1e-6, atol=1e-7)
    assert not list(staged.iterdir())  # the converted files are gone


def test_reconstruct_checkpoints_and_import(checkpoints, tmp_path, monkeypatch) -> None:
    staged = tmp_path / "tmp"
    staged.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staged))
    store = phema.open_checkpoints(checkpoints)
    assert [s.t for s in store.snapshots] == [100.0, 200.0, 300.0]
    assert [s.path for s in store.snapshots] == [str(d) for d in sorted(checkpoints.iterdir())]
    assert len(list(staged.iterdir())) == 1  # the converted files, kept while the store lives
    del store
    gc.collect()
    assert not list(staged.iterdir())
    # The same checkpoints as safetensors files give the same reconstruction, tensor for tensor.
    plain = tmp_path / "plain"
    plain.mkdir()
    for d in sorted(checkpoints.iterdir()):
        save_file(load_dcp(d), str(plain / f"{d.name}.safetensors"))
    args = ["reconstruct", "--checkpoints", "--sigma-rel", "0.2", "--allow-poor-fit"]
    assert main([*args[:1], str(checkpoints), *args[1:], "--out", str(tmp_path / "a")]) == 0
    assert main([*args[:1], str(plain), *args[1:], "--out", str(tmp_path / "b")]) == 0
    [fa] = sorted((tmp_path / "a").glob("*.safetensors"))
    [fb] = sorted((tmp_path / "b").glob("*.safetensors"))
    ta, tb = tensors(fa), tensors(fb)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # `phema import dcp`: one raw snapshot per checkpoint, holding torch's loaded tensors.
    assert main(["import", "dcp", str(checkpoints), str(tmp_path / "store")]) == 0
    imported = phema.open_store(tmp_path / "store")
    assert [(s.t, s.kind) for s in imported.snapshots] == [
        (100.0, "raw"),
        (200.0, "raw"),
        (300.0, "raw"),
    ]
    for s, d in zip(imported.snapshots, sorted(checkpoints.iterdir())):
        got, expect = tensors(Path(s.path)), load_dcp(d)
        assert got.keys() == expect.keys()
        for name in got:  # float32 kept; the bfloat16 tensor stored as float32 exactly
            assert torch.equal(got[name], expect[name].to(got[name].dtype)), name
    # One checkpoint, its `enc.` tensors only, at a given time.
    [path] = phema.import_store(
        tmp_path / "enc", checkpoints / "step-200", kind="dcp", strip_prefix="enc.", times=[7]
    )
    assert phema.open_store(tmp_path / "enc").snapshots[0].t == 7.0
    got, expect = tensors(Path(path)), load_dcp(checkpoints / "step-200")
    assert got.keys() == {"weight", "bias"}
    assert torch.equal(got["weight"], expect["enc.weight"])


def _rewrite_metadata(path: Path, change) -> None:
    """Edits a real checkpoint's metadata with torch's own classes (the test trusts its files)."""
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301
    change(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_System, _Exec])
@pytest.mark.parametrize("where", ["metadata", "item"])
def test_code_in_a_pickle_is_refused(checkpoints, tmp_path, payload, where) -> None:
    marker = tmp_path / "marker"
    bad = _copy(checkpoints / "step-100", tmp_path / "step-100")
    if where == "metadata":
        with open(bad / ".metadata", "wb") as f:
            pickle.dump({"state_dict_metadata": payload(marker)}, f)
        named = bad / ".metadata"
    else:
        # The chunk of `enc.bias` now points at a torch.save archive of the payload.
        named = bad / "evil.distcp"
        blob = tmp_path / "blob"
        torch.save({"t": payload(marker)}, blob)
        named.write_bytes(blob.read_bytes())

        def point(md) -> None:
            for key, info in md.storage_data.items():
                if key.fqn == "enc.bias":
                    info.relative_path, info.offset, info.length = (
                        "evil.distcp",
                        0,
                        len(blob.read_bytes()),
                    )

        _rewrite_metadata(bad, point)
    out = tmp_path / "out"
    called = "system" if payload is _System else "exec"
    with pytest.raises(SourceError, match=f"{named}: .*{called}"):
        phema.average([bad, checkpoints / "step-200"], out=out)
    assert main(["average", str(bad), str(checkpoints / "step-200"), "--out", str(out)]) == 2
    assert not marker.exists() and not out.exists()


def test_storage_transform_is_refused(checkpoints, tmp_path) -> None:
    bad = _copy(checkpoints / "step-100", tmp_path / "step-100")

    def compress(md) -> None:
        for info in md.storage_data.values():
            info.transform_descriptors = ["zstd"]

    _rewrite_metadata(bad, compress)
    with pytest.raises(SourceError, match=r"\.metadata: .*transform zstd"):
        phema.average([bad, checkpoints / "step-200"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp"])
def test_truncated_files_are_refused(checkpoints, tmp_path, name, capsys) -> None:
    bad = _copy(checkpoints / "step-100", tmp_path / "step-100")
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert main(["average", str(bad), str(checkpoints / "step-200"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad / name) in err[0], err
    with pytest.raises(SourceError, match=str(bad / name)):
        phema.import_store(tmp_path / "store", bad, kind="dcp")
    assert not out.exists() and not (tmp_path / "store").exists()


def _huge(md) -> None:
    entry = md.state_dict_metadata["enc.bias"]
    entry.size = torch.Size([10**12])
    entry.chunks[0].sizes = torch.Size([10**12])


def _not_a_dtype(md) -> None:
    md.state_dict_metadata["enc.bias"].properties.dtype = "float32"


def _gap(md) -> None:
    md.state_dict_metadata["enc.bias"].size = torch.Size([6])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_huge, "the chunk of `enc.bias` at \\(0,\\) exceeds its bytes"),
        (_not_a_dtype, "`enc.bias` has no real dtype"),
        (_gap, "the chunks of `enc.bias` do not cover its shape \\(6,\\)"),
    ],
)
def test_inconsistent_metadata_is_refused(checkpoints, tmp_path, change, message) -> None:
    bad = _copy(checkpoints / "step-100", tmp_path / "step-100")
    _rewrite_metadata(bad, change)
    with pytest.raises(SourceError, match=f"{bad / '.metadata'}: {message}"):
        phema.average([bad, checkpoints / "step-200"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_dtype_phema_does_not_store_is_refused(tmp_path) -> None:
    dirs = [tmp_path / f"step-{s}" for s in (1, 2)]
    for d in dirs:
        save_dcp({"a": torch.ones(3).to(torch.float8_e4m3fn)}, d)
    with pytest.raises(SourceError, match=f"{dirs[0]}: `a` is torch.float8_e4m3fn"):
        phema.average(dirs, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
