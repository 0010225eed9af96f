"""ToMe against its reference code (facebookresearch/ToMe), written out here independently of vitkit.

No installable peer exists (ToMe is not on PyPI), so the reference algorithm is restated below
from ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``),
``tome/patch/timm.py`` (the block: attention with log-size bias, merge between attention and
MLP, keys averaged over heads as the metric) and ``tome/utils.py`` (``parse_r``). vitkit must
merge the same token sets, in the same output order, with the same features and sizes, and
schedule the same r per block.
"""

import math

import pytest
import torch

from vitkit import create_model
from vitkit.efficient import apply_tome, merge_tokens, reduction_of, tome_schedule


# ---------------------------------------------------------------------- the reference, restated
def ref_bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def ref_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def ref_merge_source(merge, x, source=None):
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def ref_parse_r(num_layers, r):
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _sources(out, out_sizes):
    """Which input tokens each output token of ``merge_tokens`` stands for, from one-hot inputs."""
    return (out * out_sizes[..., None]).round().bool()


# ---------------------------------------------------------------------- one merge
CASES = [  # (protected tokens, tokens in the sequence)
    (0, 16), (0, 17), (1, 17), (1, 26), (2, 18), (2, 27),
]


@pytest.mark.parametrize("p,N", CASES)
@pytest.mark.parametrize("r", [1, 3, 7, "max", "over"])
def test_merge_tokens_matches_reference_sets_order_and_features(p, N, r):
    g = torch.Generator().manual_seed(1000 * p + N)
    B, D, C = 3, 12, 8
    r_max = (N - p) // 2
    r = {"max": r_max, "over": r_max + 5}.get(r, r)
    metric = torch.randn(B, N, C, generator=g)
    x = torch.randn(B, N, D, generator=g)
    sizes = torch.randint(1, 6, (B, N), generator=g).float()
    sizes[:, :p] = 1.0  # prefix tokens are never merged, so they always have size 1

    merge = ref_bipartite_soft_matching(metric, r, class_token=p >= 1, distill_token=p >= 2)
    ref_x, ref_size = ref_merge_wavg(merge, x, sizes[..., None])
    ref_src = ref_merge_source(merge, x).bool()

    # Same merged sets, in the same order: merge one-hot tokens and read off their members.
    eye = torch.eye(N).expand(B, N, N)
    out, out_sizes = merge_tokens(eye, torch.ones(B, N), metric, r, num_protected=p)
    assert out.shape == (B, N - min(r, r_max), N)
    assert torch.equal(_sources(out, out_sizes), ref_src)
    # Same features and sizes on real inputs (float32, the same operations: equal to rounding).
    got_x, got_size = merge_tokens(x, sizes, metric, r, num_protected=p)
    assert torch.equal(got_size, ref_size[..., 0])
    torch.testing.assert_close(got_x, ref_x, rtol=1e-6, atol=1e-6)


def test_class_token_keeps_the_reference_parity_and_order():
    # With a class token the reference splits A/B over the whole sequence (class token in A at
    # -inf), not over the patch tokens: on this input the two splits merge different pairs.
    # Patch tokens 1..4 (A = {2, 4}, B = {1, 3}, class token 0 in A). Token 4 is nearly token 3.
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [0.61, 0.79, 0.0]]])
    x = torch.arange(5.0).reshape(1, 5, 1)
    out, sizes = merge_tokens(x, torch.ones(1, 5), metric, r=1, num_protected=1)
    # cls, unmerged A token 2, then B tokens 1 and (3 + 4) / 2.
    assert out[0, :, 0].tolist() == [0.0, 2.0, 1.0, 3.5]
    assert sizes[0].tolist() == [1.0, 1.0, 1.0, 2.0]


# ---------------------------------------------------------------------- whole models
def _ref_tome_features(model, images, per_block, class_token, distill_token):
    """ToMe's patched timm forward (tome/patch/timm.py) over the model's own layers."""
    x, _ = model.embed(images)
    size = None
    for blk, r in zip(model.blocks, per_block):
        attn = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            a = a + size.log()[:, None, None, :, 0]
        h = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + attn.proj(h)
        if r > 0:
            merge = ref_bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
            x, size = ref_merge_wavg(merge, x, size)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size


@pytest.mark.parametrize("name,kw", [
    ("test_vit", {}), ("test_deit_distilled", {}), ("test_vit_gap", {}), ("test_vit", {"depth": 4}),
])
@pytest.mark.parametrize("r,schedule", [(5, "constant"), (12, "constant"), (40, "constant"), (6, "decreasing")])
def test_tome_model_matches_reference_forward(name, kw, r, schedule):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kw).eval()
    for blk in model.blocks:  # the reference block has no layer scale and no post-norm
        assert isinstance(blk.ls1, torch.nn.Identity) and not blk.post_norm
    images = torch.randn(2, 3, 64, 64)  # 8 x 8 = 64 patch tokens
    depth = len(model.blocks)
    inflect = {"constant": 0.0, "decreasing": -1.0}[schedule]
    per_block = ref_parse_r(depth, (r, inflect))
    with torch.no_grad():
        ref, ref_size = _ref_tome_features(
            model, images, per_block, class_token=model.has_class_token, distill_token=model.dist_token is not None
        )
        apply_tome(model, r=r, schedule=schedule)
        got = model.forward_features(images)
    assert reduction_of(model).settings["r"] == per_block
    assert got.shape == ref.shape
    assert torch.equal(reduction_of(model).sizes, ref_size[..., 0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- the schedule
def test_decreasing_schedule_truncates_like_parse_r():
    assert tome_schedule(8, 12, "decreasing") == ref_parse_r(12, (8, -1.0))
    assert sum(tome_schedule(8, 12, "decreasing")) == 91  # ToMe truncates; rounding would give 96
    for depth in (2, 3, 5, 6, 12, 24):
        for r in range(0, 17):
            assert tome_schedule(r, depth) == ref_parse_r(depth, r)
            for inflect in (-1.0, -0.5, 0.0, 0.3, 1.0):
                assert tome_schedule(r, depth, inflect) == ref_parse_r(depth, (r, inflect)), (r, depth, inflect)
            assert tome_schedule(r, depth, "decreasing") == ref_parse_r(depth, (r, -1.0))
