"""The clip and siglip objectives: the losses against the papers' pseudo-code and open_clip, the batch and
its errors, training through the engine, and loss + gradients under 2-process gloo equal to one process
on the global batch (every mode)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, lazy_peer, make_trainer
from torch import nn
from torch.utils.data import Dataset

from vitkit.clip.retrieval import RetrievalEvaluator, retrieval_metrics
from vitkit.errors import ConfigError, DataError
from vitkit.objectives import build_objective, list_objectives, objective_keys
from vitkit.objectives.clip import Clip, Siglip, clip_loss, siglip_loss

open_clip_loss = lazy_peer("open_clip.loss")


# ---------------------------------------------------------------- references from the papers' pseudo-code


def clip_reference(img, txt, t, label_smoothing=0.0):
    """CLIP (Radford et al., 2021, Figure 3): logits = I_e . T_e^T * exp(t); symmetric cross-entropy."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    logits = img @ txt.T * float(t)
    n = logits.shape[0]

    def cross_entropy(lg):  # rows are the queries, the diagonal the answers
        logp = lg - lg.logsumexp(1, keepdim=True)
        nll = -logp.diagonal()
        smooth = -logp.mean(1)
        return ((1 - label_smoothing) * nll + label_smoothing * smooth).sum() / n

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def siglip_reference(img, txt, t, b):
    """SigLIP (Zhai et al., 2023, Algorithm 1): labels = 2 eye(n) - ones(n); -sum(log_sigmoid(labels * logits)) / n."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    logits = img @ txt.T * float(t) + float(b)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64)
    return torch.log1p(torch.exp(-labels * logits)).sum() / n


def _embeds(n=6, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, e, generator=g), torch.randn(n, e, generator=g)
    txt[:2] += 2 * img[:2]  # a few pairs that match, so the loss is not symmetric noise
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_clip_loss_matches_the_paper_pseudo_code(smoothing):
    img, txt = _embeds()
    scale = torch.tensor(7.5)
    got = clip_loss(img, txt, scale, label_smoothing=smoothing)
    torch.testing.assert_close(got.double(), clip_reference(img, txt, 7.5, smoothing), atol=1e-6, rtol=1e-6)
    # A shift of every logit changes no softmax: the bias open_clip adds is harmless.
    torch.testing.assert_close(clip_loss(img, txt, scale, torch.tensor(-3.0), label_smoothing=smoothing), got)


def test_siglip_loss_matches_the_paper_pseudo_code():
    img, txt = _embeds()
    got = siglip_loss(img, txt, torch.tensor(4.0), torch.tensor(-1.5))
    torch.testing.assert_close(got.double(), siglip_reference(img, txt, 4.0, -1.5), atol=1e-6, rtol=1e-6)
    # Divided by the batch, not by the number of pairs: the loss of n pairs grows with n.
    img2, txt2 = _embeds(n=12, seed=1)
    assert siglip_loss(img2, txt2, torch.tensor(4.0), torch.tensor(-1.5)) > got


def test_losses_are_float32_under_bf16_autocast():
    # The training step runs under bf16 autocast on CPUs that have it: the similarities and the loss must not.
    img, txt = _embeds(n=32, e=16, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)  # SigLIP's initial logits: |t x.y + b| up to 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sig, clp = siglip_loss(img, txt, scale, bias), clip_loss(img, txt, scale)
    assert sig.dtype == clp.dtype == torch.float32
    torch.testing.assert_close(sig.double(), siglip_reference(img, txt, 10.0, -10.0), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(clp.double(), clip_reference(img, txt, 10.0), atol=1e-5, rtol=1e-6)


@pytest.mark.peer
def test_losses_match_open_clip():
    img, txt = _embeds(8, 6, seed=3)
    scale, bias = torch.tensor(9.0), torch.tensor(-2.0)
    peer = open_clip_loss.ClipLoss()(img, txt, scale)
    torch.testing.assert_close(clip_loss(img, txt, scale), peer, atol=1e-6, rtol=1e-6)
    peer = open_clip_loss.SigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias), peer, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- a stand-in two-tower model


class TinyTwoTower(nn.Module):
    """The two-tower interface the objectives use (encode_image/encode_text/tokenize/forward, logit_scale/bias)."""

    def __init__(self, embed_dim=6, vocab=40, context=6, scale=None, bias: float | None = -1.0):
        super().__init__()
        self.vocab, self.context = vocab, context
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, embed_dim))
        self.token_embedding = nn.Embedding(vocab, 8)
        self.text_proj = nn.Linear(8, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0) if scale is None else scale))
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        self.max_logit_scale = math.log(100)

    def tokenize(self, texts):
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sum(map(ord, w)) % (self.vocab - 1) + 1 for w in t.lower().split()][: self.context]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def encode_image(self, images, normalize=False):
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        keep = (tokens > 0).float()[..., None]
        x = self.text_proj((self.token_embedding(tokens) * keep).sum(1) / keep.sum(1).clamp_min(1))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        return {
            "image_embeds": self.encode_image(images, normalize=True),
            "text_embeds": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.clamp(max=self.max_logit_scale).exp(),
            "logit_bias": self.logit_bias,
        }


WORDS = "red green blue circle square triangle big small on a white black".split()


def captions(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist()) for _ in range(n)]


def global_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), captions(n, seed)


def make(name: str, cfg: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_objective(name, TinyTwoTower(bias=-1.0), cfg)


# ---------------------------------------------------------------- the objectives


def test_registered_with_their_keys():
    assert {"clip", "siglip"} <= set(list_objectives())
    lock = {"lock_image": False, "lock_image_unlocked_blocks": 0}
    assert objective_keys("clip") == {"local_loss": False, "gather_with_grad": True, "label_smoothing": 0.0, **lock}
    assert objective_keys("siglip") == {"chunked": True, **lock}
    assert isinstance(make("clip", {"local_loss": True}), Clip)
    assert isinstance(make("siglip"), Siglip)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_forward_tokenizes_captions_and_reports_in_batch_accuracy(name):
    obj = make(name)
    images, caps = global_batch(6)
    out = obj({"image": images, "caption": caps})
    assert set(out) >= {"loss", "logit_scale", "acc_i2t", "acc_t2i"}
    same = obj({"image": images, "text": obj.model.tokenize(caps)})
    torch.testing.assert_close(out["loss"], same["loss"], rtol=0, atol=0)
    m = obj.model
    img, txt = m.encode_image(images, normalize=True), m.encode_text(m.tokenize(caps), normalize=True)
    scale = m.logit_scale.exp().item()
    ref = clip_reference(img, txt, scale) if name == "clip" else siglip_reference(img, txt, scale, m.logit_bias.item())
    torch.testing.assert_close(out["loss"].double(), ref.detach(), atol=1e-5, rtol=1e-5)
    sim = (img @ txt.T).detach()
    want_i2t = sum(int(sim[i].argmax() == i) for i in range(6)) / 6
    want_t2i = sum(int(sim[:, j].argmax() == j) for j in range(6)) / 6
    assert out["acc_i2t"].item() == pytest.approx(want_i2t)
    assert out["acc_t2i"].item() == pytest.approx(want_t2i)
    assert out["logit_scale"].item() == pytest.approx(5.0)
    out["loss"].backward()
    for p in (m.visual[1].weight, m.token_embedding.weight, m.logit_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if name == "siglip":
        assert m.logit_bias.grad.abs() > 0


def test_logit_scale_is_what_the_model_returns():
    obj = make("clip")
    with torch.no_grad():
        obj.model.logit_scale.fill_(math.log(1000.0))  # past CLIP's clamp at 100
    images, caps = global_batch(4)
    assert obj({"image": images, "caption": caps})["logit_scale"].item() == pytest.approx(100.0)


def test_bad_models_configs_and_batches_are_clear_errors():
    with pytest.raises(ConfigError, match="two-tower"):
        build_objective("clip", nn.Linear(3, 3))
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="logit bias"):
        build_objective("siglip", TinyTwoTower(bias=None))
    with pytest.raises(ConfigError, match="gather_with_grad"):
        make("clip", {"local_loss": True, "gather_with_grad": False})
    with pytest.raises(ConfigError, match="label_smoothing"):
        make("clip", {"label_smoothing": 1.5})
    with pytest.raises(ConfigError, match="chunk"):
        build_objective("siglip", TinyTwoTower(), {"chunk": 2})
    obj = make("clip")
    images, caps = global_batch(4)
    with pytest.raises(DataError, match="'caption'"):
        obj({"image": images, "label": torch.zeros(4)})
    with pytest.raises(DataError, match="one str per image"):
        obj({"image": images, "caption": caps[:3]})
    with pytest.raises(DataError, match=r"\(B, L\)"):
        obj({"image": images, "text": torch.zeros(3, 6, dtype=torch.long)})


class Pairs(Dataset):
    """Images whose content a caption word names: captions and images that can be matched."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.kind = torch.randint(4, (n,), generator=g)
        self.x = torch.randn(n, 3, 4, 4, generator=g) * 0.3
        self.x[torch.arange(n), self.kind % 3] += 1.0 + (self.kind // 3)[:, None, None].float()

    def __len__(self):
        return len(self.kind)

    def __getitem__(self, i):
        word = ["red", "green", "blue", "bright"][int(self.kind[i])]
        return {"image": self.x[i], "caption": f"a {word} square", "skipped": torch.tensor(False)}


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_trains_through_the_engine_and_evaluates_retrieval(tmp_path, name):
    data = Pairs()
    batch = {"image": torch.stack([data[i]["image"] for i in range(16)]), "caption": [data[i]["caption"] for i in range(16)]}
    tr = make_trainer(tmp_path, objective=make(name), dataset=data, val_dataset=Pairs(16, seed=1), transform=None,
                      batch_size=8, epochs=4, optim={"lr": 3e-2, "weight_decay": 0.0})
    with torch.no_grad():
        first = tr.objective(batch)["loss"].item()
    summary = tr.fit()
    with torch.no_grad():
        last = tr.objective(batch)["loss"].item()
    assert last < first
    assert summary["best_metric"] == "r_mean"
    val = tr.last_val
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(val)
    assert val["r_mean"] == pytest.approx(sum(val[k] for k in val if k[:4] in ("i2t_", "t2i_")) / 6)


# ---------------------------------------------------------------- 2-process gloo


CASES = [
    ("clip", {}),
    ("clip", {"local_loss": True}),
    ("clip", {"gather_with_grad": False}),
    ("clip", {"label_smoothing": 0.1}),
    ("siglip", {"chunked": True}),
    ("siglip", {"chunked": False}),
]


REAL_CASES = [("clip_test", "clip", {"local_loss": True}), ("siglip_test", "siglip", {"chunked": True})]


def make_real(model_name: str, name: str, cfg: dict):
    from vitkit.clip import create_clip

    torch.manual_seed(0)
    return build_objective(name, create_clip(model_name), cfg)


def real_batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), captions(n, seed=1)


def _loss_and_grads(obj, batch):
    out = obj(batch)
    out["loss"].backward()
    return out["loss"].detach(), [p.grad.clone() for p in obj.parameters()]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vitkit.engine.distributed import all_reduce_sum, init_distributed, shutdown_distributed

    init_distributed("gloo")
    images, caps = global_batch(8)
    rows = slice(rank * 4, rank * 4 + 4)
    results = []
    for name, cfg in CASES:
        obj = make(name, cfg)
        loss, grads = _loss_and_grads(obj, {"image": images[rows], "caption": caps[rows]})
        # What DDP optimises: the mean of the processes' losses, the mean of their gradients.
        results.append((all_reduce_sum(loss.clone()) / world, [all_reduce_sum(g) / world for g in grads]))
    images4, caps4 = real_batch()
    for model_name, name, cfg in REAL_CASES:
        obj = make_real(model_name, name, cfg)
        loss, grads = _loss_and_grads(obj, {"image": images4[rank * 2:rank * 2 + 2], "caption": caps4[rank * 2:rank * 2 + 2]})
        results.append((all_reduce_sum(loss.clone()) / world, [all_reduce_sum(g) / world for g in grads]))
    ev = RetrievalEvaluator()
    obj = make("clip")
    batch = {"image": images[rows], "caption": caps[rows], "captions": [[c, "a " + c] for c in caps[rows]]}
    ev.update(batch, obj.eval_outputs(batch))
    torch.save({"results": results, "retrieval": ev.compute()}, f"{out}/rank{rank}.pt")
    shutdown_distributed()


def test_two_process_gloo_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    images, caps = global_batch(8)
    for i, (name, cfg) in enumerate(CASES):
        loss, grads = _loss_and_grads(make(name, cfg), {"image": images, "caption": caps})
        assert any(g.abs().sum() > 1e-3 for g in grads)
        for r in ranks:
            ddp_loss, ddp_grads = r["results"][i]
            torch.testing.assert_close(ddp_loss, loss, atol=1e-6, rtol=1e-5, msg=f"{name} {cfg} loss")
            for g, want in zip(ddp_grads, grads):
                torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5, msg=f"{name} {cfg} gradient")
    images4, caps4 = real_batch()
    for i, (model_name, name, cfg) in enumerate(REAL_CASES, start=len(CASES)):
        loss, grads = _loss_and_grads(make_real(model_name, name, cfg), {"image": images4, "caption": caps4})
        for r in ranks:
            ddp_loss, ddp_grads = r["results"][i]
            torch.testing.assert_close(ddp_loss, loss, atol=1e-5, rtol=1e-5, msg=f"{model_name} loss")
            for g, want in zip(ddp_grads, grads):
                torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4, msg=f"{model_name} gradient")
    # The evaluator scores the union of the processes' embeddings, the same on every process.
    obj = make("clip")
    batch = {"image": images, "caption": caps, "captions": [[c, "a " + c] for c in caps]}
    out = obj.eval_outputs(batch)
    want = retrieval_metrics(out["image_embeds"], out["text_embeds"], out["text_to_image"])
    for r in ranks:
        assert r["retrieval"] == pytest.approx(want)


# ---------------------------------------------------------------- the real two-tower models


@pytest.mark.parametrize("model_name, name", [("clip_test", "clip"), ("siglip_test", "siglip")])
def test_real_two_tower_models_train_with_their_objectives(model_name, name):
    from vitkit.clip import create_clip

    torch.manual_seed(0)
    model = create_clip(model_name)
    with torch.no_grad():  # away from the initial scale, so the reference sees a non-trivial temperature
        model.logit_scale.fill_(math.log(3.0))
        if model.logit_bias is not None:
            model.logit_bias.fill_(-1.0)
    obj = build_objective(name, model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, *model.card.input_size, generator=g)
    caps = ["a red circle on a white background", "two blue squares", "a green triangle, small", "nothing at all"]
    out = obj({"image": images, "caption": caps})
    # Independent of forward: the towers' embeddings one way, the loss from the paper's pseudo-code.
    img, txt = model.encode_image(images), model.encode_text(model.tokenize(caps))
    ref = clip_reference(img, txt, 3.0) if name == "clip" else siglip_reference(img, txt, 3.0, -1.0)
    torch.testing.assert_close(out["loss"].double(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(3.0)
    out["loss"].backward()
    for part in (model.visual, model.text):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0
    assert model.logit_scale.grad.abs() > 0


class RealPairs(Dataset):
    """32 px images with a caption each, for the tiny registered models."""

    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.caps = captions(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "caption": self.caps[i], "skipped": torch.tensor(False)}


def test_real_model_trains_through_the_engine(tmp_path):
    obj = make_real("siglip_test", "siglip", {})
    bias0 = obj.model.logit_bias.item()
    tr = make_trainer(tmp_path, objective=obj, dataset=RealPairs(), val_dataset=RealPairs(6, seed=1), transform=None,
                      batch_size=4, epochs=1, optim={"lr": 1e-3})
    summary = tr.fit()
    assert summary["best_metric"] == "r_mean" and 0.0 <= tr.last_val["r_mean"] <= 1.0
    assert obj.model.logit_bias.item() != bias0
