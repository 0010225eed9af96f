"""Parity with timm and HF transformers: random peer weights, converted, give the same outputs.

Every case builds a tiny peer (2 blocks, width 64), randomises all of its parameters (peers
init biases to zero, which would hide a bias mapped to the wrong place), converts it with
``load_weights`` and compares float32 outputs in eval mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import lazy_peer
from helpers import max_diff as _max_diff
from helpers import perturb as _randomise

from vitkit import VisionTransformer, load_weights

timm = lazy_peer("timm")
transformers = lazy_peer("transformers")
needs_timm = pytest.mark.peer("timm")
needs_hf = pytest.mark.peer("transformers")

ATOL = 1e-5
TINY = dict(embed_dim=64, depth=2, num_heads=2)


def _vitkit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**kwargs).eval()


TIMM_CASES = {
    "cls_p16": dict(img_size=64, patch_size=16),
    "cls_p32": dict(img_size=64, patch_size=32),
    "gap_fc_norm": dict(img_size=64, patch_size=16, class_token=False, global_pool="avg", fc_norm=True),
    "registers": dict(img_size=64, patch_size=16, reg_tokens=4, no_embed_class=True),
    "layerscale": dict(img_size=56, patch_size=14, init_values=1e-5),
}


@needs_timm
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_vit(case):
    cfg = dict(TINY, num_classes=10, **TIMM_CASES[case])
    peer = _randomise(timm.models.vision_transformer.VisionTransformer(**cfg))
    ours = _vitkit(**cfg)
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert report.format == "timm" and not report.dropped and not report.resampled
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        assert _max_diff(ours(x), peer(x)) <= ATOL


@needs_timm
def test_timm_deit_distilled():
    cfg = dict(TINY, num_classes=10, img_size=64, patch_size=16)
    peer = _randomise(timm.models.deit.VisionTransformerDistilled(**cfg))
    ours = _vitkit(distilled=True, **cfg)
    load_weights(ours, peer.state_dict(), verbose=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(x)) <= ATOL


def _hf_config(cls_name: str, **kw):
    base = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
        patch_size=8, num_labels=10, layer_norm_eps=1e-6,
    )
    return getattr(transformers, cls_name)(**{**base, **kw})


@needs_hf
@pytest.mark.parametrize("layout", ["state_dict", "save_pretrained"])
def test_hf_vit_for_image_classification(layout, tmp_path):
    peer = _randomise(transformers.ViTForImageClassification(_hf_config("ViTConfig")))
    if layout == "save_pretrained":
        # Files on the hub keep the transformers 4 names (encoder.layer.N.attention.attention.query).
        peer.save_pretrained(tmp_path)
        source = tmp_path
    else:
        source = peer.state_dict()  # transformers 5 names (layers.N.attention.q_proj)
    ours = _vitkit(img_size=32, patch_size=8, num_classes=10, **TINY)
    assert load_weights(ours, source, verbose=False).format == "hf"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(pixel_values=x).logits) <= ATOL


@needs_hf
def test_hf_vit_default_eps_is_close():
    """Google's ViT configs use layer_norm_eps=1e-12; vitkit's LayerNorm uses 1e-6."""
    peer = _randomise(transformers.ViTForImageClassification(_hf_config("ViTConfig", layer_norm_eps=1e-12)))
    ours = _vitkit(img_size=32, patch_size=8, num_classes=10, **TINY)
    load_weights(ours, peer.state_dict(), verbose=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(pixel_values=x).logits) <= 1e-4


@needs_hf
def test_hf_vit_model_features_and_pooler_note():
    peer = _randomise(transformers.ViTModel(_hf_config("ViTConfig")))
    ours = _vitkit(img_size=32, patch_size=8, num_classes=0, **TINY)
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert any("pooler" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer(pixel_values=x).last_hidden_state) <= ATOL


@needs_hf
@pytest.mark.parametrize("layout", ["state_dict", "save_pretrained"])
def test_hf_deit_with_teacher(layout, tmp_path):
    peer = _randomise(transformers.DeiTForImageClassificationWithTeacher(_hf_config("DeiTConfig")))
    if layout == "save_pretrained":
        peer.save_pretrained(tmp_path)
    ours = _vitkit(img_size=32, patch_size=8, num_classes=10, distilled=True, **TINY)
    load_weights(ours, tmp_path if layout == "save_pretrained" else peer.state_dict(), verbose=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), peer(pixel_values=x).logits) <= ATOL


@needs_hf
def test_hf_deit_for_image_classification_class_token_head():
    peer = _randomise(transformers.DeiTForImageClassification(_hf_config("DeiTConfig")))
    ours = _vitkit(img_size=32, patch_size=8, num_classes=10, distilled=True, **TINY)
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert any("class token only" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = peer(pixel_values=x, output_hidden_states=True)
        feats = ours.forward_features(x)
        assert _max_diff(feats, peer.deit.layernorm(out.hidden_states[-1])) <= ATOL
        assert _max_diff(ours.head(feats[:, 0]), out.logits) <= ATOL


def _dinov2_pair(registers: int):
    """A randomised transformers Dinov2 model (with registers when asked) and the matching vitkit ViT."""
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    if registers:
        peer = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
        peer = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    ours = _vitkit(img_size=28, patch_size=14, init_values=1e-5, num_classes=0, reg_tokens=registers,
                   no_embed_class=bool(registers), **TINY)
    return _randomise(peer), ours


@needs_hf
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_model(registers):
    peer, ours = _dinov2_pair(registers)
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert report.format == "hf"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer(pixel_values=x).last_hidden_state) <= ATOL


def _official_dinov2(timm_sd: dict, reg: bool, chunked: bool) -> dict:
    """Write a timm DINOv2 state dict in facebookresearch/dinov2's layout."""
    sd = dict(timm_sd)
    if reg:
        # Official: pos_embed has a class row, registers have none; timm folds the class row in.
        cls_pos = torch.randn(1, 1, sd["cls_token"].shape[-1])
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if chunked:
        # Block chunks of 1 block each: blocks.<chunk>.<global index>.
        sd = {(f"blocks.{k.split('.')[1]}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v for k, v in sd.items()}
    return sd


@needs_timm
@pytest.mark.parametrize("reg,chunked", [(False, False), (True, False), (True, True)])
def test_dinov2_official_layout(reg, chunked):
    cfg = dict(TINY, img_size=28, patch_size=14, init_values=1e-5, num_classes=0)
    if reg:
        cfg.update(reg_tokens=4, no_embed_class=True)
    peer = _randomise(timm.models.vision_transformer.VisionTransformer(**cfg))
    official = _official_dinov2(peer.state_dict(), reg, chunked)
    ours = _vitkit(**cfg)
    report = load_weights(ours, official, verbose=False)
    assert report.format == "dinov2"
    assert any("mask_token" in n for n in report.notes)
    timm_sd = timm.models.vision_transformer.checkpoint_filter_fn(_official_dinov2(peer.state_dict(), reg, False), peer)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, timm_sd[k], rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer.forward_features(x)) <= ATOL


def _official_dinov2_from_hf(hf_sd: dict) -> dict:
    """transformers' Dinov2 state dict rewritten in facebookresearch/dinov2's names (dinov2/models/
    vision_transformer.py): fused ``attn.qkv``, ``ls1.gamma``, ``register_tokens``, a (1, D) ``mask_token``."""
    out = {}
    for k, v in hf_sd.items():
        k = k.removeprefix("dinov2.").removeprefix("dinov2_with_registers.")
        if k.startswith("embeddings."):
            name = {"cls_token": "cls_token", "mask_token": "mask_token", "register_tokens": "register_tokens",
                    "position_embeddings": "pos_embed"}.get(k.split(".", 1)[1])
            out[name or k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")] = v
        elif k.startswith("layernorm."):
            out[k.replace("layernorm", "norm")] = v
        elif k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            # transformers names q, k, v ``attention.attention.query`` (hub files) or ``attention.q_proj`` (newer).
            for q_name, names in (("attention.attention.query.", ("query", "key", "value")),
                                  ("attention.q_proj.", ("q_proj", "k_proj", "v_proj"))):
                if rest.startswith(q_name):
                    kind = rest.rsplit(".", 1)[1]
                    parts = [hf_sd[k.replace(f".{names[0]}.", f".{n}.")] for n in names]
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
            if rest.startswith(("attention.attention.", "attention.q_proj.", "attention.k_proj.", "attention.v_proj.")):
                continue
            for hf, official in (("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
                                 ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma")):
                rest = rest.replace(hf, official)
            out[f"blocks.{i}.{rest}"] = v
        else:
            raise AssertionError(f"unmapped HF key {k}")
    return out


@needs_hf
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_official_layout_against_transformers(registers):
    """The official layout written from transformers' Dinov2 by an explicit key map: same features as the peer."""
    peer, ours = _dinov2_pair(registers)
    official = _official_dinov2_from_hf(peer.state_dict())
    assert "mask_token" in official and ("register_tokens" in official) == bool(registers)
    report = load_weights(ours, official, verbose=False)
    assert report.format == "dinov2"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer(pixel_values=x).last_hidden_state) <= ATOL


def test_dinov2_fused_swiglu_splits_gate_rows_first():
    """Official SwiGLU: ``w12`` holds the gate rows, then the value rows; ``w3`` is the output."""
    cfg = dict(TINY, img_size=28, patch_size=14, init_values=1e-5, num_classes=0, mlp_layer="swiglu")
    ours = _vitkit(**cfg)
    official = {k: torch.randn_like(v) for k, v in ours.state_dict().items() if ".mlp." not in k}
    hidden = ours.blocks[0].mlp.fc2.in_features
    for i in range(2):
        official[f"blocks.{i}.mlp.w12.weight"] = torch.randn(2 * hidden, 64)
        official[f"blocks.{i}.mlp.w12.bias"] = torch.randn(2 * hidden)
        official[f"blocks.{i}.mlp.w3.weight"] = torch.randn(64, hidden)
        official[f"blocks.{i}.mlp.w3.bias"] = torch.randn(64)
    official["mask_token"] = torch.zeros(1, 64)
    load_weights(ours, official, verbose=False)
    for i in range(2):
        mlp = ours.blocks[i].mlp
        for kind in ("weight", "bias"):
            w12 = official[f"blocks.{i}.mlp.w12.{kind}"]
            assert torch.equal(getattr(mlp.fc1_g, kind), w12[:hidden])
            assert torch.equal(getattr(mlp.fc1_x, kind), w12[hidden:])
            assert torch.equal(getattr(mlp.fc2, kind), official[f"blocks.{i}.mlp.w3.{kind}"])


def _mae_sincos(embed_dim: int, grid: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), verbatim math."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape([2, 1, grid, grid])
    emb = np.concatenate([one_d(embed_dim // 2, g[0]), one_d(embed_dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@needs_timm
def test_mae_official_layout(tmp_path):
    cfg = dict(TINY, img_size=32, patch_size=8, num_classes=0)
    peer = _randomise(timm.models.vision_transformer.VisionTransformer(**cfg))
    with torch.no_grad():
        peer.pos_embed.copy_(torch.from_numpy(_mae_sincos(64, 4)).float()[None])
    ckpt = {
        "model": {
            **peer.state_dict(), "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
            "decoder_pos_embed": torch.zeros(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
            "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(192, 32),
        },
        "epoch": 799,
    }
    torch.save(ckpt, tmp_path / "mae_pretrain.pth")
    ours = _vitkit(**cfg)
    report = load_weights(ours, tmp_path / "mae_pretrain.pth", verbose=False)
    assert report.format == "mae" and any("decoder" in n for n in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours.forward_features(x), peer.forward_features(x)) <= ATOL
    # vitkit's fixed sin-cos table is MAE's, so the same checkpoint fits a pos_embed="sincos" model.
    fixed = _vitkit(pos_embed="sincos", **cfg)
    torch.testing.assert_close(fixed.pos_embed.data, peer.pos_embed.data, rtol=0, atol=1e-6)
    load_weights(fixed, tmp_path / "mae_pretrain.pth", verbose=False)
