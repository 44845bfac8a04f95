"""LoRA (Hu et al., ICLR 2022) on CLIP: low-rank updates of the deep blocks' projections.

Every linear projection of the blocks omega+1..N of both towers gets W' = W + (alpha / rank) · B A
with A (rank, in) and B (out, rank) trained and W frozen: the attention's query, key and value
projections, its output projection, and the MLP's two layers. open_clip fuses query, key and
value in one `nn.MultiheadAttention.in_proj_weight` (3·D, D), which PEFT cannot target; here
that weight gets one (A, B) pair per projection (3 pairs, so the update is block-diagonal over
q, k, v as with three separate LoRA layers), applied as a `torch.nn.utils.parametrize`
parametrization of the weight: every read of it (the attention's forward included) sees
W + delta. A is initialised like a linear layer (Kaiming uniform, a = sqrt(5)), B to zero, so
training starts from the pretrained model. No LoRA dropout (0): the update is then exactly a
change of the weight, which is what lets export merge it.

With a store at omega 0 (the usual LoRA: every block) only the frozen embeddings are skipped,
as for FT in this harness; a store at omega > 0 puts LoRA on the deep blocks only. Every class
in every loss (no CSkip), through `skipcache.step.TuneStep` on the adapted model.

Options: `rank` (4), `alpha` (8: scale alpha / rank = 2).

What a run saves: `<open_clip key>.lora_A` (parts, rank, in) and `.lora_B` (parts, out / parts,
rank) for every adapted weight. Eval merges them into the weights; export writes a plain
open_clip checkpoint with W + (alpha / rank) · B A in place of W.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from skipcache.baselines.base import Head, Method, check_int, check_number
from skipcache.errors import ModelError, RunError
from skipcache.loading import load_deep_model
from skipcache.model import DeepCLIP, projection_weights
from skipcache.step import TuneStep

SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"


class LoRADelta(nn.Module):
    """The parametrization W -> W + scale · B A; `parts` (A, B) pairs stacked along the output rows."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, parts: int = 1):
        super().__init__()
        if out_features % parts:
            raise ModelError(f"a fused weight of {out_features} rows does not split into {parts} projections")
        self.scale, self.shape = scale, (out_features, in_features)
        self.lora_A = nn.Parameter(torch.empty(parts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(parts, out_features // parts, rank))
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A).reshape(self.shape)  # (out, in)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


class LoRAModel(nn.Module):
    """A frozen DeepCLIP whose deep blocks' projections carry LoRA parametrizations."""

    def __init__(self, deep: DeepCLIP, rank: int, alpha: float):
        super().__init__()
        self.deep, self.omega = deep, deep.omega
        for p in deep.parameters():
            p.requires_grad_(False)
        self.adapted: list[tuple[str, str, LoRADelta, nn.Module, str]] = []  # (open_clip key, tower, delta, module, attr)
        for name, module, attr, parts in projection_weights(deep):
            weight = getattr(module, attr)
            delta = LoRADelta(weight.shape[0], weight.shape[1], rank, alpha / rank, parts).to(weight.device)
            parametrize.register_parametrization(module, attr, delta)
            self.adapted.append((deep.openclip_key(name), name.split(".")[0], delta, module, attr))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.deep.logit_scale

    def layer_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"vision": [], "text": []}
        for _, tower, delta, _, _ in self.adapted:
            groups[tower] += [delta.lora_A, delta.lora_B]
        return {k: v for k, v in groups.items() if v}

    def deep_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, _, delta, _, _ in self.adapted:
            out[key + SUFFIX_A] = delta.lora_A.detach().cpu().contiguous()
            out[key + SUFFIX_B] = delta.lora_B.detach().cpu().contiguous()
        return out

    def load_deep_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {}
        for key, _, delta, _, _ in self.adapted:
            own[key + SUFFIX_A], own[key + SUFFIX_B] = delta.lora_A, delta.lora_B
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelError(f"LoRA weights do not match the model at omega={self.omega}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, p in own.items():
            if state[k].shape != p.shape:
                raise ModelError(f"LoRA weight {k} has shape {tuple(state[k].shape)}, the model expects {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])

    def merged(self) -> DeepCLIP:
        """The deep model with every update merged into its weight and the parametrizations removed."""
        for _, _, _, module, attr in self.adapted:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        self.adapted = []
        return self.deep

    def encode_image(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.deep.encode_image(tokens, normalize)

    def encode_classes(self, text: dict, class_ids: torch.Tensor) -> torch.Tensor:
        return self.deep.encode_classes(text, class_ids)


def merge_lora(state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """`state` (open_clip keys) with W + (alpha / rank) · B A for every LoRA pair in `weights`."""
    bases = {k[: -len(SUFFIX_A)] for k in weights if k.endswith(SUFFIX_A)}
    stray = sorted(k for k in weights if not k.endswith((SUFFIX_A, SUFFIX_B)) or k[: -len(SUFFIX_A)] not in bases)
    unknown = sorted(b for b in bases if b not in state)
    if stray or unknown or len(weights) != 2 * len(bases):
        raise RunError(f"LoRA weights do not fit the model: unpaired {stray[:3]}, keys the model lacks {unknown[:3]}")
    out = dict(state)
    for base in bases:
        a, b = weights[base + SUFFIX_A].float(), weights[base + SUFFIX_B].float()  # (parts, r, in), (parts, out/parts, r)
        w = state[base]
        out[base] = (w.float() + (alpha / a.shape[1]) * (b @ a).reshape(w.shape)).to(w.dtype)
    return out


class LoRA(Method):
    name = "lora"
    title = "LoRA"
    summary = "rank-4 updates of q/k/v/out and MLP projections of both towers' deep blocks (store at omega 0: all blocks)"
    defaults = {"rank": 4, "alpha": 8.0}

    def check_options(self, options):
        check_int("rank", options["rank"], 1)
        check_number("alpha", options["alpha"], lambda v: v > 0, "a number > 0")

    def build(self, store, place, pretrained, options):
        deep = load_deep_model(store, place, pretrained)
        model = LoRAModel(deep, options["rank"], float(options["alpha"]))
        return place.modules(model), dict(options)

    def make_step(self, model, text, skip, *, rank, batch_size, optimizer, placement, generator, fixed_masks=None):
        return TuneStep(model.deep, text, skip, rank=rank, batch_size=batch_size, optimizer=optimizer,
                        placement=placement, generator=generator, fixed_masks=fixed_masks)

    def eval_model(self, model: LoRAModel) -> DeepCLIP:
        return model.merged()

    def full_head(self, model, weights, options):
        model.load_state_dict(merge_lora(model.state_dict(), weights, float(options.get("alpha", self.defaults["alpha"]))),
                              strict=True)
        return Head()
