"""Deformable DETR: multi-scale deformable attention against the paper's formula (explicit bilinear
sampling), parity with transformers' DeformableDetrForObjectDetection through
``convert_hf_deformable_detr`` (random perturbed weights, strict load), training and any input size."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb

from vitkit.detect import create_detector
from vitkit.detect.convert_deformable import convert_hf_deformable_detr
from vitkit.detect.deformable_detr import DeformableDETR
from vitkit.detect.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from vitkit.errors import ConfigError

transformers = lazy_peer("transformers")
needs_hf = pytest.mark.peer("transformers")
ATOL = 1e-5

TINY = dict(num_queries=10, d_model=32, enc_layers=1, dec_layers=2, nheads=2, dim_feedforward=64, enc_n_points=2,
            dec_n_points=2)


# ---- the paper's sampling, written out ---------------------------------------------------------------------


def _bilinear(v: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """v (C, h, w) at continuous (x, y) in [0, 1] of the map (0 and 1 its outer edges), zeros outside."""
    _, h, w = v.shape
    px, py = x * w - 0.5, y * h - 0.5  # pixel i's centre is at (i + 0.5) / size
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(v.shape[0], dtype=v.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * v[:, yi, xi]
    return out


def _reference_core(value, shapes, locations, weights):
    """sum over levels l and points k of A[h, l, k] * V_h(level l at location[h, l, k]), per query and head."""
    B, _, H, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, H, D, dtype=value.dtype)
    for b in range(B):
        for lvl, (h, w) in enumerate(shapes):
            maps = value[b, starts[lvl]:starts[lvl + 1]].reshape(h, w, H, D).permute(2, 3, 0, 1)
            for q in range(Q):
                for hd in range(H):
                    for k in range(P):
                        x, y = locations[b, q, hd, lvl, k].tolist()
                        out[b, q, hd] += weights[b, q, hd, lvl, k] * _bilinear(maps[hd], x, y)
    return out.flatten(2)


def test_ms_deform_attn_core_matches_explicit_bilinear_sampling():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 3)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 4, generator=g, dtype=torch.float64)
    # Some locations fall outside the map, where the paper's sampling reads zeros.
    locations = torch.rand(2, 3, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 3, 2, 2, 3, generator=g, dtype=torch.float64)
    got = ms_deform_attn_core(value, shapes, locations, weights)
    want = _reference_core(value, shapes, locations, weights)
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("box", [False, True])
def test_ms_deform_attn_module_follows_the_paper(box):
    """Eq. 3 of the paper: offsets in pixels of each level around the reference point (or scaled
    by half the reference box over the point count), weights softmaxed over levels and points."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    d, H, L, P = 8, 2, 2, 2
    attn = MSDeformAttn(d, L, H, P).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    S = sum(h * w for h, w in shapes)
    query, src = torch.randn(1, 3, d, dtype=torch.float64), torch.randn(1, S, d, dtype=torch.float64)
    ref = torch.rand(1, 3, L, 4 if box else 2, dtype=torch.float64) * 0.6 + 0.2
    pad = torch.zeros(1, S, dtype=torch.bool)
    pad[0, 5] = True
    got = attn(query, ref, src, shapes, pad)

    value = attn.value_proj(src).masked_fill(pad[..., None], 0).view(1, S, H, d // H)
    off = attn.sampling_offsets(query).view(1, 3, H, L, P, 2)
    w = attn.attention_weights(query).view(1, 3, H, L * P).softmax(-1).view(1, 3, H, L, P)
    loc = torch.empty_like(off)
    for lvl, (h, wd) in enumerate(shapes):
        for q in range(3):
            r = ref[0, q, lvl]
            if box:
                loc[0, q, :, lvl] = r[:2] + off[0, q, :, lvl] / P * r[2:] * 0.5
            else:
                loc[0, q, :, lvl] = r + off[0, q, :, lvl] / torch.tensor([wd, h], dtype=torch.float64)
    want = attn.output_proj(_reference_core(value, shapes, loc, w))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


# ---- parity with transformers -----------------------------------------------------------------------------


def _hf_model(**kw):
    cfg = transformers.DeformableDetrConfig(
        backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_n_points=2, decoder_n_points=2, num_queries=10, two_stage_num_proposals=10, num_labels=3, **kw)
    torch.manual_seed(0)
    model = perturb(transformers.DeformableDetrForObjectDetection(cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF's frozen norms keep their affine terms as buffers, which perturb leaves alone
        for name, b in model.named_buffers():
            if name.endswith((".weight", ".bias")):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
    return model, cfg


@needs_hf
@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True},
                                     {"num_feature_levels": 1}],
                         ids=["plain", "box_refine", "two_stage", "single_scale"])
def test_parity_with_transformers(variant):
    hf, cfg = _hf_model(**variant)
    args, state = convert_hf_deformable_detr(hf.state_dict(), cfg)
    assert convert_hf_deformable_detr(hf.state_dict(), cfg.to_dict())[0] == args  # a config.json dict converts alike
    assert args["backbone"] == "resnet18" and args["num_classes"] == 3
    model = create_detector(**args).eval()
    model.load_state_dict(state, strict=True)
    assert model.model_args.items() >= args.items()

    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.ones(2, 96, 128, dtype=torch.long)
    mask[1, 70:] = 0  # the second image is padded at the bottom and right
    mask[1, :, 90:] = 0
    with torch.no_grad():
        want = hf(pixel_values=images, pixel_mask=mask)
        got = model(images, mask)
    assert max_diff(got["pred_logits"], want.logits) < ATOL
    assert max_diff(got["pred_boxes"], want.pred_boxes) < ATOL
    assert got["pred_logits"].std() > 0.05 and got["pred_boxes"].std() > 0.01  # not a degenerate comparison
    if variant.get("two_stage"):
        assert max_diff(got["enc_outputs"]["pred_logits"], want.enc_outputs_class) < ATOL
    # The earlier decoder layer: HF's intermediate states through the same heads.
    assert len(got["aux_outputs"]) == 1


@needs_hf
def test_convert_refuses_what_it_cannot_map():
    cfg = transformers.DeformableDetrConfig(use_timm_backbone=False, backbone_config={"model_type": "resnet"})
    with pytest.raises(ConfigError, match="timm"):
        convert_hf_deformable_detr({}, cfg)
    hf, cfg = _hf_model()
    state = hf.state_dict()
    with pytest.raises(ConfigError, match="no place"):
        convert_hf_deformable_detr({**state, "model.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ConfigError, match="bare DeformableDetrModel"):
        convert_hf_deformable_detr({k: v for k, v in state.items() if not k.startswith("class_embed")}, cfg)


# ---- the model in vitkit -----------------------------------------------------------------------------------


def _targets(sizes):
    g = torch.Generator().manual_seed(3)
    out = []
    for h, w in sizes:
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = torch.rand(2, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 8
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([0, 2]), "size": torch.tensor([h, w])})
    return out


def test_defaults_are_the_papers():
    model = DeformableDETR.__init__.__kwdefaults__
    assert (model["num_queries"], model["num_feature_levels"], model["d_model"], model["dim_feedforward"]) == (300, 4, 256, 1024)
    assert (model["enc_layers"], model["dec_layers"], model["enc_n_points"], model["nheads"]) == (6, 6, 4, 8)
    assert not model["with_box_refine"] and not model["two_stage"]


def test_bad_settings_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="with_box_refine"):
        create_detector("deformable_detr", "test_resnet", num_classes=3, two_stage=True, **TINY)
    with pytest.raises(ConfigError, match="not divisible by nheads"):
        create_detector("deformable_detr", "test_resnet", num_classes=3, **{**TINY, "nheads": 3})
    with pytest.raises(ConfigError, match="needs a vitkit backbone"):
        create_detector("deformable_detr", torch.nn.Conv2d(3, 8, 3), num_classes=3, **TINY)
    with pytest.raises(ConfigError, match="num_feature_levels=2"):
        create_detector("deformable_detr", "test_resnet", num_classes=3, num_feature_levels=2, **TINY)
    model = create_detector("deformable_detr", "test_resnet", num_classes=3, **TINY)
    with pytest.raises(ValueError, match="pixel_mask"):
        model(torch.randn(1, 3, 32, 32), torch.ones(1, 16, 16, dtype=torch.bool))


@pytest.mark.parametrize("refine", [False, True])
def test_initialisation_is_the_references(refine):
    torch.manual_seed(0)
    model = create_detector("deformable_detr", "test_resnet", num_classes=3, with_box_refine=refine, **TINY)
    heads = list(model.class_embed) if refine else [model.class_embed]
    boxes = list(model.bbox_embed) if refine else [model.bbox_embed]
    for head in heads:  # every class starts at probability 0.01
        torch.testing.assert_close(head.bias.sigmoid(), torch.full((3,), 0.01))
    for i, head in enumerate(boxes):  # only the first box head starts small; refinements start at zero
        assert not head.layers[-1].weight.any()
        assert head.layers[-1].bias.tolist() == [0, 0] + ([-2, -2] if i == 0 else [0, 0])
    attn = model.encoder[0].self_attn  # head h's k-th point starts k + 1 steps along angle 2 pi h / heads
    bias = attn.sampling_offsets.bias.view(2, 4, 2, 2)
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([2.0, 0.0]).expand(4, 2))
    torch.testing.assert_close(bias[1, :, 0], torch.tensor([-1.0, 0.0]).expand(4, 2), atol=1e-6, rtol=0)
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()


def test_frozen_backbone_norms_and_stem():
    model = create_detector("deformable_detr", "resnet18", num_classes=3, **TINY)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    trainable = {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert model.stride == 32
    before = model.backbone.layer2[0].bn1.running_mean.clone()
    model.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.backbone.layer2[0].bn1.running_mean, before)


def test_backbone_options_and_rebuilding():
    import json

    import vitkit

    model = create_detector("deformable_detr", "test_resnet", num_classes=3, backbone_args={"drop_path_rate": 0.1},
                            **TINY)
    again = create_detector(**json.loads(json.dumps(model.model_args)))  # run configs store them as JSON/YAML
    assert again.model_args == model.model_args and again.model_args["backbone_args"] == {"drop_path_rate": 0.1}
    assert again.state_dict().keys() == model.state_dict().keys()
    assert model.backbone_lr_mult == 0.1 and model.param_groups_hint() == {"backbone.": 0.1}
    # A classifier checkpoint of the backbone loads into the frozen norms unchanged.
    source = vitkit.create_model("test_resnet", num_classes=0)
    model.backbone.load_state_dict(source.state_dict(), strict=True)
    # A built backbone is used as is; train_backbone=False freezes it whole.
    frozen = create_detector("deformable_detr", source, num_classes=3, train_backbone=False, **TINY)
    assert frozen.backbone is source and not any(p.requires_grad for p in source.parameters())
    assert frozen.model_args["backbone"] == "test_resnet"
    with pytest.raises(ConfigError, match="backbone_args"):
        create_detector("deformable_detr", source, num_classes=3, backbone_args={"drop_path_rate": 0.1}, **TINY)


@pytest.mark.parametrize("backbone,size,variant", [
    ("resnet18", (50, 77), {}),
    ("test_vit", (40, 56), {}),
    ("test_resnet", (24, 30), {"with_box_refine": True, "two_stage": True, "num_queries": 30}),
])
def test_any_input_size(backbone, size, variant):
    """Any H, W (padded to the stride inside); a plain ViT feeds its simple pyramid; two-stage on an
    image with fewer positions than queries proposes from all of them."""
    torch.manual_seed(0)
    model = create_detector("deformable_detr", backbone, num_classes=3, **{**TINY, **variant}).eval()
    n_queries = 22 if variant else 10  # padded to 32x32: 4x4 + 2x2 + 1 + 1 positions at strides 8 to 64
    h, w = size
    mask = torch.ones(2, h, w, dtype=torch.bool)
    mask[0, h // 2:] = False
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w), mask)
    assert out["pred_logits"].shape == (2, n_queries, 3) and out["pred_boxes"].shape == (2, n_queries, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1
    rebuilt = create_detector(**model.model_args)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True, "two_stage": True}], ids=["plain", "two_stage"])
def test_training_steps_reduce_the_loss(variant):
    torch.manual_seed(0)
    model = create_detector("deformable_detr", "test_resnet", num_classes=3, dropout=0.0, **{**TINY, **variant}).train()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = False
    targets = _targets([(64, 64), (64, 48)])
    model.backbone.requires_grad_(False)  # the detector's own layers are what this checks, and cheaper to train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(8):
        out = model.loss(model(images, mask), targets)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= out.keys()
        if variant:
            assert "loss_ce_enc" in out
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_postprocess_gives_pixel_boxes_best_first():
    torch.manual_seed(0)
    model = create_detector("deformable_detr", "resnet18", num_classes=3, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    sizes = torch.tensor([[64, 96], [40, 50]])
    dets = model.postprocess(out, sizes, top_k=5)
    assert len(dets) == 2
    for det in dets:
        assert det["boxes"].shape == (5, 4) and det["labels"].dtype == torch.int64
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
    # Sigmoid scores over every (query, class) pair: the best is the largest logit's probability,
    # its box that query's, scaled to the image's true size.
    for i, (h, w) in enumerate(sizes.tolist()):
        best = out["pred_logits"][i].flatten().argmax()
        q, c = divmod(best.item(), 3)
        assert torch.isclose(dets[i]["scores"][0], out["pred_logits"][i].sigmoid().max()) and dets[i]["labels"][0] == c
        cx, cy, bw, bh = out["pred_boxes"][i, q].tolist()
        want = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        torch.testing.assert_close(dets[i]["boxes"][0], want)
