"""Time the real `skipcache tune` command, start-up and all, on a store of random tokens.

    python -m skipcache.bench.tune_stage --model ViT-B-16 --classes 100 --rows 64 --batch-size 4
    python -m skipcache.bench.tune_stage --paper-recipe      # 50 classes x 16 shots, batch 4, 20 epochs

A store with the cached shapes of `--model` (random init, so no download) is written once under
`--root`, one for omega = 0 and one for `--omega`; then each method runs as its own
`skipcache tune` process (FT in this harness: omega = 0 without CSkip; Skip Tuning: `--omega`
with CSkip). Reported per method: the process's wall time, the run's own phases (run.json
`phases_s`: model loading, set-up, training, checkpoints, final save), the median step,
classes per step and peak memory. Random tokens train nothing useful: this measures cost only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from skipcache.bench.methods import random_store


def run_method(store: Path, out: Path, extra: list[str], epochs: int, batch_size: int, device: str) -> dict:
    """One `skipcache tune` process; its wall time and the run's own record."""
    cmd = [sys.executable, "-m", "skipcache", "tune", str(store), "--out", str(out), "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--warmup-epochs", "0", "--device", device, "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    run = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"process_wall_s": wall, "tune_seconds": run.get("seconds"), "phases_s": run.get("phases_s"),
            "step_time_median_s": run.get("step_time_median_s"), "peak_memory_mib": run.get("peak_memory_mib"),
            "peak_memory_method": run.get("peak_memory_method"),
            "text_classes_per_step": metrics[-1].get("text_classes_per_step"), "steps": run.get("steps")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skipcache.bench.tune_stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--omega", type=int, default=6)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--rows", type=int, default=64, help="training images in the store")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--paper-recipe", action="store_true", help="50 classes x 16 shots, batch 4, 20 epochs (4,000 steps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--root", type=Path, default=Path("build/bench-stores"))
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here too")
    args = p.parse_args(argv)
    if args.paper_recipe:
        args.classes, args.rows, args.batch_size, args.epochs = 50, 800, 4, 20
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    runs = args.root.parent / "bench-runs" / time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for name, omega, extra in (("FT (harness)", 0, ["--no-cskip"]), ("Skip Tuning", args.omega, [])):
        store = random_store(args.root, args.model, omega, args.classes, args.rows)
        print(f"{name}: skipcache tune on {store} ...", file=sys.stderr, flush=True)
        results[name] = run_method(store, runs / name.split()[0].lower(), extra, args.epochs, args.batch_size, args.device)
    report = {"model": args.model, "classes": args.classes, "rows": args.rows, "batch_size": args.batch_size,
              "epochs": args.epochs, "device": args.device, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
