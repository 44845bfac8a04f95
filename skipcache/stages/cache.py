"""The cache stage: run the frozen layers 1..omega once and write a feature store.

One pass per image computes the shallow tokens *and* the rest of the frozen forward, so the
zero-shot logits and class rankings that CSkip needs cost no second pass. Work is done shard by
shard (64 images); a shard is marked done only after its data is on disk, so a killed run
resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from skipcache.data import Task, build_task, get_dataset, load_image
from skipcache.data.registry import get_registry
from skipcache.data.splits import DEFAULT_SAMPLER, SAMPLERS
from skipcache.data.templates import DEFAULT_TEMPLATE_SET, check_template_set, template_for
from skipcache.errors import ConfigError
from skipcache.loading import LoadedModel, load_model, tokenizer_for
from skipcache.model import DEFAULT_OMEGA, DeepCLIP, ShallowCLIP, split_model
from skipcache.placement import Placement
from skipcache.preprocess import AUGMENT, augment_transform, eval_transform
from skipcache.progress import make_progress
from skipcache.runtime import default_store_root, library_versions
from skipcache.store import STORAGE_DTYPES, FeatureStore, SplitSpec, store_path

log = logging.getLogger(__name__)



@dataclass
class CacheConfig:
    """Everything the cache stage needs. Fields that change cached values go into the store key.

    Attributes:
        dataset: registry name (`skipcache datasets`).
        data_root: dataset folder; `$SKIPCACHE_DATA` when None (procedural datasets need none).
        dataset_options: loader options, e.g. {"num_classes": 10} for a synthetic task.
        model: open_clip model name, or `local-dir:DIR`.
        pretrained: `openai`, another open_clip tag, `synth`, a weights file, or `none`.
        omega: number of frozen blocks per tower (0..N).
        shots: images per class in the train split (None or 0: all; 0 is stored as None, so
            both name the same store).
        seed: seed of the few-shot sample, the augmentation and a random init.
        classes: `base` (train on the first half of the classes; test on base and new) or `all`.
        views: augmented views per training image (1: the plain eval transform).
        dtype: storage dtype of the tokens: float16, bfloat16 or float32.
        template: prompt template with `{}`; None takes the template of `templates`.
        templates: named template set, `coop` (CoOp's per-dataset prompts; the default) or `skipt`
            (the Skip Tuning authors' prompts); see `skipcache.data.templates`.
        sampler: few-shot sampler, `stable` (the default) or `coop` (CoOp's picks, image for
            image); see `skipcache.data.splits`.
        root: store root.
        force: rebuild even if a complete store with this key exists.
        device: auto, cpu, cuda, cuda:N.
        batch_size: images per forward pass.
        workers: DataLoader workers decoding images.
        progress: draw a progress bar.
    """

    dataset: str = "synthetic"
    data_root: Path | None = None
    dataset_options: dict = field(default_factory=dict)
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    omega: int = DEFAULT_OMEGA
    shots: int | None = 16
    seed: int = 1
    classes: str = "base"
    views: int = 1
    dtype: str = "float16"
    template: str | None = None
    templates: str = DEFAULT_TEMPLATE_SET
    sampler: str = DEFAULT_SAMPLER
    root: Path = field(default_factory=default_store_root)
    force: bool = False
    device: str = "auto"
    batch_size: int = 64
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shots == 0:  # "all images", the same store as None
            self.shots = None

    def validate(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.classes not in ("base", "all"):
            raise ConfigError(f"classes must be 'base' or 'all', got {self.classes!r}")
        if self.views < 1:
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if self.shots is not None and self.shots < 0:
            raise ConfigError(f"shots must be >= 0 (0: all images), got {self.shots}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.omega < 0:
            raise ConfigError(f"omega must be >= 0 (frozen blocks per tower), got {self.omega}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: decode images in the main process), got {self.workers}")
        if self.template is not None and "{}" not in self.template:
            raise ConfigError(f"template must contain '{{}}' for the class name, got {self.template!r}")
        check_template_set(self.templates, None if self.template else self.dataset)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")


@dataclass
class CacheResult:
    """What the cache stage did.

    Attributes:
        path: the complete store.
        key: the store key.
        reused: True when a complete store with this key already existed and nothing was computed.
        rows: images per split.
        seconds: wall time of this call.
        images_per_s: shallow-forward throughput over the images computed in this call.
        zeroshot_acc: zero-shot top-1 (percent) per split, from the stored logits.
    """

    path: Path
    key: dict
    reused: bool
    rows: dict[str, int]
    seconds: float
    images_per_s: float
    zeroshot_acc: dict[str, float]


def build_key(cfg: CacheConfig, lm: LoadedModel, task: Task, template: str) -> dict:
    """Everything that determines the cached values, and nothing that only tune-time settings change."""
    return {
        "dataset": cfg.dataset,
        "dataset_options": cfg.dataset_options,
        "task_fingerprint": task.fingerprint(),
        "classes": cfg.classes,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "model": lm.name,
        "pretrained_label": lm.pretrained_label,
        "weights_hash": lm.weights_hash,
        "omega": cfg.omega,
        "image_size": lm.image_size,
        "preprocess": {"resize": "bicubic-short-side", "crop": "center", "mean": list(lm.mean), "std": list(lm.std)},
        "augment": AUGMENT if cfg.views > 1 else None,
        "views": cfg.views,
        "template": template,
        "templates": "custom" if cfg.template else cfg.templates,
        "sampler": cfg.sampler,
        "dtype": cfg.dtype,
    }


class FrozenForward:
    """All the cache stage computes: the frozen shallow blocks on images and prompts, and the rest
    of the frozen forward for the zero-shot logits. Built through `Placement`, so every weight
    and buffer it touches is on the device. The frozen pass runs in fp32."""

    def __init__(self, lm: LoadedModel, omega: int, placement: Placement):
        shallow, deep = split_model(lm.model, omega)
        self.shallow: ShallowCLIP
        self.deep: DeepCLIP
        self.shallow, self.deep = placement.modules(shallow, deep)
        self.placement = placement

    @torch.no_grad()
    def text(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (M, L) -> trimmed tokens (M, Lt, Dt), EOT (M,), zero-shot prototypes (M, E)."""
        tokens, eot = self.shallow.text(token_ids)
        return tokens, eot, F.normalize(self.deep.text(tokens, eot), dim=-1)

    @torch.no_grad()
    def images(self, images: torch.Tensor, class_protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, V, 3, H, W) -> shallow tokens (V, B, Lv, Dv) and view 0's zero-shot logits (B, M)."""
        b, v = images.shape[:2]
        x = self.placement.tensor(images).flatten(0, 1)  # (B*V, 3, H, W)
        tokens = self.shallow.vision(x).unflatten(0, (b, v)).transpose(0, 1)  # (V, B, Lv, Dv)
        feats = F.normalize(self.deep.vision(tokens[0]), dim=-1)  # (B, E): the rest of the frozen forward, view 0
        return tokens, self.deep.logit_scale * feats @ class_protos.T


class _ShardImages(torch.utils.data.Dataset):
    """The images of one shard, as (V, 3, H, W) tensors; view v of row i is seeded by (seed, i, v)."""

    def __init__(self, examples, rows: range, views: int, plain, augment, seed: int):
        self.examples, self.rows, self.views = examples, rows, views
        self.plain, self.augment, self.seed = plain, augment, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.rows[i]
        image = load_image(self.examples[row])
        if self.views == 1:
            return self.plain(image).unsqueeze(0)
        out = []
        for v in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{self.seed}:{row}:{v}".encode()))
                out.append(self.augment(image))
        return torch.stack(out)  # (V, 3, H, W)


def run_cache(cfg: CacheConfig) -> CacheResult:
    """Build (or resume, or reuse) the feature store for `cfg`. See `CacheConfig`."""
    cfg.validate()
    started = time.perf_counter()
    place = Placement.resolve(cfg.device, "fp32")
    device = place.device
    # Fail fast: listing a file dataset (or rejecting an unknown name) is cheap, so it goes first;
    # rendering a procedural dataset is not, so the model (and a failed download) goes before it.
    info = get_registry().get(cfg.dataset)
    dataset = get_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options) if info is None or info.needs_root else None
    lm = load_model(cfg.model, cfg.pretrained, seed=cfg.seed)
    dataset = dataset or get_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_options)
    task = build_task(dataset, shots=cfg.shots, seed=cfg.seed, classes=cfg.classes, sampler=cfg.sampler)
    template = cfg.template or template_for(cfg.templates, cfg.dataset, task.templates)
    frozen = FrozenForward(lm, cfg.omega, place)
    key = build_key(cfg, lm, task, template)
    path = store_path(Path(cfg.root), key)
    if path.exists() and not cfg.force:
        store = FeatureStore.open(path)
        return _result(store, key, reused=True, started=started, computed=0)

    # Probe the shapes with one tiny forward: (Lv, Dv) of the image tokens, (M, Lt, Dt) of the text.
    tokenizer = tokenizer_for(lm.name)
    token_ids = tokenizer([template.format(c) for c in task.classnames])
    text_tokens, eot, prototypes = frozen.text(token_ids)  # (M, Lt, Dt), (M,), (M, E)
    with torch.no_grad():
        probe = frozen.shallow.vision(torch.zeros(1, 3, lm.image_size, lm.image_size, device=device))  # (1, Lv, Dv)
    splits = [
        SplitSpec(name=s.name, n=len(s.examples), views=cfg.views if s.name == "train" else 1,
                  classes=list(s.classes), vision_shape=tuple(probe.shape[1:]))
        for s in task.splits.values()
    ]
    store = FeatureStore.create_or_resume(
        path, key, text_shape=tuple(text_tokens.shape), embed_dim=prototypes.shape[1], splits=splits,
        storage_dtype=cfg.dtype, force=cfg.force, reuse_complete=True,
        extra_attrs={"library_versions": library_versions(), "pretrained_source": _pretrained_source(cfg.pretrained),
                     "notes": task.notes},
    )
    if store.complete:  # another `skipcache cache` finished this store while we waited for its lock
        return _result(store, key, reused=True, started=started, computed=0)
    if not store.has_text():
        store.write_text(text_tokens.cpu(), eot.cpu(), prototypes.cpu(), task.classnames, template)

    plain, augment = eval_transform(lm), augment_transform(lm)
    computed = 0
    todo = {s.name: store.pending_shards(s.name) for s in splits}
    total = sum(len(store.shard_rows(spec.name, k)) * spec.views for spec in splits for k in todo[spec.name])
    with make_progress(cfg.progress, unit="img") as progress:
        bar = progress.add_task("cache", total=total)
        for spec in splits:
            split = task.splits[spec.name]
            class_protos = prototypes[torch.as_tensor(split.classes, device=device)]  # (M_split, E)
            for shard in todo[spec.name]:
                rows = store.shard_rows(spec.name, shard)
                progress.update(bar, description=f"cache {spec.name} shard {shard + 1}/{store.n_shards(spec.name)}")
                images = _ShardImages(split.examples, rows, spec.views, plain, augment, cfg.seed)
                loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size, num_workers=cfg.workers)
                vision, logits = [], []
                for batch in loader:  # (B, V, 3, H, W)
                    b, v = batch.shape[:2]
                    tokens, batch_logits = frozen.images(batch, class_protos)  # (V, B, Lv, Dv), (B, M_split)
                    logits.append(batch_logits.float().cpu())
                    vision.append(tokens.to(STORAGE_DTYPES[cfg.dtype][0]).cpu())
                    computed += b * v
                    progress.advance(bar, b * v)
                logits_t = torch.cat(logits)  # (rows, M_split)
                rank = logits_t.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = most similar
                store.write_shard(
                    spec.name, shard, vision=torch.cat(vision, dim=1),
                    labels=torch.as_tensor(split.labels[rows.start:rows.stop], dtype=torch.int64),
                    zeroshot_logits=logits_t, zeroshot_rank=rank,
                    source_ids=[split.examples[r].source_id for r in rows],
                )
    store.finalize()
    return _result(store, key, reused=False, started=started, computed=computed)


def _pretrained_source(pretrained: str) -> str:
    """What the tune stage passes to `load_model` to get the same weights back (absolute for files)."""
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else pretrained


def _result(store: FeatureStore, key: dict, *, reused: bool, started: float, computed: int) -> CacheResult:
    seconds = time.perf_counter() - started
    summary = store.summary()
    return CacheResult(
        path=store.path, key=key, reused=reused,
        rows={name: spec.n for name, spec in store.splits.items()},
        seconds=seconds, images_per_s=computed / seconds if computed else 0.0,
        zeroshot_acc=dict(summary["zeroshot_acc_pct"]),
    )


def result_dict(result: CacheResult) -> dict:
    out = asdict(result)
    out["path"] = str(result.path)
    return out
