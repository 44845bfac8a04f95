"""The dataset contract every dataset in the registry follows.

A `Dataset` is a list of classes, prompt templates and named splits of `Example`s. Images are
loaded lazily (`load_image`) so that listing a large dataset costs nothing; procedural datasets
keep their pixels in memory. Labels always index `Dataset.classnames` (global label order): the
base/new protocol takes the first ceil(M/2) labels as base (see `splits.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from skipcache.errors import DataError


@dataclass(frozen=True)
class Example:
    """One image of a split.

    Attributes:
        source_id: stable id that traces a cached row back to its image (a path relative to the
            data root, or `<dataset>:<split>:<index>` for procedural data).
        label: index into `Dataset.classnames`.
        path: image file, when the image lives on disk.
        pixels: HxWx3 uint8 array, when the image lives in memory.
    """

    source_id: str
    label: int
    path: Path | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class Dataset:
    """A classification dataset: classes, prompt templates and splits.

    Attributes:
        name: registry name (`synthetic`, `food101`, ...).
        classnames: the M class names, in label order.
        templates: prompt templates with one `{}` for the class name; the first is the default.
        splits: split name (`train`, `val`, `test`) to its examples.
        fingerprint_extra: anything else that determines the pixels (generator seed, version of a
            procedural renderer, split file hash); goes into `fingerprint`.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, list[Example]]
    fingerprint_extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """A short hash of the class list, the split membership and `fingerprint_extra`."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.classnames, self.fingerprint_extra], sort_keys=True).encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for ex in self.splits[split]:
                h.update(f"{ex.source_id}\t{ex.label}\n".encode())
        return h.hexdigest()[:16]


def load_image(example: Example) -> Image.Image:
    """Return the example's image as RGB, whatever its mode (grayscale, CMYK, palette, alpha).

    Raises:
        DataError: the file is missing or cannot be decoded; the message names the path.
    """
    if example.pixels is not None:
        return Image.fromarray(example.pixels, mode="RGB")
    if example.path is None:
        raise DataError(f"example {example.source_id!r} has neither a path nor pixels")
    try:
        with Image.open(example.path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                # Composite transparent images on white, as a viewer would show them.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {example.path} (source id {example.source_id!r}); check the data root") from None
    except OSError as exc:
        raise DataError(f"cannot read image {example.path}: {exc}; remove or replace the file") from None
