"""DiT and its rectified flow: adaLN-Zero, the flow's loss, the Euler/Heun sampler, guidance, the objective.

Every expected value is computed here from the paper's formula (a closed-form ODE solution, a hand
loss, the reference's sinusoid), never by calling the code under test a second time.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import vitkit.generate.dit  # noqa: F401  (registers dit_test, dit_nano)
import vitkit.generate.tokenizer  # noqa: F401  (registers vq_test)
import vitkit.objectives.dit  # noqa: F401  (registers objective "dit")
from vitkit.errors import ConfigError, DataError
from vitkit.generate import create_generator, generator_kind, list_generators
from vitkit.generate.dit import DiTBlock, flow_sample, rectified_flow_loss, sample_t, timestep_embedding
from vitkit.objectives import build_objective


def _fresh(name: str = "dit_test", **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_generator(name, **kw)


# ---------------------------------------------------------------- adaLN-Zero


def test_fresh_block_is_exactly_the_identity():
    torch.manual_seed(0)
    blk = DiTBlock(16, 2)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    assert torch.equal(blk(x, c), x)
    # The zero start is what makes it the identity: any modulation changes the output.
    nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(blk(x, c), x)


def test_fresh_dit_outputs_zeros_and_trains_from_there():
    model = _fresh()
    x = torch.randn(4, 1, 28, 28)
    v = model(x, torch.rand(4), torch.tensor([0, 3, 9, 10]))
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(x))
    for blk in model.blocks:
        assert not blk.adaLN_modulation[-1].weight.any() and not blk.adaLN_modulation[-1].bias.any()
    # From zeros, the first gradient reaches the output layer (the rest follows once it moves).
    v.sub(x).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_position_embedding_is_the_reference_2d_sincos():
    model = _fresh()
    g, d = model.grid, model.dim
    # The reference's get_2d_sincos_pos_embed: meshgrid(w, h) so the first half encodes the column,
    # each half [sin, cos] of pos * 10000 ** (-k / (d / 4)).
    quarter = d // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    rows = []
    for i in range(g):
        for j in range(g):
            row = []
            for pos in (j, i):
                row += [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]
            rows.append(row)
    expected = torch.tensor(rows, dtype=torch.float32)
    assert torch.allclose(model.pos_embed[0], expected, atol=1e-6)
    assert "pos_embed" not in model.state_dict()  # fixed: rebuilt, never trained or saved


def test_timestep_embedding_matches_the_reference_formula():
    t = torch.tensor([0.0, 0.25, 3.0, 999.0])
    dim = 7  # odd: the reference pads one zero column
    half = dim // 2
    expected = []
    for tv in t.tolist():
        freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
        expected.append([math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs] + [0.0])
    assert torch.allclose(timestep_embedding(t, dim), torch.tensor(expected), atol=1e-4)

    # The model's embedder sees t * 1000 (t in [0, 1] on the reference's DDPM step range), then its MLP.
    model = _fresh()
    emb = model.t_embedder
    tt = torch.tensor([0.0, 0.3, 1.0])
    half = emb.freq_dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000) * i / half) for i in range(half)], dtype=torch.float64)
    args = (tt.double() * 1000)[:, None] * freqs[None]
    feats = torch.cat([args.cos(), args.sin()], 1).float()
    lin1, lin2 = emb.mlp[0], emb.mlp[2]
    hidden = feats @ lin1.weight.T + lin1.bias
    want = (hidden * torch.sigmoid(hidden)) @ lin2.weight.T + lin2.bias
    assert torch.allclose(emb(tt), want, atol=1e-4)


def test_registry_bad_sizes_and_bad_inputs():
    assert {"dit_test", "dit_nano"} <= set(list_generators("dit"))
    assert generator_kind("dit_nano") == "dit"
    m = _fresh()
    assert m.kind == "dit" and m.model_name == "dit_test"
    again = create_generator(m.model_name, **m.model_args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        create_generator("dit_test", patch_size=5)
    with pytest.raises(ConfigError, match="divisible"):
        create_generator("dit_test", dim=30)
    with pytest.raises(DataError, match=r"\(B, 1, 28, 28\)"):
        m(torch.zeros(2, 3, 28, 28), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="class ids"):
        flow_sample(m, torch.tensor([11]), steps=1)
    with pytest.raises(ConfigError, match="method"):
        flow_sample(m, torch.tensor([1]), steps=1, method="rk4")


# ---------------------------------------------------------------- the flow's loss


class Recorder(nn.Module):
    """Returns a fixed output and keeps what it was called with."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t, labels):
        self.calls.append((x.clone(), t.clone(), labels.clone()))
        return self.out


def test_rectified_flow_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(3, 1, 2, 2, generator=g)
    out = torch.randn(3, 1, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    labels = torch.tensor([2, 0, 10])
    rec = Recorder(out)
    loss, per = rectified_flow_loss(rec, x0, labels, t=t, noise=noise)
    (x_t, t_seen, lab_seen), = rec.calls
    for b in range(3):
        tb = t[b].item()
        want_xt = [(1 - tb) * a + tb * n for a, n in zip(x0[b].flatten().tolist(), noise[b].flatten().tolist())]
        assert torch.allclose(x_t[b].flatten(), torch.tensor(want_xt), atol=1e-6)
        target = [n - a for a, n in zip(x0[b].flatten().tolist(), noise[b].flatten().tolist())]
        want = sum((o - v) ** 2 for o, v in zip(out[b].flatten().tolist(), target)) / 4
        assert per[b].item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(t_seen, t) and torch.equal(lab_seen, labels)
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_training_times_and_seeded_draws():
    g = torch.Generator().manual_seed(0)
    u = sample_t(20000, "uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_t(20000, "logit_normal", generator=g)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03  # SD3: t = sigmoid(N(0, 1))
    with pytest.raises(ConfigError, match="t_sampling"):
        sample_t(4, "cosine")
    model = _fresh()
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    labels = torch.tensor([1, 2])
    a = rectified_flow_loss(model, x0, labels, generator=torch.Generator().manual_seed(5))[1]
    b = rectified_flow_loss(model, x0, labels, generator=torch.Generator().manual_seed(5))[1]
    c = rectified_flow_loss(model, x0, labels, generator=torch.Generator().manual_seed(6))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- the sampler


class LinearField(nn.Module):
    """The velocity v(x, t) = a * t**p * x, analytic; counts calls and the batch sizes it saw."""

    num_classes, in_chans, img_size = 10, 1, 4

    def __init__(self, a: float, p: int = 0):
        super().__init__()
        self.a, self.p, self.batches = a, p, []

    def forward(self, x, t, labels):
        self.batches.append(x.shape[0])
        return self.a * t.view(-1, 1, 1, 1) ** self.p * x


def _start(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()


def test_euler_and_heun_on_a_linear_ode():
    a, n = 1.5, 8
    x1 = _start()
    labels = torch.tensor([0, 1, 2])
    exact = x1 * math.exp(-a)  # dx/dt = a x from t = 1 to t = 0
    h = 1 / n
    euler_field, heun_field = LinearField(a), LinearField(a)
    euler = flow_sample(euler_field, labels, steps=n, method="euler", noise=x1, clamp=False)
    heun = flow_sample(heun_field, labels, steps=n, method="heun", noise=x1, clamp=False)
    # Each method's own closed form for this ODE: Euler multiplies by (1 - a h) per step, Heun by
    # 1 - a h + (a h)^2 / 2 (the second-order Taylor factor).
    assert torch.allclose(euler, x1 * (1 - a * h) ** n, rtol=1e-5)
    assert torch.allclose(heun, x1 * (1 - a * h + (a * h) ** 2 / 2) ** n, rtol=1e-5)
    err_euler = (euler - exact).abs().max().item()
    err_heun = (heun - exact).abs().max().item()
    assert err_heun < err_euler / 5
    assert len(euler_field.batches) == n and len(heun_field.batches) == 2 * n


def test_sampler_passes_time_and_converges_at_its_order():
    a = 1.0
    x1 = _start()
    labels = torch.tensor([0, 1, 2])
    exact = x1 * math.exp(-a / 2)  # dx/dt = a t x from t = 1 to t = 0

    def run(method, n):
        return flow_sample(LinearField(a, p=1), labels, steps=n, method=method, noise=x1, clamp=False)

    # Euler evaluates v at the start of each step: x_{k+1} = x_k (1 - a t_k / n), t_k = 1 - k / n.
    n = 6
    want = x1.clone()
    for k in range(n):
        want = want * (1 - a * (1 - k / n) / n)
    assert torch.allclose(run("euler", n), want, rtol=1e-6)
    e = {(m, k): (run(m, k) - exact).abs().max().item() for m in ("euler", "heun") for k in (32, 64)}
    assert 1.8 < e["euler", 32] / e["euler", 64] < 2.2  # first order: halving the step halves the error
    assert 3.5 < e["heun", 32] / e["heun", 64] < 4.5  # second order: it quarters it


def test_guidance_matches_the_hand_formula_in_one_batched_call():
    class LabelField(nn.Module):
        num_classes, in_chans, img_size = 10, 1, 2

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x, t, labels):
            self.calls.append((x.shape[0], labels.clone()))
            return (labels.double() + 1).view(-1, 1, 1, 1) + 0 * x

    labels = torch.tensor([0, 3])
    x1 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)).double()
    for g in (2.5, 1.0, 0.0):
        field = LabelField()
        x0 = flow_sample(field, labels, steps=1, guidance=g, noise=x1, clamp=False)
        c = labels.double() + 1  # the conditional velocity
        u = torch.full((2,), 11.0, dtype=torch.float64)  # the null class's (id 10)
        v = u + g * (c - u)
        assert torch.allclose(x0, x1 - v.view(-1, 1, 1, 1))  # one Euler step of length 1 from t = 1
        assert len(field.calls) == 1
        size, seen = field.calls[0]
        if g == 2.5:
            assert size == 4 and seen.tolist() == [0, 3, 10, 10]  # conditional and unconditional together
        else:
            assert size == 2 and seen.tolist() == ([0, 3] if g == 1.0 else [10, 10])


def test_sampling_a_fresh_dit_gives_clamped_reproducible_images():
    model = _fresh()
    model.eval()
    labels = torch.tensor([0, 5])
    a = flow_sample(model, labels, steps=2, guidance=2.0, generator=torch.Generator().manual_seed(3))
    b = flow_sample(model, labels, steps=2, guidance=2.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 1, 28, 28) and torch.equal(a, b)
    # A fresh DiT's velocity is zero: the sample is the starting noise, clamped.
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, noise.clamp(-1, 1))


# ---------------------------------------------------------------- the objective


def _objective(**cfg):

    return build_objective("dit", _fresh(), {"class_dropout": 0.1, **cfg}, num_classes=10)


def test_objective_trains_and_its_eval_loss_falls():
    torch.manual_seed(0)
    obj = _objective()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 28, 28, generator=g) * 2 - 1, "label": torch.randint(0, 10, (8,), generator=g)}
    before = obj.eval_outputs(batch)["loss"]
    assert before.shape == (8,) and torch.equal(before, obj.eval_outputs(batch)["loss"])  # fixed draws
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=5e-3)
    obj.train()
    for _ in range(40):
        out = obj(batch)
        assert set(out) == {"loss"} and out["loss"].ndim == 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    obj.eval()
    after = obj.eval_outputs(batch)["loss"]
    assert after.mean() < 0.8 * before.mean()
    # The engine's EMA copy is evaluated as passed, not self.model.
    ema = copy.deepcopy(obj.model)
    assert torch.equal(obj.eval_outputs(batch, ema)["loss"], after)
    with torch.no_grad():
        ema.final_layer.linear.bias.add_(1.0)
    assert not torch.equal(obj.eval_outputs(batch, ema)["loss"], after)


def test_objective_samples_and_checks_its_config():
    obj = _objective(sample_steps=2, sampler="heun")
    imgs = obj.sample(torch.tensor([1, 2, 10]), generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (3, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1
    for bad, match in (({"t_sampling": "cosine"}, "t_sampling"), ({"sampler": "rk4"}, "sampler"),
                       ({"space": "voxels"}, "space")):
        with pytest.raises(ConfigError, match=match):
            _objective(**bad)

    with pytest.raises(ConfigError, match="classes"):
        build_objective("dit", _fresh(), {}, num_classes=5)


def test_latent_space_flows_on_scaled_pre_quantisation_latents_and_decodes_through_the_quantiser():
    torch.manual_seed(0)
    tok = create_generator("vq_test")
    ref = {"source": "tokenizer.safetensors", "sha256": "0" * 64}
    std = tok.quantizer.codebook.std().item()  # (K, D) codes
    model = _fresh(img_size=tok.grid, in_chans=tok.embed_dim, patch_size=1)
    obj = build_objective("dit", model, {"space": "latent", "sample_steps": 2}, num_classes=10, tokenizer=tok,
                          tokenizer_ref=ref)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 1, 28, 28, generator=g) * 2 - 1, "label": torch.tensor([3, 4])}
    z = obj.encode(batch["image"])
    assert z.shape == (2, tok.embed_dim, tok.grid, tok.grid)
    assert torch.allclose(z, tok.encode_latent(batch["image"]) / std, rtol=1e-4, atol=1e-5)
    obj.train()
    obj(batch)["loss"].backward()
    assert all(p.grad is None for p in tok.parameters()) and model.final_layer.linear.weight.grad is not None
    assert obj.references()["tokenizer"] == ref

    # A fresh DiT's velocity is zero, so the sample is the starting noise, mapped back to the latent
    # scale, snapped to the nearest codes and decoded.
    obj.eval()
    images = obj.sample(torch.tensor([0, 10]), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, tok.embed_dim, tok.grid, tok.grid, generator=torch.Generator().manual_seed(1)) * std
    flat = noise.permute(0, 2, 3, 1).reshape(-1, tok.embed_dim)  # (B*g*g, D)
    nearest = torch.cdist(flat, tok.quantizer.codebook).argmin(1)
    quant = tok.quantizer.codebook[nearest].view(2, tok.grid, tok.grid, -1).permute(0, 3, 1, 2)
    assert torch.allclose(images, tok.decode_latent(quant).clamp(-1, 1), atol=2e-4)  # the decoder's GroupNorm magnifies rounding

    with pytest.raises(ConfigError, match="objective.tokenizer"):
        build_objective("dit", _fresh(img_size=7, in_chans=8, patch_size=1), {"space": "latent"}, num_classes=10)
    with pytest.raises(ConfigError, match="img_size=7, in_chans=8"):
        build_objective("dit", _fresh(), {"space": "latent"}, num_classes=10, tokenizer=tok, tokenizer_ref=ref)
    with pytest.raises(ConfigError, match="space=latent"):
        build_objective("dit", _fresh(), {}, num_classes=10, tokenizer=tok, tokenizer_ref=ref)
