"""The feature store: `FeatureStore` (create, resume, write, finalize, open) and store listing.

One Zarr v3 group per cache key holds the frozen shallow layers' output tokens of every image
and class prompt, plus the zero-shot logits and rankings CSkip needs. This module owns the life of
a store and the public API; the layout (path scheme, key hash, arrays) lives in
`skipcache.store_layout`, reading in `skipcache.store_read`, checking in `skipcache.store_check`.
The format is specified in `docs/store-format.md` (schema version 1); keep them in agreement.

Life of a store: `create_or_resume` lays out every array at `<path>.partial`, the cache stage
calls `write_text` and `write_shard` (a shard's `done` flag is written after its data, so a killed
process leaves a store that resumes at the first unfinished shard), and `finalize` sets
`complete` and renames the directory to its final path in one atomic step. A writer holds the
store's lock (`lock_store`, a `flock` on `<path>.lock`) from `create_or_resume` until `finalize` or
`close`, so a second writer of the same key waits, then resumes or reuses what the first left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import zarr

from skipcache import store_check, store_read
from skipcache.errors import (
    CorruptStore,
    IncompleteStore,
    StoreError,
    StoreKeyMismatch,
    StoreVersionError,
)
from skipcache.store_layout import (
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    SPLIT_ARRAYS,
    STORAGE_DTYPES,
    WRITE_CONFIG,
    Layout,
    SplitSpec,
    canonical_key,
    check_storage_dtype,
    create_skeleton,
    final_and_partial,
    hash_in_name,
    key_hash,
    read_root_attrs,
    safe_component,
    store_path,
)
from skipcache.store_read import decode_array, encode_tensor, read_array

__all__ = [
    "SCHEMA_VERSION", "STORAGE_DTYPES", "FeatureStore", "SplitSpec", "StoreLock", "find_stores",
    "key_hash", "list_stores", "lock_store", "safe_component", "store_path",
]

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:  # the "waiting for another writer" line must show even when
    log.setLevel(logging.WARNING)  # an application quiets the root logger (the CLI does)
LOCK_SUFFIX = ".lock"
_LOCK_POLL_S = 0.2


class StoreLock:
    """The exclusive lock of one store key, held by the process that writes the store.

    An `fcntl.flock` on `<final path>.lock`: the kernel drops it when its process dies, so a
    killed writer never blocks the next one. `release` deletes the file (then unlocks), and a
    waiter that locked a deleted file tries again, so no stale file is left behind.
    """

    # locks this process holds, by lock-file path; a new writer takes over an abandoned one
    _held: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()

    def __init__(self, path: Path, fd: int) -> None:
        self.path = Path(path)
        self._fd: int | None = fd
        StoreLock._held[str(self.path)] = self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _hand_over(self) -> StoreLock:
        fd, self._fd = self._fd, None
        return StoreLock(self.path, fd)

    def release(self) -> None:
        """Unlock and delete the lock file; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if StoreLock._held.get(str(self.path)) is self:
            del StoreLock._held[str(self.path)]
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(fd)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def lock_store(path: Path, *, timeout_s: float | None = None) -> StoreLock:
    """Take the writer's lock of the store at `path` (final or `.partial` path).

    Waits while another process holds it, saying so once (a warning on the `skipcache.store`
    logger). A lock that this process already holds (a writer it abandoned) is taken over.

    Args:
        timeout_s: give up after this many seconds; None waits as long as it takes.

    Raises:
        StoreError: still held by another process after `timeout_s`.
        OSError: the lock file cannot be created (see `write_error`).
    """
    final, _ = final_and_partial(path)
    lock_path = final.with_name(final.name + LOCK_SUFFIX)
    mine = StoreLock._held.get(str(lock_path))
    if mine is not None and mine.held:
        return mine._hand_over()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    warned = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(lock_path)
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreError(
                    f"another `skipcache cache` (pid {holder}) is writing {final}; wait for it "
                    "to finish (or stop it), then rerun this command"
                ) from None
            if not warned:
                log.warning("another `skipcache cache` (pid %s) is writing %s; waiting for it "
                            "to finish (Ctrl-C to stop)", holder, final)
                warned = True
            left = _LOCK_POLL_S if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(_LOCK_POLL_S, left)))
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (and deleted) it while we waited: take the new one
            os.close(fd)
            continue
        lock = StoreLock(lock_path, fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            lock.release()
            raise
        return lock


def _first_non_directory(path: Path) -> Path | None:
    for p in [*reversed(Path(path).parents), Path(path)]:
        if p.exists() and not p.is_dir():
            return p
    return None


def write_error(exc: OSError, path: Path, doing: str) -> StoreError:
    """A one-line `StoreError` for an OSError met while writing the store at `path`."""
    where = exc.filename or path
    again = "rerun the same `skipcache cache` command to resume"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on the device of {path} while {doing}; free some space "
                          f"(or pass another --root), then {again}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"cannot write {where} while {doing}: permission denied; make it "
                          f"writable or pass another --root, then {again}")
    if exc.errno == errno.EROFS:
        return StoreError(f"cannot write {where} while {doing}: read-only file system; pass "
                          f"another --root, then {again}")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _first_non_directory(path)
        if blocker is not None:
            return StoreError(f"{blocker} is not a directory, so the store {path} cannot be "
                              "created there; move it away or pass another --root")
    return StoreError(f"cannot write {where} while {doing} ({exc.strerror or exc}); fix that, "
                      f"then {again}")


@contextlib.contextmanager
def _writing(path: Path, doing: str):
    """Turn an OSError (full disk, read-only root...) into a one-line `StoreError`."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path, doing) from exc


class FeatureStore:
    """One cached (model, ω, dataset, preprocessing) key on disk. Build with
    `create_or_resume` (write mode) or `open` (read mode)."""

    def __init__(self, path: Path, group: zarr.Group, *, writable: bool) -> None:
        """Wrap an open group; its structure is checked first (`CorruptStore` if damaged)."""
        self.path = Path(path)
        self._group = group
        self._writable = writable
        self._lock: StoreLock | None = None
        arrays = store_check.check_structure(self.path, group)
        self._arrays: dict[str, zarr.Array] = {
            name: array.with_config(WRITE_CONFIG) if writable else array
            for name, array in arrays.items()
        }
        self.attrs: dict = dict(group.attrs)
        self.key: dict = self.attrs["key"]
        self.key_hash: str = self.attrs["key_hash"]
        self.storage_dtype: str = self.attrs["storage_dtype"]
        self.rows_per_shard: int = int(self.attrs["rows_per_shard"])
        self.splits: dict[str, SplitSpec] = {}
        for name, info in self.attrs["splits"].items():
            self.splits[name] = SplitSpec(
                name=name,
                n=info["n"],
                views=info["views"],
                classes=store_check.read_classes(self, name),
                vision_shape=tuple(info["vision_shape"]),
            )

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create_or_resume(
        cls,
        path: Path,
        key: dict,
        *,
        text_shape: tuple[int, int, int],
        embed_dim: int,
        splits: list[SplitSpec],
        storage_dtype: str,
        rows_per_shard: int = 64,
        force: bool = False,
        extra_attrs: dict | None = None,
        reuse_complete: bool = False,
        lock_timeout_s: float | None = None,
    ) -> FeatureStore:
        """Lay out a new store at `<path>.partial`, or reopen an interrupted one to resume.

        The returned writer holds the store's lock (`lock_store`) until `finalize` or `close`;
        while another process holds it, this waits (and says so once).

        Args:
            path: final path of the store (usually `store_path(root, key)`).
            key: everything that determines the cached values; JSON-serializable.
            text_shape: (M, Lt, Dt) of the cached text tokens.
            embed_dim: E, width of the zero-shot class prototypes.
            splits: the splits to cache.
            storage_dtype: "float32", "float16" or "bfloat16".
            rows_per_shard: images per shard (unit of writing, progress and streaming).
            force: delete any existing store (complete or partial) at the path and start over.
            extra_attrs: more root attributes (JSON-serializable), written on creation only.
                A `library_versions` dict here is merged into the recorded versions.
            reuse_complete: when a complete store is at `path` (e.g. another process finished
                it while this one waited for the lock) and `force` is False, open it read-only
                and return it (`complete` is True) instead of raising.
            lock_timeout_s: how long to wait for another writer of this store; None: no limit.

        Raises:
            StoreError: a complete store already exists at `path` and neither `force` nor
                `reuse_complete` is set; another writer still holds the lock after
                `lock_timeout_s`; the store cannot be written (full disk, read-only root...).
            StoreKeyMismatch: an interrupted store of another key or layout is at `<path>.partial`.
            StoreVersionError: the interrupted store has another schema version.
        """
        check_storage_dtype(storage_dtype)
        final, partial = final_and_partial(path)
        key = json.loads(canonical_key(key))  # plain JSON types, as they read back
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        named = hash_in_name(final)
        if named not in (None, key_hash(key)) and (force or not partial.exists()):
            # resuming such a path still raises StoreKeyMismatch below, naming both hashes
            raise ValueError(f"{final} is named for key hash {named}, not this key's "
                             f"{key_hash(key)}; build the path with store_path(root, key)")
        if final.is_dir() and not force:  # complete stores never change: no lock needed to look
            return cls._existing(final, reuse_complete)
        with _writing(final, "taking the store's lock"):
            final.parent.mkdir(parents=True, exist_ok=True)
            lock = lock_store(final, timeout_s=lock_timeout_s)
        try:
            with _writing(final, "creating the store"):
                for p in (final, partial):
                    if p.exists() and not p.is_dir():
                        raise StoreError(f"{p} is a file, not a store; delete it or pass "
                                         "another --root")
                if final.exists():  # finished by another writer while we waited for the lock
                    if not force:
                        lock.release()
                        return cls._existing(final, reuse_complete)
                    shutil.rmtree(final)
                if partial.exists():
                    if not force:
                        store = cls._open_dir(partial, writable=True)
                        store._check_resumable(key, text_shape, embed_dim, splits, storage_dtype,
                                               rows_per_shard)
                        store._lock = lock
                        return store
                    shutil.rmtree(partial)
                layout = Layout(tuple(text_shape), int(embed_dim), list(splits), storage_dtype,
                                int(rows_per_shard))
                create_skeleton(partial, key, layout, extra_attrs or {})
                store = cls._open_dir(partial, writable=True)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    @classmethod
    def _existing(cls, final: Path, reuse: bool) -> FeatureStore:
        if reuse:
            return cls.open(final)
        raise StoreError(
            f"a complete store already exists at {final}; use it, or pass --force "
            "to delete and rebuild it"
        )

    @classmethod
    def open(cls, path: Path, *, allow_incomplete: bool = False) -> FeatureStore:
        """Open a store for reading.

        Args:
            path: the store's final path (its `.partial` twin is found too).
            allow_incomplete: open an interrupted store instead of raising `IncompleteStore`.

        Raises:
            StoreError: nothing readable at the path.
            StoreVersionError: written with another schema version.
            IncompleteStore: the cache stage has not finished the store.
        """
        final, partial = final_and_partial(path)
        target = final if final.exists() else partial if partial.exists() else None
        if target is None:
            raise StoreError(f"no feature store at {final}; run `skipcache cache` to build it")
        store = cls._open_dir(target, writable=False)
        if not store.complete and not allow_incomplete:
            pending = sum(len(store.pending_shards(s)) for s in store.split_names)
            total = sum(store.n_shards(s) for s in store.split_names)
            text = "" if store.has_text() else " and the text tokens"
            raise IncompleteStore(
                f"store {target} is incomplete: {pending} of {total} shards{text} not written; "
                "rerun `skipcache cache` with the same arguments to resume it"
            )
        return store

    @classmethod
    def _open_dir(cls, path: Path, *, writable: bool) -> FeatureStore:
        try:
            group = zarr.open_group(str(path), mode="r+" if writable else "r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for "not a group"
            raise StoreError(f"{path} is not a readable Zarr v3 group: {exc}") from exc
        version = group.attrs.get("schema_version")
        if version is None:
            raise StoreError(
                f"{path} is a Zarr group but not a skipcache store (no schema_version attribute)"
            )
        if version != SCHEMA_VERSION:
            raise StoreVersionError(
                f"store {path} has schema version {version}, this skipcache reads version "
                f"{SCHEMA_VERSION}; rebuild it with `skipcache cache --force` or use a matching "
                "skipcache"
            )
        return cls(path, group, writable=writable)

    def _check_resumable(self, key, text_shape, embed_dim, splits, storage_dtype, rows_per_shard):
        """Raise `StoreKeyMismatch` unless this interrupted store has this key and layout."""
        fix = f"pass --force to rebuild it, or delete {self.path}"
        if canonical_key(self.key) != canonical_key(key):
            raise StoreKeyMismatch(
                f"interrupted store {self.path} was built for key hash {self.key_hash}, "
                f"not {key_hash(key)}; {fix}"
            )
        wanted = Layout(tuple(text_shape), int(embed_dim), list(splits), storage_dtype,
                        int(rows_per_shard)).describe()
        found = self.layout.describe()
        differ = [f"{k}: {found[k]} stored, {wanted[k]} wanted" for k in found
                  if k != "splits" and found[k] != wanted[k]]
        if found["splits"] != wanted["splits"]:
            names = sorted(set(found["splits"]) | set(wanted["splits"]))
            differ.append("splits " + ", ".join(
                n for n in names if found["splits"].get(n) != wanted["splits"].get(n)))
        if differ:
            raise StoreKeyMismatch(
                f"interrupted store {self.path} has the same key but another layout "
                f"({'; '.join(differ)}); {fix}"
            )

    @property
    def layout(self) -> Layout:
        """Everything besides the key that fixes this store's arrays (shapes, dtype, shards)."""
        text = self.attrs["text"]
        return Layout(tuple(text["tokens_shape"]), text["embed_dim"], list(self.splits.values()),
                      self.storage_dtype, self.rows_per_shard)

    # ---- properties ----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once `finalize` has run and the directory has its final name."""
        return bool(self.attrs.get("complete")) and not self.path.name.endswith(PARTIAL_SUFFIX)

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def n_shards(self, split: str) -> int:
        return -(-self.splits[split].n // self.rows_per_shard)

    def shard_rows(self, split: str, shard: int) -> range:
        """Rows of `split` held by `shard`."""
        n = self.splits[split].n
        if not 0 <= shard < self.n_shards(split):
            raise IndexError(f"shard {shard} out of range for split {split!r}")
        return range(shard * self.rows_per_shard, min(n, (shard + 1) * self.rows_per_shard))

    def array(self, name: str) -> zarr.Array:
        """The Zarr array `name` (`text/tokens`, `<split>/vision`...) as opened for this store.

        Reading it directly returns fill values for chunks that are not on disk; `read_split`,
        `read_text` and `iter_batches` (through `skipcache.store_read.read_array`) raise instead.
        """
        if name not in self._arrays:
            array = self._group[name]
            self._arrays[name] = array.with_config(WRITE_CONFIG) if self._writable else array
        return self._arrays[name]

    def split_arrays(self, split: str) -> dict[str, zarr.Array]:
        """The arrays of `split` by short name (`vision`, `labels`...); KeyError naming the
        store's splits when it has no such split."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in store {self.path}; it has {self.split_names}")
        return {a: self.array(f"{split}/{a}") for a in SPLIT_ARRAYS}

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"store {self.path} is open read-only")

    # ---- text ----------------------------------------------------------------------------

    def write_text(self, tokens, eot, prototypes, classnames: list[str], template: str) -> None:
        """Write the cached text tokens [M, Lt, Dt], EOT positions [M] and prototypes [M, E]."""
        self._require_writable()
        m, lt, dt = self.attrs["text"]["tokens_shape"]
        _check_shape("text/tokens", tokens, (m, lt, dt))
        _check_shape("text/eot", eot, (m,))
        _check_shape("text/prototypes", prototypes, (m, self.attrs["text"]["embed_dim"]))
        if len(classnames) != m:
            raise ValueError(f"got {len(classnames)} class names for {m} classes")
        _check_finite("text/tokens", tokens, None)
        _check_finite("text/prototypes", prototypes, None)
        eot = np.asarray(torch.as_tensor(eot), dtype=np.int32)
        if eot.size and (eot.min() < 0 or eot.max() >= lt):
            raise CorruptStore(
                f"refusing to write text/eot: positions must lie in [0, {lt}), "
                f"got {eot.min()}..{eot.max()}"
            )
        with _writing(self.path, "writing the text tokens"):
            self.array("text/tokens")[...] = encode_tensor(tokens, self.storage_dtype)
            self.array("text/eot")[...] = eot
            self.array("text/prototypes")[...] = encode_tensor(prototypes, "float32")
            text_group = self._group["text"]
            text_group.attrs.update(
                {"classnames": list(classnames), "template": template, "written": True}
            )

    def has_text(self) -> bool:
        return bool(self._group["text"].attrs.get("written"))

    def read_text(self, *, dtype: torch.dtype | None = torch.float32) -> dict:
        """Text tokens (`dtype`; None keeps the storage dtype), eot, prototypes, names, template."""
        attrs = self._group["text"].attrs
        tokens = read_array(self, "text/tokens")
        eot = read_array(self, "text/eot").astype(np.int64)
        prototypes = read_array(self, "text/prototypes")
        lt = self.attrs["text"]["tokens_shape"][1]
        if eot.size and (eot.min() < 0 or eot.max() >= lt):
            raise store_read.damaged(self, f"text/eot holds positions outside [0, {lt})")
        if not np.isfinite(prototypes).all():
            raise store_read.damaged(self, "text/prototypes holds non-finite values")
        return {
            "tokens": decode_array(tokens, self.storage_dtype, dtype),
            "eot": torch.from_numpy(eot),
            "prototypes": torch.from_numpy(prototypes),
            "classnames": list(attrs.get("classnames", [])),
            "template": attrs.get("template", ""),
        }

    # ---- vision shards -------------------------------------------------------------------

    def pending_shards(self, split: str) -> list[int]:
        """Shards of `split` whose data has not been fully written yet."""
        return np.flatnonzero(self.done_flags(split) == 0).tolist()

    def done_flags(self, split: str) -> np.ndarray:
        """The `done` flags of `split`, one per shard (1: written); in an unfinished store an
        absent flag reads as 0."""
        self.split_arrays(split)
        return read_array(self, f"{split}/done", missing_ok=not self.complete)

    def write_shard(
        self, split: str, shard: int, *, vision, labels, zeroshot_logits, zeroshot_rank,
        source_ids: list[str],
    ) -> None:
        """Write one shard's rows, then mark it done.

        Args:
            vision: [V, rows, Lv, Dv] shallow-layer tokens of every view (any float dtype).
            labels: [rows] local labels (indices into the split's classes).
            zeroshot_logits: [rows, M_split] zero-shot logits.
            zeroshot_rank: [rows, M_split] rank of each class for each image (0 = most similar).
            source_ids: rows strings that trace each row back to its image.

        Raises:
            CorruptStore: a value is non-finite, a label out of range or a rank row not a
                permutation; nothing of the shard is written then.
        """
        self._require_writable()
        spec, rows = self.splits[split], self.shard_rows(split, shard)
        n_rows, m_split = len(rows), len(spec.classes)
        _check_shape(f"{split}/vision", vision, (spec.views, n_rows, *spec.vision_shape))
        _check_shape(f"{split}/labels", labels, (n_rows,))
        _check_shape(f"{split}/zeroshot_logits", zeroshot_logits, (n_rows, m_split))
        _check_shape(f"{split}/zeroshot_rank", zeroshot_rank, (n_rows, m_split))
        if len(source_ids) != n_rows:
            raise ValueError(f"{split}/source_ids: got {len(source_ids)} ids for {n_rows} rows")
        labels = np.asarray(torch.as_tensor(labels), dtype=np.int64)
        rank = np.asarray(torch.as_tensor(zeroshot_rank), dtype=np.int64)
        logits = np.asarray(torch.as_tensor(zeroshot_logits).detach().cpu(), dtype=np.float32)
        _check_finite(f"{split}/vision", vision, rows.start)
        _check_finite(f"{split}/zeroshot_logits", logits, rows.start)
        problems = store_check.label_problems(labels, m_split, rows.start)
        problems += store_check.rank_problems(rank, rows.start)
        if problems:
            raise CorruptStore(
                f"refusing to write shard {shard} of {split}: " + "; ".join(problems)
            )
        ids = np.array([str(s) for s in source_ids], dtype=object)
        arrays, sel = self.split_arrays(split), slice(rows.start, rows.stop)
        with _writing(self.path, f"writing shard {shard} of {split}"):
            arrays["vision"][:, sel] = encode_tensor(vision, self.storage_dtype)
            arrays["labels"][sel] = labels
            arrays["zeroshot_logits"][sel] = logits
            arrays["zeroshot_rank"][sel] = rank.astype(arrays["zeroshot_rank"].dtype)
            arrays["source_ids"][sel] = ids
            arrays["done"][shard] = 1  # last: a shard counts as written only after all its data

    def finalize(self) -> None:
        """Mark the store complete and rename `<path>.partial` to its final path."""
        self._require_writable()
        pending = {s: len(self.pending_shards(s)) for s in self.split_names}
        if any(pending.values()) or not self.has_text():
            missing = ", ".join(f"{s}: {k} shards" for s, k in pending.items() if k)
            missing += "" if self.has_text() else (", " if missing else "") + "text tokens"
            raise IncompleteStore(f"cannot finalize {self.path}: still missing {missing}")
        final, partial = final_and_partial(self.path)
        with _writing(self.path, "finalizing the store"):
            self._group.attrs["complete"] = True
            if final.exists():
                raise StoreError(f"cannot finalize {partial}: {final} already exists; delete one")
            os.rename(partial, final)  # atomic on one file system
        self.close()
        store = self._open_dir(final, writable=False)
        self.__dict__.update(store.__dict__)

    def close(self) -> None:
        """Release the writer's lock (`finalize` does it too). Writing after this is unsafe."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------

    def read_split(self, split: str, *, dtype: torch.dtype | None = torch.float32,
                   include_vision: bool = True) -> dict:
        """A whole split in memory (for evaluation).

        Returns:
            vision [V, n, Lv, Dv] (`dtype`; None keeps the storage dtype; left out unless
            `include_vision`), labels [n], zeroshot_logits and zeroshot_rank [n, M_split],
            index [n], classes [M_split] and source_ids (n strings).
        """
        rows = range(self.splits[split].n)
        data = store_read.read_rows(self, split, rows, views=None, dtype=dtype,
                                    include_vision=include_vision)
        data["classes"] = torch.tensor(self.splits[split].classes, dtype=torch.int64)
        data["source_ids"] = self.read_source_ids(split)
        return data

    def read_source_ids(self, split: str) -> list[str]:
        self.split_arrays(split)
        return [str(s) for s in read_array(self, f"{split}/source_ids").tolist()]

    def iter_batches(self, split: str, batch_size: int, *, view: int = 0, shuffle: bool = True,
                     seed: int = 0, buffer_shards: int = 4, drop_last: bool = False,
                     prefetch: bool = True, dtype: torch.dtype | None = torch.float32,
                     ) -> Iterator[dict]:
        """One epoch of `split` as batches, each row exactly once.

        Shards are read whole, in an order shuffled by `seed`; rows are shuffled within a buffer
        of `buffer_shards` shards; a background thread reads ahead. Each batch is a dict of
        vision [B, Lv, Dv] (`dtype`), labels [B], zeroshot_logits [B, M_split], zeroshot_rank
        [B, M_split] (int64) and index [B] (row indices in the split). Same seed, same batches.
        """
        return store_read.iter_batches(
            self, split, batch_size, view=view, shuffle=shuffle, seed=seed,
            buffer_shards=buffer_shards, drop_last=drop_last, prefetch=prefetch, dtype=dtype,
        )

    # ---- checking ------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Read every chunk; return one line per problem found (empty when the store is sound)."""
        return store_check.verify(self)

    def summary(self) -> dict:
        """What `skipcache inspect` shows: key, shapes, sizes, progress, and zero-shot top-1 in
        percent (`zeroshot_acc_pct`, per split; None before a split has a written shard)."""
        return store_check.summary(self)

    def disk_size_mib(self) -> float:
        return store_check.dir_size_mib(self.path)



def _check_shape(name: str, values, expected: tuple) -> None:
    shape = tuple(np.shape(values)) if not isinstance(values, torch.Tensor) else tuple(values.shape)
    if shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {shape}")


def _check_finite(name: str, values, first_row: int | None) -> None:
    t = torch.as_tensor(values)
    if torch.isfinite(t).all():
        return
    if first_row is None:
        raise CorruptStore(f"refusing to write {name}: it holds non-finite values")
    row_axis = 1 if name.endswith("/vision") else 0
    bad = torch.nonzero(~torch.isfinite(t).flatten(row_axis + 1).all(-1)).tolist()
    rows = sorted({first_row + idx[row_axis] for idx in bad})
    raise CorruptStore(f"refusing to write {name}: non-finite values in rows {rows[:10]}")


def list_stores(root: Path) -> list[dict]:
    """Every store (`*.zarr`, complete, and `*.zarr.partial`, interrupted) under `root`.

    Each entry: path, dataset, model, pretrained, omega, key_hash, complete, size_mib,
    created_utc, schema_version, and `error` when the store's metadata cannot be read.
    """
    root = Path(root)
    paths = sorted(root.glob("*/*/*.zarr")) + sorted(root.glob(f"*/*/*.zarr{PARTIAL_SUFFIX}"))
    entries = []
    for path in paths:
        entry: dict[str, Any] = {
            "path": path, "complete": False, "size_mib": store_check.dir_size_mib(path),
        }
        try:
            attrs = read_root_attrs(path)
            key = attrs["key"]
            entry.update(
                dataset=key.get("dataset"), model=key.get("model"),
                pretrained=key.get("pretrained_label"), omega=key.get("omega"),
                key_hash=attrs.get("key_hash"), created_utc=attrs.get("created_utc"),
                schema_version=attrs.get("schema_version"),
                complete=bool(attrs.get("complete")) and not path.name.endswith(PARTIAL_SUFFIX),
            )
        except (StoreError, KeyError, TypeError, AttributeError) as exc:
            entry["error"] = f"unreadable store metadata: {exc}"
        entries.append(entry)
    return entries


def find_stores(root: Path, *, dataset: str | None = None, model: str | None = None,
                omega: int | None = None, complete_only: bool = True) -> list[Path]:
    """Paths of the stores under `root` matching the given key fields, newest first."""
    wanted = {"dataset": dataset, "model": model, "omega": omega}
    matches = [
        e for e in list_stores(root)
        if "error" not in e
        and (e["complete"] or not complete_only)
        and all(v is None or e[k] == v for k, v in wanted.items())
    ]
    matches.sort(key=lambda e: e["created_utc"] or "", reverse=True)
    return [e["path"] for e in matches]
