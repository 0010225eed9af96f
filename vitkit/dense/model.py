"""DenseModel: a backbone and a registered head mapping images of any size to per-pixel outputs."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import replace
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_model, get_model_card
from ..models._base import check_image
from .layers import resize
from .registry import head_entry

DENSE_TASKS = ("segment", "depth")


def _check_task(task: str) -> None:
    if task not in DENSE_TASKS:
        raise ConfigError(f"task {task!r} is not a dense task: choose one of {DENSE_TASKS}")


def _multiple(reduction) -> int:
    """The input multiple one feature map needs to tile the image exactly (a stride of 3.5 needs 7)."""
    values = reduction if isinstance(reduction, (tuple, list)) else (reduction,)
    m = 1
    for v in values:
        m = math.lcm(m, Fraction(v).limit_denominator(64).numerator)
    return m


def input_stride(backbone: nn.Module, head: nn.Module) -> int:
    """The smallest input multiple at which every map the backbone computes (and, for a head that
    reads the pyramid, every pyramid level) covers the image exactly: the patch size of a plain ViT,
    the deepest stage's stride (32) of a hierarchical backbone or of any 4-level pyramid. A head
    may add its own requirement as an ``input_multiple`` attribute (an int)."""
    reductions = [f["reduction"] for f in backbone.feature_info]
    if getattr(head, "requires_pyramid", False):
        reductions += [f["reduction"] for f in backbone.pyramid_info()]
    # A head that builds maps of its own (ViT-Adapter's convolutional branch) names their multiple.
    stride = int(getattr(head, "input_multiple", None) or 1)
    for r in reductions:
        stride = math.lcm(stride, _multiple(r))
    return stride


def _prefixed(pattern: str, prefix: str) -> str:
    # The backbone's group regexes anchor at its own names; anchor them at backbone.<name>.
    return re.sub(r"(?<!\[)\^", "^" + re.escape(prefix), pattern)


def freeze_unused(owner: nn.Module, backbone: nn.Module, read, side: int, in_chans: int) -> list[str]:
    """Freeze the ``backbone`` parameters that ``read(x)`` (a scalar from what consumes the backbone:
    a dense head, a detector's pyramid) never reaches; returns their names under ``backbone.``.

    Found by one traced pass of a zero image ``side`` px square, with ``owner`` in eval mode (no
    batch-statistics update, no dropout draw). Frozen parameters stay in the state dict, so
    backbone weights load unchanged, and DDP needs no ``find_unused_parameters``.
    """
    params = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if not params or torch.is_inference_mode_enabled():
        return []  # nothing to trace (built under inference_mode, no autograd): nothing frozen
    first = params[0][1]
    x = torch.zeros(1, in_chans, side, side, device=first.device, dtype=first.dtype)
    modes = [(m, m.training) for m in owner.modules()]
    owner.eval()
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(read(x), [p for _, p in params], allow_unused=True)
    finally:
        for m, mode in modes:
            m.training = mode
    unused = [n for (n, _), g in zip(params, grads) if g is None]
    for n, p in params:
        if n in unused:
            p.requires_grad_(False)
    return ["backbone." + n for n in unused]


class DenseModel(nn.Module):
    """A backbone plus a dense head: ``forward(x)`` returns (B, out, H, W) logits (segment) or
    non-negative depth (depth) at the input's own size.

    Any H, W works: the image is padded bottom/right with zeros to a multiple of :attr:`stride`,
    the head's map is upsampled bilinearly to the padded size and the padding is cropped off.
    Build one with :func:`create_dense_model`; ``create_dense_model(**model.model_args)``
    rebuilds it (with fresh weights). Backbone parameters the head never reads are frozen and
    listed in :attr:`frozen_unused`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, task: str = "segment", num_classes: int = 0,
                 head_args: dict | None = None, backbone_args: dict | None = None):
        super().__init__()
        _check_task(task)
        self.backbone = backbone
        self.head = head
        self.task = task
        self.num_classes = num_classes
        self.head_name = getattr(type(head), "head_name", type(head).__name__)
        self.head_args = dict(head_args or {})
        self._backbone_args = dict(backbone_args or {})
        self.stride = input_stride(backbone, head)
        self.in_chans = getattr(backbone, "in_chans", 3)
        card = getattr(backbone, "card", None)
        # The backbone's card (name, normalisation, paper) with the dense model's class count.
        self.card = replace(card, num_classes=num_classes) if card is not None else None
        # Backbone parameters the head never reads (ConvNeXt's pooled-classifier norm, the final norm
        # SETR bypasses) are frozen: optimizers and DDP then skip them.
        self.frozen_unused = freeze_unused(self, self.backbone, lambda x: self.head(self.backbone, x).sum(),
                                           max(2 * self.stride, 32), self.in_chans)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, out, H, W) logits or depth."""
        check_image(x, self.in_chans)
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.stride, (-W) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        out = self.head(self.backbone, x)
        if self.task == "depth":
            # Depth is a distance: non-negative, as DPT's depth head ends in a ReLU.
            out = F.relu(out)
        return resize(out, x.shape[-2:])[..., :H, :W]

    # ------------------------------------------------------------------ rebuilding
    @property
    def model_args(self) -> dict:
        """The arguments of :func:`create_dense_model` that rebuild this model (backbone by name;
        ``backbone`` is None when it was passed as a module without a registered name)."""
        name = getattr(self.backbone, "model_name", None)
        args = dict(getattr(self.backbone, "model_args", {}) or {})
        img_size = args.pop("img_size", None)
        in_chans = args.pop("in_chans", self.in_chans)
        args.pop("num_classes", None)
        if name is not None:
            card = get_model_card(name).config
            args = {k: v for k, v in args.items() if k not in card or card[k] != v}
        else:
            args = self._backbone_args
        return dict(
            backbone=name, head=self.head_name, num_classes=self.num_classes, task=self.task,
            img_size=list(img_size) if isinstance(img_size, tuple) else img_size, in_chans=in_chans,
            backbone_args=args, head_args=dict(self.head_args),
        )

    # ------------------------------------------------------------------ training hooks
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in backward instead of storing them."""
        self.backbone.set_grad_checkpointing(enable)

    def block_modules(self) -> list[nn.Module]:
        """The backbone's repeated blocks (FSDP shards each one)."""
        fn = getattr(self.backbone, "block_modules", None)
        return list(fn()) if callable(fn) else []

    def aux_loss(self) -> torch.Tensor:
        """The backbone's auxiliary loss of the last forward (MoE load balancing; zero otherwise)."""
        fn = getattr(self.backbone, "aux_loss", None)
        return fn() if callable(fn) else torch.zeros((), device=next(self.parameters()).device)

    # ------------------------------------------------------------------ optimizer hooks
    def no_weight_decay(self) -> set[str]:
        """The backbone's undecayed parameters (``backbone.``) and the head's (``head.``)."""
        names = set()
        for prefix, module in (("backbone.", self.backbone), ("head.", self.head)):
            fn = getattr(module, "no_weight_decay", None)
            if callable(fn):
                names |= {prefix + n for n in fn()}
        return names

    @property
    def group_matcher(self):
        """The backbone's layer groups under ``backbone.``, then the head as the last group (for
        layer-wise lr decay); absent when the backbone has none."""
        fn = getattr(self.backbone, "group_matcher", None)
        if not callable(fn):
            raise AttributeError(f"{type(self.backbone).__name__} has no group_matcher")

        def group_matcher(coarse: bool = False) -> dict:
            groups = {}
            for key, spec in fn(coarse).items():
                if isinstance(spec, (list, tuple)):
                    groups[key] = [(_prefixed(rx, "backbone."), suffix) for rx, suffix in spec]
                else:
                    groups[key] = _prefixed(spec, "backbone.")
            groups["dense_head"] = r"^head\."
            return groups

        return group_matcher

    def extra_repr(self) -> str:
        return f"task={self.task}, num_classes={self.num_classes}, head={self.head_name}, stride={self.stride}"


def _check_head_args(cls: type, name: str, head_args: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "backbone", "out_chans")]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(head_args) - set(accepted))
    if unknown:
        raise ConfigError(f"dense head {name!r} has no argument(s) {unknown}; model.head_args accepts {accepted}")


def create_dense_model(
    backbone: str | nn.Module,
    head: str = "linear",
    *,
    num_classes: int | None = None,
    task: str = "segment",
    img_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    backbone_args: dict | None = None,
    head_args: dict | None = None,
) -> DenseModel:
    """Build a segmentation or depth model from a backbone and a registered head.

    Args:
        backbone: a registered model name (built by ``vitkit.create_model(name, num_classes=0,
            img_size=..., in_chans=..., **backbone_args)``) or a built vitkit backbone (its
            classifier is removed).
        head: a head from :func:`vitkit.dense.list_heads` (``linear``, ``setr_pup``, ``setr_mla``,
            ``segmenter``, ``upernet``, ...).
        num_classes: classes of the segmentation (required for ``task="segment"``); depth has
            one output channel and ``num_classes`` 0.
        task: "segment" (logits) or "depth" (a non-negative map).
        head_args: the head's own options (e.g. ``{"channels": 128}`` for UperNet).
    """
    _check_task(task)
    if task == "segment":
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(
                f"a segmentation model needs num_classes >= 1 (the classes of the masks), got {num_classes}"
            )
        num_classes, out_chans = int(num_classes), int(num_classes)
    else:
        if num_classes not in (None, 0, 1):
            raise ConfigError(f"a depth model has one output channel; num_classes must be 0 or None, got {num_classes}")
        num_classes, out_chans = 0, 1
    entry = head_entry(head, task)
    head_args = dict(head_args or {})
    _check_head_args(entry.cls, head, head_args)
    if backbone is None:
        raise ConfigError(
            "no backbone name to rebuild from: this DenseModel was built from an unnamed backbone module; "
            "build the backbone with vitkit.create_model(name) so its name travels with the model"
        )
    clash = sorted({"num_classes", "img_size", "in_chans"} & set(backbone_args or {}))
    if clash:
        raise ConfigError(
            f"backbone_args may not set {clash}: pass img_size / in_chans to create_dense_model itself "
            "(a dense backbone has no classifier: num_classes is always 0)"
        )
    if isinstance(backbone, str):
        bb = create_model(backbone, num_classes=0, img_size=img_size, in_chans=in_chans, **(backbone_args or {}))
    elif isinstance(backbone, nn.Module):
        if backbone_args:
            raise ConfigError("backbone_args apply to a backbone given by name; this backbone is already built")
        bb = backbone
        if getattr(bb, "num_classes", 0) and callable(getattr(bb, "reset_classifier", None)):
            bb.reset_classifier(0)
    else:
        raise ConfigError(f"backbone must be a registered model name or a built backbone, got {type(backbone).__name__}")
    if not callable(getattr(bb, "forward_intermediates", None)) or not hasattr(bb, "feature_info"):
        raise ConfigError(
            f"{type(bb).__name__} has no forward_intermediates/feature_info: dense heads need a vitkit backbone"
        )
    head_module = entry.cls(bb, out_chans, **head_args)
    return DenseModel(bb, head_module, task=task, num_classes=num_classes, head_args=head_args,
                      backbone_args=backbone_args)


__all__ = ["DENSE_TASKS", "DenseModel", "create_dense_model", "input_stride"]
