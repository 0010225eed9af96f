"""Optimizer groups and layer decay, LR schedules and EMA, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitkit.engine import (
    LRSchedule,
    ModelEma,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    ema_update,
    param_groups,
)
from vitkit.engine.runtime import resolve_amp
from vitkit.engine.schedule import lr_at
from vitkit.objectives import Supervised


class TinyViTLike(nn.Module):
    """Parameter names and backbone API of a ViT, at toy size (depth 2)."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.patch_embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False):
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}


def _groups_by_name(groups):
    return {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}


def test_layer_decay_and_no_weight_decay_groups():
    obj = Supervised(TinyViTLike(), num_classes=2)
    got = _groups_by_name(param_groups(obj, weight_decay=0.05, layer_decay=0.5))
    # Layers: stem 0, blocks.0 1, blocks.1 2 (+ final norm), head 3 -> scale 0.5 ** (3 - id).
    want = {
        "model.cls_token": (0.0, 0.125),
        "model.pos_embed": (0.0, 0.125),
        "model.patch_embed.weight": (0.05, 0.125),
        "model.patch_embed.bias": (0.0, 0.125),
        "model.blocks.0.weight": (0.05, 0.25),
        "model.blocks.0.bias": (0.0, 0.25),
        "model.blocks.1.weight": (0.05, 0.5),
        "model.blocks.1.bias": (0.0, 0.5),
        "model.norm.weight": (0.0, 0.5),
        "model.norm.bias": (0.0, 0.5),
        "model.head.weight": (0.05, 1.0),
        "model.head.bias": (0.0, 1.0),
    }
    assert got == want


def test_no_layer_decay_gives_two_groups_and_frozen_params_are_skipped():
    obj = Supervised(TinyViTLike(), num_classes=2)
    obj.model.head.weight.requires_grad_(False)
    groups = param_groups(obj, weight_decay=0.1, no_weight_decay_names=["model.blocks.0.weight"])
    assert len(groups) == 2
    got = _groups_by_name(groups)
    assert "model.head.weight" not in got
    assert got["model.blocks.0.weight"] == (0.0, 1.0) and got["model.blocks.1.weight"] == (0.1, 1.0)
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(Supervised(nn.Linear(4, 2), 2), 0.1, layer_decay=0.7)


def test_build_optimizer_scales_lr_by_batch_and_layer():
    obj = Supervised(TinyViTLike(), num_classes=2)
    opt = build_optimizer(obj, OptimConfig(lr=5e-4, layer_decay=0.5), global_batch=256)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["model.head.weight"] == pytest.approx(2.5e-4)
    assert lrs["model.cls_token"] == pytest.approx(2.5e-4 * 0.125)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(obj, OptimConfig(name="lamb"), 512)


def test_cosine_schedule_values():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, warmup_lr=0.0, min_lr=0.1)
    at = [lr_at(s, cfg, 1.0, 10, 110) for s in (0, 5, 10, 60, 110, 200)]
    # warmup: 0 -> 1 linearly; then 0.1 + 0.45 * (1 + cos(pi * progress))
    assert at == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])


def test_onecycle_and_constant_schedule_values():
    cfg = ScheduleConfig(name="onecycle", warmup_lr=0.0, min_lr=0.0)
    assert lr_at(2, cfg, 1.0, 10, 110) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    assert lr_at(5, cfg, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(35, cfg, 1.0, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    const = ScheduleConfig(name="constant", warmup_lr=0.2)
    assert [lr_at(s, const, 1.0, 4, 100) for s in (0, 2, 4, 99)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, ScheduleConfig(name="step"), 1.0, 0, 10)


def test_lr_schedule_applies_scales_and_round_trips():
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr_scale": 1.0}, {"params": [p2], "lr_scale": 0.5}], lr=1.0)
    cfg = ScheduleConfig(warmup_epochs=0.5, warmup_lr=0.0, min_lr=0.0)
    sched = LRSchedule(opt, cfg, base_lr=2.0, total_steps=20, steps_per_epoch=10)
    assert sched.warmup_steps == 5 and opt.param_groups[0]["lr"] == 0.0
    for _ in range(5):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 1.0])
    other = LRSchedule(opt, cfg, base_lr=2.0, total_steps=20, steps_per_epoch=10)
    other.load_state_dict(sched.state_dict())
    assert other.get_lr() == sched.get_lr() == 2.0


def test_ema_update_values():
    model = nn.Linear(1, 1, bias=False)
    model.register_buffer("count", torch.tensor(0))
    nn.init.constant_(model.weight, 1.0)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.count.fill_(7)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1.1)  # 0.9 * 1 + 0.1 * 2
    assert ema.module.count.item() == 7  # buffers are copied
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1.29)  # 0.9 * 1.1 + 0.1 * 3
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_update_of_parameters_only_leaves_buffers():
    """The teachers' form (DINO, MoCo v3): parameters move, buffers are not touched."""
    target, source = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        source.weight.fill_(3.0)
        source.running_mean.fill_(5.0)
        source.num_batches_tracked.fill_(4)
    ema_update(target, source, 0.75)
    assert target.weight.tolist() == pytest.approx([1.5, 1.5])  # 0.75 * 1 + 0.25 * 3
    assert target.running_mean.tolist() == [0.0, 0.0] and int(target.num_batches_tracked) == 0
    ema_update(target, source, 0.5, buffers=True)
    assert target.running_mean.tolist() == [2.5, 2.5] and int(target.num_batches_tracked) == 4


def test_ema_copies_a_mask_buffer_instead_of_averaging_it_to_nan():
    """A text tower's causal mask (-inf above the diagonal) is a float buffer: averaging -inf with
    -inf is NaN, which made every EMA evaluation of a CLIP run NaN."""
    target, source = nn.Module(), nn.Module()
    mask = torch.full((3, 3), float("-inf")).triu(1)
    for m in (target, source):
        m.register_buffer("mask", mask.clone())
        m.register_buffer("stat", torch.zeros(2))
    source.stat.fill_(4.0)
    ema_update(target, source, 0.75, buffers=True)
    assert torch.equal(target.mask, mask)  # no NaN: copied
    assert target.stat.tolist() == [1.0, 1.0]  # statistics still averaged


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) is None and resolve_amp("fp32", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown amp"):
        resolve_amp("fp8", cpu)
