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
        assert results[name]["speedup_vs_ft"] > 0
    assert results["LSkip+trim"]["text_tokens"] <= results["LSkip"]["text_tokens"]
    assert 1 <= results["Skip Tuning"]["mean_union"] <= 10
    assert results["cache"]["images_per_s"] > 0 and results["cache"]["prompts_per_s"] > 0
    assert results["store"]["rows_per_s"] > 0 and results["store"]["mib_per_s"] > 0
    assert report["meta"]["options"]["model"] == "tiny"
