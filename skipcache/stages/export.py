"""Export and predict: a tuned run as a plain open_clip model, and top-k classes for raw images.

Export merges the pretrained weights (shallow layers, embeddings, everything frozen) with the
run's tuned deep weights into one state dict under open_clip's own keys. The file loads with
`open_clip.create_model(name, pretrained=FILE)`; a directory export also writes
`open_clip_config.json`, so `open_clip.create_model("local-dir:DIR")` works without skipcache's
model registry (useful for the built-in `tiny` / `synth-vit` configs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from skipcache.data.base import Example, load_image
from skipcache.errors import DataError, RunError
from skipcache.loading import config_of, load_model, tokenizer_for
from skipcache.placement import Placement
from skipcache.stages.cache import eval_transform
from skipcache.stages.evaluate import read_run
from skipcache.store import FeatureStore


def merged_model(run_dir: Path):
    """The full open_clip model of a run (pretrained + tuned deep weights), with its LoadedModel and store."""
    config, run = read_run(run_dir)
    store = FeatureStore.open(Path(run["store"]))
    key = store.key
    source = config.get("pretrained") or store.attrs.get("pretrained_source") or key["pretrained_label"]
    lm = load_model(key["model"], source, seed=key.get("seed", 0))
    tuned = load_file(str(Path(run_dir) / "deep.safetensors"))
    state = lm.model.state_dict()
    unknown = sorted(set(tuned) - set(state))
    if unknown:
        raise RunError(f"tuned weights of {run_dir} have keys the model lacks: {unknown[:3]}")
    state.update(tuned)
    lm.model.load_state_dict(state, strict=True)
    return lm, store


@dataclass
class ExportResult:
    path: Path
    model: str
    tensors: int
    size_mib: float


def run_export(run_dir: Path, out: Path) -> ExportResult:
    """Write the merged model to `out` (a `.safetensors` file, or a directory for `local-dir:`)."""
    lm, _ = merged_model(Path(run_dir))
    state = {k: v.detach().contiguous().clone() for k, v in lm.model.state_dict().items()}
    out = Path(out)
    if out.suffix in (".safetensors", ".bin", ".pt"):
        out.parent.mkdir(parents=True, exist_ok=True)
        target = out
    else:
        out.mkdir(parents=True, exist_ok=True)
        target = out / "open_clip_model.safetensors"
        cfg = {"model_cfg": config_of(lm.name), "preprocess_cfg": {"mean": list(lm.mean), "std": list(lm.std)}}
        (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    if target.suffix == ".safetensors":
        save_file(state, str(target), metadata={"model": lm.name, "source_run": str(run_dir)})
    else:
        torch.save({"state_dict": state}, target)
    return ExportResult(path=target, model=lm.name, tensors=len(state), size_mib=target.stat().st_size / 2**20)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first


@torch.no_grad()
def run_predict(run_dir: Path, images: list[Path], *, top_k: int = 5, device: str = "auto", batch_size: int = 32) -> list[Prediction]:
    """Top-k classes (over all the store's classes) for raw image files, through the merged model."""
    place = Placement.resolve(device, "fp32")
    dev = place.device
    lm, store = merged_model(Path(run_dir))
    model = place.modules(lm.model).eval()
    text = store.read_text()
    classnames, template = text["classnames"], text["template"]
    token_ids = tokenizer_for(lm.name)([template.format(c) for c in classnames]).to(dev)
    text_feats = model.encode_text(token_ids, normalize=True)  # (M, E)
    transform = eval_transform(lm)
    k = max(1, min(top_k, len(classnames)))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [Path(p) for p in images[start:start + batch_size]]
        for p in chunk:
            if not p.is_file():
                raise DataError(f"image not found: {p}")
        x = torch.stack([transform(load_image(Example(source_id=str(p), label=-1, path=p))) for p in chunk]).to(dev)
        probs = (model.logit_scale.exp() * model.encode_image(x, normalize=True) @ text_feats.T).softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for p, v, i in zip(chunk, values.tolist(), indices.tolist()):
            out.append(Prediction(image=str(p), top=[(classnames[j], round(pv, 6)) for pv, j in zip(v, i)]))
    return out
