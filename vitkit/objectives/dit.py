"""DiT trained as a rectified flow (``objective.name=dit``): Peebles & Xie 2023's network, SD3's flow.

Each training image ``x0`` (pixels in [-1, 1]) is mixed with Gaussian noise at a time t drawn
per image, ``x_t = (1 - t) x0 + t noise``, and the DiT regresses the velocity ``noise - x0``
(mean squared error; :func:`vitkit.generate.dit.rectified_flow_loss`). A ``class_dropout`` share
of the labels is replaced by the null class so that one network also learns the unconditional
velocity, which classifier-free guidance needs. Samples integrate the flow from noise at t = 1 to
t = 0 (:func:`vitkit.generate.dit.flow_sample`, Euler or Heun) with guidance on the velocity,
``u + guidance * (c - u)``.

Validation loss is comparable between evaluations: its times and noise come from a generator
seeded afresh for every batch, so the same images meet the same draws each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..generate.dit import SAMPLERS, T_SAMPLING, flow_sample, rectified_flow_loss
from .generative import GenerativeConfig, GenerativeObjective
from .registry import register_objective

SPACES = ("pixels",)
EVAL_SEED = 0


@dataclass
class DiTConfig(GenerativeConfig):
    """``objective.*`` keys of ``dit`` (besides :class:`GenerativeConfig`'s).

    ``space``: what the flow runs on, ``pixels``. ``t_sampling``: how training times are drawn,
    ``uniform`` (rectified flow) or ``logit_normal`` (SD3: t = sigmoid(N(0, 1)), more weight in
    the middle of the path). ``sampler``: ``euler`` (one network call per step) or ``heun``
    (two). ``guidance`` defaults to 1.5, the scale of DiT's reported FID; ``sample_steps`` to 32
    integration steps.
    """

    guidance: float = 1.5
    sample_steps: int = 32
    space: str = "pixels"
    t_sampling: str = "uniform"
    sampler: str = "euler"


@register_objective("dit", DiTConfig)
class DiTObjective(GenerativeObjective):
    """Class-conditional rectified flow with a :class:`vitkit.generate.dit.DiT` (see the module docstring).

    Args:
        model: a DiT (``forward(x_t, t, labels)``, ``in_chans``, ``img_size``, ``num_classes``).
        cfg: the ``objective.*`` keys (:class:`DiTConfig`).
        num_classes: the data's classes; the model's class table must have one more row.
    """

    def __init__(self, model: nn.Module, cfg: DiTConfig | None = None, *, num_classes: int,
                 tokenizer: nn.Module | None = None, tokenizer_ref: dict | None = None):
        cfg = cfg or DiTConfig()
        if cfg.space not in SPACES:
            raise ConfigError(f"objective.space={cfg.space!r} is not one of {SPACES}")
        if cfg.t_sampling not in T_SAMPLING:
            raise ConfigError(f"objective.t_sampling={cfg.t_sampling!r} is not one of {T_SAMPLING}")
        if cfg.sampler not in SAMPLERS:
            raise ConfigError(f"objective.sampler={cfg.sampler!r} is not one of {SAMPLERS}")
        if getattr(model, "kind", None) != "dit":
            raise ConfigError(f"objective.name=dit trains a DiT, but the model is a {type(model).__name__}: "
                              "set model.name to a DiT (dit_nano, dit_test)")
        if model.num_classes != num_classes:
            raise ConfigError(f"the DiT was built for {model.num_classes} classes but the data has {num_classes}: "
                              f"build it with num_classes={num_classes}")
        super().__init__(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        labels = self.drop_labels(batch["label"])
        loss, _ = rectified_flow_loss(self.model, batch["image"], labels, t_sampling=self.cfg.t_sampling)
        return {"loss": loss}

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per-image flow loss of ``model`` (default ``self.model``), conditional on the true labels,
        with times and noise from a generator seeded the same for every batch and evaluation."""
        model = model if model is not None else self.model
        g = torch.Generator().manual_seed(EVAL_SEED)
        _, per_sample = rectified_flow_loss(model, batch["image"], batch["label"], generator=g,
                                            t_sampling=self.cfg.t_sampling)
        return {"loss": per_sample}

    @torch.no_grad()
    def sample(self, labels: Tensor, *, model: nn.Module | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] of classes ``labels`` (id ``num_classes`` = no class),
        integrated in ``steps`` (default ``sample_steps``) with ``cfg.sampler`` and ``guidance``
        (default ``cfg.guidance``; 1 plain conditional, 0 unconditional)."""
        model = model if model is not None else self.model
        steps = self.cfg.sample_steps if steps is None else steps
        guidance = self.cfg.guidance if guidance is None else guidance
        return flow_sample(model, labels, steps=steps, method=self.cfg.sampler, guidance=guidance,
                           generator=generator)

    def papers(self) -> list[str]:
        return ["Peebles & Xie 2023, Scalable Diffusion Models with Transformers (DiT, adaLN-Zero)",
                "Liu et al. 2022, Flow Straight and Fast (rectified flow)",
                "Esser et al. 2024, Scaling Rectified Flow Transformers (SD3: t=0 data, logit-normal t)"]


__all__ = ["DiTConfig", "DiTObjective"]
