"""PyTorch Distributed Checkpoint (DCP) directories as inputs (docs/importers.md).

A DCP directory holds `.metadata` (a pickle of torch's `Metadata`: every tensor's dtype, shape
and chunks, and where each chunk is stored) and `*.distcp` files, in which every chunk is one
`torch.save` archive at a byte offset. Nothing here unpickles with a full unpickler: `.metadata`
goes through `_MetadataUnpickler` (torch's metadata classes become inert records; any other
global is refused), every chunk through torch's safe loader (`weights_only=True`), and the
result must be a tensor of the chunk's dtype and shape.

`convert` reassembles one tensor at a time from its chunks (whichever rank wrote them) and
writes the tensors as safetensors files of at most `GROUP_BYTES` each, through the core's
writer, into a staging directory: the engine then reads them like any sharded checkpoint.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from phema import _core
from phema.errors import SourceError

METADATA = ".metadata"
# Largest staging file written while converting (one tensor larger than this gets its own).
GROUP_BYTES = 64 * 2**20

_MODULE = "torch.distributed.checkpoint.metadata"
# torch's metadata classes, read as inert records (their own `__setstate__` never runs).
_RECORDS = {
    (_MODULE, "Metadata"),
    (_MODULE, "TensorStorageMetadata"),
    (_MODULE, "BytesStorageMetadata"),
    (_MODULE, "ChunkStorageMetadata"),
    (_MODULE, "TensorProperties"),
    (_MODULE, "MetadataIndex"),
    (_MODULE, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class _Record:
    """An object of one of torch's metadata classes: its class name and its state."""

    name = "?"
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, key: str) -> Any:
        return self.state.get(key) if isinstance(self.state, dict) else None


def _plain(*args: Any) -> Any:
    """torch.Size, a path, a layout, a memory format: kept as the plain values given."""
    return args[0] if len(args) == 1 else args


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _RECORDS:
            return self.classes.setdefault(name, type(name, (_Record,), {"name": name}))
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in (
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            (_MODULE, "_MEM_FORMAT_ENCODING"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"),
            ("collections", "OrderedDict"),
        ):
            return dict if name == "OrderedDict" else _plain
        raise SourceError(
            f"{self.path}: refuses to load {module}.{name}: phema reads only DCP metadata, "
            "tensors and plain containers, and never runs code from a pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    name: str
    dtype: Any  # torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def is_dcp(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a DCP checkpoint directory (it holds `.metadata`)."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA))


def stored_files(directory: str | os.PathLike[str]) -> list[str]:
    """The files of a DCP checkpoint: `.metadata` and its `.distcp` files (which an output may
    not replace)."""
    directory = os.fspath(directory)
    return [os.path.join(directory, METADATA)] + sorted(
        os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".distcp")
    )


def _brief(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def _load_metadata(path: str) -> _Record:
    with open(path, "rb") as f:
        data = f.read()
    try:
        # A memo index beyond the objects made so far would make the unpickler allocate a memo
        # table of that size: refused before anything is built.
        for count, (op, arg, pos) in enumerate(pickletools.genops(data), 1):
            if op.name.endswith("PUT") and isinstance(arg, int) and not 0 <= arg <= count:
                raise SourceError(f"{path}: memo index {arg} at byte {pos} is out of range")
        md = _MetadataUnpickler(io.BytesIO(data), path).load()
    except SourceError:
        raise
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise SourceError(f"{path}: not readable DCP metadata ({_brief(e)})") from None
    if not (isinstance(md, _Record) and md.name == "Metadata"):
        raise SourceError(f"{path}: holds no DCP Metadata")
    return md


def _ints(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, (tuple, list)) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in x
    ):
        return tuple(x)
    return None


def read_metadata(directory: str | os.PathLike[str]) -> list[DcpTensor]:
    """The tensors of a DCP checkpoint, in the order `.metadata` lists them, with their chunks.
    Non-tensor entries (bytes items: step counters, RNG states) are not read."""
    import torch

    directory = os.fspath(directory)
    path = os.path.join(directory, METADATA)
    md = _load_metadata(path)
    file_sizes: dict[str, int] = {}  # bytes of each .distcp file
    entries, storage = md.get("state_dict_metadata"), md.get("storage_data")
    if not (isinstance(entries, dict) and isinstance(storage, dict)):
        raise SourceError(f"{path}: no state_dict_metadata or storage_data")
    where: dict[tuple[str, tuple[int, ...]], _Record] = {}
    for key, info in storage.items():
        if not (isinstance(key, _Record) and isinstance(info, _Record)):
            raise SourceError(f"{path}: a storage_data entry is not an index and its location")
        offsets = _ints(key.get("offset"))
        if offsets is not None and isinstance(key.get("fqn"), str):
            where[(key.get("fqn"), offsets)] = info
    tensors = []
    for name, entry in entries.items():
        if not (isinstance(name, str) and isinstance(entry, _Record)):
            raise SourceError(f"{path}: entry {name!r} is not a described tensor or bytes item")
        if entry.name == "BytesStorageMetadata":
            continue
        props, shape = entry.get("properties"), _ints(entry.get("size"))
        state = props.state if isinstance(props, _Record) else None
        # TensorProperties pickles as a tuple starting with the dtype.
        dtype = state[0] if isinstance(state, tuple) and state else None
        if not (
            entry.name == "TensorStorageMetadata"
            and shape is not None
            and isinstance(dtype, torch.dtype)
            and not dtype.is_complex
        ):
            raise SourceError(f"{path}: `{name}` has no real dtype or no shape")
        chunks = []
        for c in entry.get("chunks") or []:
            offsets = _ints(c.get("offsets")) if isinstance(c, _Record) else None
            extent = _ints(c.get("sizes")) if isinstance(c, _Record) else None
            if offsets is None or extent is None or not len(offsets) == len(shape) == len(extent):
                raise SourceError(f"{path}: `{name}` has a chunk without offsets and sizes")
            if any(o + s > n for o, s, n in zip(offsets, extent, shape)):
                raise SourceError(f"{path}: a chunk of `{name}` lies outside its shape {shape}")
            info = where.get((name, offsets))
            if info is None:
                raise SourceError(f"{path}: the chunk of `{name}` at {offsets} is not stored")
            if info.get("transform_descriptors"):
                raise SourceError(
                    f"{path}: `{name}` is stored with the transform "
                    f"{', '.join(map(str, info.get('transform_descriptors')))}: phema reads only "
                    "untransformed DCP items"
                )
            rel, start, length = (info.get(k) for k in ("relative_path", "offset", "length"))
            if not (
                isinstance(rel, str)
                and rel == os.path.basename(rel)
                and _ints((start, length)) is not None
            ):
                raise SourceError(f"{path}: the chunk of `{name}` has no valid location")
            file = os.path.join(directory, rel)
            if file not in file_sizes:
                try:
                    file_sizes[file] = os.path.getsize(file)
                except FileNotFoundError:
                    raise SourceError(f"{file}: missing (named by {path})") from None
            # A chunk claiming more elements than its bytes hold is refused before anything
            # is allocated for it.
            if math.prod(extent) * dtype.itemsize > length:
                raise SourceError(f"{path}: the chunk of `{name}` at {offsets} exceeds its bytes")
            if start + length > file_sizes[file]:
                raise SourceError(
                    f"{file}: truncated: `{name}` lies at bytes {start} to {start + length}, "
                    f"the file has {file_sizes[file]}"
                )
            chunks.append(Chunk(offsets, extent, file, start, length))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise SourceError(f"{path}: the chunks of `{name}` do not cover its shape {shape}")
        tensors.append(DcpTensor(name, dtype, shape, tuple(chunks)))
    if not tensors:
        raise SourceError(f"{path}: holds no tensors")
    return tensors


def _read_chunk(tensor: DcpTensor, chunk: Chunk) -> Any:
    """One chunk's tensor, read from its byte range through torch's safe loader."""
    import torch

    with open(chunk.file, "rb") as f:
        f.seek(chunk.start)
        blob = f.read(chunk.length)
    if len(blob) != chunk.length:  # shortened since its metadata was read
        raise SourceError(f"{chunk.file}: truncated while `{tensor.name}` was read")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            x = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        found = str(e)
        detail = found.split("GLOBAL ", 1)[1].split()[0] if "GLOBAL " in found else None
        why = f"holds {detail}, which torch's safe loader refuses" if detail else _brief(e)
        raise SourceError(
            f"{chunk.file}: `{tensor.name}` is not a readable tensor ({why})"
        ) from None
    if not isinstance(x, torch.Tensor) or x.is_sparse or x.is_quantized or x.is_complex():
        raise SourceError(f"{chunk.file}: `{tensor.name}` holds a {type(x).__name__}, not a tensor")
    if x.dtype != tensor.dtype or tuple(x.shape) != chunk.sizes:
        raise SourceError(
            f"{chunk.file}: `{tensor.name}` holds {x.dtype} {tuple(x.shape)} where the metadata "
            f"says {tensor.dtype} {chunk.sizes}"
        )
    return x


def tensors(
    directory: str | os.PathLike[str], prefix: str | None = None
) -> Iterator[tuple[str, Any]]:
    """(name, CPU tensor) of a DCP checkpoint (those whose name starts with `prefix`, if given),
    one whole tensor at a time, reassembled from its chunks."""
    import torch

    for t in read_metadata(directory):
        if prefix and not t.name.startswith(prefix):
            continue
        if len(t.chunks) == 1 and t.chunks[0].sizes == t.shape:
            yield t.name, _read_chunk(t, t.chunks[0])
            continue
        full = torch.empty(t.shape, dtype=t.dtype)
        seen = torch.zeros(t.shape, dtype=torch.bool)
        for c in t.chunks:
            where = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
            full[where] = _read_chunk(t, c)
            seen[where] = True
        if not bool(seen.all()):
            raise SourceError(
                f"{os.path.join(os.fspath(directory), METADATA)}: the chunks of `{t.name}` "
                "overlap and leave part of it unstored"
            )
        yield t.name, full


def _array(x: Any) -> tuple[np.ndarray, str]:
    """A tensor as an array for the core's writer, and the safetensors dtype to store floats
    held as float32 in (bfloat16 has no numpy dtype: it goes as float32, stored as BF16)."""
    import torch

    if x.dtype == torch.bfloat16:
        return x.float().numpy(), "BF16"
    return x.contiguous().numpy(), "F32"  # float8 and unsigned beyond uint8: TypeError


def convert(
    directory: str | os.PathLike[str], staging: str, strip_prefix: str | None = None
) -> list[str]:
    """Writes the tensors of the DCP checkpoint `directory` as safetensors files in the new
    directory `staging` (each at most `GROUP_BYTES` unless one tensor is larger), through the
    core's writer; returns their paths. The checkpoint is never whole in memory. With
    `strip_prefix`, only the tensors whose names start with it are kept, without it."""
    directory = os.fspath(directory)
    written: list[str] = []
    groups: dict[str, list[tuple[str, np.ndarray]]] = {"F32": [], "BF16": []}
    sizes = dict.fromkeys(groups, 0)

    def flush(kind: str) -> None:
        if groups[kind]:
            path = os.path.join(staging, f"part-{len(written):05d}.safetensors")
            _core.write_snapshot(path, groups[kind], kind, {"format": "pt"})
            written.append(path)
            groups[kind], sizes[kind] = [], 0

    os.makedirs(staging)
    for name, x in tensors(directory, strip_prefix):
        if strip_prefix:
            name = name[len(strip_prefix) :]
        try:
            a, kind = _array(x)
        except TypeError:
            raise SourceError(
                f"{directory}: `{name}` is {x.dtype}, which phema does not store"
            ) from None
        groups[kind].append((name, np.require(a, requirements="C")))
        sizes[kind] += a.nbytes
        if sizes[kind] >= GROUP_BYTES:
            flush(kind)
    for kind in groups:
        flush(kind)
    if not written:
        raise SourceError(f"{directory}: holds no tensors whose name starts with {strip_prefix!r}")
    return written


class Staging:
    """A temporary directory (under `TMPDIR`) holding DCP checkpoints converted for the engine;
    removed by `close()`."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="phema-dcp-")
        self.count = 0

    def files(
        self, checkpoint: str | os.PathLike[str], strip_prefix: str | None = None
    ) -> list[str]:
        """The converted files of one DCP checkpoint (see `convert`)."""
        self.count += 1
        return convert(checkpoint, os.path.join(self.path, f"{self.count:05d}"), strip_prefix)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
