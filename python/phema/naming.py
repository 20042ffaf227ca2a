"""The file names phema writes, and the one rule for where it may write them.

Snapshots (the tracker) are `{time_stem}-{label}{rank_suffix}.safetensors`; reconstructions are
`{label}[-t{at}]` plus `.safetensors`, `{rank_suffix}.safetensors` per rank, or a directory of
shards; averages are `model.safetensors` or `model-NNNNN-of-NNNNN.safetensors` shards with a
`model.safetensors.index.json` (see docs/outputs.md).

`like_layout` gives the names of a `like=` output: the weights file (or shards) and the
configuration files of the checkpoint directory it imitates.

`check_outputs` is the rule that no output overwrites or lands inside an input, and that no
output replaces something of another kind: every writer calls it before doing any work.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from phema import _core

# Largest shard size accepted: the engine counts bytes in u64 and 2**63 means "no limit".
MAX_SHARD_SIZE = 2**63

# What `average` writes into its output directory (the engine's names for one file or shards).
AVERAGE_OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")

# Weights files a Hugging Face checkpoint directory holds (transformers, diffusers).
LIKE_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# What a `like=` output copies from the checkpoint directory: configuration and tokenizer
# files. Never optimizer, LR-scheduler, RNG, scaler or trainer state, nor weights.
LIKE_COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template*",
    "*.tiktoken",
)
_NEVER_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.index.json")

_RANK_SUFFIX = re.compile(r"\.rank\d+-of-\d+$")


def rank_suffix(rank: int, world_size: int) -> str:
    """The part of a sharded run's file name that says which rank wrote it."""
    return f".rank{rank:05d}-of-{world_size:05d}"


def has_rank_suffix(name: str) -> bool:
    """The file name is one rank's part of a sharded run's snapshot or output."""
    return bool(_RANK_SUFFIX.search(name.removesuffix(".safetensors")))


def matches(name: str, pattern: str) -> bool:
    """Whether a tensor name matches a pattern: shell-style (`fnmatch`), case-sensitive, `*`
    also matching dots, as every tensor-name pattern phema takes."""
    return fnmatch.fnmatchcase(name, pattern)


def format_t(t: float) -> str:
    """A time as a decimal string: an integer string when integral."""
    return str(int(t)) if float(t).is_integer() else repr(float(t))


def time_stem(t: float) -> str:
    """A time as a zero-padded file-name stem that sorts (integral and fractional alike)."""
    return f"{int(t):012d}" if float(t).is_integer() else f"{t:019.6f}"


def snapshot_name(t: float, label: str, suffix: str = "") -> str:
    """The file name of a snapshot at time `t` of the profile `label` (`raw` for plain weights);
    `suffix` is a sharded run's rank part."""
    return f"{time_stem(t)}-{label}{suffix}.safetensors"


def profile_labels(sigma_rels: Sequence[float]) -> list[str]:
    """File-name labels of tracked profiles: 3 decimals, more if needed to tell them apart."""
    for digits in range(3, 17):
        labels = [f"{s:.{digits}f}" for s in sigma_rels]
        if len(set(labels)) == len(labels):
            break
    return labels


def value_text(value: float, fmt: str) -> str:
    """`value` in the short format `fmt` when that reads back as the same number, else in full.

    So distinct values never share a label (0.0801 and 0.0804 are not both `0.080`), and the
    usual ones keep their short names (`0.100`, `0.999`)."""
    short = format(value, fmt)
    return short if float(short) == value else repr(float(value))


def reconstruction_stems(labels: Sequence[str], at: float | None) -> list[str]:
    """The output name (without extension) of every target; raises if two would collide."""
    suffix = "" if at is None else f"-t{format_t(at)}"
    stems = [label + suffix for label in labels]
    seen: set[str] = set()
    for stem in stems:
        if stem in seen:
            raise ValueError(f"two targets would both be written to {stem}: give each target once")
        seen.add(stem)
    return stems


def output_stem(relpath: str) -> str:
    """The target stem an output path (relative to the output directory) belongs to."""
    first = relpath.split(os.sep)[0].removesuffix(".safetensors")
    return _RANK_SUFFIX.sub("", first)


def check_shard_size(shard_size: object) -> int | None:
    """`shard_size` as a positive number of bytes, or None (no sharding)."""
    if shard_size is None:
        return None
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, float)):
        raise ValueError(f"shard_size={shard_size!r}: expected a number of bytes")
    if not (math.isfinite(shard_size) and 1 <= shard_size <= MAX_SHARD_SIZE):
        raise ValueError(f"shard_size={shard_size!r}: expected 1 to 2**63 bytes")
    return int(shard_size)


@dataclass(frozen=True)
class LikeLayout:
    """How a `like=` output is laid out: the weights under `weights` (a file name in the
    target's directory) or, when `shard_size` is set, as `STEM-NNNNN-of-NNNNN.safetensors`
    shards with `STEM.safetensors.index.json` (`STEM` is `weights` without `.safetensors`:
    `model` for transformers, `diffusion_pytorch_model` for diffusers); `copied` are the files
    taken over from `source`; `inputs` the checkpoint's files (outputs may not replace them)."""

    source: str
    weights: str
    shard_size: int | None
    copied: tuple[str, ...]
    inputs: tuple[str, ...]


def like_layout(like: str | os.PathLike[str]) -> LikeLayout:
    """The layout of the checkpoint directory `like` (a transformers or diffusers
    `save_pretrained` directory, or a Trainer's `checkpoint-N/`) for outputs that load like it."""
    like = os.fspath(like)
    if not os.path.isdir(like):
        raise ValueError(f"like={like}: not a checkpoint directory")
    names = sorted(n for n in os.listdir(like) if os.path.isfile(os.path.join(like, n)))
    weights = [n for n in LIKE_WEIGHTS if n in names]
    indexes = [n for n in LIKE_WEIGHTS if n + ".index.json" in names]
    shard_size = None
    if indexes and not weights:
        weights = indexes
        stem = weights[0].removesuffix(".safetensors")
        shards = [n for n in names if fnmatch.fnmatchcase(n, f"{stem}-*-of-*.safetensors")]
        if shards:
            shard_size = max(os.path.getsize(os.path.join(like, n)) for n in shards)
    if not weights:
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) != 1:
            raise ValueError(
                f"like={like}: expected {' or '.join(LIKE_WEIGHTS)} (or a sharded index), "
                f"found {len(found)} other .safetensors files"
            )
        weights = found
    copied = tuple(
        n
        for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in LIKE_COPIED)
        and not any(fnmatch.fnmatchcase(n, p) for p in _NEVER_COPIED)
    )
    return LikeLayout(
        source=like,
        weights=weights[0],
        shard_size=shard_size,
        copied=copied,
        inputs=(like, *(os.path.join(like, n) for n in names)),
    )


def check_outputs(
    out: str | os.PathLike[str], written: Iterable[str], inputs: Iterable[str]
) -> None:
    """Raise unless writing `written` into the directory `out` is safe for `inputs`.

    `written` are names inside `out`: a trailing `/` marks a directory, `*` a run of characters
    (shard numbers). Refused: `out` being an input or inside one; a written path being an input
    or holding one (`model.safetensors` in `--out` of its own directory); a written file where a
    directory is, or the other way round (found only when the engine renames, after all the
    work, and then the outputs already renamed were removed again). Paths are compared after
    resolving symbolic links.
    """
    try:
        out = os.fspath(out)
    except TypeError:
        raise ValueError(f"out={out!r}: expected a directory path") from None
    if not out:
        raise ValueError("the output directory is an empty name")
    real_out = os.path.realpath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a directory (the output directory)")
    reals = [(p, os.path.realpath(p)) for p in map(os.fspath, inputs)]
    for given, real in reals:
        if _within(real_out, real):
            where = "is" if real_out == real else "is inside"
            raise ValueError(f"output directory {out} {where} the input {given}")
    for name in written:
        is_dir = name.endswith("/")
        name = name.rstrip("/")
        pattern = os.path.join(glob.escape(real_out), name)
        for given, real in reals:
            if fnmatch.fnmatchcase(real, pattern) or any(
                fnmatch.fnmatchcase(parent, pattern) for parent in _parents(real, real_out)
            ):
                raise ValueError(
                    f"the output {os.path.join(out, name)} would replace the input {given}"
                )
        if "*" in name:
            continue
        path = os.path.join(out, name)
        if is_dir and os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"{path}: exists and is not a directory; the output is one")
        if not is_dir and os.path.isdir(path):
            raise FileExistsError(f"{path}: exists and is a directory; the output is a file")


def _within(path: str, root: str) -> bool:
    """`path` is `root` or inside it (both resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _parents(path: str, top: str) -> list[str]:
    """The directories between `top` (exclusive) and `path` (exclusive)."""
    out = []
    parent = os.path.dirname(path)
    while _within(parent, top) and parent != top:
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replaces the file at `path` with `data` in one step, by the writer's rule for every file
    phema writes (docs/store-format.md: temporary name with host and pid, fsync, rename, dead
    writers' temporaries removed), so an interrupted write leaves the old file whole."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _core.write_file(path, bytes(data))


def save_figure(fig: Any, path: str | os.PathLike[str], **options: Any) -> str:
    """Writes a matplotlib figure as PNG at `path` through `write_atomically` (so a full disk
    names the file and leaves no partial image) and closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **options)
    plt.close(fig)
    write_atomically(path, buf.getvalue())
    return os.fspath(path)
