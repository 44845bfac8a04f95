"""The authors' training schedule, as a peer for the benchmark (cost only; not a `tune --method`).

The paper's code does not keep a cache: every step runs the frozen shallow blocks again on a
freshly augmented view of the batch's images, runs the text tower on untrimmed 77-token prompts,
and samples classes with its own CSkip (`cskip.variant = paper-code`: one mask over rank
positions drawn once per run, ranks recomputed every step from the current image features).
`PaperScheduleStep` is that step built from this package's parts: the shallow image blocks
(no gradient) on raw images, then `skipcache.step.TuneStep` on the deep blocks with the
untrimmed text and the paper-code batch subset. Timing it next to Skip Tuning's step shows
what the persistent cache and the trimming save. The augmentation itself (random resized crop
and flip on the CPU) is not part of the step and is not timed.
"""

from __future__ import annotations

import torch
from torch import nn

from skipcache.cskip import CSkipConfig
from skipcache.model import split_model
from skipcache.step import TuneStep, make_optimizer

PAPER_LRS = {"vision": 5e-6, "text": 2e-5}


class PaperScheduleStep:
    """One step of the authors' schedule on a batch of raw (augmented) images: {"images", "labels"}."""

    def __init__(self, shallow_vision: nn.Module, inner: TuneStep, placement):
        self.shallow, self.inner, self.placement = shallow_vision, inner, placement

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self.placement.autocast():
            tokens = self.shallow(batch["images"])  # blocks 1..omega again, every step
        return self.inner({"vision": tokens.float(), "labels": batch["labels"]})


def build_paper_schedule(model: nn.Module, omega: int, token_ids: torch.Tensor, *, batch_size: int, placement,
                         seed: int = 0) -> tuple[PaperScheduleStep, nn.Module]:
    """(the step, the trained deep model) for an open_clip `model` split at `omega` and the class
    prompts `token_ids` (M, context length), kept at their full length."""
    shallow, deep = split_model(model, omega)
    shallow, deep = placement.modules(shallow, deep)
    with torch.no_grad():
        tokens, eot = shallow.text(token_ids, trim=False)  # (M, 77, width): not trimmed
        prototypes = deep.encode_text(tokens, eot)  # the zero-shot class features the ranks use
    optimizer = make_optimizer(deep.layer_groups(), PAPER_LRS, momentum=0.9, weight_decay=5e-4, placement=placement)
    inner = TuneStep(deep, {"tokens": tokens, "eot": eot, "prototypes": prototypes}, CSkipConfig(variant="paper-code"),
                     rank="dynamic", batch_size=batch_size, optimizer=optimizer, placement=placement,
                     generator=placement.generator(seed))
    return PaperScheduleStep(shallow.vision, inner, placement), deep
