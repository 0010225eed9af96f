"""The Supervised objective: losses against hard/soft labels, distilled-model tuples, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import ConfigError
from vitkit.objectives import Objective, Supervised


class TwoHeads(nn.Module):
    """Returns (cls_logits, dist_logits) like a distilled ViT in train mode."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 10)
        self.b = nn.Linear(4, 10)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_hard_labels_with_label_smoothing():
    model = nn.Linear(4, 10)
    obj = Supervised(model, num_classes=10, label_smoothing=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 10, (6,))
    out = obj({"image": x, "label": y})
    torch.testing.assert_close(out["loss"], F.cross_entropy(model(x), y, label_smoothing=0.1))
    assert out["acc1"] == (model(x).argmax(-1) == y).float().mean()


def test_soft_targets_from_mixup():
    model = nn.Linear(4, 5)
    obj = Supervised(model, num_classes=5)
    x = torch.randn(3, 4)
    target = torch.softmax(torch.randn(3, 5), -1)
    out = obj({"image": x, "target": target})
    want = (-target * F.log_softmax(model(x), -1)).sum(-1).mean()
    torch.testing.assert_close(out["loss"], want)
    assert "acc1" not in out  # no hard labels to score against
    with pytest.raises(KeyError, match="label"):
        obj({"image": x})


def test_tuple_outputs_are_averaged():
    model = TwoHeads()
    obj = Supervised(model, num_classes=10, label_smoothing=0.0)
    x, y = torch.randn(5, 4), torch.randint(0, 10, (5,))
    a, b = model(x)
    torch.testing.assert_close(obj({"image": x, "label": y})["loss"], F.cross_entropy((a + b) / 2, y))


def test_evaluate_per_sample_metrics():
    obj = Supervised(nn.Linear(4, 10), num_classes=10)
    ev = obj.evaluate({"image": torch.randn(7, 4), "label": torch.randint(0, 10, (7,))})
    assert set(ev) == {"loss", "acc1", "acc5"} and all(v.shape == (7,) for v in ev.values())
    assert ((ev["acc1"] <= ev["acc5"]) & (ev["acc5"] <= 1) & (ev["acc1"] >= 0)).all()
    few = Supervised(nn.Linear(4, 3), num_classes=3).evaluate({"image": torch.randn(4, 4), "label": torch.zeros(4).long()})
    assert (few["acc5"] == 1).all()  # top-5 of 3 classes is top-3


def test_hflip_tta_averages_the_image_and_its_mirror():
    # A model that sees the left and right halves differently, so the flip changes its logits.
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 6, 5))
    x, y = torch.randn(3, 2, 4, 6), torch.randint(0, 5, (3,))
    plain = Supervised(model, num_classes=5).eval_outputs({"image": x})["logits"]
    obj = Supervised(model, num_classes=5, tta="hflip")
    want = 0.5 * (model(x) + model(x[..., torch.arange(5, -1, -1)]))
    torch.testing.assert_close(obj.eval_outputs({"image": x})["logits"], want)
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(obj.evaluate({"image": x, "label": y})["loss"],
                               F.cross_entropy(want, y, reduction="none"))
    # Training is unchanged by it: the loss sees the image as given.
    torch.testing.assert_close(obj({"image": x, "label": y})["loss"], F.cross_entropy(model(x), y, label_smoothing=0.1))
    with pytest.raises(ConfigError, match="tta"):
        Supervised(model, num_classes=5, tta="vflip")


def test_objective_no_weight_decay_prefixes_model_names():
    class M(nn.Linear):
        def no_weight_decay(self):
            return {"bias"}

    assert Supervised(M(2, 2), 2).no_weight_decay() == {"model.bias"}
    assert Supervised(nn.Linear(2, 2), 2).no_weight_decay() == set()
    with pytest.raises(NotImplementedError):
        Objective()({})


def test_supervised_adds_moe_aux_loss():
    import vitkit
    from vitkit.objectives import Supervised

    model = vitkit.create_model("test_vit_moe", num_classes=3)
    obj = Supervised(model, 3, label_smoothing=0.0, aux_weight=0.5)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    out = obj(batch)
    ce = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    torch.testing.assert_close(out["loss"], ce + 0.5 * model.aux_loss(), atol=1e-5, rtol=1e-5)
    assert out["aux_loss"] >= 0.99


def test_registry_builds_supervised_and_validates_keys():
    from vitkit.config import load_config
    from vitkit.errors import ConfigError
    from vitkit.objectives import build_objective, describe_objectives, list_objectives, objective_config

    assert "supervised" in list_objectives()
    obj = build_objective("supervised", nn.Linear(4, 3), None, num_classes=3, label_smoothing=0.3)
    assert isinstance(obj, Supervised) and obj.label_smoothing == 0.3  # data.label_smoothing is the default
    obj = build_objective("supervised", nn.Linear(4, 3), {"label_smoothing": 0.0}, num_classes=3, label_smoothing=0.3)
    assert obj.label_smoothing == 0.0 and obj.registered_name == "supervised"
    with pytest.raises(ConfigError, match=r"objective.label_smoothing, objective.aux_weight"):
        objective_config({"name": "supervised", "alpha": 0.5})
    with pytest.raises(ConfigError, match="unknown objective 'no_such_objective'"):
        load_config(None, ["objective.name=no_such_objective"])
    cfg = load_config(None, ["objective.label_smoothing=0.2"])
    assert objective_config(cfg.objective)[1].label_smoothing == 0.2
    assert "supervised: label_smoothing=None, aux_weight=0.01" in describe_objectives()


def test_objective_values_of_the_wrong_kind_are_config_errors():
    from vitkit.config import load_config, validate
    from vitkit.objectives import objective_config

    bad = [("dino", "teacher_temp", "abc", "expected a number"), ("ibot", "teacher_patch_temp", "hot", "expected a number"),
           ("dino", "norm_last_layer", 1, "expected true or false"), ("ibot", "mask_shape", 3, "expected text"),
           ("dino", "teacher_temp", None, "expected a float")]
    for name, key, value, msg in bad:
        with pytest.raises(ConfigError, match=rf"objective\.{key}=.* for objective '{name}': {msg}"):
            objective_config({"name": name, key: value})
    # Through the command line, before any data is read.
    with pytest.raises(ConfigError, match=r"objective\.teacher_temp='abc'"):
        validate(load_config(None, ["objective.name=dino", "objective.teacher_temp=abc"]))
    # What is right still passes: an int for a float key, None where the annotation admits it, a list for a tuple.
    cfg = objective_config({"name": "ibot", "teacher_temp": 1, "weight_decay_end": None, "mask_ratio": [0.2, 0.4]})[1]
    assert cfg.teacher_temp == 1 and cfg.weight_decay_end is None and list(cfg.mask_ratio) == [0.2, 0.4]
    assert objective_config({"name": "supervised", "label_smoothing": 0.1})[1].label_smoothing == 0.1


class FrozenTeacher(Objective):
    """A student plus a BatchNorm/dropout teacher; ``by_reference`` records the teacher instead of saving it."""

    def __init__(self, by_reference: bool):
        super().__init__()
        self.model = nn.Linear(4, 2)
        self.teacher = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.by_reference = by_reference

    def frozen_modules(self):
        return {"teacher": self.teacher}

    def references(self):
        return {"teacher": {"source": "teacher.safetensors", "sha256": "0" * 64}} if self.by_reference else {}


def test_frozen_modules_stay_in_eval_mode_and_referenced_ones_are_not_saved():
    obj = FrozenTeacher(by_reference=True)
    obj.train()
    assert obj.training and obj.model.training and not obj.teacher.training
    assert all(not m.training for m in obj.teacher.modules())
    obj.freeze()
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    assert set(obj.checkpoint_state_dict()) == {"model.weight", "model.bias"}
    assert "teacher.1.running_mean" in FrozenTeacher(by_reference=False).checkpoint_state_dict()
    assert obj.export_model() is obj.model


def test_run_dir_records_the_objective(tmp_path):
    import json

    import yaml

    from vitkit.config import load_config
    from vitkit.train import train

    cfg = load_config(None, [
        "model.name=test_vit", "data.path=shapes:64", "data.img_size=32", "engine.epochs=1", "data.batch_size=16",
        "data.num_workers=0", "engine.tensorboard=false", "engine.plots=false", "engine.amp=none",
        "data.auto_augment=null", "objective.label_smoothing=0.05", f"engine.out_dir={tmp_path}",
    ])
    summary = train(cfg, verbose=False)
    assert summary["objective"] == "supervised"
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["objective"] == {"name": "supervised", "label_smoothing": 0.05, "aux_weight": 0.01, "tta": "none",
                                "references": {}}
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["objective"] == {"name": "supervised", "label_smoothing": 0.05}
    assert json.loads((tmp_path / "summary.json").read_text())["objective"] == "supervised"
