"""The dataset registry: names, on-disk layouts and loaders.

Three kinds of entries:

- every synthetic task of `skipcache.synthworld.tasks.TASKS` (rendered in memory; no data root);
- `imagefolder`: the data root is a folder with one subfolder per class, or with `train/`,
  `test/` (and optionally `val/`) folders that each hold one subfolder per class. Without split
  folders, each class is split 50/20/30 into train/val/test by file, seeded (`split_seed`);
- the benchmark datasets of CoOp-based papers in CoOp's layout, each in its folder under the
  data root (`skipcache.data.coop.COOP_LAYOUTS`): ImageNet, ten fine-grained and specialised
  datasets, and four test-only ImageNet variants.

Images are listed, not opened: a file named by a split but missing is reported by `load_image`,
by path, and beforehand by `skipcache check-data NAME`.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skipcache.data.base import Dataset, Example
from skipcache.data.coop import COOP_LAYOUTS, IMAGE_SUFFIXES, SPLIT_NAMES, make_coop_loader, presence
from skipcache.data.templates import get_templates
from skipcache.errors import ConfigError, DataError

DATA_ROOT_ENV = "SKIPCACHE_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry.

    Attributes:
        name: registry name.
        description: one line for `skipcache datasets`.
        needs_root: whether `loader` needs a data root.
        loader: `loader(data_root, **options) -> Dataset`.
    """

    name: str
    description: str
    needs_root: bool
    loader: Callable[..., Dataset]


# ---------------------------------------------------------------------------------------- imagefolder


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stratified_split(files: list[Path], seed: int, class_name: str) -> dict[str, list[Path]]:
    """Split one class's files 50/20/30 (at least one train and, from 2 files, one test image)."""
    n = len(files)
    # Seed per class from its name, so adding a class does not reshuffle the others.
    name_key = int.from_bytes(hashlib.sha256(class_name.encode()).digest()[:4], "little")
    order = np.random.default_rng([seed, name_key]).permutation(n)
    n_train = max(1, round(0.5 * n))
    n_val = round(0.2 * n)
    if n >= 2 and n_train + n_val >= n:
        n_val = max(0, n - n_train - 1)
    picked = [files[i] for i in order]
    return {"train": picked[:n_train], "val": picked[n_train:n_train + n_val], "test": picked[n_train + n_val:]}


def load_imagefolder(data_root: Path, *, split_seed: int = 0) -> Dataset:
    """Load a folder of class subfolders (optionally under `train/`, `val/`, `test/`)."""
    layout_help = "expected <root>/<class>/<image> or <root>/{train,val,test}/<class>/<image>"
    if not data_root.is_dir():
        raise DataError(f"imagefolder root {data_root} is not a folder; {layout_help}")
    top = _class_dirs(data_root)
    top_names = {p.name for p in top}
    split_layout = bool(top_names) and top_names <= set(SPLIT_NAMES)
    if not split_layout and top_names & {"train", "test"}:
        raise DataError(f"imagefolder root {data_root} mixes split folders and class folders "
                        f"({sorted(top_names)}); {layout_help}")
    if split_layout:
        for required in ("train", "test"):
            if required not in top_names:
                raise DataError(f"imagefolder root {data_root} has split folders but no {required}/; {layout_help}")
        per_split = {s: {d.name: _list_images(d) for d in _class_dirs(data_root / s)}
                     for s in SPLIT_NAMES if s in top_names}
        folder_names = sorted({c for classes in per_split.values() for c in classes})
    else:
        if not top:
            raise DataError(f"imagefolder root {data_root} has no class subfolders; {layout_help}")
        folder_names = [d.name for d in top]
        per_split = {s: {} for s in SPLIT_NAMES}
        for d in top:
            files = _list_images(d)
            if not files:
                raise DataError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                "add images or remove the folder")
            for s, chosen in _stratified_split(files, split_seed, d.name).items():
                per_split[s][d.name] = chosen
    if not folder_names:
        raise DataError(f"imagefolder root {data_root} has no class subfolders; {layout_help}")
    classnames = [name.replace("_", " ") for name in folder_names]
    if len(set(classnames)) != len(classnames):
        raise DataError(f"imagefolder root {data_root}: two class folders give the same class name "
                        "once '_' is read as a space; rename one")
    splits: dict[str, list[Example]] = {}
    for s, classes in per_split.items():
        splits[s] = [
            Example(source_id=path.relative_to(data_root).as_posix(), label=label, path=path)
            for label, name in enumerate(folder_names) for path in classes.get(name, [])
        ]
    if not splits["train"]:
        raise DataError(f"imagefolder root {data_root} has no training images; {layout_help}")
    extra = {"root": str(data_root.resolve()), "layout": "split" if split_layout else "flat"}
    if not split_layout:
        extra["split_seed"] = split_seed
    return Dataset("imagefolder", classnames, get_templates("imagefolder"), splits, extra)


# ------------------------------------------------------------------------------------------ registry


def _synthetic_entries() -> dict[str, DatasetInfo]:
    """One entry per synthetic task; none while `skipcache.synthworld` is not installed."""
    try:
        from skipcache.synthworld.tasks import TASKS
    except ModuleNotFoundError as exc:
        if exc.name in ("skipcache.synthworld", "skipcache.synthworld.tasks"):
            return {}
        raise
    items = TASKS.items() if isinstance(TASKS, Mapping) else ((t.name, t) for t in TASKS)
    entries = {}
    for task_name, spec in items:
        def load(data_root: Path | None, _task: str = task_name, **options) -> Dataset:
            from skipcache.data.synthetic import load_synthetic
            _check_options(_task, load_synthetic, options, skip=1)
            return load_synthetic(_task, **options)

        description = getattr(spec, "description", None) or f"synthetic task {task_name!r} (rendered in memory)"
        entries[task_name] = DatasetInfo(task_name, description, False, load)
    return entries


def _file_entries() -> dict[str, DatasetInfo]:
    entries = {"imagefolder": DatasetInfo(
        "imagefolder", "a folder of class subfolders (optionally under train/, val/, test/)", True,
        load_imagefolder)}
    for name, layout in COOP_LAYOUTS.items():
        entries[name] = DatasetInfo(name, layout.describe(), True, make_coop_loader(name))
    return entries


def get_registry() -> dict[str, DatasetInfo]:
    """All registered datasets by name (synthetic tasks first)."""
    return {**_synthetic_entries(), **_file_entries()}


def __getattr__(attr: str):
    # `DATASETS` is built on access, so that synthetic tasks are imported lazily.
    if attr == "DATASETS":
        return get_registry()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def list_datasets() -> list[DatasetInfo]:
    """Registry entries, synthetic tasks first, then file-based datasets."""
    return list(get_registry().values())


def _check_options(name: str, fn: Callable, options: dict, skip: int) -> None:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset {name!r} takes no option {unknown[0]!r}; "
                          f"its options are: {', '.join(accepted) or 'none'}")


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def close_names(name: str, known: list[str]) -> list[str]:
    """Registry names that `name` probably meant: the same letters and digits as a registry name,
    CoOp's name of a dataset (`DescribableTextures`, `FGVCAircraft`) or its folder (`food-101`),
    else the closest spellings."""
    aliases = {_normal(n): n for n in known}
    for layout in COOP_LAYOUTS.values():
        aliases.setdefault(_normal(layout.coop_name), layout.name)
        aliases.setdefault(_normal(layout.folder), layout.name)
    aliases.setdefault("flowers102", "oxford_flowers")
    exact = aliases.get(_normal(name))
    if exact in known:
        return [exact]
    key = _normal(name)
    prefixed = [a for a in aliases if (len(key) >= 3 and a.startswith(key)) or (len(key) >= 4 and key in a)]
    spelled = difflib.get_close_matches(key, list(aliases), n=3, cutoff=0.6)
    return list(dict.fromkeys(aliases[a] for a in [*prefixed, *spelled] if aliases[a] in known))[:3]


def unknown_dataset(name: str, registry: Mapping[str, DatasetInfo] | None = None) -> ConfigError:
    """The error for a name that is not in the registry, with the names it probably meant."""
    known = list(registry if registry is not None else get_registry())
    close = close_names(name, known)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(known)} "
                       "(`skipcache datasets` describes them)")


def dataset_status(name: str, data_root: Path | str | None = None) -> tuple[bool | None, str]:
    """Whether a dataset is found under the data root, from a cheap look (no listing).

    Returns:
        (None, "built in") for procedural datasets; (True, "") when the layout's files are
        there; (False, what is missing) otherwise.
    """
    registry = get_registry()
    if name not in registry:
        raise unknown_dataset(name, registry)
    if not registry[name].needs_root:
        return None, "built in"
    root = resolve_data_root(data_root)
    if root is None:
        return False, "no data root"
    if not root.is_dir():
        return False, f"data root {root} is not a folder"
    if name == "imagefolder":
        return None, "the data root itself"
    return presence(name, root)


def resolve_data_root(data_root: Path | str | None) -> Path | None:
    """The data root from the argument, else from `$SKIPCACHE_DATA`, else None."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(DATA_ROOT_ENV) or None
    return None if data_root is None else Path(data_root).expanduser()


def get_dataset(name: str, data_root: Path | str | None = None, **options) -> Dataset:
    """Load a registered dataset.

    Args:
        name: registry name (see `list_datasets`).
        data_root: folder that holds the dataset; defaults to `$SKIPCACHE_DATA`. Ignored by
            synthetic tasks.
        **options: loader options (`split_seed` for imagefolder; `num_classes`, `seed`,
            `image_size`... for synthetic tasks).

    Raises:
        ConfigError: unknown dataset or option.
        DataError: data root missing, layout or split file wrong.
    """
    registry = get_registry()
    if name not in registry:
        raise unknown_dataset(name, registry)
    info = registry[name]
    if not info.needs_root:
        return info.loader(None, **options)
    _check_options(name, info.loader, options, skip=1)
    root = resolve_data_root(data_root)
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root; pass --data-root DIR or set {DATA_ROOT_ENV}")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass --data-root DIR or set {DATA_ROOT_ENV} "
                        "to the folder that holds the dataset")
    return info.loader(root, **options)
