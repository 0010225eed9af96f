"""Evaluators: accumulate a metric over a validation set and reduce it across processes.

An evaluator sees each batch with the objective's outputs for it (``update(batch, outputs)``)
and returns its metrics at the end (``compute()``), all-reduced on the process group's device.
It declares its ``primary`` metric and whether higher is better; the best checkpoint follows
that. Metrics that are not per-sample means (balanced accuracy, k-NN accuracy, mIoU) work
because the evaluator keeps sums and counts (or a confusion matrix), not averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError
from .distributed import all_gather_object, all_reduce_sum, is_dist


class Evaluator:
    """Base class. Subclasses set ``primary`` and ``higher_is_better`` and implement the methods."""

    primary: str = "loss"
    higher_is_better: bool = False

    def reset(self) -> None:
        """Forget everything accumulated (called before each evaluation pass)."""

    def update(self, batch: dict, outputs: dict) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen by every process; all processes must call it."""
        raise NotImplementedError


class MeanEvaluator(Evaluator):
    """Averages per-sample values ``outputs[k]`` of shape (B,) over the whole set.

    Primary metric: ``acc1`` (higher is better) when present, else ``loss`` (lower is better).
    """

    def __init__(self, primary: str | None = None, higher_is_better: bool | None = None):
        self._primary, self._hib = primary, higher_is_better
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    @property
    def primary(self) -> str:  # type: ignore[override]
        if self._primary is not None:
            return self._primary
        return "acc1" if "acc1" in self.sums else "loss"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self._hib if self._hib is not None else self.primary != "loss"

    def update(self, batch: dict, outputs: dict) -> None:
        n = None
        for k, v in outputs.items():
            v = v.detach().double()
            if v.ndim != 1 or (n is not None and v.shape[0] != n):
                raise ValueError(
                    f"per-sample evaluation outputs must have shape (B,); {k!r} has shape {tuple(v.shape)}"
                )
            n = v.shape[0]
            self.sums[k] = self.sums[k] + v.sum() if k in self.sums else v.sum()
        self.count += n or 0

    def compute(self) -> dict[str, float]:
        keys = sorted(self.sums)
        dev = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        # One all-reduce for every metric and the count: ranks see different val shards.
        packed = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.count), device=dev).double()])
        packed = all_reduce_sum(packed)
        total = packed[-1].item()
        if total == 0:
            return {}
        return {k: packed[i].item() / total for i, k in enumerate(keys)}


class AccuracyEvaluator(Evaluator):
    """Classification: ``loss`` (cross-entropy), ``acc1``, ``acc5``, ``balanced_acc``.

    ``outputs["logits"]`` (B, C) against ``batch["label"]`` (B,). ``balanced_acc`` is the mean
    over classes with at least one sample of that class's recall; ``per_class_count`` and
    ``per_class_correct`` (lists) come with it. After ``compute()``, ``total_confusion`` (C, C;
    rows: true class, columns: predicted) holds the reduced counts all of them are read from.
    Primary metric: ``acc1``.
    """

    primary = "acc1"
    higher_is_better = True

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.stats: Tensor | None = None  # (2,): loss sum, top-5 hits
        self.confusion: Tensor | None = None  # (C, C), this process's counts
        self.total_confusion: Tensor | None = None  # (C, C), reduced by compute()

    def update(self, batch: dict, outputs: dict) -> None:
        logits = outputs["logits"].detach().float()  # (B, C)
        label = batch["label"]
        c = self.num_classes
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, k)
        stats = torch.stack([
            F.cross_entropy(logits, label, reduction="sum").double(),
            (top == label[:, None]).any(-1).sum().double(),
        ])
        confusion = torch.bincount(label * c + top[:, 0], minlength=c * c).view(c, c).double()
        if self.stats is None:
            self.stats, self.confusion = stats, confusion
        else:
            self.stats += stats
            self.confusion += confusion

    def compute(self) -> dict:
        c = self.num_classes
        if self.stats is None:
            packed = torch.zeros(2 + c * c, dtype=torch.float64)
        else:
            packed = torch.cat([self.stats, self.confusion.flatten()])
        packed = all_reduce_sum(packed).cpu()
        confusion = packed[2:].view(c, c)
        self.total_confusion = confusion.long()
        count, correct = confusion.sum(1), confusion.diagonal()
        n = count.sum().item()
        if n == 0:
            return {}
        present = count > 0
        return {
            "loss": packed[0].item() / n,
            "acc1": correct.sum().item() / n,
            "acc5": packed[1].item() / n,
            "balanced_acc": (correct[present] / count[present]).mean().item(),
            "per_class_count": [int(x) for x in count.tolist()],
            "per_class_correct": [int(x) for x in correct.tolist()],
        }


class MIoUEvaluator(Evaluator):
    """Semantic segmentation: mean intersection-over-union from a confusion matrix.

    ``outputs["logits"]`` (B, C, H, W) against ``batch["mask"]`` (B, H, W) of class ids; pixels
    equal to ``ignore_index`` do not count (padding of full-resolution batches carries it).
    IoU of class c = TP / (TP + FP + FN). ``miou`` is the mean over the classes present in the
    target or the prediction, which is torchmetrics' ``MulticlassJaccardIndex(average="macro",
    ignore_index=...)`` (it drops classes with TP + FP + FN = 0). ``per_class_iou`` (list, None
    for a class absent from both), ``pixel_acc``. After ``compute()``, ``total_confusion`` (C, C;
    rows: true class, columns: predicted) holds the reduced counts, for the confusion plot.
    """

    primary = "miou"
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion: Tensor | None = None  # (C, C): rows target, columns prediction
        self.total_confusion: Tensor | None = None  # (C, C), reduced by compute()

    def update(self, batch: dict, outputs: dict) -> None:
        pred = outputs["logits"].argmax(1).flatten()  # (B*H*W,)
        target = batch["mask"].flatten()
        keep = target != self.ignore_index
        c = self.num_classes
        target, pred = target[keep].long(), pred[keep]
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise DataError(
                f"the mask holds class id {int(target.max() if target.max() >= c else target.min())}, outside the "
                f"{c} classes 0..{c - 1} and not the ignore index {self.ignore_index}: check data.ignore_index "
                "and the class list"
            )
        cm = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c).double()
        self.confusion = cm if self.confusion is None else self.confusion + cm

    def compute(self) -> dict:
        c = self.num_classes
        cm = self.confusion if self.confusion is not None else torch.zeros(c, c, dtype=torch.float64)
        cm = all_reduce_sum(cm.clone()).cpu()
        self.total_confusion = cm.long()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        if cm.sum() == 0:
            return {}
        present = union > 0
        iou = tp / union.clamp_min(1)
        return {
            "miou": iou[present].mean().item(),
            "pixel_acc": (tp.sum() / cm.sum()).item(),
            "per_class_iou": [v if p else None for v, p in zip(iou.tolist(), present.tolist())],
        }


def align_least_squares(pred: Tensor, target: Tensor, mask: Tensor, mode: str = "scale_shift") -> Tensor:
    """``pred`` (B, ...) aligned per image to ``target`` over ``mask``: s * pred + t by least squares.

    ``mode`` "scale_shift" (MiDaS, closed form of the 2x2 normal equations), "scale" (t = 0), or
    "none". An image whose prediction is constant over its valid pixels gets s = 0 and t = the
    target's mean there (still the least-squares fit).
    """
    if mode == "none":
        return pred
    if mode not in DEPTH_ALIGN:
        raise ConfigError(f"depth alignment {mode!r} is not one of {', '.join(DEPTH_ALIGN)}")
    b = pred.shape[0]
    p, g, m = pred.reshape(b, -1), target.reshape(b, -1).to(pred.dtype), mask.reshape(b, -1).to(pred.dtype)
    a00, b0 = (m * p * p).sum(1), (m * p * g).sum(1)
    if mode == "scale":
        s = b0 / a00.clamp_min(1e-12)
        return (s[:, None] * p).reshape(pred.shape)
    a01, a11, b1 = (m * p).sum(1), m.sum(1), (m * g).sum(1)
    det = a00 * a11 - a01 * a01
    ok = det > 1e-12 * a11.clamp_min(1) ** 2
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.zeros_like(det))
    t = torch.where(ok, (a00 * b1 - a01 * b0) / safe, b1 / a11.clamp_min(1))
    return (s[:, None] * p + t[:, None]).reshape(pred.shape)


DEPTH_ALIGN = ("scale_shift", "scale", "none")


class DepthEvaluator(Evaluator):
    """Depth: ``absrel`` (mean |pred - gt| / gt), ``rmse`` (metres), ``delta1`` (share of pixels
    with max(pred / gt, gt / pred) < 1.25), each per image over its valid pixels (gt > 0), then
    averaged over images (Eigen et al.'s protocol, as BTS and AdaBins report them).

    ``outputs["depth"]`` (B, 1, H, W) or (B, H, W) against ``batch["depth"]`` (B, H, W) in
    metres. ``align``: a model trained scale-and-shift-invariantly predicts depth only up to an
    affine map, so its prediction is first fitted per image by least squares ("scale_shift",
    MiDaS's evaluation) or by scale alone ("scale"); "none" takes it as metres. ``space``
    "disparity" when the model predicts inverse depth (MiDaS): the alignment fits the target's
    disparity 1 / gt, and the aligned disparity, floored at 1 / ``max_depth`` (default: each
    image's largest valid depth), is inverted back to depth. Primary: ``absrel`` (lower is better).
    """

    primary = "absrel"
    higher_is_better = False

    def __init__(self, align: str = "none", space: str = "depth", max_depth: float | None = None):
        if align not in DEPTH_ALIGN:
            raise ConfigError(f"depth alignment {align!r} is not one of {', '.join(DEPTH_ALIGN)}")
        if space not in ("depth", "disparity"):
            raise ConfigError(f"depth space {space!r} is not one of depth, disparity")
        self.align, self.space, self.max_depth = align, space, max_depth
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # absrel, rmse, delta1 per-image sums; images

    def update(self, batch: dict, outputs: dict) -> None:
        gt = batch["depth"].detach().double()
        b = gt.shape[0]
        gt = gt.reshape(b, -1)
        pred = outputs["depth"].detach().double().reshape(b, -1)
        valid = gt > 0
        if self.space == "disparity":
            cap = gt.amax(1, keepdim=True) if self.max_depth is None else torch.full_like(gt[:, :1], self.max_depth)
            disp = align_least_squares(pred, torch.where(valid, 1 / gt.clamp_min(1e-12), 0.0), valid, self.align)
            pred = 1 / torch.maximum(disp, 1 / cap.clamp_min(1e-12))
        else:
            pred = align_least_squares(pred, gt, valid, self.align)
        n = valid.sum(1)
        has = n > 0
        gt_safe, pos = gt.clamp_min(1e-12), pred.clamp_min(1e-12)
        absrel = (((pred - gt).abs() / gt_safe) * valid).sum(1) / n.clamp_min(1)
        rmse = (((pred - gt).square() * valid).sum(1) / n.clamp_min(1)).sqrt()
        ratio = torch.maximum(pos / gt_safe, gt_safe / pos)
        delta1 = ((ratio < 1.25) & valid).sum(1) / n.clamp_min(1)
        stats = torch.stack([absrel[has].sum(), rmse[has].sum(), delta1[has].sum(), has.sum().double()])
        self.sums = self.sums.to(stats.device) + stats

    def compute(self) -> dict[str, float]:
        packed = all_reduce_sum(self.sums.clone()).cpu()
        if packed[3] == 0:
            return {}
        return {k: (packed[i] / packed[3]).item() for i, k in enumerate(("absrel", "rmse", "delta1"))}


class KNNEvaluator(Evaluator):
    """k-nearest-neighbour classification of features against a labelled feature bank.

    ``outputs["features"]`` (B, D) of the val set against a bank set by :meth:`set_bank`
    (features of the train set, gathered from every process). Cosine similarity; the k nearest
    vote with weight ``exp(sim / temperature)`` (DINO's weighted k-NN). Primary: ``knn_acc``.
    """

    primary = "knn_acc"
    higher_is_better = True

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07, bank_loader=None):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.bank_loader = bank_loader
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.hits = 0.0
        self.count = 0.0

    @torch.no_grad()
    def begin(self, objective, model, prepare) -> None:
        """Build the bank from ``bank_loader`` (if given) with the model being evaluated."""
        if self.bank_loader is None:
            return
        feats, labels = [], []
        for batch in self.bank_loader:
            batch = prepare(batch)
            feats.append(objective.eval_outputs(batch, model)["features"].float())
            labels.append(batch["label"])
        self.set_bank(torch.cat(feats), torch.cat(labels))

    def set_bank(self, features: Tensor, labels: Tensor) -> None:
        """This process's bank features (N, D) and labels (N,); gathered across processes here."""
        if is_dist():
            parts = all_gather_object((features.detach().cpu(), labels.detach().cpu()))
            features = torch.cat([f for f, _ in parts]).to(features.device)
            labels = torch.cat([y for _, y in parts]).to(labels.device)
        self.bank = F.normalize(features.detach().float(), dim=-1)
        self.bank_labels = labels

    def predict(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B,) predicted labels."""
        if self.bank is None:
            raise RuntimeError("KNNEvaluator needs set_bank(features, labels) before update()")
        sim = F.normalize(features.float(), dim=-1) @ self.bank.T  # (B, N)
        k = min(self.k, self.bank.shape[0])
        top_sim, top_idx = sim.topk(k, dim=-1)  # (B, k)
        votes = torch.zeros(features.shape[0], self.num_classes, device=features.device)
        votes.scatter_add_(1, self.bank_labels[top_idx], (top_sim / self.temperature).exp())
        return votes.argmax(-1)

    def update(self, batch: dict, outputs: dict) -> None:
        pred = self.predict(outputs["features"].detach())
        self.hits += float((pred == batch["label"]).sum())
        self.count += float(pred.shape[0])

    def compute(self) -> dict[str, float]:
        packed = all_reduce_sum(torch.tensor([self.hits, self.count], dtype=torch.float64))
        if packed[1] == 0:
            return {}
        return {"knn_acc": (packed[0] / packed[1]).item()}
