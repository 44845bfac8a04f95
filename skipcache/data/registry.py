"""The dataset registry: names, on-disk layouts and loaders.

Three kinds of entries:

- every synthetic task of `skipcache.synthworld.tasks.TASKS` (rendered in memory; no data root);
- `imagefolder`: the data root is a folder with one subfolder per class, or with `train/`,
  `test/` (and optionally `val/`) folders that each hold one subfolder per class. Without split
  folders, each class is split 50/20/30 into train/val/test by file, seeded (`split_seed`);
- the CoOp datasets that share one layout, `<data_root>/<folder>/<images>/...` plus
  `<data_root>/<folder>/split_zhou_<Name>.json` with `train`/`val`/`test` lists of
  `[impath relative to <images>, label, classname]` (see `COOP_LAYOUTS`).

Not supported (their CoOp layouts differ): fgvc_aircraft, sun397, imagenet. Images are listed,
not opened: a file named by a split but missing is reported by `load_image`, by path.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skipcache.data.base import Dataset, Example
from skipcache.data.templates import get_templates
from skipcache.errors import ConfigError, DataError

DATA_ROOT_ENV = "SKIPCACHE_DATA"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "test")
COOP_DATASETS_DOC = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
NOT_SUPPORTED = ("fgvc_aircraft", "sun397", "imagenet")

# name -> (folder under the data root, images folder under the data root, split file in `folder`)
COOP_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "food101": ("food-101", "food-101/images", "split_zhou_Food101.json"),
    "caltech101": ("caltech-101", "caltech-101/101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "oxford_pets/images", "split_zhou_OxfordPets.json"),
    "dtd": ("dtd", "dtd/images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "eurosat/2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "ucf101/UCF-101-midframes", "split_zhou_UCF101.json"),
    "oxford_flowers": ("oxford_flowers", "oxford_flowers/jpg", "split_zhou_OxfordFlowers.json"),
    "stanford_cars": ("stanford_cars", "stanford_cars", "split_zhou_StanfordCars.json"),
}


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


# ---------------------------------------------------------------------------------- CoOp split json


def _read_coop_split(split_file: Path, image_dir: Path, data_root: Path) -> tuple[list[str], dict]:
    """Parse a CoOp split file into class names (label order) and `Example` lists."""
    try:
        raw = json.loads(split_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {split_file} is not valid JSON ({exc}); download it again") from None
    if not isinstance(raw, dict) or any(k not in raw for k in SPLIT_NAMES):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"split file {split_file} must be an object with keys 'train', 'val', 'test'; "
                        f"found {found}; download it again")
    label_to_name: dict[int, str] = {}
    name_to_label: dict[str, int] = {}
    splits: dict[str, list[Example]] = {}
    for split in SPLIT_NAMES:
        entries = raw[split]
        if not isinstance(entries, list):
            raise DataError(f"split file {split_file}: '{split}' must be a list of [impath, label, classname]")
        examples = []
        for i, entry in enumerate(entries):
            where = f"split file {split_file}: '{split}' entry {i}"
            if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], int) or isinstance(entry[1], bool)
                    or not isinstance(entry[2], str)):
                raise DataError(f"{where} is {entry!r}; expected [impath: str, label: int, classname: str]")
            impath, label, classname = entry
            if label < 0 or not impath or Path(impath).is_absolute() or ".." in Path(impath).parts:
                raise DataError(f"{where} is {entry!r}; expected a relative image path and a label >= 0")
            if label_to_name.setdefault(label, classname) != classname:
                raise DataError(f"{where}: label {label} is named {classname!r} here but "
                                f"{label_to_name[label]!r} before; fix the split file")
            if name_to_label.setdefault(classname, label) != label:
                raise DataError(f"{where}: class {classname!r} has label {label} here but "
                                f"{name_to_label[classname]} before; fix the split file")
            path = image_dir / impath
            examples.append(Example(source_id=path.relative_to(data_root).as_posix(), label=label, path=path))
        splits[split] = examples
    missing = sorted(set(range(len(label_to_name))) - set(label_to_name))
    if missing:
        raise DataError(f"split file {split_file}: labels must be 0..M-1 but label {missing[0]} never "
                        f"occurs (largest is {max(label_to_name)}); fix the split file")
    if not splits["train"] or not splits["test"]:
        raise DataError(f"split file {split_file} has an empty 'train' or 'test' list; download it again")
    classnames = [label_to_name[i].replace("_", " ") for i in range(len(label_to_name))]
    return classnames, splits


def make_coop_loader(name: str) -> Callable[..., Dataset]:
    folder, images, split_name = COOP_LAYOUTS[name]

    def load(data_root: Path) -> Dataset:
        image_dir = data_root / images
        split_file = data_root / folder / split_name
        layout = f"expected <data root>/{images}/<impath> and <data root>/{folder}/{split_name}"
        if not image_dir.is_dir():
            raise DataError(f"{name}: image folder {image_dir} not found; {layout} (see {COOP_DATASETS_DOC})")
        if not split_file.is_file():
            raise DataError(f"{name}: split file {split_file} not found; {layout}; {split_name} comes "
                            f"from CoOp (links in {COOP_DATASETS_DOC})")
        classnames, splits = _read_coop_split(split_file, image_dir, data_root)
        digest = hashlib.sha256(split_file.read_bytes()).hexdigest()[:16]
        extra = {"split_file": split_name, "split_sha256": digest}
        return Dataset(name, classnames, get_templates(name), splits, extra)

    load.__name__ = f"load_{name}"
    return load


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
    for name, (_, images, split_name) in COOP_LAYOUTS.items():
        entries[name] = DatasetInfo(name, f"CoOp layout: {images}/ and {split_name}", True, make_coop_loader(name))
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
        hint = f" ({name} is not supported: its CoOp layout differs)" if name in NOT_SUPPORTED else ""
        raise ConfigError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(registry)}")
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
