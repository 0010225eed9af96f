"""The interface every detector implements, so one objective, evaluator and CLI serve them all."""

from __future__ import annotations

from torch import Tensor, nn


class Detector(nn.Module):
    """Base of the registered detectors (DETR, Deformable DETR, YOLOS, the ViTDet detector).

    Subclasses set ``backbone``, ``num_classes``, ``stride`` (the input multiple the model needs;
    inputs are padded to it by the caller or by ``forward``), ``model_args`` (a dict with which
    :func:`~vitkit.detect.create_detector` rebuilds the model, backbone by name) and implement:

    - ``forward(images, pixel_mask=None) -> dict``: ``images`` (B, 3, H, W) normalised, possibly
      padded bottom/right; ``pixel_mask`` (B, H, W) bool, True on real pixels (None: all real).
    - ``loss(outputs, targets) -> dict``: ``targets`` is one dict per image with ``"boxes"``
      (K, 4) float xyxy in pixels of the (unpadded) input, ``"labels"`` (K,) int64 in
      ``[0, num_classes)`` and ``"size"`` (2,) its true (h, w). Returns ``"loss"`` (the scalar to
      minimise) and its weighted parts (``"loss_ce"``, ``"loss_bbox"``, ``"loss_giou"``, ...).
    - ``postprocess(outputs, sizes, top_k=100) -> list[dict]``: per image ``"boxes"`` (N, 4) xyxy in
      pixels of the unpadded input (``sizes`` (B, 2) true (h, w)), ``"scores"`` (N,), ``"labels"``
      (N,) int64, best first, at most ``top_k``.
    """

    task = "detect"
    detector_name: str = ""

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: the backbone's, prefixed ``backbone.``."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in (fn() if fn else ())}

    @property
    def card(self):
        """The backbone's model card (None for a backbone without one)."""
        return getattr(self.backbone, "card", None)

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:  # pragma: no cover
        raise NotImplementedError

    def loss(self, outputs: dict, targets: list[dict]) -> dict:  # pragma: no cover
        raise NotImplementedError

    def postprocess(self, outputs: dict, sizes: Tensor, top_k: int = 100) -> list[dict]:  # pragma: no cover
        raise NotImplementedError
