"""Connector training (``vlm_connector``): LLaVA's stage 1, the projector learns to caption.

The model is a :class:`~vitkit.vlm.VisionLanguageModel`; its image encoder and LM stay frozen
(unless the model was built with them unfrozen), so the optimizer sees the projector only. The
loss is the LM's next-token cross entropy over the caption tokens; validation reports caption
perplexity (primary ``ppl``, lower is better) from summed token log-likelihoods, not an average
of batch means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum
from ..engine.evaluators import Evaluator
from ..errors import ConfigError, DataError
from .base import Objective
from .registry import register_objective


@dataclass
class VlmConnectorConfig:
    """``objective.*`` keys of ``vlm_connector``.

    ``all_captions``: at validation, score every caption of an image (``batch["captions"]``), not
    only ``batch["caption"]``.
    """

    all_captions: bool = True


class PerplexityEvaluator(Evaluator):
    """Caption perplexity: exp(summed token NLL / token count) over the set; ``ppl`` and ``nll``.

    ``outputs`` carry ``nll_sum`` and ``n_tokens`` per batch. Primary ``ppl``, lower is better.
    """

    primary = "ppl"
    higher_is_better = False

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.nll = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, batch: dict, outputs: dict) -> None:
        self.nll = self.nll.to(outputs["nll_sum"].device) + outputs["nll_sum"].detach().double()
        self.count = self.count.to(self.nll.device) + outputs["n_tokens"].detach().double()

    def compute(self) -> dict[str, float]:
        packed = all_reduce_sum(torch.stack([self.nll, self.count]))
        nll, n = packed[0].item(), packed[1].item()
        if n == 0:
            return {}
        return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


@register_objective("vlm_connector", VlmConnectorConfig)
class VlmConnector(Objective):
    """Trains a :class:`~vitkit.vlm.VisionLanguageModel`'s projector on captioned images.

    ``batch["image"]`` (normalised by the engine) and ``batch["caption"]`` (list of str, tokenized
    with the model's tokenizer) or ``batch["input_ids"]`` (+ ``attention_mask``, ``labels``).
    """

    def __init__(self, model: nn.Module, all_captions: bool = True):
        super().__init__()
        if not (hasattr(model, "projector") and hasattr(model, "lm") and hasattr(model, "image_encoder")):
            raise ConfigError(f"objective.name=vlm_connector trains a vitkit.vlm.VisionLanguageModel, "
                              f"not {type(model).__name__}")
        self.model = model
        self.all_captions = all_captions

    @classmethod
    def from_config(cls, model: nn.Module, cfg: VlmConnectorConfig, **_) -> VlmConnector:
        return cls(model, cfg.all_captions)

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {}
        if self.model.freeze_encoder:
            frozen["model.image_encoder"] = self.model.image_encoder
        if self.model.freeze_lm:
            frozen["model.lm"] = self.model.lm
        return frozen

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "image" not in batch:
            raise DataError(f"a vlm_connector batch needs 'image'; it has {sorted(batch)}")
        out = self.model(batch["image"], **self.model.batch_inputs(batch))
        return {"loss": out["loss"], "tokens": out["n_tokens"].detach().float()}

    def evaluator(self):
        return PerplexityEvaluator()

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        model = model if model is not None else self.model
        device = model.projector.fc1.weight.device
        if self.all_captions and "captions" in batch and "input_ids" not in batch:
            groups = batch["captions"]
            owner = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=device)
            text = model.batch_inputs({"caption": [c for g in groups for c in g]}, device)
            out = model(None, **text, features=model.features(batch["image"])[owner])
        else:
            out = model(batch["image"], **model.batch_inputs(batch, device))
        return {"nll_sum": out["nll_sum"], "n_tokens": out["n_tokens"]}

    def papers(self) -> list[str]:
        return ["Liu et al. 2023, Visual Instruction Tuning (LLaVA); Liu et al. 2024, Improved Baselines with "
                "Visual Instruction Tuning (LLaVA-1.5)"]

