"""The store layout: schema version, path scheme, cache key hash, storage dtypes, and the empty
array skeleton.

Everything that fixes where a store lives and what arrays it holds, with which shapes, dtypes,
chunks and shards, is decided here, once, when `create_skeleton` lays out a new store. The
writer and readers (`skipcache.store`, `skipcache.store_read`) only fill and read those arrays.
`read_root_attrs` reads a store's root attributes (schema version, key...) without opening it.
The spec is `docs/store-format.md`; a change here is a change of the format (bump
`SCHEMA_VERSION` and add a golden fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from skipcache.errors import ConfigError, StoreError
from skipcache.runtime import library_versions

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_CREATING_SUFFIX = ".creating"  # skeleton being laid out; renamed to .partial when complete
_REQUIRED_KEY_FIELDS = ("dataset", "model", "pretrained_label", "omega")
_RESERVED_ATTRS = {
    "schema_version", "key", "key_hash", "library_versions", "created_utc", "complete",
    "storage_dtype", "rows_per_shard", "text", "splits",
}
_TEXT_CHUNK_BYTES = 4 * 2**20
_CHECKSUM = [Crc32cCodec()]  # every chunk carries a crc32c, so corrupted bytes fail to decode
WRITE_CONFIG = {"write_empty_chunks": True}  # measured 4x faster writes for dense data


class StorageDtype(NamedTuple):
    """How one storage dtype is kept: `tensor`, the torch dtype of the values; `disk`, the numpy
    dtype of the Zarr array (bfloat16 values are kept as their raw uint16 bits)."""

    tensor: torch.dtype
    disk: np.dtype


# storage dtype name (`--dtype`, the `storage_dtype` attribute) -> StorageDtype
STORAGE_DTYPES: dict[str, StorageDtype] = {
    "float16": StorageDtype(torch.float16, np.dtype("float16")),
    "bfloat16": StorageDtype(torch.bfloat16, np.dtype("uint16")),
    "float32": StorageDtype(torch.float32, np.dtype("float32")),
}
# Unwritten float chunks read back as NaN, so `verify` flags them as non-finite.
BF16_NAN_BITS = 0x7FC0


def check_storage_dtype(storage_dtype: str) -> None:
    """Raise `ConfigError` unless `storage_dtype` is one of `STORAGE_DTYPES`."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(
            f"storage dtype {storage_dtype!r} is not supported; expected one of "
            f"{sorted(STORAGE_DTYPES)}"
        )


def fill_value_for(storage_dtype: str) -> float | int:
    """The fill value of vision/text arrays: NaN, or the bits of a bfloat16 NaN."""
    return BF16_NAN_BITS if storage_dtype == "bfloat16" else float("nan")


def canonical_key(key: dict) -> str:
    """The canonical JSON of a key: sorted keys, no spaces, UTF-8."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_hash(key: dict) -> str:
    """First 12 hex digits of the sha256 of the key's canonical JSON."""
    return hashlib.sha256(canonical_key(key).encode("utf-8")).hexdigest()[:12]


_MAX_NAME_BYTES = 255  # the longest file name common file systems take
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def safe_component(value: Any, max_bytes: int = _MAX_NAME_BYTES) -> str:
    """`value` as one file name that cannot leave the directory it is joined to.

    `/`, `\\`, NUL and other control characters become `_`; an empty name, `.` and `..` become
    `_`; a name over `max_bytes` (UTF-8) is cut and ends with a hash of the whole value, so
    distinct values stay distinct. Ordinary names (`ViT-B-16`, `pets`, `6`) come back unchanged.
    Use it for every path component taken from a store key, a store attribute or other metadata.
    """
    text = str(value).encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> ?
    part = "".join("_" if c in "/\\" or ord(c) < 32 or ord(c) == 127 else c for c in text)
    if part in ("", ".", ".."):
        return "_"
    raw = part.encode("utf-8")
    if len(raw) > max_bytes:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        part = raw[: max(0, max_bytes - 13)].decode("utf-8", "ignore") + "-" + digest
    return part


def confined_path(root: Path, *values: Any) -> Path:
    """`root` joined with each value made a `safe_component`: a path that stays under `root`."""
    return Path(root).joinpath(*(safe_component(v) for v in values))


def split_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a split name (it names a group and a directory), or None."""
    if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name) or name == "text":
        return (f"split name {name!r} is not allowed: use letters, digits, '_', '-', '.', "
                "at most 100, starting with a letter or digit, and not 'text'")
    return None


def store_path(root: Path, key: dict) -> Path:
    """`<root>/<dataset>/<model>@<pretrained_label>/omega<ω>-<keyhash>.zarr` for a cache key.

    Every component goes through `safe_component`, so the path stays under `root` whatever the
    key holds.
    """
    missing = [f for f in _REQUIRED_KEY_FIELDS if f not in key]
    if missing:
        raise ValueError(f"store key lacks field(s) {missing}; it has {sorted(key)}")
    model_dir = f"{safe_component(key['model'])}@{safe_component(key['pretrained_label'])}"
    tail = f"-{key_hash(key)}.zarr"
    omega = safe_component(key["omega"], _MAX_NAME_BYTES - len("omega") - len(tail))
    return confined_path(root, key["dataset"], model_dir) / f"omega{omega}{tail}"


def hash_in_name(path: Path) -> str | None:
    """The key hash a store's directory name carries (`...-<12 hex>.zarr[.partial]`), or None
    for a store that was given another name (a copy, a benchmark's scratch store)."""
    name = final_and_partial(path)[0].name
    found = re.search(r"-([0-9a-f]{12})\.zarr$", name)
    return found.group(1) if found else None


def final_and_partial(path: Path) -> tuple[Path, Path]:
    """(final path, `.partial` path) of a store, given either of them."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        path = path.with_name(path.name[: -len(PARTIAL_SUFFIX)])
    return path, path.with_name(path.name + PARTIAL_SUFFIX)


def read_root_attrs(path: Path) -> dict:
    """The root attributes of the store (or any Zarr v3 group) at `path`, read through Zarr
    without checking or opening its arrays: what listing stores needs (`schema_version`, `key`,
    `key_hash`, `complete`, `created_utc`).

    Raises:
        StoreError: nothing at `path` is a readable Zarr v3 group.
    """
    try:
        return dict(zarr.open_group(str(path), mode="r", zarr_format=3).attrs)
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{path} is not a readable Zarr v3 group: {exc}") from exc


@dataclass
class SplitSpec:
    """Shape of one cached split.

    Attributes:
        name: split name chosen by the cache stage (`train`, `test`, `test_base`...).
        n: number of images (rows).
        views: augmented views per image (1 for evaluation splits).
        classes: global class indices of the split; a row's label indexes this list.
        vision_shape: (Lv, Dv), tokens per image and token width.
    """

    name: str
    n: int
    views: int
    classes: list[int]
    vision_shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.classes = [int(c) for c in self.classes]
        self.vision_shape = tuple(int(d) for d in self.vision_shape)


SPLIT_ARRAYS = (
    "vision", "labels", "classes", "zeroshot_logits", "zeroshot_rank", "source_ids", "done",
)


@dataclass
class Layout:
    """Everything besides the key that fixes the arrays of a store; compared on resume."""

    text_shape: tuple[int, int, int]
    embed_dim: int
    splits: list[SplitSpec]
    storage_dtype: str
    rows_per_shard: int

    def describe(self) -> dict:
        """A JSON-comparable form (tuples become lists, as they do in attrs)."""
        return json.loads(json.dumps({
            "text_shape": list(self.text_shape), "embed_dim": self.embed_dim,
            "storage_dtype": self.storage_dtype, "rows_per_shard": self.rows_per_shard,
            "splits": {s.name: [s.n, s.views, list(s.classes), list(s.vision_shape)]
                       for s in self.splits},
        }))


def rank_dtype(m_split: int) -> str:
    return "int16" if m_split <= np.iinfo(np.int16).max else "int32"


def expected_arrays(attrs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype (a numpy name, or `str`) of every array, as the root attributes imply."""
    tok = STORAGE_DTYPES[attrs["storage_dtype"]].disk.name
    text = attrs["text"]
    m = text["n_classes"]
    out = {
        "text/tokens": (tuple(text["tokens_shape"]), tok),
        "text/eot": ((m,), "int32"),
        "text/prototypes": ((m, text["embed_dim"]), "float32"),
    }
    for name, info in attrs["splits"].items():
        n, m_split = info["n"], info["n_classes"]
        out.update({
            f"{name}/vision": ((info["views"], n, *info["vision_shape"]), tok),
            f"{name}/labels": ((n,), "int64"),
            f"{name}/classes": ((m_split,), "int64"),
            f"{name}/zeroshot_logits": ((n, m_split), "float32"),
            f"{name}/zeroshot_rank": ((n, m_split), rank_dtype(m_split)),
            f"{name}/source_ids": ((n,), "str"),
            f"{name}/done": ((info["n_shards"],), "uint8"),
        })
    return out


def create_skeleton(partial: Path, key: dict, layout: Layout, extra_attrs: dict) -> None:
    """Lay out every array under a scratch directory, then rename it to `partial`."""
    versions = {**library_versions(), **extra_attrs.get("library_versions", {})}
    extra_attrs = {k: v for k, v in extra_attrs.items() if k != "library_versions"}
    clash = _RESERVED_ATTRS & set(extra_attrs)
    if clash:
        raise ValueError(f"extra_attrs may not set reserved attributes {sorted(clash)}")
    names = [s.name for s in layout.splits]
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique, got {names}")
    for name in names:
        if split_name_problem(name):
            raise ValueError(split_name_problem(name))
    m = layout.text_shape[0]
    for spec in layout.splits:
        if any(not 0 <= c < m for c in spec.classes):
            raise ValueError(f"split {spec.name}: classes must be rows of the {m} text classes, "
                             f"got {spec.classes}")
    scratch = partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)] + _CREATING_SUFFIX)
    if scratch.exists():
        shutil.rmtree(scratch)  # left by a process killed while creating
    scratch.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(scratch), mode="w", zarr_format=3)
    storage_np = STORAGE_DTYPES[layout.storage_dtype].disk
    fill = fill_value_for(layout.storage_dtype)
    rps = layout.rows_per_shard
    nan = float("nan")

    def plain(name, shape, dtype, chunks, fill_value):
        """An unsharded array whose chunks carry a crc32c checksum."""
        chunks = tuple(max(1, c) for c in chunks)
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                  fill_value=fill_value, compressors=_CHECKSUM, config=WRITE_CONFIG)

    m, lt, dt = layout.text_shape
    text_rows = max(1, min(m, _TEXT_CHUNK_BYTES // max(1, lt * dt * storage_np.itemsize)))
    plain("text/tokens", (m, lt, dt), storage_np, (text_rows, lt, dt), fill)
    plain("text/eot", (m,), "int32", (m,), -1)
    plain("text/prototypes", (m, layout.embed_dim), "float32", (m, layout.embed_dim), nan)
    group["text"].attrs.update({"written": False})
    splits_attrs = {}
    for spec in layout.splits:
        lv, dv = spec.vision_shape
        m_split, n_shards = len(spec.classes), -(-spec.n // rps)
        rows = min(rps, max(spec.n, 1))  # per-row arrays: one chunk per shard
        # vision: one image (one view) per inner chunk, rps images per shard file, raw bytes
        inner = ShardingCodec(chunk_shape=(1, 1, lv, dv), codecs=[BytesCodec(), Crc32cCodec()])
        group.create_array(f"{spec.name}/vision", shape=(spec.views, spec.n, lv, dv),
                           dtype=storage_np, chunks=(1, rps, lv, dv), serializer=inner,
                           compressors=None, fill_value=fill, config=WRITE_CONFIG)
        plain(f"{spec.name}/labels", (spec.n,), "int64", (rows,), -1)
        classes = plain(f"{spec.name}/classes", (m_split,), "int64", (m_split,), -1)
        classes[...] = np.asarray(spec.classes, dtype=np.int64)
        plain(f"{spec.name}/zeroshot_logits", (spec.n, m_split), "float32", (rows, m_split), nan)
        plain(f"{spec.name}/zeroshot_rank", (spec.n, m_split), rank_dtype(m_split), (rows, m_split),
              -1)
        plain(f"{spec.name}/source_ids", (spec.n,), str, (rows,), "")
        plain(f"{spec.name}/done", (n_shards,), "uint8", (1,), 0)
        splits_attrs[spec.name] = {
            "n": spec.n, "views": spec.views, "n_classes": m_split,
            "vision_shape": [lv, dv], "n_shards": n_shards,
        }
    group.attrs.update({
        **extra_attrs,
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "key_hash": key_hash(key),
        "library_versions": versions,
        "created_utc": datetime.now(timezone.utc).isoformat(),
        "complete": False,
        "storage_dtype": layout.storage_dtype,
        "rows_per_shard": rps,
        "text": {"n_classes": m, "tokens_shape": [m, lt, dt], "embed_dim": layout.embed_dim},
        "splits": splits_attrs,
    })
    os.rename(scratch, partial)

