"""The training step: what `skipcache tune` runs per batch and what the benchmark times.

`TuneStep` is one optimizer step of Skip Tuning on cached tokens: the deep image blocks on the
batch, CSkip's class subset, the deep text blocks on those classes only, the loss, backward and
SGD. The CSkip mode (batch subset, per-image subsets, or every class) is chosen once when the
step is built, never branched on per call. A call returns its statistics as tensors on the
device and never synchronises with the host, so the CPU runs ahead queuing the next steps.

`ConventionalFTStep` is the baseline the paper compares against: open_clip's whole forward from
pixels and 77-token prompts, every class, every weight trained, with the same optimiser,
precision and placement, so the two are timed by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skipcache import cskip
from skipcache.model import DeepCLIP
from skipcache.placement import Placement

STAT_NAMES = ("loss_sum", "correct", "kept", "classes", "images")


def make_optimizer(groups: dict[str, list[nn.Parameter]], lrs: dict[str, float], *, momentum: float,
                   weight_decay: float, placement: Placement) -> torch.optim.SGD:
    """SGD with one parameter group per tower, each named (`name`) for the schedule.

    The fused implementation (one kernel for all parameters) where torch has it for the device,
    else the multi-tensor one; both compute the same update as the per-parameter loop.
    """
    params = [{"params": groups[g], "lr": lrs[g], "name": g} for g in groups]
    kind = {"fused": True} if placement.device.type in ("cuda", "cpu") else {"foreach": True}
    try:
        return torch.optim.SGD(params, lr=max(lrs.values()), momentum=momentum, weight_decay=weight_decay, **kind)
    except (RuntimeError, ValueError):  # an older torch without fused SGD on this device
        return torch.optim.SGD(params, lr=max(lrs.values()), momentum=momentum, weight_decay=weight_decay)


def cross_entropy_step(optimizer: torch.optim.Optimizer, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over logits (B, K) (-inf where an image does not compete with a class),
    backward, optimiser step; the step statistics (`STAT_NAMES`) on the device, no host sync."""
    loss = F.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        n = torch.tensor(float(len(target)), device=logits.device)
        kept = torch.isfinite(logits).sum().float()  # classes each image competed against, summed
        correct = (logits.argmax(dim=1) == target).sum().float()
        classes = torch.tensor(float(logits.shape[1]), device=logits.device)
        return torch.stack([loss.detach().float() * n, correct, kept, classes, n])


class TuneStep:
    """One Skip Tuning step on a batch of cached image tokens.

    Args:
        deep: the trainable deep halves, on the placement's device.
        text: the train classes' cached text tokens (M, Lt, Dt), EOT positions (M,) and zero-shot
            prototypes (M, E), on the device.
        skip: CSkip settings; `skip.subset` picks the mode.
        rank: `zeroshot` (the batch's stored ranks) or `dynamic` (current image features against
            the prototypes).
        batch_size: images per step (sizes the batch subset's certain positions).
        optimizer: built by `make_optimizer` over `deep`'s layer groups.
        placement: device and autocast.
        generator: CSkip's random source on the device.
        fixed_masks: (N, M) per-row masks drawn once per run (the paper-code variant with
            per-image subsets); the batch then needs an `index`.
    """

    def __init__(self, deep: DeepCLIP, text: dict[str, torch.Tensor], skip: cskip.CSkipConfig, *, rank: str,
                 batch_size: int, optimizer: torch.optim.Optimizer, placement: Placement,
                 generator: torch.Generator | None = None, fixed_masks: torch.Tensor | None = None):
        self.deep, self.optimizer, self.placement, self.generator = deep, optimizer, placement, generator
        self.tokens, self.eot, self.prototypes = text["tokens"], text["eot"], text["prototypes"]
        self.num_classes = len(self.eot)
        self.rank, self.fixed_masks = rank, fixed_masks
        self.subset: cskip.BatchSubset | None = None
        if not skip.enabled:
            self._classes: Callable = self._every_class
        elif skip.subset == "batch":
            self.subset = cskip.BatchSubset(self.num_classes, skip, batch_size, device=placement.device)
            if skip.variant == "paper-code":  # the authors' code: one draw over rank positions per run
                self.subset.fix_draw(generator)
            self._classes = self._batch_subset
        else:
            self.skip = skip
            self._classes = self._image_subsets

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the step computes with besides the model (for placement checks)."""
        out = {"tokens": self.tokens, "eot": self.eot, "prototypes": self.prototypes}
        if self.subset is not None:
            out.update({f"subset_{k}": v for k, v in self.subset.tensors().items()})
        if self.fixed_masks is not None:
            out["fixed_masks"] = self.fixed_masks
        return out

    def classes_per_step(self) -> float:
        """Expected classes through the text tower per step (M without CSkip; per-image mode: not known ahead)."""
        if self.subset is not None:
            return self.subset.expected_size()
        return float(self.num_classes) if self._classes == self._every_class else float("nan")

    # -- the three ways to pick the step's classes: (class_ids (K,), mask (B, K) or (K,) or None, target (B,))

    def _every_class(self, image, batch):
        return None, None, batch["labels"]

    def _batch_subset(self, image, batch):
        labels = batch["labels"]
        if self.rank == "dynamic":
            score = image.detach().float() @ self.prototypes.float().T  # (B, M)
        else:
            score = -batch["zeroshot_rank"].float()  # (B, M), rank 0 = most similar
        class_ids, keep = self.subset.sample(score, labels, self.generator)  # (K,), (K,)
        return class_ids, keep, cskip.positions_of(labels, class_ids, keep)

    def _image_subsets(self, image, batch):  # the union of per-image subsets: dynamic shapes, syncs
        labels = batch["labels"]
        if self.fixed_masks is not None:
            keep = self.fixed_masks[batch["index"]]
        else:
            rank = cskip.dynamic_rank(image.detach().float(), self.prototypes) if self.rank == "dynamic" else batch["zeroshot_rank"]
            keep = cskip.sample_keep_mask(rank, labels, self.skip, self.generator)  # (B, M)
        class_ids, mask = cskip.union_and_mask(keep)  # (U,), (B, U)
        return class_ids, mask, cskip.positions_of(labels, class_ids)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step on a batch already on the device; returns the stats (len(STAT_NAMES),) on the device."""
        deep = self.deep
        vision = batch["vision"].float()
        with self.placement.autocast():
            image = deep.encode_image(vision)  # (B, E)
            class_ids, mask, target = self._classes(image, batch)
            if class_ids is None:
                text = deep.encode_text(self.tokens, self.eot)  # (M, E)
            else:
                text = deep.encode_text(self.tokens[class_ids], self.eot[class_ids])  # (K, E)
            logits = (deep.logit_scale * image @ text.T).float()  # (B, K)
        if mask is not None:
            logits = logits.masked_fill(~(mask if mask.dim() == 2 else mask.unsqueeze(0)), float("-inf"))
        return cross_entropy_step(self.optimizer, logits, target)


class ConventionalFTStep:
    """Full fine-tuning as the paper and its peers run it: open_clip's whole forward from pixels
    and untrimmed prompts, every class, every weight trained (the benchmark's reference)."""

    def __init__(self, model: nn.Module, token_ids: torch.Tensor, optimizer: torch.optim.Optimizer,
                 placement: Placement):
        self.model, self.token_ids, self.optimizer, self.placement = model, token_ids, optimizer, placement

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model, labels = self.model, batch["labels"]
        with self.placement.autocast():
            image = F.normalize(model.encode_image(batch["images"]), dim=-1)
            text = F.normalize(model.encode_text(self.token_ids), dim=-1)
            logits = (model.logit_scale.exp() * image @ text.T).float()
        return cross_entropy_step(self.optimizer, logits, labels)


class StepTimer:
    """Per-step wall times without a host sync inside the step: CUDA events on the GPU, read once
    at the end; `perf_counter` elsewhere (the CPU computes synchronously)."""

    def __init__(self, placement: Placement):
        self.cuda = placement.is_cuda
        self._events: list[tuple] = []
        self._times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append((ev, None))
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events[-1] = (self._events[-1][0], ev)
        else:
            self._times.append(time.perf_counter() - self._t0)

    def times(self) -> list[float]:
        """Seconds per step so far (synchronises once on CUDA)."""
        if self.cuda and self._events:
            self._events[-1][1].synchronize()
            self._times.extend(a.elapsed_time(b) / 1000 for a, b in self._events)
            self._events = []
        return list(self._times)
