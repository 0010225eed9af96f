"""Generative runs: the generator registry, the objective base and its evaluator, `vitkit train` of a
tokenizer, MaskGIT, VAR and DiT that resume bitwise, `vitkit sample`, and the clear errors around them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run, assert_user_error, crash_and_resume, run_vitkit
from PIL import Image
from torch import nn

from vitkit.errors import ConfigError, PathNotFoundError, WeightsError

ENGINE = ["engine.amp=none", "engine.tensorboard=false", "engine.plots=false", "data.num_workers=0"]
# Per objective: the tiny model, the tokenizer it trains on (a fixture name) and its fast sampling keys.
OBJECTIVES = {
    "vqvae": ("vq_test", None, []),
    "maskgit": ("maskgit_test", "vq_run", ["objective.sample_steps=2", "objective.grid_samples=6"]),
    "var": ("var_test", "msvq_run", ["objective.grid_samples=6"]),
    "dit": ("dit_test", None, ["objective.sample_steps=2", "objective.grid_samples=6"]),
}


# ---- the registry ---------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    kind = "dit"

    def __init__(self, width: int = 4, depth: int = 1):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


@pytest.fixture
def registry(monkeypatch):
    """The generator registry, with registrations made in the test undone afterwards."""
    from vitkit.generate import registry

    monkeypatch.setattr(registry, "_GENERATORS", dict(registry._GENERATORS))
    return registry


def test_registry_builds_by_name_and_records_its_arguments(registry):
    registry.register_generator("tiny_test", "dit", _Tiny, {"width": 4, "depth": 1})
    m = registry.create_generator("tiny_test", depth=3)
    assert m.model_name == "tiny_test" and m.model_args == {"width": 4, "depth": 3}
    assert len(m.layers) == 3 and m.layers[0].in_features == 4
    again = registry.create_generator(m.model_name, **m.model_args)
    assert [p.shape for p in again.parameters()] == [p.shape for p in m.parameters()]
    assert registry.generator_kind("tiny_test") == "dit"
    assert "tiny_test" in registry.list_generators("dit") and "tiny_test" not in registry.list_generators("var")


def test_bad_generator_names_and_arguments_say_what_to_do(registry):
    registry.register_generator("tiny_test", "dit", _Tiny, {"width": 4})
    with pytest.raises(ConfigError, match=r"unknown generative model 'tiny_tset'.*did you mean tiny_test"):
        registry.create_generator("tiny_tset")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['widht'\].*depth, width"):
        registry.create_generator("tiny_test", widht=8)
    with pytest.raises(ValueError, match="kind"):
        registry.register_generator("other_test", "gan", _Tiny, {})


# ---- the objective base and its evaluator ----------------------------------------------------------------------


def _toy_objective(**cfg):
    from vitkit.objectives.generative import GenerativeConfig, GenerativeObjective
    from vitkit.objectives.teacher import weights_sha256

    tok = nn.Linear(3, 3)
    ref = {"source": "/runs/tok", "sha256": weights_sha256(tok)}
    return GenerativeObjective(nn.Linear(2, 2), GenerativeConfig(**cfg), num_classes=4, tokenizer=tok,
                               tokenizer_ref=ref), ref


def test_drop_labels_replaces_the_configured_share_by_the_null_class():
    obj, _ = _toy_objective(class_dropout=0.25)
    labels = torch.arange(20000) % 4
    dropped = obj.drop_labels(labels, generator=torch.Generator().manual_seed(0))
    null = dropped == 4
    # Binomial(20000, 0.25): the share is within 4 standard deviations (0.012) of 0.25.
    assert abs(null.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)
    assert torch.equal(dropped[~null], labels[~null])
    for k in range(4):  # independent of the class
        assert abs(null[labels == k].float().mean().item() - 0.25) < 0.03
    none, _ = _toy_objective(class_dropout=0.0)
    assert torch.equal(none.drop_labels(labels), labels)
    with pytest.raises(ConfigError, match="class_dropout"):
        _toy_objective(class_dropout=1.0)


def test_balanced_labels_give_one_class_per_row():
    from vitkit.objectives.generative import balanced_labels

    labels, per = balanced_labels(7, 3)
    assert per == 3 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    labels, per = balanced_labels(40, 10)
    assert per == 4 and labels.tolist() == [k for k in range(10) for _ in range(4)]


def test_objective_records_the_tokenizer_by_reference_and_keeps_it_frozen():
    from vitkit.objectives.base import StepContext

    obj, ref = _toy_objective()
    assert obj.references() == {"tokenizer": ref}
    assert not any(p.requires_grad for p in obj.tokenizer.parameters())
    obj.train()
    assert obj.model.training and not obj.tokenizer.training
    assert not any(k.startswith("tokenizer.") for k in obj.checkpoint_state_dict())
    assert any(k.startswith("tokenizer.") for k in obj.state_dict())
    with pytest.raises(WeightsError, match="tokenizer"):
        obj.check_references({"tokenizer": {"source": "/runs/tok", "sha256": "0" * 64}})
    obj.on_step_end(StepContext(step=7, total_steps=9, optimizer=None, trainer=None))
    assert obj.step == 7


class _Painter:
    """Samples whose pixels are -1 + 0.5 * class plus seeded noise, so the judge can tell the classes."""

    def __init__(self):
        self.model = nn.Linear(1, 1)

    def sample(self, labels, *, model=None, steps=None, guidance=None, generator=None):
        assert model is self.model and steps == 2 and guidance == 1.5
        noise = torch.randn(len(labels), 1, 4, 4, generator=generator, device=labels.device)
        return (-1 + 0.5 * labels.float()).view(-1, 1, 1, 1) + 0.1 * noise


def _judge(images):
    """Features (mean, std) of each image; it predicts the nearest class level, except that class 2 reads as 0."""
    x = images.flatten(1)
    feats = torch.stack([x.mean(1), x.std(1)], 1)
    pred = (feats[:, :1] - torch.tensor([-1.0, -0.5, 0.0, 0.5])).abs().argmin(1)
    pred = torch.where(pred == 2, torch.zeros_like(pred), pred)
    return feats, nn.functional.one_hot(pred, 4).float()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two Gaussians fitted to the rows of a and b (the closed form, with scipy's sqrtm)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_evaluator_writes_the_grid_and_scores_samples_with_the_judge(tmp_path):
    from vitkit.objectives.generative import GenerationEvaluator

    painter = _Painter()
    ev = GenerationEvaluator(4, judge=_judge, judge_samples=10, grid_samples=6, sample_dir=tmp_path / "samples",
                             step=12, steps=2, guidance=1.5, seed=0)
    assert ev.primary == "class_consistency" and ev.higher_is_better
    ev.reset()
    ev.begin(painter, painter.model, lambda b: b)
    g = torch.Generator().manual_seed(5)
    batches = []
    for n in (8, 8):  # 16 real images, of which the judge sees the first 10
        labels = torch.randint(0, 4, (n,), generator=g)
        image = (-1 + 0.5 * labels.float()).view(-1, 1, 1, 1) + 0.2 * torch.randn(n, 1, 4, 4, generator=g)
        batches.append({"image": image, "label": labels})
        ev.update(batches[-1], {"loss": torch.arange(n, dtype=torch.float32)})
    out = ev.compute()
    assert out["loss"] == pytest.approx(3.5)  # mean of 0..7, twice
    # Labels i % 4 for i < 10: classes 0,1,2,3,0,1,2,3,0,1; the judge gets every class but 2 right.
    assert out["class_consistency"] == pytest.approx(8 / 10)
    fake_labels = torch.arange(10) % 4
    fake = painter.sample(fake_labels, model=painter.model, steps=2, guidance=1.5,
                          generator=torch.Generator().manual_seed(1))
    real = torch.cat([b["image"] for b in batches])[:10]
    want = _frechet(_judge(fake)[0].double().numpy(), _judge(real)[0].double().numpy())
    assert out["fd"] == pytest.approx(want, rel=1e-6) and out["fd_n"] == 10
    grid = Image.open(tmp_path / "samples" / "step_000012.png")
    assert grid.height > grid.width  # 6 images of 4 classes: 2 per row (one class each), 3 rows


def test_evaluator_without_a_judge_reports_the_loss_only():
    from vitkit.objectives.generative import GenerationEvaluator

    ev = GenerationEvaluator(3)
    assert ev.primary == "loss" and not ev.higher_is_better
    painter = _Painter()
    ev.begin(painter, painter.model, lambda b: b)  # no sample_dir, no judge: nothing is drawn
    ev.update({"image": torch.zeros(2, 1, 4, 4)}, {"loss": torch.tensor([1.0, 3.0])})
    assert ev.compute() == {"loss": 2.0}


# ---- runs (need the tokenizer, the generators, their objectives and the judge's grid) ---------------------------


def _needs(*objectives: str) -> None:
    try:
        from vitkit.generate import grid  # noqa: F401
        from vitkit.objectives import list_objectives
    except ImportError as e:
        pytest.skip(f"the generation stack is not merged here: {e}")
    missing = sorted(set(objectives) - set(list_objectives()))
    if missing:
        pytest.skip(f"objective(s) {missing} not merged here")


def write_digits(root, classes: int = 3, per_class: int = 12, size: int = 28, seed: int = 0) -> None:
    """Gray class folders: class k is a bright bar at a place of its own on a dark, noisy background."""
    g = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            img = g.integers(0, 40, (size, size)).astype(np.uint8)
            top = 4 + 7 * k + int(g.integers(0, 3))
            img[top:top + 5, 4:size - 4] = 220
            Image.fromarray(img).save(root / f"c{k}" / f"{i}.png")


def _cfg(out, data, *extra):
    from vitkit.config import load_config

    return load_config(overrides=[f"data.path={data}", "data.val_fraction=0.25", "data.batch_size=4",
                                  "data.eval_batch_size=8", f"engine.out_dir={out}", "engine.epochs=1", *ENGINE,
                                  *extra], plan=False)


def _train(out, data, *extra):
    from vitkit.train import train

    torch.manual_seed(0)
    return train(_cfg(out, data, *extra), verbose=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "digits"
    write_digits(root)
    return root


def _tokenizer_run(data, model: str):
    """A `vqvae` run of ``model`` (two steps) next to the data."""
    _needs("vqvae")
    out = data.parent / model
    _train(out, data, "objective.name=vqvae", f"model.name={model}", "engine.max_steps=2")
    return out


@pytest.fixture(scope="module")
def vq_run(data):
    return _tokenizer_run(data, "vq_test")


@pytest.fixture(scope="module")
def msvq_run(data):
    return _tokenizer_run(data, "msvq_test")


@pytest.fixture(scope="module")
def maskgit_run(data, vq_run):
    _needs("maskgit")
    out = data.parent / "maskgit"
    _train(out, data, "objective.name=maskgit", f"objective.tokenizer={vq_run}", "model.name=maskgit_test",
           "engine.max_steps=2", *OBJECTIVES["maskgit"][2])
    return out


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_each_objective_trains_and_resumes_bitwise(objective, data, request, tmp_path):
    from vitkit.train import build_run

    _needs(objective)
    model, tok_fixture, fast = OBJECTIVES[objective]
    tok = [f"objective.tokenizer={request.getfixturevalue(tok_fixture)}"] if tok_fixture else []

    def trainer(out, hooks=()):
        cfg = _cfg(out, data, f"objective.name={objective}", f"model.name={model}", *tok, *fast,
                   "engine.max_steps=3", "engine.ckpt_every_steps=2")
        torch.manual_seed(cfg.engine.seed)
        tr, info = build_run(cfg, verbose=False)
        assert info["task"] == "generate" and info["model"] == model and info["classes"] == ["c0", "c1", "c2"]
        tr.hooks = list(hooks)
        return tr

    full = trainer(tmp_path / "full")
    summary = full.fit()
    val = {k: v for k, v in full.last_val.items() if isinstance(v, float)}
    assert full.step == 3 and summary["steps"] == 3 and val and all(map(math.isfinite, val.values()))
    resumed = crash_and_resume(trainer, tmp_path / "run", 3, latest=2)
    assert_same_run(full, resumed)


def test_run_records_the_tokenizer_and_writes_sample_grids(maskgit_run, vq_run):
    from vitkit.generate.load import load_generator, load_tokenizer
    from vitkit.objectives.teacher import weights_sha256
    from vitkit.weights_io import save_weights

    info = json.loads((maskgit_run / "run.json").read_text())
    tokenizer, ref = load_tokenizer(vq_run)
    assert info["task"] == "generate" and info["kind"] == "maskgit" and info["img_size"] == 28
    assert info["tokenizer"] == ref and ref["sha256"] == weights_sha256(tokenizer)
    assert info["objective"]["references"]["tokenizer"] == ref
    args = info["model_args"]
    assert args["codebook_size"] == tokenizer.codebook_size and args["grid"] == tokenizer.grid
    assert list((maskgit_run / "samples").glob("step_*.png")), "each evaluation writes a grid"
    model, meta = load_generator(maskgit_run)
    assert meta["kind"] == "maskgit" and meta["classes"] == ["c0", "c1", "c2"] and meta["tokenizer"] is not None
    # A tokenizer other than the recorded one is refused.
    other = maskgit_run.parent / "vq_changed.safetensors"
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(1.0)
    save_weights(tokenizer, other)
    with pytest.raises(WeightsError, match="not the one"):
        load_generator(maskgit_run, tokenizer=other)


def test_bad_tokenizers_are_clear_errors(data, vq_run, maskgit_run, tmp_path):
    from vitkit.generate.load import load_tokenizer
    from vitkit.models import create_model
    from vitkit.train import build_run
    from vitkit.weights_io import save_weights

    _needs("var")
    with pytest.raises(PathNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    clf = tmp_path / "clf.safetensors"
    save_weights(create_model("test_vit", num_classes=3), clf)
    with pytest.raises(ConfigError, match="not a VQ tokenizer"):
        load_tokenizer(clf)
    with pytest.raises(ConfigError, match="is a maskgit run"):
        load_tokenizer(maskgit_run)
    cfg = _cfg(tmp_path / "v", data, "objective.name=var", f"objective.tokenizer={vq_run}", "model.name=var_test")
    with pytest.raises(ConfigError, match="single-scale"):
        build_run(cfg, verbose=False)
    cfg = _cfg(tmp_path / "m", data, "objective.name=maskgit", "model.name=maskgit_test")
    with pytest.raises(ConfigError, match="objective.tokenizer=runs/tok"):
        build_run(cfg, verbose=False)
    cfg = _cfg(tmp_path / "m", data, "objective.name=maskgit", f"objective.tokenizer={vq_run}", "model.name=dit_test")
    with pytest.raises(ConfigError, match="model.name=dit_test is a dit model"):
        build_run(cfg, verbose=False)


@pytest.mark.e2e
def test_sample_writes_a_png_grid_and_eval_points_at_it(maskgit_run, data, tmp_path):
    out = tmp_path / "grid.png"
    r = run_vitkit("sample", maskgit_run, "--class", "1", "--n", "4", "--steps", "2", "--out", out, "--json",
                   check=True, timeout=120)
    res = json.loads(r.stdout)
    assert res["path"] == str(out) and res["labels"] == [1, 1, 1, 1] and res["steps"] == 2
    grid = Image.open(out)
    assert grid.width >= 2 * 28 and grid.height >= 2 * 28  # 4 images of 28 px, 2 x 2
    assert_user_error(run_vitkit("eval", maskgit_run, "--data", data), "generative model", "vitkit sample")


def test_sample_by_class_name_and_its_errors(maskgit_run, vq_run, tmp_path):
    from vitkit.sample import sample

    res = sample(maskgit_run, classes=["c2", "0"], n=4, steps=2, out=tmp_path / "g.png", device="cpu")
    assert res["labels"] == [2, 2, 0, 0] and res["classes"] == ["c0", "c2"]
    # The same seed draws the same images.
    again = sample(maskgit_run, classes=["c2", "0"], n=4, steps=2, out=tmp_path / "h.png", device="cpu")
    assert np.array_equal(np.asarray(Image.open(res["path"])), np.asarray(Image.open(again["path"])))
    with pytest.raises(ConfigError, match="--class 7: .*0=c0, 1=c1, 2=c2"):
        sample(maskgit_run, classes=[7], n=2, device="cpu")
    with pytest.raises(ConfigError, match="VQ tokenizer.*objective.tokenizer"):
        sample(vq_run, n=2, device="cpu")


def test_load_model_refuses_a_tokenizer_run(vq_run):
    from vitkit.source import load_model

    with pytest.raises(ConfigError, match="VQ image tokenizer"):
        load_model(vq_run)


def test_load_model_refuses_a_generator_weights_file(maskgit_run, tmp_path):
    from vitkit.source import load_model

    lone = tmp_path / "maskgit.safetensors"
    lone.write_bytes((maskgit_run / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"generative model \(maskgit, maskgit_test\).*vitkit sample"):
        load_model(lone)


@pytest.mark.e2e
def test_vitkit_train_writes_a_generative_run(data, tmp_path):
    _needs("dit")
    out = tmp_path / "dit"
    run_vitkit("train", "--data", data, "--out", out, "objective.name=dit", "model.name=dit_test",
               "objective.sample_steps=2", "objective.grid_samples=6", "engine.max_steps=2", "engine.epochs=1",
               "data.batch_size=4", "data.val_fraction=0.25", *ENGINE, check=True, timeout=120)
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "generate" and info["kind"] == "dit" and info["tokenizer"] is None
    assert info["mean"] == [0.5] and info["std"] == [0.5] and info["in_chans"] == 1
    assert (out / "samples" / "step_000002.png").is_file() and (out / "model.safetensors").is_file()


def test_the_summary_of_a_generative_run_points_to_its_next_step():
    from vitkit.cli.train import format_summary

    base = {"stopped": "max_steps", "steps": 3, "wall_s": 1.0, "task": "generate", "val_loss": 0.25}
    tok = format_summary({**base, "out_dir": "runs/tok", "model": "msvq_nano"}, "DATA")
    assert "val loss 0.2500" in tok and "objective.name=var objective.tokenizer=runs/tok" in tok
    gen = format_summary({**base, "out_dir": "runs/g", "model": "maskgit_nano", "val_class_consistency": 0.9,
                          "val_fd": 3.5}, "DATA")
    assert "vitkit sample runs/g" in gen and "class consistency 90.00%" in gen and "FD 3.50" in gen
