"""A self-supervised objective (EMA teacher, multi-view batches, a center buffer) runs through the
same Trainer and resumes bitwise: no second training loop is needed for DINO-style methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_run, crash_and_resume, make_trainer
from torch import nn
from torch.utils.data import Dataset

from vitkit.engine.distributed import all_reduce_sum, get_world_size
from vitkit.objectives import Objective


class PoolNet(nn.Module):
    """(B, C, L) -> (B, out): mean over L then an MLP, so views of any length L fit."""

    def __init__(self, dim: int = 8, out: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, out)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x.mean(-1)))))


class TinyDino(Objective):
    """Student sees all views, the EMA teacher only the 2 global ones; teacher outputs are centered
    (center updated by EMA) and sharpened. Teacher momentum follows a cosine from ``base_momentum``
    to 1 over the run."""

    def __init__(self, out: int = 16, base_momentum: float = 0.9, center_momentum: float = 0.9):
        super().__init__()
        self.model = PoolNet(out=out)
        self.teacher = copy.deepcopy(self.model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.base_momentum = base_momentum
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(out))
        self.register_buffer("momentum", torch.tensor(base_momentum, dtype=torch.float64))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout
        return self

    def forward(self, batch):
        views = batch["views"]  # [global (B, 8, 6), global (B, 8, 6), local (B, 8, 3)]
        with torch.no_grad():
            t_out = [self.teacher(v) for v in views[:2]]  # 2 x (B, out)
            t_prob = [F.softmax((t - self.center) / 0.04, dim=-1) for t in t_out]
        s_logp = [F.log_softmax(self.model(v) / 0.1, dim=-1) for v in views]
        loss, n = 0.0, 0
        for i, tp in enumerate(t_prob):
            for j, sl in enumerate(s_logp):
                if i != j:
                    loss = loss + torch.sum(-tp * sl, dim=-1).mean()
                    n += 1
        with torch.no_grad():
            batch_center = all_reduce_sum(torch.cat(t_out).sum(0)) / (len(t_out[0]) * 2 * get_world_size())
            self.center.lerp_(batch_center, 1 - self.center_momentum)
        return {"loss": loss / n, "teacher_entropy": -(t_prob[0] * t_prob[0].clamp_min(1e-12).log()).sum(-1).mean()}

    def on_step_end(self, ctx):
        m = 1 - (1 - self.base_momentum) * (math.cos(math.pi * ctx.step / ctx.total_steps) + 1) / 2
        self.momentum.fill_(m)
        with torch.no_grad():
            t, s = list(self.teacher.parameters()), list(self.model.parameters())
            torch._foreach_lerp_(t, s, 1 - m)


class MultiView(Dataset):
    def __init__(self, n: int = 48, seed: int = 0):
        self.x = torch.randn(n, 8, 12, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return {"views": [x[:, :6], x[:, 6:], x[:, 3:6]]}


def view_noise(batch):
    return {"views": [v + 0.05 * torch.randn_like(v) for v in batch["views"]]}


def ssl_trainer(out_dir, **kw):
    torch.manual_seed(0)  # the same initial weights in every run
    return make_trainer(
        out_dir, objective=TinyDino(), dataset=MultiView(), val_dataset=MultiView(16, seed=1),
        transform=view_noise, batch_size=8, epochs=2, **kw,
    )


def test_ssl_objective_trains_and_schedules_teacher(tmp_path):
    tr = ssl_trainer(tmp_path, plots=True)
    s = tr.fit()
    obj = tr.objective
    assert s["steps"] == 12 and s["val_acc"] is None and math.isfinite(s["val_loss"])
    # Cosine momentum ends at exactly 1 at the last step.
    assert obj.momentum.item() == pytest.approx(1.0)
    assert obj.center.abs().sum() > 0
    student = dict(obj.model.named_parameters())
    assert any(not torch.equal(p, student[k]) for k, p in obj.teacher.named_parameters())
    # The teacher is frozen state: not optimised, but saved with the objective.
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in obj.teacher.parameters())
    sd = tr.objective.state_dict()
    assert "center" in sd and "teacher.fc1.weight" in sd


def test_ssl_objective_resumes_bitwise(tmp_path):
    full = ssl_trainer(tmp_path / "full")
    full.fit()
    resumed = crash_and_resume(ssl_trainer, tmp_path / "run", 5, latest=4, ckpt_every_steps=4)
    assert_same_run(full, resumed)
