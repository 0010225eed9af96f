"""Full-resolution dense inference: whole image, sliding windows (against mmseg's slide_inference
written here from its loop), and the objectives' evaluation of padded full-resolution batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.dense.infer import dense_predict
from vitkit.errors import ConfigError, DataError
from vitkit.objectives import build_objective


def tiny_net(out: int = 4) -> nn.Module:
    # Zero-padded 3x3 convolutions: the output near a border depends on where the border is.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, out, 3, padding=1)).eval()


def mmseg_slide(model, img, crop, stride):
    """mmseg's ``slide_inference``, transcribed: logits padded into place, summed, divided by counts."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    b, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds, count_mat, origins = None, img.new_zeros((b, 1, h_img, w_img)), []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_logit = model(img[:, :, y1:y2, x1:x2])
            if preds is None:
                preds = img.new_zeros((b, crop_logit.shape[1], h_img, w_img))
            preds += F.pad(crop_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
            origins.append((y1, x1))
    assert (count_mat == 0).sum() == 0
    return preds / count_mat, origins


@torch.no_grad()
def test_one_window_covering_the_image_is_the_whole_image_bitwise():
    model, x = tiny_net(), torch.randn(2, 3, 20, 28)
    whole = model(x)
    for window in (None, (20, 28), 32, (40, 30)):
        assert torch.equal(dense_predict(model, x, window), whole), window


@torch.no_grad()
def test_sliding_windows_match_mmseg_slide_inference():
    model, x = tiny_net(), torch.randn(2, 3, 23, 37)
    seen = []

    def recording(img):
        seen.append(img.shape[-2:])
        return model(img)

    for window, overlap in ((8, 1 / 3), ((12, 16), 0.5), (10, 0.0), ((30, 9), 1 / 3)):
        wh, ww = (window, window) if isinstance(window, int) else window
        wh, ww = min(wh, 23), min(ww, 37)
        want, origins = mmseg_slide(model, x, (wh, ww), (int(wh * (1 - overlap)), int(ww * (1 - overlap))))
        seen.clear()
        got = dense_predict(recording, x, window, overlap)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # every crop is window-sized and there are as many as in mmseg's grid
        assert all(tuple(s) == (wh, ww) for s in seen) and len(seen) == len(origins)
        # and a windowed 3x3 conv is not the whole-image one: the test can tell them apart
        assert not torch.allclose(got, model(x), atol=1e-4)


@torch.no_grad()
def test_sliding_equals_whole_for_a_per_pixel_model_and_covers_every_pixel():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 1).eval()
    x = torch.randn(1, 3, 31, 45)
    for window in (4, 7, (9, 30), 16, (31, 10)):
        for overlap in (0.0, 1 / 3, 0.75):
            torch.testing.assert_close(dense_predict(conv, x, window, overlap), conv(x), rtol=1e-6, atol=1e-6)
            # a constant model averages to exactly 1 where every pixel is covered (0/0 would be NaN)
            ones = dense_predict(lambda t: torch.ones(t.shape[0], 1, *t.shape[-2:]), x, window, overlap)
            assert torch.equal(ones, torch.ones(1, 1, 31, 45))


def test_bad_window_or_overlap_is_a_config_error():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="overlap"):
        dense_predict(nn.Identity(), x, 8, overlap=1.0)
    with pytest.raises(ConfigError, match="window"):
        dense_predict(nn.Identity(), x, 0)


@torch.no_grad()
def test_padded_batch_is_predicted_per_sample_at_its_true_size():
    model = tiny_net(3)
    obj = build_objective("segment", model, {"window": None}, num_classes=3, ignore_index=255)
    a, b = torch.randn(1, 3, 20, 24), torch.randn(1, 3, 14, 18)
    images = torch.zeros(2, 3, 20, 24)
    images[0], images[1, :, :14, :18] = a[0], b[0]
    mask = torch.full((2, 20, 24), 255, dtype=torch.long)
    mask[0], mask[1, :14, :18] = 0, 1
    batch = {"image": images, "mask": mask, "size": torch.tensor([[20, 24], [14, 18]])}
    logits = obj.eval_outputs(batch)["logits"]
    assert torch.equal(logits[0], model(a)[0]) and torch.equal(logits[1, :, :14, :18], model(b)[0])
    # what the padded image would give differs at the border: the per-sample path matters
    assert not torch.allclose(model(images)[1, :, :14, :18], model(b)[0], atol=1e-4)
    mask[1, 15, 0] = 2  # padding that is not ignore would be scored
    with pytest.raises(DataError, match="padded"):
        obj.eval_outputs(batch)


@torch.no_grad()
def test_depth_objective_evaluates_padded_batches_per_sample():
    model = tiny_net(1)
    obj = build_objective("depth", model, {"loss": "silog"})
    x = torch.randn(2, 3, 16, 20)
    depth = torch.rand(2, 16, 20) + 0.5
    depth[1, 10:] = 0
    out = obj.eval_outputs({"image": x, "depth": depth, "size": torch.tensor([[16, 20], [10, 20]])})["depth"]
    assert torch.equal(out[1, :, :10], model(x[1:, :, :10])[0]) and torch.equal(out[0], model(x[:1])[0])
