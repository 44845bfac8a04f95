"""Captions for synthetic scenes, and the colour-shape class names.

This module owns the text side of the synthetic world: the caption templates used for CLIP
pretraining (`caption_scenes`), the words they can produce (`caption_vocabulary`, used to find
the token ids a model trained on these captions ever sees) and the class list shared by the
downstream tasks (`colour_shape_classnames`). Class labels are colour-major:
label = colour_id * len(SHAPES) + shape_id, so "red circle" is 0 and "red square" is 1.
"""

from __future__ import annotations

import re

import torch

from skipcache.synthworld.render import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Scenes

DEFAULT_PROMPT = "a photo of a {}."

# (weight, template). Every template names the colour and the shape; the others vary the
# attributes they add. The downstream prompt form comes first and is the most frequent so
# that zero-shot classification with "a photo of a {}." works out of the box.
TEMPLATES: list[tuple[float, str]] = [
    (0.22, "a photo of a {c} {s}."),
    (0.04, "a photo of the {c} {s}."),
    (0.08, "{c} {s}"),
    (0.07, "a {size} {c} {s}."),
    (0.07, "a photo of a {size} {c} {s}."),
    (0.07, "a {c} {s} on a {bg} background."),
    (0.06, "a {size} {c} {s} on a {bg} background"),
    (0.07, "there is a {size} {c} {s} {pos}."),
    (0.06, "a {tex} {c} {s}."),
    (0.05, "an image of a {c} {s} {pos}."),
    (0.04, "the {s} is {c}."),
    (0.05, "a {c} {s} {clutter}."),
    (0.05, "a {quality} photo of a {c} {s}."),
    (0.05, "a picture of a {tex} {c} {s} on a {bg} background."),
    (0.02, "{c} {s}, {size}, {pos}"),
]
# Outline ("sketch") scenes are described as drawings most of the time.
SKETCH_TEMPLATES = ["a sketch of a {c} {s}.", "a drawing of a {c} {s}.", "an outline of a {c} {s}."]
_SKETCH_PROB = 0.6

_SIZE_WORDS = {"small": ["small", "tiny"], "medium": ["medium", "medium-sized"], "large": ["large", "big"]}
_TEXTURE_WORDS = {"solid": ["solid", "plain"], "striped": ["striped"], "dotted": ["dotted", "spotted"],
                  "checkered": ["checkered"]}
_BACKGROUND_WORDS = {"plain": ["plain"], "gradient": ["gradient"], "noisy": ["noisy"], "striped": ["striped"]}
_NUMBER_WORDS = ["no", "one", "two", "three", "four"]
_QUALITY_WORDS = {True: ["noisy", "grainy"], False: ["clear", "clean"]}
_AN = re.compile(r"\ba ([aeiou])")


def colour_shape_classnames() -> list[str]:
    """The 100 class names, colour-major: index colour_id * 10 + shape_id ("red circle", ...)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def size_word(size: float) -> str:
    """Size bucket of an object radius: "small" (< 0.3), "large" (> 0.45) or "medium"."""
    return "small" if size < 0.3 else ("large" if size > 0.45 else "medium")


def position_phrase(cx: float, cy: float) -> str:
    """Where the object sits on a 3x3 grid: "in the top left", "in the center", "on the left"..."""
    col = "left" if cx < -0.25 else ("right" if cx > 0.25 else "")
    row = "top" if cy > 0.25 else ("bottom" if cy < -0.25 else "")
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


def _pick(words: list[str], u: float) -> str:
    return words[min(int(u * len(words)), len(words) - 1)]


def caption_scenes(scenes: Scenes, generator: torch.Generator) -> list[str]:
    """One caption per scene, with a template drawn at random.

    Args:
        scenes: the batch (any device; attributes are read on the CPU).
        generator: CPU generator choosing templates and synonyms.

    Returns:
        B captions, lower case.
    """
    n = len(scenes)
    weights = torch.tensor([w for w, _ in TEMPLATES])
    template_ids = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    u = torch.rand(n, 6, generator=generator).tolist()
    shape, colour = scenes.shape.tolist(), scenes.colour.tolist()
    size, cx, cy = scenes.size.tolist(), scenes.cx.tolist(), scenes.cy.tolist()
    texture, background = scenes.texture.tolist(), scenes.background.tolist()
    clutter, noise, style = scenes.num_clutter.tolist(), scenes.noise.tolist(), scenes.style.tolist()
    out = []
    for i in range(n):
        ui = u[i]
        if style[i] == 1 and ui[0] < _SKETCH_PROB:
            template = _pick(SKETCH_TEMPLATES, ui[1])
        else:
            template = TEMPLATES[template_ids[i]][1]
        k = clutter[i]
        # Only the attributes a template names are worded (this loop runs for every image).
        fields = {"c": COLOURS[colour[i]], "s": SHAPES[shape[i]]}
        if "{size}" in template:
            fields["size"] = _pick(_SIZE_WORDS[size_word(size[i])], ui[2])
        if "{pos}" in template:
            fields["pos"] = position_phrase(cx[i], cy[i])
        if "{tex}" in template:
            fields["tex"] = _pick(_TEXTURE_WORDS[TEXTURES[texture[i]]], ui[3])
        if "{bg}" in template:
            fields["bg"] = _pick(_BACKGROUND_WORDS[BACKGROUNDS[background[i]]], ui[4])
        if "{clutter}" in template:
            fields["clutter"] = ("on its own" if k == 0 else "next to another shape" if k == 1
                                 else f"among {_NUMBER_WORDS[k]} other shapes")
        if "{quality}" in template:
            fields["quality"] = _pick(_QUALITY_WORDS[noise[i] > 0.1], ui[5])
        text = template.format(**fields)
        out.append(_AN.sub(r"an \1", text))
    return out


def caption_vocabulary() -> list[str]:
    """Every word or punctuation mark a caption or default prompt can contain.

    Tokenizing these strings yields every token id that `caption_scenes` can ever produce
    (the BPE tokenizer splits on words and punctuation first), which is how the exported
    model decides which token embedding rows to keep.
    """
    words = set()
    texts = [t for _, t in TEMPLATES] + SKETCH_TEMPLATES + [DEFAULT_PROMPT, "an", "other", "shapes"]
    for group in (_SIZE_WORDS, _TEXTURE_WORDS, _BACKGROUND_WORDS, _QUALITY_WORDS):
        for ws in group.values():
            texts.extend(ws)
    texts += _NUMBER_WORDS + COLOURS + SHAPES + ["among"]
    texts += ["in the top left", "at the bottom", "on the right", "in the center", "on its own", "next to another shape"]
    for text in texts:
        words.update(re.findall(r"[a-z\-]+|[^\sa-z{}]", re.sub(r"\{[a-z]*\}", " ", text)))
    return sorted(words)
