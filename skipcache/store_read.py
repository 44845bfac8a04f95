"""Reading a feature store: dtype decoding, whole-split reads and the shuffled shard stream.

`skipcache.store_layout` owns the format (the storage dtypes included) and `skipcache.store` the
writer; this module owns everything that turns stored chunks back into tensors: the
storage-dtype codec (bfloat16 is kept as its raw uint16 bits), the whole-split read used by
evaluation, and `iter_batches`, the stream the tune stage trains from. It reads a store only
through `FeatureStore`'s public interface (`array`, `split_arrays`, `splits`, `shard_rows`...).

The stream reads whole shards (one Zarr slice per shard and array), shuffles the shard order and
then the rows inside a buffer of several shards, and prefetches shards in a background thread so
the consumer does not wait on I/O. Random single-row reads are avoided on purpose: the design
notes measured whole-shard reads plus an in-memory shuffle as the fast path.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skipcache.errors import CorruptStore, IncompleteStore, StoreError
from skipcache.store_layout import STORAGE_DTYPES

def encode_tensor(values: Any, storage_dtype: str) -> np.ndarray:
    """Round `values` to the storage dtype and return the array that goes on disk.

    bfloat16 values are returned as their raw bits in a uint16 array, so decoding is bit-exact.
    """
    t = torch.as_tensor(values).detach().to("cpu", STORAGE_DTYPES[storage_dtype].tensor).contiguous()
    if storage_dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def decode_array(
    stored: np.ndarray, storage_dtype: str, dtype: torch.dtype | None = torch.float32
) -> torch.Tensor:
    """Turn an on-disk array back into a tensor of `dtype` (None keeps the storage dtype)."""
    stored = np.ascontiguousarray(stored)
    if storage_dtype == "bfloat16":
        t = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(stored)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


# ---- reading arrays: a chunk that is not on disk is an error, never fill values ------------


def chunk_blocks(array, selection: tuple) -> list[tuple[int, ...]]:
    """Indices of the chunks (shards, for a sharded array) that hold `selection`.

    `selection` holds ints and step-1 slices, one per leading dimension.
    """
    grid = array.metadata.chunk_grid.chunk_shape  # the shard shape of a sharded array
    selection = tuple(selection) + (slice(None),) * (len(array.shape) - len(selection))
    ranges = []
    for sel, size, chunk in zip(selection, array.shape, grid):
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(size)
            ranges.append(range(start // chunk, -(-stop // chunk)) if stop > start else range(0))
        else:
            i = int(sel) + size if int(sel) < 0 else int(sel)
            ranges.append(range(i // chunk, i // chunk + 1))
    return list(itertools.product(*ranges))


def chunk_file(root: Path, array, block: tuple[int, ...]) -> Path:
    return Path(root) / array.path / array.metadata.encode_chunk_key(block)


def missing_blocks(root: Path, array, selection: tuple) -> list[tuple[int, ...]]:
    """The chunks of `selection` that have no file (Zarr would return fill values for them)."""
    return [b for b in chunk_blocks(array, selection) if not chunk_file(root, array, b).is_file()]


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


def _blocks_text(array, blocks: list) -> str:
    kind = "shard" if getattr(array, "shards", None) else "chunk"
    if len(blocks) == 1:
        return f"{kind} {blocks[0]}"
    more = f" and {len(blocks) - 10} more" if len(blocks) > 10 else ""
    return f"{kind}s {', '.join(map(str, blocks[:10]))}{more}"


def damaged(store, problem: str) -> CorruptStore:
    """The error for a complete store whose data is damaged, with the way out."""
    return CorruptStore(
        f"store {store.path} is damaged: {problem}; run `skipcache verify {store.path}` to list "
        "every problem, then rebuild it with `skipcache cache ... --force`"
    )


def read_array(store, name: str, selection: tuple = (slice(None),), *,
               missing_ok: bool = False) -> np.ndarray:
    """`selection` of array `name` of `store`; raises instead of returning fill values.

    A chunk without a file raises `CorruptStore` (`IncompleteStore` in an unfinished store, where
    it may not be written yet), a chunk that fails to decode `CorruptStore`, an unreadable file
    `StoreError`. `missing_ok` reads absent chunks as fill values (for the `done` flags of an
    unfinished store, where absent means not done).
    """
    array = store.array(name)
    if not missing_ok:
        missing = missing_blocks(store.path, array, selection)
        if missing:
            what = f"{name} {_blocks_text(array, missing)} missing (no file " \
                   f"{name}/{array.metadata.encode_chunk_key(missing[0])})"
            if store.complete:
                raise damaged(store, what)
            raise IncompleteStore(
                f"unfinished store {store.path}: {what}: not written yet (rerun the same "
                "`skipcache cache` command to resume it) or lost (rebuild it with `skipcache cache "
                "... --force`)"
            )
    try:
        return array[selection]
    except OSError as exc:
        raise StoreError(
            f"cannot read {name} of store {store.path} ({one_line(exc)}); check that its files "
            "are readable"
        ) from exc
    except Exception as exc:  # checksum mismatch, truncated file, bad shard index
        blocks = chunk_blocks(array, selection)
        raise damaged(store, f"{name} {_blocks_text(array, blocks)} cannot be decoded "
                             f"({one_line(exc)})") from exc


def _check_values(store, split: str, rows: range, labels, logits, rank) -> None:
    """Cheap checks of the small per-row arrays, so that tune and eval never index with junk."""
    m_split = len(store.splits[split].classes)
    where = f"rows {rows.start}..{rows.stop - 1}"
    if labels.size and (labels.min() < 0 or labels.max() >= m_split):
        bad = np.flatnonzero((labels < 0) | (labels >= m_split))[:10] + rows.start
        raise damaged(store, f"{split}/labels out of range [0, {m_split}) in rows {bad.tolist()}")
    if rank.size and (rank.min() < 0 or rank.max() >= m_split):
        raise damaged(store, f"{split}/zeroshot_rank {where} hold ranks outside [0, {m_split})")
    if not np.isfinite(logits).all():
        raise damaged(store, f"{split}/zeroshot_logits {where} hold non-finite values")


def read_rows(store, split: str, rows: range, *, views: int | None, dtype,
              include_vision: bool = True) -> dict:
    """Read a contiguous block of rows of one split into tensors.

    Args:
        store: an open `FeatureStore`.
        split: split name.
        rows: contiguous row range (a shard, or the whole split).
        views: one view index (vision comes back [rows, Lv, Dv]), or None for all views
            (vision comes back [V, rows, Lv, Dv]).
        dtype: dtype of the vision tensor; None keeps the storage dtype.
        include_vision: False leaves `vision` out (and does not read it).
    """
    store.split_arrays(split)  # unknown split: KeyError naming the splits
    sel = slice(rows.start, rows.stop)
    view_sel = slice(None) if views is None else views
    vision = read_array(store, f"{split}/vision", (view_sel, sel)) if include_vision else None
    labels = read_array(store, f"{split}/labels", (sel,))
    logits = read_array(store, f"{split}/zeroshot_logits", (sel,))
    rank = read_array(store, f"{split}/zeroshot_rank", (sel,))
    _check_values(store, split, rows, labels, logits, rank)
    data = {} if vision is None else {"vision": decode_array(vision, store.storage_dtype, dtype)}
    return data | {
        "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        "zeroshot_logits": torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)),
        "zeroshot_rank": torch.from_numpy(np.asarray(rank).astype(np.int64)),
        "index": torch.arange(rows.start, rows.stop, dtype=torch.int64),
    }


def _in_background(items: Iterator, depth: int, name: str) -> Iterator:
    """Yield from `items`, which a daemon thread runs up to `depth` items ahead.

    Exceptions raised by `items` reach the consumer. Closing this generator (or dropping it)
    stops the thread, which then closes `items` from its own thread.
    """
    results: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
        finally:
            if hasattr(items, "close"):
                items.close()

    thread = threading.Thread(target=worker, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10.0)


def iter_batches(
    store,
    split: str,
    batch_size: int,
    *,
    view: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    buffer_shards: int = 4,
    drop_last: bool = False,
    prefetch: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> Iterator[dict]:
    """Stream one epoch of a split as batches; see `FeatureStore.iter_batches`.

    With `prefetch`, two daemon threads run ahead of the consumer: one reads shards (up to
    `buffer_shards` ahead), one shuffles and assembles batches (a few ahead), so a training loop
    only ever takes finished batches from a queue. The batches are the same with or without it.
    """
    spec = store.splits[split]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= view < spec.views:
        raise ValueError(f"view {view} out of range: split {split!r} has {spec.views} view(s)")
    rng = np.random.default_rng(seed)
    n_shards = store.n_shards(split)
    order = [int(s) for s in (rng.permutation(n_shards) if shuffle else range(n_shards))]
    buffer_shards = max(1, buffer_shards)

    # vision stays in the storage dtype until `_flush` converts it while assembling batches
    shards = (read_rows(store, split, store.shard_rows(split, s), views=view, dtype=None)
              for s in order)
    if prefetch:
        shards = _in_background(shards, buffer_shards, "skipcache-prefetch-read")
    batches = _batches(shards, batch_size, rng, shuffle, buffer_shards, drop_last, dtype)
    if prefetch:
        batches = _in_background(batches, 4, "skipcache-prefetch-batch")
    try:
        yield from batches
    finally:
        batches.close()  # stops the threads when the consumer stops early


def _batches(shards: Iterator[dict], batch_size: int, rng, shuffle: bool, buffer_shards: int,
             drop_last: bool, dtype) -> Iterator[dict]:
    """Shuffle rows within buffers of `buffer_shards` shards and cut them into batches."""
    pool: list[dict] = []  # shards read since the last flush, plus the previous remainder
    fresh = 0
    try:
        for shard_data in shards:
            pool.append(shard_data)
            fresh += 1
            if fresh < buffer_shards:
                continue
            remainder = yield from _flush(pool, batch_size, rng, shuffle, dtype, last=False)
            pool, fresh = ([remainder] if remainder is not None else []), 0
        if pool:
            yield from _flush(pool, batch_size, rng, shuffle, dtype, last=not drop_last)
    finally:
        shards.close()


def _gather_rows(pool: list[torch.Tensor], rows: torch.Tensor, dtype) -> torch.Tensor:
    """Stack rows of the concatenation of `pool` ([r_k, ...] tensors) without concatenating it.

    Copying row by row, converting on the fly, touches each byte once; `torch.cat` followed by
    fancy indexing and `.to(dtype)` touched it three times and was 2x slower on CPU.
    """
    offsets = np.cumsum([0] + [p.shape[0] for p in pool])
    source = np.searchsorted(offsets, rows.numpy(), side="right") - 1
    out = torch.empty((rows.shape[0], *pool[0].shape[1:]), dtype=dtype or pool[0].dtype)
    for i, (k, row) in enumerate(zip(source.tolist(), rows.tolist())):
        out[i].copy_(pool[k][int(row - offsets[k])])
    return out


def _flush(pool: list[dict], batch_size: int, rng, shuffle: bool, dtype, *, last: bool):
    """Yield the full batches of a shuffled buffer; return the leftover rows (or None)."""
    small = {k: torch.cat([p[k] for p in pool]) for k in pool[0] if k != "vision"}
    vision = [p["vision"] for p in pool]
    n_rows = small["index"].shape[0]
    order = torch.from_numpy(rng.permutation(n_rows)) if shuffle else torch.arange(n_rows)

    def take(rows: torch.Tensor, dtype) -> dict:
        batch = {"vision": _gather_rows(vision, rows, dtype)}
        batch.update({k: v[rows] for k, v in small.items()})
        return batch

    n_full = n_rows // batch_size * batch_size
    for start in range(0, n_full, batch_size):
        yield take(order[start : start + batch_size], dtype)
    if n_full == n_rows:
        return None
    if last:
        yield take(order[n_full:], dtype)
        return None
    return take(order[n_full:], None)  # keeps the storage dtype until it is batched
