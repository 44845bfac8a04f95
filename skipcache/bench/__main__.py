"""`skipcache bench` / `python -m skipcache.bench`: every training method on one workload — time,
memory, trainable parameters and (where the preset trains) accuracy — with a report laid out like
the paper's Tables 4 and 5, the paper's figures beside ours, and plots.

    skipcache bench --preset tiny --json     # seconds: the tiny model, a smoke run
    skipcache bench --preset cpu             # `make benchmark`: ViT-B/16 on the CPU + synthetic accuracy
    skipcache bench --preset gpu             # the paper's settings on a GPU

Writes OUT/bench.json, OUT/report.md and OUT/*.png (default OUT: build/bench/<preset>). What each
number is: `skipcache.bench.methods`. The component benchmark (conventional FT, cache and store
throughput) is `python -m skipcache.bench.components`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skipcache.bench.methods import METHOD_ORDER, PRESETS, machine, run_preset
from skipcache.bench.report import render_markdown, write_plots


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="skipcache bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="workload (default cpu, what `make benchmark` runs)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default build/bench/<preset>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(METHOD_ORDER)}")
    p.add_argument("--no-sweeps", action="store_true", help="skip the cost-vs-classes and cost-vs-omega sweeps")
    p.add_argument("--no-accuracy", action="store_true", help="skip training for accuracy")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the accuracy runs (default: the preset's: 5, the demo's recipe; tiny: 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout (progress stays on stderr)")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[int, dict]:
    args = parse_args(argv)
    only = None
    if args.only:
        only = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = [n for n in only if n not in METHOD_ORDER]
        if unknown:
            print(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_ORDER)}", file=sys.stderr)
            return 2, {}
    preset = PRESETS[args.preset]
    out = args.out or Path("build") / "bench" / preset.name
    out.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    report = run_preset(preset, out, device=args.device, threads=args.threads, only=only, sweeps=not args.no_sweeps,
                        accuracy=not args.no_accuracy, epochs=args.epochs, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["machine"] = info
    report["plots"] = write_plots(report, out)
    if "skipped" in report["plots"]:
        print(f"plots skipped: {report['plots']['skipped']}", file=sys.stderr)
    report["files"] = {"json": str(out / "bench.json"), "report": str(out / "report.md")}
    (out / "report.md").write_text(render_markdown(report))
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [r["name"] for r in report["methods"] if "error" in r or "accuracy_error" in r]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print((out / "report.md").read_text())
        print(f"wrote {out / 'bench.json'}, {out / 'report.md'}" + "".join(f", {p}" for p in report["plots"].get("files", [])))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return (1 if failed else 0), report


def main(argv: list[str] | None = None) -> int:
    return run(argv)[0]


if __name__ == "__main__":
    sys.exit(main())
