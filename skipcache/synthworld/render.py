"""Procedural scenes: what a synthetic image contains and how it is drawn.

This module owns the synthetic world's vocabulary (`SHAPES`, `COLOURS`, `TEXTURES`,
`BACKGROUNDS`), the `Scenes` record of per-image attributes, the per-domain attribute
distributions (`sample_scenes`) and the renderer (`render`). Everything is a batched tensor
operation: a batch of scenes renders without a Python loop over images, on whatever device the
scene tensors live on. Shapes are signed distance fields evaluated in object coordinates, so
edges are anti-aliased by a one-pixel ramp and outlines ("sketch" style) are a band around zero.

Coordinates: the image spans [-1, 1] on both axes, x to the right and y *up*; an object's
`size` is its radius in those units (0.5 = a quarter of the image width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "heart", "crescent", "ring", "semicircle"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white"]
COLOUR_RGB = torch.tensor(
    [
        [0.86, 0.08, 0.08],  # red
        [1.00, 0.52, 0.00],  # orange
        [0.98, 0.90, 0.08],  # yellow
        [0.10, 0.62, 0.12],  # green
        [0.10, 0.85, 0.90],  # cyan
        [0.10, 0.22, 0.92],  # blue
        [0.52, 0.12, 0.72],  # purple
        [1.00, 0.55, 0.78],  # pink
        [0.48, 0.28, 0.08],  # brown
        [0.97, 0.97, 0.97],  # white
    ]
)
TEXTURES = ["solid", "striped", "dotted", "checkered"]
BACKGROUNDS = ["plain", "gradient", "noisy", "striped"]
STYLES = ["filled", "outline"]
DOMAINS = ["pretrain", "plain", "shifted", "sketch", "noise", "palette"]
MAX_CLUTTER = 4


@dataclass
class Scenes:
    """A batch of B scene descriptions; every field is a tensor with leading dimension B.

    Attributes:
        shape: (B,) int64 index into `SHAPES`.
        colour: (B,) int64 index into `COLOURS`.
        size: (B,) float object radius in image units (image spans [-1, 1]).
        cx: (B,) float centre x, right is positive.
        cy: (B,) float centre y, up is positive.
        rotation: (B,) float rotation in radians (kept small so square and diamond stay apart).
        texture: (B,) int64 index into `TEXTURES`.
        background: (B,) int64 index into `BACKGROUNDS`.
        bg_rgb: (B, 2, 3) float the background's two colours (the second for gradients/stripes).
        num_clutter: (B,) int64 number of distractor shapes, at most `MAX_CLUTTER`.
        clutter: (B, MAX_CLUTTER, 6) float distractor shape, size, cx, cy, rotation, grey level.
        noise: (B,) float standard deviation of pixel noise, in [0, 1] intensity units.
        style: (B,) int64 index into `STYLES`.
        palette: (B, 3) float per-channel gain applied to the whole image (colour cast).
        tint: (B, 3) float additive jitter of the object's colour.
        seed: (B,) int64 per-scene seed for the background noise field.
    """

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    rotation: torch.Tensor
    texture: torch.Tensor
    background: torch.Tensor
    bg_rgb: torch.Tensor
    num_clutter: torch.Tensor
    clutter: torch.Tensor
    noise: torch.Tensor
    style: torch.Tensor
    palette: torch.Tensor
    tint: torch.Tensor
    seed: torch.Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def to(self, device: torch.device | str) -> "Scenes":
        """Return the same scenes with every tensor on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice(self, start: int, stop: int) -> "Scenes":
        """Return scenes `start:stop` (a view, no copy)."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


# ----------------------------------------------------------------------------- sampling


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _choice(n: int, probs: list[float], g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.tensor(probs), n, replacement=True, generator=g)


# Per-domain knobs: (size range, centre jitter, rotation max in degrees, texture probs,
# background probs, clutter probs for 0..MAX_CLUTTER, noise range, outline prob, palette sigma).
_DOMAIN_KNOBS = {
    "pretrain": ((0.18, 0.62), 1.0, 20.0, [0.55, 0.15, 0.15, 0.15], [0.4, 0.2, 0.2, 0.2],
                 [0.5, 0.2, 0.15, 0.1, 0.05], (0.0, 0.08), 0.10, 0.04),
    "plain": ((0.38, 0.60), 0.25, 12.0, [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0],
              [1.0, 0.0, 0.0, 0.0, 0.0], (0.0, 0.02), 0.0, 0.0),
    "shifted": ((0.24, 0.40), 1.0, 20.0, [0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25],
                [0.0, 0.25, 0.3, 0.25, 0.2], (0.04, 0.12), 0.0, 0.04),
    "sketch": ((0.32, 0.58), 0.6, 15.0, [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0],
               [0.7, 0.2, 0.1, 0.0, 0.0], (0.0, 0.03), 1.0, 0.0),
    "noise": ((0.30, 0.55), 0.6, 15.0, [0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.3, 0.0],
              [0.7, 0.2, 0.1, 0.0, 0.0], (0.18, 0.30), 0.0, 0.0),
    "palette": ((0.30, 0.55), 0.6, 15.0, [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.3, 0.0],
                [0.7, 0.2, 0.1, 0.0, 0.0], (0.0, 0.04), 0.0, 0.10),
}


def _sample_background(n: int, obj_rgb: torch.Tensor, domain: str, g: torch.Generator) -> torch.Tensor:
    """Two background colours per scene that contrast with the object colour. Returns (n, 2, 3)."""
    bg = torch.rand(n, 2, 3, generator=g)  # (n, 2, 3)
    if domain == "palette":
        # Unusual palettes: saturated, dark or neon backgrounds rather than muted ones.
        bg = (bg - 0.5) * 1.6 + 0.5
    else:
        # Muted: pull towards a random grey level, as most photos have calm backgrounds.
        grey = torch.rand(n, 1, 1, generator=g)
        bg = 0.5 * bg + 0.5 * grey
    bg = bg.clamp(0, 1)
    # Where a background colour is too close to the object's, replace it by the complement so
    # that the object never disappears into its background.
    dist = (bg - obj_rgb[:, None, :]).norm(dim=-1, keepdim=True)  # (n, 2, 1)
    complement = (1.0 - obj_rgb[:, None, :]) * 0.8 + 0.1  # (n, 1, 3)
    return torch.where(dist < 0.45, complement.expand_as(bg), bg)


def sample_scenes(
    n: int,
    generator: torch.Generator,
    domain: str = "pretrain",
    classes: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Scenes:
    """Draw n random scenes from a domain's attribute distribution.

    Sampling always runs on the CPU under `generator` (so results are reproducible whatever the
    device); the tensors are then moved to `device` for rendering.

    Args:
        n: number of scenes.
        generator: CPU generator that determines every attribute.
        domain: one of `DOMAINS`: "pretrain" (broad), "plain" (big centred solid objects),
            "shifted" (small objects, clutter, noise), "sketch" (outlines), "noise" (heavy pixel
            noise), "palette" (unusual backgrounds and colour casts).
        classes: optional (n,) int64 colour-shape class ids (label = colour * 10 + shape); random
            when omitted.
        device: where the returned tensors live.

    Returns:
        The scenes.

    Raises:
        ValueError: unknown domain or wrong `classes` length.
    """
    if domain not in _DOMAIN_KNOBS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    size_rng, jitter, rot_deg, tex_p, bg_p, clutter_p, noise_rng, outline_p, palette_sigma = _DOMAIN_KNOBS[domain]
    g = generator
    if classes is None:
        classes = torch.randint(0, len(COLOURS) * len(SHAPES), (n,), generator=g)
    classes = torch.as_tensor(classes, dtype=torch.int64).cpu()
    if classes.shape != (n,):
        raise ValueError(f"classes must have shape ({n},), got {tuple(classes.shape)}")
    colour, shape = classes // len(SHAPES), classes % len(SHAPES)

    size = _uniform(n, *size_rng, g)
    # Keep the whole object inside the frame: the centre may move by at most 0.95 - size.
    room = (0.95 - size).clamp(min=0.0) * jitter
    cx = (2 * torch.rand(n, generator=g) - 1) * room
    cy = (2 * torch.rand(n, generator=g) - 1) * room
    rotation = (2 * torch.rand(n, generator=g) - 1) * math.radians(rot_deg)
    texture = _choice(n, tex_p, g)
    background = _choice(n, bg_p, g)
    tint = torch.randn(n, 3, generator=g) * 0.04
    obj_rgb = (COLOUR_RGB[colour] + tint).clamp(0, 1)
    bg_rgb = _sample_background(n, obj_rgb, domain, g)
    num_clutter = _choice(n, clutter_p, g)
    clutter = torch.stack(
        [
            torch.randint(0, len(SHAPES), (n, MAX_CLUTTER), generator=g).float(),
            size[:, None] * (0.25 + 0.35 * torch.rand(n, MAX_CLUTTER, generator=g)),
            2 * torch.rand(n, MAX_CLUTTER, generator=g) - 1,
            2 * torch.rand(n, MAX_CLUTTER, generator=g) - 1,
            (2 * torch.rand(n, MAX_CLUTTER, generator=g) - 1) * math.pi,
            torch.rand(n, MAX_CLUTTER, generator=g),
        ],
        dim=-1,
    )  # (n, MAX_CLUTTER, 6)
    noise = _uniform(n, *noise_rng, g)
    style = (torch.rand(n, generator=g) < outline_p).long()
    palette = 1.0 + palette_sigma * torch.randn(n, 3, generator=g)
    seed = torch.randint(0, 2**31 - 1, (n,), generator=g)
    scenes = Scenes(shape, colour, size, cx, cy, rotation, texture, background, bg_rgb, num_clutter,
                    clutter, noise, style, palette, tint, seed)
    return scenes.to(device)


# ----------------------------------------------------------------------------- shape SDFs
# Each takes object coordinates x, y of shape (N, P) (radius 1 = the object's size) and returns
# a signed distance (N, P), negative inside, in object units.


def _box(x: torch.Tensor, y: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _polygon(x: torch.Tensor, y: torch.Tensor, sides: int, radius: float) -> torch.Tensor:
    """Regular polygon with a vertex pointing up; distance measured along the edge normal."""
    phi = torch.atan2(x, y)  # angle from +y, so a vertex sits at the top
    sector = 2 * math.pi / sides
    a = torch.remainder(phi + sector / 2, sector) - sector / 2  # angle to the nearest vertex
    rho = torch.sqrt(x * x + y * y)
    # Project on the normal of the edge next to that vertex (edge normals sit at +-sector/2).
    return rho * torch.cos(a.abs() - sector / 2) - radius * math.cos(sector / 2)


def _star(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Five-pointed star: polar radius interpolating between tips (1.1) and notches (0.45)."""
    phi = torch.atan2(x, y)
    sector = 2 * math.pi / 5
    t = (torch.remainder(phi + sector / 2, sector) - sector / 2).abs() / (sector / 2)  # 0 tip .. 1 notch
    r_edge = 1.1 * 0.45 / (0.45 + (1.1 - 0.45) * t)  # straight-ish edges in polar form
    return (torch.sqrt(x * x + y * y) - r_edge) * 0.6


def _circle(x, y):
    return torch.sqrt(x * x + y * y) - 1.0


def _square(x, y):
    return _box(x, y, 0.82, 0.82)


def _triangle(x, y):
    return _polygon(x, y + 0.2, 3, 1.15)


def _cross(x, y):
    return torch.minimum(_box(x, y, 0.95, 0.3), _box(x, y, 0.3, 0.95))


def _diamond(x, y):
    a, b = 0.62, 1.05  # a tall rhombus, so it never looks like a rotated square
    return (x.abs() / a + y.abs() / b - 1.0) * (a * b / math.hypot(a, b))


def _heart(x, y):
    lobes = torch.minimum(_circle((x + 0.42) / 0.52, (y - 0.32) / 0.52) * 0.52,
                          _circle((x - 0.42) / 0.52, (y - 0.32) / 0.52) * 0.52)
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    tip = _box(c * x - s * (y + 0.1), s * x + c * (y + 0.1), 0.62, 0.62)
    return torch.minimum(lobes, tip)


def _crescent(x, y):
    return torch.maximum(_circle(x, y), -(_circle((x - 0.45) / 0.8, (y - 0.15) / 0.8) * 0.8))


def _ring(x, y):
    return (torch.sqrt(x * x + y * y) - 0.72).abs() - 0.28


def _semicircle(x, y):
    return torch.maximum(torch.sqrt(x * x + (y + 0.4) ** 2) - 1.05, -(y + 0.4))


_SDF = [_circle, _square, _triangle, _star, _cross, _diamond, _heart, _crescent, _ring, _semicircle]
assert len(_SDF) == len(SHAPES)


def _shape_distance(shape: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance of each scene's own shape. shape (N,), x/y (N, P) -> (N, P)."""
    d = torch.empty_like(x)
    for k, sdf in enumerate(_SDF):
        idx = (shape == k).nonzero(as_tuple=True)[0]
        if idx.numel():
            d[idx] = sdf(x[idx], y[idx])
    return d


def _object_frame(gx: torch.Tensor, gy: torch.Tensor, cx, cy, rotation, size):
    """Image coordinates (P,) to object coordinates (N, P) for N objects."""
    dx, dy = gx[None, :] - cx[:, None], gy[None, :] - cy[:, None]  # (N, P)
    c, s = torch.cos(rotation)[:, None], torch.sin(rotation)[:, None]
    return (c * dx + s * dy) / size[:, None], (-s * dx + c * dy) / size[:, None]


def _texture(texture: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Texture pattern in [0, 1] in object coordinates (1 = darker mark). (N, P)."""
    stripes = (torch.sin(x * 7.0) > 0).float()
    dots = ((torch.remainder(x * 2.2, 1.0) - 0.5) ** 2 + (torch.remainder(y * 2.2, 1.0) - 0.5) ** 2 < 0.08).float()
    checker = ((torch.floor(x * 2.0) + torch.floor(y * 2.0)).remainder(2) == 0).float()
    t = texture[:, None]
    return torch.where(t == 1, stripes, torch.where(t == 2, dots, torch.where(t == 3, checker, torch.zeros_like(x))))


def _hash_uniform(seed: torch.Tensor, count: int, salt: int) -> torch.Tensor:
    """Per-scene pseudo-random numbers from an integer hash: (N,) seeds -> (N, count) in [0, 1).

    A stateless hash (not a torch.Generator) makes each image's pixels depend only on its own
    seed, never on which other scenes share its batch.
    """
    idx = torch.arange(count, device=seed.device, dtype=torch.int64)
    h = (seed[:, None] * 1000003 + idx[None, :] * 7919 + salt * 104729) & 0xFFFFFFFF  # (N, count)
    for _ in range(2):  # two rounds of xor-shift-multiply mixing (lowbias32)
        h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        h = ((h ^ (h >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h.float() * (1.0 / 4294967296.0)


def _noise_field(seed: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Smooth value noise (N, size*size) in [0, 1]: a grid x grid lattice upsampled bicubically."""
    n = seed.shape[0]
    coarse = _hash_uniform(seed, grid * grid, salt=1).view(n, 1, grid, grid)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return fine.clamp(0, 1).view(n, size * size)


_NOISE_BANK: dict[tuple[str, int], torch.Tensor] = {}
_NOISE_BANK_LEN = 1 << 20


def _pixel_noise(seed: torch.Tensor, count: int) -> torch.Tensor:
    """Standard normal noise (N, count): each scene reads a window of a fixed bank of normals.

    The bank is drawn once per device from a fixed seed and each scene's window starts at an
    offset hashed from its own seed, so noise is deterministic per scene and costs one gather
    (hashing every pixel was 60% of the CPU render time).
    """
    key = (str(seed.device), count)
    bank = _NOISE_BANK.get(key)
    if bank is None:
        g = torch.Generator().manual_seed(20240611)
        bank = torch.randn(_NOISE_BANK_LEN + count, generator=g).to(seed.device)
        _NOISE_BANK[key] = bank
    start = (_hash_uniform(seed, 1, salt=2)[:, 0] * _NOISE_BANK_LEN).long()  # (N,)
    idx = start[:, None] + torch.arange(count, device=seed.device)[None, :]  # (N, count)
    return bank[idx]


def render(scenes: Scenes, size: int = 48) -> torch.Tensor:
    """Draw scenes as images.

    Args:
        scenes: the batch to draw; the images are rendered on the scenes' device.
        size: image side in pixels.

    Returns:
        (B, 3, size, size) uint8 images.
    """
    dev = scenes.shape.device
    n, p = len(scenes), size * size
    px = 2.0 / size  # one pixel in image units
    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) * px - 1.0
    gy, gx = torch.meshgrid(-coords, coords, indexing="ij")  # row 0 is the top, y up
    gx, gy = gx.reshape(p), gy.reshape(p)  # (P,)

    # Background (N, P, 3).
    bg0, bg1 = scenes.bg_rgb[:, 0], scenes.bg_rgb[:, 1]  # (N, 3)
    kind = scenes.background[:, None]  # (N, 1)
    angle = scenes.seed.float() * 0.618  # a per-scene direction for gradients and stripes
    along = (gx[None, :] * torch.cos(angle)[:, None] + gy[None, :] * torch.sin(angle)[:, None])  # (N, P)
    w_grad = (along * 0.5 + 0.5).clamp(0, 1)
    w_stripe = (torch.sin(along * 9.0) > 0).float()
    w_noise = _noise_field(scenes.seed, 6, size)
    w = torch.where(kind == 1, w_grad, torch.where(kind == 2, w_noise, torch.where(kind == 3, w_stripe, torch.zeros_like(w_grad))))
    img = bg0[:, None, :] * (1 - w[..., None]) + bg1[:, None, :] * w[..., None]  # (N, P, 3)

    # Clutter: grey-ish distractor shapes behind the main object.
    for j in range(MAX_CLUTTER):
        c = scenes.clutter[:, j]  # (N, 6)
        active = (scenes.num_clutter > j).nonzero(as_tuple=True)[0]
        if active.numel() == 0:
            continue
        cc = c[active]
        x, y = _object_frame(gx, gy, cc[:, 2], cc[:, 3], cc[:, 4], cc[:, 1])
        d = _shape_distance(cc[:, 0].long(), x, y) * cc[:, 1:2] / px  # distance in pixels
        alpha = (0.5 - d).clamp(0, 1)[..., None]  # (A, P, 1)
        # Distractors take a random colour, washed towards grey, so they read as clutter.
        grey = cc[:, 5:6]
        rgb = 0.5 * COLOUR_RGB.to(dev)[(cc[:, 0].long() * 3 + j) % len(COLOURS)] + 0.5 * grey  # (A, 3)
        img[active] = img[active] * (1 - alpha) + rgb[:, None, :] * alpha

    # Main object.
    x, y = _object_frame(gx, gy, scenes.cx, scenes.cy, scenes.rotation, scenes.size)
    d = _shape_distance(scenes.shape, x, y) * scenes.size[:, None] / px  # (N, P) in pixels
    fill = (0.5 - d).clamp(0, 1)
    outline = (1.6 - d.abs()).clamp(0, 1)  # a ~2.5 px line around the boundary
    alpha = torch.where(scenes.style[:, None] == 1, outline, fill)[..., None]  # (N, P, 1)
    obj = (COLOUR_RGB.to(dev)[scenes.colour] + scenes.tint).clamp(0, 1)  # (N, 3)
    shade = 1.0 - 0.45 * _texture(scenes.texture, x, y)[..., None]  # (N, P, 1)
    # Dark textures on dark colours vanish; lighten the mark instead for dark objects.
    dark = (obj.mean(dim=-1) < 0.35)[:, None, None]
    obj_px = torch.where(dark, obj[:, None, :] + (1 - shade) * 0.8, obj[:, None, :] * shade)
    img = img * (1 - alpha) + obj_px * alpha

    # Colour cast and pixel noise.
    img = img * scenes.palette[:, None, :]
    img = img + _pixel_noise(scenes.seed, p * 3).view(n, p, 3) * scenes.noise[:, None, None]
    img = (img.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)  # (N, P, 3)
    return img.view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()  # (N, 3, size, size)
