"""The synthetic world: a procedural renderer, captions, downstream tasks and CLIP pretraining.

It stands in for web data and pretrained CLIP weights, which cannot be downloaded here:
`render` draws scenes, `captions` describes them, `tasks` defines the downstream datasets and
`pretrain` trains the shipped tiny CLIP on fresh image-caption pairs.
"""

from skipcache.synthworld.captions import caption_scenes, colour_shape_classnames
from skipcache.synthworld.render import COLOURS, DOMAINS, SHAPES, Scenes, render, sample_scenes
from skipcache.synthworld.tasks import RENDER_VERSION, TASKS, make_split

__all__ = [
    "COLOURS",
    "DOMAINS",
    "RENDER_VERSION",
    "SHAPES",
    "TASKS",
    "Scenes",
    "caption_scenes",
    "colour_shape_classnames",
    "make_split",
    "render",
    "sample_scenes",
]
