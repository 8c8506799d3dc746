"""A deterministic judge for the ``shapes`` set: it reads an image back into ``(color, shape)``
with simple, fully deterministic image analysis (foreground by distance from the white
background, the dominant colour of its interior, the best-fitting ideal template by soft IoU), so
generated samples are scored without any learned classifier. docs/judge.md gives its design and
its accuracy on rendered images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from util.data.shapes import BACKGROUND, COLORS, SHAPES, SUPERSAMPLE

FG_THRESHOLD: float = 96.0
MIN_FG_FRACTION: float = 0.02
MAX_FG_FRACTION: float = 0.65
MIN_COMPONENT_SHARE: float = 0.9
MIN_HOMOGENEITY: float = 0.75
HOMOGENEITY_RADIUS: float = 60.0
MAX_COLOR_DIST: float = 70.0
# a shape is read when its best-fitting ideal template overlaps it by this soft IoU (an L of three
# equal blocks overlaps a square by 0.75 and is not read), and by this
# margin more than the next shape's template (see shape_scores)
TEMPLATE_MIN_IOU: float = 0.76
TEMPLATE_MIN_MARGIN: float = 0.02

ImageLike = np.ndarray | torch.Tensor


def as_hwc_float(image: ImageLike) -> np.ndarray:
    """Convert uint8 [H, W, 3] array or [3, H, W] tensor in [-1, 1] to float [H, W, 3] in 0..255."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu")
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"tensor image must have shape [3, H, W], got {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            arr = t.permute(1, 2, 0).numpy().astype(np.float32)
        else:
            t = t.float().clamp(-1.0, 1.0)
            arr = ((t + 1.0) * 127.5).permute(1, 2, 0).numpy()
        return np.ascontiguousarray(arr, dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"array image must have shape [H, W, 3], got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"array image must be uint8, got {arr.dtype}")
    return arr.astype(np.float32)


def _nearest_color(rgb: np.ndarray) -> str | None:
    names = list(COLORS)
    pal = np.array([COLORS[n] for n in names], dtype=np.float32)
    d = np.linalg.norm(pal - rgb[None, :], axis=1)
    k = int(np.argmin(d))
    return names[k] if d[k] <= MAX_COLOR_DIST else None


def template_coverage(
    shape: str, sizes: np.ndarray, cxs: np.ndarray, cys: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Anti-aliased coverage [P, H, W] of P ideal shapes, as ``render`` draws them.

    ``sizes``, ``cxs``, ``cys`` are [P] arrays in pixels of an [H, W] canvas;
    coverage is the share of ``SUPERSAMPLE`` x ``SUPERSAMPLE`` sub-pixels inside.
    """
    k = SUPERSAMPLE
    xs = (np.arange(width * k) + 0.5) / k
    ys = (np.arange(height * k) + 0.5) / k
    x, y = xs[None, None, :], ys[None, :, None]
    h = (np.asarray(sizes, np.float64) / 2.0)[:, None, None]
    cx, cy = np.asarray(cxs, np.float64)[:, None, None], np.asarray(cys, np.float64)[:, None, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":  # apex up: half-width grows from 0 at the top to h at the base
        t = (y - (cy - h)) / (2.0 * h)
        inside = (t >= 0.0) & (t <= 1.0) & (np.abs(x - cx) <= h * t)
    else:
        raise ValueError(f"unknown shape {shape!r}; choices: {SHAPES}")
    p = inside.shape[0]
    # sums of 0/1 in float32 are exact, so this equals a mean over the (k, k) sub-pixels; two
    # single-axis sums are several times faster than numpy's two-axis reduction of a bool array
    counts = inside.astype(np.float32).reshape(p, height, k, width * k).sum(axis=2)  # [P,H,W*k]
    return counts.reshape(p, height, width, k).sum(axis=3) / np.float32(k * k)


def shape_scores(alpha: np.ndarray) -> dict[str, float]:
    """Best soft IoU of a coverage map ``alpha`` [H, W] in [0, 1] with each ideal shape.

    The fit searches sizes 0.75x to 1.25x the longer side of the solid part's box
    (alpha >= 0.5) and centres within 1.5 px of that box's centre, coarse then fine.  IoU is
    sum(min(alpha, template)) / sum(max(alpha, template)) over the whole image, so
    faint halos cost little and stray pieces or missing corners cost what they cover.
    """
    solid = alpha >= 0.5
    if not solid.any():
        return {s: 0.0 for s in SHAPES}
    rows, cols = np.nonzero(solid.any(axis=1))[0], np.nonzero(solid.any(axis=0))[0]
    side = float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    cx0, cy0 = (cols[0] + cols[-1] + 1) / 2.0, (rows[0] + rows[-1] + 1) / 2.0
    # The search reaches sizes up to 1.25 x side and centres up to 1.5 px off, so every template
    # lies inside this window around the box centre; outside it only alpha counts.
    reach = 0.625 * side + 1.5
    r0, r1 = max(0, int(np.floor(cy0 - reach))), min(alpha.shape[0], int(np.ceil(cy0 + reach)))
    c0, c1 = max(0, int(np.floor(cx0 - reach))), min(alpha.shape[1], int(np.ceil(cx0 + reach)))
    win = alpha[r0:r1, c0:c1].astype(np.float32)
    outside = float(alpha.sum()) - float(win.sum())

    def best(shape: str, sizes, dxs, dys) -> tuple[float, float, float, float]:
        s, dx, dy = (a.ravel() for a in np.meshgrid(sizes, dxs, dys, indexing="ij"))
        t = template_coverage(shape, s, cx0 + dx - c0, cy0 + dy - r0, r1 - r0, c1 - c0)
        inter = np.minimum(t, win[None]).reshape(len(s), -1).sum(axis=1)
        union = np.maximum(t, win[None]).reshape(len(s), -1).sum(axis=1) + outside
        iou = inter / np.maximum(union, 1e-6)
        i = int(np.argmax(iou))
        return float(iou[i]), float(s[i]), float(dx[i]), float(dy[i])

    scores = {}
    for shape in SHAPES:
        _, s, dx, dy = best(shape, side * np.linspace(0.8, 1.2, 5), np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
        step = 0.05 * side
        scores[shape] = best(
            shape, s + np.array([-step, 0.0, step]), dx + np.array([-0.5, 0.0, 0.5]), dy + np.array([-0.5, 0.0, 0.5])
        )[0]
    return scores


def _classify_shape(scores: dict[str, float]) -> str | None:
    ranked = sorted(scores, key=scores.get, reverse=True)
    first, second = scores[ranked[0]], scores[ranked[1]]
    if first < TEMPLATE_MIN_IOU or first - second < TEMPLATE_MIN_MARGIN:
        return None
    return ranked[0]


def judge(image: ImageLike) -> tuple[str | None, str | None]:
    """Read ``(color, shape)`` back from an image; either may be ``None``.

    ``image`` is a uint8 array [H, W, 3] or a float tensor [3, H, W] in [-1, 1].
    The shape is ``None`` when the foreground is tiny or covers most of the
    image, is split into several sizeable pieces, is not uniformly coloured, or
    its geometry matches no known shape.
    """
    from scipy import ndimage  # scipy's import is slow: only where images are judged

    img = as_hwc_float(image)
    h, w, _ = img.shape
    white = np.asarray(BACKGROUND, dtype=np.float32)
    diff = white[None, None, :] - img
    dist = np.sqrt((diff * diff).sum(axis=2))
    fg = dist > FG_THRESHOLD
    n_fg = int(fg.sum())
    if n_fg < MIN_FG_FRACTION * h * w or n_fg > MAX_FG_FRACTION * h * w:
        return None, None
    eight = np.ones((3, 3), dtype=bool)
    labels, _ = ndimage.label(fg, structure=eight)
    counts = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(counts))
    comp = labels == best + 1
    shape_ok = counts[best] >= MIN_COMPONENT_SHARE * n_fg

    color, median = read_color(img, dist, comp)
    if not (shape_ok and median is not None):
        return color, None
    return color, read_shape(diff, median, comp)


def read_color(img: np.ndarray, dist: np.ndarray, comp: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """The palette color of one component and the median RGB of its interior (``None`` when the
    interior is not homogeneous; the color is also ``None`` when no palette color is near).

    ``img`` is float [H, W, 3] in 0..255, ``dist`` [H, W] each pixel's distance from white, ``comp``
    a boolean [H, W] mask of the component.
    """
    from scipy import ndimage  # scipy's import is slow: only where images are judged

    eight = np.ones((3, 3), dtype=bool)
    interior = ndimage.binary_erosion(comp, structure=eight)
    if interior.sum() < 3:
        interior = comp & (dist >= 0.85 * float(dist[comp].max()))
    pix = img[interior]
    med = np.median(pix, axis=0)
    spread = np.linalg.norm(pix - med[None, :], axis=1)
    if float((spread <= HOMOGENEITY_RADIUS).mean()) < MIN_HOMOGENEITY:
        return None, None
    return _nearest_color(med), med


def read_shape(diff: np.ndarray, median: np.ndarray, comp: np.ndarray) -> str | None:
    """The shape of one homogeneous component of median RGB ``median`` [3]: its soft coverage
    (``diff`` [H, W, 3], white minus the image, projected on white minus the median, inside the
    component grown by one pixel) fitted against the ideal shapes (:func:`shape_scores`)."""
    from scipy import ndimage  # scipy's import is slow: only where images are judged

    white = np.asarray(BACKGROUND, dtype=np.float32)
    ref = white - median
    ref_norm2 = float(ref @ ref)
    if ref_norm2 < FG_THRESHOLD**2:
        return None
    region = ndimage.binary_dilation(comp, structure=np.ones((3, 3), dtype=bool))
    alpha = np.clip((diff @ ref) / ref_norm2, 0.0, 1.0) * region
    return _classify_shape(shape_scores(alpha))


def judge_batch(images: ImageLike | Sequence[ImageLike]) -> list[tuple[str | None, str | None]]:
    """Judge a batch: float tensor [B, 3, H, W], uint8 array [B, H, W, 3], or a sequence."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images.unbind(0))
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    return [judge(im) for im in images]


def score(
    judgements: Sequence[tuple[str | None, str | None]],
    targets: Sequence[tuple[str, str]],
) -> dict[str, float]:
    """Accuracy of judgements against target ``(color, shape)`` pairs.

    Returns ``dict(color_acc, shape_acc, joint_acc, n)``.
    """
    if len(judgements) != len(targets):
        raise ValueError(f"got {len(judgements)} judgements but {len(targets)} targets")
    n = len(targets)
    if n == 0:
        raise ValueError("score needs at least one judgement")
    color_ok = [j[0] == t[0] for j, t in zip(judgements, targets)]
    shape_ok = [j[1] == t[1] for j, t in zip(judgements, targets)]
    joint = [a and b for a, b in zip(color_ok, shape_ok)]
    return dict(
        color_acc=sum(color_ok) / n,
        shape_acc=sum(shape_ok) / n,
        joint_acc=sum(joint) / n,
        n=n,
    )
