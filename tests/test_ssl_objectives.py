"""Self-supervised objectives on a tiny ViT through the one engine: gradients, teachers, centres,
schedules, resume, and the whole-batch losses under 2-process gloo."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import (
    assert_same_run,
    crash_and_resume,
    free_port,
    make_trainer,
)
from torch.utils.data import DataLoader, Dataset

from vitkit.engine import load_checkpoint
from vitkit.models import create_model
from vitkit.objectives import (
    DINO,
    IBOT,
    MAE,
    DINOConfig,
    IBOTConfig,
    MoCoV3,
    MoCoV3Config,
    SimCLR,
    SimCLRConfig,
)
from vitkit.objectives.dino import update_center
from vitkit.objectives.mae import unpatchify
from vitkit.objectives.mocov3 import info_nce
from vitkit.objectives.simclr import nt_xent
from vitkit.objectives.ssl import cosine_ramp

TINY_HEAD = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, head_layers=2)


class Views(Dataset):
    """32 px images in 4 classes (a bright quadrant); views: 2 global (flips) and 1 local 16 px crop."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        self.x = 0.3 * torch.randn(n, 3, 32, 32, generator=g)
        for i, c in enumerate(self.y.tolist()):
            r, col = divmod(c, 2)
            self.x[i, :, 16 * r : 16 * r + 16, 16 * col : 16 * col + 16] += 1.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return {"image": x, "label": self.y[i], "views": [x, x.flip(-1), x[:, 8:24, 8:24]]}


def view_noise(batch):
    return {**batch, "views": [v + 0.1 * torch.randn_like(v) for v in batch["views"]]}


def tiny_vit():
    return create_model("test_vit", num_classes=4)


def dino(**kw):
    torch.manual_seed(0)
    return DINO(tiny_vit(), DINOConfig(**{**TINY_HEAD, **kw}))


def views_batch(n: int = 8):
    ds = Views(n)
    return next(iter(DataLoader(ds, batch_size=n)))


def ssl_trainer(out, objective_fn, **kw):
    kw = {"optim": {"lr": 1e-3}, "epochs": 2, **kw}
    return make_trainer(
        out, objective=objective_fn(), dataset=Views(), val_dataset=Views(8, seed=1), transform=view_noise,
        batch_size=8, **kw,
    )


# ---------------------------------------------------------------- MAE


def test_mae_encoder_sees_only_visible_patches_and_trains():
    torch.manual_seed(0)
    mae = MAE(tiny_vit(), patch_size=8, in_chans=3, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    r1 = mae.reconstruct(x)
    assert r1["pred"].shape == (2, 16, 192) and r1["mask"].sum().item() == 2 * 12
    # Scramble every masked patch: the same mask gives the same prediction (the encoder never saw them).
    pixel_mask = unpatchify(r1["mask"][..., None].float().expand(-1, -1, 192), (4, 4), 3).bool()
    x2 = torch.where(pixel_mask, torch.randn_like(x) * 5, x)
    torch.manual_seed(1)
    r2 = mae.reconstruct(x2)
    assert torch.equal(r1["mask"], r2["mask"])
    torch.testing.assert_close(r2["pred"], r1["pred"])
    assert not torch.equal(r2["target"], r1["target"])
    mae.train()
    loss = mae({"image": x})["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert mae.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.decoder.mask_token.grad.abs().sum() > 0
    assert mae.export_model() is mae.model and mae.model.num_classes == 0  # the classifier is removed


def test_mae_writes_reconstruction_figure_at_the_end(tmp_path):
    def make():
        torch.manual_seed(0)
        return MAE(tiny_vit(), patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=2)

    tr = ssl_trainer(tmp_path, make, epochs=1)
    tr.fit()
    png = tmp_path / "reconstruction.png"
    assert png.is_file() and png.stat().st_size > 1000


# ---------------------------------------------------------------- DINO


def test_dino_teacher_gets_no_gradient_and_is_exported():
    obj = dino().train()
    out = obj(views_batch())
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert all(p.grad is None for p in obj.teacher_head.parameters())
    assert obj.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert obj.head.mlp[0].weight.grad.abs().sum() > 0
    assert obj.export_model() is obj.teacher
    assert set(obj.frozen_modules()) == {"teacher", "teacher_head"}
    assert obj.teacher.training is False  # frozen modules stay in eval mode


def test_dino_schedules_centre_and_last_layer_freeze(tmp_path):
    class Record:
        def __init__(self):
            self.v = []

        def on_step_end(self, ctx):
            self.v.append(ctx.trainer.objective.head.last_layer.weight_v.detach().clone())

    rec = Record()
    # The paper's rule alone (freeze_last_layer_max=1): the first of these two epochs is frozen.
    tr = ssl_trainer(tmp_path, lambda: dino(freeze_last_layer_max=1.0), hooks=[rec],
                     optim={"lr": 1e-3, "weight_decay": 0.04})
    v0 = tr.objective.head.last_layer.weight_v.detach().clone()
    tr.fit()
    obj = tr.objective
    assert tr.steps_per_epoch == 4 and len(rec.v) == 8
    assert all(torch.equal(v, v0) for v in rec.v[:4])  # frozen through the first epoch
    assert not torch.equal(rec.v[-1], v0)
    assert obj.center.abs().sum() > 0
    assert obj.progress.item() == pytest.approx(1.0) and obj.teacher_temp() == pytest.approx(0.04)
    student = dict(obj.model.named_parameters())
    assert any(not torch.equal(p, student[k]) for k, p in obj.teacher.named_parameters())
    # Weight decay followed its cosine to 0.4 on decayed groups; the others have none.
    wds = {g["weight_decay"] for g in tr.optimizer.param_groups}
    assert sorted(wds) == [0.0, pytest.approx(0.4)]
    # The centre is state: in the checkpoint, equal to the live one.
    ckpt = load_checkpoint(tmp_path)
    torch.testing.assert_close(ckpt["objective"]["center"], obj.center)
    assert "teacher.blocks.0.attn.qkv.weight" in ckpt["objective"]


@pytest.mark.parametrize("make", [dino, lambda: ibot(centering="sinkhorn_knopp")], ids=["dino", "ibot_sk"])
def test_dino_resume_reproduces_the_uninterrupted_run(tmp_path, make):
    full = ssl_trainer(tmp_path / "full", make)
    full.fit()
    resumed = crash_and_resume(lambda out, **kw: ssl_trainer(out, make, **kw), tmp_path / "run", 5, latest=4, ckpt_every_steps=4)
    assert_same_run(full, resumed)


def test_knn_evaluator_runs_in_training_and_picks_best(tmp_path):
    def make():
        torch.manual_seed(0)
        return DINO(tiny_vit(), DINOConfig(**TINY_HEAD), num_classes=4, bank_loader=DataLoader(Views(32), batch_size=16))

    tr = ssl_trainer(tmp_path, make)
    s = tr.fit()
    assert 0.0 <= s["val_knn_acc"] <= 1.0 and s["best_metric"] == "knn_acc"
    assert (tmp_path / "checkpoints" / "best").is_dir()


# ---------------------------------------------------------------- iBOT / DINOv2 pieces


def ibot(**kw):
    torch.manual_seed(0)
    return IBOT(tiny_vit(), IBOTConfig(**{**TINY_HEAD, "mask_prob": 1.0, "koleo_weight": 0.1, **kw}))


def test_teacher_temperatures_follow_the_reference_codes_defaults():
    """DINO's main_dino.py: the teacher at 0.04 throughout. iBOT's main_ibot.py: the class token's
    targets at 0.04 throughout, the patch tokens' warmed up linearly from 0.04 to 0.07 over the
    warm-up (30 of 100 epochs: 0.3 of the run), then 0.07."""
    d, i = dino(), ibot()
    for p in (0.0, 0.1, 0.15, 0.3, 0.6, 1.0):
        d.progress.fill_(p)
        i.progress.fill_(p)
        patch_ref = 0.04 + (0.07 - 0.04) * min(1.0, p / 0.3)
        assert d.teacher_temp() == pytest.approx(0.04) and i.teacher_temp() == pytest.approx(0.04)
        assert i.teacher_patch_temp() == pytest.approx(patch_ref)
    # The patch targets use the patch temperature: at the end, softmax((logits - centre) / 0.07).
    i.eval()
    i.progress.fill_(1.0)
    torch.manual_seed(1)
    logits, mask = torch.randn(2, 16, 32), torch.rand(2, 16) < 0.5
    i.center_patch.copy_(torch.randn(1, 32))
    expected = torch.softmax((logits[mask] - i.center_patch) / 0.07, dim=-1)
    torch.testing.assert_close(i.patch_targets(logits, mask), expected)


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_ibot_masked_patch_loss_koleo_and_centring(centering):
    obj = ibot(centering=centering).train()
    out = obj(views_batch())
    assert {"loss", "dino_loss", "patch_loss", "koleo"} <= set(out)
    assert torch.isfinite(out["loss"]) and out["patch_loss"] > 0
    out["loss"].backward()
    assert obj.mask_token.grad.abs().sum() > 0  # masked tokens were replaced by the objective's token
    assert all(p.grad is None for p in obj.teacher.parameters())
    moved = obj.center_patch.abs().sum() > 0
    assert moved if centering == "center" else not moved
    assert obj.export_model() is obj.teacher


# ---------------------------------------------------------------- SimCLR, MoCo v3


def test_simclr_and_mocov3_train_through_the_engine(tmp_path):
    def simclr():
        torch.manual_seed(0)
        return SimCLR(tiny_vit(), SimCLRConfig(proj_hidden_dim=32, proj_dim=16))

    def moco():
        torch.manual_seed(0)
        return MoCoV3(tiny_vit(), MoCoV3Config(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32))

    s = ssl_trainer(tmp_path / "simclr", simclr, epochs=1).fit()
    assert s["steps"] == 4
    tr = ssl_trainer(tmp_path / "moco", moco, epochs=1)
    enc0 = [p.detach().clone() for p in tr.objective.momentum_encoder.parameters()]
    tr.fit()
    obj = tr.objective
    assert any(not torch.equal(a, b) for a, b in zip(enc0, obj.momentum_encoder.parameters()))  # EMA moved it
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in obj.momentum_encoder.parameters())
    assert not any(id(p) in opt_ids for p in obj.momentum_projector.parameters())
    assert cosine_ramp(0.99, 1.0, obj.progress.item()) == pytest.approx(1.0)


# ---------------------------------------------------------------- 2-process gloo


def _fixed(n: int = 8, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, 6, generator=g)


def _whole_batch_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vitkit.engine.distributed import init_distributed, shutdown_distributed

    init_distributed("gloo")
    a, b, t = _fixed()
    rows = slice(rank * 4, rank * 4 + 4)
    la, lb = a[rows].clone().requires_grad_(True), b[rows].clone().requires_grad_(True)
    loss = nt_xent(la, lb, 0.3)
    loss.backward()
    q = a[rows].clone().requires_grad_(True)
    moco = info_nce(q, b[rows], 0.2)
    moco.backward()
    center = torch.zeros(1, 6)
    update_center(center, t[rows], 0.9)
    torch.save({"loss": loss.detach(), "ga": la.grad, "gb": lb.grad, "moco": moco.detach(), "gq": q.grad,
                "center": center}, f"{out}/rank{rank}.pt")
    shutdown_distributed()


def test_whole_batch_losses_under_two_process_gloo_equal_one_process(tmp_path):
    a, b, t = _fixed()
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = nt_xent(a, b, 0.3)
    loss.backward()
    q = a.detach().clone().requires_grad_(True)
    moco = info_nce(q, b.detach(), 0.2)
    moco.backward()
    center = torch.zeros(1, 6)
    update_center(center, t, 0.9)

    mp.spawn(_whole_batch_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    # DDP averages the ranks' gradients and the loss of the global batch is the ranks' mean.
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([x["ga"] for x in r]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([x["gb"] for x in r]) / 2, b.grad)
    torch.testing.assert_close((r[0]["moco"] + r[1]["moco"]) / 2, moco.detach())
    torch.testing.assert_close(torch.cat([x["gq"] for x in r]) / 2, q.grad)
    for x in r:
        torch.testing.assert_close(x["center"], center)
