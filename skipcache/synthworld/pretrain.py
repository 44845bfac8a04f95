"""CLIP contrastive pretraining of the shipped tiny model on fresh synthetic image-caption pairs.

This module owns the pretraining loop and the shipped weights' file format:

- `pretrain(config)` trains `synth-vit` from scratch: every step samples new scenes on the CPU,
  captions and tokenizes them (through a token cache, so the Python tokenizer never starves a
  GPU), renders them on the training device, and takes one AdamW step on the CLIP loss. An EMA
  of the weights is what gets evaluated (zero-shot, on fixed held-out sets) and exported.
- the run's outputs: `curve.jsonl`, `synth.safetensors` (format in `weights`, whose
  `load_synth_state_dict` is re-exported here), `model_card.json`.

Run: `python -m skipcache.synthworld.pretrain --out DIR [--device cuda] [--minutes 7]`.
Only torch, numpy, open_clip and safetensors are needed (no zarr, no CLI), so it runs on a bare
GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from skipcache.synthworld.captions import DEFAULT_PROMPT, caption_scenes
from skipcache.synthworld.render import render, sample_scenes
from skipcache.synthworld.tasks import make_split
from skipcache.synthworld.weights import (  # noqa: F401  (re-exported for callers of pretrain)
    KEPT_IDS_KEY,
    MODEL_NAME,
    TOKEN_EMBEDDING_KEY,
    export_synth_weights,
    kept_token_ids,
    load_synth_state_dict,
)

CONFIG_PATH = Path(__file__).resolve().parent.parent / "model_configs" / f"{MODEL_NAME}.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN, the config default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_SEED = 12345  # held-out evaluation sets; downstream datasets default to seed 0


@dataclass
class PretrainConfig:
    """Settings of one pretraining run.

    Attributes:
        out: output folder (curve.jsonl, synth.safetensors, model_card.json, checkpoint).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        minutes: wall-clock budget of the whole run, export included; None for step-bounded.
        steps: number of optimizer steps; None for time-bounded. With both, whichever ends first
            (the schedule follows `steps`).
        batch_size: image-caption pairs per step.
        lr: peak learning rate; None scales 1e-3 by sqrt(batch/256), capped at 2e-3.
        weight_decay: AdamW decay on weight matrices (not gains, biases, embeddings, logit scale).
        warmup_steps: linear warm-up length; None picks min(200, 10% of the run).
        ema_decay: EMA decay of the exported weights.
        seed: seed of model init and the data stream.
        image_size: rendered image side (the config's image size).
        eval_every_s: seconds between zero-shot evaluations.
        checkpoint_every_s: seconds between EMA checkpoints.
        eval_per_class: held-out images per class of each evaluation set.
        prefetch: sample and tokenize the next batches in a background thread (default on CUDA).
    """

    out: Path
    device: str = "auto"
    minutes: float | None = None
    steps: int | None = None
    batch_size: int = 1024
    lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    ema_decay: float = 0.999
    seed: int = 0
    image_size: int = 48
    eval_every_s: float = 30.0
    checkpoint_every_s: float = 60.0
    eval_per_class: int = 10
    prefetch: bool | None = None


# ------------------------------------------------------------------------------------------ model


def create_synth_model(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """The untrained `synth-vit` model (fp32) and its tokenizer."""
    open_clip.add_model_config(str(CONFIG_PATH))
    model = open_clip.create_model(MODEL_NAME, pretrained=None).to(device)
    context_length = json.loads(CONFIG_PATH.read_text())["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer(MODEL_NAME, context_length=context_length)
    return model, tokenizer


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) with CLIP's mean and std, as open_clip's preprocess."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class TokenCache:
    """Caption -> token ids, memoised; the synthetic captions repeat a lot (a few 10k strings).

    Uncached, the BPE tokenizer costs ~50 ms per 1024 captions on a CPU core, as long as a GPU
    step; cached, a batch is one dictionary lookup per caption and one row gather. The row index
    of a caption doubles as its identity: equal indices mean identical captions.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.index: dict[str, int] = {}
        self.table = torch.zeros(4096, tokenizer.context_length, dtype=torch.int64)  # (capacity, L)
        self.seen_ids: set[int] = set()

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, context_length) int64 and caption ids (B,) int64."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.index]
        if missing:
            tokens = self.tokenizer(missing)  # (M, L)
            self.seen_ids.update(torch.unique(tokens).tolist())
            n = len(self.index)
            if n + len(missing) > self.table.shape[0]:
                grown = torch.zeros(2 * (n + len(missing)), self.table.shape[1], dtype=torch.int64)
                grown[:n] = self.table[:n]
                self.table = grown
            self.table[n : n + len(missing)] = tokens
            self.index.update((c, n + i) for i, c in enumerate(missing))
        rows = torch.tensor([self.index[c] for c in captions], dtype=torch.int64)  # (B,)
        return self.table[rows], rows


def sample_batch(batch_size: int, generator: torch.Generator, tokens: TokenCache):
    """CPU side of one step: scenes, captions, tokens and the caption-equality groups.

    Returns:
        scenes on the CPU, tokens (B, L) int64, and caption group ids (B,) int64 (equal ids =
        identical captions, which are positives of each other in the loss).
    """
    scenes = sample_scenes(batch_size, generator, "pretrain")
    captions = caption_scenes(scenes, generator)
    ids, groups = tokens(captions)
    return scenes, ids, groups


class BatchStream:
    """Batches from `sample_batch`, optionally produced ahead of time by a background thread."""

    def __init__(self, batch_size: int, generator: torch.Generator, tokens: TokenCache, prefetch: bool, depth: int = 6):
        self.args = (batch_size, generator, tokens)
        self.prefetch = prefetch
        if prefetch:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._produce, daemon=True)
            self.thread.start()

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                item = sample_batch(*self.args)
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the training thread by `next`
            self.queue.put(exc)

    def next(self):
        if not self.prefetch:
            return sample_batch(*self.args)
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("batch producer thread failed") from item
        return item

    def close(self) -> None:
        if self.prefetch:
            self.stop.set()
            self.thread.join(timeout=5)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where identical captions are all positives (soft targets).

    Args:
        image_features: (B, D) normalized.
        text_features: (B, D) normalized.
        logit_scale: scalar, already exponentiated.
        groups: (B,) caption group ids.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T  # (B, B)
    same = (groups[:, None] == groups[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only (not gains, biases, embeddings, logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "logit_bias" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, progress: float, floor: float = 0.02) -> float:
    """Linear warm-up over steps, then cosine over `progress` (0 -> 1) down to `floor`."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (floor + (1 - floor) * cosine)


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # Short runs would export a near-random average; ramp the decay up (as timm's ModelEmaV3).
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [t for t in self.model.state_dict().values() if t.dtype.is_floating_point]
        src = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        torch._foreach_lerp_(ema, src, 1.0 - d)


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalSet:
    """A fixed held-out set: images (N, 3, H, W) uint8 on the device, labels (N,), class names."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]


def make_eval_sets(per_class: int, size: int, device: str) -> list[EvalSet]:
    """The `synthetic` task (shifted domain) and the plain domain, 100 classes each."""
    sets = []
    for name, task in (("synthetic", "synthetic"), ("plain", "synthetic-plain")):
        images, labels, classnames = make_split(task, "test", per_class, EVAL_SEED, size)
        sets.append(EvalSet(name, torch.from_numpy(images).permute(0, 3, 1, 2).to(device),
                            torch.from_numpy(labels).to(device), classnames))
    return sets


@torch.no_grad()
def zero_shot_logits(model: torch.nn.Module, tokenizer, eval_set: EvalSet, batch: int = 1000) -> torch.Tensor:
    """Cosine similarities (N, M) of images to "a photo of a {class}." prompts, in fp32."""
    model.eval()
    device = eval_set.images.device
    prompts = tokenizer([DEFAULT_PROMPT.format(c) for c in eval_set.classnames]).to(device)  # (M, L)
    text = F.normalize(model.encode_text(prompts).float(), dim=-1)  # (M, D)
    out = []
    for start in range(0, len(eval_set.images), batch):
        x = normalize_images(eval_set.images[start : start + batch])  # (b, 3, H, W)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1) @ text.T)  # (b, M)
    return torch.cat(out)


def evaluate(model: torch.nn.Module, tokenizer, eval_sets: list[EvalSet]) -> dict[str, float]:
    """Zero-shot top-1 (%) on each set; base/new halves of `synthetic`, each among its own half."""
    result = {}
    for s in eval_sets:
        logits = zero_shot_logits(model, tokenizer, s)  # (N, M)
        result[f"zs_{s.name}"] = 100.0 * (logits.argmax(1) == s.labels).float().mean().item()
        if s.name == "synthetic":
            half = (len(s.classnames) + 1) // 2
            base = s.labels < half
            result["zs_base"] = 100.0 * (logits[base, :half].argmax(1) == s.labels[base]).float().mean().item()
            result["zs_new"] = 100.0 * (logits[~base, half:].argmax(1) + half == s.labels[~base]).float().mean().item()
    return {k: round(v, 2) for k, v in result.items()}


# ------------------------------------------------------------------------------------------ training


def _log(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "curve.jsonl", "a") as f:
        f.write(line + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(cfg: PretrainConfig) -> dict:
    """Train, evaluate, export; returns the model card (also written to `out/model_card.json`).

    The schedule: linear warm-up, then cosine to the end of the run. The end is `steps` when
    given; otherwise the wall-clock deadline, and the cosine follows the fraction of the
    training time used, which is the same as estimating the total number of steps from the
    measured step time, continuously (evaluations and checkpoints included).
    """
    t_start = time.time()
    if cfg.minutes is None and cfg.steps is None:
        raise ValueError("give --minutes or --steps (or both)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.jsonl").unlink(missing_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model, tokenizer = create_synth_model(device)
    model.train()
    ema = EMA(model, cfg.ema_decay)
    lr = cfg.lr if cfg.lr is not None else min(2e-3, 1e-3 * math.sqrt(cfg.batch_size / 256))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    if cfg.steps is not None:
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(200, cfg.steps // 10))
    else:
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else 200
    reserve_s = 30.0 if cfg.minutes is not None and cfg.minutes >= 2 else 5.0  # final eval + export
    deadline = t_start + cfg.minutes * 60 - reserve_s if cfg.minutes is not None else float("inf")

    eval_sets = make_eval_sets(cfg.eval_per_class, cfg.image_size, str(device))
    tokens = TokenCache(tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    prefetch = cuda if cfg.prefetch is None else cfg.prefetch
    stream = BatchStream(cfg.batch_size, generator, tokens, prefetch)
    kept = kept_token_ids(tokenizer)

    step, skipped, bad_in_row = 0, 0, 0
    losses: list[float] = []
    curve: list[dict] = []
    error: str | None = None
    t_train = time.time()
    last_eval = last_ckpt = t_train
    step_times: list[float] = []

    def record(final: bool = False) -> dict:
        metrics = evaluate(ema.model, tokenizer, eval_sets)
        rec = {"step": step, "time_s": round(time.time() - t_start, 1),
               "loss": round(float(np.mean(losses[-50:])), 4) if losses else None, **metrics}
        if final:
            rec["final"] = True
        curve.append(rec)
        _log(out, rec)
        return metrics

    try:
        record()
        while True:
            now = time.time()
            if cfg.steps is not None and step >= cfg.steps:
                break
            if now >= deadline:
                break
            progress = step / cfg.steps if cfg.steps is not None else (now - t_train) / max(1e-6, deadline - t_train)
            factor = lr_factor(step, warmup, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor

            t0 = time.time()
            scenes, ids, groups = stream.next()
            scenes = scenes.to(device)
            images = normalize_images(render(scenes, cfg.image_size))  # (B, 3, H, W)
            ids, groups = ids.to(device, non_blocking=True), groups.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # fp32 master weights
                image_features, text_features, logit_scale = model(images, ids)[:3]
            loss = clip_loss(image_features, text_features, logit_scale, groups)
            if not torch.isfinite(loss):
                skipped += 1
                bad_in_row += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_in_row >= 50:
                    raise FloatingPointError(f"loss non-finite for 50 steps in a row at step {step}")
                continue
            bad_in_row = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            ema.update(model)
            step += 1
            losses.append(loss.item())  # also syncs, so step_times measure the real step
            step_times.append(time.time() - t0)

            now = time.time()
            if now - last_eval >= cfg.eval_every_s:
                record()
                model.train()
                last_eval = time.time()
            if now - last_ckpt >= cfg.checkpoint_every_s:
                export_synth_weights(ema.model, out / "checkpoint.safetensors", kept, {"step": step})
                last_ckpt = time.time()
    except (Exception, KeyboardInterrupt) as exc:  # keep what was trained; the card names the error
        error = f"{type(exc).__name__}: {exc}"
        print(f"training stopped early: {error}", file=sys.stderr, flush=True)
    finally:
        stream.close()
    train_s = time.time() - t_train

    final = record(final=True)
    kept = kept_token_ids(tokenizer, tokens.seen_ids)
    weights = out / "synth.safetensors"
    export_synth_weights(ema.model, weights, kept, {"step": step, "seed": cfg.seed})
    # Sanity check: the exported file, in a fresh model, scores what the EMA scored.
    fresh, _ = create_synth_model(device)
    fresh.load_state_dict(load_synth_state_dict(weights), strict=True)
    reloaded = evaluate(fresh, tokenizer, eval_sets)
    reload_ok = all(abs(reloaded[k] - final[k]) <= 0.5 for k in final)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)

    card = {
        "model": MODEL_NAME,
        "config": json.loads(CONFIG_PATH.read_text()),
        "file": weights.name,
        "file_sha256": _sha256(weights),
        "file_mib": round(weights.stat().st_size / 2**20, 2),
        "kept_token_ids": int(len(kept)),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "steps": step,
        "skipped_steps": skipped,
        "batch_size": cfg.batch_size,
        "samples_seen": step * cfg.batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "train_time_s": round(train_s, 1),
        "total_time_s": round(time.time() - t_start, 1),
        "step_time_s_median": round(float(np.median(step_times)), 4) if step_times else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "seed": cfg.seed,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "prompt": DEFAULT_PROMPT,
        "eval_seed": EVAL_SEED,
        "eval_per_class": cfg.eval_per_class,
        "zero_shot": final,
        "zero_shot_reloaded": reloaded,
        "reload_check_ok": reload_ok,
        "curve": {"first": curve[0], "last": curve[-1], "points": len(curve),
                  "best_zs_synthetic": max(c["zs_synthetic"] for c in curve)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "error": error,
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    print(json.dumps({"final": final, "reloaded": reloaded, "reload_check_ok": reload_ok, "steps": step,
                      "error": error}), flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m skipcache.synthworld.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget, export included")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--eval-every-s", type=float, default=30.0)
    p.add_argument("--checkpoint-every-s", type=float, default=60.0)
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps (or both)")
    cfg = PretrainConfig(**vars(args))
    card = pretrain(cfg)
    return 0 if card["error"] is None and card["reload_check_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
