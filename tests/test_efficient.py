"""Token merging, token pruning, linear / Performer attention, precision, int8 and compile fallback."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vitkit import create_model
from vitkit.efficient import (
    apply_token_pruning,
    apply_tome,
    autocast,
    compile_for_inference,
    merge_tokens,
    predict_logits,
    prune_tokens,
    quantize_int8,
    reduction_of,
    remove_token_pruning,
    remove_tome,
    tome_schedule,
)
from vitkit.errors import ConfigError
from vitkit.layers import Block, LinearAttention, PerformerAttention
from vitkit.layers.linear_attention import elu_feature_map, linear_attention
from vitkit.layers.performer import favor_features, orthogonal_random_features


def _model(name="test_vit", **kw):
    return create_model(name, num_classes=5, **kw).eval()


# ---------------------------------------------------------------------- ToMe
@pytest.mark.parametrize("name", ["test_vit", "test_deit_distilled", "test_vit_reg", "test_vit_gap", "test_vit_postnorm"])
def test_tome_r0_equals_unpatched_exactly(name):
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=0)
        out = model(x)
    assert torch.equal(out, ref)


def test_tome_changes_tokens_and_remove_restores():
    model = _model()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=3)
        merged = model(x)
        sizes = reduction_of(model).sizes
        # 1 cls + 16 patches; two blocks each merge 3.
        assert sizes.shape == (2, 17 - 6)
        assert torch.allclose(sizes.sum(1), torch.full((2,), 17.0))
        assert not torch.allclose(merged, ref)
        assert list(model.state_dict()) == keys
        remove_tome(model)
        assert type(model.blocks[0]) is Block and "pool" not in model.__dict__
        assert torch.equal(model(x), ref)


def test_merge_preserves_size_weighted_mean_and_total_size():
    B, p, L, D = 3, 2, 11, 8  # odd number of patch tokens
    x = torch.randn(B, p + L, D, dtype=torch.float64)
    sizes = torch.randint(1, 5, (B, p + L)).double()
    metric = torch.randn(B, p + L, 4, dtype=torch.float64)
    out, out_sizes = merge_tokens(x, sizes, metric, r=4, num_protected=p)
    assert out.shape == (B, p + L - 4, D) and out_sizes.shape == (B, p + L - 4)
    before = (x[:, p:] * sizes[:, p:, None]).sum(1) / sizes[:, p:].sum(1, keepdim=True)
    after = (out[:, p:] * out_sizes[:, p:, None]).sum(1) / out_sizes[:, p:].sum(1, keepdim=True)
    assert torch.allclose(before, after, atol=1e-12)
    assert torch.allclose(sizes[:, p:].sum(1), out_sizes[:, p:].sum(1))


def test_merge_averages_the_most_similar_pair_by_size():
    # Patch tokens 0..3: A = {0, 2}, B = {1, 3}; token 2 is nearly token 3, so it merges there.
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    sizes = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.61, 0.79]]])
    out, out_sizes = merge_tokens(x, sizes, metric, r=1)
    # kept A token 0, then B tokens 1 and (2 * 3 + 3 * 1) / 4.
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 1.0, 9.0 / 4]))
    assert torch.equal(out_sizes, torch.tensor([[1.0, 1.0, 4.0]]))


def test_protected_tokens_never_merge():
    B, p, L, D = 2, 3, 9, 6
    x = torch.randn(B, p + L, D)
    # Prefix tokens identical to patch tokens would be the best matches if they could merge.
    x[:, :p] = x[:, p:2 * p]
    sizes = torch.ones(B, p + L)
    out, out_sizes = merge_tokens(x, sizes, x, r=4, num_protected=p)
    assert torch.equal(out[:, :p], x[:, :p]) and torch.equal(out_sizes[:, :p], torch.ones(B, p))
    # In a model: class, distillation and register tokens keep size 1 through every block.
    for name in ("test_deit_distilled", "test_vit_reg"):
        model = apply_tome(_model(name), r=4)
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        s = reduction_of(model).sizes
        assert torch.equal(s[:, :model.num_prefix_tokens], torch.ones(2, model.num_prefix_tokens))


def test_tome_batch_and_odd_token_counts_match_per_sample():
    model = _model()
    x = torch.randn(3, 3, 40, 40)  # 5 x 5 = 25 patch tokens, odd
    apply_tome(model, r=5)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
        assert reduction_of(model).sizes.shape[1] == 1 + 25 - 10
    assert torch.allclose(batched, single, atol=1e-5)


def test_proportional_attention_makes_merging_duplicates_exact():
    # Two kinds of patches, no position embedding: merged tokens are exact duplicates, so with
    # proportional attention and size-weighted pooling ToMe changes nothing; without, it does.
    model = create_model("test_vit_gap", num_classes=0, pos_embed="none").eval()  # output: pooled features
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :24] = 1.0  # rows 0-2 of the 4 x 4 grid one kind, row 3 another
    x[1, 0] += 0.5
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=3)
        out = model(x)
        apply_tome(model, r=3, proportional=False)
        plain = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["test_vit", "test_vit_gap"])
def test_tome_trains_with_gradients_and_copies(name):
    model = _model(name).train()
    apply_tome(model, r=2, schedule="decreasing")
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # An EMA-style deep copy after a training step is patched too, with its own state.
    twin = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(twin(x), model.eval()(x), atol=1e-6)
    assert reduction_of(twin) is not reduction_of(model)
    assert reduction_of(twin).sizes.shape == (2, reduction_of(model).sizes.shape[1])


def test_tome_schedule_and_errors():
    assert tome_schedule(4, 3) == [4, 4, 4]
    assert tome_schedule(4, 5, "decreasing") == [8, 6, 4, 2, 0]
    assert tome_schedule([1, 2], 2) == [1, 2]
    with pytest.raises(ConfigError):
        tome_schedule(-1, 3)
    with pytest.raises(ConfigError):
        tome_schedule(2, 3, "sideways")
    with pytest.raises(ConfigError, match="inflection"):
        tome_schedule(2, 3, 1.5)
    with pytest.raises(ConfigError, match="RoPE"):
        apply_tome(_model("test_vit_modern"), r=2)
    model = _model()
    model.set_grad_checkpointing(True)
    with pytest.raises(ConfigError, match="checkpointing"):
        apply_tome(model, r=2)


def test_tome_works_on_linear_attention_models():
    model = _model(attn_type="linear")
    apply_tome(model, r=2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert reduction_of(model).sizes.shape[1] == 17 - 4


# ---------------------------------------------------------------------- pruning
def test_prune_tokens_keeps_top_scores_and_fuses_the_rest():
    x = torch.arange(6.0).reshape(1, 6, 1)  # cls + 5 patches
    sizes = torch.ones(1, 6)
    scores = torch.tensor([[0.5, 0.1, 0.4, 0.05, 0.3, 0.15]])
    out, out_sizes = prune_tokens(x, sizes, scores, keep_rate=0.4, num_protected=1)
    # ceil(0.4 * 5) = 2 kept: patches 2 and 4 (scores 0.4, 0.3) in order; fused: 1, 3, 5 by score.
    fused = (0.1 * 1 + 0.05 * 3 + 0.15 * 5) / 0.3
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 2.0, 4.0, fused]))
    assert torch.equal(out_sizes, torch.tensor([[1.0, 1.0, 1.0, 3.0]]))


def test_pruning_keeps_the_right_count():
    model = _model()
    apply_token_pruning(model, keep_rate=0.5, layers=[0])
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    sizes = reduction_of(model).sizes
    assert out.shape == (2, 5)
    assert sizes.shape == (2, 1 + 8 + 1)  # cls, 8 kept of 16, one fused
    assert torch.equal(sizes[:, -1], torch.full((2,), 8.0))
    apply_token_pruning(model, keep_rate=0.7, layers=[0, 1])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # 16 -> 12 + 1 fused = 13 -> ceil(0.7 * 13) = 10 + 1 fused.
    assert reduction_of(model).sizes.shape == (2, 1 + 10 + 1)


def test_pruning_keep_all_is_exact_and_errors():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        apply_token_pruning(model, keep_rate=1.0)
        assert torch.equal(model(x), ref)
        remove_token_pruning(model)
    with pytest.raises(ConfigError, match="class token"):
        apply_token_pruning(_model("test_vit_gap"), keep_rate=0.5)
    with pytest.raises(ConfigError):
        apply_token_pruning(model, keep_rate=0.0)
    with pytest.raises(ConfigError, match="out of range"):
        apply_token_pruning(model, keep_rate=0.5, layers=[7])


# ---------------------------------------------------------------------- linear / Performer attention
@pytest.mark.parametrize("attn_type, cls", [("linear", LinearAttention), ("performer", PerformerAttention)])
def test_linear_attention_models_forward_and_backward(attn_type, cls):
    model = create_model("test_vit", num_classes=5, attn_type=attn_type)
    assert isinstance(model.blocks[0].attn, cls)
    out = model(torch.randn(3, 3, 40, 40))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # Same parameter names as softmax attention, so weights move between the attention types.
    assert set(model.state_dict()) - {f"blocks.{i}.attn.feature_proj" for i in range(2)} == set(
        _model().state_dict()
    )
    with pytest.raises(ValueError, match="attn_type"):
        create_model("test_vit", attn_type="sparse")


def test_linear_attention_key_weights_equal_duplicated_keys():
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    dup = linear_attention(fq, torch.cat([fk, fk[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2))
    weighted = linear_attention(fq, fk, v, torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(dup, weighted)
    # The layer takes the same weights as an additive log bias (what merged tokens carry).
    attn = LinearAttention(8, num_heads=2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    bias = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))[None, None, None]
    assert attn(x, attn_bias=bias).shape == (2, 3, 8)
    with pytest.raises(ConfigError, match="per-key"):
        attn(x, attn_bias=torch.zeros(1, 1, 3, 3, dtype=torch.float64))


def test_performer_approximates_softmax_attention_as_features_grow():
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for m in (8, 64, 1024):
        errs = []
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(1, 2, 32, 16, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
            exact = F.scaled_dot_product_attention(q, k, v)
            proj = orthogonal_random_features(m, 16, gen).double()
            approx = linear_attention(favor_features(q, proj, True), favor_features(k, proj, False), v)
            errs.append((approx - exact).abs().mean().item())
        errors[m] = sum(errs) / len(errs)
    assert errors[1024] < errors[64] < errors[8]
    assert errors[1024] < 0.02
    # Features are positive and the layer's default count is head_dim * ln(head_dim).
    layer = PerformerAttention(64, num_heads=4)
    assert layer.num_features == int(16 * math.log(16))
    assert (favor_features(torch.randn(5, 16), layer.feature_proj, False) > 0).all()


# ---------------------------------------------------------------------- precision, int8, compile
def test_bf16_autocast_close_to_fp32_and_fp16_refused_on_cpu():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    ref = predict_logits(model, x)
    bf16 = predict_logits(model, x, "bf16")
    assert bf16.dtype == torch.float32
    assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    with pytest.raises(ConfigError, match="fp16"):
        autocast("fp16", "cpu")
    with pytest.raises(ConfigError):
        autocast("int4")


def test_int8_dynamic_quantization_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=10, embed_dim=128).eval()
    x = torch.randn(16, 3, 32, 32)
    q = quantize_int8(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear  # the original is untouched
    assert isinstance(q.blocks[0].attn.qkv, torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        ref, out = model(x), q(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8


def test_compile_failure_falls_back_to_eager_with_a_message(monkeypatch, capsys):
    model = _model()
    x = torch.randn(1, 3, 32, 32)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    result = compile_for_inference(model, x)
    assert not result.compiled and result.model is model
    assert "no C++ compiler found" in result.reason
    assert "running eager" in capsys.readouterr().err
