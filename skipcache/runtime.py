"""Small shared helpers: devices, default locations, versions, atomic files, seeding.

Nothing here knows about models, stores or datasets.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from skipcache.errors import ConfigError

STORE_ENV = "SKIPCACHE_STORE"
DATA_ENV = "SKIPCACHE_DATA"


def default_store_root() -> Path:
    """`$SKIPCACHE_STORE`, else `store/` in the current directory."""
    return Path(os.environ.get(STORE_ENV, "store"))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cpu`, `cuda`, `cuda:N` are taken as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine cached values and training."""
    out = {}
    for dist in ("skipcache", "torch", "open_clip_torch", "zarr", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader sees either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
