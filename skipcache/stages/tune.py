"""The tune stage: train blocks omega+1..N of both towers on cached tokens, with CSkip.

Reads a complete store (never the images, never the shallow weights: they are dropped right
after loading), streams shuffled batches of cached image tokens, samples each image's class
subset (CSkip), runs the text tower once on the batch's union of kept classes and minimizes the
masked cross-entropy. fp32 master weights; bf16 autocast on CUDA.

A run directory holds config.json (the resolved TuneConfig), checkpoint.json + a safetensors file
(latest epoch, for --resume), metrics.jsonl, deep.safetensors and run.json; `skipcache.rundir`
owns that format (spec: docs/run-format.md), this module only trains.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from skipcache import cskip, rundir
from skipcache.baselines import DEFAULT_METHOD, get_method
from skipcache.errors import ConfigError, IncompleteStore, StoreError
from skipcache.loading import model_depth
from skipcache.memory import MemoryMeter, tensor_mib
from skipcache.placement import Placement, prefetch_to_device
from skipcache.progress import make_progress
from skipcache.runtime import default_store_root, library_versions, seed_everything, utc_now
from skipcache.step import STAT_NAMES, StepTimer, make_optimizer
from skipcache.store import FeatureStore, find_stores


@dataclass
class TuneConfig:
    """Settings of one tuning run; defaults follow the paper's base-to-new recipe.

    Attributes:
        method: what to train (`skipcache.baselines`): `skip-tuning` (the default: LSkip at the
            store's omega, CSkip as set here), its ablations `ft` (store at omega 0, no CSkip),
            `ft-lskip` (omega > 0, no CSkip), `ft-cskip` (omega 0, CSkip), the preset `fast`
            (omega N - N//4, r = 0.25), and the baselines `coop`, `clip-adapter` and `lora`
            (CSkip off). The method checks the store's omega and sets `cskip.enabled`. `lr` is
            the text side's rate and `lr_image` the image side's, whatever the method trains
            there (CoOp's context is text; CLIP-Adapter's adapter is image).
        method_options: the method's own settings (`coop`: n_ctx, ctx_init; `clip-adapter`:
            ratio, reduction; `lora`: rank, alpha); defaults filled in and recorded.
        store: path of the store; None picks the newest complete store under `root` that matches
            `dataset` / `model` / `omega` when given.
        out: run directory; None makes `runs/<dataset>-<model>-omega<w>-<time>`.
        epochs: passes over the train split.
        batch_size: images per step.
        lr: learning rate of the text side (paper: 2e-5).
        lr_image: learning rate of the image side; None means lr / 4 (paper: 5e-6 for 2e-5).
        weight_decay, momentum: SGD settings (paper: 5e-4, 0.9).
        warmup_epochs: epochs at constant `warmup_lr` before the cosine schedule (paper: 1);
            None means 1 when epochs > 1, else 0 (`resolved_warmup_epochs`), so a 1-epoch run
            is not spent entirely at the warm-up rate.
        cskip: CSkip settings, a `skipcache.cskip.CSkipConfig` (r, lam, max_top, variant,
            enabled, subset); `False` / `True` / a dict of its fields are accepted too.
            `max_top` caps the always-kept set at 50 classes, as the authors' code does (it
            changes nothing while r·M <= 50); None is paper Eq. 7 as written, whose r·M
            always-kept classes make large label sets expensive (500 of 1000). `subset` is
            `batch` (one fixed-size subset per step, shared by the batch: the text tower runs
            on about E[kept] classes) or `image` (a subset per image; the text tower runs on
            their union).
        rank: `zeroshot` (rankings stored by the cache stage) or `dynamic` (the current model's
            image features against the zero-shot prototypes, computed every step).
        batching: `shuffle` (rows shuffled across classes, streamed from the store) or `class`
            (every batch holds images of one class, as the paper's code does when shots >=
            batch size; the train split is read into memory once). With per-image CSkip subsets
            the text tower runs on the batch's union of kept classes: images of one class keep
            similar subsets, so `class` batching makes CSkip's saving real.
        seed: seed of weights' RNG uses, batch order and CSkip draws.
        resume: continue the run in `out` from its last checkpoint.
        device: auto, cpu, cuda, cuda:N.
        precision: `auto` (bf16 autocast on CUDA, fp32 on the CPU), `fp32` or `bf16`; weights
            stay fp32 either way.
        pretrained: weights to load when the store's own source is not available (a path).
        progress: draw a progress bar.
        checkpoint_every_s: write a resumable checkpoint at the end of an epoch when this many
            seconds have passed since the last one, and after the last epoch (0: every epoch).
            A checkpoint of ViT-B-16's deep half is ~350 MB (weights and momentum); on a GPU an
            epoch of the paper's recipe takes about a second, so every epoch would cost more
            than training.
    """

    store: Path | None = None
    method: str = DEFAULT_METHOD
    method_options: dict = field(default_factory=dict)
    root: Path = field(default_factory=default_store_root)
    dataset: str | None = None
    model: str | None = None
    omega: int | None = None
    out: Path | None = None
    epochs: int = 20
    batch_size: int = 4
    lr: float = 2e-5
    lr_image: float | None = None
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int | None = None
    warmup_lr: float = 1e-6
    cskip: cskip.CSkipConfig = field(default_factory=cskip.CSkipConfig)
    rank: str = "zeroshot"
    batching: str = "shuffle"
    seed: int = 1
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    pretrained: str | None = None
    progress: bool = True
    checkpoint_every_s: float = 60.0

    def __post_init__(self) -> None:
        self.cskip = cskip.CSkipConfig.from_value(self.cskip)

    def cskip_config(self) -> cskip.CSkipConfig:
        return self.cskip

    def resolved_warmup_epochs(self) -> int:
        """Warm-up epochs of the run: as set, else 1 when epochs > 1 (the paper's recipe) and 0
        for a 1-epoch run, which would otherwise train only at `warmup_lr`."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 1 if self.epochs > 1 else 0

    def validate(self) -> None:
        """Check every setting before anything is read or written; a ConfigError names the first bad one.

        NaN and infinity compare False with everything (`lr <= 0` let them through and the run
        wrote NaN weights), so every number is checked to be a finite number of the right kind.
        """

        def check(name: str, ok, expected: str, fix: str, *, whole: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
            if not (number and (isinstance(value, int) or math.isfinite(value)) and ok(value)):
                shown = json.dumps(value) if isinstance(value, str) else value
                raise ConfigError(f"{name} must be {expected}, got {shown}; {fix}")

        check("epochs", lambda v: v >= 1, ">= 1 (a whole number)", "e.g. 20", whole=True)
        check("batch_size", lambda v: v >= 1, ">= 1 (a whole number)", "e.g. 4", whole=True)
        check("warmup_epochs", lambda v: v >= 0, ">= 0 (a whole number)", "e.g. 1", whole=True, optional=True)
        check("lr", lambda v: v > 0, "a finite number > 0", "e.g. 2e-5")
        check("lr_image", lambda v: v > 0, "a finite number > 0 or unset (lr / 4)", "e.g. 5e-6", optional=True)
        check("weight_decay", lambda v: v >= 0, "a finite number >= 0", "e.g. 5e-4")
        check("momentum", lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.9")
        check("warmup_lr", lambda v: v >= 0, "a finite number >= 0", "e.g. 1e-6")
        check("seed", lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)", "e.g. 1", whole=True)
        check("omega", lambda v: v >= 0, ">= 0 (a whole number) or unset", "e.g. 6", whole=True, optional=True)
        check("checkpoint_every_s", lambda v: v >= 0, "a finite number of seconds >= 0", "e.g. 60, or 0 for every epoch")
        method = get_method(self.method)
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a table of the method's settings, got {self.method_options!r}")
        method.resolve_options(self.method_options)
        method.resolve_cskip(self.cskip)
        if self.out is not None and Path(self.out).is_file():
            raise ConfigError(f"out {self.out} is a file; pass --out a new or empty folder for the run")
        self.cskip_config()
        if self.batching not in ("shuffle", "class"):
            raise ConfigError(f"batching must be 'shuffle' or 'class', got {self.batching!r}")
        if self.rank not in ("zeroshot", "dynamic"):
            raise ConfigError(f"rank must be 'zeroshot' or 'dynamic', got {self.rank!r}")
        if self.rank == "dynamic" and self.cskip.variant == "paper-code" and self.cskip.subset == "image":
            raise ConfigError("per-image paper-code masks are drawn once from zero-shot ranks; use --rank zeroshot or --cskip-subset batch with it")
        warmup = self.resolved_warmup_epochs()
        if warmup >= self.epochs and self.epochs > 1:
            raise ConfigError(f"warmup epochs must be in [0, epochs), got {warmup} for {self.epochs} epochs")
        if warmup >= self.epochs:
            raise ConfigError(f"warmup_epochs {warmup} with epochs {self.epochs}: the warm-up would take the whole run "
                              f"(every step at warmup_lr {self.warmup_lr}); pass --warmup-epochs 0 or more --epochs")


@dataclass
class TuneResult:
    """What a tuning run produced.

    Attributes:
        run_dir: the run directory.
        store: the store it trained on.
        epochs: epochs completed.
        seconds: wall time of this call (not counting earlier, resumed parts).
        step_time_median_s: median optimizer-step time after the first 5 steps.
        peak_memory_mib: peak memory and `peak_memory_method` how it was measured.
        final: metrics of the last epoch.
    """

    run_dir: Path
    store: Path
    epochs: int
    seconds: float
    step_time_median_s: float
    peak_memory_mib: float
    peak_memory_method: str
    final: dict


def resolve_store(cfg: TuneConfig) -> FeatureStore:
    """The store named by `cfg.store`, else the newest complete one under `cfg.root` matching the filters."""
    if cfg.store is not None:
        path = Path(cfg.store)
        if not path.exists() and Path(str(path) + ".partial").exists():
            raise IncompleteStore(f"store {path} is incomplete (cache was interrupted); rerun the same `skipcache cache` command to finish it")
        if not path.exists():
            raise StoreError(f"no store at {path}; run `skipcache ls` to list stores or `skipcache cache` to build one")
        return FeatureStore.open(path)
    found = find_stores(Path(cfg.root), dataset=cfg.dataset, model=cfg.model, omega=cfg.omega)
    if not found:
        wanted = ", ".join(f"{k}={v}" for k, v in (("dataset", cfg.dataset), ("model", cfg.model), ("omega", cfg.omega)) if v is not None)
        raise StoreError(f"no complete store under {cfg.root}{' with ' + wanted if wanted else ''}; run `skipcache cache --dataset ...` first")
    return FeatureStore.open(found[0])


def _lr_at(step: int, cfg: TuneConfig, steps_per_epoch: int, base_lr: float) -> float:
    """Constant warm-up for `warmup_epochs`, then cosine from base_lr to 0 over the remaining steps."""
    warm = cfg.resolved_warmup_epochs() * steps_per_epoch
    if step < warm:
        return cfg.warmup_lr
    total = max(1, cfg.epochs * steps_per_epoch - warm)
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warm) / total))


def class_batches(split: dict, batch_size: int, *, view: int, seed: int):
    """One epoch of single-class batches: each class's rows shuffled and cut into batches of at
    most `batch_size`, the batches then shuffled across classes. Every row exactly once."""
    g = torch.Generator().manual_seed(seed)
    labels = split["labels"]
    groups = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        groups.extend(rows.split(batch_size))
    for i in torch.randperm(len(groups), generator=g).tolist():
        rows = groups[i]
        yield {"vision": split["vision"][view, rows].float(), "labels": labels[rows],
               "zeroshot_rank": split["zeroshot_rank"][rows], "index": rows}


def _default_out(store: FeatureStore) -> Path:
    return rundir.default_out(store.key)


@dataclass
class Training:
    """What `setup_training` builds: the model, optimiser and step, and how an epoch is cut."""

    deep: torch.nn.Module  # the method's model (`skipcache.baselines.base`): a DeepCLIP for Skip Tuning and FT
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None
    step: Callable[[dict], torch.Tensor]  # TuneStep, or the method's own step with its call signature
    lrs: dict[str, float]
    steps_per_epoch: int
    in_memory: dict | None  # the train split, read once, for class batching
    method_options: dict = field(default_factory=dict)  # as resolved on the model (run.json records them)


def setup_training(cfg: TuneConfig, store: FeatureStore, place: Placement) -> Training:
    """The method's model, its optimiser and its step object for `cfg`, all placed through `place`;
    the method, the CSkip mode and the batching are fixed here, once, before the loop."""
    method = get_method(cfg.method)
    deep, options = method.build(store, place, cfg.pretrained, method.resolve_options(cfg.method_options))
    split = store.splits["train"]
    stored = store.read_text()
    train_classes = torch.as_tensor(split.classes)
    text = {k: place.tensor(stored[k][train_classes]) for k in ("tokens", "eot", "prototypes")}  # (M_train, ...)
    text["classnames"] = [stored["classnames"][c] for c in split.classes]
    text["class_ids"] = place.tensor(train_classes)  # their ids in the store's class list
    skip = method.resolve_cskip(cfg.cskip_config())
    lrs = {"vision": cfg.lr_image or cfg.lr / 4, "text": cfg.lr}
    optimizer = make_optimizer(deep.layer_groups(), lrs, momentum=cfg.momentum, weight_decay=cfg.weight_decay, placement=place)
    generator = place.generator(cfg.seed)
    in_memory = store.read_split("train", dtype=None) if cfg.batching == "class" else None
    if in_memory is not None:
        counts = torch.bincount(in_memory["labels"], minlength=len(split.classes))
        steps_per_epoch = int(sum(math.ceil(int(c) / cfg.batch_size) for c in counts))
    else:
        steps_per_epoch = math.ceil(split.n / cfg.batch_size)
    fixed = None
    if skip.enabled and skip.variant == "paper-code" and skip.subset == "image":
        whole = in_memory or store.read_split("train", include_vision=False)
        fixed = cskip.fixed_masks(place.tensor(whole["zeroshot_rank"]), place.tensor(whole["labels"]), skip, generator)
    step = method.make_step(deep, text, skip, rank=cfg.rank, batch_size=cfg.batch_size, optimizer=optimizer,
                            placement=place, generator=generator, fixed_masks=fixed)
    return Training(deep, optimizer, generator, step, lrs, steps_per_epoch, in_memory, options)


def run_tune(cfg: TuneConfig) -> TuneResult:
    """Train the deep layers on a store; see the module docstring for what the run directory holds."""
    cfg.validate()
    cfg = replace(cfg, warmup_epochs=cfg.resolved_warmup_epochs())  # config.json records what the run does
    started = time.perf_counter()
    place = Placement.resolve(cfg.device, cfg.precision)
    device = place.device
    store = rundir.resume_store(cfg) or resolve_store(cfg)
    if "train" not in store.splits:
        raise StoreError(f"store {store.path} has no train split")
    method = get_method(cfg.method)
    method.check_omega(int(store.key["omega"]), model_depth(str(store.key["model"])))
    cfg = replace(cfg, cskip=method.resolve_cskip(cfg.cskip), method_options=method.resolve_options(cfg.method_options))
    out = Path(cfg.out) if cfg.out else _default_out(store)
    run = rundir.open_for_tune(cfg, store, out)  # refuses, restarts or resumes; locks; writes config.json
    if run.finished:  # --resume of a finished run: nothing to train, its record stays as written
        run.close()
        return _finished_result(out, store)
    seed_everything(cfg.seed)

    phases = {"start_s": time.perf_counter() - started, "setup_s": 0.0, "train_s": 0.0, "checkpoint_s": 0.0, "save_s": 0.0}
    mark = time.perf_counter()
    setup = setup_training(cfg, store, place)
    phases["setup_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    deep, optimizer, generator, train_step = setup.deep, setup.optimizer, setup.generator, setup.step
    split, in_memory, steps_per_epoch, lrs = store.splits["train"], setup.in_memory, setup.steps_per_epoch, setup.lrs

    start_epoch, history = 0, []
    if run.resuming:
        start_epoch, history = run.load_checkpoint(deep, optimizer, generator, store)

    timer = StepTimer(place)
    meter = MemoryMeter(device, "training")  # the training phase's own peak (skipcache.memory)
    meter.start()
    last_checkpoint = time.perf_counter()
    views = split.views
    # the reader hands over the storage dtype (half the bytes to copy); the step computes in fp32/autocast
    read_dtype = None if place.is_cuda else torch.float32
    with make_progress(cfg.progress, unit="step", metrics=True) as progress:
        bar = progress.add_task("tune", total=steps_per_epoch * (cfg.epochs - start_epoch), metrics="")
        for epoch in range(start_epoch, cfg.epochs):
            deep.train()
            totals = torch.zeros(len(STAT_NAMES), device=device)  # summed on the device: no sync per step
            if in_memory is not None:
                batches = class_batches(in_memory, cfg.batch_size, view=epoch % views, seed=cfg.seed * 1000 + epoch)
            else:
                batches = store.iter_batches("train", cfg.batch_size, view=epoch % views, shuffle=True,
                                             seed=cfg.seed * 1000 + epoch, dtype=read_dtype)
            shown = time.perf_counter()
            for i, batch in enumerate(prefetch_to_device(batches, place)):
                step = epoch * steps_per_epoch + i
                for g in optimizer.param_groups:
                    g["lr"] = _lr_at(step, cfg, steps_per_epoch, lrs[g["name"]])
                timer.start()
                totals += train_step(batch)
                timer.stop()
                progress.advance(bar)
                if time.perf_counter() - shown > 1.0 or i == steps_per_epoch - 1:  # one host sync a second
                    shown = time.perf_counter()
                    t = dict(zip(STAT_NAMES, totals.tolist()))
                    progress.update(bar, description=f"tune epoch {epoch + 1}/{cfg.epochs}",
                                    metrics=f"loss {t['loss_sum'] / max(1, t['images']):.3f} acc {100 * t['correct'] / max(1, t['images']):.1f}")
            t = dict(zip(STAT_NAMES, totals.tolist()))
            steps_done = max(1, i + 1)
            row = {
                "epoch": epoch + 1,
                "loss": t["loss_sum"] / max(1, t["images"]),
                "train_acc": 100 * t["correct"] / max(1, t["images"]),
                "classes_kept_per_image": t["kept"] / max(1, t["images"]),
                "text_classes_per_step": t["classes"] / steps_done,
                "lr_text": next((g["lr"] for g in optimizer.param_groups if g["name"] == "text"), optimizer.param_groups[0]["lr"]),
                "time_utc": utc_now(),
            }
            history.append(row)
            phases["train_s"] += time.perf_counter() - mark
            mark = time.perf_counter()
            if epoch + 1 == cfg.epochs or time.perf_counter() - last_checkpoint >= cfg.checkpoint_every_s:
                meter.pause()  # the checkpoint's serialization buffers are not training's memory
                run.save_checkpoint(epoch + 1, deep, optimizer, generator, history, store)  # and metrics.jsonl
                meter.resume()
                last_checkpoint = time.perf_counter()
            else:
                run.write_metrics(history)
            phases["checkpoint_s"] += time.perf_counter() - mark

    memory = meter.peak(tensor_mib(deep, getattr(train_step, "tensors", dict)()))
    peak_mib, method = memory["peak_memory_mib"], memory["memory_method"]
    mark = time.perf_counter()
    run.write_weights(deep, store)
    phases["save_s"] = time.perf_counter() - mark
    step_times = timer.times()
    warm = sorted(step_times[5:] or step_times)
    result = TuneResult(
        run_dir=out, store=store.path, epochs=cfg.epochs, seconds=time.perf_counter() - started,
        step_time_median_s=warm[len(warm) // 2] if warm else 0.0,
        peak_memory_mib=peak_mib, peak_memory_method=method, final=history[-1] if history else {},
    )
    run.finish(store, {  # run.json, the commit point; adds the format version, store record, weights sha256
        "epochs": cfg.epochs, "library_versions": library_versions(), "device": str(device), "finished_utc": utc_now(),
        "seconds": result.seconds, "step_time_median_s": result.step_time_median_s,
        "peak_memory_mib": peak_mib, "peak_memory_method": method,
        "trainable_parameters": sum(p.numel() for p in deep.parameters() if p.requires_grad),
        "method": cfg.method, "method_options": setup.method_options,
        "steps": len(step_times), "phases_s": phases, "placement": place.describe(),
    })
    return result


def _finished_result(out: Path, store: FeatureStore) -> TuneResult:
    """The result of a run that had already finished, from its run.json and metrics.jsonl."""
    _, info = rundir.read_run(out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return TuneResult(run_dir=out, store=store.path, epochs=len(history), seconds=info.get("seconds", 0.0),
                      step_time_median_s=info.get("step_time_median_s", 0.0), peak_memory_mib=info.get("peak_memory_mib", 0.0),
                      peak_memory_method=info.get("peak_memory_method", ""), final=history[-1] if history else {})


def result_dict(result: TuneResult) -> dict:
    out = asdict(result)
    out["run_dir"], out["store"] = str(result.run_dir), str(result.store)
    return out
