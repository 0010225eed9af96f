"""`predict(source, images)`: class probabilities for images, from a run dir, a weights file or any
source :func:`vitkit.load_model` accepts; for a segmentation or depth model, mask and depth files;
for a detector, boxes (in the image's own pixels) and a PNG with them drawn.

>>> from vitkit.predict import predict
>>> predict("runs/my-run", ["cat.jpg"], topk=3)
[{'path': 'cat.jpg', 'top': [{'label': 'cat', 'prob': 0.91}, ...]}]
>>> predict("runs/my-segmentation-run", ["street.jpg"], out_dir="out")[0]["overlay"]
'out/street_overlay.png'
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import read_image
from .errors import ConfigError, PathNotFoundError
from .source import LoadedModel, check_task, load_model

__all__ = ["LoadedModel", "explain_queries", "load_model", "predict", "predict_dense", "predict_detect", "read_image"]


def predict(
    source: str | os.PathLike | LoadedModel,
    images: list[str | os.PathLike | Image.Image],
    *,
    topk: int = 5,
    batch_size: int = 64,
    out_dir: str | os.PathLike | None = None,
    task: str | None = None,
    threshold: float = 0.3,
) -> list[dict]:
    """Top-``topk`` class probabilities for each image; a dense model's files (see :func:`predict_dense`);
    a detector's boxes scoring at least ``threshold`` (see :func:`predict_detect`).

    Args:
        source: anything :func:`vitkit.load_model` accepts, or a
            :class:`LoadedModel` to reuse across calls.
        images: file paths or PIL images.
        topk: how many classes to return per image (at most the model's class count).
        out_dir: where a dense model's files go (default: the current folder).
        task: the task the caller expects (``--task``); it must be the model's.

    Returns:
        ``[{"path": str or None, "top": [{"label": str, "prob": float}, ...]}, ...]`` in input
        order, most probable first. Labels are the class names the model was trained with,
        or class indices as strings when it carries none.
    """
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    check_task(lm, task)
    for image in images:
        if not isinstance(image, Image.Image) and not Path(image).is_file():
            raise PathNotFoundError(f"no such file: image {image}")
    if lm.is_dense:
        return predict_dense(lm, images, out_dir=out_dir)
    if lm.is_detect:
        return predict_detect(lm, images, out_dir=out_dir, threshold=threshold)
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    k = min(topk, lm.num_classes)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([lm.transform(read_image(im, lm.in_chans)) for im in chunk])  # (B, C, H, W) uint8
        probs = lm.logits(batch).softmax(-1).cpu()  # (B, num_classes)
        top = probs.topk(k, dim=-1)
        for im, p, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            path = (getattr(im, "filename", "") or None) if isinstance(im, Image.Image) else str(im)
            results.append({"path": path, "top": [{"label": labels[i], "prob": v} for i, v in zip(idx, p)]})
    return results


def _stem(image, k: int) -> str:
    name = getattr(image, "filename", "") if isinstance(image, Image.Image) else str(image)
    return Path(name).stem if name else f"image{k}"


def predict_dense(lm: LoadedModel, images: list[str | os.PathLike | Image.Image], *,
                  out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Per-pixel predictions of a segmentation or depth model, written as image files into ``out_dir``.

    Segmentation: ``<name>_mask.png`` (palette PNG whose values are the class ids) and
    ``<name>_overlay.png`` (the image blended with the class colours); each result also has
    ``"classes"``: class name -> share of the image's pixels, largest first. Depth from a metric
    model (``objective.loss=silog``): ``<name>_depth.png`` (16-bit, millimetres) with
    ``"depth_min"``/``"depth_max"`` in metres; from a scale-and-shift-invariant one (MiDaS's, the
    default): ``<name>_disparity.png`` (16-bit relative inverse depth, the largest value = nearest);
    both with ``<name>_depth_color.png`` (near = warm). Each image is predicted at its own size.
    """
    from .dense.plots import depth_colour, depth_png, mask_image, overlay

    out = Path(out_dir) if out_dir is not None else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    space = depth_space(lm) if lm.task == "depth" else None
    results = []
    for k, image in enumerate(images):
        pil = read_image(image, lm.in_chans)
        pred = lm.dense(lm.transform(pil)[None])[0].cpu()  # (K, H, W) logits, or (1, H, W) depth
        stem = _stem(image, k)
        path = (getattr(image, "filename", "") or None) if isinstance(image, Image.Image) else str(image)
        if lm.task == "segment":
            mask = pred.argmax(0).numpy()  # (H, W) class ids
            mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
            mask_image(mask, lm.num_classes).save(mask_path)
            overlay(pil, mask, lm.num_classes).save(overlay_path)
            share = torch.bincount(torch.from_numpy(mask).flatten(), minlength=lm.num_classes).double() / mask.size
            classes = {labels[i]: float(share[i]) for i in share.argsort(descending=True).tolist() if share[i] > 0}
            results.append({"path": path, "mask": str(mask_path), "overlay": str(overlay_path), "classes": classes})
        elif space == "depth":
            depth = pred[0].numpy()  # (H, W) metres
            depth_path, colour_path = out / f"{stem}_depth.png", out / f"{stem}_depth_color.png"
            depth_png(depth, depth_path)
            depth_colour(depth).save(colour_path)
            results.append({"path": path, "space": space, "depth": str(depth_path), "depth_color": str(colour_path),
                            "depth_min": float(depth.min()), "depth_max": float(depth.max())})
        else:
            disp = pred[0].clamp_min(0).numpy()  # (H, W) inverse depth up to an unknown scale and shift
            disp_path, colour_path = out / f"{stem}_disparity.png", out / f"{stem}_depth_color.png"
            Image.fromarray((disp / max(float(disp.max()), 1e-12) * 65535).round().astype(np.uint16)).save(disp_path)
            depth_colour(disp, cmap="turbo").save(colour_path)
            results.append({"path": path, "space": space, "depth": str(disp_path), "depth_color": str(colour_path)})
    return results


def depth_space(lm: LoadedModel) -> str:
    """What a depth model outputs: "depth" (metres; trained with silog) or "disparity" (relative inverse
    depth; MiDaS's scale-and-shift-invariant loss, the default)."""
    from .objectives.dense import DepthConfig

    section = lm.config.get("objective") or {}
    loss = section.get("loss", DepthConfig.loss) if section.get("name") == "depth" else DepthConfig.loss
    space = section.get("space") if section.get("name") == "depth" else None
    return space or ("disparity" if loss == "ssi" else "depth")


def _original_frame(det: dict, orig: tuple[int, int], seen: tuple[int, int]) -> np.ndarray:
    """Boxes (N, 4) xyxy in the pixels the model saw -> the original image's pixels (per axis)."""
    sy, sx = orig[0] / seen[0], orig[1] / seen[1]
    boxes = det["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


def predict_detect(lm: LoadedModel, images: list[str | os.PathLike | Image.Image], *,
                   out_dir: str | os.PathLike | None = None, threshold: float = 0.3, top_k: int = 100) -> list[dict]:
    """A detector's boxes for each image, and ``<name>_boxes.png`` (boxes, class names and scores drawn).

    Each image is resized keeping its aspect as in training; the boxes come back in the original
    image's pixels. Returns per image ``{"path", "boxes_png", "detections": [{"label", "class_id",
    "score", "box": [x0, y0, x1, y1]}, ...]}``, best first, scores >= ``threshold``.
    """
    from .detect.plots import draw_detections

    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    out = Path(out_dir) if out_dir is not None else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    results = []
    for k, image in enumerate(images):
        pil = read_image(image, 3)
        x = lm.transform(pil)  # (3, h, w) uint8, long side as trained
        det = lm.detect(x[None], top_k=top_k)[0]
        boxes = _original_frame(det, (pil.height, pil.width), tuple(x.shape[-2:]))
        scores = det["scores"].float().cpu().numpy()
        ids = det["labels"].long().cpu().numpy()
        keep = np.flatnonzero(scores >= threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        png = out / f"{_stem(image, k)}_boxes.png"
        draw_detections(pil, boxes[keep], ids[keep], scores[keep], labels).save(png)
        path = (getattr(image, "filename", "") or None) if isinstance(image, Image.Image) else str(image)
        dets = [{"label": labels[int(ids[i])] if 0 <= ids[i] < len(labels) else str(int(ids[i])),
                 "class_id": int(ids[i]), "score": round(float(scores[i]), 4),
                 "box": [round(float(v), 2) for v in boxes[i]]} for i in keep]
        results.append({"path": path, "boxes_png": str(png), "detections": dets})
    return results


def has_query_attention(lm: LoadedModel) -> bool:
    """Whether the detector returns its decoder cross-attention (``forward(..., return_attention=True)``: DETR)."""
    import inspect

    return lm.is_detect and "return_attention" in inspect.signature(lm.model.forward).parameters


def explain_queries(lm: LoadedModel, images: list[str | os.PathLike | Image.Image], out_dir: str | os.PathLike,
                    queries: int = 6) -> list[dict]:
    """Where each of a DETR run's ``queries`` best queries looks: its last decoder layer's cross-attention
    (averaged over heads) over the image, with its box, class and score, as ``<name>_queries.png``.

    Raises:
        ConfigError: the model is not a detector that returns its cross-attention.
    """
    from .detect.boxes import box_cxcywh_to_xyxy
    from .detect.plots import query_attention_figure
    from .objectives.detect import pixel_mask

    name = getattr(lm.model, "detector_name", type(lm.model).__name__)
    if not has_query_attention(lm):
        raise ConfigError(
            f"{name} does not return decoder cross-attention: vitkit explain shows each query's cross-attention for "
            "DETR runs (model.head=detr). See this model's boxes with vitkit predict RUN IMAGE"
        )
    if queries < 1:
        raise ConfigError(f"queries must be >= 1, got {queries}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    results = []
    for k, image in enumerate(images):
        pil = read_image(image, 3)
        x = lm.transform(pil)[None]
        h, w = x.shape[-2:]
        with torch.no_grad():
            xn = lm.normalize(x.to(lm.device))
            outputs = lm.model(xn, pixel_mask(xn, None), return_attention=True)
        attn = outputs["cross_attention"].float()
        if attn.ndim == 4:  # (B, heads, Q, h*w): average the heads
            attn = attn.mean(1)
        fh, fw = outputs["feature_size"]
        logits = outputs["pred_logits"][0].float()
        # DETR: softmax with the last class "no object"; a sigmoid (focal) model has no such class.
        probs = logits.softmax(-1)[:, :-1] if logits.shape[-1] == lm.num_classes + 1 else logits.sigmoid()
        scores, ids = probs.max(-1)
        top = scores.argsort(descending=True)[:queries].tolist()
        xyxy = box_cxcywh_to_xyxy(outputs["pred_boxes"][0].float().cpu()).numpy()
        # Boxes are normalised to the real image; the attention grid covers the padded input.
        boxes = xyxy[top] * np.array([pil.width, pil.height, pil.width, pil.height], dtype=np.float32)
        maps = attn[0, top].reshape(len(top), fh, fw).cpu().numpy()
        s = lm.model.stride if getattr(lm.model, "stride", None) else 1
        ph, pw = -(-h // s) * s, -(-w // s) * s  # the padded input the grid covers
        gh, gw = max(1, round(fh * h / ph)), max(1, round(fw * w / pw))
        maps = maps[:, :gh, :gw]
        titles = [f"query {q}: {labels[int(ids[q])]} {float(scores[q]):.2f}" for q in top]
        png = query_attention_figure(pil, maps, boxes, titles, out / f"{_stem(image, k)}_queries.png")
        path = (getattr(image, "filename", "") or None) if isinstance(image, Image.Image) else str(image)
        results.append({"path": path, "queries_png": str(png),
                        "queries": [{"query": q, "label": labels[int(ids[q])], "score": round(float(scores[q]), 4)}
                                    for q in top]})
    return results
