"""The run directory as a format: safe checkpoints, confined paths, resume rules, portable runs.

Every test here was first written against a reproduced defect (see docs/reliability.md, "Run
directories"); the spec is docs/run-format.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

import skipcache
from skipcache.cli import app
from skipcache.errors import RunError, StoreError
from skipcache.store import FeatureStore, key_hash

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()
TUNE = ["--epochs", "1", "--warmup-epochs", "0", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.stdout


def assert_error(result, exit_code: int, message: str | None = None, *, contains: str | None = None) -> str:
    """A user error: exit code, nothing on stdout, one `error: ...` line on stderr, no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    if message is not None:
        assert lines[0] == f"error: {message}"
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


def _cache(root: Path, num_classes: int = 4, omega: int = 5) -> Path:
    return skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": num_classes, "test_per_class": 2}, model="tiny",
        pretrained="none", omega=omega, shots=2, root=root, device="cpu", progress=False)).path


def _tune(store: Path, out: Path, **kwargs):
    settings = dict(epochs=1, warmup_epochs=0, device="cpu", progress=False)
    settings.update(kwargs)
    return skipcache.tune(skipcache.TuneConfig(store=store, out=out, **settings))


def _retag_store(src: Path, dst: Path, **changes) -> Path:
    """A copy of a store whose key (and key hash) has `changes`: metadata someone else wrote."""
    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+")
    key = {**group.attrs["key"], **{k: v for k, v in changes.items() if k != "attrs"}}
    group.attrs.update({"key": key, "key_hash": key_hash(key), **changes.get("attrs", {})})
    return dst


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("rundir_store") / "store")


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """A finished 1-epoch run (do not modify: copy it)."""
    return _tune(store, tmp_path_factory.mktemp("rundir_run") / "run").run_dir


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst, ignore=shutil.ignore_patterns("tune.lock"))
    return dst


# ------------------------------------------------------------ 1. checkpoints never unpickle


class _Payload:
    """Pickles to `open(marker, "w")`: loading it with pickle creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_checkpoint_is_never_loaded(tmp_path, store):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    torch.save(_Payload(marker), run / "checkpoint.pt")
    result = invoke("tune", store, "--out", run, "--resume", *TUNE)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert_error(result, 1, f"run {run} has a checkpoint.pt from an older skipcache; pickle checkpoints are never "
                            "loaded (they can run code); start a new --out")
    # Without --resume too, and the planted file is left alone.
    assert_error(invoke("tune", store, "--out", run, *TUNE), 1, contains="checkpoint.pt from an older skipcache")
    assert not marker.exists() and (run / "checkpoint.pt").exists()


def test_a_checkpoint_is_tensors_and_json_only(tmp_path, store):
    from safetensors import safe_open

    run = _tune(store, tmp_path / "run").run_dir
    manifest = json.loads((run / "checkpoint.json").read_text())
    assert manifest["format_version"] == 1 and manifest["epoch"] == 1 and len(manifest["history"]) == 1
    tensors = run / manifest["tensors"]
    assert tensors.suffix == ".safetensors" and tensors.parent == run
    with safe_open(str(tensors), "pt") as f:
        names = list(f.keys())
        assert f.get_tensor("rng.generator").dtype == torch.uint8
    assert any(n.startswith("deep.") for n in names)
    assert any(n.startswith("optimizer.") and n.endswith(".momentum_buffer") for n in names)
    assert not list(run.glob("*.pt"))


def test_a_tampered_checkpoint_is_refused_in_one_line(tmp_path, store):
    run = tmp_path / "run"
    _tune(store, run, epochs=2)
    (run / "run.json").unlink()  # as if killed after the last checkpoint
    assert_error(invoke("tune", store, "--out", run, *TUNE, "--epochs", "2"), 1,
                 f"run directory {run} holds an unfinished run (checkpoint at epoch 2 of 2); "
                 "pass --resume to continue it or --out for a new run")
    manifest = json.loads((run / "checkpoint.json").read_text())
    tensors = run / manifest["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert_error(invoke("tune", store, "--out", run, "--resume", *TUNE, "--epochs", "2"), 1,
                 f"checkpoint of run {run} is damaged: {tensors.name} does not match the sha256 in checkpoint.json; "
                 f"start a new --out (or delete checkpoint.json to retrain this run from scratch)")
    # A manifest that names a file outside the run is refused before anything is opened.
    manifest["tensors"] = "../elsewhere.safetensors"
    (run / "checkpoint.json").write_text(json.dumps(manifest))
    assert_error(invoke("tune", store, "--out", run, "--resume", *TUNE, "--epochs", "2"), 1,
                 contains="checkpoint.json names tensors file '../elsewhere.safetensors'")


def test_an_out_folder_with_other_files_is_left_alone(tmp_path, store):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert_error(invoke("tune", store, "--out", folder, *TUNE), 1,
                 f"run directory {folder} is not empty and holds no run (no config.json); pass a new or empty folder as --out")
    assert_error(invoke("tune", store, "--out", folder, "--resume", *TUNE), 1,
                 f"nothing to resume in {folder}: it is not a run directory (no config.json); "
                 "pass the --out of a `skipcache tune` run")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# -------------------------------------------------------------- 2. store metadata as paths


def test_default_out_stays_under_runs(tmp_path, store, monkeypatch):
    evil = _retag_store(store, tmp_path / "evil.zarr", dataset="x/../../../escaped")
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    result = _tune(evil, None)
    out = Path(result.run_dir)
    assert out.parent == Path("runs") and "/" not in out.name and out.name not in (".", "..")
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*")), "wrote outside runs/"
    assert sorted(p.name for p in (work / "runs").iterdir()) == [out.name]
    assert "escaped" in out.name and "tiny-omega5-" in out.name


@pytest.fixture(scope="module")
def file_store(tmp_path_factory) -> tuple[Path, Path]:
    """(store, weights file) of a store cached from a weights file: its `pretrained_source` is a path."""
    from safetensors.torch import save_file

    from skipcache.loading import load_model

    base = tmp_path_factory.mktemp("file_store")
    weights = base / "w.safetensors"
    save_file(load_model("tiny", "none", seed=5).model.state_dict(), str(weights))
    store = skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 4, "test_per_class": 2}, model="tiny",
        pretrained=str(weights), omega=5, shots=2, root=base / "store", device="cpu", progress=False)).path
    assert FeatureStore.open(store).attrs["pretrained_source"] == str(weights.resolve())
    return store, weights


def test_store_pretrained_source_is_not_opened_unless_it_is_the_cached_file(tmp_path, file_store, monkeypatch):
    import skipcache.loading as loading

    store, weights = file_store
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"not the weights the store was cached with")
    evil = _retag_store(store, tmp_path / "evil.zarr", attrs={"pretrained_source": str(planted)})
    opened = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name, source, **kw: (opened.append(source), real(name, source, **kw))[1])
    with pytest.raises(StoreError) as info:
        _tune(evil, tmp_path / "run")
    assert opened == [], "a file named by store metadata was opened before its hash was checked"
    assert str(planted) in str(info.value) and "pass the weights it was cached with as --pretrained FILE" in str(info.value)
    # The user's own --pretrained is trusted (and checked against the key after loading).
    assert _tune(evil, tmp_path / "run", pretrained=str(weights)).epochs == 1
    assert opened == [str(weights)]
    # The store's own source, when it is the cached file, is used as it is.
    assert _tune(store, tmp_path / "run2").epochs == 1


@pytest.mark.parametrize("source, model, weights_hash, ok_", [
    ("none", "tiny", "random-seed0", True),
    ("none", "tiny", "open_clip:tiny:openai", False),
    ("openai", "ViT-B-16", "open_clip:ViT-B-16:openai", True),
    ("laion2b", "ViT-B-16", "open_clip:ViT-B-16:openai", False),
    ("synth", "synth-vit", "BUILTIN", True),
    ("synth", "tiny", "BUILTIN", False),
    ("matching.safetensors", "tiny", "FILE", True),
    ("other.safetensors", "tiny", "FILE", False),
    ("weights.txt", "tiny", "FILE", False),  # same bytes, but not a weights file name
    ("folder.pt", "tiny", "FILE", False),
    ("/dev/zero", "tiny", "FILE", False),
    ("../../etc/passwd", "tiny", "FILE", False),
])
def test_weights_source_rules(tmp_path, monkeypatch, source, model, weights_hash, ok_):
    from skipcache.loading import WEIGHTS_DIR, _file_sha256, trusted_weights_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "matching.safetensors").write_bytes(b"weights")
    (tmp_path / "other.safetensors").write_bytes(b"other weights")
    (tmp_path / "weights.txt").write_bytes(b"weights")
    (tmp_path / "folder.pt").mkdir()
    weights_hash = {"FILE": _file_sha256(tmp_path / "matching.safetensors"),
                    "BUILTIN": _file_sha256(WEIGHTS_DIR / "synth-vit.safetensors")}.get(weights_hash, weights_hash)
    key = {"model": model, "weights_hash": weights_hash, "pretrained_label": "x"}
    if ok_:
        assert trusted_weights_source(source, key, origin="store s") == source
    else:
        with pytest.raises(StoreError, match="pass the weights it was cached with as --pretrained FILE"):
            trusted_weights_source(source, key, origin="store s")


def test_eval_on_another_store_writes_inside_the_run(tmp_path, store, finished):
    run = _copy_run(finished, tmp_path / "here")
    evil = _retag_store(store, tmp_path / "evil.zarr", dataset="x/../../../escaped")
    before = {p for p in tmp_path.rglob("*")}
    ok(invoke("eval", run, "--store", evil, "--device", "cpu", "--json"))
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.parent == run for p in new), sorted(map(str, new))
    (written,) = [p.name for p in new if p.suffix == ".json"]
    assert written.startswith("eval-x_") and written.endswith(f"-{key_hash(FeatureStore.open(evil).key)}.json")


# ---------------------------------------------------------------- 3. --resume keeps settings


def test_resume_refuses_changed_training_settings(tmp_path, store):
    run = _tune(store, tmp_path / "run").run_dir
    config = (run / "config.json").read_text()
    assert_error(invoke("tune", store, "--out", run, "--resume", *TUNE, "--lr", "0.001", "--seed", "2"), 2,
                 "--resume: settings differ from the run's config.json: lr 2e-05 -> 0.001, seed 1 -> 2; "
                 "drop them or start a new --out")
    assert_error(invoke("tune", store, "--out", run, "--resume", *TUNE, "--no-cskip", "--batch-size", "8"), 2,
                 contains="cskip.enabled True -> False, batch_size 4 -> 8;")
    assert (run / "config.json").read_text() == config
    # What does not change the trained weights may differ: the store's path, the progress bar. An
    # old run's config.json may hold settings TuneConfig no longer has (`workers`): not a change.
    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    old = json.loads(config)
    (run / "config.json").write_text(json.dumps({**old, "workers": 3}, indent=2, sort_keys=True) + "\n")
    again = skipcache.tune(skipcache.TuneConfig(store=moved, out=run, resume=True, epochs=1, warmup_epochs=0,
                                                device="cpu", progress=True))
    assert again.epochs == 1
    assert json.loads((run / "config.json").read_text())["store"] == os.path.abspath(moved)


def test_resume_without_a_store_uses_the_runs_store(tmp_path, store, monkeypatch):
    run = _tune(store, tmp_path / "run", epochs=2).run_dir
    (run / "run.json").unlink()
    monkeypatch.chdir(tmp_path)  # no store/ here: only the run knows where its store is
    ok(invoke("tune", "--out", run, "--resume", *TUNE, "--epochs", "2", "--json"))
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------- 4. runs open from anywhere, moved


def test_a_run_opens_from_another_folder_and_after_moving(tmp_path, store, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    local = _cache(Path("store"), num_classes=6)
    rel = Path("data") / "feats.zarr"  # a store moved and renamed by hand: its path says nothing
    shutil.copytree(local, rel)
    shutil.rmtree(Path("store"))
    ok(invoke("tune", rel, "--out", "run", *TUNE, "--json"))
    info = json.loads((work / "run" / "run.json").read_text())
    assert info["store"] == os.path.abspath(work / rel) and info["store_relative"] == str(Path("..") / rel)
    assert info["store_key_hash"] == key_hash(FeatureStore.open(work / rel).key)

    monkeypatch.chdir(tmp_path)  # another folder
    ok(invoke("eval", work / "run", "--device", "cpu", "--json"))
    ok(invoke("export", work / "run", "--out", tmp_path / "a.safetensors"))
    # The run moved alone: its store is found at its absolute path.
    shutil.move(work / "run", tmp_path / "alone")
    ok(invoke("eval", tmp_path / "alone", "--device", "cpu", "--json"))
    # Run and store moved together: found through the relative path.
    shutil.move(tmp_path / "alone", work / "run")
    shutil.move(work, tmp_path / "moved")
    ok(invoke("eval", tmp_path / "moved" / "run", "--device", "cpu", "--json"))
    # Another store where the run's store was: refused by its key hash.
    shutil.rmtree(tmp_path / "moved" / rel)
    shutil.copytree(store, tmp_path / "moved" / rel)
    line = assert_error(invoke("eval", tmp_path / "moved" / "run", "--device", "cpu"), 1,
                        contains=f"is not the store run {tmp_path / 'moved' / 'run'} trained on")
    assert info["store_key_hash"] in line
    # No store at all: one line naming where it was looked for.
    shutil.rmtree(tmp_path / "moved" / "data")
    line = assert_error(invoke("eval", tmp_path / "moved" / "run", "--device", "cpu"), 1,
                        contains=f"store of run {tmp_path / 'moved' / 'run'} (key hash {info['store_key_hash']}) is not at ")
    assert str(work / rel) in line and str(tmp_path / "moved" / rel) in line


# ------------------------------------------------------------ 5. killed before 1st checkpoint


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_restarts(tmp_path, store, monkeypatch, resume):
    import skipcache.stages.tune as tune

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "setup_training", killed)  # killed while building the model
    with pytest.raises(KeyboardInterrupt):
        _tune(store, tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoint.json").exists()
    result = _tune(store, tmp_path / "run", resume=resume)  # the same command again
    assert result.epochs == 1 and (result.run_dir / "run.json").exists()


def test_a_run_in_use_by_another_process_is_refused(tmp_path, store):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(run / "tune.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_error(invoke("tune", store, "--out", run, *TUNE), 1,
                     contains=f"run directory {run} is in use by another `skipcache tune`")
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "config.json").exists()


# ---------------------------------------------------------------- 6. export onto a file


def test_export_onto_an_existing_file_needs_force(tmp_path, finished):
    target = tmp_path / "tuned.safetensors"
    ok(invoke("export", finished, "--out", target))
    first = load_file(target)
    assert_error(invoke("export", finished, "--out", target), 1,
                 f"{target} exists; pass --force to overwrite it, or another --out")
    ok(invoke("export", finished, "--out", target, "--force"))
    again = load_file(target)
    assert sorted(again) == sorted(first) and all(torch.equal(first[k], again[k]) for k in first)
    assert not list(tmp_path.glob(".*.tmp"))
    plain = tmp_path / "notes"
    plain.write_text("mine")
    assert_error(invoke("export", finished, "--out", plain, "--force"), 1,
                 f"--out {plain} is a file, not a .safetensors, .bin or .pt name; pass such a name, or a folder")
    assert plain.read_text() == "mine"
    assert_error(invoke("export", finished, "--out", finished / "deep.safetensors", "--force"), 1,
                 contains="is a file of the run itself")


# ------------------------------------------------------- 7. load_tuned, format version, fixture


def test_load_tuned_checks_version_status_weights_and_store(tmp_path, finished):
    from skipcache.rundir import load_tuned

    tuned = load_tuned(finished, torch.device("cpu"))
    weights = load_file(finished / "deep.safetensors")
    assert all(torch.equal(t, weights[k]) for k, t in tuned.deep.deep_state_dict().items())

    run = _copy_run(finished, tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(RunError, match=re.escape(f"run {run} has run format version 99; this skipcache reads version 1")):
        load_tuned(run, torch.device("cpu"))
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with pytest.raises(RunError, match="has not finished"):
        load_tuned(run, torch.device("cpu"))
    (run / "run.json").write_text(json.dumps(info))
    data = bytearray((run / "deep.safetensors").read_bytes())
    data[-1] ^= 0x01
    (run / "deep.safetensors").write_bytes(bytes(data))
    with pytest.raises(RunError, match="deep.safetensors does not match the sha256 in run.json"):
        load_tuned(run, torch.device("cpu"))


def test_an_old_unversioned_run_is_refused_clearly(tmp_path, finished):
    from skipcache.rundir import load_tuned

    run = _copy_run(finished, tmp_path)
    for name in ("run.json", "config.json"):
        data = json.loads((run / name).read_text())
        data.pop("format_version")
        (run / name).write_text(json.dumps(data))
    assert_error(invoke("eval", run, "--device", "cpu"), 1,
                 f"run {run} has no format_version (written by an older skipcache); this skipcache reads version 1; "
                 "retrain it with `skipcache tune`")
    with pytest.raises(RunError):
        load_tuned(run, torch.device("cpu"))


def test_run_v1_fixture_still_opens(tmp_path):
    from skipcache.rundir import FORMAT_VERSION, load_tuned, read_checkpoint

    spec = importlib.util.spec_from_file_location("make_run_v1", FIXTURES / "make_run_v1.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    run = FIXTURES / "run_v1" / "run"
    assert FORMAT_VERSION == 1
    info = json.loads((run / "run.json").read_text())
    # The recorded absolute store path does not exist: the store is found next to the run.
    assert not Path(info["store"]).exists()
    tuned = load_tuned(run, torch.device("cpu"))
    assert key_hash(tuned.store.key) == info["store_key_hash"] and tuned.store.key["model"] == "tiny"
    assert tuned.config["format_version"] == info["format_version"] == 1
    assert tuned.config["epochs"] == maker.EPOCHS and info["status"] == "complete"
    weights = load_file(run / "deep.safetensors")
    assert all(torch.equal(t, weights[k]) for k, t in tuned.deep.deep_state_dict().items())
    ckpt = read_checkpoint(run)
    assert ckpt.epoch == maker.EPOCHS and [r["epoch"] for r in ckpt.history] == list(range(1, maker.EPOCHS + 1))
    assert set(ckpt.deep) == set(weights) and all(torch.equal(ckpt.deep[k], weights[k]) for k in weights)
    assert ckpt.generator.dtype == torch.uint8 and ckpt.optimizer["param_groups"]
    size = sum(p.stat().st_size for p in (FIXTURES / "run_v1").rglob("*") if p.is_file())
    assert size < 512 * 1024, size
    # eval through the CLI on a copy (eval writes eval.json into the run)
    shutil.copytree(FIXTURES / "run_v1", tmp_path / "run_v1")
    ev = json.loads(ok(invoke("eval", tmp_path / "run_v1" / "run", "--device", "cpu", "--json")))
    assert set(ev) >= {"base", "new", "H"}


def test_checkpoints_are_written_by_time_and_after_the_last_epoch(tmp_path, store, monkeypatch):
    """A checkpoint per `checkpoint_every_s`, and always the last epoch's; metrics.jsonl every epoch."""
    import skipcache
    from skipcache.rundir import TuneRun

    saved = []
    real = TuneRun.save_checkpoint

    def spy(self, epoch, *args, **kwargs):
        saved.append(epoch)
        return real(self, epoch, *args, **kwargs)

    monkeypatch.setattr(TuneRun, "save_checkpoint", spy)
    common = dict(store=store, epochs=3, warmup_epochs=0, batch_size=4, device="cpu", progress=False)
    skipcache.tune(skipcache.TuneConfig(out=tmp_path / "hourly", checkpoint_every_s=3600, **common))
    assert saved == [3]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "hourly" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    saved.clear()
    skipcache.tune(skipcache.TuneConfig(out=tmp_path / "every", checkpoint_every_s=0, **common))
    assert saved == [1, 2, 3]
