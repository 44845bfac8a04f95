"""`skipcache check-data NAME`: is a dataset's copy complete, and if not, what exactly is wrong.

`check_dataset` looks at the layout step by step and stops at the first step that fails, so
every problem it reports is a real one and comes with its fix:

1. the data root (set, a folder);
2. the dataset's folder under it; when missing, a copy in the wrong place (the data root
   pointing at the dataset folder itself, another name, one level too deep) is looked for;
3. the layout's files and folders (split file, text files, classnames.txt, image folder), again
   with a look for a misplaced copy;
4. the real loader (malformed split files, class folders not in classnames.txt...);
5. every image a split names (split-file and text-file layouts): how many are missing, in
   which split, with examples;
6. the sizes against the published ones (CoOp's dataset table): a difference is a warning, as
   the copy works but its numbers will not be comparable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from skipcache.data.coop import CLASSNAMES_TXT, COOP_LAYOUTS, WNID, CoopLayout, load_coop, scan_dirs
from skipcache.data.registry import DATA_ROOT_ENV, get_dataset, get_registry, resolve_data_root, unknown_dataset
from skipcache.errors import DataError

EXAMPLES = 3  # paths quoted per problem


@dataclass
class Finding:
    """One problem (`error`: the dataset cannot be used) or remark (`warning`)."""

    level: str
    message: str
    fix: str = ""


@dataclass
class DataReport:
    """What `check_dataset` found.

    Attributes:
        name: the dataset.
        root: the data root (None when none is set).
        folder: the dataset's folder.
        findings: problems and warnings, in the order found.
        classes: number of classes, when the dataset loads.
        images: images per split, when the dataset loads.
        test_only: the dataset is for evaluation only (train = test).
        doc: CoOp's instructions for this dataset.
        source: where the images come from.
    """

    name: str
    root: Path | None = None
    folder: Path | None = None
    findings: list[Finding] = field(default_factory=list)
    classes: int | None = None
    images: dict[str, int] = field(default_factory=dict)
    test_only: bool = False
    doc: str = ""
    source: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def error(self, message: str, fix: str = "") -> None:
        self.findings.append(Finding("error", message, fix))

    def warn(self, message: str, fix: str = "") -> None:
        self.findings.append(Finding("warning", message, fix))

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(ok=self.ok, root=None if self.root is None else str(self.root),
                   folder=None if self.folder is None else str(self.folder))
        return out


def check_dataset(name: str, data_root: Path | str | None = None) -> DataReport:
    """Check a dataset's copy under the data root (see the module doc).

    Raises:
        ConfigError: unknown dataset name (with the names it probably meant).
    """
    registry = get_registry()
    if name not in registry:
        raise unknown_dataset(name, registry)
    report = DataReport(name)
    if not registry[name].needs_root:
        return report  # procedural: nothing on disk to check
    root = resolve_data_root(data_root)
    report.root = root
    layout = COOP_LAYOUTS.get(name)
    if layout is not None:
        report.doc, report.source, report.test_only = layout.doc, layout.source, layout.test_only
    where = f"the folder that holds {layout.folder}/" if layout else "the image folder"
    if root is None:
        report.error("no data root is set", f"pass --data-root DIR ({where}) or set {DATA_ROOT_ENV}")
        return report
    if not root.is_dir():
        report.error(f"data root {root} is not a folder", f"pass --data-root DIR ({where}) or set {DATA_ROOT_ENV}")
        return report
    if layout is None:  # imagefolder: its loader checks everything there is to check
        report.folder = root
        _load_and_count(report, lambda: get_dataset(name, root), "see `skipcache datasets` for the layout")
        return report
    report.folder = folder = root / layout.folder
    download = f"download it as CoOp's DATASETS.md says ({layout.doc}); images: {layout.source}"
    if not folder.is_dir():
        report.error(f"{folder} not found: {name} lives in <data root>/{layout.folder}/ in CoOp's layout",
                     _misplaced_fix(layout, root, folder) or download)
        return report
    if not _check_files(report, layout, root, folder, download):
        return report
    dataset = _load_and_count(report, lambda: load_coop(name, root), f"CoOp's instructions: {layout.doc}")
    if dataset is None:
        return report
    if layout.kind in ("split", "fgvc"):
        _check_images(report, layout, dataset, root)
    _compare_published(report, layout)
    return report


def _load_and_count(report: DataReport, load, fix: str):
    try:
        dataset = load()
    except DataError as exc:
        report.error(str(exc), fix)
        return None
    report.classes = dataset.num_classes
    report.images = {s: len(v) for s, v in dataset.splits.items()}
    if dataset.fingerprint_extra.get("test_only"):
        report.images = {"test": len(dataset.splits["test"])}
    return dataset


# ----------------------------------------------------------------------------------- misplacement


def _children(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _near(folder: Path) -> list[Path]:
    """`folder`, its sub-folders and theirs (no deeper: cheap even on a large data root)."""
    level1 = _children(folder)
    return [folder, *level1, *(g for c in level1 for g in _children(c))]


def _move(src: Path, dst: Path) -> str:
    return f"move or rename {src} to {dst} (or link it: ln -s {src.resolve()} {dst})"


def _misplaced_fix(layout: CoopLayout, root: Path, folder: Path) -> str:
    """A fix naming a copy of the dataset folder found in the wrong place, or ''."""
    for candidate in _near(root):
        hits = [m for m in layout.markers if (candidate / m).exists()]
        if not hits:
            continue
        if candidate == root:
            if root.name == layout.folder:
                return (f"--data-root {root} is the dataset folder itself; pass the folder that holds it: "
                        f"--data-root {root.parent}")
            return (f"{root / hits[0]} is directly in the data root; CoOp's layout wants it in {folder}/: "
                    f"create {folder} and move {layout.name}'s files into it")
        return f"found {candidate / hits[0]}: {_move(candidate, folder)}"
    return ""


def _find_images_elsewhere(layout: CoopLayout, folder: Path, expected: Path, probe: str | None) -> str:
    """A fix naming where the images seem to be, when the image folder `expected` is missing or
    holds none of them; '' when no likely copy is near. `probe`: an image path relative to the
    image folder (split-file and text-file layouts)."""
    beside = [c for c in _children(folder.parent) if c.name == expected.name and c != folder]
    for candidate in [*_near(folder), *beside]:  # inside the dataset folder, or extracted beside it
        if candidate == expected:
            continue
        if probe is not None:
            found = (candidate / probe).is_file()
        elif layout.kind == "imagenetv2":
            found = (candidate / "0").is_dir() and (candidate / "1").is_dir()
        else:
            found = any(WNID.fullmatch(d) for d in scan_dirs(candidate)[:5])
        if not found:
            continue
        if candidate == folder:
            return f"the class folders are directly in {folder}: move them into {expected}/"
        return f"the images are in {candidate}: {_move(candidate, expected)}"
    return ""


def _first_impath(layout: CoopLayout, folder: Path) -> str | None:
    """The first image path the layout's split file (or train list) names, if it can be read."""
    try:
        if layout.kind == "split":
            raw = json.loads((folder / layout.split_file).read_bytes())
            return str(raw["train"][0][0])
        if layout.kind == "fgvc":
            line = (folder / "images_variant_train.txt").read_text(encoding="utf-8").split("\n", 1)[0]
            return line.strip().split(" ")[0] + ".jpg"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return None


# ------------------------------------------------------------------------------------------ files


def _check_files(report: DataReport, layout: CoopLayout, root: Path, folder: Path, download: str) -> bool:
    """The layout's files and folders; True when all are there."""
    ok = True
    for rel in layout.required_files():
        if rel == "./":
            continue
        path = folder / rel.rstrip("/")
        if path.exists():
            continue
        ok = False
        name = path.name
        if rel.endswith("/"):  # an image folder
            if layout.kind == "imagenet":  # images/train or images/val: never offer the other split
                flat = folder / path.name
                fix = (f"{flat} should be in {path.parent}/: {_move(flat, path)}" if flat.is_dir()
                       else f"extract ILSVRC-2012 {path.name} into {path}/ ({layout.source})")
            else:
                fix = (_find_images_elsewhere(layout, folder, path, _first_impath(layout, folder))
                       or f"extract the images so that they are in {path}/; {download}")
            report.error(f"image folder {path} not found", fix)
            continue
        elsewhere = [c / name for c in _near(root) if (c / name).is_file() and c != folder]
        if name == CLASSNAMES_TXT and layout.kind != "imagenet":
            source = root / "imagenet" / CLASSNAMES_TXT
            fix = (f"copy ImageNet's class names: cp {source} {path}" if source.is_file() else
                   f"copy ImageNet's classnames.txt (from CoOp's DATASETS.md, {COOP_LAYOUTS['imagenet'].doc}) "
                   f"to {path}")
        elif elsewhere:
            fix = f"found {elsewhere[0]}: move it to {path}"
        elif layout.kind == "split":
            fix = f"download {name} from the link in CoOp's DATASETS.md ({layout.doc}) into {folder}/"
        elif layout.kind == "imagenet":
            fix = f"download classnames.txt from the link in CoOp's DATASETS.md ({layout.doc}) into {folder}/"
        else:
            fix = download
        report.error(f"{path} not found", fix)
    return ok


# ----------------------------------------------------------------------------------------- images


def _check_images(report: DataReport, layout: CoopLayout, dataset, root: Path) -> None:
    """Every image a split names must be a file."""
    image_dir = layout.image_dir(root)
    missing = {split: [ex for ex in dataset.splits.get(split, []) if not os.path.isfile(ex.path)]
               for split in ("train", "val", "test")}
    total = sum(len(v) for v in missing.values())
    if not total:
        return
    if total == sum(len(v) for v in dataset.splits.values()):
        fix = (_find_images_elsewhere(layout, root / layout.folder, image_dir, _first_impath(layout, root / layout.folder))
               or f"{image_dir} holds none of the listed images: extract the dataset's images there "
                  f"({layout.source}; {layout.doc})")
    else:
        fix = (f"the copy is incomplete: extract the images again into {image_dir} ({layout.source}); "
               f"if your copy is another version, get the one CoOp used ({layout.doc})")
    for split, gone in missing.items():
        if gone:
            quoted = ", ".join(Path(ex.path).relative_to(image_dir).as_posix() for ex in gone[:EXAMPLES])
            more = ", ..." if len(gone) > EXAMPLES else ""
            report.error(f"{len(gone)} of {len(dataset.splits[split])} '{split}' entries point to no file under "
                         f"{image_dir} (e.g. {quoted}{more})", fix)


def _compare_published(report: DataReport, layout: CoopLayout) -> None:
    """One warning when the classes or a split's size differ from the published dataset."""
    published = layout.published
    sizes = {"classes": report.classes, **report.images}
    if all(sizes.get(k) == v for k, v in published.items()):
        return

    def describe(values: dict) -> str:
        splits = ", ".join(f"{s} {values[s]:,}" for s in ("train", "val", "test") if values.get(s) is not None)
        return f"{values['classes']:,} classes; {splits}"

    report.warn(f"this copy has {describe(sizes)}; the published {layout.coop_name} has {describe(published)}",
                f"numbers will not be comparable with published ones; get the complete dataset ({layout.doc})")
