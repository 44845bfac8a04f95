"""Declarative experiment pipelines: `skipcache run pipelines/NAME.toml`.

A pipeline names one store (a `[cache]` table: CacheConfig fields) and a list of methods to
compare on it (`[[method]]` tables). Kinds of method:

    zeroshot   the pretrained model, from the logits stored by the cache stage
    tune       a tuning run: TuneConfig fields, optionally its own `omega` (another store is
               cached for it, e.g. omega = 0 with cskip = false is full fine-tuning of all blocks)

Each tuning run executes in a fresh child process so that its peak memory is its own:
on CUDA `torch.cuda.max_memory_allocated`, on CPU the child's peak RSS minus its RSS just
before training starts (after imports and model loading). The result is one table, one row per
method, with base / new / H (or all) in percent, tune time and peak memory; it is printed and
saved as `results.json` in the pipeline's output folder.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
import tomllib
from dataclasses import fields
from pathlib import Path

from skipcache.errors import ConfigError
from skipcache.runtime import write_json_atomic
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.tune import TuneConfig

METRICS = ("base", "new", "H", "all")


def load_pipeline(path: Path) -> dict:
    """Parse and check a pipeline file; ConfigError names the bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}; see pipelines/ for examples")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not valid TOML: {exc}") from None
    cache_fields = {f.name for f in fields(CacheConfig)}
    tune_fields = {f.name for f in fields(TuneConfig)} | {"name", "kind", "omega"}
    bad = set(spec.get("cache", {})) - cache_fields
    if bad:
        raise ConfigError(f"pipeline {path}: unknown [cache] field(s) {sorted(bad)}; allowed: {sorted(cache_fields)}")
    methods = spec.get("method", [])
    if not methods:
        raise ConfigError(f"pipeline {path} has no [[method]] tables")
    for m in methods:
        if m.get("kind") not in ("zeroshot", "tune"):
            raise ConfigError(f"pipeline {path}: method {m.get('name')!r} has kind {m.get('kind')!r}; use zeroshot or tune")
        bad = set(m) - tune_fields
        if bad:
            raise ConfigError(f"pipeline {path}: method {m.get('name')!r} has unknown field(s) {sorted(bad)}")
    return spec


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _tune_child(tune_kwargs: dict, queue) -> None:
    """Runs in a spawned process: tune, evaluate, report (result, memory) through the queue."""
    try:
        import torch

        from skipcache.stages.evaluate import run_eval
        from skipcache.stages.tune import run_tune

        torch.set_num_threads(torch.get_num_threads())
        baseline = _rss_mib()
        result = run_tune(TuneConfig(**tune_kwargs))
        if result.peak_memory_method.startswith("torch.cuda"):
            peak, method = result.peak_memory_mib, result.peak_memory_method
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
            method = "child peak RSS minus RSS before training"
        ev = run_eval(result.run_dir, device=tune_kwargs.get("device", "auto"))
        queue.put({"ok": True, "accuracy": ev.accuracy, "seconds": result.seconds, "step_s": result.step_time_median_s,
                   "peak_mib": peak, "memory_method": method, "run_dir": str(result.run_dir)})
    except BaseException as exc:  # report, never hang the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def run_pipeline(path: Path, *, out: Path | None = None, device: str = "auto", root: Path | None = None,
                 progress: bool = True, log=print) -> dict:
    """Run every method of a pipeline; returns (and writes) {"rows": [...], ...}."""
    spec = load_pipeline(path)
    name = spec.get("name", Path(path).stem)
    out = Path(out) if out else Path("runs") / "pipelines" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    cache_kwargs = dict(spec.get("cache", {}), device=device, progress=progress)
    if root is not None:
        cache_kwargs["root"] = root
    stores: dict[int, object] = {}

    def store_for(omega: int):
        if omega not in stores:
            log(f"[{name}] cache omega={omega}")
            stores[omega] = run_cache(CacheConfig(**dict(cache_kwargs, omega=omega)))
            r = stores[omega]
            log(f"[{name}]   {'reused' if r.reused else f'{r.seconds:.1f} s, {r.images_per_s:.1f} img/s'}: {r.path}")
        return stores[omega]

    default_omega = cache_kwargs.get("omega", 6)
    rows = []
    for method in spec["method"]:
        method = dict(method)
        label, kind = method.pop("name"), method.pop("kind")
        omega = method.pop("omega", default_omega)
        cached = store_for(omega)
        if kind == "zeroshot":
            acc = dict(cached.zeroshot_acc)
            named = {"test_base": "base", "test_new": "new", "test": "all"}
            acc = {named[k]: v for k, v in acc.items() if k in named}
            if "base" in acc and "new" in acc:
                acc["H"] = 2 * acc["base"] * acc["new"] / max(1e-9, acc["base"] + acc["new"])
            rows.append({"method": label, **acc, "tune_s": 0.0, "step_ms": 0.0, "peak_mib": 0.0})
            continue
        log(f"[{name}] tune {label!r} (omega={omega})")
        tune_kwargs = dict(method, store=cached.path, out=out / label.replace(" ", "_").replace("/", "_"),
                           device=device, progress=progress)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_tune_child, args=(tune_kwargs, queue))
        child.start()
        report = queue.get()
        child.join()
        if not report["ok"]:
            raise ConfigError(f"method {label!r} failed: {report['error']}")
        rows.append({"method": label, **report["accuracy"], "tune_s": report["seconds"], "step_ms": 1000 * report["step_s"],
                     "peak_mib": report["peak_mib"], "memory_method": report["memory_method"], "run_dir": report["run_dir"]})
        log(f"[{name}]   {json.dumps({k: round(v, 2) for k, v in report['accuracy'].items()})} in {report['seconds']:.1f} s")
    result = {"pipeline": name, "file": str(path), "stores": {str(k): str(v.path) for k, v in stores.items()}, "rows": rows}
    write_json_atomic(out / "results.json", result)
    result["out"] = str(out)
    return result
