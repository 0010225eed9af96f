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
    equal to ``ignore_index`` do not count. IoU of class c = TP / (TP + FP + FN); ``miou`` is
    the mean over classes present in the target or the prediction. Also ``pixel_acc``.
    """

    primary = "miou"
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion: Tensor | None = None  # (C, C): rows target, columns prediction

    def update(self, batch: dict, outputs: dict) -> None:
        pred = outputs["logits"].argmax(1).flatten()  # (B*H*W,)
        target = batch["mask"].flatten()
        keep = target != self.ignore_index
        c = self.num_classes
        cm = torch.bincount(target[keep].long() * c + pred[keep], minlength=c * c).reshape(c, c).double()
        self.confusion = cm if self.confusion is None else self.confusion + cm

    def compute(self) -> dict[str, float]:
        c = self.num_classes
        cm = self.confusion if self.confusion is not None else torch.zeros(c, c, dtype=torch.float64)
        cm = all_reduce_sum(cm.clone()).cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        if cm.sum() == 0:
            return {}
        present = union > 0
        return {
            "miou": (tp[present] / union[present]).mean().item(),
            "pixel_acc": (tp.sum() / cm.sum()).item(),
        }


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
