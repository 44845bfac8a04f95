"""The feature store against hostile or unlucky input.

Missing or unreadable chunks, edited metadata, key values that look like paths, two writers on
one key, a full disk, a read-only or file store root, and the built-in model configs that
`import skipcache` registers with open_clip. Every failure must be one `StoreError` line that
says how to fix it, and must leave a store that the same command resumes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
import zarr.storage
from test_store import (
    EMBED_DIM,
    TEXT_SHAPE,
    assert_roundtrip,
    build_store,
    default_splits,
    make_data,
    make_key,
    shard_file,
    write_shards,
)
from typer.testing import CliRunner

from skipcache.errors import CorruptStore, IncompleteStore, StoreError
from skipcache.store import FeatureStore, key_hash, list_stores, store_path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
KW = dict(text_shape=TEXT_SHAPE, embed_dim=EMBED_DIM, splits=default_splits(),
          storage_dtype="float16", rows_per_shard=4)


def edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def flip_byte(path: Path, at: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---- missing and unreadable chunks -----------------------------------------------------------
# rows_per_shard 4: train has 10 rows (3 shards) and 2 views, test has 7 rows (2 shards).

READS = {
    "read_text": lambda s: s.read_text(),
    "read_split train": lambda s: s.read_split("train"),
    "read_split test": lambda s: s.read_split("test"),
    "iter_batches train view 1": lambda s: list(s.iter_batches("train", 3, view=1)),
    "iter_batches test": lambda s: list(s.iter_batches("test", 3, shuffle=False)),
    "read_source_ids test": lambda s: s.read_source_ids("test"),
    "summary": lambda s: s.summary(),
    "pending_shards train": lambda s: s.pending_shards("train"),
}

# array, chunk (shard) index, the reads that must refuse to return its fill values
MISSING = [
    ("train/vision", (1, 2, 0, 0), ["read_split train", "iter_batches train view 1"]),
    ("test/vision", (0, 1, 0, 0), ["read_split test", "iter_batches test"]),
    ("train/labels", (1,), ["read_split train", "iter_batches train view 1"]),
    ("test/labels", (0,), ["read_split test", "iter_batches test", "summary"]),
    ("test/zeroshot_logits", (1, 0), ["read_split test", "iter_batches test", "summary"]),
    ("train/zeroshot_rank", (2, 0), ["read_split train", "iter_batches train view 1"]),
    ("test/source_ids", (1,), ["read_split test", "read_source_ids test"]),
    ("text/tokens", (0, 0, 0), ["read_text"]),
    ("text/eot", (0,), ["read_text"]),
    ("text/prototypes", (0, 0), ["read_text"]),
    ("train/done", (1,), ["pending_shards train", "summary"]),
]


@pytest.mark.parametrize(("array", "block", "reads"), MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_chunk_of_a_complete_store_is_never_read_as_fill_values(tmp_path, array, block,
                                                                          reads):
    store, data = build_store(tmp_path, rows_per_shard=4)
    shard_file(store, array, block).unlink()
    store = FeatureStore.open(store.path)
    for name in reads:
        with pytest.raises(CorruptStore) as caught:
            READS[name](store)
        message = str(caught.value)
        assert array in message and str(block) in message, (name, message)
        assert "--force" in message and "\n" not in message, (name, message)
    assert any(p.startswith(array) and "missing" in p for p in store.verify())
    for name in set(READS) - set(reads) - {"summary"}:
        READS[name](store)  # other arrays still read


def test_a_chunk_replaced_by_a_directory_is_refused_too(tmp_path):
    store, _ = build_store(tmp_path)
    path = shard_file(store, "test/labels", (1,))
    path.unlink()
    path.mkdir()  # zarr reads this as "no chunk", i.e. fill values
    store = FeatureStore.open(store.path)
    with pytest.raises(CorruptStore, match=r"test/labels.*\(1,\)"):
        store.read_split("test", include_vision=False)
    assert any(p.startswith("test/labels") for p in store.verify())


def test_corrupt_labels_with_a_valid_checksum_are_refused_on_read(tmp_path):
    store, _ = build_store(tmp_path)
    zarr.open_group(str(store.path), mode="r+")["train/labels"][4:8] = 7  # 3 classes
    with pytest.raises(CorruptStore, match=r"train/labels.*range"):
        list(FeatureStore.open(store.path).iter_batches("train", 4))


def test_unwritten_shards_of_an_interrupted_store_are_not_read_as_data(tmp_path):
    store, data = build_store(tmp_path, finalize=False)
    shard_file(store, "train/labels", (2,)).unlink()
    store.close()
    partial = FeatureStore.open(store.path, allow_incomplete=True)
    assert partial.pending_shards("train") == []
    with pytest.raises(StoreError, match=r"train/labels.*\(2,\)"):
        partial.read_split("train")
    key = make_key(omega=5)
    fresh = FeatureStore.create_or_resume(store_path(tmp_path, key), key, **KW)
    fresh.close()
    fresh = FeatureStore.open(fresh.path, allow_incomplete=True)
    assert fresh.pending_shards("train") == [0, 1, 2]  # never written: not done, no error
    with pytest.raises(IncompleteStore, match="not written"):
        fresh.read_split("test")


# ---- structure checked on open ---------------------------------------------------------------


def set_array_meta(field: str, value):
    def edit(meta):
        meta[field] = value
    return edit


STRUCTURE = {
    "vision shape": ("train/vision", set_array_meta("shape", [2, 8, 3, 4])),
    "labels shape": ("test/labels", set_array_meta("shape", [6])),
    "tokens shape": ("text/tokens", set_array_meta("shape", [5, 3, 5])),
    "classes shape": ("train/classes", set_array_meta("shape", [2])),
    "logits dtype": ("test/zeroshot_logits", set_array_meta("data_type", "float64")),
    "rank dtype": ("train/zeroshot_rank", set_array_meta("data_type", "int8")),
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_array_metadata_that_disagrees_with_the_attributes_is_refused_on_open(tmp_path, case):
    array, edit = STRUCTURE[case]
    store, _ = build_store(tmp_path)
    edit_json(store.path / array / "zarr.json", edit)
    with pytest.raises(CorruptStore, match=f"{array}.*--force") as caught:
        FeatureStore.open(store.path)
    assert "\n" not in str(caught.value)


def test_a_missing_array_is_refused_on_open(tmp_path):
    store, _ = build_store(tmp_path)
    shutil.rmtree(store.path / "train" / "zeroshot_rank")
    with pytest.raises(CorruptStore, match="train/zeroshot_rank.*missing"):
        FeatureStore.open(store.path)


ROOT_ATTRS = {
    "key removed": lambda a: a.pop("key"),
    "splits removed": lambda a: a.pop("splits"),
    "key_hash removed": lambda a: a.pop("key_hash"),
    "rows_per_shard a string": lambda a: a.update(rows_per_shard="4"),
    "rows_per_shard zero": lambda a: a.update(rows_per_shard=0),
    "unknown storage dtype": lambda a: a.update(storage_dtype="float64"),
    "key without omega": lambda a: a["key"].pop("omega"),
    "n_shards wrong": lambda a: a["splits"]["train"].update(n_shards=2),
    "tokens_shape of two": lambda a: a["text"].update(tokens_shape=[5, 3]),
    "split name with a path": lambda a: a["splits"].update({"../../x": a["splits"].pop("test")}),
    "split is not an object": lambda a: a["splits"].update(test=3),
}


@pytest.mark.parametrize("case", list(ROOT_ATTRS))
def test_missing_or_malformed_root_attributes_are_one_line(tmp_path, case):
    store, _ = build_store(tmp_path)
    edit_json(store.path / "zarr.json", lambda meta: ROOT_ATTRS[case](meta["attributes"]))
    with pytest.raises(CorruptStore) as caught:
        FeatureStore.open(store.path)
    message = str(caught.value)
    assert str(store.path) in message and "--force" in message and "\n" not in message
    entries = list_stores(tmp_path)  # listing still works
    assert [e["path"] for e in entries] == [store.path]


def test_text_classnames_must_match_the_classes(tmp_path):
    store, _ = build_store(tmp_path)
    edit_json(store.path / "text" / "zarr.json",
              lambda meta: meta["attributes"].update(classnames=["only one"]))
    with pytest.raises(CorruptStore, match="classnames"):
        FeatureStore.open(store.path)


def test_key_hash_is_checked_against_the_key_and_the_directory_name(tmp_path):
    store, _ = build_store(tmp_path)
    edit_json(store.path / "zarr.json", lambda m: m["attributes"]["key"].update(views=3))
    with pytest.raises(CorruptStore, match="key hash"):
        FeatureStore.open(store.path)

    def consistent_edit(meta):  # key and key_hash edited together: the name no longer fits
        meta["attributes"]["key"]["views"] = 3
        meta["attributes"]["key_hash"] = key_hash(meta["attributes"]["key"])

    edit_json(store.path / "zarr.json", consistent_edit)
    with pytest.raises(CorruptStore, match="directory name"):
        FeatureStore.open(store.path)


def test_a_flipped_byte_in_the_classes_chunk_is_refused_on_open(tmp_path):
    store, _ = build_store(tmp_path)
    flip_byte(shard_file(store, "train/classes", (0,)), 3)
    with pytest.raises(CorruptStore, match=r"train/classes.*\(0,\).*--force"):
        FeatureStore.open(store.path)


def test_class_indices_outside_the_text_classes_are_refused_on_open(tmp_path):
    store, _ = build_store(tmp_path)
    zarr.open_group(str(store.path), mode="r+")["train/classes"][...] = [0, 2, 9]
    with pytest.raises(CorruptStore, match=r"train/classes.*outside \[0, 5\)"):
        FeatureStore.open(store.path)


# ---- key values are never paths ------------------------------------------------------------

HOSTILE = ["x/../../escape", "..", ".", "", "/abs/path", "a\x00b", "back\\slash", "new\nline",
           "é" * 200, "ok-name_1.2"]


def test_safe_component_gives_one_harmless_path_component():
    from skipcache.store_layout import safe_component

    for value in HOSTILE:
        part = safe_component(value)
        assert part not in ("", ".", "..") and len(part.encode()) <= 255, value
        assert not any(c in part for c in "/\\\x00\n"), (value, part)
    assert safe_component("ok-name_1.2") == "ok-name_1.2"
    assert safe_component("oxford/pets") == "oxford_pets"  # the scheme of existing stores
    assert safe_component(6) == "6"
    assert safe_component("é" * 200) != safe_component("é" * 201)  # long names stay distinct


def test_confined_path_stays_under_its_root(tmp_path):
    from skipcache.store_layout import confined_path

    for value in HOSTILE:
        path = confined_path(tmp_path, value, "run")
        assert path.parent.parent == tmp_path and path.name == "run", (value, path)


@pytest.mark.parametrize("field", ["dataset", "model", "pretrained_label", "omega"])
def test_hostile_key_values_make_a_store_under_the_root(tmp_path, field):
    root = tmp_path / "root"
    for value in HOSTILE:
        key = make_key(**{field: value})
        path = store_path(root, key)
        assert len(path.relative_to(root).parts) == 3 and ".." not in path.parts, (value, path)
    key = make_key(**{field: "x/../../\x00escape"})
    store, data = build_store(root, key=key)
    assert store.path.resolve().is_relative_to(root.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert FeatureStore.open(store.path).key == key
    assert [e["path"] for e in list_stores(root)] == [store.path]


# ---- two writers on one key ------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_store import *
root, go = Path(sys.argv[1]), Path(sys.argv[2])
splits, key = default_splits(), make_key()
data = make_data(splits)
store = FeatureStore.create_or_resume(store_path(root, key), key, text_shape=TEXT_SHAPE,
    embed_dim=EMBED_DIM, splits=splits, storage_dtype="float16", rows_per_shard=4)
print("locked", flush=True)
while not go.exists():
    time.sleep(0.02)
store.write_text(**data["text"])
for spec in splits:
    write_shards(store, data, spec.name, store.pending_shards(spec.name))
store.finalize()
print("done", flush=True)
time.sleep(0.5)
""".format(tests=str(TESTS))


def start_writer(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "root"), str(go)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "locked\n", line
    return proc, go


class TouchWhenWaiting(logging.Handler):
    """Lets the lock holder go on once the second writer says that it waits."""

    def __init__(self, go: Path) -> None:
        super().__init__(logging.WARNING)
        self.go, self.messages = go, []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())
        if "waiting" in record.getMessage():
            self.go.touch()


def no_strays(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".partial", ".lock", ".creating"))]


def test_a_second_writer_waits_for_the_first_and_reuses_its_store(tmp_path):
    proc, go = start_writer(tmp_path)
    root, key = tmp_path / "root", make_key()
    log, handler = logging.getLogger("skipcache.store"), TouchWhenWaiting(go)
    try:
        with pytest.raises(StoreError, match=rf"another `skipcache cache` \(pid {proc.pid}\)"):
            FeatureStore.create_or_resume(store_path(root, key), key, lock_timeout_s=0.3, **KW)
        log.addHandler(handler)
        store = FeatureStore.create_or_resume(store_path(root, key), key, reuse_complete=True,
                                              lock_timeout_s=120, **KW)
        assert store.complete and store.path == store_path(root, key)
        assert any(f"pid {proc.pid}" in m for m in handler.messages), handler.messages
        assert proc.stdout.readline() == "done\n"
    finally:
        log.removeHandler(handler)
        go.touch()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert no_strays(root) == [] and store.verify() == []


def test_the_lock_of_a_killed_writer_does_not_block(tmp_path):
    proc, _ = start_writer(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    root, key = tmp_path / "root", make_key()
    store = FeatureStore.create_or_resume(store_path(root, key), key, lock_timeout_s=5, **KW)
    assert store.pending_shards("train") == [0, 1, 2]  # resumes what the dead one laid out
    data = make_data(default_splits())
    store.write_text(**data["text"])
    for split in ("train", "test"):
        write_shards(store, data, split, store.pending_shards(split))
    store.finalize()
    assert no_strays(root) == []


def test_a_writer_abandoned_in_this_process_does_not_block_a_new_one(tmp_path):
    key = make_key()
    first = FeatureStore.create_or_resume(store_path(tmp_path, key), key, **KW)
    keep = [first]  # still referenced: its lock is not released by garbage collection
    second = FeatureStore.create_or_resume(store_path(tmp_path, key), key, lock_timeout_s=5,
                                           **KW)
    assert second.pending_shards("train") == [0, 1, 2] and keep


def test_the_cache_stage_waits_for_another_writer_then_reuses_its_store(tmp_path):
    from skipcache.stages.cache import CacheConfig, run_cache

    cfg = CacheConfig(dataset="synthetic", dataset_options={"num_classes": 4}, model="tiny",
                      pretrained="none", omega=2, shots=1, root=tmp_path / "store",
                      device="cpu", progress=False)
    first = run_cache(cfg)
    backup = tmp_path / "backup.zarr"
    first.path.rename(backup)
    holder = (
        "import sys, time\nfrom pathlib import Path\nfrom skipcache.store import lock_store\n"
        "path, backup, go = map(Path, sys.argv[1:])\n"
        "with lock_store(path):\n"
        "    print('locked', flush=True)\n"
        "    while not go.exists():\n        time.sleep(0.02)\n"
        "    backup.rename(path)  # as if this process had just finished the store\n"
    )
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(first.path), str(backup), str(go)],
                            stdout=subprocess.PIPE, text=True)
    log, handler = logging.getLogger("skipcache.store"), TouchWhenWaiting(go)
    log.addHandler(handler)
    try:
        assert proc.stdout.readline() == "locked\n"
        second = run_cache(cfg)
    finally:
        log.removeHandler(handler)
        go.touch()
        proc.wait(timeout=60)
    assert second.reused and second.path == first.path and second.zeroshot_acc == first.zeroshot_acc
    assert go.exists() and no_strays(tmp_path / "store") == []


# ---- full disk, read-only root, a file as root -----------------------------------------------


def fail_writes(monkeypatch, when, err: int = errno.ENOSPC) -> None:
    """Make zarr's writes of keys for which `when(key)` holds fail with `err`."""
    original = zarr.storage.LocalStore.set

    async def set(self, key, value):
        if when(key):
            raise OSError(err, os.strerror(err), str(self.root / key))
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set)


def finish(path: Path, key: dict, data: dict) -> FeatureStore:
    """What rerunning the same cache command does: resume and write what is missing."""
    store = FeatureStore.create_or_resume(path, key, **KW)
    if not store.has_text():
        store.write_text(**data["text"])
    for split in ("train", "test"):
        write_shards(store, data, split, store.pending_shards(split))
    store.finalize()
    return store


# phase -> which zarr key fails
PHASES = {
    "create": lambda k: k.startswith("test/"),
    "text": lambda k: k.startswith("text/prototypes/c"),
    "shard": lambda k: k.startswith("train/labels/c/1"),
    "done flag": lambda k: k == "test/done/c/1",
    "finalize": lambda k: k == "zarr.json",
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_full_disk_is_one_line_and_the_store_resumes(tmp_path, monkeypatch, phase):
    key, data = make_key(), make_data(default_splits())
    path = store_path(tmp_path, key)
    with monkeypatch.context() as patch:
        if phase != "create":
            store = FeatureStore.create_or_resume(path, key, **KW)
        fail_writes(patch, PHASES[phase])
        with pytest.raises(StoreError, match="no space left.*rerun") as caught:
            store = FeatureStore.create_or_resume(path, key, **KW)
            store.write_text(**data["text"])
            for split in ("train", "test"):
                write_shards(store, data, split, store.pending_shards(split))
            store.finalize()
        assert "\n" not in str(caught.value)
    assert not path.exists()
    store = finish(path, key, data)
    assert store.complete and store.verify() == [] and no_strays(tmp_path) == []
    assert_roundtrip(FeatureStore.open(path), data)


def read_only(monkeypatch, root: Path) -> None:
    """Make `root` read-only: chmod where permissions are enforced, else refuse writes under it."""
    if os.geteuid() != 0:
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                p.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return
    fail_writes(monkeypatch, lambda k: True, errno.EACCES)
    real_mkdir, real_open = Path.mkdir, os.open

    def mkdir(self, *args, **kwargs):
        if Path(self).is_relative_to(root) and not Path(self).is_dir():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).is_relative_to(root) and not Path(path).exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)


def writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)


def test_a_read_only_store_root_is_one_line_and_the_store_resumes(tmp_path, monkeypatch):
    root, key, data = tmp_path / "root", make_key(), make_data(default_splits())
    path = store_path(root, key)
    store = FeatureStore.create_or_resume(path, key, **KW)
    store.write_text(**data["text"])
    write_shards(store, data, "train", [0])
    store.close()
    with monkeypatch.context() as patch:
        read_only(patch, root)
        try:
            with pytest.raises(StoreError, match="permission denied.*--root") as caught:
                store = FeatureStore.create_or_resume(path, key, **KW)
                write_shards(store, data, "train", store.pending_shards("train"))
            assert "\n" not in str(caught.value)
            other = make_key(omega=7)
            with pytest.raises(StoreError, match="permission denied.*--root"):
                FeatureStore.create_or_resume(store_path(root, other), other, **KW)
        finally:
            writable(root)
    store = finish(path, key, data)
    assert store.verify() == [] and no_strays(root) == []


@pytest.mark.parametrize("which", ["root", "dataset folder"])
def test_a_file_where_the_store_root_should_be_is_one_line(tmp_path, which):
    root, key = tmp_path / "root", make_key()
    if which == "root":
        root.write_text("not a folder")
        where = root
    else:
        root.mkdir()
        where = root / key["dataset"]
        where.write_text("not a folder")
    with pytest.raises(StoreError, match=f"{where} is not a directory") as caught:
        FeatureStore.create_or_resume(store_path(root, key), key, **KW)
    assert "\n" not in str(caught.value)
    assert list_stores(root) == []


# ---- the command line: one line, never a traceback -------------------------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """A small complete store of the tiny model and a 1-epoch run on it."""
    from skipcache.stages.cache import CacheConfig, run_cache
    from skipcache.stages.tune import TuneConfig, run_tune

    base = tmp_path_factory.mktemp("real")
    cached = run_cache(CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 6}, model="tiny", pretrained="none",
        omega=3, shots=2, root=base / "store", device="cpu", progress=False))
    tuned = run_tune(TuneConfig(store=cached.path, out=base / "run", epochs=1, warmup_epochs=0,
                                device="cpu", progress=False))
    return {"store": cached.path, "root": base / "store", "run": tuned.run_dir}


def copy_store(real_store, tmp_path: Path) -> Path:
    path = tmp_path / real_store["store"].relative_to(real_store["root"])
    shutil.copytree(real_store["store"], path)
    return path


def delete_chunk(array: str, block: tuple):
    def damage(path: Path) -> None:
        arr = zarr.open_group(str(path), mode="r")[array]
        (path / array / arr.metadata.encode_chunk_key(block)).unlink()
    return damage


def flip_chunk(array: str, block: tuple):
    def damage(path: Path) -> None:
        arr = zarr.open_group(str(path), mode="r")[array]
        flip_byte(path / array / arr.metadata.encode_chunk_key(block), 2)
    return damage


def drop_key(path: Path) -> None:
    edit_json(path / "zarr.json", lambda m: m["attributes"].pop("key"))


def shrink_train_vision(path: Path) -> None:
    edit_json(path / "train" / "vision" / "zarr.json", lambda m: m.update(shape=[1, 3, 17, 32]))


ALL = {"inspect", "tune", "eval"}
# damage, what the message names, the commands besides `verify` that read the damaged part
DAMAGE = {
    "flipped byte in train/classes": (flip_chunk("train/classes", (0,)), "train/classes", ALL),
    "missing train/labels chunk": (delete_chunk("train/labels", (0,)), "train/labels",
                                   {"inspect", "tune"}),
    "missing train/vision shard": (delete_chunk("train/vision", (0, 0, 0, 0)), "train/vision",
                                   {"tune"}),
    "missing test_new/vision shard": (delete_chunk("test_new/vision", (0, 0, 0, 0)),
                                      "test_new/vision", {"eval"}),
    "missing test_base/zeroshot_logits chunk": (delete_chunk("test_base/zeroshot_logits", (0, 0)),
                                                "test_base/zeroshot_logits", {"inspect", "eval"}),
    "key attribute removed": (drop_key, "key", ALL),
    "train/vision shape edited": (shrink_train_vision, "train/vision", ALL),
}

runner = CliRunner()


def invoke(*args):
    from skipcache.cli import app

    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, names: str) -> None:
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.exit_code == 1, result.output
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and names in result.stderr, result.stderr


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_one_line_in_verify_inspect_tune_and_eval(tmp_path, real_store, case):
    damage, names, commands = DAMAGE[case]
    path = copy_store(real_store, tmp_path)
    damage(path)
    assert_one_line_error(invoke("verify", path), names)
    if "inspect" in commands:
        assert_one_line_error(invoke("inspect", path), names)
    else:
        assert invoke("inspect", path).exit_code == 0
    if "tune" in commands:
        assert_one_line_error(invoke("tune", path, "--epochs", "1", "--warmup-epochs", "0",
                                     "--device", "cpu", "--out", tmp_path / "run"), names)
    if "eval" in commands:
        assert_one_line_error(invoke("eval", real_store["run"], "--store", path, "--device",
                                     "cpu"), names)


# ---- model configs registered on import ------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_import_skipcache_registers_the_builtin_model_configs_in_a_fresh_process(tmp_path):
    weights = tmp_path / "X.safetensors"
    code = (
        "import sys, skipcache\n"
        "assert 'open_clip' not in sys.modules and 'torch' not in sys.modules, 'import is heavy'\n"
        "import open_clip\n"
        "assert {'tiny', 'synth-vit'} <= set(open_clip.list_models())\n"
        "open_clip.create_model('tiny')\n"
        "from safetensors.torch import save_file\n"
        f"save_file(open_clip.create_model('synth-vit').state_dict(), {str(weights)!r})\n"
        f"open_clip.create_model('synth-vit', pretrained={str(weights)!r})\n"
        "print('ok')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-2000:]


def test_configs_are_registered_when_open_clip_came_first_or_is_absent():
    proc = run_python("import open_clip, skipcache\nopen_clip.create_model('synth-vit')\n"
                      "print(open_clip.list_models().count('tiny'))")
    assert proc.returncode == 0 and proc.stdout == "1\n", proc.stderr[-2000:]
    proc = run_python("import sys\nsys.modules['open_clip'] = None\nimport skipcache\n"
                      "print(skipcache.__version__)")
    assert proc.returncode == 0 and proc.stdout.strip() == "0.1.0", proc.stderr[-2000:]
