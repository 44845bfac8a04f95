"""The benchmarks' output, never their speed: `skipcache bench --preset tiny` reports every method
with the schema the report and the docs rely on; `python -m skipcache.bench.components --quick`
reports every configuration. No timing assertion beyond a number being positive.
"""

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from skipcache.bench import CONFIGS, TRAIN_CONFIGS
from skipcache.bench.methods import METHOD_ORDER, PAPER, PRESETS, ROW, findings, row_omega
from skipcache.bench.report import render_markdown, write_plots

SKIPCACHE_BIN = Path(sys.executable).with_name("skipcache")
METHOD_KEYS = {"name", "label", "step_time_s", "epoch_time_s", "steps_per_epoch", "peak_memory_mib", "memory_method",
               "trainable_params", "accuracy", "omega", "paper", "text_classes_per_step", "weights_mib"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_tiny")
    proc = subprocess.run([str(SKIPCACHE_BIN), "bench", "--preset", "tiny", "--device", "cpu", "--threads", "1", "--json",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout), proc


@pytest.mark.slow
def test_tiny_preset_reports_every_method(tiny_report):
    out, report, proc = tiny_report
    assert json.loads((out / "bench.json").read_text()) == report  # --json prints what it writes
    assert report["meta"]["preset"] == "tiny" and report["config"]["cost"]["model"] == "tiny"
    assert {"device", "device_name", "python", "versions", "date_utc"} <= set(report["machine"])
    assert report["machine"]["versions"]["torch"]
    methods = {r["name"]: r for r in report["methods"]}
    assert list(methods) == list(METHOD_ORDER)
    for name, r in methods.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert METHOD_KEYS <= set(r), f"{name} lacks {METHOD_KEYS - set(r)}"
        assert r["step_time_s"] > 0 and r["peak_memory_mib"] > 0 and r["trainable_params"] > 0
        assert r["epoch_time_s"] == pytest.approx(r["step_time_s"] * r["steps_per_epoch"])
        assert r["memory_method"].startswith("CPU:")
        assert r["paper"] == (PAPER[ROW[name].paper] if ROW[name].paper else None)
        assert r["method"] == ROW[name].method
        assert set(r["accuracy"]) == {"base", "new", "H"}, name  # every row, the uncached ones from their cached twin
        assert all(0 <= v <= 100 for v in r["accuracy"].values())
        assert "accuracy_error" not in r
        if ROW[name].accuracy_from:
            assert r["accuracy_from"] == ROW[name].accuracy_from and r["accuracy"] == methods[r["accuracy_from"]]["accuracy"]
        else:
            assert "accuracy_from" not in r and r["tune_s"] > 0
    # each row ran at its own omega: FT and LoRA every block, the cached CoOp and CLIP-Adapter none
    depth = report["meta"]["model_depth"]
    assert {n: r["omega"] for n, r in methods.items()} == {n: row_omega(n, depth) for n in methods}
    assert methods["coop"]["method_options"]["full_context"] is True and methods["coop-cached"]["method_options"]["full_context"] is False
    # what each method trains, as the paper describes them
    p = {n: methods[n]["trainable_params"] for n in methods}
    assert p["coop"] == p["coop-cached"] < p["clip-adapter"] == p["clip-adapter-cached"] < p["lora"] < p["skip-tuning"]
    assert p["skip-tuning"] < p["ft"] == p["ft-cskip"] == p["ft-conventional"]
    assert p["fast"] < p["skip-tuning"] == p["ft-lskip"] == p["paper-schedule"]
    assert methods["ft-conventional"]["time_vs_ft"] == 1.0 and methods["skip-tuning"]["paper_time_vs_ft"] == pytest.approx(239 / 1002)
    assert report["meta"]["reference"] == "ft-conventional" and report["findings"][0].startswith("Skip Tuning against FT, conventional")
    assert report["accuracy_task"]["converged"] is False and set(report["accuracy_task"]["zeroshot"]) >= {"base", "new", "H"}
    sweeps = report["sweeps"]
    assert [(r["method"], r["classes"]) for r in sweeps["classes"]] == [("skip-tuning", 10), ("skip-tuning", 100)]
    assert [(r["method"], r["omega"]) for r in sweeps["omega"]] == [("skip-tuning", 0), ("skip-tuning", 6)]
    assert all(r["step_time_s"] > 0 for rows in sweeps.values() for r in rows)
    md = (out / "report.md").read_text()
    assert "Table 4 layout" in md and "Table 5 layout" in md and "torchinfo estimate" in md
    assert "| Skip Tuning |" in md and "| 239 | 404 |" in md and "| CoOp as published" in md and "What the numbers say" in md
    plots = report["plots"]
    assert plots.get("files") or plots.get("skipped")
    for f in plots.get("files", []):
        assert Path(f).stat().st_size > 0


def _fake_report() -> dict:
    rows = []
    for i, name in enumerate(METHOD_ORDER):
        paper = PAPER.get(ROW[name].paper or "")
        rows.append({"name": name, "label": name.upper(), "step_time_s": 1.0 + i, "epoch_time_s": 100.0 + i, "steps_per_epoch": 100,
                     "peak_memory_mib": 500.0 + i, "memory_method": "CPU: counted", "trainable_params": 1000 * (i + 1),
                     "accuracy": {"base": 90.0, "new": 80.0, "H": 84.7},
                     "paper": paper, "time_vs_ft": 1.0, "memory_vs_ft": 1.0,
                     "paper_time_vs_ft": paper["time_s"] / 1002 if paper else None,
                     "paper_memory_vs_ft": paper["memory_mb"] / 1846 if paper else None})
    sweep = [{"method": "ft", "classes": c, "step_time_s": 0.1 * c, "epoch_time_s": c, "peak_memory_mib": c,
              "text_classes_per_step": c} for c in (10, 100)]
    return {"meta": {"preset": "cpu", "description": "test", "total_s": 1.0},
            "config": {"cost": {"model": "ViT-B-16", "classes": 50, "shots": 16, "batch_size": 4, "warmup": 1, "steps": 2}},
            "machine": {"device_name": "test CPU"}, "methods": rows,
            "sweeps": {"classes": sweep, "omega": [dict(r, omega=r["classes"]) for r in sweep]},
            "accuracy_task": {"model": "synth-vit", "pretrained": "synth", "dataset": "synthetic-noise", "shots": 16, "epochs": 5,
                              "batch_size": 16, "converged": True, "zeroshot": {"base": 87.8, "new": 76.5, "H": 81.8}}}


def test_the_report_puts_the_papers_figures_beside_ours():
    md = render_markdown(_fake_report())
    table4 = md.split("### Table 4 layout")[1].split("###")[0]
    assert [line.split("|")[1].strip() for line in table4.splitlines() if line.startswith("| ") and "method" not in line] == [
        "FT-CONVENTIONAL", "FT", "FT-LSKIP", "FT-CSKIP", "SKIP-TUNING"]
    assert "| 1002 | 1846 | 1.00 | 1.00 |" in table4 and "| 440 | 919 | 0.44 | 0.50 |" in table4
    table5 = md.split("### Table 5 layout")[1].split("###")[0]
    assert "| 1186 | 3204 | 1.18 | 1.74 |" in table5 and "| 888 | 1784 | 0.89 | 0.97 |" in table5 and "| 910 | 1580 | 0.91 | 0.86 |" in table5
    assert "torchinfo estimate" in md and "zero-shot base 87.8" in md
    assert "### Cost vs classes" in md and "### Cost vs ω" in md


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plots(_fake_report(), tmp_path) == {"skipped": "matplotlib is not installed (pip install -e '.[bench]')"}
    assert list(tmp_path.iterdir()) == []


def test_plots_are_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    files = write_plots(_fake_report(), tmp_path)["files"]
    assert sorted(Path(f).name for f in files) == ["cost_vs_classes.png", "cost_vs_omega.png", "time_vs_memory.png"]
    assert all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in files)


def test_presets():
    assert set(PRESETS) == {"tiny", "cpu", "gpu"}
    assert PRESETS["cpu"].cost.model == PRESETS["gpu"].cost.model == "ViT-B-16"
    gpu = PRESETS["gpu"].cost
    assert (gpu.batch_size, gpu.shots) == (4, 16)  # the paper's recipe
    assert row_omega("skip-tuning", 12) == 6 and row_omega("fast", 12) == 9 and row_omega("coop-cached", 12) == 12
    assert row_omega("lora", 12) == row_omega("ft", 12) == row_omega("coop", 12) == row_omega("ft-conventional", 12) == 0
    assert PRESETS["cpu"].cost.classes == 100  # the workload of the ≥ 8x / ≥ 4x comparison with conventional FT


def _costs(**rows) -> dict:
    """Fake results: name -> (step CPU s, peak MiB, H or None)."""
    return {n: {"label": n, "step_time_s": t, "step_cpu_s": t, "peak_memory_mib": m, **({"accuracy": {"H": h}} if h is not None else {})}
            for n, (t, m, h) in rows.items()}


def test_findings_say_where_skip_tuning_is_and_is_not_cheaper_or_most_accurate():
    out = findings(_costs(**{"ft-conventional": (20.0, 6000.0, 86.0), "skip-tuning": (2.0, 1000.0, 85.0),
                             "coop": (10.0, 3000.0, None), "coop-cached": (1.0, 1500.0, None), "lora": (19.0, 900.0, 88.0),
                             "clip-adapter-cached": (0.1, 50.0, 84.0), "fast": (0.5, 400.0, 90.0)}))
    assert out[0].startswith("Skip Tuning against ft-conventional: 10.0x faster per step, 6.0x less peak memory (the paper: 4.2x and 4.6x)")
    text = "\n".join(out)
    assert "cheaper in time and in memory than: coop (5.00x Skip Tuning's time, 3.00x its memory)." in text
    assert "**smaller but not faster than**: coop-cached (0.50x" in text
    assert "**faster but not smaller than**: lora (9.50x" in text
    assert "**neither faster nor smaller than**: clip-adapter-cached" in text
    assert "fast (" not in text  # its own ablations and presets are not peers
    assert out[-1] == "Skip Tuning is not the most accurate on the synthetic task (H 85.0): fast 90.0, lora 88.0, ft-conventional 86.0 score higher (one seed)."
    best = findings(_costs(**{"skip-tuning": (2.0, 1000.0, 91.0), "lora": (19.0, 900.0, 88.0)}))
    assert best[-1] == "Skip Tuning has the best H on the synthetic task (91.0, one seed)."


@pytest.mark.slow
def test_component_benchmark_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "skipcache.bench.components", "--quick", "--steps", "1", "--warmup", "0", "--device", "cpu",
         "--threads", "1", "--classes", "10", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    results = report["results"]
    assert set(results) == set(CONFIGS)
    for name in CONFIGS:
        r = results[name]
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["step_s"] > 0 and r["peak_mib"] >= 0 and r["memory_method"]
    for name in TRAIN_CONFIGS:
        r = results[name]
        assert r["speedup_vs_conventional_ft"] > 0 and r["speedup_vs_ft_harness"] > 0
        assert r["flops_per_step"] > 0 and r["tflops_per_s"] > 0 and r["precision"] == "fp32"
    # the harness trims prompts to max(EOT) + 1; conventional FT runs the whole context
    assert results["FT (harness)"]["text_tokens"] < results["conventional FT"]["text_tokens"]
    assert results["FT (harness)"]["omega"] == 0 < results["Skip Tuning"]["omega"]
    # 10 classes, r = 0.5: 6 certain positions (ranks 0..5) plus the tail slots, at most all 10
    assert results["LSkip"]["text_classes_per_step"] == 10
    assert 6 <= results["Skip Tuning"]["text_classes_per_step"] <= 10
    # fewer trainable weights and fewer FLOPs than FT at omega = 0
    assert results["Skip Tuning"]["flops_per_step"] < results["FT (harness)"]["flops_per_step"] < results["conventional FT"]["flops_per_step"]
    assert results["cache"]["images_per_s"] > 0 and results["cache"]["prompts_per_s"] > 0
    assert results["store"]["rows_per_s"] > 0 and results["store"]["mib_per_s"] > 0
    assert report["meta"]["options"]["model"] == "tiny"
