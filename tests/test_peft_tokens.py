"""VPT (shallow and deep) and AdaptFormer against references written here from the papers' equations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model
from vitkit.errors import ConfigError
from vitkit.peft.adaptformer import apply_adaptformer
from vitkit.peft.config import PeftConfig
from vitkit.peft.vpt import apply_vpt


def _model(name: str, **kw):
    torch.manual_seed(0)
    return create_model(name, num_classes=5, **kw).eval()


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- VPT references
def _vpt_reference(base, prompts: torch.Tensor, x: torch.Tensor, deep: bool, keep_block: int | None = None):
    """VPT's forward from the paper on an untouched copy of the base: prompts concatenated after
    the prefix tokens; deep replaces the previous block's prompt outputs at every block.
    Returns (logits, image tokens after ``keep_block``)."""
    tokens, _ = base.embed(x)
    npt, P = base.num_prefix_tokens, prompts.shape[1]
    B = x.shape[0]
    h = torch.cat([tokens[:, :npt], prompts[0:1].expand(B, -1, -1), tokens[:, npt:]], dim=1)
    kept = None
    for i, blk in enumerate(base.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :npt], prompts[i:i + 1].expand(B, -1, -1), h[:, npt + P:]], dim=1)
        h = blk(h, None, npt, None)
        if i == keep_block:
            kept = torch.cat([h[:, :npt], h[:, npt + P:]], dim=1)
    h = torch.cat([h[:, :npt], h[:, npt + P:]], dim=1)
    return base.forward_head(base.norm(h)), kept


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("name", ["test_vit", "test_vit_reg", "test_vit_gap", "test_deit_distilled"])
def test_vpt_matches_paper_reference(name, deep):
    model = _model(name)
    base = copy.deepcopy(model)
    names = apply_vpt(model, PeftConfig(method="vpt_deep" if deep else "vpt_shallow", vpt_prompts=3), deep=deep)
    assert names == ["vpt.prompts"]
    prompts = model.vpt.prompts
    assert prompts.shape == ((2 if deep else 1), 3, 64)
    x = _images()
    with torch.no_grad():
        ref, _ = _vpt_reference(base, prompts, x, deep)
        out = model(x)
        plain = base(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert not torch.allclose(out, plain, atol=1e-4)  # the prompts are attended to


def test_vpt_zero_prompts_keep_layout_but_still_attend():
    model = _model("test_vit_reg")
    base = copy.deepcopy(model)
    apply_vpt(model, PeftConfig(method="vpt_shallow", vpt_prompts=4), deep=False)
    with torch.no_grad():
        model.vpt.prompts.zero_()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    model.norm.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    x = _images()
    with torch.no_grad():
        feats, plain = model.forward_features(x), base.forward_features(x)
    n = plain.shape[1]
    # Inside the blocks the sequence is [prefix][4 prompts][patches]; the final norm sees the base layout.
    assert seen == [n + 4, n]
    assert feats.shape == plain.shape
    assert not torch.allclose(feats, plain, atol=1e-4)  # zero prompts are still keys and values


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_intermediates_are_image_tokens(deep):
    model = _model("test_vit")
    base = copy.deepcopy(model)
    apply_vpt(model, PeftConfig(vpt_prompts=2), deep=deep)
    x = _images()
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", return_prefix_tokens=True)
        _, base_feats = base.forward_intermediates(x, indices=[0, 1], output_fmt="NLC")
        _, kept = _vpt_reference(base, model.vpt.prompts, x, deep, keep_block=0)
        pyr = model.forward_intermediates(x, pyramid=True, intermediates_only=True)
    assert [f.shape for f, _ in feats] == [f.shape for f in base_feats]
    assert feats[0][1].shape[1] == 1  # the class token only, no prompts among the prefix
    assert torch.allclose(feats[0][0], kept[:, 1:], atol=1e-5)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert len(pyr) == 4


def test_vpt_init_bound_names_and_gradients():
    model = _model("test_vit")
    apply_vpt(model, PeftConfig(vpt_prompts=10), deep=True)
    p = model.vpt.prompts
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 64))  # VPT's xavier-uniform over patch 8x8 and width 64
    assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
    assert p.numel() == 2 * 10 * 64
    assert "vpt.prompts" in dict(model.named_parameters())
    assert not any(".block." in k for k in model.state_dict())  # base keys did not move
    model.train()
    model(_images()).sum().backward()
    assert p.grad is not None and p.grad[0].abs().sum() > 0 and p.grad[1].abs().sum() > 0


def test_vpt_dropout_per_sample_and_checkpointing():
    model = _model("test_vit")
    apply_vpt(model, PeftConfig(vpt_prompts=3, vpt_dropout=0.5), deep=True)
    x = _images(1).expand(2, -1, -1, -1)
    model.train()
    torch.manual_seed(3)
    out = model(x)
    assert not torch.allclose(out[0], out[1])  # each sample draws its own prompt dropout mask
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        assert torch.allclose(model(x), ref)
    model.train()
    model.vpt.dropout.p = 0.0
    model(x).sum().backward()  # recomputation runs the hooks again
    assert model.vpt.prompts.grad is not None


def test_vpt_deepcopy_uses_its_own_prompts():
    model = _model("test_vit")
    apply_vpt(model, PeftConfig(vpt_prompts=2), deep=False)
    twin = copy.deepcopy(model)  # as an EMA copy is made
    x = _images()
    with torch.no_grad():
        before = model(x)
        twin.vpt.prompts.mul_(3.0)
        assert torch.equal(model(x), before)
        assert not torch.allclose(twin(x), before, atol=1e-4)
        _, feats = twin.forward_intermediates(x, indices=[0])
    assert feats[0].shape == (2, 64, 4, 4)


@pytest.mark.parametrize("name,why", [
    ("test_swin", "not a VisionTransformer"), ("test_vit_modern", "RoPE"), ("test_vitdet", "windowed"),
])
def test_vpt_refuses_models_it_does_not_fit(name, why):
    with pytest.raises(ConfigError, match=why):
        apply_vpt(_model(name), PeftConfig(), deep=True)


def test_vpt_refuses_attention_bias_clearly():
    model = _model("test_vit")
    apply_vpt(model, PeftConfig(vpt_prompts=2), deep=True)
    tokens, ctx = model.embed(_images())
    bias = torch.zeros(2, 1, 1, tokens.shape[1])
    with pytest.raises(ValueError, match="attention bias"):
        model.blocks[0](tokens, None, ctx.num_prefix_tokens, bias)


# ---------------------------------------------------------------------- AdaptFormer
def _adapter_ref(adapter, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The paper's parallel adapter: s * up(relu(down(x)))."""
    h = F.relu(F.linear(x, adapter.down.weight, adapter.down.bias))
    return scale * F.linear(h, adapter.up.weight, adapter.up.bias)


def _randomise_up(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter.up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("name", ["test_vit", "test_vit_postnorm", "test_swin", "test_swinv2", "test_vit_moe"])
def test_adaptformer_equals_base_at_init(name):
    model = _model(name)
    base = copy.deepcopy(model)
    apply_adaptformer(model, PeftConfig(method="adaptformer", adapter_width=16))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(model(x), base(x), atol=1e-6)
    _randomise_up(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x), atol=1e-4)


def test_adaptformer_matches_paper_equation_vit():
    # LayerScale on, so the reference shows the adapter sits outside ls2 (and drop path).
    model = _model("test_vit_reg", init_values=0.5)
    base = copy.deepcopy(model)
    apply_adaptformer(model, PeftConfig(adapter_width=8, adapter_scale=0.3))
    _randomise_up(model)
    x = _images()
    with torch.no_grad():
        h, _ = base.embed(x)
        npt = base.num_prefix_tokens
        for blk, ablk in zip(base.blocks, model.blocks):
            h = h + blk.ls1(blk.attn(blk.norm1(h), None, npt, None))
            # x~ = MLP(LN(x')) + s * ReLU(x' W_down) W_up + x'  (AdaptFormer, parallel)
            h = h + blk.ls2(blk.mlp(blk.norm2(h))) + _adapter_ref(ablk.adapter, h, 0.3)
        ref = base.forward_head(base.norm(h))
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_adaptformer_matches_paper_equation_swin():
    model = _model("test_swin")
    base = copy.deepcopy(model)
    apply_adaptformer(model, PeftConfig(adapter_width=8))
    _randomise_up(model)
    x = _images()
    adapted = {id(b): a for b, a in zip(base.block_modules(), model.block_modules())}
    with torch.no_grad():
        for blk in base.block_modules():
            ablk = adapted[id(blk)]
            blk.register_forward_hook(
                lambda m, args, out, a=ablk: out + _adapter_ref(a.adapter, args[0] + m._attn(m.norm1(args[0])), 0.1)
            )
        ref = base(x)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_adaptformer_counts_vit_tiny_and_swin_tiny():
    vit = create_model("vit_tiny_patch16_224", num_classes=10)
    names = apply_adaptformer(vit, PeftConfig(adapter_width=64))
    params = dict(vit.named_parameters())
    assert sum(params[n].numel() for n in names) == 12 * (2 * 192 * 64 + 64 + 192) == 297_984
    assert names[:4] == ["blocks.0.adapter.down.weight", "blocks.0.adapter.down.bias",
                         "blocks.0.adapter.up.weight", "blocks.0.adapter.up.bias"]
    assert "blocks.0.mlp.fc1.weight" in params  # base keys did not move
    swin = create_model("swin_tiny_patch4_window7_224", num_classes=10)
    names = apply_adaptformer(swin, PeftConfig(adapter_width=64))
    params = dict(swin.named_parameters())
    # depths (2, 2, 6, 2) at widths (96, 192, 384, 768), 2 * D * 64 + 64 + D each
    assert sum(params[n].numel() for n in names) == 24_896 + 49_664 + 297_600 + 198_272 == 570_432
    assert all(".blocks." in n and ".adapter." in n for n in names)


def test_adaptformer_gradients_and_deepcopy():
    model = _model("test_vit")
    apply_adaptformer(model, PeftConfig(adapter_width=8))
    model.train()
    model(_images()).sum().backward()
    up = model.blocks[1].adapter.up.weight
    assert up.grad is not None and up.grad.abs().sum() > 0
    twin = copy.deepcopy(model).eval()
    model.eval()
    _randomise_up(twin)
    x = _images()
    with torch.no_grad():
        assert not torch.allclose(twin(x), model(x), atol=1e-4)  # the copy runs its own adapters


@pytest.mark.parametrize("name", ["test_resnet", "test_pvt_v2"])
def test_adaptformer_refuses_unknown_blocks(name):
    with pytest.raises(ConfigError, match="AdaptFormer knows Block, SwinBlock"):
        apply_adaptformer(_model(name), PeftConfig())


def test_adaptformer_refuses_twice():
    model = _model("test_vit")
    apply_adaptformer(model, PeftConfig())
    with pytest.raises(ConfigError, match="already"):
        apply_adaptformer(model, PeftConfig())
