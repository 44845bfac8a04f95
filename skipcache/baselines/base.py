"""What a training method gives the tune stage, eval, export and predict.

A `Method` is chosen by name (`skipcache tune --method NAME`, `TuneConfig.method`). The tune
stage asks it, once, for:

    resolve_options(options)  its settings (`TuneConfig.method_options`), defaults filled in
    resolve_cskip(skip)       the CSkip settings it trains with (FT: off; fast: r = 0.25; ...)
    check_omega(omega, depth) whether a store cached at this omega suits it (ConfigError if not)
    build(store, place, ...)  the model it trains, placed, and its options as resolved on the
                              model (CoOp's context length, for one)
    make_step(model, text, ...)  the step object: a batch dict in, a stats tensor on the device out
                              (`skipcache.step.STAT_NAMES`), as `TuneStep`

Every model `build` returns has the same surface, which is what the run directory, eval and
the stage use: `layer_groups()` (trainable parameters by tower: the optimiser's groups),
`deep_state_dict()` / `load_deep_state_dict()` (what a run saves, checkpoints and reloads),
`omega`, `logit_scale`, `encode_image(cached vision tokens)` and `encode_classes(store text,
class ids)` (normalized features: eval's two calls).

For eval, `eval_model(model)` may simplify the trained model (LoRA merges its factors). For
export and predict, `full_head(model, weights, options)` puts a run's weights into a whole
open_clip model and returns the `Head` that classifies raw images with it (plain CLIP for the
weight-tuning methods; learned prompts for CoOp; the adapter for CLIP-Adapter), plus the
tensors that cannot live in an open_clip checkpoint (`Head.extras`), which export writes next
to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from skipcache.cskip import CSkipConfig
from skipcache.errors import ConfigError


class Head:
    """How a whole open_clip model classifies raw images: CLIP's own encoders, the class
    prompts made from the store's template."""

    def image_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images, normalize=True)

    def text_features(self, model: nn.Module, tokenizer: Callable, classnames: list[str], template: str) -> torch.Tensor:
        device = next(model.parameters()).device
        return model.encode_text(tokenizer([template.format(c) for c in classnames]).to(device), normalize=True)

    def extras(self, model: nn.Module, tokenizer: Callable, classnames: list[str], template: str) -> dict[str, torch.Tensor]:
        """Tensors export writes beside the checkpoint (none: the checkpoint is the whole model)."""
        return {}

    def extras_metadata(self) -> dict[str, str]:
        return {}


class Method:
    """A way of training from a store; see the module docstring. Subclasses set `name` (the
    `--method` value), `title` (eval's method name), `summary`, `defaults` (their options)."""

    name = ""
    title = ""
    summary = ""
    defaults: dict = {}
    exports_extras = False  # export writes tensors beside the checkpoint (`Head.extras`)

    # -- settings

    def resolve_options(self, options: dict | None) -> dict:
        """`options` with the defaults filled in; ConfigError naming an unknown or bad one."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            takes = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(f"method_options {', '.join(unknown)} are not settings of method {self.name!r} (it takes: {takes})")
        out = {**self.defaults, **options}
        self.check_options(out)
        return out

    def check_options(self, options: dict) -> None:
        """Raise ConfigError for a bad value (subclasses)."""

    def resolve_cskip(self, skip: CSkipConfig) -> CSkipConfig:
        """The CSkip settings the method trains with. Baselines see every class: CSkip off."""
        return replace(skip, enabled=False)

    def check_omega(self, omega: int, depth: int | None) -> None:
        """ConfigError when a store cached at `omega` (of `depth` blocks per tower; None: unknown)
        does not suit the method."""

    def label(self, omega: int, cskip: bool) -> str:
        """The method's name in eval's table and `eval.json`."""
        return self.title

    # -- the model and its step

    def build(self, store, place, pretrained: str | None, options: dict) -> tuple[nn.Module, dict]:
        """(the model trained or evaluated, placed through `place`; the options as resolved on it)."""
        raise NotImplementedError

    def make_step(self, model: nn.Module, text: dict, skip: CSkipConfig, *, rank: str, batch_size: int,
                  optimizer: torch.optim.Optimizer, placement, generator: torch.Generator | None,
                  fixed_masks: torch.Tensor | None = None) -> Callable[[dict], torch.Tensor]:
        """The step object: `step(batch) -> stats (len(STAT_NAMES),)` on the device.

        `text` holds the train classes' cached `tokens`, `eot`, `prototypes` (on the device) and
        their `classnames`."""
        raise NotImplementedError

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model eval runs (default: as trained)."""
        return model

    def full_head(self, model: nn.Module, weights: dict[str, torch.Tensor], options: dict) -> Head:
        """Put a run's `weights` into the whole open_clip `model` (in place) and return the head
        that classifies raw images with it."""
        raise NotImplementedError


def check_int(name: str, value, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(f"method_options.{name} must be a whole number >= {low}{' or unset' if optional else ''}, got {value!r}")


def check_number(name: str, value, ok: Callable[[float], bool], expected: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and value == value and abs(value) != float("inf") and ok(value)):
        raise ConfigError(f"method_options.{name} must be {expected}, got {value!r}")
