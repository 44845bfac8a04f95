"""Downstream synthetic tasks: which classes, which rendering domain, which split seeds.

This module owns the `TASKS` registry and `make_split`, the deterministic function that turns
(task, split, seed) into images and labels. The built-in `synthetic*` datasets are made of
these splits. Every task shares the 100 colour-shape classes of `captions.colour_shape_classnames`
(label = colour_id * 10 + shape_id) and differs in the rendering domain, so a model adapted on
one task can be tested for domain generalization on another.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from skipcache.synthworld.captions import colour_shape_classnames
from skipcache.synthworld.render import render, sample_scenes

# Bump when a change to render.py, sampling or this module changes any pixel of a split.
RENDER_VERSION = 1
SPLITS = ("train", "val", "test")
_CHUNK = 512  # scenes rendered at once; bounds peak memory (~50 MB of float32 at 48 px)


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task.

    Attributes:
        name: registry key.
        domain: rendering domain passed to `sample_scenes`.
        description: one line for listings.
    """

    name: str
    domain: str
    description: str

    def classnames(self) -> list[str]:
        """The task's classes in label order."""
        return colour_shape_classnames()


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("synthetic", "shifted", "100 colour-shape classes; small objects, clutter, noise"),
        TaskSpec("synthetic-plain", "plain", "100 colour-shape classes; large centred objects, plain backgrounds"),
        TaskSpec("synthetic-sketch", "sketch", "the synthetic classes drawn as outlines"),
        TaskSpec("synthetic-noise", "noise", "the synthetic classes under heavy pixel noise"),
        TaskSpec("synthetic-palette", "palette", "the synthetic classes on unusual palettes with colour casts"),
    ]
}


def split_seed(task: str, split: str, seed: int) -> int:
    """A stable 63-bit generator seed for (task, split, seed) (crc32, never Python's hash())."""
    return (zlib.crc32(f"{task}/{split}".encode()) << 31) ^ (seed & 0x7FFFFFFF)


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
    scenes = sample_scenes(len(labels), generator, spec.domain, classes=labels)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), _CHUNK):
        chunk = render(scenes.slice(start, start + _CHUNK), size)  # (C, 3, H, W)
        images[start : start + chunk.shape[0]] = chunk.permute(0, 2, 3, 1).numpy()
    return images, labels.numpy().astype(np.int64), classnames[:k]
