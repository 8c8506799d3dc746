"""Evaluation by generation: prompts for every image id, generation split across ranks with a
seed per image id, PNGs (and an ADM-layout .npz), then FID / IS / precision-recall / KID
(``util/fid.py``) and CLIP score (``util/clip_score.py``), written to ``metrics.json``.

Image ids 0..N-1 are cut into fixed batches of ``batch_size`` consecutive ids; rank r of W
draws batches r, r+W, ... Every image's randomness (its unmasking order and the flow's starting
noise for each token) comes from a generator seeded by (seed, id) alone, so an id gives the same
image on 1 rank or on 8 (tested with 2 gloo processes), and nearly the same with another batch size.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image

from engine_jepat import autocast_context
from models.jepat import JEPAT
from models.sampler import SamplingConfig, sample_tokens
from models.tokenizers import Tokenizer, unpatchify
from util.text_cache import TextEmbeddingTable

log = logging.getLogger(__name__)


# -------------------------------------------------------------------- prompts
@dataclass
class PromptSet:
    """The prompt of every image id; ``labels`` holds class indices for class-conditional sets."""
    prompts: List[str]
    source: str
    labels: Optional[List[int]] = None
    num_classes: Optional[int] = None
    extra: Dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def read_lines(path: str, what: str) -> List[str]:
    """Non-empty, stripped lines of a text file (an error names the file when it is missing or empty)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} file at {p}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {p} has no non-empty lines")
    return lines


def class_balanced_prompts(class_names: Sequence[str], num_images: int, template: str = "{}") -> PromptSet:
    """``num_images / len(class_names)`` images per class: image id i shows class ``i % C``, so
    every prefix of C ids holds each class once. ``template`` turns a class name into the prompt."""
    C = len(class_names)
    if C == 0:
        raise ValueError("no class names given")
    if num_images <= 0 or num_images % C:
        raise ValueError(f"class-balanced evaluation needs a positive multiple of the {C} classes, got "
                         f"--num_images {num_images} (e.g. {max(1, round(num_images / C)) * C})")
    if "{}" not in template:
        raise ValueError(f"the class prompt template {template!r} has no '{{}}' for the class name")
    labels = [i % C for i in range(num_images)]
    return PromptSet([template.format(class_names[k]) for k in labels], source="class_names", labels=labels,
                     num_classes=C, extra={"images_per_class": num_images // C, "template": template})


def file_prompts(prompts: Sequence[str], num_images: Optional[int] = None) -> PromptSet:
    """Free-text prompts: image id i uses prompt ``i % P``; ``num_images`` defaults to one per prompt."""
    n = len(prompts) if num_images is None else num_images
    if n <= 0:
        raise ValueError(f"num_images must be positive, got {n}")
    return PromptSet([prompts[i % len(prompts)] for i in range(n)], source="prompts_file",
                     extra={"unique_prompts": len(prompts)})


# -------------------------------------------------------------------- ranks and seeds
def rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def image_seed(seed: int, image_id: int) -> int:
    """A well-mixed 63-bit seed for image ``image_id`` of an evaluation seeded with ``seed``."""
    state = np.random.SeedSequence([seed, image_id]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def batches_of_rank(num_images: int, batch_size: int, rank: int, world: int) -> List[range]:
    """Fixed batches of consecutive ids; rank r takes batches r, r + world, ..."""
    starts = range(0, num_images, batch_size)
    return [range(s, min(s + batch_size, num_images)) for s in starts][rank::world]


@torch.no_grad()
def generate_ids(model: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer, prompts: Sequence[str],
                 ids: Sequence[int], sampling: SamplingConfig, patch_size: int, seed: int, device: torch.device,
                 precision: str = "fp32") -> torch.Tensor:
    """Images [len(ids),3,H,W] in [-1,1] for ``prompts[i]`` of each id, each seeded by (seed, id)."""
    model.eval()
    L, d = model.cfg.seq_len, model.cfg.token_dim
    orders, noise = [], []
    for i in ids:
        g = torch.Generator(device=device).manual_seed(image_seed(seed, i))
        orders.append(torch.rand(L, device=device, generator=g).argsort())                # [L]
        noise.append(torch.randn(L, d, device=device, generator=g))                        # [L,d]
    chunk = [prompts[i] for i in ids]
    text = text_table.lookup(chunk)
    null = torch.tensor([not p.strip() for p in chunk], device=device)
    with autocast_context(device, precision):
        tokens = sample_tokens(model, text, null, sampling, orders=torch.stack(orders), noise=torch.stack(noise))
    grid = int(round(math.sqrt(L)))
    latents = unpatchify(tokens.float(), d // (patch_size * patch_size), patch_size, grid)  # [B,c,h,w]
    return tokenizer.decode(latents).float().cpu()


def image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def generate_to_folder(model: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer, prompts: Sequence[str],
                       sampling: SamplingConfig, patch_size: int, seed: int, device: torch.device, folder: Path,
                       precision: str = "fp32", batch_size: int = 64) -> List[int]:
    """This rank's share of the ids, written as ``folder/<id>.png``; returns the ids written.
    All ranks must call it (it ends with a barrier when torch.distributed is initialised)."""
    rank, world = rank_and_world()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine: List[int] = []
    for ids in batches_of_rank(len(prompts), batch_size, rank, world):
        images = generate_ids(model, text_table, tokenizer, prompts, list(ids), sampling, patch_size, seed,
                              device, precision)
        for i, img in zip(ids, images):
            save_image((img + 1) / 2, folder / image_name(i))
        mine.extend(ids)
    barrier()
    return mine


class SampleFolder(torch.utils.data.Dataset):
    """The PNGs of ids 0..N-1 as uint8 [3,H,W] tensors, read on demand (50,000 images do not
    have to fit in memory); files of other ids in the folder are ignored."""

    def __init__(self, folder: Path, num_images: int) -> None:
        self.files = [Path(folder) / image_name(i) for i in range(num_images)]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} samples missing, e.g. {missing[0]}: a rank did not finish its share")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(self.files[i]).convert("RGB"))).permute(2, 0, 1)

    def stack(self, count: Optional[int] = None) -> torch.Tensor:
        """uint8 [n,3,H,W] of the first ``count`` images (all by default)."""
        return torch.stack([self[i] for i in range(len(self) if count is None else min(count, len(self)))])


def save_adm_npz(path: Path, images: torch.Tensor, labels: Optional[Sequence[int]] = None) -> None:
    """The ADM evaluation suite's sample batch: ``arr_0`` uint8 [N,H,W,3] (+ ``arr_1`` labels)."""
    arrays = [images.permute(0, 2, 3, 1).contiguous().numpy()]
    if labels is not None:
        arrays.append(np.asarray(labels, dtype=np.int64))
    np.savez(path, *arrays)


# -------------------------------------------------------------------- the evaluation
@dataclass
class EvalOptions:
    """What to compute after generation (all optional but the samples)."""
    fid_ref: Optional[str] = None                 # statistics .npz or reference image folder
    metrics: Tuple[str, ...] = ("fid", "isc", "prc")
    feature_extractor: str = "inception-v3-compat"
    inception_weights: Optional[str] = None
    save_npz: bool = False
    clip_score_model: str = "ViT-B-32"
    clip_score_weights: Optional[str] = None      # open_clip checkpoint file or pretrained tag; None: skipped
    batch_size: int = 64


def check_options(options: EvalOptions) -> List[str]:
    """The metrics that will be computed; missing Inception weights, reference or CLIP weights
    file are errors raised now (naming the path)."""
    wanted = [m for m in options.metrics if m == "isc" or options.fid_ref]
    if wanted:
        from util.fid import METRICS, extractor_kwargs
        unknown = set(options.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        extractor_kwargs(options.feature_extractor, options.inception_weights)
    if options.fid_ref and not Path(options.fid_ref).exists():
        raise FileNotFoundError(f"no FID reference at {options.fid_ref} (a statistics .npz or an image folder)")
    weights = options.clip_score_weights
    if weights and (Path(weights).suffix or "/" in weights) and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"no CLIP weights at {weights} for the CLIP score; leave out --clip_score_weights to skip it")
    return wanted


def evaluate_prompts(model: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer, prompt_set: PromptSet,
                     sampling: SamplingConfig, patch_size: int, out_dir: Path, seed: int, device: torch.device,
                     precision: str, step: int, options: EvalOptions, checkpoint: Optional[str] = None,
                     writer=None) -> Dict:
    """Generate every id of ``prompt_set`` across ranks, then (rank 0) write the grid, the
    manifest, the optional .npz, the metrics and ``metrics.json``. Other ranks return {}."""
    out_dir = Path(out_dir)
    rank, world = rank_and_world()
    wanted = check_options(options)           # fail before generating, on every rank, not after
    t0 = time.time()
    generate_to_folder(model, text_table, tokenizer, prompt_set.prompts, sampling, patch_size, seed, device,
                       out_dir / "samples", precision, options.batch_size)
    seconds = time.time() - t0
    if rank != 0:
        barrier()
        return {}
    n = len(prompt_set)
    metrics: Dict = {"step": step, "checkpoint": checkpoint, "sampling": asdict(sampling), "seed": seed,
                     "num_samples": n, "ranks": world, "prompts": prompt_set.source,
                     "num_classes": prompt_set.num_classes, **prompt_set.extra,
                     "generation_seconds": seconds, "seconds_per_image": seconds * world / n}
    samples = SampleFolder(out_dir / "samples", n)
    grid = samples.stack(64)
    save_image(grid.float() / 255, out_dir / "grid.png", nrow=8, padding=1, pad_value=0.5)
    with open(out_dir / "manifest.jsonl", "w") as f:
        for i, p in enumerate(prompt_set.prompts):
            row = {"file": f"samples/{image_name(i)}", "id": i, "prompt": p, "seed": image_seed(seed, i)}
            if prompt_set.labels is not None:
                row["label"] = prompt_set.labels[i]
            f.write(json.dumps(row) + "\n")
    if options.save_npz:
        images = samples.stack()
        save_adm_npz(out_dir / f"samples_{n}x{images.shape[2]}x{images.shape[3]}x3.npz", images, prompt_set.labels)
        del images
    if len(wanted) < len(options.metrics):
        metrics["fidelity_skipped"] = {m: "no --fid_ref" for m in options.metrics if m not in wanted}
        log.info("%s skipped: no --fid_ref", ", ".join(metrics["fidelity_skipped"]))
    if wanted:
        from util.fid import compute_metrics, describe
        metrics["fidelity"] = compute_metrics(samples, options.fid_ref, wanted, options.feature_extractor, device,
                                              options.batch_size, options.inception_weights)
        log.info("%s", describe(metrics["fidelity"]))
    else:
        log.info("FID/IS skipped: no metrics requested")
    if options.clip_score_weights:
        from util.clip_score import clip_score
        metrics["clip_score"] = clip_score(samples, prompt_set.prompts, options.clip_score_model,
                                           options.clip_score_weights, device, options.batch_size)
        log.info("CLIP score %.3f (%s, %d samples)", metrics["clip_score"]["clip_score"], options.clip_score_model, n)
    else:
        metrics["clip_score"] = {"skipped": "no --clip_score_weights (an open_clip checkpoint file or pretrained tag)"}
        log.info("CLIP score skipped: pass --clip_score_weights to compute it")
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if writer is not None:
        log_to_tensorboard(writer, metrics, step, grid)
    barrier()
    return metrics


def log_to_tensorboard(writer, metrics: Dict, step: int, grid_images: Optional[torch.Tensor] = None) -> None:
    """Scalars under eval/ (FID named with its sample count, e.g. eval/FID-1K) and the sample grid."""
    from torchvision.utils import make_grid
    fid = metrics.get("fidelity", {})
    if "fid" in fid:
        writer.add_scalar(f"eval/{fid['fid_label']}", fid["fid"], step)
    for key in ("inception_score_mean", "precision", "recall", "kid_mean"):
        if key in fid:
            writer.add_scalar(f"eval/{key}", fid[key], step)
    if "clip_score" in metrics.get("clip_score", {}):
        writer.add_scalar("eval/clip_score", metrics["clip_score"]["clip_score"], step)
    for key, value in metrics.get("probe", {}).items():
        if isinstance(value, float):
            writer.add_scalar(f"eval/probe_{key}", value, step)
    if grid_images is not None:
        writer.add_image("eval/samples", make_grid(grid_images.float() / 255, nrow=8, padding=1), step)
