"""Declarative pipelines: a bad file fails early with a message naming the problem; a tiny one runs."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from skipcache.cli import app
from skipcache.errors import ConfigError
from skipcache.pipeline import load_pipeline, run_pipeline
from skipcache.stages.cache import CacheConfig
from skipcache.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]

TINY_CACHE = """
[cache]
dataset = "synthetic"
dataset_options = { num_classes = 6 }
model = "tiny"
pretrained = "none"
omega = 3
shots = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pipeline(tmp_path / "nope.toml")
    assert str(info.value) == f"pipeline file not found: {tmp_path / 'nope.toml'}; see pipelines/ for examples"


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[cache\nmodel = 1\n")
    with pytest.raises(ConfigError, match=r"^pipeline .*p\.toml is not valid TOML: "):
        load_pipeline(path)


ZS = '[[method]]\nname = "zs"\nkind = "zeroshot"\n'
ALLOWED_CACHE = sorted(f.name for f in fields(CacheConfig))

# (pipeline body, the exact message with {path} for the file). Each line is one way a file goes wrong.
BAD_FILES = {
    "unknown cache field": (TINY_CACHE + "epochs = 3\n" + ZS,
                            "pipeline {path}: unknown [cache] field(s) ['epochs']; allowed: " + str(ALLOWED_CACHE)),
    "unknown method field": (TINY_CACHE + '[[method]]\nname = "FT"\nkind = "tune"\nepoch = 3\nlearning_rate = 1\n',
                             "pipeline {path}: method 'FT' has unknown field(s) ['epoch', 'learning_rate']"),
    "no methods": (TINY_CACHE, "pipeline {path} has no [[method]] tables"),
    "bad kind": (TINY_CACHE + '[[method]]\nname = "x"\nkind = "finetune"\n',
                 "pipeline {path}: method 'x' has kind 'finetune'; use zeroshot or tune"),
    "missing kind": (TINY_CACHE + '[[method]]\nname = "x"\n', "pipeline {path}: method 'x' has kind None; use zeroshot or tune"),
    "bad target": (TINY_CACHE + '[[target]]\nname = "t"\n' + ZS,
                   "pipeline {path}: a [[target]] needs `dataset` and allows only name, dataset_options; got ['name']"),
    # The name labels the row and names the run folder; without one, running used to crash (KeyError).
    "method without a name": (TINY_CACHE + '[[method]]\nkind = "zeroshot"\n',
                              "pipeline {path}: every [[method]] needs a name; method 0 has none"),
    # Two methods with one name would share a run folder: the second tune would fail after the first ran.
    "duplicate method names": (TINY_CACHE + '[[method]]\nname = "a"\nkind = "tune"\n' * 2,
                               "pipeline {path}: method name 'a' is used twice; names label rows and run folders"),
    # A misspelt table must not silently fall back to the defaults (ViT-B-16, openai weights).
    "unknown top-level table": (TINY_CACHE.replace("[cache]", "[cahce]") + ZS,
                                "pipeline {path}: unknown top-level field(s) ['cahce']; "
                                "allowed: ['cache', 'description', 'method', 'name', 'target']"),
    # warmup_epochs is `int | None` (unset: 1, or 0 for a 1-epoch run); an integer is still required.
    "warmup epochs of the wrong type": (TINY_CACHE + '[[method]]\nname = "FT"\nkind = "tune"\nwarmup_epochs = "one"\n',
                                        'pipeline {path}: method.0.warmup_epochs must be an integer, got "one"'),
    "misspelt method table": (TINY_CACHE + ZS.replace("[[method]]", "[[methods]]"),
                              "pipeline {path}: unknown top-level field(s) ['methods']; "
                              "allowed: ['cache', 'description', 'method', 'name', 'target']"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_pipeline_file_names_the_problem(tmp_path, case):
    body, message = BAD_FILES[case]
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(info.value) == message.format(path=path)


def test_malformed_override(tmp_path):
    path = write(tmp_path, TINY_CACHE + '[[method]]\nname = "zs"\nkind = "zeroshot"\n')
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, ["epochs=3"])
    assert str(info.value) == "override 'epochs=3' is not SECTION.KEY=VALUE; e.g. --set cache.dataset=dtd"
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, ["method.4.epochs=3"])
    assert str(info.value) == "override 'method.4.epochs=3': no item 4 (there are 1)"
    assert load_pipeline(path, ["cache.omega=2", "method.0.name='zero'"])["cache"]["omega"] == 2


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    spec = load_pipeline(path)
    assert spec["method"]


def test_cli_run_reports_a_bad_pipeline_in_one_line(tmp_path):
    path = write(tmp_path, TINY_CACHE)
    result = CliRunner().invoke(app, ["run", str(path), "--device", "cpu"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [f"error: pipeline {path} has no [[method]] tables"]


# ------------------------------------------------------------------------------------ a tiny run


@pytest.mark.slow
def test_tiny_pipeline_runs_and_reports_every_method(tmp_path):
    from skipcache.stages.evaluate import harmonic_mean

    path = write(tmp_path, 'name = "tiny"\n' + TINY_CACHE + """
[[method]]
name = "zero-shot"
kind = "zeroshot"

[[method]]
name = "Skip Tuning"
kind = "tune"
epochs = 1
batch_size = 4
warmup_epochs = 0
""")
    logged = []
    result = run_pipeline(path, out=tmp_path / "out", device="cpu", root=tmp_path / "store", progress=False,
                          log=logged.append)
    assert result["pipeline"] == "tiny" and result["out"] == str(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "out"}
    assert len(result["stores"]) == 1 and logged

    zs, tuned = result["rows"]
    assert set(zs) == {"method", "base", "new", "H", "tune_s", "step_ms", "peak_mib"}
    assert set(tuned) == {"method", "base", "new", "H", "tune_s", "step_ms", "peak_mib", "memory_method", "run_dir"}
    assert (zs["method"], tuned["method"]) == ("zero-shot", "Skip Tuning")
    assert zs["tune_s"] is None and zs["step_ms"] is None and zs["peak_mib"] is None  # nothing was trained
    assert tuned["tune_s"] > 0 and tuned["step_ms"] > 0 and tuned["peak_mib"] > 0
    assert Path(tuned["run_dir"]) == tmp_path / "out" / "Skip_Tuning"

    # Zero-shot accuracy from the store's logits, computed here.
    store = FeatureStore.open(Path(result["stores"][0]))
    for split, alias in (("test_base", "base"), ("test_new", "new")):
        data = store.read_split(split, include_vision=False)
        expected = 100.0 * (data["zeroshot_logits"].argmax(1) == data["labels"]).float().mean().item()
        assert zs[alias] == pytest.approx(expected)
    # The tuned row: the run's deep weights on the cached test tokens, computed here.
    from safetensors.torch import load_file

    from skipcache.loading import load_deep_model

    deep = load_deep_model(store, torch.device("cpu"))
    deep.load_deep_state_dict(load_file(Path(tuned["run_dir"]) / "deep.safetensors"))
    text = store.read_text()
    with torch.no_grad():
        for split, alias in (("test_base", "base"), ("test_new", "new")):
            data = store.read_split(split)
            classes = torch.as_tensor(store.splits[split].classes)
            txt = deep.encode_text(text["tokens"][classes], text["eot"][classes])
            pred = (deep.encode_image(data["vision"][0]) @ txt.T).argmax(1)
            assert tuned[alias] == pytest.approx(100.0 * (pred == data["labels"]).float().mean().item(), abs=1e-3)
    for row in (zs, tuned):
        assert row["H"] == pytest.approx(harmonic_mean(row["base"], row["new"]), abs=1e-3)


@pytest.mark.slow
def test_a_target_column_is_the_run_evaluated_on_the_target_store(tmp_path):
    """Cross-dataset protocol: the source is tiny synthetic, the target synthetic-sketch with other
    classes, cached by the pipeline with the source's model, weights and omega and every class."""
    from skipcache.stages.evaluate import run_eval

    path = write(tmp_path, 'name = "xd"\n' + TINY_CACHE + """
[[target]]
dataset = "synthetic-sketch"
name = "sketch"
dataset_options = { num_classes = 4, test_per_class = 5 }

[[method]]
name = "zero-shot"
kind = "zeroshot"

[[method]]
name = "Skip Tuning"
kind = "tune"
epochs = 1
batch_size = 4
lr = 0.05
""")
    result = run_pipeline(path, out=tmp_path / "out", device="cpu", root=tmp_path / "store", progress=False,
                          log=lambda line: None)
    assert result["targets"] == ["sketch"]
    stores = {FeatureStore.open(Path(p)).key["dataset"]: Path(p) for p in result["stores"]}
    assert sorted(stores) == ["synthetic", "synthetic-sketch"]
    target = FeatureStore.open(stores["synthetic-sketch"])
    assert target.key["omega"] == 3 and list(target.splits["test"].classes) == [0, 1, 2, 3]

    zs, tuned = result["rows"]
    assert tuned["sketch"] != zs["sketch"]  # lr 0.05: the tuned column can tell tuned weights from pretrained
    # The tuned row: the same number as evaluating the run on the target store.
    assert tuned["sketch"] == run_eval(Path(tuned["run_dir"]), store=target.path, device="cpu").accuracy["all"]
    # The zero-shot row: the pretrained logits the cache stage stored for the target, scored here.
    data = target.read_split("test", include_vision=False)
    expected = 100.0 * (data["zeroshot_logits"].argmax(1) == data["labels"]).float().mean().item()
    assert zs["sketch"] == pytest.approx(expected)
