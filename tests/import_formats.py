"""Files in other projects' formats, built here: EDM2 network pickles made the way EDM2's
`torch_utils.persistence` makes them, EDM2 training states, ema-pytorch PostHocEMA folders.

The persistent classes' embedded source and EDM2's `_reconstruct_persistent_obj` both leave a
marker file and raise when run: a test checks the marker is absent after importing."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import types
from collections.abc import Iterator

import torch

MARKER_ENV = "PHEMA_TEST_MARKER"

# What the pickle embeds as the class's module source; running it leaves the marker.
EVIL_SOURCE = (
    "import os\n"
    f"open(os.environ['{MARKER_ENV}'], 'w').write('module source ran')\n"
    "raise RuntimeError('the embedded class source was executed')\n"
)


def _reconstruct_persistent_obj(meta):  # what EDM2 runs on load: here it must never run
    open(os.environ[MARKER_ENV], "w").write("reconstruct ran")
    raise RuntimeError("_reconstruct_persistent_obj was called")


class EasyDict(dict):
    """dnnlib.util.EasyDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


@contextlib.contextmanager
def edm2_modules() -> Iterator[None]:
    """`torch_utils.persistence` and `dnnlib.util` as pickle must find them while dumping."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    mods = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def persistent_class(orig_class):
    """EDM2's decorator, reduced to what it pickles: `__reduce__` as in persistence.py."""

    class Decorator(orig_class):
        _orig_module_src = EVIL_SOURCE
        _orig_class_name = orig_class.__name__

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(
                    type="class",
                    version=6,
                    module_src=self._orig_module_src,
                    class_name=self._orig_class_name,
                    state=fields[2],
                )
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    return Decorator


@persistent_class
class MPConv(torch.nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = cout
        self.weight = torch.nn.Parameter(torch.randn(cout, cin, *kernel))


@persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * torch.pi * torch.randn(n))
        self.register_buffer("phases", 2 * torch.pi * torch.rand(n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)


@persistent_class
class UNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb_fourier = MPFourier(8)
        self.enc = torch.nn.ModuleDict()  # a plain torch module, as in EDM2
        self.enc["64x64_conv"] = MPConv(3, 4, (3, 3))
        self.enc["32x32_down"] = MPConv(4, 4, (1, 1))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))


@persistent_class
class Precond(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sigma_data = 0.5
        self.unet = UNet()


@persistent_class
class EDM2Loss:
    def __init__(self) -> None:
        self.P_mean = -0.4
        self.P_std = 1.0


def edm2_network(seed: int) -> torch.nn.Module:
    """An EDM2-style network with random weights, as a snapshot holds it (fp16, no grad)."""
    torch.manual_seed(seed)
    return Precond().eval().requires_grad_(False).to(torch.float16)


def write_edm2_pickle(path: str, net: torch.nn.Module) -> None:
    """`network-snapshot-*.pkl` as EDM2's training loop writes it (`pickle.dump` of an
    EasyDict holding `ema`, `loss_fn`, `dataset_kwargs`, `encoder`)."""
    with edm2_modules():
        data = EasyDict(
            encoder=None,
            dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="x"),
            loss_fn=EDM2Loss(),
        )
        data.ema = net
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=4)


def write_edm2_state(path: str, cur_nimg: int, nets: list[torch.nn.Module], stds) -> None:
    """`training-state-*.pt` as EDM2's CheckpointIO writes it (`torch.save` of a dict)."""
    with edm2_modules():
        data = {
            "state": EasyDict(cur_nimg=cur_nimg, total_elapsed_time=1.0),
            "net": nets[0].state_dict(),
            "loss_fn": {"P_mean": -0.4},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
            "ema": {"stds": list(stds), "emas": [n.float().state_dict() for n in nets]},
        }
        torch.save(data, path)


class MaliciousReduce:
    """Runs os.system on unpickling (a classic pickle exploit)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: str, marker: str) -> None:
    with edm2_modules():
        with open(path, "wb") as f:
            pickle.dump(EasyDict(ema=MaliciousReduce(marker)), f, protocol=4)


class KarrasEMA(torch.nn.Module):
    """ema-pytorch's KarrasEMA state: `initted`, `step` and the averaged `ema_model`."""

    def __init__(self, model: torch.nn.Module, gamma: float) -> None:
        super().__init__()
        import copy

        self.gamma = gamma
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, update_every: int) -> None:
        """KarrasEMA.update as ema-pytorch runs it."""
        step = self.step.item()
        self.step += 1
        if step % update_every != 0:
            return
        if not self.initted.item():
            for p, q in zip(self.ema_model.parameters(), model.parameters(), strict=True):
                p.copy_(q)
            self.initted.copy_(torch.tensor(True))
        beta = (1 - 1 / (self.step.item() + 1)) ** (1 + self.gamma)
        for p, q in zip(self.ema_model.parameters(), model.parameters(), strict=True):
            p.lerp_(q, 1.0 - beta)
