"""Skip Tuning and its ablations: one code path (`skipcache.step.TuneStep` on the deep blocks),
different settings.

    skip-tuning   the store's omega, CSkip as configured (the default; `--no-cskip` gives LSkip)
    ft            full fine-tuning in this harness: a store at omega 0, every class (no CSkip)
    ft-lskip      FT + LSkip (paper Table 4): a store at omega > 0, every class
    ft-cskip      FT + CSkip (paper Table 4): a store at omega 0, with CSkip
    fast          a cheaper preset: a store at omega = N - floor(N/4) (9 of ViT-B/16's 12
                  blocks, 6 of synth-vit's 8) and CSkip with r = 0.25 (a quarter of the classes
                  always kept instead of half)

The name only checks the store's omega and sets `cskip.enabled` (and r for `fast`); the model,
step, optimiser and run files are Skip Tuning's. Each trains blocks omega+1..N of both towers,
ln_post, proj, ln_final and text_projection; the run saves them under open_clip's keys and
export merges them into the pretrained state dict.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from skipcache.baselines.base import Head, Method
from skipcache.cskip import CSkipConfig
from skipcache.errors import ConfigError, RunError
from skipcache.loading import load_deep_model
from skipcache.step import TuneStep

FAST_R = 0.25
DEFAULT_R = CSkipConfig.r


def fast_omega(depth: int) -> int:
    """The `fast` preset's omega: three quarters of the blocks frozen (9 of 12, 6 of 8, 5 of 6)."""
    return depth - depth // 4


def family_name(omega: int, cskip: bool) -> str:
    """FT (omega 0, every class), LSkip (omega > 0, every class; the paper's FT + LSkip),
    FT + CSkip (omega 0 with CSkip) or Skip Tuning (omega > 0 with CSkip)."""
    if omega > 0:
        return "Skip Tuning" if cskip else "LSkip"
    return "FT + CSkip" if cskip else "FT"


class SkipTuning(Method):
    name = "skip-tuning"
    title = "Skip Tuning"
    summary = "LSkip at the store's omega + CSkip as configured (the default)"

    # What a name fixes: CSkip ("as set", "off": every class, "on": required) and the omega of
    # the store it reads ("any", "zero", "positive"); `trains_every_block` / `zero_hint` word
    # the error of a store at the wrong omega.
    cskip_mode = "as set"
    store_omega = "any"
    trains_every_block = "trains every block"
    zero_hint = ""

    def resolve_cskip(self, skip: CSkipConfig) -> CSkipConfig:
        if self.cskip_mode == "off":
            return replace(skip, enabled=False)
        if self.cskip_mode == "on" and not skip.enabled:
            raise ConfigError(f"method {self.name!r} trains with CSkip; drop --no-cskip (cskip.enabled = false)")
        return skip

    def check_omega(self, omega, depth):
        if self.store_omega == "zero" and omega != 0:
            raise ConfigError(f"method {self.name!r} {self.trains_every_block}: it needs a store cached with --omega 0"
                              f"{self.zero_hint}, this one has omega {omega}")
        if self.store_omega == "positive" and omega == 0:
            raise ConfigError(f"method {self.name!r} skips the first omega blocks: it needs a store cached with --omega > 0 "
                              "(the paper: 6), this one has omega 0")

    def label(self, omega: int, cskip: bool) -> str:
        return family_name(omega, cskip)

    def build(self, store, place, pretrained, options):
        return load_deep_model(store, place, pretrained), dict(options)

    def make_step(self, model, text, skip, *, rank, batch_size, optimizer, placement, generator, fixed_masks=None):
        return TuneStep(model, text, skip, rank=rank, batch_size=batch_size, optimizer=optimizer, placement=placement,
                        generator=generator, fixed_masks=fixed_masks)

    def full_head(self, model: nn.Module, weights: dict[str, torch.Tensor], options: dict) -> Head:
        state = model.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise RunError(f"tuned weights have keys the model lacks: {unknown[:3]}")
        state.update(weights)
        model.load_state_dict(state, strict=True)
        return Head()


class FT(SkipTuning):
    name = "ft"
    title = "FT"
    summary = "full fine-tuning in this harness: store at omega 0, no CSkip"
    cskip_mode = "off"
    store_omega = "zero"


class FTLSkip(SkipTuning):
    name = "ft-lskip"
    title = "LSkip"
    summary = "FT + LSkip (paper Table 4): store at omega > 0, no CSkip"
    cskip_mode = "off"
    store_omega = "positive"


class FTCSkip(SkipTuning):
    name = "ft-cskip"
    title = "FT + CSkip"
    summary = "FT + CSkip (paper Table 4): store at omega 0, with CSkip"
    cskip_mode = "on"
    store_omega = "zero"


class Fast(SkipTuning):
    name = "fast"
    title = "Skip Tuning (fast)"
    summary = f"preset: omega = N - N//4 (9 of 12), CSkip r = {FAST_R}"

    cskip_mode = "on"

    def resolve_cskip(self, skip):
        skip = super().resolve_cskip(skip)
        if skip.r not in (DEFAULT_R, FAST_R):
            raise ConfigError(f"method {self.name!r} is a preset with cskip.r = {FAST_R}; for r = {skip.r} use "
                              "--method skip-tuning")
        return replace(skip, r=FAST_R)

    def check_omega(self, omega, depth):
        if depth is not None and omega != fast_omega(depth):
            raise ConfigError(f"method {self.name!r} is a preset with omega = {fast_omega(depth)} for this model "
                              f"({depth} blocks per tower: N - N//4); cache a store with --omega {fast_omega(depth)} "
                              f"(this one has omega {omega}), or use --method skip-tuning")

    def label(self, omega, cskip):
        return self.title
