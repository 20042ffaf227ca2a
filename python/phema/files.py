"""Files on disk: which files a checkpoint is, how a `like=` output is laid out, the rule that no
output overwrites or lands inside an input, and small files written atomically (through the
core's one commit rule, docs/store-format.md).
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from phema import _core, locations, naming
from phema.errors import InvalidValueError, PhemaError
from phema.naming import _NEVER_COPIED, LIKE_COPIED, LIKE_WEIGHTS


@dataclass(frozen=True)
class LikeLayout:
    """How a `like=` output is laid out: the weights under `weights` (a file name in the
    target's directory) or, when `shard_size` is set, as `STEM-NNNNN-of-NNNNN.safetensors`
    shards with `STEM.safetensors.index.json` (`STEM` is `weights` without `.safetensors`:
    `model` for transformers, `diffusion_pytorch_model` for diffusers); `copied` are the files
    taken over from `source`; `inputs` the checkpoint's files (outputs may not replace them);
    `base_model` the model its configuration names (`_name_or_path`, not a local path) and
    `library` the library its weights file is named for, where known (for the model card)."""

    source: str
    weights: str
    shard_size: int | None
    copied: tuple[str, ...]
    inputs: tuple[str, ...]
    base_model: str | None = None
    library: str | None = None


def like_layout(like: str | os.PathLike[str]) -> LikeLayout:
    """The layout of the checkpoint directory `like` (a transformers or diffusers
    `save_pretrained` directory, or a Trainer's `checkpoint-N/`) for outputs that load like it."""
    like = os.fspath(like)
    locations.check(like)
    found = locations.entries(like)
    if found is None:
        raise InvalidValueError(f"like={like}: not a checkpoint directory")
    sizes = found[0]
    names = sorted(sizes)
    weights = [n for n in LIKE_WEIGHTS if n in names]
    indexes = [n for n in LIKE_WEIGHTS if n + ".index.json" in names]
    shard_size = None
    if indexes and not weights:
        weights = indexes
        stem = weights[0].removesuffix(".safetensors")
        shards = [n for n in names if fnmatch.fnmatchcase(n, f"{stem}-*-of-*.safetensors")]
        if shards:
            shard_size = max(sizes[n] for n in shards)
    if not weights:
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) != 1:
            raise InvalidValueError(
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
        inputs=(like, *(locations.join(like, n) for n in names)),
        base_model=_base_model(locations.join(like, "config.json"))
        if "config.json" in names
        else None,
        library=_LIBRARIES.get(weights[0]),
    )


# The library each weights file name is written by.
_LIBRARIES = dict(zip(LIKE_WEIGHTS, ("transformers", "diffusers"), strict=True))


def _base_model(config: str) -> str | None:
    """The model a checkpoint's configuration says it was made from (`_name_or_path`), unless
    it names a local directory or the file is unreadable: a model card names only public ids."""
    try:
        name = json.loads(locations.read_bytes(config)).get("_name_or_path")
    except (OSError, ValueError, AttributeError, PhemaError):
        return None
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.exists(name):
        return None
    return name


def model_card(title: str, provenance: dict[str, Any], layout: LikeLayout) -> str:
    """The README.md of a `like=` output, as model merging tools write them (docs/outputs.md):
    Hugging Face model-card YAML front matter (base model and library where `layout` knows
    them, tags) and the recipe (target, snapshots and weights, fit) from its provenance record
    (`phema.provenance`, docs/store-format.md)."""
    target = provenance["target"]
    front = ["---"]
    if layout.base_model:
        front.append(f"base_model: {json.dumps(layout.base_model)}")
    if layout.library:
        front.append(f"library_name: {layout.library}")
    front += ["tags:", "- phema", "- ema", f"- {target['kind']}", "---", ""]
    made = f"Made by phema {provenance['phema_version']}"
    if target["kind"] == "average":
        made += f" as a weighted average of {len(provenance['snapshots'])} checkpoints"
    else:
        made += (
            f" after training: the `{target['kind']}` average `{json.dumps(target)}` of the run "
            f"in `{provenance['store']}` at t={provenance['t']:g}"
        )
    lines = [f"# {title}", "", f"{made}, laid out like `{layout.source}`.", ""]
    lines += ["## Recipe", "", "| snapshot | t | profile | weight |", "| --- | --- | --- | --- |"]
    for s in provenance["snapshots"]:
        t = f"{s['t']:g}" if "t" in s else "-"
        profile = f"sigma_rel {s['sigma_rel']:.4g}" if s.get("sigma_rel") else s.get("kind", "-")
        lines.append(f"| {s['file']} | {t} | {profile} | {s['weight']:.6g} |")
    fit = provenance.get("fit")
    if fit is not None:
        lines += [
            "",
            f"Fit: error {fit['fit_error']:.3g}, gain {fit['gain']:.4g}, sum of weights "
            f"{fit['mass']:.6g}" + (" (a poor fit, written as asked)" if fit["poor"] else "") + ".",
        ]
    if "per_tensor" in provenance:
        lines.append("Some tensors take other averages: see `per_tensor` below.")
    lines += ["", "### Configuration", "", "```json", json.dumps(provenance, indent=2), "```", ""]
    return "\n".join(front + lines)


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
        raise InvalidValueError(f"out={out!r}: expected a directory path") from None
    if not out:
        raise InvalidValueError("the output directory is an empty name")
    if locations.is_remote(out):
        _check_remote_outputs(out, written, [os.fspath(p) for p in inputs])
        return
    real_out = os.path.realpath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a directory (the output directory)")
    reals = [(p, os.path.realpath(p)) for p in map(os.fspath, inputs)]
    for given, real in reals:
        if _within(real_out, real):
            where = "is" if real_out == real else "is inside"
            raise InvalidValueError(f"output directory {out} {where} the input {given}")
    for name in written:
        is_dir = name.endswith("/")
        name = name.rstrip("/")
        pattern = os.path.join(glob.escape(real_out), name)
        for given, real in reals:
            if fnmatch.fnmatchcase(real, pattern) or any(
                fnmatch.fnmatchcase(parent, pattern) for parent in _parents(real, real_out)
            ):
                raise InvalidValueError(
                    f"the output {os.path.join(out, name)} would replace the input {given}"
                )
        if "*" in name:
            continue
        path = os.path.join(out, name)
        if is_dir and os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"{path}: exists and is not a directory; the output is one")
        if not is_dir and os.path.isdir(path):
            raise FileExistsError(f"{path}: exists and is a directory; the output is a file")


def _check_remote_outputs(out: str, written: Iterable[str], inputs: list[str]) -> None:
    """`check_outputs` for a prefix on object storage: outputs never replace an object there
    (docs/storage.md), so an output name already taken is refused before any work."""
    locations.check(out)
    out = out.rstrip("/")
    for given in inputs:
        if _within(out, given.rstrip("/"), "/"):
            raise InvalidValueError(f"output prefix {out} is the input {given} or inside it")
    for name in written:
        name = name.rstrip("/")
        if "*" in name:
            continue
        path = locations.join(out, name)
        if locations.exists(path):
            raise FileExistsError(
                f"{path}: exists; on object storage phema only writes new objects (remove it, "
                "or write to another prefix)"
            )


def _within(path: str, root: str, sep: str = os.sep) -> bool:
    """`path` is `root` or inside it (both resolved)."""
    return path == root or path.startswith(root.rstrip(sep) + sep)


def _parents(path: str, top: str) -> list[str]:
    """The directories between `top` (exclusive) and `path` (exclusive)."""
    out = []
    parent = os.path.dirname(path)
    while _within(parent, top) and parent != top:
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def hold_store(directory: str, *, importing: bool) -> int | None:
    """Marks the local store `directory` as being written until the returned descriptor is
    closed (by the process's end at the latest): live trackers share the mark (every rank of a
    run writes the same store), an import holds it alone, so neither writes a store the other
    is writing. Refuses, naming the store, while the other holds it. None where the file system
    has no such locks on directories: then nothing is checked."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if importing else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if importing:
            raise InvalidValueError(
                f"{directory}: a live tracker (or another import) is writing this store; import "
                "once it is closed, or into another directory"
            ) from None
        raise InvalidValueError(
            f"{directory}: an import is writing this store; track into another directory, or "
            "once the import is done resume that run with load_state_dict()"
        ) from None
    except OSError:
        os.close(fd)
        return None
    return fd


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


INDEX = "model.safetensors.index.json"


# The index diffusers writes for a sharded `diffusion_pytorch_model.safetensors`.
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike[str]) -> list[str]:
    """The safetensors files of one checkpoint: a `.safetensors` file, or a directory holding a
    sharded `model.safetensors.index.json` (or diffusers' index), a `model.safetensors`, or
    exactly one `.safetensors`. Local or on object storage (docs/storage.md)."""
    path = os.fspath(path)
    locations.check(path)
    if locations.isfile(path):
        return [path]
    found = locations.entries(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no such file or directory")
    present = found[0]
    index = next((n for n in (INDEX, DIFFUSERS_INDEX) if n in present), None)
    if index is not None:
        index = locations.join(path, index)
        try:
            weight_map = json.loads(locations.read_bytes(index))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
            if not names or not all(isinstance(n, str) and n == os.path.basename(n) for n in names):
                raise InvalidValueError("weight_map must name files in its directory")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidValueError(f"{index}: not a valid safetensors index ({e})") from None
        paths = [locations.join(path, name) for name in names]
        if not locations.is_remote(path):
            _check_index(index, weight_map, paths)
        return paths
    if "model.safetensors" in present:
        return [locations.join(path, "model.safetensors")]
    found = sorted(n for n in present if n.endswith(".safetensors"))
    if len(found) == 1 and not naming.is_partial_shard(found[0]):
        return [locations.join(path, found[0])]
    if found and all(naming.is_partial_shard(n) for n in found):
        raise InvalidValueError(
            f"{path}: shards of a sharded checkpoint without its index ({found[0]}, ...): an "
            "interrupted or incomplete write; nothing here is a whole checkpoint"
        )
    raise InvalidValueError(
        f"{path}: expected model.safetensors, {INDEX} or a single .safetensors file "
        f"(found {len(found)} .safetensors files)"
    )


def _check_index(index: str, weight_map: dict[str, str], paths: list[str]) -> None:
    """Refuses an index that is not of the shards beside it (copied from another output, or
    left by one with another shard count): each file must hold exactly the tensors it maps to
    that file, or loaders that follow the map and phema, which reads the files, would see
    different weights. Headers only."""
    for path, described in zip(paths, _core.Sources([[p] for p in paths]).describe(), strict=True):
        name = os.path.basename(path)
        held = {t for t, _, _ in described["tensors"]}
        mapped = {t for t, f in weight_map.items() if f == name}
        if held != mapped:
            which = sorted(held ^ mapped)[0]
            says = (
                f"maps `{which}` to {name}, which does not hold it"
                if which in mapped
                else f"does not map `{which}` to {name}, which holds it"
            )
            raise InvalidValueError(
                f"{index}: {says}: the index is not of these files (copied from another output?)"
            )


def not_a_checkpoint(path: str) -> str | None:
    """Why the directory `path`, found among checkpoints, is none (None: it may be one).

    A Trainer's output directory holds `checkpoint-N/` directories beside others: the phema
    callback's store (snapshots carry `phema.kind`), logs with no weights at all."""
    found = locations.entries(path)
    if found is None:
        return None
    present = found[0]
    # `.metadata`: a PyTorch DCP checkpoint, which holds no safetensors file.
    if any(n in present for n in (INDEX, DIFFUSERS_INDEX, *LIKE_WEIGHTS, ".metadata")):
        return None
    found = sorted(n for n in present if n.endswith(".safetensors"))
    if not found:
        return "no .safetensors file: not a checkpoint"
    [described] = _core.Sources([[locations.join(path, found[0])]]).describe()
    if "phema.kind" in described["metadata"]:
        return "a phema store (its files are phema snapshots), not a checkpoint"
    return None


def copy_like_files(layout: LikeLayout, target: str) -> list[str]:
    """Copies the configuration and tokenizer files of `layout` into the directory `target`, by
    the core's rule for every file phema writes (no partial copy under the final name)."""
    copied = []
    for name in layout.copied:
        dst = os.path.join(target, name)
        _core.copy_file(locations.join(layout.source, name), dst)
        copied.append(dst)
    return copied
