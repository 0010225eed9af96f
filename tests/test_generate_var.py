"""VAR: the block-causal mask, causality between scales, the reference's adaLN initialisation, the
sampler (shape, range, determinism, guidance against the reference's formula, top-k / top-p) and the
``var`` objective (its loss by hand, per-sample evaluation with another model, a few training steps)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb
from torch import nn

from vitkit.errors import ConfigError
from vitkit.generate import create_generator
from vitkit.generate.tokenizer import VQTokenizer
from vitkit.generate.var import VAR, block_causal_mask, filter_logits, guidance_scale, var_sample
from vitkit.objectives import build_objective
from vitkit.objectives.var import VARConfig, VARObjective


class StandInTokenizer(nn.Module):
    """A fixed multi-scale residual quantiser (random codebook, no training) with the tokenizer's VAR
    interface, so the model and sampler are tested apart from the real tokenizer."""

    kind = "tokenizer"

    def __init__(self, scales=(1, 2, 3), embed_dim=4, codebook_size=16, img_size=12, in_chans=1):
        super().__init__()
        self.scales, self.embed_dim, self.codebook_size = tuple(scales), embed_dim, codebook_size
        self.grid, self.img_size, self.in_chans = scales[-1], img_size, in_chans
        g = torch.Generator().manual_seed(0)
        self.register_buffer("codebook", torch.randn(codebook_size, embed_dim, generator=g))
        self.register_buffer("proj", torch.randn(embed_dim, in_chans, generator=g))

    def _up(self, idx):  # (B, s, s) codes -> (B, C, grid, grid)
        h = self.codebook[idx].permute(0, 3, 1, 2)
        return F.interpolate(h, size=(self.grid, self.grid), mode="bicubic")

    def _down(self, f, s):  # (B, C, grid, grid) -> (B, s*s, C)
        return F.interpolate(f, size=(s, s), mode="area").flatten(2).transpose(1, 2)

    def encode_scales(self, x):
        f = torch.einsum("ci,bihw->bchw", self.proj, F.interpolate(x, size=(self.grid, self.grid), mode="area"))
        f_hat, out = torch.zeros_like(f), []
        for s in self.scales:
            r = self._down(f - f_hat, s)
            idx = torch.cdist(r, self.codebook[None].expand(len(r), -1, -1)).argmin(-1).view(-1, s, s)
            out.append(idx)
            f_hat = f_hat + self._up(idx)
        return out

    def scales_to_var_input(self, indices):
        f_hat, nxt = 0, []
        for k in range(len(self.scales) - 1):
            f_hat = f_hat + self._up(indices[k])
            nxt.append(self._down(f_hat, self.scales[k + 1]))
        return torch.cat(nxt, dim=1)

    def var_next_input(self, k, f_hat, idx):
        f_hat = f_hat + self._up(idx)
        return f_hat, (self._down(f_hat, self.scales[k + 1]) if k + 1 < len(self.scales) else None)

    def decode_latent(self, f_hat):
        x = torch.einsum("ci,bchw->bihw", self.proj, f_hat)
        return torch.tanh(F.interpolate(x, size=(self.img_size, self.img_size), mode="nearest"))


def _real_tokenizer():
    tok = create_generator("msvq_test").eval()
    assert isinstance(tok, VQTokenizer) and tok.scales
    return tok


TOKENIZERS = {"stand-in": StandInTokenizer, "msvq_test": _real_tokenizer}


def _var_for(tok, num_classes=3, **kw) -> VAR:
    return create_generator("var_test", codebook_size=tok.codebook_size, embed_dim=tok.embed_dim,
                            scales=tuple(tok.scales), num_classes=num_classes, **kw)


def _small_var(scales=(1, 2, 3), **kw) -> VAR:
    args = dict(codebook_size=16, embed_dim=4, scales=scales, num_classes=3, dim=32, depth=2, num_heads=2)
    return VAR(**{**args, **kw})


# ---- the block-causal mask and causality -------------------------------------------------------------


def test_block_causal_mask_matches_a_hand_built_one():
    # Scales 1, 2, 3: tokens 0 | 1..4 | 5..13. A token sees its own scale and every coarser one.
    hand = torch.zeros(14, 14, dtype=torch.bool)
    hand[0, 0] = True
    hand[1:5, 0:5] = True
    hand[5:14, 0:14] = True
    mask = block_causal_mask((1, 2, 3))
    assert mask.dtype == torch.bool and torch.equal(mask, hand)
    model = _small_var()
    assert torch.equal(model.attn_bias == 0, hand) and torch.isinf(model.attn_bias[~hand]).all()


def test_finer_scales_never_change_coarser_logits():
    model = perturb(_small_var(), scale=0.3)
    labels = torch.tensor([0, 2])
    x = torch.randn(2, 13, 4)  # inputs of scale 2 (tokens 0..3) and scale 3 (4..12)
    base = model(labels, x)  # (2, 14, 16): logits of scale 1 (0), 2 (1..4), 3 (5..13)
    assert base.shape == (2, 14, 16)

    finer = x.clone()
    finer[:, 4:] += torch.randn(2, 9, 4)  # change the scale-3 inputs only
    out = model(labels, finer)
    assert torch.allclose(out[:, :5], base[:, :5], atol=1e-6)  # scales 1 and 2 untouched
    assert (out[:, 5:] - base[:, 5:]).abs().amax() > 1e-3

    coarser = x.clone()
    coarser[:, :4] += torch.randn(2, 4, 4)  # change the scale-2 inputs: scale 3 attends to them
    out = model(labels, coarser)
    assert torch.allclose(out[:, :1], base[:, :1], atol=1e-6)
    assert (out[:, 1:5] - base[:, 1:5]).abs().amax() > 1e-3
    assert (out[:, 5:] - base[:, 5:]).abs().amax() > 1e-3

    # A prefix of whole scales gives the same logits as the full sequence (what sampling relies on).
    assert torch.allclose(model(labels, x[:, :4]), base[:, :5], atol=1e-6)
    assert model(labels, x[:, :0]).shape == (2, 1, 16)
    with pytest.raises(ValueError, match="whole scales"):
        model(labels, x[:, :3])
    with pytest.raises(ValueError, match="embed_dim=4"):
        model(labels, torch.randn(2, 13, 5))


# ---- initialisation ----------------------------------------------------------------------------------


def _close(value: float, expected: float, rel: float = 0.1) -> bool:
    return abs(value - expected) <= rel * expected


def test_a_fresh_model_is_initialised_as_the_reference():
    dim, depth = 64, 3
    model = _small_var(dim=dim, depth=depth)
    std = math.sqrt(1 / (3 * dim))  # VAR's automated init_std
    for blk in model.blocks:
        w, b = blk.ada.ada_lin[-1].weight, blk.ada.ada_lin[-1].bias  # (6C, D) rows gamma1, gamma2, scales, shifts
        assert torch.count_nonzero(b) == 0
        assert _close(w[: 2 * dim].std().item(), 1e-5 * std)  # the gates: init_adaln_gamma = 1e-5
        assert _close(w[2 * dim:].std().item(), 0.5 * std)  # scales and shifts: init_adaln = 0.5
        assert _close(blk.attn.proj.weight.std().item(), std / math.sqrt(2 * depth))
        assert _close(blk.mlp.fc2.weight.std().item(), std / math.sqrt(2 * depth))
        assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.v_bias) == 0
        assert torch.allclose(blk.attn.scale_mul.exp(), torch.tensor(4.0))
    assert torch.count_nonzero(model.head_nm.ada_lin[-1].bias) == 0
    assert _close(model.head_nm.ada_lin[-1].weight.std().item(), 0.5 * std)
    assert _close(model.head.weight.std().item(), 0.02 * std) and torch.count_nonzero(model.head.bias) == 0
    assert _close(model.class_emb.weight.std().item(), std, rel=0.2)
    assert model.class_emb.num_embeddings == 4  # 3 classes + the null class

    # The gates start at ~1e-5 * std: a fresh block is the identity to within ~1e-5.
    x, cond = torch.randn(2, 14, dim), torch.randn(2, dim)
    for blk in model.blocks:
        assert (blk(x, cond, model.attn_bias) - x).abs().max() < 1e-4

    shared = _small_var(dim=dim, depth=depth, shared_aln=True)
    for blk in shared.blocks:
        gss = blk.ada.ada_gss  # (1, 1, 6, C): randn / sqrt(C), gates times 1e-5, the rest times 0.5
        assert _close(gss[0, 0, :2].std().item(), 1e-5 / math.sqrt(dim), rel=0.2)
        assert _close(gss[0, 0, 2:].std().item(), 0.5 / math.sqrt(dim), rel=0.2)
    assert torch.count_nonzero(shared.shared_ada_lin.ada_lin[-1].bias) == 0


def test_registered_variants_rebuild_from_their_saved_arguments():
    for name in ("var_test", "var_nano"):
        model = create_generator(name)
        assert model.kind == "var" and model.model_name == name
        again = create_generator(model.model_name, **json.loads(json.dumps(model.model_args)))
        assert again.scales == model.scales
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert {"pos_start", "pos_embed", "lvl_embed.weight"} <= create_generator("var_test").no_weight_decay()
    with pytest.raises(ConfigError, match="increasing"):
        _small_var(scales=(1, 3, 2))


# ---- sampling ----------------------------------------------------------------------------------------


def test_guidance_schedule_is_vars_linear_ramp():
    # VAR mixes (1 + t) c - t u with t = cfg * k / (K - 1); in u + g (c - u) that is g = 1 + t, cfg = g_max - 1.
    assert [round(guidance_scale(2.5, k, 6), 6) for k in range(6)] == [1.0, 1.3, 1.6, 1.9, 2.2, 2.5]
    assert [guidance_scale(3.0, k, 4, "constant") for k in range(4)] == [3.0] * 4
    with pytest.raises(ConfigError, match="schedule"):
        guidance_scale(2.0, 0, 4, "cosine")


def test_top_k_and_top_p_keep_the_expected_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()

    def kept(**kw):
        return set(torch.isfinite(filter_logits(logits, **kw)).nonzero().flatten().tolist())

    assert kept(top_k=2) == {1, 3}
    assert kept(top_p=0.4) == {1}  # 0.5 alone reaches 0.4
    assert kept(top_p=0.6) == {1, 3}  # 0.5 + 0.3
    assert kept(top_p=0.9) == {1, 3, 2}  # 0.5 + 0.3 + 0.15
    assert kept(top_k=3, top_p=0.6) == {1, 3}
    assert kept() == {0, 1, 2, 3} and kept(top_k=10) == {0, 1, 2, 3}


@pytest.mark.parametrize("which", list(TOKENIZERS))
def test_samples_have_the_tokenizer_size_lie_in_range_and_follow_the_generator(which):
    tok = TOKENIZERS[which]()
    model = perturb(_var_for(tok), scale=0.05)
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null class

    def draw(seed, **kw):
        return var_sample(model, tok, labels, generator=torch.Generator().manual_seed(seed), **kw)

    a = draw(0)
    assert a.shape == (4, tok.in_chans, tok.img_size, tok.img_size)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))
    assert torch.equal(draw(0, top_k=1), draw(1, top_k=1))  # greedy: the generator no longer matters
    with pytest.raises(ConfigError, match="scales"):
        var_sample(_small_var(scales=(1, 2)), tok, labels)


@pytest.mark.parametrize("which", list(TOKENIZERS))
def test_guided_greedy_samples_follow_the_reference_formula(which):
    tok = TOKENIZERS[which]()
    model = perturb(_var_for(tok), scale=0.2)
    seen = []

    class Recording:  # the tokenizer, keeping the indices the sampler hands it
        def __getattr__(self, name):
            return getattr(tok, name)

        def var_next_input(self, k, f_hat, idx):
            seen.append(idx.clone())
            return tok.var_next_input(k, f_hat, idx)

    labels, g = torch.tensor([0, 2, 1]), 3.0
    var_sample(model, Recording(), labels, top_k=1, guidance=g)
    K = len(tok.scales)
    assert [t.shape[1:] for t in seen] == [(s, s) for s in tok.scales]

    # By hand: both passes on the sampled prefix, mixed as VAR does: (1 + t) c - t u, t = (g - 1) k / (K - 1).
    x = tok.scales_to_var_input(seen)
    with torch.no_grad():
        c = model(labels, x)
        u = model(torch.full_like(labels, 3), x)
    start = 0
    for k, s in enumerate(tok.scales):
        t = (g - 1) * k / (K - 1)
        hand = ((1 + t) * c - t * u)[:, start:start + s * s].argmax(-1)
        assert torch.equal(seen[k].flatten(1), hand), f"scale {k}"
        start += s * s


# ---- the objective -----------------------------------------------------------------------------------


def _objective(tok, **cfg):
    return VARObjective(_var_for(tok), VARConfig(**cfg), num_classes=3, tokenizer=tok)


def _batch(tok, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, tok.in_chans, tok.img_size, tok.img_size, generator=g) * 2 - 1
    return {"image": images, "label": torch.arange(n) % 3}


@pytest.mark.parametrize("which", list(TOKENIZERS))
def test_the_loss_is_the_mean_cross_entropy_over_every_token_of_every_scale(which):
    tok = TOKENIZERS[which]()
    obj = _objective(tok, class_dropout=0.0)
    perturb(obj.model, scale=0.05)
    batch = _batch(tok)
    out = obj(batch)

    indices = tok.encode_scales(batch["image"])
    target = torch.cat([i.reshape(len(i), -1) for i in indices], dim=1)  # (B, L), scales coarse to fine
    assert target.shape[1] == sum(s * s for s in tok.scales)
    logits = obj.model(batch["label"], tok.scales_to_var_input(indices))
    nll = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]  # (B, L)
    assert torch.allclose(out["loss"], nll.mean(), atol=1e-5)
    hit = (logits.argmax(-1) == target).float()
    last = tok.scales[-1] ** 2
    assert torch.allclose(out["acc"], hit.mean()) and torch.allclose(out["acc_last_scale"], hit[:, -last:].mean())

    # eval_outputs: per-sample losses of the model it is given (the EMA copy), true labels.
    other = perturb(copy.deepcopy(obj.model), scale=0.05, seed=1)
    ev = obj.eval_outputs(batch, other)["loss"]
    other_nll = -other(batch["label"], tok.scales_to_var_input(indices)).log_softmax(-1).gather(-1, target[..., None])
    assert ev.shape == (4,) and torch.allclose(ev, other_nll[..., 0].mean(1), atol=1e-5)
    assert torch.allclose(obj.eval_outputs(batch)["loss"], nll.mean(1), atol=1e-5)


def test_the_objective_trains_and_samples():
    tok = _real_tokenizer()
    obj = build_objective("var", _var_for(tok), {"class_dropout": 0.1}, num_classes=3, tokenizer=tok)
    assert isinstance(obj, VARObjective) and obj.frozen_modules() == {"tokenizer": tok}
    obj.freeze()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tok, n=8)
    losses = []
    for _ in range(12):
        loss = obj(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(tok.codebook_size), rel=0.05)  # a fresh head is ~uniform
    assert losses[-1] < losses[0] - 0.5, losses

    K = len(tok.scales)
    images = obj.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, tok.in_chans, tok.img_size, tok.img_size)
    assert obj.sample(torch.tensor([2]), steps=K).shape[0] == 1
    with pytest.raises(ConfigError, match=f"{K} steps"):
        obj.sample(torch.tensor([2]), steps=K + 2)
    assert obj.evaluator().steps is None  # the evaluation samples with sample(steps=None): one step per scale


def test_the_objective_refuses_a_single_scale_tokenizer():
    tok = StandInTokenizer()
    tok.scales = None
    with pytest.raises(ConfigError, match="multi-scale"):
        VARObjective(_small_var(), VARConfig(), num_classes=3, tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        VARObjective(_small_var(), VARConfig(), num_classes=3, tokenizer=None)
