"""The paper's fifteen datasets in CoOp's layout, the data checker, CoOp's few-shot sampler and the
named template sets.

Every dataset is built here as a tiny fake copy of its real layout: real-format split files and
text files, real folder names, generated 4x4 images. The reference is an independent
transcription, in this file, of how CoOp's dataset readers (CoOp `datasets/*.py`) and Dassl's
`DatasetBase` (`get_lab2cname`, `generate_fewshot_dataset`) read and sample them, and of CoOp's
`subsample_classes` (base = the first ceil(M/2) sorted labels, relabelled from 0). One documented
difference: CoOp lists a class folder with `os.listdir` (file-system order), the reference and
skipcache in sorted order.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image
from typer.testing import CliRunner

from skipcache.data import build_task, get_dataset, load_image
from skipcache.data.check import check_dataset
from skipcache.data.registry import dataset_status
from skipcache.data.templates import SKIPT_TEMPLATES, TEMPLATES, template_for
from skipcache.errors import ConfigError, DataError

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("SKIPCACHE_DATA", raising=False)


# ---------------------------------------------------------------------------------- fake copies

_JPEG = io.BytesIO()
Image.new("RGB", (4, 4), (90, 40, 200)).save(_JPEG, format="JPEG")
JPEG = _JPEG.getvalue()


def put_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)


# name -> (folder, image folder under it, split file, [(classname, impath pattern)])
# Class names and paths have the shapes of the real split files.
SPLIT_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", [
        ("face", "Faces_easy/image_{i:04d}.jpg"), ("leopard", "Leopards/image_{i:04d}.jpg"),
        ("motorbike", "Motorbikes/image_{i:04d}.jpg"), ("accordion", "accordion/image_{i:04d}.jpg"),
        ("airplane", "airplanes/image_{i:04d}.jpg")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", [
        ("abyssinian", "Abyssinian_{i}.jpg"), ("american_bulldog", "american_bulldog_{i}.jpg"),
        ("american_pit_bull_terrier", "american_pit_bull_terrier_{i}.jpg"), ("basset_hound", "basset_hound_{i}.jpg"),
        ("beagle", "beagle_{i}.jpg")]),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", [
        ("2000 AM General Hummer SUV", "cars_{split}/0{i:04d}.jpg"), ("2012 Acura RL Sedan", "cars_{split}/1{i:04d}.jpg"),
        ("2012 Acura TL Sedan", "cars_{split}/2{i:04d}.jpg"), ("2008 Acura TL Type-S", "cars_{split}/3{i:04d}.jpg"),
        ("2012 Acura TSX Sedan", "cars_{split}/4{i:04d}.jpg")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", [
        ("pink primrose", "image_0{i:04d}.jpg"), ("hard-leaved pocket orchid", "image_1{i:04d}.jpg"),
        ("canterbury bells", "image_2{i:04d}.jpg"), ("sweet pea", "image_3{i:04d}.jpg"),
        ("english marigold", "image_4{i:04d}.jpg")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json", [
        ("apple_pie", "apple_pie/{i}.jpg"), ("baby_back_ribs", "baby_back_ribs/{i}.jpg"),
        ("baklava", "baklava/{i}.jpg"), ("beef_carpaccio", "beef_carpaccio/{i}.jpg"),
        ("beef_tartare", "beef_tartare/{i}.jpg")]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", [
        ("abbey", "a/abbey/sun_{i:04d}.jpg"), ("airplane cabin", "a/airplane_cabin/sun_{i:04d}.jpg"),
        ("airport terminal", "a/airport_terminal/sun_{i:04d}.jpg"), ("alley", "a/alley/sun_{i:04d}.jpg"),
        ("shop bakery", "b/bakery/shop/sun_{i:04d}.jpg")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", [
        ("banded", "banded/banded_{i:04d}.jpg"), ("blotchy", "blotchy/blotchy_{i:04d}.jpg"),
        ("braided", "braided/braided_{i:04d}.jpg"), ("bubbly", "bubbly/bubbly_{i:04d}.jpg"),
        ("bumpy", "bumpy/bumpy_{i:04d}.jpg")]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", [
        ("Annual Crop Land", "AnnualCrop/AnnualCrop_{i}.jpg"), ("Forest", "Forest/Forest_{i}.jpg"),
        ("Herbaceous Vegetation Land", "HerbaceousVegetation/HerbaceousVegetation_{i}.jpg"),
        ("Highway or Road", "Highway/Highway_{i}.jpg"), ("Industrial Buildings", "Industrial/Industrial_{i}.jpg")]),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", [
        ("Apply_Eye_Makeup", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g{i:02d}_c01.jpg"),
        ("Apply_Lipstick", "Apply_Lipstick/v_ApplyLipstick_g{i:02d}_c01.jpg"),
        ("Archery", "Archery/v_Archery_g{i:02d}_c01.jpg"), ("Baby_Crawling", "Baby_Crawling/v_BabyCrawling_g{i:02d}_c01.jpg"),
        ("Balance_Beam", "Balance_Beam/v_BalanceBeam_g{i:02d}_c01.jpg")]),
}
# Train images per class (uneven, two classes short of 16), val and test per class.
TRAIN_SIZES = [20, 7, 16, 3, 30]
VAL_PER_CLASS, TEST_PER_CLASS = 1, 2


def make_split_dataset(root: Path, name: str, *, images: bool = True, shuffle_seed: int = 5) -> Path:
    """A fake CoOp copy of a split-file dataset; entries are interleaved across labels, and the
    labels first appear in the order 2, 0, ... (not sorted), as a shuffled real file might."""
    folder, image_rel, split_name, classes = SPLIT_DATASETS[name]
    image_dir = root / folder / image_rel if image_rel else root / folder
    split: dict[str, list] = {}
    offsets = {"train": 0, "val": 100, "test": 200}
    for s, sizes in (("train", TRAIN_SIZES), ("val", [VAL_PER_CLASS] * 5), ("test", [TEST_PER_CLASS] * 5)):
        entries = [[pattern.format(i=offsets[s] + i, split="test" if s == "test" else "train"), label, classname]
                   for label, ((classname, pattern), n) in enumerate(zip(classes, sizes)) for i in range(n)]
        random.Random(shuffle_seed).shuffle(entries)
        first = next(e for e in entries if e[1] == 2)
        entries.remove(first)
        split[s] = [first, *entries]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_name).write_text(json.dumps(split, indent=4))
    image_dir.mkdir(parents=True, exist_ok=True)
    if images:
        for entries in split.values():
            for impath, _, _ in entries:
                put_image(image_dir / impath)
    return root


FGVC_VARIANTS = ["707-320", "727-200", "A300B4", "BAE 146-200", "F-16A/B"]


def make_fgvc(root: Path) -> Path:
    """fgvc_aircraft/ as the 2013b archive's data/ folder: variants.txt, images_variant_*.txt, images/."""
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in FGVC_VARIANTS))
    image_id = 1025794
    for s, sizes in (("train", TRAIN_SIZES), ("val", [1] * 5), ("test", [2] * 5)):
        lines = []
        for label, n in enumerate(sizes):
            for _ in range(n):
                lines.append(f"{image_id:07d} {FGVC_VARIANTS[label]}\n")
                put_image(folder / "images" / f"{image_id:07d}.jpg")
                image_id += 37
        random.Random(3).shuffle(lines)
        (folder / f"images_variant_{s}.txt").write_text("".join(lines))
    return root


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray"}
SUBSET_200 = ["n01443537", "n01491361", "n01496331"]  # A and R hold a subset of the classes


def classnames_txt(order=None) -> str:
    return "".join(f"{w} {WNIDS[w]}\n" for w in (order or sorted(WNIDS)))


def make_imagenet(root: Path) -> Path:
    folder = root / "imagenet"
    folder.mkdir(parents=True)
    # Not in wnid order: labels come from the sorted folders, names from the file.
    (folder / "classnames.txt").write_text(classnames_txt(list(reversed(sorted(WNIDS)))))
    k = 1
    for c, wnid in enumerate(sorted(WNIDS)):
        for i in range(3 + c):
            put_image(folder / "images" / "train" / wnid / f"{wnid}_{i * 7 + 10}.JPEG")
        for _ in range(2):
            put_image(folder / "images" / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG")
            k += 1
    return root


def make_imagenetv2(root: Path) -> Path:
    folder = root / "imagenetv2"
    folder.mkdir(parents=True)
    (folder / "classnames.txt").write_text(classnames_txt())
    for label in range(len(WNIDS)):
        for i in range(1 + label % 2):
            put_image(folder / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i:02d}9f3e{label}.jpeg")
    return root


VARIANT_FOLDERS = {"imagenet_sketch": ("imagenet-sketch", "images", sorted(WNIDS)),
                   "imagenet_a": ("imagenet-adversarial", "imagenet-a", SUBSET_200),
                   "imagenet_r": ("imagenet-rendition", "imagenet-r", SUBSET_200)}


def make_variant(root: Path, name: str) -> Path:
    folder, images, wnids = VARIANT_FOLDERS[name]
    (root / folder).mkdir(parents=True)
    (root / folder / "classnames.txt").write_text(classnames_txt())
    for c, wnid in enumerate(wnids):
        for i in range(2 + c):
            put_image(root / folder / images / wnid / f"{'art' if name == 'imagenet_r' else 'sketch'}_{i}.jpg")
    if name in ("imagenet_a", "imagenet_r"):
        (root / folder / images / "README.txt").write_text("the archive's readme\n")
    return root


def make_any(root: Path, name: str) -> Path:
    if name in SPLIT_DATASETS:
        return make_split_dataset(root, name)
    if name == "fgvc_aircraft":
        return make_fgvc(root)
    if name == "imagenet":
        return make_imagenet(root)
    if name == "imagenetv2":
        return make_imagenetv2(root)
    return make_variant(root, name)


ALL = ["imagenet", *SPLIT_DATASETS, "fgvc_aircraft", "imagenetv2", *VARIANT_FOLDERS]


# ------------------------------------------------- reference: CoOp's readers, transcribed


class Datum(NamedTuple):
    impath: str
    label: int
    classname: str


def ref_listdir_nohidden(path, sort=False):
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    return sorted(items) if sort else items


def ref_read_split(filepath, path_prefix):
    with open(filepath) as f:
        split = json.load(f)
    return {s: [Datum(os.path.join(path_prefix, impath), int(label), classname)
                for impath, label, classname in split[s]] for s in ("train", "val", "test")}


def ref_read_classnames(text_file):
    classnames = {}
    with open(text_file) as f:
        for line in f.readlines():
            line = line.strip().split(" ")
            classnames[line[0]] = " ".join(line[1:])
    return classnames


def ref_fgvc(dataset_dir):
    with open(os.path.join(dataset_dir, "variants.txt")) as f:
        classnames = [line.strip() for line in f.readlines()]
    cname2lab = {c: i for i, c in enumerate(classnames)}

    def read(split_file):
        items = []
        with open(os.path.join(dataset_dir, split_file)) as f:
            for line in f.readlines():
                line = line.strip().split(" ")
                classname = " ".join(line[1:])
                items.append(Datum(os.path.join(dataset_dir, "images", line[0] + ".jpg"), cname2lab[classname], classname))
        return items

    return {s: read(f"images_variant_{s}.txt") for s in ("train", "val", "test")}


def ref_imagenet(dataset_dir):
    classnames = ref_read_classnames(os.path.join(dataset_dir, "classnames.txt"))

    def read(split_dir):
        split_dir = os.path.join(dataset_dir, "images", split_dir)
        folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
        return [Datum(os.path.join(split_dir, folder, imname), label, classnames[folder])
                for label, folder in enumerate(folders)
                for imname in ref_listdir_nohidden(os.path.join(split_dir, folder), sort=True)]

    return {"train": read("train"), "test": read("val")}  # CoOp tests on val


def ref_imagenetv2(dataset_dir):
    classnames = ref_read_classnames(os.path.join(dataset_dir, "classnames.txt"))
    image_dir = os.path.join(dataset_dir, "imagenetv2-matched-frequency-format-val")
    folders = list(classnames.keys())
    data = []
    for label in range(len(folders)):  # CoOp: range(1000), the size of the real classnames.txt
        class_dir = os.path.join(image_dir, str(label))
        for imname in ref_listdir_nohidden(class_dir, sort=True):
            data.append(Datum(os.path.join(class_dir, imname), label, classnames[folders[label]]))
    return {"train": data, "test": data}


def ref_folders(dataset_dir, image_subdir, ignored=("README.txt",)):
    classnames = ref_read_classnames(os.path.join(dataset_dir, "classnames.txt"))
    image_dir = os.path.join(dataset_dir, image_subdir)
    folders = [f for f in ref_listdir_nohidden(image_dir, sort=True) if f not in ignored]
    data = [Datum(os.path.join(image_dir, folder, imname), label, classnames[folder])
            for label, folder in enumerate(folders)
            for imname in ref_listdir_nohidden(os.path.join(image_dir, folder), sort=True)]
    return {"train": data, "test": data}


def reference(root: Path, name: str) -> dict[str, list[Datum]]:
    if name in SPLIT_DATASETS:
        folder, image_rel, split_name, _ = SPLIT_DATASETS[name]
        prefix = os.path.join(root, folder, image_rel) if image_rel else os.path.join(root, folder)
        return ref_read_split(os.path.join(root, folder, split_name), prefix)
    if name == "fgvc_aircraft":
        return ref_fgvc(os.path.join(root, "fgvc_aircraft"))
    if name == "imagenet":
        return ref_imagenet(os.path.join(root, "imagenet"))
    if name == "imagenetv2":
        return ref_imagenetv2(os.path.join(root, "imagenetv2"))
    folder, images, _ = VARIANT_FOLDERS[name]
    return ref_folders(os.path.join(root, folder), images)


def ref_lab2cname(data):
    mapping = {label: classname for label, classname in {(d.label, d.classname) for d in data}}
    return [mapping[label] for label in sorted(mapping)]


def ref_subsample(*datasets, subsample):
    labels = sorted({d.label for d in datasets[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return [[Datum(d.impath, relabel[d.label], d.classname) for d in data if d.label in selected] for data in datasets]


def ref_generate_fewshot(data, num_shots):
    """Dassl's generate_fewshot_dataset for one data source, repeat=False; uses the global `random`."""
    if num_shots < 1:
        return data
    tracker = defaultdict(list)
    for item in data:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        dataset.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return dataset


def coop_fewshot(data, num_shots, seed):
    """What CoOp's train.py does: set_random_seed(cfg.SEED) (random.seed first), then the dataset
    draws the train split's shots before anything else consumes the stream."""
    state = random.getstate()
    try:
        random.seed(seed)
        return ref_generate_fewshot(data, num_shots)
    finally:
        random.setstate(state)


def ours(examples, labels=None):
    labels = [ex.label for ex in examples] if labels is None else list(labels)
    return [(str(ex.path), int(y)) for ex, y in zip(examples, labels)]


def theirs(data):
    return [(d.impath, d.label) for d in data]


# ------------------------------------------------------------------------ every dataset loads


EXPECTED = {  # classes, images per split of the fake copies: the fakes' own arithmetic
    **{n: (5, {"train": sum(TRAIN_SIZES), "val": 5, "test": 10}) for n in SPLIT_DATASETS},
    "fgvc_aircraft": (5, {"train": sum(TRAIN_SIZES), "val": 5, "test": 10}),
    "imagenet": (6, {"train": 3 + 4 + 5 + 6 + 7 + 8, "test": 12}),
    "imagenetv2": (6, {"train": 9, "test": 9}),
    "imagenet_sketch": (6, {"train": 27, "test": 27}),
    "imagenet_a": (3, {"train": 9, "test": 9}),
    "imagenet_r": (3, {"train": 9, "test": 9}),
}


@pytest.mark.parametrize("name", ALL)
def test_every_dataset_reads_as_coop_reads_it(tmp_path, name):
    root = make_any(tmp_path / "data", name)
    ds = get_dataset(name, root)
    ref = reference(root, name)
    classes, counts = EXPECTED[name]
    assert ds.num_classes == classes and {s: len(v) for s, v in ds.splits.items()} == counts
    # Class names: Dassl's label -> classname map of the train split, '_' read as CoOp's prompts read it.
    assert ds.classnames == [c.replace("_", " ") for c in ref_lab2cname(ref["train"])]
    for split, data in ref.items():
        assert ours(ds.splits[split]) == theirs(data), split
    for ex in ds.splits["test"][:2]:
        assert load_image(ex).size == (4, 4)
        assert ex.source_id == ex.path.relative_to(root).as_posix()


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("imagenetv2", *VARIANT_FOLDERS)])
def test_base_and_new_are_coops(tmp_path, name):
    root = make_any(tmp_path / "data", name)
    ds, ref = get_dataset(name, root), reference(root, name)
    base_train, base_test = ref_subsample(ref["train"], ref["test"], subsample="base")
    new_train, new_test = ref_subsample(ref["train"], ref["test"], subsample="new")
    task = build_task(ds, shots=None, seed=1, classes="base", sampler="coop")
    split = task.splits
    assert ours(split["train"].examples, split["train"].labels) == theirs(base_train)
    assert ours(split["test_base"].examples, split["test_base"].labels) == theirs(base_test)
    assert ours(split["test_new"].examples, split["test_new"].labels) == theirs(new_test)
    assert [task.classnames[c] for c in split["train"].classes] == [c.replace("_", " ") for c in ref_lab2cname(base_train)]
    assert [task.classnames[c] for c in split["test_new"].classes] == [c.replace("_", " ") for c in ref_lab2cname(new_train)]
    stable = build_task(ds, shots=None, seed=1, classes="base")  # same images, its own order
    assert sorted(ours(stable.splits["train"].examples, stable.splits["train"].labels)) == sorted(theirs(base_train))


def test_imagenet_labels_follow_the_sorted_folders_not_the_classnames_file(tmp_path):
    ds = get_dataset("imagenet", make_imagenet(tmp_path))
    assert ds.classnames == [WNIDS[w] for w in sorted(WNIDS)]
    assert ds.splits["train"][0].source_id == "imagenet/images/train/n01440764/n01440764_10.JPEG"
    assert ds.splits["test"][-1].source_id == "imagenet/images/val/n01496331/ILSVRC2012_val_00000012.JPEG"
    assert "val" not in ds.splits  # CoOp evaluates on ImageNet's val set: it is the test split


def test_variants_are_test_only_and_a_r_cover_their_own_classes(tmp_path):
    root = make_variant(make_variant(tmp_path, "imagenet_a"), "imagenet_r")
    for name in ("imagenet_a", "imagenet_r"):
        ds = get_dataset(name, root)
        assert ds.classnames == ["goldfish", "tiger shark", "electric ray"]  # 3 of the 6, labelled 0..2
        assert ds.splits["train"] == ds.splits["test"] and ds.fingerprint_extra["test_only"]
        task = build_task(ds, shots=1, seed=1, classes="all")
        assert task.splits["test"].classes == [0, 1, 2]
        assert any("test-only dataset" in note for note in task.notes)
    root = make_imagenetv2(tmp_path / "v2")
    ds = get_dataset("imagenetv2", root)
    assert ds.classnames == [WNIDS[w] for w in sorted(WNIDS)]
    assert ds.splits["test"][0].source_id == "imagenetv2/imagenetv2-matched-frequency-format-val/0/009f3e0.jpeg"


def test_fgvc_class_names_keep_spaces_and_slashes(tmp_path):
    ds = get_dataset("fgvc_aircraft", make_fgvc(tmp_path))
    assert ds.classnames == FGVC_VARIANTS
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    assert ds.splits["train"][0].source_id.startswith("fgvc_aircraft/images/")


def test_sun397_reads_like_oxford_pets(tmp_path):
    ds = get_dataset("sun397", make_split_dataset(tmp_path, "sun397"))
    assert ds.classnames[4] == "shop bakery" and ds.fingerprint_extra["split_file"] == "split_zhou_SUN397.json"
    assert any(ex.source_id.startswith("sun397/SUN397/b/bakery/shop/") for ex in ds.splits["train"])


@pytest.mark.parametrize("name,message", [
    ("imagenet", "folder .*imagenet not found; CoOp's layout is <data root>/imagenet/ with classnames.txt, "
                 "images/train/, images/val/"),
    ("imagenet_a", "folder .*imagenet-adversarial not found"),
    ("fgvc_aircraft", "folder .*fgvc_aircraft not found"),
])
def test_missing_dataset_folder_names_the_layout(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        get_dataset(name, tmp_path)


# ------------------------------------------------------------------------------ CoOp's sampler


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 4, 16])
@pytest.mark.parametrize("classes", ["base", "all"])
def test_coop_sampler_picks_what_dassl_picks(tmp_path, seed, shots, classes):
    root = make_split_dataset(tmp_path, "sun397")
    ds, ref = get_dataset("sun397", root), reference(root, "sun397")
    picked = coop_fewshot(ref["train"], shots, seed)
    if classes == "base":  # CoOp draws the shots of every class, then keeps the base ones
        (picked,) = ref_subsample(picked, subsample="base")
    task = build_task(ds, shots=shots, seed=seed, classes=classes, sampler="coop")
    train = task.splits["train"]
    assert ours(train.examples, train.labels) == theirs(picked)
    assert task.sampler == "coop"
    short = {label: n for label, n in enumerate(TRAIN_SIZES) if n < shots and label in train.classes}
    assert task.short_classes == short


def test_coop_sampler_on_text_file_and_folder_layouts(tmp_path):
    for name in ("fgvc_aircraft", "imagenet"):
        root = make_any(tmp_path / name, name)
        ds, ref = get_dataset(name, root), reference(root, name)
        task = build_task(ds, shots=2, seed=1, classes="all", sampler="coop")
        assert ours(task.splits["train"].examples) == theirs(coop_fewshot(ref["train"], 2, 1))


def test_samplers_differ_and_are_in_the_task_fingerprint(tmp_path):
    ds = get_dataset("food101", make_split_dataset(tmp_path, "food101"))
    stable = build_task(ds, shots=4, seed=1, classes="all")
    coop = build_task(ds, shots=4, seed=1, classes="all", sampler="coop")
    assert stable.sampler == "stable"
    assert set(stable.splits["train"].source_ids) != set(coop.splits["train"].source_ids)
    assert stable.fingerprint() != coop.fingerprint()
    assert coop.fingerprint() == build_task(ds, shots=4, seed=1, classes="all", sampler="coop").fingerprint()
    with pytest.raises(ConfigError, match="unknown few-shot sampler 'dassl'; use one of: stable, coop"):
        build_task(ds, shots=4, seed=1, sampler="dassl")


def test_coop_sampler_keeps_base_picks_across_protocols(tmp_path):
    ds = get_dataset("dtd", make_split_dataset(tmp_path, "dtd"))
    base = build_task(ds, shots=2, seed=2, classes="base", sampler="coop").splits["train"]
    every = build_task(ds, shots=2, seed=2, classes="all", sampler="coop").splits["train"]
    assert base.source_ids == [ex.source_id for ex in every.examples if ex.label in base.classes]


# ------------------------------------------------------------------------------------ templates

# CoOp's zero-shot CLIP prompts and the Skip Tuning code's prompts, by CoOp dataset name.
COOP_PROMPTS = {"OxfordPets": "a photo of a {}, a type of pet.", "OxfordFlowers": "a photo of a {}, a type of flower.",
                "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
                "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
                "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.",
                "Caltech101": "a photo of a {}.", "UCF101": "a photo of a person doing {}.",
                "ImageNet": "a photo of a {}.", "ImageNetSketch": "a photo of a {}.", "ImageNetV2": "a photo of a {}.",
                "ImageNetA": "a photo of a {}.", "ImageNetR": "a photo of a {}."}
SKIPT_PROMPTS = {"ImageNet": "a photo of a {}.", "ImageNetV2": "a photo of a {}.", "ImageNetSketch": "a sketch of a {}.",
                 "ImageNetA": "a bad photo of a {}.", "ImageNetR": "a rendition of a {}.",
                 "Caltech101": "itap of a {}.", "DescribableTextures": "itap of a {}.",
                 "EuroSAT": "a centered satellite photo of {}.", "FGVCAircraft": "a bright photo of a {}, a type of aircraft.",
                 "Food101": "a photo of the nice {}.", "OxfordFlowers": "a close-up photo of a {}.",
                 "OxfordPets": "a bad photo of a {}, a type of pet.", "SUN397": "a photo of a {}.",
                 "StanfordCars": "a photo of the {}, a type of car.", "UCF101": "a photo of a {}, a type of sport."}
OUR_NAME = {"OxfordPets": "oxford_pets", "OxfordFlowers": "oxford_flowers", "FGVCAircraft": "fgvc_aircraft",
            "DescribableTextures": "dtd", "EuroSAT": "eurosat", "StanfordCars": "stanford_cars", "Food101": "food101",
            "SUN397": "sun397", "Caltech101": "caltech101", "UCF101": "ucf101", "ImageNet": "imagenet",
            "ImageNetSketch": "imagenet_sketch", "ImageNetV2": "imagenetv2", "ImageNetA": "imagenet_a",
            "ImageNetR": "imagenet_r"}


def test_template_sets_are_the_two_tables():
    assert {OUR_NAME[k]: v for k, v in COOP_PROMPTS.items()} == {n: t[0] for n, t in TEMPLATES.items() if n in OUR_NAME.values()}
    assert {OUR_NAME[k]: v for k, v in SKIPT_PROMPTS.items()} == SKIPT_TEMPLATES
    for coop_name, name in OUR_NAME.items():
        assert template_for("coop", name, TEMPLATES[name]) == COOP_PROMPTS[coop_name]
        assert template_for("skipt", name, TEMPLATES[name]) == SKIPT_PROMPTS[coop_name]
    assert template_for("coop", "synthetic", ["an image of a {}.", "{}"]) == "an image of a {}."


def test_template_set_errors():
    from skipcache.stages.cache import CacheConfig

    with pytest.raises(ConfigError, match="template set 'skipt' has no template for dataset 'synthetic'"):
        template_for("skipt", "synthetic", ["a {}."])
    with pytest.raises(ConfigError, match="unknown template set 'clip'; use one of: coop, skipt"):
        template_for("clip", "food101", ["a {}."])
    with pytest.raises(ConfigError, match="template set 'skipt' has no template for dataset 'imagefolder'"):
        CacheConfig(dataset="imagefolder", templates="skipt").validate()
    CacheConfig(dataset="imagefolder", templates="skipt", template="a {} photo.").validate()  # --template wins
    with pytest.raises(ConfigError, match="sampler must be one of stable, coop"):
        CacheConfig(dataset="food101", sampler="random").validate()


# --------------------------------------------------------------------------------- check-data


def report_of(name, root):
    report = check_dataset(name, root)
    return report, [(f.level, f.message, f.fix) for f in report.findings]


def one_error(report) -> tuple[str, str]:
    assert not report.ok and len(report.errors) == 1, report.findings
    return report.errors[0].message, report.errors[0].fix


@pytest.mark.parametrize("name", ALL)
def test_check_data_passes_every_fake_copy_and_warns_about_its_size(tmp_path, name):
    root = make_any(tmp_path, name)
    report = check_dataset(name, root)
    classes, counts = EXPECTED[name]
    assert report.ok, report.findings
    assert report.classes == classes
    assert report.images == ({"test": counts["test"]} if report.test_only else counts)
    assert any("published" in w.message for w in report.warnings)  # the fakes are tiny


def test_check_data_missing_split_file(tmp_path):
    root = make_split_dataset(tmp_path, "food101")
    (root / "food-101/split_zhou_Food101.json").unlink()
    message, fix = one_error(check_dataset("food101", root))
    assert message == f"{root}/food-101/split_zhou_Food101.json not found"
    assert fix == (f"download split_zhou_Food101.json from the link in CoOp's DATASETS.md "
                   f"(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#food101) into {root}/food-101/")


def test_check_data_finds_a_split_file_in_the_wrong_place(tmp_path):
    root = make_split_dataset(tmp_path, "ucf101")
    (root / "ucf101/split_zhou_UCF101.json").rename(root / "split_zhou_UCF101.json")
    message, fix = one_error(check_dataset("ucf101", root))
    assert fix == f"found {root}/split_zhou_UCF101.json: move it to {root}/ucf101/split_zhou_UCF101.json"


def test_check_data_counts_missing_images_per_split(tmp_path):
    root = make_split_dataset(tmp_path, "oxford_pets")
    split = json.loads((root / "oxford_pets/split_zhou_OxfordPets.json").read_text())
    gone = [split["train"][0][0], split["train"][5][0], split["test"][3][0]]
    for impath in gone:
        (root / "oxford_pets/images" / impath).unlink()
    report = check_dataset("oxford_pets", root)
    errors = [(f.message, f.fix) for f in report.errors]
    image_dir = root / "oxford_pets/images"
    assert errors[0][0] == (f"2 of {sum(TRAIN_SIZES)} 'train' entries point to no file under {image_dir} "
                            f"(e.g. {gone[0]}, {gone[1]})")
    assert errors[1][0] == f"1 of 10 'test' entries point to no file under {image_dir} (e.g. {gone[2]})"
    assert errors[0][1].startswith(f"the copy is incomplete: extract the images again into {image_dir} "
                                   "(https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz)")


def test_check_data_all_images_one_level_too_deep(tmp_path):
    root = make_split_dataset(tmp_path, "food101")
    nested = root / "food-101/images/images"
    tmp = root / "food-101/tmp"
    shutil.move(root / "food-101/images", tmp)
    nested.parent.mkdir()
    shutil.move(tmp, nested)
    report = check_dataset("food101", root)
    assert len(report.errors) == 3  # train, val, test: every entry missing
    assert report.errors[0].fix.startswith(f"the images are in {nested}: move or rename {nested} to {root}/food-101/images")


def test_check_data_image_folder_under_another_name(tmp_path):
    root = make_split_dataset(tmp_path, "sun397")
    (root / "sun397/SUN397").rename(root / "sun397/sun397_images")
    message, fix = one_error(check_dataset("sun397", root))
    assert message == f"image folder {root}/sun397/SUN397 not found"
    assert fix.startswith(f"the images are in {root}/sun397/sun397_images: move or rename")


def test_check_data_root_is_the_dataset_folder(tmp_path):
    root = make_split_dataset(tmp_path, "dtd")
    message, fix = one_error(check_dataset("dtd", root / "dtd"))
    assert message.startswith(f"{root}/dtd/dtd not found")
    assert fix == f"--data-root {root}/dtd is the dataset folder itself; pass the folder that holds it: --data-root {root}"


def food_renamed(root: Path) -> None:
    make_split_dataset(root, "food101")
    (root / "food-101").rename(root / "food101")


def fgvc_archive_not_renamed(root: Path) -> None:
    make_fgvc(root)
    (root / "fgvc-aircraft-2013b").mkdir()
    (root / "fgvc_aircraft").rename(root / "fgvc-aircraft-2013b/data")


@pytest.mark.parametrize("name,build,found,expected", [
    ("food101", food_renamed, "food101", "food-101"),
    ("fgvc_aircraft", fgvc_archive_not_renamed, "fgvc-aircraft-2013b/data", "fgvc_aircraft"),
])
def test_check_data_dataset_folder_under_another_name(tmp_path, name, build, found, expected):
    build(tmp_path)
    message, fix = one_error(check_dataset(name, tmp_path))
    assert message.startswith(f"{tmp_path / expected} not found")
    assert fix.startswith(f"found {tmp_path / found}/")
    assert f"move or rename {tmp_path / found} to {tmp_path / expected}" in fix


def test_check_data_variant_without_classnames(tmp_path):
    root = make_imagenet(tmp_path)
    make_variant(root, "imagenet_a")
    (root / "imagenet-adversarial/classnames.txt").unlink()
    message, fix = one_error(check_dataset("imagenet_a", root))
    assert message == f"{root}/imagenet-adversarial/classnames.txt not found"
    assert fix == f"copy ImageNet's class names: cp {root}/imagenet/classnames.txt {root}/imagenet-adversarial/classnames.txt"


def test_check_data_variant_extracted_beside_its_folder(tmp_path):
    make_variant(tmp_path, "imagenet_r")
    (tmp_path / "imagenet-rendition/imagenet-r").rename(tmp_path / "imagenet-r")
    message, fix = one_error(check_dataset("imagenet_r", tmp_path))
    assert message == f"image folder {tmp_path}/imagenet-rendition/imagenet-r not found"
    assert fix.startswith(f"the images are in {tmp_path}/imagenet-r: move or rename")


def test_check_data_imagenet_val_not_sorted_into_class_folders(tmp_path):
    root = make_imagenet(tmp_path)
    val = root / "imagenet/images/val"
    for f in list(val.rglob("*.JPEG")):
        f.rename(val / f.name)
    for d in val.iterdir():
        if d.is_dir():
            d.rmdir()
    message, fix = one_error(check_dataset("imagenet", root))
    assert message.startswith(f"imagenet: {val} has no class folders; it holds 12 loose images: "
                              "sort them into one <wnid>/ folder per class")


def test_check_data_imagenet_train_and_val_disagree(tmp_path):
    root = make_imagenet(tmp_path)
    shutil.rmtree(root / "imagenet/images/val/n01484850")
    message, _ = one_error(check_dataset("imagenet", root))
    assert "must hold the same class folders" in message and "only in train: ['n01484850'] (1)" in message


def test_check_data_unknown_class_folder_and_missing_label_folder(tmp_path):
    root = make_variant(tmp_path, "imagenet_sketch")
    put_image(root / "imagenet-sketch/images/n99999999/x.jpg")
    message, _ = one_error(check_dataset("imagenet_sketch", root))
    assert "1 folder(s) of" in message and "are not in" in message and "n99999999" in message
    root = make_imagenetv2(tmp_path / "v2")
    shutil.rmtree(root / "imagenetv2/imagenetv2-matched-frequency-format-val/3")
    message, _ = one_error(check_dataset("imagenetv2", root))
    assert message.startswith(f"imagenetv2: folder {root}/imagenetv2/imagenetv2-matched-frequency-format-val/3 not found")


def test_check_data_fgvc_files(tmp_path):
    root = make_fgvc(tmp_path)
    (root / "fgvc_aircraft/images_variant_val.txt").unlink()
    message, fix = one_error(check_dataset("fgvc_aircraft", root))
    assert message == f"{root}/fgvc_aircraft/images_variant_val.txt not found"
    assert "fgvc-aircraft-2013b.tar.gz" in fix
    (root / "fgvc_aircraft/images_variant_val.txt").write_text("1234567 Concorde\n")
    message, _ = one_error(check_dataset("fgvc_aircraft", root))
    assert message.endswith("images_variant_val.txt line 1 names variant 'Concorde', which is not in variants.txt; "
                            "download the data again")


def test_check_data_malformed_split_file_and_no_root(tmp_path):
    root = make_split_dataset(tmp_path, "eurosat")
    (root / "eurosat/split_zhou_EuroSAT.json").write_text('{"train": []}')
    message, fix = one_error(check_dataset("eurosat", root))
    assert "must be an object with keys 'train', 'val', 'test'" in message and "DATASETS.md#eurosat" in fix
    message, fix = one_error(check_dataset("eurosat", None))
    assert message == "no data root is set"
    assert fix == "pass --data-root DIR (the folder that holds eurosat/) or set SKIPCACHE_DATA"
    with pytest.raises(ConfigError, match="did you mean 'eurosat'"):
        check_dataset("EuroSat-RGB", root)


# ---------------------------------------------------------------------------- the commands


def invoke(*args):
    from skipcache.cli import app

    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def test_check_data_command(tmp_path):
    root = make_split_dataset(tmp_path, "caltech101")
    result = invoke("check-data", "caltech101", "--data-root", root)
    assert result.exit_code == 0, result.output
    assert f"ok: caltech101 in {root}/caltech-101: 5 classes; images: train 76, val 5, test 10" in result.stdout
    assert ("warning: this copy has 5 classes; train 76, val 5, test 10; the published Caltech101 has 100 classes; "
            "train 4,128, val 1,649, test 2,465") in result.stdout
    data = json.loads(invoke("check-data", "caltech101", "--data-root", root, "--json").stdout)
    assert data["ok"] and data["classes"] == 5 and data["images"] == {"train": 76, "val": 5, "test": 10}

    (root / "caltech-101/split_zhou_Caltech101.json").unlink()
    result = invoke("check-data", "caltech101", "--data-root", root)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: {root}/caltech-101/split_zhou_Caltech101.json not found"
    assert lines[1].startswith("  fix: download split_zhou_Caltech101.json from the link in CoOp's DATASETS.md")
    assert lines[-1] == (f"error: caltech101: 1 problem(s) under {root}/caltech-101; CoOp's instructions: "
                         "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md#caltech101")
    result = invoke("check-data", "caltech101", "--data-root", root, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["findings"][0]["level"] == "error"
    assert invoke("check-data", "synthetic").stdout.strip() == "synthetic: built in, nothing to check"
    result = invoke("check-data", "imagenet-r")
    assert result.exit_code == 2 and "did you mean 'imagenet_r'?" in result.stderr


def test_datasets_command_says_what_is_found(tmp_path, monkeypatch):
    root = make_split_dataset(tmp_path, "food101")
    make_variant(root, "imagenet_a")
    (root / "dtd").mkdir()
    listed = {d["name"]: d for d in json.loads(invoke("datasets", "--data-root", root, "--json").stdout)}
    assert listed["food101"]["found"] is True and listed["imagenet_a"]["found"] is True
    assert listed["sun397"] == {**listed["sun397"], "found": False, "status": "no sun397/"}
    assert listed["dtd"]["status"] == "dtd/ lacks images, split_zhou_DescribableTextures.json"
    assert listed["synthetic"]["found"] is None and listed["synthetic"]["status"] == "built in"
    assert len([n for n in listed if not n.startswith("synthetic")]) == 16  # imagefolder + the paper's 15
    monkeypatch.setenv("SKIPCACHE_DATA", str(root))
    text = invoke("datasets").stdout
    assert f"data root: {root}" in text and "check-data" in text
    assert dataset_status("food101") == (True, "")


TINY = ["--model", "tiny", "--pretrained", "none", "--device", "cpu", "--omega", "1"]


def test_cache_key_records_the_template_set_and_the_sampler(tmp_path):
    from skipcache.store import FeatureStore

    root = make_split_dataset(tmp_path / "data", "food101")
    common = ["cache", "--dataset", "food101", "--data-root", root, *TINY, "--shots", "2", "--seed", "3",
              "--root", tmp_path / "s", "--json"]
    result = invoke(*common, "--templates", "skipt", "--sampler", "coop")
    assert result.exit_code == 0, result.output
    cached = json.loads(result.stdout)
    key = cached["key"]
    assert (key["templates"], key["template"], key["sampler"]) == ("skipt", "a photo of the nice {}.", "coop")
    store = FeatureStore.open(Path(cached["path"]))
    (picked,) = ref_subsample(coop_fewshot(reference(root, "food101")["train"], 2, 3), subsample="base")
    assert store.read_source_ids("train") == [Path(d.impath).relative_to(root).as_posix() for d in picked]
    shown = invoke("inspect", cached["path"]).stdout
    assert '"sampler": "coop"' in shown and '"templates": "skipt"' in shown

    default = json.loads(invoke(*common).stdout)
    assert (default["key"]["templates"], default["key"]["template"], default["key"]["sampler"]) == (
        "coop", "a photo of {}, a type of food.", "stable")
    assert default["path"] != cached["path"]
    custom = json.loads(invoke(*common, "--template", "a dish of {}.", "--templates", "skipt").stdout)
    assert (custom["key"]["templates"], custom["key"]["template"]) == ("custom", "a dish of {}.")
    result = invoke("cache", "--dataset", "synthetic", *TINY, "--templates", "skipt", "--root", tmp_path / "s")
    assert result.exit_code == 2 and "template set 'skipt' has no template for dataset 'synthetic'" in result.stderr
