"""The public token path: embed -> (tokens, ctx) -> forward_tokens, kept tokens, mask tokens,
attention bias, token sizes, feature_info, and a masked-token objective through the one Trainer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_run,
    assert_same_state,
    crash_and_resume,
    make_trainer,
    noise_transform,
)
from torch import nn
from torch.utils.data import Dataset

import vitkit
from vitkit.layers import Attention, TokenContext, record_attention, sincos_2d_pos_embed
from vitkit.objectives import Objective

VITS = [
    "test_vit", "test_vit_gap", "test_vit_reg", "test_vit_prenorm", "test_vit_postnorm", "test_vit_sincos",
    "test_vit_modern", "test_vit_convstem", "test_deit_distilled",
]


def _model(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return vitkit.create_model(name, **kw).eval()


def _image(b: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def _random_keep(b: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])  # (B, K)


def _by_hand(model, tokens: torch.Tensor, ctx: TokenContext, keep: torch.Tensor) -> torch.Tensor:
    """The kept subset built without ctx.select: gather tokens and positions, run the blocks."""
    npt = model.num_prefix_tokens
    D = tokens.shape[-1]
    x = torch.cat([tokens[:, :npt], torch.stack([t[npt:][k] for t, k in zip(tokens, keep)])], dim=1)
    positions = torch.stack([ctx.positions[0][k] for k in keep])
    rope = model.rope(ctx.grid, positions) if model.rope is not None else None
    assert x.shape == (len(keep), npt + keep.shape[1], D)
    for blk in model.blocks:
        x = blk(x, rope, npt)
    return model.norm(x)


def _vit_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """forward_features written from the ViT algorithm, not through embed / forward_tokens: patchify
    (a strided conv), position rows (resized as an image, bicubic, when the grid differs; sin-cos
    rows recomputed), prefix tokens [cls][dist][reg], pre-norm, the blocks, the final norm."""
    B, p = x.shape[0], model.patch_size[0]
    gh, gw = x.shape[2] // p, x.shape[3] // p
    if isinstance(model.patch_embed.stem, nn.Identity):
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
    else:
        patches = model.patch_embed(x)  # a conv stem: checked against its layers in test_layers
    prefix = [t.expand(B, -1, -1) for t in (model.cls_token, model.dist_token, model.reg_token) if t is not None]
    npt = sum(t.shape[1] for t in prefix)
    pos = model.pos_embed
    if pos is not None:
        rows_prefix = 0 if model.no_embed_class else npt
        rows = pos[:, rows_prefix:]
        H0, W0 = model.patch_embed.grid_size
        if (gh, gw) != (H0, W0):
            if model.pos_embed_type == "sincos":
                rows = sincos_2d_pos_embed(model.embed_dim, (gh, gw))[None]
            else:
                img = rows.reshape(1, H0, W0, -1).permute(0, 3, 1, 2)
                img = F.interpolate(img, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
                rows = img.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        if model.no_embed_class:
            x = torch.cat(prefix + [patches + rows], dim=1)
        else:
            x = torch.cat(prefix + [patches], dim=1) + torch.cat([pos[:, :rows_prefix], rows], dim=1)
    else:
        x = torch.cat(prefix + [patches], dim=1)
    x = model.norm_pre(x)
    rope = model.rope((gh, gw), torch.arange(gh * gw)[None]) if model.rope is not None else None
    for blk in model.blocks:
        x = blk(x, rope, npt)
    return model.norm(x)


@pytest.mark.parametrize("name", VITS)
@pytest.mark.parametrize("size", [(32, 32), (48, 24)])
def test_token_path_equals_the_vit_algorithm_by_hand(name, size):
    m = _model(name)
    x = _image(2, *size)
    with torch.no_grad():
        tokens, ctx = m.embed(x)
        out = m.forward_tokens(tokens, ctx)
        ref = _vit_by_hand(m, x)
        feats = m.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    grid = (size[0] // 8, size[1] // 8)
    assert ctx.grid == grid and ctx.num_prefix_tokens == m.num_prefix_tokens
    assert tokens.shape == (2, m.num_prefix_tokens + grid[0] * grid[1], m.embed_dim)
    assert torch.equal(ctx.positions, torch.arange(grid[0] * grid[1])[None])
    assert ctx.sizes is None and ctx.attn_bias is None


@pytest.mark.parametrize("name", VITS)
def test_zero_attention_bias_and_unit_sizes_are_bit_identical(name):
    """On CPU, SDPA with an all-zero float mask returns bitwise the unmasked result (torch 2.x's
    CPU flash kernel adds the mask to the logits, and s + 0.0 == s), and so does the manual
    capture path. Unit sizes give a log(1) = 0 bias, the same case."""
    m = _model(name)
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        ref = m.forward_tokens(tokens, ctx)
        n = tokens.shape[1]
        zero = replace(ctx, attn_bias=torch.zeros(1, 1, n, n))
        assert torch.equal(m.forward_tokens(tokens, zero), ref)
        assert torch.equal(m.forward_tokens(tokens, replace(ctx, sizes=torch.ones(1, n))), ref)
        with record_attention(m):
            manual = m.forward_tokens(tokens, ctx)
        with record_attention(m):
            manual_zero = m.forward_tokens(tokens, zero)
    assert torch.equal(manual_zero, manual)


def test_neg_inf_bias_on_a_key_equals_dropping_it_by_hand():
    """One attention layer, 3 tokens: a -inf bias on key 1 gives rows 0 and 2 exactly the
    attention over tokens {0, 2} alone, computed here from the definition."""
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).eval()
    x = torch.randn(1, 3, 8)
    bias = torch.tensor([0.0, float("-inf"), 0.0]).reshape(1, 1, 1, 3)
    with torch.no_grad():
        out = attn(x, attn_bias=bias)
        q, k, v = attn.qkv(x[:, [0, 2]]).reshape(1, 2, 3, 2, 4).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)  # head_dim 4: scale 1/2
        ref = attn.proj((w @ v).transpose(1, 2).reshape(1, 2, 8))
    torch.testing.assert_close(out[:, [0, 2]], ref)


@pytest.mark.parametrize("name", VITS)
def test_neg_inf_bias_on_keys_equals_dropping_those_tokens(name):
    """No token attends to the masked keys, so every other token ends as if they were never there."""
    m = _model(name)
    npt = m.num_prefix_tokens
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        L = ctx.num_patches
        dropped = [3, 7, 12]
        kept = torch.tensor([i for i in range(L) if i not in dropped])
        bias = torch.zeros(1, 1, 1, npt + L)
        bias[..., [npt + i for i in dropped]] = float("-inf")
        masked = m.forward_tokens(tokens, replace(ctx, attn_bias=bias))
        subset = m.forward_tokens(tokens, ctx, keep=kept.expand(2, -1))
    torch.testing.assert_close(masked[:, :npt], subset[:, :npt])
    torch.testing.assert_close(masked[:, npt + kept], subset[:, npt:])


@pytest.mark.parametrize("name", VITS)
def test_keep_equals_forward_on_gathered_tokens(name):
    m = _model(name)
    npt = m.num_prefix_tokens
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        keep = _random_keep(2, ctx.num_patches, 5)
        out = m.forward_tokens(tokens, ctx, keep=keep)
        assert out.shape == (2, npt + 5, m.embed_dim)
        assert torch.equal(out, _by_hand(m, tokens, ctx, keep))
        # Keeping every patch in a shuffled order permutes the output: positions follow tokens.
        perm = _random_keep(2, ctx.num_patches, ctx.num_patches, seed=3)
        full = m.forward_tokens(tokens, ctx)
        shuffled = m.forward_tokens(tokens, ctx, keep=perm)
    torch.testing.assert_close(shuffled[:, :npt], full[:, :npt])
    torch.testing.assert_close(shuffled[:, npt:], torch.stack([f[npt:][p] for f, p in zip(full, perm)]))


@pytest.mark.parametrize("name", ["test_vit", "test_vit_sincos", "test_vit_reg"])
def test_keep_with_absolute_positions_equals_embedding_the_subset(name):
    """Learned and sin-cos tables: patchify, add each kept patch's own table row, prepend prefix."""
    m = _model(name)
    x = _image()
    npt = m.num_prefix_tokens
    keep = _random_keep(2, 16, 6)
    with torch.no_grad():
        out = m.forward_tokens(*m.embed(x), keep=keep)
        patches = m.patch_embed(x)  # (B, 16, D)
        prefix = torch.cat([t for t in (m.cls_token, m.reg_token) if t is not None], dim=1).expand(2, -1, -1)
        pe = m.pos_embed
        pe_prefix, pe_grid = (0, pe[0]) if m.no_embed_class else (pe[:, :npt], pe[0, npt:])
        kept = torch.stack([p[k] + pe_grid[k] for p, k in zip(patches, keep)])
        h = torch.cat([prefix + pe_prefix, kept], dim=1)
        for blk in m.blocks:
            h = blk(h, None, npt)
    torch.testing.assert_close(out, m.norm(h), rtol=0, atol=1e-6)


def test_keep_with_rope_uses_the_kept_positions():
    m = _model("test_vit_modern", init_values=None)  # no LayerScale at 1e-5 hiding what attention does
    npt = m.num_prefix_tokens
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        everything = torch.arange(ctx.num_patches).expand(2, -1)
        assert torch.equal(m.forward_tokens(tokens, ctx, keep=everything), m.forward_tokens(tokens, ctx))
        keep = _random_keep(2, ctx.num_patches, 6)
        out = m.forward_tokens(tokens, ctx, keep=keep)
        # The same tokens treated as if they sat at grid places 0..5 give other features.
        sub, sub_ctx = ctx.select(tokens, keep)
        wrong = m.forward_tokens(sub, replace(sub_ctx, positions=torch.arange(6)[None]))
    assert torch.equal(out, _by_hand(m, tokens, ctx, keep))
    assert (out[:, npt:] - wrong[:, npt:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["test_vit", "test_vit_modern"])
def test_select_carries_attention_bias_and_sizes(name):
    m = _model(name)
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        n, npt = tokens.shape[1], ctx.num_prefix_tokens
        bias = torch.randn(1, 2, n, n)
        sizes = torch.rand(2, n) + 0.5
        ctx = replace(ctx, attn_bias=bias, sizes=sizes)
        keep = _random_keep(2, ctx.num_patches, 5)
        sub, sub_ctx = ctx.select(tokens, keep)
        for b in range(2):
            seq = torch.cat([torch.arange(npt), keep[b] + npt])
            assert torch.equal(sub_ctx.attn_bias[b], bias[0][:, seq][:, :, seq])
            assert torch.equal(sub_ctx.sizes[b], sizes[b, seq])
            if ctx.pos_embed is None:
                assert sub_ctx.pos_embed is None
            else:
                assert torch.equal(sub_ctx.pos_embed[b], ctx.pos_embed[0, keep[b]])
        assert torch.equal(m.forward_tokens(tokens, ctx, keep=keep), m.forward_tokens(sub, sub_ctx))


@pytest.mark.parametrize("name", ["test_vit", "test_vit_modern", "test_vit_reg"])
def test_sizes_give_proportional_attention(name):
    """A token of size 2 acts exactly like two copies of it (ToMe's proportional attention)."""
    m = _model(name)
    npt = m.num_prefix_tokens
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        L = ctx.num_patches
        dup = torch.cat([torch.arange(L), torch.tensor([5])]).expand(2, -1)  # patch 5 twice
        twice = m.forward_tokens(tokens, ctx, keep=dup)
        sizes = torch.ones(1, npt + L)
        sizes[0, npt + 5] = 2
        weighted = m.forward_tokens(tokens, replace(ctx, sizes=sizes))
    torch.testing.assert_close(weighted, twice[:, :-1])


def test_bad_keep_has_clear_errors():
    m = _model("test_vit")
    tokens, ctx = m.embed(_image())
    with pytest.raises(ValueError, match="keep indices must lie in"):
        m.forward_tokens(tokens, ctx, keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="keep must be"):
        m.forward_tokens(tokens, ctx, keep=torch.tensor([0, 1]))


@pytest.mark.parametrize("name", VITS)
def test_token_mask_puts_the_mask_token_at_masked_positions(name):
    m = _model(name, mask_token=True)
    npt = m.num_prefix_tokens
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        tokens, ctx = m.embed(_image())
        none = torch.zeros(2, ctx.num_patches, dtype=torch.bool)
        assert torch.equal(m.forward_tokens(tokens, ctx, token_mask=none), m.forward_tokens(tokens, ctx))
        mask = none.clone()
        mask[0, [1, 4]] = True
        mask[1, 9] = True
        m.forward_tokens(tokens, ctx, token_mask=mask)
        fill = m.mask_token[0, 0]
        if m.pos_embed is not None:
            pe_grid = m.pos_embed[0] if m.no_embed_class else m.pos_embed[0, npt:]
            fill = fill + pe_grid  # (L, D): the mask token plus each place's position embedding
        fill = m.norm_pre(fill.expand(ctx.num_patches, -1))
    x = seen[-1]
    assert torch.equal(x[:, :npt], tokens[:, :npt])
    for b in range(2):
        assert torch.equal(x[b, npt:][mask[b]], fill[mask[b]])
        assert torch.equal(x[b, npt:][~mask[b]], tokens[b, npt:][~mask[b]])


def test_mask_token_only_in_models_that_ask_for_it():
    plain, masked = _model("test_vit"), _model("test_vit", mask_token=True)
    assert "mask_token" not in plain.state_dict() and masked.mask_token.shape == (1, 1, 64)
    assert "mask_token" in masked.no_weight_decay()
    # The flag draws the mask token last, so every other parameter is the plain model's.
    sd = masked.state_dict()
    sd.pop("mask_token")
    plain.load_state_dict(sd, strict=True)
    assert_same_state(plain.state_dict(), sd)
    tokens, ctx = plain.embed(_image())
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask_token=True"):
        plain.forward_tokens(tokens, ctx, token_mask=mask)
    # An objective can bring its own mask token instead.
    own = torch.zeros(1, 1, 64)
    out = plain.forward_tokens(tokens, ctx, token_mask=~mask, mask_token=own)
    assert out.shape == tokens.shape
    with pytest.raises(ValueError, match="token_mask must be"):
        masked.forward_tokens(tokens, ctx, token_mask=mask[:, :5])


def test_plain_checkpoint_loads_strictly_into_a_mask_token_model():
    from vitkit.convert import load_weights

    plain, masked = _model("test_vit"), _model("test_vit", mask_token=True)
    token = masked.mask_token.detach().clone()
    report = load_weights(masked, plain.state_dict(), strict=True, verbose=False)
    assert any("mask_token" in n for n in report.notes) and torch.equal(masked.mask_token, token)
    assert torch.equal(masked.pos_embed, plain.pos_embed)


@pytest.mark.parametrize("name", ["test_vit", "test_vit_modern"])
def test_keep_with_grad_checkpointing_and_capture(name):
    m = _model(name)
    x = _image()
    keep = _random_keep(2, 16, 4)
    out = m.forward_tokens(*m.embed(x), keep=keep)
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()), allow_unused=True)
    m.set_grad_checkpointing(True)
    out_ckpt = m.forward_tokens(*m.embed(x), keep=keep)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), list(m.parameters()), allow_unused=True)
    assert torch.equal(out, out_ckpt)
    for g, gc in zip(grads, grads_ckpt):
        assert (g is None and gc is None) or torch.allclose(g, gc, rtol=0, atol=1e-6)
    with torch.no_grad(), record_attention(m) as maps:
        m.forward_tokens(*m.embed(x), keep=keep)
    n = m.num_prefix_tokens + 4
    assert len(maps) == len(m.blocks) and all(a.shape == (2, 2, n, n) for a in maps)


@pytest.mark.parametrize("name", VITS)
def test_feature_info_matches_intermediates(name):
    m = _model(name)
    info = m.feature_info
    assert len(info) == len(m.blocks) == 2
    assert [f["module"] for f in info] == ["blocks.0", "blocks.1"]
    assert all(f["num_chs"] == m.embed_dim and f["reduction"] == 8 for f in info)
    x = _image(2, 32, 48)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x)
    assert torch.equal(final, m.forward_features(x))
    for f, i in zip(feats, info):
        assert f.shape == (2, i["num_chs"], 32 // i["reduction"], 48 // i["reduction"])


# ---------------------------------------------------------------------- a masked-token objective
class Blobs(Dataset):
    """Smooth random images (4x4 noise upsampled to 32x32), so masked patches are predictable."""

    def __init__(self, n: int = 32, seed: int = 0):
        low = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        self.x = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


class TinyMAE(Objective):
    """Encode a random 25% of the patches; a linear decoder regresses the others' pixels from the
    mean encoded token plus a learned embedding of each masked place."""

    def __init__(self, name: str = "test_vit", keep_ratio: float = 0.25, seed: int = 0):
        super().__init__()
        self.model = vitkit.create_model(name, num_classes=0)
        D, (p, _) = self.model.embed_dim, self.model.patch_size
        L = self.model.patch_embed.num_patches
        self.decoder_pos = nn.Parameter(torch.randn(L, D) * 0.02)
        self.decoder = nn.Linear(D, 3 * p * p)
        self.keep = max(1, int(L * keep_ratio))
        self.seed = seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # checkpointed: resume redraws alike

    def _split(self, b: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(self.draws) if self.training else 12345)
        if self.training:
            self.draws += 1
        order = torch.rand(b, L, generator=g).argsort(dim=1)
        return order[:, : self.keep], order[:, self.keep :]

    def forward(self, batch):
        x = batch["image"]
        tokens, ctx = self.model.embed(x)
        keep, masked = self._split(x.shape[0], ctx.num_patches)
        enc = self.model.forward_tokens(tokens, ctx, keep=keep)  # (B, prefix + K, D)
        query = enc[:, self.model.num_prefix_tokens :].mean(1, keepdim=True) + self.decoder_pos[masked]
        pred = self.decoder(query)  # (B, L - K, 3 * p * p)
        p = self.model.patch_size[0]
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, L, 3 * p * p), row-major like the grid
        target = patches.gather(1, masked[..., None].expand(-1, -1, patches.shape[-1]))
        return {"loss": F.mse_loss(pred, target)}


def _mae_trainer(out_dir, **kw):
    torch.manual_seed(0)
    return make_trainer(
        out_dir, objective=TinyMAE(), dataset=Blobs(), val_dataset=Blobs(16, seed=1), transform=noise_transform,
        batch_size=8, epochs=3, optim={"lr": 3e-3}, **kw,
    )


def test_masked_token_objective_trains_on_kept_tokens_only(tmp_path):
    tr = _mae_trainer(tmp_path)
    counts = []
    tr.objective.model.blocks[0].register_forward_pre_hook(lambda mod, args: counts.append(args[0].shape[1]))
    before = tr.evaluate()["loss"]
    s = tr.fit()
    after = tr.evaluate()["loss"]
    assert s["steps"] == 12 and after < before * 0.9
    # 16 patches, 4 kept, plus the class token: the encoder never saw a masked patch.
    assert counts and set(counts) == {4 + 1}
    assert int(tr.objective.draws) == 12


def test_masked_token_objective_resumes_bitwise(tmp_path):
    full = _mae_trainer(tmp_path / "full")
    full.fit()
    resumed = crash_and_resume(_mae_trainer, tmp_path / "run", 6, latest=4, ckpt_every_steps=4)
    assert_same_run(full, resumed)
