"""The error hierarchy: every failure a user can cause is a `SkipcacheError`.

A message says what happened, what was expected, what was found and how to fix it, in one
line. The CLI prints `error: <message>` and exits with `exit_code`; no traceback is shown for
these. Anything that is not a `SkipcacheError` is a bug and keeps its traceback.
"""


class SkipcacheError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 1


class ConfigError(SkipcacheError):
    """A setting is out of range or inconsistent (omega, r, lambda, unknown names...)."""

    exit_code = 2


class ModelError(SkipcacheError):
    """A model cannot be built, loaded or split (unknown name, weights missing, not a ViT...)."""


class DataError(SkipcacheError):
    """A dataset cannot be found or read (missing root, malformed split file, bad image...)."""


class StoreError(SkipcacheError):
    """A feature store is missing, of another key or version, incomplete or corrupted."""


class StoreVersionError(StoreError):
    """The store was written with a schema version this library cannot read."""


class StoreKeyMismatch(StoreError):
    """A store exists at the path but was built from other settings."""


class IncompleteStore(StoreError):
    """The store has not been completed by the cache stage (interrupted, or still running)."""


class CorruptStore(StoreError):
    """A chunk cannot be decoded or holds non-finite values."""


class RunError(SkipcacheError):
    """A run directory is missing, incomplete or inconsistent with its store."""
