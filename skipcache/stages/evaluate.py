"""The eval stage: accuracy of a tuned run on the cached test splits, next to zero-shot.

Each test split is classified among its own classes (base among base, new among new, as in the
base-to-new protocol). `H` is the harmonic mean of base and new accuracy. Everything runs from
the store: no image is decoded and no shallow layer is run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from skipcache.errors import RunError
from skipcache.model import DeepCLIP
from skipcache.runtime import resolve_device, write_json_atomic
from skipcache.stages.tune import load_deep_model
from skipcache.store import FeatureStore

SPLIT_ALIASES = {"test_base": "base", "test_new": "new", "test": "all"}


@dataclass
class EvalResult:
    """Accuracies in percent.

    Attributes:
        accuracy: tuned top-1 per reported split (`base`, `new`, `all`) and `H` when both halves exist.
        zeroshot: the same for the pretrained model (from the logits stored by the cache stage).
        per_class: tuned per-class accuracy per split, keyed by class name.
        n: test images per split.
    """

    accuracy: dict[str, float]
    zeroshot: dict[str, float]
    per_class: dict[str, dict[str, float]]
    n: dict[str, int]

    def to_json(self) -> dict:
        """`base`, `new`, `H` (and `all`) at the top level, details beside them."""
        out = dict(self.accuracy)
        out.update(zeroshot=self.zeroshot, per_class=self.per_class, n=self.n)
        return out


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config.json, run.json) of a finished run; RunError when it is missing or unfinished."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise RunError(f"{run_dir} is not a run directory (no config.json); pass the --out of a `skipcache tune` run")
    if not (run_dir / "run.json").exists() or not (run_dir / "deep.safetensors").exists():
        raise RunError(f"run {run_dir} has not finished (no run.json / deep.safetensors); finish it with `skipcache tune --out {run_dir} --resume`")
    return json.loads((run_dir / "config.json").read_text()), json.loads((run_dir / "run.json").read_text())


def check_compatible(run: dict, store: FeatureStore) -> None:
    """A run can be evaluated on another store (cross-dataset, domain shift) only if that store
    was cached with the same model, weights and omega: the tuned deep layers expect its tokens."""
    trained = run["store_key"]
    for field in ("model", "weights_hash", "omega"):
        if store.key.get(field) != trained.get(field):
            raise RunError(
                f"store {store.path} was cached with {field}={store.key.get(field)!r}, the run trained on "
                f"{field}={trained.get(field)!r}; cache the target with the run's model, weights and --omega")


def load_run_model(run_dir: Path, device: torch.device, store: FeatureStore | None = None) -> tuple[DeepCLIP, FeatureStore]:
    """The tuned deep model of a run, and the store to evaluate (default: the one it trained on)."""
    config, run = read_run(run_dir)
    if store is None:
        store = FeatureStore.open(Path(run["store"]))
        if store.key_hash != run["store_key_hash"]:
            raise RunError(f"store {store.path} is not the one run {run_dir} trained on; rebuild it with the same `skipcache cache` arguments")
    else:
        check_compatible(run, store)
    deep = load_deep_model(store, device, config.get("pretrained"))
    deep.load_deep_state_dict(load_file(str(Path(run_dir) / "deep.safetensors")))
    return deep.eval(), store


@torch.no_grad()
def predict_split(deep: DeepCLIP, store: FeatureStore, split: str, device: torch.device, batch_size: int = 256,
                  text: dict | None = None) -> torch.Tensor:
    """Tuned logits (n, M_split) of a cached split, classes in the split's order (`text`: a
    `store.read_text()` already in hand)."""
    text = text or store.read_text()
    classes = torch.as_tensor(store.splits[split].classes)
    text_feats = deep.encode_text(text["tokens"][classes].to(device), text["eot"][classes].to(device))  # (M_split, E)
    logits = []
    for batch in store.iter_batches(split, batch_size, shuffle=False, view=0):
        image = deep.encode_image(batch["vision"].to(device))  # (B, E)
        logits.append((deep.logit_scale * image @ text_feats.T).float().cpu())
    return torch.cat(logits)


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100.0 * (pred == labels).sum().item() / len(labels), 4) if len(labels) else 0.0


def _per_class(pred: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    out = {}
    for i, name in enumerate(names):
        sel = labels == i
        if sel.any():
            out[name] = round(_accuracy(pred[sel], labels[sel]), 2)
    return out


def run_eval(run_dir: Path, *, store: Path | None = None, device: str = "auto", batch_size: int = 256) -> EvalResult:
    """Evaluate a finished run on every test split of its store, or of another compatible `store`
    (same model, weights and omega: a cross-dataset or shifted-domain target). Writes `eval.json`
    in the run (`eval-<dataset>-<keyhash>.json` for another store)."""
    return evaluate_stores(run_dir, [store], device=device, batch_size=batch_size)[0]


def evaluate_stores(run_dir: Path, stores: list[Path | None], *, device: str = "auto", batch_size: int = 256) -> list[EvalResult]:
    """`run_eval` on several stores (None: the run's own), loading the tuned model once."""
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    deep, own = load_run_model(run_dir, dev)
    _, run = read_run(run_dir)
    results = []
    for path in stores:
        target = None if path is None else FeatureStore.open(Path(path))
        if target is not None:
            check_compatible(run, target)
        result = _evaluate(deep, target or own, dev, batch_size)
        name = "eval.json" if target is None else f"eval-{target.key['dataset']}-{target.key_hash}.json"
        write_json_atomic(run_dir / name, result.to_json())
        results.append(result)
    return results


def _evaluate(deep: DeepCLIP, store: FeatureStore, dev: torch.device, batch_size: int) -> EvalResult:
    text = store.read_text()
    classnames = text["classnames"]
    acc, zs, per_class, n = {}, {}, {}, {}
    for split, alias in SPLIT_ALIASES.items():
        if split not in store.splits:
            continue
        data = store.read_split(split, include_vision=False)
        labels = data["labels"]
        logits = predict_split(deep, store, split, dev, batch_size, text=text)
        names = [classnames[c] for c in store.splits[split].classes]
        acc[alias] = _accuracy(logits.argmax(1), labels)
        zs[alias] = _accuracy(data["zeroshot_logits"].argmax(1), labels)
        per_class[alias] = _per_class(logits.argmax(1), labels, names)
        n[alias] = len(labels)
    if not acc:
        raise RunError(f"store {store.path} has no test split to evaluate")
    for d in (acc, zs):
        if "base" in d and "new" in d:
            d["H"] = round(harmonic_mean(d["base"], d["new"]), 4)
    return EvalResult(accuracy=acc, zeroshot=zs, per_class=per_class, n=n)
