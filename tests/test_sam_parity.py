"""SAM parity: random-weight segment-anything and transformers SamModel models converted to
vitkit give the same low-res mask logits and IoU predictions (1e-5) for point, box and mask
prompts, multimask on and off; pre/post-processing match the reference's; one real-size
sam_vit_b at 1024 px."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from helpers import max_diff, perturb, require_peer

from vitkit._peers import ensure_torchvision_importable
from vitkit.sam import convert_hf_sam, convert_segment_anything, create_sam, load_sam
from vitkit.sam.convert import detect_layout

# sam_test's sizes.
TINY = dict(img=64, patch=8, dim=32, depth=2, heads=2, window=4, glob=(1,), out=32, dec_mlp=64, dec_heads=2, iou_hidden=32)


def _segment_anything():
    ensure_torchvision_importable()  # segment_anything imports torchvision (its AMG's NMS)
    return require_peer("segment_anything")


def _tiny_segment_anything(sa):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = TINY
    grid = t["img"] // t["patch"]
    torch.manual_seed(0)
    model = Sam(
        ImageEncoderViT(img_size=t["img"], patch_size=t["patch"], embed_dim=t["dim"], depth=t["depth"],
                        num_heads=t["heads"], mlp_ratio=4, out_chans=t["out"], qkv_bias=True,
                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=t["window"],
                        global_attn_indexes=t["glob"]),
        PromptEncoder(embed_dim=t["out"], image_embedding_size=(grid, grid), input_image_size=(t["img"], t["img"]),
                      mask_in_chans=16),
        MaskDecoder(transformer_dim=t["out"], transformer=TwoWayTransformer(depth=2, embedding_dim=t["out"],
                    mlp_dim=t["dec_mlp"], num_heads=t["dec_heads"]), num_multimask_outputs=3, iou_head_depth=3,
                    iou_head_hidden_dim=t["iou_hidden"]),
    )
    return perturb(model)  # zero-initialised position tables and embeddings must take part


PROMPTS = {
    "points": dict(points=(torch.tensor([[[10.0, 20.0], [40.0, 50.0]], [[3.0, 60.0], [33.0, 1.0]]]),
                           torch.tensor([[1, 0], [1, 1]])), boxes=None),
    "box": dict(points=None, boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 63.0, 30.0]])),
    "points+box": dict(points=(torch.tensor([[[10.0, 20.0]], [[50.0, 5.0]]]), torch.tensor([[1], [0]])),
                       boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 63.0, 30.0]])),
}


@pytest.mark.peer("segment_anything")
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_matches_segment_anything(prompt, multimask):
    sa = _segment_anything()
    ref = _tiny_segment_anything(sa)
    assert detect_layout(ref.state_dict()) == "segment_anything"
    ours = load_sam(ref.state_dict())  # layout and sizes read from the keys and shapes
    assert ours.model_args["name"] == "sam_test"
    x = torch.randn(1, 3, 64, 64)
    p = PROMPTS[prompt]
    mask_in = torch.randn(2, 1, 32, 32) if prompt == "points" else None
    with torch.no_grad():
        emb_ref = ref.image_encoder(x)
        sparse, dense = ref.prompt_encoder(points=p["points"], boxes=p["boxes"], masks=mask_in)
        low_ref, iou_ref = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
        emb = ours.encode_image(x)
        low, iou = ours.decode(emb, points=p["points"], boxes=p["boxes"], mask_input=mask_in, multimask=multimask)
    assert max_diff(emb, emb_ref) < 1e-5
    assert low.shape == low_ref.shape
    assert max_diff(low, low_ref) < 1e-5
    assert max_diff(iou, iou_ref) < 1e-5


@pytest.mark.peer("segment_anything")
def test_pre_and_postprocessing_match_segment_anything():
    sa = _segment_anything()
    from segment_anything.utils.transforms import ResizeLongestSide

    ref = _tiny_segment_anything(sa)
    ours = load_sam(ref.state_dict())
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tf = ResizeLongestSide(64)
    resized = torch.as_tensor(tf.apply_image(img)).permute(2, 0, 1).float()
    x_ref = ref.preprocess(resized)[None]
    x, input_size, original = ours.preprocess(img)
    assert input_size == tuple(resized.shape[-2:]) and original == (37, 53)
    assert max_diff(x, x_ref) < 1e-5
    pts = np.array([[5.0, 7.0], [52.0, 36.0]])
    np.testing.assert_allclose(ours.transform_coords(pts, original).numpy(), tf.apply_coords(pts, original), atol=1e-5)
    low = torch.randn(2, 3, 32, 32)
    assert max_diff(ours.postprocess_masks(low, input_size, original), ref.postprocess_masks(low, input_size, original)) < 1e-5


def _tiny_hf(transformers, **decoder):
    t = TINY
    cfg = transformers.SamConfig(
        vision_config=dict(hidden_size=t["dim"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
                           image_size=t["img"], patch_size=t["patch"], window_size=t["window"],
                           global_attn_indexes=list(t["glob"]), output_channels=t["out"], num_pos_feats=t["out"] // 2),
        prompt_encoder_config=dict(hidden_size=t["out"], image_size=t["img"], patch_size=t["patch"],
                                   mask_input_channels=16),
        # The port's two-way blocks use LayerNorm eps 1e-6 by default; the reference (and vitkit) 1e-5.
        mask_decoder_config={**dict(hidden_size=t["out"], mlp_dim=t["dec_mlp"], num_attention_heads=t["dec_heads"],
                                    iou_head_hidden_dim=t["iou_hidden"], layer_norm_eps=1e-5), **decoder},
    )
    torch.manual_seed(0)
    return perturb(transformers.SamModel(cfg))


@pytest.mark.peer("transformers")
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_matches_transformers(prompt, multimask):
    transformers = require_peer("transformers")
    ref = _tiny_hf(transformers)
    state = ref.state_dict()
    assert detect_layout(state) == "hf"
    ours = load_sam(state)
    assert ours.model_args["name"] == "sam_test"
    x = torch.randn(1, 3, 64, 64)
    p = PROMPTS[prompt]
    kw = {}
    if p["points"] is not None:
        kw.update(input_points=p["points"][0][None], input_labels=p["points"][1][None])
    if p["boxes"] is not None:
        kw["input_boxes"] = p["boxes"][None]
    with torch.no_grad():
        out = ref(pixel_values=x, multimask_output=multimask, **kw)
        low, iou = ours(x, points=p["points"], boxes=p["boxes"], multimask=multimask)
    assert max_diff(low, out.pred_masks[0]) < 1e-5
    assert max_diff(iou, out.iou_scores[0]) < 1e-5


@pytest.mark.peer("segment_anything")
def test_loads_a_segment_anything_pth_file(tmp_path):
    ref = _tiny_segment_anything(_segment_anything())
    torch.save(ref.state_dict(), tmp_path / "sam_tiny.pth")
    ours = load_sam(tmp_path / "sam_tiny.pth")
    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=None, boxes=box, masks=None)
        low_ref, _ = ref.mask_decoder(ref.image_encoder(x), ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
        low, _ = ours(x, boxes=box)
    assert max_diff(low, low_ref) < 1e-5


@pytest.mark.peer("transformers")
def test_loads_a_transformers_folder_with_its_config(tmp_path):
    transformers = require_peer("transformers")
    # 4 decoder heads match no registered variant: only config.json can tell them.
    ref = _tiny_hf(transformers, num_attention_heads=4)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_sam(tmp_path / "hf")
    assert ours.model_args["decoder_heads"] == 4
    x = torch.randn(1, 3, 64, 64)
    pts = torch.tensor([[[[20.0, 30.0]]]])
    with torch.no_grad():
        out = ref(pixel_values=x, input_points=pts, input_labels=torch.ones(1, 1, 1, dtype=torch.long))
        low, iou = ours(x, points=(pts[0], torch.ones(1, 1, dtype=torch.long)))
    assert max_diff(low, out.pred_masks[0]) < 1e-5 and max_diff(iou, out.iou_scores[0]) < 1e-5


def test_converters_rename_every_key():
    ours = create_sam("sam_test")
    sd = ours.state_dict()
    sa = {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in sd.items()}
    sa["image_encoder.pos_embed"] = sd["image_encoder.pos_embed"].reshape(1, 8, 8, 32)
    conv = convert_segment_anything(sa)
    assert set(conv) == set(sd) and torch.equal(conv["image_encoder.pos_embed"], sd["image_encoder.pos_embed"])
    # transformers' feed-forward heads: proj_in, layers.j, proj_out -> layers.0 .. layers.n-1.
    hf = {"mask_decoder.iou_prediction_head.proj_in.weight": torch.zeros(1),
          "mask_decoder.iou_prediction_head.layers.0.weight": torch.ones(1),
          "mask_decoder.iou_prediction_head.proj_out.weight": torch.full((1,), 2.0)}
    got = convert_hf_sam(hf)
    assert [got[f"mask_decoder.iou_prediction_head.layers.{j}.weight"].item() for j in range(3)] == [0.0, 1.0, 2.0]


@pytest.mark.slow
@pytest.mark.peer("segment_anything")
def test_real_size_sam_vit_b_matches_segment_anything():
    sa = _segment_anything()
    torch.manual_seed(0)
    ref = sa.build_sam_vit_b(checkpoint=None)
    with torch.no_grad():  # the zero-initialised position tables must take part
        for blk in ref.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.02)
            blk.attn.rel_pos_w.normal_(0, 0.02)
        ref.image_encoder.pos_embed.normal_(0, 0.02)
    ours = load_sam(ref.state_dict())
    assert ours.model_args["name"] == "sam_vit_b"
    x = torch.randn(1, 3, 1024, 1024)
    pts = (torch.tensor([[[300.0, 400.0]], [[900.0, 100.0]]]), torch.tensor([[1], [1]]))
    with torch.no_grad():
        emb_ref = ref.image_encoder(x)
        sparse, dense = ref.prompt_encoder(points=pts, boxes=None, masks=None)
        low_ref, iou_ref = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
        emb = ours.encode_image(x)
        low, iou = ours.decode(emb, points=pts)
    assert max_diff(emb, emb_ref) < 1e-4  # 768-wide activations through 12 blocks: float32 rounding
    assert max_diff(low, low_ref) < 1e-5 and max_diff(iou, iou_ref) < 1e-5
