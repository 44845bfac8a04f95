"""The eval stage: accuracy of a tuned run on the cached test splits, next to zero-shot.

Each test split is classified among its own classes (base among base, new among new, as in the
base-to-new protocol). `H` is the harmonic mean of base and new accuracy. Everything runs from
the store: no image is decoded and no shallow layer is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from skipcache.baselines import DEFAULT_METHOD, family_name, get_method
from skipcache.errors import RunError
from skipcache.model import DeepCLIP
from skipcache.rundir import check_compatible, eval_file_name, load_tuned
from skipcache.runtime import resolve_device, write_json_atomic
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
        method: the method that trained the run (`method_name` of its config).
    """

    accuracy: dict[str, float]
    zeroshot: dict[str, float]
    per_class: dict[str, dict[str, float]]
    n: dict[str, int]
    method: str

    def to_json(self) -> dict:
        """`base`, `new`, `H` (and `all`) at the top level, details beside them."""
        out = dict(self.accuracy)
        out.update(zeroshot=self.zeroshot, per_class=self.per_class, n=self.n, method=self.method)
        return out


def method_name(omega: int, cskip: bool) -> str:
    """The method a Skip Tuning run with these settings trains: FT (omega 0, every class), LSkip
    (omega > 0, every class), FT + CSkip (omega 0 with CSkip) or Skip Tuning (omega > 0 with CSkip)."""
    return family_name(omega, cskip)


def run_method(config: dict, info: dict) -> str:
    """The name of the method that trained a finished run: its config.json's `method` (CoOp,
    CLIP-Adapter, LoRA, Skip Tuning (fast)), and for Skip Tuning and its ablations `method_name`
    of `cskip.enabled` and the omega of the store it trained on (run.json's `store_key`)."""
    skip = config.get("cskip", True)
    enabled = skip.get("enabled", True) if isinstance(skip, dict) else bool(skip)
    method = get_method(config.get("method", DEFAULT_METHOD))
    return method.label(int(info["store_key"]["omega"]), enabled)


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def load_run_model(run_dir: Path, device: torch.device, store: FeatureStore | None = None) -> tuple[DeepCLIP, FeatureStore]:
    """The tuned deep model of a run, and the store to evaluate (default: the one it trained on);
    see `skipcache.rundir.load_tuned` for what is checked."""
    tuned = load_tuned(run_dir, device, store)
    return tuned.deep, tuned.store


@torch.no_grad()
def predict_split(deep: DeepCLIP, store: FeatureStore, split: str, device: torch.device, batch_size: int = 256,
                  text: dict | None = None) -> torch.Tensor:
    """Tuned logits (n, M_split) of a cached split, classes in the split's order (`text`: a
    `store.read_text()` already in hand)."""
    text = text or store.read_text()
    classes = torch.as_tensor(store.splits[split].classes)
    text_feats = deep.encode_classes(text, classes)  # (M_split, E): cached tokens, learned prompts or prototypes
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
    targets = [None if path is None else FeatureStore.open(Path(path)) for path in stores]
    # The run's own store is needed only to evaluate on it; other stores just have to be compatible.
    tuned = load_tuned(run_dir, dev, None if None in targets or not targets else targets[0])
    results = []
    for target in targets:
        if target is not None:
            check_compatible(tuned.info, target)
        result = _evaluate(tuned.deep, target or tuned.store, dev, batch_size, run_method(tuned.config, tuned.info))
        name = "eval.json" if target is None else eval_file_name(target)  # one sanitized component: stays in the run
        write_json_atomic(run_dir / name, result.to_json())
        results.append(result)
    return results


def _evaluate(deep: DeepCLIP, store: FeatureStore, dev: torch.device, batch_size: int, method: str) -> EvalResult:
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
    return EvalResult(accuracy=acc, zeroshot=zs, per_class=per_class, n=n, method=method)
