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
import math
import os
import resource
import time
import tomllib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from skipcache.child import ChildFailed, run_in_child
from skipcache.errors import ConfigError
from skipcache.runtime import STORE_ENV, default_store_root, resolve_device, write_json_atomic
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.evaluate import harmonic_mean
from skipcache.stages.tune import TuneConfig
from skipcache.store import FeatureStore

METRICS = ("base", "new", "H", "all")
TOP_LEVEL_FIELDS = {"name", "description", "cache", "target", "method"}
TOP_LEVEL_SCALARS = ("name", "description")  # strings; `--set name=...` sets them
TARGET_FIELDS = {"dataset": str, "name": str, "dataset_options": dict}
ZEROSHOT_FIELDS = ("name", "kind", "omega", "shots")
# Columns of a result row: a target named like one would overwrite it.
ROW_COLUMNS = {*METRICS, "method", "tune_s", "step_ms", "peak_mib", "memory_method", "run_dir"}
# Lower bounds that CacheConfig.validate does not check (omega's upper bound needs the model).
CACHE_MINIMUMS = {"omega": 0, "workers": 0}


# ------------------------------------------------------------------------------ describing values

def _kind(value) -> str:
    """What a TOML value is, in words: `cache.omega is an integer`."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array of tables" if value and all(isinstance(v, dict) for v in value) else "an array"
    return {int: "an integer", float: "a number", str: "a string"}.get(type(value), "a date or time")


def _show(value) -> str:
    """A value as it would be written in TOML (`"four"`, `true`, `[1]`); tables by kind."""
    if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
        return _kind(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value, default=str)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             Path: "a string (a path)"}


def _field_types(cls) -> dict[str, tuple[tuple, object]]:
    """Field name -> (accepted Python types, example value or None) of a config dataclass; no
    types (nothing checked) for a field whose annotation cannot be resolved here."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    out = {}
    for f in fields(cls):
        hint = hints.get(f.name, type(None))
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        accepted = tuple(t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None))
        example = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
        out[f.name] = (accepted, example if isinstance(example, (bool, int, float, str, dict)) else None)
    return out


def _type_ok(value, accepted: tuple) -> bool:
    for t in accepted:
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is Path and isinstance(value, str):
            return True
        if t in (str, dict) and isinstance(value, t):
            return True
        if t not in _EXPECTED:  # a type this check does not know: left to the stage
            return True
    return False


def _check_fields(where: str, table: dict, schema: dict, fail) -> None:
    """Every field of a table has its type, and the cache's counts their lower bounds."""
    for key, value in table.items():
        if key not in schema:
            continue
        accepted, example = schema[key]
        if accepted and not _type_ok(value, accepted):
            expected = " or ".join(_EXPECTED[t] for t in accepted if t in _EXPECTED)
            hint = f"; e.g. {key} = {json.dumps(example)}" if example is not None else ""
            fail(f"{where}.{key} must be {expected}, got {_show(value)}{hint}")
        if key in CACHE_MINIMUMS and isinstance(value, int) and value < CACHE_MINIMUMS[key]:
            fail(f"{where}.{key} must be >= {CACHE_MINIMUMS[key]}, got {value}")


def _check_config(where: str, build, fail) -> None:
    """Run a config's own range checks (lr > 0 and finite, known dtype...) before any stage runs."""
    try:
        build().validate()
    except ConfigError as exc:
        fail(f"{where}: {exc}")


# ------------------------------------------------------------------------------ overrides

def apply_overrides(spec: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (`cache.dataset=dtd`, `method.1.epochs=20`; list items
    by index; `name=...` for the top-level name); values are parsed as TOML values when they
    parse, else taken as strings."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        parts = dotted.split(".")
        if not sep or not all(parts) or (len(parts) < 2 and parts[0] not in TOP_LEVEL_SCALARS):
            raise ConfigError(f"override {item!r} is not SECTION.KEY=VALUE; e.g. --set cache.dataset=dtd")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = spec
        for depth, (part, after) in enumerate(zip(parts[:-1], parts[1:])):
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: no item {part} (there are {len(node)})")
                node = node[int(part)]
            elif depth == 0 and part in TOP_LEVEL_SCALARS:
                raise ConfigError(f"override {item!r}: {part} is a string, not a table; use --set {part}=VALUE")
            else:
                if part not in node and after.isdigit():
                    raise ConfigError(f"override {item!r}: no item {after} (there are 0)")
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                fix = f"use --set {where}=VALUE" if depth > 0 else "fix it in the file"
                raise ConfigError(f"override {item!r}: {where} is {_kind(node)}, not a table; {fix}")
        if isinstance(node, list):
            field_ = {"method": "epochs=5", "target": "dataset=dtd"}.get(parts[0], "FIELD=VALUE")
            raise ConfigError(f"override {item!r}: {dotted} is a table; set one of its fields, e.g. --set {dotted}.{field_}")
        node[parts[-1]] = value
    return spec


# ------------------------------------------------------------------------------ loading

def _read(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"pipeline {path} is a folder, not a file; pass a .toml file such as pipelines/demo.toml")
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}; see pipelines/ for examples")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline {path}: {exc.strerror}; check that it is readable") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pipeline {path} is not valid TOML: {exc}") from None


def load_pipeline(path: Path, overrides: list[str] = ()) -> dict:
    """Parse and check a pipeline file (plus `--set` overrides) completely, before anything runs:
    every table's shape, every field's type, every method's and the cache's settings. A
    ConfigError names the file and the field (`cache.omega`, `method.1.lr`)."""
    path = Path(path)
    spec = apply_overrides(_read(path), list(overrides))

    def fail(message: str):
        raise ConfigError(f"pipeline {path}: {message}")

    bad = set(spec) - TOP_LEVEL_FIELDS
    if bad:
        fail(f"unknown top-level field(s) {sorted(bad)}; allowed: {sorted(TOP_LEVEL_FIELDS)}")
    for key in TOP_LEVEL_SCALARS:
        if key in spec and not isinstance(spec[key], str):
            fail(f"{key} must be a string, got {_show(spec[key])}")
    if not isinstance(spec.get("cache", {}), dict):
        hint = "; write it once as [cache]" if isinstance(spec["cache"], list) else ""
        fail(f"cache must be a table ([cache]), got {_show(spec['cache'])}{hint}")
    for section in ("target", "method"):
        items = spec.get(section, [])
        if not isinstance(items, list):
            fail(f"{section} must be an array of tables ([[{section}]]), got {_show(items)}; "
                 f"write [[{section}]] (double brackets) above each {section}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                fail(f"{section}.{i} must be a table ([[{section}]]), got {_show(item)}")

    cache_types = _field_types(CacheConfig)
    cache = spec.get("cache", {})
    bad = set(cache) - set(cache_types)
    if bad:
        fail(f"unknown [cache] field(s) {sorted(bad)}; allowed: {sorted(cache_types)}")
    _check_fields("cache", cache, cache_types, fail)
    _check_config("cache", lambda: CacheConfig(**cache), fail)

    names: set = set()
    for i, t in enumerate(spec.get("target", [])):
        if "dataset" not in t or set(t) - set(TARGET_FIELDS):
            fail(f"a [[target]] needs `dataset` and allows only name, dataset_options; got {sorted(t)}")
        _check_fields(f"target.{i}", t, {k: ((v,), None) for k, v in TARGET_FIELDS.items()}, fail)
        name = t.get("name", t["dataset"])
        if name in names:
            fail(f"target name {name!r} is used twice; give each [[target]] its own name = \"...\"")
        if name in ROW_COLUMNS:
            fail(f"target name {name!r} is also a column of the result table; give the [[target]] another name = \"...\"")
        names.add(name)

    methods = spec.get("method", [])
    if not methods:
        raise ConfigError(f"pipeline {path} has no [[method]] tables")
    tune_types = _field_types(TuneConfig)
    method_types = {**tune_types, "name": ((str,), None), "kind": ((str,), None),
                    "omega": cache_types["omega"], "shots": cache_types["shots"]}
    seen: set = set()
    for i, m in enumerate(methods):
        if "name" in m and not isinstance(m["name"], str):
            fail(f"method.{i}.name must be a string, got {_show(m['name'])}")
        if not m.get("name"):
            fail(f"every [[method]] needs a name; method {i} has none")
        if m["name"] in seen:  # names label rows and name run folders: a repeat would collide
            fail(f"method name {m['name']!r} is used twice; names label rows and run folders")
        seen.add(m["name"])
        if m.get("kind") not in ("zeroshot", "tune"):
            fail(f"method {m.get('name')!r} has kind {m.get('kind')!r}; use zeroshot or tune")
        bad = set(m) - set(method_types)
        if bad:
            fail(f"method {m.get('name')!r} has unknown field(s) {sorted(bad)}")
        if m["kind"] == "zeroshot" and set(m) - set(ZEROSHOT_FIELDS):
            fail(f"method {m['name']!r} is kind zeroshot and takes only {', '.join(ZEROSHOT_FIELDS)}; "
                 f"drop {sorted(set(m) - set(ZEROSHOT_FIELDS))} or use kind = \"tune\"")
        _check_fields(f"method.{i}", m, method_types, fail)
        where = f"method.{i} ({m['name']!r})"
        cache_overrides = {k: m[k] for k in ("omega", "shots") if k in m}
        if cache_overrides:
            _check_config(where, lambda: CacheConfig(**dict(cache, **cache_overrides)), fail)
        if m["kind"] == "tune":
            _check_config(where, lambda: TuneConfig(**{k: v for k, v in m.items() if k not in ZEROSHOT_FIELDS}), fail)
    return spec


def _check_root(root: Path | None, spec: dict, path: Path) -> None:
    """The store root (argument, else [cache] root, else $SKIPCACHE_STORE or ./store) must not be a file."""
    if root is not None:
        source, named, fix = Path(root), "", f"pass --root DIR or set {STORE_ENV} to a folder"
    elif "root" in spec.get("cache", {}):
        source, named, fix = Path(spec["cache"]["root"]), " (cache.root)", f"fix cache.root in {path} or pass --root DIR"
    elif os.environ.get(STORE_ENV):
        source, named, fix = default_store_root(), f" (from ${STORE_ENV})", f"set {STORE_ENV} to a folder or pass --root DIR"
    else:
        source, named, fix = default_store_root(), "", f"pass --root DIR or set {STORE_ENV} to a folder"
    if source.exists() and not source.is_dir():
        raise ConfigError(f"store root {source}{named} is a file, not a folder; {fix}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _tune_and_evaluate(tune_kwargs: dict, targets: dict) -> dict:
    """Runs in a spawned process (`run_in_child`): tune, evaluate, report accuracy, time and memory."""
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
    return {"accuracy": accuracy, "seconds": result.seconds, "step_s": result.step_time_median_s,
            "peak_mib": peak, "memory_method": method, "run_dir": str(result.run_dir)}


def run_pipeline(path: Path, *, out: Path | None = None, device: str = "auto", root: Path | None = None,
                 overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Run every method of a pipeline; returns (and writes) {"rows": [...], ...}."""
    spec = load_pipeline(path, overrides)
    resolve_device(device)  # an unknown or missing device fails here, not after the first store is cached
    _check_root(root, spec, Path(path))
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
        omega = overrides.get("omega", cache_kwargs.get("omega", CacheConfig.omega))
        cached = store_for(**overrides)
        targets = targets_for(omega)
        if kind == "zeroshot":
            named = {"test_base": "base", "test_new": "new", "test": "all"}
            acc = {named[k]: v for k, v in cached.zeroshot_acc.items() if k in named}
            if "base" in acc and "new" in acc:
                acc["H"] = harmonic_mean(acc["base"], acc["new"])
            for t_name, t_path in targets.items():
                acc[t_name] = FeatureStore.open(t_path).summary()["zeroshot_acc_pct"]["test"]
            rows.append({"method": label, **acc, "tune_s": None, "step_ms": None, "peak_mib": None})  # nothing trained
            continue
        log(f"[{name}] tune {label!r} (omega={omega})")
        tune_kwargs = dict(method, store=cached.path, out=out / label.replace(" ", "_").replace("/", "_"),
                           device=device, progress=progress)
        try:
            report = run_in_child(_tune_and_evaluate, tune_kwargs, targets)
        except ChildFailed as exc:
            raise ConfigError(f"method {label!r} failed: {exc}") from None
        rows.append({"method": label, **report["accuracy"], "tune_s": report["seconds"], "step_ms": 1000 * report["step_s"],
                     "peak_mib": report["peak_mib"], "memory_method": report["memory_method"], "run_dir": report["run_dir"]})
        log(f"[{name}]   {json.dumps({k: round(v, 2) for k, v in report['accuracy'].items()})} in {report['seconds']:.1f} s")
    target_names = [t.get("name", t["dataset"]) for t in spec.get("target", [])]
    result = {"pipeline": name, "file": str(path), "stores": sorted(str(v.path) for v in stores.values()),
              "targets": target_names, "rows": rows}
    write_json_atomic(out / "results.json", result)
    result["out"] = str(out)
    return result
