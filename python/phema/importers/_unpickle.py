"""Reading pickles without running code from them: torch's safe loader for checkpoints, and a
restricted unpickler for EDM2's network pickles that rebuilds only tensors and plain containers
(docs/importers.md)."""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Any

from phema.errors import SourceError


def _torch_load(path: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, memory-mapped when the format allows;
    every failure is one SourceError naming the file (and the class it refused)."""
    import torch

    try:
        with warnings.catch_warnings():
            # A mutated protocol byte makes torch warn before it fails; the failure says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except SourceError:
        raise
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise SourceError(
                f"{path}: holds {found.group(1)}, which torch's safe loader (weights_only=True) "
                "refuses: phema reads only tensors and plain containers"
            ) from None
        detail = re.search(r"WeightsUnpickler error: (.+)", text)
        why = detail.group(1).strip()[:200] if detail else _brief(e)
        raise SourceError(f"{path}: not a readable torch file ({why})") from None


def _brief(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


class _Inert:
    """What an object of a class phema does not run becomes: its class name and its state."""

    _phema_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _InertDict(dict):
    """An EDM2 `dnnlib.EasyDict`: a dict (whatever attribute state it carries is dropped)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _persistent(meta: Any) -> _Inert:
    """EDM2's `persistence._reconstruct_persistent_obj`, without running `meta['module_src']`:
    a placeholder holding the class name and the state the object would receive."""
    if not (isinstance(meta, dict) and isinstance(meta.get("class_name"), str)):
        raise pickle.UnpicklingError("a persistent object without a class name")
    obj = _Inert()
    obj._phema_class = meta["class_name"]
    obj.state = meta.get("state")
    return obj


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    import torch

    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    for v in (size, stride):
        if not (isinstance(v, tuple) and all(_is_count(n) and n >= 0 for n in v)):
            raise pickle.UnpicklingError("a tensor with an invalid shape or stride")
    if not (_is_count(offset) and offset >= 0):
        raise pickle.UnpicklingError("a tensor with an invalid offset")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data  # the parameter's tensor; requires_grad and hooks do not matter here


def _load_from_bytes(b: Any) -> Any:
    """A tensor storage pickled by `pickle.dump` (torch's legacy format), loaded safely."""
    import torch

    if not isinstance(b, bytes):
        raise pickle.UnpicklingError("a storage that is not bytes")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        storage = torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("a storage that is not a storage")
    return storage


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg's `_reconstructor` for the inert classes only."""
    if isinstance(cls, type) and issubclass(cls, (_Inert, _InertDict, OrderedDict)):
        return cls()
    raise pickle.UnpicklingError("copyreg._reconstructor of a class that is not allowed")


class _EDM2Unpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; EDM2's persistent classes and torch modules become
    inert placeholders; any other global is refused."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path
        self.inert: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _load_from_bytes,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
            ("dnnlib.util", "EasyDict"): _InertDict,
            ("collections", "OrderedDict"): OrderedDict,
            ("copyreg", "_reconstructor"): _reconstructor,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "object"): object,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            key = f"{module}.{name}"
            if key not in self.inert:
                self.inert[key] = type(name, (_Inert,), {"_phema_class": key})
            return self.inert[key]
        raise SourceError(
            f"{self.path}: refuses to load {module}.{name}: phema rebuilds only tensors, plain "
            "containers and EDM2's persistent-class placeholders, and never runs code from a "
            "pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of an EDM2 network pickle")


def load_edm2_pickle(path: str | os.PathLike[str]) -> Any:
    """The object an EDM2 network pickle holds, with tensors rebuilt and every persistent or
    torch-module object an inert placeholder (no code from the file runs)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            reader = _Bounded(f)
            _check_opcodes(reader, path)
            f.seek(0)
            return _EDM2Unpickler(reader, path).load()
    except (SourceError, OSError):
        raise
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise SourceError(f"{path}: not a readable EDM2 network pickle ({_brief(e)})") from None


class _Bounded:
    """A file whose reads never ask for more than what is left: a length field of a crafted
    pickle cannot make a reader allocate beyond the file's size."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline()

    def tell(self) -> int:
        return self.f.tell()


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _check_opcodes(reader: _Bounded, path: str) -> None:
    """Walks the opcodes without building anything: a memo index beyond the objects made so far
    (which would make the unpickler allocate a memo table of that size) or a length beyond the
    file is refused before unpickling."""
    import pickletools

    for count, (op, arg, pos) in enumerate(pickletools.genops(reader), 1):
        if op.name in _MEMO_PUTS and isinstance(arg, int) and not 0 <= arg <= count:
            raise SourceError(f"{path}: memo index {arg} at byte {pos} is out of range")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
