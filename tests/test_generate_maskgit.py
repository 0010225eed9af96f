"""MaskGIT: the cosine schedule, the network, the iterative decoding against the reference's rules
(google-research/maskgit parallel_decode.py) and the ``maskgit`` objective's masked-token loss."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit.generate.maskgit as mg
from vitkit.errors import ConfigError, DataError
from vitkit.generate import create_generator, list_generators
from vitkit.objectives import build_objective
from vitkit.objectives.maskgit import MaskGITConfig, MaskGITObjective, token_mask

# ---- stand-ins ---------------------------------------------------------------------------------------------


class PatchTokenizer(nn.Module):
    """A fixed tokenizer: each 7x7 patch of a 28x28 image -> the nearest of 8 grey levels (grid 4)."""

    kind = "tokenizer"
    quantizer_type = "vq"
    img_size, in_chans, grid, codebook_size = 28, 1, 4, 8

    def __init__(self):
        super().__init__()
        self.register_buffer("levels", torch.linspace(-1, 1, self.codebook_size))

    def encode(self, x):
        m = F.avg_pool2d(x, 7)[:, 0]  # (B, 4, 4)
        return (m[..., None] - self.levels).abs().argmin(-1)

    def decode(self, idx):
        return F.interpolate(self.levels[idx][:, None], scale_factor=7, mode="nearest")  # (B, 1, 28, 28)


class FixedLogits(nn.Module):
    """A MaskGIT stand-in whose logits are given: ``cond`` (N, K) for a class, ``uncond`` for the null class.
    Records every call's tokens and labels."""

    def __init__(self, cond, uncond=None, num_classes=3):
        super().__init__()
        self.num_tokens, self.codebook_size = cond.shape
        self.grid = math.isqrt(self.num_tokens)
        self.mask_id, self.num_classes = self.codebook_size, num_classes
        self.register_buffer("cond", cond)
        self.register_buffer("uncond", cond if uncond is None else uncond)
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler reads the device from the parameters
        self.calls = []

    def forward(self, tokens, labels):
        self.calls.append((tokens.clone(), labels.clone()))
        null = (labels == self.num_classes)[:, None, None]
        return torch.where(null, self.uncond, self.cond) + 0 * self.anchor  # (B, N, K)


class Recorder:
    """Counts the calls of a model and keeps their inputs (a forward pre-hook)."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(lambda m, args: self.calls.append((args[0].clone(), args[1].clone())))


def _gumbel(u):
    return -torch.log(-torch.log(u.clamp_min(1e-20)))


def reference_masked_counts(n: int, steps: int) -> list[int]:
    """Masked tokens before each step, by parallel_decode.decode: mask_len = max(1, min(unknown - 1,
    floor(n * cos(pi/2 * (s+1)/S)))); the last step's output is taken before its re-masking."""
    counts = [n]
    for s in range(steps - 1):
        scheduled = math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))
        counts.append(max(1, min(counts[-1] - 1, scheduled)))
    return counts


def _objective(model=None, tokenizer=None, **cfg):
    tokenizer = tokenizer if tokenizer is not None else PatchTokenizer()
    if model is None:
        model = create_generator("maskgit_test", codebook_size=8, grid=4, num_classes=3)
    return MaskGITObjective(model, MaskGITConfig(**cfg), num_classes=3, tokenizer=tokenizer)


def _class_images(labels, noise=0.05, seed=0):
    """Images whose token grid is a fixed random map per class (plus noise the tokenizer removes)."""
    g = torch.Generator().manual_seed(123)
    maps = torch.randint(0, 8, (3, 4, 4), generator=g)
    base = PatchTokenizer().decode(maps)  # (3, 1, 28, 28)
    x = base[labels] + noise * torch.randn(len(labels), 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return x.clamp(-1, 1), maps


# ---- schedule and network ----------------------------------------------------------------------------------


def test_cosine_schedule_values():
    assert mg.cosine_schedule(0.0) == 1.0
    assert abs(mg.cosine_schedule(1.0)) < 1e-15
    assert mg.cosine_schedule(0.5) == pytest.approx(math.sqrt(2) / 2, abs=1e-15)
    t = mg.cosine_schedule(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(t, torch.tensor([1.0, math.cos(math.pi / 4), 0.0]), atol=1e-7)


def test_variants_registered_and_rebuilt_from_their_args():
    assert {"maskgit_test", "maskgit_nano"} <= set(list_generators("maskgit"))
    m = create_generator("maskgit_test", codebook_size=16, grid=3, num_classes=5)
    assert m.kind == "maskgit" and m.model_name == "maskgit_test" and m.mask_id == 16
    again = create_generator(m.model_name, **m.model_args)
    assert [p.shape for p in again.parameters()] == [p.shape for p in m.parameters()]
    # Class embeddings: the classes plus the null class; token embeddings: the codes plus the mask token.
    assert m.class_embed.num_embeddings == 6 and m.tok_embed.num_embeddings == 17


def test_forward_is_bidirectional_class_conditional_and_tied_to_the_token_embedding():
    m = create_generator("maskgit_test", codebook_size=16, grid=3, num_classes=5).eval()
    tokens = torch.randint(0, 16, (2, 9))
    labels = torch.tensor([1, 5])  # 5: the null class
    out = m(tokens, labels)
    assert out.shape == (2, 9, 16)
    assert torch.equal(m(tokens.view(2, 3, 3), labels), out)
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % 16
    assert not torch.allclose(m(later, labels)[:, 0], out[:, 0])  # the first position sees the last token
    assert not torch.allclose(m(tokens, torch.tensor([2, 5]))[0], out[0])
    # The head is the token embedding: every code row gets a gradient even when no input uses it.
    m.zero_grad()
    m(torch.full((2, 9), m.mask_id), labels).logsumexp(-1).sum().backward()
    assert (m.tok_embed.weight.grad[:16].abs().sum(1) > 0).all()
    assert not any(p.shape == (16, 32) for n, p in m.named_parameters() if n != "tok_embed.weight")
    with pytest.raises(DataError, match="3x3 token grid"):
        m(torch.zeros(2, 16, dtype=torch.long), labels)


# ---- sampling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grid", "steps"), [(7, 8), (7, 12), (4, 5), (4, 8)])
def test_masked_count_per_step_follows_the_reference_and_model_runs_once_per_step(grid, steps):
    m = create_generator("maskgit_test", codebook_size=16, grid=grid, num_classes=3)
    rec = Recorder(m)
    out = mg.maskgit_sample(m, torch.tensor([0, 1, 2]), steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == steps
    counts = [(tokens == m.mask_id).sum(1).tolist() for tokens, _ in rec.calls]
    assert counts == [[c] * 3 for c in reference_masked_counts(grid * grid, steps)]
    assert out.shape == (3, grid, grid) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < 16  # no mask id left
    # A token fixed at one step is never changed later.
    for (before, _), (after, _) in zip(rec.calls, rec.calls[1:]):
        known = before != m.mask_id
        assert torch.equal(after[known], before[known])
    assert torch.equal(out.flatten(1)[rec.calls[-1][0] != m.mask_id], rec.calls[-1][0][rec.calls[-1][0] != m.mask_id])


def test_more_steps_than_tokens_still_fix_one_token_per_step_until_done():
    m = create_generator("maskgit_test", codebook_size=16, grid=2, num_classes=3)
    rec = Recorder(m)
    out = mg.maskgit_sample(m, torch.tensor([0, 1]), steps=6)
    counts = [int((tokens[0] == m.mask_id).sum()) for tokens, _ in rec.calls]
    assert len(counts) == 6 and counts[:4] == [4, 3, 2, 1] and counts[4:] == [0, 0]
    assert (out < 16).all()


def test_first_step_keeps_the_most_confident_sampled_tokens():
    # Hand computation of step 0 from the same noise: Gumbel-max sampling, then confidence =
    # log p(sampled) + temperature * (1 - 1/S) * Gumbel, the least confident re-masked.
    N, K, S, T, B = 64, 6, 3, 4.5, 2  # step 0 keeps 64 - floor(64 cos(pi/6)) = 9 tokens
    logits = 2 * torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    model = FixedLogits(logits)
    mg.maskgit_sample(model, torch.tensor([0, 2]), steps=S, temperature=T, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sampled = (logits + _gumbel(torch.rand(B, N, K, generator=g))).argmax(-1)  # (B, N)
    logp = torch.log_softmax(logits, -1).expand(B, N, K).gather(-1, sampled[..., None])[..., 0]
    conf = logp + T * (1 - 1 / S) * _gumbel(torch.rand(B, N, generator=g))
    remask = max(1, min(N - 1, math.floor(N * math.cos(math.pi / 2 / S))))
    after = model.calls[1][0]
    for b in range(B):
        kept = set(conf[b].argsort(descending=True)[: N - remask].tolist())
        fixed = set(torch.nonzero(after[b] != model.mask_id)[:, 0].tolist())
        assert fixed == kept
        assert torch.equal(after[b, sorted(fixed)], sampled[b, sorted(fixed)])


def test_guided_logits_match_the_hand_formula_in_one_batched_call():
    N, K = 4, 5
    c, u = torch.randn(N, K), torch.randn(N, K)
    model = FixedLogits(c, u, num_classes=3)
    tokens = torch.full((2, N), K)
    for g in (0.0, 1.0, 2.5):
        model.calls.clear()
        got = mg.guided_logits(model, tokens, torch.tensor([0, 1]), g)
        assert torch.allclose(got, (u + g * (c - u)).expand(2, N, K), atol=1e-6)
        assert len(model.calls) == 1
        assert model.calls[0][1].tolist() == ([0, 1] if g == 1.0 else [0, 1, 3, 3])


@pytest.mark.parametrize(("guidance", "code"), [(0.0, 0), (1.0, 1), (3.0, 1)])
def test_sampling_uses_the_guided_logits(guidance, code):
    # The class favours code 1 and the null class code 0, each by far: guidance 0 samples unconditionally.
    c = torch.tensor([0.0, 60.0, 0.0]).repeat(9, 1)
    u = torch.tensor([60.0, 0.0, 0.0]).repeat(9, 1)
    model = FixedLogits(c, u)
    out = mg.maskgit_sample(model, torch.tensor([0, 1]), steps=3, guidance=guidance)
    assert (out == code).all()
    assert len(model.calls) == 3 and all(len(t) == (2 if guidance == 1.0 else 4) for t, _ in model.calls)


def test_sampler_refuses_bad_arguments_and_restores_training_mode():
    m = create_generator("maskgit_test", codebook_size=8, grid=2, num_classes=3).train()
    with pytest.raises(ConfigError, match="steps"):
        mg.maskgit_sample(m, torch.tensor([0]), steps=0)
    with pytest.raises(ConfigError, match="class ids"):
        mg.maskgit_sample(m, torch.tensor([4]))
    mg.maskgit_sample(m, torch.tensor([3]), steps=2)  # the null class: unconditional
    assert m.training


# ---- objective ---------------------------------------------------------------------------------------------


def test_training_mask_count_follows_the_cosine_schedule():
    B, L = 40000, 16
    mask = token_mask(B, L, generator=torch.Generator().manual_seed(0))
    n = mask.sum(1)
    assert n.min() >= 1 and n.max() <= L
    # E[ceil(L * cos(pi/2 * r))], r ~ U(0, 1), by a fine midpoint rule.
    r = (np.arange(200000) + 0.5) / 200000
    expected = np.ceil(L * np.cos(np.pi / 2 * r)).mean()
    assert abs(n.float().mean().item() - expected) < 0.1
    # The masked positions are uniform over the grid.
    assert (mask.float().mean(0) - n.float().mean() / L).abs().max() < 0.02


def test_loss_counts_only_masked_positions_by_hand():
    B, L, K, eps = 4, 16, 8, 0.1
    logits = torch.randn(B, L, K)

    class Controlled(FixedLogits):
        def forward(self, tokens, labels):
            self.calls.append((tokens.clone(), labels.clone()))
            return self.cond + 0 * self.anchor

    model = Controlled(torch.zeros(L, K))
    model.cond = logits
    obj = _objective(model, class_dropout=0.0, label_smoothing=eps)
    images, _ = _class_images(torch.tensor([0, 1, 2, 0]))
    torch.manual_seed(3)
    out = obj({"image": images, "label": torch.tensor([0, 1, 2, 0])})
    tokens_in, labels_in = model.calls[-1]
    assert labels_in.tolist() == [0, 1, 2, 0]
    masked = tokens_in == K
    target = PatchTokenizer().encode(images).flatten(1)
    assert torch.equal(tokens_in[~masked], target[~masked])  # the rest is the image's tokens
    q = torch.full((B, L, K), eps / K)
    q.scatter_add_(-1, target[..., None], torch.full((B, L, 1), 1 - eps))
    ce = -(q * torch.log_softmax(logits, -1)).sum(-1)  # (B, L)
    assert out["loss"].item() == pytest.approx(ce[masked].mean().item(), rel=1e-5)
    assert out["masked_acc"].item() == pytest.approx((logits.argmax(-1) == target)[masked].float().mean().item())
    # Changing the logits where nothing is masked changes nothing.
    model.cond = torch.where(masked[..., None], logits, torch.randn(B, L, K) * 10)
    torch.manual_seed(3)
    assert obj({"image": images, "label": torch.tensor([0, 1, 2, 0])})["loss"].item() == pytest.approx(out["loss"].item())


def test_eval_outputs_are_per_sample_reproducible_and_use_the_given_model():
    obj = _objective()
    labels = torch.tensor([0, 1, 2, 1, 0])
    batch = {"image": _class_images(labels)[0], "label": labels}
    a = obj.eval_outputs(batch)
    b = obj.eval_outputs(batch)
    assert a["loss"].shape == (5,) and a["masked_acc"].shape == (5,)
    assert torch.equal(a["loss"], b["loss"])
    other = copy.deepcopy(obj.model)
    with torch.no_grad():
        other.head_bias.add_(torch.randn_like(other.head_bias))
    assert not torch.allclose(obj.eval_outputs(batch, other)["loss"], a["loss"])


def test_objective_trains_and_the_loss_falls():
    torch.manual_seed(0)
    obj = _objective(class_dropout=0.1)
    obj.freeze()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=6e-3)
    losses = []
    for step in range(25):
        labels = torch.randint(0, 3, (16,))
        out = obj({"image": _class_images(labels, seed=step)[0], "label": labels})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # about 0.6 by then


def test_sample_decodes_tokens_to_images():
    obj = _objective()
    imgs = obj.sample(torch.tensor([0, 2]), steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 1, 28, 28) and imgs.min() >= -1 and imgs.max() <= 1


def test_objective_is_registered_and_refuses_mismatches():
    m = create_generator("maskgit_test", codebook_size=8, grid=4, num_classes=3)
    obj = build_objective("maskgit", m, {"label_smoothing": 0.0}, num_classes=3, tokenizer=PatchTokenizer())
    assert isinstance(obj, MaskGITObjective) and obj.cfg.label_smoothing == 0.0 and obj.cfg.temperature == 4.5
    with pytest.raises(ConfigError, match="objective.tokenizer"):
        MaskGITObjective(m, MaskGITConfig(), num_classes=3)
    with pytest.raises(ConfigError, match="codebook_size=8"):
        _objective(create_generator("maskgit_test", codebook_size=16, grid=4, num_classes=3))
    with pytest.raises(ConfigError, match="num_classes"):
        MaskGITObjective(m, MaskGITConfig(), num_classes=4, tokenizer=PatchTokenizer())
    with pytest.raises(DataError, match="class labels"):
        obj({"image": torch.zeros(2, 1, 28, 28), "label": torch.tensor([0, 3])})


def test_with_the_real_vq_tokenizer():
    import vitkit.generate.tokenizer  # noqa: F401  registers vq_test

    torch.manual_seed(0)
    tok = create_generator("vq_test").eval()
    m = create_generator("maskgit_test", codebook_size=tok.codebook_size, grid=tok.grid, num_classes=3)
    obj = MaskGITObjective(m, MaskGITConfig(), num_classes=3, tokenizer=tok)
    obj.freeze()
    images = torch.rand(4, tok.in_chans, tok.img_size, tok.img_size) * 2 - 1
    out = obj({"image": images, "label": torch.tensor([0, 1, 2, 0])})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.tok_embed.weight.grad is not None
    assert all(p.grad is None for p in tok.parameters())
    imgs = obj.sample(torch.tensor([1, 2]), steps=2)
    assert imgs.shape == (2, tok.in_chans, tok.img_size, tok.img_size) and imgs.abs().max() <= 1
    with pytest.raises(ConfigError, match="single-scale"):
        MaskGITObjective(m, MaskGITConfig(), num_classes=3, tokenizer=create_generator("msvq_test"))
