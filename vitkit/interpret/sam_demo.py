"""The demo for a promptable-segmentation (SAM) model: click on the image, see the mask.

Each click adds a point (foreground or background, as chosen) and the mask of all the points so
far is drawn over the image; "Reset clicks" starts again. The image is encoded once when it is
uploaded; every click runs only the prompt encoder and the mask decoder.
"""

# No `from __future__ import annotations`: gradio reads the click handler's `gr.SelectData` annotation as an
# object, and a string naming the function-local `gr` would not resolve.
import hashlib
from collections.abc import Sequence

import numpy as np

from ..errors import VitkitError
from ..sam.predictor import SamPredictor
from ..segment import draw_masks


class ClickSegmenter:
    """The click-to-mask step of the demo, usable without a browser: keeps the predictor's embedding for the
    image last seen and turns a list of clicks into the overlay of the best mask."""

    def __init__(self, model):
        self.predictor = SamPredictor(model)
        self._key: str | None = None

    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` (uint8 (H, W, 3)) unless it is the one already encoded."""
        image = np.ascontiguousarray(image)
        key = hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)
        if key != self._key:
            self.predictor.set_image(image)
            self._key = key

    def overlay(self, image: np.ndarray, clicks: Sequence[tuple[float, float, int]]) -> tuple[np.ndarray, str]:
        """``clicks``: (x, y, label) with label 1 foreground, 0 background -> (the image with the best mask and
        the clicks drawn, a one-line description). One click asks for three masks (it is ambiguous) and shows the
        one with the highest predicted IoU; more clicks ask for one mask."""
        self.set_image(image)
        points = np.asarray([c[:2] for c in clicks], dtype=np.float64).reshape(-1, 2)
        labels = np.asarray([int(c[2]) for c in clicks], dtype=np.int64)
        masks, iou, _ = self.predictor.predict(points=points, labels=labels, multimask=len(clicks) == 1)
        best = int(np.argmax(iou))
        picture = draw_masks(image, [masks[best]], points, labels)
        text = (f"{len(clicks)} click{'s' if len(clicks) != 1 else ''}: mask of {int(masks[best].sum())} px, "
                f"predicted IoU {float(iou[best]):.3f}")
        return np.asarray(picture), text


def sam_demo(gr, model, title: str, examples: Sequence[str] = ()):
    """The Gradio Blocks app for a SAM ``model``."""
    seg = ClickSegmenter(model)

    def upload(image):
        if image is None:
            return [], None, ""
        try:
            seg.set_image(image)
        except VitkitError as e:
            raise gr.Error(str(e)) from None
        return [], None, "click on an object"

    def click(image, clicks, kind, evt: gr.SelectData):
        if image is None:
            raise gr.Error("upload an image first")
        x, y = evt.index[:2]
        clicks = [*clicks, (float(x), float(y), 1 if kind == "foreground" else 0)]
        try:
            picture, text = seg.overlay(image, clicks)
        except VitkitError as e:
            raise gr.Error(str(e)) from None
        return clicks, picture, text

    with gr.Blocks(title="vitkit segment") as demo:
        gr.Markdown(f"## vitkit: click on an object to segment it\n`{title}`")
        clicks = gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image (click on it)", elem_id="input-image")
                kind = gr.Radio(["foreground", "background"], value="foreground", label="a click adds a",
                                elem_id="click-label")
                reset = gr.Button("Reset clicks", elem_id="reset")
            with gr.Column():
                picture = gr.Image(label="mask", type="numpy", elem_id="map")
                info = gr.Textbox(label="mask", interactive=False, elem_id="prediction")
        image.upload(upload, [image], [clicks, picture, info])
        image.select(click, [image, clicks, kind], [clicks, picture, info])
        reset.click(lambda: ([], None, "click on an object"), None, [clicks, picture, info])
        if examples:
            gr.Examples(list(examples), inputs=image)
    return demo


__all__ = ["ClickSegmenter", "sam_demo"]
