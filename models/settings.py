"""``setting``: a dataclass field that carries its help text, its allowed values and its
command-line name, so that ``util/config.py`` can generate every flag from the configuration tree
and check every value read from a file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def setting(default: Any, help: str, choices: Sequence[Any] | None = None, flag: str | None = None) -> Any:
    """A dataclass field with ``default`` and metadata: ``help`` (for --help), ``choices`` (checked
    for every source: flags, files and stored configurations) and ``flag``, the short command-line
    name when it differs from the field's (``--flag`` beside the dotted ``--section.field``)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)
