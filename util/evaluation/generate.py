"""The one image generator: training grids, ``main_sample.py``, the shapes evaluation and the
prompt-set evaluation all sample through ``ImageGenerator``.

Image ids 0..N-1: every image's randomness (its unmasking order and the flow's starting noise for
each token) comes from a generator seeded by (seed, id) alone, so an id gives the same image
alone or in a batch, on one rank or on eight (tested with two gloo processes). For the evaluation,
ids are cut into fixed batches of consecutive ids and rank r of W draws batches r, r+W, ...
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.jepat import JEPAT
from models.sampler import SamplingConfig, StepHook, sample_tokens
from models.tokenizers import Tokenizer, unpatchify
from util.data.captions import CaptionStore
from util.evaluation.fid import to_uint8
from util.runtime import DistEnv, autocast_context

log = logging.getLogger(__name__)


def image_seed(seed: int, image_id: int) -> int:
    """A well-mixed 63-bit seed for image ``image_id`` of a generation seeded with ``seed``."""
    state = np.random.SeedSequence([seed, image_id]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def batches_of_rank(num_images: int, batch_size: int, rank: int, world: int) -> list[range]:
    """Fixed batches of consecutive ids; rank r takes batches r, r + world, ..."""
    starts = range(0, num_images, batch_size)
    return [range(s, min(s + batch_size, num_images)) for s in starts][rank::world]


def image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


class ImageGenerator:
    """A model ready to sample: its EMA weights, the caption store, the frozen tokenizer (decoder),
    the sampler settings, the device and precision."""

    def __init__(
        self,
        model: JEPAT,
        captions: CaptionStore,
        tokenizer: Tokenizer,
        sampling: SamplingConfig,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.model, self.captions, self.tokenizer, self.sampling = model, captions, tokenizer, sampling
        self.device, self.precision = device, precision
        c = model.cfg
        self.grid = int(round(math.sqrt(c.seq_len)))
        self.patch = int(round(math.sqrt(c.token_dim / tokenizer.channels)))
        if self.grid**2 != c.seq_len or tokenizer.channels * self.patch**2 != c.token_dim:
            raise ValueError(
                f"the model's {c.seq_len} tokens of width {c.token_dim} do not tile a square grid of "
                f"{tokenizer.channels}-channel {tokenizer.name} latents"
            )

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[str],
        ids: Sequence[int],
        seed: int,
        on_canvas: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Images [len(ids),3,H,W] in [-1,1] for ``prompts[i]`` of each id, each seeded by (seed, id).
        Empty prompts give unconditional images (the null condition). ``on_canvas(step, images)``
        gets the canvas after each unmasking step (:meth:`canvas`); the images are the same either way."""
        self.model.eval()
        L, d = self.model.cfg.seq_len, self.model.cfg.token_dim
        orders, noise = [], []
        for i in ids:
            g = torch.Generator(device=self.device).manual_seed(image_seed(seed, i))
            orders.append(torch.rand(L, device=self.device, generator=g).argsort())  # [L]
            noise.append(torch.randn(L, d, device=self.device, generator=g))  # [L,d]
        chunk = [prompts[i] for i in ids]
        text = self.captions.lookup(chunk)
        null = torch.tensor([not p.strip() for p in chunk], device=self.device)
        hook: StepHook | None = (
            None if on_canvas is None else (lambda step, tokens, known: on_canvas(step, self.canvas(tokens, known)))
        )
        with autocast_context(self.device, self.precision):
            tokens = sample_tokens(
                self.model,
                text,
                null,
                self.sampling,
                orders=torch.stack(orders),
                noise=torch.stack(noise),
                on_step=hook,
            )  # [B,L,d]
        return self.decode(tokens)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,L,d] -> images [B,3,H,W] in [-1,1] (float32, on the CPU)."""
        latents = unpatchify(tokens.float(), self.tokenizer.channels, self.patch, self.grid)  # [B,c,h,w]
        return self.tokenizer.decode(latents).float().cpu()

    def canvas(self, tokens: torch.Tensor, known: torch.Tensor, hidden_value: float = 0.0) -> torch.Tensor:
        """What the sampler holds mid-way, as images [B,3,H,W] in [-1,1]: the decoded tokens, with the
        image area of every still-hidden token painted ``hidden_value`` (0: mid grey).

        Hidden tokens are zeros in token space, which a VAE decodes to a blur that looks like content;
        painting their patches grey shows exactly which tokens are decided and which are not."""
        images = self.decode(tokens)  # [B,3,H,W]
        cell = images.shape[-1] // self.grid  # patch * stride
        mask = known.view(-1, 1, self.grid, self.grid).float().cpu()  # [B,1,g,g]
        mask = mask.repeat_interleave(cell, 2).repeat_interleave(cell, 3)  # [B,1,H,W]
        return images * mask + hidden_value * (1 - mask)

    def generate(self, prompts: Sequence[str], seed: int, batch_size: int = 64) -> torch.Tensor:
        """Images [N,3,H,W] in [-1,1], one per prompt (ids 0..N-1), in batches on this process."""
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            log.warning(
                "%d empty prompt(s) (positions %s): sampling them with the null condition (unconditional)",
                len(empty),
                empty[:10],
            )
        return torch.cat(
            [self.generate_ids(prompts, ids, seed) for ids in batches_of_rank(len(prompts), batch_size, 0, 1)]
        )

    def generate_share(
        self, prompts: Sequence[str], seed: int, env: DistEnv, batch_size: int = 64
    ) -> Iterator[tuple[range, torch.Tensor]]:
        """This rank's share of the ids, batch by batch: (ids, uint8 images [n,3,H,W]), the exact
        pixels a PNG of them holds."""
        for ids in batches_of_rank(len(prompts), batch_size, env.rank, env.world_size):
            yield ids, to_uint8(self.generate_ids(prompts, list(ids), seed))

    def generate_to_folder(
        self, prompts: Sequence[str], seed: int, folder: Path, env: DistEnv, batch_size: int = 64
    ) -> list[int]:
        """This rank's share of the ids, written as ``folder/<id>.png``; returns the ids written.
        All ranks must call it (it ends with a barrier)."""
        mine: list[int] = []
        for ids, images in self.generate_share(prompts, seed, env, batch_size):
            write_pngs(images, ids, folder)
            mine.extend(ids)
        env.barrier()
        return mine


def write_pngs(images: torch.Tensor, ids: Sequence[int], folder: Path) -> None:
    """uint8 images [n,3,H,W] -> ``folder/<id>.png`` (lossless: reading one back gives these pixels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(ids, images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / image_name(i))


def save_images(images: torch.Tensor, folder: Path, first_id: int = 0) -> list[str]:
    """images [N,3,H,W] in [-1,1] -> ``folder/<id>.png``; returns the file names."""
    ids = range(first_id, first_id + images.shape[0])
    write_pngs(to_uint8(images), ids, folder)
    return [image_name(i) for i in ids]


def generate_split(
    gen: ImageGenerator, prompts: list[str], seed: int, out_dir: Path, split: str, per_row: int
) -> tuple[torch.Tensor, list[str], float]:
    """One split of a built-in set's evaluation: generate ``prompts`` (seeded from ``seed``), write
    ``out_dir/grid_<split>.png`` (``per_row`` images a row) and ``out_dir/samples/<split>/*.png``.
    Returns the images [N,3,H,W] in [-1,1], their file names under ``samples/<split>/`` and the
    generation's seconds per image."""
    from torchvision.utils import save_image  # torchvision only where images are written

    t0 = time.time()
    images = gen.generate(prompts, seed)
    seconds = (time.time() - t0) / len(prompts)
    save_image((images + 1) / 2, Path(out_dir) / f"grid_{split}.png", nrow=per_row, padding=1, pad_value=0.5)
    return images, save_images(images, Path(out_dir) / "samples" / split), seconds


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    """``out_dir/manifest.jsonl``: one JSON object a line."""
    with open(Path(out_dir) / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


class SampleFolder(torch.utils.data.Dataset):
    """The PNGs of ids 0..N-1 as uint8 [3,H,W] tensors, read on demand (50,000 images do not
    have to fit in memory); files of other ids in the folder are ignored."""

    def __init__(self, folder: Path, num_images: int) -> None:
        self.files = [Path(folder) / image_name(i) for i in range(num_images)]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} samples missing, e.g. {missing[0]}: a rank did not finish its share"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(self.files[i]).convert("RGB"))).permute(2, 0, 1)

    def stack(self, count: int | None = None) -> torch.Tensor:
        """uint8 [n,3,H,W] of the first ``count`` images (all by default)."""
        return torch.stack([self[i] for i in range(len(self) if count is None else min(count, len(self)))])


def save_adm_npz(path: Path, images: torch.Tensor, labels: Sequence[int] | None = None) -> None:
    """The ADM evaluation suite's sample batch: ``arr_0`` uint8 [N,H,W,3] (+ ``arr_1`` labels)."""
    arrays = [images.permute(0, 2, 3, 1).contiguous().numpy()]
    if labels is not None:
        arrays.append(np.asarray(labels, dtype=np.int64))
    np.savez(path, *arrays)
