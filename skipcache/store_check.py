"""Checking and describing a feature store: structure on open, `verify`, `summary`, sizes.

`check_structure` runs on every open and reads only metadata (and the small `classes` arrays): the
root attributes are all there with sane types, the key hash matches the key (and the directory
name), every array exists with the shape and dtype the attributes imply. `verify` reads every
chunk of a store and reports each problem on one line that names the array and the chunk index: a
chunk or shard file that is missing or fails to decode (every chunk carries a crc32c checksum), a
non-finite value, a label outside the split's classes, a ranking row that is not a permutation.
`summary` is what `skipcache inspect` prints. Like `skipcache.store_read`, this module reads a
store only through `FeatureStore`'s public interface.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from skipcache.errors import CorruptStore
from skipcache.store_layout import (
    SPLIT_ARRAYS,
    STORAGE_DTYPES,
    expected_arrays,
    hash_in_name,
    key_hash,
    split_name_problem,
)
from skipcache.store_read import (
    chunk_blocks,
    chunk_file,
    decode_array,
    missing_blocks,
    one_line,
    read_array,
)

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


# ---- structure, checked on every open -----------------------------------------------------

_REBUILD = "rebuild it with `skipcache cache ... --force`"
# root attribute -> its JSON type
_ROOT_ATTRS = {
    "key": dict, "key_hash": str, "library_versions": dict, "created_utc": str, "complete": bool,
    "storage_dtype": str, "rows_per_shard": int, "text": dict, "splits": dict,
}


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _ints(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(_is_int(v) for v in value)


def attribute_problems(attrs: dict) -> list[str]:
    """What is missing or malformed in a store's root attributes (schema version 1)."""
    missing = [name for name in _ROOT_ATTRS if name not in attrs]
    if missing:
        return [f"root attribute(s) {', '.join(missing)} missing"]
    problems = [
        f"root attribute {name} is {type(attrs[name]).__name__}, not {kind.__name__}"
        for name, kind in _ROOT_ATTRS.items()
        if not isinstance(attrs[name], kind) or (kind is int and isinstance(attrs[name], bool))
    ]
    if problems:
        return problems
    if attrs["storage_dtype"] not in STORAGE_DTYPES:
        problems.append(f"storage_dtype {attrs['storage_dtype']!r} is not one of "
                        f"{sorted(STORAGE_DTYPES)}")
    rps = attrs["rows_per_shard"]
    if rps < 1:
        problems.append(f"rows_per_shard is {rps}, not >= 1")
    text = attrs["text"]
    if not (_is_int(text.get("n_classes")) and _ints(text.get("tokens_shape"), 3)
            and _is_int(text.get("embed_dim"))
            and text["tokens_shape"][0] == text["n_classes"]):
        problems.append(f"root attribute text is malformed ({text}); expected n_classes M, "
                        "tokens_shape [M, Lt, Dt] and embed_dim")
    for name, info in attrs["splits"].items():
        problem = split_name_problem(name)
        if problem:
            problems.append(problem)
        elif not (isinstance(info, dict) and _is_int(info.get("n")) and _is_int(info.get("views"), 1)
                  and _is_int(info.get("n_classes")) and _ints(info.get("vision_shape"), 2)
                  and _is_int(info.get("n_shards"))):
            problems.append(f"split {name}: attributes malformed ({info}); expected n, views, "
                            "n_classes, vision_shape [Lv, Dv] and n_shards")
        elif rps >= 1 and info["n_shards"] != -(-info["n"] // rps):
            problems.append(f"split {name}: n_shards is {info['n_shards']}, but {info['n']} rows "
                            f"in shards of {rps} make {-(-info['n'] // rps)}")
    return problems


def check_structure(path: Path, group) -> dict:
    """Cheap checks of a store's metadata against its attributes; the opened arrays by name.

    Raises:
        CorruptStore: one line naming the first problems found.
    """
    attrs = dict(group.attrs)

    def fail(problems: list[str]) -> CorruptStore:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                           else "")
        return CorruptStore(f"store {path} is damaged: {shown}; {_REBUILD}")

    problems = attribute_problems(attrs)
    if problems:
        raise fail(problems)
    try:
        digest = key_hash(attrs["key"])
    except (TypeError, ValueError) as exc:
        raise fail([f"its key cannot be hashed ({one_line(exc)})"]) from None
    if attrs["key_hash"] != digest:
        problems.append(f"its key hashes to {digest} but its key_hash attribute says "
                        f"{attrs['key_hash']} (an edited key?)")
    named = hash_in_name(path)
    if named is not None and named != attrs["key_hash"]:
        problems.append(f"its directory name carries key hash {named} but the store holds key "
                        f"hash {attrs['key_hash']} (an edited or renamed store)")
    arrays = {}
    for name, (shape, dtype) in expected_arrays(attrs).items():
        try:
            array = group[name]
        except KeyError:
            problems.append(f"array {name} is missing")
            continue
        except Exception as exc:  # unreadable or malformed zarr.json
            problems.append(f"array {name} has unreadable metadata ({one_line(exc)})")
            continue
        if not hasattr(array, "shape"):
            problems.append(f"{name} is not an array")
            continue
        found = array.dtype.kind in "OTU" if dtype == "str" else array.dtype == np.dtype(dtype)
        if tuple(array.shape) != shape or not found:
            problems.append(f"array {name} is {list(array.shape)} {array.dtype}, its attributes "
                            f"say {list(shape)} {dtype}")
        arrays[name] = array
    if not problems:
        problems += _text_attr_problems(group, attrs["text"]["n_classes"])
    if problems:
        raise fail(problems)
    return arrays


def _text_attr_problems(group, m: int) -> list[str]:
    attrs = dict(group["text"].attrs)
    if not isinstance(attrs.get("written", False), bool):
        return ["text attribute written is not a bool"]
    if not attrs.get("written"):
        return []
    names, template = attrs.get("classnames"), attrs.get("template")
    if not (isinstance(names, list) and len(names) == m and all(isinstance(c, str) for c in names)):
        count = len(names) if isinstance(names, list) else names
        return [f"text attribute classnames holds {count!r} names for {m} classes"]
    if not isinstance(template, str):
        return ["text attribute template is not a string"]
    return []


def read_classes(store, split: str) -> list[int]:
    """The global classes of `split`, each checked to be a row of `text/*`."""
    name = f"{split}/classes"
    if missing_blocks(store.path, store.array(name), (slice(None),)):  # written at creation
        raise CorruptStore(f"store {store.path} is damaged: {name} chunk (0,) is missing; "
                           f"{_REBUILD}")
    classes = read_array(store, name)
    m = store.attrs["text"]["n_classes"]
    if classes.size and (classes.min() < 0 or classes.max() >= m):
        raise CorruptStore(f"store {store.path} is damaged: {split}/classes chunk (0,) has class "
                           f"indices outside [0, {m}); {_REBUILD}")
    return classes.tolist()


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


def _read(store, name: str, selection: tuple, problems: _Problems,
          inner: list[tuple[tuple, tuple]] = (), *, missing_ok: bool = False):
    """Read `selection` of array `name`; None (and a problem) when a file is missing or bad.

    Args:
        inner: (selection, chunk index) of the inner chunks, tried one by one on a decode failure
            so that the problem names the chunk that is bad.
        missing_ok: absent chunks read as fill values (the `done` flags of an unfinished store).
    """
    array = store.array(name)
    blocks = chunk_blocks(array, selection)
    if not missing_ok:
        missing = [b for b in blocks if not chunk_file(store.path, array, b).is_file()]
        for block in missing:
            key = array.metadata.encode_chunk_key(block)
            problems.add(name, f"chunk {block} is missing (no file {key})")
        if missing:
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
        where = f"chunk {blocks[0]}" if len(blocks) == 1 else f"chunks {blocks[:10]}"
        if failing:
            where = f"chunks {failing[:10]}" + (f" ({len(failing)})" if len(failing) > 10 else "")
        problems.add(name, f"{where} cannot be decoded ({one_line(exc)})")
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
    if store.storage_dtype != "bfloat16":
        return stored
    return decode_array(stored, "bfloat16", torch.float32).numpy()


def _verify_text(store, problems: _Problems) -> None:
    if not store.has_text():
        problems.add("text", "text tokens not written yet")
        return
    m, lt, _ = store.attrs["text"]["tokens_shape"]
    tokens = store.array("text/tokens")
    rows_per_chunk = tokens.chunks[0]
    for c in range(-(-m // rows_per_chunk)):
        sel = (slice(c * rows_per_chunk, (c + 1) * rows_per_chunk),)
        data = _read(store, "text/tokens", sel, problems)
        if data is not None:
            for row in _nonfinite_rows(_decoded(store, data), 0)[:10]:
                where = f"chunk ({c}, 0, 0) holds non-finite values"
                problems.add("text/tokens", f"{where} (class {c * rows_per_chunk + row})")
    eot = _read(store, "text/eot", (slice(None),), problems)
    if eot is not None and eot.size and (eot.min() < 0 or eot.max() >= lt):
        problems.add("text/eot", f"chunk (0,) has positions outside [0, {lt})")
    protos = _read(store, "text/prototypes", (slice(None),), problems)
    if protos is not None and not np.isfinite(protos).all():
        problems.add("text/prototypes", "chunk (0, 0) holds non-finite values")


def _verify_split(store, split: str, problems: _Problems) -> None:
    spec = store.splits[split]
    n_shards = store.n_shards(split)
    if n_shards == 0:
        return
    done = _read(store, f"{split}/done", (slice(None),), problems,
                 [((s,), (s,)) for s in range(n_shards)], missing_ok=not store.complete)
    if done is None:
        return
    pending = np.flatnonzero(done == 0).tolist()
    if pending:
        problems.add(
            split, f"{len(pending)} of {n_shards} shards not written yet (shards {pending[:10]})"
        )
    classes = _read(store, f"{split}/classes", (slice(None),), problems)
    n_text = store.attrs["text"]["n_classes"]
    if classes is not None and classes.size and (classes.min() < 0 or classes.max() >= n_text):
        problems.add(f"{split}/classes", f"chunk (0,) has class indices outside [0, {n_text})")
    m_split = len(spec.classes)
    for shard in np.flatnonzero(done != 0).tolist():
        rows = store.shard_rows(split, shard)
        sel = slice(rows.start, rows.stop)
        for v in range(spec.views):
            inner = [((v, r), (v, r, 0, 0)) for r in rows]
            data = _read(store, f"{split}/vision", (v, sel), problems, inner)
            if data is not None:
                for row in _nonfinite_rows(_decoded(store, data), 0)[:10]:
                    where = f"chunk ({v}, {rows.start + row}, 0, 0)"
                    problems.add(f"{split}/vision", f"{where} holds non-finite values")
        labels = _read(store, f"{split}/labels", (sel,), problems)
        if labels is not None:
            for line in label_problems(labels, m_split, rows.start):
                problems.add(f"{split}/labels", f"chunk ({shard},): {line}")
        logits = _read(store, f"{split}/zeroshot_logits", (sel,), problems)
        if logits is not None:
            bad = _nonfinite_rows(logits, 0)
            if bad.size:
                bad_rows = (bad[:10] + rows.start).tolist()
                problems.add(f"{split}/zeroshot_logits",
                             f"chunk ({shard}, 0) holds non-finite values in rows {bad_rows}")
        rank = _read(store, f"{split}/zeroshot_rank", (sel,), problems)
        if rank is not None:
            for line in rank_problems(rank.astype(np.int64), rows.start):
                problems.add(f"{split}/zeroshot_rank", f"chunk ({shard}, 0): {line}")
        ids = _read(store, f"{split}/source_ids", (sel,), problems)
        if ids is not None and any(s == "" for s in ids.tolist()):
            problems.add(f"{split}/source_ids", f"chunk ({shard},) has empty source ids")


def summary(store) -> dict:
    """See `FeatureStore.summary`. Zero-shot accuracies (`zeroshot_acc_pct`) are top-1 in percent
    over the written shards, as every accuracy skipcache reports; None for a split with no shard
    written yet."""
    splits = {}
    for split in store.split_names:
        spec = store.splits[split]
        done = store.done_flags(split)
        correct = seen = 0
        for shard in np.flatnonzero(done != 0).tolist():
            rows = store.shard_rows(split, shard)
            sel = (slice(rows.start, rows.stop),)
            logits = read_array(store, f"{split}/zeroshot_logits", sel)
            labels = read_array(store, f"{split}/labels", sel)
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
            "arrays_mib": {a: dir_size_mib(Path(store.path) / split / a) for a in SPLIT_ARRAYS},
            "zeroshot_acc_pct": 100.0 * correct / seen if seen else None,
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
        "zeroshot_acc_pct": {name: info["zeroshot_acc_pct"] for name, info in splits.items()},
    }
