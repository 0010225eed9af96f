"""DETR: parity with transformers' DetrForObjectDetection, frozen BatchNorm and frozen stages as the
reference, any input size, cross-attention capture, and a training step that learns."""

from __future__ import annotations

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb
from torch import nn

from vitkit.detect import create_detector
from vitkit.detect.convert_hf import convert_hf_detr
from vitkit.detect.detr import DETR, FrozenBatchNorm2d
from vitkit.errors import ConfigError, WeightsError

transformers = lazy_peer("transformers")
needs_hf = pytest.mark.peer("transformers")

TINY = dict(num_queries=10, d_model=32, enc_layers=2, dec_layers=2, nheads=4, dim_feedforward=64)
TINY_HF = dict(backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               num_queries=10, num_labels=3)


@pytest.fixture
def one_thread():
    # Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(backbone="test_resnet", **kw) -> DETR:
    return create_detector("detr", backbone, num_classes=3, **{**TINY, **kw})


def hf_detr(**kw):
    cfg = transformers.DetrConfig(**{**TINY_HF, **kw})
    model = transformers.DetrForObjectDetection(cfg)
    model.set_attn_implementation("eager")  # the attention weights come back only from the eager path
    perturb(model, scale=0.3)
    # HF's frozen BatchNorm keeps its affine parameters as buffers, which perturb() leaves alone;
    # timm zero-initialises each block's last one, so without this the residual branches are dead.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.startswith("model.backbone.") and name.endswith((".weight", ".bias")):
                b.add_(torch.randn(b.shape, generator=g) * 0.2)
    return model.eval(), cfg


def _masked_batch():
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 64, 96, dtype=torch.long)
    mask[1, 40:, :] = 0  # the second image is 40 x 70, padded bottom and right
    mask[1, :, 70:] = 0
    return x, mask


def _converted(hf, cfg) -> DETR:
    args, sd = convert_hf_detr(hf.state_dict(), cfg)
    assert args["backbone"] == "resnet18" and args["num_classes"] == 3
    ours = create_detector(**args)
    ours.load_state_dict(sd, strict=True)
    return ours.eval()


@needs_hf
def test_hf_parity_logits_boxes_and_cross_attention(one_thread):
    hf, cfg = hf_detr()
    ours = _converted(hf, cfg)
    x, mask = _masked_batch()
    first = []  # the first decoder layer's raw output, for the auxiliary head below
    hook = hf.model.decoder.layers[0].register_forward_hook(lambda m, i, o: first.append(o))
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=mask, output_attentions=True)
        out = ours(x, mask.bool(), return_attention=True)
    hook.remove()
    assert max_diff(out["pred_logits"], ref.logits) < 1e-5
    assert max_diff(out["pred_boxes"], ref.pred_boxes) < 1e-5
    # The reference's auxiliary outputs: each earlier layer's output through the shared decoder norm and the heads.
    with torch.no_grad():
        inter = hf.model.decoder.layernorm(first[0])
        assert max_diff(out["aux_outputs"][0]["pred_logits"], hf.class_labels_classifier(inter)) < 1e-5
        assert max_diff(out["aux_outputs"][0]["pred_boxes"], hf.bbox_predictor(inter).sigmoid()) < 1e-5
    # The last decoder layer's cross-attention, averaged over heads, is what `vitkit explain` shows.
    h, w = out["feature_size"]
    assert (h, w) == (2, 3)
    assert max_diff(out["cross_attention"], ref.cross_attentions[-1].mean(1)) < 1e-5


@needs_hf
def test_hf_parity_of_checkpoints_trained_with_auxiliary_losses(one_thread):
    # HF decodes differently with auxiliary_loss=True; the converter asks for that decoding.
    hf, cfg = hf_detr(auxiliary_loss=True)
    ours = _converted(hf, cfg)
    assert ours.model_args["hf_aux_norm"] and "hf_aux_norm" not in _converted(*hf_detr()).model_args
    x, mask = _masked_batch()
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=mask)
        inter = hf.model(pixel_values=x, pixel_mask=mask).intermediate_hidden_states[0]
        out = ours(x, mask.bool())
    assert max_diff(out["pred_logits"], ref.logits) < 1e-5
    assert max_diff(out["pred_boxes"], ref.pred_boxes) < 1e-5
    assert max_diff(out["aux_outputs"][0]["pred_logits"], hf.class_labels_classifier(inter)) < 1e-5


@needs_hf
def test_convert_reads_the_older_transformers_layout():
    hf, cfg = hf_detr()
    new = hf.state_dict()
    renames = [("model.backbone.model.", "model.backbone.conv_encoder.model."), (".o_proj.", ".out_proj."),
               (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2.")]
    old = {}
    for k, v in new.items():
        for a, b in renames:
            k = k.replace(a, b)
        old[k] = v
    assert old.keys() != new.keys()
    args_new, sd_new = convert_hf_detr(new, cfg)
    args_old, sd_old = convert_hf_detr(old, cfg.to_dict())
    assert args_new == args_old and sd_new.keys() == sd_old.keys()
    assert all(torch.equal(sd_new[k], sd_old[k]) for k in sd_new)


@needs_hf
def test_convert_rejects_what_vitkit_does_not_build():
    hf, cfg = hf_detr()
    sd = hf.state_dict()
    with pytest.raises(ConfigError, match="sine"):
        convert_hf_detr(sd, {**cfg.to_dict(), "position_embedding_type": "learned"})
    with pytest.raises(ConfigError, match="DC5"):
        convert_hf_detr(sd, {**cfg.to_dict(), "dilation": True})
    with pytest.raises(WeightsError, match="unexpected key"):
        convert_hf_detr({**sd, "model.something.weight": torch.zeros(1)}, cfg)


def test_frozen_batch_norm_equals_batch_norm_in_eval_and_loads_its_state():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    frozen = FrozenBatchNorm2d(5)
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 5, 4, 4)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)
    assert not list(frozen.parameters())
    # Checkpoints of frozen BatchNorm elsewhere (HF, the reference) have no counter: they load too.
    no_counter = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(5).load_state_dict(no_counter)


def test_a_classifier_checkpoint_loads_into_the_frozen_backbone():
    from vitkit import create_model
    from vitkit.convert.weights import load_weights

    src = perturb(create_model("test_resnet", num_classes=0))  # trained-looking BatchNorm statistics
    m = tiny("test_resnet")
    load_weights(m.backbone, src.state_dict(), verbose=False)
    m.train()  # frozen statistics: the same as the classifier's eval mode, even in training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone.forward_features(x), src.forward_features(x), rtol=1e-5, atol=1e-5)


def test_backbone_freezing_follows_the_reference():
    m = tiny("resnet18")
    bn = [n for n, mod in m.backbone.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert not bn and any(isinstance(mod, FrozenBatchNorm2d) for mod in m.backbone.modules())
    grad = {n: p.requires_grad for n, p in m.backbone.named_parameters()}
    assert not grad["conv1.weight"] and not grad["layer1.0.conv1.weight"]
    assert all(grad[n] for n in grad if n.startswith(("layer2.", "layer3.", "layer4.")))
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("backbone."))

    trainable_bn = tiny("resnet18", frozen_bn=False, frozen_stages=0)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in trainable_bn.backbone.modules())
    assert all(p.requires_grad for p in trainable_bn.backbone.parameters())
    assert not any(p.requires_grad for p in tiny("resnet18", train_backbone=False).backbone.parameters())
    # A ViT has no BatchNorm and no stem/stage split in the reference: it trains whole.
    assert all(p.requires_grad for p in tiny("test_vit").backbone.parameters())
    assert m.backbone_lr_mult == 0.1 and m.param_groups_hint() == {"backbone.": 0.1}


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_any_input_size_and_outputs(backbone, one_thread):
    m = tiny(backbone).eval()
    for H, W in [(45, 77), (64, 32), (33, 33)]:
        with torch.no_grad():
            out = m(torch.randn(2, 3, H, W))
        assert out["pred_logits"].shape == (2, 10, 4) and out["pred_boxes"].shape == (2, 10, 4)
        assert torch.isfinite(out["pred_logits"]).all()
        assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
        assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert "aux_outputs" not in tiny(backbone, aux_loss=False).eval()(torch.randn(1, 3, 32, 32))


def test_return_attention_shapes_and_padding(one_thread):
    m = tiny("test_resnet").eval()  # stride 8
    x = torch.randn(2, 3, 64, 80)
    mask = torch.ones(2, 64, 80, dtype=torch.bool)
    mask[1, :, 48:] = False  # 6 of 10 feature columns are real
    with torch.no_grad():
        out = m(x, mask, return_attention=True)
        plain = m(x, mask)
    h, w = out["feature_size"]
    assert (h, w) == (8, 10) and m.stride == 8
    attn = out["cross_attention"]
    assert attn.shape == (2, 10, h * w)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 10), atol=1e-5)
    assert attn[1].view(10, h, w)[:, :, 6:].abs().max() == 0  # padded keys get no attention
    assert torch.equal(out["pred_logits"], plain["pred_logits"])  # capture does not change the outputs
    assert m.transformer.decoder.layers[-1].multihead_attn.captured is None


def test_model_args_rebuild_and_bad_input():
    m = tiny("test_vit", backbone_args={"drop_path_rate": 0.1})
    rebuilt = create_detector(**m.model_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert rebuilt.model_args == m.model_args and m.model_args["backbone_args"] == {"drop_path_rate": 0.1}
    assert len(m.block_modules()) == len(m.backbone.blocks) + 4
    m.set_grad_checkpointing(True)
    assert m.backbone.grad_checkpointing
    with pytest.raises(ValueError, match="pixel_mask"):
        m(torch.randn(1, 3, 32, 32), torch.ones(1, 16, 16, dtype=torch.bool))
    with pytest.raises(ConfigError, match="divisible"):
        tiny(nheads=5)


def _targets():
    # Two images (the second padded to the batch size): boxes in pixels of each image's true size.
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 10.0, 60.0, 28.0]]), "labels": torch.tensor([0, 2]),
         "size": torch.tensor([64, 64])},
        {"boxes": torch.tensor([[10.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([1]), "size": torch.tensor([48, 56])},
    ]


def test_training_steps_reduce_the_set_loss(one_thread):
    torch.manual_seed(0)
    m = tiny("test_resnet", dropout=0.0, frozen_stages=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    mask[1, 48:] = False
    mask[1, :, 56:] = False
    targets = _targets()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    losses = []
    for _ in range(30):
        parts = m.loss(m(x, mask), targets)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(parts) and "loss_ce_0" in parts
    assert losses[-1] < 0.6 * losses[0], losses
    m.eval()
    with torch.no_grad():
        dets = m.postprocess(m(x, mask), torch.tensor([[64, 64], [48, 56]]), top_k=5)
    assert len(dets) == 2 and dets[0]["boxes"].shape == (5, 4)
    # An image without objects only teaches "no object".
    empty = [targets[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                          "size": torch.tensor([48, 56])}]
    assert torch.isfinite(m.loss(m(x, mask), empty)["loss"])
