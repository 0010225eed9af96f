"""Distillation objectives (kd, deit, feature_kd) and the frozen teacher: loss math against closed
forms, the teacher's input, sources and hash, eval mode and no gradients through fit(), bitwise resume,
and the CLI end to end on the built-in shapes data."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import Crash, CrashAt, assert_same_state
from safetensors.torch import load_file
from torch import nn

import vitkit
from vitkit.cli.main import main
from vitkit.config import load_config
from vitkit.engine import load_checkpoint
from vitkit.errors import ConfigError, PathNotFoundError, WeightsError
from vitkit.objectives import (
    KD,
    DeiT,
    FeatureKD,
    Supervised,
    Teacher,
    TeacherInput,
    build_objective,
    kd_term,
    load_teacher,
    objective_config,
    weights_sha256,
)
from vitkit.train import build_run

# ---------------------------------------------------------------- loss math on hand-made logits


class Fixed(nn.Module):
    """Returns fixed logits, (C,) per sample or (B, C), as one tensor or a (cls, dist) pair with a ``head_dist``."""

    def __init__(self, *logits):
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in logits])
        if len(logits) == 2:
            self.head_dist = nn.Linear(1, 1)  # the parameter name marks a distillation head

    def forward(self, x):
        out = [p if p.ndim == 2 else p.expand(x.shape[0], -1) for p in self.logits]
        return tuple(out) if len(out) == 2 else out[0]


def _softmax(v, T=1.0):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


IMG = torch.zeros(1, 3, 4, 4)  # the fixed models ignore it; the teacher's input adapter needs an image


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_equals_closed_form_with_t_squared(T):
    s, t, y, a = [1.0, 2.0, 0.5], [3.0, -1.0, 0.0], 1, 0.3
    obj = KD(Fixed(s), Fixed(t), num_classes=3, alpha=a, temperature=T, label_smoothing=0.0)
    out = obj({"image": IMG, "label": torch.tensor([y])})
    ce = -math.log(_softmax(s)[y])
    kl = _kl(_softmax(t, T), _softmax(s, T))
    assert out["loss"].item() == pytest.approx((1 - a) * ce + a * T * T * kl, rel=1e-5)
    assert out["kd"].item() == pytest.approx(T * T * kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert kd_term(torch.tensor([s]), torch.tensor([t]), T).item() == pytest.approx(T * T * kl, rel=1e-5)


def test_kd_with_mixup_targets_is_a_batch_mean():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    target = torch.softmax(torch.randn(5, 4, generator=g), -1)
    per_sample = [_kl(_softmax(t[i].tolist(), 2.0), _softmax(s[i].tolist(), 2.0)) for i in range(5)]
    want_kd = 4.0 * sum(per_sample) / 5  # batchmean: summed over classes, averaged over samples
    want_ce = (-target * F.log_softmax(s, -1)).sum(-1).mean().item()
    obj = KD(Fixed(s.tolist()), Fixed(t.tolist()), num_classes=4, alpha=0.5, temperature=2.0)
    out = obj({"image": torch.zeros(5, 3, 4, 4), "target": target})
    assert out["loss"].item() == pytest.approx(0.5 * want_ce + 0.5 * want_kd, rel=1e-5)
    assert "acc1" not in out  # no hard labels to score against


def test_hard_distillation_uses_the_teacher_argmax():
    cls, dist, y = [2.0, 0.0, 1.0], [0.0, 1.0, 3.0], 0
    teacher = Fixed([0.1, 0.2, 5.0])  # argmax 2, not the label
    obj = DeiT(Fixed(cls, dist), teacher, num_classes=3, distill_type="hard", alpha=0.5, label_smoothing=0.0)
    out = obj({"image": IMG, "label": torch.tensor([y])})
    want = 0.5 * -math.log(_softmax(cls)[y]) + 0.5 * -math.log(_softmax(dist)[2])
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    # Only the argmax matters: a teacher just as sure of class 2 in another way gives the same loss.
    other = DeiT(Fixed(cls, dist), Fixed([-3.0, 0.0, 0.5]), num_classes=3, alpha=0.5, label_smoothing=0.0)
    assert other({"image": IMG, "label": torch.tensor([y])})["loss"].item() == pytest.approx(want, rel=1e-5)


def test_soft_distillation_uses_the_softened_teacher():
    cls, dist, t, y, T = [2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [0.1, 0.2, 1.0], 0, 3.0
    obj = DeiT(Fixed(cls, dist), Fixed(t), num_classes=3, distill_type="soft", alpha=0.25, temperature=T,
               label_smoothing=0.0)
    out = obj({"image": IMG, "label": torch.tensor([y])})
    # DeiT's released reduction: the KL summed over the batch and classes, divided by B·C (C = 3).
    kl = T * T * _kl(_softmax(t, T), _softmax(dist, T))
    want = 0.75 * -math.log(_softmax(cls)[y]) + 0.25 * kl / 3
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    per_sample = DeiT(Fixed(cls, dist), Fixed(t), num_classes=3, distill_type="soft", alpha=0.25, temperature=T,
                      label_smoothing=0.0, soft_reduction="batchmean")
    assert per_sample({"image": IMG, "label": torch.tensor([y])})["dist"].item() == pytest.approx(kl, rel=1e-5)


def test_deit_needs_a_distillation_head():
    teacher = vitkit.create_model("test_vit", num_classes=4)
    with pytest.raises(ConfigError, match="distillation token"):
        DeiT(vitkit.create_model("test_vit", num_classes=4), teacher, num_classes=4)
    with pytest.raises(ConfigError, match="objective.distill_type"):
        objective_config({"name": "deit", "distill_type": "medium"})
    with pytest.raises(ConfigError, match="objective.alpha"):
        objective_config({"name": "kd", "alpha": 1.5})


def test_deit_evaluation_averages_the_two_heads_and_supervised_keeps_averaging():
    torch.manual_seed(0)
    student = vitkit.create_model("test_deit_distilled", num_classes=4, drop_path_rate=0.0)
    obj = DeiT(student, vitkit.create_model("test_vit", num_classes=4), num_classes=4)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    obj.train()
    cls, dist = student(x)  # train mode: both heads
    obj.eval()
    torch.testing.assert_close(obj.eval_outputs({"image": x, "label": y})["logits"], (cls + dist) / 2)
    torch.testing.assert_close(obj.evaluate({"image": x, "label": y})["loss"],
                               F.cross_entropy((cls + dist) / 2, y, reduction="none"))
    # Training supervises each head with its own target, unlike `supervised`, which averages first.
    obj.train()
    sup = Supervised(student, 4, label_smoothing=0.0)({"image": x, "label": y})["loss"]
    torch.testing.assert_close(sup, F.cross_entropy((cls + dist) / 2, y))
    assert not torch.allclose(obj({"image": x, "label": y})["loss"], sup)


# ---------------------------------------------------------------- the teacher: input, gradients, dtype


def test_teacher_sees_its_own_size_and_normalisation():
    s_mean, s_std = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.5, 0.6, 0.7])
    t_mean, t_std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    raw = torch.rand(2, 3, 32, 32)
    student_x = (raw - s_mean.view(1, 3, 1, 1)) / s_std.view(1, 3, 1, 1)
    adapter = TeacherInput((s_mean, s_std), (t_mean, t_std), size=(16, 16))
    want = (F.interpolate(raw, size=(16, 16), mode="bilinear", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(adapter(student_x), want, atol=1e-5, rtol=0)
    grey = TeacherInput((torch.tensor([0.5]), torch.tensor([0.5])), (t_mean, t_std))  # 1-channel student
    g = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(grey((g - 0.5) / 0.5), ((g - 0.5) / 0.25).expand(-1, 3, -1, -1))
    with pytest.raises(ConfigError, match="channels"):
        TeacherInput((s_mean, s_std), (torch.tensor([0.5]), torch.tensor([0.5])))

    # Built from cards: a 16 px teacher with its own statistics under a 32 px student.
    student = vitkit.create_model("test_vit", num_classes=4)
    net = vitkit.create_model("test_vit", num_classes=4, img_size=16)
    net.card = replace(net.card, mean=(0.5,) * 3, std=(0.25,) * 3)
    teacher = Teacher(net, student)
    sx = (raw - torch.tensor(student.card.mean).view(1, 3, 1, 1)) / torch.tensor(student.card.std).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher(sx), net.eval()(want), atol=1e-4, rtol=0)


def test_no_gradient_reaches_the_teacher():
    torch.manual_seed(0)
    student = vitkit.create_model("test_deit_distilled", num_classes=4)
    net = vitkit.create_model("test_vit", num_classes=4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    for obj in (KD(student, net, 4), DeiT(student, net, 4), DeiT(student, net, 4, distill_type="soft"),
                FeatureKD(student, net, 4)):
        net.requires_grad_(True)  # even a teacher whose parameters would accept gradients gets none
        obj.train()
        obj({"image": x, "label": y})["loss"].backward()
        assert all(p.grad is None for p in net.parameters())
        assert any(p.grad is not None for p in student.parameters())
        student.zero_grad(set_to_none=True)


def test_bf16_teacher_outputs_float32_close_to_fp32():
    torch.manual_seed(0)
    student = vitkit.create_model("test_vit", num_classes=4)
    net = vitkit.create_model("test_vit", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    want = Teacher(net, student)(x)
    bf = Teacher(vitkit.create_model("test_vit", num_classes=4), student, dtype=torch.bfloat16)
    bf.model.load_state_dict(net.state_dict())
    out = bf(x)
    assert out.dtype == torch.float32 and next(bf.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=0.1, rtol=0.05)
    assert bf.train().training is False  # a teacher stays in eval mode whatever it is asked


def test_feature_kd_trains_a_projection_that_is_not_exported():
    torch.manual_seed(0)
    student = vitkit.create_model("test_vit", num_classes=4, drop_path_rate=0.0)
    net = vitkit.create_model("test_vit_gap", num_classes=4, img_size=16, embed_dim=48)
    obj = FeatureKD(student, net, 4, feature_weight=2.0, label_smoothing=0.0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    obj.train()
    out = obj({"image": x, "label": y})
    # The same loss from the backbone API by hand: 32 px student grid 4x4 (64 ch) -> teacher 2x2 (48 ch).
    final, (fs,) = student.forward_intermediates(x, indices=[-1])
    ft = net.eval().forward_intermediates(obj.teacher.input(x), indices=[-1], intermediates_only=True)[0]
    assert fs.shape == (2, 64, 4, 4) and ft.shape == (2, 48, 2, 2)
    pred = F.interpolate(obj.proj(fs), size=(2, 2), mode="bilinear", align_corners=False)
    target = F.layer_norm(ft.permute(0, 2, 3, 1), (48,)).permute(0, 3, 1, 2)
    want = F.cross_entropy(student.forward_head(final), y) + 2.0 * F.mse_loss(pred, target)
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    assert obj.proj.weight.grad is not None and obj.proj.weight.grad.abs().sum() > 0
    assert obj.export_model() is student and not any(k.startswith("proj") for k in student.state_dict())
    assert "proj.weight" in obj.checkpoint_state_dict()


# ---------------------------------------------------------------- teacher sources and references


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A 16 px test_vit teacher for the 6 shapes classes with its own mean/std, saved by save_weights."""
    from vitkit.data.shapes import DEFAULT_CLASSES

    torch.manual_seed(7)
    net = vitkit.create_model("test_vit", num_classes=6, img_size=16)
    net.card = replace(net.card, labels=DEFAULT_CLASSES, mean=(0.5,) * 3, std=(0.25,) * 3)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    vitkit.save_weights(net, path)
    return path


def test_teacher_sources_and_hash(teacher_file, tmp_path):
    net, ref = load_teacher(teacher_file)
    assert not net.training and net.card.input_size == (3, 16, 16) and net.card.mean == (0.5,) * 3
    assert ref == {"source": str(teacher_file), "model": "test_vit", "sha256": weights_sha256(net)}
    # Weights without vitkit metadata need the architecture named; the hash is of the weights, not the file.
    from safetensors.torch import save_file

    bare = vitkit.create_model("test_vit", num_classes=6)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(plain))
    with pytest.raises(ConfigError, match="objective.teacher_model"):
        load_teacher(plain)
    again, ref2 = load_teacher(plain, "test_vit", num_classes=6)
    assert ref2["sha256"] == weights_sha256(bare) != ref["sha256"]
    assert_same_state(again.state_dict(), bare.state_dict())
    with pytest.raises(ConfigError, match="drop teacher_model"):
        load_teacher(teacher_file, "test_vit_gap")
    with pytest.raises(ConfigError, match="no published weights"):
        load_teacher("test_vit")
    with pytest.raises(ConfigError, match="objective.teacher_model"):
        load_teacher("someone/not-a-vitkit-model")  # a hub id no card publishes: refused before any download
    with pytest.raises(PathNotFoundError, match="objective.teacher"):
        load_teacher(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_objective("kd", vitkit.create_model("test_vit", num_classes=6), num_classes=6)
    with pytest.raises(ConfigError, match="predicts 6 classes but the student 4"):
        build_objective("kd", vitkit.create_model("test_vit", num_classes=4), {"teacher": str(teacher_file)},
                        num_classes=4)
    bf = build_objective("deit", vitkit.create_model("test_deit_distilled", num_classes=6),
                         {"teacher": str(teacher_file), "teacher_dtype": "bfloat16"}, num_classes=6)
    assert bf.references()["teacher"]["sha256"] == ref["sha256"]  # the hash is of the weights as loaded
    assert next(bf.teacher.parameters()).dtype == torch.bfloat16


def _cfg(out, teacher, objective="deit", epochs=2, **extra):
    overrides = [
        "model.name=test_deit_distilled", "data.path=shapes:64", "data.img_size=32", f"engine.epochs={epochs}",
        "data.batch_size=16", "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false",
        "engine.amp=none", "model.drop_path_rate=0.1", f"engine.out_dir={out}", "engine.ckpt_every_steps=2",
        f"objective.name={objective}", f"objective.teacher={teacher}",
        *[f"objective.{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


def _run(out, teacher, hooks=(), resume=False, **kw):
    cfg = _cfg(out, teacher, **kw)
    torch.manual_seed(cfg.engine.seed)  # as vitkit.train does: the same student init every run
    trainer, _ = build_run(cfg, verbose=False)
    trainer.hooks.extend(hooks)
    trainer.fit(resume=resume)
    return trainer


class TeacherModes:
    """Records, at every forward of the teacher's modules, whether any was in train mode."""

    def __init__(self, teacher: nn.Module):
        self.modes: list[bool] = []
        for m in teacher.modules():
            m.register_forward_pre_hook(lambda mod, args: self.modes.append(mod.training))


def test_teacher_frozen_through_fit_and_resume_is_bitwise(teacher_file, tmp_path):
    cfg = _cfg(tmp_path / "full", teacher_file)
    torch.manual_seed(cfg.engine.seed)
    full, _ = build_run(cfg, verbose=False)
    teacher = full.objective.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = TeacherModes(teacher)
    full.fit()
    assert len(modes.modes) > 0 and not any(modes.modes)  # eval mode at every call, through evaluations too
    assert_same_state(before, teacher.state_dict(), "teacher")
    in_optimizer = {id(p) for g in full.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in teacher.parameters())
    ck = load_checkpoint(tmp_path / "full")
    assert not any(k.startswith("teacher.") for k in ck["objective"])  # recorded, not saved
    ref = ck["trainer_state"]["references"]["teacher"]
    assert ref["source"] == str(teacher_file) and ref["sha256"] == weights_sha256(teacher.model)

    steps = full.step
    own = tmp_path / "teacher.safetensors"  # the run's teacher file, changed while the run is interrupted
    shutil.copy(teacher_file, own)
    with pytest.raises(Crash):
        _run(tmp_path / "run", own, hooks=[CrashAt(steps - 3)])
    net = vitkit.create_model(str(own))
    with torch.no_grad():
        net.head.bias.add_(1.0)
    vitkit.save_weights(net, own)
    with pytest.raises(WeightsError, match="sha256"):
        _run(tmp_path / "run", own, resume=True)
    shutil.copy(teacher_file, own)
    resumed = _run(tmp_path / "run", own, resume=True)
    assert resumed.step == steps
    assert_same_state(full.objective.checkpoint_state_dict(), resumed.objective.checkpoint_state_dict(), "objective")
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")


# ---------------------------------------------------------------- the CLI, end to end


TINY = [
    "engine.epochs=1", "data.batch_size=16", "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false",
    "engine.amp=none",
]


def _train(model: str, out, *overrides: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--model", model, "--data", "shapes:64", "--out", str(out), *TINY, *overrides]) == 0


def test_cli_trains_a_teacher_then_distils_from_its_run_dir(tmp_path):
    teacher_run = tmp_path / "teacher"
    _train("test_vit", teacher_run, "data.img_size=24")  # the teacher sees 24 px, the students 32
    for name, extra in (("deit", ["objective.distill_type=soft"]), ("kd", ["objective.temperature=2"]),
                        ("feature_kd", [])):
        run = tmp_path / name
        _train("test_deit_distilled", run, "data.img_size=32", f"objective.name={name}",
               f"objective.teacher={teacher_run}", *extra)
        info = json.loads((run / "run.json").read_text())
        assert info["objective"]["name"] == name and info["objective"]["teacher"] == str(teacher_run)
        ref = info["objective"]["references"]["teacher"]
        assert ref["model"] == "test_vit" and len(ref["sha256"]) == 64
        summary = json.loads((run / "summary.json").read_text())
        assert 0.0 <= summary["val_acc"] <= 1.0
        # The exported model is the student alone (no teacher, no projection), and rebuilds from its file.
        assert set(load_file(str(run / "model.safetensors"))) == set(vitkit.create_model("test_deit_distilled").state_dict())
        assert vitkit.create_model(str(run / "model.safetensors")).model_name == "test_deit_distilled"


def test_show_config_lists_each_objectives_keys(capsys):
    assert main(["train", "--show-config", "--model", "test_vit", "objective.name=kd", "objective.alpha=0.7"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 0.7" in out and "name: kd" in out
    for line in ("#   kd: ", "#   deit: ", "#   feature_kd: ", "#   supervised: "):
        assert line in out
    assert "distill_type=hard" in out and "temperature=4.0" in out and "teacher_dtype=float32" in out


def test_cli_bad_teacher_is_a_user_error(tmp_path):
    import test_cli_errors as cli

    r = cli.vitkit("train", "--model", "test_deit_distilled", "--data", "shapes:64", "--out", tmp_path / "r", *TINY,
                   "objective.name=deit", f"objective.teacher={tmp_path / 'nothing'}")
    cli.assert_user_error(r, "objective.teacher")
    r = cli.vitkit("train", "--model", "test_vit", "--out", tmp_path / "r", *TINY, "objective.name=deit",
                   "objective.distill_type=medium")
    cli.assert_user_error(r, "objective.distill_type")
