"""NaFlex: native aspect ratio through the ViT token path.

Packed batches of images at different aspect ratios equal each image's own plain forward (the
conv patch embedding and the model's own position resampling, an independent path); the grid
rule and the patch layout equal timm's NaFlex transforms; converted weights give timm NaFlexVit's
outputs on the same packed batch.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import lazy_peer, max_diff, perturb, require_peer
from PIL import Image

import vitkit
from vitkit.data.augment import Normalize
from vitkit.data.naflex import (
    NaFlexCollate,
    NaFlexTransform,
    naflex_grid,
    naflex_patchify,
    normalize_patches,
    pack,
    patchify,
)
from vitkit.errors import DataError
from vitkit.models.naflex import naflex_embed, naflex_forward, naflex_forward_features, naflex_pool

timm = lazy_peer("timm")
needs_timm = pytest.mark.peer("timm")

ATOL = 1e-5
# Patch grids of 8 px patches: wide, square at the build grid, tall, one row, and a single patch.
GRIDS = [(2, 5), (4, 4), (5, 2), (1, 3), (1, 1)]
VITS = ["test_vit", "test_vit_gap", "test_vit_reg", "test_vit_prenorm", "test_vit_sincos", "test_vit_modern",
        "test_deit_distilled"]


def _images(grids=GRIDS, patch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * patch, w * patch, generator=g) for h, w in grids]


def _model(name: str, **kw):
    torch.manual_seed(0)
    return perturb(vitkit.create_model(name, num_classes=5, **kw), scale=0.05)


@pytest.mark.parametrize("name", VITS)
def test_packed_batch_equals_each_image_alone(name):
    model = _model(name)
    images = _images()
    batch = pack([patchify(im, 8) for im in images])
    assert batch["patches"].shape == (len(images), 16, 8 * 8 * 3)
    npt = model.num_prefix_tokens
    with torch.no_grad():
        packed = naflex_forward_features(model, batch["patches"], batch["patch_coord"], batch["patch_valid"])
        logits = naflex_forward(model, batch)
        for i, im in enumerate(images):
            alone = model.forward_features(im[None])[0]  # conv patchify, the model's own position rows
            n = alone.shape[0]
            assert max_diff(packed[i, :n], alone) <= ATOL
            assert not batch["patch_valid"][i, n - npt:].any()
            assert max_diff(logits[i], model(im[None])[0]) <= ATOL


def test_patch_order_and_padding_do_not_matter():
    """Patches are placed by their coordinates: shuffling them (and padding more) permutes the output."""
    model = _model("test_vit_modern")  # RoPE, registers: positions must follow the tokens
    images = _images([(3, 5), (2, 2)])
    seqs = [patchify(im, 8) for im in images]
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(p.shape[0], generator=g) for p, _, _ in seqs]
    shuffled = [(p[o], c[o], grid) for (p, c, grid), o in zip(seqs, perms)]
    a, b = pack(seqs), pack(shuffled, max_patches=20)
    npt = model.num_prefix_tokens
    with torch.no_grad():
        ta = naflex_forward_features(model, a["patches"], a["patch_coord"], a["patch_valid"])
        tb = naflex_forward_features(model, b["patches"], b["patch_coord"], b["patch_valid"])
    for i, o in enumerate(perms):
        n = o.numel()
        assert max_diff(tb[i, :npt], ta[i, :npt]) <= ATOL
        assert max_diff(tb[i, npt:npt + n], ta[i, npt:npt + n][o]) <= ATOL
    model.global_pool = "avg"
    pooled = naflex_pool(model, tb, b["patch_valid"])
    valid = [ta[i, npt:npt + o.numel()].mean(0) for i, o in enumerate(perms)]
    assert max_diff(pooled, torch.stack(valid)) <= ATOL


def test_embed_context_follows_the_token_path():
    model = _model("test_vit")
    batch = pack([patchify(im, 8) for im in _images([(2, 3), (4, 4)])])
    tokens, ctx = naflex_embed(model, batch["patches"], batch["patch_coord"], batch["patch_valid"])
    assert ctx.grid == (4, 4) and ctx.num_prefix_tokens == 1
    assert ctx.pos_embed.shape == (2, 16, 64)
    assert ctx.attn_bias.shape == (2, 1, 1, 17)
    # Image 0 has 6 real patches: keys 7.. are masked, the class token and real patches are not.
    assert (ctx.attn_bias[0, 0, 0, :7] == 0).all() and (ctx.attn_bias[0, 0, 0, 7:] < -1e30).all()
    assert (ctx.attn_bias[1] == 0).all()
    assert ctx.positions[0, :6].tolist() == [0, 1, 2, 4, 5, 6]  # (row, col) in the batch's 4-wide grid
    # An unpadded batch takes no bias at all: attention keeps its unmasked kernel.
    full = pack([patchify(im, 8) for im in _images([(4, 4)])])
    assert naflex_embed(model, full["patches"], full["patch_coord"], full["patch_valid"])[1].attn_bias is None


def test_gradients_reach_patch_embedding_and_positions():
    model = _model("test_vit_gap").train()
    batch = pack([patchify(im, 8) for im in _images([(2, 5), (3, 3)])])
    naflex_forward(model, batch).sum().backward()
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---- the data side ---------------------------------------------------------------------------------


def _grid_by_brute_force(h: int, w: int, p: int, m: int) -> tuple[int, int]:
    """The definition, checked at every scale where a side reaches whole patches (exact fractions):
    the largest r with ceil(h r / p) * ceil(w r / p) <= m, and the grid at that r."""
    from fractions import Fraction
    from math import ceil

    best = None
    for r in {Fraction(k * p, h) for k in range(1, m + 1)} | {Fraction(k * p, w) for k in range(1, m + 1)}:
        grid = (max(1, ceil(h * r / p)), max(1, ceil(w * r / p)))
        if grid[0] * grid[1] <= m and (best is None or r > best[0]):
            best = (r, grid)
    return best[1]


def test_grid_rule_keeps_the_budget_and_the_aspect_ratio():
    for (h, w), p, m in [((480, 640), 16, 256), ((100, 1000), 16, 64), ((37, 50), 8, 64), ((4000, 30), 14, 100),
                         ((7, 7), 8, 49), ((31, 64), 16, 5)]:
        gh, gw = naflex_grid((h, w), p, m)
        assert gh * gw <= m
        assert (gh, gw) == _grid_by_brute_force(h, w, p, m), (h, w, p, m)
        # One scale r makes both sides round up to (gh, gw): the aspect ratio is kept up to rounding.
        assert max((gh - 1) / h, (gw - 1) / w) < min(gh / h, gw / w)
    assert naflex_grid((10, 10), 16, 1) == (1, 1)
    assert naflex_grid((64, 32), 8, 512, max_ratio=1.0) == (8, 4)  # no upsampling beyond 1x


@needs_timm
def test_grid_rule_matches_timm():
    naflex_tf = require_peer("timm.data.naflex_transforms")
    rng = random.Random(0)
    cases = [((rng.randint(8, 900), rng.randint(8, 900)), rng.choice([8, 14, 16]), rng.choice([16, 49, 64, 256, 576]))
             for _ in range(300)]
    cases += [((224, 224), 16, 196), ((100, 1000), 16, 64), ((1000, 100), 16, 64), ((17, 900), 16, 256)]
    for hw, p, m in cases:
        _, (th, tw) = naflex_tf.get_image_size_for_seq(hw, p, m)
        assert naflex_grid(hw, p, m) == (th // p, tw // p), (hw, p, m)


@needs_timm
def test_patchify_matches_timm_pipeline():
    """PIL image -> timm's ResizeToSequence + Patchify equals naflex_patchify (uint8, same layout)."""
    naflex_tf = require_peer("timm.data.naflex_transforms")
    arr = np.random.default_rng(0).integers(0, 256, (37, 61, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    patches, coords, grid = naflex_patchify(img, 8, 64)
    resized = naflex_tf.ResizeToSequence(8, 64, interpolation="bicubic")(img)
    ref = naflex_tf.Patchify(8)(resized)  # PIL -> [0, 1] floats, then timm's patch layout
    assert grid[0] * grid[1] == patches.shape[0] <= 64
    assert patches.dtype == torch.uint8
    assert torch.equal((ref["patches"] * 255).round().to(torch.uint8), patches)
    assert torch.equal(ref["patch_coord"], coords)


def test_tensor_patchify_resizes_like_interpolate():
    img = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    patches, coords, (gh, gw) = naflex_patchify(img, 8, 32)
    assert (gh, gw) == naflex_grid((30, 50), 8, 32) and patches.shape == (gh * gw, 192)
    ref = torch.nn.functional.interpolate(img[None].float(), size=(gh * 8, gw * 8), mode="bicubic",
                                          antialias=True, align_corners=False)[0].round().clamp(0, 255)
    # Patch (r, c) holds pixels [8r:8r+8, 8c:8c+8] in (row, col, channel) order.
    r, c = coords[gw + 1].tolist()
    assert (r, c) == (1, 1)
    assert torch.equal(patches[gw + 1].reshape(8, 8, 3), ref[:, 8:16, 8:16].permute(1, 2, 0).to(torch.uint8))


def test_normalize_patches_equals_normalising_the_image():
    img = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    a = normalize_patches(patchify(img, 8)[0])
    b = patchify(Normalize().normalize(img[None])[0], 8)[0]
    assert max_diff(a, b) <= 1e-6
    gray = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert max_diff(normalize_patches(patchify(gray, 8)[0], in_chans=1),
                    patchify(Normalize().normalize(gray[None])[0], 8)[0]) <= 1e-6


def test_collate_packs_loader_samples():
    tf = NaFlexTransform(8, max_patches=12, flip=True)
    imgs = [Image.new("RGB", (40, 16), (200, 10, 10)), Image.new("L", (16, 48), 90), Image.new("RGB", (8, 8))]
    samples = [{"image": tf(im, random.Random(i)), "label": i, "index": i, "bad_files": []}
               for i, im in enumerate(imgs)]
    batch = NaFlexCollate(max_patches=12)(samples)
    assert batch["patches"].shape == (3, 12, 192) and batch["patches"].dtype == torch.uint8
    assert batch["label"].tolist() == [0, 1, 2] and batch["index"].tolist() == [0, 1, 2]
    assert batch["skipped"].tolist() == [0, 0, 0] and batch["bad_files"] == []
    counts = batch["patch_valid"].sum(1).tolist()
    assert counts == [s["image"][0].shape[0] for s in samples] and max(counts) <= 12
    assert "image" not in batch
    # The packed batch runs through a model once normalised.
    model = _model("test_vit")
    batch["patches"] = normalize_patches(batch["patches"])
    with torch.no_grad():
        assert naflex_forward(model, batch).shape == (3, 5)
    # Bare naflex_patchify outputs pack to the longest sequence.
    assert NaFlexCollate()([s["image"] for s in samples])["patches"].shape[1] == max(counts)


def test_bad_input_gets_clear_errors():
    model = _model("test_vit")
    batch = pack([patchify(im, 8) for im in _images([(2, 2)])])
    with pytest.raises(ValueError, match="normalise them first"):
        naflex_forward(model, {**batch, "patches": batch["patches"].to(torch.uint8)})
    with pytest.raises(ValueError, match=r"patches must be \(B, L, 192\)"):
        naflex_forward(model, pack([patchify(torch.randn(3, 16, 16), 4)]))
    with pytest.raises(ValueError, match="needs \\['patch_valid'\\]"):
        naflex_forward(model, {"patches": batch["patches"], "patch_coord": batch["patch_coord"]})
    with pytest.raises(ValueError, match="convolutional stem"):
        naflex_forward(_model("test_vit_convstem"), batch)
    with pytest.raises(DataError, match="more than max_patches=2"):
        pack([patchify(torch.randn(3, 16, 16), 8)], max_patches=3 - 1)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(torch.randn(3, 10, 16), 8)


# ---- parity with timm NaFlexVit --------------------------------------------------------------------


def _timm_to_vitkit(sd: dict, patch: int, chans: int) -> dict:
    """timm NaFlexVit keys -> vitkit ViT keys: the linear patch embedding back to a conv, the (1, H, W, D)
    position grid flattened."""
    out = {}
    for k, v in sd.items():
        if k == "embeds.proj.weight":
            out["patch_embed.proj.weight"] = v.reshape(v.shape[0], patch, patch, chans).permute(0, 3, 1, 2)
        elif k == "embeds.proj.bias":
            out["patch_embed.proj.bias"] = v
        elif k == "embeds.pos_embed":
            out["pos_embed"] = v.flatten(1, 2)
        elif k.startswith("embeds."):
            out[k[len("embeds."):]] = v
        else:
            out[k] = v
    return out


@needs_timm
@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_timm_naflexvit_parity(pool):
    if pool not in vitkit.VisionTransformer.pools:
        pytest.skip(f"this VisionTransformer has no global_pool={pool!r}")
    naflexvit = require_peer("timm.models.naflexvit")
    cls = pool == "token"
    peer = naflexvit.NaFlexVit(
        num_classes=5, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=cls, reg_tokens=1,
        global_pool=pool, pos_embed_grid_size=(4, 4), embed_proj_type="linear",
    )
    perturb(peer)
    ours = vitkit.VisionTransformer(
        img_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=2, num_heads=2, class_token=cls,
        reg_tokens=1, no_embed_class=True, global_pool=pool,
    ).eval()
    ours.load_state_dict(_timm_to_vitkit(peer.state_dict(), 8, 3), strict=True)
    images = _images([(2, 6), (4, 4), (6, 3), (1, 2)], seed=1)  # grids below, at and above the table's 4x4
    batch = pack([patchify(im, 8) for im in images], max_patches=20)
    with torch.no_grad():
        ref = peer.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"])["patches"]
        tokens = naflex_forward_features(ours, batch["patches"], batch["patch_coord"], batch["patch_valid"])
        npt = ours.num_prefix_tokens
        keep = torch.cat([torch.ones(len(images), npt, dtype=torch.bool), batch["patch_valid"]], dim=1)
        assert max_diff(tokens[keep], ref[keep]) <= ATOL
        logits = naflex_forward(ours, batch)
        assert max_diff(logits, peer(batch)) <= ATOL
        for i, im in enumerate(images):  # and each image alone, through the plain forward
            assert max_diff(logits[i], ours(im[None])[0]) <= ATOL


def test_kept_tokens_follow_their_images():
    """MAE-style ``keep`` on a packed batch: each image's kept tokens equal that image's own kept forward."""
    model = _model("test_vit_modern")
    images = _images([(2, 5), (3, 2)])
    batch = pack([patchify(im, 8) for im in images])
    keep = torch.tensor([[7, 0, 3], [5, 1, 2]])  # valid patches of each image, any order
    with torch.no_grad():
        tokens, ctx = naflex_embed(model, batch["patches"], batch["patch_coord"], batch["patch_valid"])
        packed = model.forward_tokens(tokens, ctx, keep=keep)
        for i, im in enumerate(images):
            alone = model.forward_tokens(*model.embed(im[None]), keep=keep[i:i + 1])
            assert max_diff(packed[i], alone[0]) <= ATOL
