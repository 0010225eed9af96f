"""Attention capture, rollout, gradient rollout, per-head maps, structure plots, `vitkit explain`."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import run_vitkit as _vitkit
from PIL import Image
from torch import nn

import vitkit
from vitkit.errors import ConfigError
from vitkit.interpret import (
    attention_capture,
    attention_rollout,
    capture_attention,
    gradient_rollout,
    head_maps,
    pca_rgb,
    pos_embed_similarity,
    token_map,
    top_mass_mask,
    windows_to_image,
)
from vitkit.layers.capture import WindowLayout, attend, capturable_modules

# Class token; class + distillation tokens; registers; average pooling without a class token; RoPE + registers.
MODELS = ["test_vit", "test_deit_distilled", "test_vit_reg", "test_vit_gap", "test_vit_modern"]


def _model(name, **kw):
    return vitkit.create_model(name, **kw).eval()


@pytest.mark.parametrize("name", MODELS)
def test_captured_rows_sum_to_one(name):
    m = _model(name)
    maps = capture_attention(m, torch.randn(3, 3, 32, 32))
    n = m.num_prefix_tokens + 16
    assert len(maps) == 2 and maps.layers == [0, 1] and maps.grid == (4, 4)
    for a in maps:
        assert a.shape == (3, 2, n, n) and not a.requires_grad
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, n))


@pytest.mark.parametrize("name", MODELS)
def test_capture_leaves_outputs_bit_identical(name):
    m = _model(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = m(x)
    assert torch.equal(capture_attention(m, x).output, fused)
    assert torch.equal(capture_attention(m, x, keep_graph=True).output.detach(), fused)
    assert all(mod.captured is None for mod in capturable_modules(m))
    with torch.no_grad():
        assert torch.equal(m(x), fused)


def test_capture_switches_only_the_chosen_layers_for_the_call():
    m = _model("test_vit")
    x = torch.randn(2, 3, 32, 32)
    seen = []
    for mod in capturable_modules(m):
        mod.register_forward_pre_hook(lambda mod, args: seen.append(mod.captured is not None))
    first = capture_attention(m, x, layers=[-1], heads=[1])
    assert seen == [False, True] and first.layers == [1]
    assert len(first) == 1 and first[0].shape == (2, 1, 17, 17)
    full = capture_attention(m, x)
    torch.testing.assert_close(first[0], full[1][:, [1]], rtol=0, atol=0)
    avg = capture_attention(m, x, average_heads=True, device="cpu")
    torch.testing.assert_close(avg[0], full[0].mean(1, keepdim=True))
    assert len(first) == 1 and len(full) == 2  # each call has its own list
    with pytest.raises(ConfigError, match="out of range: the model has 2 attention layers"):
        capture_attention(m, x, layers=[2])
    with pytest.raises(ConfigError, match="out of range: the layer has 2 heads"):
        capture_attention(m, x, heads=[5])
    assert all(mod.captured is None for mod in capturable_modules(m))
    with pytest.raises(ConfigError, match="no attention layers"):
        capture_attention(nn.Conv2d(3, 3, 1), x)


def test_keep_graph_gradients_equal_the_fused_path():
    """The kept graph routes gradients through the explicit weights; they match SDPA's own."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    class Sink(list):
        keep_graph = True

        def append(self, w, layout=None):
            super().append(w)

    sink = Sink()
    out = attend(q, k, v, sink)
    ref = attend(q, k, v)
    assert torch.equal(out, ref) and sink[0].requires_grad
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # d(out)/d(weights) = g @ v^T: the weights really are in the graph.
    torch.testing.assert_close(torch.autograd.grad(attend(q, k, v, sink), sink[-1], g)[0], g @ v.transpose(-2, -1))


def test_rollout_matches_a_hand_computed_two_layer_case():
    A1 = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]]]])  # (B=1, heads=1, N=2, N=2)
    A2 = torch.tensor([[[[0.5, 0.5], [0.1, 0.9]]]])
    # 0.5 A + 0.5 I: [[0.6, 0.4], [0.3, 0.7]] and [[0.75, 0.25], [0.05, 0.95]]; R = Â2 Â1.
    expected = torch.tensor([[[0.525, 0.475], [0.315, 0.685]]])
    torch.testing.assert_close(attention_rollout([A1, A2]), expected)
    # Max over two heads, then (A + I) with rows renormalised.
    H1 = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [0.9, 0.1]]]])
    expected_max = torch.tensor([[[1.4 / 2.2, 0.8 / 2.2], [0.9 / 2.3, 1.4 / 2.3]]])
    torch.testing.assert_close(attention_rollout([H1], head_fusion="max"), expected_max)
    torch.testing.assert_close(attention_rollout([H1], head_fusion="min"),
                               torch.tensor([[[1.2 / 1.8, 0.6 / 1.8], [0.6 / 1.7, 1.1 / 1.7]]]))
    # Discarding the lowest quarter zeroes 0.2: [[0, 0.8], [0.6, 0.4]] -> [[0.5, 0.4], [0.3, 0.7]] / rows.
    torch.testing.assert_close(attention_rollout([A1], discard_ratio=0.25),
                               torch.tensor([[[5 / 9, 4 / 9], [0.3, 0.7]]]))
    with pytest.raises(ConfigError, match="head_fusion 'median'"):
        attention_rollout([A1], head_fusion="median")


def test_rollout_is_correct_per_image_in_a_batch():
    m = _model("test_vit")
    x = torch.randn(3, 3, 32, 32)
    batch = attention_rollout(capture_attention(m, x), discard_ratio=0.5)
    for i in range(3):
        single = attention_rollout(capture_attention(m, x[i:i + 1]), discard_ratio=0.5)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.sum(-1), torch.ones(3, 17))
    heat = token_map(batch, 1, (4, 4), [0])
    assert heat.shape == (3, 4, 4)
    torch.testing.assert_close(heat.sum((1, 2)), torch.ones(3))


def test_gradient_rollout_changes_with_the_class_and_is_per_image():
    m = _model("test_vit", num_classes=5)
    x = torch.randn(3, 3, 32, 32)
    r0, logits = gradient_rollout(m, x, target=0)
    r1, _ = gradient_rollout(m, x, target=1)
    with torch.no_grad():
        assert torch.equal(logits, m(x))
    torch.testing.assert_close(r0.sum(-1), torch.ones(3, 17))
    assert (r0 - r1).abs().max() > 1e-3
    for i in range(3):
        single, _ = gradient_rollout(m, x[i:i + 1], target=0)
        torch.testing.assert_close(r0[i:i + 1], single, atol=1e-5, rtol=1e-4)
    # Per-image targets: image 0 explained for class 0, image 1 for class 1, ...
    mixed, _ = gradient_rollout(m, x[:2], target=[0, 1])
    torch.testing.assert_close(mixed[1], r1[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="out of range for a model with 5 classes"):
        gradient_rollout(m, x, target=7)


def test_capture_under_gradient_checkpointing_gives_each_layer_once():
    m = vitkit.create_model("test_vit", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    ref_maps = capture_attention(m.eval(), x)
    ref_grad, _ = gradient_rollout(m, x, target=2)
    m.set_grad_checkpointing(True)
    with attention_capture(m) as maps:
        out = m(x)
        forward_maps = list(maps)
        out.square().sum().backward()  # the backward re-runs both blocks
    assert len(maps) == 2 and all(a is b for a, b in zip(maps, forward_maps))
    for a, b in zip(maps, ref_maps):
        torch.testing.assert_close(a, b)
    grad_ckpt, _ = gradient_rollout(m, x, target=2)
    torch.testing.assert_close(grad_ckpt, ref_grad)
    kept = capture_attention(m, x, keep_graph=True)
    (g,) = torch.autograd.grad(kept.output[:, 2].sum(), kept[0])
    assert torch.isfinite(g).all() and m.grad_checkpointing


def _window_attention_by_hand(q, k, H, W, h, w, sh, sw):
    """Global attention restricted to the shifted windows, from the definition."""
    rows = (torch.arange(H) - sh) % H // h
    cols = (torch.arange(W) - sw) % W // w
    window = (rows[:, None] * (W // w) + cols[None]).reshape(-1)  # window id of each image token
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(window[:, None] != window[None], float("-inf"))
    return logits.softmax(-1)


class _WindowAttention(nn.Module):
    """A minimal windowed attention layer following the capture protocol, as Swin's would."""

    def __init__(self, grid, window, shift):
        super().__init__()
        self.grid, self.window, self.shift = grid, window, shift
        self.captured = None
        torch.manual_seed(1)
        self.q = torch.randn(1, 2, grid[0] * grid[1], 4)
        self.k = torch.randn(1, 2, grid[0] * grid[1], 4)

    def partition(self, t):  # (B, heads, H*W, d) image order -> (B*nW, heads, h*w, d)
        (H, W), (h, w), (sh, sw) = self.grid, self.window, self.shift
        B, heads, _, d = t.shape
        t = t.reshape(B, heads, H, W, d).roll((-sh, -sw), dims=(2, 3))
        t = t.reshape(B, heads, H // h, h, W // w, w, d).permute(0, 2, 4, 1, 3, 5, 6)
        return t.reshape(-1, heads, h * w, d)

    def forward(self, images):
        q, k = self.partition(self.q), self.partition(self.k)
        return attend(q, k, k, self.captured, layout=WindowLayout(self.grid, self.window, self.shift))


@pytest.mark.parametrize("shift", [(0, 0), (1, 1), (2, 1)])
def test_window_attention_maps_back_to_image_coordinates(shift):
    layer = _WindowAttention((4, 6), (2, 3), shift)
    maps = capture_attention(layer, torch.zeros(1, 3, 4, 6))
    expected = _window_attention_by_hand(layer.q, layer.k, 4, 6, 2, 3, *shift)
    assert maps[0].shape == (1, 2, 24, 24)
    torch.testing.assert_close(maps[0], expected)
    # A padded grid (3 rows of tokens padded to 4): the padding is dropped, rows renormalised.
    windows = torch.softmax(torch.randn(2 * 4, 2, 6, 6), -1)  # 2 images, 4 windows of 2x3
    padded = windows_to_image(windows, WindowLayout((4, 6), (2, 3), shift, size=(3, 6)))
    assert padded.shape == (2, 2, 18, 18)
    torch.testing.assert_close(padded.sum(-1), torch.ones(2, 2, 18))


def test_head_maps_and_the_top_mass_mask():
    mask = top_mass_mask(torch.tensor([[0.5, 0.3], [0.1, 0.1]]), mass=0.6)
    assert mask.tolist() == [[True, True], [False, False]]  # 0.5 + 0.3 >= 0.6, 0.5 alone is not
    assert top_mass_mask(torch.tensor([[0.5, 0.3], [0.1, 0.1]]), mass=0.5).tolist() == [[True, False], [False, False]]
    attn = torch.softmax(torch.randn(2, 3, 5, 5), -1)  # 1 prefix token + a 2x2 grid
    maps = head_maps(attn, 1, (2, 2), rows=[0])
    assert maps.shape == (2, 3, 2, 2)
    torch.testing.assert_close(maps[1, 2].reshape(-1), attn[1, 2, 0, 1:] / attn[1, 2, 0, 1:].sum())
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3))


def test_pos_embed_similarity_and_feature_pca():
    sim = pos_embed_similarity(_model("test_vit_sincos"))
    assert sim.shape == (4, 4, 4, 4)
    torch.testing.assert_close(torch.diagonal(sim.reshape(16, 16)), torch.ones(16))
    torch.testing.assert_close(sim.reshape(16, 16), sim.reshape(16, 16).T)
    assert sim[1, 1, 1, 2] > sim[1, 1, 3, 3]  # a neighbour is more alike than a far patch
    with pytest.raises(ConfigError, match="adds no position embedding"):
        pos_embed_similarity(_model("test_vit_modern"))
    # Features spread along one direction: the first component orders the tokens by it.
    t = torch.linspace(-1, 1, 12)
    feats = (t[:, None] * torch.tensor([3.0, 0, 0, 0]) + 0.01 * torch.randn(12, 4)).reshape(2, 6, 4)
    rgb = pca_rgb(feats)
    assert rgb.shape == (2, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].reshape(-1)
    assert torch.all(first.diff() > 0) and first[0] == 0 and first[-1] == 1


def test_plots_leave_pyplot_alone():
    # The raw rcParams entry: matplotlib.get_backend() itself would import pyplot to resolve it.
    code = (
        "import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend');"
        "b = raw(); import torch, vitkit;"
        "from vitkit.interpret.plots import overlay_figure, save_png, to_array;"
        "fig = overlay_figure(torch.zeros(3, 32, 32, dtype=torch.uint8), torch.rand(4, 4), 't');"
        "a = to_array(fig); assert a.ndim == 3 and a.shape[2] == 3, a.shape;"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; assert raw() == b, raw(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    m = vitkit.create_model("test_vit", num_classes=3)
    m.card = replace(m.card, labels=("circle", "square", "star"))
    path = vitkit.save_weights(m, root / "model.safetensors")
    images = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        img = Image.new("RGB", (40, 40), (90, 90, 90))
        img.paste(colour, (8 + 8 * i, 8, 28 + 8 * i, 28))
        images.append(root / f"img{i}.png")
        img.save(images[-1])
    return path, images


def test_explain_cli_writes_pngs_and_a_report(weights, tmp_path):
    path, images = weights
    out = _vitkit("explain", path, *images, "--out", tmp_path / "maps")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "maps" / "report.json").read_text())
    assert report["methods"] == ["rollout", "grad-rollout", "heads", "pos-embed", "patch-grid", "pca"]
    html = (tmp_path / "maps" / "index.html").read_text()
    for entry in report["images"]:
        assert entry["top"][0]["label"] in ("circle", "square", "star") and len(entry["top"]) == 3
        assert set(entry["maps"]) == {"rollout", "grad-rollout", "heads", "patch-grid", "pca"}
        for png in [entry["input"], *entry["maps"].values()]:
            with Image.open(tmp_path / "maps" / png) as im:
                assert im.format == "PNG" and min(im.size) >= 32
            assert png in html
        assert entry["top"][0]["label"] in html
    assert (tmp_path / "maps" / "pos_embed.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["missing.png"], "no such file: image missing.png"),
    (["{img}", "--method", "saliency"], "unknown method saliency"),
    (["{img}", "--discard-ratio", "1.5"], "--discard-ratio must be in [0, 1)"),
])
def test_explain_cli_bad_input_is_a_message(weights, tmp_path, args, message):
    path, images = weights
    out = _vitkit("explain", path, *[a.format(img=images[0]) for a in args], "--out", tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_explain_names_methods_a_model_cannot_show(tmp_path):
    m = vitkit.create_model("test_vit_modern", num_classes=3)
    path = vitkit.save_weights(m, tmp_path / "rope.safetensors")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (10, 200, 90)).save(img)
    out = _vitkit("explain", path, img, "--method", "pos-embed", "--out", tmp_path / "o")
    assert out.returncode == 2 and "adds no position embedding" in out.stderr and "Traceback" not in out.stderr
    out = _vitkit("explain", path, img, "--out", tmp_path / "o")
    assert out.returncode == 0 and "skipped pos-embed" in out.stdout, out.stderr
