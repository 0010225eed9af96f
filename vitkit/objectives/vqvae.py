"""VQ-VAE (van den Oord et al. 2017): train an image tokenizer to reconstruct its input through its codebook.

``loss = recon(x_hat, x) + loss_vq [+ perceptual * P(x_hat, x)]`` where ``loss_vq`` is the
tokenizer's codebook + commitment loss (commitment only with an EMA codebook, whose codes move
by moving averages inside the tokenizer's training forward). The model is a
:class:`~vitkit.generate.tokenizer.VQTokenizer` (``model.name=vq_nano``, ``msvq_nano``, ...);
the run exports it. Images are in [-1, 1].

The reconstruction term defaults to ``l2``, the mean squared error: VQ-VAE's Gaussian
likelihood, and the quantity the evaluation reports (``recon_mse``); ``l1`` is VQGAN's. The
optional perceptual term (off by default) compares the feature maps of a frozen vitkit backbone
(``objective.perceptual_model``: a run, a weights file) for the reconstruction and the
original, in LPIPS's form without its learned weights: per layer, the spatial mean of the squared
difference of channel-normalised features, summed over the layers. The backbone is recorded by
source and sha256, like a distillation teacher, and not saved in checkpoints.

Metrics: ``recon_mse``, ``usage`` (share of the codes used in the batch), ``perplexity``; the
evaluation reports the validation set's mean ``recon_mse`` (primary, lower is better) and the
codebook ``usage`` and ``perplexity`` over the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum
from ..engine.evaluators import MeanEvaluator
from ..errors import ConfigError, PathNotFoundError, VitkitError
from .base import Objective
from .registry import register_objective
from .teacher import TeacherInput, load_teacher

RECON_LOSSES = ("l1", "l2")


@dataclass
class VQVAEConfig:
    """``objective.*`` keys of ``vqvae``."""

    recon: str = "l2"  # the reconstruction loss: l2 (VQ-VAE's) or l1 (VQGAN's)
    perceptual: float = 0.0  # weight of the perceptual term; > 0 needs perceptual_model
    perceptual_model: str | None = None  # a vitkit backbone: a run dir or a weights file written by vitkit
    perceptual_layers: int = 3  # the backbone's last n feature points compared

    def __post_init__(self):
        if self.recon not in RECON_LOSSES:
            raise ConfigError(f"objective.recon={self.recon!r} is not one of {', '.join(RECON_LOSSES)}")
        if self.perceptual < 0:
            raise ConfigError(f"objective.perceptual must be >= 0, got {self.perceptual}")
        if self.perceptual > 0 and not self.perceptual_model:
            raise ConfigError(
                "objective.perceptual > 0 needs objective.perceptual_model=<a vitkit run dir or weights file> "
                "whose features it compares; or set objective.perceptual=0"
            )
        if self.perceptual_layers < 1:
            raise ConfigError(f"objective.perceptual_layers must be >= 1, got {self.perceptual_layers}")


class PerceptualLoss(nn.Module):
    """A frozen backbone's feature distance between two image batches in [-1, 1] (LPIPS's form, no learned weights).

    Images are mapped to the backbone's own input (size, channels, mean/std) by a
    :class:`~vitkit.objectives.teacher.TeacherInput`; gradients flow to the first argument only.
    """

    def __init__(self, net: nn.Module, in_chans: int, layers: int = 3):
        super().__init__()
        card = getattr(net, "card", None)
        if card is None or not callable(getattr(net, "forward_intermediates", None)):
            raise ConfigError(
                f"objective.perceptual_model must be a vitkit backbone with feature maps (forward_intermediates); "
                f"{type(net).__name__} is not"
            )
        half = torch.full((in_chans,), 0.5)
        teacher_norm = (torch.tensor(card.mean, dtype=torch.float32), torch.tensor(card.std, dtype=torch.float32))
        self.input = TeacherInput((half, half), teacher_norm, tuple(card.input_size[1:]), card.input_size[0])
        self.net = net.eval().requires_grad_(False)
        # At most the backbone's own feature points (a shallow test backbone has two).
        self.layers = min(layers, len(getattr(net, "feature_info", ())) or layers)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, whatever the caller asks

    def _features(self, x: Tensor) -> list[Tensor]:
        feats = self.net.forward_intermediates(self.input(x), indices=self.layers, intermediates_only=True)
        return [f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10) for f in feats]  # unit norm over channels

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            ft = self._features(target)
        fr = self._features(recon)
        return sum((a - b).square().sum(1).mean() for a, b in zip(fr, ft))


class VQEvaluator(MeanEvaluator):
    """Mean ``recon_mse`` (primary, lower is better) and ``loss``, plus the codebook's ``usage`` (share
    of the codes used at least once over the whole set) and ``perplexity`` of the codes' frequencies."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        super().__init__(primary="recon_mse", higher_is_better=False)

    def reset(self) -> None:
        super().reset()
        self.hits: Tensor | None = None

    def update(self, batch: dict, outputs: dict) -> None:
        outputs = dict(outputs)
        hits = outputs.pop("code_hits").detach().double()  # (K,) this batch's code counts
        self.hits = hits if self.hits is None else self.hits + hits.to(self.hits.device)
        super().update(batch, outputs)

    def compute(self) -> dict[str, float]:
        out = super().compute()
        hits = self.hits if self.hits is not None else torch.zeros(self.codebook_size, dtype=torch.float64)
        hits = all_reduce_sum(hits.clone())
        if hits.sum() > 0:
            p = hits / hits.sum()
            out["usage"] = (hits > 0).double().mean().item()
            out["perplexity"] = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()).item()
        return out


def _code_hits(indices, codebook_size: int) -> Tensor:
    """(K,) how often each code occurs in ``indices`` (a tensor or a list of per-scale tensors)."""
    flat = torch.cat([i.flatten() for i in indices]) if isinstance(indices, (list, tuple)) else indices.flatten()
    return torch.bincount(flat, minlength=codebook_size)


@register_objective("vqvae", VQVAEConfig)
class VQVAE(Objective):
    """Reconstruction through the codebook for a :class:`~vitkit.generate.tokenizer.VQTokenizer`.

    Args:
        model: the tokenizer (``kind == "tokenizer"``).
        recon: "l2" (mean squared error, VQ-VAE's) or "l1" (VQGAN's).
        perceptual: weight of the perceptual term (0: off).
        perceptual_net, perceptual_ref: the frozen backbone and its ``{"source", "model", "sha256"}``.
        perceptual_layers: how many of the backbone's last feature points are compared.
    """

    def __init__(self, model: nn.Module, recon: str = "l2", perceptual: float = 0.0,
                 perceptual_net: nn.Module | None = None, perceptual_ref: dict | None = None,
                 perceptual_layers: int = 3):
        super().__init__()
        if getattr(model, "kind", None) != "tokenizer":
            raise ConfigError(
                f"objective vqvae trains an image tokenizer (model.name=vq_nano, msvq_nano, ...); "
                f"{getattr(model, 'model_name', type(model).__name__)} is not one"
            )
        if recon not in RECON_LOSSES:
            raise ConfigError(f"objective.recon={recon!r} is not one of {', '.join(RECON_LOSSES)}")
        if perceptual > 0 and perceptual_net is None:
            raise ConfigError("a perceptual weight > 0 needs the perceptual backbone (objective.perceptual_model)")
        self.model = model
        self.recon = recon
        self.perceptual_weight = float(perceptual)
        self.perceptual = PerceptualLoss(perceptual_net, model.in_chans, perceptual_layers) if perceptual > 0 else None
        self.perceptual_ref = perceptual_ref

    @classmethod
    def from_config(cls, model: nn.Module, cfg: VQVAEConfig, **_) -> VQVAE:
        net = ref = None
        if cfg.perceptual > 0:
            try:
                net, ref = load_teacher(cfg.perceptual_model)
            except VitkitError as e:  # the loader speaks of the teacher; this objective's key is another
                msg = str(e).replace("objective.teacher_model", "a vitkit weights file").replace(
                    "objective.teacher", "objective.perceptual_model")
                raise (PathNotFoundError if isinstance(e, PathNotFoundError) else ConfigError)(msg) from None
        return cls(model, cfg.recon, cfg.perceptual, net, ref, cfg.perceptual_layers)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"perceptual": self.perceptual} if self.perceptual is not None else {}

    def references(self) -> dict[str, dict]:
        return {"perceptual": dict(self.perceptual_ref)} if self.perceptual is not None and self.perceptual_ref else {}

    def papers(self) -> list[str]:
        return ["van den Oord et al. 2017, Neural Discrete Representation Learning (VQ-VAE)",
                "Razavi et al. 2019, VQ-VAE-2 (EMA codebook)", "Tian et al. 2024, VAR (multi-scale residual quantiser)"]

    # ------------------------------------------------------------------ training

    def _recon_loss(self, recon: Tensor, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss (B,)."""
        diff = recon.float() - x.float()
        per = diff.abs() if self.recon == "l1" else diff.square()
        return per.flatten(1).mean(1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"]
        out = self.model(x)
        recon = out["recon"]
        rec = self._recon_loss(recon, x).mean()
        loss = rec + out["loss_vq"]
        metrics = {"loss_recon": rec.detach(), "loss_vq": out["loss_vq"].detach()}
        if self.perceptual is not None:
            p = self.perceptual(recon.float(), x.float())
            loss = loss + self.perceptual_weight * p
            metrics["loss_perceptual"] = p.detach()
        mse = F.mse_loss(recon.detach().float(), x.float())
        return {"loss": loss, **metrics, "recon_mse": mse, "usage": out["usage"].detach(),
                "perplexity": out["perplexity"].detach()}

    # ------------------------------------------------------------------ evaluation

    def evaluator(self) -> VQEvaluator:
        return VQEvaluator(self.model.codebook_size)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Per image: ``recon_mse`` and ``loss`` (B,); ``code_hits`` (K,) for the set's codebook usage.

        ``model`` (the EMA copy) stands in for ``self.model``; it runs in eval mode, so the
        codebook is left as it is.
        """
        model = model if model is not None else self.model
        was = model.training
        model.eval()
        try:
            x = batch["image"]
            out = model(x)
        finally:
            model.train(was)
        recon = out["recon"].float()
        mse = (recon - x.float()).square().flatten(1).mean(1)  # (B,)
        loss = self._recon_loss(recon, x) + out["loss_vq"].float()
        return {"recon_mse": mse, "loss": loss, "code_hits": _code_hits(out["indices"], model.codebook_size)}


__all__ = ["PerceptualLoss", "RECON_LOSSES", "VQEvaluator", "VQVAE", "VQVAEConfig"]
