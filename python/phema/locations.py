"""Where files are: a local path or an object-storage URL (`s3://bucket/prefix`, `gs://...`;
docs/storage.md). The one place that tells them apart: readers ask here whether a location is a
file, a directory, what it holds; the core does the requests.

On object storage a "directory" is a prefix, a file an object; nothing there is renamed, so an
output is written into a local staging directory and published to its URL when whole
(`staged_output`), by the core's commit rules for object storage.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from phema import _core, naming
from phema.errors import InvalidValueError

#: Whether `location` is an object-storage URL (anything but a string is not): the core's own
#: parse, so that asking costs no Python call on a reconstruction's path (docs/design.md).
is_remote: Callable[[Any], bool] = _core.is_url


def check(location: str) -> None:
    """Refuses a URL phema does not read (`http://`, `az://`, no bucket), naming it."""
    if isinstance(location, str):
        _core.check_location(location)


def join(base: str, *names: str) -> str:
    """`base/name/...`, for a path or a URL."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(base, *names)


def look_in(directory: str, name: str) -> tuple[str, str | None]:
    """The directory as outputs record it (`absolute`), and the location of the file `name` in
    it when there is one; a URL of a scheme phema does not read is refused (`check`)."""
    check(directory)
    found = join(directory, name)
    return absolute(directory), found if isfile(found) else None


def absolute(location: str | os.PathLike[str]) -> str:
    """The location as outputs record it: a URL as given, a path made absolute."""
    location = os.fspath(location)
    return location.rstrip("/") if is_remote(location) else os.path.abspath(location)


def entries(location: str) -> tuple[dict[str, int], list[str]] | None:
    """What a directory holds in one look (one listing on object storage): its files with their
    sizes and its sub-directories; None when `location` is no directory (or an empty prefix)."""
    if is_remote(location):
        files, dirs = _core.remote_list(location)
        return (dict(files), list(dirs)) if files or dirs else None
    if not os.path.isdir(location):
        return None
    found: dict[str, int] = {}
    dirs = []
    for n in os.listdir(location):
        path = os.path.join(location, n)
        if os.path.isfile(path):
            found[n] = os.path.getsize(path)
        elif os.path.isdir(path):
            dirs.append(n)
    return found, dirs


def isdir(location: str) -> bool:
    """A directory, or a prefix with something under it."""
    if is_remote(location):
        return entries(location) is not None
    return os.path.isdir(location)


def isfile(location: str) -> bool:
    """A regular file, or an object."""
    if is_remote(location):
        return _core.remote_exists(location)
    return os.path.isfile(location)


def exists(location: str) -> bool:
    """A file or directory (an object or a non-empty prefix)."""
    return isfile(location) or isdir(location) if is_remote(location) else os.path.exists(location)


def listdir(location: str) -> list[str]:
    """The names directly in a directory (objects and sub-prefixes under a prefix)."""
    if is_remote(location):
        files, dirs = entries(location) or ({}, [])
        return sorted([*files, *dirs])
    return os.listdir(location)


def files_in(location: str) -> dict[str, int]:
    """The files directly in a directory with their sizes (no sub-directories)."""
    return (entries(location) or ({}, []))[0]


def size(location: str) -> int:
    """The size of a file (an object) in bytes."""
    if is_remote(location):
        parent, name = location.rstrip("/").rsplit("/", 1)
        found = files_in(parent).get(name)
        if found is None:
            raise FileNotFoundError(f"{location}: no such object")
        return found
    return os.path.getsize(location)


def read_bytes(location: str) -> bytes:
    """The whole of a small file (an index, a configuration, a marker)."""
    if is_remote(location):
        return bytes(_core.remote_read(location))
    with open(location, "rb") as f:
        return f.read()


def _publish_order(path: str) -> tuple[int, str]:
    """Configuration first, shards next, then the files that make an output whole (a whole
    weights file, a shard index): a listing accepts the output only once all of it is there."""
    name = os.path.basename(path)
    if not name.endswith((".safetensors", ".index.json")):
        return (0, path)
    return (1 if naming.is_partial_shard(name) else 2, path)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike[str], cluster: bool = False) -> Iterator[tuple[str, Any]]:
    """The local directory to write the outputs of `out` into, and a function mapping a local
    path written there to where it ends up.

    For a local `out` that is `out` itself. For a URL it is a fresh staging directory (under
    `PHEMA_STAGING`, else the system's temporary directory) whose files are uploaded under `out`
    when the block ends without error, each only when whole and none replacing an object that is
    there; the staging directory is removed in any case. A `cluster`'s workers write to a shared
    directory, which a staging directory on this machine is not: refused for a URL."""
    out = os.fspath(out)
    if not is_remote(out):
        yield out, lambda p: p
        return
    check(out)
    if cluster:
        raise InvalidValueError(
            f"out={out}: a cluster's workers write to a shared directory; with client= give a "
            "local or shared output directory (reading a store on object storage works)"
        )
    root = os.environ.get("PHEMA_STAGING") or None
    stage = tempfile.mkdtemp(prefix="phema-staging-", dir=root)

    def final(path: str) -> str:
        rel = os.path.relpath(path, stage)
        return join(out, *rel.split(os.sep))

    try:
        yield stage, final
        staged = sorted(
            (os.path.join(d, n) for d, _, names in os.walk(stage) for n in names),
            key=_publish_order,
        )
        _core.publish([(p, final(p)) for p in staged], True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
