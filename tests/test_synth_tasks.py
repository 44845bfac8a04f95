"""The synthetic tasks whose class sets differ from the 100 colour-shape classes: the cross-dataset
targets and `synthetic-shades`, the base-to-new task of the demo."""

from __future__ import annotations

import hashlib
import re
from dataclasses import fields

import numpy as np
import pytest
import torch
from safetensors import safe_open

from skipcache.data import get_dataset, list_datasets
from skipcache.data.synthetic import SYNTHETIC_TEMPLATES, load_synthetic
from skipcache.loading import BUILTIN_WEIGHTS, WEIGHTS_DIR, tokenizer_for
from skipcache.synthworld.captions import caption_vocabulary, position_phrase, size_word
from skipcache.synthworld.render import COLOUR_RGB, COLOURS, SHAPES, TEXTURES
from skipcache.synthworld.tasks import SHADE_SHAPES, SHADE_SHIFT, SHADE_TOWARDS, TASKS, make_scenes, make_split
from skipcache.synthworld.weights import KEPT_IDS_KEY

NEW_TASKS = {  # task -> number of classes
    "synthetic-textures": 40,
    "synthetic-sizes": 30,
    "synthetic-positions": 90,
    "synthetic-shapes": 10,
    "synthetic-colours": 10,
    "synthetic-shades": 50,
}
# sha256 prefix of every scene attribute of make_scenes(task, "train", 2, 0): the colour-shape
# tasks' data must never change without a RENDER_VERSION bump.
TASK_SCENES_V2 = {  # golden: change only with a RENDER_VERSION bump
    "synthetic": "f7d38e1975f9bc5b",
    "synthetic-plain": "04ea909f6a8f705c",
    "synthetic-sketch": "bc20bf9350dd1078",
    "synthetic-noise": "b8e586bed9215796",
    "synthetic-palette": "474c9c77d5ecbfc0",
}
SHADES_SCENES_V2 = "620ee82d302d2f0e"  # golden, as above


def _templates(task: str) -> list[str]:
    return list(TASKS[task].templates or SYNTHETIC_TEMPLATES)


def test_registry_lists_the_new_tasks():
    infos = {info.name: info for info in list_datasets()}
    for task in NEW_TASKS:
        assert task in infos and not infos[task].needs_root
        assert infos[task].description == TASKS[task].description != ""


@pytest.mark.parametrize("task", sorted(NEW_TASKS))
def test_class_counts_and_names(task):
    names = TASKS[task].classnames()
    assert len(names) == NEW_TASKS[task] and len(set(names)) == len(names)
    assert names != TASKS["synthetic"].classnames()[: len(names)]


@pytest.mark.parametrize("task", sorted(NEW_TASKS))
def test_make_split_labels_and_determinism(task):
    k = NEW_TASKS[task]
    images, labels, names = make_split(task, "train", 1, seed=0, size=24)
    assert images.shape == (k, 24, 24, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == list(range(k))
    assert names == TASKS[task].classnames()
    few, few_labels, few_names = make_split(task, "train", 2, seed=0, size=24, num_classes=5)
    assert few.shape[0] == 10 and few_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and few_names == names[:5]
    again, _, _ = make_split(task, "train", 2, seed=0, size=24, num_classes=5)
    assert again.tobytes() == few.tobytes()
    # Every split and seed draws its own images (no two share a generator seed).
    for split, seed in (("val", 0), ("test", 0), ("train", 1)):
        assert not np.array_equal(make_split(task, split, 2, seed=seed, size=24, num_classes=5)[0], few)
    with pytest.raises(ValueError, match="num_classes"):
        make_split(task, "test", 1, 0, num_classes=k + 1)


def test_scenes_show_what_the_class_names_say():
    sc, labels, names = make_scenes("synthetic-textures", "test", 3, 0)
    assert all(names[y].split() == [TEXTURES[t], SHAPES[s]]
               for y, t, s in zip(labels.tolist(), sc.texture.tolist(), sc.shape.tolist()))
    assert (sc.style == 0).all()

    sc, labels, names = make_scenes("synthetic-sizes", "test", 5, 0)
    assert all(names[y] == f"{size_word(z)} {SHAPES[s]}"
               for y, z, s in zip(labels.tolist(), sc.size.tolist(), sc.shape.tolist()))
    assert ((sc.cx.abs() + sc.size <= 0.95 + 1e-6) & (sc.cy.abs() + sc.size <= 0.95 + 1e-6)).all()

    sc, labels, names = make_scenes("synthetic-positions", "test", 5, 0)
    assert all(names[y] == f"{SHAPES[s]} {position_phrase(x, yy)}"
               for y, s, x, yy in zip(labels.tolist(), sc.shape.tolist(), sc.cx.tolist(), sc.cy.tolist()))
    assert ((sc.cx.abs() + sc.size <= 1.0) & (sc.cy.abs() + sc.size <= 1.0)).all()

    sc, labels, names = make_scenes("synthetic-shapes", "test", 20, 0)
    assert [names[y] for y in labels.tolist()] == [SHAPES[s] for s in sc.shape.tolist()]
    assert len(set(sc.colour.tolist())) == len(COLOURS)  # colours vary within the task

    sc, labels, names = make_scenes("synthetic-colours", "test", 20, 0)
    assert [names[y] for y in labels.tolist()] == [COLOURS[c] for c in sc.colour.tolist()]
    assert len(set(sc.shape.tolist())) == len(SHAPES)


def test_class_names_and_prompts_use_only_the_pretraining_vocabulary():
    vocabulary = set(caption_vocabulary())
    tokenizer = tokenizer_for("synth-vit")
    with safe_open(str(WEIGHTS_DIR / BUILTIN_WEIGHTS["synth"]["synth-vit"]), framework="pt") as f:
        kept = set(f.get_tensor(KEPT_IDS_KEY).tolist())
    for task in NEW_TASKS:
        names = TASKS[task].classnames()
        for name in names:
            assert set(re.findall(r"[a-z\-]+|[^\sa-z]", name)) <= vocabulary, (task, name)
        prompts = [t.format(n) for t in _templates(task) for n in names]
        ids = set(torch.unique(tokenizer(prompts)).tolist())
        assert ids <= kept, (task, sorted(ids - kept))


def test_load_synthetic_uses_the_task_templates():
    ds = load_synthetic("synthetic-positions", num_classes=3, train_per_class=1, val_per_class=1, test_per_class=1,
                        image_size=32)
    assert ds.templates == list(TASKS["synthetic-positions"].templates) and ds.templates[0] == "an image of a {}."
    assert ds.classnames == ["circle in the top left", "square in the top left", "triangle in the top left"]
    via_registry = get_dataset("synthetic-textures", num_classes=2, train_per_class=1, val_per_class=1,
                               test_per_class=1, image_size=32)
    assert via_registry.templates == SYNTHETIC_TEMPLATES and via_registry.classnames == ["solid circle", "solid square"]
    old = load_synthetic("synthetic", num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1, image_size=32)
    assert old.templates == SYNTHETIC_TEMPLATES


@pytest.mark.parametrize("task", sorted(TASK_SCENES_V2))
def test_colour_shape_tasks_scenes_are_pinned_for_render_version_2(task):
    sc, labels, names = make_scenes(task, "train", 2, 0)
    h = hashlib.sha256()
    for f in fields(sc):
        h.update(getattr(sc, f.name).contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == TASK_SCENES_V2[task]
    assert len(names) == 100 and TASKS[task].templates == () and TASKS[task].classes == "colour-shape"


def test_shades_halves_name_different_colours_and_the_same_shapes():
    names = TASKS["synthetic-shades"].classnames()
    assert names[:6] == ["red circle", "red square", "red triangle", "red star", "red cross", "orange circle"]
    base, new = names[:25], names[25:]  # the base-to-new protocol's halves (first ceil(M/2) labels are base)
    words = [{n.split()[i] for n in half} for half in (base, new) for i in (0, 1)]  # colours, shapes
    assert words[0] == set(COLOURS[:5]) and words[2] == set(COLOURS[5:])
    assert words[1] == words[3] == set(SHADE_SHAPES)


def test_shades_scenes_draw_each_colour_in_its_own_shade():
    sc, labels, names = make_scenes("synthetic-shades", "test", 20, 0)
    drawn = [f"{COLOURS[c]} {SHAPES[s]}" for c, s in zip(sc.colour.tolist(), sc.shape.tolist())]
    assert [names[y] for y in labels.tolist()] == drawn
    towards = torch.tensor([COLOURS.index(SHADE_TOWARDS[c]) for c in COLOURS])
    offset = SHADE_SHIFT * (COLOUR_RGB[towards] - COLOUR_RGB)  # (10, 3)
    for c in range(len(COLOURS)):
        # the tint is the shade's offset plus sample_scenes' jitter (std 0.04): 100 scenes a colour
        mean_tint = sc.tint[sc.colour == c].mean(0)
        assert (mean_tint - offset[c]).abs().max() < 0.02, COLOURS[c]
    # the colours move different ways: their mean offset is small next to a typical one (no shift
    # shared by every class), and each shade is still nearest (in RGB) to the colour that names it
    assert offset.mean(0).norm() < 0.25 * offset.norm(dim=1).mean()
    assert torch.cdist(COLOUR_RGB + offset, COLOUR_RGB).argmin(1).tolist() == list(range(len(COLOURS)))
    # backgrounds stay apart from the shade drawn, as sample_scenes keeps them from the named colour
    obj = (COLOUR_RGB[sc.colour] + sc.tint).clamp(0, 1)  # (N, 3)
    far = (sc.bg_rgb - obj[:, None, :]).norm(dim=-1) >= 0.45  # (N, 2)
    complement = ((1.0 - obj[:, None, :]) * 0.8 + 0.1 - sc.bg_rgb).abs().amax(-1) < 1e-6  # (N, 2)
    assert (far | complement).all() and complement.any()


def test_shades_scenes_are_pinned_for_render_version_2():
    sc, _, _ = make_scenes("synthetic-shades", "train", 2, 0)
    h = hashlib.sha256()
    for f in fields(sc):
        h.update(getattr(sc, f.name).contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == SHADES_SCENES_V2
