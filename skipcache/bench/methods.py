"""What `skipcache bench` (`python -m skipcache.bench`, `make benchmark`) measures: every training
method of `skipcache.baselines` on one workload, each in a fresh spawned child process
(`skipcache.child.run_in_child`), so that its peak memory is its own.

Cost. A store of random tokens with the cached shapes of the preset's model (random init costs
what pretrained weights cost) is written once per omega and class count. The child builds the
method exactly as `skipcache tune` does (`skipcache.stages.tune.setup_training`: the method's
model, optimiser and step object) and times that step object on batches read from the store:
`warmup` untimed steps, then `steps` timed ones (`skipcache.step.StepTimer`: CUDA events, or
the wall clock on the CPU); the step time is their median. Epoch time = steps per epoch x step
time, with steps per epoch = classes x shots / batch size (the base-to-new training split).

Peak memory (`skipcache.memory.MemoryMeter`, the tune stage's meter). CUDA:
`torch.cuda.max_memory_allocated` over the steps (reset before the first), so it holds the
weights, gradients, optimizer state and activations. CPU: the same sum, as the bytes of the
method's model (parameters and buffers, counted) plus the child's peak resident memory over the
steps above its resident memory before the first step (VmHWM reset then, after the heap's free
pages are handed back): gradients, optimizer state, activations, allocator slack. Model loading
and the imports happen before that window and are not counted. The method is stored with each
number.

Accuracy. On the preset's synthetic task the parent caches one real store per omega (the cache
stage); each child runs the real `run_tune` and `evaluate_stores` on it and reports base, new
and H in percent, the run's wall time and its median step.

Rows. A row is a `skipcache tune --method` at the omega of the store it reads, with its
options (`ROWS`). The methods that run without the persistent cache (`ft-conventional`, the
paper's FT; `paper-schedule`, the authors' schedule; CoOp and CLIP-Adapter as published) read a
store at omega 0 and run every block every step; CoOp and CLIP-Adapter also have their cached
rows (omega N). Ratios are against `ft-conventional`, as the paper's are against its FT.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from skipcache.memory import MemoryMeter, tensor_mib

# The paper's Tables 4 and 5 (ViT-B/16): training time in seconds and memory in MB. The memory is
# a torchinfo estimate, not a measurement.
PAPER = {
    "ft": {"time_s": 1002, "memory_mb": 1846, "table": 4},
    "ft-lskip": {"time_s": 388, "memory_mb": 861, "table": 4},
    "ft-cskip": {"time_s": 440, "memory_mb": 919, "table": 4},
    "skip-tuning": {"time_s": 239, "memory_mb": 404, "table": 4},
    "clip-adapter": {"time_s": 888, "memory_mb": 1784, "table": 5},
    "lora": {"time_s": 910, "memory_mb": 1580, "table": 5},
    "coop": {"time_s": 1186, "memory_mb": 3204, "table": 5},
}
@dataclass(frozen=True)
class Row:
    """One row of the method table: a `skipcache tune --method` at the omega of the store it reads,
    with its options. `omega` is a rule of the model's depth N: "0", "half" (N // 2, the paper's 6
    of 12), "fast" (N - N // 4) or "all" (N). `paper`: the key of the paper's figures (`PAPER`);
    `accuracy_from`: the row whose trained accuracy this row shares (the same training, computed
    without the cache: equal up to float rounding), so the accuracy task trains it once."""

    name: str
    method: str
    label: str
    omega: str
    options: dict = field(default_factory=dict)
    paper: str | None = None
    accuracy_from: str | None = None


ROWS = (
    Row("ft-conventional", "ft-conventional", "FT, conventional (no cache, 77-token prompts): the paper's FT", "0",
        paper="ft", accuracy_from="ft"),
    Row("ft", "ft", "FT in this harness (store at ω 0, prompts trimmed)", "0"),
    Row("ft-lskip", "ft-lskip", "FT + LSkip", "half", paper="ft-lskip"),
    Row("ft-cskip", "ft-cskip", "FT + CSkip", "0", paper="ft-cskip"),
    Row("skip-tuning", "skip-tuning", "Skip Tuning", "half", paper="skip-tuning"),
    Row("fast", "fast", "Skip Tuning (fast: ω N − N/4, r 0.25)", "fast"),
    Row("paper-schedule", "paper-schedule", "Skip Tuning, the authors' schedule (no cache, 77-token prompts)", "0"),
    Row("coop", "coop", "CoOp as published (image tower every step, 77-token prompts)", "0", {"full_context": True},
        paper="coop", accuracy_from="coop-cached"),
    Row("coop-cached", "coop", "CoOp, image side cached (ω N), prompts trimmed", "all"),
    Row("clip-adapter", "clip-adapter", "CLIP-Adapter as published (image tower every step)", "0", paper="clip-adapter",
        accuracy_from="clip-adapter-cached"),
    Row("clip-adapter-cached", "clip-adapter", "CLIP-Adapter, cached final features (ω N)", "all"),
    Row("lora", "lora", "LoRA (rank 4, every block of both towers)", "0", paper="lora"),
)
ROW = {r.name: r for r in ROWS}
METHOD_ORDER = tuple(r.name for r in ROWS)  # the rows, in the report's order
# the other methods Skip Tuning is compared with in the report's findings (not its own ablations)
PEERS = ("ft", "paper-schedule", "coop", "coop-cached", "clip-adapter", "clip-adapter-cached", "lora")
REFERENCE = "ft-conventional"  # time ÷ FT and memory ÷ FT are against this row, as the paper's are against its FT


def row_omega(row: Row | str, depth: int) -> int:
    """The omega of the store a row's method reads (see `Row`)."""
    from skipcache.baselines import fast_omega

    rule = (ROW[row] if isinstance(row, str) else row).omega
    return {"0": 0, "half": depth // 2, "fast": fast_omega(depth), "all": depth}[rule]


@dataclass(frozen=True)
class CostWorkload:
    """The workload every method is timed on."""

    model: str = "ViT-B-16"
    classes: int = 50  # training classes M (the base half of a 100-class task)
    shots: int = 16  # images per class: an epoch is classes x shots / batch_size steps
    batch_size: int = 4
    steps: int = 2
    warmup: int = 1
    device: str = "auto"
    precision: str = "auto"  # the tune stage's: bf16 autocast on CUDA, fp32 on the CPU
    threads: int | None = None
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.classes * self.shots / self.batch_size)


@dataclass(frozen=True)
class AccuracyTask:
    """The synthetic base-to-new task every method is trained and evaluated on: by default the
    demo's (`pipelines/demo.toml`: synthetic-shades, 25 base / 25 new classes, 16 of 32 images per
    class, seed 1) with its recipe (batch 16, 5 epochs, one warm-up epoch, then cosine)."""

    dataset: str = "synthetic-shades"
    dataset_options: dict = field(default_factory=lambda: {"train_per_class": 32})
    model: str = "synth-vit"
    pretrained: str = "synth"
    shots: int = 16
    seed: int = 1
    epochs: int = 5
    warmup_epochs: int = 1
    batch_size: int = 16
    converged: bool = True
    # per method: TuneConfig fields (lr, lr_image, method_options...) on top of the shared ones
    recipes: dict = field(default_factory=dict)


# Learning rates on the synthetic task (SGD, momentum 0.9, weight decay 5e-4, batch 16, 5 epochs, one
# warm-up epoch at 1e-6, then cosine). Skip Tuning's family uses the demo's (chosen for FT). Each
# baseline's was chosen the way the demo chose FT's: on held-out base-class images (the task
# rendered with dataset seed 1000), the smallest rate within half a point of the best
# (docs/results.md, "Every method": the sweep).
SYNTH_RECIPES = {
    "ft": {"lr": 2e-3, "lr_image": 5e-4},
    "ft-lskip": {"lr": 2e-3, "lr_image": 5e-4},
    "ft-cskip": {"lr": 2e-3, "lr_image": 5e-4},
    "skip-tuning": {"lr": 2e-3, "lr_image": 5e-4},
    "fast": {"lr": 2e-3, "lr_image": 5e-4},
    "paper-schedule": {"lr": 2e-3, "lr_image": 5e-4},
    "coop": {"lr": 1e-2},  # random init; held-out base 70.6 / 20.2 / 81.6 / 18.2 / 74.2 at 2e-3 .. 4e-2: unstable
    "clip-adapter": {"lr_image": 0.32},  # the adapter is on the image side; 0.08 / 0.16 / 0.32 / 0.64: 87.4 / 88.6 / 89.8 / 88.8
    "lora": {"lr": 4e-2},  # image side lr / 4; 2e-2 / 4e-2 / 8e-2 / 0.16: 94.0 / 96.2 / 96.4 / 6.0
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cost: CostWorkload
    classes_sweep: tuple[tuple[str, int], ...] = ()  # (method, classes) points of the cost-vs-classes sweep
    omega_sweep: tuple[tuple[str, int], ...] = ()  # (method, omega) points of the cost-vs-omega sweep
    accuracy: AccuracyTask | None = None


def grid(methods: tuple[str, ...], values: tuple[int, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((m, v) for m in methods for v in values)


PRESETS = {
    "tiny": Preset(
        "tiny", "smoke run (about a minute): the tiny model for cost, synth-vit trained for one epoch on 2 shots of "
                "the demo's synthetic task; the accuracies are not converged",
        CostWorkload(model="tiny", classes=10, steps=1, warmup=1),
        classes_sweep=grid(("skip-tuning",), (10, 100)), omega_sweep=grid(("skip-tuning",), (0, 6)),
        accuracy=AccuracyTask(dataset_options={"train_per_class": 2, "test_per_class": 2}, shots=2, epochs=1, batch_size=8,
                              converged=False, recipes=SYNTH_RECIPES)),
    "cpu": Preset(
        "cpu", "ViT-B/16 (random init: the cost of pretrained weights) on the CPU, fp32; accuracy of every method "
               "on the demo's synthetic base-to-new task (synthetic-shades) with synth-vit",
        CostWorkload(model="ViT-B-16", classes=100, steps=3, warmup=1),
        # small, to stay within 15 minutes on 2 cores (points equal to a row of the method table are
        # not run again); FT and CoOp at 1000 classes take minutes per step there, so their lines stop at 300
        classes_sweep=grid(("ft-conventional",), (10, 100)) + grid(("ft", "coop-cached"), (10, 100, 300))
        + grid(("skip-tuning",), (10, 100, 300, 1000)),
        omega_sweep=grid(("skip-tuning",), (0, 6, 9, 12)),
        accuracy=AccuracyTask(recipes=SYNTH_RECIPES)),
    "gpu": Preset(
        "gpu", "the paper's settings on a GPU: ViT-B/16, batch 4, 16 shots, the ImageNet base half (500 classes), "
               "bf16 autocast; the synthetic task for accuracy",
        CostWorkload(model="ViT-B-16", classes=500, steps=20, warmup=5),
        classes_sweep=grid(("ft-conventional", "ft", "skip-tuning", "coop", "coop-cached", "clip-adapter", "lora"),
                           (10, 30, 100, 300, 1000)),
        omega_sweep=grid(("skip-tuning", "ft-lskip"), (0, 2, 4, 6, 8, 10, 12)),
        accuracy=AccuracyTask(recipes=SYNTH_RECIPES)),
}


# ------------------------------------------------------------------------------ stores


def random_store(root: Path, model: str, omega: int, classes: int, rows: int, *, seed: int = 0) -> Path:
    """A complete store of random tokens with `model`'s cached shapes at `omega` (reused when present);
    the shapes come from the model's config and tokenizer, so no model is built."""
    from skipcache.bench.steps import TEMPLATE, classnames
    from skipcache.loading import config_of, tokenizer_for
    from skipcache.store import FeatureStore, SplitSpec, store_path

    cfg = config_of(model)
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    key = {"dataset": "bench-random", "model": model, "pretrained_label": "none", "weights_hash": f"random-seed{seed}",
           "omega": omega, "seed": seed, "classes_m": classes, "rows": rows, "dtype": "float16"}
    path = store_path(root, key)
    if path.exists():
        return path
    names = classnames(classes)
    eot = tokenizer_for(model)([TEMPLATE.format(c) for c in names]).argmax(dim=-1)
    lv, dv, dt, embed = (vc["image_size"] // vc["patch_size"]) ** 2 + 1, vc["width"], tc["width"], cfg["embed_dim"]
    lt = int(eot.max()) + 1
    g = torch.Generator().manual_seed(seed)
    spec = SplitSpec("train", rows, 1, list(range(classes)), (lv, dv))
    store = FeatureStore.create_or_resume(path, key, text_shape=(classes, lt, dt), embed_dim=embed, splits=[spec],
                                          storage_dtype="float16")
    store.write_text(torch.randn(classes, lt, dt, generator=g), eot, F.normalize(torch.randn(classes, embed, generator=g), dim=-1),
                     names, TEMPLATE)
    for shard in range(store.n_shards("train")):
        r = store.shard_rows("train", shard)
        logits = torch.randn(len(r), classes, generator=g)
        store.write_shard("train", shard, vision=torch.randn(1, len(r), lv, dv, generator=g).half(),
                          labels=torch.tensor([i % classes for i in r]), zeroshot_logits=logits,
                          zeroshot_rank=logits.argsort(dim=1, descending=True).argsort(dim=1),
                          source_ids=[f"random-{i}" for i in r])
    store.finalize()
    return path


# ---------------------------------------------------------------------------- measuring


def _timed_steps(step, batches: list[dict], warmup: int, place) -> dict:
    """Run the step on every batch; the first `warmup` untimed. Wall time per step (`StepTimer`:
    CUDA events, or the wall clock) and, on the CPU, the process's CPU time per step."""
    from skipcache.step import StepTimer

    timer = StepTimer(place)
    cpu_times = []
    stats = None
    for i, batch in enumerate(batches):
        if i < warmup:
            stats = step(batch)
            continue
        cpu0 = time.process_time()
        timer.start()
        stats = step(batch)
        timer.stop()
        cpu_times.append(time.process_time() - cpu0)
    place.synchronize()
    wall = sorted(timer.times())
    out = {"step_time_s": wall[len(wall) // 2], "step_times_s": wall, "text_classes_per_step": float(stats[3])}
    if not place.is_cuda:
        cpu_times.sort()
        out.update(step_cpu_s=cpu_times[len(cpu_times) // 2], step_cpu_times_s=cpu_times)
    return out


def _with_epoch(timing: dict, work: CostWorkload) -> dict:
    timing = dict(timing, steps_per_epoch=work.steps_per_epoch, epoch_time_s=timing["step_time_s"] * work.steps_per_epoch)
    if "step_cpu_s" in timing:
        timing["epoch_cpu_s"] = timing["step_cpu_s"] * work.steps_per_epoch
    return timing


def measure_cost(method: str, store: str, work: CostWorkload, cskip: dict | None = None,
                 method_options: dict | None = None) -> dict:
    """(child) Time `method`'s own step object, built by the tune stage's `setup_training`, on `store`."""
    if work.threads:
        torch.set_num_threads(work.threads)
    torch.manual_seed(work.seed)
    from skipcache.placement import Placement, prefetch_to_device
    from skipcache.stages.tune import TuneConfig, setup_training
    from skipcache.store import FeatureStore

    place = Placement.resolve(work.device, work.precision)
    opened = FeatureStore.open(Path(store))
    cfg = TuneConfig(store=Path(store), method=method, method_options=method_options or {}, batch_size=work.batch_size,
                     device=work.device, precision=work.precision, progress=False, seed=work.seed,
                     **({"cskip": cskip} if cskip is not None else {}))
    cfg.validate()
    meter = MemoryMeter(place.device)
    training = setup_training(cfg, opened, place)
    read_dtype = None if place.is_cuda else torch.float32
    n = work.warmup + work.steps
    batches = list(prefetch_to_device(
        (b for _, b in zip(range(n), opened.iter_batches("train", work.batch_size, shuffle=True, seed=work.seed, dtype=read_dtype))),
        place))
    weights = tensor_mib(training.deep, getattr(training.step, "tensors", dict)())
    meter.start()
    timing = _with_epoch(_timed_steps(training.step, batches, work.warmup, place), work)
    memory = meter.peak(weights)
    return {**timing, **memory,
            "trainable_params": sum(p.numel() for p in training.deep.parameters() if p.requires_grad),
            "method_options": training.method_options,
            "omega": int(opened.key["omega"]), "classes": len(opened.splits["train"].classes),
            "precision": place.precision, "device": str(place.device), "threads": torch.get_num_threads()}


def train_and_evaluate(method: str, options: dict, store: str, out: str, task: AccuracyTask, device: str,
                       threads: int | None) -> dict:
    """(child) `skipcache tune --method` on a real store, then eval: base / new / H in percent."""
    if threads:
        torch.set_num_threads(threads)
    from skipcache.stages.evaluate import evaluate_stores
    from skipcache.stages.tune import TuneConfig, run_tune

    recipe = dict(task.recipes.get(method, {}))
    t0 = time.perf_counter()
    result = run_tune(TuneConfig(store=Path(store), out=Path(out), method=method, method_options=options, epochs=task.epochs,
                                 batch_size=task.batch_size, warmup_epochs=min(task.warmup_epochs, task.epochs - 1),
                                 seed=task.seed, device=device, progress=False, checkpoint_every_s=1e9, **recipe))
    tune_s = time.perf_counter() - t0
    ev = evaluate_stores(Path(out), [None], device=device)[0]
    return {"accuracy": {k: ev.accuracy[k] for k in ("base", "new", "H") if k in ev.accuracy}, "zeroshot": ev.zeroshot,
            "label": ev.method, "tune_s": tune_s, "run_step_time_s": result.step_time_median_s, "recipe": recipe,
            "final_train_acc": result.final.get("train_acc"), "run_dir": out}


def measure_method(row: Row, cost_store: str, work: CostWorkload, accuracy_store: str | None,
                   task: AccuracyTask | None, out: str) -> dict:
    """(child) The cost of one row's method, then (when a store is given) its accuracy: one process
    per row, the memory read before anything else runs in it."""
    result = measure_cost(row.method, cost_store, work, method_options=row.options)
    if accuracy_store is not None and task is not None:
        try:
            result["trained"] = train_and_evaluate(row.method, row.options, accuracy_store, out, task, work.device, work.threads)
        except Exception as exc:  # the cost stands; the accuracy says why it is missing
            result["trained"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def in_child(fn, *args) -> dict:
    """`fn(*args)` in a fresh spawned process; {"error": ...} if it failed; its wall time added."""
    from skipcache.child import ChildFailed, run_in_child

    started = time.perf_counter()
    try:
        out = run_in_child(fn, *args)
    except ChildFailed as exc:
        out = {"error": str(exc), "traceback": exc.traceback}
    out["wall_s"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------------------- the run


def run_preset(preset: Preset, out: Path, *, device: str = "auto", threads: int | None = None,
               only: tuple[str, ...] | None = None, sweeps: bool = True, accuracy: bool = True, epochs: int | None = None,
               log=print) -> dict:
    """Every measurement of `preset` (`only`: these rows; `epochs`: the accuracy task's, instead of
    the preset's); returns the report dict (the JSON `skipcache bench` writes)."""
    from skipcache.loading import model_depth

    if epochs is not None and preset.accuracy is not None:
        preset = replace(preset, accuracy=replace(preset.accuracy, epochs=epochs))

    work = replace(preset.cost, device=device, threads=threads)
    if threads:
        torch.set_num_threads(threads)  # this process caches the accuracy task's stores
    rows = [r for r in ROWS if only is None or r.name in only]
    depth = model_depth(work.model)
    stores = out / "stores"
    n_rows = work.batch_size * (work.warmup + work.steps)
    started = time.perf_counter()

    def store_for(omega: int, classes: int) -> str:
        return str(random_store(stores, work.model, omega, classes, n_rows, seed=work.seed))

    task = preset.accuracy if accuracy else None
    trained_rows = [r for r in rows if r.accuracy_from is None]
    accuracy_stores, task_info = _cache_accuracy_stores(task, trained_rows, out, device, log)
    results: dict[str, dict] = {}
    for row in rows:
        omega = row_omega(row, depth)
        log(f"{row.name}: cost (omega {omega}, {work.classes} classes)" + (", then accuracy" if row.name in accuracy_stores else "") + " ...")
        r = in_child(measure_method, row, store_for(omega, work.classes), work, accuracy_stores.get(row.name), task,
                     str(out / "runs" / row.name))
        trained = r.pop("trained", None)
        r.update(name=row.name, method=row.method, label=row.label, paper=PAPER.get(row.paper) if row.paper else None,
                 omega=omega, accuracy=None)
        if trained is not None and "error" in trained:
            r["accuracy_error"] = trained["error"]
        elif trained is not None:
            r.update(accuracy=trained["accuracy"], accuracy_label=trained["label"], tune_s=trained["tune_s"],
                     tune_step_time_s=trained["run_step_time_s"], recipe=trained["recipe"],
                     accuracy_omega=row_omega(row, model_depth(task.model)))
            task_info["zeroshot"] = trained["zeroshot"]
        results[row.name] = r
    for row in rows:  # rows whose training is another row's, computed without the cache
        source = results.get(row.accuracy_from or "")
        if row.accuracy_from and source and source.get("accuracy"):
            results[row.name].update(accuracy=source["accuracy"], accuracy_from=row.accuracy_from)

    sweep_rows: dict[str, list[dict]] = {"classes": [], "omega": []}
    for kind, points in (("classes", preset.classes_sweep if sweeps else ()), ("omega", preset.omega_sweep if sweeps else ())):
        for name, value in points:
            row = ROW[name]
            omega, classes = (row_omega(row, depth), value) if kind == "classes" else (value, work.classes)
            if (only is not None and name not in only) or (depth is not None and omega > depth) or (row.method == "ft-lskip" and omega == 0):
                continue
            main = next((r for n, r in results.items() if _same_training(ROW[n], row) and r.get("omega") == omega
                         and classes == work.classes and "error" not in r), None)
            if main is not None:
                r = dict(main)  # the point the method table already measured
            else:
                log(f"sweep: {name} at omega {omega}, {classes} classes ...")
                r = in_child(measure_cost, row.method, store_for(omega, classes), work, None, row.options)
            sweep_rows[kind].append(_sweep_row(name, r, **{kind: value}))

    _ratios(results)
    return {"meta": {"preset": preset.name, "description": preset.description, "total_s": time.perf_counter() - started,
                     "model_depth": depth, "time_basis": time_basis(results), "reference": REFERENCE},
            "config": {"cost": asdict(work), "classes_sweep": [list(p) for p in preset.classes_sweep],
                       "omega_sweep": [list(p) for p in preset.omega_sweep],
                       "accuracy": asdict(preset.accuracy) if preset.accuracy else None},
            "methods": [results[r.name] for r in rows], "sweeps": sweep_rows, "accuracy_task": task_info,
            "findings": findings(results)}


def _same_training(a: Row, b: Row) -> bool:
    """Whether two rows train the same thing on a store of the same omega (Skip Tuning at omega 0
    is FT + CSkip; FT and FT + LSkip differ only in the store's omega)."""
    groups = ({"skip-tuning", "ft-cskip"}, {"ft", "ft-lskip"})
    same_method = a.method == b.method or any(a.method in g and b.method in g for g in groups)
    return same_method and a.options == b.options


def _sweep_row(name: str, r: dict, **where) -> dict:
    row = {"method": name, **where}
    if "error" in r:
        return {**row, "error": r["error"]}
    return {**row, **{k: r[k] for k in ("step_time_s", "epoch_time_s", "step_cpu_s", "epoch_cpu_s", "peak_memory_mib", "memory_method",
                                        "text_classes_per_step", "trainable_params", "omega", "classes") if k in r}}


def _cache_accuracy_stores(task: AccuracyTask | None, rows: list[Row], out: Path, device: str, log) -> tuple[dict, dict | None]:
    """The real stores of the accuracy task (the cache stage, in this process), one per omega the
    rows need: ({row name: store path}, the task's record)."""
    if task is None or not rows:
        return {}, None
    from skipcache.loading import model_depth
    from skipcache.stages.cache import CacheConfig, run_cache

    depth = model_depth(task.model)
    cached: dict[int, dict] = {}
    by_row = {}
    for row in rows:
        omega = row_omega(row, depth)
        if omega not in cached:
            log(f"accuracy: caching {task.dataset} with {task.model} at omega {omega} ...")
            c = run_cache(CacheConfig(dataset=task.dataset, dataset_options=task.dataset_options, model=task.model,
                                      pretrained=task.pretrained, omega=omega, shots=task.shots, seed=task.seed, classes="base",
                                      root=out / "stores", device=device, progress=False))
            cached[omega] = {"path": str(c.path), "seconds": c.seconds, "reused": c.reused, "zeroshot_acc": c.zeroshot_acc}
        by_row[row.name] = cached[omega]["path"]
    info = {"dataset": task.dataset, "dataset_options": task.dataset_options, "model": task.model, "pretrained": task.pretrained,
            "shots": task.shots, "epochs": task.epochs, "batch_size": task.batch_size, "converged": task.converged,
            "zeroshot": None, "stores": {str(k): v for k, v in cached.items()}}
    return by_row, info


def time_basis(results: dict) -> str:
    """`step_cpu_s` on the CPU (the process's CPU time per step: what the step costs, whatever
    else the machine runs; equal to the wall time on an idle machine with one thread), else
    `step_time_s` (wall time, CUDA events on a GPU)."""
    timed = [r for r in results.values() if "step_time_s" in r]
    return "step_cpu_s" if timed and all("step_cpu_s" in r for r in timed) else "step_time_s"


def _ratios(results: dict) -> None:
    """Time and memory of each row as a fraction of the reference FT's (conventional FT, as the
    paper's are of its FT), ours and the paper's."""
    ft = results.get(REFERENCE, {})
    basis = time_basis(results)
    for r in results.values():
        if basis in r and basis in ft:
            r["time_vs_ft"] = r[basis] / ft[basis]
            r["memory_vs_ft"] = r["peak_memory_mib"] / ft["peak_memory_mib"] if ft["peak_memory_mib"] > 0 else None
        paper = r.get("paper")
        if paper:
            r["paper_time_vs_ft"] = paper["time_s"] / PAPER["ft"]["time_s"]
            r["paper_memory_vs_ft"] = paper["memory_mb"] / PAPER["ft"]["memory_mb"]


def findings(results: dict) -> list[str]:
    """The comparisons a reader of the tables looks for, as sentences: Skip Tuning against the
    reference FT, whether it is cheaper than each other method in time and memory, and whether it
    is the most accurate. Computed from the numbers; nothing is asserted."""
    skip = results.get("skip-tuning")
    basis = time_basis(results)
    if not skip or basis not in skip:
        return []
    out = []
    ft = results.get(REFERENCE)
    if ft and basis in ft:
        out.append(f"Skip Tuning against {ft['label']}: {ft[basis] / skip[basis]:.1f}x faster per step, "
                   f"{ft['peak_memory_mib'] / skip['peak_memory_mib']:.1f}x less peak memory "
                   f"(the paper: {PAPER['ft']['time_s'] / PAPER['skip-tuning']['time_s']:.1f}x and "
                   f"{PAPER['ft']['memory_mb'] / PAPER['skip-tuning']['memory_mb']:.1f}x).")
    verdicts: dict[str, list[str]] = {"both": [], "time": [], "memory": [], "neither": []}
    for name in PEERS:
        r = results.get(name)
        if not r or basis not in r:
            continue
        t, m = r[basis] / skip[basis], r["peak_memory_mib"] / skip["peak_memory_mib"]
        verdicts[("both" if m > 1 else "time") if t > 1 else ("memory" if m > 1 else "neither")].append(
            f"{r['label']} ({t:.2f}x Skip Tuning's time, {m:.2f}x its memory)")
    for key, words in (("both", "cheaper in time and in memory than"), ("time", "faster but not smaller than"),
                       ("memory", "smaller but not faster than"), ("neither", "neither faster nor smaller than")):
        if verdicts[key]:
            out.append(f"Skip Tuning is {'**' + words + '**' if key != 'both' else words}: " + "; ".join(verdicts[key]) + ".")
    accurate = {n: r["accuracy"]["H"] for n, r in results.items() if (r.get("accuracy") or {}).get("H") is not None}
    if "skip-tuning" in accurate:
        best = max(accurate, key=accurate.get)
        h = accurate["skip-tuning"]
        if accurate[best] > h:
            ahead = sorted((n for n in accurate if accurate[n] > h), key=accurate.get, reverse=True)
            out.append(f"Skip Tuning is not the most accurate on the synthetic task (H {h:.1f}): "
                       + ", ".join(f"{results[n]['label']} {accurate[n]:.1f}" for n in ahead) + " score higher (one seed).")
        else:
            out.append(f"Skip Tuning has the best H on the synthetic task ({h:.1f}, one seed).")
    return out


def machine(device: str) -> dict:
    import platform

    from skipcache.runtime import library_versions, resolve_device, utc_now

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return {"date_utc": utc_now(), "device": str(dev), "device_name": name, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch_threads": torch.get_num_threads(), "versions": library_versions()}
