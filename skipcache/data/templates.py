"""Prompt templates (one `{}` for the class name), in two named sets.

- `coop` (the default): CoOp's hand-written per-dataset prompts (its zero-shot CLIP table), the
  prompts most CoOp-based papers report zero-shot CLIP with. Datasets outside the table use their
  own templates (synthetic tasks) or CLIP's generic "a photo of a {}.".
- `skipt`: the per-dataset prompts of the Skip Tuning authors' code (the fine-tuning trainer that
  Skip Tuning builds on), e.g. Food101 "a photo of the nice {}.", DTD "itap of a {}.". Use it to
  reproduce the paper's numbers prompt for prompt. It covers the fifteen benchmark datasets only.

`Dataset.templates` holds the dataset's own list (the `coop` set); the cache stage picks the
template of a set with `template_for`, and an explicit `--template` overrides both.
"""

from __future__ import annotations

from skipcache.errors import ConfigError

DEFAULT_TEMPLATES: list[str] = ["a photo of a {}."]
TEMPLATE_SETS = ("coop", "skipt")
DEFAULT_TEMPLATE_SET = "coop"

# CoOp's zero-shot CLIP prompts, by registry name.
TEMPLATES: dict[str, list[str]] = {
    "imagefolder": ["a photo of a {}."],
    "imagenet": ["a photo of a {}."],
    "caltech101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "sun397": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
    "imagenetv2": ["a photo of a {}."],
    "imagenet_sketch": ["a photo of a {}."],
    "imagenet_a": ["a photo of a {}."],
    "imagenet_r": ["a photo of a {}."],
}

# The Skip Tuning authors' per-dataset prompts, by registry name.
SKIPT_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "itap of a {}.",
    "oxford_pets": "a bad photo of a {}, a type of pet.",
    "stanford_cars": "a photo of the {}, a type of car.",
    "oxford_flowers": "a close-up photo of a {}.",
    "food101": "a photo of the nice {}.",
    "fgvc_aircraft": "a bright photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "itap of a {}.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a {}, a type of sport.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a sketch of a {}.",
    "imagenet_a": "a bad photo of a {}.",
    "imagenet_r": "a rendition of a {}.",
}


def get_templates(name: str) -> list[str]:
    """Return a copy of the dataset's own templates (CoOp's; CLIP's generic one when it has none)."""
    return list(TEMPLATES.get(name, DEFAULT_TEMPLATES))


def check_template_set(template_set: str, dataset: str | None = None) -> None:
    """Refuse an unknown set, or (with `dataset`) a set without a template for the dataset.

    Raises:
        ConfigError: with the sets, or the datasets the set covers.
    """
    if template_set not in TEMPLATE_SETS:
        raise ConfigError(f"unknown template set {template_set!r}; use one of: {', '.join(TEMPLATE_SETS)}")
    if dataset is not None and template_set == "skipt" and dataset not in SKIPT_TEMPLATES:
        raise ConfigError(f"template set 'skipt' has no template for dataset {dataset!r} (it covers "
                          f"{', '.join(SKIPT_TEMPLATES)}); use --templates coop or --template 'a photo of a {{}}.'")


def template_for(template_set: str, dataset: str, own: list[str]) -> str:
    """The prompt template of `template_set` for `dataset`, whose own templates are `own`.

    Raises:
        ConfigError: unknown set, or a set without a template for this dataset.
    """
    check_template_set(template_set, dataset)
    if template_set == "coop":
        return own[0] if own else DEFAULT_TEMPLATES[0]
    return SKIPT_TEMPLATES[dataset]
