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

Peak memory. CUDA: `torch.cuda.max_memory_allocated` over the steps (reset before the first),
so it holds the weights, gradients, optimizer state and activations. CPU: the same sum, as the
bytes of the method's model (parameters and buffers, counted) plus the child's peak resident
memory over the steps above its resident memory before the first step (`VmHWM`, reset then
through /proc/self/clear_refs; without it, ru_maxrss): gradients, optimizer state, activations,
allocator slack. Model loading (which builds the whole CLIP before dropping the frozen half) and
the imports happen before that window and are not counted. The method is stored with each number.

Accuracy. On the preset's synthetic task the parent caches one real store per omega (the cache
stage); each child runs the real `run_tune` and `evaluate_stores` on it and reports base, new
and H in percent, the run's wall time and its median step.

The authors' schedule (`paper-schedule`, cost only): the shallow blocks run every step on raw
images (no cache), the text is not trimmed (77 tokens) and CSkip is the authors' (`paper-code`,
dynamic ranks); `skipcache.baselines.paper_schedule`.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

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
PAPER_LABELS = {"ft": "FT", "ft-lskip": "FT + LSkip", "ft-cskip": "FT + CSkip", "skip-tuning": "Skip Tuning",
                "fast": "Skip Tuning (fast)", "coop": "CoOp", "clip-adapter": "CLIP-Adapter", "lora": "LoRA",
                "paper-schedule": "Skip Tuning, authors' schedule"}
METHOD_ORDER = ("ft", "ft-lskip", "ft-cskip", "skip-tuning", "fast", "coop", "clip-adapter", "lora", "paper-schedule")
TRAINABLE = METHOD_ORDER[:-1]  # the `skipcache tune --method` values; paper-schedule is cost only


def method_omega(method: str, depth: int) -> int:
    """The omega a method's store is cached at in the benchmark: 0 for FT, FT + CSkip and LoRA (every
    block), N / 2 for Skip Tuning and FT + LSkip (the paper's 6 of 12), N - N // 4 for `fast`, N for
    CoOp and CLIP-Adapter (their image side is frozen)."""
    from skipcache.baselines import fast_omega

    if method in ("ft", "ft-cskip", "lora"):
        return 0
    if method == "fast":
        return fast_omega(depth)
    if method in ("coop", "clip-adapter"):
        return depth
    return depth // 2


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
        CostWorkload(model="ViT-B-16", classes=50, steps=3, warmup=1),
        # small, to stay within 15 minutes on 2 cores (points equal to a method's own row are not run
        # again); FT and CoOp at 1000 classes take minutes per step there, so their lines stop at 200
        classes_sweep=grid(("ft", "coop"), (10, 50, 200)) + grid(("skip-tuning",), (10, 50, 200, 1000)),
        omega_sweep=grid(("skip-tuning",), (0, 6, 9, 12)),
        accuracy=AccuracyTask(recipes=SYNTH_RECIPES)),
    "gpu": Preset(
        "gpu", "the paper's settings on a GPU: ViT-B/16, batch 4, 16 shots, the ImageNet base half (500 classes), "
               "bf16 autocast; the synthetic task for accuracy",
        CostWorkload(model="ViT-B-16", classes=500, steps=20, warmup=5),
        classes_sweep=grid(("ft", "skip-tuning", "coop", "clip-adapter", "lora"), (10, 30, 100, 300, 1000)),
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


def _status_mib(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmHWM") is not None
    except OSError:
        return False


def tensor_mib(module: torch.nn.Module, extra: dict | None = None) -> float:
    """MiB of a module's parameters and buffers (each tensor once), plus `extra` tensors."""
    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers(), *((extra or {}).values())]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


class MemoryMeter:
    """Peak memory of the steps run between `start()` and `peak()`; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device, self.hwm, self.base = device, False, 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _status_mib("VmRSS") or _maxrss_mib()
            self.hwm = _reset_peak_rss()

    def peak(self, weights_mib: float) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "memory_method": "torch.cuda.max_memory_allocated over the steps (reset before the first): weights, "
                                     "gradients, optimizer state, activations", "weights_mib": weights_mib}
        grown = ((_status_mib("VmHWM") or 0.0) if self.hwm else _maxrss_mib()) - self.base
        how = ("CPU: the method's weights and buffers (counted) + the child's peak RSS growth over the steps "
               + ("(VmHWM reset before the first step)" if self.hwm else "(ru_maxrss, lifetime peak: an overestimate)")
               + ": gradients, optimizer state, activations")
        return {"peak_memory_mib": weights_mib + max(0.0, grown), "memory_method": how, "weights_mib": weights_mib,
                "step_growth_mib": grown}


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
            "omega": int(opened.key["omega"]), "classes": len(opened.splits["train"].classes),
            "precision": place.precision, "device": str(place.device), "threads": torch.get_num_threads()}


def measure_paper_schedule(work: CostWorkload, omega: int, classes: int) -> dict:
    """(child) The authors' schedule: shallow blocks on raw images every step, 77-token text, their CSkip."""
    if work.threads:
        torch.set_num_threads(work.threads)
    torch.manual_seed(work.seed)
    from skipcache.baselines.paper_schedule import build_paper_schedule
    from skipcache.bench.steps import TEMPLATE, classnames
    from skipcache.loading import load_model, tokenizer_for
    from skipcache.placement import Placement

    place = Placement.resolve(work.device, work.precision)
    meter = MemoryMeter(place.device)
    lm = load_model(work.model, "none", seed=work.seed)
    token_ids = tokenizer_for(work.model)([TEMPLATE.format(c) for c in classnames(classes)])
    step, model = build_paper_schedule(lm.model, omega, token_ids, batch_size=work.batch_size, placement=place, seed=work.seed)
    g = torch.Generator().manual_seed(work.seed)
    batches = [{"images": place.tensor(torch.randn(work.batch_size, 3, lm.image_size, lm.image_size, generator=g)),
                "labels": place.tensor(torch.randint(classes, (work.batch_size,), generator=g))}
               for _ in range(work.warmup + work.steps)]
    weights = tensor_mib(step.shallow) + tensor_mib(model, step.inner.tensors())
    meter.start()
    timing = _with_epoch(_timed_steps(step, batches, work.warmup, place), work)
    memory = meter.peak(weights)
    return {**timing, **memory,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "omega": omega, "classes": classes, "text_tokens": int(token_ids.shape[1]),
            "precision": place.precision, "device": str(place.device), "threads": torch.get_num_threads()}


def train_and_evaluate(method: str, store: str, out: str, task: AccuracyTask, device: str, threads: int | None) -> dict:
    """(child) `skipcache tune --method` on a real store, then eval: base / new / H in percent."""
    if threads:
        torch.set_num_threads(threads)
    from skipcache.stages.evaluate import evaluate_stores
    from skipcache.stages.tune import TuneConfig, run_tune

    recipe = dict(task.recipes.get(method, {}))
    t0 = time.perf_counter()
    result = run_tune(TuneConfig(store=Path(store), out=Path(out), method=method, epochs=task.epochs, batch_size=task.batch_size,
                                 warmup_epochs=min(task.warmup_epochs, task.epochs - 1), seed=task.seed, device=device, progress=False, checkpoint_every_s=1e9, **recipe))
    tune_s = time.perf_counter() - t0
    ev = evaluate_stores(Path(out), [None], device=device)[0]
    return {"accuracy": {k: ev.accuracy[k] for k in ("base", "new", "H") if k in ev.accuracy}, "zeroshot": ev.zeroshot,
            "label": ev.method, "tune_s": tune_s, "run_step_time_s": result.step_time_median_s, "recipe": recipe,
            "final_train_acc": result.final.get("train_acc"), "run_dir": out}


def measure_method(method: str, cost_store: str | None, work: CostWorkload, omega: int, accuracy_store: str | None,
                   task: AccuracyTask | None, out: str) -> dict:
    """(child) The cost of one method, then (when a store is given) its accuracy: one process per
    method, the memory read before anything else runs in it."""
    if method == "paper-schedule":
        result = measure_paper_schedule(work, omega, work.classes)
    else:
        result = measure_cost(method, cost_store, work)
    if accuracy_store is not None and task is not None:
        try:
            result["trained"] = train_and_evaluate(method, accuracy_store, out, task, work.device, work.threads)
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
    """Every measurement of `preset` (`epochs`: the accuracy task's, instead of the preset's);
    returns the report dict (the JSON `skipcache bench` writes)."""
    from skipcache.loading import model_depth

    if epochs is not None and preset.accuracy is not None:
        preset = replace(preset, accuracy=replace(preset.accuracy, epochs=epochs))

    work = replace(preset.cost, device=device, threads=threads)
    if threads:
        torch.set_num_threads(threads)  # this process caches the accuracy task's stores
    methods = [m for m in METHOD_ORDER if only is None or m in only]
    depth = model_depth(work.model)
    stores = out / "stores"
    rows = work.batch_size * (work.warmup + work.steps)
    started = time.perf_counter()

    def store_for(omega: int, classes: int) -> str:
        return str(random_store(stores, work.model, omega, classes, rows, seed=work.seed))

    task = preset.accuracy if accuracy else None
    accuracy_stores, task_info = _cache_accuracy_stores(task, [m for m in methods if m in TRAINABLE], out, device, log)
    results: dict[str, dict] = {}
    for method in methods:
        omega = method_omega("skip-tuning", depth) if method == "paper-schedule" else method_omega(method, depth)
        log(f"{method}: cost (omega {omega}, {work.classes} classes)" + (", then accuracy" if method in accuracy_stores else "") + " ...")
        cost_store = None if method == "paper-schedule" else store_for(omega, work.classes)
        r = in_child(measure_method, method, cost_store, work, omega, accuracy_stores.get(method), task,
                     str(out / "runs" / method))
        trained = r.pop("trained", None)
        r.update(name=method, label=PAPER_LABELS[method], paper=PAPER.get(method), omega=omega, accuracy=None)
        if trained is not None and "error" in trained:
            r["accuracy_error"] = trained["error"]
        elif trained is not None:
            r.update(accuracy=trained["accuracy"], accuracy_label=trained["label"], tune_s=trained["tune_s"],
                     tune_step_time_s=trained["run_step_time_s"], recipe=trained["recipe"],
                     accuracy_omega=method_omega(method, model_depth(task.model)))
            task_info["zeroshot"] = trained["zeroshot"]
        results[method] = r

    sweep_rows: dict[str, list[dict]] = {"classes": [], "omega": []}
    for kind, points in (("classes", preset.classes_sweep if sweeps else ()), ("omega", preset.omega_sweep if sweeps else ())):
        for m, value in points:
            omega, classes = (method_omega(m, depth), value) if kind == "classes" else (value, work.classes)
            if (only is not None and m not in only) or (depth is not None and omega > depth) or (m == "ft-lskip" and omega == 0):
                continue
            main = next((r for n, r in results.items() if _same_training(n, m) and r.get("omega") == omega
                         and classes == work.classes and "error" not in r), None)
            if main is not None:
                r = dict(main)  # the point the method table already measured
            else:
                log(f"sweep: {m} at omega {omega}, {classes} classes ...")
                r = in_child(measure_cost, m, store_for(omega, classes), work)
            sweep_rows[kind].append(_sweep_row(m, r, **{kind: value}))

    _ratios(results)
    return {"meta": {"preset": preset.name, "description": preset.description, "total_s": time.perf_counter() - started,
                     "model_depth": depth, "time_basis": time_basis(results)},
            "config": {"cost": asdict(work), "classes_sweep": [list(p) for p in preset.classes_sweep],
                       "omega_sweep": [list(p) for p in preset.omega_sweep],
                       "accuracy": asdict(preset.accuracy) if preset.accuracy else None},
            "methods": [results[m] for m in methods], "sweeps": sweep_rows, "accuracy_task": task_info}


def _same_training(a: str, b: str) -> bool:
    """Whether two method names train the same thing on a store of the same omega (Skip Tuning at
    omega 0 is FT + CSkip; FT and FT + LSkip differ only in the store's omega)."""
    groups = ({"skip-tuning", "ft-cskip"}, {"ft", "ft-lskip"})
    return a == b or any(a in g and b in g for g in groups)


def _sweep_row(method: str, r: dict, **where) -> dict:
    row = {"method": method, **where}
    if "error" in r:
        return {**row, "error": r["error"]}
    return {**row, **{k: r[k] for k in ("step_time_s", "epoch_time_s", "step_cpu_s", "epoch_cpu_s", "peak_memory_mib", "memory_method",
                                        "text_classes_per_step", "trainable_params", "omega", "classes") if k in r}}


def _cache_accuracy_stores(task: AccuracyTask | None, methods: list[str], out: Path, device: str, log) -> tuple[dict, dict | None]:
    """The real stores of the accuracy task (the cache stage, in this process), one per omega the
    methods need: ({method: store path}, the task's record)."""
    if task is None or not methods:
        return {}, None
    from skipcache.loading import model_depth
    from skipcache.stages.cache import CacheConfig, run_cache

    depth = model_depth(task.model)
    cached: dict[int, dict] = {}
    by_method = {}
    for method in methods:
        omega = method_omega(method, depth)
        if omega not in cached:
            log(f"accuracy: caching {task.dataset} with {task.model} at omega {omega} ...")
            c = run_cache(CacheConfig(dataset=task.dataset, dataset_options=task.dataset_options, model=task.model,
                                      pretrained=task.pretrained, omega=omega, shots=task.shots, seed=task.seed, classes="base",
                                      root=out / "stores", device=device, progress=False))
            cached[omega] = {"path": str(c.path), "seconds": c.seconds, "reused": c.reused, "zeroshot_acc": c.zeroshot_acc}
        by_method[method] = cached[omega]["path"]
    info = {"dataset": task.dataset, "dataset_options": task.dataset_options, "model": task.model, "pretrained": task.pretrained,
            "shots": task.shots, "epochs": task.epochs, "batch_size": task.batch_size, "converged": task.converged,
            "zeroshot": None, "stores": {str(k): v for k, v in cached.items()}}
    return by_method, info


def time_basis(results: dict) -> str:
    """`step_cpu_s` on the CPU (the process's CPU time per step: what the step costs, whatever
    else the machine runs; equal to the wall time on an idle machine with one thread), else
    `step_time_s` (wall time, CUDA events on a GPU)."""
    timed = [r for r in results.values() if "step_time_s" in r]
    return "step_cpu_s" if timed and all("step_cpu_s" in r for r in timed) else "step_time_s"


def _ratios(results: dict) -> None:
    """Time and memory of each method as a fraction of FT's, ours and the paper's."""
    ft = results.get("ft", {})
    basis = time_basis(results)
    for r in results.values():
        if basis in r and basis in ft:
            r["time_vs_ft"] = r[basis] / ft[basis]
            r["memory_vs_ft"] = r["peak_memory_mib"] / ft["peak_memory_mib"] if ft["peak_memory_mib"] > 0 else None
        paper = r.get("paper")
        if paper:
            r["paper_time_vs_ft"] = paper["time_s"] / PAPER["ft"]["time_s"]
            r["paper_memory_vs_ft"] = paper["memory_mb"] / PAPER["ft"]["memory_mb"]


def machine(device: str) -> dict:
    import platform

    from skipcache.runtime import library_versions, resolve_device, utc_now

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return {"date_utc": utc_now(), "device": str(dev), "device_name": name, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch_threads": torch.get_num_threads(), "versions": library_versions()}
