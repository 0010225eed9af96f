"""The LLaVA-style connector: features, projector, splicing, frozen modules, loss and perplexity vs Hugging Face."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import require_peer
from torch import nn

from vitkit import create_model
from vitkit.errors import ConfigError, DataError
from vitkit.objectives import build_objective
from vitkit.vlm import Projector, VisionLanguageModel, caption_perplexity, image_features, tokenize_captions

pytestmark = pytest.mark.peer

VOCAB = 48


class WordTokenizer:
    """vitkit's tokenizer interface on words (ids from their letters): SOT 1, EOT 2, pad 0, ``<image>`` 3."""

    sot_id, eot_id, pad_id, image_id = 1, 2, 0, 3
    vocab_size = VOCAB
    context_length = 12

    def __call__(self, texts, context_length=None):
        L = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_id] + [self.image_id if w == "<image>" else 4 + sum(map(ord, w)) % (VOCAB - 4)
                                   for w in t.split()][: L - 2] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def token_to_id(self, token):
        return self.image_id if token == "<image>" else None


def tiny_lm(seed: int = 0):
    transformers = require_peer("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_vlm(encoder="test_vit", **kw):
    torch.manual_seed(0)
    enc = create_model(encoder, num_classes=0) if isinstance(encoder, str) else encoder
    return VisionLanguageModel(enc, tiny_lm(), tokenizer=WordTokenizer(), **kw)


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a dog runs on grass", "two men", "a red car parked near a tall building"][:n]
    return torch.randn(n, 3, 32, 32, generator=g), captions


# ---------------------------------------------------------------------------------- pieces

def test_projector_is_llava15_mlp():
    p = Projector(24, 32)
    assert [n for n, _ in p.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert p.fc1.out_features == 32  # LLaVA-1.5: hidden width = the LM's width
    ref = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32))
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in p.state_dict().items()})
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(p(x), ref(x))
    assert [n for n, _ in Projector(24, 32, layers=1).named_parameters()] == ["fc1.weight", "fc1.bias"]


def test_features_are_second_to_last_block_without_class_token():
    torch.manual_seed(0)
    vit = create_model("test_vit", num_classes=0).eval()  # depth 2: layer -2 is block 0
    shallow = create_model("test_vit", num_classes=0, depth=1).eval()
    shallow.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.1.")})
    shallow.norm = nn.Identity()  # LLaVA takes the hidden state, not the final-normed output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = shallow.forward_features(x)
        got = image_features(vit, x, layer=-2)
        kept = image_features(vit, x, layer=-2, drop_prefix=False)
    assert got.shape == (2, 16, 64)
    torch.testing.assert_close(got, ref[:, 1:])
    torch.testing.assert_close(kept, ref)
    with pytest.raises(ConfigError, match="layer=-5 is out of range"):
        tiny_vlm(layer=-5)


def test_tokenize_captions_counts_tokens_through_eot():
    tok = WordTokenizer()
    t = tokenize_captions(tok, ["a b", "x"], context_length=6)
    ids = t["input_ids"]
    assert ids[0].tolist()[:4] == [1, ids[0, 1].item(), ids[0, 2].item(), 2]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert t["labels"][0].tolist() == [-100, ids[0, 1].item(), ids[0, 2].item(), 2, -100, -100]


# ---------------------------------------------------------------------------------- splicing

def test_image_tokens_go_in_front_without_image_token():
    model = tiny_vlm()
    images, captions = batch()
    text = model.tokenize(captions)
    with torch.no_grad():
        img = model.encode_images(images)
        s = model.splice(img, **text)
    K, L = 16, text["input_ids"].shape[1]
    assert s["inputs_embeds"].shape == (3, K + L, 32)
    assert s["image_mask"][:, :K].all() and not s["image_mask"][:, K:].any()
    torch.testing.assert_close(s["inputs_embeds"][:, :K], img)
    torch.testing.assert_close(s["inputs_embeds"][:, K:], model.lm.transformer.wte(text["input_ids"]))
    assert (s["labels"][:, :K] == -100).all() and torch.equal(s["labels"][:, K:], text["labels"])
    assert torch.equal(s["attention_mask"][:, K:], text["attention_mask"]) and (s["attention_mask"][:, :K] == 1).all()


def test_image_tokens_replace_the_image_token():
    model = tiny_vlm()
    assert model.image_token_id == 3
    images, _ = batch(2)
    text = model.tokenize(["<image> a dog", "two <image> men here"])
    ids = text["input_ids"]
    with torch.no_grad():
        img = model.encode_images(images)
        s = model.splice(img, **text)
    K, L = 16, ids.shape[1]
    assert s["inputs_embeds"].shape == (2, L - 1 + K, 32)
    wte = model.lm.transformer.wte
    for row, at in ((0, 1), (1, 2)):  # after the SOT: row 0's image at 1, row 1's at 2
        assert s["image_mask"][row].nonzero().flatten().tolist() == list(range(at, at + K))
        torch.testing.assert_close(s["inputs_embeds"][row, at:at + K], img[row])
        before, after = ids[row, :at], ids[row, at + 1:]
        torch.testing.assert_close(s["inputs_embeds"][row, :at], wte(before))
        torch.testing.assert_close(s["inputs_embeds"][row, at + K:], wte(after))
        assert s["labels"][row, at:at + K].eq(-100).all()
    with pytest.raises(DataError, match="exactly one image token"):
        model.splice(img, **model.tokenize(["<image> a", "no image"]))


# ---------------------------------------------------------------------------------- training

def test_loss_matches_hugging_face_and_blind_model_is_the_lm():
    model = tiny_vlm()
    images, captions = batch()
    text = model.tokenize(captions)
    with torch.no_grad():
        blind = model(None, **text)
        ref = model.lm(input_ids=text["input_ids"], attention_mask=text["attention_mask"], labels=text["labels"])
        torch.testing.assert_close(blind["logits"], ref.logits)
        torch.testing.assert_close(blind["loss"], ref.loss)
        no_image = model(None, **text, features=torch.zeros(3, 0, 64))  # zero image tokens
        torch.testing.assert_close(no_image["logits"], ref.logits)
        full = model(images, **text)
        s = model.splice(model.encode_images(images), **text)
        hf = model.lm(inputs_embeds=s["inputs_embeds"], attention_mask=s["attention_mask"], labels=s["labels"])
    torch.testing.assert_close(full["loss"], hf.loss)
    # the same caption tokens are scored with and without the image: never the SOT, image tokens or padding
    assert int(full["n_tokens"]) == int(blind["n_tokens"]) == int((text["labels"] != -100).sum())
    assert not torch.allclose(full["loss"], blind["loss"])


def test_frozen_modules_get_no_gradient_and_a_step_lowers_the_loss():
    model = tiny_vlm()
    obj = build_objective("vlm_connector", model)
    obj.freeze()
    obj.train()
    assert not model.image_encoder.training and not model.lm.training
    trainable = {n for n, p in obj.named_parameters() if p.requires_grad}
    assert trainable == {f"model.projector.{n}" for n, _ in model.projector.named_parameters()}
    images, captions = batch()
    b = {"image": images, "caption": captions}
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    first = obj(b)["loss"]
    first.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    opt.step()
    with torch.no_grad():
        assert obj(b)["loss"] < first.detach()


def test_perplexity_counts_tokens_not_batches():
    model = tiny_vlm()
    images, captions = batch()
    loader = [{"image": images[:1], "caption": captions[:1]}, {"image": images[1:], "caption": captions[1:]}]
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            s = model.splice(model.encode_images(b["image"]), **model.tokenize(b["caption"]))
            logits = model.lm(inputs_embeds=s["inputs_embeds"], attention_mask=s["attention_mask"]).logits
            lp = logits[:, :-1].log_softmax(-1)
            tgt = s["labels"][:, 1:]
            keep = tgt != -100
            nll -= lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item()
            n += int(keep.sum())
    assert caption_perplexity(model, loader) == pytest.approx(math.exp(nll / n), rel=1e-5)
    blind = caption_perplexity(model, loader, use_images=False)
    assert blind != pytest.approx(math.exp(nll / n), rel=1e-3)


def test_evaluator_scores_every_caption_of_an_image():
    model = tiny_vlm()
    obj = build_objective("vlm_connector", model)
    images, captions = batch(2)
    groups = [[captions[0], "a dog"], [captions[1]]]
    ev = obj.evaluator()
    ev.reset()
    ev.update({}, obj.eval_outputs({"image": images, "caption": captions, "captions": groups}))
    flat = [{"image": images[:1], "caption": groups[0][:1]}, {"image": images[:1], "caption": groups[0][1:]},
            {"image": images[1:], "caption": groups[1]}]
    assert ev.compute()["ppl"] == pytest.approx(caption_perplexity(model, flat), rel=1e-5)
    assert ev.primary == "ppl" and not ev.higher_is_better


def test_clear_errors():
    with pytest.raises(ConfigError, match="Hugging Face causal LM"):
        VisionLanguageModel(create_model("test_vit", num_classes=0), nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="VisionLanguageModel"):
        build_objective("vlm_connector", nn.Linear(2, 2))
    model = VisionLanguageModel(create_model("test_vit", num_classes=0), tiny_lm())
    with pytest.raises(ConfigError, match="no tokenizer"):
        model.tokenize(["a"])
    with pytest.raises(DataError, match="'caption'"):
        model.batch_inputs({"image": torch.zeros(1)})
    with pytest.raises(DataError, match="one image per caption"):
        m = tiny_vlm()
        m(torch.randn(2, 3, 32, 32), **m.tokenize(["a", "b", "c"]))


def test_unfrozen_encoder_trains():
    model = tiny_vlm(freeze_encoder=False)
    images, captions = batch(2)
    model(images, **model.tokenize(captions))["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())


class CaptionPairs(torch.utils.data.Dataset):
    """Images whose colour channel decides the caption, so the image helps predict it."""

    WORDS = ("red", "green", "blue")

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 3, 32, 32, generator=g) * 0.1
        self.x[torch.arange(n), self.k] += 1.0

    def __len__(self):
        return len(self.k)

    def __getitem__(self, i):
        return {"image": self.x[i], "caption": f"a {self.WORDS[self.k[i]]} square"}


def test_engine_trains_the_projector_only_and_reports_perplexity(tmp_path):
    from vitkit.engine import EngineConfig, OptimConfig, ScheduleConfig, Trainer

    model = tiny_vlm()
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    obj = build_objective("vlm_connector", model)
    loader = torch.utils.data.DataLoader(CaptionPairs(32), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(CaptionPairs(16, seed=1), batch_size=8)
    tr = Trainer(obj, loader, val, cfg=EngineConfig(epochs=2, amp="none", log_every=2, tensorboard=False, plots=False),
                 optim_cfg=OptimConfig(lr=1e-2, scale_lr=False), sched_cfg=ScheduleConfig(warmup_steps=1),
                 out_dir=tmp_path)
    start = caption_perplexity(model, val)
    summary = tr.fit()
    assert summary["best_metric"] == "ppl"
    end = caption_perplexity(model, val)
    assert end < start and summary["best_metric_value"] == pytest.approx(end, rel=1e-4)
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    for k, v in model.image_encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k


def test_vitkit_caption_tokenizer_feeds_the_lm():
    require_peer("tokenizers")
    from vitkit.text import train_caption_tokenizer

    caps = ["a dog runs on the grass", "a man rides a bike", "two dogs play in the snow"] * 4
    tok = train_caption_tokenizer(caps, vocab_size=300, context_length=16)
    t = tokenize_captions(tok, ["a dog in the snow", "a man"])
    ids, mask, labels = t["input_ids"], t["attention_mask"], t["labels"]
    for row in range(2):
        n = int(mask[row].sum())
        assert ids[row, n - 1] == tok.eot_id and tok.eot_id not in ids[row, : n - 1].tolist()
        assert labels[row, 0] == -100 and torch.equal(labels[row, 1:n], ids[row, 1:n])
        assert (labels[row, n:] == -100).all()
    assert tok.decode(ids[0].tolist()).strip() == "a dog in the snow"


def test_two_tower_image_encoder():
    from vitkit.clip import create_clip

    torch.manual_seed(0)
    clip = create_clip("clip_test").eval()
    model = VisionLanguageModel(clip, tiny_lm(), tokenizer=WordTokenizer())
    assert model.projector.fc1.in_features == clip.visual.feature_info[-2]["num_chs"]
    images, captions = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.features(images), image_features(clip.visual, images))  # the backbone path
        assert image_features(clip, images, drop_prefix=False).shape[1] == 16 + clip.visual.num_prefix_tokens
    obj = build_objective("vlm_connector", model)
    obj.freeze()
    obj.train()
    assert not clip.training
    obj({"image": images, "caption": captions})["loss"].backward()
    assert all(p.grad is None for p in clip.parameters())  # both towers, the temperature: all frozen
    assert all(p.grad is not None for p in model.projector.parameters())


def test_connector_learns_to_read_the_image():
    """Captions name the image's dominant colour: after training (projector and LM), the right images give a
    lower perplexity than other-colour images given to the same captions: the image tokens carry it."""
    model = tiny_vlm(freeze_lm=False)
    data = CaptionPairs(48)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(60):
        idx = torch.randperm(48, generator=torch.Generator().manual_seed(step))[:16]
        out = model(data.x[idx], **model.tokenize([data[i]["caption"] for i in idx.tolist()]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    val = CaptionPairs(24, seed=1)
    right = [{"image": val.x, "caption": [val[i]["caption"] for i in range(24)]}]
    perm = torch.tensor([next(j for j in range(24) if val.k[j] != val.k[i]) for i in range(24)])
    wrong = [{"image": val.x[perm], "caption": right[0]["caption"]}]
    assert caption_perplexity(model, right) < 0.8 * caption_perplexity(model, wrong)
