"""Self-supervised losses against hand-computed cases, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.objectives.dino import dino_loss, sharpen, update_center
from vitkit.objectives.ibot import (
    block_token_mask,
    koleo_loss,
    masked_patch_loss,
    random_token_mask,
    sinkhorn_knopp,
)
from vitkit.objectives.mae import mae_loss, patchify, random_keep, unpatchify
from vitkit.objectives.mocov3 import info_nce
from vitkit.objectives.simclr import nt_xent
from vitkit.objectives.ssl import cosine_ramp
from vitkit.objectives.ssl_heads import DINOHead


def test_mae_loss_hand_case_and_norm_pix():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # (B=1, L=2, P=2)
    target = torch.tensor([[[1.0, 3.0], [1.0, 3.0]]])
    mask = torch.tensor([[True, False]])
    # Patch 0 only: ((0 - 1)^2 + (0 - 3)^2) / 2 = 5.
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)
    # norm_pix: [1, 3] has mean 2 and unbiased variance 2 -> [-1/sqrt(2), 1/sqrt(2)]; vs 0: mean square 0.5.
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(0.5, abs=1e-6)


def test_mae_loss_ignores_visible_patches():
    torch.manual_seed(0)
    target = torch.randn(3, 16, 12)
    _, mask = random_keep(3, 16, 0.75)
    pred = torch.randn(3, 16, 12, requires_grad=True)
    loss = mae_loss(pred, target, mask)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask].abs().sum(-1) > 0)
    changed = pred.detach().clone()
    changed[~mask] += 100.0  # anything at visible places
    assert mae_loss(changed, target, mask).item() == pytest.approx(loss.item())


def test_random_keep_and_patchify_roundtrip():
    keep, mask = random_keep(4, 16, 0.75)
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12] * 4
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # sorted, distinct
    assert not mask.gather(1, keep).any()
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, (4, 4))
    assert p.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(p[0, 5], x[0, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))  # row 1, col 1
    torch.testing.assert_close(unpatchify(p, (4, 4), 3), x)


def test_dino_loss_hand_case():
    # Student temperature 1; teacher targets given. Views: 2 global + 1 local, K = 2, B = 1.
    q0, q1 = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    s0, s1, s2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    # Pairs (q0, s1), (q0, s2), (q1, s0), (q1, s2); s1 is softmax [3/4, 1/4].
    expected = (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + 3 * math.log(2.0)) / 4
    assert dino_loss([s0, s1, s2], [q0, q1], student_temp=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_of_identical_outputs_is_the_entropy_of_the_sharpened_target():
    torch.manual_seed(0)
    t = torch.randn(6, 32)
    temp = 0.1
    target = sharpen(t, torch.zeros(1, 32), temp)
    entropy = -(target * target.log()).sum(-1).mean()
    loss = dino_loss([t, t], [target, target], student_temp=temp)
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_centering_moves_by_the_momentum():
    center = torch.zeros(1, 3)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # batch mean [2, 2, 2]
    update_center(center, logits, momentum=0.9)
    torch.testing.assert_close(center, torch.full((1, 3), 0.2))
    update_center(center, logits, momentum=0.9)
    torch.testing.assert_close(center, torch.full((1, 3), 0.9 * 0.2 + 0.1 * 2))


def test_nt_xent_hand_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = a.clone()
    # Anchor a1: candidates a2 (sim 0), b1 (positive, sim 1), b2 (sim 0): -log(e / (e + 2)); every row alike.
    assert nt_xent(a, b, temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    # Scale does not matter (cosine similarity); temperature 0.5 doubles the logits.
    assert nt_xent(3 * a, b, temperature=0.5).item() == pytest.approx(math.log(1 + 2 / math.e**2), rel=1e-6)


def test_info_nce_hand_case_and_no_gradient_through_keys():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = info_nce(q, k, temperature=1.0)
    assert loss.item() == pytest.approx(2 * math.log(1 + 1 / math.e), rel=1e-6)
    loss.backward()
    assert k.grad is None and q.grad is not None


def test_koleo_hand_case():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Every point's nearest neighbour is sqrt(2) away.
    assert koleo_loss(x).item() == pytest.approx(-0.5 * math.log(2.0), abs=1e-6)
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    crowded = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(crowded) > koleo_loss(spread)


def test_sinkhorn_knopp_hand_case_balances_prototypes():
    # Both samples prefer prototype 0 (softmax: 0.73); Sinkhorn-Knopp shares the two prototypes equally.
    q = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), temp=1.0)
    torch.testing.assert_close(q, torch.full((2, 2), 0.5))
    torch.manual_seed(0)
    q = sinkhorn_knopp(torch.randn(64, 8), temp=1.0, n_iters=10)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 8.0), rtol=0.02, atol=0)


def test_masked_patch_loss_hand_case():
    # Two images: image 0 has 2 masked tokens, image 1 has 1; each image counts once.
    student = torch.zeros(3, 2)  # uniform predictions: CE = log 2 against any target
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    weights = torch.tensor([0.5, 0.5, 1.0])
    assert masked_patch_loss(student, teacher, weights, 2, 1.0).item() == pytest.approx(math.log(2.0))
    mask = random_token_mask(100, 16, prob=0.5, ratio=(0.25, 0.25))
    counts = mask.sum(1)
    assert set(counts.tolist()) <= {0, 4} and 20 < int((counts > 0).sum()) < 80


def test_block_mask_covers_the_share_in_rectangles():
    torch.manual_seed(0)
    mask = block_token_mask(200, (8, 8), prob=0.5, ratio=(0.25, 0.25))
    assert mask.shape == (200, 64) and mask.dtype == torch.bool
    counts = mask.sum(1)
    masked = counts > 0
    assert 60 < int(masked.sum()) < 140  # prob 0.5
    assert int(counts.max()) <= 16 and float(counts[masked].float().mean()) >= 14  # 25% of 64, rarely short
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour, far more than at random.
    def neighbour_share(m):
        g = m.view(-1, 8, 8).float()
        pad = torch.nn.functional.pad(g, (1, 1, 1, 1))
        nb = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
        return float(((nb > 0) & (g > 0)).sum() / g.sum())
    assert neighbour_share(mask) > 0.95
    assert neighbour_share(random_token_mask(200, 64, prob=0.5, ratio=(0.25, 0.25))) < 0.8
    # Drawn from torch's generator: the same seed gives the same masks (a resumed run).
    torch.manual_seed(3)
    a = block_token_mask(4, (6, 5), prob=1.0, ratio=(0.1, 0.5))
    torch.manual_seed(3)
    assert torch.equal(a, block_token_mask(4, (6, 5), prob=1.0, ratio=(0.1, 0.5)))
    assert not block_token_mask(8, (4, 4), prob=0.0, ratio=(0.5, 0.5)).any()


def test_dino_head_last_layer_is_weight_normed_and_freezable():
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    x = torch.randn(5, 8)
    out = head(x)
    assert out.shape == (5, 16) and out.abs().max() <= 1.0 + 1e-5  # unit rows . unit input: cosines
    assert not head.last_layer.weight_g.requires_grad
    head(x, freeze_last_layer=True).sum().backward()
    assert head.last_layer.weight_v.grad is None  # no gradient at all while frozen, as DINO's reference
    assert head.mlp[0].weight.grad.abs().sum() > 0


def test_cosine_ramp():
    assert cosine_ramp(0.996, 1.0, 0.0) == pytest.approx(0.996)
    assert cosine_ramp(0.996, 1.0, 0.5) == pytest.approx(0.998)
    assert cosine_ramp(0.996, 1.0, 1.0) == pytest.approx(1.0)


def test_nt_xent_gradient_matches_autograd_of_explicit_formula():
    torch.manual_seed(1)
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    loss = nt_xent(a, b, 0.3)
    z = F.normalize(torch.cat([a, b]), dim=-1)
    sim = z @ z.T / 0.3
    terms = []
    for i in range(8):
        pos = (i + 4) % 8
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        terms.append(-(sim[i, pos] - torch.logsumexp(others, 0)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
