"""Two-tower models (vitkit.clip): the ViT options they need (activation by name, norm epsilon,
MAP pooling with timm parity), TwoTower's outputs, the registry, and saving/loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lazy_peer, max_diff, perturb

from vitkit import VisionTransformer, create_model, load_weights
from vitkit.clip import TwoTower, create_clip, is_clip_weights, list_clip_models, load_clip, register_clip
from vitkit.errors import ConfigError, PathNotFoundError, WeightsError
from vitkit.layers import QuickGELU
from vitkit.weights_io import save_weights

timm = lazy_peer("timm")
open_clip = lazy_peer("open_clip")
ATOL = 1e-5
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


# ---------------------------------------------------------------------- ViT options
MAP_CASES = {
    "siglip": dict(class_token=False, global_pool="map"),
    "siglip_gelu_tanh": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "map_with_prefix": dict(class_token=True, reg_tokens=2, no_embed_class=True, global_pool="map"),
}


@pytest.mark.peer("timm")
@pytest.mark.parametrize("case", list(MAP_CASES))
def test_map_pool_matches_timm(case):
    cfg = dict(TINY, num_classes=10, **MAP_CASES[case])
    peer = perturb(timm.models.vision_transformer.VisionTransformer(**cfg))
    ours = VisionTransformer(**cfg).eval()
    report = load_weights(ours, peer.state_dict(), verbose=False)
    assert not report.dropped and not report.resampled
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x), peer(x)) <= ATOL
        feats = ours.forward_features(x)
        assert max_diff(ours.forward_head(feats, pre_logits=True), peer.forward_head(feats, pre_logits=True)) <= ATOL


@pytest.mark.peer("timm")
def test_map_pool_keys_are_timms():
    cfg = dict(TINY, num_classes=0, class_token=False, global_pool="map")
    peer = timm.models.vision_transformer.VisionTransformer(**cfg)
    ours = VisionTransformer(**cfg)
    assert sorted(k for k in ours.state_dict() if k.startswith("attn_pool.")) == sorted(
        k for k in peer.state_dict() if k.startswith("attn_pool."))


def test_map_pool_follows_the_paper():
    """MAP written out from the paper (one learned query, multi-head attention, then an MLP residual)."""
    vit = perturb(VisionTransformer(**TINY, num_classes=0, class_token=False, global_pool="map"))
    p = vit.attn_pool
    tokens = torch.randn(3, 16, 64)
    with torch.no_grad():
        q = p.q(p.latent).reshape(1, 2, 32).transpose(0, 1)  # (heads, 1, hd)
        k, v = p.kv(tokens).reshape(3, 16, 2, 2, 32).permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)  # (B, heads, 1, N)
        y = p.proj((w @ v).transpose(1, 2).reshape(3, 1, 64))
        y = (y + p.mlp.fc2(F.gelu(p.mlp.fc1(F.layer_norm(y, (64,), p.norm.weight, p.norm.bias, 1e-6)))))[:, 0]
        assert max_diff(vit.pool(tokens), y) <= ATOL


def test_map_pool_mask_leaves_padding_out():
    """A key mask (packed variable-length inputs) pools as if the padded tokens were not there."""
    pool = perturb(VisionTransformer(**TINY, num_classes=0, class_token=False, global_pool="map")).attn_pool
    tokens = torch.randn(2, 16, 64)
    valid = torch.tensor([[True] * 16, [True] * 9 + [False] * 7])
    with torch.no_grad():
        masked = pool(tokens, attn_mask=valid[:, None, None, :])
        assert max_diff(masked[1], pool(tokens[1:, :9])[0]) <= ATOL
        assert max_diff(masked[0], pool(tokens[:1])[0]) <= ATOL


def test_vit_defaults_unchanged_and_new_options():
    plain = create_model("test_vit")
    assert not any(k.startswith("attn_pool") for k in plain.state_dict())
    assert isinstance(plain.blocks[0].mlp.act, torch.nn.GELU) and plain.blocks[0].mlp.act.approximate == "none"
    assert plain.norm.eps == 1e-6
    clip_like = create_model("test_vit", act_layer="quick_gelu", norm_eps=1e-5, pre_norm=True)
    assert isinstance(clip_like.blocks[1].mlp.act, QuickGELU)
    assert clip_like.norm.eps == clip_like.norm_pre.eps == clip_like.blocks[0].norm1.eps == 1e-5
    tanh = create_model("test_vit", act_layer="gelu_tanh", global_pool="map", class_token=False)
    assert tanh.attn_pool.mlp.act.approximate == "tanh" and tanh.blocks[0].mlp.act.approximate == "tanh"
    with pytest.raises(ValueError, match="unknown activation"):
        create_model("test_vit", act_layer="swish2")


def test_map_pool_flops_are_counted():
    from vitkit.models.info import count_flops

    avg = create_model("test_vit", global_pool="avg", class_token=False).to("meta")
    mapped = create_model("test_vit", global_pool="map", class_token=False).to("meta")
    # the pool adds q (1 query), kv (16 tokens), proj and its MLP on one token: 2 * (64*64 + 16*64*128 + ...)
    extra = 2 * (64 * 64 + 16 * 64 * 128 + 64 * 64 + 2 * 64 * 256)
    assert count_flops(mapped, (3, 32, 32)) - count_flops(avg, (3, 32, 32)) >= extra


def test_map_pool_switching():
    vit = create_model("test_vit", num_classes=0)
    with pytest.raises(ValueError, match="global_pool='map'"):
        vit.reset_classifier(0, global_pool="map")
    mapped = create_model("test_vit", num_classes=0, global_pool="map")
    mapped.reset_classifier(5, global_pool="token")
    assert mapped.attn_pool is None and mapped(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# ---------------------------------------------------------------------- TwoTower
@pytest.fixture(scope="module")
def clip_test():
    torch.manual_seed(0)
    return create_clip("clip_test").eval()


def test_create_clip_test_shapes_and_outputs(clip_test):
    m = clip_test
    assert isinstance(m, TwoTower) and m.embed_dim == 32 and m.logit_bias is None
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 49000, (3, 16))
    with torch.no_grad():
        img, txt = m.encode_image(images), m.encode_text(tokens)
        out = m(images, tokens)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert torch.allclose(out["image_embeds"], img / img.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out["text_embeds"], txt / txt.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].ndim == 0 and math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-6)
    assert out["logit_bias"] is None
    logits = m.logits(out)
    assert torch.allclose(logits, out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T)
    # The image embedding is the linear projection of the tower's pooled class token.
    with torch.no_grad():
        pooled = m.visual.forward_features(images)[:, 0]
        assert max_diff(img, pooled @ m.visual_proj.weight.T) <= ATOL


def test_logit_scale_is_clamped_to_ln100():
    m = create_clip("clip_test")
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    out = m(torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 16)))
    assert math.isclose(out["logit_scale"].item(), 100.0, rel_tol=1e-6)
    out["logit_scale"].backward()
    assert m.logit_scale.grad.item() == 0  # past the clamp the temperature does not move, as CLIP's


def test_siglip_test_has_bias_and_map_pool():
    m = create_clip("siglip_test").eval()
    assert m.visual.global_pool == "map" and not m.visual.has_class_token
    assert isinstance(m.visual_proj, torch.nn.Identity) and m.default_objective == "siglip"
    assert not m.text.causal and m.text.pool == "last"
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 16)))
    assert out["image_embeds"].shape == (2, 64) and out["logit_bias"].item() == -10.0
    assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-6)
    logits = m.logits(out)
    assert torch.allclose(logits, 10 * out["image_embeds"] @ out["text_embeds"].T - 10)


def test_tokenize_uses_the_models_tokenizer(clip_test):
    from vitkit.text import ClipTokenizer

    texts = ["a photo of a cat.", "A RED circle on a blue background!"]
    ids = clip_test.tokenize(texts)
    assert ids.dtype == torch.int64 and ids.shape == (2, 16)
    assert torch.equal(ids, ClipTokenizer(context_length=16)(texts))
    assert ids[0, 0] == 49406 and (ids == 49407).sum() == 2
    with torch.no_grad():
        assert torch.equal(clip_test.encode_text(texts), clip_test.encode_text(ids))


def test_a_trained_tokenizer_fits_the_text_tower(tmp_path):
    from vitkit.text import train_caption_tokenizer

    captions = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
                for b in ("white", "black")]
    tok = train_caption_tokenizer(captions * 3, vocab_size=300, context_length=16)
    m = create_clip("clip_test", tokenizer=tok).eval()
    assert m.text.vocab_size == tok.vocab_size and m.text.token_embedding.num_embeddings == tok.vocab_size
    # Its end-of-text id is not its largest, so CLIP's argmax pooling would miss it: pool at the id.
    assert tok.eot_id != tok.vocab_size - 1 and m.text.pool == "eot" and m.text.eot_id == tok.eot_id
    ids = m.tokenize(captions[:2])
    assert torch.equal(ids, tok(captions[:2], context_length=16))
    loaded = load_clip(save_weights(m, tmp_path / "m.safetensors"))  # the vocabulary travels in the file
    assert torch.equal(loaded.tokenize(captions[:2]), ids)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(captions[:2]), m.encode_text(ids))
    with pytest.raises(ConfigError, match="vocab_size"):
        create_clip("clip_test", vocab_size=100).set_tokenizer(tok)


def test_tokenize_without_tokenizer_is_a_clear_error():
    m = create_clip("siglip_test", tokenizer=None)
    with pytest.raises(ConfigError, match="no tokenizer"):
        m.tokenize("a cat")


def test_image_features_second_to_last_block(clip_test):
    m = clip_test
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.image_features(x)
        with_prefix = m.image_features(x, drop_prefix=False)
        tokens, ctx = m.visual.embed(x)
        ref = m.visual.blocks[0](tokens)  # the output of block depth-2 (= 0 for a 2-block tower)
    assert feats.shape == (2, 16, 64) and with_prefix.shape == (2, 17, 64)
    assert max_diff(with_prefix, ref) <= ATOL and max_diff(feats, ref[:, 1:]) <= ATOL


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = create_clip("siglip_test")
    x, t = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 16))

    def grads():
        m.zero_grad()
        out = m(x, t)
        m.logits(out).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.set_grad_checkpointing(True)
    assert m.visual.grad_checkpointing and m.text.grad_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(m.parameters()))
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)
    assert len(m.block_modules()) == 4


def test_no_weight_decay_names(clip_test):
    names = clip_test.no_weight_decay()
    params = dict(clip_test.named_parameters())
    assert {"logit_scale", "visual.pos_embed", "visual.cls_token", "text.positional_embedding"} <= names
    assert names <= set(params)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = create_clip("siglip_test").eval()
    path = save_weights(m, tmp_path / "run" / "model.safetensors")
    assert is_clip_weights(path) and is_clip_weights(path.parent)
    assert not is_clip_weights(save_weights(create_model("test_vit"), tmp_path / "vit.safetensors"))
    x, t = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 16))
    for loaded in (load_clip(path), load_clip(path.parent), create_clip(str(path))):
        assert not loaded.training and loaded.model_args == m.model_args
        with torch.no_grad():
            a, b = m(x, t), loaded(x, t)
        assert torch.equal(a["image_embeds"], b["image_embeds"]) and torch.equal(a["text_embeds"], b["text_embeds"])
        assert torch.equal(a["logit_bias"], b["logit_bias"])
    assert loaded.card.mean == m.card.mean == (0.5, 0.5, 0.5)
    # pretrained= loads saved weights into a freshly built variant
    again = create_clip("siglip_test", pretrained=path)
    assert torch.equal(again.visual.attn_pool.latent, m.visual.attn_pool.latent)


def test_load_errors(tmp_path):
    with pytest.raises(PathNotFoundError):
        load_clip(tmp_path / "missing.safetensors")
    vit = save_weights(create_model("test_vit"), tmp_path / "vit.safetensors")
    with pytest.raises((ConfigError, WeightsError)):
        load_clip(vit)
    siglip = save_weights(create_clip("siglip_test"), tmp_path / "siglip.safetensors")
    with pytest.raises(WeightsError, match="does not fit"):
        create_clip("clip_test", pretrained=siglip)


def test_registry_and_overrides():
    names = list_clip_models()
    for n in ("clip_vit_b32", "clip_vit_b16", "siglip_vit_b16", "clip_test", "siglip_test", "clip_nano", "siglip_nano"):
        assert n in names
    assert list_clip_models("siglip_*") == [n for n in names if n.startswith("siglip_")]
    with pytest.raises(ConfigError, match="did you mean clip_test"):
        create_clip("clip_tset")
    with pytest.raises(ConfigError, match="unknown two-tower override"):
        create_clip("clip_test", depth=3)
    m = create_clip("clip_test", img_size=48, context_length=8, embed_dim=16, text={"depth": 1, "output_dim": 16})
    assert m.card.input_size == (3, 48, 48) and len(m.text.blocks) == 1 and m.text.context_length == 8
    assert m.tokenizer_config["context_length"] == 8 and m.tokenize("a cat").shape == (1, 8)
    with pytest.raises(ConfigError, match="output_dim=32"):
        create_clip("clip_test", text={"output_dim": 8})
    with pytest.raises(ConfigError, match="image_proj='none'"):
        create_clip("clip_test", image_proj="none")
    other = create_clip("clip_test", image={"model": "test_vit_gap"})
    assert other.visual.global_pool == "avg" and other.visual.model_name == "test_vit_gap"


def test_register_clip_variant():
    @register_clip("clip_test_wide_for_tests")
    def _wide():
        from vitkit.clip import clip_model_args

        args = clip_model_args("clip_test")
        args["embed_dim"] = 48
        args["text"]["output_dim"] = 48
        args.pop("name")
        return args

    m = create_clip("clip_test_wide_for_tests")
    assert m.embed_dim == 48 and m.model_name == "clip_test_wide_for_tests"
    with pytest.raises(ValueError, match="twice"):
        register_clip("clip_test_wide_for_tests")(_wide)


def test_two_tower_from_any_backbone():
    from vitkit.text import TextTransformer

    tower = create_model("test_vit", num_classes=7)
    text = TextTransformer(vocab_size=100, context_length=8, width=32, depth=1, num_heads=2, output_dim=24)
    m = TwoTower(tower, text, 24)
    assert m.visual.num_classes == 0 and m.model_args["image"]["num_classes"] == 0
    assert m.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 24)
    with pytest.raises(ConfigError, match="image_proj"):
        TwoTower(tower, text, 24, image_proj="conv")


def test_nano_variants_build_and_run():
    for name, dim in (("clip_nano", 128), ("siglip_nano", 192)):
        m = create_clip(name).eval()
        assert m.card.input_size == (3, 64, 64) and m.text.context_length == 32
        with torch.no_grad():
            out = m(torch.randn(2, 3, 64, 64), m.tokenize(["a red square", "a blue circle on green"]))
        assert out["image_embeds"].shape == (2, dim)


@pytest.mark.peer("open_clip")
def test_openai_sizes_match_open_clip_parameter_counts():
    """clip_vit_b32/b16 have exactly the parameters of open_clip's OpenAI-layout ViT-B models."""
    for ours, theirs in (("clip_vit_b32", "ViT-B-32"), ("clip_vit_b16", "ViT-B-16")):
        with torch.device("meta"):
            peer = open_clip.create_model(theirs, pretrained=None, device="meta")
            m = create_clip(ours)
        count = sum(p.numel() for p in m.parameters())
        assert count == sum(p.numel() for p in peer.parameters()), (ours, count)
