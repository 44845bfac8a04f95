"""Declarative experiment pipelines: `skipcache run pipelines/NAME.toml`.

A pipeline names one source store (a `[cache]` table: CacheConfig fields), optional target
datasets (`[[target]]` tables: `dataset`, `name`, `dataset_options`), and a list of methods to
compare (`[[method]]` tables). Kinds of method:

    zeroshot   the pretrained model, from the logits stored by the cache stage
    tune       a tuning run: TuneConfig fields; `omega` and `shots` override the [cache] table
               for this method (another store is cached for it: omega = 0 with cskip = false is
               full fine-tuning of all blocks; shots = 1 is the 1-shot point of a few-shot sweep)

Every method is evaluated on the source store's test splits (base / new / H, or all) and on the
test split of every target, cached with the same model, weights and omega and all its classes:
that is the cross-dataset protocol (targets with other classes) and the domain-generalization
protocol (targets with the same classes, rendered differently).

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
from skipcache.store import FeatureStore

METRICS = ("base", "new", "H", "all")
TOP_LEVEL_FIELDS = {"name", "description", "cache", "target", "method"}


def apply_overrides(spec: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (`cache.dataset=dtd`, `method.1.epochs=20`; list items
    by index); values are parsed as TOML values when they parse, else taken as strings."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        parts = dotted.split(".")
        if not sep or len(parts) < 2:
            raise ConfigError(f"override {item!r} is not SECTION.KEY=VALUE; e.g. --set cache.dataset=dtd")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = spec
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: no item {part} (there are {len(node)})")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec


def load_pipeline(path: Path, overrides: list[str] = ()) -> dict:
    """Parse and check a pipeline file (plus `--set` overrides); ConfigError names the bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}; see pipelines/ for examples")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not valid TOML: {exc}") from None
    spec = apply_overrides(spec, list(overrides))
    bad = set(spec) - TOP_LEVEL_FIELDS
    if bad:
        raise ConfigError(f"pipeline {path}: unknown top-level field(s) {sorted(bad)}; allowed: {sorted(TOP_LEVEL_FIELDS)}")
    cache_fields = {f.name for f in fields(CacheConfig)}
    tune_fields = {f.name for f in fields(TuneConfig)} | {"name", "kind", "omega", "shots"}
    bad = set(spec.get("cache", {})) - cache_fields
    if bad:
        raise ConfigError(f"pipeline {path}: unknown [cache] field(s) {sorted(bad)}; allowed: {sorted(cache_fields)}")
    for t in spec.get("target", []):
        if "dataset" not in t or set(t) - {"dataset", "name", "dataset_options"}:
            raise ConfigError(f"pipeline {path}: a [[target]] needs `dataset` and allows only name, dataset_options; got {sorted(t)}")
    methods = spec.get("method", [])
    if not methods:
        raise ConfigError(f"pipeline {path} has no [[method]] tables")
    seen: set = set()
    for i, m in enumerate(methods):
        if not isinstance(m.get("name"), str) or not m["name"]:
            raise ConfigError(f"pipeline {path}: every [[method]] needs a name; method {i} has none")
        if m["name"] in seen:  # names label rows and name run folders: a repeat would collide
            raise ConfigError(f"pipeline {path}: method name {m['name']!r} is used twice; names label rows and run folders")
        seen.add(m["name"])
        if m.get("kind") not in ("zeroshot", "tune"):
            raise ConfigError(f"pipeline {path}: method {m.get('name')!r} has kind {m.get('kind')!r}; use zeroshot or tune")
        bad = set(m) - tune_fields
        if bad:
            raise ConfigError(f"pipeline {path}: method {m.get('name')!r} has unknown field(s) {sorted(bad)}")
    return spec


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _tune_child(tune_kwargs: dict, targets: dict, queue) -> None:
    """Runs in a spawned process: tune, evaluate, report (result, memory) through the queue."""
    try:
        from skipcache.stages.evaluate import evaluate_stores
        from skipcache.stages.tune import run_tune

        baseline = _rss_mib()
        result = run_tune(TuneConfig(**tune_kwargs))
        if result.peak_memory_method.startswith("torch.cuda"):
            peak, method = result.peak_memory_mib, result.peak_memory_method
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
            method = "child peak RSS minus RSS before training"
        device = tune_kwargs.get("device", "auto")
        own, *on_targets = evaluate_stores(result.run_dir, [None, *targets.values()], device=device)
        accuracy = dict(own.accuracy)
        accuracy.update({name: r.accuracy["all"] for name, r in zip(targets, on_targets)})
        queue.put({"ok": True, "accuracy": accuracy, "seconds": result.seconds, "step_s": result.step_time_median_s,
                   "peak_mib": peak, "memory_method": method, "run_dir": str(result.run_dir)})
    except BaseException as exc:  # report, never hang the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _wait_for_report(child, queue) -> dict:
    """The child's report; an error report if the child dies without one (OOM kill, segfault)."""
    import queue as queue_module

    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not child.is_alive():
                return {"ok": False, "error": f"the tuning process died with exit code {child.exitcode} (out of memory?)"}


def run_pipeline(path: Path, *, out: Path | None = None, device: str = "auto", root: Path | None = None,
                 overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Run every method of a pipeline; returns (and writes) {"rows": [...], ...}."""
    spec = load_pipeline(path, overrides)
    name = spec.get("name", Path(path).stem)
    out = Path(out) if out else Path("runs") / "pipelines" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    cache_kwargs = dict(spec.get("cache", {}), device=device, progress=progress)
    if root is not None:
        cache_kwargs["root"] = root
    stores: dict[tuple, object] = {}

    def store_for(**overrides):
        settings = dict(cache_kwargs, **overrides)
        ident = tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in settings.items()))
        if ident not in stores:
            log(f"[{name}] cache {settings.get('dataset')} omega={settings.get('omega')} shots={settings.get('shots')}")
            stores[ident] = r = run_cache(CacheConfig(**settings))
            log(f"[{name}]   {'reused' if r.reused else f'{r.seconds:.1f} s, {r.images_per_s:.1f} img/s'}: {r.path}")
        return stores[ident]

    def targets_for(omega: int) -> dict:
        """Target name -> store path, cached at this omega with every class."""
        out_ = {}
        for t in spec.get("target", []):
            cached_t = store_for(dataset=t["dataset"], dataset_options=t.get("dataset_options", {}), omega=omega,
                                 classes="all", shots=1)
            out_[t.get("name", t["dataset"])] = cached_t.path
        return out_

    rows = []
    for method in spec["method"]:
        method = dict(method)
        label, kind = method.pop("name"), method.pop("kind")
        overrides = {k: method.pop(k) for k in ("omega", "shots") if k in method}
        omega = overrides.get("omega", cache_kwargs.get("omega", 6))
        cached = store_for(**overrides)
        targets = targets_for(omega)
        if kind == "zeroshot":
            named = {"test_base": "base", "test_new": "new", "test": "all"}
            acc = {named[k]: v for k, v in cached.zeroshot_acc.items() if k in named}
            if "base" in acc and "new" in acc:
                acc["H"] = 2 * acc["base"] * acc["new"] / max(1e-9, acc["base"] + acc["new"])
            for t_name, t_path in targets.items():
                acc[t_name] = 100.0 * FeatureStore.open(t_path).summary()["zeroshot_acc"]["test"]
            rows.append({"method": label, **acc, "tune_s": None, "step_ms": None, "peak_mib": None})  # nothing trained
            continue
        log(f"[{name}] tune {label!r} (omega={omega})")
        tune_kwargs = dict(method, store=cached.path, out=out / label.replace(" ", "_").replace("/", "_"),
                           device=device, progress=progress)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_tune_child, args=(tune_kwargs, targets, queue))
        child.start()
        report = _wait_for_report(child, queue)
        child.join()
        if not report["ok"]:
            raise ConfigError(f"method {label!r} failed: {report['error']}")
        rows.append({"method": label, **report["accuracy"], "tune_s": report["seconds"], "step_ms": 1000 * report["step_s"],
                     "peak_mib": report["peak_mib"], "memory_method": report["memory_method"], "run_dir": report["run_dir"]})
        log(f"[{name}]   {json.dumps({k: round(v, 2) for k, v in report['accuracy'].items()})} in {report['seconds']:.1f} s")
    target_names = [t.get("name", t["dataset"]) for t in spec.get("target", [])]
    result = {"pipeline": name, "file": str(path), "stores": sorted(str(v.path) for v in stores.values()),
              "targets": target_names, "rows": rows}
    write_json_atomic(out / "results.json", result)
    result["out"] = str(out)
    return result
