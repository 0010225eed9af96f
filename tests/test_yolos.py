"""YOLOS: parity with transformers' YolosForObjectDetection (weights through ``convert_hf_yolos``, at the
config's size and, through the resampled position embeddings, at others), its loss against
transformers' DETR loss, training on a fixed batch, and starting the backbone from ViT weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import lazy_peer, max_diff, perturb

from vitkit import create_model
from vitkit.detect import create_detector, detector_entry
from vitkit.detect.convert_yolos import convert_hf_yolos
from vitkit.detect.yolos import YOLOS
from vitkit.errors import ConfigError

transformers = lazy_peer("transformers")


def _needs_set_loss() -> None:
    # DETR's criterion, matcher and postprocess are vitkit.detect's own modules, merged beside this one.
    for mod in ("vitkit.detect.criterion", "vitkit.detect.matcher", "vitkit.detect.postprocess"):
        pytest.importorskip(mod, reason=f"{mod} is not on this branch yet")


def _hf_yolos(mid: bool, eps: float = 1e-12):
    torch.manual_seed(0)
    cfg = transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[64, 96],
        patch_size=16, num_detection_tokens=10, num_labels=3, use_mid_position_embeddings=mid, layer_norm_eps=eps,
    )
    return perturb(transformers.YolosForObjectDetection(cfg), scale=0.1)


def _converted(peer):
    notes = []
    model_args, sd = convert_hf_yolos(peer.state_dict(), peer.config, notes)
    model = create_detector(**model_args)
    model.load_state_dict(sd, strict=True)
    return model.eval(), model_args


@pytest.mark.peer
@pytest.mark.parametrize("mid", [False, True])
def test_hf_parity_at_config_and_other_sizes(mid):
    peer = _hf_yolos(mid)
    model, model_args = _converted(peer)
    assert model_args["num_classes"] == 3 and model_args["num_det_tokens"] == 10
    assert model_args["use_mid_position_embeddings"] is mid and model_args["pe_size"] == [64, 96]
    assert (model.mid_pos_embed is not None) is mid
    g = torch.Generator().manual_seed(1)
    # The config's size, then others whose grids differ from it (the resampling path), both orientations.
    for size in ((64, 96), (96, 64), (48, 128)):
        x = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            ref = peer(pixel_values=x)
            out = model(x)
        assert out["pred_logits"].shape == (2, 10, 4) and out["pred_boxes"].shape == (2, 10, 4)
        assert max_diff(out["pred_logits"], ref.logits) < 1e-5, size
        assert max_diff(out["pred_boxes"], ref.pred_boxes) < 1e-5, size


@pytest.mark.peer
def test_hf_parity_needs_the_configs_layer_norm_eps():
    # transformers' YOLOS configs say 1e-12 (the reference ViT: 1e-6); the converter carries it over,
    # and a model left at 1e-6 would not match: the parity above is not blind to the norms.
    peer = _hf_yolos(False, eps=1e-12)
    model, model_args = _converted(peer)
    assert model_args["layer_norm_eps"] == 1e-12
    assert all(m.eps == 1e-12 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-1
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert max_diff(model(x)["pred_logits"], peer(pixel_values=x).logits) > 1e-4


@pytest.mark.peer
def test_loss_equals_transformers_detr_loss():
    _needs_set_loss()
    peer = _hf_yolos(True)
    model, _ = _converted(peer)
    g = torch.Generator().manual_seed(2)
    h, w = 64, 96
    x = torch.randn(2, 3, h, w, generator=g)
    xyxy = [torch.tensor([[4.0, 8.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]]), torch.tensor([[10.0, 12.0, 30.0, 28.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    hf_labels = [
        {"class_labels": lab, "boxes": torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1) / scale}
        for b, lab in zip(xyxy, labels)
    ]
    targets = [{"boxes": b, "labels": lab, "size": torch.tensor([h, w])} for b, lab in zip(xyxy, labels)]
    with torch.no_grad():
        ref = peer(pixel_values=x, labels=hf_labels)
        got = model.loss(model(x), targets)
    assert abs(got["loss"].item() - ref.loss.item()) < 1e-5
    for part, weight in (("loss_ce", 1.0), ("loss_bbox", 5.0), ("loss_giou", 2.0)):
        assert abs(got[part].item() - weight * ref.loss_dict[part].item()) < 1e-5, part


@pytest.mark.peer
def test_converter_takes_config_json_and_rejects_what_it_cannot_convert():
    peer = _hf_yolos(True)
    sd = peer.state_dict()
    args_obj, _ = convert_hf_yolos(sd, peer.config)
    args_json, _ = convert_hf_yolos(sd, json.loads(json.dumps(peer.config.to_dict())))
    assert args_json == args_obj
    assert args_obj["backbone_args"]["embed_dim"] == 32 and args_obj["backbone_args"]["mlp_ratio"] == 2.0
    with pytest.raises(ConfigError, match="no class_labels_classifier"):
        convert_hf_yolos({k: v for k, v in sd.items() if k.startswith("vit.")}, peer.config)
    with pytest.raises(ConfigError, match="gelu"):
        convert_hf_yolos(sd, {**peer.config.to_dict(), "hidden_act": "relu"})


def _tiny(**kw) -> YOLOS:
    torch.manual_seed(0)
    args = dict(num_det_tokens=8, pe_size=(32, 48))
    args.update(kw)
    return create_detector("yolos", "test_vit", num_classes=3, **args)


def test_registered_with_the_papers_backbone_and_rebuilds_from_model_args():
    assert detector_entry("yolos").cls is YOLOS
    assert detector_entry("yolos").default_backbone == "vit_tiny_patch16_224"
    model = _tiny(use_mid_position_embeddings=True, backbone_args={"depth": 3})
    again = create_detector(**json.loads(json.dumps(model.model_args)))  # run configs store them as JSON/YAML
    assert again.model_args == model.model_args
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)["pred_logits"], model.eval()(x)["pred_logits"])
    assert len(model.backbone.blocks) == 3 and model.mid_pos_embed.shape == (2, 1, 1 + 4 * 6 + 8, 64)
    assert {"det_token", "det_pos_embed", "mid_pos_embed", "backbone.pos_embed"} <= model.no_weight_decay()


def test_any_input_size_is_padded_to_the_patch():
    model = _tiny().eval()
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 6, 0, 3)))  # 40 x 56: the next multiple of the 8-pixel patch
    assert out["pred_logits"].shape == (2, 8, 4) and out["pred_boxes"].shape == (2, 8, 4)
    assert torch.equal(out["pred_logits"], padded["pred_logits"])
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_rejects_backbones_it_cannot_run_on():
    with pytest.raises(ConfigError, match="learned position embeddings"):
        create_detector("yolos", "test_vit_modern", num_classes=2, pe_size=32)
    with pytest.raises(ConfigError, match="plain ViT"):
        create_detector("yolos", "test_swin", num_classes=2)
    with pytest.raises(ConfigError, match="detection token"):
        create_detector("yolos", "test_vit", num_classes=2, num_det_tokens=0)


def _reference_regrid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """YOLOS's finetune_det: class row kept, patch rows resampled bicubic (align_corners=False, no antialias)."""
    grid = pos[:, 1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("how", ["pretrained", "load_backbone", "module"])
def test_backbone_starts_from_vit_weights(how):
    # A classifier of the backbone's kind (as the user's own pretraining leaves one), 32 px: a 4x4 grid.
    torch.manual_seed(3)
    vit = perturb(create_model("test_vit", num_classes=10), scale=0.05)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    if how == "pretrained":
        model = _tiny(pretrained=sd)
    elif how == "load_backbone":
        model = _tiny()
        model.load_backbone(sd)
    else:
        model = create_detector("yolos", vit, num_classes=3, num_det_tokens=8, pe_size=(32, 48))
    got = model.backbone.state_dict()
    assert not any(k.startswith("head") and got[k].numel() for k in got)  # the classifier is not part of YOLOS
    for k, v in sd.items():
        if k.startswith("head"):
            continue
        if k == "pos_embed":
            assert torch.allclose(got[k], _reference_regrid(v, (4, 4), (4, 6)), atol=1e-6)
        else:
            assert torch.equal(got[k], v), k
    assert model.model_args["backbone"] == "test_vit"


def test_train_steps_reduce_loss():
    _needs_set_loss()
    model = _tiny(num_det_tokens=6).train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 48, generator=g)
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [24.0, 4.0, 46.0, 14.0]]), "labels": torch.tensor([0, 2]),
         "size": torch.tensor([32, 48])},
        {"boxes": torch.tensor([[10.0, 6.0, 30.0, 30.0]]), "labels": torch.tensor([1]), "size": torch.tensor([32, 48])},
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(25):
        out = model.loss(model(x), targets)
        assert {"loss", "loss_ce", "loss_bbox", "loss_giou"} <= set(out)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_postprocess_gives_pixel_boxes_best_first():
    _needs_set_loss()
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 48)
    sizes = torch.tensor([[32, 48], [30, 40]])
    with torch.no_grad():
        outputs = model(x)
        dets = model.postprocess(outputs, sizes, top_k=5)
    assert len(dets) == 2
    prob = outputs["pred_logits"].softmax(-1)[..., :-1]
    for i, d in enumerate(dets):
        assert d["boxes"].shape == (5, 4) and d["scores"].shape == (5,) and d["labels"].dtype == torch.int64
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        # The best detection: DETR's rule (max over object classes of the softmax) and the box in pixels.
        q = prob[i].max(-1).values.argmax()
        assert torch.isclose(d["scores"][0], prob[i, q].max())
        cx, cy, bw, bh = outputs["pred_boxes"][i, q]
        h, w = sizes[i].tolist()
        want = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        assert torch.allclose(d["boxes"][0], want, atol=1e-4)


@pytest.mark.parametrize("name", ["test_vit_reg", "test_deit_distilled", "test_vit_gap"])
def test_other_vit_layouts_train_every_parameter(name):
    # Register / distillation tokens stay in front; a pooled ViT's fc_norm normalises the detection tokens.
    model = create_detector("yolos", name, num_classes=2, num_det_tokens=4, pe_size=(32, 32),
                            use_mid_position_embeddings=True)
    out = model(torch.randn(1, 3, 45, 61))
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
