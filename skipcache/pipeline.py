"""Declarative experiment pipelines: `skipcache run pipelines/NAME.toml`.

A pipeline file holds:

    name, description   strings (the name labels the table and the default output folder)
    protocol            optional: base-to-new, cross-dataset, domain-generalization or few-shot;
                        the table's layout and title (inferred when absent, checked when given)
    [cache]             CacheConfig fields shared by every source store
    [grid]              optional axes, each a non-empty array: `dataset` (source datasets),
                        `seed` (the few-shot sample's and the tuning run's seed), `shots`
    [per_dataset.NAME]  optional, per dataset: TuneConfig fields for every tune method on that
                        dataset (they win over the method's own: `epochs = 5` for ImageNet), and
                        `cache = {...}`, CacheConfig fields for every store of that dataset
    [[target]]          `dataset`, `name`, `dataset_options`: evaluation-only datasets
    [[method]]          `name` and `kind`:
                          zeroshot  the pretrained model, from the logits stored by the cache stage
                          tune      a tuning run: TuneConfig fields, passed through as written;
                                    `omega` and `shots` override [cache] for this method (another
                                    store is cached for it: omega = 0 with cskip = false is FT)

Without a [grid], a file is one cell: [cache]'s dataset and seed. The grid is the
product dataset x shots x seed; every cell runs every method. A grid axis may not also be set in
[cache] or by a method (`seed` and `shots`): the grid sets it for every run.

Every run has a fixed folder under the output folder, `<dataset>/[shots<n>/]<method>/seed<k>`:
a tune run's run directory (skipcache.rundir's format), and next to it `seed<k>.json`, the
pipeline's record of the run (accuracies, time, memory, the stores it used). Running the same
pipeline into the same folder again recomputes nothing that is done:

    - a store is cached once for the settings that determine it and shared by every run that
      needs it (a target's test store at one model and omega serves every tuned model
      evaluated on it, whatever the seed, unless the weights are a seeded random init);
      `stores.json` in the output folder remembers them across invocations, so a re-run does
      not even load the model to find them;
    - a finished run (run.json complete) whose record matches is read back, not retrained; a
      finished run without a record is evaluated (`evaluate_stores`), not retrained;
    - a run with a checkpoint is resumed (`TuneConfig.resume`), one started without a
      checkpoint is started again;
    - a run (finished or checkpointed) trained with other settings than the file now asks for is
      refused, naming the settings, before anything runs.

Each tuning run executes in a fresh child process, and its peak memory is the training phase's
own as the tune stage measures it (`skipcache.memory`): on CUDA `torch.cuda.max_memory_allocated`
over training, on the CPU the trained model's bytes plus the resident-memory growth over
training (loading and imports excluded). Every method is evaluated on the source store's test splits
(base / new / H, or all) and on the test split of every target.

The result is the paper's table layout (`summarise`, `markdown_table`): base-to-new (Table 1)
per dataset and their average, Base / New / H with mean ± std over seeds, H the harmonic mean of
the mean base and mean new accuracy, the average row's H that of the averaged base and new (as
CoCoOp's Table 1 computes it); cross-dataset and domain generalization (Tables 2-3) with the
source, every target and the targets' average; few-shot per number of shots. Written to
`results.md`, `results.csv` and `results.json` in the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from skipcache import rundir
from skipcache.child import ChildFailed, run_in_child
from skipcache.data import list_datasets
from skipcache.errors import ConfigError, RunError, StoreError
from skipcache.runtime import STORE_ENV, default_store_root, resolve_device, write_json_atomic, write_text_atomic
from skipcache.stages.cache import CacheConfig, run_cache
from skipcache.stages.evaluate import harmonic_mean
from skipcache.stages.tune import TuneConfig
from skipcache.store import FeatureStore, key_hash
from skipcache.store_layout import safe_component

METRICS = ("base", "new", "H", "all")
TOP_LEVEL_FIELDS = {"name", "description", "protocol", "cache", "grid", "per_dataset", "target", "method"}
TOP_LEVEL_SCALARS = ("name", "description", "protocol")  # strings; `--set name=...` sets them
TARGET_FIELDS = {"dataset": str, "name": str, "dataset_options": dict}
ZEROSHOT_FIELDS = ("name", "kind", "omega", "shots")
GRID_AXES = ("dataset", "seed", "shots")
# Protocol -> (table layout, title). `all-classes` is only inferred (classes = "all", no targets, no shots axis).
PROTOCOLS = {
    "base-to-new": ("source", "base-to-new generalization (paper Table 1)"),
    "cross-dataset": ("targets", "cross-dataset transfer (paper Table 2)"),
    "domain-generalization": ("targets", "domain generalization (paper Table 3)"),
    "few-shot": ("shots", "few-shot learning"),
}
INFERRED = {"all-classes": ("source", "all classes"), "targets": ("targets", "source and target datasets")}
# Columns of a result row: a target named like one would overwrite it.
ROW_COLUMNS = {*METRICS, "method", "dataset", "seed", "shots", "tune_s", "step_ms", "peak_mib", "memory_method",
               "run_dir", "target avg", "source", "average"}
# Lower bounds that CacheConfig.validate does not check (omega's upper bound needs the model).
CACHE_MINIMUMS = {"omega": 0, "workers": 0}
# CacheConfig fields that change how a store is computed, not what it holds: not part of its identity.
CACHE_RUNTIME = frozenset({"device", "progress", "workers", "batch_size", "force"})
# TuneConfig fields a per-dataset table may not set: where the run's store and folder are, how it runs.
NOT_PER_DATASET = frozenset({"store", "root", "dataset", "model", "omega", "out", "resume", "device", "progress"})
RECORD_VERSION = 1
STORES_FILE = "stores.json"
LOCK_FILE = ".pipeline.lock"


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
    """Every field of a table has its type, and the cache's counts their lower bounds. A field
    whose type is a config dataclass (`cskip`) is the stage's to check, except that a table
    given for it has its fields' types checked here (`method.1.cskip.r`)."""
    for key, value in table.items():
        if key not in schema:
            continue
        accepted, example = schema[key]
        if accepted and not _type_ok(value, accepted):
            expected = " or ".join(_EXPECTED[t] for t in accepted if t in _EXPECTED)
            hint = f"; e.g. {key} = {json.dumps(example)}" if example is not None else ""
            fail(f"{where}.{key} must be {expected}, got {_show(value)}{hint}")
        nested = [t for t in accepted if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, dict):
            _check_fields(f"{where}.{key}", value, _field_types(nested[0]), fail)
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
    by index; `grid.seed=[1]`; `name=...` for the top-level name); values are parsed as TOML
    values when they parse, else taken as strings."""
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


# ------------------------------------------------------------------------------ the grid

@dataclass(frozen=True)
class PlannedRun:
    """One cell of the grid with one method: what to cache, what to train, where it goes.

    Attributes:
        dataset, seed: the source dataset and the run's seed (the grid's, else [cache]'s).
        shots: the grid's shots value; None without a shots axis.
        method, kind, index: the method's name, kind and position in the file.
        cache: CacheConfig fields of the source store.
        tune: TuneConfig fields of a tune method (empty for zeroshot).
        targets: (target name, CacheConfig fields of its store) for every [[target]].
        parts: the run's folder under the output folder, one safe component each.
    """

    dataset: str
    seed: int
    shots: int | None
    method: str
    kind: str
    index: int
    cache: dict
    tune: dict
    targets: tuple
    parts: tuple

    def folder(self, out: Path) -> Path:
        """The run directory (tune) under `out`."""
        return Path(out).joinpath(*self.parts)

    def record_path(self, out: Path) -> Path:
        """The pipeline's record of the run: `seed<k>.json` next to the run directory."""
        folder = self.folder(out)
        return folder.with_name(folder.name + ".json")

    def label(self) -> str:
        shots = f" {self.shots} shots" if self.shots is not None else ""
        return f"{self.dataset} seed {self.seed}{shots} {self.method!r}"


def _slug(method: str) -> str:
    return safe_component(method.replace(" ", "_"))


def source_datasets(spec: dict) -> list[str]:
    """The source datasets: the grid's, else [cache]'s (default `synthetic`)."""
    return list(spec.get("grid", {}).get("dataset") or [spec.get("cache", {}).get("dataset", CacheConfig.dataset)])


def _target_store(spec: dict, target: dict, omega: int, cell_seed: int) -> dict:
    """CacheConfig fields of a target's store: the [cache] model, weights, dtype and template,
    the run's omega, every class, the target's own dataset options. Its seed is [cache]'s (the
    test split does not depend on it), so one store serves every seed of the grid; except with
    `pretrained = "none"`, where the seed is the random init: then the run's seed."""
    cache = spec.get("cache", {})
    shared = {k: v for k, v in cache.items() if k not in ("dataset", "dataset_options", "shots", "seed", "classes", "views")}
    per = spec.get("per_dataset", {}).get(target["dataset"], {}).get("cache", {})
    seeded_init = dict(shared, **per).get("pretrained", CacheConfig.pretrained) == "none"
    seed = cell_seed if seeded_init else cache.get("seed", CacheConfig.seed)
    return dict(shared, **per, dataset=target["dataset"], dataset_options=target.get("dataset_options", {}),
                omega=omega, classes="all", shots=1, views=1, seed=seed)


def plan_runs(spec: dict) -> list[PlannedRun]:
    """Every run of a loaded pipeline, in order: dataset, then shots, then seed, then method."""
    cache, grid, per = spec.get("cache", {}), spec.get("grid", {}), spec.get("per_dataset", {})
    seeds = grid.get("seed") or [cache.get("seed", CacheConfig.seed)]
    shots_axis = grid.get("shots")
    runs = []
    for dataset in source_datasets(spec):
        own = per.get(dataset, {})
        dataset_cache = dict({k: v for k, v in cache.items() if k != "dataset"}, **own.get("cache", {}), dataset=dataset)
        dataset_tune = {k: v for k, v in own.items() if k != "cache"}
        for shots in shots_axis or [None]:
            for seed in seeds:
                for index, method in enumerate(spec["method"]):
                    method = dict(method)
                    label, kind = method.pop("name"), method.pop("kind")
                    source = dict(dataset_cache)
                    if "seed" in grid:
                        source["seed"] = seed
                    if shots is not None:
                        source["shots"] = shots
                    source.update({k: method.pop(k) for k in ("omega", "shots") if k in method})
                    tune = {}
                    if kind == "tune":
                        tune = dict(method, **dataset_tune)
                        if "seed" in grid:
                            tune["seed"] = seed
                    omega = source.get("omega", CacheConfig.omega)
                    targets = tuple((t.get("name", t["dataset"]), _target_store(spec, t, omega, seed))
                                    for t in spec.get("target", []))
                    parts = (safe_component(dataset), *([f"shots{shots}"] if shots is not None else []), _slug(label), f"seed{seed}")
                    runs.append(PlannedRun(dataset, seed, shots, label, kind, index, source, tune, targets, parts))
    return runs


def protocol_of(spec: dict) -> str:
    """The file's `protocol`, else inferred: few-shot with a shots axis, `targets` with
    [[target]]s, base-to-new with base classes, else `all-classes`."""
    if spec.get("protocol"):
        return spec["protocol"]
    if "shots" in spec.get("grid", {}):
        return "few-shot"
    if spec.get("target"):
        return "targets"
    return "base-to-new" if spec.get("cache", {}).get("classes", CacheConfig.classes) == "base" else "all-classes"


def layout_of(protocol: str) -> tuple[str, str]:
    """(layout, title) of a protocol: layout `source`, `targets` or `shots`."""
    return {**PROTOCOLS, **INFERRED}[protocol]


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


def _check_grid(spec: dict, fail) -> None:
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        fail(f"grid must be a table ([grid]), got {_show(grid)}")
    bad = set(grid) - set(GRID_AXES)
    if bad:
        fail(f"unknown [grid] axis(es) {sorted(bad)}; allowed: {list(GRID_AXES)}")
    examples = {"dataset": '["dtd", "eurosat"]', "seed": "[1, 2, 3]", "shots": "[1, 2, 4, 8, 16]"}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            fail(f"grid.{axis} must be a non-empty array, got {_show(values)}; e.g. {axis} = {examples[axis]}")
        for i, v in enumerate(values):
            if axis == "dataset":
                if not isinstance(v, str):
                    fail(f"grid.dataset.{i} must be a string, got {_show(v)}")
            elif not isinstance(v, int) or isinstance(v, bool):
                fail(f"grid.{axis}.{i} must be an integer, got {_show(v)}")
            elif axis == "seed" and not 0 <= v < 2**32:
                fail(f"grid.seed.{i} must be a whole number in [0, 2**32), got {v}")
            elif axis == "shots" and v < 0:
                fail(f"grid.shots.{i} must be >= 0 (0: all images), got {v}")
        repeated = sorted({json.dumps(v) for v in values if values.count(v) > 1})
        if repeated:
            fail(f"grid.{axis} has {', '.join(repeated)} more than once; each value is one cell of the grid")
        if axis in spec.get("cache", {}):
            fail(f"cache.{axis} and grid.{axis} are both set; the grid sets it for every run: drop cache.{axis}")
    for i, m in enumerate(spec.get("method", [])):
        for axis in ("seed", "shots"):
            if axis in grid and axis in m:
                fail(f"method.{i}.{axis} and grid.{axis} are both set; the grid sets it for every run: drop method.{i}.{axis}")


def _check_per_dataset(spec: dict, cache_types: dict, tune_types: dict, fail) -> None:
    per = spec.get("per_dataset", {})
    if not isinstance(per, dict):
        fail(f"per_dataset must be a table of tables ([per_dataset.<dataset>]), got {_show(per)}")
    known = source_datasets(spec) + [t["dataset"] for t in spec.get("target", [])]
    registered = {d.name for d in list_datasets()} if per else set()
    allowed = sorted(set(tune_types) - NOT_PER_DATASET) + ["cache"]
    for dataset, table in per.items():
        where = f"per_dataset.{dataset}"
        if not isinstance(table, dict):
            fail(f"{where} must be a table ([{where}]), got {_show(table)}")
        if dataset not in known and dataset not in registered:  # a registered one: the grid may be narrowed by --set
            fail(f"{where}: {dataset!r} is neither a dataset of this pipeline nor a registered one (`skipcache datasets`); "
                 f"its datasets: {', '.join(dict.fromkeys(known))}")
        bad = set(table) - set(allowed)
        if bad:
            fail(f"{where} has unknown field(s) {sorted(bad)}; it takes the tune methods' settings (epochs, lr...) "
                 "and cache = {...}")
        _check_fields(where, {k: v for k, v in table.items() if k != "cache"}, tune_types, fail)
        own_cache = table.get("cache", {})
        if not isinstance(own_cache, dict):
            fail(f"{where}.cache must be a table, got {_show(own_cache)}")
        bad = set(own_cache) - set(cache_types)
        if bad:
            fail(f"unknown {where}.cache field(s) {sorted(bad)}; allowed: {sorted(cache_types)}")
        for fixed in ("dataset", "seed", "shots"):
            if fixed in own_cache:
                fail(f"{where}.cache.{fixed}: set {fixed} in [cache] or [grid], not per dataset")
        _check_fields(f"{where}.cache", own_cache, cache_types, fail)


def _check_protocol(spec: dict, fail) -> None:
    protocol = spec.get("protocol")
    if protocol is None:
        return
    if protocol not in PROTOCOLS:
        fail(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "base-to-new" and spec.get("cache", {}).get("classes", CacheConfig.classes) != "base":
        fail('protocol "base-to-new" trains on the base classes: set cache.classes = "base"')
    if protocol in ("cross-dataset", "domain-generalization") and not spec.get("target"):
        fail(f"protocol {protocol!r} is evaluated on targets: add [[target]] tables")
    if protocol == "few-shot" and "shots" not in spec.get("grid", {}):
        fail('protocol "few-shot" needs a shots axis: [grid] shots = [1, 2, 4, 8, 16]')
    if protocol != "few-shot" and "shots" in spec.get("grid", {}):
        fail(f'a shots axis makes a few-shot table: set protocol = "few-shot", not {protocol!r}')


def load_pipeline(path: Path, overrides: list[str] = ()) -> dict:
    """Parse and check a pipeline file (plus `--set` overrides) completely, before anything runs:
    every table's shape, every field's type, every method's and the cache's settings, the grid,
    the per-dataset tables, and every run the grid expands to. A ConfigError names the file and
    the field (`cache.omega`, `method.1.lr`, `grid.seed.0`)."""
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
    grid_datasets = (spec.get("grid") or {}).get("dataset") if isinstance(spec.get("grid"), dict) else None
    checked_cache = dict(cache)
    if "dataset" not in cache and isinstance(grid_datasets, list) and grid_datasets:
        checked_cache["dataset"] = grid_datasets[0]  # the grid names the datasets; every expanded run is checked later
    _check_config("cache", lambda: CacheConfig(**checked_cache), fail)

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
    seen: dict = {}
    for i, m in enumerate(methods):
        if "name" in m and not isinstance(m["name"], str):
            fail(f"method.{i}.name must be a string, got {_show(m['name'])}")
        if not m.get("name"):
            fail(f"every [[method]] needs a name; method {i} has none")
        if m["name"] in seen.values():  # names label rows and name run folders: a repeat would collide
            fail(f"method name {m['name']!r} is used twice; names label rows and run folders")
        if _slug(m["name"]) in seen:
            fail(f"methods {seen[_slug(m['name'])]!r} and {m['name']!r} would share the run folder "
                 f"{_slug(m['name'])!r}; rename one")
        seen[_slug(m["name"])] = m["name"]
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
            _check_config(where, lambda: CacheConfig(**dict(checked_cache, **cache_overrides)), fail)
        if m["kind"] == "tune":
            _check_config(where, lambda: TuneConfig(**{k: v for k, v in m.items() if k not in ZEROSHOT_FIELDS}), fail)

    _check_grid(spec, fail)
    _check_per_dataset(spec, cache_types, tune_types, fail)
    _check_protocol(spec, fail)
    # Every run the grid expands to, with its per-dataset settings: checked once per distinct setting.
    checked: set = set()
    for run in plan_runs(spec):
        where = f"method.{run.index} ({run.method!r})"
        if run.dataset in spec.get("per_dataset", {}):
            where = f"per_dataset.{run.dataset} with {where}"
        checks = [("cache", CacheConfig, run.cache), ("tune", TuneConfig, run.tune)]
        checks += [("cache", CacheConfig, settings) for _, settings in run.targets]
        for what, cls, settings in checks:
            if what == "tune" and run.kind != "tune":
                continue
            ident = (what, json.dumps(settings, sort_keys=True, default=str))
            if ident not in checked:
                checked.add(ident)
                _check_config(where, lambda: cls(**settings), fail)
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


def default_out(name: str, overrides: list[str] = ()) -> Path:
    """`runs/pipelines/<name>`, the same folder every time the same pipeline runs, so running it
    again resumes it; `--set` overrides (other than `name=`) add a short hash of themselves
    (`<name>-<hash>`), so another variant does not meet the first one's runs."""
    folder = safe_component(name, max_bytes=200)
    others = sorted(o for o in overrides if o.partition("=")[0] != "name")
    if others:
        folder += "-" + hashlib.sha256("\n".join(others).encode()).hexdigest()[:8]
    return Path("runs") / "pipelines" / folder


# ------------------------------------------------------------------------------ running

def _tune_and_evaluate(tune_kwargs: dict, targets: dict) -> dict:
    """Runs in a spawned process (`run_in_child`): tune (or resume, or find the run finished),
    evaluate, report accuracy, time and memory."""
    from skipcache.stages.evaluate import evaluate_stores
    from skipcache.stages.tune import run_tune

    finished_before = bool(tune_kwargs.get("resume")) and _run_state(Path(tune_kwargs["out"])) == "finished"
    result = run_tune(TuneConfig(**tune_kwargs))
    peak, method = result.peak_memory_mib, result.peak_memory_method  # the training phase's (skipcache.memory)
    device = tune_kwargs.get("device", "auto")
    own, *on_targets = evaluate_stores(result.run_dir, [None, *targets.values()], device=device)
    accuracy = dict(own.accuracy)
    accuracy.update({name: r.accuracy["all"] for name, r in zip(targets, on_targets)})
    return {"accuracy": accuracy, "seconds": result.seconds, "step_s": result.step_time_median_s,
            "peak_mib": peak, "memory_method": method, "run_dir": str(result.run_dir), "trained": not finished_before}


def _run_state(folder: Path) -> str:
    """What a run folder holds: `new` (nothing, or nothing of a run), `started` (config.json,
    no checkpoint: trained again from scratch), `checkpointed` (resumable) or `finished`."""
    if not (folder / rundir.CONFIG).is_file():
        return "new"
    try:
        rundir.read_run(folder)
        return "finished"
    except RunError:
        pass
    return "checkpointed" if (folder / rundir.CHECKPOINT).is_file() else "started"


def _changed(run: PlannedRun, folder: Path) -> list[str]:
    """The training settings of a finished or checkpointed run that differ from the file's."""
    try:
        saved = json.loads((folder / rundir.CONFIG).read_text())
    except (OSError, ValueError):
        return []  # unreadable: the tune stage says what is wrong with it
    cfg = TuneConfig(**run.tune)
    cfg = replace(cfg, warmup_epochs=cfg.resolved_warmup_epochs())  # config.json records the resolved value
    return rundir.changed_settings(cfg, saved) if isinstance(saved, dict) else []


def _refuse_changed(run: PlannedRun, folder: Path, changes: list[str]) -> None:
    raise ConfigError(f"run {folder} ({run.label()}) was trained with other settings than the pipeline's: "
                      f"{', '.join(changes)}; delete that folder to train it again, or pass another --out")


class _Stores:
    """Every store of the pipeline, cached once: keyed by the CacheConfig settings that determine
    it, and remembered in `<out>/stores.json`, so that a later run of the pipeline opens it
    directly (no model load, no dataset listing)."""

    def __init__(self, out: Path, root: Path | None, device: str, progress: bool, log):
        self.file, self.root, self.device, self.progress, self.log = out / STORES_FILE, root, device, progress, log
        try:
            known = json.loads(self.file.read_text())
        except (OSError, ValueError):
            known = {}
        self.known: dict = known if isinstance(known, dict) else {}
        self.opened: dict[str, FeatureStore] = {}

    def get(self, settings: dict) -> FeatureStore:
        settings = dict(settings, **({"root": self.root} if self.root is not None else {}))
        ident = json.dumps({**{k: v for k, v in settings.items() if k not in CACHE_RUNTIME},
                            "root": os.path.abspath(settings.get("root") or default_store_root())}, sort_keys=True, default=str)
        if ident in self.opened:
            return self.opened[ident]
        store = None
        if ident in self.known and not settings.get("force"):
            try:
                store = FeatureStore.open(Path(self.known[ident]))
            except (StoreError, OSError, ValueError):
                store = None
            if store is not None and not _key_matches(store.key, settings):
                store = None
        if store is None:
            cfg = CacheConfig(**dict(settings, device=self.device, progress=self.progress))
            self.log(f"cache {cfg.dataset} omega={cfg.omega} shots={cfg.shots} seed={cfg.seed} classes={cfg.classes}")
            r = run_cache(cfg)
            self.log(f"  {'reused' if r.reused else f'{r.seconds:.1f} s, {r.images_per_s:.1f} img/s'}: {r.path}")
            store = FeatureStore.open(r.path)
            self.known[ident] = str(os.path.abspath(r.path))
            write_json_atomic(self.file, self.known)
        self.opened[ident] = store
        return store


def _key_matches(key: dict, settings: dict) -> bool:
    """A remembered store still is the one these settings make (the fields a key holds as given)."""
    cfg = CacheConfig(**settings)
    same_name = {f.name for f in fields(CacheConfig)} & set(key) - {"model", "pretrained", "template", "templates"}
    return all(json.dumps(key[k], sort_keys=True, default=str) == json.dumps(getattr(cfg, k), sort_keys=True, default=str)
               for k in same_name)


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format_version") == RECORD_VERSION else None


def _zeroshot_accuracy(store: FeatureStore, targets: dict[str, FeatureStore]) -> dict:
    named = {"test_base": "base", "test_new": "new", "test": "all"}
    acc = {named[k]: v for k, v in store.summary()["zeroshot_acc_pct"].items() if k in named}
    if "base" in acc and "new" in acc:
        acc["H"] = harmonic_mean(acc["base"], acc["new"])
    for name, t in targets.items():
        acc[name] = t.summary()["zeroshot_acc_pct"]["test"]
    return acc


def _execute(run: PlannedRun, out: Path, stores: _Stores, *, pipeline: str, device: str, progress: bool, log) -> tuple[dict, str]:
    """One run: its record, and what happened (`reused`, `evaluated`, `resumed`, `trained`, `computed`)."""
    folder, record_path = run.folder(out), run.record_path(out)
    store = stores.get(run.cache)
    targets = {name: stores.get(settings) for name, settings in run.targets}
    ident = {"kind": run.kind, "store_key_hash": key_hash(store.key),
             "target_key_hashes": {name: key_hash(t.key) for name, t in targets.items()}}
    old = _read_record(record_path)
    base = {"format_version": RECORD_VERSION, "pipeline": pipeline, "dataset": run.dataset, "seed": run.seed,
            "shots": run.shots, "method": run.method, **ident, "store": str(store.path),
            "targets": {name: str(t.path) for name, t in targets.items()}}
    if run.kind == "zeroshot":
        if old is not None and all(old.get(k) == v for k, v in ident.items()):
            return old, "reused"
        record = {**base, "accuracy": _zeroshot_accuracy(store, targets), "tune_s": None, "step_ms": None,
                  "peak_mib": None, "memory_method": None, "run_dir": None, "resumed": False}
        write_json_atomic(record_path, record)
        return record, "computed"

    state = _run_state(folder)
    if state in ("checkpointed", "finished"):
        changes = _changed(run, folder)
        if changes:
            _refuse_changed(run, folder, changes)
        config = json.loads((folder / rundir.CONFIG).read_text())
        if config.get("store_key_hash") not in (None, ident["store_key_hash"]):
            raise ConfigError(f"run {folder} ({run.label()}) trained on another store (key hash {config.get('store_key_hash')}) "
                              f"than the pipeline's ({ident['store_key_hash']}, {store.path}); delete that folder to "
                              "train it again, or pass another --out")
    if state == "finished" and old is not None and all(old.get(k) == v for k, v in ident.items()):
        _, info = rundir.read_run(folder)
        if old.get("run_finished_utc") == info.get("finished_utc"):
            return old, "reused"
    tune_kwargs = dict(run.tune, store=str(store.path), out=str(folder), device=device, progress=progress,
                       resume=state in ("checkpointed", "finished"))
    try:
        report = run_in_child(_tune_and_evaluate, tune_kwargs, {name: str(t.path) for name, t in targets.items()})
    except ChildFailed as exc:
        raise ConfigError(f"run {folder} ({run.label()}) failed: {exc}; the runs that finished are kept: "
                          "run the same command again to go on from here") from None
    _, info = rundir.read_run(folder)
    record = {**base, "accuracy": report["accuracy"], "tune_s": report["seconds"], "step_ms": 1000 * report["step_s"],
              "peak_mib": report["peak_mib"], "memory_method": report["memory_method"], "run_dir": str(folder),
              "run_finished_utc": info.get("finished_utc"),
              "resumed": state == "checkpointed" if report["trained"] else bool((old or {}).get("resumed"))}
    write_json_atomic(record_path, record)
    what = {"finished": "evaluated", "checkpointed": "resumed"}.get(state, "trained")
    return record, what


@contextlib.contextmanager
def _hold(out: Path):
    """Hold `<out>/.pipeline.lock` (a POSIX record lock, released when the process ends, however)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"output folder {out} is in use by another `skipcache run`; wait for it to end, "
                          "or pass another --out") from None
    try:
        yield
    finally:
        os.close(fd)


def run_pipeline(path: Path, *, out: Path | None = None, device: str = "auto", root: Path | None = None,
                 overrides: list[str] = (), progress: bool = True, log=print) -> dict:
    """Run (or go on with) every run of a pipeline; returns (and writes) the results: per-run
    `rows`, the aggregated `table`, its `markdown`."""
    spec = load_pipeline(path, overrides)
    resolve_device(device)  # an unknown or missing device fails here, not after the first store is cached
    _check_root(root, spec, Path(path))
    name = spec.get("name", Path(path).stem)
    out = Path(out) if out else default_out(name, list(overrides))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; pass another --out")
    runs = plan_runs(spec)
    # A finished or checkpointed run trained with other settings is refused before anything runs.
    for run in runs:
        if run.kind == "tune" and _run_state(run.folder(out)) in ("checkpointed", "finished"):
            changes = _changed(run, run.folder(out))
            if changes:
                _refuse_changed(run, run.folder(out), changes)
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        log(f"[{name}] {message}")

    with _hold(out):
        say(f"{len(runs)} runs into {out}")
        stores = _Stores(out, root, device, progress, say)
        records = []
        for i, run in enumerate(runs, 1):
            record, what = _execute(run, out, stores, pipeline=name, device=device, progress=progress, log=say)
            records.append(record)
            shown = json.dumps({k: round(v, 2) for k, v in record["accuracy"].items()})
            timing = f" in {record['tune_s']:.1f} s" if what in ("trained", "resumed") else ""
            say(f"{i}/{len(runs)} {run.label()}: {what} {shown}{timing}")
        protocol = protocol_of(spec)
        target_names = [t.get("name", t["dataset"]) for t in spec.get("target", [])]
        table = summarise(records, protocol=protocol, targets=target_names)
        text = markdown_table(table, protocol=protocol, targets=target_names, title=name, records=records)
        write_text_atomic(out / "results.md", text)
        write_text_atomic(out / "results.csv", csv_table(table))
        rows = [{"method": r["method"], "dataset": r["dataset"], "seed": r["seed"], "shots": r["shots"], **r["accuracy"],
                 "tune_s": r["tune_s"], "step_ms": r["step_ms"], "peak_mib": r["peak_mib"],
                 **({"memory_method": r["memory_method"], "run_dir": r["run_dir"]} if r.get("run_dir") else {})}
                for r in records]
        result = {"pipeline": name, "file": str(path), "protocol": protocol, "stores": sorted({r["store"] for r in records} |
                  {p for r in records for p in r["targets"].values()}), "targets": target_names, "rows": rows,
                  "table": table, "markdown": text}
        write_json_atomic(out / "results.json", result)
    result["out"] = str(out)
    return result


# ------------------------------------------------------------------------------ the table

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard deviation over seeds; the std is the population std (numpy's default,
    as CoOp's `parse_test_res.py` reports it), None for a single value."""
    return _mean(values), (statistics.pstdev(values) if len(values) > 1 else None)


def _values(record: dict, targets: list[str]) -> dict[str, float]:
    """A record's accuracies, plus `target avg` (the mean over the targets) when it has targets."""
    acc = {k: v for k, v in record["accuracy"].items() if k != "H"}  # H is recomputed from the means
    if targets:
        acc["target avg"] = _mean([record["accuracy"][t] for t in targets])
    return acc


def _costs(records: list[dict]) -> dict:
    tuned = [r for r in records if r.get("tune_s") is not None]
    if not tuned:
        return {"tune_s": None, "step_ms": None, "peak_mib": None, "resumed": False}
    return {"tune_s": _mean([r["tune_s"] for r in tuned]), "step_ms": _mean([r["step_ms"] for r in tuned]),
            "peak_mib": max(r["peak_mib"] for r in tuned), "resumed": any(r.get("resumed") for r in tuned)}


def _group_stats(records: list[dict], targets: list[str]) -> dict:
    """Mean ± std over the seeds of one (dataset, method[, shots]); H from the mean base and new."""
    per_seed = [_values(r, targets) for r in records]
    metrics = [k for k in per_seed[0] if all(k in v for v in per_seed)]
    stats = {m: mean_std([v[m] for v in per_seed]) for m in metrics}
    if "base" in stats and "new" in stats:
        stats["H"] = (harmonic_mean(stats["base"][0], stats["new"][0]), None)
    return stats


def _average_stats(groups: list[list[dict]], targets: list[str]) -> dict:
    """The average over datasets: each metric the mean of the datasets' means, its std over seeds
    of each seed's mean over datasets (seeds every dataset has); H the harmonic mean of the
    averaged base and new (CoCoOp's "Average over 11 datasets", the paper's Table 1 layout)."""
    per_dataset = [_group_stats(g, targets) for g in groups]
    metrics = [k for k in per_dataset[0] if k != "H" and all(k in s for s in per_dataset)]
    seeds = set.intersection(*({r["seed"] for r in g} for g in groups))
    stats = {}
    for m in metrics:
        mean = _mean([s[m][0] for s in per_dataset])
        by_seed = [_mean([next(_values(r, targets)[m] for r in g if r["seed"] == seed) for g in groups])
                   for seed in sorted(seeds)]
        stats[m] = (mean, statistics.pstdev(by_seed) if len(by_seed) > 1 else None)
    if "base" in stats and "new" in stats:
        stats["H"] = (harmonic_mean(stats["base"][0], stats["new"][0]), None)
    return stats


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def summarise(records: list[dict], *, protocol: str, targets: list[str] = ()) -> list[dict]:
    """The table's rows from the runs' records. Each row: `dataset` (a dataset, or `Average`),
    `method`, `shots`, `seeds`, `values` ({column: [mean, std or None]}), `tune_s` (mean per
    run), `step_ms` (mean), `peak_mib` (the largest over the runs), `resumed`.

    Layouts (`layout_of(protocol)`): `source` and `targets` have a row per (dataset, method),
    and with several datasets an `Average` row per method first; `shots` has a row per
    (method, shots) whose values are per dataset (the headline accuracy: `all`, else H) and
    `average`, the mean over datasets."""
    targets = list(targets)
    layout, _ = layout_of(protocol)
    datasets = _ordered(r["dataset"] for r in records)
    methods = _ordered(r["method"] for r in records)
    rows: list[dict] = []

    def row(dataset, method, shots, group_records, values) -> dict:
        return {"dataset": dataset, "method": method, "shots": shots, "seeds": sorted({r["seed"] for r in group_records}),
                "values": {k: list(v) for k, v in values.items()}, **_costs(group_records)}

    if layout in ("source", "targets"):
        for method in methods:
            groups = [[r for r in records if r["method"] == method and r["dataset"] == d] for d in datasets]
            groups = [g for g in groups if g]
            if len(groups) > 1:
                rows.append(row("Average", method, None, [r for g in groups for r in g], _average_stats(groups, targets)))
        for d in datasets:
            for method in methods:
                group = [r for r in records if r["method"] == method and r["dataset"] == d]
                if group:
                    rows.append(row(d, method, None, group, _group_stats(group, targets)))
        return rows

    shots_values = _ordered(r["shots"] for r in records)
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        zeroshot = all(r.get("kind") == "zeroshot" for r in mine)
        for shots in shots_values[:1] if zeroshot else shots_values:  # zero-shot does not depend on the shots: once
            group = [r for r in mine if r["shots"] == shots]
            values, used = {}, []
            for d in datasets:
                g = [r for r in group if r["dataset"] == d]
                if not g:
                    continue
                stats = _group_stats(g, targets)
                headline = "all" if "all" in stats else "H" if "H" in stats else None
                if headline is None:
                    continue
                values[d] = stats[headline]
                used.append(g)
            if len(used) > 1:
                if all("all" in _group_stats(g, targets) for g in used):
                    values["average"] = _average_stats(used, targets)["all"]
                else:
                    values["average"] = (_mean([v[0] for v in values.values()]), None)
            if group:
                rows.append(row(None, method, 0 if zeroshot else shots, group, values))
    return rows


def _columns(table: list[dict], protocol: str, targets: list[str]) -> list[str]:
    """The value columns of a table, in the paper's order."""
    layout, _ = layout_of(protocol)
    present = _ordered(k for r in table for k in r["values"])
    if layout == "shots":
        return present
    source = [m for m in METRICS if m in present]
    return source + [t for t in targets if t in present] + (["target avg"] if "target avg" in present else [])


def _fmt(value) -> str:
    mean, std = value
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(table: list[dict], *, protocol: str, targets: list[str] = (), title: str = "",
                   records: list[dict] = ()) -> str:
    """The table in markdown, with a title line and notes saying how every number is computed."""
    layout, what = layout_of(protocol)
    columns = _columns(table, protocol, list(targets))
    labels = {"all": "source" if layout == "targets" else "all"}
    head = (["method", "shots"] if layout == "shots" else ["dataset", "method"]) + [labels.get(c, c) for c in columns]
    head += ["tune s", "step ms", "peak MiB"]
    lines = [f"### {title}: {what}" if title else f"### {what}", "",
             "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * (len(head) - len(columns) - 3) + ["---:"] * (len(columns) + 3)) + " |"]
    for r in table:
        first = [r["method"], str(r["shots"])] if layout == "shots" else [r["dataset"], r["method"]]
        cells = [_fmt(r["values"][c]) if c in r["values"] else "–" for c in columns]
        tune = "–" if r["tune_s"] is None else f"{r['tune_s']:.1f}" + (" †" if r["resumed"] else "")
        step = "–" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append("| " + " | ".join(first + cells + [tune, step, peak]) + " |")
    seeds = sorted({s for r in table for s in r["seeds"]})
    notes = [f"Top-1 accuracy (%) over seeds {', '.join(map(str, seeds))}: mean ± std (population std, as CoOp's "
             "parse_test_res.py); one seed: the value." if len(seeds) > 1 else f"Top-1 accuracy (%), seed {seeds[0] if seeds else '–'}."]
    if "H" in columns:
        notes.append("H: the harmonic mean of the mean base and the mean new accuracy.")
    if any(r["dataset"] == "Average" for r in table):
        notes.append("Average: the mean over datasets of each column (± over seeds of each seed's mean over datasets); "
                     "its H is the harmonic mean of the averaged base and new, as CoCoOp's Table 1 computes it "
                     "(not the mean of the datasets' H).")
    if "target avg" in columns:
        notes.append("target avg: the mean over the targets (± over seeds of each seed's mean over the targets).")
    if layout == "shots":
        notes.append("Columns: per dataset, accuracy on all classes (H with base-to-new classes); average: the mean "
                     "over datasets. Zero-shot is one row (shots 0): it does not depend on the training shots.")
    memory = sorted({r["memory_method"] for r in records if r.get("memory_method")})
    notes.append("tune s: wall time of a tuning run (mean over the runs of the row); step ms: median step time; "
                 f"peak MiB: the largest peak of the row's runs ({'; '.join(memory) or 'no tuning run'}).")
    if any(r["resumed"] for r in table):
        notes.append("†: a run of the row was resumed; its time counts only the part after the resume.")
    return "\n".join(lines + [""] + notes) + "\n"


def csv_table(table: list[dict]) -> str:
    """The table as CSV: one line per row, every value column as `<column>` and `<column>_std`."""
    columns = _ordered(k for r in table for k in r["values"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "method", "shots", "seeds", *[c for col in columns for c in (col, f"{col}_std")],
                     "tune_s", "step_ms", "peak_mib", "resumed"])

    def number(v):
        return "" if v is None else f"{v:.4f}"

    for r in table:
        values = [number(x) for c in columns for x in (r["values"].get(c) or (None, None))]
        writer.writerow(["" if r["dataset"] is None else r["dataset"], r["method"], "" if r["shots"] is None else r["shots"],
                         " ".join(map(str, r["seeds"])), *values, number(r["tune_s"]), number(r["step_ms"]),
                         number(r["peak_mib"]), str(r["resumed"]).lower()])
    return buffer.getvalue()
