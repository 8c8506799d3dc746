"""FID, Inception Score, precision/recall and KID through the standard torch-fidelity release.

Features come from torch-fidelity's own extractors (``inception-v3-compat`` by default, the
port of the TensorFlow FID Inception used by the ADM evaluation suite) and every metric is
computed by torch-fidelity's own functions. The one thing torch-fidelity does not take is a
reference given as statistics (``mu``/``sigma`` in an .npz, such as the ADM ImageNet 256
reference batch); here the generated set's statistics are compared with such a file through
torch-fidelity's ``fid_statistics_to_metric``, so a statistics file and the folder it was made
from give the same FID (tested).

Every result carries its sample count; a FID on fewer than 50,000 samples is labelled as such
(FID is biased upward at small sample counts and only FID-50K compares with the literature).

    python -m util.evaluation.fid --samples out/eval/samples --ref VIRTUAL_imagenet256_labeled.npz
    python -m util.evaluation.fid --stats_of data/real_images --save_stats ref_stats.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
METRICS = ("fid", "isc", "prc", "kid")
FULL_FID_SAMPLES = 50_000
TEST_EXTRACTOR = "jepat-test-tiny"

ImageSource = str | os.PathLike | torch.Tensor | Dataset


# -------------------------------------------------------------------- weights
def inception_weights_path() -> Path:
    """Where torch-fidelity's Inception weights live: torch.hub's checkpoint cache
    (``$TORCH_HOME/hub/checkpoints``, the file torch-fidelity downloads on first use)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def extractor_kwargs(extractor: str, weights: str | None = None) -> dict:
    """torch-fidelity keyword arguments for ``extractor``. For the Inception network the weights
    must already be on disk (nothing is downloaded); a missing file is an error naming the path."""
    if extractor not in _registry():
        raise ValueError(f"unknown feature extractor {extractor!r}; torch-fidelity knows {sorted(_registry())}")
    kw: dict = {"feature_extractor": extractor}
    if extractor == INCEPTION:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        path = Path(weights) if weights else inception_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"no Inception weights at {path}; FID/IS/precision-recall need torch-fidelity's Inception file. "
                f"Copy {URL_INCEPTION_V3} to {inception_weights_path()} (or pass --inception_weights PATH; "
                "--eval_metrics '' or --no_eval skips these metrics)"
            )
        kw["feature_extractor_weights_path"] = str(path)
    elif weights:
        kw["feature_extractor_weights_path"] = str(weights)
    return kw


def _registry() -> dict:
    """torch-fidelity's feature extractors, with the offline test extractor registered."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register_test_extractor()
    return FEATURE_EXTRACTORS_REGISTRY


# -------------------------------------------------------------------- a tiny extractor for offline tests
def register_test_extractor() -> str:
    """Register a small fixed-weight CNN with torch-fidelity's registry (once) so that the
    whole metric path runs offline on the CPU. Its numbers mean nothing beyond the tests."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TEST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TEST_EXTRACTOR, _tiny_extractor_class())
    return TEST_EXTRACTOR


def _tiny_extractor_class() -> type:
    """The class of the registered test extractor (built on first use: torch-fidelity is imported
    only where metrics are computed, not by every process that imports this module)."""
    from torch_fidelity import FeatureExtractorBase

    class TinyFeatureExtractor(FeatureExtractorBase):
        """uint8 [B,3,H,W] -> 32 pooled conv features ("pool") and 10 logits ("logits_unbiased").
        Seeded random weights: deterministic, but not a perceptual feature space."""

        def __init__(
            self, name: str, features_list: Sequence[str], **kwargs
        ) -> None:  # torch-fidelity passes all kwargs
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.fc = nn.Linear(32, 10)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)

        @staticmethod
        def get_provided_features_list():
            return "pool", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x: torch.Tensor):
            x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)  # [B,3,32,32]
            h = F.relu(self.conv2(F.relu(self.conv1(x))))  # [B,32,8,8]
            pool = h.mean(dim=(2, 3))  # [B,32]
            out = {"pool": pool, "logits_unbiased": self.fc(pool)}
            return tuple(out[k] for k in self.features_list)

    return TinyFeatureExtractor


# -------------------------------------------------------------------- inputs
class Uint8Images(Dataset):
    """A uint8 tensor [N,3,H,W] as the Dataset torch-fidelity consumes."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1,1] (float) -> uint8 [N,3,H,W], rounded as ``torchvision.utils.save_image`` does
    (so the pixels of a PNG written either way are the same)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def as_dataset(source: ImageSource) -> Dataset:
    """A folder of PNG/JPEG files (sorted, not recursive), a uint8 tensor, or a Dataset."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, torch.Tensor):
        return Uint8Images(source if source.dtype == torch.uint8 else to_uint8(source))
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import glob_samples_paths

    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    files = glob_samples_paths(str(folder), False, "png,jpg,jpeg", "jpg,jpeg", verbose=False)
    if not files:
        raise ValueError(f"no .png/.jpg images in {folder}")
    return ImagesPathDataset(files)


class Features:
    """torch-fidelity's feature extractor, built once, for any number of image batches: each call
    returns {layer: [N, F]} on the host. Generating ranks call it on their images in memory."""

    def __init__(
        self,
        extractor: str,
        layers: Sequence[str],
        device: torch.device,
        batch_size: int = 64,
        weights: str | None = None,
    ) -> None:
        from torch_fidelity.utils import create_feature_extractor

        kw = extractor_kwargs(extractor, weights)
        kw.pop("feature_extractor")
        self.cuda, self.batch_size = device.type == "cuda", batch_size
        self.extractor = create_feature_extractor(
            extractor, list(dict.fromkeys(layers)), cuda=self.cuda, verbose=False, **kw
        )

    def __call__(self, source: ImageSource) -> dict[str, torch.Tensor]:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        dataset = as_dataset(source)
        return get_featuresdict_from_dataset(
            dataset, self.extractor, self.batch_size, self.cuda, save_cpu_ram=True, verbose=False
        )


def extract_features(
    source: ImageSource,
    extractor: str,
    layers: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    weights: str | None = None,
) -> dict[str, torch.Tensor]:
    """torch-fidelity features {layer: [N, F]} of every image of ``source``."""
    return Features(extractor, layers, device, batch_size, weights)(source)


def metric_layers(extractor: str, metrics: Sequence[str]) -> list[str]:
    """The extractor layers ``metrics`` read (what :func:`compute_metrics` needs of precomputed features)."""
    cls = _registry().get(extractor)
    if cls is None:
        raise ValueError(f"unknown feature extractor {extractor!r}; torch-fidelity knows {sorted(_registry())}")
    return list(dict.fromkeys(cls.get_default_feature_layer_for_metric(m) for m in metrics))


# -------------------------------------------------------------------- statistics
def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """mu [F] and sigma [F,F] (float64) by torch-fidelity's own ``fid_features_to_statistics``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    s = fid_features_to_statistics(features.cpu())
    return {"mu": np.asarray(s["mu"], dtype=np.float64), "sigma": np.asarray(s["sigma"], dtype=np.float64)}


def save_statistics(path: str | os.PathLike, features: torch.Tensor, extractor: str) -> dict[str, np.ndarray]:
    """Write ``mu``, ``sigma`` (the ADM reference layout) plus the sample count and extractor name."""
    s = statistics(features)
    np.savez(
        path,
        mu=s["mu"],
        sigma=s["sigma"],
        num_samples=np.int64(features.shape[0]),
        feature_extractor=np.array(extractor),
    )
    return s


def load_statistics(path: str | os.PathLike) -> dict:
    """mu/sigma (float64) from an .npz; ``images`` too when it is an ADM reference batch (arr_0)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference statistics at {path}")
    with np.load(path) as f:
        keys = set(f.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(
                f"{path} holds {sorted(keys)}; a FID reference needs 'mu' and 'sigma' "
                "(write one with python -m util.evaluation.fid --stats_of FOLDER --save_stats OUT.npz)"
            )
        out = {
            "mu": f["mu"].astype(np.float64),
            "sigma": f["sigma"].astype(np.float64),
            "num_samples": int(f["num_samples"]) if "num_samples" in keys else None,
            "feature_extractor": str(f["feature_extractor"]) if "feature_extractor" in keys else None,
        }
        if "arr_0" in keys and f["arr_0"].ndim == 4:
            out["images"] = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous()  # [N,3,H,W] uint8
            out["num_samples"] = out["num_samples"] or out["images"].shape[0]
    if out["mu"].ndim != 1 or out["sigma"].shape != (out["mu"].shape[0],) * 2:
        raise ValueError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape} do not match")
    return out


def frechet_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """FID between two statistics dicts, by torch-fidelity's ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a["mu"].shape != b["mu"].shape:
        raise ValueError(
            f"statistics of {a['mu'].shape[0]} and {b['mu'].shape[0]} features: computed with "
            "different feature extractors or layers"
        )
    a = {k: np.asarray(a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(b[k], dtype=np.float64) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def sample_count_label(n: int) -> str:
    """50000 -> '50K', 1000 -> '1K', 1234 -> '1234'."""
    return f"{n // 1000}K" if n % 1000 == 0 and n >= 1000 else str(n)


# -------------------------------------------------------------------- metrics
def _reference_features(
    reference: str | os.PathLike,
    metrics: Sequence[str],
    extractor: str,
    layer: dict[str, str],
    device: torch.device,
    batch_size: int,
    weights: str | None,
    out: dict,
) -> tuple[dict | None, dict | None]:
    """(features, statistics) of the reference for ``metrics``: features of an image folder, or
    a statistics file (with features of its images when it holds them and a metric needs them).
    Records the reference's sample count, and the metrics skipped for want of images, in ``out``."""
    if Path(reference).is_dir():
        ref_feats = extract_features(reference, extractor, [layer[m] for m in metrics], device, batch_size, weights)
        out["reference_num_samples"] = next(iter(ref_feats.values())).shape[0]
        return ref_feats, None
    ref_stats = load_statistics(reference)
    out["reference_num_samples"] = ref_stats["num_samples"]
    if ref_stats["feature_extractor"] not in (None, extractor):
        raise ValueError(f"{reference} was computed with {ref_stats['feature_extractor']}, not {extractor}")
    need_images = [m for m in metrics if m != "fid"]
    if need_images and "images" in ref_stats:
        layers = [layer[m] for m in need_images]
        return extract_features(ref_stats["images"], extractor, layers, device, batch_size, weights), ref_stats
    if need_images:
        log.info("%s: skipped, the statistics file %s holds no reference images", ", ".join(need_images), reference)
        out["skipped"] = {m: "the reference is a statistics file without images" for m in need_images}
    return None, ref_stats


def _sample_features(
    samples: ImageSource | dict[str, torch.Tensor],
    extractor: str,
    layers: list[str],
    device: torch.device,
    batch_size: int,
    weights: str | None,
) -> dict[str, torch.Tensor]:
    """The features of ``samples``: extracted from images, or given (checked for every layer)."""
    if not isinstance(samples, dict):
        return extract_features(samples, extractor, layers, device, batch_size, weights)
    missing = [k for k in layers if k not in samples]
    if missing:
        raise ValueError(f"the sample features lack the layers {missing} of {extractor}")
    return samples


def compute_metrics(
    samples: ImageSource | dict[str, torch.Tensor],
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("fid", "isc", "prc"),
    extractor: str = INCEPTION,
    device: torch.device = torch.device("cpu"),
    batch_size: int = 64,
    weights: str | None = None,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
) -> dict:
    """FID / IS / precision-recall / KID of ``samples`` (generated) against ``reference``.

    ``samples``: images (a folder, a tensor, a Dataset) or their features already extracted
    ({layer: [N, F]} with the layers of :func:`metric_layers`, as the generating ranks gather them).
    ``reference``: an .npz with mu/sigma (FID only, unless it also holds the images as ``arr_0``)
    or a folder of images (every metric). IS needs no reference. The result names the sample
    counts, the extractor and the reference, and labels FIDs below 50,000 samples.
    """
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    cls = _registry().get(extractor)
    if cls is None:
        raise ValueError(f"unknown feature extractor {extractor!r}; torch-fidelity knows {sorted(_registry())}")
    layer = {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}
    binary = [m for m in metrics if m != "isc"]
    if binary and reference is None:
        raise ValueError(f"{', '.join(binary)} need a reference (--fid_ref: a statistics .npz or an image folder)")
    layers = [layer[m] for m in metrics]
    feats = _sample_features(samples, extractor, layers, device, batch_size, weights)
    n = next(iter(feats.values())).shape[0]
    out: dict = {
        "num_samples": n,
        "feature_extractor": extractor,
        "reference": None if reference is None else str(reference),
    }
    tf_kwargs = {
        "verbose": False,
        "isc_splits": isc_splits,
        "prc_neighborhood": prc_neighborhood,
        "kid_subset_size": min(kid_subset_size, n),
        "save_cpu_ram": True,
    }
    if "isc" in metrics:
        isc = isc_featuresdict_to_metric(feats, layer["isc"], **tf_kwargs)
        out.update(
            inception_score_mean=float(isc["inception_score_mean"]),
            inception_score_std=float(isc["inception_score_std"]),
            isc_splits=isc_splits,
        )
    if not binary:
        return out
    ref_feats, ref_stats = _reference_features(reference, binary, extractor, layer, device, batch_size, weights, out)
    if "fid" in metrics:
        ref = ref_stats if ref_stats is not None else statistics(ref_feats[layer["fid"]])
        fid = frechet_distance(statistics(feats[layer["fid"]]), ref)
        out.update(fid=fid, fid_label=f"FID-{sample_count_label(n)}")
        if n < FULL_FID_SAMPLES:
            out["fid_note"] = (
                f"computed on {n} samples (fewer than {FULL_FID_SAMPLES}): biased upward, not comparable with FID-50K"
            )
    if ref_feats is not None:
        if "prc" in metrics:
            if min(n, out["reference_num_samples"]) <= prc_neighborhood:
                raise ValueError(f"precision/recall need more than {prc_neighborhood} images on each side")
            prc = prc_featuresdict_to_metric(feats, ref_feats, layer["prc"], **tf_kwargs)
            out.update(
                precision=float(prc["precision"]), recall=float(prc["recall"]), prc_neighborhood=prc_neighborhood
            )
        if "kid" in metrics:
            tf_kwargs["kid_subset_size"] = min(kid_subset_size, n, out["reference_num_samples"])
            kid = kid_featuresdict_to_metric(feats, ref_feats, layer["kid"], **tf_kwargs)
            out.update(
                kid_mean=float(kid["kernel_inception_distance_mean"]),
                kid_std=float(kid["kernel_inception_distance_std"]),
                kid_subset_size=tf_kwargs["kid_subset_size"],
            )
    return out


def describe(result: dict) -> str:
    """One line: 'FID-1K 12.34 (1000 samples, fewer than 50K) IS 5.6 ± 0.1 P 0.7 R 0.5'."""
    parts = []
    if "fid" in result:
        parts.append(
            f"{result['fid_label']} {result['fid']:.3f}"
            + (" (fewer than 50K samples: not comparable with FID-50K)" if "fid_note" in result else "")
        )
    if "inception_score_mean" in result:
        parts.append(f"IS {result['inception_score_mean']:.3f} ± {result['inception_score_std']:.3f}")
    if "precision" in result:
        parts.append(f"precision {result['precision']:.3f} recall {result['recall']:.3f}")
    if "kid_mean" in result:
        parts.append(f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}")
    return f"{' | '.join(parts)} [{result['num_samples']} samples, {result['feature_extractor']}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="folder of generated images")
    p.add_argument("--ref", help="reference: statistics .npz (mu, sigma) or a folder of images")
    p.add_argument("--metrics", default="fid,isc,prc", help=f"comma-separated subset of {METRICS}")
    p.add_argument("--stats_of", help="folder of images whose statistics to write with --save_stats")
    p.add_argument("--save_stats", help="output .npz for --stats_of")
    p.add_argument("--feature_extractor", default=INCEPTION)
    p.add_argument("--inception_weights", default=None, help=f"default: {inception_weights_path()}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=64)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(a.device)
    if a.stats_of:
        if not a.save_stats:
            p.error("--stats_of needs --save_stats OUT.npz")
        layer = _registry()[a.feature_extractor].get_default_feature_layer_for_metric("fid")
        feats = extract_features(a.stats_of, a.feature_extractor, [layer], device, a.batch_size, a.inception_weights)
        save_statistics(a.save_stats, feats[layer], a.feature_extractor)
        log.info("wrote statistics of %d images to %s", feats[layer].shape[0], a.save_stats)
    if a.samples:
        result = compute_metrics(
            a.samples,
            a.ref,
            [m for m in a.metrics.split(",") if m],
            a.feature_extractor,
            device,
            a.batch_size,
            a.inception_weights,
        )
        print(describe(result))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
