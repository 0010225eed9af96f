"""DETR (Carion et al., 2020): a set of learned object queries decoded by a transformer over a
backbone's last feature map, trained with Hungarian matching.

The layout follows the reference implementation (facebookresearch/detr): ``input_proj``,
``query_embed``, ``transformer.encoder.layers.i`` / ``transformer.decoder.layers.i`` (post-norm,
attention with packed ``in_proj_weight`` as ``nn.MultiheadAttention`` stores it, ``linear1``,
``linear2``, ``norm1..3``, the cross-attention named ``multihead_attn``), the decoder's shared
output ``transformer.decoder.norm``, ``class_embed`` and ``bbox_embed.layers.i``; the backbone's
own names sit under ``backbone.``. :func:`vitkit.detect.convert_hf.convert_hf_detr` loads
Hugging Face's ``DetrForObjectDetection`` weights into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.attention import AttentionCore
from ..layers.capture import _MapList
from ..models._base import check_image
from .criterion import SetCriterion
from .layers import MLP, sine_positions
from .matcher import HungarianMatcher
from .postprocess import set_postprocess
from .registry import register_detector
from .set_detector import FrozenBatchNorm2d, SetDetector, build_backbone, freeze_batch_norm, input_stride


# ---------------------------------------------------------------------- the transformer
class DetrAttention(AttentionCore):
    """Multi-head attention over separate query, key and value inputs (``nn.MultiheadAttention``'s
    parameters: packed ``in_proj_weight`` / ``in_proj_bias`` and ``out_proj``), joining vitkit's
    attention capture. ``key_padding_mask`` (B, M) is True on keys to ignore."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__(attn_drop)
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"d_model {dim} is not divisible by nheads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        B, N, C = query.shape
        h = self.num_heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(B, N, h, -1).transpose(1, 2)
        k = F.linear(key, wk, bk).view(B, key.shape[1], h, -1).transpose(1, 2)
        v = F.linear(value, wv, bv).view(B, value.shape[1], h, -1).transpose(1, 2)
        bias = None
        if key_padding_mask is not None:
            bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        x = self.attend(q, k, v, bias)
        return self.out_proj(x.transpose(1, 2).reshape(B, N, C))


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; positions are added to the queries and keys, not the values."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = DetrAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, pos: Tensor, padding: Tensor | None) -> Tensor:
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, padding)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(EncoderLayer):
    """Post-norm decoder layer: self-attention among the queries (query positions on queries and
    keys), cross-attention to the memory (query positions on the queries, sine positions on the
    keys), feed-forward."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__(d_model, nheads, dim_feedforward, dropout)
        self.multihead_attn = DetrAttention(d_model, nheads, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding: Tensor | None) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        tgt2 = self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, pos), memory, padding)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class Transformer(nn.Module):
    """DETR's encoder-decoder. ``forward`` returns the decoder output after every layer, each
    through the one shared decoder norm, stacked (L, B, Q, d), and the memory (B, h*w, d).

    ``hf_aux_norm`` reproduces Hugging Face's ``DetrForObjectDetection`` with
    ``auxiliary_loss=True``, which feeds each decoder layer the normalised output of the one
    before and normalises the last output twice (the reference feeds the raw output on).
    """

    def __init__(self, d_model: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, hf_aux_norm: bool = False):
        super().__init__()
        self.hf_aux_norm = hf_aux_norm
        self.encoder = _Stack([EncoderLayer(d_model, nheads, dim_feedforward, dropout) for _ in range(enc_layers)])
        self.decoder = _Stack([DecoderLayer(d_model, nheads, dim_feedforward, dropout) for _ in range(dec_layers)],
                              nn.LayerNorm(d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, padding: Tensor, pos: Tensor, query_embed: Tensor) -> tuple[Tensor, Tensor]:
        """src, pos: (B, h*w, d); padding: (B, h*w) True on padded positions; query_embed: (Q, d)."""
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pos, padding)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, pos, query_pos, padding)
            hs.append(self.decoder.norm(tgt))
            if self.hf_aux_norm:
                tgt = hs[-1]
        if self.hf_aux_norm:
            hs[-1] = self.decoder.norm(hs[-1])
        return torch.stack(hs), memory


@register_detector("detr", default_backbone="resnet50")
class DETR(SetDetector):
    """DETR over any vitkit backbone's last feature map (ResNet's stride-32 stage, a ViT's last
    block as a map).

    Args:
        backbone: a registered model name (built with ``num_classes=0`` and ``backbone_args``) or a
            built vitkit backbone.
        num_classes: object classes; the class head has one more output, "no object" (last).
        num_queries, d_model, enc_layers, dec_layers, nheads, dim_feedforward, dropout: the
            transformer (the paper's defaults; dropout also on the attention weights, as the
            reference's ``nn.MultiheadAttention``).
        aux_loss: decoding losses after every decoder layer (``outputs["aux_outputs"]``).
        eos_coef: weight of the "no object" class in the classification loss.
        frozen_bn: replace the backbone's BatchNorm by :class:`FrozenBatchNorm2d` (the reference);
            False keeps it trainable.
        train_backbone: False freezes the whole backbone (the reference with ``lr_backbone=0``).
        frozen_stages: for a CNN backbone (one with BatchNorm: ResNet), the stem and this many
            first stages are frozen; the reference freezes ResNet's stem and ``layer1`` (1).
            Backbones without BatchNorm (ViTs) train whole.
        backbone_lr_mult: the backbone's learning rate as a fraction of the transformer's (the
            reference's 1e-5 / 1e-4 = 0.1); read as :attr:`backbone_lr_mult` and
            :meth:`param_groups_hint`.
        hf_aux_norm: decode as Hugging Face's DETR does with ``auxiliary_loss=True`` (see
            :class:`Transformer`), for checkpoints trained that way; False is the reference.

    A built backbone is changed in place (BatchNorm frozen, stages frozen). Inputs of any size
    work: images (and ``pixel_mask``) are padded bottom/right to a multiple of :attr:`stride`
    (the backbone's deepest stride, 32 for ResNet), the padding masked out of attention and
    positions like the batch padding the reference adds; at multiples of the stride the model
    is exactly the reference.
    """

    def __init__(self, backbone="resnet50", num_classes: int = 91, *, num_queries: int = 100, d_model: int = 256,
                 enc_layers: int = 6, dec_layers: int = 6, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, aux_loss: bool = True, eos_coef: float = 0.1, frozen_bn: bool = True,
                 train_backbone: bool = True, frozen_stages: int = 1, backbone_lr_mult: float = 0.1,
                 hf_aux_norm: bool = False, backbone_args: dict | None = None):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"DETR needs at least one object class, got num_classes={num_classes}")
        if num_queries < 1 or dec_layers < 1 or enc_layers < 0:
            raise ConfigError(f"DETR needs num_queries >= 1, dec_layers >= 1 and enc_layers >= 0, got "
                              f"{num_queries}, {dec_layers}, {enc_layers}")
        if frozen_stages < 0:
            raise ConfigError(f"frozen_stages counts the first backbone stages to freeze: 0 or more, got {frozen_stages}")
        if d_model % 2:
            raise ConfigError(f"d_model must be even (half the channels encode y, half x), got {d_model}")
        self.backbone = build_backbone(backbone, backbone_args)
        bb = self.backbone
        if not callable(getattr(bb, "forward_intermediates", None)) or not getattr(bb, "feature_info", None):
            raise ConfigError(f"{type(bb).__name__} has no forward_intermediates/feature_info: DETR needs a vitkit backbone")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.eos_coef = eos_coef
        self.backbone_lr_mult = backbone_lr_mult
        self.stride = input_stride(bb)
        self.in_chans = getattr(bb, "in_chans", 3)
        self._args = dict(num_queries=num_queries, d_model=d_model, enc_layers=enc_layers, dec_layers=dec_layers,
                          nheads=nheads, dim_feedforward=dim_feedforward, dropout=dropout, aux_loss=aux_loss,
                          eos_coef=eos_coef, frozen_bn=frozen_bn, train_backbone=train_backbone,
                          frozen_stages=frozen_stages, backbone_lr_mult=backbone_lr_mult)
        if hf_aux_norm:
            self._args["hf_aux_norm"] = True
        self._backbone_args = dict(backbone_args or {})

        cnn = any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in bb.modules())
        if frozen_bn:
            freeze_batch_norm(bb)
        self._freeze_backbone(train_backbone, frozen_stages if cnn else 0)

        self.input_proj = nn.Conv2d(bb.feature_info[-1]["num_chs"], d_model, 1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.transformer = Transformer(d_model, nheads, enc_layers, dec_layers, dim_feedforward, dropout, hf_aux_norm)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.__dict__["_criterion"] = None  # built on first use, not a submodule: no state, no device of its own

    # ------------------------------------------------------------------ training hooks
    def block_modules(self) -> list[nn.Module]:
        """The backbone's repeated blocks and the transformer's layers (FSDP shards each one)."""
        fn = getattr(self.backbone, "block_modules", None)
        return [*(fn() if callable(fn) else ()), *self.transformer.encoder.layers, *self.transformer.decoder.layers]

    # ------------------------------------------------------------------ forward
    def _features(self, images: Tensor) -> Tensor:
        return self.backbone.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)[-1]

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None, return_attention: bool = False) -> dict:
        """``images`` (B, C, H, W) normalised; ``pixel_mask`` (B, H, W), True on real pixels.

        Returns ``pred_logits`` (B, Q, C+1), ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1] of each
        image's real extent, ``aux_outputs`` (one dict per earlier decoder layer, with
        ``aux_loss``); with ``return_attention`` also ``cross_attention`` (B, Q, h*w): the last
        decoder layer's cross-attention averaged over heads, and ``feature_size`` (h, w).
        """
        check_image(images, self.in_chans)
        B, _, H, W = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones(B, H, W, dtype=torch.bool, device=images.device)
        elif tuple(pixel_mask.shape) != (B, H, W):
            raise ValueError(f"pixel_mask must be (B, H, W) = {(B, H, W)} like the images, got {tuple(pixel_mask.shape)}")
        pixel_mask = pixel_mask.to(device=images.device, dtype=torch.bool)
        pad_h, pad_w = (-H) % self.stride, (-W) % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            pixel_mask = F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=False)

        feat = self._features(images)
        h, w = feat.shape[-2:]
        mask = F.interpolate(pixel_mask[None].float(), size=(h, w))[0].bool()  # nearest, as the reference
        pos = sine_positions(mask, num_feats=self.input_proj.out_channels // 2).to(feat.dtype)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)

        if return_attention:
            sink = _MapList()
            attn = self.transformer.decoder.layers[-1].multihead_attn
            previous, attn.captured = attn.captured, sink
        try:
            hs, _ = self.transformer(src, ~mask.flatten(1), pos, self.query_embed.weight)
        finally:
            if return_attention:
                attn.captured = previous
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if return_attention:
            out["cross_attention"] = sink[-1].mean(1)
            out["feature_size"] = (h, w)
        return out

    # ------------------------------------------------------------------ loss, postprocess
    def criterion(self):
        """DETR's set criterion (Hungarian matching on class 1, L1 5, GIoU 2; loss weights the
        same, "no object" weighted ``eos_coef``), built on first use and kept out of the state dict."""
        if self._criterion is None:
            matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
            self.__dict__["_criterion"] = SetCriterion(self.num_classes, matcher, eos_coef=self.eos_coef,
                                                       weights={"ce": 1, "bbox": 5, "giou": 2}, aux=self.aux_loss)
        return self._criterion

    def postprocess(self, outputs: dict, sizes: Tensor, top_k: int = 100) -> list[dict]:
        """Per image: softmax over the classes, "no object" dropped, each query's best class;
        boxes in pixels of the unpadded input (``sizes`` (B, 2) true (h, w)), best first."""
        return set_postprocess(outputs, sizes, focal=False, top_k=top_k)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_queries={self.num_queries}, stride={self.stride}"


__all__ = ["DETR", "DetrAttention", "FrozenBatchNorm2d", "Transformer", "freeze_batch_norm"]
