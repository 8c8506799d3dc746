"""Fidelity to the data's variety on ``shapes``, beside the judge's correctness.

The judge (judge.py) asks whether an image shows the prompted color and shape; a sampler that
draws the same centred shape every time scores perfectly. Here the generated images of a split
are compared with freshly rendered images of the same prompts, whose size and position are drawn
as the data draws them (util/data/shapes.py), in a fixed feature space of ten measurements of the
foreground (pixels farther than the judge's threshold from the white background), each in percent:

    cx, cy          centroid, of the image side
    size            square root of the foreground area, of the image side
    width, height   bounding box of the foreground, of the image side
    r, g, b         mean foreground color, of 255
    color_spread    mean distance of foreground pixels from that mean color, of 255
    largest_piece   share of the foreground in its largest 8-connected piece

``fd`` is the Fréchet distance between Gaussians fitted to the generated features and to those of
a rendered reference, eight rendered images per generated one (torch-fidelity's formula);
``fd_floor`` is the mean distance from four more, independent rendered sets of the generated set's
prompts and size to the same reference: what the finite sample alone gives. ``spread``
compares variety within each prompt: the square root of the summed variances of cx, cy and size
over generated images, divided by the same over rendered ones, averaged over the combinations
(1.0 varies as the data does; 0 always draws the same picture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from util.data.shapes import BACKGROUND, render_fresh
from util.evaluation.fid import frechet_distance
from util.evaluation.judge import FG_THRESHOLD

FEATURES: tuple[str, ...] = ("cx", "cy", "size", "width", "height", "r", "g", "b", "color_spread", "largest_piece")
GEOMETRY: tuple[int, ...] = (0, 1, 2)  # cx, cy, size: what varies within a prompt in the data
REFERENCE_REPEATS = 8  # rendered reference: this many images per generated one
FLOOR_DRAWS = 4  # the floor is the mean over this many rendered sets
EMPTY: tuple[float, ...] = (50.0, 50.0, 0.0, 0.0, 0.0, 100.0, 100.0, 100.0, 0.0, 0.0)


def _as_uint8(images) -> np.ndarray:
    """float tensor [N,3,H,W] in [-1,1] or uint8 array [N,H,W,3] -> uint8 [N,H,W,3]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be [N, 3, H, W], got {tuple(images.shape)}")
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def features_of(image: np.ndarray) -> np.ndarray:
    """The ten measurements of one uint8 [H, W, 3] image (module docstring), float64 [10]."""
    from scipy import ndimage  # scipy's import is slow: only where images are judged

    h, w, _ = image.shape
    img = image.astype(np.float64)
    dist = np.sqrt(((np.asarray(BACKGROUND, np.float64) - img) ** 2).sum(axis=2))
    fg = dist > FG_THRESHOLD
    n = int(fg.sum())
    if n == 0:
        return np.array(EMPTY)
    rows, cols = np.nonzero(fg)
    pix = img[fg]  # [n,3]
    mean = pix.mean(axis=0)
    labels, count = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    largest = np.bincount(labels.ravel())[1:].max() if count else 0
    side = float(max(h, w))
    return np.array(
        [
            100 * (cols.mean() + 0.5) / w,
            100 * (rows.mean() + 0.5) / h,
            100 * np.sqrt(n / (h * w)),
            100 * (cols.max() - cols.min() + 1) / side,
            100 * (rows.max() - rows.min() + 1) / side,
            *(100 * mean / 255),
            100 * np.linalg.norm(pix - mean, axis=1).mean() / 255,
            100 * largest / n,
        ]
    )


def shape_features(images) -> np.ndarray:
    """[N, 10] features of a batch: float tensor [N,3,H,W] in [-1,1] or uint8 array [N,H,W,3]."""
    return np.stack([features_of(im) for im in _as_uint8(images)])


def _stats(f: np.ndarray) -> dict[str, np.ndarray]:
    return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False)}


def spread(
    generated: np.ndarray,
    targets: Sequence[tuple[str, str]],
    reference: np.ndarray,
    reference_targets: Sequence[tuple[str, str]],
) -> float:
    """Within-prompt variety of position and size, generated over rendered (module docstring)."""
    gen_keys = np.array([f"{c}/{s}" for c, s in targets])
    ref_keys = np.array([f"{c}/{s}" for c, s in reference_targets])
    ratios = []
    for key in dict.fromkeys(gen_keys):
        g_rows, r_rows = gen_keys == key, ref_keys == key
        if g_rows.sum() < 2 or r_rows.sum() < 2:
            continue
        g = generated[g_rows][:, GEOMETRY].var(axis=0, ddof=1).sum()
        r = reference[r_rows][:, GEOMETRY].var(axis=0, ddof=1).sum()
        ratios.append(float(np.sqrt(g / max(r, 1e-12))))
    return float(np.mean(ratios)) if ratios else float("nan")


def fidelity(images, targets: Sequence[tuple[str, str]], seed: int) -> dict[str, float]:
    """``fd``, ``fd_floor`` and ``spread`` of generated ``images`` for their ``(color, shape)``
    ``targets`` (one per image), against rendered sets drawn from ``seed``."""
    gen = shape_features(images)
    if len(gen) != len(targets):
        raise ValueError(f"got {len(gen)} images but {len(targets)} targets")
    if len(gen) < 2:
        raise ValueError("the Fréchet distance needs at least two images")
    resolution = _as_uint8(images[:1]).shape[1]
    reference = shape_features(render_fresh(list(targets) * REFERENCE_REPEATS, resolution, 2 * seed + 1))
    ref = _stats(reference)
    floor = [
        frechet_distance(_stats(shape_features(render_fresh(targets, resolution, 2 * seed + 2 + 1000 * k))), ref)
        for k in range(FLOOR_DRAWS)
    ]
    return {
        "fd": frechet_distance(_stats(gen), ref),
        "fd_floor": float(np.mean(floor)),
        "spread": spread(gen, targets, reference, list(targets) * REFERENCE_REPEATS),
    }
