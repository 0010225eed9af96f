"""open_clip checkpoints -> TwoTower: parity with open_clip itself on tiny random models.

Each case builds an open_clip model from a tiny model config through ``open_clip.create_model``
(the OpenAI-style layout, and the timm-trunk SigLIP layout on a tiny timm ViT registered here),
randomises every parameter (open_clip starts norms at one and biases at zero, which would hide a
bias mapped to the wrong place), writes it as open_clip publishes it, loads it with
``load_clip_weights`` and compares image and text embeddings and the logits within 1e-5.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import lazy_peer, max_diff, perturb, require_peer
from safetensors.torch import save_file

from vitkit import save_weights
from vitkit.clip import TwoTower, load_clip
from vitkit.clip.convert_open_clip import convert_open_clip, is_open_clip
from vitkit.clip.load import load_clip_weights
from vitkit.errors import ConfigError, PathNotFoundError, WeightsError

open_clip = lazy_peer("open_clip")
needs_open_clip = pytest.mark.peer("open_clip")
ATOL = 1e-5

# OpenAI-style towers with deliberately uneven sizes: 2 heads of 32 in the image tower, 3 of 16 in
# the text tower, so a head count read from the wrong place changes the outputs.
CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 2},
}
# OpenAI's own settings (64-wide heads everywhere, QuickGELU): readable without a config.
OPENAI_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
# SigLIP's open_clip layout: a timm ViT trunk without class token, MAP pooling, no projection;
# a bidirectional text tower pooled at the last position, with a biased projection, eps 1e-6 and
# SigLIP 2's tanh GELU.
TRUNK = "vit_octest_patch8_siglip_32"
SIGLIP_CFG = {
    "embed_dim": 128,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "timm_model_name": TRUNK, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                 "act_kwargs": {"approximate": "tanh"}},
}
CAPTIONS = [
    "a photo of a cat.",
    "Two dogs, playing in the snow!",
    "a red circle on a blue background",
    "café & crème brûlée at 3:30pm (2024)",
    "a very long caption that goes on and on about the scene, the light, the colours and the people "
    "in it, far past the context length of the text tower",
]


def _register_trunk() -> None:
    """A 2-block, 128-wide SigLIP-style timm ViT at 32 px, as a timm model open_clip can name."""
    timm = require_peer("timm")
    if timm.is_model(TRUNK):
        return

    def vit_octest_patch8_siglip_32(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, class_token=False,
                    global_pool="map")
        return timm.models.VisionTransformer(**{**args, **kwargs})

    timm.models.register_model(vit_octest_patch8_siglip_32)


def _open_clip_folder(tmp_path, cfg: dict, seed: int = 0):
    """open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors) of a random model."""
    folder = tmp_path / "open_clip"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = perturb(open_clip.create_model(f"local-dir:{folder}"), seed=seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "open_clip_model.safetensors")
    return model, folder


def _assert_parity(ref, model, images: torch.Tensor, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        img_ref, txt_ref = ref.encode_image(images), ref.encode_text(tokens)
        logits_ref = ref.get_logits(images, tokens)[0]
        img, txt = model.encode_image(images), model.encode_text(tokens)
        out = model(images, tokens)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    if out["logit_bias"] is not None:
        logits = logits + out["logit_bias"]
    assert max_diff(img, img_ref) < ATOL
    assert max_diff(txt, txt_ref) < ATOL
    assert max_diff(logits, logits_ref) < ATOL


def _assert_hf_parity(ref, model, images: torch.Tensor, tokens: torch.Tensor) -> None:
    """Image and text features and image-to-text logits of a transformers CLIPModel / SiglipModel."""
    with torch.no_grad():
        img_ref = ref.get_image_features(pixel_values=images)
        txt_ref = ref.get_text_features(input_ids=tokens)
        # transformers 5 wraps the projected features in an output object, 4 returns them as they are.
        img_ref, txt_ref = (getattr(t, "pooler_output", t) for t in (img_ref, txt_ref))
        logits_ref = ref(input_ids=tokens, pixel_values=images).logits_per_image
        out = model(images, tokens)
        img, txt = model.encode_image(images), model.encode_text(tokens)
    assert max_diff(img, img_ref) < ATOL and max_diff(txt, txt_ref) < ATOL
    assert max_diff(TwoTower.logits(out), logits_ref) < ATOL


@needs_open_clip
def test_openai_layout_matches_open_clip(tmp_path):
    ref, folder = _open_clip_folder(tmp_path, CLIP_CFG)
    assert "visual.class_embedding" in ref.state_dict() and is_open_clip(ref.state_dict())
    model = load_clip(folder)  # the public entry point hands foreign folders to load_clip_weights
    tokens = open_clip.tokenize(CAPTIONS, context_length=16)
    images = torch.randn(3, 3, 32, 32)
    _assert_parity(ref, model, images, tokens)
    # The model's own tokenizer is CLIP's BPE, id for id (the long caption truncated keeping its end token).
    assert torch.equal(model.tokenize(CAPTIONS), tokens)
    # Saved by vitkit, the converted model rebuilds from the file alone.
    again = load_clip(save_weights(model, tmp_path / "converted.safetensors"))
    _assert_parity(ref, again, images, tokens)


# The other OpenAI-style options open_clip configs use: no pre-norm, patch-average pooling with the
# norm before or after the pool, LayerScale, tanh GELU, eps 1e-6, a biased text projection, a
# bidirectional text tower pooled at the first end token ("eos").
VARIANTS = {
    "avg_ln_after_pool": dict(
        vision=dict(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True, ls_init_value=0.1,
                    act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6}),
        text=dict(pool_type="eos", eos_id=49407, proj_bias=True, no_causal_mask=True, act_kwargs={"approximate": "tanh"}),
        quick_gelu=False,
    ),
    "avg_ln_before_pool": dict(vision=dict(pool_type="avg"), text=dict(pool_type="first"), quick_gelu=False),
}


@needs_open_clip
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_openai_layout_options_match_open_clip(tmp_path, variant):
    v = VARIANTS[variant]
    cfg = json.loads(json.dumps(CLIP_CFG))
    cfg["vision_cfg"].update(v["vision"])
    cfg["text_cfg"].update(v["text"])
    cfg["quick_gelu"] = v["quick_gelu"]
    ref, folder = _open_clip_folder(tmp_path, cfg, seed=4)
    model = load_clip_weights(folder)
    tokens = open_clip.tokenize(CAPTIONS, context_length=16)
    tokens[1, 12:] = 49407  # a second end token after the first: "eos" pools the first
    _assert_parity(ref, model, torch.randn(2, 3, 32, 32), tokens)


@needs_open_clip
def test_openai_checkpoint_without_config(tmp_path):
    """A bare OpenAI-style ``.bin`` (weights_only) reads with OpenAI's settings, as open_clip reads OpenAI's files."""
    ref, folder = _open_clip_folder(tmp_path, OPENAI_CFG, seed=1)
    bare = tmp_path / "bare" / "clip.bin"
    bare.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, bare)
    model = load_clip_weights(bare)
    assert model.model_args["text"]["act_layer"] == "quick_gelu"
    tokens = open_clip.tokenize(CAPTIONS[:3], context_length=12)
    _assert_parity(ref, model, torch.randn(2, 3, 32, 32), tokens)


@needs_open_clip
def test_siglip_timm_trunk_layout_matches_open_clip(tmp_path):
    _register_trunk()
    ref, folder = _open_clip_folder(tmp_path, SIGLIP_CFG, seed=2)
    sd = ref.state_dict()
    assert "visual.trunk.attn_pool.latent" in sd and "logit_bias" in sd
    model = load_clip_weights(folder / "open_clip_model.safetensors")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (4, 16), generator=g)
    tokens[0, 9:] = 0  # padded text: SigLIP attends over the padding too
    _assert_parity(ref, model, torch.randn(2, 3, 32, 32, generator=g), tokens)


@needs_open_clip
def test_converted_args_and_errors(tmp_path):
    _register_trunk()
    ref = open_clip.create_model(f"local-dir:{_open_clip_folder(tmp_path, SIGLIP_CFG)[1]}")
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        convert_open_clip(ref.state_dict())  # a timm trunk's heads are in the config only
    args, sd = convert_open_clip(ref.state_dict(), {"model_cfg": SIGLIP_CFG})
    assert args["image_proj"] == "none" and args["init_logit_bias"] is not None
    assert args["text"]["causal"] is False and args["text"]["pool"] == "last"
    coca = json.loads(json.dumps(CLIP_CFG))
    coca["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(ConfigError, match="attentional_pool"):
        convert_open_clip(open_clip.create_model(f"local-dir:{_open_clip_folder(tmp_path / 'b', CLIP_CFG)[1]}")
                          .state_dict(), coca)
    with pytest.raises(WeightsError, match="not an open_clip checkpoint"):
        convert_open_clip({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)})
    with pytest.raises(PathNotFoundError):
        load_clip_weights(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PathNotFoundError, match="open_clip"):
        load_clip_weights(tmp_path / "empty")


# Tiny transformers towers: one block of two heads, width 32.
HF_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=16)


@pytest.mark.peer("transformers")
def test_hf_clip_folder_loads(tmp_path):
    """A transformers CLIPModel folder (config.json + model.safetensors) loads through the same entry point."""
    transformers = require_peer("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(HF_TEXT, vocab_size=49408), vision_config=HF_VISION,
        projection_dim=16,
    )
    torch.manual_seed(0)
    ref = perturb(transformers.CLIPModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    model = load_clip_weights(tmp_path / "hf")
    _assert_hf_parity(ref, model, torch.randn(2, 3, 32, 32), model.tokenize(CAPTIONS[:3]))


SP_CORPUS = [
    "a photo of a cat sitting on a red sofa", "two dogs playing in the snow near a wooden fence",
    "a man riding a bicycle down a busy city street", "children playing football in a green park",
    "a bowl of fresh fruit on a kitchen table", "the sun setting over the ocean with small boats",
] * 4


def _write_spiece(path) -> None:
    """A tiny SentencePiece model laid out like SigLIP's T5 vocabulary: pad 0, end 1, unknown 2, no start."""
    buf = io.BytesIO()
    require_peer("sentencepiece").SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=buf, vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


@pytest.mark.peer("open_clip", "sentencepiece", "transformers")
def test_siglip_folder_tokenizes_like_open_clip(tmp_path):
    """An open_clip SigLIP folder with its SentencePiece vocabulary: the loaded model's tokenizer gives
    open_clip's ids (its HF tokenizer with the 'canonicalize' cleaning)."""
    transformers = require_peer("transformers")
    _register_trunk()
    cfg = json.loads(json.dumps(SIGLIP_CFG))
    cfg["text_cfg"].update(hf_tokenizer_name="timm/ViT-B-16-SigLIP", tokenizer_kwargs={"clean": "canonicalize"})
    _, folder = _open_clip_folder(tmp_path, cfg, seed=3)
    _write_spiece(folder / "spiece.model")
    transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model")).save_pretrained(folder)
    texts = ["A photo of a CAT, on a red sofa!", "two dogs   playing\tin the snow?", "Unseen: zebra (qué tal)",
             "children playing football in a green park with a bowl of fresh fruit on a kitchen table"]
    model = load_clip_weights(folder)
    assert model.tokenizer_config["kind"] == "sentencepiece"
    assert torch.equal(model.tokenize(texts), open_clip.get_tokenizer(f"local-dir:{folder}")(texts))


@pytest.mark.peer("sentencepiece", "transformers")
def test_hf_siglip_folder_with_its_vocabulary(tmp_path):
    """A transformers SiglipModel folder with its spiece.model: embeddings and token ids as transformers'."""
    transformers = require_peer("transformers")
    cfg = transformers.SiglipConfig(
        text_config=dict(HF_TEXT, vocab_size=100), vision_config=HF_VISION,
    )
    torch.manual_seed(0)
    ref = perturb(transformers.SiglipModel(cfg))
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    _write_spiece(folder / "spiece.model")
    hf_tok = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    texts = ["A photo of a CAT, on a red sofa!", "two dogs playing in the snow near a wooden fence and a park"]
    model = load_clip_weights(folder)
    tokens = model.tokenize(texts)
    expected = hf_tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokens, expected)
    _assert_hf_parity(ref, model, torch.randn(2, 3, 32, 32), tokens)


def test_torchscript_archive_is_refused(tmp_path):
    """OpenAI's original .pt files are TorchScript: refused with where to get loadable weights, never executed."""
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(WeightsError, match="TorchScript"):
        load_clip_weights(path)
