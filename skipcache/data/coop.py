"""The eleven benchmark datasets of CoOp-based papers and the four ImageNet variants, read from
CoOp's on-disk layout exactly as CoOp's dataset readers read them.

Each dataset lives in `<data root>/<folder>/` (`COOP_LAYOUTS`). Four kinds of layout:

- `split`: an image folder plus CoOp's `split_zhou_<Name>.json` with `train` / `val` / `test`
  lists of `[impath relative to the image folder, label, classname]`. Labels and class names come
  from the file. (Caltech101, OxfordPets, StanfordCars, OxfordFlowers, Food101, SUN397, DTD,
  EuroSAT, UCF101.)
- `fgvc`: FGVC-Aircraft's own text files: `variants.txt` (one class per line; the line order is
  the label order) and `images_variant_{train,val,test}.txt` (lines `<image id> <variant>`; the
  image is `images/<image id>.jpg`).
- `imagenet`: `classnames.txt` (lines `<wnid> <class name>`) and `images/{train,val}/<wnid>/`.
  Labels are the positions of the sorted wnid folders; CoOp tests on `val`.
- `imagenetv2` and `folders` (test only, train = test as in CoOp): ImageNet's `classnames.txt`
  copied into the dataset folder; ImageNetV2 has one folder per label index (`<label>/`, the
  k-th line of classnames.txt), Sketch, A and R one folder per wnid, labelled by their sorted
  position (A and R hold 200 of the 1000 classes, and are classified among those 200).

Two deliberate differences from CoOp's readers, neither changes what is read from a correct
copy: image files are listed in sorted order (CoOp lists a class folder in `os.listdir` order,
which depends on the file system), and only files with an image suffix are taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from skipcache.data.base import Dataset, Example
from skipcache.data.templates import get_templates
from skipcache.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "test")
COOP_DATASETS_DOC = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
CLASSNAMES_TXT = "classnames.txt"
FGVC_FILES = {"train": "images_variant_train.txt", "val": "images_variant_val.txt",
              "test": "images_variant_test.txt"}
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class CoopLayout:
    """Where one dataset lives under the data root, and where to get it.

    Attributes:
        name: registry name (`skipcache cache --dataset NAME`).
        coop_name: CoOp's name of the dataset (`DATASET.NAME`, its reader class).
        folder: the dataset's folder under the data root.
        kind: `split`, `fgvc`, `imagenet`, `imagenetv2` or `folders` (see the module doc).
        images: the image folder, relative to `folder` ("" for the folder itself).
        split_file: CoOp's split file in `folder` (kind `split` only).
        source: where the images come from (the dataset's official source).
        anchor: the dataset's section in CoOp's DATASETS.md.
        published: the published size (CoOp's dataset table): `classes` and images per split.
        markers: paths relative to `folder` that only this dataset has; used to find a copy
            in the wrong place.
    """

    name: str
    coop_name: str
    folder: str
    kind: str
    images: str
    source: str
    anchor: str
    published: dict = field(default_factory=dict)
    split_file: str | None = None
    markers: tuple[str, ...] = ()

    @property
    def test_only(self) -> bool:
        return self.kind in ("imagenetv2", "folders")

    @property
    def doc(self) -> str:
        return f"{COOP_DATASETS_DOC}#{self.anchor}"

    @property
    def image_rel(self) -> str:
        """The image folder relative to the data root."""
        return f"{self.folder}/{self.images}" if self.images else self.folder

    def image_dir(self, data_root: Path) -> Path:
        return data_root / self.folder / self.images if self.images else data_root / self.folder

    def required_files(self) -> list[str]:
        """Files and folders (relative to `folder`) that must exist; folders end in '/'."""
        img = f"{self.images}/" if self.images else ""
        if self.kind == "split":
            return [img or "./", self.split_file]
        if self.kind == "fgvc":
            return [img, "variants.txt", *FGVC_FILES.values()]
        if self.kind == "imagenet":
            return [CLASSNAMES_TXT, f"{self.images}/train/", f"{self.images}/val/"]
        return [CLASSNAMES_TXT, img]

    def describe(self) -> str:
        """One line for `skipcache datasets`."""
        files = ", ".join(f for f in self.required_files() if f != "./")
        extra = "; test only" if self.test_only else ""
        return f"{self.coop_name}: {self.folder}/ with {files}{extra}"


def _split(name, coop_name, folder, images, split_file, source, anchor, published) -> CoopLayout:
    return CoopLayout(name, coop_name, folder, "split", images, source, anchor, published, split_file,
                      markers=(split_file,))


# The paper's order: ImageNet, the ten fine-grained / specialised datasets, the four variants.
COOP_LAYOUTS: dict[str, CoopLayout] = {layout.name: layout for layout in [
    CoopLayout("imagenet", "ImageNet", "imagenet", "imagenet", "images",
               "https://image-net.org/download.php (ILSVRC-2012 train and val; val sorted into <wnid>/ "
               "folders); classnames.txt: the link in CoOp's DATASETS.md (CLIP's class names)",
               "imagenet", {"classes": 1000, "train": 1_281_167, "test": 50_000}, markers=("images/train",)),
    _split("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
           "http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz",
           "caltech101", {"classes": 100, "train": 4128, "val": 1649, "test": 2465}),
    _split("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
           "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
           "oxfordpets", {"classes": 37, "train": 2944, "val": 736, "test": 3669}),
    _split("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
           "http://ai.stanford.edu/~jkrause/car196/cars_train.tgz and cars_test.tgz",
           "stanfordcars", {"classes": 196, "train": 6509, "val": 1635, "test": 8041}),
    _split("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
           "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
           "flowers102", {"classes": 102, "train": 4093, "val": 1633, "test": 2463}),
    _split("food101", "Food101", "food-101", "images", "split_zhou_Food101.json",
           "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)",
           "food101", {"classes": 101, "train": 50_500, "val": 20_200, "test": 30_300}),
    CoopLayout("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "fgvc", "images",
               "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz "
               "(keep its data/ folder and rename it fgvc_aircraft/)",
               "fgvcaircraft", {"classes": 100, "train": 3334, "val": 3333, "test": 3333},
               markers=("variants.txt", "images_variant_train.txt")),
    _split("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json",
           "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
           "sun397", {"classes": 397, "train": 15_880, "val": 3970, "test": 19_850}),
    _split("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
           "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
           "dtd", {"classes": 47, "train": 2820, "val": 1128, "test": 1692}),
    _split("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
           "http://madm.dfki.de/files/sentinel/EuroSAT.zip",
           "eurosat", {"classes": 10, "train": 13_500, "val": 5400, "test": 8100}),
    _split("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
           "UCF-101-midframes.zip (the middle frame of each video): the link in CoOp's DATASETS.md",
           "ucf101", {"classes": 101, "train": 7639, "val": 1898, "test": 3783}),
    CoopLayout("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
               "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz "
               "(https://github.com/modestyachts/ImageNetV2)",
               "imagenetv2", {"classes": 1000, "test": 10_000},
               markers=("imagenetv2-matched-frequency-format-val",)),
    CoopLayout("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "folders", "images",
               "https://github.com/HaohanWang/ImageNet-Sketch (its sketch/ folder becomes images/)",
               "imagenet-sketch", {"classes": 1000, "test": 50_889}, markers=("images/n01440764", "sketch/n01440764")),
    CoopLayout("imagenet_a", "ImageNetA", "imagenet-adversarial", "folders", "imagenet-a",
               "https://github.com/hendrycks/natural-adv-examples (imagenet-a.tar)",
               "imagenet-a", {"classes": 200, "test": 7500}, markers=("imagenet-a",)),
    CoopLayout("imagenet_r", "ImageNetR", "imagenet-rendition", "folders", "imagenet-r",
               "https://github.com/hendrycks/imagenet-r (imagenet-r.tar)",
               "imagenet-r", {"classes": 200, "test": 30_000}, markers=("imagenet-r",)),
]}


# ------------------------------------------------------------------------------------------ listing


def scan_dirs(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `folder`, sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def scan_images(folder: Path) -> list[str]:
    """Names of the non-hidden image files of `folder` (by suffix), sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())


def _read_lines(path: Path, layout: CoopLayout) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{layout.name}: {path} is not UTF-8 text ({exc.reason}); download it again "
                        f"(see {layout.doc})") from None
    except FileNotFoundError:
        raise DataError(missing_message(layout, path)) from None


def missing_message(layout: CoopLayout, path: Path) -> str:
    """The one-line error for a file or folder of the layout that is not there."""
    what = "folder" if path.suffix not in (".txt", ".json") else "file"
    return (f"{layout.name}: {what} {path} not found; CoOp's layout is <data root>/{layout.folder}/ with "
            f"{', '.join(f for f in layout.required_files() if f != './')} (see {layout.doc}; "
            f"`skipcache check-data {layout.name}` says what is missing)")


def read_classnames_txt(path: Path, layout: CoopLayout) -> dict[str, str]:
    """`<wnid> <class name>` lines to {wnid: class name}, in file order (blank lines skipped)."""
    names: dict[str, str] = {}
    for lineno, line in enumerate(_read_lines(path, layout), 1):
        words = line.strip().split(" ")
        if not words[0]:
            continue
        wnid, name = words[0], " ".join(words[1:]).strip()
        if not name:
            raise DataError(f"{layout.name}: {path} line {lineno} is {line.strip()!r}; expected "
                            "'<wnid> <class name>'; download classnames.txt again")
        if wnid in names:
            raise DataError(f"{layout.name}: {path} line {lineno} repeats folder {wnid!r}; "
                            "download classnames.txt again")
        names[wnid] = name
    if not names:
        raise DataError(f"{layout.name}: {path} is empty; download classnames.txt again (see {layout.doc})")
    return names


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _examples(data_root: Path, folder: Path, label: int, names: Iterable[str]) -> list[Example]:
    return [Example(source_id=(folder / n).relative_to(data_root).as_posix(), label=label, path=folder / n)
            for n in names]


# ------------------------------------------------------------------------------------------- readers


def read_split_file(split_file: Path, image_dir: Path, data_root: Path) -> tuple[list[str], dict]:
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
    classnames = [label_to_name[i] for i in range(len(label_to_name))]
    return classnames, splits


def _load_split(layout: CoopLayout, data_root: Path) -> tuple[list[str], dict, dict]:
    image_dir = layout.image_dir(data_root)
    split_file = data_root / layout.folder / layout.split_file
    if not image_dir.is_dir():
        raise DataError(f"{layout.name}: image folder {image_dir} not found; expected <data root>/{layout.image_rel}/"
                        f"<impath> and <data root>/{layout.folder}/{layout.split_file} (see {layout.doc})")
    if not split_file.is_file():
        raise DataError(f"{layout.name}: split file {split_file} not found; expected <data root>/{layout.image_rel}/"
                        f"<impath> and <data root>/{layout.folder}/{layout.split_file}; {layout.split_file} comes "
                        f"from CoOp (link in {layout.doc})")
    classnames, splits = read_split_file(split_file, image_dir, data_root)
    extra = {"split_file": layout.split_file, "split_sha256": _digest(split_file)}
    return classnames, splits, extra


def _load_fgvc(layout: CoopLayout, data_root: Path) -> tuple[list[str], dict, dict]:
    folder = data_root / layout.folder
    image_dir = layout.image_dir(data_root)
    for rel in layout.required_files():
        if not (folder / rel).exists():
            raise DataError(missing_message(layout, folder / rel))
    variants = [line.strip() for line in _read_lines(folder / "variants.txt", layout) if line.strip()]
    label_of: dict[str, int] = {}
    for i, variant in enumerate(variants):
        if label_of.setdefault(variant, i) != i:
            raise DataError(f"{layout.name}: {folder / 'variants.txt'} lists {variant!r} twice; download the data again")
    splits: dict[str, list[Example]] = {}
    for split, name in FGVC_FILES.items():
        examples = []
        for lineno, line in enumerate(_read_lines(folder / name, layout), 1):
            words = line.strip().split(" ")
            if not words[0]:
                continue
            variant = " ".join(words[1:])
            if variant not in label_of:
                raise DataError(f"{layout.name}: {folder / name} line {lineno} names variant {variant!r}, which "
                                "is not in variants.txt; download the data again")
            path = image_dir / f"{words[0]}.jpg"
            examples.append(Example(path.relative_to(data_root).as_posix(), label_of[variant], path))
        splits[split] = examples
    if not splits["train"] or not splits["test"]:
        raise DataError(f"{layout.name}: {folder / FGVC_FILES['train']} or {FGVC_FILES['test']} lists no image; "
                        "download the data again")
    extra = {"layout": "coop-fgvc", "files_sha256": _digest(folder / "variants.txt",
                                                            *(folder / n for n in FGVC_FILES.values()))}
    return variants, splits, extra


def _class_folder_examples(layout: CoopLayout, data_root: Path, split_dir: Path,
                           folders: list[str], labels: list[int]) -> list[Example]:
    examples: list[Example] = []
    for label, name in zip(labels, folders):
        d = split_dir / name
        if not d.is_dir():
            raise DataError(missing_message(layout, d))
        files = scan_images(d)
        if not files:
            raise DataError(f"{layout.name}: class folder {d} holds no images; extract the dataset again "
                            f"(see {layout.doc})")
        examples.extend(_examples(data_root, d, label, files))
    return examples


def wnid_folders(layout: CoopLayout, split_dir: Path, names: dict[str, str], classnames_path: Path) -> list[str]:
    """The sorted class folders of `split_dir`, each checked against classnames.txt."""
    if not split_dir.is_dir():
        raise DataError(missing_message(layout, split_dir))
    folders = scan_dirs(split_dir)
    if not folders:
        loose = scan_images(split_dir)
        hint = (f"it holds {len(loose)} loose images: sort them into one <wnid>/ folder per class"
                if loose else "extract the images into it")
        raise DataError(f"{layout.name}: {split_dir} has no class folders; {hint} (see {layout.doc})")
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{layout.name}: {len(unknown)} folder(s) of {split_dir} are not in {classnames_path} "
                        f"(e.g. {', '.join(unknown[:3])}); use ImageNet's classnames.txt (see {layout.doc})")
    return folders


def _load_imagenet(layout: CoopLayout, data_root: Path) -> tuple[list[str], dict, dict]:
    folder = data_root / layout.folder
    txt = folder / CLASSNAMES_TXT
    names = read_classnames_txt(txt, layout)
    image_dir = layout.image_dir(data_root)
    train_dir, val_dir = image_dir / "train", image_dir / "val"
    train_folders = wnid_folders(layout, train_dir, names, txt)
    val_folders = wnid_folders(layout, val_dir, names, txt)
    if train_folders != val_folders:
        only_train = sorted(set(train_folders) - set(val_folders))
        only_val = sorted(set(val_folders) - set(train_folders))
        raise DataError(f"{layout.name}: {train_dir} and {val_dir} must hold the same class folders (labels are "
                        f"their sorted positions); only in train: {only_train[:3]} ({len(only_train)}), only in "
                        f"val: {only_val[:3]} ({len(only_val)}); extract the missing classes")
    labels = list(range(len(train_folders)))
    splits = {"train": _class_folder_examples(layout, data_root, train_dir, train_folders, labels),
              "test": _class_folder_examples(layout, data_root, val_dir, val_folders, labels)}
    extra = {"layout": "coop-imagenet", "classnames_sha256": _digest(txt), "test_is": "images/val"}
    return [names[w] for w in train_folders], splits, extra


def _load_imagenetv2(layout: CoopLayout, data_root: Path) -> tuple[list[str], dict, dict]:
    folder = data_root / layout.folder
    txt = folder / CLASSNAMES_TXT
    names = read_classnames_txt(txt, layout)
    image_dir = layout.image_dir(data_root)
    if not image_dir.is_dir():
        raise DataError(missing_message(layout, image_dir))
    labels = list(range(len(names)))
    data = _class_folder_examples(layout, data_root, image_dir, [str(i) for i in labels], labels)
    extra = {"layout": "coop-imagenetv2", "classnames_sha256": _digest(txt), "test_only": True}
    return list(names.values()), {"train": data, "test": list(data)}, extra


def _load_folders(layout: CoopLayout, data_root: Path) -> tuple[list[str], dict, dict]:
    folder = data_root / layout.folder
    txt = folder / CLASSNAMES_TXT
    names = read_classnames_txt(txt, layout)
    image_dir = layout.image_dir(data_root)
    folders = wnid_folders(layout, image_dir, names, txt)
    labels = list(range(len(folders)))
    data = _class_folder_examples(layout, data_root, image_dir, folders, labels)
    extra = {"layout": "coop-folders", "classnames_sha256": _digest(txt), "test_only": True}
    return [names[w] for w in folders], {"train": data, "test": list(data)}, extra


_READERS: dict[str, Callable[[CoopLayout, Path], tuple[list[str], dict, dict]]] = {
    "split": _load_split, "fgvc": _load_fgvc, "imagenet": _load_imagenet,
    "imagenetv2": _load_imagenetv2, "folders": _load_folders,
}


def load_coop(name: str, data_root: Path) -> Dataset:
    """Load a dataset of `COOP_LAYOUTS` from `<data_root>/<its folder>`.

    Class names keep CoOp's text except that `_` reads as a space, as CoOp's prompts write them.
    Test-only datasets (the ImageNet variants) have `train` = `test`, as in CoOp; they are meant
    as evaluation targets.

    Raises:
        DataError: a file or folder of the layout is missing or malformed; the message names it.
    """
    layout = COOP_LAYOUTS[name]
    if not (data_root / layout.folder).is_dir():
        raise DataError(missing_message(layout, data_root / layout.folder))
    classnames, splits, extra = _READERS[layout.kind](layout, data_root)
    classnames = [c.replace("_", " ") for c in classnames]
    return Dataset(name, classnames, get_templates(name), splits, extra)


def make_coop_loader(name: str) -> Callable[..., Dataset]:
    def load(data_root: Path) -> Dataset:
        return load_coop(name, data_root)

    load.__name__ = f"load_{name}"
    return load


def presence(name: str, data_root: Path) -> tuple[bool, str]:
    """Cheap look (no listing) whether the dataset is there: (found, what is missing if not)."""
    layout = COOP_LAYOUTS[name]
    folder = data_root / layout.folder
    if not folder.is_dir():
        return False, f"no {layout.folder}/"
    missing = [rel for rel in layout.required_files() if not (folder / rel).exists()]
    if missing:
        return False, f"{layout.folder}/ lacks {', '.join(m.rstrip('/') or '.' for m in missing)}"
    return True, ""
