"""SAM inference: the predictor encodes an image once and then only decodes; its masks and the
automatic mask generator's records equal segment-anything's ``SamPredictor`` and
``SamAutomaticMaskGenerator`` on the same random weights; connected components and small-region
cleaning match a flood fill written here; ``vitkit segment`` (points, box, auto, errors) end to
end; the demo's click step."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from helpers import assert_user_error, perturb, require_peer, run_vitkit
from PIL import Image, ImageDraw

from vitkit import save_weights
from vitkit._peers import ensure_torchvision_importable
from vitkit.cli.main import main
from vitkit.errors import ConfigError, PathNotFoundError
from vitkit.sam import create_sam, load_sam
from vitkit.sam.auto import connected_components, generate_masks, mask_boxes, remove_small_regions
from vitkit.sam.predictor import SamPredictor


def _segment_anything():
    ensure_torchvision_importable()  # segment_anything imports torchvision (its resize and NMS)
    return require_peer("segment_anything")


def _reference_pair():
    """A random segment-anything model at sam_test's sizes and the vitkit model converted from it."""
    _segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    ref = Sam(
        ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, out_chans=32,
                        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                        window_size=4, global_attn_indexes=(1,)),
        PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=16),
        MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                    num_heads=2), num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32),
    )
    perturb(ref, scale=0.3)  # zero-initialised tables take part; larger logits give masks with some structure
    return ref, load_sam(ref.state_dict())


def _scene(w: int = 80, h: int = 60) -> np.ndarray:
    """Two shapes on a gradient: an image whose long side needs resizing to 64."""
    img = Image.fromarray(np.linspace(20, 200, w * h * 3).reshape(h, w, 3).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([8, 10, 38, 40], fill=(230, 40, 40))
    draw.ellipse([45, 20, 75, 55], fill=(30, 60, 220))
    return np.asarray(img)


def _reference_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's batched NMS rule: highest score first; a box goes when its IoU with a kept box of the same
    category is above the threshold."""
    order = torch.sort(scores, descending=True, stable=True).indices
    x0, y0, x1, y1 = boxes.double().unbind(-1)
    area = (x1 - x0) * (y1 - y0)
    removed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        removed |= (iou > iou_threshold) & (idxs == idxs[i])
    return torch.tensor(keep, dtype=torch.int64)


def test_second_prompt_runs_only_the_decoder():
    model = perturb(create_sam("sam_test"))
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    predictor = SamPredictor(model)
    image = _scene()
    predictor.set_image(image)
    assert len(calls) == 1
    masks, iou, low = predictor.predict(points=[[20, 25]], labels=[1])
    masks2, iou2, _ = predictor.predict(box=[5, 5, 40, 45], multimask=False)
    masks3, _, _ = predictor.predict(points=[[20, 25]], labels=[1], mask_input=low[:1])
    assert len(calls) == 1  # three prompts, one encoder pass
    assert masks.shape == (3, 60, 80) and masks.dtype == bool and iou.shape == (3,) and low.shape == (3, 32, 32)
    assert masks2.shape == (1, 60, 80) and iou2.shape == (1,)
    # The same as running the whole model on the preprocessed image.
    x, input_size, original_size = model.preprocess(image)
    with torch.no_grad():
        coords = model.transform_coords(torch.tensor([[[20.0, 25.0]]]), original_size)
        low_ref, iou_ref = model(x, points=(coords, torch.tensor([[1]])))
        masks_ref = model.postprocess_masks(low_ref, input_size, original_size) > 0
    assert np.array_equal(masks, masks_ref[0].numpy())
    assert np.allclose(iou, iou_ref[0].numpy(), atol=1e-6)


@pytest.mark.peer("segment_anything")
def test_predictor_matches_segment_anything():
    from segment_anything import SamPredictor as RefPredictor

    ref, model = _reference_pair()
    image = _scene()
    ours, theirs = SamPredictor(model), RefPredictor(ref)
    ours.set_image(image)
    theirs.set_image(image)
    assert torch.allclose(ours.embedding, theirs.features, atol=1e-5)
    first_low = None
    prompts = [
        dict(points=np.array([[20.0, 25.0]]), labels=np.array([1]), multimask=True),
        dict(points=np.array([[20.0, 25.0], [60.0, 40.0]]), labels=np.array([1, 0]), multimask=False),
        dict(box=np.array([5.0, 8.0, 42.0, 44.0]), multimask=True),
        dict(points=np.array([[60.0, 37.0]]), labels=np.array([1]), box=np.array([44.0, 18.0, 77.0, 57.0]),
             multimask=False),
        dict(points=np.array([[20.0, 25.0]]), labels=np.array([1]), mask_input="previous", multimask=False),
    ]
    for p in prompts:
        p = dict(p)
        if p.get("mask_input") == "previous":
            p["mask_input"] = first_low[:1]
        m, iou, low = ours.predict(**p)
        rm, riou, rlow = theirs.predict(point_coords=p.get("points"), point_labels=p.get("labels"), box=p.get("box"),
                                        mask_input=p.get("mask_input"), multimask_output=p["multimask"])
        first_low = low if first_low is None else first_low
        assert np.abs(low - rlow).max() < 1e-4
        assert np.abs(iou - riou).max() < 1e-5
        assert m.shape == rm.shape and (m != rm).mean() < 1e-3  # only pixels with logits within float error of 0
        assert 0 < m.mean() < 1 or p["multimask"]  # a mask with some structure (not trivially equal)


@pytest.mark.peer("segment_anything")
def test_generate_masks_matches_segment_anything(monkeypatch):
    _segment_anything()
    import segment_anything.automatic_mask_generator as amg

    monkeypatch.setattr(amg, "batched_nms", _reference_nms)  # torchvision's C NMS cannot load here
    ref, _ = _reference_pair()
    # Random weights predict IoUs far outside [0, 1] and masks that cover the whole image at threshold 0:
    # a smaller IoU head output near 0.5 and a higher mask threshold (read by both generators from the
    # model) leave masks of different sizes and scores for the filters and the NMS to work on.
    with torch.no_grad():
        last = ref.mask_decoder.iou_prediction_head.layers[-1]
        last.weight.mul_(0.05)
        last.bias.fill_(0.5)
    model = load_sam(ref.state_dict())
    ref.mask_threshold = model.mask_threshold = 0.5
    image = _scene()
    options = dict(points_per_side=8, points_per_batch=20, pred_iou_thresh=0.095, stability_score_thresh=0.3,
                   stability_score_offset=0.05, box_nms_thresh=0.7)
    expected = amg.SamAutomaticMaskGenerator(ref, **options).generate(image)
    got = generate_masks(model, image, **options)
    unfiltered = generate_masks(model, image, **{**options, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    everything = generate_masks(model, image, **{**options, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                                                 "box_nms_thresh": 1.0})
    assert 3 <= len(expected) < len(unfiltered) < len(everything)  # each step had something to remove
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g["segmentation"].shape == (60, 80)
        assert np.array_equal(g["segmentation"], e["segmentation"])
        assert g["bbox"] == e["bbox"] and g["area"] == e["area"]
        assert g["predicted_iou"] == pytest.approx(e["predicted_iou"], abs=1e-5)
        assert g["stability_score"] == pytest.approx(e["stability_score"], abs=1e-5)
        assert np.allclose(g["point_coords"], e["point_coords"]) and g["crop_box"] == e["crop_box"]
    assert len({r["area"] for r in got}) == len(got)  # different masks, not one mask many times


def _flood_fill_labels(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components by flood fill, numbered in raster order of their first pixel."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int64)
    n = 0
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = [(y, x)]
                while queue:
                    cy, cx = queue.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            if connectivity == 4 and dy and dx:
                                continue
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not labels[ny, nx]:
                                labels[ny, nx] = n
                                queue.append((ny, nx))
    return labels, n


def test_connected_components_and_small_regions_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(4):
        mask = rng.random((23, 31)) < 0.45
        labels4, n4 = connected_components(mask, connectivity=4)
        ref4, n_ref4 = _flood_fill_labels(mask, connectivity=4)
        assert n4 == n_ref4 and np.array_equal(labels4, ref4)
        labels, n = connected_components(mask)
        ref, n_ref = _flood_fill_labels(mask)
        assert n == n_ref < n4 and np.array_equal(labels, ref)
        for min_area in (3, 8):
            sizes = np.bincount(ref.ravel(), minlength=n_ref + 1)[1:]
            big = [k + 1 for k in range(n_ref) if sizes[k] >= min_area] or [int(np.argmax(sizes)) + 1]
            islands, changed = remove_small_regions(mask, min_area, "islands")
            assert np.array_equal(islands, np.isin(ref, big)) and changed == (len(big) < n_ref)
            holes_lab, n_holes = _flood_fill_labels(~mask)
            hole_sizes = np.bincount(holes_lab.ravel(), minlength=n_holes + 1)[1:]
            small_holes = [k + 1 for k in range(n_holes) if hole_sizes[k] < min_area]
            filled, changed = remove_small_regions(mask, min_area, "holes")
            assert np.array_equal(filled, mask | np.isin(holes_lab, small_holes)) and changed == bool(small_holes)


def test_connected_components_of_a_serpentine():
    """A one-pixel-wide path through the whole image is one component (pointer jumping keeps this quick)."""
    mask = np.zeros((41, 41), dtype=bool)
    mask[::2] = True  # rows joined alternately at the right and the left end
    mask[1::4, -1] = True
    mask[3::4, 0] = True
    labels, n = connected_components(mask, connectivity=4)
    assert n == 1 and (labels[mask] == 1).all() and (labels[~mask] == 0).all()


def test_mask_boxes_are_inclusive_and_zero_when_empty():
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    assert mask_boxes(masks).tolist() == [[2, 1, 5, 3], [0, 0, 0, 0]]


def test_generate_masks_cleans_small_regions():
    model = perturb(create_sam("sam_test"), scale=0.3)
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    raw = generate_masks(model, _scene(), **options)
    clean = generate_masks(model, _scene(), min_mask_region_area=30, **options)
    assert raw and clean
    for r in clean:
        seg = r["segmentation"]
        _, n = connected_components(seg)
        assert n <= 1 or all(s >= 30 for s in np.bincount(connected_components(seg)[0].ravel())[1:])
        assert r["area"] == int(seg.sum())


def test_predictor_errors_say_what_to_do():
    predictor = SamPredictor(create_sam("sam_test"))
    with pytest.raises(ConfigError, match="set_image"):
        predictor.predict(points=[[1, 1]])
    with pytest.raises(PathNotFoundError, match="no such image"):
        predictor.set_image("/nonexistent/image.png")
    predictor.set_image(_scene())
    with pytest.raises(ConfigError, match="outside the 80x60 image"):
        predictor.predict(points=[[81, 10]])
    with pytest.raises(ConfigError, match="one label"):
        predictor.predict(points=[[1, 1], [2, 2]], labels=[1])
    with pytest.raises(ConfigError, match="0 <= x0 < x1"):
        predictor.predict(box=[30, 10, 20, 40])
    with pytest.raises(ConfigError, match="give a prompt"):
        predictor.predict()
    with pytest.raises(ConfigError, match="uint8"):
        predictor.set_image(np.zeros((4, 4), dtype=np.float32))


# ---- vitkit segment -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam")
    weights = save_weights(perturb(create_sam("sam_test"), scale=0.3), root / "sam.safetensors")
    image = root / "scene.png"
    Image.fromarray(_scene()).save(image)
    return weights, image


def _load_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_segment_command_point_prompt_end_to_end(sam_files, tmp_path):
    weights, image = sam_files
    out = tmp_path / "out"
    r = run_vitkit("segment", weights, image, "--point", "20,25", "--out", out, "--json", check=True)
    result = json.loads(r.stdout)
    predictor = SamPredictor(load_sam(weights))
    predictor.set_image(str(image))
    masks, iou, _ = predictor.predict(points=[[20, 25]], labels=[1])
    assert result["mode"] == "prompt" and result["size"] == [80, 60] and len(result["masks"]) == 3
    assert result["best"] == int(np.argmax(iou))
    for k, entry in enumerate(result["masks"]):
        png = _load_png(entry["file"])
        assert entry["file"] == str(out / f"mask_{k}.png") and png.shape == (60, 80)
        assert np.array_equal(png > 0, masks[k]) and entry["area"] == int(masks[k].sum())
        assert entry["predicted_iou"] == pytest.approx(float(iou[k]), abs=1e-5)
    assert json.loads((out / "masks.json").read_text()) == result
    overlay = _load_png(out / "overlay.png")
    assert overlay.shape == (60, 80, 3)
    # Away from the point's marker, the best mask's pixels are coloured and the others keep the image's.
    best, away = masks[result["best"]], np.ones((60, 80), dtype=bool)
    away[15:36, 10:31] = False
    assert (best & away).any() and (~best & away).any()
    assert (overlay[best & away] != _scene()[best & away]).any(-1).all()
    assert np.array_equal(overlay[~best & away], _scene()[~best & away])


def test_segment_command_box_single_and_auto(sam_files, tmp_path, capsys):
    weights, image = sam_files
    assert main(["segment", str(weights), str(image), "--box", "5,8,42,44", "--single", "--out",
                 str(tmp_path / "box")]) == 0
    result = json.loads((tmp_path / "box" / "masks.json").read_text())
    assert len(result["masks"]) == 1 and result["prompt"]["box"] == [5.0, 8.0, 42.0, 44.0]
    assert not (tmp_path / "box" / "mask_1.png").exists()
    options = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0.5"]
    assert main(["segment", str(weights), str(image), "--auto", *options, "--out", str(tmp_path / "auto")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "auto" / "masks.json").read_text())
    expected = generate_masks(load_sam(weights), str(image), points_per_side=4, pred_iou_thresh=0.0,
                              stability_score_thresh=0.5)
    assert expected and len(result["masks"]) == len(expected) and f"{len(expected)} mask" in printed
    for k, (entry, rec) in enumerate(zip(result["masks"], expected)):
        assert np.array_equal(_load_png(tmp_path / "auto" / f"mask_{k}.png") > 0, rec["segmentation"])
        assert entry["bbox"] == rec["bbox"] and entry["stability_score"] == pytest.approx(rec["stability_score"])


@pytest.mark.peer("segment_anything")
def test_segment_command_reads_segment_anything_checkpoints(tmp_path):
    ref, model = _reference_pair()
    torch.save(ref.state_dict(), tmp_path / "sam_tiny.pth")
    image = tmp_path / "scene.png"
    Image.fromarray(_scene()).save(image)
    assert main(["segment", str(tmp_path / "sam_tiny.pth"), str(image), "--point", "60,40", "--single", "--out",
                 str(tmp_path / "out")]) == 0
    predictor = SamPredictor(model)
    predictor.set_image(_scene())
    masks, _, _ = predictor.predict(points=[[60, 40]], multimask=False)
    assert np.array_equal(_load_png(tmp_path / "out" / "mask_0.png") > 0, masks[0])


@pytest.mark.parametrize("args, needle", [
    (["--point", "81,10"], "outside the 80x60 image"),
    (["--box", "30,10,20,40"], "0 <= x0 < x1"),
    (["--point", "5,5", "--point", "6,6", "--label", "1"], "give one label per point"),
    ([], "give a prompt"),
    (["--auto", "--point", "5,5"], "drop --auto"),
])
def test_segment_command_rejects_bad_prompts(sam_files, tmp_path, capsys, args, needle):
    weights, image = sam_files
    assert main(["segment", str(weights), str(image), *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vitkit segment: error:" in err and needle in err and "Traceback" not in err


def test_segment_command_rejects_other_sources_and_missing_images(sam_files, tmp_path, capsys):
    import vitkit

    weights, image = sam_files
    classifier = vitkit.save_weights(vitkit.create_model("test_vit", num_classes=3), tmp_path / "vit.safetensors")
    assert main(["segment", str(classifier), str(image), "--point", "5,5"]) == 2
    assert "not a promptable-segmentation (SAM) model" in capsys.readouterr().err
    assert main(["segment", str(weights), str(tmp_path / "missing.png"), "--point", "5,5"]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "nothing"), str(image), "--point", "5,5"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert_user_error(run_vitkit("segment", weights, image, "--point", "5"), "a point is x,y in pixels")


# ---- the demo's click step (the browser test is test_sam_demo_browser.py) ------------------------------------


def test_click_segmenter_overlays_the_best_mask_and_encodes_once(sam_files):
    from vitkit.interpret.sam_demo import ClickSegmenter

    weights, _ = sam_files
    model = load_sam(weights)
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    seg = ClickSegmenter(model)
    image = _scene()
    picture, text = seg.overlay(image, [(20.0, 25.0, 1)])
    picture2, text2 = seg.overlay(image, [(20.0, 25.0, 1), (60.0, 40.0, 0)])
    assert len(calls) == 1 and picture.shape == image.shape and picture2.shape == image.shape
    assert text.startswith("1 click:") and text2.startswith("2 clicks:")
    ref = SamPredictor(load_sam(weights))
    ref.set_image(image)
    masks, iou, _ = ref.predict(points=[[20, 25]], labels=[1])
    assert f"mask of {int(masks[np.argmax(iou)].sum())} px" in text
    seg.overlay(_scene(64, 64), [(5.0, 5.0, 1)])  # another image: encoded again
    assert len(calls) == 2


def test_demo_builds_the_click_app_for_sam_weights(sam_files):
    require_peer("gradio")
    from vitkit.interpret.demo import build_demo

    weights, _ = sam_files
    demo = build_demo(str(weights))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"input-image", "map", "reset", "click-label"} <= ids
