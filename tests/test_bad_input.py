"""Bad input on the command line and in pipeline files: one `error: ...` line, a non-zero exit
code, no traceback, and nothing already written is touched.

Each case here was first run against the code before its fix (see docs/reliability.md,
"Command line and pipeline files"); a traceback, a silent acceptance or a NaN run were the
failures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from skipcache.cli import app
from skipcache.errors import ConfigError
from skipcache.pipeline import load_pipeline, run_pipeline
from skipcache.stages.tune import TuneConfig

runner = CliRunner()
TINY = ["--model", "tiny", "--pretrained", "none", "--device", "cpu"]
TINY_CACHE = """
[cache]
dataset = "synthetic"
dataset_options = { num_classes = 6 }
model = "tiny"
pretrained = "none"
omega = 3
shots = 2
"""
ZS = '[[method]]\nname = "zs"\nkind = "zeroshot"\n'
FT = '[[method]]\nname = "FT"\nkind = "tune"\nepochs = 1\nwarmup_epochs = 0\n'


def invoke(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def error_line(result, exit_code: int | None = None) -> str:
    """The message of a user error: SystemExit, a non-zero code, nothing on stdout, exactly one
    `error: ...` line on stderr and no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code != 0 and (exit_code is None or result.exit_code == exit_code), (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: "):]


def snapshot(folder: Path) -> dict:
    """Every file under a folder with its bytes and mtime: equal snapshots mean nothing was touched."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A complete tiny store, a finished 1-epoch run on it, an image and a plain file."""
    from PIL import Image

    import skipcache

    base = tmp_path_factory.mktemp("bad_input")
    cached = skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 6}, model="tiny", pretrained="none", omega=3,
        shots=2, root=base / "store", device="cpu", progress=False))
    tuned = skipcache.tune(skipcache.TuneConfig(
        store=cached.path, out=base / "run", epochs=1, warmup_epochs=0, device="cpu", progress=False))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(base / "img.png")
    (base / "a_file").write_text("not a folder\n")
    return {"root": base / "store", "store": cached.path, "run": tuned.run_dir, "image": base / "img.png",
            "file": base / "a_file"}


# ------------------------------------------------------------------------- pipeline files: types

# (pipeline body, --set overrides, exact message with {path}). Each line is one way a file goes wrong.
BAD_SPECS = {
    "string omega": (TINY_CACHE.replace("omega = 3", 'omega = "four"') + ZS, [],
                     'pipeline {path}: cache.omega must be an integer, got "four"; e.g. omega = 6'),
    "float omega": (TINY_CACHE.replace("omega = 3", "omega = 3.5") + ZS, [],
                    "pipeline {path}: cache.omega must be an integer, got 3.5; e.g. omega = 6"),
    "negative omega": (TINY_CACHE.replace("omega = 3", "omega = -1") + ZS, [],
                       "pipeline {path}: cache.omega must be >= 0, got -1"),
    "negative workers": (TINY_CACHE + "workers = -2\n" + ZS, [],
                         "pipeline {path}: cache.workers must be >= 0, got -2"),
    "string shots": (TINY_CACHE.replace("shots = 2", 'shots = "all"') + ZS, [],
                     'pipeline {path}: cache.shots must be an integer, got "all"; e.g. shots = 16'),
    "options not a table": (TINY_CACHE.replace("{ num_classes = 6 }", "6") + ZS, [],
                            "pipeline {path}: cache.dataset_options must be a table, got 6; e.g. dataset_options = {{}}"),
    "bool model": (TINY_CACHE.replace('model = "tiny"', "model = true") + ZS, [],
                   'pipeline {path}: cache.model must be a string, got true; e.g. model = "ViT-B-16"'),
    "bad dtype": (TINY_CACHE + 'dtype = "int8"\n' + ZS, [],
                  "pipeline {path}: cache: dtype must be one of float16, bfloat16, float32, got 'int8'"),
    "cache a scalar": ("cache = 5\n" + ZS, [], "pipeline {path}: cache must be a table ([cache]), got 5"),
    "cache an array": (TINY_CACHE.replace("[cache]", "[[cache]]") + ZS, [],
                       "pipeline {path}: cache must be a table ([cache]), got an array of tables; write it once as [cache]"),
    "method a table": (TINY_CACHE + ZS.replace("[[method]]", "[method]"), [],
                       "pipeline {path}: method must be an array of tables ([[method]]), got a table; "
                       "write [[method]] (double brackets) above each method"),
    "method a list of numbers": ("method = [1, 2]\n" + TINY_CACHE, [],
                                 "pipeline {path}: method.0 must be a table ([[method]]), got 1"),
    "target a table": (TINY_CACHE + '[target]\ndataset = "synthetic"\n' + ZS, [],
                       "pipeline {path}: target must be an array of tables ([[target]]), got a table; "
                       "write [[target]] (double brackets) above each target"),
    "target dataset a number": (TINY_CACHE + "[[target]]\ndataset = 3\n" + ZS, [],
                                "pipeline {path}: target.0.dataset must be a string, got 3"),
    "two targets one name": (TINY_CACHE + '[[target]]\ndataset = "synthetic"\n' * 2 + ZS, [],
                             "pipeline {path}: target name 'synthetic' is used twice; give each [[target]] its own name = \"...\""),
    "target named like a metric": (TINY_CACHE + '[[target]]\ndataset = "synthetic"\nname = "new"\n' + ZS, [],
                                   "pipeline {path}: target name 'new' is also a column of the result table; "
                                   "give the [[target]] another name = \"...\""),
    "name a number": ("name = 5\n" + TINY_CACHE + ZS, [], "pipeline {path}: name must be a string, got 5"),
    "method name a number": (TINY_CACHE + '[[method]]\nname = 5\nkind = "zeroshot"\n', [],
                             "pipeline {path}: method.0.name must be a string, got 5"),
    "string epochs": (TINY_CACHE + ZS + FT.replace("epochs = 1", 'epochs = "x"'), [],
                      'pipeline {path}: method.1.epochs must be an integer, got "x"; e.g. epochs = 20'),
    "list lr": (TINY_CACHE + ZS + FT + "lr = [1]\n", [],
                "pipeline {path}: method.1.lr must be a number, got [1]; e.g. lr = 2e-05"),
    "bool batch size": (TINY_CACHE + ZS + FT + "batch_size = true\n", [],
                        "pipeline {path}: method.1.batch_size must be an integer, got true; e.g. batch_size = 4"),
    "string cskip": (TINY_CACHE + ZS + FT + 'cskip = "no"\n', [],
                     "pipeline {path}: method.1 ('FT'): cskip must be true, false or a table of CSkip settings, got 'no'"),
    "nan lr": (TINY_CACHE + ZS + FT + "lr = nan\n", [],
               "pipeline {path}: method.1 ('FT'): lr must be a finite number > 0, got nan; e.g. 2e-5"),
    "inf lr_image": (TINY_CACHE + ZS + FT + "lr_image = inf\n", [],
                     "pipeline {path}: method.1 ('FT'): lr_image must be a finite number > 0 or unset (lr / 4), got inf; e.g. 5e-6"),
    "negative momentum": (TINY_CACHE + ZS + FT + "momentum = -0.5\n", [],
                          "pipeline {path}: method.1 ('FT'): momentum must be in [0, 1), got -0.5; e.g. 0.9"),
    "zero epochs": (TINY_CACHE + ZS + FT.replace("epochs = 1", "epochs = 0"), [],
                    "pipeline {path}: method.1 ('FT'): epochs must be >= 1 (a whole number), got 0; e.g. 20"),
    "negative method shots": (TINY_CACHE + ZS + FT + "shots = -1\n", [],
                              "pipeline {path}: method.1 ('FT'): shots must be >= 0 (0: all images), got -1"),
    "negative method omega": (TINY_CACHE + ZS + FT + "omega = -2\n", [],
                              "pipeline {path}: method.1.omega must be >= 0, got -2"),
    "tune field on a zeroshot method": (TINY_CACHE + ZS + "epochs = 3\n", [],
                                        "pipeline {path}: method 'zs' is kind zeroshot and takes only name, kind, omega, shots; "
                                        "drop ['epochs'] or use kind = \"tune\""),
    # --set: a sub-key of something that is not a table, a whole table, a table that is not there.
    "set a field of a string": (TINY_CACHE + ZS, ["name.x=1"],
                                "override 'name.x=1': name is a string, not a table; use --set name=VALUE"),
    "set a field of an integer": (TINY_CACHE + ZS, ["cache.omega.x=1"],
                                  "override 'cache.omega.x=1': cache.omega is an integer, not a table; use --set cache.omega=VALUE"),
    "set a whole method": (TINY_CACHE + ZS, ["method.0=1"],
                           "override 'method.0=1': method.0 is a table; set one of its fields, e.g. --set method.0.epochs=5"),
    "set a target that is not there": (TINY_CACHE + ZS, ["target.0.dataset=dtd"],
                                       "override 'target.0.dataset=dtd': no item 0 (there are 0)"),
    "set an unknown field": (TINY_CACHE + ZS, ["cache.omgea=2"],
                             "pipeline {path}: unknown [cache] field(s) ['omgea']; allowed: ALLOWED"),
    "set a string where an integer goes": (TINY_CACHE + ZS, ["cache.omega=four"],
                                           'pipeline {path}: cache.omega must be an integer, got "four"; e.g. omega = 6'),
    "set nan": (TINY_CACHE + ZS + FT, ["method.1.lr=nan"],
                "pipeline {path}: method.1 ('FT'): lr must be a finite number > 0, got nan; e.g. 2e-5"),
    # The grid ([grid] axes), the per-dataset tables and the protocol: checked before anything runs.
    "grid a scalar": ("grid = 5\n" + TINY_CACHE + ZS, [], "pipeline {path}: grid must be a table ([grid]), got 5"),
    "unknown grid axis": (TINY_CACHE + ZS + "[grid]\nseeds = [1]\n", [],
                          "pipeline {path}: unknown [grid] axis(es) ['seeds']; allowed: ['dataset', 'seed', 'shots']"),
    "grid axis a scalar": (TINY_CACHE + ZS + "[grid]\nseed = 1\n", [],
                           "pipeline {path}: grid.seed must be a non-empty array, got 1; e.g. seed = [1, 2, 3]"),
    "grid axis empty": (TINY_CACHE + ZS + "[grid]\ndataset = []\n", [],
                        'pipeline {path}: grid.dataset must be a non-empty array, got []; e.g. dataset = ["dtd", "eurosat"]'),
    "grid seed a string": (TINY_CACHE + ZS + '[grid]\nseed = [1, "2"]\n', [],
                           'pipeline {path}: grid.seed.1 must be an integer, got "2"'),
    "grid seed negative": (TINY_CACHE + ZS + "[grid]\nseed = [-1]\n", [],
                           "pipeline {path}: grid.seed.0 must be a whole number in [0, 2**32), got -1"),
    "grid dataset a number": (TINY_CACHE + ZS + "[grid]\ndataset = [3]\n", [],
                              "pipeline {path}: grid.dataset.0 must be a string, got 3"),
    "grid shots negative": (TINY_CACHE.replace("shots = 2\n", "") + ZS + "[grid]\nshots = [4, -1]\n", [],
                            "pipeline {path}: grid.shots.1 must be >= 0 (0: all images), got -1"),
    "grid seed twice": (TINY_CACHE + ZS + "[grid]\nseed = [1, 2, 1]\n", [],
                        "pipeline {path}: grid.seed has 1 more than once; each value is one cell of the grid"),
    "grid axis also in cache": (TINY_CACHE + ZS + "[grid]\nshots = [1, 2]\n", [],
                                "pipeline {path}: cache.shots and grid.shots are both set; the grid sets it for every run: "
                                "drop cache.shots"),
    "grid axis also in a method": (TINY_CACHE + ZS + FT + "seed = 3\n[grid]\nseed = [1, 2]\n", [],
                                   "pipeline {path}: method.1.seed and grid.seed are both set; the grid sets it for every run: "
                                   "drop method.1.seed"),
    "set a grid axis in a file without": (TINY_CACHE + ZS, ["grid.seed=1"],
                                          "pipeline {path}: grid.seed must be a non-empty array, got 1; e.g. seed = [1, 2, 3]"),
    "per_dataset of an unknown dataset": (TINY_CACHE + ZS + FT + "[per_dataset.dtdd]\nepochs = 5\n", [],
                                          "pipeline {path}: per_dataset.dtdd: 'dtdd' is neither a dataset of this pipeline "
                                          "nor a registered one (`skipcache datasets`); its datasets: synthetic"),
    "per_dataset a scalar": (TINY_CACHE + ZS + FT + "[per_dataset]\nsynthetic = 5\n", [],
                             "pipeline {path}: per_dataset.synthetic must be a table ([per_dataset.synthetic]), got 5"),
    "per_dataset unknown field": (TINY_CACHE + ZS + FT + "[per_dataset.synthetic]\nepoch = 5\n", [],
                                  "pipeline {path}: per_dataset.synthetic has unknown field(s) ['epoch']; it takes the tune "
                                  "methods' settings (epochs, lr...) and cache = {{...}}"),
    "per_dataset field of the wrong type": (TINY_CACHE + ZS + FT + '[per_dataset.synthetic]\nepochs = "x"\n', [],
                                            'pipeline {path}: per_dataset.synthetic.epochs must be an integer, got "x"; '
                                            "e.g. epochs = 20"),
    "per_dataset cache sets a grid axis": (TINY_CACHE + ZS + FT + "[per_dataset.synthetic]\ncache = { seed = 2 }\n", [],
                                           "pipeline {path}: per_dataset.synthetic.cache.seed: set seed in [cache] or [grid], "
                                           "not per dataset"),
    "per_dataset cache unknown field": (TINY_CACHE + ZS + FT + "[per_dataset.synthetic]\ncache = { omgea = 2 }\n", [],
                                        "pipeline {path}: unknown per_dataset.synthetic.cache field(s) ['omgea']; allowed: ALLOWED"),
    "per_dataset makes a run invalid": (TINY_CACHE + ZS + FT + "[per_dataset.synthetic]\nlr = -1.0\n", [],
                                        "pipeline {path}: per_dataset.synthetic with method.1 ('FT'): lr must be a finite "
                                        "number > 0, got -1.0; e.g. 2e-5"),
    "unknown protocol": ('protocol = "b2n"\n' + TINY_CACHE + ZS, [],
                         "pipeline {path}: protocol must be one of base-to-new, cross-dataset, domain-generalization, "
                         "few-shot, got 'b2n'"),
    "cross-dataset without targets": ('protocol = "cross-dataset"\n' + TINY_CACHE + ZS, [],
                                      "pipeline {path}: protocol 'cross-dataset' is evaluated on targets: add [[target]] tables"),
    "few-shot without a shots axis": ('protocol = "few-shot"\n' + TINY_CACHE + ZS, [],
                                      'pipeline {path}: protocol "few-shot" needs a shots axis: [grid] shots = [1, 2, 4, 8, 16]'),
    "base-to-new on every class": ('protocol = "base-to-new"\n' + TINY_CACHE + 'classes = "all"\n' + ZS, [],
                                   'pipeline {path}: protocol "base-to-new" trains on the base classes: set cache.classes = "base"'),
    "two methods, one run folder": (TINY_CACHE + '[[method]]\nname = "a b"\nkind = "zeroshot"\n'
                                    '[[method]]\nname = "a_b"\nkind = "zeroshot"\n', [],
                                    "pipeline {path}: methods 'a b' and 'a_b' would share the run folder 'a_b'; rename one"),
}


def _expected(message: str, path: Path) -> str:
    from dataclasses import fields

    from skipcache.stages.cache import CacheConfig

    return message.format(path=path).replace("ALLOWED", str(sorted(f.name for f in fields(CacheConfig))))


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_pipeline_spec_names_the_field(tmp_path, case):
    body, overrides, message = BAD_SPECS[case]
    path = tmp_path / "p.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, overrides)
    assert str(info.value) == _expected(message, path)


def test_setting_the_name_of_a_pipeline(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "a"\n' + TINY_CACHE + ZS)
    assert load_pipeline(path, ["name=b"])["name"] == "b"


@pytest.mark.parametrize("content, message", [
    (b'name = "\xff"\n', "pipeline {path} is not UTF-8 text ({reason}); save it as UTF-8"),
    (None, "pipeline {path} is a folder, not a file; pass a .toml file such as pipelines/demo.toml"),
], ids=["not-utf8", "a-folder"])
def test_unreadable_pipeline_file(tmp_path, content, message):
    path = tmp_path / "p.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    if content is not None:
        reason = "'utf-8' codec can't decode byte 0xff in position 8: invalid start byte"
        assert str(info.value) == message.format(path=path, reason=reason)
    else:
        assert str(info.value) == message.format(path=path)


@pytest.mark.parametrize("case", ["string epochs", "cache a scalar", "method a table", "nan lr", "set a field of a string",
                                  "toml syntax", "missing file"])
def test_cli_run_with_a_bad_pipeline_writes_nothing(tmp_path, case):
    """One line, exit 2, and no output folder and no store: the spec is checked before any stage runs."""
    path = tmp_path / "p.toml"
    if case == "toml syntax":
        path.write_text(TINY_CACHE + "[[method]\n")
        overrides, expected = [], None
    elif case == "missing file":
        overrides, expected = [], f"pipeline file not found: {path}; see pipelines/ for examples"
    else:
        body, overrides, message = BAD_SPECS[case]
        path.write_text(body)
        expected = _expected(message, path)
    args = ["run", path, "--out", tmp_path / "out", "--root", tmp_path / "store", "--device", "cpu"]
    for o in overrides:
        args += ["--set", o]
    message = error_line(invoke(*args), 2)
    if expected is None:
        assert message.startswith(f"pipeline {path} is not valid TOML: ")
    else:
        assert message == expected
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_a_bad_later_method_stops_the_pipeline_before_the_first_runs(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(TINY_CACHE + ZS + FT + "lr = -1.0\n")
    with pytest.raises(ConfigError, match=r"method\.1 \('FT'\): lr must be a finite number > 0, got -1.0"):
        run_pipeline(path, out=tmp_path / "out", device="cpu", root=tmp_path / "store", progress=False, log=lambda *a: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_a_bad_pipeline_leaves_an_earlier_output_folder_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": []}\n')
    before = snapshot(out)
    path = tmp_path / "p.toml"
    path.write_text(TINY_CACHE + ZS + FT.replace("epochs = 1", 'epochs = "x"'))
    error_line(invoke("run", path, "--out", out, "--root", tmp_path / "store", "--device", "cpu"), 2)
    assert snapshot(out) == before


def test_cli_run_with_a_bad_device_or_root(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(TINY_CACHE + ZS)
    assert error_line(invoke("run", path, "--out", tmp_path / "out", "--device", "garbage"), 2) == \
        "unknown device 'garbage'; use auto, cpu, cuda or cuda:N"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert error_line(invoke("run", path, "--out", tmp_path / "out", "--root", a_file, "--device", "cpu"), 2) == \
        f"store root {a_file} is a file, not a folder; pass --root DIR or set SKIPCACHE_STORE to a folder"
    assert error_line(invoke("run", path, "--out", tmp_path / "out", "--device", "cpu", env={"SKIPCACHE_STORE": str(a_file)}), 2) == \
        f"store root {a_file} (from $SKIPCACHE_STORE) is a file, not a folder; set SKIPCACHE_STORE to a folder or pass --root DIR"
    in_file = tmp_path / "q.toml"
    in_file.write_text(TINY_CACHE + f"root = {json.dumps(str(a_file))}\n" + ZS)
    assert error_line(invoke("run", in_file, "--out", tmp_path / "out", "--device", "cpu"), 2) == \
        f"store root {a_file} (cache.root) is a file, not a folder; fix cache.root in {in_file} or pass --root DIR"
    assert not (tmp_path / "out").exists() and a_file.read_text() == "x"


# --------------------------------------------------------------------- tune settings (library)

# (field, value, start of the message). NaN and infinity compare False with everything, so
# `lr <= 0` let them through and the run wrote NaN weights.
BAD_TUNE = [
    ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
    ("lr", float("inf"), "lr must be a finite number > 0, got inf"),
    ("lr", -1.0, "lr must be a finite number > 0, got -1.0"),
    ("lr", "0.1", 'lr must be a finite number > 0, got "0.1"'),
    ("lr_image", float("nan"), "lr_image must be a finite number > 0 or unset (lr / 4), got nan"),
    ("lr_image", float("-inf"), "lr_image must be a finite number > 0 or unset (lr / 4), got -inf"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0, got nan"),
    ("weight_decay", -1e-4, "weight_decay must be a finite number >= 0, got -0.0001"),
    ("momentum", float("inf"), "momentum must be in [0, 1), got inf"),
    ("momentum", -0.1, "momentum must be in [0, 1), got -0.1"),
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("warmup_lr", float("nan"), "warmup_lr must be a finite number >= 0, got nan"),
    ("warmup_lr", -1e-6, "warmup_lr must be a finite number >= 0, got -1e-06"),
    ("cskip", {"r": float("nan")}, "cskip.r must be in (0, 1], got nan"),
    ("cskip", {"r": float("inf")}, "cskip.r must be in (0, 1], got inf"),
    ("cskip", {"lam": float("nan")}, "cskip.lam must be > 0 and finite, got nan"),
    ("cskip", {"lam": float("inf")}, "cskip.lam must be > 0 and finite, got inf"),
    ("epochs", 0, "epochs must be >= 1 (a whole number), got 0"),
    ("epochs", 2.5, "epochs must be >= 1 (a whole number), got 2.5"),
    ("batch_size", 0, "batch_size must be >= 1 (a whole number), got 0"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0 (a whole number), got -1"),
    ("seed", -1, "seed must be a whole number in [0, 2**32), got -1"),
    ("seed", 2**40, f"seed must be a whole number in [0, 2**32), got {2**40}"),
    ("omega", -1, "omega must be >= 0 (a whole number) or unset, got -1"),
]


@pytest.mark.parametrize("name, value, message", BAD_TUNE, ids=[f"{n}={v}" for n, v, _ in BAD_TUNE])
def test_tune_config_rejects_non_finite_and_out_of_range_values(name, value, message):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**{name: value}).validate()
    assert str(info.value).startswith(message)


def test_tune_config_accepts_the_defaults_and_edge_values():
    TuneConfig().validate()
    TuneConfig(lr=1, lr_image=None, weight_decay=0, momentum=0, warmup_lr=0, warmup_epochs=0, seed=0, omega=0).validate()


def test_tune_config_with_an_out_that_is_a_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError) as info:
        TuneConfig(out=a_file).validate()
    assert str(info.value) == f"out {a_file} is a file; pass --out a new or empty folder for the run"


# ----------------------------------------------------------------------- numeric CLI options

# (command line after the command's positional arguments, start of the message).
BAD_TUNE_OPTIONS = [
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lr-image", "nan"], "lr_image must be a finite number > 0 or unset (lr / 4), got nan"),
    (["--lr-image", "-inf"], "lr_image must be a finite number > 0 or unset (lr / 4), got -inf"),
    (["--r", "nan"], "--r (cskip.r) must be in (0, 1], got nan"),
    (["--r", "inf"], "--r (cskip.r) must be in (0, 1], got inf"),
    (["--lam", "nan"], "--lam (cskip.lam) must be > 0 and finite, got nan"),
    (["--lam", "inf"], "--lam (cskip.lam) must be > 0 and finite, got inf"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
    (["--momentum", "nan"], "momentum must be in [0, 1), got nan"),
    (["--momentum", "-0.5"], "momentum must be in [0, 1), got -0.5"),
    (["--warmup-lr", "inf"], "warmup_lr must be a finite number >= 0, got inf"),
    (["--warmup-lr", "-1"], "warmup_lr must be a finite number >= 0, got -1.0"),
    (["--epochs", "-1"], "epochs must be >= 1 (a whole number), got -1"),
    (["--batch-size", "0"], "batch_size must be >= 1 (a whole number), got 0"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be >= 0 (a whole number), got -1"),
    (["--max-top", "0"], "--max-top (cskip.max_top) must be an integer >= 1 or unset, got 0"),
    (["--seed", "-1"], "seed must be a whole number in [0, 2**32), got -1"),
    (["--omega", "-1"], "omega must be >= 0 (a whole number) or unset, got -1"),
]


@pytest.mark.parametrize("args, message", BAD_TUNE_OPTIONS, ids=[" ".join(a) for a, _ in BAD_TUNE_OPTIONS])
def test_tune_option_out_of_range_writes_no_weights(tmp_path, tiny, args, message):
    out = tmp_path / "run"
    # Click keeps the last of a repeated option: the bad value wins over the quick defaults before it.
    got = error_line(invoke("tune", tiny["store"], "--epochs", "1", "--warmup-epochs", "0", *args, "--out", out, "--device", "cpu"), 2)
    assert got.startswith(message), got
    assert not out.exists()


def test_tune_with_nan_into_a_finished_run_touches_nothing(tiny):
    before = snapshot(tiny["run"])
    assert error_line(invoke("tune", tiny["store"], "--out", tiny["run"], "--resume", "--lr", "nan", "--device", "cpu"), 2) \
        .startswith("lr must be a finite number > 0, got nan")
    assert snapshot(tiny["run"]) == before


def test_tune_out_that_is_a_file(tiny):
    assert error_line(invoke("tune", tiny["store"], "--out", tiny["file"], "--device", "cpu"), 2) == \
        f"out {tiny['file']} is a file; pass --out a new or empty folder for the run"


@pytest.mark.parametrize("args, message", [
    (["--workers", "-1"], "--workers must be >= 0, got -1; pass 0 to decode images in the main process"),
    (["--omega", "-1"], "omega must be >= 0 (frozen blocks per tower), got -1"),
    (["--shots", "-1"], "shots must be >= 0 (0: all images), got -1"),
    (["--views", "0"], "views must be >= 1, got 0"),
    (["--batch-size", "0"], "batch size must be >= 1, got 0"),
], ids=["workers", "omega", "shots", "views", "batch-size"])
def test_cache_option_out_of_range(tmp_path, args, message):
    root = tmp_path / "store"
    base = ["cache", "--dataset", "synthetic", "-o", "num_classes=4", *TINY, "--omega", "2", "--root", root]
    assert error_line(invoke(*base, *args), 2) == message
    assert not root.exists() or not any(root.rglob("*.zarr*"))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0; e.g. --batch-size 256"),
    (["--batch-size", "-3"], "--batch-size must be >= 1, got -3; e.g. --batch-size 256"),
], ids=["batch-0", "batch-neg"])
def test_eval_option_out_of_range(tiny, args, message):
    before = snapshot(tiny["run"])
    assert error_line(invoke("eval", tiny["run"], *args, "--device", "cpu"), 2) == message
    assert snapshot(tiny["run"]) == before


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "--top-k must be >= 1, got 0; e.g. --top-k 5"),
    (["--top-k", "-3"], "--top-k must be >= 1, got -3; e.g. --top-k 5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0; e.g. --batch-size 32"),
], ids=["top-k-0", "top-k-neg", "batch-0"])
def test_predict_option_out_of_range(tiny, args, message):
    assert error_line(invoke("predict", tiny["run"], tiny["image"], *args, "--device", "cpu"), 2) == message


@pytest.mark.parametrize("device, message", [
    ("garbage", "unknown device 'garbage'; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", "unknown device 'cuda:x'; use auto, cpu, cuda or cuda:N"),
    ("meta", "device 'meta' is not supported; use auto, cpu, cuda or cuda:N"),
    ("", "unknown device ''; use auto, cpu, cuda or cuda:N"),
], ids=["garbage", "cuda-x", "meta", "empty"])
@pytest.mark.parametrize("command", ["cache", "tune", "eval", "predict"])
def test_garbage_device(tmp_path, tiny, command, device, message):
    args = {
        "cache": ["cache", "--dataset", "synthetic", "-o", "num_classes=4", "--model", "tiny", "--pretrained", "none",
                  "--omega", "2", "--root", tmp_path / "store"],
        "tune": ["tune", tiny["store"], "--epochs", "1", "--warmup-epochs", "0", "--out", tmp_path / "run"],
        "eval": ["eval", tiny["run"]],
        "predict": ["predict", tiny["run"], tiny["image"]],
    }[command]
    assert error_line(invoke(*args, "--device", device), 2) == message
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------- the store root

ROOT_COMMANDS = ["cache", "tune", "run", "ls", "inspect", "verify"]


@pytest.mark.parametrize("command", ROOT_COMMANDS)
def test_every_store_command_takes_root(command):
    params = get_command(app).commands[command].params
    assert any("--root" in p.opts for p in params if p.param_type_name == "option"), f"{command} has no --root"


def test_ls_inspect_verify_and_tune_with_root(tmp_path, tiny):
    listed = json.loads(invoke("ls", "--root", tiny["root"], "--json").stdout)
    assert [Path(e["path"]) for e in listed] == [tiny["store"]]
    # The paths `ls` prints are relative to the root: inspect and verify take them with --root.
    rel = tiny["store"].relative_to(tiny["root"])
    summary = json.loads(invoke("inspect", rel, "--root", tiny["root"], "--json").stdout)
    assert Path(summary["path"]) == tiny["store"]
    result = invoke("verify", rel, "--root", tiny["root"])
    assert result.exit_code == 0 and result.stdout.replace("\n", "") == f"ok: {tiny['store']}"
    # ... and so does tune.
    out = tmp_path / "run"
    result = invoke("tune", rel, "--root", tiny["root"], "--epochs", "1", "--warmup-epochs", "0", "--out", out,
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["store"]) == tiny["store"]


def test_ls_takes_the_root_from_the_environment(tiny):
    listed = json.loads(invoke("ls", "--json", env={"SKIPCACHE_STORE": str(tiny["root"])}).stdout)
    assert [Path(e["path"]) for e in listed] == [tiny["store"]]


def test_ls_with_the_root_as_an_argument_says_to_use_root(tiny):
    assert error_line(invoke("ls", tiny["root"]), 2) == \
        f"pass the store root with --root: skipcache ls --root {tiny['root']}"


@pytest.mark.parametrize("command", ["cache", "tune", "ls", "inspect", "verify"])
def test_root_that_is_a_file(tmp_path, tiny, command):
    a_file = tiny["file"]
    args = {
        "cache": ["cache", "--dataset", "synthetic", "-o", "num_classes=4", *TINY, "--omega", "2"],
        "tune": ["tune", "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu"],
        "ls": ["ls"],
        "inspect": ["inspect", "synthetic/x.zarr"],
        "verify": ["verify", "synthetic/x.zarr"],
    }[command]
    assert error_line(invoke(*args, "--root", a_file), 2) == \
        f"store root {a_file} is a file, not a folder; pass --root DIR or set SKIPCACHE_STORE to a folder"
    assert error_line(invoke(*args, env={"SKIPCACHE_STORE": str(a_file)}), 2) == \
        f"store root {a_file} (from $SKIPCACHE_STORE) is a file, not a folder; set SKIPCACHE_STORE to a folder or pass --root DIR"
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- malformed command lines


@pytest.mark.parametrize("args, pattern", [
    (["tune", "--lr", "abc"], r"Invalid value for '--lr': .*number.*; see `\S+ tune --help`"),
    (["cache", "--omega", "four", "--dataset", "synthetic"],
     r"Invalid value for '--omega': .*integer.*; see `\S+ cache --help`"),
    (["cache"], r"Missing option '--dataset'; see `\S+ cache --help`"),
    (["ls", "--nope"], r"No such option: --nope; see `\S+ ls --help`"),
    (["nosuchcommand"], r"No such command 'nosuchcommand'; see `\S+ --help`"),
], ids=["bad-float", "bad-int", "missing-option", "unknown-option", "unknown-command"])
def test_malformed_command_line_is_one_line(args, pattern):
    assert re.fullmatch(pattern, error_line(invoke(*args), 2))


def test_no_arguments_still_prints_help():
    result = invoke()
    assert "Usage" in result.output and "cache" in result.output
