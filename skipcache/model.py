"""Model surgery: split an open_clip CLIP at layer omega into a frozen shallow part and a trainable deep part.

This is the only module that knows open_clip's internals (`resblocks`, `_embeds`, `ln_post`,
`text_projection`, the causal `attn_mask`). Everything else talks to the four halves:

    ShallowVision(images)        -> tokens (B, Lv, Dv)          frozen, run once by the cache stage
    DeepVision(tokens)           -> features (B, E)             trainable
    ShallowText(token_ids)       -> tokens (M, Lt, Dt), eot (M)  frozen; Lt trimmed to max(eot) + 1
    DeepText(tokens, eot)        -> features (M, E)             trainable

Splitting reproduces `encode_image` / `encode_text` exactly in fp32. Text trimming is exact
because the mask is causal: the EOT output depends only on positions <= EOT, so positions after
the longest prompt's EOT never influence any feature the model uses.

The deep halves keep references to the original open_clip modules, so their parameters can be
named with open_clip's own state-dict keys (`deep_state_dict`), which is what makes export a
plain key update of the pretrained state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skipcache.errors import ConfigError, ModelError

DEFAULT_OMEGA = 6  # frozen blocks per tower by default: the paper's 6 of ViT-B/16's 12

# ---------------------------------------------------------------------------------------------
# The towers, split
# ---------------------------------------------------------------------------------------------


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding ... text_projection (`model` for CLIP, `model.text` otherwise)."""
    return model.text if hasattr(model, "text") else model


def tower_depths(model: nn.Module) -> tuple[int, int]:
    """(vision blocks, text blocks) of a transformer CLIP; ModelError otherwise."""
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise ModelError(
            f"the image tower is a {type(visual).__name__}, not a ViT: layer skipping needs transformer blocks; "
            "use a ViT model such as ViT-B-16"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ModelError("image towers with attention pooling (CoCa-style) are not supported; use a CLIP ViT")
    text = _text_tower(model)
    if not hasattr(text, "transformer") or not hasattr(text.transformer, "resblocks"):
        raise ModelError(f"the text tower {type(text).__name__} is not an open_clip transformer; use a CLIP model")
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
    if pool not in ("argmax", "eos") or getattr(text, "cls_emb", None) is not None:
        raise ModelError(f"text pooling {pool!r} is not supported (needs EOT pooling with a causal mask)")
    if getattr(text, "attn_mask", None) is None:
        raise ModelError("the text tower has no causal attention mask; token trimming would not be exact")
    return len(visual.transformer.resblocks), len(text.transformer.resblocks)


def check_omega(model: nn.Module, omega: int) -> None:
    """Raise ConfigError unless 0 <= omega <= N for both towers."""
    n_vision, n_text = tower_depths(model)
    n = min(n_vision, n_text)
    if not 0 <= omega <= n:
        raise ConfigError(f"omega must be in [0, {n}] for this model ({n_vision} image / {n_text} text blocks), got {omega}")


class ShallowVision(nn.Module):
    """Frozen image embeddings (conv1, class token, positions, ln_pre) and blocks [0, omega)."""

    def __init__(self, visual: nn.Module, omega: int):
        super().__init__()
        self.visual = visual  # forward uses only _embeds and resblocks[:omega]
        self.omega = omega

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual._embeds(images)  # (B, Lv, Dv)
        for block in self.visual.transformer.resblocks[: self.omega]:
            x = block(x)
        return x


class DeepVision(nn.Module):
    """Blocks [omega, N), ln_post, class-token pooling and proj of the image tower."""

    def __init__(self, visual: nn.Module, omega: int):
        super().__init__()
        self.resblocks = nn.ModuleList(list(visual.transformer.resblocks)[omega:])
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.pool_type = getattr(visual, "pool_type", "tok")
        self.final_ln_after_pool = getattr(visual, "final_ln_after_pool", False)
        self.omega = omega

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens  # (B, Lv, Dv)
        for block in self.resblocks:
            x = block(x)
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 1:].mean(dim=1) if self.pool_type == "avg" else x[:, 0]  # (B, Dv)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled @ self.proj if self.proj is not None else pooled  # (B, E)


def eot_positions(token_ids: torch.Tensor, text: nn.Module) -> torch.Tensor:
    """Position of the token the text tower pools (EOT), per prompt."""
    if getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax")) == "eos":
        eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        return (token_ids == eos).int().argmax(dim=-1)
    return token_ids.argmax(dim=-1)


class ShallowText(nn.Module):
    """Frozen token + positional embeddings and text blocks [0, omega); trims to max(EOT) + 1."""

    def __init__(self, model: nn.Module, omega: int):
        super().__init__()
        self.text = _text_tower(model)
        self.omega = omega

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (M, L) wherever they are (the EOT search stays there: no device round trip)
        -> tokens (M, Lt, Dt) and EOT positions (M,) on the tower's device."""
        text = self.text
        eot = eot_positions(token_ids, text)  # (M,)
        length = int(eot.max()) + 1 if trim else token_ids.shape[1]
        device = text.positional_embedding.device
        token_ids, eot = token_ids[:, :length].to(device), eot.to(device)
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(token_ids).to(cast)  # (M, Lt, Dt)
        x = x + text.positional_embedding[:length].to(cast)
        mask = text.attn_mask[:length, :length]
        for block in text.transformer.resblocks[: self.omega]:
            x = block(x, attn_mask=mask)
        return x, eot


class TextEmbeddings(nn.Module):
    """The text tower's frozen input: token embeddings, positional embeddings and the EOT search.

    What prompt learning (CoOp) needs to put its own vectors between a prompt's tokens before
    `DeepText(model, 0)` runs the whole tower: `tokens(ids)` (no positions), `positions(length)`
    and `eot(ids)`. Holds only those two embeddings, not the tower they came from.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        text = _text_tower(model)
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.cast_dtype = text.transformer.get_cast_dtype()
        self.pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self.eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))

    def eot(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of the pooled (EOT) token of each prompt (M,)."""
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    def tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (M, L, Dt) without positions, on the embedding's device."""
        return self.token_embedding(token_ids.to(self.positional_embedding.device)).to(self.cast_dtype)

    def positions(self, length: int) -> torch.Tensor:
        """Positional embeddings of the first `length` positions (length, Dt)."""
        return self.positional_embedding[:length].to(self.cast_dtype)


class DeepText(nn.Module):
    """Text blocks [omega, N), ln_final, EOT pooling and text_projection."""

    def __init__(self, model: nn.Module, omega: int):
        super().__init__()
        text = _text_tower(model)
        self.resblocks = nn.ModuleList(list(text.transformer.resblocks)[omega:])
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask.clone(), persistent=False)
        self.omega = omega

    def forward(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        x = tokens  # (M, Lt, Dt)
        length = x.shape[1]
        mask = self.attn_mask[:length, :length].to(x.dtype)
        for block in self.resblocks:
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (M, Dt)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection  # (M, E)


class DeepCLIP(nn.Module):
    """The trainable part of a split CLIP: deep image and text halves and the frozen logit scale.

    Parameter groups (`layer_groups`) drive both what is trainable and the per-tower learning
    rates. Keys map one-to-one to open_clip's state dict (`deep_state_dict`).
    """

    def __init__(self, model: nn.Module, omega: int):
        super().__init__()
        check_omega(model, omega)
        self.omega = omega
        self.vision = DeepVision(model.visual, omega)
        self.text = DeepText(model, omega)
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone(), persistent=False)
        self._prefix = {
            "vision.resblocks.": "visual.transformer.resblocks.",
            "vision.ln_post.": "visual.ln_post.",
            "vision.proj": "visual.proj",
        }
        text_prefix = "text." if hasattr(model, "text") else ""
        self._prefix.update({
            "text.resblocks.": f"{text_prefix}transformer.resblocks.",
            "text.ln_final.": f"{text_prefix}ln_final.",
            "text.text_projection": f"{text_prefix}text_projection",
        })

    def layer_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters, grouped by tower: {"vision": [...], "text": [...]}."""
        return {"vision": list(self.vision.parameters()), "text": list(self.text.parameters())}

    def openclip_key(self, name: str) -> str:
        """Map a parameter name of this module to the open_clip state-dict key it came from."""
        for ours, theirs in self._prefix.items():
            if name.startswith(ours):
                rest = name[len(ours):]
                if ours.endswith("resblocks."):
                    index, _, tail = rest.partition(".")
                    return f"{theirs}{int(index) + self.omega}.{tail}"
                return theirs + rest
        raise KeyError(name)

    def saved_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters a run trains and saves, by name in this module (all of them here)."""
        return dict(self.named_parameters())

    def deep_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights under open_clip's keys (what a run saves and export merges)."""
        return {self.openclip_key(n): p.detach().cpu().contiguous() for n, p in self.saved_parameters().items()}

    def load_deep_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by `deep_state_dict`, checking every key and shape first."""
        own = self.saved_parameters()
        by_key = {self.openclip_key(n): n for n in own}
        missing = sorted(set(by_key) - set(state))
        unexpected = sorted(set(state) - set(by_key))
        if missing or unexpected:
            raise ModelError(f"tuned weights do not match the model at omega={self.omega}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, name in by_key.items():
            if state[key].shape != own[name].shape:
                raise ModelError(f"tuned weight {key} has shape {tuple(state[key].shape)}, model expects {tuple(own[name].shape)}")
        with torch.no_grad():
            for key, name in by_key.items():
                own[name].copy_(state[key])

    def encode_image(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.vision(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, eot: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.text(tokens, eot)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_classes(self, text: dict, class_ids: torch.Tensor) -> torch.Tensor:
        """Normalized features (K, E) of the classes `class_ids` from a store's text (`read_text()`):
        their cached tokens through the deep text half. Every trained model has this method; eval
        calls it, so a method whose class features come from elsewhere (learned prompts, frozen
        prototypes) is evaluated the same way."""
        device = self.logit_scale.device
        ids = torch.as_tensor(class_ids)
        return self.encode_text(text["tokens"][ids].to(device), text["eot"][ids].to(device))


class ShallowCLIP(nn.Module):
    """The frozen part: what the cache stage runs once."""

    def __init__(self, model: nn.Module, omega: int):
        super().__init__()
        check_omega(model, omega)
        self.vision = ShallowVision(model.visual, omega)
        self.text = ShallowText(model, omega)


def split_model(model: nn.Module, omega: int, *, keep_shallow: bool = True) -> tuple[ShallowCLIP | None, DeepCLIP]:
    """Split `model` at omega; freeze everything, then make the deep part trainable.

    With `keep_shallow=False` the shallow blocks and embeddings are deleted from `model` (set to
    empty / None) so the tune stage holds no shallow weights.
    """
    check_omega(model, omega)
    for p in model.parameters():
        p.requires_grad_(False)
    deep = DeepCLIP(model, omega)
    for p in deep.parameters():
        p.requires_grad_(True)
    if keep_shallow:
        return ShallowCLIP(model, omega), deep
    drop_shallow(model)
    return None, deep


def drop_shallow(model: nn.Module, *, text: bool = True) -> None:
    """Free the frozen embeddings and blocks [0, omega) of both towers (the deep part keeps its own
    references); with text=False only the image tower's (a method that runs the whole text tower)."""
    visual = model.visual
    visual.transformer.resblocks = nn.ModuleList()
    visual.conv1 = None
    if text:
        tower = _text_tower(model)
        tower.transformer.resblocks = nn.ModuleList()
        tower.token_embedding = None


def projection_weights(deep: DeepCLIP) -> list[tuple[str, nn.Module, str, int]]:
    """The linear projections of every deep block of both towers, for low-rank adapters (LoRA):
    (parameter name in `deep`, module holding it, attribute name, fused projections).

    open_clip's attention is one `nn.MultiheadAttention` whose `in_proj_weight` (3·D, D) holds
    the query, key and value projections fused (3); its `out_proj.weight` and the MLP's
    `c_fc.weight` and `c_proj.weight` are one projection each (1).
    """
    out = []
    for tower, blocks in (("vision", deep.vision.resblocks), ("text", deep.text.resblocks)):
        for i, block in enumerate(blocks):
            attn, mlp = block.attn, block.mlp
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                raise ModelError(f"{tower} block {i}: attention is {type(attn).__name__}, not open_clip's fused "
                                 "nn.MultiheadAttention; LoRA needs it")
            prefix = f"{tower}.resblocks.{i}"
            out += [(f"{prefix}.attn.in_proj_weight", attn, "in_proj_weight", 3),
                    (f"{prefix}.attn.out_proj.weight", attn.out_proj, "weight", 1),
                    (f"{prefix}.mlp.c_fc.weight", mlp.c_fc, "weight", 1),
                    (f"{prefix}.mlp.c_proj.weight", mlp.c_proj, "weight", 1)]
    return out
