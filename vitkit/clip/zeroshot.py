"""Zero-shot classification with a two-tower model: a classifier made of class names in prompt templates.

CLIP's recipe: each class name is put into every template, the captions are embedded and
normalised, averaged over the templates and normalised again; an image is scored against those
class embeddings with the model's own logit scale (and bias, for SigLIP), and the best class wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum
from ..engine.evaluators import Evaluator
from ..errors import ConfigError

# A few of CLIP's ImageNet prompt templates; "{}" is where the class name goes.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
)


def fill_template(template: str, name: str) -> str:
    """``template`` with the class name in place of ``{}`` (or ``{class}``)."""
    for slot in ("{}", "{class}"):
        if slot in template:
            return template.replace(slot, name)
    raise ConfigError(f"the prompt template {template!r} has no '{{}}' for the class name: write e.g. 'a photo of a {{}}.'")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def zeroshot_classifier(model: nn.Module, classnames, templates=TEMPLATES, batch_size: int = 256) -> Tensor:
    """(C, E) unit-norm class embeddings: per class, the mean of its normalised template embeddings, renormalised.

    Args:
        model: a two-tower model (``tokenize``, ``encode_text``); used as it is (eval mode is the
            caller's choice).
        classnames: the C class names, as they should read in a caption ("golden retriever").
        templates: prompt templates with ``{}`` for the name.
        batch_size: captions embedded per forward pass.
    """
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ConfigError("zero-shot classification needs at least one class name")
    if not templates:
        raise ConfigError("zero-shot classification needs at least one prompt template, e.g. 'a photo of a {}.'")
    texts = [fill_template(t, name) for name in classnames for t in templates]
    dev = _device(model)
    embeds = []
    for s in range(0, len(texts), batch_size):
        tokens = model.tokenize(texts[s:s + batch_size]).to(dev)
        embeds.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_template = torch.cat(embeds).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(1), dim=-1)


def _logit_scale(model: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        top = getattr(model, "max_logit_scale", None)
        scale = (scale.clamp(max=top) if top is not None else scale).exp().float()
    bias = getattr(model, "logit_bias", None)
    return scale, (bias.float() if bias is not None else None)


@torch.no_grad()
def zeroshot_logits(model: nn.Module, image_embeds: Tensor, classifier: Tensor) -> Tensor:
    """(B, C) logits of image embeddings (normalised or not) against a :func:`zeroshot_classifier`."""
    sim = F.normalize(image_embeds.float(), dim=-1) @ classifier.to(image_embeds.device).float().T
    scale, bias = _logit_scale(model)
    logits = sim * scale if scale is not None else sim
    return logits + bias if bias is not None else logits


@torch.no_grad()
def zeroshot_predict(model: nn.Module, images: Tensor, classifier: Tensor) -> Tensor:
    """(B, C) logits of ``images`` (B, 3, H, W), normalised as the model expects, for each class.

    The model's scaled cosine similarity (plus its bias): a softmax of these is a CLIP model's class
    probabilities, a sigmoid a SigLIP model's.
    """
    return zeroshot_logits(model, model.encode_image(images), classifier)


class ZeroShotEvaluator(Evaluator):
    """Zero-shot top-1 / top-5 accuracy (``acc1`` primary, ``acc5``) of ``batch["label"]`` (-1: no label, skipped).

    The classifier is built from the class names once per pass (after ``reset``), with the model being
    evaluated (``begin``, called by the evaluation loop, which may pass the EMA copy), else with
    ``model`` on the first batch. Image embeddings come from ``outputs["image_embeds"]`` when the
    objective gives them, else from the model.
    """

    primary = "acc1"
    higher_is_better = True

    def __init__(self, model: nn.Module, classnames, templates=TEMPLATES):
        self.model, self.classnames, self.templates = model, list(classnames), list(templates)
        for t in self.templates:
            fill_template(t, "x")
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        # Rebuilt for every pass: the text tower changes between evaluations of a training run.
        self.classifier: Tensor | None = None
        self._scorer = self.model

    def begin(self, objective, model, prepare) -> None:
        self._use(model if model is not None else self.model)

    def _use(self, model: nn.Module) -> None:
        self.classifier = zeroshot_classifier(model, self.classnames, self.templates)
        self._scorer = model

    @torch.no_grad()
    def update(self, batch: dict, outputs: dict) -> None:
        if self.classifier is None:
            self._use(self.model)
        label = batch.get("label")
        if label is None:
            return
        label = torch.as_tensor(label).flatten()
        embeds = outputs.get("image_embeds") if outputs else None
        if embeds is None:
            embeds = self._scorer.encode_image(batch["image"])
        logits = zeroshot_logits(self._scorer, embeds, self.classifier)
        label = label.to(logits.device)
        known = label >= 0
        top = logits[known].topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == label[known][:, None]
        self.counts += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(), known.sum().item()],
                                    dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        total = all_reduce_sum(self.counts.clone())
        if total[2] == 0:
            return {}
        return {"acc1": (total[0] / total[2]).item(), "acc5": (total[1] / total[2]).item()}
