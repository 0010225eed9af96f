"""Retrieval recall and zero-shot classification on hand-built embeddings with known answers."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.clip.retrieval import RetrievalEvaluator, retrieval_metrics
from vitkit.clip.zeroshot import TEMPLATES, ZeroShotEvaluator, zeroshot_classifier, zeroshot_predict
from vitkit.engine.evaluation import run_evaluation
from vitkit.errors import ConfigError, DataError
from vitkit.objectives import build_objective

# ---------------------------------------------------------------- retrieval


def hand_built():
    """3 images on the axes, 5 captions; the answer of every query worked out by hand (see the comments)."""
    img = torch.eye(4)[:3]
    txt = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],  # image 0's: nearest image 0
        [0.9, 0.5, 0.0, 0.0],  # image 1's: image 0 ranks above it
        [0.0, 0.0, 0.0, 1.0],  # image 2's: the same score for every image (a three-way tie)
        [0.0, 0.0, 1.0, 0.1],  # image 2's: nearest image 2
        [0.0, 1.0, 0.2, 0.0],  # image 2's: image 1 ranks above it; for image 1 it outranks image 1's own
    ])
    return img, txt, torch.tensor([0, 1, 2, 2, 2])


def test_recall_on_hand_built_embeddings():
    img, txt, owner = hand_built()
    got = retrieval_metrics(img, txt, owner, ks=(1, 2, 5))
    # text -> image: hits at 1 for captions 0 and 3, 1/3 for the tie (its image first in a random order of 3).
    assert got["t2i_r1"] == pytest.approx((1 + 0 + 1 / 3 + 1 + 0) / 5)
    # at 2: captions 1 and 4 come second; the tie puts image 2 in the first two with probability 2/3.
    assert got["t2i_r2"] == pytest.approx((1 + 1 + 2 / 3 + 1 + 1) / 5)
    assert got["t2i_r5"] == 1.0
    # image -> text: image 1's caption is beaten by caption 4; images 0 and 2 find one of theirs first.
    assert got["i2t_r1"] == pytest.approx(2 / 3)
    assert got["i2t_r2"] == 1.0 and got["i2t_r5"] == 1.0
    assert got["r_mean"] == pytest.approx(sum(v for k, v in got.items() if k != "r_mean") / 6)
    assert set(retrieval_metrics(img, txt, owner)) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    # Scale does not matter: the score is the cosine.
    assert retrieval_metrics(3 * img, 0.5 * txt, owner, ks=(1, 2, 5)) == pytest.approx(got)


def brute_force(img, txt, owner, k):
    """Recall@k by sorting every query's candidates (no ties in the data it is given)."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    i2t = [any(owner[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in range(len(img))]
    t2i = [owner[j] in sim[:, j].argsort(descending=True)[:k] for j in range(len(txt))]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_recall_matches_sorting_every_query():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(30, 8, generator=g), torch.randn(70, 8, generator=g)
    owner = torch.cat([torch.arange(30), torch.randint(30, (40,), generator=g)])
    txt += 1.5 * img[owner]
    got = retrieval_metrics(img, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(img, txt, owner, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < got["t2i_r1"] < got["t2i_r5"] < got["t2i_r10"] < 1


def test_embeddings_that_all_coincide_score_chance():
    n = 10
    img, txt = torch.ones(n, 4), torch.ones(2 * n, 4)
    owner = torch.arange(n).repeat_interleave(2)  # two captions per image
    got = retrieval_metrics(img, txt, owner)
    for k in (1, 5, 10):
        assert got[f"t2i_r{k}"] == pytest.approx(k / n)
        # the first of 2 positives among 20 shuffled texts lands in the top k
        assert got[f"i2t_r{k}"] == pytest.approx(1 - math.comb(2 * n - 2, k) / math.comb(2 * n, k))


def test_nan_embeddings_never_count_as_hits():
    """A model whose embeddings are NaN (a broken EMA copy) scores chance, not 100%; one NaN image ranks last."""
    n = 10
    owner = torch.arange(n).repeat_interleave(2)
    got = retrieval_metrics(torch.full((n, 4), float("nan")), torch.full((2 * n, 4), float("nan")), owner)
    assert got["t2i_r1"] == pytest.approx(1 / n) and got["t2i_r5"] == pytest.approx(5 / n)
    img, txt, owner = hand_built()
    img[0] = float("nan")
    got = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # caption 0 (image 0's) now finds image 0 last of 3; caption 1's image 1 moves up to first
    assert got["t2i_r1"] == pytest.approx((0 + 1 + 1 / 2 + 1 + 0) / 5)  # the tie is now images 1 and 2
    assert got["t2i_r2"] == pytest.approx((0 + 1 + 1 + 1 + 1) / 5)


def test_images_without_captions_are_no_image_queries():
    img, txt, owner = hand_built()
    img = torch.cat([img, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])  # image 3: no caption, only a distractor
    got = retrieval_metrics(img, txt, owner, ks=(1,))
    assert got["i2t_r1"] == pytest.approx(2 / 3)  # still over images 0..2
    assert got["t2i_r1"] == pytest.approx((1 + 0 + 0 + 1 + 0) / 5)  # caption 2 now prefers image 3


def test_bad_retrieval_input_is_a_clear_error():
    img, txt, owner = hand_built()
    with pytest.raises(DataError, match="one image index per text"):
        retrieval_metrics(img, txt, owner[:3])
    with pytest.raises(DataError, match="outside the 3 images"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2, 3, 2]))


def test_evaluator_joins_batches_and_counts_a_repeated_image_once():
    img, txt, owner = hand_built()
    want = retrieval_metrics(img, txt, owner)
    ev = RetrievalEvaluator()
    # batch 1: images 0, 1 with captions 0, 1; batch 2: image 2 with captions 2, 3, 4, then image 0 again
    # (a sampler padding its shard) with a copy of caption 0.
    ev.update({"image_id": torch.tensor([10, 11])},
              {"image_embeds": img[:2], "text_embeds": txt[:2], "text_to_image": torch.tensor([0, 1])})
    ev.update({"image_id": [12, 10]},
              {"image_embeds": torch.cat([img[2:], img[:1]]), "text_embeds": torch.cat([txt[2:], txt[:1]]),
               "text_to_image": torch.tensor([0, 0, 0, 1])})
    assert ev.compute() == pytest.approx(want)
    assert ev.primary == "r_mean" and ev.higher_is_better
    ev.reset()
    assert ev.compute() == {}


# ---------------------------------------------------------------- zero-shot

COLOURS = {"red": 0, "green": 1, "blue": 2}


class ColourTwoTower(nn.Module):
    """A text tower that adds word vectors (colour words on their axes, every other word on a fixed
    direction of its own) and an image tower that returns the mean colour: a model whose zero-shot
    answers are known."""

    def __init__(self, bias: float | None = None):
        super().__init__()
        self.vocab: dict[str, int] = {}
        g = torch.Generator().manual_seed(0)
        self.words = torch.rand(64, 5, generator=g) * 0.2
        self.words[:, :3] *= 0.5
        self.logit_scale = nn.Parameter(torch.tensor(math.log(50.0)))
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        self.max_logit_scale = math.log(100)

    def tokenize(self, texts):
        rows = []
        for t in texts:
            ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.lower().replace(".", "").split()]
            rows.append(ids + [0] * (8 - len(ids)))
        return torch.tensor(rows)

    def encode_text(self, tokens, normalize=False):
        inv = {i: w for w, i in self.vocab.items()}
        out = torch.zeros(tokens.shape[0], 5)
        for r, row in enumerate(tokens.tolist()):
            for i in row:
                if i:
                    w = inv[i]
                    out[r] += F.one_hot(torch.tensor(COLOURS[w]), 5).float() if w in COLOURS else self.words[i]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize=False):
        x = torch.cat([images.mean((2, 3)), torch.zeros(images.shape[0], 2)], 1)
        return F.normalize(x, dim=-1) if normalize else x


def solid(*rgb):
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 4, 4)


def test_classifier_is_clips_template_ensemble():
    model = ColourTwoTower()
    names, templates = ["red", "green", "blue"], ["a photo of a {}.", "a {} thing", "{}"]
    got = zeroshot_classifier(model, names, templates, batch_size=2)
    for c, name in enumerate(names):
        # CLIP's notebook: embed, normalise each template, average, normalise again.
        per = torch.stack([F.normalize(model.encode_text(model.tokenize([t.format(name)]))[0], dim=0)
                           for t in templates])
        torch.testing.assert_close(got[c], F.normalize(per.mean(0), dim=0))
    # The ensemble is not the embedding of the averaged caption (that would be one normalisation).
    plain = F.normalize(sum(model.encode_text(model.tokenize([t.format("red")]))[0] for t in templates), dim=0)
    assert not torch.allclose(got[0], plain)


@pytest.mark.parametrize("bias", [None, -2.0])
def test_predict_scores_images_with_the_models_scale_and_bias(bias):
    model = ColourTwoTower(bias)
    clf = zeroshot_classifier(model, ["red", "green", "blue"])
    images = torch.stack([solid(1, 0, 0), solid(0.2, 0.9, 0.1), solid(0.1, 0.3, 0.8)])
    logits = zeroshot_predict(model, images, clf)
    assert logits.argmax(1).tolist() == [0, 1, 2]
    want = 50.0 * F.normalize(model.encode_image(images), dim=-1) @ clf.T + (bias or 0.0)
    torch.testing.assert_close(logits, want)


def test_zeroshot_evaluator_top1_and_top5():
    model = ColourTwoTower()
    ev = ZeroShotEvaluator(model, ["red", "green", "blue"], TEMPLATES)
    images = torch.stack([solid(1, 0, 0), solid(0, 1, 0), solid(0.1, 0.2, 0.9), solid(0, 0, 1), solid(1, 0, 0)])
    # the fourth is labelled red (a miss), the last has no label
    ev.update({"image": images, "label": torch.tensor([0, 1, 2, 0, -1])}, {})
    got = ev.compute()
    assert got == pytest.approx({"acc1": 3 / 4, "acc5": 1.0})
    assert ev.primary == "acc1"
    with pytest.raises(ConfigError, match="no '{}'"):
        ZeroShotEvaluator(model, ["red"], ["a photo"])


def test_clip_objective_evaluates_retrieval_and_zeroshot_when_it_knows_the_classes():
    model = ColourTwoTower()
    obj = build_objective("clip", model, classes=["red", "green", "blue"])
    colours = [solid(1, 0, 0), solid(0, 1, 0), solid(0, 0, 1), solid(0.9, 0.1, 0.0)]
    batches = [
        {"image": torch.stack(colours[:2]), "label": torch.tensor([0, 1]),
         "captions": [["a red square", "something red"], ["a green square"]]},
        {"image": torch.stack(colours[2:]), "label": torch.tensor([2, 0]),
         "captions": [["a blue square"], ["a red circle", "red"]]},
    ]
    val = run_evaluation(obj, model, obj.evaluator(), batches, lambda b: b, nullcontext)
    assert val["zeroshot_acc1"] == 1.0
    # Independent: the same texts embedded one by one.
    texts = [c for b in batches for caps in b["captions"] for c in caps]
    txt = torch.cat([model.encode_text(model.tokenize([t])) for t in texts])
    img = model.encode_image(torch.stack(colours))
    want = retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 2, 3, 3]))
    assert {k: val[k] for k in want} == pytest.approx(want)
    assert obj.evaluator().primary == "r_mean"
    # Without class names: retrieval only.
    assert "zeroshot_acc1" not in run_evaluation(build_objective("clip", model), model,
                                                 build_objective("clip", model).evaluator(), batches,
                                                 lambda b: b, nullcontext)


def test_zeroshot_classifier_of_a_real_model():
    from vitkit.clip import create_clip

    torch.manual_seed(0)
    model = create_clip("clip_test").eval()
    names, templates = ["cat", "small dog", "red car"], TEMPLATES[:3]
    clf = zeroshot_classifier(model, names, templates)
    assert clf.shape == (3, model.embed_dim)
    for c, name in enumerate(names):
        per = torch.stack([F.normalize(model.encode_text(model.tokenize([t.format(name)]))[0], dim=0)
                           for t in templates])
        torch.testing.assert_close(clf[c], F.normalize(per.mean(0), dim=0), atol=1e-5, rtol=1e-5)
    images = torch.randn(2, *model.card.input_size)
    logits = zeroshot_predict(model, images, clf)
    want = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ clf.T
    torch.testing.assert_close(logits, want.detach(), atol=1e-5, rtol=1e-5)
