"""Vision Mamba: the selective scan against its recurrence, the two scan forms, the mixer, the model.

No peer library implements Vim in pure PyTorch, so the maths is checked directly: a case
written out by hand, agreement of the loop and the chunked parallel scan (values and
gradients), gradcheck in float64, and invariants of the bidirectional mixer and the model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import load_weights, save_weights
from vitkit.layers.mamba import BiMamba
from vitkit.layers.ssm import selective_scan, selective_scan_ref


def _inputs(batch=2, L=11, d=3, n=4, dtype=torch.float32, step=1.0):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(batch, L, d, generator=g, dtype=dtype)
    delta = torch.rand(batch, L, d, generator=g, dtype=dtype) * step + 0.05
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, L, n, generator=g, dtype=dtype)
    C = torch.randn(batch, L, n, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    return u, delta, A, B, C, D


def test_scan_matches_the_recurrence_written_out():
    # One channel, two states, three positions: every h_t spelled out.
    u = torch.tensor([[[0.5], [-1.0], [2.0]]])
    delta = torch.tensor([[[0.3], [0.7], [0.2]]])
    A = torch.tensor([[-1.0, -0.5]])
    B = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [-2.0, 0.3]]])
    C = torch.tensor([[[0.2, 1.0], [1.5, -0.5], [0.7, 0.4]]])
    D = torch.tensor([0.9])
    a = [torch.exp(delta[0, t, 0] * A[0]) for t in range(3)]  # (2,) decay per position
    b = [delta[0, t, 0] * B[0, t] * u[0, t, 0] for t in range(3)]  # (2,) input per position
    h1 = b[0]
    h2 = a[1] * h1 + b[1]
    h3 = a[2] * h2 + b[2]
    expected = torch.stack([(C[0, t] * h).sum() + D[0] * u[0, t, 0] for t, h in enumerate((h1, h2, h3))])
    torch.testing.assert_close(selective_scan_ref(u, delta, A, B, C, D)[0, :, 0], expected)
    for chunk in (1, 2, 3, 8):
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, chunk_size=chunk)[0, :, 0], expected)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_chunked_scan_equals_loop_values_and_gradients(chunk):
    args = [t.requires_grad_() for t in _inputs(L=13)]
    y_ref = selective_scan_ref(*args)
    g_ref = torch.autograd.grad(y_ref.square().sum(), args)
    y = selective_scan(*args, chunk_size=chunk)
    g = torch.autograd.grad(y.square().sum(), args)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["ref", "chunked"])
def test_scan_gradcheck_float64(form):
    args = tuple(t.requires_grad_() for t in _inputs(batch=1, L=5, d=2, n=3, dtype=torch.float64))
    if form == "ref":
        fn = selective_scan_ref
    else:
        def fn(*a):
            return selective_scan(*a, chunk_size=2)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_scan_stays_finite_with_steep_decay():
    # delta * |A| up to ~400 per position: exp(-cumsum) forms would overflow float32 here.
    u, delta, A, B, C, D = _inputs(L=40, step=100.0)
    A = A * 2
    y = selective_scan(u, delta, A, B, C, D, chunk_size=40)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(u, delta, A, B, C, D), atol=1e-4, rtol=1e-4)


def test_scan_rejects_mismatched_shapes():
    u, delta, A, B, C, D = _inputs()
    with pytest.raises(ValueError, match="A is"):
        selective_scan(u, delta, A[:2], B, C, D)
    with pytest.raises(ValueError, match="B and C must be"):
        selective_scan_ref(u, delta, A, B[:, :3], C, D)


def test_bimamba_backward_scan_is_the_forward_scan_on_the_reversed_sequence():
    m = BiMamba(8, d_state=4, chunk_size=4).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    swapped = BiMamba(8, d_state=4, chunk_size=4).eval()
    sd = m.state_dict()
    pairs = {"conv1d": "conv1d_b", "x_proj": "x_proj_b", "dt_proj": "dt_proj_b", "A_log": "A_b_log", "D": "D_b"}
    swap = {**pairs, **{b: a for a, b in pairs.items()}}
    renamed = {}
    for k, v in sd.items():
        head, dot, rest = k.partition(".")
        renamed[swap.get(head, head) + dot + rest] = v
    swapped.load_state_dict(renamed)
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(swapped(x.flip(1)).flip(1), m(x), atol=1e-5, rtol=1e-5)
    ref = BiMamba(8, d_state=4, reference=True).eval()
    ref.load_state_dict(sd)
    torch.testing.assert_close(ref(x), m(x), atol=1e-5, rtol=1e-5)


def test_each_scan_direction_is_causal():
    # Without the backward scan's contribution, output t depends on inputs 0..t only.
    m = BiMamba(8, d_state=4, chunk_size=3).eval()
    x = torch.randn(1, 7, 8)
    xz = m.in_proj(x)
    x_in, z = xz.chunk(2, dim=-1)
    y = m._scan(x_in, z, "")
    x2 = x_in.clone()
    x2[:, 4:] += 1.0
    y2 = m._scan(x2, z, "")
    torch.testing.assert_close(y2[:, :4], y[:, :4])
    assert not torch.allclose(y2[:, 4:], y[:, 4:])


def test_vim_class_token_sits_in_the_middle_and_comes_out_first():
    m = vitkit.create_model("test_vim", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, grid = m._embed(x)
    assert grid == (4, 4) and tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens[:, 8], m.cls_token[:, 0].expand(2, -1))
    feats = m.forward_features(x)
    assert feats.shape == (2, 17, 32)
    torch.testing.assert_close(m(x), m.head(feats[:, 0]))
    m.global_pool = "avg"
    torch.testing.assert_close(m(x), m.head(feats[:, 1:].mean(1)))


def _hustvl_vim_state_dict(dim: int, depth: int, patch: int, grid: int, d_state: int, classes: int) -> dict:
    """A random state dict in the hustvl/Vim layout, from the upstream names and shapes (models_mamba.py,
    bimamba v2, middle class token, RMSNorm): ``pos_embed`` has N + 1 rows, the class row at N // 2."""
    g = torch.Generator().manual_seed(0)
    inner, rank, n = 2 * dim, -(-dim // 16), grid * grid

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "cls_token": r(1, 1, dim), "pos_embed": r(1, n + 1, dim), "norm_f.weight": 1 + r(dim),
          "head.weight": r(classes, dim), "head.bias": r(classes)}
    for i in range(depth):
        p = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = 1 + r(dim)
        sd[p + "in_proj.weight"] = r(2 * inner, dim)
        sd[p + "out_proj.weight"] = r(dim, inner)
        for b in ("", "_b"):
            sd[p + f"conv1d{b}.weight"] = r(inner, 1, 4)
            sd[p + f"conv1d{b}.bias"] = r(inner)
            sd[p + f"x_proj{b}.weight"] = r(rank + 2 * d_state, inner)
            sd[p + f"dt_proj{b}.weight"] = r(inner, rank)
            sd[p + f"dt_proj{b}.bias"] = r(inner)
            sd[p + ("A_log" if not b else "A_b_log")] = torch.log(torch.arange(1, d_state + 1.0)).repeat(inner, 1)
            sd[p + f"D{b}"] = 1 + r(inner)
    return sd


def test_vim_original_checkpoint_layout_loads_exactly():
    upstream = _hustvl_vim_state_dict(dim=32, depth=2, patch=8, grid=4, d_state=4, classes=5)
    m = vitkit.create_model("test_vim", num_classes=5).eval()
    report = load_weights(m, {"model": upstream}, verbose=False)  # strict: every upstream key has a place
    assert report.format == "vim" and any("folded into cls_token" in n for n in report.notes)
    mine = m.state_dict()
    for k, v in upstream.items():
        if k not in ("pos_embed", "cls_token"):
            assert torch.equal(mine[k], v), k
    # What upstream feeds the first layer: patches + their rows, the class token + the middle row, in the middle.
    x = torch.randn(2, 3, 32, 32)
    pe = upstream["pos_embed"]
    patches = F.conv2d(x, upstream["patch_embed.proj.weight"], upstream["patch_embed.proj.bias"], stride=8)
    patches = patches.flatten(2).transpose(1, 2) + torch.cat([pe[:, :8], pe[:, 9:]], dim=1)
    cls = (upstream["cls_token"] + pe[:, 8:9]).expand(2, -1, -1)
    expected = torch.cat([patches[:, :8], cls, patches[:, 8:]], dim=1)
    with torch.no_grad():
        tokens, _ = m._embed(x)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_vim_saved_weights_round_trip(tmp_path):
    src = vitkit.create_model("test_vim", num_classes=4).eval()
    path = save_weights(src, tmp_path / "vim.safetensors")
    again = vitkit.create_model(str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(x), src(x))
    # A checkpoint at another size: position rows are resampled, the rest loads as is.
    bigger = vitkit.create_model("test_vim", num_classes=4, img_size=48)
    report = load_weights(bigger, src.state_dict(), verbose=False)
    assert report.format == "vim" and any("pos_embed" in r for r in report.resampled)


def test_vim_optimizer_hooks():
    m = vitkit.create_model("test_vim")
    assert {"cls_token", "pos_embed", "layers.0.mixer.A_log", "layers.1.mixer.A_b_log"} <= m.no_weight_decay()
    assert all(n in dict(m.named_parameters()) for n in m.no_weight_decay())
    from vitkit.engine.optim import layer_ids

    ids, num = layer_ids([n for n, _ in m.named_parameters()], m.group_matcher())
    assert ids["patch_embed.proj.weight"] == 0 and ids["layers.1.mixer.in_proj.weight"] == 2
    assert ids["norm_f.weight"] == 2 and num == 4  # stem, 2 blocks (+ final norm), head
    m.reset_classifier(0)
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize("name,millions", [("vim_tiny", 7), ("vim_small", 26)])
def test_vim_paper_sizes(name, millions):
    with torch.device("meta"):
        m = vitkit.create_model(name)
    assert math.isclose(sum(p.numel() for p in m.parameters()) / 1e6, millions, abs_tol=0.5)
