"""The image tokenizer: the vector quantisers against hand computations and VAR's algorithm, the
tokenizer's shapes and errors, and the ``vqvae`` objective training, evaluating and resuming."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import assert_same_run, crash_and_resume, free_port, make_trainer
from torch.utils.data import Dataset

import vitkit
from vitkit.errors import ConfigError, DataError, VitkitError
from vitkit.generate import create_generator
from vitkit.generate.quantize import MultiScaleQuantizer, VectorQuantizer, default_scales
from vitkit.generate.tokenizer import VQTokenizer
from vitkit.objectives import VQVAE, VQVAEConfig, build_objective


def _latent(vectors: list[list[float]]) -> torch.Tensor:
    """N D-vectors -> a (1, D, 1, N) latent whose positions, read row-major, are those vectors."""
    return torch.tensor(vectors).T[None, :, None, :].contiguous()


def _smooth_images(n: int, seed: int = 0, size: int = 28, chans: int = 1) -> torch.Tensor:
    """Images in [-1, 1] that a tiny autoencoder can learn: 4x4 random values, bilinearly enlarged."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, chans, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# ---- the vector quantiser ----------------------------------------------------------------------------


def test_ema_codebook_update_matches_the_formulas_by_hand():
    e0 = [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]  # codes before the step
    n0 = [2.0, 0.5, 1.0]  # EMA cluster sizes N_i
    m0 = [[0.2, 0.0], [0.5, 0.5], [-1.0, 2.0]]  # EMA sums m_i
    zs = [[0.1, -0.2], [0.9, 1.2], [1.1, 0.8], [0.2, 0.1]]
    d, eps, beta, k = 0.9, 1e-5, 0.25, 3
    q = VectorQuantizer(k, 2, ema=True, decay=d, eps=eps, commitment=beta, restart_dead=False)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor(e0))
        q.cluster_size.copy_(torch.tensor(n0))
        q.embed_sum.copy_(torch.tensor(m0))
    out = q.train()(_latent(zs))
    assign = [0, 1, 1, 0]  # nearest codes, by eye
    assert out["indices"].flatten().tolist() == assign
    # VQ-VAE's appendix: N_i = d N_i + (1 - d) n_i; m_i = d m_i + (1 - d) sum z; e_i = m_i / N~_i (Laplace).
    N = [d * n0[i] + (1 - d) * assign.count(i) for i in range(k)]
    M = [[d * m0[i][c] + (1 - d) * sum(z[c] for z, a in zip(zs, assign) if a == i) for c in range(2)] for i in range(k)]
    tot = sum(N)
    smooth = [(N[i] + eps) / (tot + k * eps) * tot for i in range(k)]
    E = [[M[i][c] / smooth[i] for c in range(2)] for i in range(k)]
    assert torch.allclose(q.cluster_size, torch.tensor(N), atol=1e-6)
    assert torch.allclose(q.embed_sum, torch.tensor(M), atol=1e-6)
    assert torch.allclose(q.codebook, torch.tensor(E), atol=1e-5)
    # The output is the codes used for the assignment (before the update); the loss is the commitment alone.
    assert torch.allclose(out["quant"][0, :, 0].T, torch.tensor([e0[a] for a in assign]), atol=1e-6)
    commit = beta * sum((z[c] - e0[a][c]) ** 2 for z, a in zip(zs, assign) for c in range(2)) / 8
    assert out["loss"].item() == pytest.approx(commit, rel=1e-5)
    assert out["usage"].item() == pytest.approx(2 / 3) and out["perplexity"].item() == pytest.approx(2.0)
    # Evaluation leaves the codebook alone.
    before = {n: b.clone() for n, b in q.named_buffers()}
    q.eval()(_latent(zs))
    assert all(torch.equal(before[n], b) for n, b in q.named_buffers())


def test_codebook_and_commitment_losses_and_their_gradients_by_hand():
    q = VectorQuantizer(2, 1, ema=False, commitment=0.25, restart_dead=False)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([0.2, 0.7, 1.5]).view(1, 1, 1, 3).requires_grad_()
    out = q.train()(z)
    assert out["indices"].flatten().tolist() == [0, 1, 1]
    sq = 0.2**2 + 0.3**2 + 0.5**2
    # ||sg[z] - e||^2 + beta ||z - sg[e]||^2, both means over the 3 elements.
    assert out["loss"].item() == pytest.approx((1 + 0.25) * sq / 3, rel=1e-5)
    out["loss"].backward()
    want_z = [0.25 * 2 * (0.2 - 0.0) / 3, 0.25 * 2 * (0.7 - 1.0) / 3, 0.25 * 2 * (1.5 - 1.0) / 3]
    want_e = [2 * (0.0 - 0.2) / 3, (2 * (1.0 - 0.7) + 2 * (1.0 - 1.5)) / 3]
    assert torch.allclose(z.grad.flatten(), torch.tensor(want_z), atol=1e-6)
    assert torch.allclose(q.codebook.grad.flatten(), torch.tensor(want_e), atol=1e-6)
    # With an EMA codebook the codebook term is gone: commitment only.
    ema = VectorQuantizer(2, 1, ema=True, commitment=0.25, restart_dead=False)
    with torch.no_grad():
        ema.codebook.copy_(torch.tensor([[0.0], [1.0]]))
    assert ema.train()(z.detach())["loss"].item() == pytest.approx(0.25 * sq / 3, rel=1e-5)


@pytest.mark.parametrize("ema", [True, False])
def test_straight_through_passes_the_gradient_unchanged(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, ema=ema, restart_dead=False).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    g = torch.randn_like(z)
    (out["quant"] * g).sum().backward()
    assert torch.equal(z.grad, g)
    if not ema:  # the codes reach the decoder without a path back to the codebook
        assert q.codebook.grad is None or not q.codebook.grad.any()


@pytest.mark.parametrize("name", ["vq_test", "msvq_test"])
def test_decoder_gradient_reaches_the_encoder_unchanged(name):
    torch.manual_seed(0)
    tok = create_generator(name).train()
    seen = {}

    def keep_output(module, args, output):
        output.retain_grad()
        seen["encoder"] = output

    def keep_input(module, args):
        args[0].retain_grad()
        seen["decoder"] = args[0]

    tok.encoder.register_forward_hook(keep_output)
    tok.decoder.register_forward_pre_hook(keep_input)
    out = tok(_smooth_images(2))
    out["recon"].square().sum().backward()
    assert seen["decoder"].grad is not None and seen["decoder"].grad.abs().sum() > 0
    assert torch.equal(seen["encoder"].grad, seen["decoder"].grad)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_restart_from_the_batch(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, ema=ema, decay=0.99, restart_dead=True, dead_threshold=1.0).train()
    codes = torch.full((8, 2), 100.0)
    codes[0], codes[1] = torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0])
    with torch.no_grad():
        q.codebook.copy_(codes)
        q.cluster_size.copy_(torch.tensor([5.0, 5.0] + [0.5] * 6))  # codes 2..7: half a hit per batch
        if ema:
            q.embed_sum.copy_(codes * q.cluster_size[:, None])
    z = 0.1 * torch.randn(1, 2, 4, 4)  # every vector nearest to code 0
    seen = z.permute(0, 2, 3, 1).reshape(-1, 2)
    q(z)
    for i in range(2, 8):  # dead: now one of this batch's vectors, counted as hit once
        assert (q.codebook[i] - seen).abs().amax(1).min().item() == 0.0
        assert q.cluster_size[i].item() == 1.0
    # Code 1 got no vector this batch but was used recently (5 hits per batch on average): kept.
    assert q.cluster_size[1].item() == pytest.approx(0.99 * 5.0)
    assert torch.allclose(q.codebook[1], torch.tensor([5.0, 5.0]), atol=1e-3)
    # A fresh codebook has no hits at all: the first training batch initialises every code from the data.
    fresh = VectorQuantizer(8, 2, ema=ema).train()
    z = torch.randn(1, 2, 4, 4)
    seen = z.permute(0, 2, 3, 1).reshape(-1, 2)
    fresh(z)
    assert ((fresh.codebook[:, None, :] - seen[None]).abs().amax(-1).amin(1) == 0).all()


# ---- VAR's multi-scale residual quantiser ----------------------------------------------------------------


def _var_reference(f, codebook, scales, phis, beta, mode):
    """VAR's VectorQuantizer2.forward, written from its algorithm: per-scale indices, f_hat, loss value."""
    B, C, H, W = f.shape
    rest, f_hat, loss, out = f.clone(), torch.zeros_like(f), 0.0, []
    last = len(scales) - 1
    for k, s in enumerate(scales):
        z = F.interpolate(rest, size=(s, s), mode="area") if k != last else rest
        zf = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = ((zf[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
        h = codebook[idx].view(B, s, s, C).permute(0, 3, 1, 2)
        if k != last:
            h = F.interpolate(h, size=(H, W), mode=mode)
        h = phis[k](h)
        f_hat = f_hat + h
        rest = rest - h
        loss = loss + beta * F.mse_loss(f_hat, f) + F.mse_loss(f_hat, f)  # commitment + codebook, by value
        out.append(idx.view(B, s, s))
    return out, f_hat, loss / len(scales)


@pytest.mark.parametrize("quant_resi, mode", [(0.0, "bicubic"), (0.5, "bicubic"), (0.0, "bilinear")])
def test_multiscale_quantisation_follows_var(quant_resi, mode):
    torch.manual_seed(0)
    scales = (1, 2, 3, 4)
    q = MultiScaleQuantizer(6, 3, scales, quant_resi=quant_resi, share_quant_resi=4, upsample=mode, ema=False,
                            restart_dead=False).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(6, 3))
    if quant_resi:
        # VAR's 4 shared phi at ticks (1/12, 13/36, 23/36, 11/12); scales at 0, 1/3, 2/3, 1 take phi 0, 1, 2, 3.
        def phi(j):
            conv = q.phis[j]
            return lambda h: h * (1 - quant_resi) + F.conv2d(h, conv.weight, conv.bias, padding=1) * quant_resi
        phis = [phi(j) for j in (0, 1, 2, 3)]
    else:
        phis = [lambda h: h] * 4
    f = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref_idx, ref_hat, ref_loss = _var_reference(f, q.codebook, scales, phis, 0.25, mode)
        out = q(f)
        assert [i.tolist() for i in out["indices"]] == [i.tolist() for i in ref_idx]
        assert torch.allclose(out["quant"], ref_hat, atol=1e-5)
        assert out["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert [i.tolist() for i in q.quantize_scales(f)] == [i.tolist() for i in ref_idx]
        assert torch.allclose(q.codes_to_latent(ref_idx), ref_hat, atol=1e-5)
    # Area downsampling by 2 is the mean of each 2x2 block.
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(q.down(x, 2), x.view(2, 3, 2, 2, 2, 2).mean((3, 5)), atol=1e-6)


def test_var_inputs_by_hand_for_two_scales():
    torch.manual_seed(0)
    tok = VQTokenizer(img_size=4, in_chans=1, width=4, num_down=1, embed_dim=3, codebook_size=5,
                      quantizer="multiscale", scales=(1, 2), quant_resi=0.0, num_res_blocks=1).eval()
    with torch.no_grad():
        tok.quantizer.codebook.copy_(torch.randn(5, 3))
    E = tok.quantizer.codebook
    r0 = torch.tensor([[[3]], [[1]]])  # (B, 1, 1)
    r1 = torch.tensor([[[0, 2], [4, 1]], [[1, 1], [3, 0]]])  # (B, 2, 2)
    # The input predicting scale 2 is f_1 = up(e(r0)): a 1x1 map enlarged is that code everywhere.
    by_hand = E[r0.view(2)][:, None, :].expand(2, 4, 3)  # (B, 2*2, D)
    x_in = tok.scales_to_var_input([r0, r1])
    assert x_in.shape == (2, 4, 3) and torch.allclose(x_in, by_hand, atol=1e-6)
    assert torch.allclose(tok.scales_to_var_input([r0]), by_hand, atol=1e-6)  # the last map is not needed
    f_hat, nxt = tok.var_next_input(0, None, r0)
    assert torch.allclose(nxt, by_hand, atol=1e-6)
    f_hat, nxt = tok.var_next_input(1, f_hat, r1)
    assert nxt is None
    f_by_hand = E[r0.view(2)][:, :, None, None] + E[r1].permute(0, 3, 1, 2)  # (B, D, 2, 2)
    assert torch.allclose(f_hat, f_by_hand, atol=1e-6)
    assert torch.allclose(tok.decode_scales([r0, r1]), tok.decode_latent(f_by_hand), atol=1e-5)
    assert torch.allclose(tok.embed_indices(r1), E[r1])


def test_scales_to_var_input_equals_the_step_by_step_inputs():
    torch.manual_seed(0)
    tok = create_generator("msvq_test").eval()
    with torch.no_grad():
        tok.quantizer.codebook.copy_(torch.randn_like(tok.quantizer.codebook))
    x = _smooth_images(3)
    idx = tok.encode_scales(x)
    assert [tuple(i.shape) for i in idx] == [(3, s, s) for s in (1, 2, 3, 4, 5, 7)]
    with torch.no_grad():
        out = tok(x)
        assert [i.tolist() for i in out["indices"]] == [i.tolist() for i in idx]
        full = tok.scales_to_var_input(idx)
        assert full.shape == (3, 4 + 9 + 16 + 25 + 49, tok.embed_dim)
        f_hat, parts = None, []
        for k in range(len(tok.scales)):
            f_hat, nxt = tok.var_next_input(k, f_hat, idx[k])
            if nxt is not None:
                parts.append(nxt)
        assert nxt is None and torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        assert torch.allclose(tok.decode_latent(f_hat), tok.decode_scales(idx), atol=1e-5)
        assert torch.allclose(tok.decode_scales(idx), out["recon"], atol=1e-4)


# ---- the tokenizer ---------------------------------------------------------------------------------


def test_encode_decode_shapes_for_28px_grey_and_32px_rgb():
    tok = create_generator("vq_test").eval()
    x = _smooth_images(2)
    t = tok.encode(x)
    assert tok.grid == 7 and t.shape == (2, 7, 7) and t.dtype == torch.long
    assert tok.decode(t).shape == (2, 1, 28, 28) and tok.embed_indices(t).shape == (2, 7, 7, tok.embed_dim)
    out = tok(x)
    assert out["recon"].shape == x.shape and torch.equal(out["indices"], t)
    assert 0 < out["usage"].item() <= 1 and out["perplexity"].item() >= 1
    rgb = create_generator("vq_test", img_size=32, in_chans=3).eval()
    t = rgb.encode(_smooth_images(2, size=32, chans=3))
    assert rgb.grid == 8 and t.shape == (2, 8, 8) and rgb.decode(t).shape == (2, 3, 32, 32)
    ms = create_generator("msvq_test", img_size=32, in_chans=3).eval()
    assert ms.scales == default_scales(8) == (1, 2, 3, 4, 5, 6, 8)
    idx = ms.encode_scales(_smooth_images(2, size=32, chans=3))
    assert [tuple(i.shape) for i in idx] == [(2, s, s) for s in ms.scales]
    assert ms.decode_scales(idx).shape == (2, 3, 32, 32)
    assert ms.scales_to_var_input(idx).shape == (2, sum(s * s for s in ms.scales[1:]), ms.embed_dim)
    assert create_generator("msvq_test").scales == (1, 2, 3, 4, 5, 7)
    # model_name and model_args rebuild the architecture (and are what save_weights stores).
    json.dumps(ms.model_args)
    again = create_generator(ms.model_name, **json.loads(json.dumps(ms.model_args)))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ms.state_dict().items()}


def test_bad_sizes_tokens_and_calls_are_clear_errors():
    with pytest.raises(ConfigError, match=r"img_size 30 is not divisible by 2\*\*num_down = 4"):
        create_generator("vq_test", img_size=30)
    with pytest.raises(ConfigError, match="end at the latent grid 7"):
        create_generator("msvq_test", scales=(1, 2, 4))
    with pytest.raises(ConfigError, match="quantizer 'rq'"):
        create_generator("vq_test", quantizer="rq")
    tok = create_generator("vq_test")
    with pytest.raises(DataError, match=r"\(B, 1, 28, 28\)"):
        tok.encode(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="outside the codebook"):
        tok.decode(torch.full((1, 7, 7), 32))
    with pytest.raises(ConfigError, match="needs a multi-scale tokenizer"):
        tok.encode_scales(torch.zeros(1, 1, 28, 28))
    ms = create_generator("msvq_test")
    with pytest.raises(ConfigError, match="needs a single-scale tokenizer"):
        ms.encode(torch.zeros(1, 1, 28, 28))
    with pytest.raises(DataError, match=r"\(B, 2, 2\)"):
        ms.var_next_input(1, None, torch.zeros(1, 3, 3, dtype=torch.long))


# ---- the vqvae objective ---------------------------------------------------------------------------


def test_vqvae_trains_and_the_reconstruction_loss_falls():
    torch.manual_seed(0)
    obj = build_objective("vqvae", create_generator("vq_test"))
    assert isinstance(obj, VQVAE) and obj.recon == "l2"
    x = _smooth_images(8)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    obj.train()
    first = None
    for _ in range(10):
        out = obj({"image": x})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["recon_mse"].item()
    assert {"loss", "loss_recon", "loss_vq", "recon_mse", "usage", "perplexity"} <= set(out)
    assert 0 < out["usage"].item() <= 1 and out["perplexity"].item() >= 1
    obj.eval()
    ev = obj.eval_outputs({"image": x})
    assert ev["recon_mse"].shape == (8,) and ev["code_hits"].sum().item() == 8 * 49
    assert ev["recon_mse"].mean().item() < 0.5 * first
    ev_obj = obj.evaluator()
    ev_obj.update({"image": x}, ev)
    res = ev_obj.compute()
    assert ev_obj.primary == "recon_mse" and not ev_obj.higher_is_better
    assert res["recon_mse"] == pytest.approx(ev["recon_mse"].mean().item(), rel=1e-6)
    assert res["usage"] == pytest.approx((ev["code_hits"] > 0).float().mean().item())
    l1 = build_objective("vqvae", create_generator("vq_test"), {"recon": "l1"})
    assert l1.recon == "l1"
    with pytest.raises(ConfigError, match="objective.recon"):
        VQVAEConfig(recon="huber")
    with pytest.raises(ConfigError, match="perceptual_model"):
        VQVAEConfig(perceptual=1.0)
    with pytest.raises(ConfigError, match="trains an image tokenizer"):
        VQVAE(torch.nn.Linear(2, 2))


def test_ema_state_survives_a_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = create_generator("msvq_test").train()
    for s in range(3):
        a(_smooth_images(8, seed=s))
    path = vitkit.save_weights(a, tmp_path / "tok.safetensors")
    from safetensors.torch import load_file

    b = create_generator("msvq_test")
    b.load_state_dict(load_file(str(path)))
    for name in ("quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name]), name
    assert a.quantizer.cluster_size.sum() > 0
    # Both continue identically: the moving averages resume where they were.
    x = _smooth_images(8, seed=5)
    torch.manual_seed(1)
    oa = a(x)
    torch.manual_seed(1)
    ob = b.train()(x)
    assert torch.equal(oa["recon"], ob["recon"])
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


class _Images(Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        self.x = _smooth_images(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": torch.tensor(i % 2)}


def _vq_trainer(out, **kw):
    torch.manual_seed(0)
    obj = build_objective("vqvae", create_generator("vq_test"))
    kw = {"optim": {"lr": 1e-3}, "epochs": 2, "ema_decay": 0.9, **kw}
    return make_trainer(out, objective=obj, dataset=_Images(), val_dataset=_Images(8, seed=1), batch_size=8, **kw)


def test_vqvae_runs_through_the_trainer_and_resumes_bitwise(tmp_path):
    full = _vq_trainer(tmp_path / "full")
    s = full.fit()
    assert s["best_metric"] == "recon_mse" and 0 < s["val_usage"] <= 1 and s["val_recon_mse"] > 0
    resumed = crash_and_resume(_vq_trainer, tmp_path / "run", 3, latest=2, ckpt_every_steps=2)
    assert_same_run(full, resumed, ema=True)
    assert "model.quantizer.embed_sum" in resumed.objective.state_dict()


def test_perceptual_term_uses_a_frozen_vitkit_backbone(tmp_path):
    torch.manual_seed(0)
    net = vitkit.create_model("test_vit", num_classes=2, img_size=16)
    path = vitkit.save_weights(net, tmp_path / "backbone.safetensors")
    obj = build_objective("vqvae", create_generator("vq_test"), {"perceptual": 0.5, "perceptual_model": str(path),
                                                                "perceptual_layers": 2})
    ref = obj.references()["perceptual"]
    assert ref["source"] == str(path) and len(ref["sha256"]) == 64
    assert not any(k.startswith("perceptual.") for k in obj.checkpoint_state_dict())
    x = _smooth_images(2)
    out = obj.train()({"image": x})
    out["loss"].backward()
    assert not any(p.requires_grad for p in obj.perceptual.parameters())
    assert obj.model.encoder.conv_in.weight.grad is not None
    # LPIPS's form without learned weights, from the backbone's own features.
    with torch.no_grad():
        recon = x.flip(-1)
        p = obj.perceptual
        fr = p.net.forward_intermediates(p.input(recon), indices=2, intermediates_only=True)
        ft = p.net.forward_intermediates(p.input(x), indices=2, intermediates_only=True)
        want = sum(((a / a.norm(dim=1, keepdim=True)) - (b / b.norm(dim=1, keepdim=True))).square().sum(1).mean()
                   for a, b in zip(fr, ft))
        assert p(recon, x).item() == pytest.approx(want.item(), rel=1e-4)
        assert p(x, x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(VitkitError, match="objective.perceptual_model="):
        build_objective("vqvae", create_generator("vq_test"), {"perceptual": 1.0,
                                                               "perceptual_model": str(tmp_path / "missing")})


# ---- several processes -------------------------------------------------------------------------------


def _codebook_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from vitkit.engine.distributed import init_distributed, shutdown_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("gloo")
    z = torch.load(f"{out}/z.pt", weights_only=True)[rank]  # this process's half of the batch
    states = {}
    for restart in (False, True):
        torch.manual_seed(rank)  # different random streams: the restarted codes must still agree
        q = VectorQuantizer(6, 2, ema=True, decay=0.9, restart_dead=restart)
        with torch.no_grad():
            q.codebook.copy_(torch.load(f"{out}/codes.pt", weights_only=True))
            q.embed_sum.copy_(q.codebook)
        q.train()(z)
        states[str(restart)] = {k: v.clone() for k, v in q.state_dict().items()}
    torch.save(states, f"{out}/rank{rank}.pt")
    shutdown_distributed()


def test_codebook_statistics_are_summed_over_processes(tmp_path):
    torch.manual_seed(0)
    z = torch.randn(2, 1, 2, 2, 3)  # two processes' (1, D, 2, 3) batches: 6 vectors each
    codes = torch.randn(6, 2)
    torch.save(z, tmp_path / "z.pt")
    torch.save(codes, tmp_path / "codes.pt")
    mp.spawn(_codebook_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Without restarts: every process holds the codebook one process would compute from the whole batch.
    one = VectorQuantizer(6, 2, ema=True, decay=0.9, restart_dead=False)
    with torch.no_grad():
        one.codebook.copy_(codes)
        one.embed_sum.copy_(codes)
    one.train()(torch.cat([z[0], z[1]], dim=2))  # (1, 2, 4, 3): both halves in one batch
    for name, want in one.state_dict().items():
        assert torch.allclose(r0["False"][name], want, atol=1e-6) and torch.equal(r0["False"][name], r1["False"][name])
    # With restarts: the dead codes are re-initialised to the same vectors everywhere.
    assert (r0["True"]["cluster_size"] == 1.0).any()
    for name in r0["True"]:
        assert torch.equal(r0["True"][name], r1["True"][name]), name
