"""load_weights / save_weights behaviour: sources, resampling, channel folding, heads, safety, hub cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import require_peer
from safetensors import safe_open
from safetensors.torch import save_file

import vitkit
from vitkit import VisionTransformer, create_model, load_weights, save_weights
from vitkit.convert import adapt_input_channels, resample_patch_kernel

TINY = dict(embed_dim=64, depth=1, num_heads=2)


class NotATensor:
    """A custom class inside a pickle: weights_only loading must refuse it."""


def _model(**kw) -> VisionTransformer:
    return VisionTransformer(**{**TINY, **kw}).eval()


def test_save_weights_round_trip_through_create_model(tmp_path):
    model = create_model("test_vit", num_classes=7).eval()
    path = save_weights(model, tmp_path / "run" / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "test_vit" and meta["vitkit_version"] == vitkit.__version__
    assert json.loads(meta["model_args"])["num_classes"] == 7
    assert json.loads(meta["card"])["num_classes"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    again = create_model(str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_save_weights_shared_tensors(tmp_path):
    model = create_model("test_deit_distilled").eval()
    model.head_dist = model.head  # tied heads share storage, which safetensors refuses as is
    path = save_weights(model, tmp_path / "tied.safetensors")
    again = create_model(str(path)).eval()
    torch.testing.assert_close(again.head_dist.weight, model.head.weight, rtol=0, atol=0)


def test_model_from_file_without_metadata(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not written by save_weights"):
        vitkit.create_model(str(tmp_path / "plain.safetensors"))


def _bicubic_rows(rows: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(1, H*W, C) grid rows resized by hand: as a (1, C, H, W) image, bicubic with antialiasing (timm's
    ``resample_abs_pos_embed`` default), back to rows."""
    C = rows.shape[-1]
    img = rows.reshape(1, *old, C).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new, mode="bicubic", align_corners=False, antialias=True)
    return img.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C)


def test_pos_embed_resampled_224_to_384(tmp_path):
    model = create_model("vit_tiny_patch32_224", depth=1, num_classes=5)
    path = save_weights(model, tmp_path / "w.safetensors")
    big = create_model(str(path), img_size=384)
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 192)
    pe = model.pos_embed.detach()
    expected = torch.cat([pe[:, :1], _bicubic_rows(pe[:, 1:], (7, 7), (12, 12))], dim=1)  # class row kept as is
    torch.testing.assert_close(big.pos_embed.detach(), expected, rtol=0, atol=0)
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 5)


def test_pos_embed_resampled_with_registers_and_no_embed_class():
    src = _model(img_size=32, patch_size=8, reg_tokens=2, no_embed_class=True)
    dst = _model(img_size=64, patch_size=8, reg_tokens=2, no_embed_class=True)
    report = load_weights(dst, src.state_dict(), verbose=False)
    assert report.resampled == ["pos_embed: grid (4, 4) -> (8, 8)"]
    expected = _bicubic_rows(src.pos_embed.detach(), (4, 4), (8, 8))  # no prefix rows with no_embed_class
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=0)


def test_prefix_pos_rows_fold_and_zero_pad_are_exact():
    """A class token with its own position row equals that token plus the row, without one."""
    with_rows = _model(img_size=32, patch_size=8, reg_tokens=2)
    without = _model(img_size=32, patch_size=8, reg_tokens=2, no_embed_class=True)
    back = _model(img_size=32, patch_size=8, reg_tokens=2)
    load_weights(without, with_rows.state_dict(), verbose=False)
    load_weights(back, without.state_dict(), verbose=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(without(x), with_rows(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(back(x), with_rows(x), rtol=0, atol=1e-5)


def test_patch_16_to_8():
    src = _model(img_size=64, patch_size=16, num_classes=3)
    dst = _model(img_size=64, patch_size=8, num_classes=3)
    report = load_weights(dst, src.state_dict(), verbose=False)
    assert dst.patch_embed.proj.weight.shape == (64, 3, 8, 8) and dst.pos_embed.shape == (1, 65, 64)
    assert len(report.resampled) == 2
    with torch.no_grad():
        assert dst(torch.randn(1, 3, 64, 64)).isfinite().all()


def test_flexivit_resize_keeps_the_projection():
    """Growing the patch 8 -> 16: the resized kernel on resized patches gives the same projection."""
    src = _model(img_size=32, patch_size=8)
    dst = _model(img_size=32, patch_size=16)
    load_weights(dst, src.state_dict(), verbose=False)
    w8 = src.patch_embed.proj.weight.detach()
    w16 = dst.patch_embed.proj.weight.detach()
    torch.testing.assert_close(w16, resample_patch_kernel(w8, (16, 16)))
    patch = torch.randn(4, 3, 8, 8)
    big = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(F.conv2d(big, w16, stride=16), F.conv2d(patch, w8, stride=8), rtol=0, atol=1e-5)


def test_in_chans_1_fold_equals_gray_replicated():
    rgb = _model(img_size=32, patch_size=8, num_classes=4)
    gray = _model(img_size=32, patch_size=8, num_classes=4, in_chans=1)
    report = load_weights(gray, rgb.state_dict(), verbose=False)
    assert report.resampled == ["patch_embed.proj.weight: in_chans 3 -> 1"]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-5)


def test_in_chans_tile_keeps_scale():
    w = torch.randn(8, 3, 4, 4)
    w5 = adapt_input_channels(w, 5)
    assert w5.shape == (8, 5, 4, 4)
    torch.testing.assert_close(w5[:, 3:], w[:, :2] * 3 / 5)


def test_num_classes_mismatch_drops_head(capsys):
    src = _model(img_size=32, patch_size=8, num_classes=1000)
    dst = _model(img_size=32, patch_size=8, num_classes=10)
    fresh = dst.head.weight.detach().clone()
    report = load_weights(dst, src.state_dict())
    msg = "head dropped: checkpoint has 1000 classes, model has 10; the new head is trained from scratch"
    assert report.dropped == [msg]
    assert msg in capsys.readouterr().out
    assert torch.equal(dst.head.weight, fresh)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_features_only_checkpoint_into_classifier():
    src = _model(img_size=32, patch_size=8, num_classes=0)
    dst = _model(img_size=32, patch_size=8, num_classes=10)
    report = load_weights(dst, src.state_dict(), verbose=False)
    assert any("no head (features only)" in n for n in report.notes)


def test_norm_loaded_as_fc_norm():
    src = _model(img_size=32, patch_size=8)
    dst = _model(img_size=32, patch_size=8, global_pool="avg")
    report = load_weights(dst, src.state_dict(), verbose=False)
    assert any("loaded as the model's 'fc_norm'" in n for n in report.notes)
    torch.testing.assert_close(dst.fc_norm.weight, src.norm.weight)


def test_pth_wrapped_and_prefixed(tmp_path):
    src = _model(img_size=32, patch_size=8)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3, "args": {"lr": 1e-3}}, tmp_path / "ckpt.pth")
    dst = _model(img_size=32, patch_size=8)
    report = load_weights(dst, tmp_path / "ckpt.pth", verbose=False)
    assert report.format == "timm"
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)


def test_dino_teacher_backbone(tmp_path):
    src = _model(img_size=32, patch_size=8, num_classes=0)
    teacher = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(16, 64)
    dst = _model(img_size=32, patch_size=8, num_classes=0)
    report = load_weights(dst, {"student": {}, "teacher": teacher}, verbose=False)
    assert any("'backbone.'" in n for n in report.notes)


def test_pth_with_custom_class_is_refused(tmp_path):
    torch.save({"model": _model(img_size=32, patch_size=8).state_dict(), "cfg": NotATensor()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_weights(_model(img_size=32, patch_size=8), tmp_path / "bad.pth")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown checkpoint format; first keys: features.0.weight"):
        load_weights(_model(img_size=32, patch_size=8), {"features.0.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    # A ResNet checkpoint is a known layout, but not a ViT's: the strict load names the keys.
    with pytest.raises(ValueError, match=r"detected format: timm.*missing from the checkpoint: blocks\.0.*not in the model: conv1"):
        load_weights(_model(img_size=32, patch_size=8), {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})


def test_strict_error_names_keys_and_format():
    src = _model(img_size=32, patch_size=8, depth=2)
    with pytest.raises(ValueError, match=r"detected format: timm.*not in the model: blocks\.1\."):
        load_weights(_model(img_size=32, patch_size=8), src.state_dict())
    report = load_weights(_model(img_size=32, patch_size=8), src.state_dict(), strict=False, verbose=False)
    assert report.unexpected and report.unexpected[0].startswith("blocks.1.")


def test_missing_source():
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_weights(_model(img_size=32, patch_size=8), "no/such/file.safetensors")


# ---------------------------------------------------------------------- hub cache (offline)
def test_create_model_pretrained_from_hub_cache(hub_cache):
    timm = require_peer("timm")
    peer = timm.create_model("vit_tiny_patch16_224", depth=1, pretrained=False).eval()
    snapshot = hub_cache(vitkit.get_model_card("vit_tiny_patch16_224").hub_id)
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, snapshot / "model.safetensors")
    ours = create_model("vit_tiny_patch16_224", pretrained=True, depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-5)


def test_hf_repo_id_from_hub_cache(hub_cache):
    src = _model(img_size=32, patch_size=8)
    snapshot = hub_cache("google/vit-tiny-test")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "vit"}))
    torch.save(src.state_dict(), snapshot / "pytorch_model.bin")  # older repos ship only the .bin
    dst = _model(img_size=32, patch_size=8)
    report = load_weights(dst, "google/vit-tiny-test", verbose=False)
    assert report.source == "hub:google/vit-tiny-test"
    torch.testing.assert_close(dst.cls_token, src.cls_token)


def test_hub_repo_not_cached(hub_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        load_weights(_model(img_size=32, patch_size=8), "facebook/not-cached")


def test_flattened_linear_patch_projection():
    """Early ViT ports store the patch projection as a Linear over flattened (C, P, P) patches."""
    src = _model(img_size=32, patch_size=8)
    sd = dict(src.state_dict())
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(64, -1)
    dst = _model(img_size=32, patch_size=8)
    load_weights(dst, sd, verbose=False)
    torch.testing.assert_close(dst.patch_embed.proj.weight, src.patch_embed.proj.weight, rtol=0, atol=0)
