"""Feature store: round trips, streaming, resume, format errors, verify, listing, golden fixture."""

from __future__ import annotations

import importlib.util
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipcache.errors import (
    CorruptStore,
    IncompleteStore,
    StoreError,
    StoreKeyMismatch,
    StoreVersionError,
)
from skipcache.store import (
    SCHEMA_VERSION,
    FeatureStore,
    SplitSpec,
    find_stores,
    key_hash,
    list_stores,
    store_path,
)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TEXT_SHAPE = (5, 3, 4)  # (M, Lt, Dt)
EMBED_DIM = 6


def make_key(**overrides) -> dict:
    key = {"dataset": "toy", "model": "ViT-T", "pretrained_label": "synth", "omega": 2, "views": 2}
    return {**key, **overrides}


def default_splits(n_train: int = 10, n_test: int = 7) -> list[SplitSpec]:
    return [
        SplitSpec("train", n=n_train, views=2, classes=[0, 2, 4], vision_shape=(3, 4)),
        SplitSpec("test", n=n_test, views=1, classes=[0, 1, 2, 3, 4], vision_shape=(3, 4)),
    ]


def make_data(splits: list[SplitSpec], seed: int = 0) -> dict:
    """Random text tensors and full-split tensors for every split."""
    g = torch.Generator().manual_seed(seed)
    m, lt, dt = TEXT_SHAPE
    data = {
        "text": {
            "tokens": torch.randn(m, lt, dt, generator=g),
            "eot": torch.randint(0, lt, (m,), generator=g),
            "prototypes": torch.randn(m, EMBED_DIM, generator=g),
            "classnames": [f"class {i}" for i in range(m)],
            "template": "a photo of a {}.",
        }
    }
    for spec in splits:
        m_split = len(spec.classes)
        logits = torch.randn(spec.n, m_split, generator=g)
        data[spec.name] = {
            "vision": torch.randn(spec.views, spec.n, *spec.vision_shape, generator=g),
            "labels": torch.randint(0, m_split, (spec.n,), generator=g),
            "zeroshot_logits": logits,
            "zeroshot_rank": logits.argsort(1, descending=True).argsort(1),
            "source_ids": [f"{spec.name}/img_{i:04d}.png" for i in range(spec.n)],
        }
    return data


def write_shards(store: FeatureStore, data: dict, split: str, shards) -> None:
    for shard in shards:
        rows = store.shard_rows(split, shard)
        d = data[split]
        store.write_shard(
            split,
            shard,
            vision=d["vision"][:, rows.start : rows.stop],
            labels=d["labels"][rows.start : rows.stop],
            zeroshot_logits=d["zeroshot_logits"][rows.start : rows.stop],
            zeroshot_rank=d["zeroshot_rank"][rows.start : rows.stop],
            source_ids=d["source_ids"][rows.start : rows.stop],
        )


def build_store(root: Path, *, storage_dtype="float16", splits=None, rows_per_shard=4, key=None,
                data=None, finalize=True) -> tuple[FeatureStore, dict]:
    splits = splits or default_splits()
    key = key or make_key(dtype=storage_dtype)
    data = data or make_data(splits)
    store = FeatureStore.create_or_resume(
        store_path(root, key), key, text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=splits,
        storage_dtype=storage_dtype, rows_per_shard=rows_per_shard,
    )
    store.write_text(**data["text"])
    for spec in splits:
        write_shards(store, data, spec.name, store.pending_shards(spec.name))
    if finalize:
        store.finalize()
    return store, data


def assert_roundtrip(store: FeatureStore, data: dict) -> None:
    torch_dtype = TORCH_DTYPES[store.storage_dtype]
    text = store.read_text(dtype=None)
    assert text["tokens"].dtype == torch_dtype
    assert torch.equal(text["tokens"], data["text"]["tokens"].to(torch_dtype))
    assert torch.equal(store.read_text()["tokens"], data["text"]["tokens"].to(torch_dtype).float())
    assert torch.equal(text["eot"], data["text"]["eot"])
    assert torch.equal(text["prototypes"], data["text"]["prototypes"])
    assert text["classnames"] == data["text"]["classnames"]
    assert text["template"] == data["text"]["template"]
    for split, spec in store.splits.items():
        got, want = store.read_split(split, dtype=None), data[split]
        assert got["vision"].dtype == torch_dtype
        assert torch.equal(got["vision"], want["vision"].to(torch_dtype))
        for name in ("labels", "zeroshot_logits", "zeroshot_rank"):
            assert torch.equal(got[name], want[name].to(got[name].dtype)), name
        assert got["source_ids"] == want["source_ids"]
        assert got["classes"].tolist() == spec.classes


# ---- path scheme ---------------------------------------------------------------------------


def test_store_path_scheme_and_key_hash():
    key = make_key(dataset="oxford/pets", model="ViT-B-16", pretrained_label="laion2b/e16", omega=6)
    path = store_path(Path("/stores"), key)
    digest = key_hash(key)
    assert path == Path(f"/stores/oxford_pets/ViT-B-16@laion2b_e16/omega6-{digest}.zarr")
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert key_hash(dict(reversed(list(key.items())))) == digest  # order does not matter
    assert key_hash({**key, "omega": 7}) != digest
    with pytest.raises(ValueError, match="omega"):
        store_path(Path("/root"), {"dataset": "d", "model": "m", "pretrained_label": "p"})


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("storage_dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_is_exact_for_every_storage_dtype(tmp_path, storage_dtype):
    store, data = build_store(tmp_path, storage_dtype=storage_dtype)
    reopened = FeatureStore.open(store.path)
    assert reopened.complete and reopened.storage_dtype == storage_dtype
    assert reopened.attrs["schema_version"] == SCHEMA_VERSION
    assert_roundtrip(reopened, data)
    assert reopened.verify() == []


def test_bfloat16_bits_survive_special_values(tmp_path):
    splits = [SplitSpec("train", n=3, views=1, classes=[0, 1], vision_shape=(2, 4))]
    data = make_data(splits)
    special = torch.tensor([1e-40, -0.0, 3.3895e38, 1 / 3])  # subnormal, -0, near max, inexact
    data["train"]["vision"][0, 0, 0] = special
    store, _ = build_store(tmp_path, storage_dtype="bfloat16", splits=splits, data=data)
    got = store.read_split("train", dtype=None)["vision"]
    want = data["train"]["vision"].to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    storage_dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    n=st.integers(1, 23),
    views=st.integers(1, 3),
    m_split=st.integers(1, TEXT_SHAPE[0]),
    lv=st.integers(1, 4),
    dv=st.integers(1, 5),
    rows_per_shard=st.integers(1, 8),
    batch_size=st.integers(1, 9),
    buffer_shards=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_roundtrip_and_epoch_cover(storage_dtype, n, views, m_split, lv, dv,
                                            rows_per_shard, batch_size, buffer_shards, drop_last,
                                            seed):
    splits = [SplitSpec("train", n, views, classes=list(range(m_split)), vision_shape=(lv, dv))]
    with tempfile.TemporaryDirectory() as tmp:
        store, data = build_store(Path(tmp), storage_dtype=storage_dtype, splits=splits,
                                  rows_per_shard=rows_per_shard, data=make_data(splits, seed))
        assert_roundtrip(store, data)
        view = seed % views
        batches = list(store.iter_batches("train", batch_size, view=view, seed=seed,
                                          buffer_shards=buffer_shards, drop_last=drop_last))
        index = torch.cat([b["index"] for b in batches] + [torch.empty(0, dtype=torch.long)])
        expected_rows = n // batch_size * batch_size if drop_last else n
        assert len(index) == expected_rows and len(set(index.tolist())) == expected_rows
        assert all(len(b["index"]) == batch_size for b in batches[:-1])
        if drop_last:
            assert all(len(b["index"]) == batch_size for b in batches)
        stored = data["train"]["vision"][view].to(TORCH_DTYPES[storage_dtype]).float()
        for b in batches:
            assert torch.equal(b["vision"], stored[b["index"]])
            assert torch.equal(b["labels"], data["train"]["labels"][b["index"]])
            assert torch.equal(b["zeroshot_rank"], data["train"]["zeroshot_rank"][b["index"]])


# ---- streaming -----------------------------------------------------------------------------


def epoch_order(store, **kw) -> list[int]:
    return [i for b in store.iter_batches("train", 3, **kw) for i in b["index"].tolist()]


def test_iter_batches_deterministic_under_seed_and_seeds_differ(tmp_path):
    splits = default_splits(n_train=41)
    store, _ = build_store(tmp_path, splits=splits)
    first = epoch_order(store, seed=5)
    assert sorted(first) == list(range(41))
    assert epoch_order(store, seed=5) == first
    assert epoch_order(store, seed=5, prefetch=False) == first
    assert epoch_order(store, seed=6) != first
    assert epoch_order(store, shuffle=False) == list(range(41))


def test_iter_batches_dtypes_and_views(tmp_path):
    store, data = build_store(tmp_path, storage_dtype="bfloat16")
    batch = next(iter(store.iter_batches("train", 4, view=1, dtype=None)))
    assert batch["vision"].dtype == torch.bfloat16 and batch["vision"].shape == (4, 3, 4)
    assert torch.equal(batch["vision"], data["train"]["vision"][1, batch["index"]].bfloat16())
    assert batch["labels"].dtype == torch.int64 and batch["zeroshot_rank"].dtype == torch.int64
    assert batch["zeroshot_logits"].shape == (4, 3)
    with pytest.raises(ValueError, match="view"):
        next(iter(store.iter_batches("test", 4, view=1)))


def test_iter_batches_can_stop_early(tmp_path):
    store, _ = build_store(tmp_path, splits=default_splits(n_train=40), rows_per_shard=2)
    stream = store.iter_batches("train", 2, buffer_shards=1)
    next(stream)
    stream.close()  # stops the prefetch thread without reading the rest
    assert not any(t.name.startswith("skipcache-prefetch") for t in threading.enumerate())


# ---- life cycle: resume, key, version, completeness ----------------------------------------


def test_resume_skips_done_shards_and_equals_single_pass(tmp_path):
    splits, key = default_splits(), make_key()
    data = make_data(splits)
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=splits, storage_dtype="float16",
              rows_per_shard=4)
    path = store_path(tmp_path / "a", key)
    store = FeatureStore.create_or_resume(path, key, **kw)
    assert store.path.name.endswith(".zarr.partial") and not store.complete
    write_shards(store, data, "train", [0, 2])
    del store  # as if the process died here

    store = FeatureStore.create_or_resume(path, key, **kw)
    assert store.pending_shards("train") == [1] and store.pending_shards("test") == [0, 1]
    assert not store.has_text()
    store.write_text(**data["text"])
    for split in ("train", "test"):
        write_shards(store, data, split, store.pending_shards(split))
    store.finalize()
    assert store.path == path and path.is_dir() and not Path(f"{path}.partial").exists()

    single, _ = build_store(tmp_path / "b", splits=splits, key=key, data=data)
    for split in ("train", "test"):
        a, b = FeatureStore.open(path).read_split(split), single.read_split(split)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == b[name] if name == "source_ids" else torch.equal(a[name], b[name])


def test_shard_data_without_done_flag_is_rewritten_on_resume(tmp_path):
    splits, key = default_splits(), make_key()
    data = make_data(splits)
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=splits, storage_dtype="bfloat16",
              rows_per_shard=4)
    path = store_path(tmp_path / "a", key)
    store = FeatureStore.create_or_resume(path, key, **kw)
    write_shards(store, data, "train", [0])
    # a process killed inside write_shard: some of shard 1's data is on disk, its flag is not
    group = zarr.open_group(str(store.path), mode="r+")
    group["train/vision"][:, 4:8] = 7
    group["train/labels"][4:8] = 99
    del store, group

    store = FeatureStore.create_or_resume(path, key, **kw)
    assert store.pending_shards("train") == [1, 2]
    store.write_text(**data["text"])
    for split in ("train", "test"):
        write_shards(store, data, split, store.pending_shards(split))
    store.finalize()
    assert store.verify() == []
    assert_roundtrip(FeatureStore.open(path), data)


def test_key_or_layout_mismatch_raises(tmp_path):
    splits, key = default_splits(), make_key()
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=splits, storage_dtype="float16")
    path = store_path(tmp_path, key)
    FeatureStore.create_or_resume(path, key, **kw)
    with pytest.raises(StoreKeyMismatch, match="--force"):
        FeatureStore.create_or_resume(path, {**key, "template": "other"}, **kw)
    with pytest.raises(StoreKeyMismatch, match="layout"):
        FeatureStore.create_or_resume(path, key, **{**kw, "storage_dtype": "float32"})
    fresh = FeatureStore.create_or_resume(path, key, force=True, **{**kw, "storage_dtype": "float32"})
    assert fresh.storage_dtype == "float32"
    fresh.close()
    with pytest.raises(ValueError, match="named for key hash"):  # not a path of this key
        FeatureStore.create_or_resume(path, {**key, "template": "other"}, force=True, **kw)


def test_complete_store_is_not_overwritten_without_force(tmp_path):
    store, _ = build_store(tmp_path)
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=default_splits(),
              storage_dtype="float16", rows_per_shard=4)
    with pytest.raises(StoreError, match="--force"):
        FeatureStore.create_or_resume(store.path, store.key, **kw)
    again = FeatureStore.create_or_resume(store.path, store.key, force=True, **kw)
    assert not store.path.exists() and again.pending_shards("train") == [0, 1, 2]


def set_schema_version(path: Path, version: int) -> None:
    zarr.open_group(str(path), mode="r+").attrs["schema_version"] = version


def test_schema_version_mismatch_raises(tmp_path):
    store, _ = build_store(tmp_path)
    set_schema_version(store.path, SCHEMA_VERSION + 1)
    with pytest.raises(StoreVersionError, match="schema version 2"):
        FeatureStore.open(store.path)

    key = make_key(omega=3)
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=default_splits(),
              storage_dtype="float16")
    partial = FeatureStore.create_or_resume(store_path(tmp_path, key), key, **kw).path
    set_schema_version(partial, 0)
    with pytest.raises(StoreVersionError):
        FeatureStore.create_or_resume(store_path(tmp_path, key), key, **kw)


def test_opening_incomplete_store_raises_with_resume_hint(tmp_path):
    store, data = build_store(tmp_path, finalize=False)
    with pytest.raises(IncompleteStore, match=r"0 of 5 shards.*skipcache cache"):
        FeatureStore.open(store.path)  # text and shards are written, but not finalized

    key = make_key(omega=9)
    partial = FeatureStore.create_or_resume(store_path(tmp_path, key), key, text_shape=TEXT_SHAPE,
                                            embed_dim=EMBED_DIM, splits=default_splits(),
                                            storage_dtype="float16", rows_per_shard=4)
    write_shards(partial, data, "train", [1])
    with pytest.raises(IncompleteStore, match="4 of 5 shards and the text tokens"):
        FeatureStore.open(store_path(tmp_path, key))
    with pytest.raises(IncompleteStore, match="text tokens"):
        partial.finalize()
    opened = FeatureStore.open(store_path(tmp_path, key), allow_incomplete=True)
    assert not opened.complete and opened.pending_shards("train") == [0, 2]
    with pytest.raises(StoreError, match="read-only"):
        opened.write_text(**data["text"])
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing.zarr")


# ---- write-time refusal and verify ---------------------------------------------------------


def test_write_shard_refuses_bad_values(tmp_path):
    store, data = build_store(tmp_path, finalize=False)
    d = {k: v[..., 0:4, :, :] if k == "vision" else v[0:4] for k, v in data["train"].items()}
    cases = {
        "non-finite": {"vision": d["vision"].index_fill(1, torch.tensor([2]), float("nan"))},
        "labels out of range": {"labels": torch.tensor([0, 1, 3, 0])},
        "not permutations": {"zeroshot_rank": torch.zeros(4, 3, dtype=torch.long)},
    }
    for message, bad in cases.items():
        with pytest.raises(CorruptStore, match=message):
            store.write_shard("train", 0, **{**d, **bad})
    with pytest.raises(ValueError, match="expected shape"):
        store.write_shard("train", 0, **{**d, "labels": d["labels"][:3]})


def shard_file(store: FeatureStore, array: str, block: tuple) -> Path:
    arr = zarr.open_group(str(store.path), mode="r")[array]
    return store.path / array / arr.metadata.encode_chunk_key(block)


def test_verify_names_corrupted_chunk(tmp_path):
    store, _ = build_store(tmp_path, rows_per_shard=4)
    path = shard_file(store, "train/vision", (1, 0, 0, 0))  # view 1, rows 0..3
    raw = bytearray(path.read_bytes())
    raw[2:6] = b"\xff\xff\xff\xff"  # inside the first inner chunk (row 0; 24 bytes + crc)
    path.write_bytes(bytes(raw))
    labels = shard_file(store, "test/labels", (1,))
    labels.write_bytes(b"garbage")
    problems = FeatureStore.open(store.path).verify()
    assert any(p.startswith("train/vision") and "(1, 0, 0, 0)" in p and "decoded" in p
               for p in problems), problems
    assert any(p.startswith("test/labels") and "(1,)" in p for p in problems), problems
    with pytest.raises(CorruptStore, match="skipcache verify"):
        list(store.iter_batches("train", 4, view=1))


def test_verify_finds_nan_written_around_the_check_and_missing_files(tmp_path):
    store, _ = build_store(tmp_path)
    group = zarr.open_group(str(store.path), mode="r+")
    group["train/vision"][0, 5, 1, 2] = np.nan
    group["test/zeroshot_logits"][6, 0] = np.inf
    shard_file(store, "test/zeroshot_rank", (0, 0)).unlink()
    problems = FeatureStore.open(store.path).verify()
    assert any(p.startswith("train/vision") and "(0, 5, 0, 0)" in p and "non-finite" in p
               for p in problems), problems
    assert any(p.startswith("test/zeroshot_logits") and "[6]" in p for p in problems), problems
    assert any(p.startswith("test/zeroshot_rank") and "missing" in p for p in problems), problems


def test_verify_reports_unwritten_shards(tmp_path):
    splits = default_splits()
    key = make_key()
    store = FeatureStore.create_or_resume(store_path(tmp_path, key), key, text_shape=TEXT_SHAPE,
                                          embed_dim=EMBED_DIM, splits=splits,
                                          storage_dtype="float32", rows_per_shard=4)
    write_shards(store, make_data(splits), "train", [0])
    problems = store.verify()
    assert any(p.startswith("train:") and "2 of 3 shards" in p for p in problems), problems
    assert any(p.startswith("text:") for p in problems)


def test_extra_attrs_and_read_split_without_vision(tmp_path):
    key, splits = make_key(), default_splits()
    kw = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=splits, storage_dtype="float16")
    with pytest.raises(ValueError, match="reserved"):
        FeatureStore.create_or_resume(store_path(tmp_path, key), key, extra_attrs={"complete": 1},
                                      **kw)
    extra = {"notes": "synthetic", "library_versions": {"open_clip": "9.9"}}
    store = FeatureStore.create_or_resume(store_path(tmp_path, key), key, extra_attrs=extra, **kw)
    assert store.attrs["notes"] == "synthetic"
    assert store.attrs["library_versions"]["open_clip"] == "9.9"
    assert "zarr" in store.attrs["library_versions"]
    data = make_data(splits)
    store.write_text(**data["text"])
    for split in ("train", "test"):
        write_shards(store, data, split, store.pending_shards(split))
    store.finalize()
    got = store.read_split("test", include_vision=False)
    assert "vision" not in got and torch.equal(got["labels"], data["test"]["labels"])


# ---- summary and listing -------------------------------------------------------------------


def test_summary_reports_sizes_and_zero_shot_accuracy(tmp_path):
    splits = default_splits()
    data = make_data(splits)
    labels = data["test"]["labels"]
    logits = torch.nn.functional.one_hot(labels, 5).float()
    logits[:3] = torch.nn.functional.one_hot((labels[:3] + 1) % 5, 5).float()  # 3 wrong of 7
    data["test"]["zeroshot_logits"] = logits
    order = logits.argsort(dim=1, descending=True, stable=True)
    data["test"]["zeroshot_rank"] = order.argsort(dim=1)
    store, _ = build_store(tmp_path, splits=splits, data=data)
    summary = store.summary()
    assert summary["splits"]["test"]["zeroshot_acc_pct"] == pytest.approx(100 * 4 / 7)  # percent, as eval reports
    assert summary["zeroshot_acc_pct"]["test"] == pytest.approx(100 * 4 / 7)
    assert summary["splits"]["train"]["views"] == 2 and summary["complete"] is True
    assert summary["size_mib"] == pytest.approx(store.disk_size_mib())
    assert summary["splits"]["train"]["arrays_mib"]["vision"] > 0
    json.dumps(summary)  # printable as JSON


def test_list_and_find_stores(tmp_path):
    older, _ = build_store(tmp_path, key=make_key(omega=2))
    newer, _ = build_store(tmp_path, key=make_key(omega=2, template="b"))
    other, _ = build_store(tmp_path, key=make_key(omega=4, dataset="other"))
    key = make_key(omega=2, template="c")
    partial = FeatureStore.create_or_resume(store_path(tmp_path, key), key, text_shape=TEXT_SHAPE,
                                            embed_dim=EMBED_DIM, splits=default_splits(),
                                            storage_dtype="float16")
    entries = {e["path"]: e for e in list_stores(tmp_path)}
    assert set(entries) == {older.path, newer.path, other.path, partial.path}
    assert entries[partial.path]["complete"] is False and entries[older.path]["complete"] is True
    assert entries[other.path]["dataset"] == "other" and entries[other.path]["omega"] == 4
    assert entries[older.path]["key_hash"] == older.key_hash and entries[older.path]["size_mib"] > 0
    assert find_stores(tmp_path, dataset="toy", omega=2) == [newer.path, older.path]
    assert find_stores(tmp_path, dataset="toy", complete_only=False)[0] == partial.path
    assert find_stores(tmp_path, model="nope") == []
    assert list_stores(tmp_path / "empty") == []


# ---- golden fixture ------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def test_schema_v1_fixture_still_reads():
    spec = importlib.util.spec_from_file_location("make_store_v1", FIXTURES / "make_store_v1.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    (path,) = find_stores(FIXTURES / "store_v1")
    store = FeatureStore.open(path)
    assert store.key == maker.KEY and store.key_hash == key_hash(maker.KEY)
    assert store.storage_dtype == "bfloat16" and store.attrs["schema_version"] == 1
    assert store.verify() == []
    expected = maker.expected_values()
    text = store.read_text(dtype=None)
    assert torch.equal(text["tokens"], expected["text"]["tokens"])
    assert torch.equal(text["eot"], expected["text"]["eot"])
    assert text["classnames"] == expected["text"]["classnames"]
    for split in ("train", "test"):
        got = store.read_split(split, dtype=None)
        for name, value in expected[split].items():
            same = got[name] == value if name == "source_ids" else torch.equal(got[name], value)
            assert same, name
