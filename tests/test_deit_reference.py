"""DeiT against its released code: the soft-distillation loss against a reference written here from
DeiT's ``DistillationLoss``, and the whole train transform against timm's ``create_transform`` when
both are driven with the same drawn parameters (crop box, flip, ops, magnitudes, erasing box and noise)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers import require_peer
from PIL import Image
from torch import nn

from vitkit.config import DataConfig, load_config
from vitkit.data import BatchAugment, TrainTransform
from vitkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
from vitkit.data.rand_augment import OPS
from vitkit.errors import ConfigError
from vitkit.objectives import DeiT, objective_config

# ---------------------------------------------------------------- soft distillation


class _Logits(nn.Module):
    """Fixed (B, C) logits; with two, a (cls, dist) pair and a ``head_dist`` (the mark of a distilled student)."""

    def __init__(self, *logits: np.ndarray):
        super().__init__()
        self.logits = nn.ParameterList([nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in logits])
        if len(logits) == 2:
            self.head_dist = nn.Linear(1, 1)

    def forward(self, x):
        return tuple(self.logits) if len(self.logits) == 2 else self.logits[0]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _deit_soft_reference(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    """DeiT's ``losses.DistillationLoss``, soft, in float64: ``F.kl_div(log_softmax(s / T),
    log_softmax(t / T), reduction='sum', log_target=True) * (T * T) / outputs_kd.numel()``."""
    log_s, log_t = _log_softmax(student / tau), _log_softmax(teacher / tau)
    return float((np.exp(log_t) * (log_t - log_s)).sum() * tau * tau / student.size)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_equals_deit_released_loss_at_1000_classes(tau):
    rng = np.random.default_rng(0)
    b, c, alpha = 4, 1000, 0.5
    cls, dist, teacher = (rng.normal(0, 3, (b, c)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, c, b)
    obj = DeiT(_Logits(cls, dist), _Logits(teacher), num_classes=c, distill_type="soft", alpha=alpha,
               temperature=tau, label_smoothing=0.0)
    out = obj({"image": torch.zeros(b, 3, 8, 8), "label": torch.tensor(labels)})
    want_dist = _deit_soft_reference(dist.astype(np.float64), teacher.astype(np.float64), tau)
    ce = float(-_log_softmax(cls.astype(np.float64))[np.arange(b), labels].mean())
    assert out["dist"].item() == pytest.approx(want_dist, rel=1e-4)
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * want_dist, rel=1e-5)
    # The per-sample reduction (the paper's formula, Hinton's KD) stays available: C times heavier.
    per_sample = DeiT(_Logits(cls, dist), _Logits(teacher), num_classes=c, distill_type="soft", alpha=alpha,
                      temperature=tau, label_smoothing=0.0, soft_reduction="batchmean")
    heavy = per_sample({"image": torch.zeros(b, 3, 8, 8), "label": torch.tensor(labels)})["dist"].item()
    assert heavy == pytest.approx(c * want_dist, rel=1e-4)


def test_soft_reduction_is_a_config_key_with_a_clear_error():
    cfg = load_config(overrides=["objective.name=deit", "objective.soft_reduction=batchmean"])
    assert objective_config(cfg.objective)[1].soft_reduction == "batchmean"
    assert objective_config(load_config(overrides=["objective.name=deit"]).objective)[1].soft_reduction == "deit"
    with pytest.raises(ConfigError, match="soft_reduction must be deit .* or batchmean"):
        objective_config(load_config(overrides=["objective.name=deit", "objective.soft_reduction=mean"]).objective)


# ---------------------------------------------------------------- the whole train transform

SPEC = "rand-m9-mstd0.5-inc1"
# Ops whose argument takes a random sign: the geometric ones, and in the increasing (inc1)
# variant the enhance ops, which move away from the identity factor 1 either way.
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Brightness", "Sharpness"}
_YES, _NO = 0.0, 0.999  # uniform draws that pass / fail every probability test below 0.999


def _vitkit_name(timm_name: str) -> str:
    return timm_name.replace("Increasing", "").replace("Rel", "")


class Script:
    """Stands in for the ``random`` module or a ``random.Random``: returns the planned draws in
    order and fails on any draw that is not the planned one."""

    def __init__(self, calls: list[tuple[str, object]]):
        self.calls = list(calls)

    def _next(self, name: str, *args):
        assert self.calls, f"an unplanned draw: {name}{args}"
        want, value = self.calls.pop(0)
        assert want == name, f"planned {want}, drawn {name}{args}"
        return value

    def random(self):
        return self._next("random")

    def uniform(self, a, b):
        return self._next("uniform", a, b)

    def gauss(self, mu, sigma):
        return self._next("gauss", mu, sigma)

    def randrange(self, n):
        return self._next("randrange", n)

    def randint(self, a, b):
        value = self._next("randint", a, b)
        assert a <= value <= b, (value, a, b)
        return value

    def done(self) -> None:
        assert not self.calls, f"draws planned and not made: {self.calls}"


def _image(width: int, height: int) -> Image.Image:
    """Structured content (gradients, a bright square, noise) so that borders and every op show."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(1).integers(0, 70, (height, width, 3))
    arr = np.stack([(xx * 9 + yy * 3) % 256, (yy * 11) % 256, (xx * yy) % 256], -1) * 0.7 + noise
    arr[height // 4 : height // 2, width // 5 : width // 2] = 250
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _draw(g: random.Random, k: int, names: list[str], width: int, height: int, size: int) -> dict:
    """Sample k's parameters, drawn as the papers' algorithms draw them (the ops cycle through all 15)."""
    scale, log_ratio = (0.08, 1.0), (math.log(3 / 4), math.log(4 / 3))
    while True:  # a crop that fits at the first attempt, as both libraries then take it
        u_scale, u_ratio = g.uniform(*scale), g.uniform(*log_ratio)
        target, aspect = width * height * u_scale, math.exp(u_ratio)
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    ops = []
    for slot in (2 * k, 2 * k + 1):
        magnitude = 10.6 if slot == 3 else g.gauss(9, 0.5)  # one above the maximum: both clip it to 10
        ops.append(dict(name=names[slot % len(names)], applied=slot < 15, magnitude=magnitude,
                        negate=g.random() < 0.5))
    erase = None
    if k % 2 == 0:
        while True:
            area, log_aspect = g.uniform(0.02, 1 / 3) * size * size, g.uniform(math.log(0.3), math.log(1 / 0.3))
            eh = int(round(math.sqrt(area * math.exp(log_aspect))))
            ew = int(round(math.sqrt(area / math.exp(log_aspect))))
            if eh < size and ew < size:
                break
        erase = dict(h=eh, w=ew, top=g.randint(0, size - eh), left=g.randint(0, size - ew))
    return dict(crop=(u_scale, u_ratio, g.randint(0, height - h), g.randint(0, width - w)), flip=k % 3 != 0,
                ops=ops, erase=erase)


def _vitkit_script(p: dict) -> Script:
    u_scale, u_ratio, top, left = p["crop"]
    calls = [("uniform", u_scale), ("uniform", u_ratio), ("randint", top), ("randint", left)]
    calls.append(("random", _YES if p["flip"] else _NO))  # flips when below hflip
    calls += [("randrange", OPS.index(_vitkit_name(op["name"]))) for op in p["ops"]]
    for op in p["ops"]:
        calls.append(("random", _YES if op["applied"] else _NO))  # skips the op when >= p
        if op["applied"]:
            calls.append(("gauss", op["magnitude"]))
            if _vitkit_name(op["name"]) in _SIGNED:
                calls.append(("random", _YES if op["negate"] else _NO))  # negates when below 0.5
    return Script(calls)


def _timm_script(p: dict, size: int) -> Script:
    u_scale, u_ratio, top, left = p["crop"]
    calls = [("uniform", u_scale), ("uniform", u_ratio), ("randint", top), ("randint", left)]
    for op in p["ops"]:
        calls.append(("random", _YES if op["applied"] else _NO))  # AugmentOp skips when > prob
        if op["applied"]:
            calls.append(("gauss", op["magnitude"]))
            if _vitkit_name(op["name"]) in _SIGNED:
                calls.append(("random", _NO if op["negate"] else _YES))  # _randomly_negate: when > 0.5
    e = p["erase"]
    calls.append(("random", _YES if e else _NO))  # RandomErasing skips when > probability
    if e:
        # The area and aspect of the planned box, exactly (rounding cannot move them).
        calls += [("uniform", e["h"] * e["w"] / (size * size)), ("uniform", math.log(e["h"] / e["w"])),
                  ("randint", e["top"]), ("randint", e["left"])]
    return Script(calls)


def _vitkit_erase_draws(params: list[dict], size: int, attempts: int = 10):
    """torch.rand / torch.randn stand-ins for vitkit's batched erasing: the planned boxes and noise,
    NaN where noise must not be read."""
    lo, hi = 0.02, 1 / 3
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    boxes = [p["erase"] or dict(h=4, w=4, top=0, left=0) for p in params]
    col = lambda vals: torch.tensor(vals, dtype=torch.float64).float().view(-1, 1)  # noqa: E731
    area = col([(e["h"] * e["w"] / size**2 - lo) / (hi - lo) for e in boxes]).expand(-1, attempts)
    aspect = col([(math.log(e["h"] / e["w"]) - log_lo) / (log_hi - log_lo) for e in boxes]).expand(-1, attempts)
    rand = [area.contiguous(), aspect.contiguous(), col([_YES if p["erase"] else _NO for p in params]),
            col([(e["top"] + 0.5) / (size - e["h"] + 1) for e in boxes]),
            col([(e["left"] + 0.5) / (size - e["w"] + 1) for e in boxes])]
    hit = [p for p in params if p["erase"]]
    noise = torch.full((len(hit), 3, size, size), float("nan"))
    for i, p in enumerate(hit):
        e = p["erase"]
        noise[i, :, e["top"] : e["top"] + e["h"], e["left"] : e["left"] + e["w"]] = p["noise"]

    def fake_rand(*shape, **_):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        value = rand.pop(0)
        assert tuple(value.shape) == shape, (value.shape, shape)
        return value.clone()

    def fake_randn(*shape, **_):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone()

    return fake_rand, fake_randn, rand


def _planned_ops(ra, p: dict):
    """A stand-in for ``np.random.choice(ra.ops, n, ...)``: the planned ops, in order."""

    def choice(ops, n, **_):
        assert n == len(p["ops"])
        return [next(op for op in ra.ops if op.name == o["name"]) for o in p["ops"]]

    return choice


@pytest.mark.peer("timm")
@pytest.mark.parametrize("size, width, height", [(32, 57, 45), (224, 300, 260)])
def test_deit_train_transform_equals_timm_pixel_for_pixel(monkeypatch, size, width, height):
    require_peer("timm")
    factory = require_peer("timm.data.transforms_factory")
    aa = require_peer("timm.data.auto_augment")
    t_transforms = require_peer("timm.data.transforms")
    t_erasing = require_peer("timm.data.random_erasing")
    torchvision_t = require_peer("torchvision.transforms")

    timm_tf = factory.create_transform(size, is_training=True, auto_augment=SPEC, interpolation="bicubic",
                                       re_prob=0.25, re_mode="pixel")
    steps = timm_tf.transforms
    assert [type(t).__name__ for t in steps] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                 "RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]
    flip, ra = steps[1], steps[2]
    pixels = []  # timm's uint8 image, as it enters ToTensor
    to_tensor = steps[3]
    steps[3] = lambda pic: (pixels.append(torch.from_numpy(np.array(pic).transpose(2, 0, 1).copy())),
                            to_tensor(pic))[1]
    names = [op.name for op in ra.ops]
    assert sorted(_vitkit_name(n) for n in names) == sorted(OPS)

    # vitkit's DeiT pipeline, built from the config's defaults as `vitkit train` builds it.
    d = DataConfig()
    assert (d.auto_augment, d.re_prob, d.re_mode, d.color_jitter, d.hflip) == (SPEC, 0.25, "pixel", 0.0, 0.5)
    vk_tf = TrainTransform(size, 3, scale=(d.scale_min, 1.0), hflip=d.hflip, auto_augment=d.auto_augment,
                           mean=IMAGENET_MEAN)
    vk_aug = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, color_jitter=d.color_jitter, re_prob=d.re_prob,
                          re_mode=d.re_mode)

    img, g, tg = _image(width, height), random.Random(size), torch.Generator().manual_seed(size)
    params = [_draw(g, k, names, width, height, size) for k in range(9)]
    for p in params:
        if p["erase"]:
            p["noise"] = torch.randn(3, p["erase"]["h"], p["erase"]["w"], generator=tg)

    theirs = []
    for p in params:
        script = _timm_script(p, size)
        with monkeypatch.context() as m:
            for module in (t_transforms, aa, t_erasing):
                m.setattr(module, "random", script)
            m.setattr(aa.np.random, "choice", _planned_ops(ra, p))
            m.setattr(flip, "p", 1.0 if p["flip"] else 0.0)  # torch.rand(1) < p: always / never
            m.setattr(t_erasing, "_get_pixels", lambda *a, _p=p, **k: _p["noise"].clone())
            theirs.append(timm_tf(img))
        script.done()
    assert isinstance(flip, torchvision_t.RandomHorizontalFlip)

    ours_u8 = []
    for p in params:
        script = _vitkit_script(p)
        ours_u8.append(vk_tf(img, script))
        script.done()
    fake_rand, fake_randn, left = _vitkit_erase_draws(params, size)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", fake_rand)
        m.setattr(torch, "randn", fake_randn)
        ours = vk_aug(torch.stack(ours_u8))
    assert not left  # every planned draw was made

    # The same pixels, image by image: crop, resize, flip and every op.
    for k, (a, b) in enumerate(zip(ours_u8, pixels)):
        assert torch.equal(a, b), (k, (a.int() - b.int()).abs().max().item(), (a != b).float().mean().item())
    theirs = torch.stack(theirs)
    assert not ours.isnan().any()
    erased = torch.zeros(len(params), size, size, dtype=torch.bool)
    for k, p in enumerate(params):
        if p["erase"]:
            e = p["erase"]
            erased[k, e["top"] : e["top"] + e["h"], e["left"] : e["left"] + e["w"]] = True
    assert torch.equal((ours != theirs).any(1) & erased, torch.zeros_like(erased))  # the same boxes, same noise
    # Normalisation: vitkit computes x * (1 / (255 std)) - mean / std in one pass on the device,
    # torchvision (x / 255 - mean) / std. The two float32 roundings of one uint8 value differ by at
    # most 4.8e-7 (4 eps; over all 256 values and the 3 channels), so that is all that may differ.
    keep = ~erased.unsqueeze(1).expand_as(ours)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(theirs[keep], ((torch.stack(pixels).float() / 255 - mean) / std)[keep])
    assert (ours - theirs).abs()[keep].max().item() <= 4 * torch.finfo(torch.float32).eps
    assert {_vitkit_name(o["name"]) for p in params for o in p["ops"] if o["applied"]} == set(OPS)
