"""Procedural captioned ``pairs`` dataset, for composition (its judge is util/evaluation/pairs_judge.py).

Every image holds two objects on a white background, each a filled, anti-aliased color-shape of
the ``shapes`` set (util/data/shapes.py: six colors x three shapes, drawn the same way), the two
never the same color-shape. They are placed so that their relation is unambiguous: the centres
lie along one axis at least the objects' half-sizes plus ``GAP`` pixels apart, the offset across
that axis is at most ``MAX_CROSS_OFFSET`` times the distance along it, and every object keeps
``MARGIN`` pixels from the border. A caption names both objects and the first one's relation to
the second, "a red circle left of a blue square", "a blue square is to the right of a red
circle", "a picture of a green triangle above a yellow circle", ... (``TEMPLATES`` x two
phrasings of each relation).

Held-out bindings (``HELDOUT_PAIRS``): nine pairs of objects that never share a training image,
in any relation or order. Each of the 18 objects belongs to exactly one of them, so every object
still appears in training with 16 of its 17 possible partners, and the nine are three of each
kind a model could confuse: same color (red circle + red square), same shape (red triangle +
yellow triangle), and both different (yellow circle + purple square). The evaluation's seen
bindings (``SEEN_EVAL_PAIRS``) are nine training pairs built the same way, so the two splits ask
for the same kinds of composition.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

import numpy as np
import torch

from util.data.draws import ItemKey, item_index
from util.data.image_folders import CaptionOrigin
from util.data.shapes import COLORS, MEMO_MAX_BYTES, SHAPES, render, to_tensor

Obj = tuple[str, str]  # (color, shape)

OBJECTS: tuple[Obj, ...] = tuple((c, s) for c in COLORS for s in SHAPES)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# the words of a relation in a caption: each relation has two phrasings
RELATION_PHRASES: dict[str, tuple[str, str]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
TEMPLATES: tuple[str, ...] = (
    "{first} {relation} {second}",
    "{first} is {relation} {second}",
    "a picture of {first} {relation} {second}",
)
NUM_VARIANTS: int = len(TEMPLATES) * 2  # caption variant v: TEMPLATES[v % 3], relation phrasing v // 3

HELDOUT_PAIRS: tuple[tuple[Obj, Obj], ...] = (
    (("red", "circle"), ("red", "square")),  # same color
    (("green", "square"), ("green", "triangle")),
    (("blue", "circle"), ("blue", "triangle")),
    (("red", "triangle"), ("yellow", "triangle")),  # same shape
    (("green", "circle"), ("purple", "circle")),
    (("blue", "square"), ("orange", "square")),
    (("yellow", "circle"), ("purple", "square")),  # color and shape differ
    (("yellow", "square"), ("orange", "triangle")),
    (("purple", "triangle"), ("orange", "circle")),
)
SEEN_EVAL_PAIRS: tuple[tuple[Obj, Obj], ...] = (
    (("yellow", "circle"), ("yellow", "square")),  # same color
    (("purple", "square"), ("purple", "triangle")),
    (("orange", "circle"), ("orange", "triangle")),
    (("red", "circle"), ("blue", "circle")),  # same shape
    (("green", "square"), ("red", "square")),
    (("blue", "triangle"), ("green", "triangle")),
    (("yellow", "triangle"), ("green", "circle")),  # color and shape differ
    (("purple", "circle"), ("blue", "square")),
    (("orange", "square"), ("red", "triangle")),
)
ALL_PAIRS: tuple[tuple[Obj, Obj], ...] = tuple(itertools.combinations(OBJECTS, 2))
TRAIN_PAIRS: tuple[tuple[Obj, Obj], ...] = tuple(
    p for p in ALL_PAIRS if frozenset(p) not in {frozenset(h) for h in HELDOUT_PAIRS}
)

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
SIZE_RANGE: tuple[float, float] = (0.32, 0.4)  # each object's size, as a share of the image side
MARGIN: float = 1.0  # pixels between an object's box and the border
GAP: float = 2.0  # least pixels between the two boxes along the relation's axis (no pixel is shared)
MAX_CROSS_OFFSET: float = 0.4  # offset across the axis, at most this share of the distance along it
MIN_RESOLUTION: int = 20  # the smallest side where two of the largest objects fit side by side


class Placed(NamedTuple):
    """One object of an image: ``size`` is its circle diameter, square side or triangle base and
    height, ``(cx, cy)`` the centre of its box, in pixels (pixel ``j`` covers ``[j, j + 1)``)."""

    color: str
    shape: str
    size: float
    cx: float
    cy: float


class PairTarget(NamedTuple):
    """What a caption asks for: ``first`` is ``relation`` ``second`` (e.g. left of)."""

    first: Obj
    relation: str
    second: Obj


def _check_object(obj: Obj) -> None:
    color, shape = obj
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; choices: {list(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choices: {list(SHAPES)}")


def check_target(target: PairTarget) -> None:
    """Raise ValueError naming the bad part of a target: unknown color, shape or relation, or the
    same object twice."""
    _check_object(target.first)
    _check_object(target.second)
    if target.relation not in RELATIONS:
        raise ValueError(f"unknown relation {target.relation!r}; choices: {list(RELATIONS)}")
    if tuple(target.first) == tuple(target.second):
        raise ValueError(f"a pair needs two different color-shapes, got {target.first} twice")


def _noun(obj: Obj) -> str:
    color, shape = obj
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def caption(target: PairTarget, variant: int = 0) -> str:
    """Caption of ``target`` in variant ``variant`` of ``NUM_VARIANTS`` (template and phrasing),
    e.g. ``"a red circle left of a blue square"`` for variant 0."""
    check_target(target)
    if not 0 <= variant < NUM_VARIANTS:
        raise ValueError(f"variant must be in [0, {NUM_VARIANTS - 1}], got {variant}")
    phrase = RELATION_PHRASES[target.relation][variant // len(TEMPLATES)]
    return TEMPLATES[variant % len(TEMPLATES)].format(
        first=_noun(target.first), relation=phrase, second=_noun(target.second)
    )


def prompt(target: PairTarget) -> str:
    """Canonical evaluation prompt, ``"a {color} {shape} {relation} a {color} {shape}"``."""
    return caption(target, 0)


def _caption_pattern() -> re.Pattern:
    noun = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    phrases = sorted({p: r for r, ps in RELATION_PHRASES.items() for p in ps}, key=len, reverse=True)
    forms = [t.format(first=noun, relation=f"({'|'.join(map(re.escape, phrases))})", second=noun) for t in TEMPLATES]
    return re.compile("|".join(f"(?:{f})" for f in forms))


def parse_caption(text: str) -> PairTarget:
    """The target a caption of this set names (the inverse of :func:`caption`); ValueError for a
    caption in another form or with an unknown word."""
    m = _caption_pattern().fullmatch(text.strip())
    if m is None:
        known = {w for t in TEMPLATES + tuple(p for ps in RELATION_PHRASES.values() for p in ps) for w in t.split()}
        known |= set(COLORS) | set(SHAPES) | {"a", "an"}
        unknown = [w for w in text.split() if w not in known]
        raise ValueError(
            f"{text!r} is not a pairs caption"
            + (f" (unknown words {unknown})" if unknown else "")
            + f"; expected e.g. {prompt(PairTarget(('red', 'circle'), 'left of', ('blue', 'square')))!r}, with "
            f"colors {list(COLORS)}, shapes {list(SHAPES)} and relations "
            f"{[p for ps in RELATION_PHRASES.values() for p in ps]}"
        )
    groups = [g for g in m.groups() if g is not None]
    by_phrase = {p: r for r, ps in RELATION_PHRASES.items() for p in ps}
    target = PairTarget((groups[0], groups[1]), by_phrase[groups[2]], (groups[3], groups[4]))
    check_target(target)
    return target


def relation_of(first: Placed, second: Placed) -> str:
    """The relation of ``first`` to ``second`` along the axis their centres are farther apart on."""
    dx, dy = first.cx - second.cx, first.cy - second.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def draw_layout(rng: np.random.Generator, relation: str, resolution: int) -> tuple[tuple[float, ...], ...]:
    """Sizes and centres of the two objects of an image where the first is ``relation`` the
    second: ``((size, cx, cy) of the first, (size, cx, cy) of the second)`` in pixels.

    Sizes are uniform in ``SIZE_RANGE`` of the side; along the relation's axis the free length
    (the side less the margins, the sizes and ``GAP``) is split at random before, between and
    after the objects; across it their midpoint is uniform and their offset uniform within
    ``MAX_CROSS_OFFSET`` of the distance along it (clipped to the margins, which only shrinks it).
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; choices: {list(RELATIONS)}")
    s_first, s_second = (float(v) * resolution for v in rng.uniform(SIZE_RANGE[0], SIZE_RANGE[1], 2))
    first_low = relation in ("left of", "above")  # the first object has the smaller coordinate
    s_low, s_high = (s_first, s_second) if first_low else (s_second, s_first)
    slack = resolution - 2 * MARGIN - s_low - s_high - GAP
    if slack < 0:
        raise ValueError(f"resolution {resolution} is too small for two objects; use at least {MIN_RESOLUTION}")
    before, between = (float(v) for v in np.sort(rng.uniform(0.0, slack, 2)))
    c_low = MARGIN + before + s_low / 2
    c_high = MARGIN + s_low + GAP + between + s_high / 2
    big = max(s_low, s_high)
    mid = float(rng.uniform(MARGIN + big / 2, resolution - MARGIN - big / 2))
    offset = float(rng.uniform(-1.0, 1.0)) * MAX_CROSS_OFFSET * (c_high - c_low)

    def clip(v: float, size: float) -> float:
        return float(np.clip(v, MARGIN + size / 2, resolution - MARGIN - size / 2))

    o_low, o_high = clip(mid - offset / 2, s_low), clip(mid + offset / 2, s_high)
    low, high = (c_low, o_low), (c_high, o_high)
    if relation in ("above", "below"):  # along y: the cross axis is x
        low, high = (o_low, c_low), (o_high, c_high)
    g_low, g_high = (s_low, *low), (s_high, *high)
    return (g_low, g_high) if first_low else (g_high, g_low)


def render_pair(first: Placed, second: Placed, resolution: int = 32) -> np.ndarray:
    """Render two objects on white; uint8 [H, W, 3]. Each is drawn by ``shapes.render``
    (supersampled, box-downsampled) and the two are joined by the darker value per channel, which
    equals drawing both on one canvas because their boxes share no pixel."""
    a = render(first.color, first.shape, first.size, first.cx, first.cy, resolution)
    b = render(second.color, second.shape, second.size, second.cx, second.cy, resolution)
    return np.minimum(a, b)


class PairsDataset(torch.utils.data.Dataset):
    """Seeded procedural dataset of captioned two-object images.

    Item ``i`` is fully determined by ``(seed, split, i)``. ``__getitem__`` returns ``(image,
    caption)`` with ``image`` a float32 tensor [3, H, W] in [-1, 1] and ``caption`` a string.
    ``split``: ``train`` (the pairs of ``TRAIN_PAIRS``), ``heldout`` (``HELDOUT_PAIRS``) or ``all``.
    """

    def __init__(self, split: str = "train", num_samples: int = 10000, resolution: int = 32, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choices: {list(SPLITS)}")
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
            raise ValueError(
                f"resolution must be an int >= {MIN_RESOLUTION} (two objects side by side), got {resolution!r}"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.split, self.num_samples, self.resolution, self.seed = split, int(num_samples), int(resolution), int(seed)
        self.split_id = SPLITS.index(split)
        self.pairs = {"train": TRAIN_PAIRS, "heldout": HELDOUT_PAIRS, "all": ALL_PAIRS}[split]
        # items are pure functions of (seed, split, i): small sets keep their rendered images
        self._memo: dict[int, tuple[np.ndarray, str]] | None = (
            {} if self.num_samples * self.resolution**2 * 3 <= MEMO_MAX_BYTES else None
        )

    def __len__(self) -> int:
        return self.num_samples

    def caption_vocabulary(self) -> list[str]:
        """The distinct captions of this set's items, in item order. (Not every caption of every
        pair: 7,344 would take the text encoder a minute on a CPU; evaluation prompts the items do
        not hold are encoded when the evaluation asks for them.)"""
        return list(dict.fromkeys(self.caption(i) for i in range(self.num_samples)))

    def caption_origin(self) -> CaptionOrigin:
        return CaptionOrigin("pairs")

    def _index(self, i: ItemKey | int) -> int:
        """The item of an index or an ``ItemKey`` (its draws are fixed by the set's own seed)."""
        return item_index(i, self.num_samples)

    def meta(self, i: ItemKey | int) -> dict:
        """Parameters of item ``i``: ``first`` and ``second`` (``Placed``: color, shape, size, cx,
        cy) in caption order, ``relation`` (of the first to the second) and ``variant`` (caption)."""
        j = self._index(i)
        rng = np.random.default_rng([self.seed, self.split_id, j])
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        first, second = pair if rng.integers(2) == 0 else pair[::-1]
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        variant = int(rng.integers(NUM_VARIANTS))
        g_first, g_second = draw_layout(rng, relation, self.resolution)
        return dict(
            first=Placed(*first, *g_first), second=Placed(*second, *g_second), relation=relation, variant=variant
        )

    def target(self, i: ItemKey | int) -> PairTarget:
        """What item ``i``'s caption names."""
        m = self.meta(i)
        return PairTarget(m["first"][:2], m["relation"], m["second"][:2])

    def caption(self, i: ItemKey | int) -> str:
        """Item ``i``'s caption."""
        m = self.meta(i)
        return caption(PairTarget(m["first"][:2], m["relation"], m["second"][:2]), m["variant"])

    def image(self, i: ItemKey | int) -> np.ndarray:
        """uint8 array [H, W, 3] of item ``i``."""
        m = self.meta(i)
        return render_pair(m["first"], m["second"], self.resolution)

    def __getitem__(self, i: ItemKey | int) -> tuple[torch.Tensor, str]:
        j = self._index(i)
        hit = self._memo.get(j) if self._memo is not None else None
        if hit is None:
            m = self.meta(j)
            target = PairTarget(m["first"][:2], m["relation"], m["second"][:2])
            hit = (render_pair(m["first"], m["second"], self.resolution), caption(target, m["variant"]))
            if self._memo is not None:
                self._memo[j] = hit
        return to_tensor(hit[0]), hit[1]
