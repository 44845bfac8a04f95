"""Export and predict: a tuned run as a plain open_clip model, and top-k classes for raw images.

Export merges the pretrained weights (shallow layers, embeddings, everything frozen) with the
run's tuned deep weights into one state dict under open_clip's own keys (LoRA: its updates
merged into the weights). The file loads with `open_clip.create_model(name, pretrained=FILE)`;
a directory export also writes `open_clip_config.json`, so
`open_clip.create_model("local-dir:DIR")` works without skipcache's model registry (useful for
the built-in `tiny` / `synth-vit` configs).

A method whose learned part is not a weight of open_clip's model (CoOp's prompt context,
CLIP-Adapter's adapter) exports the unchanged checkpoint and, beside it, those tensors:
`FILE.<method>.safetensors` (or `DIR/<method>.safetensors`), their use in its metadata. Predict
classifies with them (`skipcache.baselines.Head`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from skipcache.baselines import get_method
from skipcache.data.base import Example, load_image
from skipcache.errors import DataError, RunError
from skipcache.loading import config_of, tokenizer_for
from skipcache.placement import Placement
from skipcache.preprocess import eval_transform
from skipcache.rundir import load_tuned, read_run, run_method_options
from skipcache.runtime import write_text_atomic

EXPORT_SUFFIXES = (".safetensors", ".bin", ".pt")


def merged_model(run_dir: Path):
    """The full open_clip model of a run (pretrained + tuned deep weights) as a LoadedModel, and
    its store; checked and loaded by `skipcache.rundir.load_tuned`."""
    tuned = load_tuned(Path(run_dir), "cpu", full=True)
    return tuned.full, tuned.store


@dataclass
class ExportResult:
    path: Path
    model: str
    tensors: int
    size_mib: float
    extras: Path | None = None  # CoOp's context / CLIP-Adapter's adapter, beside the checkpoint
    method: str = "skip-tuning"


def extras_target(target: Path, method: str) -> Path:
    """Where a method's extra tensors go: `FILE.<method>.safetensors` beside a file export,
    `DIR/<method>.safetensors` in a directory export."""
    if target.name == "open_clip_model.safetensors":
        return target.with_name(f"{method}.safetensors")
    return target.with_name(f"{target.stem}.{method}.safetensors")


def export_target(run_dir: Path, out: Path, *, force: bool = False) -> Path:
    """The weights file an export to `out` writes; RunError, before anything is loaded, when `out`
    cannot be written: an existing file (without `force`), a plain file where a folder is meant,
    or a place inside the run directory."""
    out = Path(out)
    if out.suffix in EXPORT_SUFFIXES:
        if out.is_dir():
            raise RunError(f"--out {out} is a folder; pass a new {'/'.join(EXPORT_SUFFIXES)} file name, or a folder name without that suffix")
        target = out
    else:
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file, not a .safetensors, .bin or .pt name; pass such a name, or a folder")
        target = out / "open_clip_model.safetensors"
    if Path(os.path.realpath(target.parent)) == Path(os.path.realpath(run_dir)):
        raise RunError(f"--out {out} is a file of the run itself or its folder; pass a path outside {run_dir}")
    if target.exists() and not force:
        raise RunError(f"{target} exists; pass --force to overwrite it, or another --out")
    return target


def run_export(run_dir: Path, out: Path, *, force: bool = False) -> ExportResult:
    """Write the merged model to `out` (a `.safetensors` file, or a directory for `local-dir:`);
    an existing file is replaced only with `force`. Files are written whole, then renamed."""
    config, info = read_run(Path(run_dir))  # a finished run? (cheap) then a writable target, before the slow part
    target = export_target(Path(run_dir), Path(out), force=force)
    method, _ = run_method_options(config, info)
    extras_path = extras_target(target, method)
    if get_method(method).exports_extras and extras_path.exists() and not force:
        raise RunError(f"{extras_path} exists; pass --force to overwrite it, or another --out")
    tuned = load_tuned(Path(run_dir), "cpu", full=True)
    lm, head = tuned.full, tuned.head
    text = tuned.store.read_text()
    with torch.no_grad():
        extras = head.extras(lm.model, tokenizer_for(lm.name), text["classnames"], text["template"])
    state = {k: v.detach().contiguous().clone() for k, v in lm.model.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name == "open_clip_model.safetensors" and Path(out).suffix not in EXPORT_SUFFIXES:
        cfg = {"model_cfg": config_of(lm.name), "preprocess_cfg": {"mean": list(lm.mean), "std": list(lm.std)}}
        write_text_atomic(target.parent / "open_clip_config.json", json.dumps(cfg, indent=2))
    tmp = target.with_name(f".{target.name}.tmp")
    if target.suffix == ".safetensors":
        save_file(state, str(tmp), metadata={"model": lm.name, "source_run": str(run_dir)})
    else:
        torch.save({"state_dict": state}, tmp)
    os.replace(tmp, target)
    if extras:
        tmp = extras_path.with_name(f".{extras_path.name}.tmp")
        meta = {**head.extras_metadata(), "classnames": json.dumps(text["classnames"]), "template": text["template"],
                "checkpoint": target.name, "source_run": str(run_dir)}
        save_file(extras, str(tmp), metadata=meta)
        os.replace(tmp, extras_path)
    return ExportResult(path=target, model=lm.name, tensors=len(state), size_mib=target.stat().st_size / 2**20,
                        extras=extras_path if extras else None, method=method)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), best first


@torch.no_grad()
def run_predict(run_dir: Path, images: list[Path], *, top_k: int = 5, device: str = "auto", batch_size: int = 32) -> list[Prediction]:
    """Top-k classes (over all the store's classes) for raw image files, through the merged model."""
    place = Placement.resolve(device, "fp32")
    dev = place.device
    tuned = load_tuned(Path(run_dir), "cpu", full=True)
    lm, store, head = tuned.full, tuned.store, tuned.head
    model = place.modules(lm.model).eval()
    text = store.read_text()
    classnames, template = text["classnames"], text["template"]
    text_feats = head.text_features(model, tokenizer_for(lm.name), classnames, template)  # (M, E)
    transform = eval_transform(lm)
    k = max(1, min(top_k, len(classnames)))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [Path(p) for p in images[start:start + batch_size]]
        for p in chunk:
            if not p.is_file():
                raise DataError(f"image not found: {p}")
        x = torch.stack([transform(load_image(Example(source_id=str(p), label=-1, path=p))) for p in chunk]).to(dev)
        probs = (model.logit_scale.exp() * head.image_features(model, x) @ text_feats.T).softmax(dim=-1)
        values, indices = probs.topk(k, dim=-1)
        for p, v, i in zip(chunk, values.tolist(), indices.tolist()):
            out.append(Prediction(image=str(p), top=[(classnames[j], round(pv, 6)) for pv, j in zip(v, i)]))
    return out
