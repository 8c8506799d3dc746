"""Image sources on disk: ImageNet-style class folders, caption manifests, and the members of tar
shards (``util/data/tar_shards.py`` lists those).

A *listing* is what a source yields before any pixel is read: one entry per image it names,
with a caption-group id (a class for ImageNet, one image's captions for a manifest or a tar
sample), plus the entries it refused (missing file, empty caption, duplicate path, bad manifest
line, a tar sample without an image). Loading
(:func:`load_image`) then converts what can be converted (CMYK, grayscale, palette, alpha,
16-bit, small images) and raises :class:`BadImage` with a reason for the rest. Both the latent
cache (``main_cache.py``) and raw training read through these.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from util.data.draws import ItemKey, item_generator, item_key

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
DEFAULT_PROMPT = "a photo of a {name}"


@dataclass
class CaptionOrigin:
    """How a dataset's captions were made: stored (as ``to_dict``) in latent caches and checkpoints,
    read by the evaluation (class folders are evaluated on exactly their class prompts)."""

    kind: str = ""  # class (class folders), caption (free text), shapes or pairs (the built-in sets)
    class_prompts: list[str] = field(default_factory=list)  # class folders: each class's caption, by label
    class_names: list[str] = field(default_factory=list)
    template: str = ""  # class folders: the caption of a class name, e.g. "a photo of a {name}"

    @classmethod
    def from_dict(cls, d: dict | None) -> CaptionOrigin:
        d = d or {}
        return cls(
            d.get("kind", ""),
            list(d.get("class_prompts", [])),
            list(d.get("class_names", [])),
            d.get("template", "") or "",
        )

    def to_dict(self) -> dict:
        if self.kind != "class":
            return {"kind": self.kind}
        return {
            "kind": "class",
            "class_prompts": self.class_prompts,
            "class_names": self.class_names,
            "template": self.template,
        }


class BadImage(Exception):
    """An image that cannot be used; ``str(e)`` is the reason written to skipped.jsonl."""


@dataclass
class TarMembers:
    """Where the images of a listing lie when they are members of tar shards: entry i is the
    ``where[i] = (t, offset, size)`` bytes of ``tars[t]`` (relative to the listing's root), read
    by one seek, so any entry loads alone and in any order."""

    tars: list[str]
    where: np.ndarray  # [n,3] int64: tar index, data offset, size in bytes

    def read(self, root: str, i: int) -> bytes:
        t, offset, size = (int(v) for v in self.where[i])
        path = os.path.join(root, self.tars[t])
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise BadImage(f"tar shard unreadable ({e})") from None
        if len(data) != size:
            raise BadImage(f"tar member cut short ({len(data)} of {size} bytes; the shard changed since it was listed)")
        return data

    def to_json(self) -> dict:
        return {"tars": list(self.tars), "where": self.where.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> TarMembers:
        return cls(list(d["tars"]), np.asarray(d["where"], dtype=np.int64).reshape(-1, 3))


@dataclass
class Listing:
    """Entries: ``paths[i]`` (relative to ``root``) with caption group ``groups[i]``;
    ``captions[g]`` are the captions of group g (one is drawn per step). ``skipped`` holds
    ``{"path", "reason"}`` records of entries refused at listing time. With ``members`` the
    images are tar members and ``paths[i]`` only names them (``shard.tar/key.jpg``)."""

    root: str
    paths: list[str]
    groups: list[int]
    captions: list[list[str]]
    kind: str  # "class" or "caption"
    skipped: list[dict] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # class folders: the name of each class
    template: str = ""  # class folders: its prompt, e.g. "a photo of a {}"
    members: TarMembers | None = None  # tar shards: where each entry's bytes are

    def __len__(self) -> int:
        return len(self.paths)

    def image_file(self, i: int) -> str | BinaryIO:
        """What :func:`load_image` reads for entry i: a file path, or the bytes of a tar member
        (raises BadImage when the shard cannot be read)."""
        if self.members is None:
            return os.path.join(self.root, self.paths[i])
        return io.BytesIO(self.members.read(self.root, i))

    def caption_origin(self) -> CaptionOrigin:
        """How the captions were made: the class prompts, names and template of class folders (the
        evaluation uses exactly these), or only the kind for caption data."""
        if self.kind != "class":
            return CaptionOrigin(self.kind)
        return CaptionOrigin("class", [g[0] for g in self.captions], list(self.class_names), self.template)

    def vocabulary(self) -> list[str]:
        return list(dict.fromkeys(c for group in self.captions for c in group))


# ------------------------------------------------------------------ listings
def imagenet_class_names() -> dict[str, str]:
    """The 1000 ImageNet synsets -> human class names (``util/imagenet_classes.txt``)."""
    names = {}
    for line in IMAGENET_CLASSES_FILE.read_text().splitlines():
        wnid, name = line.split("\t")
        names[wnid] = name
    return names


def list_class_folders(root: str, prompt: str = DEFAULT_PROMPT) -> Listing:
    """``root/<class>/...`` (or ``root/train/<class>/...``): one caption group per class folder, in
    sorted order (the standard ImageNet label order for synset folders). Synset folders get their
    ImageNet name; other folders their own name with '_' as spaces."""
    base = Path(root).expanduser()
    if (base / "train").is_dir():
        base = base / "train"
    if not base.is_dir():
        raise FileNotFoundError(
            f"no image folder at {root}; expected <root>/<class>/<image> or <root>/train/<class>/..."
        )
    classes = sorted(d.name for d in os.scandir(base) if d.is_dir())
    if not classes:
        raise ValueError(f"{base} has no class folders; expected <root>/<class>/<image>")
    names = imagenet_class_names()
    class_names = [names.get(c, c.replace("_", " ")) for c in classes]
    paths, groups, skipped = [], [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(base / cls, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, f), base)
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(rel)
                    groups.append(label)
                elif not f.startswith("."):
                    skipped.append({"path": rel, "reason": "not an image file extension"})
    captions = [[prompt.format(name=name)] for name in class_names]
    return Listing(str(base), paths, groups, captions, "class", skipped, class_names, prompt.replace("{name}", "{}"))


def list_manifest(manifest: str, root: str | None = None) -> Listing:
    """JSON Lines, one image per line: ``{"image": "rel/path.jpg", "caption": "..."}`` or
    ``"caption": ["...", "..."]``. Paths are relative to ``root`` (default: the manifest's folder).
    Refused: bad JSON, no image/caption, empty captions (empty strings in a list are dropped),
    missing files, and a path listed twice (the first listing is kept)."""
    mpath = Path(manifest).expanduser()
    if not mpath.is_file():
        raise FileNotFoundError(
            f"no caption manifest at {manifest}; expected a JSON Lines file of "
            '{"image": "rel/path.jpg", "caption": "..."}'
        )
    base = Path(root).expanduser() if root else mpath.parent
    paths, groups, captions, skipped, first_line = [], [], [], [], {}
    with open(mpath, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{mpath.name}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append({"path": where, "reason": f"manifest line is not JSON ({e.msg})"})
                continue
            image = rec.get("image") if isinstance(rec, dict) else None
            if not isinstance(image, str) or not image.strip():
                skipped.append({"path": where, "reason": 'manifest line has no "image" path'})
                continue
            cap = rec.get("caption")
            caps = [cap] if isinstance(cap, str) else cap if isinstance(cap, list) else []
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            rel = os.path.normpath(image)
            if not caps:
                skipped.append({"path": rel, "reason": f"empty or missing caption ({where})"})
            elif rel in first_line:
                skipped.append(
                    {"path": rel, "reason": f"duplicate path ({where}; first listed at line {first_line[rel]})"}
                )
            elif not (base / rel).is_file():
                skipped.append({"path": rel, "reason": f"file listed in the manifest is missing ({where})"})
            else:
                first_line[rel] = lineno
                paths.append(rel)
                groups.append(len(captions))
                captions.append(caps)
    return Listing(str(base), paths, groups, captions, "caption", skipped)


# ------------------------------------------------------------------ loading
def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, resize the
    short side to ``size`` (bicubic), then crop the center ``size`` x ``size``."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> 8-bit RGB; returns the image and a note when something was converted
    (alpha is composited onto white; 16-bit and float images are scaled to 8 bits)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), f"{mode} (16-bit/float) scaled to 8-bit RGB"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} with alpha composited on white"
    return img.convert("RGB"), f"{mode} converted to RGB"


def load_image(path: str | BinaryIO, size: int, small: str = "upscale") -> tuple[Image.Image, str | None]:
    """Read (a file, or bytes in a file object), convert and center-crop one image to ``size`` px
    RGB. Returns (image, note) where
    the note says what was converted (or None); raises BadImage(reason) for unusable files.
    ``small``: "upscale" images whose short side is below ``size`` (ADM does) or "skip" them."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated / corrupt data fails here, not later
            img.seek(0)
            rgb, note = to_rgb(img)
            rgb.load()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not a readable image (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"corrupt or truncated image ({e})") from None
    if min(rgb.size) < 1:
        raise BadImage("empty image (0 pixels)")
    if min(rgb.size) < size:
        if small == "skip":
            raise BadImage(f"smaller than the crop ({rgb.width}x{rgb.height} < {size} px)")
        note = ", ".join(n for n in (note, f"upscaled from {rgb.width}x{rgb.height} (< {size} px)") if n)
    return center_crop(rgb, size), note


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3,H,W] float in [-1,1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H,W,3]
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------ raw training datasets
class RawImageDataset(Dataset):
    """(image [3,S,S] in [-1,1], caption) read from disk for training with the VAE online:
    ADM center crop, random horizontal flip, one caption of the group drawn per item. A file
    that fails to load is logged (once) and replaced by the next entry, so one bad file never
    stops training; ``main_cache.py`` reports such files in ``skipped.jsonl`` instead."""

    def __init__(self, listing: Listing, img_size: int, flip: bool = True, small: str = "upscale") -> None:
        if len(listing) == 0:
            raise ValueError(f"no usable images under {listing.root} ({len(listing.skipped)} refused)")
        self.listing, self.img_size, self.flip, self.small = listing, img_size, flip, small
        self.bad: dict[int, str] = {}
        for rec in listing.skipped[:20]:
            log.warning("skipped %s: %s", rec["path"], rec["reason"])
        if len(listing.skipped) > 20:
            log.warning("... %d entries skipped in all", len(listing.skipped))

    def __len__(self) -> int:
        return len(self.listing)

    def caption_vocabulary(self) -> list[str]:
        return self.listing.vocabulary()

    def caption_origin(self) -> CaptionOrigin:
        return self.listing.caption_origin()

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, str]:
        key = item_key(key)
        i, g = key.index, item_generator(key)
        for k in range(min(len(self), 64)):
            j = (i + k) % len(self)
            if j in self.bad:
                continue
            try:
                img, _ = load_image(self.listing.image_file(j), self.img_size, self.small)
                break
            except BadImage as e:
                self.bad[j] = str(e)
                log.warning("skipping %s: %s", self.listing.paths[j], e)
        else:
            raise RuntimeError(f"64 consecutive unreadable images from entry {i} of {self.listing.root}")
        x = to_tensor(img)
        flip, pick = torch.rand(2, generator=g).tolist()
        if self.flip and flip < 0.5:
            x = x.flip(-1)
        group = self.listing.captions[self.listing.groups[j]]
        caption = group[min(int(pick * len(group)), len(group) - 1)]
        return x, caption


def build_listing(dataset: str, data_path: str, manifest: str | None = None, prompt: str = DEFAULT_PROMPT) -> Listing:
    """``imagenet``: class folders at ``data_path``; ``captions``: the JSON Lines manifest
    (``manifest``, or ``data_path`` when it is a file) with paths relative to ``data_path``."""
    if dataset == "imagenet":
        return list_class_folders(data_path, prompt)
    if dataset == "captions":
        if manifest is None and data_path.endswith((".jsonl", ".json")):
            return list_manifest(data_path)
        if manifest is None:
            raise ValueError(
                "the captions dataset needs a JSON Lines manifest: --data_path file.jsonl, or "
                "--manifest file.jsonl with --data_path the image root"
            )
        return list_manifest(manifest, data_path or None)
    raise ValueError(f"no image listing for dataset {dataset!r}")
