"""The GPU check's measurements (`make gpu-check`): ViT-B-16 conventional FT, FT in this harness
and Skip Tuning at M = 100 and 1000 classes, batch 4 and 32, through the tune stage's own step;
then the whole `skipcache tune` command at M = 100 and 1000 and on the paper's base-to-new recipe.

    python -m skipcache.bench.gpu_check --out build/gpu-check     # prints a markdown report

Per configuration: step time, epoch time (steps per epoch x step; the paper's 16-shot epoch has
M_base x 16 / batch steps), peak memory (`torch.cuda.max_memory_allocated`), FLOPs of the step,
achieved TFLOP/s and its share of the card's measured bf16 matmul rate. Needs no network and
installs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from skipcache.bench.steps import BenchOptions, matmul_tflops, run_in_child

METHODS = ("conventional FT", "FT (harness)", "Skip Tuning")


def step_rows(device: str, quick: bool) -> tuple[list[dict], float | None]:
    from skipcache.runtime import resolve_device

    dev = resolve_device(device)
    rate = matmul_tflops(dev) if dev.type == "cuda" else None
    rows = []
    grid = [(10, 2)] if quick else [(100, 4), (1000, 4), (100, 32), (1000, 32)]
    for classes, batch in grid:
        opts = BenchOptions(model="tiny" if quick else "ViT-B-16", classes=classes, batch_size=batch, device=device,
                            steps=2 if quick else 20, warmup=1 if quick else 5)
        for method in METHODS:
            for max_top in ((50, None) if method == "Skip Tuning" else (50,)):
                r = run_in_child(method, replace(opts, max_top=max_top))
                r.update(method=method + ("" if max_top else ", uncapped Eq. 7"), classes=classes, batch=batch)
                if rate and "tflops_per_s" in r:
                    r["peak_fraction_of_matmul"] = r["tflops_per_s"] / rate
                rows.append(r)
    return rows, rate


def render(rows: list[dict], rate: float | None, tune: dict) -> str:
    out = [f"bf16 matmul rate measured: {rate:.0f} TFLOP/s" if rate else "no CUDA: rates not measured", ""]
    out += ["| M | batch | method | step ms | epoch s (16 shots) | peak MiB | GFLOP/step | TFLOP/s | % of matmul | × conv. FT (time, memory) | classes/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['classes']} | {r['batch']} | {r['method']} | failed: {r['error'][:60]} |||||||")
            continue
        key = (r["classes"], r["batch"])
        if r["method"] == "conventional FT":
            ref[key] = r
        base = ref.get(key)
        steps_per_epoch = -(-r["classes"] // 2 * 16 // r["batch"])  # base half of the classes, 16 shots
        ratio = f"{base['step_s'] / r['step_s']:.1f}×, {base['peak_mib'] / r['peak_mib']:.1f}×" if base else "-"
        pct = f"{100 * r['peak_fraction_of_matmul']:.1f}" if "peak_fraction_of_matmul" in r else "-"
        out.append(f"| {r['classes']} | {r['batch']} | {r['method']} | {1000 * r['step_s']:.1f} | {steps_per_epoch * r['step_s']:.1f} | "
                   f"{r['peak_mib']:.0f} | {r['flops_per_step'] / 1e9:.0f} | {r['tflops_per_s']:.1f} | {pct} | {ratio} | "
                   f"{r['text_classes_per_step']:.0f} |")
    out += ["", "Whole `skipcache tune` processes (random tokens; phases from run.json):", "",
            "| workload | method | process s | tune s | steps | step ms (median) | setup s | train s | checkpoints s | save s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload, report in tune.items():
        for method, r in report.get("results", {}).items():
            if "error" in r:
                out.append(f"| {workload} | {method} | failed: {r['error'][:60]} ||||||||")
                continue
            ph = r.get("phases_s") or {}
            out.append(f"| {workload} | {method} | {r['process_wall_s']:.1f} | {r['tune_seconds']:.1f} | {r['steps']} | "
                       f"{1000 * r['step_time_median_s']:.1f} | {ph.get('setup_s', 0):.1f} | {ph.get('train_s', 0):.1f} | "
                       f"{ph.get('checkpoint_s', 0):.1f} | {ph.get('save_s', 0):.1f} | {r['peak_memory_mib']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from skipcache.bench import tune_stage

    p = argparse.ArgumentParser(prog="python -m skipcache.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("build/gpu-check"))
    p.add_argument("--quick", action="store_true", help="the tiny model and a few steps: a dry run of this script on any machine")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, rate = step_rows(args.device, args.quick)
    model = "tiny" if args.quick else "ViT-B-16"
    omega = "2" if args.quick else "6"
    workloads = {"M=100, batch 4, 1 epoch": ["--classes", "100", "--rows", "200"],
                 "M=1000, batch 4, 1 epoch": ["--classes", "1000", "--rows", "200"],
                 "paper recipe (50 classes x 16 shots, batch 4, 20 epochs)": ["--paper-recipe"]}
    if args.quick:
        workloads = {"M=10, batch 4, 1 epoch": ["--classes", "10", "--rows", "16"]}
    tune = {}
    for name, extra in workloads.items():
        target = args.out / f"tune-{len(tune)}.json"
        code = tune_stage.main(["--model", model, "--omega", omega, "--device", args.device, "--root",
                                str(args.out / "stores"), "--out", str(target), *extra])
        tune[name] = json.loads(target.read_text()) if target.exists() else {"results": {"all": {"error": f"exit {code}"}}}
    report = render(rows, rate, tune)
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(json.dumps({"matmul_tflops_bf16": rate, "steps": rows, "tune": tune}, indent=2, default=str))
    print(report)
    print(f"gpu-check measurements took {time.perf_counter() - started:.0f} s; written to {args.out}", file=sys.stderr)
    failed = any("error" in r for r in rows) or any("error" in r for t in tune.values() for r in t.get("results", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
