"""`python -m skipcache.bench.components`: time, FLOPs and peak memory of the tune stage's step
against conventional FT, cache-stage throughput and store read throughput, each configuration in
a fresh child process. (The comparison of every training method is `python -m skipcache.bench`.)

    python -m skipcache.bench.components                  # ViT-B-16, random init, 100 prompts, batch 4
    python -m skipcache.bench.components --quick --json   # the tiny model: a smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from skipcache.bench.steps import CONFIGS, TRAIN_CONFIGS, BenchOptions, run_in_child


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m skipcache.bench.components", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="open_clip model name (default ViT-B-16; tiny with --quick)")
    p.add_argument("--pretrained", default="none", help="weights; none = random init (same cost, no download)")
    p.add_argument("--omega", type=int, default=None, help="frozen blocks per tower (default: half, 6 for ViT-B-16)")
    p.add_argument("--classes", type=int, default=100, help="class prompts M")
    p.add_argument("--batch-size", type=int, default=4, help="images per training step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--max-top", type=int, default=50, help="CSkip: cap on the always-kept set (default 50, as the tune stage and the authors' code)")
    p.add_argument("--no-cap", action="store_true", help="CSkip: paper Eq. 7 uncapped (r*M always kept)")
    p.add_argument("--precision", default="auto", help="auto (the tune stage's: bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--matmul", action="store_true", help="also measure the device's bf16 matmul rate (percent of it per step)")
    p.add_argument("--quick", action="store_true", help="tiny model, small store: a smoke run in seconds")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON results to this file")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> BenchOptions:
    from skipcache.runtime import resolve_device

    cuda = resolve_device(args.device).type == "cuda"
    opts = BenchOptions(model=args.model or ("tiny" if args.quick else "ViT-B-16"), pretrained=args.pretrained,
                        omega=args.omega, classes=args.classes, batch_size=args.batch_size, device=args.device,
                        steps=args.steps or (5 if cuda else 3), warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
                        threads=args.threads, max_top=None if args.no_cap else args.max_top, precision=args.precision)
    if args.quick:
        opts.cache_batch, opts.store_rows = 8, 128
    return opts


def machine(opts: BenchOptions) -> dict:
    import torch

    from skipcache.runtime import library_versions, resolve_device, utc_now

    dev = resolve_device(opts.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return {"date_utc": utc_now(), "device": str(dev), "device_name": name, "python": platform.python_version(),
            "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch_default_threads": torch.get_num_threads(), "versions": library_versions()}


def render(results: dict, meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    ft = results.get("conventional FT", {}).get("step_s")
    harness = results.get("FT (harness)", {}).get("step_s")
    t = Table(title=f"{meta['options']['model']} · {meta['device_name']} · M={meta['options']['classes']} prompts, "
                    f"batch {meta['options']['batch_size']}")
    t.caption = "peak MiB: " + next((r["memory_method"] for r in results.values() if "memory_method" in r), "-")
    for col in ("config", "step ms", "× conv. FT", "× FT harness", "peak MiB", "GFLOP/step", "TFLOP/s", "notes"):
        t.add_column(col, justify="left" if col in ("config", "notes") else "right")
    for name in TRAIN_CONFIGS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            t.add_row(name, "failed", "", "", "", "", "", r["error"][:80])
            continue
        notes = f"ω={r['omega']}, text {r['text_tokens']} tok, {r['text_classes_per_step']:.0f}/{r['prompts']} classes/step"
        peak = r.get("peak_fraction_of_matmul")
        t.add_row(name, f"{1000 * r['step_s']:.1f}", f"{ft / r['step_s']:.2f}" if ft else "-",
                  f"{harness / r['step_s']:.2f}" if harness else "-", f"{r['peak_mib']:.0f}",
                  f"{r['flops_per_step'] / 1e9:.1f}",
                  f"{r['tflops_per_s']:.2f}" + (f" ({100 * peak:.1f}%)" if peak is not None else ""), notes)
    console.print(t)
    if "cache" in results and "error" not in results["cache"]:
        c = results["cache"]
        console.print(f"cache stage (shallow blocks 1..{c['omega']}, no grad): {c['images_per_s']:.1f} images/s at batch "
                      f"{c['batch']}; text {c['ms_per_prompt']:.2f} ms/prompt ({c['prompts_per_s']:.0f} prompts/s); "
                      f"peak {c['peak_mib']:.0f} MiB")
    if "store" in results and "error" not in results["store"]:
        s = results["store"]
        console.print(f"store reads (iter_batches, {s['rows']} rows × {tuple(s['vision_shape'])} fp16, batch {s['batch']}): "
                      f"{s['rows_per_s']:.0f} rows/s, {s['mib_per_s']:.0f} MiB/s; writes {s['rows'] / s['write_s']:.0f} rows/s")
    for name in ("cache", "store"):
        if "error" in results.get(name, {}):
            console.print(f"[red]{name} failed: {results[name]['error']}[/red]")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options_from(args)
    names = CONFIGS if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    meta = machine(opts) | {"options": asdict(opts)}
    if args.matmul:
        from skipcache.bench.steps import matmul_tflops
        from skipcache.runtime import resolve_device

        meta["matmul_tflops_bf16"] = matmul_tflops(resolve_device(opts.device))
    results, started = {}, time.perf_counter()
    for name in names:
        if not args.json:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = run_in_child(name, opts)
    ft = results.get("conventional FT", {}).get("step_s")
    harness = results.get("FT (harness)", {}).get("step_s")
    for name in TRAIN_CONFIGS:
        r = results.get(name, {})
        if "step_s" not in r:
            continue
        if ft:
            r["speedup_vs_conventional_ft"] = ft / r["step_s"]
            r["memory_ratio_vs_conventional_ft"] = results["conventional FT"]["peak_mib"] / max(r["peak_mib"], 1e-9)
        if harness:
            r["speedup_vs_ft_harness"] = harness / r["step_s"]
        if meta.get("matmul_tflops_bf16"):
            r["peak_fraction_of_matmul"] = r["tflops_per_s"] / meta["matmul_tflops_bf16"]
    meta["total_s"] = time.perf_counter() - started
    report = {"meta": meta, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render(results, meta)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
