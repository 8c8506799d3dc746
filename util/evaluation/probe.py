"""Linear probe of the frozen context encoder: the representation claim of JEPA, measured.

Images of a labelled set are encoded by the (EMA) context encoder with every token visible and
the learned NULL caption (so no label leaks in through the text), the encoder states of the
image tokens are mean-pooled, and a logistic-regression classifier (scikit-learn, on
standardised features) is fitted on one split and scored on another. On ``shapes`` the labels
are the color (6 classes) and the shape (3 classes). Two baselines put the number in context:
the same probe on a randomly initialised encoder of the same architecture, and on raw pixels.
"""

from __future__ import annotations

import logging

import torch

from models.jepat import JEPAT, Conditioning
from models.text_encoders import TextEmbeddings
from models.tokenizers import Tokenizer, patchify
from util.data import shapes

log = logging.getLogger(__name__)


def null_condition(model: JEPAT, batch: int, device: torch.device) -> Conditioning:
    """The learned null condition for ``batch`` images (caption-free features)."""
    c = model.cfg
    text = TextEmbeddings(
        torch.zeros(batch, 1, c.text_token_dim, device=device),
        torch.ones(batch, 1, dtype=torch.bool, device=device),
        torch.zeros(batch, c.text_pooled_dim, device=device),
    )
    return model.condition(text, torch.ones(batch, dtype=torch.bool, device=device))


@torch.no_grad()
def encoder_features(
    model: JEPAT,
    tokenizer: Tokenizer,
    patch_size: int,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean-pooled context-encoder states of the image tokens: images [N,3,H,W] in [-1,1] -> [N,D]."""
    model.eval()
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size].to(device)
        tokens = patchify(tokenizer.encode(x), patch_size).float()  # [b,L,d]
        if tokens.shape[1:] != (model.cfg.seq_len, model.cfg.token_dim):
            raise ValueError(
                f"images give tokens {tuple(tokens.shape[1:])} but the model expects "
                f"{(model.cfg.seq_len, model.cfg.token_dim)}: use the training --img_size/--patch_size"
            )
        h = model.encode_full(tokens, null_condition(model, x.shape[0], device))  # [b,L,D]
        out.append(h.mean(dim=1).float().cpu())  # [b,D]
    return torch.cat(out)


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, max_iter: int = 2000
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(train_x.double().numpy(), train_y.numpy())
    return float(clf.score(test_x.double().numpy(), test_y.numpy()))


def shapes_split(num: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [N,3,H,W] in [-1,1], color labels [N] and shape labels [N] of every combination."""
    ds = shapes.ShapesDataset(split="all", num_samples=num, resolution=resolution, seed=seed)
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
    images, c, s = [], [], []
    for i in range(num):
        m = ds.meta(i)
        images.append(shapes.to_tensor(shapes.render(m["color"], m["shape"], m["size"], m["cx"], m["cy"], resolution)))
        c.append(colors.index(m["color"]))
        s.append(kinds.index(m["shape"]))
    return torch.stack(images), torch.tensor(c), torch.tensor(s)


def probe_shapes(
    model: JEPAT,
    tokenizer: Tokenizer,
    patch_size: int,
    img_size: int,
    device: torch.device,
    num_train: int = 1000,
    num_test: int = 500,
    seed: int = 0,
    baselines: bool = True,
) -> dict:
    """Color and shape probe accuracy of ``model``'s frozen encoder (and of the baselines)."""
    tr_img, tr_c, tr_s = shapes_split(num_train, img_size, seed=10_000 + seed)
    te_img, te_c, te_s = shapes_split(num_test, img_size, seed=20_000 + seed)
    result: dict = {
        "num_train": num_train,
        "num_test": num_test,
        "features": "EMA context encoder, all tokens visible, null caption, mean-pooled",
    }

    def probe(tr: torch.Tensor, te: torch.Tensor) -> dict[str, float]:
        return {
            "color_acc": linear_probe_accuracy(tr, tr_c, te, te_c),
            "shape_acc": linear_probe_accuracy(tr, tr_s, te, te_s),
        }

    feats = [encoder_features(model, tokenizer, patch_size, im, device) for im in (tr_img, te_img)]
    result.update(probe(*feats))
    if baselines:
        fork = torch.random.get_rng_state()
        torch.manual_seed(seed)
        random_model = JEPAT(model.cfg).to(device).eval()
        torch.random.set_rng_state(fork)
        feats = [encoder_features(random_model, tokenizer, patch_size, im, device) for im in (tr_img, te_img)]
        result["random_init_encoder"] = probe(*feats)
        result["raw_pixels"] = probe(tr_img.flatten(1), te_img.flatten(1))
    log.info(
        "linear probe (%d train / %d test): color %.3f shape %.3f%s",
        num_train,
        num_test,
        result["color_acc"],
        result["shape_acc"],
        ""
        if not baselines
        else f"; random-init encoder color {result['random_init_encoder']['color_acc']:.3f} "
        f"shape {result['random_init_encoder']['shape_acc']:.3f}; raw pixels color "
        f"{result['raw_pixels']['color_acc']:.3f} shape {result['raw_pixels']['shape_acc']:.3f}",
    )
    return result
