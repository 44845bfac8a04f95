"""Smoke test of `python -m skipcache.bench --quick`: every configuration runs and reports.

Speed and memory are measured by `make benchmark`, never asserted here beyond being positive.
"""

import json
import subprocess
import sys

import pytest

from skipcache.bench import CONFIGS, TRAIN_CONFIGS


@pytest.mark.slow
def test_quick_benchmark_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "skipcache.bench", "--quick", "--steps", "1", "--warmup", "0", "--device", "cpu",
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
