"""The procedural ``pairs`` set (util/data/pairs.py), its judge (util/evaluation/pairs_judge.py) and
its evaluation, end to end: a short CPU run of main_jepat.py on ``--dataset pairs`` and a latent
cache of it both lead to the judged pairs evaluation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import main_cache
import main_jepat
from tests.test_train import SMALL
from util.data import pairs as P
from util.data.datasets import BUILTIN_SETS, build_dataset, builtin_eval, builtin_eval_of
from util.data.draws import ItemKey
from util.data.image_folders import CaptionOrigin
from util.data.latent_cache import CachedLatentDataset
from util.data.shapes import COLORS, SHAPES
from util.errors import UserError
from util.evaluation import pairs_judge as PJ
from util.evaluation.evaluate import metric_scalars
from util.evaluation.pairs_eval import pairs_prompts
from util.pretrained import _metric_lines


def _binding(a, b) -> frozenset:
    return frozenset([tuple(a), tuple(b)])


def test_held_out_bindings_cover_every_object_once_and_never_train():
    objects = {(c, s) for c in COLORS for s in SHAPES}
    assert len(P.ALL_PAIRS) == 18 * 17 // 2 and len(P.TRAIN_PAIRS) == len(P.ALL_PAIRS) - 9
    for table in (P.HELDOUT_PAIRS, P.SEEN_EVAL_PAIRS):
        assert sorted(o for pair in table for o in pair) == sorted(objects)  # each object in exactly one pair
    held = {_binding(*p) for p in P.HELDOUT_PAIRS}
    assert not held & {_binding(*p) for p in P.TRAIN_PAIRS}
    assert {_binding(*p) for p in P.SEEN_EVAL_PAIRS} <= {_binding(*p) for p in P.TRAIN_PAIRS}
    # in the data: no training image holds a held-out binding (in any order or relation), every
    # object still trains with other partners, and the held-out split holds only held-out bindings
    train = P.PairsDataset("train", num_samples=3000, resolution=32, seed=1)
    seen, partners = set(), Counter()
    for i in range(len(train)):
        t = train.target(i)
        seen.add(_binding(t.first, t.second))
        partners.update([t.first, t.second])
    assert not seen & held and len(seen) == len(P.TRAIN_PAIRS)
    assert set(partners) == objects
    heldout = P.PairsDataset("heldout", num_samples=300, resolution=32, seed=1)
    got = {_binding(heldout.target(i).first, heldout.target(i).second) for i in range(len(heldout))}
    assert got == held
    for i in range(200):  # nor does any training caption name one
        t = P.parse_caption(train[i][1])
        assert _binding(t.first, t.second) not in held


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_judge_reads_rendered_images(split):
    ds = P.PairsDataset(split, num_samples=200, resolution=32, seed=11)
    judged = PJ.judge_pairs(np.stack([ds.image(i) for i in range(len(ds))]), [ds.target(i) for i in range(len(ds))])
    result = PJ.score_pairs(judged)
    assert result["n"] == 200 and result["not_two_objects"] == 0, result
    assert result["objects_acc"] >= 0.98 and result["relation_acc"] >= 0.98 and result["joint_acc"] >= 0.98, result
    assert set(Counter(ds.target(i).relation for i in range(len(ds)))) == set(P.RELATIONS)
    # a tensor in [-1, 1] (the generator's output) reads the same as the uint8 array
    x = torch.stack([ds[i][0] for i in range(8)])
    assert PJ.judge_pairs(x, [ds.target(i) for i in range(8)]) == judged[:8]


def test_judge_reads_24_px_images():
    ds = P.PairsDataset("all", num_samples=100, resolution=24, seed=4)
    judged = [PJ.judge_pair(ds.image(i), ds.target(i)) for i in range(len(ds))]
    assert PJ.score_pairs(judged)["joint_acc"] >= 0.98


def test_captions_and_geometry_match_the_rendered_image():
    res = 32
    ds = P.PairsDataset("all", num_samples=300, resolution=res, seed=2)
    variants = set()
    for i in range(len(ds)):
        m, (x, cap) = ds.meta(i), ds[i]
        first, second = m["first"], m["second"]
        assert P.parse_caption(cap) == ds.target(i) == P.PairTarget(first[:2], m["relation"], second[:2])
        assert cap == P.caption(ds.target(i), m["variant"])
        variants.add(m["variant"])
        assert P.relation_of(first, second) == m["relation"]
        horizontal = m["relation"] in ("left of", "right of")
        along = abs(first.cx - second.cx) if horizontal else abs(first.cy - second.cy)
        across = abs(first.cy - second.cy) if horizontal else abs(first.cx - second.cx)
        assert along >= (first.size + second.size) / 2 + P.GAP - 1e-9
        assert across <= P.MAX_CROSS_OFFSET * along + 1e-9
        for o in (first, second):
            assert P.SIZE_RANGE[0] * res <= o.size <= P.SIZE_RANGE[1] * res
            for c in (o.cx, o.cy):
                assert P.MARGIN + o.size / 2 - 1e-9 <= c <= res - P.MARGIN - o.size / 2 + 1e-9
            centre = ds.image(i)[int(o.cy), int(o.cx)].astype(float)
            assert np.linalg.norm(centre - np.array(COLORS[o.color])) < 60, (i, o)
        # the two objects share no pixel: the image's ink is the sum of each object's alone
        ink = (ds.image(i) < 255).any(axis=2).sum()
        alone = [(P.render_pair(o, o, res) < 255).any(axis=2).sum() for o in (first, second)]
        assert ink == sum(alone)
        assert torch.equal(x, P.to_tensor(ds.image(i)))
    assert variants == set(range(P.NUM_VARIANTS))
    assert (
        P.prompt(P.PairTarget(("red", "circle"), "left of", ("blue", "square"))) == "a red circle left of a blue square"
    )
    assert (
        P.caption(P.PairTarget(("blue", "square"), "right of", ("orange", "circle")), 4)
        == "a blue square is to the right of an orange circle"
    )
    assert P.parse_caption("a green triangle above a yellow circle").relation == "above"


def test_items_are_deterministic_per_key():
    a = P.PairsDataset("train", num_samples=40, resolution=32, seed=4)
    b = P.PairsDataset("train", num_samples=40, resolution=32, seed=4)
    for i in (0, 17, 39):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert a[ItemKey(i, 12345)][1] == a[i][1]  # the set's own seed fixes an item, not the draw seed
    x, cap = a[3]
    x.fill_(0.0)  # writing into an item does not change the kept image
    assert torch.equal(a[3][0], P.to_tensor(a.image(3))) and a[3][1] == cap
    big = P.PairsDataset("train", num_samples=5000, resolution=32, seed=4)
    assert big[7][1] == a[7][1] and torch.equal(big[7][0], a[7][0])
    other = P.PairsDataset("train", num_samples=40, resolution=32, seed=5)
    assert sum(not torch.equal(a[i][0], other[i][0]) for i in range(40)) >= 38
    vocabulary = a.caption_vocabulary()
    assert set(vocabulary) == {a[i][1] for i in range(40)} and len(vocabulary) == len(set(vocabulary))
    assert a.caption_origin().kind == "pairs" and a[-1][1] == a[39][1]


def test_bad_arguments_and_words_name_the_problem():
    red, blue = ("red", "circle"), ("blue", "square")
    with pytest.raises(ValueError, match="unknown relation 'behind'.*left of"):
        P.caption(P.PairTarget(red, "behind", blue))
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        P.caption(P.PairTarget(("teal", "circle"), "above", blue))
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        P.caption(P.PairTarget(red, "above", ("red", "hexagon")))
    with pytest.raises(ValueError, match="two different color-shapes"):
        P.caption(P.PairTarget(red, "above", red))
    with pytest.raises(ValueError, match="variant"):
        P.caption(P.PairTarget(red, "above", blue), P.NUM_VARIANTS)
    with pytest.raises(ValueError, match=r"not a pairs caption \(unknown words \['teal'\]\)"):
        P.parse_caption("a teal circle left of a blue square")
    with pytest.raises(ValueError, match=r"unknown words \['behind'\]"):
        P.parse_caption("a red circle behind a blue square")
    with pytest.raises(ValueError, match="unknown relation"):
        P.draw_layout(np.random.default_rng(0), "near", 32)
    with pytest.raises(ValueError, match="heldout"):
        P.PairsDataset("val")
    with pytest.raises(ValueError, match=">= 20"):
        P.PairsDataset("train", resolution=12)
    with pytest.raises(ValueError, match="num_samples"):
        P.PairsDataset("train", num_samples=0)
    with pytest.raises(IndexError):
        P.PairsDataset("train", num_samples=5)[5]
    with pytest.raises(ValueError, match="random_flip"):
        build_dataset("pairs", img_size=32, num_samples=8, flip=True)
    # through the registry, a size the set cannot draw is the user's setting: one line, not a traceback
    with pytest.raises(UserError, match=r"data.img_size=16.*>= 20"):
        build_dataset("pairs", img_size=16, num_samples=8)
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        PJ.judge_pairs(np.zeros((2, 32, 32, 3), np.uint8), [P.PairTarget(red, "above", blue)])
    with pytest.raises(ValueError, match="at least one"):
        PJ.score_pairs([])


def test_judge_counts_objects_and_reads_relations():
    res, red, blue, green = 32, ("red", "circle"), ("blue", "square"), ("green", "triangle")
    target = P.PairTarget(red, "left of", blue)
    left, right = P.Placed(*red, 10.0, 8.0, 16.0), P.Placed(*blue, 10.0, 24.0, 16.0)
    good = PJ.judge_pair(P.render_pair(left, right, res), target)
    assert good.objects_ok and good.relation == "left of" and good.joint_ok
    swapped = PJ.judge_pair(P.render_pair(left._replace(cx=24.0), right._replace(cx=8.0), res), target)
    assert swapped.objects_ok and swapped.relation == "right of" and not swapped.relation_ok
    assert good.axis_ok and swapped.axis_ok  # side by side as asked, in either order
    stacked = PJ.judge_pair(
        P.render_pair(left._replace(cx=16.0, cy=8.0), right._replace(cx=16.0, cy=24.0), res), target
    )
    assert stacked.objects_ok and stacked.relation == "above" and not stacked.axis_ok
    # a wrong color: the objects are wrong, but the relation is still read (each object taken as the
    # prompt's object it agrees with most)
    wrong = PJ.judge_pair(P.render_pair(left, right._replace(color="green"), res), target)
    assert not wrong.objects_ok and wrong.relation_ok and not wrong.joint_ok
    diagonal = PJ.judge_pair(P.render_pair(left._replace(cy=8.0), right._replace(cy=24.0), res), target)
    assert diagonal.objects_ok and diagonal.relation is None and not diagonal.relation_ok and not diagonal.axis_ok
    blank = PJ.judge_pair(np.full((res, res, 3), 255, np.uint8), target)
    one = PJ.judge_pair(P.render_pair(left, left, res), target)
    three = np.minimum(P.render_pair(left, right, res), P.render_pair(P.Placed(*green, 8.0, 16.0, 4.5), left, res))
    judged = [good, swapped, wrong, diagonal, blank, one, PJ.judge_pair(three, target)]
    assert [len(j.found) for j in judged] == [2, 2, 2, 2, 0, 1, 3]
    r = PJ.score_pairs(judged)
    assert r["not_two_objects"] == 3 and r["object_counts"] == {"0": 1, "1": 1, "2": 4, "3+": 1}
    assert r["objects_acc"] == pytest.approx(3 / 7) and r["relation_acc"] == pytest.approx(2 / 7)
    assert r["joint_acc"] == pytest.approx(1 / 7) and r["relation_given_objects"] == pytest.approx(1 / 3)
    assert r["axis_acc"] == pytest.approx(3 / 7)  # good, swapped, wrong
    assert r["order_given_axis"] == pytest.approx(1 / 2)  # good of (good, swapped)
    speck = P.render_pair(left, right, res)
    speck[0, 0] = COLORS["green"]  # one stray pixel is not an object
    assert len(PJ.find_objects(speck)) == 2


def test_evaluation_prompts_cycle_relations_and_order():
    prompts, targets = pairs_prompts(P.HELDOUT_PAIRS[:1], 8)
    (a, b) = P.HELDOUT_PAIRS[0]
    assert [t.relation for t in targets] == list(P.RELATIONS) * 2
    assert [t.first for t in targets] == [a] * 4 + [b] * 4
    assert [P.parse_caption(p) for p in prompts] == targets


def test_builtin_evaluation_follows_the_data_and_its_cache(tmp_path, one_thread):
    assert BUILTIN_SETS == ("shapes", "pairs")
    assert builtin_eval("pairs", "") == "pairs" and builtin_eval("shapes", "") == "shapes"
    assert builtin_eval("imagenet", "/data") is None
    assert builtin_eval_of(CaptionOrigin("pairs")) == "pairs" and builtin_eval_of(CaptionOrigin("caption")) is None
    cache = tmp_path / "cache"
    argv = "--config pairs --dataset pairs --img_size 20 --num_samples 12 --num_workers 0 --no_text_cache --device cpu"
    argv = argv.split()
    main_cache.main(main_cache.get_args_parser().parse_args(argv + ["--cache_dir", str(cache)]))
    assert builtin_eval("cached", str(cache)) == "pairs"
    ds = CachedLatentDataset(cache)
    assert ds.caption_origin().kind == "pairs" and len(ds) == 12 and not ds.flip
    with pytest.raises(UserError, match="left and right"):
        main_cache.resolve_args(main_cache.get_args_parser().parse_args(argv + ["--cache_dir", "x", "--random_flip"]))


def test_a_refused_data_setting_stops_training_before_any_weights_load(tmp_path, monkeypatch):
    def loads_weights(*a, **k):
        raise AssertionError("the tokenizer was built before the data settings were checked")

    monkeypatch.setattr(main_jepat, "build_tokenizer", loads_weights)
    args = ["--config", "pairs", *SMALL, "--img_size", "16", "--patch_size", "8", "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match=r"data.img_size=16.*>= 20"):
        main_jepat.main(main_jepat.get_args_parser().parse_args(args))


def test_training_on_pairs_runs_the_pairs_evaluation(tmp_path, one_thread):
    run = tmp_path / "run"
    fast = "--epochs 1 --num_iter 2 --ode_steps 2 --eval_per_combo 1 --grid_freq 0 --log_with none".split()
    small = [*(a for a in SMALL if a != "--no_eval"), "--img_size", "20", "--patch_size", "10"]  # pairs: >= 20 px
    args = ["--config", "pairs", *small, *fast, "--output_dir", str(run)]
    m = main_jepat.main(main_jepat.get_args_parser().parse_args(args))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["step"] == 12 and saved["num_samples"] == 18 and saved["images_per_pair"] == 1
    for split in ("pairs_seen", "pairs_heldout"):
        s = saved[split]
        assert s["n"] == 9 and sum(s["object_counts"].values()) == 9
        assert {"objects_acc", "relation_acc", "joint_acc", "not_two_objects"} <= set(s)
        assert 0 <= s["joint_acc"] <= min(s["objects_acc"], s["relation_acc"]) <= 1
        assert (run / f"grid_{split}.png").is_file() and len(list((run / "samples" / split).glob("*.png"))) == 9
        assert f"eval/{split}_joint_acc" in metric_scalars(saved)
    assert "color_acc" not in json.dumps(saved)  # not the shapes evaluation
    rows = [json.loads(r) for r in (run / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and {r["split"] for r in rows} == {"pairs_seen", "pairs_heldout"}
    targets = [
        P.PairTarget(tuple(r["target"]["first"]), r["target"]["relation"], tuple(r["target"]["second"])) for r in rows
    ]
    assert [P.parse_caption(r["prompt"]) for r in rows] == targets
    assert [r["correct"] for r in rows[:9]].count(True) == round(9 * m["pairs_seen"]["joint_acc"])
    assert any(line.startswith("| pairs, heldout bindings (9 images)") for line in _metric_lines(saved))
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert ckpt["captions_info"]["source"] == {"kind": "pairs"}
    # --evaluate on the checkpoint runs the same evaluation, image for image
    again = tmp_path / "again"
    evaluate = [*args[:-1], str(again), "--evaluate", "--resume", str(run / "checkpoint-last.pth")]
    m2 = main_jepat.main(main_jepat.get_args_parser().parse_args(evaluate))
    for split in ("pairs_seen", "pairs_heldout"):
        assert {k: v for k, v in m2[split].items() if k != "seconds_per_image"} == {
            k: v for k, v in saved[split].items() if k != "seconds_per_image"
        }
