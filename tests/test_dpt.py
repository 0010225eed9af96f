"""DPT: the head on vitkit backbones, and parity with transformers' DPTForDepthEstimation /
DPTForSemanticSegmentation through ``convert_hf_dpt`` (random, perturbed peer weights, strict load)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb

import vitkit
from vitkit.dense import head_entry
from vitkit.dense.convert_dpt import convert_hf_dpt
from vitkit.dense.heads.dpt import DPTHead, default_layers, default_neck_chans
from vitkit.errors import ConfigError

transformers = lazy_peer("transformers")
needs_hf = pytest.mark.peer("transformers")
ATOL = 1e-5

# A tiny DPT: 4 blocks of width 32 at patch 8 on 32 px, every block read, small neck and fusion.
TINY_HF = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
    backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, num_labels=5,
    layer_norm_eps=1e-6,
)


def _hf(cls_name: str, scale: float = 0.1, **kw):
    cfg = transformers.DPTConfig(**{**TINY_HF, **kw})
    return perturb(getattr(transformers, cls_name)(cfg), scale=scale)


def _build(model_args: dict, state_dict: dict):
    """vitkit's backbone and DPT head from ``convert_hf_dpt``'s output, each loaded strictly."""
    assert all(k.startswith(("backbone.", "head.")) for k in state_dict)
    backbone = vitkit.create_model(
        model_args["backbone"], num_classes=0, img_size=model_args["img_size"], in_chans=model_args["in_chans"],
        **model_args["backbone_args"],
    ).eval()
    out_chans = model_args["num_classes"] or 1
    head = DPTHead(backbone, out_chans, **model_args["head_args"]).eval()
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")})
    head.load_state_dict({k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")})
    return backbone, head


def test_registered_for_segment_and_depth():
    assert head_entry("dpt", "segment").cls is DPTHead
    assert head_entry("dpt", "depth").cls is DPTHead


def test_dpt_defaults():
    """DPT's hooks and per-level channels for ViT-B/16 and ViT-L/16."""
    assert default_layers(12) == [2, 5, 8, 11]
    assert default_layers(24) == [5, 11, 17, 23]
    assert default_neck_chans(768) == [96, 192, 384, 768]
    assert default_neck_chans(1024) == [256, 512, 1024, 1024]


# ---------------------------------------------------------------------- parity with transformers
@needs_hf
@pytest.mark.parametrize("readout", ["project", "add", "ignore"])
def test_hf_depth_parity(readout):
    peer = _hf("DPTForDepthEstimation", readout_type=readout)
    notes: list[str] = []
    model_args, sd = convert_hf_dpt(peer.state_dict(), peer.config, notes)
    assert model_args["task"] == "depth" and model_args["head"] == "dpt"
    assert model_args["head_args"]["readout"] == readout
    backbone, head = _build(model_args, sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = peer(pixel_values=x).predicted_depth  # (B, H, W)
        ours = head(backbone, x)  # (B, 1, H, W)
    assert ours.shape == (2, 1, 64, 64) and ref.shape == (2, 64, 64)
    assert (ref > 0).float().mean() > 0.5  # the final ReLU must not hide the comparison
    assert max_diff(ours[:, 0], ref) <= ATOL


@needs_hf
@pytest.mark.parametrize("fusion_bn", [True, False])
def test_hf_segmentation_parity(fusion_bn):
    peer = _hf("DPTForSemanticSegmentation", use_batch_norm_in_fusion_residual=fusion_bn)
    notes: list[str] = []
    model_args, sd = convert_hf_dpt(peer.state_dict(), peer.config, notes)
    assert model_args["task"] == "segment" and model_args["num_classes"] == 5
    assert model_args["head_args"]["fusion_bn"] is fusion_bn
    assert any("auxiliary_head" in n for n in notes)
    assert not any(k.startswith("auxiliary_head") for k in sd)
    backbone, head = _build(model_args, sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = peer(pixel_values=x).logits
        ours = head(backbone, x)
    assert ours.shape == ref.shape == (2, 5, 64, 64)
    assert max_diff(ours, ref) <= ATOL


@needs_hf
@pytest.mark.parametrize("size", [(48, 48), (64, 64), (16, 16)])
def test_hf_depth_parity_at_another_size(size):
    """At sizes other than the config's 32 px (a 4x4 grid; a larger and a smaller grid; transformers takes square inputs only) the
    converted model alone matches transformers: the ViT resamples its position embedding bilinearly,
    as transformers does (``pos_embed_interp="bilinear"`` in the converted backbone_args)."""
    peer = _hf("DPTForDepthEstimation")
    model_args, sd = convert_hf_dpt(peer.state_dict(), peer.config)
    assert model_args["backbone_args"]["pos_embed_interp"] == "bilinear"
    backbone, head = _build(model_args, sd)
    assert backbone.patch_embed.grid_size == (4, 4)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = peer(pixel_values=x).predicted_depth
        ours = head(backbone, x)[:, 0]
        # The default bicubic resampling is measurably different: the test would catch a lost option.
        bicubic, _ = _build({**model_args, "backbone_args": {**model_args["backbone_args"], "pos_embed_interp": "bicubic"}}, sd)
        other = head(bicubic, x)[:, 0]
    assert ours.shape == ref.shape == (2, 2 * size[0], 2 * size[1])
    assert max_diff(ours, ref) <= ATOL
    assert max_diff(other, ref) > 10 * ATOL


@needs_hf
def test_hf_depth_with_projection_parity():
    """transformers' add_projection (a 3x3 conv + ReLU before the head; it hard-codes 256 channels)."""
    peer = _hf("DPTForDepthEstimation", scale=0.02, fusion_hidden_size=256, add_projection=True)
    model_args, sd = convert_hf_dpt(peer.state_dict(), peer.config)
    assert model_args["head_args"]["depth_projection"] is True
    backbone, head = _build(model_args, sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = peer(pixel_values=x).predicted_depth
        ours = head(backbone, x)[:, 0]
    assert (ref > 0).float().mean() > 0.3
    assert max_diff(ours, ref) <= ATOL * max(1.0, ref.abs().max().item())


@needs_hf
def test_hf_segmentation_files_and_json_config(tmp_path):
    """A save_pretrained folder: the safetensors file and config.json as a plain dict convert too."""
    from safetensors.torch import load_file

    peer = _hf("DPTForSemanticSegmentation", use_batch_norm_in_fusion_residual=True, backbone_out_indices=[0, 1, 2, 3])
    peer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model_args, sd = convert_hf_dpt(load_file(tmp_path / "model.safetensors"), config)
    backbone, head = _build(model_args, sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(head(backbone, x), peer(pixel_values=x).logits) <= ATOL


@needs_hf
def test_hf_unsupported_layouts_are_clear_errors():
    peer = _hf("DPTForDepthEstimation")
    with pytest.raises(ConfigError, match="hybrid"):
        convert_hf_dpt(peer.state_dict(), {**peer.config.to_dict(), "is_hybrid": True})
    with pytest.raises(ConfigError, match="head_in_index"):
        convert_hf_dpt(peer.state_dict(), {**peer.config.to_dict(), "head_in_index": 1})
    with pytest.raises(ConfigError, match="no head.head"):
        convert_hf_dpt({k: v for k, v in peer.state_dict().items() if not k.startswith("head.")}, peer.config)


# ---------------------------------------------------------------------- the head on vitkit backbones
def _vit(name: str = "test_vit", **kw):
    return vitkit.create_model(name, num_classes=0, **kw)


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (40, 40)])
def test_head_shapes_and_stride(size):
    """Output at 16 / patch of the input (patch 8: twice), non-square and odd grids (5x5) included."""
    backbone = _vit().eval()
    head = DPTHead(backbone, 4, features=16).eval()
    assert head.output_stride == 0.5
    with torch.no_grad():
        out = head(backbone, torch.randn(2, 3, *size))
    assert out.shape == (2, 4, size[0] * 2, size[1] * 2)


def test_head_gradients_reach_every_parameter():
    torch.manual_seed(0)
    backbone = _vit().train()
    head = DPTHead(backbone, 3, features=16).train()  # segmentation, readout project, BN fusion
    out = head(backbone, torch.randn(2, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in [*backbone.named_parameters(prefix="backbone"), *head.named_parameters(prefix="head")]:
        if name.startswith("backbone.norm."):
            assert p.grad is None  # DPT reads the blocks' outputs before the final norm, as the paper does
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_depth_head_is_non_negative():
    torch.manual_seed(0)
    backbone = _vit().eval()
    head = DPTHead(backbone, 1, features=16).eval()
    assert head.task == "depth"
    with torch.no_grad():
        depth = head(backbone, torch.randn(2, 3, 32, 32))
    assert depth.shape == (2, 1, 64, 64)
    assert (depth >= 0).all() and (depth > 0).any()


def test_readout_choices():
    torch.manual_seed(0)
    gap = _vit("test_vit_gap")
    assert DPTHead(gap, 3, features=16).readout == "ignore"  # no class token: nothing to read out
    with pytest.raises(ConfigError, match="readout='ignore'"):
        DPTHead(gap, 3, features=16, readout="project")
    # A distilled ViT's "add" readout averages its class and distillation tokens, as DPT's does.
    deit = _vit("test_deit_distilled").eval()
    head = DPTHead(deit, 2, features=16, readout="add").eval()
    assert head.readout_tokens == 2
    with torch.no_grad():
        assert head(deit, torch.randn(1, 3, 32, 32)).shape == (1, 2, 64, 64)
    with pytest.raises(ConfigError, match="readout"):
        DPTHead(_vit(), 3, readout="mean")


def test_project_readout_matches_the_paper_formula():
    """project: Linear+GELU of [patch token, class token] per patch, computed here from the tokens."""
    torch.manual_seed(0)
    backbone = _vit().eval()
    head = DPTHead(backbone, 3, features=16, layers=[0, 1, 1, 1]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.forward_intermediates(x, indices=[0], intermediates_only=True, output_fmt="NLC",
                                                return_prefix_tokens=True)[0]
        patches, prefix = tokens  # (1, 16, 64), (1, 1, 64)
        lin = head.reassemble[0].readout[0]
        cat = torch.cat([patches, prefix.expand(-1, patches.shape[1], -1)], dim=-1)
        expect = torch.nn.functional.gelu(cat @ lin.weight.T + lin.bias).transpose(1, 2).reshape(1, 64, 4, 4)
        level = head.reassemble[0]
        expect = level.conv(level.resample(level.proj(expect)))
        got = head._levels(backbone, x)[0]
    assert max_diff(got, expect) <= 1e-6


@pytest.mark.parametrize("name", ["test_swin", "test_convnext"])
def test_hierarchical_backbone(name):
    """Four pyramid maps straight into the fusion: output at a quarter of the finest map's stride."""
    backbone = _vit(name).eval()
    head = DPTHead(backbone, 3, features=16).eval()
    stride = backbone.pyramid_info()[0]["reduction"] / 4
    assert head.output_stride == stride and not any(n.startswith("reassemble.0.proj.") for n, _ in head.named_parameters())
    with torch.no_grad():
        out = head(backbone, torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 3, round(32 / stride), round(32 / stride))
    with pytest.raises(ConfigError, match="hierarchical"):
        DPTHead(backbone, 3, layers=[0, 1, 2, 3])


def test_bad_arguments_are_clear_errors():
    backbone = _vit()
    with pytest.raises(ConfigError, match="out of range"):
        DPTHead(backbone, 3, layers=[0, 1, 2, 7])
    with pytest.raises(ConfigError, match="one of each per layer"):
        DPTHead(backbone, 3, layers=[0, 1, 1], neck_chans=[8, 16, 32, 64])
    with pytest.raises(ConfigError, match="task"):
        DPTHead(backbone, 3, task="detect")
    with pytest.raises(ConfigError, match="whole number"):
        DPTHead(backbone, 3, resample=(3.5, 2, 1, 0.5))
    cait = _vit("test_cait")
    head = DPTHead(cait, 3, features=16)  # CaiT's blocks carry no class token: only found at run time
    with pytest.raises(ConfigError, match="readout='ignore'"):
        head(cait, torch.randn(1, 3, 32, 32))
