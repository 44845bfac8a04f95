"""Downstream synthetic tasks: which classes, which rendering domain, which split seeds.

This module owns the `TASKS` registry and `make_split`, the deterministic function that turns
(task, split, seed) into images and labels. The built-in `synthetic*` datasets are made of
these splits. A task is a class set (`CLASS_SETS`) rendered in a domain:

- the colour-shape tasks (`synthetic`, `-plain`, `-sketch`, `-noise`, `-palette`) share the 100
  classes of `captions.colour_shape_classnames` (label = colour_id * 10 + shape_id) and differ in
  the rendering domain, so a model adapted on one task can be tested for domain generalization;
- the other tasks (`-textures`, `-sizes`, `-positions`, `-shapes`, `-colours`) render in the
  domain of `synthetic` but name other attributes, so a model adapted on `synthetic` can be tested
  across class sets (CoOp's cross-dataset protocol). Their class names use only words the
  pretraining captions produce (`captions.caption_vocabulary`), and each attribute a class names
  is drawn well inside the bucket that the captions' wording uses (`size_word`, `position_phrase`);
- `synthetic-shades` is the base-to-new task: 50 colour-shape classes, colour-major, whose colours
  this task draws in its own shades (`SHADE_TOWARDS`). Its base half (red to cyan) and new half
  (blue to white) name different colours, so what tuning learns about the base classes' shades
  says nothing about the new classes' (docs/results.md argues the design).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from skipcache.synthworld.captions import colour_shape_classnames, position_phrase
from skipcache.synthworld.render import COLOUR_RGB, COLOURS, SHAPES, TEXTURES, Scenes, render, sample_scenes

# Bump when a change to render.py, sampling or this module changes any pixel of a split.
RENDER_VERSION = 2  # 2: every (task, split, seed) gets its own generator seed
SPLITS = ("train", "val", "test")
_CHUNK = 512  # scenes rendered at once; bounds peak memory (~50 MB of float32 at 48 px)

# Object radius range per size word, inside the caption buckets (small < 0.3 <= medium <= 0.45 < large).
SIZE_RANGES = {"small": (0.18, 0.26), "medium": (0.33, 0.42), "large": (0.50, 0.62)}
# A 3x3 grid, row-major from the top left: (row, column) with +1 = top / right.
GRID_CELLS = [(r, c) for r in (1, 0, -1) for c in (-1, 0, 1)]
POSITION_WORDS = [position_phrase(0.6 * c, 0.6 * r) for r, c in GRID_CELLS]  # "in the top left", ...
_CELL_OFFSET, _CELL_JITTER, _POSITION_SIZE = 0.55, 0.12, (0.20, 0.30)  # |centre| in 0.43..0.67 off-centre
# `synthetic-shades`: its shapes, and each colour's shade, SHADE_SHIFT of the way (in RGB) towards
# another colour. The colours move in different directions and by different amounts (their mean
# offset is a sixth of a typical one), so the shades are class-specific cues, not one shift that
# all classes share.
SHADE_SHAPES = SHAPES[:5]
SHADE_TOWARDS = {"red": "orange", "orange": "yellow", "yellow": "green", "green": "cyan", "cyan": "blue",
                 "blue": "purple", "purple": "pink", "pink": "white", "brown": "red", "white": "cyan"}
SHADE_SHIFT = 0.4
_MIN_CONTRAST = 0.45  # as `render.sample_scenes`: a background this close to the object is replaced


# ----------------------------------------------------------------------------- class sets
# A class set names its classes and draws the scenes of given labels. Every sampler takes
# (labels (N,) int64, generator, domain) and returns N scenes; labels are attribute-major:
# label = attribute_id * len(SHAPES) + shape_id for the attribute-shape sets.


def _colour_shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    return sample_scenes(len(labels), g, domain, classes=labels)


def _random_colour_scenes(shape: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    """Scenes of the given shapes in colours drawn uniformly."""
    colour = torch.randint(0, len(COLOURS), shape.shape, generator=g)
    return sample_scenes(len(shape), g, domain, classes=colour * len(SHAPES) + shape)


def _texture_shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    scenes = _random_colour_scenes(labels % len(SHAPES), g, domain)
    scenes.texture = labels // len(SHAPES)
    scenes.style = torch.zeros_like(scenes.style)  # an outline shows no texture
    return scenes


def _size_shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    scenes = _random_colour_scenes(labels % len(SHAPES), g, domain)
    bounds = torch.tensor(list(SIZE_RANGES.values()))[labels // len(SHAPES)]  # (N, 2)
    size = bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * torch.rand(len(labels), generator=g)
    # Keep the object in the frame (the offset shrinks with the room it has) and the clutter's
    # size relative to the object's, as `sample_scenes` draws them.
    scale = (0.95 - size).clamp(min=0.0) / (0.95 - scenes.size).clamp(min=1e-6)
    scenes.cx, scenes.cy = scenes.cx * scale, scenes.cy * scale
    scenes.clutter[:, :, 1] *= (size / scenes.size)[:, None]
    scenes.size = size
    return scenes


def _position_shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    scenes = _random_colour_scenes(labels % len(SHAPES), g, domain)
    n = len(labels)
    cell = torch.tensor(GRID_CELLS, dtype=torch.float32)[labels // len(SHAPES)]  # (N, 2) row, col
    lo, hi = _POSITION_SIZE
    size = lo + (hi - lo) * torch.rand(n, generator=g)
    scenes.cx = cell[:, 1] * _CELL_OFFSET + (2 * torch.rand(n, generator=g) - 1) * _CELL_JITTER
    scenes.cy = cell[:, 0] * _CELL_OFFSET + (2 * torch.rand(n, generator=g) - 1) * _CELL_JITTER
    scenes.clutter[:, :, 1] *= (size / scenes.size)[:, None]
    scenes.size = size
    return scenes


def _shaded_colour_shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    """Colour-shape scenes (label = colour_id * len(SHADE_SHAPES) + shape_id) in the task's shades."""
    colour, shape = labels // len(SHADE_SHAPES), labels % len(SHADE_SHAPES)
    scenes = sample_scenes(len(labels), g, domain, classes=colour * len(SHAPES) + shape)
    towards = torch.tensor([COLOURS.index(SHADE_TOWARDS[c]) for c in COLOURS])  # (10,)
    offset = SHADE_SHIFT * (COLOUR_RGB[towards] - COLOUR_RGB)  # (10, 3)
    scenes.tint = scenes.tint + offset[colour]
    # The background was kept apart from the named colour; keep it apart from the shade drawn.
    obj = (COLOUR_RGB[colour] + scenes.tint).clamp(0, 1)  # (N, 3)
    near = (scenes.bg_rgb - obj[:, None, :]).norm(dim=-1, keepdim=True) < _MIN_CONTRAST  # (N, 2, 1)
    complement = (1.0 - obj[:, None, :]) * 0.8 + 0.1  # (N, 1, 3)
    scenes.bg_rgb = torch.where(near, complement.expand_as(scenes.bg_rgb), scenes.bg_rgb)
    return scenes


def _shape_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    return _random_colour_scenes(labels, g, domain)


def _colour_scenes(labels: torch.Tensor, g: torch.Generator, domain: str) -> Scenes:
    shape = torch.randint(0, len(SHAPES), labels.shape, generator=g)
    return sample_scenes(len(labels), g, domain, classes=labels * len(SHAPES) + shape)


@dataclass(frozen=True)
class ClassSet:
    """A list of classes and how to draw scenes of them.

    Attributes:
        names: the class names in label order.
        sampler: `sampler(labels, generator, domain) -> Scenes`.
    """

    names: tuple[str, ...]
    sampler: Callable[[torch.Tensor, torch.Generator, str], Scenes]


CLASS_SETS: dict[str, ClassSet] = {
    "colour-shape": ClassSet(tuple(colour_shape_classnames()), _colour_shape_scenes),
    "texture-shape": ClassSet(tuple(f"{t} {s}" for t in TEXTURES for s in SHAPES), _texture_shape_scenes),
    "size-shape": ClassSet(tuple(f"{z} {s}" for z in SIZE_RANGES for s in SHAPES), _size_shape_scenes),
    "position-shape": ClassSet(tuple(f"{s} {p}" for p in POSITION_WORDS for s in SHAPES), _position_shape_scenes),
    "shaded-colour-shape": ClassSet(tuple(f"{c} {s}" for c in COLOURS for s in SHADE_SHAPES),
                                    _shaded_colour_shape_scenes),
    "shape": ClassSet(tuple(SHAPES), _shape_scenes),
    "colour": ClassSet(tuple(COLOURS), _colour_scenes),
}


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task.

    Attributes:
        name: registry key.
        domain: rendering domain passed to `sample_scenes`.
        description: one line for listings.
        classes: key of `CLASS_SETS`.
        templates: prompt templates (one `{}` for the class name), the default first; empty for
            `skipcache.data.synthetic.SYNTHETIC_TEMPLATES`.
    """

    name: str
    domain: str
    description: str
    classes: str = "colour-shape"
    templates: tuple[str, ...] = ()

    def classnames(self) -> list[str]:
        """The task's classes in label order."""
        return list(CLASS_SETS[self.classes].names)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("synthetic", "shifted", "100 colour-shape classes; small objects, clutter, noise"),
        TaskSpec("synthetic-plain", "plain", "100 colour-shape classes; large centred objects, plain backgrounds"),
        TaskSpec("synthetic-sketch", "sketch", "the synthetic classes drawn as outlines"),
        TaskSpec("synthetic-noise", "noise", "the synthetic classes under heavy pixel noise"),
        TaskSpec("synthetic-palette", "palette", "the synthetic classes on unusual palettes with colour casts"),
        TaskSpec("synthetic-textures", "shifted", "40 texture-shape classes (striped star...); any colour",
                 classes="texture-shape"),
        TaskSpec("synthetic-sizes", "shifted", "30 size-shape classes (small star, medium star, large star); any colour",
                 classes="size-shape"),
        TaskSpec("synthetic-positions", "shifted", "90 shape-position classes (star in the top left...); any colour",
                 classes="position-shape",
                 templates=("an image of a {}.", "there is a {}.", "a photo of a {}.", "{}")),
        TaskSpec("synthetic-shapes", "shifted", "10 shape classes; any colour", classes="shape"),
        TaskSpec("synthetic-colours", "shifted", "10 colour classes; any shape", classes="colour",
                 templates=("a photo of a {} shape.", "a {} shape.", "the shape is {}.", "{}")),
        TaskSpec("synthetic-shades", "palette",
                 "50 colour-shape classes drawn in the task's own shade of each colour; base and new name different colours",
                 classes="shaded-colour-shape"),
    ]
}


def split_seed(task: str, split: str, seed: int) -> int:
    """A stable 32-bit generator seed that differs for every (task, split, seed) (sha256).

    32 bits because torch's CPU generator keeps only the low 32 bits of a seed: a wider hash
    would let different splits collide on the same stream (train images reappearing in test).
    """
    return int.from_bytes(hashlib.sha256(f"{task}/{split}/{seed}".encode()).digest()[:4], "little")


def make_scenes(task: str, split: str, n_per_class: int, seed: int,
                num_classes: int | None = None) -> tuple[Scenes, torch.Tensor, list[str]]:
    """The scenes of one split of a task, before rendering (see `make_split`).

    Returns:
        scenes (N of them, on the CPU), labels (N,) int64 in class-major order, the class names.

    Raises:
        ValueError: unknown task or split, or counts out of range.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    spec = TASKS[task]
    classnames = spec.classnames()
    k = len(classnames) if num_classes is None else num_classes
    if not 1 <= k <= len(classnames):
        raise ValueError(f"num_classes must be in 1..{len(classnames)}, got {num_classes}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    labels = torch.arange(k).repeat_interleave(n_per_class)  # (N,)
    generator = torch.Generator().manual_seed(split_seed(task, split, seed))
    scenes = CLASS_SETS[spec.classes].sampler(labels, generator, spec.domain)
    return scenes, labels, classnames[:k]


def make_split(
    task: str,
    split: str,
    n_per_class: int,
    seed: int,
    size: int = 48,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render one split of a task.

    The result depends only on the arguments: the same arguments give the same bytes, whatever
    other splits were rendered before.

    Args:
        task: a key of `TASKS`.
        split: "train", "val" or "test".
        n_per_class: images per class.
        seed: the dataset seed; different seeds give different images.
        size: image side in pixels.
        num_classes: keep only the first k classes (tests use few); all when None.

    Returns:
        images (N, size, size, 3) uint8, labels (N,) int64 (class-major order: all images of class
        0 first), and the class names.

    Raises:
        ValueError: unknown task or split, or counts out of range.
    """
    scenes, labels, classnames = make_scenes(task, split, n_per_class, seed, num_classes)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        chunk = render(scenes.slice(start, start + _CHUNK), size)  # (C, 3, H, W)
        images[start : start + chunk.shape[0]] = chunk.permute(0, 2, 3, 1).numpy()
    return images, labels.numpy().astype(np.int64), classnames
