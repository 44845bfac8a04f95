"""Image preprocessing: open_clip's inference transform and the augmentation of stored views.

The cache stage encodes images with these; predict runs raw images through `eval_transform`, so
a tuned model sees the same pixels at prediction time as it was trained on. `AUGMENT` is
recorded in a store's key when the store holds augmented views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchvision import transforms as T

if TYPE_CHECKING:
    from skipcache.loading import LoadedModel

AUGMENT = {"random_resized_crop_scale": [0.5, 1.0], "hflip": 0.5}


def eval_transform(lm: LoadedModel) -> T.Compose:
    """open_clip's inference preprocessing: bicubic resize of the short side, centre crop, normalize."""
    return T.Compose([
        T.Resize(lm.image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(lm.image_size),
        T.ToTensor(),
        T.Normalize(lm.mean, lm.std),
    ])


def augment_transform(lm: LoadedModel) -> T.Compose:
    """The training augmentation of stored views: random resized crop and horizontal flip."""
    return T.Compose([
        T.RandomResizedCrop(lm.image_size, scale=tuple(AUGMENT["random_resized_crop_scale"]), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(AUGMENT["hflip"]),
        T.ToTensor(),
        T.Normalize(lm.mean, lm.std),
    ])
