"""Loading open_clip models and weights, with errors that say what to do.

Names: open_clip's model names, the built-in configs in `model_configs/` (`tiny`, `synth-vit`)
and `local-dir:DIR`. Weights: `none` (seeded random init), open_clip pretrained tags (`openai`,
...; downloaded on first use), a local weights file, and the built-in tag `synth`. Offline, a
download fails in seconds with a message that says how to pass a local file instead.

The weights of a store: `store_weights_source` picks what to load for a store from its metadata
(or from a run), trusting a source only when it reproduces the store's weights hash
(`trusted_weights_source`), and `load_deep_model` loads them and keeps the deep part: what
tune, eval and export train or run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from skipcache.errors import ModelError, StoreError
from skipcache.model import DeepCLIP, split_model
from skipcache.placement import Placement

if TYPE_CHECKING:
    from skipcache.store import FeatureStore

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Built-in pretrained tags: tag -> {model name: file in WEIGHTS_DIR}.
BUILTIN_WEIGHTS = {"synth": {"synth-vit": "synth-vit.safetensors"}}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _register_builtin_configs() -> None:
    """Make sure open_clip knows `tiny` and `synth-vit` (`import skipcache` already arranges it)."""
    from skipcache import register_model_configs

    register_model_configs()



# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """An open_clip model with what the store key and the preprocessing need to know about it.

    Attributes:
        model: the full open_clip model, eval mode, fp32.
        name: open_clip model name.
        pretrained: what the user passed (`openai`, `none`, `synth`, a path).
        pretrained_label: short label for paths (`openai`, `none`, `synth`, file stem).
        weights_hash: sha256 prefix of the weights (file bytes or state dict), or `random-seed<N>`.
        image_size: input resolution.
        mean, std: normalization of the model's preprocessing.
    """

    model: nn.Module
    name: str
    pretrained: str
    pretrained_label: str
    weights_hash: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def list_models() -> list[str]:
    """All model names open_clip knows, the built-in `tiny` and `synth-vit` included."""
    import open_clip

    _register_builtin_configs()
    return sorted(open_clip.list_models())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_model(name: str, pretrained: str = "none", *, seed: int = 0) -> LoadedModel:
    """Build an open_clip model and load its weights, failing with a message that says what to do.

    Args:
        name: open_clip model name (`ViT-B-16`, `tiny`, `synth-vit`) or `local-dir:DIR`
            (an open_clip folder with `open_clip_config.json` and weights).
        pretrained: `none` (random init, seeded), a built-in tag (`synth`), an open_clip
            pretrained tag (`openai`, `laion2b_s34b_b88k`, ...; needs network on first use) or a
            local weights file (`.safetensors`, `.bin`, `.pt`).
        seed: seed of the random init when `pretrained` is `none`.

    Raises:
        ModelError: unknown model, weights missing or not downloadable, incompatible weights.
    """
    import open_clip

    _register_builtin_configs()
    is_local_dir = name.startswith("local-dir:")
    if not is_local_dir and name not in open_clip.list_models():
        raise ModelError(f"unknown model {name!r}; run `skipcache models` to list them, or pass local-dir:DIR")
    label, weights_hash, state_dict = pretrained, None, None
    create_kwargs: dict = {}
    if is_local_dir:
        label, weights_hash = "local", _file_sha256_dir(Path(name[len("local-dir:"):]))
    elif pretrained in ("none", "", None):
        label, weights_hash = "none", f"random-seed{seed}"
    elif pretrained in BUILTIN_WEIGHTS:
        files = BUILTIN_WEIGHTS[pretrained]
        if name not in files:
            raise ModelError(f"built-in weights {pretrained!r} exist only for {sorted(files)}; pass --model {next(iter(files))}")
        path = WEIGHTS_DIR / files[name]
        if not path.exists():
            raise ModelError(f"built-in weights file {path.name} is missing from the package; reinstall skipcache or run `make tiny-clip`")
        from skipcache.synthworld.weights import load_synth_state_dict

        state_dict, weights_hash = load_synth_state_dict(path), _file_sha256(path)
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        label, weights_hash = path.stem, _file_sha256(path)
        create_kwargs["pretrained"] = str(path)
    elif any(c in pretrained for c in "/\\") or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise ModelError(f"weights file not found: {pretrained}; check the path")
    else:
        known = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in known:
            raise ModelError(f"no pretrained weights {pretrained!r} for {name}; known tags: {', '.join(known) or 'none'}; or pass a local file")
        label, weights_hash = pretrained, f"open_clip:{name}:{pretrained}"
        create_kwargs["pretrained"] = pretrained
    if "pretrained" in create_kwargs and not Path(str(create_kwargs["pretrained"])).exists() and not _hub_reachable():
        # No network: let huggingface_hub look in its local cache only, instead of retrying for minutes.
        create_kwargs["_offline"] = True
    offline = create_kwargs.pop("_offline", False)
    torch.manual_seed(seed)
    root_logger = logging.getLogger()
    level = root_logger.level
    if "pretrained" not in create_kwargs:  # open_clip warns that a random init is random; we know
        root_logger.setLevel(logging.ERROR)
    try:
        with _hub_offline(offline):
            model = open_clip.create_model(name, **create_kwargs)
    except (RuntimeError, OSError, ValueError) as exc:  # download failures, bad files
        if create_kwargs.get("pretrained") and not Path(str(create_kwargs["pretrained"])).exists():
            raise ModelError(
                f"cannot download pretrained weights {pretrained!r} for {name} (offline?): download the checkpoint on a "
                f"machine with network (open_clip.create_model({name!r}, pretrained={pretrained!r}) caches it), then pass "
                f"--pretrained /path/to/open_clip_model.safetensors; or try the built-in --model synth-vit --pretrained synth"
            ) from None
        raise ModelError(f"cannot load weights {pretrained!r} into {name}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        root_logger.setLevel(level)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ModelError(f"weights {pretrained!r} do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return LoadedModel(model, name, str(pretrained), label.replace("/", "_"), weights_hash, int(size), mean, std)


def _hub_reachable(host: str = "huggingface.co", port: int = 443, timeout_s: float = 3.0) -> bool:
    """Whether the weights hub answers a TCP connect within `timeout_s` (False offline)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Put huggingface_hub in offline mode (cache only) for the duration, when `enabled`."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hub

    before, env_before = hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env_before


def _file_sha256_dir(path: Path) -> str:
    if not path.is_dir():
        raise ModelError(f"local-dir not found: {path}; pass local-dir:DIR with open_clip_config.json and weights")
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + _file_sha256(f).encode())
    return h.hexdigest()[:16]


def tokenizer_for(name: str):
    """The open_clip tokenizer of `name` (context length from its config)."""
    import open_clip

    _register_builtin_configs()
    return open_clip.get_tokenizer(name)




def config_of(name: str) -> dict:
    """The open_clip config dict of a model name (for model cards and keys)."""
    import open_clip

    _register_builtin_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelError(f"unknown model {name!r}; run `skipcache models`")
    return json.loads(json.dumps(cfg))


# ------------------------------------------------------------------------ weights of a store


def trusted_weights_source(source: str, key: dict, *, origin: str,
                           hint: str = "pass the weights it was cached with as --pretrained FILE") -> str:
    """`source` if loading it reproduces the key's `weights_hash` without opening anything else.

    A source read from a store or a run (not typed by the user) is used only when it is `none`
    for a random-init key, a built-in or open_clip tag whose hash is the key's, or an existing
    regular file with a weights suffix whose content hash is the key's. Anything else raises
    StoreError naming the source, before any file is opened.
    """
    want = str(key.get("weights_hash", ""))
    model = str(key.get("model", ""))
    source = str(source)
    if model.startswith("local-dir:"):  # the weights are the folder's; load_model ignores the source
        return source
    if source in ("none", ""):
        if want.startswith("random-seed"):
            return source
    elif source in BUILTIN_WEIGHTS:
        files = BUILTIN_WEIGHTS[source]
        if model in files and (WEIGHTS_DIR / files[model]).is_file() and _file_sha256(WEIGHTS_DIR / files[model]) == want:
            return source
    elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", source) and not source.endswith(WEIGHT_SUFFIXES) \
            and not Path(source).exists():
        if want == f"open_clip:{model}:{source}":
            return source
    else:
        path = Path(source).expanduser()
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and _file_sha256(path) == want:
            return source
    raise StoreError(
        f"{origin} names weights {source!r} that are not the ones it was cached with: not a built-in name or tag, "
        f"nor an existing {'/'.join(WEIGHT_SUFFIXES)} file, with weights hash {want}; {hint}")


def store_weights_source(store: FeatureStore, *first: str | None, hint: str | None = None) -> str:
    """The weights to load for `store`: the first of `first` (sources read from a run), the
    store's `pretrained_source` and its key's `pretrained_label` that passes
    `trusted_weights_source`; the first refusal otherwise."""
    candidates = [c for c in (*first, store.attrs.get("pretrained_source"), store.key.get("pretrained_label")) if c is not None]
    refusal = None
    for source in candidates:
        try:
            return trusted_weights_source(source, store.key, origin=f"store {store.path}",
                                          **({"hint": hint} if hint else {}))
        except StoreError as exc:
            refusal = refusal or exc
    if refusal is None:
        raise StoreError(f"store {store.path} names no weights source; pass the weights it was cached with as --pretrained FILE")
    raise refusal


def load_store_model(store: FeatureStore, pretrained: str | None = None) -> LoadedModel:
    """The store's whole model with its pretrained weights, on the CPU.

    `pretrained` (typed by the user) is loaded as given; otherwise the store's own source, only
    if `store_weights_source` trusts it. Either way the loaded weights must have the hash the
    store was cached with (StoreError otherwise).
    """
    key = store.key
    source = pretrained or store_weights_source(store)  # store metadata: used only if it reproduces weights_hash
    lm = load_model(key["model"], source, seed=key.get("seed", 0))
    if lm.weights_hash != key["weights_hash"]:
        raise StoreError(
            f"weights {source!r} (hash {lm.weights_hash}) are not the ones the store was cached with ({key['weights_hash']}); "
            "pass the original weights with --pretrained, or re-cache")
    return lm


def load_deep_model(store: FeatureStore, device: torch.device | Placement, pretrained: str | None = None) -> DeepCLIP:
    """The deep part of the store's model with its pretrained weights (`load_store_model`); the
    shallow part is freed."""
    lm = load_store_model(store, pretrained)
    _, deep = split_model(lm.model, store.key["omega"], keep_shallow=False)
    place = device if isinstance(device, Placement) else Placement(torch.device(device))
    return place.modules(deep)


def model_depth(name: str) -> int | None:
    """Transformer blocks per tower (the smaller of the two) from the model's config, without
    building it; None when the config does not say."""
    try:
        if name.startswith("local-dir:"):
            cfg = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
        else:
            cfg = config_of(name)
        return min(int(cfg["vision_cfg"]["layers"]), int(cfg["text_cfg"]["layers"]))
    except (ModelError, OSError, KeyError, TypeError, ValueError):
        return None
