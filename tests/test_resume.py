"""Interrupted work resumes to the same bytes: a killed `cache` and a killed `tune`.

Each test kills a real `skipcache` process with SIGKILL (no cleanup handler runs), reruns the same
command, and compares the result with an uninterrupted twin built in another directory.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import skipcache
from skipcache.errors import StoreKeyMismatch
from skipcache.rundir import read_checkpoint
from skipcache.store import FeatureStore, SplitSpec, key_hash, store_path
from skipcache.store_layout import SPLIT_ARRAYS

SKIPCACHE_BIN = Path(sys.executable).with_name("skipcache")


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(SKIPCACHE_BIN), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` is true; fail if it exits first or never gets there."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before it could be killed mid-way:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the process to reach the kill point")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the process finished before the kill landed"


def _array_bytes(store: FeatureStore, name: str):
    """(dtype, shape, content) of one array, exact: raw bytes for numbers, the strings for strings."""
    a = store.array(name)[...]
    content = a.tolist() if a.dtype.kind in "OTU" else a.tobytes()
    return str(a.dtype), a.shape, content


# --------------------------------------------------------------------------------- cache resume

# 10 classes x 100 test images: ~1000 images, many shards (64 rows each); the kill comes after
# the first one, long before the end, even on a fast machine.
CACHE_ARGS = ["cache", "--dataset", "synthetic", "-o", "num_classes=10", "-o", "test_per_class=100",
              "--model", "tiny", "--pretrained", "none", "--omega", "2", "--shots", "0",
              "--batch-size", "8", "--device", "cpu", "--json"]


@pytest.mark.slow
def test_killed_cache_resumes_to_the_same_bytes_as_an_uninterrupted_run(tmp_path):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"

    proc = _start([*CACHE_ARGS, "--root", killed_root], cwd=tmp_path)
    # A shard's done flag is its own chunk file, written after the shard's data.
    _kill_when(proc, lambda: any(killed_root.glob("*/*/*.zarr.partial/*/done/c/*")))
    partials = list(killed_root.glob("*/*/*.zarr.partial"))
    assert len(partials) == 1 and not list(killed_root.glob("*/*/*.zarr"))
    interrupted = FeatureStore.open(partials[0], allow_incomplete=True)
    pending = {s: interrupted.pending_shards(s) for s in interrupted.split_names}
    total = {s: interrupted.n_shards(s) for s in interrupted.split_names}
    assert 0 < sum(map(len, pending.values())) < sum(total.values()), (pending, total)

    resumed = subprocess.run([str(SKIPCACHE_BIN), *map(str, CACHE_ARGS), "--root", killed_root], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["reused"] is False
    # Only the shards left pending were computed this time.
    assert result["images_per_s"] > 0

    clean = skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 10, "test_per_class": 100}, model="tiny",
        pretrained="none", omega=2, shots=None, batch_size=8, device="cpu", root=clean_root, progress=False))

    a, b = FeatureStore.open(Path(result["path"])), FeatureStore.open(clean.path)
    assert a.path.relative_to(killed_root) == b.path.relative_to(clean_root)  # same key, same place
    assert a.complete and b.complete and not list(killed_root.glob("*/*/*.partial"))
    assert a.key == b.key and a.attrs["splits"] == b.attrs["splits"] and a.attrs["text"] == b.attrs["text"]
    names = ["text/tokens", "text/eot", "text/prototypes"] + [f"{s}/{x}" for s in b.split_names for x in SPLIT_ARRAYS]
    for name in names:
        assert _array_bytes(a, name) == _array_bytes(b, name), f"{name} differs after resume"
    assert a.read_text()["classnames"] == b.read_text()["classnames"]
    assert a.verify() == []


def test_a_partial_store_of_another_key_is_never_mixed_in(tmp_path):
    key = {"dataset": "synthetic", "model": "tiny", "pretrained_label": "none", "omega": 2}
    path = store_path(tmp_path, key)
    layout = dict(text_shape=(4, 3, 8), embed_dim=8, storage_dtype="float16",
                  splits=[SplitSpec("train", n=5, views=1, classes=[0, 1], vision_shape=(2, 8))])
    first = FeatureStore.create_or_resume(path, key, **layout)
    partial = first.path
    assert partial.name.endswith(".partial")
    other = {**key, "seed": 2}  # e.g. the store directory was renamed or copied by hand
    with pytest.raises(StoreKeyMismatch) as info:
        FeatureStore.create_or_resume(path, other, **layout)
    assert str(info.value) == (
        f"interrupted store {partial} was built for key hash {first.key_hash}, not {key_hash(other)}; "
        f"pass --force to rebuild it, or delete {partial}")
    # Same key, other layout: also refused.
    with pytest.raises(StoreKeyMismatch, match=r"same key but another layout \(storage_dtype: float16 stored, float32 wanted\)"):
        FeatureStore.create_or_resume(path, key, **{**layout, "storage_dtype": "float32"})
    # The interrupted store was left as it was, and still resumes under its own key.
    assert FeatureStore.open(partial, allow_incomplete=True).key == key
    assert FeatureStore.create_or_resume(path, key, **layout).key_hash == first.key_hash


# ---------------------------------------------------------------------------------- tune resume


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    """400 training rows (5 base classes x 80): 100 steps of 4 per epoch, about a second each."""
    cached = skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 10, "train_per_class": 80, "test_per_class": 2},
        model="tiny", pretrained="none", omega=3, shots=None, device="cpu", progress=False,
        root=tmp_path_factory.mktemp("train_store")))
    return cached.path


TUNE = dict(epochs=3, batch_size=4, lr=1e-2, warmup_epochs=1, seed=3)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_utc"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_tune_resumes_to_the_same_weights(tmp_path, train_store):
    clean = skipcache.tune(skipcache.TuneConfig(store=train_store, out=tmp_path / "clean", device="cpu",
                                                progress=False, **TUNE))
    killed = tmp_path / "killed"
    args = ["tune", train_store, "--out", killed, "--device", "cpu", "--json",
            "--epochs", TUNE["epochs"], "--batch-size", TUNE["batch_size"], "--lr", TUNE["lr"],
            "--warmup-epochs", TUNE["warmup_epochs"], "--seed", TUNE["seed"], "--checkpoint-every", 0]
    proc = _start(args, cwd=tmp_path)
    # checkpoint.json is the commit point of a checkpoint (written after its tensors file).
    _kill_when(proc, lambda: (killed / "checkpoint.json").exists())
    assert not (killed / "deep.safetensors").exists() and not (killed / "run.json").exists()
    stopped_at = read_checkpoint(killed).epoch
    assert 1 <= stopped_at < TUNE["epochs"]

    skipcache.tune(skipcache.TuneConfig(store=train_store, out=killed, resume=True, device="cpu",
                                                  progress=False, **TUNE))
    info = json.loads((killed / "run.json").read_text())
    steps_per_epoch = info["steps"] // (TUNE["epochs"] - stopped_at)
    assert info["steps"] == (TUNE["epochs"] - stopped_at) * steps_per_epoch  # only the remaining epochs ran
    assert read_checkpoint(killed).epoch == TUNE["epochs"]
    ours, theirs = load_file(killed / "deep.safetensors"), load_file(clean.run_dir / "deep.safetensors")
    assert sorted(ours) == sorted(theirs)
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert changed == [], f"resumed weights differ from the uninterrupted run in {changed[:5]}"
    # The per-epoch log is the same too: one line per epoch, same losses and CSkip statistics.
    assert _metrics(killed) == _metrics(clean.run_dir)
    assert [m["epoch"] for m in _metrics(killed)] == [1, 2, 3]
    # ... and the trained weights are not just the pretrained ones.
    from skipcache.loading import load_deep_model

    start = load_deep_model(FeatureStore.open(train_store), torch.device("cpu")).deep_state_dict()
    assert any(not torch.equal(start[k], ours[k]) for k in ours)


def test_resume_of_a_finished_run_keeps_its_weights(tmp_path, train_store):
    run = skipcache.tune(skipcache.TuneConfig(store=train_store, out=tmp_path / "run", device="cpu", progress=False,
                                              **{**TUNE, "epochs": 1, "warmup_epochs": 0}))
    before = load_file(run.run_dir / "deep.safetensors")
    files = {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.is_file() and p.name != "tune.lock"}
    again = skipcache.tune(skipcache.TuneConfig(store=train_store, out=run.run_dir, resume=True, device="cpu",
                                                progress=False, **{**TUNE, "epochs": 1, "warmup_epochs": 0}))
    after = load_file(again.run_dir / "deep.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.is_file() and p.name != "tune.lock"} == files
    assert again.seconds == run.seconds and again.final == run.final  # the original record, not a re-run
    assert [m["epoch"] for m in _metrics(run.run_dir)] == [1]
