"""Sample-quality numbers computed in a judge classifier's feature space.

No Inception network is reachable offline, so vitkit scores samples with a classifier it trained
itself (:class:`vitkit.objectives.judge.Judge`): its pooled pre-logits are the features, its
logits the class predictions.

- :func:`feature_stats` and :func:`frechet_distance`: the Frechet distance between the Gaussians
  fitted to two feature sets, ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al.
  2017), computed as the reference FID code does: float64, ``scipy.linalg.sqrtm`` of the
  covariance product, ``eps`` added to both diagonals when that square root is not finite, and
  a small imaginary residue of the square root dropped. Compare equal numbers of images on both
  sides (the estimate is biased upwards for small sets), and at least one more image than the
  feature dimension, or the covariances are singular.
- :func:`class_consistency`: the judge's accuracy on class-conditional samples, i.e. the share
  of samples it assigns to the class they were generated for.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError, DataError

FD_EPS = 1e-6  # the reference FID code's diagonal offset for a singular covariance product
IMAG_ATOL = 1e-3  # the reference's tolerance on the square root's imaginary diagonal


def _float64(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(x, dtype=np.float64)
    if not np.isfinite(out).all():
        raise DataError(f"{what} holds NaN or infinite values: the samples or features are broken")
    return out


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64, covariance with N - 1 as the FID code."""
    x = _float64(features, "features")
    if x.ndim != 2:
        raise DataError(f"features must be (N, D), one row per image; got shape {x.shape}")
    if x.shape[0] < 2:
        raise DataError(f"a covariance needs at least 2 feature rows, got {x.shape[0]}: score more images")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    try:
        from scipy import linalg
    except ImportError:
        raise ConfigError("the Frechet distance needs scipy: pip install 'vitkit[generate]'") from None

    with warnings.catch_warnings():
        # A singular product is handled below (eps on the diagonals), as the reference does.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FD_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``, in float64.
    When the square root of the product is not finite, ``eps`` is added to both diagonals; a
    complex square root whose diagonal has imaginary parts within 1e-3 of zero (numerical error)
    keeps its real part. Both as in the reference FID implementation.

    Raises:
        DataError: the shapes differ or do not fit, or the square root has a real imaginary part
            (the covariances are singular: too few images for the feature dimension).
    """
    mu1, mu2 = np.atleast_1d(_float64(mu1, "mu1")), np.atleast_1d(_float64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1, "sigma1")), np.atleast_2d(_float64(sigma2, "sigma2"))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DataError(
            f"the two sets' statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} "
            f"and {sigma2.shape}; both must be features of the same judge"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise DataError(
                f"the square root of the covariance product has an imaginary part of "
                f"{np.max(np.abs(covmean.imag)):.3g}: the covariances are singular, which happens with fewer "
                f"images than feature dimensions ({d}); compare more images"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def class_consistency(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Share of samples whose judge prediction (argmax of ``logits`` (N, K)) is their class ``labels`` (N,)."""
    pred = torch.as_tensor(logits).detach().cpu()
    target = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if pred.ndim != 2 or pred.shape[0] != target.shape[0]:
        raise DataError(f"class consistency needs logits (N, K) and labels (N,); got {tuple(pred.shape)} and "
                        f"{tuple(target.shape)}")
    if target.numel() == 0:
        raise DataError("class consistency of no samples: generate at least one")
    if target.min() < 0 or target.max() >= pred.shape[1]:
        raise DataError(f"labels must be class ids in [0, {pred.shape[1]}) of the judge's classes; got "
                        f"[{int(target.min())}, {int(target.max())}]: the judge and the generator must share classes")
    return float((pred.argmax(dim=1) == target.long()).double().mean())


__all__ = ["FD_EPS", "class_consistency", "feature_stats", "frechet_distance"]
