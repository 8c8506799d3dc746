"""Evaluation prompts: the prompt of every image id, from class names (class-balanced) or from a
file of free-text prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PromptSet:
    """The prompt of every image id; ``labels`` holds class indices for class-conditional sets."""

    prompts: list[str]
    source: str
    labels: list[int] | None = None
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (an error names the file when it is missing or empty)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no {what} file at {p}")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {p} has no non-empty lines")
    return lines


def read_class_names(path: str) -> list[str]:
    """Class names in label order, one per line: a plain name, or ``wnid<TAB>name`` as in
    ``util/data/imagenet_classes.txt`` (the name is what the prompt uses)."""
    return [line.split("\t")[-1].strip() for line in read_lines(path, "class names")]


def class_balanced_prompts(class_names: Sequence[str], num_images: int, template: str = "{}") -> PromptSet:
    """``num_images / len(class_names)`` images per class: image id i shows class ``i % C``, so
    every prefix of C ids holds each class once. ``template`` turns a class name into the prompt."""
    C = len(class_names)
    if C == 0:
        raise ValueError("no class names given")
    if num_images <= 0 or num_images % C:
        raise ValueError(
            f"class-balanced evaluation needs a positive multiple of the {C} classes, got "
            f"--num_images {num_images} (e.g. {max(1, round(num_images / C)) * C})"
        )
    if "{}" not in template:
        raise ValueError(f"the class prompt template {template!r} has no '{{}}' for the class name")
    labels = [i % C for i in range(num_images)]
    return PromptSet(
        [template.format(class_names[k]) for k in labels],
        source="class_names",
        labels=labels,
        num_classes=C,
        extra={"images_per_class": num_images // C, "template": template},
    )


def file_prompts(prompts: Sequence[str], num_images: int | None = None) -> PromptSet:
    """Free-text prompts: image id i uses prompt ``i % P``; ``num_images`` defaults to one per prompt."""
    n = len(prompts) if num_images is None else num_images
    if n <= 0:
        raise ValueError(f"num_images must be positive, got {n}")
    return PromptSet(
        [prompts[i % len(prompts)] for i in range(n)], source="prompts_file", extra={"unique_prompts": len(prompts)}
    )
