"""VAR's next-scale prediction (``var``): cross-entropy over every token of every scale.

The frozen multi-scale tokenizer turns each image into its token maps (``encode_scales``, coarse
to fine) and the teacher-forcing inputs (``scales_to_var_input``: the cumulative reconstruction
after each scale, resized to the next). VAR sees the class (a ``class_dropout`` share replaced by
the null class, for classifier-free guidance) and predicts every scale from the coarser ones
under its block-causal mask. As in the reference trainer, every token of every scale weighs the
same (1 / L), with no label smoothing by default.

Metrics: ``loss``, ``acc`` (share of all tokens predicted right by argmax) and ``acc_last_scale``
(the finest scale only, the reference's ``Acct``). Samples: :func:`vitkit.generate.var.var_sample`,
one step per scale of the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..generate.var import guidance_scale, var_sample
from .generative import GenerativeConfig, GenerativeObjective
from .registry import register_objective


@dataclass
class VARConfig(GenerativeConfig):
    """``objective.*`` keys of ``var`` (beside the shared generative keys).

    ``guidance``: classifier-free guidance of the evaluation samples in the convention
    ``u + g * (c - u)``, reached at the last scale on VAR's linear schedule (``guidance_schedule``:
    ``linear``, or ``constant``); 2.5 is the reference's ``cfg=1.5``. ``top_k``, ``top_p``,
    ``temperature``: the sampler's filters (0 = off; the reference sampler's defaults).
    ``label_smoothing``: of the training cross-entropy (the reference's default, 0).
    ``sample_steps`` is not used: VAR samples one step per scale of its tokenizer.
    """

    guidance: float = 2.5
    guidance_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    label_smoothing: float = 0.0


def token_targets(indices: list[Tensor]) -> Tensor:
    """Token maps [(B, s, s), ...] coarse to fine -> (B, L) in VAR's order (scales concatenated, each row-major)."""
    return torch.cat([idx.flatten(1) for idx in indices], dim=1)


@register_objective("var", VARConfig)
class VARObjective(GenerativeObjective):
    """Trains a :class:`~vitkit.generate.var.VAR` on a frozen multi-scale tokenizer's token maps."""

    def __init__(self, model: nn.Module, cfg: VARConfig, *, num_classes: int, tokenizer: nn.Module | None = None,
                 tokenizer_ref: dict | None = None):
        if tokenizer is None:
            raise ConfigError("objective var needs a trained multi-scale tokenizer: pass objective.tokenizer=<tokenizer run>")
        if not getattr(tokenizer, "scales", None):
            raise ConfigError(
                "objective var needs a multi-scale tokenizer (trained with model.name=msvq_nano, or "
                "model.args.quantizer=multiscale); this one quantises a single scale"
            )
        if not 0 <= cfg.label_smoothing < 1:
            raise ConfigError(f"objective.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.temperature <= 0 or cfg.top_k < 0 or not 0 <= cfg.top_p <= 1:
            raise ConfigError(
                f"objective.temperature must be > 0, top_k >= 0 and top_p in [0, 1] (0 = off); got "
                f"{cfg.temperature}, {cfg.top_k}, {cfg.top_p}"
            )
        guidance_scale(cfg.guidance, 0, 2, cfg.guidance_schedule)  # an unknown schedule fails now, not at the first evaluation
        super().__init__(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)
        self.num_scales = len(tokenizer.scales)

    @torch.no_grad()
    def _tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> targets (B, L) and teacher-forcing inputs (B, L - first_l, embed_dim)."""
        indices = self.tokenizer.encode_scales(images)
        return token_targets(indices), self.tokenizer.scales_to_var_input(indices)

    def _token_loss(self, model: nn.Module, labels: Tensor, images: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
        """Per-token cross-entropy (B, L) and argmax hits (B, L) of ``model`` on ``images`` of classes ``labels``."""
        target, x_input = self._tokens(images)
        logits = model(labels, x_input).float()  # (B, L, V)
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", label_smoothing=smoothing)  # (B, L)
        return loss, logits.detach().argmax(-1) == target

    def forward(self, batch: dict) -> dict[str, Tensor]:
        labels = self.drop_labels(batch["label"])
        loss, hit = self._token_loss(self.model, labels, batch["image"], self.cfg.label_smoothing)
        last = self.tokenizer.scales[-1] ** 2
        return {
            "loss": loss.mean(),  # the reference's weight 1/L per token, summed, then averaged over the batch
            "acc": hit.float().mean(),
            "acc_last_scale": hit[:, -last:].float().mean(),
        }

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per-sample (B,) cross-entropy over all tokens, with the true labels and no smoothing, computed by
        ``model`` (the EMA copy) or ``self.model``."""
        loss, _ = self._token_loss(model if model is not None else self.model, batch["label"], batch["image"], 0.0)
        return {"loss": loss.mean(1)}

    @torch.no_grad()
    def sample(self, labels: Tensor, *, model: nn.Module | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] of classes ``labels`` by :func:`var_sample`.

        VAR's step count is fixed by the scales it was trained on: ``steps`` must be None or the
        tokenizer's number of scales (anything else is a ConfigError). ``guidance`` defaults to
        ``objective.guidance``.
        """
        if steps is not None and steps != self.num_scales:
            raise ConfigError(
                f"VAR samples one step per scale of its tokenizer: {self.num_scales} steps for scales "
                f"{tuple(self.tokenizer.scales)}, not {steps}; leave the steps out"
            )
        cfg = self.cfg
        return var_sample(
            model if model is not None else self.model, self.tokenizer, labels, top_k=cfg.top_k, top_p=cfg.top_p,
            temperature=cfg.temperature, guidance=cfg.guidance if guidance is None else guidance,
            guidance_schedule=cfg.guidance_schedule, generator=generator,
        )


__all__ = ["VARConfig", "VARObjective", "token_targets"]
