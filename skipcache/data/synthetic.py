"""Adapter from the synthetic world's tasks to the dataset contract of `skipcache.data.base`.

This module owns `load_synthetic`: it renders a task's train, val and test splits in memory
(via `skipcache.synthworld.tasks.make_split`) and wraps them as a `Dataset` whose fingerprint
names everything that determines the pixels (render version, seed, sizes, counts).
"""

from __future__ import annotations

from skipcache.data.base import Dataset, Example
from skipcache.errors import ConfigError

# The default prompt comes first (it is what the cache stage encodes); the rest are caption
# forms the shipped model saw in pretraining, for prompt ensembles. A task may bring its own
# (`TaskSpec.templates`), when its class names read better in another caption form.
SYNTHETIC_TEMPLATES = ["a photo of a {}.", "{}", "a {}.", "an image of a {}.", "a picture of a {}."]


def load_synthetic(
    task: str,
    *,
    num_classes: int | None = None,
    train_per_class: int = 16,
    val_per_class: int = 4,
    test_per_class: int = 20,
    seed: int = 0,
    image_size: int = 48,
) -> Dataset:
    """Render a synthetic task as a `Dataset` with pixels in memory.

    Args:
        task: a key of `skipcache.synthworld.tasks.TASKS` ("synthetic", "synthetic-sketch"...).
        num_classes: keep the first k of the task's classes; all when None.
        train_per_class: training images per class (a few-shot protocol samples from these).
        val_per_class: validation images per class.
        test_per_class: test images per class.
        seed: dataset seed; the same seed renders the same bytes.
        image_size: image side in pixels.

    Returns:
        The dataset; `Example.source_id` is "<task>:<split>:<index>".

    Raises:
        ConfigError: unknown task or a count out of range.
    """
    from skipcache.synthworld.tasks import RENDER_VERSION, TASKS, make_split

    if task not in TASKS:
        raise ConfigError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for split, n in counts.items():
        if n < 1:
            raise ConfigError(f"{split}_per_class must be at least 1, got {n}")
    if image_size < 16:
        raise ConfigError(f"image_size must be at least 16 pixels, got {image_size}")
    splits: dict[str, list[Example]] = {}
    classnames: list[str] = []
    for split, n in counts.items():
        try:
            images, labels, classnames = make_split(task, split, n, seed, image_size, num_classes)
        except ValueError as exc:
            raise ConfigError(f"synthetic task {task!r}: {exc}") from None
        splits[split] = [
            Example(source_id=f"{task}:{split}:{i}", label=int(label), pixels=images[i])
            for i, label in enumerate(labels)
        ]
    extra = {
        "render_version": RENDER_VERSION,
        "seed": seed,
        "image_size": image_size,
        "per_class": counts,
        "domain": TASKS[task].domain,
    }
    templates = list(TASKS[task].templates or SYNTHETIC_TEMPLATES)
    return Dataset(task, classnames, templates, splits, extra)
