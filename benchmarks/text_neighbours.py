"""How much the frozen text encoder itself knows about the held-out words of ``shapes``:
what any method that learns only from the training captions has to work with.

For every prompt of the evaluation's ``heldout_words`` split (seen color-shape combinations in
synonyms and templates no training caption holds), it reads the color and shape two ways from the
encoder's output alone, with no image model:

    nearest    the training caption (seen combinations x training templates) whose pooled vector
               is nearest in cosine: what a model that maps each caption to its nearest known
               concept would draw
    probe      linear classifiers (color: 6 classes, shape: 3) trained on the training captions'
               pooled vectors, then applied to the held-out-word prompts

and the cosine of single color words to the six training colors ("crimson" -> which color?). For
MiniLM it also reads each synonym from its own token states at every layer of the encoder (the
word alone, and inside "a <word> circle" / "a red <word>"): the nearest training word at that layer,
at any layer (an oracle) and over all layers together.

    python benchmarks/text_neighbours.py                      # MiniLM, the shapes recipe's encoder
    python benchmarks/text_neighbours.py --text_encoder clip --text_encoder_path ViT-B-32.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.text_encoders import build_text_encoder  # noqa: E402
from util.data import shapes  # noqa: E402
from util.evaluation.shapes_eval import unseen_word_prompts  # noqa: E402


def probe(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, classes: int, seed: int = 0) -> torch.Tensor:
    """Logistic regression on unit-normalised vectors (full batch Adam); predicted classes of ``test``."""
    torch.manual_seed(seed)
    train, test = F.normalize(train.float(), dim=-1), F.normalize(test.float(), dim=-1)
    w = torch.zeros(train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(500):
        loss = F.cross_entropy(train @ w + b, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (test @ w + b).argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text_encoder", default="minilm", choices=("minilm", "clip"))
    p.add_argument("--text_encoder_path", default=None, help="CLIP: a local open_clip checkpoint")
    p.add_argument("--text_max_length", type=int, default=16)
    a = p.parse_args()
    enc = build_text_encoder(a.text_encoder, a.text_encoder_path, max_length=a.text_max_length)
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)

    train = [(t.format(color=c, shape=s), c, s) for c, s in shapes.SEEN_COMBOS for t in shapes.TEMPLATES]
    prompts, combos = unseen_word_prompts(shapes.SEEN_COMBOS, 8)  # the demo evaluation's 120 prompts
    with torch.no_grad():
        tr = enc.encode([t for t, _, _ in train]).pooled
        te = enc.encode(prompts).pooled
    want_c = torch.tensor([colors.index(c) for c, _ in combos])
    want_s = torch.tensor([kinds.index(s) for _, s in combos])

    nearest = (F.normalize(te.float(), dim=-1) @ F.normalize(tr.float(), dim=-1).T).argmax(1)
    near_c = torch.tensor([colors.index(train[i][1]) for i in nearest.tolist()])
    near_s = torch.tensor([kinds.index(train[i][2]) for i in nearest.tolist()])
    probe_c = probe(tr, torch.tensor([colors.index(c) for _, c, _ in train]), te, len(colors))
    probe_s = probe(tr, torch.tensor([kinds.index(s) for _, _, s in train]), te, len(kinds))

    print(f"{len(prompts)} held-out-word prompts, {len(train)} training captions, encoder {a.text_encoder}")
    print("| reader | joint | color | shape |\n|---|---|---|---|")
    for name, pc, ps in (("nearest training caption", near_c, near_s), ("linear probe", probe_c, probe_s)):
        c, s = pc == want_c, ps == want_s
        print(f"| {name} | {(c & s).float().mean():.3f} | {c.float().mean():.3f} | {s.float().mean():.3f} |")

    words = [w for syn in shapes.COLOR_SYNONYMS.values() for w in syn]
    with torch.no_grad():
        base = F.normalize(enc.encode([f"a {c} circle" for c in colors]).pooled.float(), dim=-1)
        syn = F.normalize(enc.encode([f"a {w} circle" for w in words]).pooled.float(), dim=-1)
    sim = syn @ base.T
    truth = {w: c for c, syn_ in shapes.COLOR_SYNONYMS.items() for w in syn_}
    print('\nnearest training color of "a <word> circle" (cosine):')
    for w, row in zip(words, sim):
        k = int(row.argmax())
        mark = "" if colors[k] == truth[w] else f"   (is {truth[w]}: {row[colors.index(truth[w])]:.2f})"
        print(f"  {w:10s} -> {colors[k]:7s} {row[k]:.2f}{mark}")
    if a.text_encoder == "minilm":
        layer_table(enc)


def word_states(enc, prefix: str, words: list[str], suffix: str) -> list[torch.Tensor]:
    """Per hidden layer (embeddings first): the mean state of each word's own word pieces in
    ``prefix + word + suffix``, unit-normalised, [len(words), D]."""
    tok, out = enc.tokenizer, []
    for w in words:
        start = 1 + len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 1
        n = len(tok(w, add_special_tokens=False)["input_ids"])
        batch = tok([f"{prefix} {w} {suffix}".strip()], return_tensors="pt")
        with torch.no_grad():
            hidden = enc.model(**batch, output_hidden_states=True).hidden_states
        out.append([h[0, start : start + n].mean(0) for h in hidden])
    return [F.normalize(torch.stack([o[layer] for o in out]).float(), dim=-1) for layer in range(len(out[0]))]


def layer_table(enc) -> None:
    """Which training word each synonym's own token states are nearest to, at every layer; then two
    readers over all layers: "any" counts a synonym right when some layer gets it right (an oracle
    that picks the layer per word knowing the answer, so an upper bound of these readings), "all"
    takes the nearest training word by cosine summed over the layers (their concatenation)."""
    groups = (
        ("color", list(shapes.COLORS), shapes.COLOR_SYNONYMS, (("", ""), ("a", "circle"))),
        ("shape", list(shapes.SHAPES), shapes.SHAPE_SYNONYMS, (("", ""), ("a red", ""))),
    )
    print("\nsynonyms read from their own token states, nearest training word (cosine), per layer:")
    layers = enc.model.config.num_hidden_layers + 1  # the embeddings, then each block's output
    print("| words | context | " + " | ".join(f"layer {i}" for i in range(layers)) + " | any layer | all layers |")
    print("|---|---|" + "---|" * (layers + 2))
    for kind, known, synonyms, contexts in groups:
        words = [w for syn in synonyms.values() for w in syn]
        truth = torch.tensor([known.index(k) for k, syn in synonyms.items() for _ in syn])
        for prefix, suffix in contexts:
            base, syn = word_states(enc, prefix, known, suffix), word_states(enc, prefix, words, suffix)
            sims = torch.stack([s_ @ b.T for b, s_ in zip(base, syn)])  # [layers, words, known]
            right = sims.argmax(2) == truth  # [layers, words]
            accs = right.float().mean(1).tolist()
            accs += [right.any(0).float().mean().item(), (sims.sum(0).argmax(1) == truth).float().mean().item()]
            where = f"{prefix} <word> {suffix}".strip()
            print(f"| {len(words)} {kind} synonyms | {where} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
