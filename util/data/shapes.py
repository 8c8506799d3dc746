"""Procedural captioned ``shapes`` dataset (its judge is util/evaluation/judge.py).

Every image is a single filled, anti-aliased shape (circle, square or
triangle) in one of six saturated colours on a white background.  Three
(colour, shape) combinations are held out of the training split so that
compositional generalisation can be measured; each held-out colour and shape
still appears in other training combinations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.data.draws import ItemKey, item_index
from util.data.image_folders import CaptionOrigin

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (250, 220, 0),
    "purple": (128, 0, 160),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "square"),
)
SEEN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)

TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "a {shape} that is {color}",
    "a picture of a {color} {shape}",
    "a {color} {shape} on a white background",
    "a {shape} colored {color}",
    "there is a {color} {shape}",
    "an image of a {color} {shape}",
    "a single {color} {shape}",
)

# Words and templates that no training caption holds (tests/test_shapes.py checks it): the
# evaluation's held-out-words split asks for seen combinations in them, two synonyms per color and
# per shape and three new templates, to measure whether a frozen text encoder's neighbourhood carries
# over to words the model never trained on.
COLOR_SYNONYMS: dict[str, tuple[str, str]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "jade"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "plum"),
    "orange": ("tangerine", "amber"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, str]] = {
    "circle": ("disc", "round dot"),
    "square": ("box", "block"),
    "triangle": ("pyramid", "wedge"),
}
UNSEEN_TEMPLATES: tuple[str, ...] = (
    "a drawing of a {color} {shape}",
    "one {color} {shape}",
    "a {color} {shape} in the middle of the picture",
)

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
SIZE_RANGE: tuple[float, float] = (0.35, 0.7)
MARGIN: float = 1.0
MEMO_MAX_BYTES: int = 256 * 2**20  # sets up to this size keep their rendered images in memory
SUPERSAMPLE: int = 4


def _check_combo(color: str, shape: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; choices: {list(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choices: {list(SHAPES)}")


def caption(color: str, shape: str, template_index: int = 0) -> str:
    """Caption for ``(color, shape)`` using ``TEMPLATES[template_index]``."""
    _check_combo(color, shape)
    if not 0 <= template_index < len(TEMPLATES):
        raise ValueError(f"template_index must be in [0, {len(TEMPLATES) - 1}], got {template_index}")
    return TEMPLATES[template_index].format(color=color, shape=shape)


def prompt(color: str, shape: str) -> str:
    """Canonical evaluation prompt ``"a {color} {shape}"``."""
    return caption(color, shape, 0)


def unseen_word_prompt(color: str, shape: str, k: int) -> str:
    """The k-th held-out-words prompt of ``(color, shape)``: a synonym for the color (k % 3 == 0),
    for the shape (1) or for both (2), synonyms and templates cycling with k."""
    _check_combo(color, shape)
    which, pick = k % 3, (k // 3) % 2
    c = COLOR_SYNONYMS[color][pick] if which in (0, 2) else color
    sh = SHAPE_SYNONYMS[shape][pick] if which in (1, 2) else shape
    return UNSEEN_TEMPLATES[k % len(UNSEEN_TEMPLATES)].format(color=c, shape=sh)


def all_captions(combos: Sequence[tuple[str, str]] = ALL_COMBOS) -> list[str]:
    """Every caption (all templates) for each combo, combo-major order."""
    return [caption(c, s, t) for c, s in combos for t in range(len(TEMPLATES))]


def render(color: str, shape: str, size: float, cx: float, cy: float, resolution: int = 32) -> np.ndarray:
    """Render one filled shape on white; returns uint8 array [H, W, 3].

    ``size`` is the circle diameter, the square side, or the triangle base and
    height (apex up); ``(cx, cy)`` is the centre of its bounding box, in pixels
    (pixel ``j`` covers ``[j, j + 1)``).  Drawn at ``SUPERSAMPLE`` x resolution and
    box-downsampled for anti-aliasing.
    """
    _check_combo(color, shape)
    if resolution < 4:
        raise ValueError(f"resolution must be >= 4, got {resolution}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    k = SUPERSAMPLE
    big = Image.new("RGB", (resolution * k, resolution * k), BACKGROUND)
    draw = ImageDraw.Draw(big)
    h = size / 2.0
    x0, y0, x1, y1 = (cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon([(cx * k - 0.5, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    small = big.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def draw_geometry(rng: np.random.Generator, resolution: int) -> tuple[float, float, float]:
    """The data's variety within a prompt: size uniform in ``SIZE_RANGE`` of the side, and the
    centre uniform wherever the shape keeps ``MARGIN`` pixels from the border. Returns
    ``(size, cx, cy)`` in pixels."""
    size = float(rng.uniform(SIZE_RANGE[0], SIZE_RANGE[1]) * resolution)
    lo, hi = MARGIN + size / 2.0, resolution - MARGIN - size / 2.0
    cx = float(rng.uniform(lo, hi))
    cy = float(rng.uniform(lo, hi))
    return size, cx, cy


def render_fresh(targets: Sequence[tuple[str, str]], resolution: int, seed: int) -> np.ndarray:
    """New images of the given ``(color, shape)`` targets, with geometry drawn as the data draws
    it (image ``i`` from ``(seed, i)``): uint8 [N, H, W, 3]."""
    out = np.empty((len(targets), resolution, resolution, 3), dtype=np.uint8)
    for i, (color, shape) in enumerate(targets):
        size, cx, cy = draw_geometry(np.random.default_rng([seed, i]), resolution)
        out[i] = render(color, shape, size, cx, cy, resolution)
    return out


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 tensor [3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """Seeded procedural dataset of captioned shape images.

    Item ``i`` is fully determined by ``(seed, split, i)``.  ``__getitem__``
    returns ``(image, caption)`` with ``image`` a float32 tensor [3, H, W] in
    [-1, 1] and ``caption`` a string.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 10000,
        resolution: int = 32,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choices: {list(SPLITS)}")
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(resolution, (int, np.integer)) or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.split = split
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split_id = SPLITS.index(split)
        self.combos: tuple[tuple[str, str], ...] = {
            "train": SEEN_COMBOS,
            "heldout": HELDOUT_COMBOS,
            "all": ALL_COMBOS,
        }[split]
        # Items are pure functions of (seed, split, i): keep the rendered uint8 images of small
        # sets in memory, so epochs after the first skip the rendering (about 0.5 ms an image).
        self._memo: dict[int, tuple[np.ndarray, str]] | None = (
            {} if self.num_samples * self.resolution**2 * 3 <= MEMO_MAX_BYTES else None
        )

    def __len__(self) -> int:
        return self.num_samples

    def caption_vocabulary(self) -> list[str]:
        """Every caption this set can produce, plus those of every other combination, so the
        text embeddings of training and of the held-out evaluation are computed up front."""
        return all_captions(ALL_COMBOS)

    def caption_origin(self) -> CaptionOrigin:
        return CaptionOrigin("shapes")

    def _index(self, i: ItemKey | int) -> int:
        """The item of an index or an ``ItemKey`` (its draws are fixed by the set's own seed)."""
        return item_index(i, self.num_samples)

    def meta(self, i: int) -> dict:
        """Parameters of item ``i``: color, shape, size, cx, cy, template."""
        j = self._index(i)
        rng = np.random.default_rng([self.seed, self.split_id, j])
        color, shape = self.combos[int(rng.integers(len(self.combos)))]
        template = int(rng.integers(len(TEMPLATES)))
        size, cx, cy = draw_geometry(rng, self.resolution)
        return dict(color=color, shape=shape, size=size, cx=cx, cy=cy, template=template)

    def image(self, i: int) -> np.ndarray:
        """uint8 array [H, W, 3] of item ``i``."""
        m = self.meta(i)
        return render(m["color"], m["shape"], m["size"], m["cx"], m["cy"], self.resolution)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        j = self._index(i)
        hit = self._memo.get(j) if self._memo is not None else None
        if hit is None:
            m = self.meta(j)
            img = render(m["color"], m["shape"], m["size"], m["cx"], m["cy"], self.resolution)
            hit = (img, caption(m["color"], m["shape"], m["template"]))
            if self._memo is not None:
                self._memo[j] = hit
        return to_tensor(hit[0]), hit[1]
