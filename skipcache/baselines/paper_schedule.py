"""The authors' schedule and conventional FT: training without a persistent cache.

    paper-schedule   Skip Tuning as the authors' code runs it: blocks 1..omega of both towers
                     frozen but run again every step, 77-token prompts, their CSkip
                     (`cskip.variant = paper-code`, ranks recomputed every step from the current
                     image features)
    ft-conventional  FT as usually run (the paper's FT row): every block of both towers trained,
                     77-token prompts, every class in every step

Both read a store cached at omega 0, which holds only the patch-embedded images (conv1, class
token, positions, ln_pre: what `visual._embeds` computes); every transformer block then runs in
every step, as in a training loop over raw images. `skipcache cache --omega 0 --views E` stores
E augmented views per image and the tune stage reads view `epoch % E`, so each epoch sees a
fresh augmented view as in the authors' loop. What differs from that loop: the frozen patch
embedding (one linear map per patch, under 1% of a ViT-B/16 step) ran once, at cache time.

So these are Skip Tuning's peers with the persistent cache and the prompt trimming taken away:
timing `paper-schedule` next to `skip-tuning` shows what those two save, and `ft-conventional`
is the reference of the paper's speed-up (Table 4's FT), trainable and exportable like the rest.

The model is `DeepCLIP` split at omega 0 with the first `omega` blocks of each tower frozen
(`requires_grad = False`: their forward records no graph and keeps no activations, as in the
authors' code); the run saves the trainable blocks under open_clip's keys, so eval, export and
predict are Skip Tuning's. Options: `omega` (paper-schedule: the frozen blocks, None: N // 2).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from skipcache.baselines.base import check_int
from skipcache.baselines.skip_tuning import SkipTuning
from skipcache.errors import ConfigError, ModelError
from skipcache.loading import load_store_model, tokenizer_for
from skipcache.model import DeepCLIP, ShallowText, check_omega, drop_shallow, tower_depths
from skipcache.step import TuneStep


class PartlyFrozenCLIP(DeepCLIP):
    """Every block of both towers, the first `frozen` of each frozen; only the trainable
    parameters are grouped, saved and loaded. Holds the train prompts at full length."""

    def __init__(self, model: nn.Module, frozen: int, full_tokens: torch.Tensor, full_eot: torch.Tensor):
        super().__init__(model, 0)
        check_omega(model, frozen)
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(True)
        for tower in (self.vision, self.text):
            for block in tower.resblocks[:frozen]:
                block.requires_grad_(False)
        self.register_buffer("full_tokens", full_tokens, persistent=False)  # (C, context length, width)
        self.register_buffer("full_eot", full_eot, persistent=False)  # (C,)

    def layer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {tower: [p for p in getattr(self, tower).parameters() if p.requires_grad] for tower in ("vision", "text")}

    def saved_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def full_length_prompts(lm, store) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's class prompts as the authors' code feeds them: token + positional embeddings
    over the whole context (77 tokens for CLIP), not cut after the last EOT. (C, L, width), (C,)."""
    stored = store.read_text()
    ids = tokenizer_for(lm.name)([stored["template"].format(c) for c in stored["classnames"]])
    tokens, eot = ShallowText(lm.model, 0)(ids, trim=False)
    if not torch.equal(eot.cpu(), stored["eot"]):
        raise ModelError(f"the store's prompts do not re-tokenize to the cached ones (template {stored['template']!r}); "
                         "re-cache the store with this version of skipcache")
    return tokens.detach(), eot


class PaperSchedule(SkipTuning):
    name = "paper-schedule"
    title = "Skip Tuning (authors' schedule)"
    summary = "no persistent cache: frozen blocks 1..omega run every step, 77-token prompts, the authors' CSkip (store at omega 0)"
    defaults = {"omega": None}

    def check_options(self, options):
        check_int("omega", options["omega"], 0, optional=True)

    store_omega = "zero"
    trains_every_block = "runs every block in every step"
    zero_hint = " (add --views E for a fresh augmented view each epoch)"

    def resolve_cskip(self, skip):
        # the authors' sampler: one mask over rank positions per run, one class subset per batch
        skip = super().resolve_cskip(skip)
        return replace(skip, variant="paper-code", subset="batch") if skip.enabled else skip

    def label(self, omega, cskip):
        return self.title if cskip else "LSkip (authors' schedule)"

    def frozen_blocks(self, options: dict, depth: int) -> int:
        frozen = depth // 2 if options.get("omega") is None else options["omega"]
        if frozen > depth:
            raise ConfigError(f"method_options.omega must be at most {depth} for this model (blocks per tower), got {frozen}")
        return frozen

    def build(self, store, place, pretrained, options):
        lm = load_store_model(store, pretrained)
        frozen = self.frozen_blocks(options, min(tower_depths(lm.model)))
        tokens, eot = full_length_prompts(lm, store)
        for p in lm.model.parameters():
            p.requires_grad_(False)
        model = PartlyFrozenCLIP(lm.model, frozen, tokens, eot)
        drop_shallow(lm.model)  # the embeddings ran at cache time (omega 0); the blocks are the model's
        return place.modules(model), ({**options, "omega": frozen} if "omega" in self.defaults else dict(options))

    def make_step(self, model, text, skip, *, rank, batch_size, optimizer, placement, generator, fixed_masks=None):
        ids = text["class_ids"]
        full = {"tokens": model.full_tokens[ids], "eot": model.full_eot[ids], "prototypes": text["prototypes"]}
        return TuneStep(model, full, skip, rank="dynamic" if skip.enabled else rank, batch_size=batch_size,
                        optimizer=optimizer, placement=placement, generator=generator)


class FTConventional(PaperSchedule):
    name = "ft-conventional"
    title = "FT (conventional)"
    summary = "the paper's FT: every block trained and run every step, 77-token prompts, every class (store at omega 0)"
    defaults = {}
    cskip_mode = "off"

    def check_options(self, options):
        pass

    def label(self, omega, cskip):
        return self.title

    def frozen_blocks(self, options, depth):
        return 0
