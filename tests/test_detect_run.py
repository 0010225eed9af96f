"""Detection runs: the ``detect`` objective, the detection plan's rules, the pictures, detection weights that
load back, bad input as one clear error; then (with the detectors and the detection data) runs through the one
Trainer that resume bitwise, and the no-flag CLI on a tiny Pascal VOC folder and a tiny COCO JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run, assert_user_error, crash_and_resume, run_vitkit
from PIL import Image
from torch import nn

from vitkit.config import load_config
from vitkit.detect import Detector, register_detector
from vitkit.engine.config import OptimConfig
from vitkit.engine.optim import build_optimizer
from vitkit.errors import ConfigError
from vitkit.objectives import build_objective
from vitkit.objectives.detect import Detect, batch_targets, pixel_mask
from vitkit.plan_detect import (
    CPU_BACKBONE,
    DetectCalibration,
    DetectInfo,
    make_detect_plan,
    side_for,
)
from vitkit.plan_eval import CAP_FACTOR, CAP_MIN_EPOCHS

# ---- a tiny detector of our own: the objective's contract, independent of the real detectors ------------


@register_detector("test_box_regressor", default_backbone="test_vit")
class BoxRegressor(Detector):
    """One box per image from a pooled conv feature: enough to check what the objective hands a detector."""

    def __init__(self, backbone="test_vit", num_classes: int = 2, backbone_lr_mult: float | None = None):
        super().__init__()
        from vitkit.models import get_model_card

        self.backbone = nn.Conv2d(3, 4, 3, padding=1)  # stands in for a backbone
        self.backbone.card = get_model_card("test_vit")
        self.box = nn.Linear(4, 4)
        self.cls = nn.Linear(4, num_classes)
        self.num_classes, self.stride = num_classes, 1
        if backbone_lr_mult is not None:
            self.backbone_lr_mult = backbone_lr_mult
        self._mult = backbone_lr_mult
        self.seen: dict = {}

    @property
    def model_args(self) -> dict:
        return {"name": "test_box_regressor", "backbone": None, "num_classes": self.num_classes,
                "backbone_lr_mult": self._mult}

    def forward(self, images, pixel_mask=None):
        self.seen["mask"] = pixel_mask
        f = self.backbone(images)
        m = pixel_mask[:, None].float()
        pooled = (f * m).sum((2, 3)) / m.sum((2, 3))
        return {"boxes": self.box(pooled).sigmoid(), "logits": self.cls(pooled)}

    def loss(self, outputs, targets):
        self.seen["targets"] = targets
        rel = torch.stack([t["boxes"][0] / t["size"].flip(0).repeat(2) for t in targets])
        labels = torch.stack([t["labels"][0] for t in targets])
        l1 = (outputs["boxes"] - rel).abs().mean()
        ce = nn.functional.cross_entropy(outputs["logits"], labels)
        return {"loss": l1 + ce, "loss_bbox": l1, "loss_ce": ce}

    def postprocess(self, outputs, sizes, top_k=100):
        scale = sizes.flip(1).repeat(1, 2).float()
        probs = outputs["logits"].softmax(-1)
        return [{"boxes": (b * s)[None], "scores": p.max()[None], "labels": p.argmax()[None]}
                for b, s, p in zip(outputs["boxes"], scale, probs)][:top_k]


def _batch():
    """Two images padded to 6x8: the first 6x8, the second 4x5, one box each."""
    images = torch.randn(2, 3, 6, 8)
    return {"image": images, "size": torch.tensor([[6, 8], [4, 5]]), "orig_size": torch.tensor([[60, 80], [40, 50]]),
            "boxes": [torch.tensor([[1.0, 1.0, 5.0, 4.0]]), torch.tensor([[0.0, 0.0, 2.0, 3.0]])],
            "labels": [torch.tensor([1]), torch.tensor([0])], "image_id": [7, 8]}


def test_pixel_mask_and_targets_follow_the_true_sizes():
    b = _batch()
    m = pixel_mask(b["image"], b["size"])
    expected = torch.zeros(2, 6, 8, dtype=torch.bool)
    expected[0] = True
    expected[1, :4, :5] = True
    assert torch.equal(m, expected)
    assert torch.equal(pixel_mask(b["image"], None), torch.ones(2, 6, 8, dtype=torch.bool))
    t = batch_targets(b)
    assert [x["boxes"].tolist() for x in t] == [[[1.0, 1.0, 5.0, 4.0]], [[0.0, 0.0, 2.0, 3.0]]]
    assert [x["labels"].dtype for x in t] == [torch.int64] * 2 and t[1]["size"].tolist() == [4, 5]
    with pytest.raises(Exception, match="boxes"):
        batch_targets({"image": b["image"], "label": torch.zeros(2)})


def test_objective_hands_the_detector_mask_and_targets_and_returns_its_loss():
    model = BoxRegressor(num_classes=2)
    obj = build_objective("detect", model, {}, classes=["cat", "dog"])
    b = _batch()
    out = obj(b)
    assert set(out) == {"loss", "loss_bbox", "loss_ce"} and out["loss"].requires_grad
    assert not out["loss_ce"].requires_grad  # parts are logged, not optimised twice
    # The loss the objective returns is the detector's own on the batch's targets.
    direct = model.loss(model(b["image"], pixel_mask(b["image"], b["size"])), batch_targets(b))
    assert torch.allclose(out["loss"], direct["loss"])
    assert model.seen["mask"][1].sum() == 20  # 4 x 5 real pixels of the second image
    dets = obj.eval_outputs(b)["detections"]
    assert len(dets) == 2 and dets[1]["boxes"].shape == (1, 4)
    # Boxes come back in pixels of each image's true size (4 x 5 for the second).
    assert float(dets[1]["boxes"].max()) <= 5.0
    assert obj.classes == ["cat", "dog"]


def test_backbone_lr_multiplier_becomes_two_lr_groups():
    obj = Detect(BoxRegressor(backbone_lr_mult=0.1), ["a", "b"])
    assert obj.backbone_lr == 0.1
    cfg = obj.optim_config(OptimConfig(lr=1e-3, scale_lr=False))
    opt = build_optimizer(obj, cfg, 16)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    model = obj.model
    assert [lr[id(p)] for p in model.backbone.parameters()] == pytest.approx([1e-4] * 2)
    assert [lr[id(p)] for p in [*model.box.parameters(), *model.cls.parameters()]] == pytest.approx([1e-3] * 4)
    # The user's fraction wins over the detector's; 1 keeps one lr for all.
    obj2 = build_objective("detect", BoxRegressor(backbone_lr_mult=0.1), {"backbone_lr": 1.0})
    opt2 = build_optimizer(obj2, obj2.optim_config(OptimConfig(lr=1e-3, scale_lr=False)), 16)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([1e-3] * len(opt2.param_groups))
    with pytest.raises(ConfigError, match="backbone_lr"):
        Detect(BoxRegressor(), backbone_lr=2.0)
    # With optim.layer_decay the backbone's own blocks set the lr groups: this stand-in backbone has none.
    obj3 = Detect(BoxRegressor(backbone_lr_mult=0.1))
    with pytest.raises(ConfigError, match="group_matcher"):
        build_optimizer(obj3, obj3.optim_config(OptimConfig(layer_decay=0.75)), 16)


def test_detect_objective_needs_a_detector():
    with pytest.raises(ConfigError, match="detector"):
        build_objective("detect", nn.Linear(2, 2), {})


def test_detection_weights_describe_themselves_and_load_back(tmp_path):
    from dataclasses import replace

    from vitkit import load_model
    from vitkit.models import get_model_card
    from vitkit.source import is_detect_weights
    from vitkit.weights_io import save_weights

    model = BoxRegressor(num_classes=3, backbone_lr_mult=0.5)
    model.backbone.card = replace(get_model_card("test_vit"), labels=("a", "b", "c"), input_size=(3, 48, 48))
    path = save_weights(model, tmp_path / "det.safetensors")
    assert is_detect_weights(path)
    lm = load_model(path)
    assert lm.task == "detect" and lm.is_detect and not lm.is_dense
    assert isinstance(lm.model, BoxRegressor) and lm.labels == ("a", "b", "c")
    assert lm.transform.size == 48
    for k, v in model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v)
    # The transform resizes keeping the aspect: long side 48.
    x = lm.transform(Image.new("RGB", (100, 50)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 24, 48)
    dets = lm.detect(x[None])
    assert dets[0]["boxes"].shape == (1, 4)
    # Commands made for classifiers say what to use instead of failing inside.
    from vitkit.export import export
    from vitkit.probe import probe

    with pytest.raises(ConfigError, match="does not export detectors"):
        export(path, "onnx", tmp_path / "det.onnx")
    with pytest.raises(ConfigError, match="vitkit eval"):
        probe(path, "shapes:20")


# ---- the plan: pure rules on made-up statistics and timings -------------------------------------------


def det_info(n=160, size=(416, 416), boxes=1.2, frac=0.3, classes=1):
    return DetectInfo(typical_size=size, n_train=n, n_val=n // 4, in_chans=3, num_classes=classes,
                      classes=tuple(f"c{i}" for i in range(classes)), format="coco", boxes_per_image=boxes,
                      box_area_frac=frac)


def det_calib(rate=4.0, device="cpu", side=192, stride=16, name="vitdet_fcos"):
    return DetectCalibration(device, {name: rate}, 0.0, eval_img_per_s={name: 3 * rate}, stride=stride,
                             img_size=side)


def test_side_follows_image_and_object_sizes():
    # Large objects (30% of the image): the median box spans 96 px at 96 / sqrt(0.3) = 175 -> 176.
    assert side_for(det_info(frac=0.3), 16) == 176
    # Small objects keep the full resolution, capped for the device.
    assert side_for(det_info(size=(480, 640), frac=0.002), 16) == 384
    assert side_for(det_info(size=(480, 640), frac=0.002), 16, "cuda") == 640
    # Never above the images' own size (rounded up to the stride), else never below four strides.
    assert side_for(det_info(size=(64, 64), frac=0.01), 16) == 64
    assert side_for(det_info(size=(64, 64), frac=0.01), 32) == 64
    assert side_for(det_info(size=(20, 30), frac=0.5), 16) == 32
    assert side_for(det_info(size=(416, 416), frac=0.9), 32) == 128
    assert side_for(det_info(size=(416, 416), frac=0.3), 32) == 192


def test_plan_picks_fcos_on_small_data_and_set_prediction_on_large_gpu_data(monkeypatch):
    import vitkit.detect as det

    monkeypatch.setattr(det, "list_detectors", lambda: ["test_box_regressor", "vitdet_fcos"])
    p = make_detect_plan(det_info(), det_calib(rate=4.0), {})
    v = p.values
    assert v["model.head"] == "vitdet_fcos" and v["model.name"] == CPU_BACKBONE
    assert v["engine.time_budget"] == "20m" and v["data.img_size"] == 192
    # 4 img/s in 20 min over 160 images: 4 * 0.9 * 1200 / 160 = 27 epochs, the epochs a cap (CAP_FACTOR x).
    epochs = 4.0 * 0.9 * 1200 / 160
    assert v["engine.epochs"] == max(CAP_MIN_EPOCHS, math.ceil(CAP_FACTOR * epochs))
    assert v["data.batch_size"] == 4 and v["optim.clip_grad"] == 1.0
    assert all(p.reasons[k] for k in v)
    monkeypatch.setattr(det, "list_detectors", lambda: ["deformable_detr", "detr", "vitdet_fcos", "yolos"])
    big = make_detect_plan(det_info(n=100_000, size=(480, 640), boxes=7.3, frac=0.02, classes=80),
                           det_calib(rate=100.0, device="cuda", side=640, name="deformable_detr"), {})
    assert big.values["model.head"] == "deformable_detr" and "engine.time_budget" not in big.values
    assert big.values["optim.clip_grad"] == 0.1 and big.values["optim.weight_decay"] == 1e-4
    assert "model.name" not in big.values  # the detector's own backbone
    # A GPU with little data still gets the one-stage detector.
    assert make_detect_plan(det_info(), det_calib(device="cuda"), {}).values["model.head"] == "vitdet_fcos"


def test_plan_keeps_user_keys_and_uses_init_weights_architecture():
    user = {"model.head": "vitdet_fcos", "data.batch_size": 2, "engine.time_budget": "5m", "data.img_size": 128}
    p = make_detect_plan(det_info(), det_calib(), user)
    assert not set(user) & set(p.values)
    epochs = 4.0 * 0.9 * 300 / 160
    assert p.values["engine.epochs"] == max(CAP_MIN_EPOCHS, math.ceil(CAP_FACTOR * epochs))
    p2 = make_detect_plan(det_info(), det_calib(), {}, init_name="vit_small_patch16_224")
    assert p2.values["model.name"] == "vit_small_patch16_224" and "init" in p2.reasons["model.name"]
    assert p2.values["optim.lr"] < p.values["optim.lr"]  # fine-tuning takes smaller steps
    # Photos with ImageNet weights at hand: DeiT-Tiny from them (the user's init or backbone wins).
    c = det_calib()
    c.pretrained = "hub/deit-tiny"
    p3 = make_detect_plan(det_info(), c, {})
    assert p3.values["model.init"] == "hub/deit-tiny" and p3.values["model.name"] == "deit_tiny_patch16_224"
    assert p3.values["optim.lr"] == p2.values["optim.lr"]
    assert "model.init" not in make_detect_plan(det_info(), c, {"model.name": "test_vitdet"}).values


def test_plan_generalises_to_many_small_objects():
    info = det_info(n=3000, size=(375, 500), boxes=6.0, frac=0.01, classes=20)
    p = make_detect_plan(info, det_calib(rate=3.0, side=384), {})
    assert p.values["engine.time_budget"] == "60m"  # proportional to the images, capped at an hour
    assert p.values["data.img_size"] == 384 and p.values["data.batch_size"] == 8
    assert any("20 classes" in n for n in p.notes)


# ---- pictures -----------------------------------------------------------------------------------------


def test_boxes_are_drawn_in_their_class_colour_with_a_tag(tmp_path):
    from vitkit.detect.plots import box_colours, draw_detections, query_attention_figure

    img = Image.new("RGB", (120, 80), (255, 255, 255))
    out = draw_detections(img, [[20, 30, 100, 70]], [1], [0.87], ["cat", "dog"], width=2)
    a = np.asarray(out)
    colour = box_colours(2)[1]
    assert (a[50, 20] == colour).all() and (a[50, 99] == colour).all()  # left and right edges
    assert (a[50, 60] == 255).all()  # the inside is untouched
    assert (a[30 - 5, 22] != 255).any()  # the tag sits above the box
    assert np.asarray(img).min() == 255  # the input is not drawn on
    png = query_attention_figure(img, np.random.rand(2, 5, 8), [[0, 0, 50, 40], [10, 10, 60, 60]],
                                 ["query 3: cat 0.90", "query 7: dog 0.40"], tmp_path / "q.png")
    assert Image.open(png).size[0] > 100


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_detector_is_a_config_error():
    from vitkit.plan_detect import choose_detect

    cfg = load_config(overrides=["model.head=no_such_detector"], plan=False)
    with pytest.raises(ConfigError, match="unknown detector 'no_such_detector'"):
        choose_detect(cfg, det_info())


def test_detector_on_classification_or_segmentation_data_is_a_config_error(tmp_path):
    from helpers import write_class_folder

    from vitkit.train import build_run

    write_class_folder(tmp_path / "cls", per_class=3, size=16)
    for data, needle in ((tmp_path / "cls", "classification"), ("scenes:8", "segmentation")):
        cfg = load_config(overrides=[f"data.path={data}", "model.head=test_box_regressor", "data.num_workers=0"],
                          plan=False)
        with pytest.raises(ConfigError, match=f"is a detector.*{needle}"):
            build_run(cfg, verbose=False)
    cfg = load_config(overrides=[f"data.path={tmp_path / 'cls'}", "objective.name=detect"], plan=False)
    with pytest.raises(ConfigError, match="objective.name=detect trains a detector"):
        build_run(cfg, verbose=False)


# ---- runs through the Trainer (need the detectors and the detection data) ------------------------------

ENGINE = ["engine.amp=none", "engine.tensorboard=false", "engine.plots=false", "data.num_workers=0"]
TINY = {"vitdet_fcos": ["model.name=test_vitdet", "model.head_args.channels=16", "model.head_args.num_convs=1"],
        "detr": ["model.name=test_vit", "model.head_args.d_model=16", "model.head_args.enc_layers=1",
                 "model.head_args.dec_layers=1", "model.head_args.nheads=2", "model.head_args.dim_feedforward=32",
                 "model.head_args.num_queries=8"],
        # d_model 64: at 32 GroupNorm has one channel per group and a 1x1 stride-64 map of one image fails.
        "deformable_detr": ["model.name=test_resnet", "model.head_args.d_model=64", "model.head_args.enc_layers=1",
                            "model.head_args.dec_layers=2", "model.head_args.nheads=2",
                            "model.head_args.dim_feedforward=32", "model.head_args.num_queries=8",
                            "model.head_args.enc_n_points=2", "model.head_args.dec_n_points=2"],
        "yolos": ["model.name=test_vit", "model.head_args.num_det_tokens=8", "model.head_args.pe_size=[64,64]"]}


def _det_cfg(out, detector, *extra, data):
    return load_config(overrides=[f"data.path={data}", "data.val_fraction=0.25", f"model.head={detector}",
                                  *TINY[detector], "data.img_size=64", "data.batch_size=4", "data.eval_batch_size=8",
                                  f"engine.out_dir={out}", *ENGINE, *extra], plan=False)


@pytest.mark.parametrize("detector", sorted(TINY))
def test_detector_run_resumes_bitwise(tmp_path, detector):
    from vitkit.train import build_run

    write_voc(tmp_path / "voc")

    def trainer(out, hooks=()):
        cfg = _det_cfg(out, detector, "engine.max_steps=4", "engine.ckpt_every_steps=2", "engine.epochs=4",
                       "data.batch_size=3", data=tmp_path / "voc")
        torch.manual_seed(cfg.engine.seed)
        tr, info = build_run(cfg, verbose=False)
        assert info["task"] == "detect" and info["head"] == detector
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    summary = full.fit()
    assert full.step == 4 and 0.0 <= summary["val_ap"] <= 1.0
    resumed = crash_and_resume(trainer, tmp_path / "run", 3, latest=2)
    assert_same_run(full, resumed)


def test_detr_run_saves_weights_that_explain_their_queries(tmp_path):
    from vitkit import load_model
    from vitkit.predict import explain_queries, predict
    from vitkit.train import train

    write_voc(tmp_path / "voc")
    voc = tmp_path / "voc"
    summary = train(_det_cfg(tmp_path / "run", "detr", "engine.max_steps=1", "engine.epochs=1", data=voc),
                    verbose=False)
    assert summary["task"] == "detect" and summary["steps"] == 1
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["backbone_lr"] == 0.1  # DETR's backbone trains at a tenth of the lr
    lm = load_model(tmp_path / "run" / "model.safetensors")
    assert lm.task == "detect" and list(lm.labels) == info["classes"]
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    r = explain_queries(lm, [tmp_path / "a.png"], tmp_path / "explain", queries=3)
    assert len(r[0]["queries"]) == 3 and Image.open(r[0]["queries_png"]).size[0] > 100
    p = predict(lm, [tmp_path / "a.png"], out_dir=tmp_path / "pred", threshold=0.0)[0]
    assert Image.open(p["boxes_png"]).size == (70, 50)
    for d in p["detections"]:  # boxes in the original image's pixels
        assert -1 <= d["box"][0] <= d["box"][2] <= 71 and -1 <= d["box"][1] <= d["box"][3] <= 51
    fcos = train(_det_cfg(tmp_path / "fcos", "vitdet_fcos", "engine.max_steps=1", "engine.epochs=1", data=voc),
                 verbose=False)
    with pytest.raises(ConfigError, match="cross-attention for DETR runs"):
        explain_queries(load_model(fcos["out_dir"]), [tmp_path / "a.png"], tmp_path / "explain")
    x = run_vitkit("explain", tmp_path / "run", tmp_path / "a.png", "--out", tmp_path / "cli", "--topk", "2",
                   check=True)
    assert "a_queries.png" in x.stdout and (tmp_path / "cli" / "a_queries.png").is_file()


# ---- the no-flag CLI on tiny VOC and COCO folders ------------------------------------------------------

CLASSES = ("ball", "box")


def _scenes(n: int, seed: int = 0, size=(64, 64)):
    """(image, [(class index, x0, y0, x1, y1)]) pairs: a red disc and/or a blue square on grey noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = size
        img = rng.normal(120, 10, (h, w, 3))
        objs = []
        for k in range(int(rng.integers(1, 3))):
            s = int(rng.integers(14, 26))
            x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            img[y0:y0 + s, x0:x0 + s] = (200, 40, 40) if k == 0 else (40, 40, 200)
            objs.append((k, x0, y0, x0 + s, y0 + s))
        out.append((img.clip(0, 255).astype(np.uint8), objs))
    return out


def write_voc(root, n: int = 12) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for i, (img, objs) in enumerate(_scenes(n)):
        Image.fromarray(img).save(root / "JPEGImages" / f"{i:03d}.jpg", quality=95)
        items = "".join(f"<object><name>{CLASSES[k]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
                        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                        for k, x0, y0, x1, y1 in objs)
        (root / "Annotations" / f"{i:03d}.xml").write_text(
            f"<annotation><filename>{i:03d}.jpg</filename><size><width>{img.shape[1]}</width>"
            f"<height>{img.shape[0]}</height><depth>3</depth></size>{items}</annotation>")


def write_coco(root, n: int = 12) -> None:
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (img, objs) in enumerate(_scenes(n, seed=1)):
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": img.shape[0], "width": img.shape[1]})
        for k, x0, y0, x1, y1 in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 10 + k, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    cats = [{"id": 10 + k, "name": c} for k, c in enumerate(CLASSES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


FAST = ["data.num_workers=0", "engine.tensorboard=false", "engine.max_steps=2"]


@pytest.mark.e2e
def test_no_flag_train_then_eval_on_a_voc_folder(tmp_path):
    write_voc(tmp_path / "voc")
    r = run_vitkit("train", "--data", tmp_path / "voc", "--out", tmp_path / "run", "engine.time_budget=20s", *FAST,
                   check=True, timeout=300)
    assert "model.head=vitdet_fcos" in r.stdout and "data.img_size=64" in r.stdout  # the printed plan
    assert "val AP" in r.stdout
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"] == "detect" and info["classes"] == list(CLASSES) and info["plan"]
    e = run_vitkit("eval", tmp_path / "run", check=True)
    for needle in ("AP ", "AP50", "AP75", "AP small", "AP per class", "ball", "box"):
        assert needle in e.stdout, (needle, e.stdout)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["task"] == "detect"


@pytest.mark.e2e
def test_no_flag_train_then_predict_on_a_coco_json(tmp_path):
    write_coco(tmp_path / "coco")
    run_vitkit("train", "--data", tmp_path / "coco", "--out", tmp_path / "run", "engine.time_budget=20s", *FAST,
               check=True, timeout=300)
    img = tmp_path / "coco" / "images" / "000.png"
    p = run_vitkit("predict", tmp_path / "run", img, "--out", tmp_path / "pred", "--threshold", "0", check=True)
    res = json.loads(p.stdout)
    assert res[0]["boxes_png"].endswith("000_boxes.png") and Image.open(res[0]["boxes_png"]).size == (64, 64)
    for d in res[0]["detections"]:
        assert d["label"] in CLASSES and 0 <= d["score"] <= 1 and len(d["box"]) == 4
    x = run_vitkit("explain", tmp_path / "run", img, "--out", tmp_path / "explain")
    assert_user_error(x, "vitdet_fcos", "DETR")
    bad = run_vitkit("train", "--data", tmp_path / "coco", "--out", tmp_path / "bad", "model.head=no_such", *FAST)
    assert_user_error(bad, "unknown detector 'no_such'")
