"""`explain(source, images)`: interpretation maps of a trained model as PNGs and an HTML report.

>>> from vitkit.interpret import explain
>>> explain("runs/my-run", ["cat.jpg"], methods=["rollout", "heads"], out_dir="explain")
{'out_dir': 'explain', 'index': 'explain/index.html', 'images': [...]}

:func:`render` draws one method for one image; the demo app uses it too.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image

from ..data.images import read_image
from ..errors import ConfigError, PathNotFoundError
from ..source import LoadedModel, load_model
from .capture import capture_attention, patch_grid
from .heads import head_maps, top_mass_mask
from .plots import (
    heads_figure,
    overlay_figure,
    patch_grid_figure,
    pca_figure,
    pos_embed_figure,
    save_png,
)
from .rollout import attention_rollout, fuse_heads, gradient_rollout, readout_rows, token_map
from .structure import feature_pca, pos_embed_similarity

METHODS = ("rollout", "grad-rollout", "heads", "attention", "pos-embed", "patch-grid", "pca")
# What `vitkit explain` draws when no method is named ("attention" is the demo's one-head view).
DEFAULT_METHODS = ("rollout", "grad-rollout", "heads", "pos-embed", "patch-grid", "pca")


def _check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"unknown method {', '.join(bad) or '(none)'}: choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def applicable(lm: LoadedModel, method: str) -> str | None:
    """None when ``method`` can explain this model, else the reason it cannot."""
    model = lm.model
    if method == "grad-rollout" and lm.num_classes <= 0:
        return "the model has no classifier head, so there is no class score to take gradients of"
    if method == "pos-embed":
        if getattr(model, "pos_embed", None) is None:
            return f"the model adds no position embedding to its tokens (pos_embed={getattr(model, 'pos_embed_type', 'none')!r})"
    return None


def prepare(lm: LoadedModel, image: str | os.PathLike | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file or PIL image -> (uint8 (C, H, W) as the model sees it, normalised (1, C, H, W))."""
    pil = read_image(image, lm.in_chans)
    if pil.mode not in ("RGB", "L"):
        pil = pil.convert("RGB" if lm.in_chans == 3 else "L")
    pixels = lm.transform(pil)  # (C, H, W) uint8
    return pixels, lm.normalize(pixels[None].to(lm.device))


def top_classes(lm: LoadedModel, x: torch.Tensor, k: int = 5) -> list[dict]:
    """[{"label", "index", "prob"}] of the ``k`` most probable classes of one normalised image."""
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    with torch.no_grad():
        out = lm.model(x)
    probs = out.float().softmax(-1)[0].cpu()
    top = probs.topk(min(k, probs.numel()))
    return [{"label": labels[i], "index": i, "prob": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]


def render(
    lm: LoadedModel,
    pixels: torch.Tensor,
    x: torch.Tensor,
    method: str,
    *,
    layer: int = -1,
    head: int | None = None,
    target: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    mass: float = 0.6,
) -> Figure:
    """Draw ``method`` for one image (``pixels`` as seen, ``x`` normalised (1, C, H, W)).

    layer: the last attention layer that ``rollout`` multiplies in, and the layer that
    ``heads`` / ``attention`` show. head: for ``attention``, one head (None: the head mean).
    target: the class of ``grad-rollout`` (None: the top class).
    """
    _check_methods([method])
    reason = applicable(lm, method)
    if reason:
        raise ConfigError(f"method {method!r} does not apply: {reason}")
    model = lm.model
    rows = readout_rows(model)
    if method == "rollout":
        maps = capture_attention(model, x)
        n = len(maps)
        if not -n <= layer < n:
            raise ConfigError(f"layer {layer} out of range: the model has {n} attention layers (0..{n - 1}, or negative)")
        last = layer % n
        R = attention_rollout(maps[: last + 1], head_fusion, discard_ratio)
        heat = token_map(R, maps.num_prefix_tokens, maps.grid, rows)[0]
        return overlay_figure(pixels, heat, f"rollout, layers 0-{last}, {head_fusion} of heads")
    if method == "grad-rollout":
        R, logits = gradient_rollout(model, x, target, discard_ratio)
        cls = int(logits.argmax(-1)) if target is None else int(target)
        heat = token_map(R, int(getattr(model, "num_prefix_tokens", 0)), patch_grid(model, x), rows)[0]
        return overlay_figure(pixels, heat, f"gradient rollout: {_label(lm, cls)}")
    if method in ("heads", "attention"):
        maps = capture_attention(model, x, layers=[layer])
        per_head = head_maps(maps[0], maps.num_prefix_tokens, maps.grid, rows)[0]  # (heads, H', W')
        where = f"layer {maps.layers[0]}"
        if method == "heads":
            return heads_figure(pixels, per_head, top_mass_mask(per_head, mass), f"{where}: per-head attention, "
                                f"outline = top {mass:.0%} of the mass")
        if head is None:
            heat = head_maps(fuse_heads(maps[0])[:, None], maps.num_prefix_tokens, maps.grid, rows)[0, 0]
            return overlay_figure(pixels, heat, f"{where}, mean of heads")
        if not -per_head.shape[0] <= head < per_head.shape[0]:
            raise ConfigError(f"head {head} out of range: layer {maps.layers[0]} has {per_head.shape[0]} heads")
        return overlay_figure(pixels, per_head[head], f"{where}, head {head % per_head.shape[0]}")
    if method == "pos-embed":
        return pos_embed_figure(pos_embed_similarity(model))
    if method == "patch-grid":
        return patch_grid_figure(pixels, patch_grid(model, x))
    return pca_figure(pixels, feature_pca(model, x)[0])


def _label(lm: LoadedModel, index: int) -> str:
    return lm.labels[index] if lm.labels else str(index)


def explain(
    source: str | os.PathLike | LoadedModel,
    images: Sequence[str | os.PathLike],
    methods: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "explain",
    *,
    topk: int = 5,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    mass: float = 0.6,
) -> dict:
    """Write PNG maps and ``index.html`` (each image beside its top-``topk`` prediction) to ``out_dir``.

    methods: any of :data:`METHODS`; None draws :data:`DEFAULT_METHODS`, skipping (with the
    reason in the report) those that do not apply to the model. A method named explicitly
    that does not apply is an error.

    Returns the report: ``{"out_dir", "index", "model", "skipped": {method: reason},
    "images": [{"path", "top", "maps": {method: png}}]}`` (also written as ``report.json``).
    """
    explicit = methods is not None
    methods = _check_methods(list(methods) if explicit else list(DEFAULT_METHODS))
    if not images:
        raise ConfigError("name at least one image to explain")
    for image in images:
        if not Path(image).is_file():
            raise PathNotFoundError(f"no such file: image {image}")
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    skipped = {m: r for m in methods if (r := applicable(lm, m))}
    if skipped and explicit:
        m, r = next(iter(skipped.items()))
        raise ConfigError(f"method {m!r} does not apply to {lm.weights}: {r}")
    run = [m for m in methods if m not in skipped]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_maps = {}
    if "pos-embed" in run:
        model_maps["pos-embed"] = save_png(pos_embed_figure(pos_embed_similarity(lm.model)), out / "pos_embed.png").name
    results = []
    for i, image in enumerate(images):
        pixels, x = prepare(lm, image)
        stem = f"{i:03d}_{Path(image).stem}"
        Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy()).save(out / f"{stem}_input.png")
        entry = {"path": str(image), "input": f"{stem}_input.png", "top": top_classes(lm, x, topk), "maps": {}}
        for m in run:
            if m == "pos-embed":
                continue
            fig = render(lm, pixels, x, m, head_fusion=head_fusion, discard_ratio=discard_ratio, mass=mass)
            entry["maps"][m] = save_png(fig, out / f"{stem}_{m}.png").name
        results.append(entry)
    report = {
        "out_dir": str(out),
        "index": str(out / "index.html"),
        "model": str(lm.weights),
        "methods": run,
        "skipped": skipped,
        "model_maps": model_maps,
        "images": results,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "index.html").write_text(_html(report))
    return report


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "section{border-top:1px solid #ccc;padding:1em 0}"
    ".row{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}"
    "table{border-collapse:collapse}td{padding:2px 8px}td.p{text-align:right;font-variant-numeric:tabular-nums}"
    "figure{margin:0}figcaption{font-size:.85em;color:#555}img.input{width:160px;image-rendering:pixelated}"
)


def _html(report: dict) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>vitkit explain</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>vitkit explain</h1><p>model: <code>{e(report['model'])}</code></p>",
    ]
    if report["skipped"]:
        items = "".join(f"<li><b>{e(m)}</b>: {e(r)}</li>" for m, r in report["skipped"].items())
        parts.append(f"<p>not drawn for this model:</p><ul>{items}</ul>")
    for m, png in report["model_maps"].items():
        parts.append(f"<section><h2>{e(m)}</h2><img src='{e(png)}' alt='{e(m)}'></section>")
    for entry in report["images"]:
        rows = "".join(
            f"<tr><td>{e(t['label'])}</td><td class='p'>{t['prob']:.1%}</td></tr>" for t in entry["top"]
        )
        figs = "".join(
            f"<figure><img src='{e(png)}' alt='{e(m)}'><figcaption>{e(m)}</figcaption></figure>"
            for m, png in entry["maps"].items()
        )
        parts.append(
            f"<section><h2>{e(entry['path'])}</h2><div class='row'>"
            f"<figure><img class='input' src='{e(entry['input'])}' alt='input'><figcaption>as the model sees it"
            f"</figcaption></figure><table class='prediction'><tr><th>class</th><th>prob</th></tr>{rows}</table>"
            f"</div><div class='row'>{figs}</div></section>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
