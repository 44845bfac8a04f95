"""What `python -m skipcache.bench` measures: one function per configuration, each run in a fresh
spawned child process so that its peak memory is its own.

Training configurations time the tune stage's own step function (`skipcache.step`), in the
stage's precision (bf16 autocast on CUDA, fp32 on the CPU), with the same fused SGD for all:

    conventional FT   `ConventionalFTStep`: open_clip's whole forward from 4 raw images and M
                      77-token prompts, every class, every weight trained (how the paper and its
                      peers run FT)
    FT (harness)      `TuneStep` at omega = 0 without CSkip: every block trained, from cached
                      embeddings, text trimmed to max(EOT) + 1
    LSkip             `TuneStep` at omega, without CSkip
    Skip Tuning       `TuneStep` at omega with CSkip's batch subset (Eq. 7, r = 0.5, lambda = 0.3)
    Skip Tuning (per-image)  the same with a subset per image: the text tower runs on their union

Inputs are random tensors of the cached shapes and random zero-shot ranks (random init costs
what pretrained weights cost). A step's time is the mean over `steps` back-to-back steps after
`warmup` untimed ones, with one synchronisation at the end (the stage never synchronises inside
a step either). FLOPs of one step (forward + backward) come from torch's FlopCounterMode.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset after warm-up, so it includes the
weights, gradients and optimizer state); on CPU the child's peak RSS (ru_maxrss) minus its RSS
right before the first step (after imports, model build and input creation).

Throughput configurations: `cache` (shallow forward, no grad: images/s at batch 32 and prompts/s
for the text side) and `store` (FeatureStore.iter_batches over a temporary fp16 store).
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TRAIN_CONFIGS = ("conventional FT", "FT (harness)", "LSkip", "Skip Tuning", "Skip Tuning (per-image)")
CONFIGS = TRAIN_CONFIGS + ("cache", "store")
FOOD = (
    "apple pie,baby back ribs,baklava,beef carpaccio,beef tartare,beet salad,beignets,bibimbap,bread pudding,"
    "breakfast burrito,bruschetta,caesar salad,cannoli,caprese salad,carrot cake,ceviche,cheesecake,cheese plate,"
    "chicken curry,chicken quesadilla,chicken wings,chocolate cake,chocolate mousse,churros,clam chowder,"
    "club sandwich,crab cakes,creme brulee,croque madame,cup cakes,deviled eggs,donuts,dumplings,edamame,"
    "eggs benedict,escargots,falafel,filet mignon,fish and chips,foie gras,french fries,french onion soup,"
    "french toast,fried calamari,fried rice,frozen yogurt,garlic bread,gnocchi,greek salad,grilled cheese sandwich,"
    "grilled salmon,guacamole,gyoza,hamburger,hot and sour soup,hot dog,huevos rancheros,hummus,ice cream,lasagna,"
    "lobster bisque,lobster roll sandwich,macaroni and cheese,macarons,miso soup,mussels,nachos,omelette,"
    "onion rings,oysters,pad thai,paella,pancakes,panna cotta,peking duck,pho,pizza,pork chop,poutine,prime rib,"
    "pulled pork sandwich,ramen,ravioli,red velvet cake,risotto,samosa,sashimi,scallops,seaweed salad,"
    "shrimp and grits,spaghetti bolognese,spaghetti carbonara,spring rolls,steak,strawberry shortcake,sushi,tacos,"
    "takoyaki,tiramisu,tuna tartare,waffles"
).split(",")
TEMPLATE = "a photo of a {}."


@dataclass
class BenchOptions:
    model: str = "ViT-B-16"
    pretrained: str = "none"
    omega: int | None = None  # None: half the blocks (6 of ViT-B-16's 12)
    classes: int = 100
    batch_size: int = 4
    device: str = "auto"
    steps: int = 3
    warmup: int = 1
    threads: int | None = None  # None: torch's default
    cache_batch: int = 32
    store_rows: int = 512
    r: float = 0.5
    lam: float = 0.3
    max_top: int | None = 50  # the tune stage's default; None: paper Eq. 7 uncapped
    precision: str = "auto"  # the tune stage's: bf16 autocast on CUDA, fp32 on the CPU
    seed: int = 0


def classnames(m: int) -> list[str]:
    """The 101 Food-101 class names, then `class <i>` for any beyond."""
    return [FOOD[i] if i < len(FOOD) else f"class {i}" for i in range(m)]


# ---- measuring ------------------------------------------------------------------------------


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mib()  # no /proc: the best available stand-in


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, steps: int, warmup: int) -> dict:
    """Run fn warmup + steps times; mean seconds of the timed runs (one sync at the end) and the peak memory."""
    _sync(device)
    base = _rss_mib() if device.type == "cpu" else None
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    out = {"step_s": (time.perf_counter() - t0) / max(1, steps)}
    if device.type == "cuda":
        out.update(peak_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                   memory_method="torch.cuda.max_memory_allocated (after warm-up; weights included)")
    else:
        out.update(peak_mib=_maxrss_mib() - base, rss_before_mib=base,
                   memory_method="CPU: child peak RSS (ru_maxrss) minus RSS before the first step")
    return out


def step_flops(fn) -> int:
    """FLOPs of one call (forward + backward matmuls and convolutions), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """The device's measured dense matmul rate (TFLOP/s) at n x n x n in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ---- the configurations ---------------------------------------------------------------------


def _setup(opts: BenchOptions):
    from skipcache.loading import load_model, tokenizer_for
    from skipcache.model import eot_positions, tower_depths
    from skipcache.placement import Placement

    place = Placement.resolve(opts.device, opts.precision)
    lm = load_model(opts.model, opts.pretrained, seed=opts.seed)
    n = min(tower_depths(lm.model))
    omega = n // 2 if opts.omega is None else opts.omega
    token_ids = tokenizer_for(opts.model)([TEMPLATE.format(c) for c in classnames(opts.classes)])
    eot = eot_positions(token_ids, lm.model)
    return place, lm, omega, token_ids, eot


def _train(name: str, opts: BenchOptions) -> dict:
    from skipcache import cskip
    from skipcache.model import split_model
    from skipcache.step import ConventionalFTStep, TuneStep, make_optimizer

    place, lm, omega, token_ids, eot = _setup(opts)
    g = torch.Generator().manual_seed(opts.seed)
    B, M = opts.batch_size, opts.classes
    labels = torch.randint(M, (B,), generator=g)
    info: dict = {"omega": omega, "prompts": M, "text_tokens": int(token_ids.shape[1]), "precision": place.precision}
    lrs = {"vision": 5e-6, "text": 2e-5}
    if name == "conventional FT":
        model = place.modules(lm.model).train()
        for p in model.parameters():
            p.requires_grad_(True)
        visual = list(model.visual.parameters())
        seen = {id(p) for p in visual}
        groups = {"vision": visual, "text": [p for p in model.parameters() if id(p) not in seen]}
        opt = make_optimizer(groups, lrs, momentum=0.9, weight_decay=5e-4, placement=place)
        step = ConventionalFTStep(model, place.tensor(token_ids), opt, place)
        batch = {"images": torch.randn(B, 3, lm.image_size, lm.image_size, generator=g), "labels": labels}
        info.update(omega=0, trainable_params=sum(p.numel() for p in model.parameters()))
    else:
        visual = lm.model.visual
        grid = visual.grid_size if hasattr(visual, "grid_size") else None
        lv = int(grid[0] * grid[1]) + 1 if grid else int(visual.positional_embedding.shape[0])
        dv = int(visual.transformer.width)
        at = 0 if name == "FT (harness)" else omega
        _, deep = split_model(lm.model, at, keep_shallow=False)  # the tune stage holds no shallow weights
        deep = place.modules(deep).train()
        dt = int(deep.text.ln_final.normalized_shape[0])
        lt = int(eot.max()) + 1
        embed = int(deep.vision.proj.shape[1]) if deep.vision.proj is not None else dv
        text = {"tokens": torch.randn(M, lt, dt, generator=g), "eot": eot,
                "prototypes": F.normalize(torch.randn(M, embed, generator=g), dim=-1)}
        text = {k: place.tensor(v) for k, v in text.items()}
        skip = cskip.CSkipConfig(r=opts.r, lam=opts.lam, max_top=opts.max_top, enabled=name.startswith("Skip Tuning"),
                                 subset="image" if "per-image" in name else "batch")
        opt = make_optimizer(deep.layer_groups(), lrs, momentum=0.9, weight_decay=5e-4, placement=place)
        step = TuneStep(deep, text, skip, rank="zeroshot", batch_size=B, optimizer=opt, placement=place,
                        generator=place.generator(opts.seed))
        ranks = torch.stack([torch.randperm(M, generator=g) for _ in range(B)])  # random zero-shot ranks per image
        batch = {"vision": torch.randn(B, lv, dv, generator=g), "labels": labels, "zeroshot_rank": ranks}
        info.update(omega=at, text_tokens=lt, vision_tokens=lv, trainable_params=sum(p.numel() for p in deep.parameters()))
        if skip.enabled:
            info["expected_kept_per_image"] = cskip.expected_kept(M, skip)
    batch = {k: place.tensor(v) for k, v in batch.items()}
    last: list[torch.Tensor] = []

    def run():
        last[:] = [step(batch)]

    info.update(_timed(run, place.device, opts.steps, opts.warmup))
    info["text_classes_per_step"] = float(last[0][3])
    info["flops_per_step"] = step_flops(run)
    info["tflops_per_s"] = info["flops_per_step"] / info["step_s"] / 1e12
    return info


def _cache(opts: BenchOptions) -> dict:
    from skipcache.model import split_model

    place, lm, omega, token_ids, _ = _setup(opts)
    device = place.device
    shallow, deep = split_model(lm.model, omega)
    place.modules(shallow, deep)
    g = torch.Generator().manual_seed(opts.seed)
    images = torch.randn(opts.cache_batch, 3, lm.image_size, lm.image_size, generator=g).to(device)
    ids = token_ids.to(device)
    vis = _timed(lambda: shallow.vision(images), device, opts.steps, opts.warmup)
    txt = _timed(lambda: shallow.text(ids, trim=True), device, opts.steps, opts.warmup)
    return {
        "omega": omega, "batch": opts.cache_batch, "prompts": opts.classes,
        "vision_batch_s": vis["step_s"], "images_per_s": opts.cache_batch / vis["step_s"],
        "text_s": txt["step_s"], "prompts_per_s": opts.classes / txt["step_s"],
        "ms_per_prompt": 1000 * txt["step_s"] / opts.classes,
        "peak_mib": max(vis["peak_mib"], txt["peak_mib"]), "memory_method": vis["memory_method"],
        "step_s": vis["step_s"],
    }


def _store(opts: BenchOptions) -> dict:
    from skipcache.loading import config_of
    from skipcache.store import FeatureStore, SplitSpec

    vc = config_of(opts.model)["vision_cfg"]
    lv, dv, n = (vc["image_size"] // vc["patch_size"]) ** 2 + 1, vc["width"], opts.store_rows
    m, rows_per_shard = 4, 64
    tmp = Path(tempfile.mkdtemp(prefix="skipcache-bench-"))
    try:
        spec = SplitSpec("train", n, 1, list(range(m)), (lv, dv))
        store = FeatureStore.create_or_resume(tmp / "bench.zarr", {"bench": True}, text_shape=(m, 4, 8), embed_dim=8,
                                              splits=[spec], storage_dtype="float16", rows_per_shard=rows_per_shard)
        g = torch.Generator().manual_seed(opts.seed)
        store.write_text(torch.zeros(m, 4, 8), torch.full((m,), 3), torch.zeros(m, 8), [str(i) for i in range(m)], "{}")
        t0 = time.perf_counter()
        for shard in range(store.n_shards("train")):
            rows = store.shard_rows("train", shard)
            store.write_shard("train", shard, vision=torch.randn(1, len(rows), lv, dv, generator=g).half(),
                              labels=torch.zeros(len(rows), dtype=torch.long), zeroshot_logits=torch.zeros(len(rows), m),
                              zeroshot_rank=torch.arange(m).expand(len(rows), m), source_ids=[str(r) for r in rows])
        write_s = time.perf_counter() - t0
        store.finalize()
        store = FeatureStore.open(tmp / "bench.zarr")

        def epoch():
            for batch in store.iter_batches("train", opts.batch_size, shuffle=True, dtype=torch.float32):
                batch["vision"].sum()

        res = _timed(epoch, torch.device("cpu"), opts.steps, opts.warmup)
        mib = n * lv * dv * 2 / 2**20
        return {"rows": n, "vision_shape": [lv, dv], "dtype": "float16", "batch": opts.batch_size,
                "epoch_s": res["step_s"], "step_s": res["step_s"], "rows_per_s": n / res["step_s"],
                "mib_per_s": mib / res["step_s"], "data_mib": mib, "write_s": write_s,
                "disk_mib": store.disk_size_mib(), "peak_mib": res["peak_mib"], "memory_method": res["memory_method"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_config(name: str, opts: BenchOptions) -> dict:
    """Measure one configuration in this process (the child's body)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    out = _cache(opts) if name == "cache" else _store(opts) if name == "store" else _train(name, opts)
    out["threads"] = torch.get_num_threads()
    return out


def run_in_child(name: str, opts: BenchOptions) -> dict:
    """Measure one configuration in a fresh spawned process; {"error": ...} if it failed."""
    from skipcache.child import ChildFailed, run_in_child as in_child

    started = time.perf_counter()
    try:
        out = in_child(run_config, name, opts)
    except ChildFailed as exc:
        out = {"error": str(exc), "traceback": exc.traceback}
    out["wall_s"] = time.perf_counter() - started
    return out
