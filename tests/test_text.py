"""The text tower: CLIP's causal text transformer and SigLIP's variant, against open_clip's and a
reference written from the papers' description (GPT-2-style pre-norm blocks, pooled end token)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import lazy_peer, max_diff, perturb
from torch import nn

from vitkit.text import TextTransformer

open_clip = lazy_peer("open_clip")

TINY = dict(vocab_size=100, context_length=12, width=32, depth=2, num_heads=4, output_dim=24)
CLIP_LIKE = dict(act_layer="quick_gelu", causal=True, pool="argmax", proj_bias=False, norm_eps=1e-5)
SIGLIP_LIKE = dict(act_layer="gelu_tanh", causal=False, pool="last", proj_bias=True, norm_eps=1e-6)
ACTS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def _tokens(n: int = 3, length: int = 12, vocab: int = 100, eot: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random ids below ``eot``, then the end token at a different place in each row, then zero padding."""
    g = torch.Generator().manual_seed(seed)
    eot = vocab - 1 if eot is None else eot
    t = torch.randint(1, eot, (n, length), generator=g)
    for i in range(n):
        end = 2 + (3 * i) % (length - 2)
        t[i, end] = eot
        t[i, end + 1 :] = 0
    return t


def reference_forward(model: TextTransformer, tokens: torch.Tensor, tokens_out: bool = False) -> torch.Tensor:
    """The text encoder computed from its definition with plain tensor ops and the model's weights."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    a = model.model_args
    W, H, eps, act = a["width"], a["num_heads"], a["norm_eps"], ACTS[a["act_layer"]]
    B, L = tokens.shape
    hd = W // H

    def ln(x, name):
        return F.layer_norm(x, (W,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:L]
    mask = torch.zeros(L, L, dtype=torch.float64)
    if a["causal"]:
        mask = mask.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    for i in range(a["depth"]):
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, H, hd).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, L, W)
        x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = ln(x, p + "norm2")
        h = act(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = ln(x, "norm")
    if tokens_out:
        return x
    pools = {"argmax": lambda: tokens.argmax(-1), "last": lambda: torch.full((B,), L - 1),
             "first": lambda: torch.zeros(B, dtype=torch.long), "eot": lambda: (tokens == a["eot_id"]).int().argmax(-1)}
    idx = pools[a["pool"]]()
    out = x[torch.arange(B), idx] @ sd["proj.weight"].T
    return out + sd["proj.bias"] if a["proj_bias"] else out


@pytest.mark.parametrize("variant", [CLIP_LIKE, SIGLIP_LIKE, dict(act_layer="gelu", pool="eot", eot_id=97),
                                     dict(pool="first", causal=False)])
def test_text_transformer_matches_reference(variant):
    model = perturb(TextTransformer(**TINY, **variant), scale=0.05).double()
    tokens = _tokens(eot=variant.get("eot_id"))
    with torch.no_grad():
        assert max_diff(model(tokens), reference_forward(model, tokens)) < 1e-10
        assert max_diff(model.forward_tokens(tokens), reference_forward(model, tokens, tokens_out=True)) < 1e-10


def test_causal_mask_later_tokens_never_change_earlier_outputs():
    model = perturb(TextTransformer(**TINY, **CLIP_LIKE), scale=0.05)
    a = _tokens(n=2)
    b = a.clone()
    j = 5
    b[:, j:] = torch.randint(1, 99, b[:, j:].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fa, fb = model.forward_tokens(a), model.forward_tokens(b)
    assert torch.equal(fa[:, :j], fb[:, :j])
    assert (fa[:, j:] - fb[:, j:]).abs().amax() > 1e-3  # the changed positions do change
    # Without the mask every position sees the change.
    bidir = perturb(TextTransformer(**TINY, **SIGLIP_LIKE), scale=0.05)
    with torch.no_grad():
        assert (bidir.forward_tokens(a)[:, :j] - bidir.forward_tokens(b)[:, :j]).abs().amax() > 1e-3


def test_padding_mask_hides_padding_from_the_text():
    model = perturb(TextTransformer(**TINY, **{**SIGLIP_LIKE, "pool": "first"}, pad_mask=True, pad_id=0), scale=0.05)
    short = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    with torch.no_grad():
        # Positional embeddings differ by position only for the real tokens, which are the same.
        assert max_diff(model(short), model(padded)) < 1e-5
        model.pad_mask = False
        assert max_diff(model(short), model(padded)) > 1e-4
    with pytest.raises(ValueError, match="causal=False"):
        TextTransformer(**TINY, pad_mask=True)


def test_shorter_texts_and_model_args_rebuild():
    model = perturb(TextTransformer(**TINY, **CLIP_LIKE), scale=0.05)
    tokens = _tokens(length=12)
    with torch.no_grad():
        full = model(tokens)
        # A causal tower pools at the end token, so cutting the padding after it changes nothing.
        short = model(tokens[:1, :4])
        assert max_diff(short, model(tokens[:1])) < 1e-5
    assert full.shape == (3, 24)
    twin = TextTransformer(**model.model_args)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(tokens), full)
    assert set(model.state_dict()) >= {"token_embedding.weight", "positional_embedding", "blocks.0.norm1.weight",
                                       "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.0.norm2.bias",
                                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight",
                                       "proj.weight"}
    assert "proj.bias" not in model.state_dict()
    assert model.positional_embedding.shape == (12, 32)
    assert (model.context_length, model.vocab_size, model.width, model.output_dim) == (12, 100, 32, 24)


def test_bad_tokens_are_clear_errors():
    model = TextTransformer(**TINY)
    with pytest.raises(ValueError, match=r"13 tokens .* context_length 12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the text tower's vocabulary of 100"):
        model(torch.full((1, 4), 100))
    with pytest.raises(ValueError, match="integer ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="eot_id"):
        TextTransformer(**TINY, pool="eot")
    with pytest.raises(ValueError, match="unknown text pool"):
        TextTransformer(**TINY, pool="mean")


def test_backward_reaches_every_parameter_and_checkpointing_agrees():
    model = TextTransformer(**TINY, **CLIP_LIKE)
    tokens = _tokens()
    model(tokens).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(tokens).square().sum().backward()
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters())
    assert model.no_weight_decay() == {"positional_embedding"}


def _copy_to_open_clip(ours: TextTransformer, theirs: nn.Module) -> None:
    sd = ours.state_dict()
    mapped = {"token_embedding.weight": sd["token_embedding.weight"],
              "positional_embedding": sd["positional_embedding"],
              "ln_final.weight": sd["norm.weight"], "ln_final.bias": sd["norm.bias"]}
    names = {"norm1": "ln_1", "attn.qkv": "attn.in_proj_", "attn.proj": "attn.out_proj.", "norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc.", "mlp.fc2": "mlp.c_proj."}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            target = names[mod]
            target = f"{target}{leaf}" if target.endswith("_") or target.endswith(".") else f"{target}.{leaf}"
            mapped[f"transformer.resblocks.{i}.{target}"] = value
    if ours.proj.bias is None:
        mapped["text_projection"] = sd["proj.weight"].T
    else:
        mapped["text_projection.weight"], mapped["text_projection.bias"] = sd["proj.weight"], sd["proj.bias"]
    theirs.load_state_dict(mapped, strict=True)


@pytest.mark.peer("open_clip")
@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_text_transformer_matches_open_clip(variant):
    oc = open_clip.transformer
    if variant == "clip":
        ours = TextTransformer(**TINY, **CLIP_LIKE)
        theirs = oc.TextTransformer(context_length=12, vocab_size=100, width=32, heads=4, layers=2, output_dim=24,
                                    act_layer=oc.QuickGELU)
    else:
        ours = TextTransformer(**TINY, **SIGLIP_LIKE)
        theirs = oc.TextTransformer(context_length=12, vocab_size=100, width=32, heads=4, layers=2, output_dim=24,
                                    no_causal_mask=True, pool_type="last", proj_bias=True,
                                    act_layer=partial(nn.GELU, approximate="tanh"),
                                    norm_layer=partial(oc.LayerNorm, eps=1e-6))
    perturb(ours, scale=0.05)
    _copy_to_open_clip(ours, theirs)
    theirs.eval()
    tokens = _tokens()
    with torch.no_grad():
        assert max_diff(ours(tokens), theirs(tokens)) < 1e-5
