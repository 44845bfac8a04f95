"""CoOp (Zhou et al., IJCV 2022): learnable prompt context, every weight of CLIP frozen.

Each class prompt is `[SOT] v_1 ... v_n {classname} . [EOT]`: n learned context vectors (shared by
all classes, the "unified context" of CoOp, class token at the end) in place of the template's
words. They are initialised as CoOp does: random normal with std 0.02 (n = 16 by default), or
from the token embeddings of a phrase (`ctx_init = "a photo of a"`: n = its 4 tokens). Every
step runs the whole text tower, from token embeddings, on every training class's prompt and
back-propagates through it to the context; the image side is frozen.

In this harness the image side comes from the store: the frozen blocks omega+1..N run on the
cached tokens without gradients. A store cached at omega = N (every block frozen) leaves only
ln_post and proj, which is the cheap form; any omega works. The prompts are cut after the
longest prompt's EOT (exact under the causal mask, as for the cached text).

CoOp as published (the paper's Table 5 row) runs the image encoder every step and the text
tower on the whole 77-token context: a store at omega 0 and `full_context = true`. The
benchmark measures both forms.

Options (`TuneConfig.method_options`): `n_ctx` (None: 16, or as many as the model's context
length leaves room for next to the longest class name), `ctx_init` (None: random),
`full_context` (false: prompts cut after the longest EOT; true: the whole context).

What a run saves: `coop.ctx` (n, width). Eval builds each class's prompt from the store's class
names; export writes the (unchanged) open_clip checkpoint and, beside it, the context and the
class features of the store's classes (`Head.extras`); predict classifies with the learned prompts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skipcache.baselines.base import Head, Method, check_int
from skipcache.errors import ConfigError, ModelError
from skipcache.loading import load_store_model, tokenizer_for
from skipcache.model import DeepText, DeepVision, TextEmbeddings, drop_shallow
from skipcache.step import cross_entropy_step

DEFAULT_N_CTX = 16
CTX_STD = 0.02
CTX_KEY = "coop.ctx"
PLACEHOLDER = "X"


class LearnedPrompts(nn.Module):
    """The text side of CoOp: the context vectors and the frozen text tower they go through."""

    def __init__(self, model: nn.Module, tokenizer: Callable, ctx: torch.Tensor, prefix: str, *, full_context: bool = False):
        super().__init__()
        self.full_context = full_context
        self.embeddings = TextEmbeddings(model)
        self.text = DeepText(model, 0)
        for p in self.parameters():
            p.requires_grad_(False)
        self.ctx = nn.Parameter(ctx.clone())  # (n, width)
        self.tokenizer, self.prefix = tokenizer, prefix

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @torch.no_grad()
    def prompts(self, classnames: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen embeddings (K, L, width) with positions of `{prefix} {name}.` and their EOT
        positions (K,), on the device; L = max EOT + 1 (`full_context`: the model's whole context,
        77 tokens for CLIP, as CoOp's code runs it; the features are the same under the causal mask)."""
        ids = self.tokenizer([f"{self.prefix} {name}." for name in classnames])
        eot = self.embeddings.eot(ids)
        if int(eot.min()) <= self.n_ctx + 1:
            raise ModelError(f"CoOp prompts are cut short: {self.n_ctx} context vectors leave no room for the class name "
                             f"in this model's {ids.shape[1]}-token context")
        length = ids.shape[1] if self.full_context else int(eot.max()) + 1
        x = self.embeddings.tokens(ids[:, :length]) + self.embeddings.positions(length)
        return x, eot.to(x.device)

    def encode_prompts(self, embedded: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Normalized text features (K, E): the context put in positions 1..n of `prompts(...)`."""
        n = self.n_ctx
        ctx = self.ctx.to(embedded.dtype) + self.embeddings.positions(n + 1)[1:]  # (n, width)
        x = torch.cat([embedded[:, :1], ctx.unsqueeze(0).expand(len(embedded), -1, -1), embedded[:, 1 + n:]], dim=1)
        return F.normalize(self.text(x, eot), dim=-1)

    def encode_names(self, classnames: list[str]) -> torch.Tensor:
        return self.encode_prompts(*self.prompts(classnames))


def context_fit(tokenizer: Callable, embeddings: TextEmbeddings, classnames: list[str]) -> int:
    """How many context tokens fit next to the longest `{name}.` in the model's context."""
    ids = tokenizer([f"{name}." for name in classnames])
    longest = int(embeddings.eot(ids).max()) - 1  # tokens between SOT and EOT
    return ids.shape[1] - 2 - longest


def initial_context(model: nn.Module, tokenizer: Callable, options: dict, classnames: list[str]) -> tuple[torch.Tensor, str]:
    """(context (n, width), prompt prefix) as CoOp initialises them."""
    embeddings = TextEmbeddings(model)
    room = context_fit(tokenizer, embeddings, classnames)
    if options.get("ctx_init"):
        phrase = " ".join(str(options["ctx_init"]).replace("_", " ").split())
        ids = tokenizer([phrase])
        n = int(embeddings.eot(ids)[0]) - 1
        if options.get("n_ctx") not in (None, n):
            raise ConfigError(f"method_options.ctx_init {phrase!r} is {n} tokens; n_ctx must be unset or {n}, got {options['n_ctx']}")
        if n > room:
            raise ConfigError(f"method_options.ctx_init {phrase!r} ({n} tokens) does not fit next to the longest class name "
                              f"in this model's {ids.shape[1]}-token context (room for {room})")
        with torch.no_grad():
            ctx = embeddings.tokens(ids[0, 1:1 + n]).detach().float().cpu()
        return ctx, phrase
    n = options.get("n_ctx")
    if n is None:
        n = min(DEFAULT_N_CTX, room)
        if n < 1:
            raise ConfigError(f"no room for CoOp's context: the longest class name fills this model's {ids_len(tokenizer)}-token context")
    elif n > room:
        raise ConfigError(f"method_options.n_ctx {n} does not fit next to the longest class name in this model's "
                          f"{ids_len(tokenizer)}-token context (room for {room}); pass n_ctx <= {room}")
    width = embeddings.positional_embedding.shape[-1]
    ctx = torch.empty(n, width)
    nn.init.normal_(ctx, std=CTX_STD)
    return ctx, " ".join([PLACEHOLDER] * n)


def ids_len(tokenizer: Callable) -> int:
    return int(tokenizer(["x"]).shape[1])


class CoOpModel(nn.Module):
    """Frozen image side at the store's omega, learned prompts on the whole frozen text tower."""

    def __init__(self, model: nn.Module, omega: int, prompts: LearnedPrompts):
        super().__init__()
        self.omega = omega
        self.vision = DeepVision(model.visual, omega)
        for p in self.vision.parameters():
            p.requires_grad_(False)
        self.prompts = prompts
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone(), persistent=False)

    def layer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"text": [self.prompts.ctx]}

    def deep_state_dict(self) -> dict[str, torch.Tensor]:
        return {CTX_KEY: self.prompts.ctx.detach().cpu().contiguous()}

    def load_deep_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_context(self.prompts, state)

    def encode_image(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with torch.no_grad():
            f = self.vision(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_classes(self, text: dict, class_ids: torch.Tensor) -> torch.Tensor:
        return self.prompts.encode_names([text["classnames"][int(i)] for i in class_ids])


def load_context(prompts: LearnedPrompts, state: dict[str, torch.Tensor]) -> None:
    if set(state) != {CTX_KEY}:
        raise ModelError(f"CoOp weights hold {sorted(state)[:3]}, expected only {CTX_KEY}")
    if state[CTX_KEY].shape != prompts.ctx.shape:
        raise ModelError(f"CoOp context has shape {tuple(state[CTX_KEY].shape)}, the model expects {tuple(prompts.ctx.shape)}")
    with torch.no_grad():
        prompts.ctx.copy_(state[CTX_KEY])


class CoOpStep:
    """One CoOp step: frozen image features, every training class's learned prompt through the
    whole text tower, cross-entropy, SGD on the context."""

    def __init__(self, model: CoOpModel, classnames: list[str], *, optimizer: torch.optim.Optimizer, placement):
        self.model, self.optimizer, self.placement = model, optimizer, placement
        self.embedded, self.eot = model.prompts.prompts(classnames)  # frozen prompt embeddings, once

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embedded": self.embedded, "eot": self.eot}

    def classes_per_step(self) -> float:
        return float(len(self.eot))

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        with self.placement.autocast():
            image = model.encode_image(batch["vision"].float())  # (B, E), no grad
            text = model.prompts.encode_prompts(self.embedded, self.eot)  # (M, E), grad to the context
            logits = (model.logit_scale * image @ text.T).float()
        return cross_entropy_step(self.optimizer, logits, batch["labels"])


class CoOpHead(Head):
    """Predict and export with the learned prompts on a whole open_clip model."""

    def __init__(self, ctx: torch.Tensor, prefix: str):
        self.ctx, self.prefix = ctx, prefix

    def _prompts(self, model: nn.Module, tokenizer: Callable) -> LearnedPrompts:
        device = next(model.parameters()).device
        return LearnedPrompts(model, tokenizer, self.ctx.to(device), self.prefix).to(device)

    def text_features(self, model, tokenizer, classnames, template):
        return self._prompts(model, tokenizer).encode_names(classnames)

    def extras(self, model, tokenizer, classnames, template):
        with torch.no_grad():
            features = self.text_features(model, tokenizer, classnames, template)
        return {CTX_KEY: self.ctx.detach().cpu().contiguous(), "coop.class_features": features.detach().cpu().contiguous()}

    def extras_metadata(self):
        return {"method": "coop", "prompt": f"{self.prefix} {{}}.", "context_positions": f"1..{self.ctx.shape[0]}"}


class CoOp(Method):
    name = "coop"
    exports_extras = True
    title = "CoOp"
    summary = "16 learned context vectors, whole text tower every step, frozen image side (store at omega = N)"
    defaults = {"n_ctx": None, "ctx_init": None, "full_context": False}

    def check_options(self, options):
        check_int("n_ctx", options["n_ctx"], 1, optional=True)
        if options["ctx_init"] is not None and not (isinstance(options["ctx_init"], str) and options["ctx_init"].strip()):
            raise ConfigError(f"method_options.ctx_init must be a phrase such as \"a photo of a\" or unset, got {options['ctx_init']!r}")
        if not isinstance(options["full_context"], bool):
            raise ConfigError(f"method_options.full_context must be true or false, got {options['full_context']!r}")

    def build(self, store, place, pretrained, options):
        lm = load_store_model(store, pretrained)
        omega = store.key["omega"]
        tokenizer = tokenizer_for(lm.name)
        ctx, prefix = initial_context(lm.model, tokenizer, options, store.read_text()["classnames"])
        prompts = LearnedPrompts(lm.model, tokenizer, ctx, prefix, full_context=options["full_context"])
        model = CoOpModel(lm.model, omega, prompts)
        drop_shallow(lm.model, text=False)  # the image tower's frozen front is in the store
        model = place.modules(model)
        return model, {**options, "n_ctx": prompts.n_ctx, "prefix": prefix}

    def resolve_options(self, options):
        options = dict(options or {})
        prefix = options.pop("prefix", None)  # recorded by `build`; a run's record may carry it
        out = super().resolve_options(options)
        return {**out, "prefix": prefix} if prefix is not None else out

    def make_step(self, model, text, skip, *, rank, batch_size, optimizer, placement, generator, fixed_masks=None):
        return CoOpStep(model, text["classnames"], optimizer=optimizer, placement=placement)

    def full_head(self, model, weights, options):
        if set(weights) != {CTX_KEY}:
            raise ModelError(f"CoOp weights hold {sorted(weights)[:3]}, expected only {CTX_KEY}")
        ctx = weights[CTX_KEY]
        prefix = options.get("prefix") or " ".join([PLACEHOLDER] * ctx.shape[0])
        return CoOpHead(ctx.float(), prefix)
