"""Evaluation protocols: which classes and which images a run trains and tests on.

- `classes="base"` (base-to-new): labels are sorted and the first ceil(M/2) are base. `train` is
  K shots per base class from the dataset's train split, `test_base` / `test_new` the test split
  of the base / new classes.
- `classes="all"` (few-shot): `train` is K shots per class, `test` the whole test split.

Two K-shot samplers (`SAMPLERS`):

- `stable` (the default): a class's picks depend only on (seed, its label, its source ids): its
  images are sorted by `source_id` and drawn with a generator seeded by (seed, label), so listing
  order, file system and the other classes never change which images a class gets.
- `coop`: CoOp's picks, image for image (Dassl's `generate_fewshot_dataset` after CoOp's
  `set_random_seed(seed)`): one Python `random.Random(seed)` stream; the labels are visited in
  the order they first appear in the train split, and each takes `random.sample(its items in
  split order, K)` (all of them when it has at most K). Every class is sampled, then the
  protocol keeps its classes, as CoOp samples before it splits base from new. The picks follow
  the split's listing order: for split-file datasets (and FGVC-Aircraft's text files) that order
  is CoOp's; for folder-listed datasets (ImageNet) CoOp lists in `os.listdir` order and skipcache
  in sorted order, so picks match only where the two agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
from dataclasses import dataclass, field

import numpy as np

from skipcache.data.base import Dataset, Example
from skipcache.errors import ConfigError, DataError

PROTOCOLS = ("base", "all")
SAMPLERS = ("stable", "coop")
DEFAULT_SAMPLER = "stable"
# Bump when the sampling algorithm changes: task fingerprints (and cache keys) change with it.
SAMPLER_VERSION = 1


@dataclass
class TaskSplit:
    """The examples of one split of a task.

    Attributes:
        name: `train`, `test`, `test_base` or `test_new`.
        examples: the examples, each with its global label.
        classes: global label ids of the split's classes, sorted.
        labels: local label of each example, an index into `classes` (int64, shape [n]).
    """

    name: str
    examples: list[Example]
    classes: list[int]
    labels: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def source_ids(self) -> list[str]:
        return [ex.source_id for ex in self.examples]


@dataclass
class Task:
    """A dataset under a protocol: what to train on and what to test on.

    Attributes:
        dataset_name: registry name of the dataset.
        dataset_fingerprint: `Dataset.fingerprint()` of the source dataset.
        classnames: all M class names in global label order.
        templates: prompt templates of the dataset.
        protocol: `base` (base-to-new) or `all` (few-shot over all classes).
        shots: images per class in `train`; None means all.
        seed: the sampling seed.
        splits: split name to `TaskSplit`.
        short_classes: global label to the number of training images of each class that had
            fewer than `shots` (all of them were taken).
        sampler: the K-shot sampler, `stable` or `coop` (see the module doc).
        remarks: other notes about the task (a test-only dataset used for training...).
    """

    dataset_name: str
    dataset_fingerprint: str
    classnames: list[str]
    templates: list[str]
    protocol: str
    shots: int | None
    seed: int
    splits: dict[str, TaskSplit]
    short_classes: dict[int, int] = field(default_factory=dict)
    sampler: str = DEFAULT_SAMPLER
    remarks: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def notes(self) -> list[str]:
        """Human-readable remarks about the sampling (classes short of `shots`) and the task."""
        return [f"class {label} ({self.classnames[label]!r}) has only {n} training images; "
                f"took all of them instead of {self.shots}" for label, n in sorted(self.short_classes.items())
                ] + list(self.remarks)

    def fingerprint(self) -> str:
        """A short hash of the dataset fingerprint, the protocol, shots, seed and split membership."""
        h = hashlib.sha256()
        head = [self.dataset_fingerprint, self.protocol, self.shots, self.seed, SAMPLER_VERSION, self.sampler]
        h.update(json.dumps(head).encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(f"{name}:{split.classes}\n".encode())
            for ex in split.examples:
                h.update(f"{ex.source_id}\t{ex.label}\n".encode())
        return h.hexdigest()[:16]


def split_base_new(num_classes: int) -> tuple[list[int], list[int]]:
    """Base and new global labels: the first ceil(M/2) labels are base, the rest new."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def _make_split(name: str, examples: list[Example], classes: list[int]) -> TaskSplit:
    local = {label: i for i, label in enumerate(classes)}
    labels = np.array([local[ex.label] for ex in examples], dtype=np.int64)
    return TaskSplit(name, examples, classes, labels)


def _restrict(examples: list[Example], classes: list[int]) -> list[Example]:
    keep = set(classes)
    return [ex for ex in examples if ex.label in keep]


def sample_shots(examples: list[Example], classes: list[int], shots: int | None,
                 seed: int) -> tuple[list[Example], dict[int, int]]:
    """Draw `shots` examples per class (all when None), seeded and independent of listing order.

    Returns:
        The chosen examples ordered by (label, source_id), and the classes that had fewer than
        `shots` examples with their counts.
    """
    by_class: dict[int, list[Example]] = {label: [] for label in classes}
    for ex in examples:
        if ex.label in by_class:
            by_class[ex.label].append(ex)
    chosen: list[Example] = []
    short: dict[int, int] = {}
    for label in classes:
        pool = sorted(by_class[label], key=lambda ex: ex.source_id)
        if shots is None:
            chosen.extend(pool)
            continue
        if len(pool) <= shots:
            if len(pool) < shots:
                short[label] = len(pool)
            chosen.extend(pool)
            continue
        rng = np.random.default_rng([seed, label])
        picked = np.sort(rng.choice(len(pool), size=shots, replace=False))
        chosen.extend(pool[i] for i in picked)
    return chosen, short


def sample_shots_coop(examples: list[Example], classes: list[int], shots: int | None,
                      seed: int) -> tuple[list[Example], dict[int, int]]:
    """CoOp's K-shot picks (see the module doc), restricted to `classes`.

    Returns:
        The chosen examples of `classes` in CoOp's order (labels by first appearance, each
        label's picks in draw order), and the classes of `classes` that had fewer than `shots`
        examples with their counts.
    """
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)  # insertion order = first appearance
    keep = set(classes)
    short = {label: len(by_label.get(label, [])) for label in classes
             if shots is not None and len(by_label.get(label, [])) < shots}
    if shots is None:
        return [ex for ex in examples if ex.label in keep], short
    rng = random.Random(seed)  # what random.seed(seed) does to the global stream
    chosen: list[Example] = []
    for label, items in by_label.items():
        picked = rng.sample(items, shots) if len(items) >= shots else items
        if label in keep:
            chosen.extend(picked)
    return chosen, short


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def build_task(dataset: Dataset, *, shots: int | None, seed: int, classes: str = "base",
               sampler: str = DEFAULT_SAMPLER) -> Task:
    """Build the train/test splits of a protocol from a dataset.

    Args:
        dataset: the source dataset; needs `train` and `test` splits.
        shots: images per class for `train`; None or 0 take every training image.
        seed: sampling seed (>= 0).
        classes: `base` (base-to-new: `train`, `test_base`, `test_new`) or `all` (`train`, `test`).
        sampler: `stable` (the default) or `coop` (CoOp's picks); see the module doc.

    Raises:
        ConfigError: unknown protocol or sampler, negative shots or seed, base-to-new with fewer
            than 2 classes.
        DataError: the dataset lacks a `train` or `test` split, or has out-of-range labels.
    """
    if classes not in PROTOCOLS:
        raise ConfigError(f"unknown class protocol {classes!r}; use 'base' (base-to-new) or 'all' (few-shot)")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown few-shot sampler {sampler!r}; use one of: {', '.join(SAMPLERS)}")
    if shots is not None and not _is_count(shots):
        raise ConfigError(f"shots must be a whole number >= 0 (0 = all images), got {shots!r}")
    if not _is_count(seed):
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}")
    shots, seed = (int(shots) or None) if shots is not None else None, int(seed)
    for required in ("train", "test"):
        if required not in dataset.splits:
            raise DataError(f"dataset {dataset.name!r} has no {required!r} split (it has: "
                            f"{', '.join(sorted(dataset.splits))}); a task needs 'train' and 'test'")
    m = dataset.num_classes
    for split_name in ("train", "test"):
        for i, ex in enumerate(dataset.splits[split_name]):
            if not 0 <= ex.label < m:
                raise DataError(f"dataset {dataset.name!r} split {split_name!r} example {i} "
                                f"({ex.source_id}) has label {ex.label}, outside 0..{m - 1}")
    train, test = dataset.splits["train"], dataset.splits["test"]
    sample = sample_shots_coop if sampler == "coop" else sample_shots
    remarks = []
    if dataset.fingerprint_extra.get("test_only"):
        remarks.append(f"{dataset.name} is a test-only dataset: its train split is its test split (as in CoOp); "
                       "use it as an evaluation target (`skipcache eval RUN --store`, a pipeline [[target]])")
    if classes == "base":
        if m < 2:
            raise ConfigError(f"base-to-new needs at least 2 classes; dataset {dataset.name!r} has {m}; "
                              "use classes='all'")
        base, new = split_base_new(m)
        train_examples, short = sample(train, base, shots, seed)
        splits = {
            "train": _make_split("train", train_examples, base),
            "test_base": _make_split("test_base", _restrict(test, base), base),
            "test_new": _make_split("test_new", _restrict(test, new), new),
        }
    else:
        every = list(range(m))
        train_examples, short = sample(train, every, shots, seed)
        splits = {
            "train": _make_split("train", train_examples, every),
            "test": _make_split("test", list(test), every),
        }
    return Task(
        dataset_name=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        classnames=list(dataset.classnames),
        templates=list(dataset.templates),
        protocol=classes,
        shots=shots,
        seed=seed,
        splits=splits,
        short_classes=short,
        sampler=sampler,
        remarks=remarks,
    )
