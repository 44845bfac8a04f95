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

Peak memory. CUDA: `torch.cuda.max_memory_allocated`, reset before the first step, so it holds
the weights, gradients, optimizer state and activations. CPU: the child's peak resident memory
over the steps (`VmHWM`, reset before the first step through /proc/self/clear_refs; without it,
ru_maxrss) minus its resident memory before the model was built (after the imports): weights,
gradients, optimizer state, activations and allocator slack. The method is stored with each number.

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
    """The synthetic base-to-new task every method is trained and evaluated on."""

    dataset: str = "synthetic-noise"
    dataset_options: dict = field(default_factory=dict)
    model: str = "synth-vit"
    pretrained: str = "synth"
    shots: int = 16
    seed: int = 1
    epochs: int = 5
    batch_size: int = 16
    converged: bool = True
    # per method: TuneConfig fields (lr, lr_image, method_options...) on top of the shared ones
    recipes: dict = field(default_factory=dict)


# Learning rates on the synthetic task (SGD, momentum 0.9, batch 16, cosine, no warm-up). Skip
# Tuning's are the demo's; each baseline's was picked from a small sweep on the same task
# (docs/results.md, "Every method").
SYNTH_RECIPES = {
    "ft": {"lr": 2e-3, "lr_image": 5e-4},
    "ft-lskip": {"lr": 2e-3, "lr_image": 5e-4},
    "ft-cskip": {"lr": 2e-3, "lr_image": 5e-4},
    "skip-tuning": {"lr": 2e-3, "lr_image": 5e-4},
    "fast": {"lr": 2e-3, "lr_image": 5e-4},
    "coop": {"lr": 2e-2},
    "clip-adapter": {"lr_image": 2e-2},
    "lora": {"lr": 2e-2, "lr_image": 5e-3},
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cost: CostWorkload
    classes_sweep: tuple[int, ...] = ()
    classes_methods: tuple[str, ...] = ()
    omega_sweep: tuple[int, ...] = ()
    omega_methods: tuple[str, ...] = ()
    accuracy: AccuracyTask | None = None


PRESETS = {
    "tiny": Preset(
        "tiny", "smoke run (seconds): the tiny model for cost, synth-vit trained briefly on a 10-class synthetic "
                "task; the accuracies are not converged",
        CostWorkload(model="tiny", classes=10, steps=1, warmup=1),
        classes_sweep=(10, 100), classes_methods=("ft", "skip-tuning"),
        omega_sweep=(0, 3, 6), omega_methods=("skip-tuning",),
        accuracy=AccuracyTask(dataset_options={"num_classes": 10, "test_per_class": 4}, shots=2, epochs=1, batch_size=8,
                              converged=False, recipes=SYNTH_RECIPES)),
    "cpu": Preset(
        "cpu", "ViT-B/16 (random init: the cost of pretrained weights) on the CPU, fp32; accuracy of every method "
               "on the demo's synthetic base-to-new task with synth-vit",
        CostWorkload(model="ViT-B-16", classes=50, steps=2, warmup=1),
        classes_sweep=(10, 100, 1000), classes_methods=("ft", "skip-tuning"),
        omega_sweep=(0, 6, 12), omega_methods=("skip-tuning",),
        accuracy=AccuracyTask(recipes=SYNTH_RECIPES)),
    "gpu": Preset(
        "gpu", "the paper's settings on a GPU: ViT-B/16, batch 4, 16 shots, the ImageNet base half (500 classes), "
               "bf16 autocast; the synthetic task for accuracy",
        CostWorkload(model="ViT-B-16", classes=500, steps=20, warmup=5),
        classes_sweep=(10, 30, 100, 300, 1000), classes_methods=("ft", "skip-tuning", "coop", "clip-adapter", "lora"),
        omega_sweep=(0, 2, 4, 6, 8, 10, 12), omega_methods=("skip-tuning",),
        accuracy=AccuracyTask(epochs=10, recipes=SYNTH_RECIPES)),
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


class MemoryMeter:
    """Peak memory of what runs between `start()` and `peak()`, above the `base` taken at creation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0.0 if device.type == "cuda" else (_status_mib("VmRSS") or _maxrss_mib())
        self.hwm = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.hwm = _reset_peak_rss()

    def peak(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "torch.cuda.max_memory_allocated over the steps (reset before the first; weights, gradients, "
                    "optimizer state, activations)")
        if self.hwm:
            return ((_status_mib("VmHWM") or 0.0) - self.base,
                    "CPU: child's peak RSS over the steps (VmHWM, reset before the first step) minus its RSS before "
                    "the model was built (weights, gradients, optimizer state, activations, allocator slack)")
        return (_maxrss_mib() - self.base, "CPU: child's lifetime peak RSS (ru_maxrss) minus its RSS before the model was built")


def _timed_steps(step, batches: list[dict], warmup: int, place) -> tuple[list[float], torch.Tensor]:
    from skipcache.step import StepTimer

    timer = StepTimer(place)
    stats = None
    for i, batch in enumerate(batches):
        if i < warmup:
            stats = step(batch)
            continue
        timer.start()
        stats = step(batch)
        timer.stop()
    place.synchronize()
    return timer.times(), stats


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
    meter.start()
    times, stats = _timed_steps(training.step, batches, work.warmup, place)
    peak, how = meter.peak()
    times = sorted(times)
    step_s = times[len(times) // 2]
    return {"step_time_s": step_s, "step_times_s": times, "epoch_time_s": step_s * work.steps_per_epoch,
            "steps_per_epoch": work.steps_per_epoch, "peak_memory_mib": peak, "memory_method": how,
            "trainable_params": sum(p.numel() for p in training.deep.parameters() if p.requires_grad),
            "text_classes_per_step": float(stats[3]), "omega": int(opened.key["omega"]), "classes": len(opened.splits["train"].classes),
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
    meter.start()
    times, stats = _timed_steps(step, batches, work.warmup, place)
    peak, how = meter.peak()
    times = sorted(times)
    step_s = times[len(times) // 2]
    return {"step_time_s": step_s, "step_times_s": times, "epoch_time_s": step_s * work.steps_per_epoch,
            "steps_per_epoch": work.steps_per_epoch, "peak_memory_mib": peak, "memory_method": how,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "text_classes_per_step": float(stats[3]), "omega": omega, "classes": classes, "text_tokens": int(token_ids.shape[1]),
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
                                 warmup_epochs=0, seed=task.seed, device=device, progress=False, checkpoint_every_s=1e9, **recipe))
    tune_s = time.perf_counter() - t0
    ev = evaluate_stores(Path(out), [None], device=device)[0]
    return {"accuracy": {k: ev.accuracy[k] for k in ("base", "new", "H") if k in ev.accuracy}, "zeroshot": ev.zeroshot,
            "label": ev.method, "tune_s": tune_s, "run_step_time_s": result.step_time_median_s, "recipe": recipe,
            "final_train_acc": result.final.get("train_acc"), "run_dir": out}


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
               only: tuple[str, ...] | None = None, sweeps: bool = True, accuracy: bool = True, log=print) -> dict:
    """Every measurement of `preset`; returns the report dict (the JSON `skipcache bench` writes)."""
    from skipcache.loading import model_depth

    work = replace(preset.cost, device=device, threads=threads)
    methods = [m for m in METHOD_ORDER if only is None or m in only]
    depth = model_depth(work.model)
    stores = out / "stores"
    rows = work.batch_size * (work.warmup + work.steps)
    started = time.perf_counter()

    def store_for(omega: int, classes: int) -> str:
        return str(random_store(stores, work.model, omega, classes, rows, seed=work.seed))

    results: dict[str, dict] = {}
    for method in methods:
        omega = method_omega("skip-tuning", depth) if method == "paper-schedule" else method_omega(method, depth)
        log(f"cost: {method} (omega {omega}, {work.classes} classes) ...")
        if method == "paper-schedule":
            r = in_child(measure_paper_schedule, work, omega, work.classes)
        else:
            r = in_child(measure_cost, method, store_for(omega, work.classes), work)
        r.update(name=method, label=PAPER_LABELS[method], paper=PAPER.get(method), omega=omega)
        results[method] = r

    sweep_rows: dict[str, list[dict]] = {"classes": [], "omega": []}
    if sweeps:
        for m in preset.classes_methods:
            if only is not None and m not in only:
                continue
            for classes in preset.classes_sweep:
                if classes == work.classes and m in results and "error" not in results[m]:
                    r = dict(results[m])
                else:
                    log(f"sweep: {m} at {classes} classes ...")
                    r = in_child(measure_cost, m, store_for(method_omega(m, depth), classes), work)
                sweep_rows["classes"].append(_sweep_row(m, r, classes=classes))
        for m in preset.omega_methods:
            if only is not None and m not in only:
                continue
            for omega in preset.omega_sweep:
                if depth is not None and omega > depth:
                    continue
                log(f"sweep: {m} at omega {omega} ...")
                r = in_child(measure_cost, m, store_for(omega, work.classes), work)
                sweep_rows["omega"].append(_sweep_row(m, r, omega=omega))

    task_info = None
    if accuracy and preset.accuracy is not None:
        task_info = _accuracy(preset.accuracy, [m for m in methods if m in TRAINABLE], out, device, threads, results, log)

    _ratios(results)
    return {"meta": {"preset": preset.name, "description": preset.description, "total_s": time.perf_counter() - started,
                     "model_depth": depth},
            "config": {"cost": asdict(work), "classes_sweep": list(preset.classes_sweep), "classes_methods": list(preset.classes_methods),
                       "omega_sweep": list(preset.omega_sweep), "omega_methods": list(preset.omega_methods),
                       "accuracy": asdict(preset.accuracy) if preset.accuracy else None},
            "methods": [results[m] for m in methods], "sweeps": sweep_rows, "accuracy_task": task_info}


def _sweep_row(method: str, r: dict, **where) -> dict:
    row = {"method": method, **where}
    if "error" in r:
        return {**row, "error": r["error"]}
    return {**row, **{k: r[k] for k in ("step_time_s", "epoch_time_s", "peak_memory_mib", "memory_method", "text_classes_per_step",
                                        "trainable_params", "omega", "classes")}}


def _accuracy(task: AccuracyTask, methods: list[str], out: Path, device: str, threads: int | None, results: dict, log) -> dict:
    from skipcache.loading import model_depth
    from skipcache.stages.cache import CacheConfig, run_cache

    depth = model_depth(task.model)
    cached: dict[int, dict] = {}
    zeroshot = None
    for method in methods:
        omega = method_omega(method, depth)
        if omega not in cached:
            log(f"accuracy: caching {task.dataset} at omega {omega} ...")
            c = run_cache(CacheConfig(dataset=task.dataset, dataset_options=task.dataset_options, model=task.model,
                                      pretrained=task.pretrained, omega=omega, shots=task.shots, seed=task.seed, classes="base",
                                      root=out / "stores", device=device, progress=False))
            cached[omega] = {"path": str(c.path), "seconds": c.seconds, "reused": c.reused, "zeroshot_acc": c.zeroshot_acc}
        log(f"accuracy: {method} ...")
        r = in_child(train_and_evaluate, method, cached[omega]["path"], str(out / "runs" / method), task, device, threads)
        entry = results.setdefault(method, {"name": method, "label": PAPER_LABELS[method]})
        if "error" in r:
            entry["accuracy_error"] = r["error"]
            entry["accuracy"] = None
            continue
        entry.update(accuracy=r["accuracy"], accuracy_label=r["label"], tune_s=r["tune_s"], tune_step_time_s=r["run_step_time_s"],
                     recipe=r["recipe"], accuracy_omega=omega)
        zeroshot = r["zeroshot"]
    for m in results.values():
        m.setdefault("accuracy", None)
    return {"dataset": task.dataset, "model": task.model, "pretrained": task.pretrained, "shots": task.shots,
            "epochs": task.epochs, "batch_size": task.batch_size, "converged": task.converged,
            "zeroshot": zeroshot, "stores": {str(k): v for k, v in cached.items()}}


def _ratios(results: dict) -> None:
    """Time and memory of each method as a fraction of FT's, ours and the paper's."""
    ft = results.get("ft", {})
    for r in results.values():
        if "step_time_s" in r and "step_time_s" in ft:
            r["time_vs_ft"] = r["step_time_s"] / ft["step_time_s"]
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
