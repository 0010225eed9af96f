"""MaskGIT training (``maskgit``): predict masked VQ tokens of an image from the rest and its class.

The frozen tokenizer (``objective.tokenizer``) turns each batch into a grid of codes. Per image a
ratio ``cosine_schedule(r)``, r ~ U(0, 1), gives the number of tokens to mask,
``ceil(ratio * L)`` (at least one), placed uniformly at random (Chang et al. 2022, section 3.2);
labels go through classifier-free dropout (``objective.class_dropout``); the loss is the
cross-entropy on the masked tokens only, with label smoothing (the reference's class-conditional
config: 0.1), averaged over every masked token of the batch. Evaluation scores the same loss per
image under a masking drawn from a fixed seed, so successive evaluations are comparable; samples
come from :func:`vitkit.generate.maskgit.maskgit_sample` decoded by the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..generate.maskgit import cosine_schedule, maskgit_sample
from .generative import GenerativeConfig, GenerativeObjective
from .registry import register_objective

# The seed of the evaluation masking: the same positions are masked at every evaluation.
EVAL_MASK_SEED = 0


@dataclass
class MaskGITConfig(GenerativeConfig):
    """``objective.*`` keys of ``maskgit`` (besides those of every generative objective).

    ``temperature``: the sampler's choice temperature, the scale of the Gumbel noise on the
    confidence, annealed to 0 over the steps (reference: 4.5). ``label_smoothing``: of the
    masked-token cross-entropy (reference: 0.1).
    """

    temperature: float = 4.5
    label_smoothing: float = 0.1


def token_mask(batch: int, length: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """MaskGIT's training mask: (B, L) bool, True = masked.

    Each row masks ``ceil(cosine_schedule(r) * L)`` positions (r ~ U(0, 1); at least one, at most
    L), chosen uniformly. Draws come from ``generator`` (on its device) or the global RNG.
    """
    gdev = generator.device if generator is not None else device
    r = torch.rand(batch, generator=generator, device=gdev)
    count = torch.ceil(cosine_schedule(r) * length).long().clamp(1, length)  # (B,)
    rank = torch.rand(batch, length, generator=generator, device=gdev).argsort(1).argsort(1)  # a random permutation
    return (rank < count[:, None]).to(device)  # (B, L)


def masked_token_loss(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Cross-entropy on the masked tokens only.

    logits (B, L, K), targets (B, L) code ids, mask (B, L) bool (True = masked, the only positions
    that count). Returns ``loss`` (mean over every masked token of the batch), ``per_sample`` (B,)
    (mean over each row's masked tokens), and ``correct`` / ``count`` (B,) for the masked accuracy.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                         label_smoothing=label_smoothing)  # (B, L)
    m = mask.to(ce.dtype)
    count = m.sum(1)  # (B,)
    correct = ((logits.argmax(-1) == targets).to(ce.dtype) * m).sum(1)
    return {"loss": (ce * m).sum() / count.sum().clamp_min(1), "per_sample": (ce * m).sum(1) / count.clamp_min(1),
            "correct": correct, "count": count}


@register_objective("maskgit", MaskGITConfig)
class MaskGITObjective(GenerativeObjective):
    """Trains a :class:`vitkit.generate.maskgit.MaskGIT` on the codes of a frozen VQ tokenizer.

    Args:
        model: the MaskGIT; its ``codebook_size`` and ``grid`` must be the tokenizer's and its
            ``num_classes`` the data's.
        cfg: :class:`MaskGITConfig`.
        num_classes: classes of the data.
        tokenizer: the frozen single-scale tokenizer (``encode``, ``decode``, ``grid``,
            ``codebook_size``); ``tokenizer_ref`` its ``{"source", "sha256"}``.
    """

    def __init__(self, model: nn.Module, cfg: MaskGITConfig | None = None, *, num_classes: int,
                 tokenizer: nn.Module | None = None, tokenizer_ref: dict | None = None):
        cfg = cfg or MaskGITConfig()
        if tokenizer is None:
            raise ConfigError("objective.name=maskgit trains on VQ tokens: set objective.tokenizer=<a vqvae run "
                              "directory or its model.safetensors>")
        for attr in ("encode", "decode", "codebook_size", "grid"):
            if getattr(tokenizer, attr, None) is None:
                raise ConfigError(f"objective.tokenizer must be a single-scale VQ tokenizer (encode, decode, "
                                  f"codebook_size, grid); {type(tokenizer).__name__} has no {attr}")
        if getattr(tokenizer, "quantizer_type", "vq") != "vq":
            raise ConfigError(f"MaskGIT needs a single-scale tokenizer (quantizer=vq), this one is "
                              f"{tokenizer.quantizer_type!r}: train the tokenizer with the vq quantizer (vq_nano)")
        for name, want, owner in (("codebook_size", tokenizer.codebook_size, "tokenizer"),
                                  ("grid", tokenizer.grid, "tokenizer"), ("num_classes", num_classes, "data")):
            have = getattr(model, name, None)
            if have != want:
                raise ConfigError(f"the MaskGIT has {name}={have} but the {owner} has {want}: build it with "
                                  f"model.args.{name}={want} (the run does so by default)")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.temperature < 0:
            raise ConfigError(f"objective.temperature must be >= 0, got {cfg.temperature}")
        super().__init__(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: MaskGITConfig, *, num_classes: int, tokenizer: nn.Module | None = None,
                    tokenizer_ref: dict | None = None, **_) -> MaskGITObjective:
        return cls(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)

    @torch.no_grad()
    def image_tokens(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) -> code ids (B, L) from the frozen tokenizer."""
        codes = self.tokenizer.encode(images)  # (B, g, g)
        g = self.model.grid
        if codes.shape[1:] != (g, g):
            raise DataError(
                f"the tokenizer turns {tuple(images.shape[2:])} images into a {tuple(codes.shape[1:])} grid, not the "
                f"{g}x{g} grid the MaskGIT was built for: train at the tokenizer's image size (data.img_size)"
            )
        return codes.flatten(1).long()  # (B, L)

    def _labels(self, batch: dict) -> Tensor:
        labels = batch["label"].long()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"class labels must be in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}: "
                            "train on the class-labelled data the objective was built for")
        return labels

    def _scores(self, model: nn.Module, tokens: Tensor, labels: Tensor, mask: Tensor) -> dict[str, Tensor]:
        logits = model(tokens.masked_fill(mask, model.mask_id), labels)  # (B, L, K)
        return masked_token_loss(logits, tokens, mask, self.cfg.label_smoothing)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        tokens = self.image_tokens(batch["image"])
        labels = self.drop_labels(self._labels(batch))
        mask = token_mask(*tokens.shape, device=tokens.device)
        out = self._scores(self.model, tokens, labels, mask)
        acc = out["correct"].sum() / out["count"].sum().clamp_min(1)
        return {"loss": out["loss"], "masked_acc": acc.detach()}

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per image: the masked-token ``loss`` and ``masked_acc`` under a masking drawn from a fixed seed,
        with the real labels, computed with ``model`` (the EMA copy) or ``self.model``."""
        model = model if model is not None else self.model
        tokens = self.image_tokens(batch["image"])
        g = torch.Generator().manual_seed(EVAL_MASK_SEED)
        mask = token_mask(*tokens.shape, generator=g, device=tokens.device)
        out = self._scores(model, tokens, self._labels(batch), mask)
        return {"loss": out["per_sample"], "masked_acc": out["correct"] / out["count"].clamp_min(1)}

    @torch.no_grad()
    def sample(self, labels: Tensor, *, model: nn.Module | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Class ids (B,) -> images in [-1, 1] (B, C, H, W): MaskGIT decoding, then the tokenizer's decoder.

        ``steps`` and ``guidance`` default to ``objective.sample_steps`` and ``objective.guidance``.
        """
        codes = maskgit_sample(model if model is not None else self.model, labels,
                               steps=self.cfg.sample_steps if steps is None else steps,
                               temperature=self.cfg.temperature,
                               guidance=self.cfg.guidance if guidance is None else guidance, generator=generator)
        return self.tokenizer.decode(codes).clamp(-1, 1)

    def papers(self) -> list[str]:
        return ["Chang et al. 2022, MaskGIT: Masked Generative Image Transformer (cosine masking, parallel decoding)",
                "Ho & Salimans 2022, Classifier-Free Diffusion Guidance (null-class dropout, guided logits)"]


__all__ = ["EVAL_MASK_SEED", "MaskGITConfig", "MaskGITObjective", "masked_token_loss", "token_mask"]
