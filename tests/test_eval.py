"""`skipcache eval` names the method that trained the run, from the run's own settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import skipcache
from skipcache.cli import app
from skipcache.stages.evaluate import method_name

runner = CliRunner()


@pytest.mark.parametrize("omega, cskip, name", [
    (0, False, "FT"),
    (0, True, "FT + CSkip"),
    (4, False, "LSkip"),
    (4, True, "Skip Tuning"),
])
def test_method_name(omega, cskip, name):
    assert method_name(omega, cskip) == name


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("eval_stores")
    return {omega: skipcache.cache(skipcache.CacheConfig(
        dataset="synthetic", dataset_options={"num_classes": 4, "test_per_class": 2}, model="tiny",
        pretrained="none", omega=omega, shots=2, classes="base", root=root, device="cpu", progress=False)).path
        for omega in (0, 5)}


@pytest.mark.parametrize("omega, cskip, name", [
    (0, False, "FT"),
    (0, True, "FT + CSkip"),
    (5, False, "LSkip"),
    (5, True, "Skip Tuning"),
])
def test_eval_prints_the_method_of_the_run(tmp_path, stores, omega, cskip, name):
    run = skipcache.tune(skipcache.TuneConfig(store=stores[omega], out=tmp_path / "run", epochs=1, warmup_epochs=0,
                                              cskip=cskip, device="cpu", progress=False)).run_dir
    table = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert table.exit_code == 0, table.output
    rows = {line.split("│")[1].strip() for line in table.stdout.splitlines() if line.count("│") > 2}
    assert rows == {"zero-shot", name}
    as_json = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["method"] == name
    assert json.loads((run / "eval.json").read_text())["method"] == name
