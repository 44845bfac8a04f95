"""Tests of the dataset layer: image loading, registry layouts, errors, protocols, fingerprints."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skipcache.data import Dataset, Example, build_task, get_dataset, list_datasets, load_image
from skipcache.data.registry import DATASETS
from skipcache.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------ fixtures


def save_image(path: Path, mode: str = "RGB", size=(8, 6), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = {"L": 128, "LA": (128, 100), "CMYK": (0, 128, 255, 0), "RGBA": (255, 0, 0, 128), "P": 3}
    color = colors.get(mode, (10, 20, 30))
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def make_imagefolder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            save_image(root / cls / f"img{i:03d}.png")
    return root


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]


def make_food101(root: Path, split: dict | str | None = None, *, images: bool = True) -> Path:
    base = root / "food-101"
    if split is None:
        split = {"train": [], "val": [], "test": []}
        for label, cls in enumerate(FOOD_CLASSES):
            for i in range(4):
                split["train"].append([f"{cls}/{i}.jpg", label, cls])
            split["val"].append([f"{cls}/v.jpg", label, cls])
            split["test"].append([f"{cls}/t.jpg", label, cls])
    if images:
        (base / "images").mkdir(parents=True, exist_ok=True)
        if isinstance(split, dict):
            for entries in split.values():
                for impath, _, _ in entries:
                    save_image(base / "images" / impath, fmt="JPEG")
    base.mkdir(parents=True, exist_ok=True)
    text = split if isinstance(split, str) else json.dumps(split)
    (base / "split_zhou_Food101.json").write_text(text)
    return root


def make_dataset(num_classes: int, train_per_class, test_per_class: int = 2, name: str = "toy") -> Dataset:
    """In-memory dataset; `train_per_class` is an int or a list of counts per class."""
    if isinstance(train_per_class, int):
        train_per_class = [train_per_class] * num_classes
    train = [Example(f"train/c{c}/{i:03d}", c) for c in range(num_classes) for i in range(train_per_class[c])]
    test = [Example(f"test/c{c}/{i:03d}", c) for c in range(num_classes) for i in range(test_per_class)]
    return Dataset(name, [f"class {c}" for c in range(num_classes)], ["a photo of a {}."],
                   {"train": train, "test": test})


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("SKIPCACHE_DATA", raising=False)


# ------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("LA", "PNG"), ("RGB", "JPEG")])
def test_load_image_returns_rgb_for_every_mode(tmp_path, mode, fmt):
    path = save_image(tmp_path / f"x.{fmt.lower()}", mode, fmt=fmt)
    img = load_image(Example("x", 0, path=path))
    assert img.mode == "RGB" and img.size == (8, 6)


def test_load_image_composites_transparency_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_image(Example("c", 0, path=path)).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_loads_as_rgb(tmp_path):
    path = tmp_path / "p.png"
    Image.new("P", (4, 4), 0).save(path, transparency=0)
    assert load_image(Example("p", 0, path=path)).mode == "RGB"


def test_load_image_from_pixels():
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    assert load_image(Example("mem", 0, pixels=pixels)).size == (7, 5)


def test_truncated_and_corrupt_images_name_the_path(tmp_path):
    good = save_image(tmp_path / "good.jpg", size=(64, 64), fmt="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(DataError, match=f"cannot read image {path}"):
            load_image(Example("bad", 0, path=path))
    with pytest.raises(DataError, match="image not found: .*missing.jpg"):
        load_image(Example("m", 0, path=tmp_path / "missing.jpg"))


# -------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_flat_split_is_stratified_and_seeded(tmp_path):
    root = make_imagefolder(tmp_path / "folder", {"golden_retriever": 10, "cat": 10, "ant": 1})
    ds = get_dataset("imagefolder", root)
    assert ds.classnames == ["ant", "cat", "golden retriever"]
    assert ds.templates == ["a photo of a {}."]
    for label in (1, 2):
        counts = [sum(ex.label == label for ex in ds.splits[s]) for s in ("train", "val", "test")]
        assert counts == [5, 2, 3]
    assert [ex.label for ex in ds.splits["train"]].count(0) == 1  # a single image goes to train
    ids = [ex.source_id for s in ds.splits.values() for ex in s]
    assert len(ids) == len(set(ids)) == 21
    assert ds.splits["train"][0].source_id == "ant/img000.png"
    assert get_dataset("imagefolder", root).fingerprint() == ds.fingerprint()
    other = get_dataset("imagefolder", root, split_seed=1)
    assert other.fingerprint() != ds.fingerprint()
    assert {ex.source_id for ex in other.splits["test"]} != {ex.source_id for ex in ds.splits["test"]}


def test_imagefolder_split_layout_and_env_root(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    make_imagefolder(root / "train", {"a_b": 3, "c": 2})
    make_imagefolder(root / "test", {"a_b": 1, "c": 1})
    make_imagefolder(root / "val", {"c": 1})
    monkeypatch.setenv("SKIPCACHE_DATA", str(root))
    ds = get_dataset("imagefolder", None)
    assert ds.classnames == ["a b", "c"]
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [5, 1, 2]
    assert ds.splits["val"][0].label == 1 and ds.splits["val"][0].source_id == "val/c/img000.png"


@pytest.mark.parametrize("build,message", [
    (lambda r: r.mkdir(), "has no class subfolders"),
    (lambda r: (r / "empty").mkdir(parents=True), "class folder .*empty holds no images"),
    (lambda r: (make_imagefolder(r / "train", {"a": 1}), make_imagefolder(r, {"dog": 1})), "mixes split folders"),
    (lambda r: make_imagefolder(r / "train", {"a": 1}), "has split folders but no test/"),
])
def test_imagefolder_errors(tmp_path, build, message):
    root = tmp_path / "folder"
    build(root)
    with pytest.raises(DataError, match=message):
        get_dataset("imagefolder", root)


# ----------------------------------------------------------------------------------- CoOp layouts


def test_food101_coop_layout(tmp_path):
    root = make_food101(tmp_path)
    ds = get_dataset("food101", root)
    assert ds.classnames == ["apple pie", "baby back ribs", "baklava"]
    assert ds.templates == ["a photo of {}, a type of food."]
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [12, 3, 3]
    ex = ds.splits["train"][4]
    assert (ex.source_id, ex.label) == ("food-101/images/baby_back_ribs/0.jpg", 1)
    assert load_image(ex).mode == "RGB"
    assert "split_sha256" in ds.fingerprint_extra


def test_label_order_comes_from_the_split_file(tmp_path):
    split = {"train": [["z/0.jpg", 0, "zebra_cake"], ["a/0.jpg", 1, "apple"]], "val": [],
             "test": [["a/1.jpg", 1, "apple"]]}
    ds = get_dataset("food101", make_food101(tmp_path, split))
    assert ds.classnames == ["zebra cake", "apple"]


def test_image_missing_from_disk_is_reported_on_load(tmp_path):
    root = make_food101(tmp_path)
    (root / "food-101/images/baklava/t.jpg").unlink()
    ds = get_dataset("food101", root)  # listing does not open files
    with pytest.raises(DataError, match="image not found: .*baklava/t.jpg"):
        load_image(ds.splits["test"][2])


def test_other_coop_datasets_share_the_loader(tmp_path):
    split = {"train": [["banded/0.jpg", 0, "banded"], ["dotted/0.jpg", 1, "dotted"]], "val": [],
             "test": [["dotted/1.jpg", 1, "dotted"]]}
    (tmp_path / "dtd/images").mkdir(parents=True)
    (tmp_path / "dtd/split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    ds = get_dataset("dtd", tmp_path)
    assert ds.templates == ["{} texture."] and ds.splits["test"][0].source_id == "dtd/images/dotted/1.jpg"


def entry_list(*entries):
    return {"train": list(entries), "val": [], "test": [["a/1.jpg", 0, "a"]]}


@pytest.mark.parametrize("split,message", [
    ("{not json", r"split file .*split_zhou_Food101.json is not valid JSON"),
    ({"train": [], "test": []}, r"must be an object with keys 'train', 'val', 'test'; found \['test', 'train'\]"),
    ([1, 2], "must be an object with keys .* found list"),
    ({"train": {}, "val": [], "test": []}, "'train' must be a list"),
    (entry_list(["a/0.jpg", 0, "a"], ["a/0.jpg", "0", "a"]), r"'train' entry 1 is \['a/0.jpg', '0', 'a'\]"),
    (entry_list(["a/0.jpg", 0]), "'train' entry 0 is .* expected \\[impath: str, label: int, classname: str\\]"),
    (entry_list(["/etc/0.jpg", 0, "a"]), "'train' entry 0 .* expected a relative image path"),
    (entry_list(["a/0.jpg", 0, "b"]), "'test' entry 0: label 0 is named 'a' here but 'b' before"),
    (entry_list(["a/0.jpg", 1, "a"]), "'test' entry 0: class 'a' has label 0 here but 1 before"),
    (entry_list(["c/0.jpg", 2, "c"]), "label 1 never occurs"),
])
def test_malformed_split_files(tmp_path, split, message):
    root = make_food101(tmp_path, split, images=False)
    (root / "food-101/images").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=message):
        get_dataset("food101", root)


def test_missing_coop_files_name_the_expected_paths(tmp_path):
    with pytest.raises(DataError, match="food101: folder .*food-101 not found; CoOp's layout is <data root>/food-101/ "
                                        "with images/, split_zhou_Food101.json .*skipcache check-data food101"):
        get_dataset("food101", tmp_path)
    (tmp_path / "food-101").mkdir()
    with pytest.raises(DataError, match="food101: image folder .*food-101/images not found; expected"):
        get_dataset("food101", tmp_path)
    (tmp_path / "food-101/images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split file .*food-101/split_zhou_Food101.json not found.*comes from CoOp"):
        get_dataset("food101", tmp_path)


# ------------------------------------------------------------------------------------------ registry


def test_registry_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'; known datasets: .*imagefolder, imagenet, "
                                          r"caltech101, .*food101, .*imagenet_r \(`skipcache datasets` describes them\)"):
        get_dataset("nope", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet-a' \(did you mean 'imagenet_a'\?\); known"):
        get_dataset("imagenet-a", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown dataset 'DescribableTextures' \(did you mean 'dtd'\?\)"):
        get_dataset("DescribableTextures", tmp_path)
    with pytest.raises(DataError, match="needs a data root; pass --data-root DIR or set SKIPCACHE_DATA"):
        get_dataset("food101", None)
    with pytest.raises(DataError, match="data root .*nowhere is not a folder"):
        get_dataset("food101", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="takes no option 'shots'; its options are: split_seed"):
        get_dataset("imagefolder", tmp_path, shots=4)
    assert {"imagefolder", "food101", "caltech101", "stanford_cars"} <= set(DATASETS)
    assert all(info.needs_root for info in list_datasets() if info.name in ("imagefolder", "food101"))


@pytest.fixture
def fake_synthworld(monkeypatch):
    """Stand-ins for `skipcache.synthworld.tasks` and `skipcache.data.synthetic`."""
    calls = []
    tasks = types.ModuleType("skipcache.synthworld.tasks")
    tasks.TASKS = {"synthetic": types.SimpleNamespace(description="shapes"), "synthetic-noise": object()}
    synthetic = types.ModuleType("skipcache.data.synthetic")

    def load_synthetic(task, *, num_classes=None, seed=0, image_size=48):
        calls.append((task, num_classes, seed, image_size))
        return make_dataset(num_classes or 4, 3, name=task)

    synthetic.load_synthetic = load_synthetic
    monkeypatch.setitem(sys.modules, "skipcache.synthworld.tasks", tasks)
    monkeypatch.setitem(sys.modules, "skipcache.data.synthetic", synthetic)
    return calls


def test_synthetic_tasks_are_registered_without_a_root(fake_synthworld):
    infos = {info.name: info for info in list_datasets()}
    assert not infos["synthetic"].needs_root and infos["synthetic"].description == "shapes"
    assert "synthetic-noise" in infos
    ds = get_dataset("synthetic-noise", None, num_classes=5, seed=3)
    assert ds.num_classes == 5 and fake_synthworld == [("synthetic-noise", 5, 3, 48)]
    with pytest.raises(ConfigError, match="takes no option 'colour'; its options are: num_classes, seed, image_size"):
        get_dataset("synthetic", None, colour=1)


def test_real_synthetic_task_builds_a_task():
    pytest.importorskip("skipcache.synthworld.tasks")
    pytest.importorskip("skipcache.data.synthetic")
    ds = get_dataset("synthetic", None, num_classes=4)
    task = build_task(ds, shots=2, seed=1, classes="base")
    assert task.splits["train"].classes == [0, 1]


# ------------------------------------------------------------------------------------------ protocols


@pytest.mark.parametrize("m,base", [(5, [0, 1, 2]), (4, [0, 1]), (2, [0])])
def test_base_new_takes_first_ceil_half(m, base):
    task = build_task(make_dataset(m, 4), shots=2, seed=0, classes="base")
    new = [c for c in range(m) if c not in base]
    assert task.classnames == [f"class {c}" for c in range(m)]
    assert set(task.splits) == {"train", "test_base", "test_new"}
    assert task.splits["train"].classes == task.splits["test_base"].classes == base
    assert task.splits["test_new"].classes == new
    for split in task.splits.values():
        globals_ = [ex.label for ex in split.examples]
        assert [split.classes[i] for i in split.labels] == globals_
        assert split.labels.dtype == np.int64 and set(globals_) == set(split.classes)
    assert len(task.splits["train"]) == 2 * len(base)


def test_all_protocol():
    task = build_task(make_dataset(3, 5), shots=None, seed=0, classes="all")
    assert set(task.splits) == {"train", "test"} and len(task.splits["train"]) == 15
    assert task.splits["test"].classes == [0, 1, 2] and list(task.splits["test"].labels) == [0, 0, 1, 1, 2, 2]


def test_k_shot_is_deterministic_and_independent_of_listing_order():
    ds = make_dataset(4, 20)
    first = build_task(ds, shots=4, seed=7, classes="all").splits["train"].source_ids
    assert first == build_task(ds, shots=4, seed=7, classes="all").splits["train"].source_ids
    shuffled = list(ds.splits["train"])
    random.Random(0).shuffle(shuffled)
    ds2 = Dataset(ds.name, ds.classnames, ds.templates, {"train": shuffled, "test": ds.splits["test"]})
    assert build_task(ds2, shots=4, seed=7, classes="all").splits["train"].source_ids == first
    assert build_task(ds, shots=4, seed=8, classes="all").splits["train"].source_ids != first
    # A base class gets the same images under either protocol.
    base = build_task(ds, shots=4, seed=7, classes="base").splits["train"].source_ids
    assert base == first[:8]
    counts = np.bincount([ex.label for ex in build_task(ds, shots=4, seed=7, classes="all").splits["train"].examples])
    assert list(counts) == [4, 4, 4, 4]


def test_short_classes_take_all_and_are_noted():
    task = build_task(make_dataset(2, [5, 2]), shots=4, seed=0, classes="all")
    assert np.bincount(task.splits["train"].labels).tolist() == [4, 2]
    assert task.short_classes == {1: 2} and "has only 2 training images" in task.notes[0]
    for shots in (None, 0):
        task = build_task(make_dataset(2, [5, 2]), shots=shots, seed=0, classes="all")
        assert len(task.splits["train"]) == 7 and task.shots is None and not task.notes


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(shots=1, seed=0, classes="new"), ConfigError, "unknown class protocol 'new'"),
    (dict(shots=-1, seed=0), ConfigError, "shots must be a whole number >= 0"),
    (dict(shots=1.5, seed=0), ConfigError, "shots must be a whole number >= 0"),
    (dict(shots=1, seed=-2), ConfigError, "seed must be a whole number >= 0"),
])
def test_build_task_rejects_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_task(make_dataset(4, 2), **kwargs)


def test_build_task_rejects_bad_datasets():
    with pytest.raises(ConfigError, match="base-to-new needs at least 2 classes"):
        build_task(make_dataset(1, 2), shots=1, seed=0, classes="base")
    ds = make_dataset(2, 2)
    del ds.splits["test"]
    with pytest.raises(DataError, match="has no 'test' split"):
        build_task(ds, shots=1, seed=0)
    ds = make_dataset(2, 2)
    ds.splits["train"].append(Example("bad", 7))
    with pytest.raises(DataError, match=r"example 4 \(bad\) has label 7, outside 0..1"):
        build_task(ds, shots=1, seed=0)


def test_task_fingerprint_follows_membership_and_settings():
    ds = make_dataset(4, 6)
    fp = build_task(ds, shots=2, seed=0).fingerprint()
    assert fp == build_task(make_dataset(4, 6), shots=2, seed=0).fingerprint()
    assert build_task(ds, shots=0, seed=0).fingerprint() == build_task(ds, shots=None, seed=0).fingerprint()
    others = {build_task(ds, shots=3, seed=0).fingerprint(), build_task(ds, shots=2, seed=1).fingerprint(),
              build_task(ds, shots=2, seed=0, classes="all").fingerprint(),
              build_task(make_dataset(4, [6, 6, 6, 7]), shots=2, seed=0).fingerprint(),
              build_task(make_dataset(4, 6, test_per_class=3), shots=2, seed=0).fingerprint()}
    assert fp not in others and len(others) == 5


def test_task_fingerprint_changes_when_a_file_is_added(tmp_path):
    root = make_imagefolder(tmp_path / "f", {"a": 4, "b": 4, "c": 4})
    fp = build_task(get_dataset("imagefolder", root), shots=1, seed=0).fingerprint()
    save_image(root / "c" / "extra.png")
    assert build_task(get_dataset("imagefolder", root), shots=1, seed=0).fingerprint() != fp
