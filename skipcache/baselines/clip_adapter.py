"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the frozen image feature.

    A(f) = ReLU(W2 · ReLU(W1 · f)),   W1: (E/4, E), W2: (E, E/4), no biases
    f'   = ratio · A(f) + (1 − ratio) · f        (ratio = 0.2)

The image feature f is CLIP's (before normalisation); the class features are the frozen
zero-shot prototypes of the store (`text/prototypes`: the template prompts through the
pretrained text tower), so a step runs no text tower at all. Only W1 and W2 train.

In this harness f comes from the store: the frozen blocks omega+1..N, ln_post and proj run on
the cached tokens without gradients; a store cached at omega = N (every block frozen: only
ln_post and proj remain) is the cheap, cached form of the method. Any omega works.

Options: `ratio` (0.2), `reduction` (4: hidden width E / 4).

What a run saves: `clip_adapter.fc1.weight` (E/r, E) and `clip_adapter.fc2.weight` (E, E/r).
The adapter is not part of open_clip's model, so export writes the (unchanged) open_clip
checkpoint and the adapter's two matrices beside it (with the ratio in its metadata); predict
applies the adapter to `encode_image`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skipcache.baselines.base import Head, Method, check_int, check_number
from skipcache.errors import ModelError
from skipcache.loading import load_deep_model
from skipcache.step import cross_entropy_step

PREFIX = "clip_adapter."


class Adapter(nn.Module):
    """ReLU(fc2(ReLU(fc1(f)))) mixed with f at `ratio`."""

    def __init__(self, dim: int, hidden: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.ratio = ratio

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.fc2(F.relu(self.fc1(f))))
        return self.ratio * a + (1 - self.ratio) * f

    def state(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        own = {PREFIX + k: v for k, v in self.state_dict().items()}
        if set(state) != set(own):
            raise ModelError(f"CLIP-Adapter weights hold {sorted(state)[:3]}, expected {sorted(own)}")
        for k, v in own.items():
            if state[k].shape != v.shape:
                raise ModelError(f"CLIP-Adapter weight {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
        self.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()})


class AdapterModel(nn.Module):
    """The frozen image side at the store's omega, then the adapter; class features are the
    store's frozen prototypes."""

    def __init__(self, vision: nn.Module, logit_scale: torch.Tensor, omega: int, embed_dim: int, options: dict):
        super().__init__()
        self.omega = omega
        self.vision = vision
        for p in self.vision.parameters():
            p.requires_grad_(False)
        self.adapter = Adapter(embed_dim, max(1, embed_dim // options["reduction"]), options["ratio"])
        self.register_buffer("logit_scale", logit_scale.detach().clone(), persistent=False)

    def layer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"vision": list(self.adapter.parameters())}

    def deep_state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapter.state()

    def load_deep_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load(state)

    def encode_image(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with torch.no_grad():
            f = self.vision(tokens)  # (B, E), frozen
        f = self.adapter(f)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_classes(self, text: dict, class_ids: torch.Tensor) -> torch.Tensor:
        return text["prototypes"][torch.as_tensor(class_ids)].to(self.logit_scale.device).float()


class AdapterStep:
    """One CLIP-Adapter step: frozen image feature, adapter, against the frozen prototypes."""

    def __init__(self, model: AdapterModel, prototypes: torch.Tensor, *, optimizer: torch.optim.Optimizer, placement):
        self.model, self.prototypes, self.optimizer, self.placement = model, prototypes.float(), optimizer, placement

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes}

    def classes_per_step(self) -> float:
        return float(len(self.prototypes))

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        with self.placement.autocast():
            image = model.encode_image(batch["vision"].float())  # (B, E)
            logits = (model.logit_scale * image @ self.prototypes.T).float()  # (B, M)
        return cross_entropy_step(self.optimizer, logits, batch["labels"])


class AdapterHead(Head):
    """Predict and export: the adapter on a whole open_clip model's image feature."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def image_features(self, model, images):
        adapter = self.adapter.to(next(model.parameters()).device)
        return F.normalize(adapter(model.encode_image(images, normalize=False)), dim=-1)

    def extras(self, model, tokenizer, classnames, template):
        return self.adapter.state()

    def extras_metadata(self):
        return {"method": "clip-adapter", "ratio": str(self.adapter.ratio),
                "formula": "f' = ratio * relu(fc2(relu(fc1(f)))) + (1 - ratio) * f, f = encode_image(x, normalize=False)"}


class CLIPAdapter(Method):
    name = "clip-adapter"
    exports_extras = True
    title = "CLIP-Adapter"
    summary = "residual MLP (E -> E/4 -> E, ratio 0.2) on the frozen image feature, zero-shot prototypes (store at omega = N)"
    defaults = {"ratio": 0.2, "reduction": 4}

    def check_options(self, options):
        check_number("ratio", options["ratio"], lambda v: 0 <= v <= 1, "in [0, 1]")
        check_int("reduction", options["reduction"], 1)

    def build(self, store, place, pretrained, options):
        deep = load_deep_model(store, place, pretrained)
        embed_dim = int(store.read_text()["prototypes"].shape[1])
        model = AdapterModel(deep.vision, deep.logit_scale, deep.omega, embed_dim, options)  # the deep text half is dropped
        return place.modules(model), dict(options)

    def make_step(self, model, text, skip, *, rank, batch_size, optimizer, placement, generator, fixed_masks=None):
        return AdapterStep(model, text["prototypes"], optimizer=optimizer, placement=placement)

    def full_head(self, model, weights, options):
        fc1 = weights.get(PREFIX + "fc1.weight")
        if fc1 is None:
            raise ModelError(f"CLIP-Adapter weights hold {sorted(weights)[:3]}, expected {PREFIX}fc1.weight and fc2.weight")
        adapter = Adapter(fc1.shape[1], fc1.shape[0], options.get("ratio", self.defaults["ratio"]))
        adapter.load(weights)
        return AdapterHead(adapter.eval())
