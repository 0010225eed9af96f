"""Sample-quality metrics against closed forms, the PNG grid, and the judge classifier.

The Frechet distance is checked against the Gaussian closed form (diagonal covariances: a sum of
squared differences of standard deviations; full covariances: the trace of the square root through
an eigen-decomposition written here), and the estimate from large samples against the distance of
the Gaussians they were drawn from. The judge is checked against the classifier run by hand on the
pixels its own evaluation transform would give.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit.errors import ConfigError, DataError, PathNotFoundError
from vitkit.generate.grid import save_grid
from vitkit.generate.metrics import class_consistency, feature_stats, frechet_distance


def spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def fd_closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1^(1/2) S2 S1^(1/2))^(1/2), by symmetric eigen-decompositions.

    (S1 S2)^(1/2) is similar to (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix, so the traces agree.
    """
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    d = np.asarray(mu1) - np.asarray(mu2)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


# ---- Frechet distance ----------------------------------------------------------------------------


def test_fd_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # torch inputs (float32 features are scored in float64)
    got = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(a)), torch.tensor(mu2), torch.tensor(np.diag(b)))
    assert got == pytest.approx(want, rel=1e-10)


def test_fd_of_full_covariances_matches_an_eigen_decomposition():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), spd(6, rng), spd(6, rng)
    want = fd_closed_form(mu1, s1, mu2, s2)
    assert want > 0.5  # the Gaussians differ: the check is not 0 == 0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)  # symmetric


def test_fd_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    other = feature_stats(x + 0.5)  # a shift of every feature by 0.5: FD = 12 * 0.25
    assert frechet_distance(mu, sigma, *other) == pytest.approx(3.0, rel=1e-6)


def test_fd_estimated_from_large_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.5, -0.5])
    s1, s2 = spd(3, rng), spd(3, rng)
    want = fd_closed_form(mu1, s1, mu2, s2)
    n = 200_000
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    got = frechet_distance(*feature_stats(x1), *feature_stats(x2))
    # the standard error of the estimate is ~0.01 here
    assert got == pytest.approx(want, abs=0.05)
    small = frechet_distance(*feature_stats(x1[:20]), *feature_stats(x2[:20]))
    assert abs(got - want) < abs(small - want)


def test_fd_of_point_masses_is_the_squared_distance_of_the_means():
    """A zero (singular) covariance product: both the direct square root and the eps-regularised one give 0."""
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 5.0])
    zeros = np.zeros((3, 3))
    assert frechet_distance(mu1, zeros, mu2, zeros) == pytest.approx(5.0, abs=1e-6)


def test_feature_stats_by_hand_and_bad_shapes():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = feature_stats(x)
    assert np.allclose(mu, [3.0, 2.0])
    c = x - [3.0, 2.0]
    assert np.allclose(sigma, c.T @ c / 2)  # N - 1
    assert feature_stats(np.array([[1.0], [3.0]]))[1].shape == (1, 1)
    with pytest.raises(DataError, match="at least 2"):
        feature_stats(x[:1])
    with pytest.raises(DataError, match="same judge"):
        frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="NaN"):
        feature_stats(np.array([[1.0, np.nan], [0.0, 1.0]]))


# ---- class consistency ------------------------------------------------------------------------------


def test_class_consistency_by_hand():
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.1, 0.0, 0.2], [5.0, 4.0, 0.0]])
    # argmax: 0, 1, 2, 0
    assert class_consistency(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5)
    assert class_consistency(logits.numpy(), np.array([0, 1, 2, 0])) == 1.0
    with pytest.raises(DataError, match="share classes"):
        class_consistency(logits, torch.tensor([0, 1, 3, 0]))  # 3: the null class of a 3-class generator
    with pytest.raises(DataError, match="labels"):
        class_consistency(logits, torch.tensor([0, 1]))


# ---- grid -----------------------------------------------------------------------------------------


def test_save_grid_writes_a_png_of_the_expected_size(tmp_path):
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=4)
    img = Image.open(path)
    # 28 px tiles enlarged 3x (at least 64 px), 4 per row, 3 rows, 2 px padding around every tile
    assert img.format == "PNG" and img.mode == "L"
    assert img.size == (4 * (84 + 2) + 2, 3 * (84 + 2) + 2)
    px = np.asarray(img)
    level = lambda v: int(math.floor((float(v) + 1) * 127.5 + 0.5))  # noqa: E731
    # image 5 is row 1, column 1; each of its pixels is a 3x3 block
    y, x = 2 + 86, 2 + 86
    assert (px[y:y + 3, x:x + 3] == level(images[5, 0, 0, 0])).all()
    assert px[y + 3 * 27, x + 3 * 27] == level(images[5, 0, 27, 27])
    assert px[0, 0] == 255 and px[y - 1, x] == 255  # white padding
    assert (px[-86:, -86:] == 255).all()  # the last row holds two images: the rest is padding

    rgb = torch.stack([torch.full((8, 8), -1.0), torch.zeros(8, 8), torch.ones(8, 8)])[None].repeat(3, 1, 1, 1)
    img = Image.open(save_grid(rgb, tmp_path / "rgb.png", scale=1, padding=0))
    assert img.mode == "RGB" and img.size == (16, 16)  # ceil(sqrt(3)) = 2 per row, 2 rows
    assert tuple(np.asarray(img)[0, 0]) == (0, 128, 255)
    with pytest.raises(ConfigError, match="png"):
        save_grid(rgb, tmp_path / "grid.jpg")
    with pytest.raises(DataError, match="C = 1 or 3"):
        save_grid(torch.zeros(2, 2, 8, 8), tmp_path / "two.png")


# ---- judge -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A finished-looking run of a tiny classifier: run.json, summary.json, model.safetensors."""
    from vitkit.models import create_model
    from vitkit.weights_io import save_weights

    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=10, img_size=32, in_chans=3).eval()
    run = tmp_path_factory.mktemp("judge") / "run"
    save_weights(model, run / "model.safetensors")
    (run / "run.json").write_text(json.dumps({"model": "test_vit", "task": "classify", "num_classes": 10,
                                              "img_size": 32, "in_chans": 3}))
    (run / "summary.json").write_text(json.dumps({"val_acc": 0.875}))
    return run, model


def by_hand(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier on 28 px grey images in [-1, 1]: 8-bit pixels, RGB, bicubic to 32 px, its mean/std."""
    rows = []
    for im in images:
        px = ((im[0] + 1) * 127.5).round().to(torch.uint8).numpy()
        big = Image.fromarray(px, "L").convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        rows.append(torch.from_numpy(np.asarray(big, np.float32) / 255).permute(2, 0, 1))
    x = torch.stack(rows)
    mean, std = torch.tensor(model.card.mean).view(1, 3, 1, 1), torch.tensor(model.card.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True), model(x)


def test_judge_features_and_logits_of_28px_grey_samples(classifier_run):
    from vitkit.objectives.judge import load_judge
    from vitkit.objectives.teacher import weights_sha256

    run, model = classifier_run
    judge = load_judge(run)
    assert judge.test_acc == 0.875 and judge.model_name == "test_vit"
    assert judge.sha256 == weights_sha256(model) and judge.reference["sha256"] == judge.sha256
    assert judge.img_size == (32, 32) and judge.num_features == model.num_features
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats, logits = judge(images)
    assert feats.shape == (6, model.num_features) and logits.shape == (6, 10)
    assert judge.preprocess(images).shape == (6, 3, 32, 32)
    want_feats, want_logits = by_hand(model, images)
    assert torch.allclose(feats, want_feats, atol=1e-4) and torch.allclose(logits, want_logits, atol=1e-4)
    # the features really are the pre-logits: the head maps them to the logits
    fc = model.get_classifier()
    assert torch.allclose(F.linear(feats, fc.weight, fc.bias), logits, atol=1e-4)
    with pytest.raises(DataError, match="C = 1 or 3"):
        judge(torch.zeros(2, 2, 28, 28))
    judge.check_classes(10)
    with pytest.raises(ConfigError, match="10 classes but the generator 3"):
        judge.check_classes(["a", "b", "c"])


def test_load_judge_refuses_what_is_not_a_classifier(tmp_path, classifier_run):
    from vitkit.models import create_model
    from vitkit.objectives.judge import load_judge
    from vitkit.weights_io import save_weights

    with pytest.raises(PathNotFoundError, match="vitkit train --data"):
        load_judge(tmp_path / "missing")
    # a generative run (its run.json decides what the weights are)
    gen = tmp_path / "gen"
    save_weights(create_model("test_vit", num_classes=10), gen / "model.safetensors")
    (gen / "run.json").write_text(json.dumps({"task": "generate", "kind": "maskgit", "model": "maskgit_test"}))
    with pytest.raises(ConfigError, match=r"generative model \(maskgit\).*vitkit train --data"):
        load_judge(gen)
    headless = save_weights(create_model("test_vit", num_classes=0), tmp_path / "backbone.safetensors")
    with pytest.raises(ConfigError, match="no classifier head"):
        load_judge(headless)
    # the run's final weights file carries the run's accuracy; a copy away from its run has none to report
    assert load_judge(classifier_run[0] / "model.safetensors").test_acc == 0.875
    alone = tmp_path / "alone" / "judge.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((classifier_run[0] / "model.safetensors").read_bytes())
    assert load_judge(alone).test_acc is None
