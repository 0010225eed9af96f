"""`evaluate(source, data)`: accuracy, per-class accuracy and a confusion matrix on a dataset.

The model comes from a run directory, checkpoint or weights file (see :func:`vitkit.load_model`)
and sees the images exactly as in training's validation: the same resize and centre crop,
channel count and normalisation. For a run directory the split is drawn with the run's
``val_fraction`` and seed, so ``split="val"`` is the run's own validation set.

>>> from vitkit.evaluate import evaluate
>>> evaluate("runs/my-run", "/data/cifar10")["top1"]
0.83
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .engine.evaluators import AccuracyEvaluator
from .errors import ConfigError, DataError
from .objectives.supervised import TTA_MODES
from .source import LoadedModel, check_task, load_model

_CELL_COUNTS_MAX = 20  # classes up to which the plot writes counts into cells
_TICK_LABELS_MAX = 60  # classes up to which the plot names every class on the axes


def _named(names: list[str] | tuple[str, ...]) -> bool:
    """True when ``names`` are class names rather than the index strings used when a dataset has none."""
    return bool(names) and list(names) != [str(i) for i in range(len(names))]


def class_mapping(data_classes: list[str], model_labels: tuple[str, ...], num_classes: int) -> list[int] | None:
    """Map the data's class indices to the model's: ``mapping[data_index] = model_index``.

    Identity (None) when the names agree in order or either side has no names and the counts
    match; by name when every data class is one of the model's labels (in any order, or a
    subset). Raises ValueError when the two cannot be reconciled.
    """
    if _named(data_classes) and _named(model_labels):
        if list(data_classes) == list(model_labels):
            return None
        unknown = [c for c in data_classes if c not in model_labels]
        if not unknown:
            return [model_labels.index(c) for c in data_classes]
        raise DataError(
            f"the data's classes do not match the model's: {len(unknown)} of the data's {len(data_classes)} classes "
            f"are not among the model's {num_classes} labels (e.g. {unknown[:5]}; model labels: "
            f"{list(model_labels[:10])}{' ...' if len(model_labels) > 10 else ''}). Evaluate on data with the "
            "classes the model was trained on, or fine-tune it on these (vitkit train --init WEIGHTS --data PATH)"
        )
    if data_classes and len(data_classes) != num_classes:
        raise DataError(
            f"the data has {len(data_classes)} classes but the model predicts {num_classes}, and class names are "
            "missing on one side to match them by: evaluate on data with the model's classes, or fine-tune it "
            "on these (vitkit train --init WEIGHTS --data PATH)"
        )
    return None


def evaluate(
    source: str | os.PathLike | LoadedModel,
    data: str,
    *,
    batch_size: int = 256,
    split: str = "val",
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    use_ema: bool = False,
    tta: str | None = None,
    task: str | None = None,
) -> dict:
    """Evaluate a model on ``split`` of the dataset at ``data``; writes ``eval.json`` and ``confusion_matrix.png``.

    A segmentation or depth model is evaluated by :func:`evaluate_dense` (mIoU, per-class IoU and
    pixel accuracy; AbsRel, RMSE and delta1 for depth), a detector by :func:`evaluate_detect` (COCO AP).

    Args:
        source: a run directory, checkpoint directory or weights file, or a loaded model.
        data: any dataset ``vitkit.data.build_dataset`` reads (``shapes``, a folder tree, CIFAR, ...).
        split: "val" or "train".
        num_workers: loader processes; None uses min(4, CPU count).
        out_dir: where the results go; default the run directory, or the folder of the weights file.
        use_ema: evaluate the run's EMA weights.
        tta: "none", or "hflip" to average the logits of each image and its mirror image; None: as
            the run evaluated (its ``objective.tta``), so the score matches the run's own.
        task: the task the data is read as (``--task``); it must be the model's (None: the model's).

    Returns:
        ``{"top1", "top5"}`` (fractions; top-5 is top-k with k = min(5, classes)), ``"n"`` (images),
        ``"per_class"`` (class name -> accuracy, for the classes present in the data),
        ``"balanced_acc"`` (the mean of ``per_class``: every class counts the same, whatever its size),
        ``"classes"`` and ``"confusion_matrix"`` (rows: true class, columns: predicted, in the
        model's class order), plus where the model, weights and outputs are.
    """
    from .data import build_dataset, build_loader

    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(f"tta={tta!r} is not one of {', '.join(TTA_MODES)}")
    lm = source if isinstance(source, LoadedModel) else load_model(source, use_ema=use_ema)
    check_task(lm, task)
    if tta is None:
        run_tta = (lm.config.get("objective") or {}).get("tta") if lm.task == "classify" else None
        tta = run_tta if run_tta in TTA_MODES else "none"
    if lm.is_dense:
        if tta != "none":
            raise ConfigError(f"tta={tta!r} is for classifiers; a {lm.task} model is evaluated without it")
        # Full-resolution images: a classifier's batch of 256 would hold hundreds of feature maps at once.
        return evaluate_dense(lm, data, batch_size=min(batch_size, 16), split=split, num_workers=num_workers,
                              out_dir=out_dir)
    if lm.is_detect:
        if tta != "none":
            raise ConfigError(f"tta={tta!r} is for classifiers; a detector is evaluated without it")
        return evaluate_detect(lm, data, batch_size=min(batch_size, 16), split=split, num_workers=num_workers,
                               out_dir=out_dir)
    s = lm.settings
    ds = build_dataset(
        data, split, val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0), in_chans=lm.in_chans,
        max_bad_fraction=s.get("max_bad_fraction", 0.05),
    )
    data_classes = [str(c) for c in getattr(ds, "classes", None) or []]
    k = lm.num_classes
    mapping = class_mapping(data_classes, lm.labels, k)
    classes = list(lm.labels) or (data_classes if len(data_classes) == k else [str(i) for i in range(k)])
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    loader = build_loader(
        ds, batch_size, train=False, transform=lm.transform, num_workers=workers,
        max_bad_fraction=s.get("max_bad_fraction", 0.05),
    )
    remap = torch.tensor(mapping) if mapping is not None else None
    acc = AccuracyEvaluator(k)
    for batch in loader:
        labels = batch["label"] if remap is None else remap[batch["label"]]  # (B,) in the model's classes
        if int(labels.max()) >= k:
            raise DataError(f"the data has label {int(labels.max())} but the model predicts only {k} classes")
        logits = lm.logits(batch["image"]).cpu()  # (B, k)
        if tta == "hflip":
            logits = 0.5 * (logits + lm.logits(batch["image"].flip(-1)).cpu())
        acc.update({"label": labels}, {"logits": logits})
    m = acc.compute()
    if not m:
        raise DataError(f"split {split!r} of {data} has no images to evaluate")
    cm = acc.total_confusion.numpy()
    per_class = {classes[i]: correct / count for i, (count, correct)
                 in enumerate(zip(m["per_class_count"], m["per_class_correct"])) if count > 0}
    result = {
        "top1": m["acc1"],
        "top5": m["acc5"],
        "balanced_acc": m["balanced_acc"],
        "n": int(cm.sum()),
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        "model": getattr(lm.model, "model_name", ""),
        "weights": str(lm.weights) if lm.weights is not None else None,
        "data": str(data),
        "split": split,
        "tta": tta,
        "classes_matched_by_name": mapping is not None,
    }
    out = Path(out_dir) if out_dir is not None else lm.home
    out.mkdir(parents=True, exist_ok=True)
    result["eval_json"] = str(out / "eval.json")
    result["confusion_png"] = str(out / "confusion_matrix.png")
    plot_confusion(cm, classes, out / "confusion_matrix.png", title=f"{Path(str(data)).name} ({split}), top-1 "
                   f"{result['top1']:.1%}")
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | os.PathLike, title: str = "",
                   cells: str = "counts") -> Path:
    """Save a confusion matrix plot: colours are row-normalised (fraction of each true class),
    cells show counts (``cells="fractions"``: the row fractions, for pixel counts) for up to 20
    classes; rows for classes absent from the data stay blank."""
    # A bare Figure renders with Agg and leaves pyplot's backend (a notebook's) alone.
    from matplotlib.figure import Figure

    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.45 * k, 40)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= _TICK_LABELS_MAX:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), classes)
    if k <= _CELL_COUNTS_MAX:
        for i in range(k):
            for j in range(k):
                if rows[i, 0]:
                    text = f"{frac[i, j]:.2f}".lstrip("0") if cells == "fractions" else str(cm[i, j])
                    ax.text(j, i, text, ha="center", va="center",
                            color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _dense_dataset(lm: LoadedModel, data: str, split: str):
    from .data.dense import build_dense_dataset

    s, run_data = lm.settings, (lm.config.get("data") or {})
    # The run's ignore value holds for the data it was trained on; other data keep their format's own.
    same = str(run_data.get("path", "")).rstrip("/") == str(data).rstrip("/")
    return build_dense_dataset(
        data, lm.task, split, val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0), in_chans=lm.in_chans,
        ignore_index=s.get("ignore_index") if same else None, max_bad_fraction=s.get("max_bad_fraction", 0.05),
    )


def dense_objective(lm: LoadedModel, ignore_index: int = 255):
    """The run's ``segment``/``depth`` objective around ``lm.model``, for its evaluation path (sliding
    windows, depth alignment and space as trained); class weights are a training matter and left out."""
    from .objectives import build_objective

    section = {k: v for k, v in (lm.config.get("objective") or {}).items() if k not in ("name", "references")}
    if (lm.config.get("objective") or {}).get("name") != lm.task:
        section = {}
    if lm.task == "segment":
        section["class_weights"] = "none"
    return build_objective(lm.task, lm.model, section, num_classes=lm.num_classes, ignore_index=ignore_index)


def evaluate_dense(lm: LoadedModel, data: str, *, batch_size: int = 8, split: str = "val",
                   num_workers: int | None = None, out_dir: str | os.PathLike | None = None) -> dict:
    """A segmentation model's mIoU, per-class IoU and pixel accuracy (with a confusion-matrix plot in the run's
    ``plots/``), or a depth model's AbsRel, RMSE and delta1, on ``split`` of ``data`` at full resolution.

    Each image is predicted at its own size, in sliding windows when the run evaluated so.
    Returns ``{"task", "n" (images), ...metrics, "model", "weights", "data", "split", "eval_json"}``;
    segmentation adds ``"per_class_iou"`` (class name -> IoU, None for a class absent from both
    the masks and the predictions), ``"classes"``, ``"confusion_matrix"`` (pixels; rows: true
    class) and ``"confusion_png"``.
    """
    from .data import build_loader
    from .data.joint import JointEvalTransform
    from .rundir import RunDir

    ds = _dense_dataset(lm, data, split)
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    loader = build_loader(ds, batch_size, train=False, transform=JointEvalTransform(lm.in_chans),
                          num_workers=workers, max_bad_fraction=lm.settings.get("max_bad_fraction", 0.05))
    k = lm.num_classes
    segment = lm.task == "segment"
    ignore = int(getattr(ds, "ignore_index", 255))
    if segment:
        data_classes = [str(c) for c in getattr(ds, "classes", None) or []]
        mapping = class_mapping(data_classes, lm.labels, k)
        classes = list(lm.labels) or (data_classes if len(data_classes) == k else [str(i) for i in range(k)])
        lut = torch.arange(256)
        if mapping is not None:
            lut[: len(mapping)] = torch.tensor(mapping)
    objective = dense_objective(lm, ignore).to(lm.device)
    metric = objective.evaluator()
    n = 0
    for batch in loader:
        n += len(batch["image"])
        if segment and mapping is not None:
            batch["mask"] = lut[batch["mask"].long()]
        batch = {key: v.to(lm.device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        batch["image"] = lm.normalize(batch["image"])
        metric.update(batch, objective.eval_outputs(batch, lm.model))
    m = metric.compute()
    if not m:
        raise DataError(f"split {split!r} of {data} has no labelled pixels to evaluate")
    result = {"task": lm.task, "n": n, **{key: v for key, v in m.items() if isinstance(v, (int, float))}}
    out = Path(out_dir) if out_dir is not None else lm.home
    out.mkdir(parents=True, exist_ok=True)
    if segment:
        cm = metric.total_confusion.cpu().numpy().astype(np.int64)
        result.update({
            "per_class_iou": dict(zip(classes, m["per_class_iou"])), "classes": classes, "ignore_index": ignore,
            "confusion_matrix": cm.tolist(), "pixels": int(cm.sum()), "classes_matched_by_name": mapping is not None,
        })
        plots = Path(out_dir) if out_dir is not None else (RunDir(lm.run_dir).plots if lm.run_dir else out)
        plots.mkdir(parents=True, exist_ok=True)
        result["confusion_png"] = str(plot_confusion(
            cm, classes, plots / "confusion_matrix.png", cells="fractions",
            title=f"{Path(str(data)).name} ({split}), mIoU {result['miou']:.1%}"))
    return _write_result(result, lm, data, split, out, lm.model.model_args.get("head"))


def _write_result(result: dict, lm: LoadedModel, data: str, split: str, out: Path, head) -> dict:
    """``result`` with where the model, weights, data and outputs are, written to ``out/eval.json``."""
    result.update({
        "model": f"{lm.model.model_args.get('backbone')} + {head}",
        "weights": str(lm.weights) if lm.weights is not None else None, "data": str(data), "split": split,
        "eval_json": str(out / "eval.json"),
    })
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_detect(lm: LoadedModel, data: str, *, batch_size: int = 8, split: str = "val",
                    num_workers: int | None = None, out_dir: str | os.PathLike | None = None,
                    top_k: int = 100) -> dict:
    """A detector's COCO AP on ``split`` of detection ``data`` (COCO JSON, Pascal VOC, ``scenes``).

    Images are resized keeping their aspect as in training; detections and ground truth are
    compared in each image's original pixels by pycocotools' COCOeval (bbox). Classes are matched
    to the model's by name. Returns ``{"task": "detect", "n" (images), "ap", "ap50", "ap75",
    "ap_small", "ap_medium", "ap_large", "ar100", "per_class_ap" (class name -> AP, None for a
    class absent from the data), "model", "weights", "data", "split", "eval_json"}``.
    """
    from .data import build_loader
    from .data.boxes_tf import BoxEvalTransform
    from .data.detection import build_detection_dataset
    from .objectives.detect import Detect

    s = lm.settings
    ds = build_detection_dataset(data, split, val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0),
                                 in_chans=3, max_bad_fraction=s.get("max_bad_fraction", 0.05))
    k = lm.num_classes
    data_classes = [str(c) for c in getattr(ds, "classes", None) or []]
    mapping = class_mapping(data_classes, lm.labels, k)
    classes = list(lm.labels) or (data_classes if len(data_classes) == k else [str(i) for i in range(k)])
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    loader = build_loader(ds, batch_size, train=False, transform=BoxEvalTransform(lm.transform.size, in_chans=3),
                          num_workers=workers, max_bad_fraction=s.get("max_bad_fraction", 0.05))
    objective = Detect(lm.model, classes, top_k=top_k)
    metric = objective.evaluator()
    remap = torch.tensor(mapping) if mapping is not None else None
    n = 0
    for batch in loader:
        n += len(batch["image"])
        if remap is not None:
            batch["labels"] = [remap[lab.long()] for lab in batch["labels"]]
        batch = {key: v.to(lm.device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        batch["image"] = lm.normalize(batch["image"])
        metric.update(batch, objective.eval_outputs(batch, lm.model))
    if n == 0:
        raise DataError(f"split {split!r} of {data} has no images to evaluate")
    m = metric.compute()
    per_class = getattr(metric, "per_class_ap", None) or {}
    if not isinstance(per_class, dict):
        per_class = dict(zip(classes, per_class))
    result = {"task": "detect", "n": n, **{key: float(v) for key, v in m.items() if isinstance(v, (int, float))},
              "per_class_ap": {str(c): (None if v is None or v != v or v < 0 else float(v))
                               for c, v in per_class.items()},
              "classes": classes, "classes_matched_by_name": mapping is not None}
    out = Path(out_dir) if out_dir is not None else lm.home
    out.mkdir(parents=True, exist_ok=True)
    return _write_result(result, lm, data, split, out, lm.model.model_args.get("name"))
