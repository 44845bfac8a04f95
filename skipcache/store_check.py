"""Checking and describing a feature store: `verify`, `summary`, sizes on disk.

`verify` reads every chunk of a store and reports each problem on one line that names the array
and the chunk index: a chunk or shard file that is missing or fails to decode (every chunk carries
a crc32c checksum), a non-finite value, a label outside the split's classes, a ranking row that is
not a permutation. Unwritten regions read back as NaN / -1 (the fill values), so they are caught by
the same value checks. `summary` is what `skipcache inspect` prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

_MAX_PER_ARRAY = 20  # problems reported per array before "and N more"


def dir_size_mib(path: Path) -> float:
    """Bytes of all files under `path`, in MiB."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total / 2**20


def label_problems(labels: np.ndarray, n_classes: int, first_row: int) -> list[str]:
    """Rows whose label is not an index into the split's `n_classes` classes."""
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if not bad.size:
        return []
    rows = (bad[:10] + first_row).tolist()
    return [f"labels out of range [0, {n_classes}) in rows {rows} ({bad.size} rows)"]


def rank_problems(rank: np.ndarray, first_row: int) -> list[str]:
    """Rows of a [rows, M] ranking that are not a permutation of 0..M-1."""
    if rank.size == 0:
        return []
    expected = np.arange(rank.shape[1])
    bad = np.flatnonzero((np.sort(rank, axis=1) != expected).any(axis=1))
    if not bad.size:
        return []
    rows = (bad[:10] + first_row).tolist()
    last = rank.shape[1] - 1
    return [f"zeroshot_rank rows {rows} are not permutations of 0..{last} ({bad.size} rows)"]


class _Problems:
    """Collects problem lines, capped per array."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._counts: dict[str, int] = {}

    def add(self, array: str, message: str) -> None:
        count = self._counts[array] = self._counts.get(array, 0) + 1
        if count <= _MAX_PER_ARRAY:
            self.lines.append(f"{array}: {message}")

    def finish(self) -> list[str]:
        for array, count in self._counts.items():
            if count > _MAX_PER_ARRAY:
                self.lines.append(f"{array}: ... and {count - _MAX_PER_ARRAY} more problems")
        return self.lines


def _read(store, name: str, selection: tuple, block: tuple, problems: _Problems,
          inner: list[tuple[tuple, tuple]] = ()):
    """Read `selection` of array `name`; None (and a problem) when its file is missing or bad.

    Args:
        block: index of the chunk (or shard) holding the selection; its file must exist.
        inner: (selection, chunk index) of the inner chunks, tried one by one on a decode failure
            so that the problem names the chunk that is bad.
    """
    array = store._array(name)
    key = array.metadata.encode_chunk_key(block)
    if not (Path(store.path) / array.path / key).is_file():
        problems.add(name, f"chunk {block} is missing (no file {key})")
        return None
    try:
        return array[selection]
    except Exception as exc:  # any decode failure: crc mismatch, truncated file, bad index
        failing = []
        for sub_selection, coords in inner:
            try:
                array[sub_selection]
            except Exception:
                failing.append(coords)
        where = f"chunk {block}"
        if failing:
            where = f"chunks {failing[:10]}" + (f" ({len(failing)})" if len(failing) > 10 else "")
        problems.add(name, f"{where} cannot be decoded ({type(exc).__name__}: {exc})")
        return None


def _nonfinite_rows(values: np.ndarray, row_axis: int) -> np.ndarray:
    finite = np.isfinite(values.astype(np.float32) if values.dtype == np.float16 else values)
    return np.flatnonzero(~finite.reshape(*finite.shape[: row_axis + 1], -1).all(-1).reshape(-1))


def verify(store) -> list[str]:
    """See `FeatureStore.verify`."""
    problems = _Problems()
    _verify_text(store, problems)
    for split in store.split_names:
        _verify_split(store, split, problems)
    return problems.finish()


def _decoded(store, stored: np.ndarray) -> np.ndarray:
    from skipcache.store_read import decode_array

    if store.storage_dtype != "bfloat16":
        return stored
    return decode_array(stored, "bfloat16", torch.float32).numpy()


def _verify_text(store, problems: _Problems) -> None:
    if not store.has_text():
        problems.add("text", "text tokens not written yet")
        return
    m, lt, _ = store.attrs["text"]["tokens_shape"]
    tokens = store._array("text/tokens")
    rows_per_chunk = tokens.chunks[0]
    for c in range(-(-m // rows_per_chunk)):
        sel = (slice(c * rows_per_chunk, (c + 1) * rows_per_chunk),)
        data = _read(store, "text/tokens", sel, (c, 0, 0), problems)
        if data is not None:
            for row in _nonfinite_rows(_decoded(store, data), 0)[:10]:
                where = f"chunk ({c}, 0, 0) holds non-finite values"
                problems.add("text/tokens", f"{where} (class {c * rows_per_chunk + row})")
    eot = _read(store, "text/eot", (slice(None),), (0,), problems)
    if eot is not None and eot.size and (eot.min() < 0 or eot.max() >= lt):
        problems.add("text/eot", f"chunk (0,) has positions outside [0, {lt})")
    protos = _read(store, "text/prototypes", (slice(None),), (0, 0), problems)
    if protos is not None and not np.isfinite(protos).all():
        problems.add("text/prototypes", "chunk (0, 0) holds non-finite values")


def _verify_split(store, split: str, problems: _Problems) -> None:
    spec = store.splits[split]
    n_shards = store.n_shards(split)
    if n_shards == 0:
        return
    done = _read(store, f"{split}/done", (slice(None),), (0,), problems,
                 [((s,), (s,)) for s in range(n_shards)])
    if done is None:
        return
    pending = np.flatnonzero(done == 0).tolist()
    if pending:
        problems.add(
            split, f"{len(pending)} of {n_shards} shards not written yet (shards {pending[:10]})"
        )
    classes = _read(store, f"{split}/classes", (slice(None),), (0,), problems)
    n_text = store.attrs["text"]["n_classes"]
    if classes is not None and classes.size and (classes.min() < 0 or classes.max() >= n_text):
        problems.add(f"{split}/classes", f"chunk (0,) has class indices outside [0, {n_text})")
    m_split = len(spec.classes)
    for shard in np.flatnonzero(done != 0).tolist():
        rows = store.shard_rows(split, shard)
        sel = slice(rows.start, rows.stop)
        for v in range(spec.views):
            inner = [((v, r), (v, r, 0, 0)) for r in rows]
            data = _read(store, f"{split}/vision", (v, sel), (v, shard, 0, 0), problems, inner)
            if data is not None:
                for row in _nonfinite_rows(_decoded(store, data), 0)[:10]:
                    where = f"chunk ({v}, {rows.start + row}, 0, 0)"
                    problems.add(f"{split}/vision", f"{where} holds non-finite values")
        labels = _read(store, f"{split}/labels", (sel,), (shard,), problems)
        if labels is not None:
            for line in label_problems(labels, m_split, rows.start):
                problems.add(f"{split}/labels", f"chunk ({shard},): {line}")
        logits = _read(store, f"{split}/zeroshot_logits", (sel,), (shard, 0), problems)
        if logits is not None:
            bad = _nonfinite_rows(logits, 0)
            if bad.size:
                bad_rows = (bad[:10] + rows.start).tolist()
                problems.add(f"{split}/zeroshot_logits",
                             f"chunk ({shard}, 0) holds non-finite values in rows {bad_rows}")
        rank = _read(store, f"{split}/zeroshot_rank", (sel,), (shard, 0), problems)
        if rank is not None:
            for line in rank_problems(rank.astype(np.int64), rows.start):
                problems.add(f"{split}/zeroshot_rank", f"chunk ({shard}, 0): {line}")
        ids = _read(store, f"{split}/source_ids", (sel,), (shard,), problems)
        if ids is not None and any(s == "" for s in ids.tolist()):
            problems.add(f"{split}/source_ids", f"chunk ({shard},) has empty source ids")


def summary(store) -> dict:
    """See `FeatureStore.summary`. Accuracies are fractions in [0, 1] over the written shards."""
    splits = {}
    for split in store.split_names:
        spec = store.splits[split]
        arrays = store._split_arrays(split)
        done = arrays["done"][...]
        correct = seen = 0
        for shard in np.flatnonzero(done != 0).tolist():
            rows = store.shard_rows(split, shard)
            logits = arrays["zeroshot_logits"][rows.start : rows.stop]
            labels = arrays["labels"][rows.start : rows.stop]
            correct += int((logits.argmax(axis=1) == labels).sum()) if logits.size else 0
            seen += len(rows)
        splits[split] = {
            "n": spec.n,
            "views": spec.views,
            "n_classes": len(spec.classes),
            "classes": len(spec.classes),
            "vision_shape": list(spec.vision_shape),
            "shards_done": int((done != 0).sum()),
            "n_shards": int(done.size),
            "size_mib": dir_size_mib(Path(store.path) / split),
            "arrays_mib": {a: dir_size_mib(Path(store.path) / split / a) for a in arrays},
            "zeroshot_acc": correct / seen if seen else None,
        }
    text = store.attrs["text"]
    return {
        "path": str(store.path),
        "schema_version": store.attrs["schema_version"],
        "key": store.key,
        "key_hash": store.key_hash,
        "complete": store.complete,
        "created_utc": store.attrs["created_utc"],
        "library_versions": store.attrs["library_versions"],
        "storage_dtype": store.storage_dtype,
        "rows_per_shard": store.rows_per_shard,
        "size_mib": dir_size_mib(store.path),
        "text": {
            "n_classes": text["n_classes"],
            "tokens_shape": text["tokens_shape"],
            "embed_dim": text["embed_dim"],
            "written": store.has_text(),
            "size_mib": dir_size_mib(Path(store.path) / "text"),
        },
        "splits": splits,
        "zeroshot_acc": {name: info["zeroshot_acc"] for name, info in splits.items()},
    }
