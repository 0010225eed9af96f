"""Segment Anything (Kirillov et al., 2023): an image encoder run once per image, a prompt
encoder and a light mask decoder run once per prompt.

The image encoder is vitkit's :class:`~vitkit.models.vitdet.ViTDet` (windowed blocks, a few
global blocks, decomposed relative positions, no class token, no final norm) followed by SAM's
convolutional neck, so a plain ViT checkpoint (an MAE run) loads into it by the ViT's names.
:class:`Sam` holds the three parts and the pre/post-processing of the reference: the longest
side resized to ``img_size``, normalised in 0..255 units, padded bottom/right; masks cropped
and resized back.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.images import read_image
from ..errors import ConfigError, DataError, PathNotFoundError
from ..layers import LayerNorm2d
from ..models.vitdet import ViTDet
from .decoder import MaskDecoder
from .prompt import PromptEncoder

SAM_PAPER = "Segment Anything (Kirillov et al., 2023)"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class SamImageEncoder(ViTDet):
    """ViTDet blocks + SAM's neck: (B, 3, S, S) -> (B, out_chans, S/p, S/p).

    The neck is Conv1x1 (no bias) -> LayerNorm2d -> Conv3x3 (no bias) -> LayerNorm2d, as the
    reference. The blocks' parameters keep the plain ViT's names (``blocks.N.attn.qkv``,
    ``blocks.N.mlp.fc1``), so ViT checkpoints load through ``checkpoint_filter``.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256, window_size: int = 14,
                 global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11), qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, in_chans: int = 3):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, final_norm=False,
            window_size=window_size, global_attn_indexes=tuple(global_attn_indexes), use_rel_pos=True,
            window_padding="zeros", norm_eps=1e-6, drop_path_rate=drop_path_rate,
        )
        self.out_chans = out_chans
        self.drop_path_rate = drop_path_rate
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor], log) -> dict[str, torch.Tensor]:
        """A plain ViT checkpoint (an MAE run) -> this encoder: as ViTDet's, and its final norm is
        dropped (SAM's encoder has none; the neck normalises) and a missing neck keeps its fresh init."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(("norm.", "fc_norm."))}
        if len(sd) < len(state_dict):
            log.notes.append("checkpoint's final norm dropped: SAM's image encoder has none (its neck normalises)")
        sd = super().checkpoint_filter(sd, log)
        own = self.state_dict()
        fresh = [k for k in own if k.startswith("neck.") and k not in sd]
        sd.update({k: own[k] for k in fresh})
        if fresh:
            log.notes.append(f"checkpoint has no neck ({len(fresh)} tensors); it starts from its initialisation")
        return sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 3, H, W) normalised images -> (B, out_chans, H/p, W/p) image embeddings."""
        tokens, ctx = self.embed(x)
        tokens = self.run_blocks(tokens, ctx)
        h, w = ctx.grid
        return self.neck(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))


def _as_pairs(t: torch.Tensor | np.ndarray, name: str, last: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.shape[-1:] != (last,):
        raise ConfigError(f"{name} must end in a dimension of {last}, got shape {tuple(t.shape)}")
    return t


class Sam(nn.Module):
    """Promptable segmentation: image -> embedding once, then (points, box, mask) -> masks.

    Args:
        image_encoder: a :class:`SamImageEncoder` (any module mapping (B, 3, S, S) to
            (B, C, S/p, S/p) works).
        prompt_encoder, mask_decoder: :class:`~vitkit.sam.prompt.PromptEncoder`,
            :class:`~vitkit.sam.decoder.MaskDecoder`.
        img_size: the square input side S.
        pixel_mean, pixel_std: normalisation in 0..255 units.

    ``mask_threshold`` (0.0) binarises the logits. ``model_args`` rebuilds the model with
    :func:`vitkit.sam.build_sam`.
    """

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 img_size: int = 1024, pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, model_name: str = "sam"):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(img_size)
        self.embed_dim = prompt_encoder.embed_dim
        self.model_name = model_name
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    # ------------------------------------------------------------------ config
    @property
    def model_args(self) -> dict:
        """The :func:`vitkit.sam.build_sam` arguments of this model (JSON-friendly)."""
        enc, dec = self.image_encoder, self.mask_decoder
        args = dict(name=self.model_name, img_size=self.img_size)
        if isinstance(enc, SamImageEncoder):
            args.update(
                patch_size=enc.patch_size[0], embed_dim=enc.embed_dim, depth=len(enc.blocks),
                num_heads=enc.blocks[0].attn.num_heads, mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim,
                window_size=enc.window_size, global_attn_indexes=list(enc.global_attn_indexes),
                drop_path_rate=enc.drop_path_rate,
            )
        args.update(
            prompt_dim=self.embed_dim, mask_in_chans=self.prompt_encoder.mask_in_chans,
            decoder_depth=dec.transformer.depth, decoder_mlp_dim=dec.transformer.mlp_dim,
            decoder_heads=dec.transformer.num_heads, decoder_norm_eps=dec.transformer.norm_eps,
            num_multimask_outputs=dec.num_multimask_outputs, iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
            pixel_mean=self.pixel_mean.flatten().tolist(), pixel_std=self.pixel_std.flatten().tolist(),
        )
        return args

    def no_weight_decay(self) -> set[str]:
        """The image encoder's own exclusions (ViTDet's position embedding), named from this model."""
        fn = getattr(self.image_encoder, "no_weight_decay", None)
        return {f"image_encoder.{n}" for n in fn()} if callable(fn) else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay (SAM's recipe decays the image encoder's lr with depth):
        the encoder's own groups under ``image_encoder.``, its neck joined to the last block; the prompt
        encoder and the mask decoder match nothing, so they form the top layer at the full lr."""
        inner = getattr(self.image_encoder, "group_matcher", None)
        if not callable(inner):
            raise ConfigError(f"{type(self.image_encoder).__name__} defines no layer groups: set optim.layer_decay=null")

        def under(rx: str) -> str:
            return rx.replace("^", r"^image_encoder\.")

        groups = {}
        for name, spec in inner(coarse).items():
            groups[name] = [(under(rx), suffix) for rx, suffix in spec] if isinstance(spec, (list, tuple)) \
                else under(spec)
        blocks = list(groups.get("blocks") or [])
        groups["blocks"] = [*blocks, (r"^image_encoder\.neck", (99999,))]
        return groups

    @property
    def embedding_size(self) -> tuple[int, int]:
        """(h, w) of the image embedding."""
        return tuple(self.prompt_encoder.image_embedding_size)

    # ------------------------------------------------------------------ model
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised, padded images -> (B, C, h, w) image embeddings."""
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ConfigError(
                f"encode_image takes (B, 3, {self.img_size}, {self.img_size}) normalised padded images, "
                f"got {tuple(x.shape)}; use Sam.preprocess to make one from an image"
            )
        return self.image_encoder(x)

    def decode(self, emb: torch.Tensor, points=None, boxes=None, mask_input=None,
               multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for P prompts on image embeddings.

        Args:
            emb: (1, C, h, w) shared by every prompt, or (P, C, h, w) one per prompt.
            points: None or (coords (P, N, 2) float (x, y) in input-frame pixels, labels (P, N)
                int: 1 foreground, 0 background, -1 padding).
            boxes: None or (P, 4) xyxy in input-frame pixels.
            mask_input: None or (P, 1, 4h, 4w) mask logits (e.g. a previous low-res output).
            multimask: three masks per prompt (for ambiguous prompts), else one.

        Returns:
            low_res_logits (P, M, 4h, 4w) and iou_pred (P, M), M = 3 or 1.
        """
        P = None
        if points is not None:
            coords, labels = points
            coords = _as_pairs(coords, "point coords", 2).to(emb.device, torch.float32)
            labels = torch.as_tensor(labels, device=emb.device)
            if coords.ndim != 3 or labels.shape != coords.shape[:2]:
                raise ConfigError(f"points must be coords (P, N, 2) and labels (P, N), got {tuple(coords.shape)} "
                                  f"and {tuple(labels.shape)}")
            points, P = (coords, labels), coords.shape[0]
        if boxes is not None:
            boxes = _as_pairs(boxes, "boxes", 4).to(emb.device, torch.float32).reshape(-1, 4)
            if P is not None and boxes.shape[0] != P:
                raise ConfigError(f"{P} point prompts but {boxes.shape[0]} boxes: give one box per prompt")
            P = boxes.shape[0]
        if mask_input is not None:
            want = (1, *self.prompt_encoder.mask_input_size)
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != want:
                raise ConfigError(f"mask_input must be (P, {want[0]}, {want[1]}, {want[2]}) logits, "
                                  f"got {tuple(mask_input.shape)}")
            P = mask_input.shape[0] if P is None else P
        P = P if P is not None else emb.shape[0]
        if emb.ndim != 4 or emb.shape[0] not in (1, P):
            raise ConfigError(f"image embeddings (1 or {P}, C, h, w) are needed for {P} prompts, got {tuple(emb.shape)}")
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        if sparse.shape[0] == 1 and P > 1:  # no sparse and no mask prompt: one empty prompt per embedding
            sparse, dense = sparse.expand(P, -1, -1), dense.expand(P, -1, -1, -1)
        return self.mask_decoder(emb, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask)

    def forward(self, images: torch.Tensor, points=None, boxes=None, mask_input=None,
                multimask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` then :meth:`decode` (one image, or one image per prompt)."""
        return self.decode(self.encode_image(images), points, boxes, mask_input, multimask)

    # ------------------------------------------------------------------ pre / post
    def preprocess_shape(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an image of ``original_size`` once its longest side is resized to ``img_size``."""
        h, w = original_size
        scale = self.img_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """An image (uint8 (H, W, 3) array, PIL image or path) -> (x (1, 3, S, S), input_size (h, w),
        original_size (H, W)): longest side resized to S (bilinear, PIL), normalised, zero-padded
        at the bottom and right."""
        if isinstance(image, str | os.PathLike):
            if not os.path.isfile(image):
                raise PathNotFoundError(f"no such image file: {str(image)!r}")
            image = read_image(image, 3)
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"SAM takes an RGB image: uint8 (H, W, 3) array, PIL image or path, got "
                            f"{image.dtype} {image.shape}")
        original = image.shape[:2]
        size = self.preprocess_shape(original)
        resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().to(self.pixel_mean.device)
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, self.img_size - size[1], 0, self.img_size - size[0]))
        return x[None], size, tuple(original)

    def transform_coords(self, coords, original_size: tuple[int, int]) -> torch.Tensor:
        """(..., 2) (x, y) pixels of the original image -> pixels of the resized input frame."""
        coords = _as_pairs(coords, "coords", 2).to(torch.float32)
        h, w = self.preprocess_shape(original_size)
        return coords * coords.new_tensor([w / original_size[1], h / original_size[0]])

    def transform_boxes(self, boxes, original_size: tuple[int, int]) -> torch.Tensor:
        """(..., 4) xyxy boxes of the original image -> the resized input frame."""
        boxes = _as_pairs(boxes, "boxes", 4)
        return self.transform_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size).reshape(boxes.shape)

    def postprocess_masks(self, low_res: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        """(P, M, 4h, 4w) logits -> (P, M, H, W) logits at the original size: upsampled to the
        padded input, the padding cropped, resized to the original (bilinear)."""
        masks = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


__all__ = ["SAM_PAPER", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "Sam", "SamImageEncoder"]
