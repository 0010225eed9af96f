"""Deformable DETR (Zhu et al., 2021): DETR with multi-scale deformable attention.

The encoder attends over four feature levels (the backbone's stride 8/16/32 maps and one extra
stride-64 map) with a handful of sampled points per query, which makes it cheap enough to use
high-resolution maps and lets it converge far faster than DETR. The decoder's object queries
cross-attend deformably around learned reference points; classification is per-class sigmoid
with focal loss (no "no object" class). ``with_box_refine`` refines the reference boxes layer
by layer; ``two_stage`` proposes the queries' boxes from the encoder's output.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models._base import check_image
from .criterion import SetCriterion
from .layers import MLP, sine_positions
from .matcher import HungarianMatcher
from .ms_deform_attn import MSDeformAttn
from .postprocess import set_postprocess
from .registry import register_detector
from .set_detector import FrozenBatchNorm2d, SetDetector, build_backbone, freeze_batch_norm, input_stride


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), clamped so that boxes at 0 or 1 stay finite."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class _EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then the FFN (the reference's names)."""

    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, src, pos, reference_points, shapes, padding_mask):
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference_points, src, shapes, padding_mask)))
        return self.norm2(src + self.ffn(src))


class _DecoderLayer(_EncoderLayer):
    """Post-norm: self-attention among the queries (standard multi-head attention, ``norm2``),
    deformable cross-attention around the reference points (``norm1``), the FFN (``norm3``)."""

    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
        self.cross_attn = self.self_attn
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, padding_mask):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout(tgt2))
        return self.norm3(tgt + self.ffn(tgt))


def _encoder_reference_points(shapes, valid_ratios: Tensor) -> Tensor:
    """Each encoder position's centre, (B, S, levels, 2) as (x, y) fractions of every level's map
    (the real part of each image is scaled by its valid ratio, as the reference does)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                                torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
                                indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, 2): the fraction of each map's width and height that is real (mask True on real)."""
    h, w = mask.shape[1:]
    return torch.stack([mask[:, 0, :].sum(1).float() / w, mask[:, :, 0].sum(1).float() / h], -1)


def _proposal_positions(proposals: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding (B, N, 2 * d_model) of proposal boxes given as logits (two-stage queries)."""
    n = d_model // 2
    dim_t = torch.arange(n, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / n)
    pos = proposals.sigmoid().float()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2).to(proposals.dtype)


@register_detector("deformable_detr", default_backbone="resnet50")
class DeformableDETR(SetDetector):
    """Deformable DETR over any vitkit backbone.

    A CNN or hierarchical backbone gives its stride 8/16/32 stages; an isotropic ViT its simple
    pyramid (``pyramid_info()``). Each map is projected to ``d_model`` (1x1 conv + GroupNorm(32));
    with ``num_feature_levels=4`` a 3x3 stride-2 conv on the last stage adds the stride-64 level.
    The defaults are the paper's: 300 queries, 6+6 layers, 8 heads, 4 points, FFN 1024, focal loss
    with class/L1/GIoU weights 2/5/2 (matching costs the same).

    Backbone options (as DETR's): ``backbone`` a registered name (built with ``num_classes=0`` and
    ``backbone_args``) or a built vitkit backbone (changed in place); ``frozen_bn`` replaces its
    BatchNorms by frozen ones; ``frozen_stages`` freezes a CNN's stem and that many first stages
    (the reference: ResNet's stem and ``layer1``); ``train_backbone=False`` freezes it whole;
    ``backbone_lr_mult`` is the backbone's learning rate as a fraction of the rest (the
    reference's 2e-5 / 2e-4). The reference's 0.1x learning rate on ``sampling_offsets`` and
    ``reference_points`` is not applied.

    Any input size works: images and mask are padded bottom/right to a multiple of :attr:`stride`
    (32 for ResNet), the padding masked like batch padding; at multiples of it the model is
    exactly the reference.

    ``forward`` returns ``"pred_logits"`` (B, Q, num_classes) sigmoid logits, ``"pred_boxes"``
    (B, Q, 4) normalised cxcywh, ``"aux_outputs"`` (the earlier decoder layers) and, with
    ``two_stage``, ``"enc_outputs"`` (the encoder's proposals).
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, *, num_queries: int = 300, d_model: int = 256,
                 enc_layers: int = 6, dec_layers: int = 6, nheads: int = 8, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 with_box_refine: bool = False, two_stage: bool = False, aux_loss: bool = True,
                 focal_alpha: float = 0.25, cls_weight: float = 2.0, bbox_weight: float = 5.0,
                 giou_weight: float = 2.0, frozen_bn: bool = True, train_backbone: bool = True,
                 frozen_stages: int = 1, backbone_lr_mult: float = 0.1, backbone_args: dict | None = None):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"Deformable DETR needs at least one object class, got num_classes={num_classes}")
        if num_queries < 1 or dec_layers < 1 or enc_layers < 0 or nheads < 1 or min(enc_n_points, dec_n_points) < 1:
            raise ConfigError(f"Deformable DETR needs num_queries, dec_layers, nheads and the point counts >= 1 and "
                              f"enc_layers >= 0, got {num_queries}, {dec_layers}, {nheads}, {enc_n_points}/"
                              f"{dec_n_points} and {enc_layers}")
        if d_model % nheads:
            raise ConfigError(f"d_model {d_model} is not divisible by nheads {nheads}")
        if two_stage and not with_box_refine:
            raise ConfigError("two_stage=True needs with_box_refine=True (the reference's two-stage variant refines "
                              "boxes in every decoder layer); set both")
        if d_model % 32:
            raise ConfigError(f"d_model={d_model} must be a multiple of 32 (the projections use GroupNorm(32))")
        if num_feature_levels == 2 or num_feature_levels < 1:
            raise ConfigError(f"num_feature_levels={num_feature_levels}: use 1 (the stride-32 map) or 3 and more "
                              "(strides 8/16/32, then one stride-2 conv per extra level; the paper uses 4)")
        if frozen_stages < 0:
            raise ConfigError(f"frozen_stages counts the first backbone stages to freeze: 0 or more, got {frozen_stages}")
        self.backbone = build_backbone(backbone, backbone_args)
        if not callable(getattr(self.backbone, "forward_intermediates", None)):
            raise ConfigError(f"{type(self.backbone).__name__} has no forward_intermediates: Deformable DETR needs a "
                              "vitkit backbone")
        self.num_classes = num_classes
        self.backbone_lr_mult = backbone_lr_mult
        self._backbone_args = dict(backbone_args or {})
        self._args = dict(
            num_queries=num_queries, d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers, nheads=nheads,
            dim_feedforward=dim_feedforward, dropout=dropout, num_feature_levels=num_feature_levels,
            enc_n_points=enc_n_points, dec_n_points=dec_n_points, with_box_refine=with_box_refine,
            two_stage=two_stage, aux_loss=aux_loss, focal_alpha=focal_alpha, cls_weight=cls_weight,
            bbox_weight=bbox_weight, giou_weight=giou_weight, frozen_bn=frozen_bn, train_backbone=train_backbone,
            frozen_stages=frozen_stages, backbone_lr_mult=backbone_lr_mult,
        )
        self.num_queries, self.d_model, self.num_feature_levels = num_queries, d_model, num_feature_levels
        self.with_box_refine, self.two_stage, self.aux_loss = with_box_refine, two_stage, aux_loss
        self.focal_alpha, self.loss_weights = focal_alpha, (cls_weight, bbox_weight, giou_weight)

        self._levels, self._indices, channels, reductions = self._backbone_levels(num_feature_levels)
        # Every level's map covers the padded image exactly (as the reference's batches do).
        self.stride = math.lcm(input_stride(self.backbone), int(math.ceil(max(reductions))))
        cnn = any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in self.backbone.modules())
        if frozen_bn:
            freeze_batch_norm(self.backbone)
        self._freeze_backbone(train_backbone, frozen_stages if cnn else 0)

        proj = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in channels]
        in_chs = channels[-1]
        for _ in range(num_feature_levels - len(channels)):
            proj.append(nn.Sequential(nn.Conv2d(in_chs, d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model)))
            in_chs = d_model
        self.input_proj = nn.ModuleList(proj)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))

        layer_args = (d_model, dim_feedforward, dropout, num_feature_levels, nheads)
        self.encoder = nn.ModuleList(_EncoderLayer(*layer_args, enc_n_points) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(*layer_args, dec_n_points) for _ in range(dec_layers))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)

        class_embed = nn.Linear(d_model, num_classes)
        bbox_embed = MLP(d_model, d_model, 4, 3)
        if with_box_refine:
            # One head per decoder layer (and one more for the two-stage proposals).
            n = dec_layers + (1 if two_stage else 0)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(n))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(n))
        else:
            self.class_embed, self.bbox_embed = class_embed, bbox_embed
        self._reset_parameters()

    # ------------------------------------------------------------------ construction
    def block_modules(self) -> list[nn.Module]:
        """The backbone's repeated blocks and the encoder and decoder layers (FSDP shards each one)."""
        fn = getattr(self.backbone, "block_modules", None)
        return [*(fn() if callable(fn) else ()), *self.encoder, *self.decoder]

    def _backbone_levels(self, n_levels: int) -> tuple[str, list[int], list[int], list[float]]:
        """Which backbone maps feed the levels: ("stages", ...) for a model with stride 8/16/32
        feature points, else ("pyramid", ...) for the last three of its simple pyramid."""
        wanted = (8, 16, 32) if n_levels > 1 else (32,)
        info = getattr(self.backbone, "feature_info", None) or []
        red = [f["reduction"] for f in info]
        if all(r in red for r in wanted):
            idx = [max(i for i, r in enumerate(red) if r == s) for s in wanted]
            return "stages", idx, [info[i]["num_chs"] for i in idx], [float(red[i]) for i in idx]
        if not hasattr(self.backbone, "pyramid_info"):
            raise ConfigError(f"backbone {type(self.backbone).__name__} has neither stride 8/16/32 stages "
                              "(feature_info) nor a pyramid (pyramid_info()); choose another backbone")
        pinfo = self.backbone.pyramid_info()[-len(wanted):]
        return "pyramid", [], [p["num_chs"] for p in pinfo], [float(p["reduction"]) for p in pinfo]

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith(("backbone.", "input_proj.", "query_embed.", "class_embed", "bbox_embed")):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        # Focal loss starts every class at probability 0.01 so that the many background queries
        # do not swamp the first steps.
        prior = -math.log((1 - 0.01) / 0.01)
        for head in self._heads(self.class_embed):
            nn.init.constant_(head.bias, prior)
        for head in self._heads(self.bbox_embed):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:
            # Boxes start small (sigmoid(-2) ~ 0.12 of the image); with refinement only the first
            # layer predicts sizes from scratch, the later ones start as "keep the previous box".
            nn.init.constant_(self._head(self.bbox_embed, 0).layers[-1].bias[2:], -2.0)

    @staticmethod
    def _heads(m) -> list[nn.Module]:
        return list(m) if isinstance(m, nn.ModuleList) else [m]

    def _head(self, m, i: int) -> nn.Module:
        return m[i] if isinstance(m, nn.ModuleList) else m

    # ------------------------------------------------------------------ forward
    def _features(self, images: Tensor) -> list[Tensor]:
        if self._levels == "stages":
            return self.backbone.forward_intermediates(images, indices=self._indices, intermediates_only=True)
        maps = self.backbone.forward_intermediates(images, pyramid=True, intermediates_only=True)
        return maps[-(3 if self.num_feature_levels > 1 else 1):]

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        check_image(images, getattr(self.backbone, "in_chans", 3))
        B, _, H, W = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(B, H, W, dtype=torch.bool, device=images.device)
        if pixel_mask.shape != (B, H, W):
            raise ValueError(f"pixel_mask must be (B, H, W) = {(B, H, W)} like the images, got {tuple(pixel_mask.shape)}")
        pixel_mask = pixel_mask.to(device=images.device, dtype=torch.bool)
        pad_h, pad_w = -H % self.stride, -W % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            pixel_mask = F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=False)

        feats = self._features(images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for lvl in range(len(feats), self.num_feature_levels):
            srcs.append(self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
        masks = [F.interpolate(pixel_mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]

        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([(sine_positions(m, self.d_model // 2, offset=0.5).to(s.dtype).flatten(2).transpose(1, 2)
                               + self.level_embed[lvl].view(1, 1, -1)) for lvl, (s, m) in enumerate(zip(srcs, masks))], 1)
        padding = ~torch.cat([m.flatten(1) for m in masks], 1)
        # Reference points and proposals stay float32 under autocast: sampling positions need the precision.
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)

        memory = src_flat
        enc_refs = _encoder_reference_points(shapes, valid_ratios)
        for layer in self.encoder:
            memory = layer(memory, pos_flat, enc_refs, shapes, padding)

        out = {}
        if self.two_stage:
            query_pos, tgt, reference, enc_out = self._two_stage_queries(memory, padding, shapes)
            out["enc_outputs"] = enc_out
        else:
            query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
            query_pos = query_pos[None].expand(B, -1, -1)
            tgt = tgt[None].expand(B, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()

        logits, boxes = [], []
        for i, layer in enumerate(self.decoder):
            scale = torch.cat([valid_ratios, valid_ratios], -1) if reference.shape[-1] == 4 else valid_ratios
            tgt = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], memory, shapes, padding)
            delta = self._head(self.bbox_embed, i)(tgt)
            if reference.shape[-1] == 4:
                box_logits = delta + inverse_sigmoid(reference)
            else:
                box_logits = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)
            logits.append(self._head(self.class_embed, i)(tgt))
            boxes.append(box_logits.sigmoid())
            if self.with_box_refine:
                # The next layer samples around this layer's boxes; the reference stops the
                # gradient there so each layer learns its own correction.
                reference = box_logits.sigmoid().detach()

        out["pred_logits"], out["pred_boxes"] = logits[-1], boxes[-1]
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def _two_stage_queries(self, memory: Tensor, padding: Tensor, shapes):
        """Every encoder position proposes a box (a level-sized square at its centre, refined by
        the extra head); the top ``num_queries`` by their first class logit seed the decoder
        (all positions where the maps hold fewer)."""
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            pad = padding[:, start:start + h * w].view(B, h, w)
            valid_h, valid_w = (~pad[:, :, 0]).sum(1), (~pad[:, 0, :]).sum(1)
            gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h, device=memory.device),
                                    torch.linspace(0, w - 1, w, device=memory.device),
                                    indexing="ij")
            grid = torch.stack([gx, gy], -1)
            scale = torch.stack([valid_w, valid_h], -1).float().view(B, 1, 1, 2)
            grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat([grid, wh], -1).view(B, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding[..., None], float("inf")).masked_fill(~valid, float("inf"))
        query = memory.masked_fill(padding[..., None], 0.0).masked_fill(~valid, 0.0)
        query = self.enc_output_norm(self.enc_output(query))

        enc_logits = self.class_embed[-1](query)
        enc_coords = self.bbox_embed[-1](query) + proposals
        # An image smaller than the query count proposes from every position it has.
        top = torch.topk(enc_logits[..., 0], min(self.num_queries, enc_logits.shape[1]), dim=1)[1]
        top_coords = torch.gather(enc_coords, 1, top[..., None].expand(-1, -1, 4)).detach()
        pos = self.pos_trans_norm(self.pos_trans(_proposal_positions(top_coords, self.d_model)))
        query_pos, tgt = pos.split(self.d_model, dim=2)
        enc_out = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
        return query_pos, tgt, top_coords.sigmoid(), enc_out

    # ------------------------------------------------------------------ loss and boxes
    def criterion(self) -> SetCriterion:
        """Deformable DETR's set criterion: sigmoid focal classification (``focal_alpha``, gamma 2),
        L1 and GIoU, weighted and matched 2 / 5 / 2; the two-stage proposals as one class. Built on
        first use, kept out of the state dict."""
        if self.__dict__.get("_criterion") is None:
            cls_w, bbox_w, giou_w = self.loss_weights
            matcher = HungarianMatcher(cost_class=cls_w, cost_bbox=bbox_w, cost_giou=giou_w, focal=True,
                                       alpha=self.focal_alpha)
            self.__dict__["_criterion"] = SetCriterion(
                self.num_classes, matcher, focal=True, focal_alpha=self.focal_alpha,
                weights={"ce": cls_w, "bbox": bbox_w, "giou": giou_w}, aux=self.aux_loss)
        return self.__dict__["_criterion"]

    def postprocess(self, outputs: dict, sizes: Tensor, top_k: int = 100) -> list[dict]:
        """Per image the ``top_k`` best (query, class) pairs by sigmoid score, a query possibly with
        several classes; boxes in pixels of the unpadded input (``sizes`` (B, 2) true (h, w))."""
        return set_postprocess(outputs, sizes, focal=True, top_k=top_k)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_queries={self.num_queries}, levels={self.num_feature_levels}, "
                f"stride={self.stride}")
