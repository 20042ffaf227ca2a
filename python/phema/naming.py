"""The file names phema writes, and the one rule for where it may write them.

Snapshots (the tracker) are `{time_stem}-{label}{rank_suffix}.safetensors`; reconstructions are
`{label}[-t{at}]` (their stems are the plan's, `phema.plan`) plus `.safetensors`, `{rank_suffix}.safetensors` per rank, or a directory of
shards; averages are `model.safetensors` or `model-NNNNN-of-NNNNN.safetensors` shards with a
`model.safetensors.index.json` (see docs/outputs.md).

`like_layout` gives the names of a `like=` output: the weights file (or shards) and the
configuration files of the checkpoint directory it imitates.

`check_outputs` is the rule that no output overwrites or lands inside an input, and that no
output replaces something of another kind: every writer calls it before doing any work.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence

from phema.errors import InvalidValueError

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
# The model card phema writes into a `like=` output (never copied from the checkpoint).
MODEL_CARD = "README.md"

_RANK_SUFFIX = re.compile(r"\.rank\d+-of-\d+$")


def rank_suffix(rank: int, world_size: int) -> str:
    """The part of a sharded run's file name that says which rank wrote it."""
    return f".rank{rank:05d}-of-{world_size:05d}"


def has_rank_suffix(name: str) -> bool:
    """The file name is one rank's part of a sharded run's snapshot or output."""
    return bool(_RANK_SUFFIX.search(name.removesuffix(".safetensors")))


_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def is_partial_shard(name: str) -> bool:
    """Whether `name` is one shard (`model-00001-of-00003.safetensors`) of several: alone, it is
    not a checkpoint."""
    found = _SHARD.search(name)
    return found is not None and int(found.group(2)) > 1


def matches(name: str, pattern: str) -> bool:
    """Whether a tensor name matches a pattern: shell-style (`fnmatch`), case-sensitive, `*`
    also matching dots, as every tensor-name pattern phema takes."""
    return fnmatch.fnmatchcase(name, pattern)


def match_table(names: Sequence[str], patterns: Sequence[str]) -> list[list[bool]]:
    """Per name, whether it matches each pattern (`matches`): a whole model's names against a
    few patterns in one call."""
    return [[matches(n, p) for p in patterns] for n in names]


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


def output_stem(relpath: str) -> str:
    """The target stem an output path (relative to the output directory) belongs to."""
    first = relpath.split(os.sep)[0].removesuffix(".safetensors")
    return _RANK_SUFFIX.sub("", first)


def check_shard_size(shard_size: object) -> int | None:
    """`shard_size` as a positive number of bytes, or None (no sharding)."""
    if shard_size is None:
        return None
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, float)):
        raise InvalidValueError(f"shard_size={shard_size!r}: expected a number of bytes")
    # Compared as given: a huge int has no float, and nan compares false.
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise InvalidValueError(f"shard_size={shard_size!r}: expected 1 to 2**63 bytes")
    return int(shard_size)
