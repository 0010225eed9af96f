"""YOLOS: a plain ViT that detects through detection tokens appended to its patch sequence.

"You Only Look at One Sequence" (Fang et al., 2021): the ViT's class token stays, ``num_det_tokens``
learned detection tokens (with their own position embeddings) follow the patch tokens, the whole
sequence runs through the ViT's blocks, and two MLPs read the detection tokens after the final norm:
class logits (C object classes + "no object") and sigmoid boxes (cx, cy, w, h in [0, 1] of the
image). Trained with DETR's set loss: Hungarian matching, cross-entropy with a no-object weight of
0.1, L1 (5) and GIoU (2); there are no decoder layers, so no auxiliary losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import TokenContext, resample_abs_pos_embed
from ..models import VisionTransformer, create_model, get_model_card
from ..models._base import check_image
from .base import Detector
from .layers import MLP
from .registry import register_detector

# The patch position embeddings are kept for this input size and resampled to every other one:
# YOLOS-Ti's (transformers' hustvl/yolos-tiny: image_size [800, 1333], no mid-layer embeddings).
YOLOS_TINY_PE_SIZE = (800, 1333)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _resample_grid(pos: Tensor, grid: tuple[int, int], old_grid: tuple[int, int], prefix: int) -> Tensor:
    """YOLOS's resampling of (1, prefix + h*w, D) position rows: plain bicubic, no antialiasing (the
    reference's and transformers' rule; timm's antialiased kernel differs even when upsampling)."""
    return resample_abs_pos_embed(pos, grid, old_grid, num_prefix_tokens=prefix, interpolation="bicubic",
                                  antialias=False)


@register_detector("yolos", default_backbone="vit_tiny_patch16_224")
class YOLOS(Detector):
    """YOLOS on a vitkit ViT (any ``vit_*`` / ``deit_*`` with learned position embeddings).

    Args:
        backbone: a registered ViT name (built with ``num_classes=0`` and ``backbone_args``) or a
            built :class:`~vitkit.models.VisionTransformer`.
        num_classes: object classes (the "no object" logit is added).
        num_det_tokens: detection tokens, the most objects one image can yield (paper: 100).
        pe_size: the (H, W) input size the patch position embeddings are kept for (the reference's
            ``init_pe_size``; YOLOS-Ti: 800 x 1333). The backbone's embedding is resampled to it
            once here, as the reference does when it starts from a classifier, and from it to the
            grid of every input.
        use_mid_position_embeddings: add a learned, resampled position embedding after every block
            but the last (YOLOS-S/B; off for YOLOS-Ti, the default backbone's size).
        mid_pe_size: the input size the mid-layer embeddings are kept for (default ``pe_size``).
        layer_norm_eps: epsilon of the backbone's LayerNorms (1e-6, the reference's; transformers'
            YOLOS configs say 1e-12, which :func:`~vitkit.detect.convert_yolos.convert_hf_yolos` keeps).
        pretrained: backbone weights to start from (True: the card's hub checkpoint; a file, hub id
            or state dict): see :meth:`load_backbone`.
        backbone_args: overrides for ``create_model`` (``embed_dim``, ``depth``, ``in_chans``, ...).
        eos_coef, cost_class, cost_bbox, cost_giou, weight_bbox, weight_giou: DETR's loss (no-object
            weight of the cross-entropy, matching costs, L1 and GIoU loss weights).

    ``forward`` pads the input bottom/right to a multiple of the patch size (the reference and
    transformers drop the last partial patch instead; at multiples of the patch they agree). ``pixel_mask`` is
    ignored, as in the reference: the ViT attends to the padding too, and boxes are normalised by
    each image's true size, so the model learns where an image ends from its content.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_tiny_patch16_224",
        num_classes: int = 91,
        *,
        num_det_tokens: int = 100,
        pe_size: int | tuple[int, int] = YOLOS_TINY_PE_SIZE,
        use_mid_position_embeddings: bool = False,
        mid_pe_size: int | tuple[int, int] | None = None,
        layer_norm_eps: float = 1e-6,
        pretrained: bool | str | dict = False,
        backbone_args: dict | None = None,
        eos_coef: float = 0.1,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
    ):
        super().__init__()
        if num_det_tokens < 1:
            raise ConfigError(f"YOLOS needs at least one detection token, got num_det_tokens={num_det_tokens}")
        self._backbone_args = dict(backbone_args or {})
        if isinstance(backbone, str):
            self._backbone_name = backbone
            backbone = create_model(backbone, num_classes=0, **self._backbone_args)
        else:
            self._backbone_name = getattr(backbone, "model_name", None)
            if self._backbone_name is not None and not self._backbone_args:
                self._backbone_args = _overrides(backbone)
        _check_backbone(backbone)
        if backbone.num_classes:
            backbone.reset_classifier(0)  # YOLOS reads the detection tokens: a classifier would be an unused parameter
        if layer_norm_eps != 1e-6:
            for m in backbone.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = layer_norm_eps
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_det_tokens = num_det_tokens
        self.in_chans = backbone.in_chans
        self.patch_size = _pair(backbone.patch_size)
        self.stride = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else max(self.patch_size)
        self.pe_size = _pair(pe_size)
        self.pe_grid = self._grid_of(self.pe_size)
        self.use_mid_position_embeddings = use_mid_position_embeddings
        self.mid_pe_size = _pair(mid_pe_size) if mid_pe_size is not None else self.pe_size
        self.mid_pe_grid = self._grid_of(self.mid_pe_size)
        self.layer_norm_eps = layer_norm_eps
        self.loss_args = dict(eos_coef=eos_coef, cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                              weight_bbox=weight_bbox, weight_giou=weight_giou)

        dim = backbone.embed_dim
        self.det_token = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        self.det_pos_embed = nn.Parameter(torch.zeros(1, num_det_tokens, dim))
        nn.init.trunc_normal_(self.det_token, std=0.02)
        nn.init.trunc_normal_(self.det_pos_embed, std=0.02)
        if use_mid_position_embeddings:
            depth = len(backbone.blocks)
            if depth < 2:
                raise ConfigError("mid-layer position embeddings need a backbone of at least 2 blocks")
            rows = backbone.num_prefix_tokens + self.mid_pe_grid[0] * self.mid_pe_grid[1] + num_det_tokens
            self.mid_pos_embed = nn.Parameter(torch.zeros(depth - 1, 1, rows, dim))
            nn.init.trunc_normal_(self.mid_pos_embed, std=0.02)
        else:
            self.mid_pos_embed = None
        self.class_embed = MLP(dim, dim, num_classes + 1, 3)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self._set_backbone_grid(self.pe_grid)
        if pretrained:
            self.load_backbone(pretrained)
        self.__dict__["_criterion"] = None  # built on first use, kept out of the state dict

    # ------------------------------------------------------------------ building
    def _grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        (h, w), (ph, pw) = size, self.patch_size
        if h < ph or w < pw:
            raise ConfigError(f"YOLOS position-embedding size {size} is smaller than one {ph}x{pw} patch")
        return h // ph, w // pw  # the reference floors: an input remainder below one patch has no rows

    def _set_backbone_grid(self, grid: tuple[int, int]) -> None:
        """Resample the backbone's learned position embedding to ``grid`` (YOLOS's rule) and make the
        ViT's own bookkeeping agree, so ``model.backbone`` stays a working ViT at ``pe_size``."""
        bb = self.backbone
        old = tuple(bb.patch_embed.grid_size)
        if old == tuple(grid):
            return
        prefix = 0 if bb.no_embed_class else bb.num_prefix_tokens
        with torch.no_grad():
            pos = _resample_grid(bb.pos_embed.detach(), grid, old, prefix)
        bb.pos_embed = nn.Parameter(pos, requires_grad=bb.pos_embed.requires_grad)
        pe = bb.patch_embed
        pe.grid_size = tuple(grid)
        pe.num_patches = grid[0] * grid[1]
        pe.img_size = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])

    def load_backbone(self, source, *, strict: bool = True, verbose: bool = False):
        """Start the backbone from ViT weights (a vitkit or timm/HF ViT checkpoint: file, hub id,
        state dict; True: the backbone card's hub checkpoint), as YOLOS starts from a classifier.

        The weights load into the ViT as built by name (its card's grid, where a 224 checkpoint
        fits exactly), then the patch position embedding is resampled to ``pe_size`` by YOLOS's
        plain bicubic rule. The detection tokens, their position embeddings and the heads keep
        their initialisation. Returns ``vitkit.convert.load_weights``'s report.
        """
        from ..convert import load_weights

        if self._backbone_name is None:
            raise ConfigError(
                "load_backbone needs a backbone built by name; for a backbone module without one, "
                "load the weights into it before building YOLOS (vitkit.load_weights(backbone, source))"
            )
        card = get_model_card(self._backbone_name)
        if source is True:
            if card.hub_id is None:
                raise ConfigError(f"backbone {self._backbone_name!r} has no published weights; pass a path or hub id")
            source = card.hub_id
        fresh = create_model(self._backbone_name, num_classes=0, **self._backbone_args)
        report = load_weights(fresh, source, strict=strict, verbose=verbose)
        sd = fresh.state_dict()
        prefix = 0 if fresh.no_embed_class else fresh.num_prefix_tokens
        sd["pos_embed"] = _resample_grid(sd["pos_embed"], self.pe_grid, tuple(fresh.patch_embed.grid_size), prefix)
        self.backbone.load_state_dict(sd)
        return report

    @property
    def model_args(self) -> dict:
        """The arguments with which ``create_detector(**model_args)`` rebuilds this model (fresh weights)."""
        return dict(
            name=self.detector_name, backbone=self._backbone_name, num_classes=self.num_classes,
            num_det_tokens=self.num_det_tokens, pe_size=list(self.pe_size),
            use_mid_position_embeddings=self.use_mid_position_embeddings, mid_pe_size=list(self.mid_pe_size),
            layer_norm_eps=self.layer_norm_eps, backbone_args=dict(self._backbone_args), **self.loss_args,
        )

    # ------------------------------------------------------------------ forward
    def _positions(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """The backbone's position rows (prefix + patches) and the mid-layer ones for ``grid``."""
        bb = self.backbone
        pos = bb.pos_embed
        if tuple(grid) != self.pe_grid:
            pos = _resample_grid(pos, grid, self.pe_grid, 0 if bb.no_embed_class else bb.num_prefix_tokens)
        mid = self.mid_pos_embed
        if mid is not None and tuple(grid) != self.mid_pe_grid:
            # Layers stacked along channels: bicubic resampling treats every channel alone.
            n, _, rows, dim = mid.shape
            q = self.num_det_tokens
            flat = mid[:, 0, : rows - q].permute(1, 0, 2).reshape(1, rows - q, n * dim)
            flat = _resample_grid(flat, grid, self.mid_pe_grid, bb.num_prefix_tokens)
            flat = flat.reshape(1, -1, n, dim).permute(2, 0, 1, 3)
            mid = torch.cat([flat, mid[:, :, rows - q:]], dim=2)
        return pos, mid

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """(B, C, H, W) normalised images -> ``{"pred_logits": (B, Q, C + 1), "pred_boxes": (B, Q, 4)}``,
        boxes sigmoid (cx, cy, w, h) relative to each image. ``pixel_mask`` is ignored (see the class)."""
        check_image(images, self.in_chans)
        bb = self.backbone
        ph, pw = self.patch_size
        H, W = images.shape[-2:]
        x = F.pad(images, (0, (-W) % pw, 0, (-H) % ph)) if H % ph or W % pw else images
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        patches = bb.patch_embed(x)
        B, L, _ = patches.shape
        pos, mid = self._positions(grid)
        prefix = [t.expand(B, -1, -1) for t in (bb.cls_token, bb.dist_token, bb.reg_token) if t is not None]
        if bb.no_embed_class:
            tokens = torch.cat(prefix + [patches + pos], dim=1)
        else:
            tokens = torch.cat(prefix + [patches], dim=1) + pos
        det = (self.det_token + self.det_pos_embed).expand(B, -1, -1)
        tokens = bb.norm_pre(bb.pos_drop(torch.cat([tokens, det], dim=1)))
        ctx = TokenContext(grid, bb.num_prefix_tokens, torch.arange(L, device=x.device)[None])
        depth = len(bb.blocks)
        if mid is None:
            tokens = bb.run_blocks(tokens, ctx)
        else:
            for i in range(depth):
                tokens = bb.run_blocks(tokens, ctx, i, i + 1)
                if i < depth - 1:
                    tokens = tokens + mid[i]
        det = self._final_norm(tokens[:, -self.num_det_tokens:])
        return {"pred_logits": self.class_embed(det), "pred_boxes": self.bbox_embed(det).sigmoid()}

    def _final_norm(self, x: Tensor) -> Tensor:
        # A pooled-feature ViT (global_pool="avg") keeps its final norm as fc_norm, after pooling:
        # here it normalises each detection token, as the token-pooled ViT's norm does.
        bb = self.backbone
        fc_norm = getattr(bb, "fc_norm", None)
        if isinstance(bb.norm, nn.Identity) and isinstance(fc_norm, nn.Module):
            return fc_norm(x)
        return bb.norm(x)

    # ------------------------------------------------------------------ loss and boxes
    @property
    def criterion(self) -> nn.Module:
        """DETR's set criterion (Hungarian matching; CE with the no-object weight, L1, GIoU)."""
        if self.__dict__.get("_criterion") is None:
            from .criterion import SetCriterion
            from .matcher import HungarianMatcher

            a = self.loss_args
            matcher = HungarianMatcher(cost_class=a["cost_class"], cost_bbox=a["cost_bbox"], cost_giou=a["cost_giou"])
            self.__dict__["_criterion"] = SetCriterion(
                self.num_classes, matcher, eos_coef=a["eos_coef"],
                weights={"ce": 1.0, "bbox": a["weight_bbox"], "giou": a["weight_giou"]}, aux=False,
            )
        return self.__dict__["_criterion"]

    def loss(self, outputs: dict, targets: list[dict]) -> dict:
        """DETR's set loss on the detection tokens; targets as :class:`~vitkit.detect.Detector` says."""
        from .boxes import normalize_boxes

        device = outputs["pred_boxes"].device
        norm = [
            {"labels": t["labels"].to(device), "boxes": normalize_boxes(t["boxes"].to(device).float(), t["size"].to(device))}
            for t in targets
        ]
        return self.criterion.to(device)(outputs, norm)

    def postprocess(self, outputs: dict, sizes: Tensor, top_k: int = 100) -> list[dict]:
        """Softmax scores without the no-object class, boxes in pixels of each image's true size."""
        from .postprocess import set_postprocess

        return set_postprocess(outputs, sizes, focal=False, top_k=top_k)

    # ------------------------------------------------------------------ training hooks
    def no_weight_decay(self) -> set[str]:
        """The backbone's tokens and position embeddings, and the detection tokens' and mid-layer ones."""
        own = {"det_token", "det_pos_embed"} | ({"mid_pos_embed"} if self.mid_pos_embed is not None else set())
        return super().no_weight_decay() | own

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's block activations in backward instead of storing them."""
        self.backbone.set_grad_checkpointing(enable)

    def block_modules(self) -> list[nn.Module]:
        """The backbone's blocks (FSDP shards each one)."""
        return self.backbone.block_modules()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_det_tokens={self.num_det_tokens}, pe_size={self.pe_size}, "
                f"mid_pe={self.use_mid_position_embeddings}")


def _check_backbone(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(
            f"YOLOS runs on a plain ViT (vit_* / deit_* models), got {type(backbone).__name__}; "
            "for other backbones choose model.head=detr or deformable_detr"
        )
    if backbone.pos_embed_type != "learn":
        raise ConfigError(
            f"YOLOS resamples a learned position embedding to each input and to its detection tokens; "
            f"this ViT has pos_embed={backbone.pos_embed_type!r}: choose one with learned position embeddings"
        )


def _overrides(backbone: nn.Module) -> dict:
    """A named backbone's constructor arguments that differ from its card (what rebuilds it)."""
    card = get_model_card(backbone.model_name).config
    args = dict(getattr(backbone, "model_args", {}) or {})
    for k in ("num_classes", "img_size"):
        args.pop(k, None)
    return {k: v for k, v in args.items() if k not in card or card[k] != v}


__all__ = ["YOLOS", "YOLOS_TINY_PE_SIZE"]
