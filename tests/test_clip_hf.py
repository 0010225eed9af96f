"""transformers CLIPModel / SiglipModel -> TwoTower: random tiny peers, converted, give the same
image embeddings, text embeddings and logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb

from vitkit.clip import build_two_tower, convert_hf_clip, convert_hf_siglip, load_clip
from vitkit.errors import ConfigError, WeightsError
from vitkit.weights_io import save_weights

transformers = lazy_peer("transformers")
pytestmark = pytest.mark.peer("transformers")
ATOL = 1e-5
VOCAB = 1000


def _tiny(text: dict | None = None, vision: dict | None = None) -> dict:
    common = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=2)
    return dict(
        text_config={**common, "vocab_size": VOCAB, "max_position_embeddings": 16, **(text or {})},
        vision_config={**common, "image_size": 32, "patch_size": 8, **(vision or {})},
    )


def _features(out) -> torch.Tensor:
    # transformers 5 returns the model output with the projected pooler_output; 4.x the tensor.
    return getattr(out, "pooler_output", out)


def _tokens(eot: int, lengths=(5, 16, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 1, (len(lengths), 16), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = eot
        ids[i, n:] = 0
    return ids


def _compare(peer, model, tokens: torch.Tensor, image_size: int = 32) -> None:
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peer(input_ids=tokens, pixel_values=x)
        out = model(x, tokens)
        assert max_diff(model.encode_image(x), _features(peer.get_image_features(pixel_values=x))) <= ATOL
        assert max_diff(model.encode_text(tokens), _features(peer.get_text_features(input_ids=tokens))) <= ATOL
        assert max_diff(out["image_embeds"], ref.image_embeds) <= ATOL
        assert max_diff(out["text_embeds"], ref.text_embeds) <= ATOL
        assert max_diff(model.logits(out), ref.logits_per_image) <= ATOL


def _convert(convert, peer, config: dict):
    args, sd = convert(peer.state_dict(), config)
    model = build_two_tower(json.loads(json.dumps(args))).eval()  # model_args survive JSON
    model.load_state_dict(sd)  # strict: every tensor mapped, nothing left over
    return model


@pytest.mark.parametrize("eos", [2, 998], ids=["legacy_argmax", "eos_id"])
def test_hf_clip_parity(eos):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(projection_dim=48, **_tiny(text=dict(eos_token_id=eos)))
    peer = perturb(transformers.CLIPModel(cfg))
    model = _convert(convert_hf_clip, peer, cfg.to_dict())
    assert model.text.pool == ("argmax" if eos == 2 else "eot") and model.visual.has_class_token
    assert model.embed_dim == 48 and model.tokenizer_config is None  # not CLIP's 49408-token vocabulary
    _compare(peer, model, _tokens(VOCAB - 1 if eos == 2 else eos))


def test_hf_clip_image_features_are_llavas():
    """image_features() is what LLaVA feeds its projector: hidden_states[-2] without the class token."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(**_tiny(vision=dict(num_hidden_layers=3)))
    peer = perturb(transformers.CLIPModel(cfg))
    model = _convert(convert_hf_clip, peer, cfg.to_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = peer.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        assert max_diff(model.image_features(x), hidden[-2][:, 1:]) <= ATOL
        assert max_diff(model.image_features(x, layer=0, drop_prefix=False), hidden[1]) <= ATOL


def test_hf_clip_from_a_saved_config_with_defaults_left_out(tmp_path):
    """config.json as save_pretrained writes it (only the keys that differ from the defaults)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(**_tiny(vision=dict(hidden_act="gelu"), text=dict(eos_token_id=998)))
    peer = perturb(transformers.CLIPModel(cfg))
    peer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    model = _convert(convert_hf_clip, peer, saved)
    assert model.visual.blocks[0].mlp.act.__class__.__name__ == "GELU"
    assert model.text.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"
    _compare(peer, model, _tokens(998))


def test_hf_siglip_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(**_tiny())
    peer = perturb(transformers.SiglipModel(cfg))
    model = _convert(convert_hf_siglip, peer, cfg.to_dict())
    assert model.visual.global_pool == "map" and not model.visual.has_class_token
    assert model.logit_bias is not None and model.max_logit_scale is None
    _compare(peer, model, _tokens(1))
    # a converted model saves and loads as a vitkit two-tower file
    loaded = load_clip(save_weights(model, tmp_path / "siglip.safetensors"))
    x, t = torch.randn(1, 3, 32, 32), _tokens(1)[:1]
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(x, t)), model.logits(model(x, t)))


def test_hf_siglip_uneven_mlp_ratio():
    """An MLP width whose ratio to the model width is not exact in floating point keeps its width."""
    torch.manual_seed(0)
    assert int(44 * (109 / 44)) != 109  # the plain ratio would build a narrower MLP
    cfg = transformers.SiglipConfig(**_tiny(vision=dict(hidden_size=44, intermediate_size=109),
                                            text=dict(projection_size=44)))
    peer = perturb(transformers.SiglipModel(cfg))
    model = _convert(convert_hf_siglip, peer, cfg.to_dict())
    assert model.visual.blocks[0].mlp.fc1.out_features == 109 and model.visual.attn_pool.mlp.fc1.out_features == 109
    _compare(peer, model, _tokens(1))


def test_hf_conversion_errors():
    cfg = transformers.CLIPConfig(**_tiny(vision=dict(hidden_act="silu_x")))
    sd = transformers.CLIPModel(transformers.CLIPConfig(**_tiny())).state_dict()
    with pytest.raises(ConfigError, match="hidden_act 'silu_x'"):
        convert_hf_clip(sd, cfg.to_dict())
    with pytest.raises(WeightsError, match="class_embedding|text_projection|no "):
        convert_hf_clip({k: v for k, v in sd.items() if "class_embedding" not in k}, cfg.to_dict() | {
            "vision_config": {**cfg.to_dict()["vision_config"], "hidden_act": "gelu"}})
    wrong_size = transformers.CLIPConfig(**_tiny(vision=dict(image_size=48))).to_dict()
    with pytest.raises(ConfigError, match="image_size"):
        convert_hf_clip(sd, wrong_size)
