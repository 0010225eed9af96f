"""A local web app: upload an image, see the top-5 classes and where the model looks; for a
segmentation run, the image overlaid with its predicted classes (a depth run: its coloured depth).

Needs the optional ``gradio`` dependency (``pip install 'vitkit[demo]'``).

>>> from vitkit.interpret.demo import build_demo
>>> build_demo("runs/my-run").launch()
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..data.images import read_image
from ..errors import ConfigError, VitkitError
from ..layers.capture import capturable_modules
from ..predict import depth_space
from ..source import LoadedModel, load_model
from .explain import applicable, prepare, render, top_classes
from .plots import to_array

# The demo's choices: one layer/head of raw attention, rollout up to a layer, the rest per image.
DEMO_METHODS = ("attention", "rollout", "grad-rollout", "heads", "pca")


def _gradio():
    # Gradio phones home for analytics unless told not to; a local demo has no reason to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("the demo needs gradio: pip install 'vitkit[demo]'") from None
    return gr


def dense_view(lm: LoadedModel, image) -> tuple[dict[str, float], np.ndarray]:
    """(class -> share of the pixels, the overlay as uint8 (H, W, 3)) for a segmentation model;
    ({}, the coloured depth) for a depth model. ``image``: a path or PIL image."""
    from ..dense.plots import depth_colour, overlay

    pil = read_image(image, lm.in_chans)
    pred = lm.dense(lm.transform(pil)[None])[0].cpu()  # (K, H, W) logits or (1, H, W) depth
    if lm.task == "depth":  # near = warm: small depth, or large disparity
        cmap = "turbo_r" if depth_space(lm) == "depth" else "turbo"
        return {}, np.asarray(depth_colour(pred[0].clamp_min(0).numpy(), cmap=cmap))
    mask = pred.argmax(0)
    share = torch.bincount(mask.flatten(), minlength=lm.num_classes).double() / mask.numel()
    labels = lm.labels or tuple(str(i) for i in range(lm.num_classes))
    shares = {labels[i]: float(share[i]) for i in range(lm.num_classes) if share[i] > 0}
    return shares, np.asarray(overlay(pil, mask.numpy(), lm.num_classes))


def _dense_demo(gr, lm: LoadedModel, examples: Sequence[str]):
    what = "segmentation" if lm.task == "segment" else "depth"

    def run(image):
        if image is None:
            return None, None
        try:
            shares, picture = dense_view(lm, image)
        except VitkitError as e:
            raise gr.Error(str(e)) from None
        return shares, picture

    with gr.Blocks(title=f"vitkit {what}") as demo:
        gr.Markdown(f"## vitkit: {what}\n`{lm.weights}`")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="input-image")
                button = gr.Button("Predict", variant="primary", elem_id="explain")
            with gr.Column():
                classes = gr.Label(num_top_classes=10, label="share of the pixels", elem_id="prediction",
                                   visible=lm.task == "segment")
                picture = gr.Image(label="overlay" if lm.task == "segment" else "depth (near = warm)", type="numpy",
                                   elem_id="map")
        button.click(run, [image], [classes, picture])
        image.upload(run, [image], [classes, picture])
        if examples:
            gr.Examples(list(examples), inputs=image)
    return demo


def build_demo(source, examples: Sequence[str] = ()):
    """The Gradio Blocks app for a run directory, weights file or :class:`LoadedModel`.

    A segmentation run shows the image overlaid with its predicted classes and each class's
    share of the pixels; a depth run shows the coloured depth map; a promptable-segmentation (SAM)
    run or weights file (or a loaded SAM model) shows the mask of the points clicked on the image.
    """
    from ..segment import is_sam_source, load_sam_source
    from .sam_demo import sam_demo

    gr = _gradio()
    if hasattr(source, "encode_image"):  # a SAM model already loaded
        return sam_demo(gr, source, type(source).__name__, examples)
    if is_sam_source(source):
        return sam_demo(gr, load_sam_source(source), str(source), examples)
    lm = source if isinstance(source, LoadedModel) else load_model(source)
    if lm.is_dense:
        return _dense_demo(gr, lm, examples)
    if lm.is_detect:
        raise ConfigError(
            "the demo shows classifiers and segmentation or depth models; for a detector, vitkit predict RUN IMAGE "
            "draws its boxes, labels and scores into a PNG"
        )
    layers = capturable_modules(lm.model)
    if not layers:
        raise ConfigError(f"{type(lm.model).__name__} has no attention layers to show")
    num_heads = getattr(layers[-1], "num_heads", 1)
    methods = [m for m in DEMO_METHODS if applicable(lm, m) is None]

    def run(image, method, layer, head):
        if image is None:
            return None, None
        try:
            pixels, x = prepare(lm, image)
            top = {t["label"]: t["prob"] for t in top_classes(lm, x, 5)}
            fig = render(lm, pixels, x, method, layer=int(layer), head=None if head == "mean" else int(head))
        except VitkitError as e:
            raise gr.Error(str(e)) from None  # shown in the page, not as a server traceback
        return top, to_array(fig)

    with gr.Blocks(title="vitkit explain") as demo:
        gr.Markdown(f"## vitkit: where does the model look?\n`{lm.weights}`")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="input-image")
                method = gr.Dropdown(methods, value="rollout", label="method", elem_id="method")
                layer = gr.Slider(0, len(layers) - 1, value=len(layers) - 1, step=1, label="layer", elem_id="layer")
                head = gr.Dropdown(["mean"] + [str(h) for h in range(num_heads)], value="mean", label="head",
                                   elem_id="head")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column():
                prediction = gr.Label(num_top_classes=5, label="top-5", elem_id="prediction")
                heat = gr.Image(label="map", type="numpy", elem_id="map")
        button.click(run, [image, method, layer, head], [prediction, heat])
        image.upload(run, [image, method, layer, head], [prediction, heat])
        if examples:
            gr.Examples(list(examples), inputs=image)
    return demo


def launch_demo(source, host: str = "127.0.0.1", port: int | None = None, examples: Sequence[str] = (), block=True):
    """Build and serve the app on ``host:port`` (loopback by default); returns the app."""
    demo = build_demo(source, examples)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block)
    return demo
