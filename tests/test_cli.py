"""The command line: end-to-end on the tiny model, store reuse, one-line errors, help for every command.

References are independent of the code under test where it matters: the exported checkpoint is
loaded by plain open_clip and run on the raw images; H is recomputed from base and new.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from skipcache.cli import app
from skipcache.errors import SkipcacheError
from skipcache.store import FeatureStore, SplitSpec, store_path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "skipcache" / "model_configs" / "tiny.json"
SKIPCACHE_BIN = Path(sys.executable).with_name("skipcache")

runner = CliRunner()
TINY = ["--model", "tiny", "--pretrained", "none", "--device", "cpu"]


def invoke(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(result) -> str:
    """stdout of a command that must have succeeded."""
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.stdout


def ok_json(result):
    return json.loads(ok(result))


def assert_error(result, exit_code: int, message: str) -> None:
    """A user error: exit code, nothing on stdout, exactly `error: <message>` on stderr, no traceback."""
    # A SkipcacheError ends in SystemExit; any other exception is a crash, not a user error.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {message}"]


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small complete store and a finished 1-epoch run, built through the Python API."""
    import skipcache

    base = tmp_path_factory.mktemp("tiny_run")
    cached = skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 6}, model="tiny", pretrained="none", omega=3,
        shots=2, root=base / "store", device="cpu", progress=False))
    tuned = skipcache.tune(skipcache.TuneConfig(
        store=cached.path, out=base / "run", epochs=1, lr=0.05, device="cpu", progress=False))  # tuned far from pretrained
    return {"store": cached.path, "run": tuned.run_dir, "base": base}


# ---------------------------------------------------------------------------------- end to end


def _raw_split_images(split: str, classes: str, num_classes: int, shots: int, seed: int):
    """The test images of a split as PIL images, straight from the dataset (not from the store)."""
    from skipcache.data import build_task, get_dataset, load_image

    task = build_task(get_dataset("synthetic", None, num_classes=num_classes), shots=shots, seed=seed, classes=classes)
    s = task.splits[split]
    return [load_image(ex) for ex in s.examples], [ex.source_id for ex in s.examples], [task.classnames[c] for c in s.classes]


def _openclip_logits(model, images, classnames, template="a photo of a {}."):
    """Logits of a plain open_clip model on raw images, with open_clip's own preprocessing and tokenizer."""
    import open_clip

    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                           mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer("tiny")
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in images])
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer([template.format(c) for c in classnames]), normalize=True)
        return model.logit_scale.exp() * img @ txt.T


@pytest.mark.slow
def test_end_to_end_tiny_synthetic(tmp_path, monkeypatch):
    import open_clip

    from skipcache.loading import load_model
    from skipcache.stages.evaluate import load_run_model, predict_split

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "store"
    # float32 storage, so the cached path and the raw-image path differ only by float rounding.
    cached = ok_json(invoke("cache", "--dataset", "synthetic", "-o", "num_classes=10", *TINY, "--omega", "3",
                            "--shots", "4", "--dtype", "float32", "--root", root, "--json"))
    assert cached["reused"] is False
    assert cached["rows"] == {"train": 20, "test_base": 100, "test_new": 100}  # 5 base classes x 4 shots; 20 test per class
    path = Path(cached["path"])
    assert path.is_dir() and path.suffix == ".zarr"

    listed = ok_json(invoke("ls", "--root", root, "--json"))
    assert [(Path(e["path"]), e["complete"], e["dataset"], e["model"], e["omega"]) for e in listed] == [
        (path, True, "synthetic", "tiny", 3)]

    summary = ok_json(invoke("inspect", path, "--json"))
    assert summary["key"] == cached["key"]
    assert summary["complete"] is True
    # rich wraps long lines at 80 columns when stdout is not a terminal; undo that before comparing.
    assert ok(invoke("verify", path)).replace("\n", "") == f"ok: {path}"

    run_dir = tmp_path / "run"
    # A large lr without warm-up, so the tuned weights differ clearly from the pretrained ones.
    tuned = ok_json(invoke("tune", path, "--epochs", "2", "--lr", "0.05", "--warmup-epochs", "0", "--out", run_dir,
                           "--device", "cpu", "--json"))
    assert Path(tuned["run_dir"]) == run_dir and Path(tuned["store"]) == path
    assert (run_dir / "deep.safetensors").is_file()
    # Two epochs of 5 steps (20 rows, batch 4) on the cosine from 0.05 without warm-up: the rate
    # at each epoch's last step is 0.025 * (1 + cos(pi * s / 10)) for s = 4 and 9.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["lr_text"] for m in metrics] == pytest.approx([0.0327254249, 0.0012235871])
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 10

    ev = ok_json(invoke("eval", run_dir, "--device", "cpu", "--json"))
    for k in ("base", "new", "H"):
        assert 0.0 <= ev[k] <= 100.0
    assert ev["H"] == pytest.approx(2 * ev["base"] * ev["new"] / (ev["base"] + ev["new"]) if ev["base"] + ev["new"] else 0.0,
                                    abs=1e-3)
    assert set(ev["per_class"]) == {"base", "new"} and len(ev["per_class"]["base"]) == 5
    assert ev["n"] == {"base": 100, "new": 100}

    # Export to a file; plain open_clip loads it and reproduces the run's logits from raw images.
    exported = tmp_path / "tuned.safetensors"
    ok(invoke("export", run_dir, "--out", exported))
    open_clip.add_model_config(TINY_CONFIG)
    model = open_clip.create_model("tiny", pretrained=str(exported)).eval()
    images, source_ids, names = _raw_split_images("test_base", "base", 10, 4, 1)
    theirs = _openclip_logits(model, images, names)

    deep, store = load_run_model(run_dir, torch.device("cpu"))
    assert store.read_source_ids("test_base") == source_ids  # same images, same order
    ours = predict_split(deep, store, "test_base", torch.device("cpu"))
    # Same fp32 weights and inputs; only summation order differs (split forward, trimmed text).
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (theirs.argmax(1) == ours.argmax(1)).float().mean() >= 0.95
    # ... and the comparison can tell tuned from pretrained weights.
    pretrained = load_model("tiny", "none", seed=1).model
    assert (_openclip_logits(pretrained, images, names) - theirs).abs().max() > 1e-2

    # Export to a directory: open_clip's local-dir: needs nothing from skipcache's registry.
    out_dir = tmp_path / "export_dir"
    ok(invoke("export", run_dir, "--out", out_dir))
    local = open_clip.create_model(f"local-dir:{out_dir}").eval()
    torch.testing.assert_close(_openclip_logits(local, images[:8], names), theirs[:8], atol=1e-5, rtol=1e-5)

    # predict on a PNG of one test image: top-k sorted probabilities over all 10 classes.
    png = tmp_path / "img.png"
    images[0].save(png)
    preds = ok_json(invoke("predict", run_dir, png, "--top-k", "3", "--device", "cpu", "--json"))
    assert len(preds) == 1 and preds[0]["image"] == str(png)
    top = preds[0]["top"]
    probs = [t["prob"] for t in top]
    assert len(top) == 3
    assert probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    all_names = _raw_split_images("test_new", "base", 10, 4, 1)[2]
    all_logits = _openclip_logits(model, images[:1], names + all_names)  # over every class, like predict
    assert top[0]["class"] == (names + all_names)[int(all_logits.argmax())]


# ------------------------------------------------------------------------------------ store reuse


@pytest.mark.slow
def test_cache_reuses_a_complete_store_and_omega_changes_the_path(tmp_path):
    args = ["cache", "--dataset", "synthetic", "-o", "num_classes=10", *TINY, "--shots", "4", "--root", tmp_path, "--json"]
    first = ok_json(invoke(*args, "--omega", "3"))
    path = Path(first["path"])
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    second = ok_json(invoke(*args, "--omega", "3"))
    assert first["reused"] is False and second["reused"] is True
    assert second["path"] == first["path"] and second["key"] == first["key"]
    assert second["images_per_s"] == 0.0 and second["seconds"] < first["seconds"]
    assert second["zeroshot_acc"] == first["zeroshot_acc"]
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before  # nothing rewritten

    other = ok_json(invoke(*args, "--omega", "4"))
    assert other["reused"] is False
    assert Path(other["path"]) != path and Path(other["path"]).name.startswith("omega4-")
    assert path.name.startswith("omega3-")


# ----------------------------------------------------------------------------------- user errors


def test_an_error_is_one_line_without_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([str(SKIPCACHE_BIN), "cache", "--dataset", "nope", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: unknown dataset 'nope'; known datasets: ")


def test_unknown_dataset(tmp_path):
    from skipcache.data.registry import get_registry

    assert_error(invoke("cache", "--dataset", "nope", *TINY, "--root", tmp_path), 2,
                 f"unknown dataset 'nope'; known datasets: {', '.join(get_registry())} (`skipcache datasets` describes them)")


def test_misspelt_dataset_gets_the_closest_names(tmp_path):
    from skipcache.data.registry import get_registry

    assert_error(invoke("cache", "--dataset", "SUN-397", *TINY, "--root", tmp_path), 2,
                 "unknown dataset 'SUN-397' (did you mean 'sun397'?); "
                 f"known datasets: {', '.join(get_registry())} (`skipcache datasets` describes them)")


def test_unknown_model(tmp_path):
    assert_error(invoke("cache", "--dataset", "synthetic", "-o", "num_classes=4", "--model", "no-such-model",
                        "--pretrained", "none", "--device", "cpu", "--root", tmp_path), 1,
                 "unknown model 'no-such-model'; run `skipcache models` to list them, or pass local-dir:DIR")


def test_bad_dataset_option(tmp_path):
    assert_error(invoke("cache", "--dataset", "synthetic", "-o", "num_classes", *TINY, "--root", tmp_path), 2,
                 "dataset option 'num_classes' is not KEY=VALUE; e.g. -o num_classes=10")
    assert_error(invoke("cache", "--dataset", "synthetic", "-o", "colours=3", *TINY, "--root", tmp_path), 2,
                 "dataset 'synthetic' takes no option 'colours'; its options are: num_classes, train_per_class, "
                 "val_per_class, test_per_class, seed, image_size")


def test_food101_without_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("SKIPCACHE_DATA", raising=False)
    assert_error(invoke("cache", "--dataset", "food101", *TINY, "--root", tmp_path), 1,
                 "dataset 'food101' needs a data root; pass --data-root DIR or set SKIPCACHE_DATA")


def test_food101_data_root_that_is_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SKIPCACHE_DATA", raising=False)
    missing = tmp_path / "nowhere"
    assert_error(invoke("cache", "--dataset", "food101", "--data-root", missing, *TINY, "--root", tmp_path), 1,
                 f"data root {missing} is not a folder; pass --data-root DIR or set SKIPCACHE_DATA "
                 "to the folder that holds the dataset")


@pytest.mark.parametrize("content, suffix", [
    ('{"train": []}', " must be an object with keys 'train', 'val', 'test'; found ['train']; download it again"),
    ('{"train": [["a/1.jpg", "zero", "apple pie"]], "val": [], "test": []}',
     ": 'train' entry 0 is ['a/1.jpg', 'zero', 'apple pie']; expected [impath: str, label: int, classname: str]"),
    ('{"train": [["a/1.jpg", 1, "apple pie"]], "val": [], "test": [["a/2.jpg", 1, "apple pie"]]}',
     ": labels must be 0..M-1 but label 0 never occurs (largest is 1); fix the split file"),
], ids=["missing-keys", "bad-entry", "label-gap"])
def test_food101_malformed_split_file(tmp_path, content, suffix):
    data = tmp_path / "data"
    (data / "food-101" / "images").mkdir(parents=True)
    split_file = data / "food-101" / "split_zhou_Food101.json"
    split_file.write_text(content)
    assert_error(invoke("cache", "--dataset", "food101", "--data-root", data, *TINY, "--root", tmp_path / "s"), 1,
                 f"split file {split_file}{suffix}")


def test_food101_split_file_that_is_not_json(tmp_path):
    data = tmp_path / "data"
    (data / "food-101" / "images").mkdir(parents=True)
    split_file = data / "food-101" / "split_zhou_Food101.json"
    split_file.write_text("{not json")
    result = invoke("cache", "--dataset", "food101", "--data-root", data, *TINY, "--root", tmp_path / "s")
    assert_error(result, 1, result.stderr.splitlines()[0][len("error: "):])  # one line, no traceback
    assert result.stderr.startswith(f"error: split file {split_file} is not valid JSON (")
    assert result.stderr.rstrip().endswith("); download it again")


def test_omega_out_of_range(tmp_path):
    assert_error(invoke("cache", "--dataset", "synthetic", "-o", "num_classes=4", *TINY, "--omega", "99",
                        "--root", tmp_path), 2,
                 "omega must be in [0, 6] for this model (6 image / 6 text blocks), got 99")


@pytest.mark.parametrize("args, message", [
    (["--r", "0"], "--r (cskip.r) must be in (0, 1], got 0.0; e.g. 0.5"),
    (["--r", "1.5"], "--r (cskip.r) must be in (0, 1], got 1.5; e.g. 0.5"),
    (["--lam", "0"], "--lam (cskip.lam) must be > 0 and finite, got 0.0; e.g. 0.3"),
    (["--lam", "-1"], "--lam (cskip.lam) must be > 0 and finite, got -1.0; e.g. 0.3"),
    (["--epochs", "0"], "epochs must be >= 1 (a whole number), got 0; e.g. 20"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0; e.g. 2e-5"),
])
def test_tune_settings_out_of_range(tmp_path, args, message):
    # Checked before any store is looked up, so the store need not exist.
    assert_error(invoke("tune", tmp_path / "missing.zarr", *args, "--device", "cpu", "--out", tmp_path / "run"), 2, message)


def test_tune_store_that_does_not_exist(tmp_path):
    missing = tmp_path / "missing.zarr"
    assert_error(invoke("tune", missing, "--device", "cpu", "--out", tmp_path / "run"), 1,
                 f"no store at {missing}; run `skipcache ls` to list stores or `skipcache cache` to build one")
    assert_error(invoke("tune", "--root", tmp_path, "--device", "cpu", "--out", tmp_path / "run"), 1,
                 f"no complete store under {tmp_path}; run `skipcache cache --dataset ...` first")
    assert_error(invoke("tune", "--root", tmp_path, "--dataset", "synthetic", "--omega", "3", "--device", "cpu"), 1,
                 f"no complete store under {tmp_path} with dataset=synthetic, omega=3; run `skipcache cache --dataset ...` first")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_store_commands_on_a_missing_path(tmp_path, command):
    missing = tmp_path / "missing.zarr"
    assert_error(invoke(command, missing), 1, f"no feature store at {missing}; run `skipcache cache` to build it")


def _partial_store(root: Path) -> Path:
    """An interrupted store (laid out, nothing written, never finalized) at its real path under root."""
    key = {"dataset": "synthetic", "model": "tiny", "pretrained_label": "none", "omega": 3}
    path = store_path(root, key)
    FeatureStore.create_or_resume(path, key, text_shape=(4, 3, 8), embed_dim=8, storage_dtype="float16",
                                  splits=[SplitSpec("train", n=5, views=1, classes=[0, 1], vision_shape=(2, 8))])
    assert not path.exists() and Path(f"{path}.partial").is_dir()
    return path


def test_tune_on_an_incomplete_store(tmp_path):
    path = _partial_store(tmp_path)
    assert_error(invoke("tune", path, "--device", "cpu", "--out", tmp_path / "run"), 1,
                 f"store {path} is incomplete (cache was interrupted); rerun the same `skipcache cache` command to finish it")
    partial = Path(f"{path}.partial")
    assert_error(invoke("tune", partial, "--device", "cpu", "--out", tmp_path / "run"), 1,
                 f"store {partial} is incomplete: 1 of 1 shards and the text tokens not written; "
                 "rerun `skipcache cache` with the same arguments to resume it")
    # Picking the newest store under a root never picks an incomplete one.
    assert_error(invoke("tune", "--root", tmp_path, "--device", "cpu", "--out", tmp_path / "run"), 1,
                 f"no complete store under {tmp_path}; run `skipcache cache --dataset ...` first")
    assert not (tmp_path / "run").exists()


def test_ls_and_inspect_show_an_incomplete_store(tmp_path):
    path = _partial_store(tmp_path)
    listed = ok_json(invoke("ls", "--root", tmp_path, "--json"))
    assert [(e["path"], e["complete"]) for e in listed] == [(f"{path}.partial", False)]
    summary = ok_json(invoke("inspect", path, "--json"))
    assert summary["complete"] is False and summary["splits"]["train"]["shards_done"] == 0


def test_tune_resume_with_nothing_to_resume(tmp_path, tiny_run):
    out = tmp_path / "run"
    assert_error(invoke("tune", tiny_run["store"], "--resume", "--out", out, "--device", "cpu"), 1,
                 f"nothing to resume in {out}: no checkpoint.json; drop --resume to start a new run")


def test_tune_into_a_finished_run_without_resume(tiny_run):
    run = tiny_run["run"]
    assert_error(invoke("tune", tiny_run["store"], "--out", run, "--device", "cpu"), 1,
                 f"run directory {run} is not empty; pass --resume to continue it or --out for a new run")


def test_tune_with_one_epoch_and_no_warmup_option_trains_at_the_full_rate(tmp_path, tiny_run):
    out = tmp_path / "run"
    ok_json(invoke("tune", tiny_run["store"], "--epochs", "1", "--lr", "0.01", "--out", out, "--device", "cpu", "--json"))
    assert json.loads((out / "config.json").read_text())["warmup_epochs"] == 0
    # 6 classes, 3 base x 2 shots = 6 rows, batch 4: 2 steps; the last on the cosine at 0.5 * 0.01 * (1 + cos(pi / 2))
    rates = [json.loads(line)["lr_text"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([0.005])


def test_tune_refuses_a_warmup_as_long_as_the_run(tmp_path, tiny_run):
    out = tmp_path / "run"
    assert_error(invoke("tune", tiny_run["store"], "--epochs", "1", "--warmup-epochs", "1", "--out", out, "--device", "cpu"), 2,
                 "warmup_epochs 1 with epochs 1: the warm-up would take the whole run (every step at warmup_lr 1e-06); "
                 "pass --warmup-epochs 0 or more --epochs")
    assert not out.exists()


@pytest.fixture(scope="module")
def other_stores(tiny_run):
    """Stores of another task (synthetic-sketch, every class) from the tiny run's model and weights:
    one at the run's omega (3), one at omega 2."""
    import skipcache

    settings = dict(dataset="synthetic-sketch", dataset_options={"num_classes": 4, "test_per_class": 5}, model="tiny",
                    pretrained="none", classes="all", shots=1, root=tiny_run["base"] / "other", device="cpu", progress=False)
    return {omega: skipcache.cache(skipcache.CacheConfig(omega=omega, **settings)).path for omega in (3, 2)}


def test_eval_on_another_compatible_store(tiny_run, other_stores):
    from safetensors.torch import load_file

    from skipcache.loading import load_deep_model

    run, path = tiny_run["run"], other_stores[3]
    ev = ok_json(invoke("eval", run, "--store", path, "--device", "cpu", "--json"))
    store = FeatureStore.open(path)
    assert ev["n"] == {"all": 20} and set(ev["per_class"]["all"]) == set(store.read_text()["classnames"])
    # The run's weights on the other store's cached test tokens, computed here.
    deep = load_deep_model(store, torch.device("cpu"))
    deep.load_deep_state_dict(load_file(run / "deep.safetensors"))
    data = store.read_split("test")
    with torch.no_grad():
        text = store.read_text()
        pred = (deep.encode_image(data["vision"][0]) @ deep.encode_text(text["tokens"], text["eot"]).T).argmax(1)
    assert ev["all"] == pytest.approx(100.0 * (pred == data["labels"]).float().mean().item(), abs=1e-3)
    zeroshot = 100.0 * (data["zeroshot_logits"].argmax(1) == data["labels"]).float().mean().item()
    assert ev["zeroshot"]["all"] == pytest.approx(zeroshot, abs=1e-3)
    assert ev["all"] != ev["zeroshot"]["all"]  # the tuned weights were used, not the pretrained ones
    saved = json.loads((run / f"eval-synthetic-sketch-{store.key_hash}.json").read_text())
    assert saved == ev


def test_eval_refuses_a_store_of_another_omega(tiny_run, other_stores):
    run, path = tiny_run["run"], other_stores[2]
    store = FeatureStore.open(path)
    assert_error(invoke("eval", run, "--store", path, "--device", "cpu"), 1,
                 f"store {store.path} was cached with omega=2, the run trained on omega=3; "
                 "cache the target with the run's model, weights and --omega")
    assert not (run / f"eval-synthetic-sketch-{store.key_hash}.json").exists()


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    assert_error(invoke("eval", tmp_path, "--device", "cpu"), 1,
                 f"{tmp_path} is not a run directory (no config.json); pass the --out of a `skipcache tune` run")


def test_eval_of_an_unfinished_run(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert_error(invoke("eval", tmp_path, "--device", "cpu"), 1,
                 f"run {tmp_path} has not finished (no run.json / deep.safetensors); "
                 f"finish it with `skipcache tune --out {tmp_path} --resume`")


def test_predict_of_a_missing_image(tmp_path, tiny_run):
    missing = tmp_path / "missing.png"
    assert_error(invoke("predict", tiny_run["run"], missing, "--device", "cpu"), 1, f"image not found: {missing}")


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    assert_error(invoke("export", tmp_path, "--out", tmp_path / "x.safetensors"), 1,
                 f"{tmp_path} is not a run directory (no config.json); pass the --out of a `skipcache tune` run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    assert_error(invoke("cache", "--dataset", "synthetic", "-o", "num_classes=4", "--model", "tiny", "--pretrained", "none",
                        "--device", "cuda", "--root", tmp_path), 2,
                 "device 'cuda' asked for but CUDA is not available here; use --device cpu")


def test_every_user_error_class_has_an_exit_code():
    from skipcache import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SkipcacheError)]
    assert len(classes) >= 9
    assert all(c.exit_code != 0 for c in classes)


# --------------------------------------------------------------------------------- help and lists

COMMANDS = ["cache", "tune", "eval", "inspect", "ls", "verify", "export", "predict", "models", "datasets", "check-data", "run", "bench"]


def test_top_level_help_names_every_command():
    assert sorted(get_command(app).commands) == sorted(COMMANDS)
    text = ok(invoke("--help", env={"COLUMNS": "200"}))
    for name in COMMANDS:
        assert name in text


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_mentions_each_option(name):
    command = get_command(app).commands[name]
    text = ok(invoke(name, "--help", env={"COLUMNS": "250"}))
    assert command.help.splitlines()[0] in text
    for param in command.params:
        if param.param_type_name == "option":
            assert param.opts[0] in text, f"{name} --help does not mention {param.opts[0]}"
        else:
            assert param.name in text, f"{name} --help does not mention argument {param.name}"


def test_models_lists_the_builtin_models():
    text = ok(invoke("models"))
    assert "tiny" in text and "synth-vit" in text
    listed = ok_json(invoke("models", "--json"))
    assert {"tiny", "synth-vit", "ViT-B-16"} <= set(listed["models"])
    assert listed["builtin_weights"] == {"synth": {"synth-vit": "synth-vit.safetensors"}}


def test_datasets_lists_synthetic_and_food101():
    text = ok(invoke("datasets", env={"COLUMNS": "200"}))
    assert "synthetic" in text and "food101" in text
    listed = {d["name"]: d for d in ok_json(invoke("datasets", "--json"))}
    assert listed["synthetic"]["needs_root"] is False
    assert listed["food101"]["needs_root"] is True
