"""A deterministic judge for the ``pairs`` set (util/data/pairs.py), in the manner of GenEval's
counting and position checks: the objects of an image are the sizeable connected pieces of its
foreground, each read into ``(color, shape)`` by the ``shapes`` judge's own readers
(util/evaluation/judge.py), and the relation of two objects is read from their centroids.

An image is right on ``objects`` when it holds exactly two objects and they are the prompt's two
color-shapes; right on ``relation`` when it holds exactly two objects and, each taken as the
prompt's object it agrees with on more attributes, the first lies in the asked relation to the
second; ``joint`` is both. ``axis`` asks less than ``relation``: two objects, side by side for left
of / right of or stacked for above / below, in either order; it tells a model that reads the
relation word but not which object it binds to from one that reads neither. docs/pairs.md gives
the design and the accuracy on rendered images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from util.data.pairs import OPPOSITE, PairTarget, check_target
from util.data.shapes import BACKGROUND
from util.evaluation.judge import FG_THRESHOLD, ImageLike, as_hwc_float, read_color, read_shape

# a piece of foreground smaller than this share of the image is a speck, not an object (the
# smallest object of the set, a circle a quarter of the side across, covers about 4%)
MIN_OBJECT_FRACTION: float = 0.008
# a relation is read along the axis the centroids are farther apart on, only when the offset
# across it is at most this share of the offset along it (else the pair is diagonal: no relation)
RELATION_MAX_RATIO: float = 0.8


@dataclass(frozen=True)
class FoundObject:
    """One object read from an image: its color and shape (either may be ``None``), the centroid
    ``(cx, cy)`` of its pixels (pixel ``j`` covers ``[j, j + 1)``) and its pixel count."""

    color: str | None
    shape: str | None
    cx: float
    cy: float
    pixels: int


@dataclass(frozen=True)
class PairJudgement:
    """The judge's reading of one image against its target."""

    found: tuple[FoundObject, ...]  # every object, in raster order of its first pixel
    objects_ok: bool  # exactly two objects, and they are the target's two color-shapes
    relation: str | None  # the read relation of the object taken as the first to the other one
    relation_ok: bool  # exactly two objects and ``relation`` is the target's
    axis_ok: bool = False  # exactly two objects, placed along the target relation's axis in either order

    @property
    def joint_ok(self) -> bool:
        return self.objects_ok and self.relation_ok

    def to_dict(self) -> dict:
        """A JSON-ready record (the evaluation's manifest rows)."""
        return {
            "found": [[o.color, o.shape, round(o.cx, 2), round(o.cy, 2)] for o in self.found],
            "relation": self.relation,
            "objects_ok": self.objects_ok,
            "relation_ok": self.relation_ok,
            "axis_ok": self.axis_ok,
        }


def find_objects(image: ImageLike) -> list[FoundObject]:
    """The objects of an image: 8-connected pieces of foreground (farther than ``FG_THRESHOLD``
    from white) of at least ``MIN_OBJECT_FRACTION`` of the image, each read into color and shape.

    ``image`` is a uint8 array [H, W, 3] or a float tensor [3, H, W] in [-1, 1].
    """
    from scipy import ndimage  # scipy's import is slow: only where images are judged

    img = as_hwc_float(image)
    h, w, _ = img.shape
    diff = np.asarray(BACKGROUND, dtype=np.float32)[None, None, :] - img
    dist = np.sqrt((diff * diff).sum(axis=2))
    labels, n = ndimage.label(dist > FG_THRESHOLD, structure=np.ones((3, 3), dtype=bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    found = []
    for k in range(1, n + 1):
        if counts[k] < MIN_OBJECT_FRACTION * h * w:
            continue
        comp = labels == k
        color, median = read_color(img, dist, comp)
        shape = read_shape(diff, median, comp) if median is not None else None
        ys, xs = np.nonzero(comp)
        found.append(FoundObject(color, shape, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, int(counts[k])))
    return found


def read_relation(a: FoundObject, b: FoundObject) -> str | None:
    """The relation of ``a`` to ``b`` (``pairs.RELATIONS``), or ``None`` when their centroids are
    about as far apart across the main axis as along it."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if along == 0 or across > RELATION_MAX_RATIO * along:
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _agreement(o: FoundObject, obj: tuple[str, str]) -> int:
    return int(o.color == obj[0]) + int(o.shape == obj[1])


def judge_pair(image: ImageLike, target: PairTarget) -> PairJudgement:
    """Read an image and score it against ``target`` (see the module's docstring)."""
    check_target(target)
    found = tuple(find_objects(image))
    if len(found) != 2:
        return PairJudgement(found, False, None, False)
    a, b = found
    objects_ok = sorted([(a.color or "", a.shape or ""), (b.color or "", b.shape or "")]) == sorted(
        [tuple(target.first), tuple(target.second)]
    )
    as_is = _agreement(a, target.first) + _agreement(b, target.second)
    swapped = _agreement(b, target.first) + _agreement(a, target.second)
    axis_ok = read_relation(a, b) in (target.relation, OPPOSITE[target.relation])
    if as_is == swapped:  # neither object can be told to be the first: no relation is read
        return PairJudgement(found, objects_ok, None, False, axis_ok)
    first, second = (a, b) if as_is > swapped else (b, a)
    relation = read_relation(first, second)
    return PairJudgement(found, objects_ok, relation, relation == target.relation, axis_ok)


def judge_pairs(images: ImageLike | Sequence[ImageLike], targets: Sequence[PairTarget]) -> list[PairJudgement]:
    """Judge a batch: float tensor [B, 3, H, W], uint8 array [B, H, W, 3], or a sequence."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images.unbind(0))
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    return [judge_pair(im, t) for im, t in zip(images, targets)]


def score_pairs(judgements: Sequence[PairJudgement]) -> dict:
    """Accuracies of a batch of judgements.

    Returns ``dict(objects_acc, relation_acc, joint_acc, axis_acc, relation_given_objects,
    order_given_axis, n, not_two_objects, object_counts)``: ``relation_given_objects`` is the
    relation accuracy among the images whose objects are right, ``order_given_axis`` among those
    whose objects are right and on the asked axis (0.5 for a model that places them on the axis in
    a random order; None when there are no such images), ``not_two_objects`` the number of images
    with other than two objects and ``object_counts`` how many images hold 0, 1, 2 or 3+.
    """
    n = len(judgements)
    if n == 0:
        raise ValueError("score_pairs needs at least one judgement")
    objects = sum(j.objects_ok for j in judgements)
    on_axis = sum(j.objects_ok and j.axis_ok for j in judgements)
    counts = [min(len(j.found), 3) for j in judgements]
    return dict(
        objects_acc=objects / n,
        relation_acc=sum(j.relation_ok for j in judgements) / n,
        joint_acc=sum(j.joint_ok for j in judgements) / n,
        axis_acc=sum(j.axis_ok for j in judgements) / n,
        relation_given_objects=sum(j.joint_ok for j in judgements) / objects if objects else None,
        order_given_axis=sum(j.joint_ok for j in judgements) / on_axis if on_axis else None,
        n=n,
        not_two_objects=sum(c != 2 for c in counts),
        object_counts={("3+" if k == 3 else str(k)): counts.count(k) for k in range(4)},
    )
