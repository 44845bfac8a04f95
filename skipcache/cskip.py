"""Class-wise skipping (CSkip): which class prompts each training image sees in the loss.

For an image, o_j is the rank of class j by similarity to the image (0 = most similar). Paper
Eq. 7 keeps class j with probability

    p_j = 1                          if o_j < top        (top = r·M, or min(r·M, max_top))
    p_j = exp(-λ·(o_j − top))        otherwise

taken literally from DESIGN.md. Since exp(0) = 1, a rank equal to top (when r·M is an integer)
is also kept with probability 1, so ranks 0..top are certain: top + 1 classes, not top.
The true class is always kept. The mask is resampled on every call, i.e. every step.

`max_top` (default 50, as the authors' code) caps top; None is Eq. 7 as written, whose r·M
certain classes make large label sets expensive.

The "paper-code" variant reproduces the authors' `select_classes` (SkipTuning trainer), checked
against a transcription of it on fixed rankings and draws (tests/test_cskip_paper_code.py):
  - k = ceil(r·M) always-kept rank positions for r <= 1, ceil(min(r, M)) for r > 1 (an absolute
    count), at most max_top (50); r = 1, or k = M, keeps every class;
  - the n = M − k tail positions get min-max-normalized exp(−x/λ) over x = linspace(0, 5, n), so
    the first tail position has p = 1 and the last p = 0 (note x/λ, not λ·x);
  - with a single tail position their normalisation is 0/0 = NaN and `rand < NaN` is False, so
    that class is never kept; we reproduce that (p = 0) rather than change it;
  - with `subset = "batch"` (theirs): ONE mask over rank positions, drawn once per run from M
    uniforms, shared by every batch; classes ranked by their best similarity to the batch, the
    batch's true classes first (theirs: similarity 1e4), so they take always-kept positions, not
    places on top; a plain cross-entropy over the kept classes, in class-id order. When a batch
    has more distinct true classes than k, a true class can fall on a dropped tail position;
    theirs then trains that image towards the smallest kept class id, and so does this variant.
  - with `subset = "image"` (not theirs): a mask per training row, drawn once per run.

Two ways to turn those probabilities into the classes a training step runs the text tower on:

  subset = "batch" (the default): one subset shared by the batch, as the authors' code does.
      Classes are ordered by their best similarity to any image of the batch, the batch's true
      classes first; the first `certain` positions are kept, the tail positions are drawn with
      the probabilities above. The subset has a fixed size (`BatchSubset.size`): the certain
      positions plus `tail` slots, enough for the tail draw but for a chance below about 3e-5
      per step (a longer draw keeps its best-ranked `tail` classes). A fixed size means static
      shapes and no host synchronisation in the step; the text tower costs about E[kept]
      forwards, not the union of per-image subsets.
  subset = "image": every image draws its own subset (paper Eq. 7 read literally); the text
      tower runs once on the batch's union of kept classes (`union_and_mask`) and each image's
      logits are masked to its own subset (`masked_cross_entropy`). With mixed-class batches the
      union is close to all M classes, so this saves little text compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F

from skipcache.errors import ConfigError

PAPER_CODE_TOP_CAP = 50  # the authors' code never keeps more than 50 classes for certain


@dataclass(frozen=True)
class CSkipConfig:
    """CSkip settings: sampling ratio r, decay λ, cap on the certain set, variant, subset mode.

    Errors name the field as `cskip.<name>` (the tune stage's nested config); the CLI maps
    those names to its flags.
    """

    r: float = 0.5
    lam: float = 0.3
    max_top: int | None = 50
    variant: Literal["eq7", "paper-code"] = "eq7"
    enabled: bool = True
    subset: Literal["batch", "image"] = "batch"

    def __post_init__(self):
        if self.variant == "paper-code":  # the authors' code: r > 1 is an absolute number of classes
            if not (self.r > 0 and math.isfinite(self.r)):
                raise ConfigError(f"cskip.r must be > 0 and finite, got {self.r}; e.g. 0.5 (a ratio) or 50 (a count)")
        elif not (_number(self.r) and 0 < self.r <= 1):
            raise ConfigError(f"cskip.r must be in (0, 1], got {self.r}; e.g. 0.5")
        if not (_number(self.lam) and self.lam > 0 and math.isfinite(self.lam)):
            raise ConfigError(f"cskip.lam must be > 0 and finite, got {self.lam}; e.g. 0.3")
        if self.max_top is not None and not (isinstance(self.max_top, int) and not isinstance(self.max_top, bool)
                                             and self.max_top >= 1):
            raise ConfigError(f"cskip.max_top must be an integer >= 1 or unset, got {self.max_top!r}; e.g. 50")
        if self.variant not in ("eq7", "paper-code"):
            raise ConfigError(f"cskip.variant must be 'eq7' or 'paper-code', got {self.variant!r}")
        if self.subset not in ("batch", "image"):
            raise ConfigError(f"cskip.subset must be 'batch' or 'image', got {self.subset!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"cskip.enabled must be true or false, got {self.enabled!r}")

    @classmethod
    def from_value(cls, value) -> CSkipConfig:
        """A CSkipConfig from itself, a bool (`cskip = false` in a pipeline: enabled or not) or a
        dict of its fields (`cskip = {r = 0.3}`, a run's config.json)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(f"cskip has no setting {', '.join(unknown)}; it takes {', '.join(sorted(names))}")
            return cls(**value)
        raise ConfigError(f"cskip must be true, false or a table of CSkip settings, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def probabilities_by_rank(num_classes: int, cfg: CSkipConfig, device=None) -> torch.Tensor:
    """Keep probability of each rank 0..M-1, shape (M,), float32."""
    M = num_classes
    o = torch.arange(M, device=device, dtype=torch.float32)
    if not cfg.enabled:
        return torch.ones(M, device=device)
    if cfg.variant == "eq7":
        top = cfg.r * M if cfg.max_top is None else min(cfg.r * M, cfg.max_top)
        return torch.where(o < top, torch.ones_like(o), torch.exp(-cfg.lam * (o - top)))
    # paper-code variant
    k = paper_code_top(M, cfg)
    p = torch.ones(M, device=device)
    if cfg.r == 1.0 or k >= M:  # the authors' code keeps every class then
        return p
    n_tail = M - k
    w = torch.exp(-torch.linspace(0, 5, n_tail, device=device) / cfg.lam)
    if n_tail == 1:  # their min-max normalisation is 0/0 = NaN, and rand < NaN is False: never kept
        p[k:] = 0.0
    else:
        p[k:] = (w - w.min()) / (w.max() - w.min())
    return p


def paper_code_top(num_classes: int, cfg: CSkipConfig) -> int:
    """The authors' always-kept count: ceil(r·M) for r <= 1, else ceil(min(r, M)); at most the cap."""
    M = num_classes
    k = math.ceil(cfg.r * M) if cfg.r <= 1 else math.ceil(min(cfg.r, M))
    return min(k, PAPER_CODE_TOP_CAP if cfg.max_top is None else cfg.max_top)


def keep_probabilities(rank: torch.Tensor, cfg: CSkipConfig) -> torch.Tensor:
    """Per-entry keep probability from integer ranks (B, M) (0 = most similar); float (B, M)."""
    table = probabilities_by_rank(rank.shape[-1], cfg, device=rank.device)  # (M,)
    return table[rank.long()]


def sample_keep_mask(rank: torch.Tensor, labels: torch.Tensor, cfg: CSkipConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a fresh keep mask (B, M): Bernoulli(p) per entry, the true class always kept.

    Args:
        rank: (B, M) integer ranks, 0 = most similar.
        labels: (B,) the true class of each image, as an index into the M classes.
        cfg: CSkip settings; disabled keeps everything.
        generator: source of randomness; must live on rank's device.
    """
    B, M = rank.shape
    if not cfg.enabled:
        return torch.ones(B, M, dtype=torch.bool, device=rank.device)
    p = keep_probabilities(rank, cfg)
    # rand is in [0, 1): p = 1 is always kept, p = 0 never
    keep = torch.rand(B, M, generator=generator, device=rank.device) < p
    keep[torch.arange(B, device=rank.device), labels.to(rank.device).long()] = True
    return keep


def fixed_masks(rank: torch.Tensor, labels: torch.Tensor, cfg: CSkipConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper-code schedule: one mask per training row, drawn once per run.

    Pass the ranks (N, M) and labels (N,) of the whole training set; look a batch up with
    `masks[row_idx]`. Every epoch then sees the same subset for an image, which is what the
    authors' code does (and what the paper's text warns leads to overfitting for top-k).
    """
    return sample_keep_mask(rank, labels, cfg, generator)  # (N, M)


def union_and_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted union of kept classes (U,) and each image's mask over that union (B, U)."""
    class_ids = keep.any(dim=0).nonzero().squeeze(1)  # (U,), nonzero returns sorted indices
    return class_ids, keep[:, class_ids]


def target_positions(class_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position of each label (B,) inside the sorted union class_ids (U,); (B,) long."""
    labels = labels.to(class_ids.device).long()
    pos = torch.searchsorted(class_ids, labels).clamp(max=len(class_ids) - 1)
    if not torch.equal(class_ids[pos], labels):
        raise ValueError("a label is missing from the kept classes; the true class must be kept")
    return pos


def masked_cross_entropy(logits: torch.Tensor, mask: torch.Tensor,
                         target_in_union: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy where each image competes only against its own kept classes.

    Args:
        logits: (B, U) logits against the union of kept classes.
        mask: (B, U) True where the image kept that class; the target must be kept.
        target_in_union: (B,) target positions in the union (see `target_positions`).
    """
    logits = logits.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: dropped from softmax
    return F.cross_entropy(logits, target_in_union)


@torch.no_grad()
def dynamic_rank(image_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Rank (B, M) of each class by cosine similarity, 0 = most similar, ties broken by index.

    Args:
        image_features: (B, E) normalized image features of the current model (detached).
        prototypes: (M, E) normalized zero-shot text features.
    """
    sim = image_features.float() @ prototypes.float().t()  # (B, M)
    order = torch.argsort(-sim, dim=1, stable=True)  # (B, M) class ids, best first
    B, M = sim.shape
    ranks = torch.arange(M, device=sim.device).expand(B, M)
    return torch.empty_like(order).scatter_(1, order, ranks)  # invert the permutation


def expected_kept(num_classes: int, cfg: CSkipConfig) -> float:
    """Expected number of kept classes per image, Σ p over ranks (ignores forcing the label)."""
    return probabilities_by_rank(num_classes, cfg).sum().item()


# ---------------------------------------------------------------------------------------------
# One subset per batch, of a fixed size
# ---------------------------------------------------------------------------------------------

TAIL_SIGMAS = 4.0  # tail slots = mean + 4 sd of the tail draw: P(longer draw) < 3.2e-5 (normal approx.)


def certain_count(num_classes: int, cfg: CSkipConfig) -> int:
    """How many leading rank positions are kept with probability 1."""
    p = probabilities_by_rank(num_classes, cfg)
    below = (p < 1).nonzero()
    return int(below[0]) if len(below) else num_classes


def tail_slots(num_classes: int, cfg: CSkipConfig, certain: int) -> int:
    """Slots for the drawn tail: mean + TAIL_SIGMAS sd of the Bernoulli tail count, at most the tail."""
    p = probabilities_by_rank(num_classes, cfg)[certain:].double()
    if len(p) == 0:
        return 0
    mean, var = float(p.sum()), float((p * (1 - p)).sum())
    return min(len(p), math.ceil(mean + TAIL_SIGMAS * math.sqrt(var)) + 1)


class BatchSubset:
    """Draw one class subset per batch, of a fixed size `size` (see the module docstring).

    Args:
        num_classes: M, the classes of the train split.
        cfg: CSkip settings (variant, r, λ, max_top).
        batch_size: images per step; the certain positions are at least this many, so every
            true class of a batch fits in them (not with the paper-code variant, which keeps
            the authors' count).
    """

    def __init__(self, num_classes: int, cfg: CSkipConfig, batch_size: int, device=None):
        M = num_classes
        self.num_classes = M
        self.paper_code = cfg.variant == "paper-code"
        least = 0 if self.paper_code else batch_size
        self.certain = min(M, max(certain_count(M, cfg), least))
        self.tail = tail_slots(M, cfg, self.certain)
        self.size = self.certain + self.tail
        p = probabilities_by_rank(M, cfg, device=device)
        self.p_tail = p[self.certain:].clone()  # (M - certain,) keep probability by tail position
        self._priority = torch.arange(M - self.certain, 0, -1, device=device, dtype=torch.float32)  # earlier first
        self._fixed: torch.Tensor | None = None

    def fix_draw(self, generator: torch.Generator | None = None) -> None:
        """Draw the tail once and reuse it at every step (the authors' code: one mask over rank
        positions per run, from M uniforms of which the always-kept positions use the first)."""
        u = torch.rand(self.num_classes, generator=generator, device=self.p_tail.device)
        self._fixed = u[self.certain:] < self.p_tail
        if self._fixed.device.type != "meta":  # room for every drawn position (once per run)
            self.tail = max(self.tail, int(self._fixed.sum()))
            self.size = self.certain + self.tail

    def to(self, device) -> BatchSubset:
        self.p_tail = self.p_tail.to(device)
        self._priority = self._priority.to(device)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a draw computes with (all on one device)."""
        out = {"p_tail": self.p_tail, "priority": self._priority}
        if self._fixed is not None:
            out["fixed_draw"] = self._fixed
        return out

    def expected_size(self) -> float:
        """E[classes kept per step]: the certain positions plus the expected (or fixed) tail draw."""
        return self.certain + float((self._fixed if self._fixed is not None else self.p_tail).sum())

    def sample(self, score: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's classes (size,) and which of them are kept (size,) bool.

        Args:
            score: (B, M) similarity of each image to each class, higher = more similar
                (for stored ranks pass `-rank`).
            labels: (B,) true classes; they are always kept.
            generator: source of randomness on score's device.
        """
        batch_score = score.float().amax(dim=0)  # (M,) best similarity to any image of the batch
        batch_score = batch_score.index_fill(0, labels.long(), float("inf"))  # true classes first
        order = torch.argsort(batch_score, descending=True, stable=True)  # (M,) classes by position
        certain = order[: self.certain]
        if self.tail == 0:
            class_ids, keep = certain, torch.ones(self.certain, dtype=torch.bool, device=score.device)
        else:
            drawn = self._fixed if self._fixed is not None else \
                torch.rand(self.p_tail.shape, generator=generator, device=score.device) < self.p_tail  # (M - c,)
            # the `tail` drawn positions that come first; undrawn ones fill the rest, masked out
            pick = torch.topk(drawn.float() * self._priority, self.tail, sorted=False).indices  # (tail,)
            class_ids = torch.cat([certain, order[self.certain:][pick]])  # (size,)
            keep = torch.cat([torch.ones(self.certain, dtype=torch.bool, device=score.device), drawn[pick]])
        if self.paper_code:  # theirs: kept classes in class-id order (what a dropped label's target becomes)
            by_id = torch.argsort(class_ids + (~keep).long() * self.num_classes)
            class_ids, keep = class_ids[by_id], keep[by_id]
        return class_ids, keep


def positions_of(labels: torch.Tensor, class_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Position (B,) of each label among the kept entries of class_ids (K,), without a host sync.

    A label that is not kept gets position 0 (only the paper-code variant can drop a true class;
    the authors' code then trains towards its first kept class, and so does this).
    """
    hit = class_ids.unsqueeze(0) == labels.long().unsqueeze(1)  # (B, K)
    if keep is not None:
        hit = hit & keep.unsqueeze(0)
    return hit.int().argmax(dim=1)
