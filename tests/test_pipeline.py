"""Declarative pipelines: a bad file fails early with a message naming the problem; a tiny one runs."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from skipcache.cli import app
from skipcache.errors import ConfigError
from skipcache.pipeline import (csv_table, default_out, load_pipeline, markdown_table, plan_runs, protocol_of, run_pipeline,
                                summarise)
from skipcache.stages.cache import CacheConfig
from skipcache.stages.tune import TuneConfig
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
ZS_AND_SKIP = """
[[method]]
name = "zero-shot"
kind = "zeroshot"

[[method]]
name = "Skip Tuning"
kind = "tune"
epochs = 1
batch_size = 4
lr = 0.05
"""  # zero-shot and one short Skip Tuning run
TOP_LEVEL = ['cache', 'description', 'grid', 'method', 'name', 'per_dataset', 'protocol', 'target']
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
                                "allowed: " + str(TOP_LEVEL)),
    # warmup_epochs is `int | None` (unset: 1, or 0 for a 1-epoch run); an integer is still required.
    "warmup epochs of the wrong type": (TINY_CACHE + '[[method]]\nname = "FT"\nkind = "tune"\nwarmup_epochs = "one"\n',
                                        'pipeline {path}: method.0.warmup_epochs must be an integer, got "one"'),
    "misspelt method table": (TINY_CACHE + ZS.replace("[[method]]", "[[methods]]"),
                              "pipeline {path}: unknown top-level field(s) ['methods']; "
                              "allowed: " + str(TOP_LEVEL)),
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
    common = {"method", "dataset", "seed", "shots", "base", "new", "H", "tune_s", "step_ms", "peak_mib"}
    assert set(zs) == common and set(tuned) == common | {"memory_method", "run_dir"}
    assert (zs["method"], tuned["method"]) == ("zero-shot", "Skip Tuning")
    assert (tuned["dataset"], tuned["seed"], tuned["shots"]) == ("synthetic", 1, None)
    assert zs["tune_s"] is None and zs["step_ms"] is None and zs["peak_mib"] is None  # nothing was trained
    assert tuned["tune_s"] > 0 and tuned["step_ms"] > 0 and tuned["peak_mib"] > 0
    # Every run has its folder under the output folder, and its record next to it.
    assert Path(tuned["run_dir"]) == tmp_path / "out" / "synthetic" / "Skip_Tuning" / "seed1"
    assert (tmp_path / "out" / "synthetic" / "zero-shot" / "seed1.json").is_file()
    assert json.loads((tmp_path / "out" / "synthetic" / "Skip_Tuning" / "seed1.json").read_text())["accuracy"]["base"] == tuned["base"]
    # The table: one row per method, a single seed shows the value alone.
    assert [r["method"] for r in result["table"]] == ["zero-shot", "Skip Tuning"]
    assert result["table"][1]["values"]["base"] == [tuned["base"], None]
    assert (tmp_path / "out" / "results.md").read_text() == result["markdown"]
    assert f"| synthetic | Skip Tuning | {tuned['base']:.2f} | {tuned['new']:.2f} |" in result["markdown"]
    assert (tmp_path / "out" / "results.csv").read_text().splitlines()[0].startswith("dataset,method,shots,seeds,base,base_std")

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
""" + ZS_AND_SKIP)
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


# ------------------------------------------------------------------------------------ the paper's protocols

B2N_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
BIG_THREE = {"imagenet", "sun397", "food101"}


def test_base_to_new_grid_expands_as_declared():
    """11 datasets x seeds 1-3 x (zero-shot, Skip Tuning, FT), the paper's recipe, a quarter of the
    epochs for ImageNet, SUN397 and Food101; validated without the data or the weights."""
    spec = load_pipeline(REPO / "pipelines" / "paper-b2n.toml")
    runs = plan_runs(spec)
    assert protocol_of(spec) == "base-to-new" and len(runs) == 11 * 3 * 3
    assert [(r.dataset, r.seed, r.method) for r in runs[:4]] == [
        ("imagenet", 1, "zero-shot"), ("imagenet", 1, "Skip Tuning"), ("imagenet", 1, "FT"), ("imagenet", 2, "zero-shot")]
    assert list(dict.fromkeys(r.dataset for r in runs)) == B2N_DATASETS
    assert len({r.parts for r in runs}) == len(runs)  # every run its own folder
    for r in runs:
        assert r.parts == (r.dataset, r.method.replace(" ", "_"), f"seed{r.seed}")
        assert r.cache["dataset"] == r.dataset and r.cache["seed"] == r.seed  # the seed draws the shots...
        assert (r.cache["model"], r.cache["pretrained"], r.cache["shots"], r.cache["classes"]) == ("ViT-B-16", "openai", 16, "base")
        assert r.cache["omega"] == (0 if r.method == "FT" else 6)
        if r.kind == "zeroshot":
            assert r.tune == {}
            continue
        assert r.tune["seed"] == r.seed  # ...and seeds the run
        assert r.tune["epochs"] == (5 if r.dataset in BIG_THREE else 20)
        assert (r.tune["batch_size"], r.tune["lr"], r.tune["lr_image"]) == (4, 2e-5, 5e-6)
        assert (r.tune["warmup_epochs"], r.tune["warmup_lr"], r.tune["momentum"], r.tune["weight_decay"]) == (1, 1e-6, 0.9, 5e-4)
        cfg = TuneConfig(**r.tune)
        cfg.validate()
        assert cfg.cskip.enabled == (r.method == "Skip Tuning")
        if cfg.cskip.enabled:
            assert (cfg.cskip.r, cfg.cskip.lam) == (0.5, 0.3)


@pytest.mark.parametrize("name, protocol, source, targets, runs", [
    ("paper-xd", "cross-dataset", ["imagenet"], [d for d in B2N_DATASETS if d != "imagenet"], 3 * 2),
    ("paper-dg", "domain-generalization", ["imagenet"], ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"], 3 * 2),
    ("paper-fewshot", "few-shot", B2N_DATASETS, [], 11 * 5 * 3 * 2),
])
def test_the_other_protocols_validate_and_expand_without_data(name, protocol, source, targets, runs):
    spec = load_pipeline(REPO / "pipelines" / f"{name}.toml")
    planned = plan_runs(spec)
    assert protocol_of(spec) == protocol and len(planned) == runs
    assert list(dict.fromkeys(r.dataset for r in planned)) == source
    assert sorted({r.seed for r in planned}) == [1, 2, 3]
    for r in planned:
        assert r.cache["classes"] == "all" and r.cache["omega"] == 6
        assert [t for t, _ in r.targets] == targets
        # A target's store: every class, the run's model and omega, one seed for all runs (shared).
        for _, settings in r.targets:
            assert (settings["classes"], settings["omega"], settings["seed"], settings["model"]) == ("all", 6, 1, "ViT-B-16")
        if r.kind == "tune":
            TuneConfig(**r.tune).validate()
    if protocol == "few-shot":
        assert sorted({r.shots for r in planned}) == [1, 2, 4, 8, 16]
        assert all(r.cache["shots"] == r.shots and r.parts[1] == f"shots{r.shots}" for r in planned)
        assert {(r.tune["epochs"], r.tune["lr"]) for r in planned if r.kind == "tune"} == {(40, 1e-5)}
    else:
        assert {r.cache["shots"] for r in planned} == {16}
        assert {r.tune["epochs"] for r in planned if r.kind == "tune"} == {5}  # ImageNet: a quarter of 20
        assert len({json.dumps(s, sort_keys=True) for r in planned for _, s in r.targets}) == len(targets)


def test_a_target_store_follows_the_seed_only_for_a_random_init(tmp_path):
    """Pretrained weights: one target store for every seed. `pretrained = "none"`: the seed is the
    model's random init, so the target is cached per seed (else the runs could not use it)."""
    body = 'protocol = "cross-dataset"\n' + TINY_CACHE + '[grid]\nseed = [1, 2]\n[[target]]\ndataset = "synthetic-sketch"\n' + ZS
    seeds = {r.targets[0][1]["seed"] for r in plan_runs(load_pipeline(write(tmp_path, body)))}
    assert seeds == {1, 2}
    body = body.replace('pretrained = "none"', 'pretrained = "synth"').replace('model = "tiny"', 'model = "synth-vit"')
    assert {r.targets[0][1]["seed"] for r in plan_runs(load_pipeline(write(tmp_path, body)))} == {1}


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_expands_into_runs_with_folders_of_their_own(path):
    runs = plan_runs(load_pipeline(path))
    assert runs and len({r.parts for r in runs}) == len(runs)
    assert len({(r.dataset, r.shots, r.seed, r.method) for r in runs}) == len(runs)


def test_the_synthetic_base_to_new_grid():
    runs = plan_runs(load_pipeline(REPO / "pipelines" / "synthetic-b2n.toml"))
    assert {(r.dataset, r.seed) for r in runs} == {(d, s) for d in ("synthetic-noise", "synthetic-palette") for s in (1, 2, 3)}


def test_a_grid_axis_set_on_the_command_line(tmp_path):
    spec = load_pipeline(write(tmp_path, TINY_CACHE + ZS), ["grid.seed=[3, 4]"])
    assert [r.seed for r in plan_runs(spec)] == [3, 4]
    assert [r.parts for r in plan_runs(spec)] == [("synthetic", "zs", "seed3"), ("synthetic", "zs", "seed4")]


def test_a_paper_grid_narrowed_on_the_command_line():
    """As the files' comments say: one dataset and seed of a paper grid (its per-dataset tables stay valid)."""
    spec = load_pipeline(REPO / "pipelines" / "paper-b2n.toml", ['grid.dataset=["imagenet", "dtd"]', "grid.seed=[2]"])
    runs = plan_runs(spec)
    assert [(r.dataset, r.seed, r.method) for r in runs if r.kind == "tune"] == [
        ("imagenet", 2, "Skip Tuning"), ("imagenet", 2, "FT"), ("dtd", 2, "Skip Tuning"), ("dtd", 2, "FT")]
    assert [r.tune["epochs"] for r in runs if r.kind == "tune"] == [5, 5, 20, 20]
    spec = load_pipeline(REPO / "pipelines" / "paper-fewshot.toml", ['grid.dataset=["eurosat"]', "grid.shots=[4]"])
    assert [(r.dataset, r.shots, r.seed) for r in plan_runs(spec) if r.kind == "tune"] == [("eurosat", 4, s) for s in (1, 2, 3)]


def test_default_output_folder_is_the_same_every_time():
    assert default_out("paper-b2n") == default_out("paper-b2n", ["name=paper-b2n"]) == Path("runs/pipelines/paper-b2n")
    variant = default_out("paper-b2n", ["grid.seed=[1]"])
    assert variant.parent == Path("runs/pipelines") and variant.name.startswith("paper-b2n-")
    assert variant == default_out("paper-b2n", ["grid.seed=[1]"]) != default_out("paper-b2n", ["grid.seed=[2]"])


# ------------------------------------------------------------------------------------ the table, by hand

def record(dataset, method, seed, shots=None, **accuracy):
    tuned = method != "zero-shot"
    return {"dataset": dataset, "method": method, "seed": seed, "shots": shots, "kind": "tune" if tuned else "zeroshot",
            "accuracy": accuracy, "tune_s": 10.0 * seed if tuned else None, "step_ms": 5.0 if tuned else None,
            "peak_mib": 100.0 * seed if tuned else None, "memory_method": "m" if tuned else None, "resumed": False}


def test_base_to_new_table_matches_a_hand_computation():
    # Two datasets x three seeds; H in a record is ignored: the table's H comes from the means.
    base_a, new_a = [80.0, 82.0, 84.0], [70.0, 71.0, 75.0]
    base_b, new_b = [60.0, 60.0, 63.0], [50.0, 56.0, 53.0]
    records = [record("a", "ST", s, base=b, new=n, H=0.0) for s, b, n in zip((1, 2, 3), base_a, new_a)]
    records += [record("b", "ST", s, base=b, new=n, H=0.0) for s, b, n in zip((1, 2, 3), base_b, new_b)]
    average, a, b = summarise(records, protocol="base-to-new")
    assert [(r["dataset"], r["method"], r["seeds"]) for r in (average, a, b)] == [
        ("Average", "ST", [1, 2, 3]), ("a", "ST", [1, 2, 3]), ("b", "ST", [1, 2, 3])]

    def pstd(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    def hm(x, y):
        return 2 * x * y / (x + y)

    assert a["values"]["base"] == pytest.approx([82.0, pstd(base_a)])  # 1.633: population std
    assert a["values"]["new"] == pytest.approx([72.0, pstd(new_a)])
    assert a["values"]["H"][0] == pytest.approx(hm(82.0, 72.0)) and a["values"]["H"][1] is None
    assert b["values"]["H"][0] == pytest.approx(hm(61.0, 53.0))
    # Average: the mean over datasets of base and of new; H of those (not the mean of the datasets' H).
    assert average["values"]["base"][0] == pytest.approx((82.0 + 61.0) / 2)
    assert average["values"]["new"][0] == pytest.approx((72.0 + 53.0) / 2)
    assert average["values"]["H"][0] == pytest.approx(hm(71.5, 62.5))
    assert average["values"]["H"][0] != pytest.approx((hm(82.0, 72.0) + hm(61.0, 53.0)) / 2)
    per_seed_base = [(x + y) / 2 for x, y in zip(base_a, base_b)]
    assert average["values"]["base"][1] == pytest.approx(pstd(per_seed_base))
    # Costs: mean time per run, the largest peak.
    assert a["tune_s"] == pytest.approx(20.0) and a["peak_mib"] == 300.0 and average["tune_s"] == pytest.approx(20.0)

    text = markdown_table(summarise(records, protocol="base-to-new"), protocol="base-to-new", title="t", records=records)
    assert "| a | ST | 82.00 ± 1.63 | 72.00 ± 2.16 | 76.68 | 20.0 | 5.0 | 300 |" in text
    assert f"| Average | ST | 71.50 ± {pstd(per_seed_base):.2f} |" in text
    lines = csv_table(summarise(records, protocol="base-to-new")).splitlines()
    assert lines[0] == "dataset,method,shots,seeds,base,base_std,new,new_std,H,H_std,tune_s,step_ms,peak_mib,resumed"
    assert lines[2].startswith("a,ST,,1 2 3,82.0000,1.6330,72.0000,2.1602,76.6753,,20.0000,5.0000,300.0000,false")


def test_the_paper_average_row_is_the_harmonic_mean_of_the_averages():
    """CoCoOp's Table 1, CLIP: the per-dataset base / new accuracies average to 69.34 / 74.22 and
    the published average H is 71.70, H(69.34, 74.22); the mean of the datasets' H is 71.59."""
    base = [72.43, 96.84, 91.17, 63.37, 72.08, 90.10, 27.19, 69.36, 53.24, 56.48, 70.53]
    new = [68.14, 94.00, 97.26, 74.89, 77.80, 91.22, 36.29, 75.35, 59.90, 64.05, 77.50]
    records = [record(d, "CLIP", 1, base=b, new=n) for d, b, n in zip(B2N_DATASETS, base, new)]
    average = summarise(records, protocol="base-to-new")[0]
    assert [round(average["values"][k][0], 2) for k in ("base", "new", "H")] == [69.34, 74.22, 71.70]


def test_transfer_table_has_the_source_every_target_and_their_average():
    targets = ["t1", "t2"]
    records = [record("src", "ST", s, all=a, t1=x, t2=y) for s, a, x, y in ((1, 90.0, 50.0, 70.0), (2, 92.0, 54.0, 70.0))]
    records += [record("src", "zero-shot", s, all=80.0, t1=60.0, t2=62.0) for s in (1, 2)]
    zs_row, st_row = sorted(summarise(records, protocol="cross-dataset", targets=targets), key=lambda r: r["method"] != "zero-shot")
    assert st_row["values"]["all"] == pytest.approx([91.0, 1.0])
    assert st_row["values"]["t1"] == pytest.approx([52.0, 2.0])
    assert st_row["values"]["target avg"] == pytest.approx([(52.0 + 70.0) / 2, 1.0])  # per seed: 60, 62
    assert zs_row["values"]["target avg"] == pytest.approx([61.0, 0.0]) and zs_row["tune_s"] is None
    text = markdown_table([st_row, zs_row], protocol="cross-dataset", targets=targets, title="xd", records=records)
    assert "| dataset | method | source | t1 | t2 | target avg | tune s | step ms | peak MiB |" in text
    assert "| src | ST | 91.00 ± 1.00 | 52.00 ± 2.00 | 70.00 ± 0.00 | 61.00 ± 1.00 | 15.0 | 5.0 | 200 |" in text
    assert "| src | zero-shot | 80.00 ± 0.00 | 60.00 ± 0.00 | 62.00 ± 0.00 | 61.00 ± 0.00 | – | – | – |" in text


def test_few_shot_table_has_a_row_per_shots_and_a_column_per_dataset():
    records = []
    for shots in (1, 4):
        for s in (1, 2):
            records.append(record("a", "zero-shot", s, shots, all=50.0))
            records.append(record("b", "zero-shot", s, shots, all=30.0))
            records.append(record("a", "ST", s, shots, all=60.0 + shots + s))
            records.append(record("b", "ST", s, shots, all=40.0 + shots - s))
    table = summarise(records, protocol="few-shot")
    assert [(r["method"], r["shots"]) for r in table] == [("zero-shot", 0), ("ST", 1), ("ST", 4)]
    one = table[1]["values"]
    assert one["a"] == pytest.approx([62.5, 0.5]) and one["b"] == pytest.approx([39.5, 0.5])
    assert one["average"] == pytest.approx([51.0, 0.0])  # per seed: (62 + 40) / 2 = 51, (63 + 39) / 2 = 51
    text = markdown_table(table, protocol="few-shot", title="fs", records=records)
    assert "| method | shots | a | b | average | tune s | step ms | peak MiB |" in text
    assert "| zero-shot | 0 | 50.00 ± 0.00 | 30.00 ± 0.00 | 40.00 ± 0.00 | – | – | – |" in text


# ------------------------------------------------------------------------------------ resuming

GRID_PIPELINE = 'name = "grid"\n' + TINY_CACHE + """
[grid]
seed = [1, 2]
""" + ZS_AND_SKIP


class Interrupted(Exception):
    pass


def counting(monkeypatch, fail_after: int | None = None) -> list:
    """Count the tuning runs the pipeline starts (each is a child process); with `fail_after`,
    the next one after that many raises, as a kill would stop the pipeline."""
    import skipcache.pipeline as pipeline

    calls: list = []
    real = pipeline.run_in_child

    def run_in_child(fn, *args):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("killed")
        calls.append(args[0]["out"])
        return real(fn, *args)

    monkeypatch.setattr(pipeline, "run_in_child", run_in_child)
    return calls


def accuracy_table(result: dict) -> list:
    return [(r["dataset"], r["method"], r["values"]) for r in result["table"]]


@pytest.mark.slow
def test_an_interrupted_pipeline_resumes_to_the_same_table_and_retrains_nothing(tmp_path, monkeypatch):
    path = write(tmp_path, GRID_PIPELINE)
    kwargs = dict(device="cpu", root=tmp_path / "store", progress=False, log=lambda line: None)
    with monkeypatch.context() as m:
        calls = counting(m)
        whole = run_pipeline(path, out=tmp_path / "whole", **kwargs)
    assert len(calls) == 2

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        calls = counting(m, fail_after=1)
        with pytest.raises(Interrupted):
            run_pipeline(path, out=out, **kwargs)
    assert calls == [str(out / "synthetic" / "Skip_Tuning" / "seed1")]
    assert (out / "synthetic" / "Skip_Tuning" / "seed1.json").is_file() and not (out / "results.md").exists()

    with monkeypatch.context() as m:  # the same command again: only the run that did not finish is trained
        calls = counting(m)
        resumed = run_pipeline(path, out=out, **kwargs)
    assert calls == [str(out / "synthetic" / "Skip_Tuning" / "seed2")]
    assert accuracy_table(resumed) == accuracy_table(whole)
    assert [r["seeds"] for r in resumed["table"]] == [[1, 2], [1, 2]]

    with monkeypatch.context() as m:  # once more: nothing is trained, the table is read back as it was
        calls = counting(m)
        again = run_pipeline(path, out=out, **kwargs)
    assert calls == [] and again["table"] == resumed["table"] and again["markdown"] == resumed["markdown"]

    # A run killed after its last checkpoint but before run.json: resumed from the checkpoint, not restarted.
    run_dir = out / "synthetic" / "Skip_Tuning" / "seed2"
    (run_dir / "run.json").unlink()
    with monkeypatch.context() as m:
        calls = counting(m)
        after = run_pipeline(path, out=out, **kwargs)
    assert calls == [str(run_dir)] and accuracy_table(after) == accuracy_table(whole)
    assert json.loads((out / "synthetic" / "Skip_Tuning" / "seed2.json").read_text())["resumed"] is True
    assert after["table"][1]["resumed"] and "†" in after["markdown"]

    # Other settings than the finished runs': refused before anything runs, naming the setting.
    with monkeypatch.context() as m:
        calls = counting(m)
        with pytest.raises(ConfigError, match=r"Skip_Tuning/seed1 .*was trained with other settings than the pipeline's: "
                                              r"lr 0\.05 -> 0\.1; delete that folder"):
            run_pipeline(path, out=out, overrides=["method.1.lr=0.1"], **kwargs)
    assert calls == []


def test_a_store_is_cached_once_and_found_again_without_the_cache_stage(tmp_path, monkeypatch):
    import skipcache.pipeline as pipeline

    cached = []
    real = pipeline.run_cache
    monkeypatch.setattr(pipeline, "run_cache", lambda cfg: cached.append(cfg.dataset) or real(cfg))
    settings = {"dataset": "synthetic", "dataset_options": {"num_classes": 4}, "model": "tiny", "pretrained": "none",
                "omega": 3, "shots": 1}
    stores = pipeline._Stores(tmp_path, tmp_path / "store", "cpu", False, lambda line: None)
    first = stores.get(settings)
    assert stores.get(dict(settings)) is first and cached == ["synthetic"]
    # A later run of the pipeline (same output folder): stores.json names it; no cache stage at all.
    again = pipeline._Stores(tmp_path, tmp_path / "store", "cpu", False, lambda line: None).get(settings)
    assert again.path == first.path and cached == ["synthetic"]
    # Another setting is another store.
    pipeline._Stores(tmp_path, tmp_path / "store", "cpu", False, lambda line: None).get(dict(settings, seed=2))
    assert cached == ["synthetic", "synthetic"]


def test_cli_run_without_out_uses_a_folder_named_after_the_pipeline(tmp_path, monkeypatch):
    """A zero-shot pipeline (no training): the markdown table is printed and saved under
    runs/pipelines/<name>, and running the same command again finds it there."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, 'name = "zs-only"\n' + TINY_CACHE + ZS)
    for _ in range(2):
        result = CliRunner().invoke(app, ["run", str(path), "--root", str(tmp_path / "store"), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        folder = tmp_path / "runs" / "pipelines" / "zs-only"
        assert result.stdout.startswith("### zs-only: base-to-new generalization (paper Table 1)\n")
        assert (folder / "results.md").read_text() in result.stdout
        assert (folder / "synthetic" / "zs" / "seed1.json").is_file()
    assert "reused" in result.stderr
