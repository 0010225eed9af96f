"""SAM's model without peers: shapes and prompt batching, the prompt encoder against the paper's
random-Fourier encoding computed by hand, pre/post-processing against PIL and hand-made masks,
the registry, and save/load round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import perturb
from PIL import Image

from vitkit.errors import ConfigError, DataError, PathNotFoundError, WeightsError
from vitkit.sam import SAM_CONFIGS, build_sam, create_sam, list_sam_models, load_sam
from vitkit.sam.convert import infer_sam_args


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return perturb(create_sam("sam_test"))


def test_registry_lists_the_paper_sizes_and_small_ones():
    assert set(list_sam_models()) >= {"sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_nano", "sam_test"}
    assert list_sam_models("sam_vit_*") == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]
    with torch.device("meta"):
        b = create_sam("sam_vit_b")
    assert b.img_size == 1024 and b.embedding_size == (64, 64) and b.embed_dim == 256
    assert b.image_encoder.global_attn_indexes == (2, 5, 8, 11) and b.image_encoder.window_size == 14
    # Parameters of the reference's sam_vit_b (image encoder 89.67M, prompt encoder 6.2K, decoder 4.06M).
    assert sum(p.numel() for p in b.image_encoder.parameters()) == 89_670_912
    assert sum(p.numel() for p in b.parameters()) == 93_735_472
    with pytest.raises(ConfigError, match="sam_vit_b"):
        create_sam("sam_vit_bb")
    with pytest.raises(ConfigError, match="unknown SAM argument"):
        create_sam("sam_test", embed_dims=8)


def test_shapes_points_boxes_masks_and_batching(sam):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        emb = sam.encode_image(x)
        assert emb.shape == (1, 32, 8, 8)
        coords = torch.tensor([[[10.0, 20.0], [30.0, 5.0]], [[1.0, 2.0], [60.0, 60.0]], [[5.0, 5.0], [0.0, 0.0]]])
        labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
        low, iou = sam.decode(emb, points=(coords, labels))
        assert low.shape == (3, 3, 32, 32) and iou.shape == (3, 3)
        one, iou1 = sam.decode(emb, points=(coords, labels), multimask=False)
        assert one.shape == (3, 1, 32, 32) and iou1.shape == (3, 1)
        boxes = torch.tensor([[0.0, 0.0, 30.0, 40.0], [10.0, 10.0, 20.0, 20.0], [5.0, 6.0, 50.0, 60.0]])
        assert sam.decode(emb, boxes=boxes)[0].shape == (3, 3, 32, 32)
        both, _ = sam.decode(emb, points=(coords, labels), boxes=boxes, mask_input=low[:, :1])
        assert both.shape == (3, 3, 32, 32)
        # Prompt p on a shared embedding == prompt p alone on its own copy of the embedding.
        solo, solo_iou = sam.decode(emb.expand(3, -1, -1, -1).clone(), points=(coords, labels))
        torch.testing.assert_close(solo, low, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(solo_iou, iou, atol=1e-5, rtol=1e-5)
        first, _ = sam.decode(emb, points=(coords[1:2], labels[1:2]))
        torch.testing.assert_close(first[0], low[1], atol=1e-5, rtol=1e-5)
        # A padding label (-1) is a not-a-point: where it sits does not matter.
        moved = coords.clone()
        moved[2, 1] = torch.tensor([40.0, 3.0])
        torch.testing.assert_close(sam.decode(emb, points=(moved, labels))[0], low)
        # ... and a real label there changes the masks.
        assert not torch.allclose(sam.decode(emb, points=(coords, torch.tensor([[1, 0], [1, 1], [1, 1]])))[0][2], low[2])
        # forward == encode + decode.
        fw, _ = sam(x, points=(coords, labels))
        torch.testing.assert_close(fw, low)


def test_bad_prompts_are_config_errors(sam):
    emb = torch.zeros(2, 32, 8, 8)
    with pytest.raises(ConfigError, match="coords"):
        sam.decode(emb, points=(torch.zeros(2, 3), torch.zeros(2, 3)))
    with pytest.raises(ConfigError, match="box"):
        sam.decode(emb, points=(torch.zeros(2, 1, 2), torch.ones(2, 1)), boxes=torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="image embeddings"):
        sam.decode(emb, points=(torch.zeros(3, 1, 2), torch.ones(3, 1)))
    with pytest.raises(ConfigError, match="mask_input"):
        sam.decode(emb, mask_input=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="preprocess"):
        sam.encode_image(torch.zeros(1, 3, 32, 32))


def _fourier(xy: np.ndarray, gauss: np.ndarray) -> np.ndarray:
    """The paper's random-Fourier features of (x, y) in [0, 1]: sin and cos of 2 pi (2 xy - 1) G."""
    z = 2 * math.pi * ((2 * xy - 1) @ gauss)
    return np.concatenate([np.sin(z), np.cos(z)], axis=-1)


def test_prompt_encoder_against_the_fourier_features_by_hand(sam):
    pe = sam.prompt_encoder
    G = pe.pe_layer.positional_encoding_gaussian_matrix.double().numpy()
    emb = {i: pe.point_embeddings[i].weight[0].detach().double().numpy() for i in range(4)}
    na = pe.not_a_point_embed.weight[0].detach().double().numpy()
    coords = torch.tensor([[[10.0, 20.0], [63.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, dense = pe((coords, labels), None, None)
        boxed, _ = pe((coords, labels), torch.tensor([[4.0, 8.0, 40.0, 50.0]]), None)
        grid = pe.get_dense_pe()[0].double().numpy()
    S = 64.0
    p0 = _fourier(np.array([10.5, 20.5]) / S, G) + emb[1]
    p1 = _fourier(np.array([63.5, 0.5]) / S, G) + emb[0]
    expect = np.stack([p0, p1, na])  # no box: a not-a-point pads the points
    np.testing.assert_allclose(sparse[0].double().numpy(), expect, atol=1e-5)
    c0 = _fourier(np.array([4.5, 8.5]) / S, G) + emb[2]
    c1 = _fourier(np.array([40.5, 50.5]) / S, G) + emb[3]
    np.testing.assert_allclose(boxed[0].double().numpy(), np.stack([p0, p1, c0, c1]), atol=1e-5)
    # The dense encoding is the features of each cell centre of the 8 x 8 embedding.
    assert grid.shape == (32, 8, 8)
    np.testing.assert_allclose(grid[:, 2, 5], _fourier(np.array([5.5 / 8, 2.5 / 8]), G), atol=1e-5)
    # No mask prompt: the learned no-mask embedding everywhere.
    np.testing.assert_allclose(dense[0, :, 3, 3].detach().numpy(), pe.no_mask_embed.weight[0].detach().numpy())


def test_preprocess_resizes_longest_side_normalises_and_pads(sam):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 48, 3), dtype=np.uint8)
    x, input_size, original = sam.preprocess(img)
    assert x.shape == (1, 3, 64, 64) and original == (30, 48)
    assert input_size == (40, 64)  # 30 * 64/48 = 40
    resized = np.asarray(Image.fromarray(img).resize((64, 40), Image.BILINEAR)).astype(np.float32)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    expect = ((resized - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(x[0, :, :40].numpy(), expect, atol=1e-5)
    assert torch.all(x[0, :, 40:] == 0)  # padded bottom
    # PIL and grayscale inputs go through the same path.
    xp, _, _ = sam.preprocess(Image.fromarray(img))
    torch.testing.assert_close(xp, x)
    assert sam.preprocess(img[..., 0])[0].shape == (1, 3, 64, 64)
    with pytest.raises(DataError, match="RGB"):
        sam.preprocess(img.astype(np.float32))
    with pytest.raises(PathNotFoundError):
        sam.preprocess("/no/such/image.png")


def test_coords_and_postprocess_follow_the_resize(sam):
    coords = sam.transform_coords(torch.tensor([[48.0, 30.0], [24.0, 15.0]]), (30, 48))
    torch.testing.assert_close(coords, torch.tensor([[64.0, 40.0], [32.0, 20.0]]))
    boxes = sam.transform_boxes(torch.tensor([[0.0, 0.0, 24.0, 15.0]]), (30, 48))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 32.0, 20.0]]))
    # A low-res mask of the left half of the valid region (input 40 x 64 of 64 x 64 -> 20 x 32 of
    # 32 x 32) comes back as the left half of the original 30 x 48 image.
    low = torch.full((1, 1, 32, 32), -10.0)
    low[..., :20, :16] = 10.0
    out = sam.postprocess_masks(low, (40, 64), (30, 48))
    assert out.shape == (1, 1, 30, 48)
    mask = out[0, 0] > sam.mask_threshold
    assert mask[:, :23].all() and not mask[:, 25:].any()


def test_model_args_rebuild_and_save_load_round_trip(sam, tmp_path):
    import vitkit

    args = sam.model_args
    assert args["name"] == "sam_test" and args["img_size"] == 64 and args["global_attn_indexes"] == [1]
    again = build_sam(args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in sam.state_dict().items()}
    path = vitkit.save_weights(sam, tmp_path / "sam.safetensors")
    loaded = load_sam(path)
    assert loaded.model_args == args and not loaded.training
    x = torch.randn(1, 3, 64, 64)
    pts = (torch.tensor([[[12.0, 40.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, points=pts)[0], sam(x, points=pts)[0])
    # A bare state dict (no config) is sized from its shapes and matched to the registered variant.
    assert infer_sam_args(sam.state_dict())["name"] == "sam_test"
    bare = load_sam(dict(sam.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(bare(x, points=pts)[0], sam(x, points=pts)[0])
    with pytest.raises(PathNotFoundError):
        load_sam(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="does not fit sam_nano.*other shapes"):
        load_sam(dict(sam.state_dict()), name="sam_nano")
    with pytest.raises(WeightsError, match="not a SAM checkpoint"):
        load_sam({"blocks.0.weight": torch.zeros(2)})


def test_load_sam_reads_run_directories(sam, tmp_path):
    import json

    from safetensors.torch import save_file

    import vitkit

    x = torch.randn(1, 3, 64, 64)
    box = torch.tensor([[5.0, 5.0, 40.0, 30.0]])
    with torch.no_grad():
        expect = sam(x, boxes=box)[0]
    # A finished run: model.safetensors carries the model config.
    done = tmp_path / "done"
    done.mkdir()
    (done / "run.json").write_text(json.dumps({"model": "sam_test"}))
    vitkit.save_weights(sam, done / "model.safetensors")
    # Weights without a config (as checkpoints are): the run's config.yaml names the variant.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text("{}")
    (bare / "config.yaml").write_text("model:\n  name: sam_test\n  args: {decoder_heads: 2}\n")
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(bare / "model.safetensors"))
    for run in (done, bare):
        with torch.no_grad():
            torch.testing.assert_close(load_sam(run)(x, boxes=box)[0], expect)


def test_plain_vit_weights_load_into_the_image_encoder(tmp_path):
    import vitkit

    vit = perturb(vitkit.create_model("test_vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=64))
    path = vitkit.save_weights(vit, tmp_path / "vit.safetensors")
    m = create_sam("sam_test")
    neck = {k: v.clone() for k, v in m.image_encoder.neck.state_dict().items()}
    report = vitkit.load_weights(m.image_encoder, str(path), verbose=False)  # strict
    assert any("neck" in n for n in report.notes) and any("final norm" in n for n in report.notes)
    enc, ref = m.image_encoder.state_dict(), vit.state_dict()
    for k in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "patch_embed.proj.weight"):
        torch.testing.assert_close(enc[k], ref[k])
    torch.testing.assert_close(enc["pos_embed"], ref["pos_embed"][:, 1:])  # the class token's row dropped
    for k, v in neck.items():
        torch.testing.assert_close(enc[f"neck.{k}"], v)


def test_nano_config_is_the_cpu_size():
    cfg = SAM_CONFIGS["sam_nano"]
    m = create_sam("sam_nano")
    assert m.img_size == cfg["img_size"] == 128 and m.embedding_size == (16, 16)
    with torch.no_grad():
        low, iou = m(torch.zeros(1, 3, 128, 128), boxes=torch.tensor([[10.0, 10.0, 60.0, 90.0]]))
    assert low.shape == (1, 3, 64, 64) and iou.shape == (1, 3)


def test_gradients_reach_every_used_part(sam):
    m = create_sam("sam_test").train()
    x = torch.randn(2, 3, 64, 64)
    low, iou = m(x, points=(torch.rand(2, 1, 2) * 64, torch.ones(2, 1, dtype=torch.long)),
                 mask_input=torch.randn(2, 1, 32, 32))
    (low.mean() + iou.mean()).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    # Unused by this prompt: the box corners, and the no-mask embedding (a mask was given).
    assert set(no_grad) == {"prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight",
                            "prompt_encoder.no_mask_embed.weight"}
