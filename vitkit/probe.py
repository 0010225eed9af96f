"""`probe(source, data, method)`: how good are a frozen backbone's features? k-NN and linear probes.

- **k-NN** (DINO's protocol): features of the train split form a bank; each validation image
  takes its k nearest neighbours by cosine similarity, which vote with weight
  ``exp(similarity / 0.07)``; accuracy for k in {10, 20, 200}.
- **Linear probe**: a linear classifier on the frozen features (standardised with the train
  split's statistics), trained with its own short schedule (SGD, cosine, no augmentation: the
  features are computed once).

Both write ``probe_<method>.json`` next to the model (or into ``out_dir``).

>>> from vitkit.probe import probe
>>> probe("runs/dino-cifar10", "/data/cifar10", "knn")["knn_acc"]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine.evaluators import KNNEvaluator
from .errors import ConfigError, DataError
from .source import LoadedModel, load_model

PROBE_METHODS = ("knn", "linear")
KNN_KS = (10, 20, 200)


@dataclass
class LinearProbeConfig:
    """The linear probe's own schedule: SGD with momentum, cosine lr, on cached features."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


@torch.no_grad()
def extract_features(lm: LoadedModel, loader) -> tuple[Tensor, Tensor]:
    """(N, D) pooled backbone features (``forward_head(pre_logits=True)``) and (N,) labels, on the CPU."""
    feats, labels = [], []
    for batch in loader:
        x = lm.normalize(batch["image"].to(lm.device))
        feats.append(lm.model.forward_head(lm.model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(batch["label"])
    if not feats:
        raise DataError("the probe's data split has no images")
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, num_classes: int,
                 ks=KNN_KS, temperature: float = 0.07, chunk: int = 256) -> dict[str, float]:
    """Weighted k-NN top-1 accuracy for each k (``knn_acc_<k>``), cosine similarity."""
    out = {}
    for k in ks:
        knn = KNNEvaluator(num_classes, k=k, temperature=temperature)
        knn.set_bank(train_f, train_y)
        hits = sum(int((knn.predict(val_f[i : i + chunk]) == val_y[i : i + chunk]).sum())
                   for i in range(0, len(val_f), chunk))
        out[f"knn_acc_{k}"] = hits / len(val_f)
    return out


def linear_probe(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, num_classes: int,
                 cfg: LinearProbeConfig | None = None) -> dict[str, float]:
    """Top-1 accuracy of a linear classifier trained on frozen features (``linear_acc``, ``linear_train_acc``)."""
    cfg = cfg or LinearProbeConfig()
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xva = (train_f - mean) / std, (val_f - mean) / std
    g = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(xtr)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return {
            "linear_acc": float((head(xva).argmax(-1) == val_y).float().mean()),
            "linear_train_acc": float((head(xtr).argmax(-1) == train_y).float().mean()),
        }


def probe(
    source: str | os.PathLike | LoadedModel,
    data: str,
    method: str = "knn",
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    linear: LinearProbeConfig | None = None,
) -> dict:
    """Probe the frozen features of ``source`` (run dir or weights) on ``data``: train split -> val split.

    Args:
        method: "knn" (k in {10, 20, 200}) or "linear".
    Returns:
        the accuracies plus what was probed; also written to ``probe_<method>.json``.
    """
    from .data import build_dataset, build_loader

    if method not in PROBE_METHODS:
        raise ConfigError(f"unknown probe method {method!r}: use one of {', '.join(PROBE_METHODS)}")
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    if lm.task != "classify":
        raise ConfigError(
            f"{getattr(source, 'weights', None) or source} is a {lm.task} model; probe fits a classifier on a "
            f"classification backbone's pooled features. Score it with vitkit eval, or probe the backbone it was "
            "initialised from"
        )
    s = lm.settings
    split_kw = dict(val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0), in_chans=lm.in_chans,
                    max_bad_fraction=s.get("max_bad_fraction", 0.05))
    train_ds, val_ds = build_dataset(data, "train", **split_kw), build_dataset(data, "val", **split_kw)
    classes = list(getattr(train_ds, "classes", None) or [])
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)

    def features(ds):
        loader = build_loader(ds, batch_size, train=False, transform=lm.transform, num_workers=workers,
                              max_bad_fraction=s.get("max_bad_fraction", 0.05))
        return extract_features(lm, loader)

    train_f, train_y = features(train_ds)
    val_f, val_y = features(val_ds)
    num_classes = max(len(classes), int(train_y.max()) + 1, int(val_y.max()) + 1)
    if num_classes < 2:
        raise DataError(f"{data} has a single class: a probe needs labelled data with at least 2 classes")
    if method == "knn":
        result = knn_accuracy(train_f, train_y, val_f, val_y, num_classes)
        result["knn_acc"] = result["knn_acc_20"]
    else:
        cfg = linear or LinearProbeConfig()
        result = {**linear_probe(train_f, train_y, val_f, val_y, num_classes, cfg), "linear_config": asdict(cfg)}
    result.update({"method": method, "n_train": len(train_y), "n_val": len(val_y), "feature_dim": train_f.shape[1],
                   "num_classes": num_classes, "weights": str(lm.weights), "data": str(data)})
    out = Path(out_dir) if out_dir is not None else lm.home
    out.mkdir(parents=True, exist_ok=True)
    result["json"] = str(out / f"probe_{method}.json")
    (out / f"probe_{method}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
