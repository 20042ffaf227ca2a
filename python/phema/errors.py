"""Every exception phema raises for a value, file or store a user gave: one base, `PhemaError`.

The base and the classes the core raises are defined once, in the core (`phema._core`); each
keeps a builtin base as well (`StoreError` and `InvalidValueError` are `ValueError`s,
`StorageError` an `OSError`), so `except ValueError` code written before the base existed keeps
working. The command line prints one line for a `PhemaError` (or an `OSError`) and lets anything
else, a bug, show its traceback.
"""

from __future__ import annotations

from phema._core import Cancelled, InvalidValueError, PhemaError, StorageError, StoreError

__all__ = [
    "Cancelled",
    "InvalidTypeError",
    "InvalidValueError",
    "PhemaError",
    "SourceError",
    "StorageError",
    "StoreError",
]


class InvalidTypeError(PhemaError, TypeError):
    """A value given to phema has the wrong type; the message names it."""


class SourceError(PhemaError, ValueError):
    """A file to import cannot be read, or holds something phema refuses to load; the message
    names the file."""
