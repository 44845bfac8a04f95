"""Prompt templates per dataset, as CoOp uses them (one `{}` for the class name).

The first template of a list is the default one the cache stage encodes. Procedural (synthetic)
datasets bring their own templates; this table covers the file-based datasets.
"""

from __future__ import annotations

DEFAULT_TEMPLATES: list[str] = ["a photo of a {}."]

TEMPLATES: dict[str, list[str]] = {
    "imagefolder": ["a photo of a {}."],
    "food101": ["a photo of {}, a type of food."],
    "caltech101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "stanford_cars": ["a photo of a {}."],
}


def get_templates(name: str) -> list[str]:
    """Return a copy of the dataset's templates (the generic CLIP template when it has none)."""
    return list(TEMPLATES.get(name, DEFAULT_TEMPLATES))
