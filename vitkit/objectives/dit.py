"""DiT trained as a rectified flow (``objective.name=dit``): Peebles & Xie 2023's network, SD3's flow.

Each training image ``x0`` is mixed with Gaussian noise at a time t drawn per image,
``x_t = (1 - t) x0 + t noise``, and the DiT regresses the velocity ``noise - x0`` (mean squared
error; :func:`vitkit.generate.dit.rectified_flow_loss`). A ``class_dropout`` share of the labels
is replaced by the null class so that one network also learns the unconditional velocity, which
classifier-free guidance needs. Samples integrate the flow from noise at t = 1 to t = 0
(:func:`vitkit.generate.dit.flow_sample`, Euler or Heun) with guidance on the velocity,
``u + guidance * (c - u)``.

``space``: the flow runs on the pixels in [-1, 1] (``pixels``), or, as DiT itself does on a
latent-diffusion autoencoder, on the latents of a frozen VQ tokenizer (``latent``,
``objective.tokenizer=<tokenizer run>``): the encoder's continuous output before quantisation
(``VQTokenizer.encode_latent``), divided by the standard deviation of the tokenizer's codes so the
data has about unit scale, as latent diffusion rescales its latents. A sampled latent is
multiplied back, quantised and decoded: latent diffusion trains on the pre-quantisation latents
of a VQ autoencoder and counts the quantiser as part of the decoder. The scale comes from the
codebook, not from a batch, so it is fixed by the tokenizer's weights (recorded by sha256) and
needs nothing saved. The DiT is then built on the latent grid: ``img_size = tokenizer.grid``,
``in_chans = tokenizer.embed_dim`` and a patch size that divides the grid (1 for a 7 x 7 grid).

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

SPACES = ("pixels", "latent")
EVAL_SEED = 0


@dataclass
class DiTConfig(GenerativeConfig):
    """``objective.*`` keys of ``dit`` (besides :class:`GenerativeConfig`'s).

    ``space``: what the flow runs on, ``pixels`` or ``latent`` (the pre-quantisation latents of
    ``objective.tokenizer``). ``t_sampling``: how training times are drawn, ``uniform`` (rectified
    flow) or ``logit_normal`` (SD3: t = sigmoid(N(0, 1)), more weight in the middle of the path).
    ``sampler``: ``euler`` (one network call per step) or ``heun`` (two). ``guidance`` defaults
    to 1.5, the scale of DiT's reported FID; ``sample_steps`` to 32 integration steps.
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
        tokenizer, tokenizer_ref: the frozen VQ tokenizer and its reference (``space=latent`` only).
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
        latent_scale = 1.0
        if cfg.space == "latent":
            latent_scale = _check_latent(model, tokenizer)
        elif tokenizer is not None:
            raise ConfigError("objective.tokenizer is only used by the dit objective with objective.space=latent: "
                              "drop objective.tokenizer to train on pixels, or set objective.space=latent")
        super().__init__(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)
        self.latent_scale = latent_scale

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the data the flow runs on: themselves (pixels), or the tokenizer's
        pre-quantisation latents times ``latent_scale`` (B, embed_dim, grid, grid)."""
        if self.cfg.space == "pixels":
            return images
        return self.tokenizer.encode_latent(images).float() * self.latent_scale

    def forward(self, batch: dict) -> dict[str, Tensor]:
        labels = self.drop_labels(batch["label"])
        loss, _ = rectified_flow_loss(self.model, self.encode(batch["image"]), labels, t_sampling=self.cfg.t_sampling)
        return {"loss": loss}

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per-image flow loss of ``model`` (default ``self.model``), conditional on the true labels,
        with times and noise from a generator seeded the same for every batch and evaluation."""
        model = model if model is not None else self.model
        g = torch.Generator().manual_seed(EVAL_SEED)
        _, per_sample = rectified_flow_loss(model, self.encode(batch["image"]), batch["label"], generator=g,
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
        pixels = self.cfg.space == "pixels"
        x = flow_sample(model, labels, steps=steps, method=self.cfg.sampler, guidance=guidance,
                        generator=generator, clamp=pixels)
        if pixels:
            return x
        tok = self.tokenizer
        z = x.float() / self.latent_scale  # (B, embed_dim, grid, grid)
        quant = tok.quantizer(z.to(next(tok.parameters()).dtype))["quant"]
        return tok.decode_latent(quant).clamp(-1, 1)

    def papers(self) -> list[str]:
        return ["Peebles & Xie 2023, Scalable Diffusion Models with Transformers (DiT, adaLN-Zero)",
                "Liu et al. 2022, Flow Straight and Fast (rectified flow)",
                "Esser et al. 2024, Scaling Rectified Flow Transformers (SD3: t=0 data, logit-normal t)",
                "Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models (latents)"]


def _check_latent(model: nn.Module, tokenizer: nn.Module | None) -> float:
    """The latent scale (1 / std of the tokenizer's codes) after checking that ``model`` fits its latents."""
    if tokenizer is None or not callable(getattr(tokenizer, "encode_latent", None)):
        raise ConfigError("objective.space=latent trains the DiT on a VQ tokenizer's latents: set "
                          "objective.tokenizer to a tokenizer run (objective.name=vqvae) or its weights file")
    grid, dim = tokenizer.grid, tokenizer.embed_dim
    if (model.img_size, model.in_chans) != (grid, dim):
        raise ConfigError(f"the tokenizer's latents are {dim} x {grid} x {grid} but the DiT takes {model.in_chans} x "
                          f"{model.img_size} x {model.img_size}: build it with img_size={grid}, in_chans={dim} and a "
                          f"patch_size dividing {grid}")
    with torch.no_grad():
        codes = tokenizer.embed_indices(torch.arange(tokenizer.codebook_size, device=next(tokenizer.parameters()).device))
        std = codes.float().std().item()  # (K, D) codes: the spread of what the encoder is pulled towards
    if not std > 0:
        raise ConfigError("the tokenizer's codebook has no spread (all codes equal): is it trained? "
                          "objective.space=latent needs a trained tokenizer")
    return 1.0 / std


__all__ = ["DiTConfig", "DiTObjective"]
