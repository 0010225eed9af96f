"""What every self-supervised objective shares: the k-NN evaluator, the run's progress, frozen copies.

Each method (``mae``, ``dino``, ``ibot``, ``simclr``, ``mocov3``) subclasses
:class:`SelfSupervised`, reaches the backbone through its public API only (``embed``,
``forward_tokens``, ``forward_features``, ``forward_head(pre_logits=True)``,
``reset_classifier``) and may declare the data pipeline it needs (:meth:`train_pipeline`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..engine.evaluators import Evaluator, KNNEvaluator
from ..errors import ConfigError
from .base import Objective, StepContext


def backbone_features(model: nn.Module, x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D): the backbone's pooled, normalised features (what a classifier would see)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the start of an EMA teacher / momentum encoder."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0 to ``end`` at 1 along half a cosine (DINO's momentum and weight-decay schedules)."""
    progress = min(1.0, max(0.0, progress))
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


@contextmanager
def batch_statistics(module: nn.Module, active: bool = True):
    """Run ``module`` (an EMA teacher, a momentum encoder or projector) with its BatchNorms in train mode.

    The reference implementations (DINO, iBOT, MoCo v3) never put the teacher or momentum
    encoder in eval mode while training: its BatchNorms normalise with the batch's statistics and
    their running statistics follow its own forward passes (the EMA averages parameters only).
    The running statistics are what the exported teacher normalises with at evaluation, so a
    frozen copy kept in eval mode would carry its initial 0 / 1 forever. Only the BatchNorms
    switch: dropout and drop-path stay off, as in the reference teachers (built without drop
    path). Their modes are restored afterwards; ``active=False`` (an objective in eval mode)
    changes nothing.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
    if not active:
        norms = []
    for m in norms:
        m.train()
    try:
        yield module
    finally:
        for m in norms:
            m.eval()


@torch.no_grad()
def stem_mixes_patches(model: nn.Module) -> bool:
    """True when a patch token of ``model.embed`` depends on pixels outside its own patch.

    Found through the public token path, whatever the family: the pixels of one patch in the
    middle of the grid are changed and every other patch token is compared (conv stems, hybrid
    ResNet stems and overlapping patch embeddings all change their neighbours). Eval mode, a
    private generator and no state change: the run's random stream and BatchNorm statistics are
    untouched.
    """
    card = getattr(model, "card", None)
    in_chans, h, w = card.input_size if card is not None else (getattr(model, "in_chans", 3), 32, 32)
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, in_chans, h, w, generator=g)
    was = model.training
    model.eval()
    try:
        _, ctx = model.embed(x[:1].to(param.device, param.dtype))
        gh, gw = ctx.grid
        if gh * gw < 2:
            return False
        ph, pw = h // gh, w // gw
        i, j = gh // 2, gw // 2
        y = x[:1].clone()
        y[..., i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = x[1:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
        a, _ = model.embed(x[:1].to(param.device, param.dtype))
        b, _ = model.embed(y.to(param.device, param.dtype))
    finally:
        model.train(was)
    p = ctx.num_prefix_tokens
    others = torch.ones(gh * gw, dtype=torch.bool)
    others[i * gw + j] = False
    a, b = a[0, p:][others].float(), b[0, p:][others].float()
    return bool((a - b).abs().max() > 1e-5 * (1 + a.abs().max()))


def check_patch_local_stem(model: nn.Module, method: str, allow: bool) -> None:
    """A masked objective must not see what it hides: raise unless the stem is patch-local or ``allow``."""
    if not (callable(getattr(model, "embed", None)) and callable(getattr(model, "forward_tokens", None))):
        raise TypeError(f"{method} masks patch tokens, so it needs a backbone with embed() and forward_tokens(); "
                        f"{type(model).__name__} has none: pick a ViT-family model")
    if allow or not stem_mixes_patches(model):
        return
    card = getattr(model, "card", None)
    name = getattr(card, "name", None) or type(model).__name__
    raise ConfigError(
        f"{method} masks patches, but the stem of {name} mixes neighbouring patches (a conv stem, a hybrid "
        f"ResNet stem or an overlapping patch embedding), so visible tokens carry pixels of the masked ones "
        f"and the task leaks its answer. Use a patch-local stem (e.g. model.args.conv_stem=false, or a plain "
        f"ViT), or set objective.allow_mixing_stem=true to train anyway"
    )


def freeze_patch_projection(model: nn.Module) -> bool:
    """Freeze the backbone's patch projection (MoCo v3's random patch projection); False when it has none.

    The projection is ``patch_embed.proj`` (timm's key) when it is the layer that sees the pixels:
    a convolution whose kernel equals its stride, on the image's channels, with no stem before it.
    A conv stem, a hybrid ResNet or an overlapping embedding has no such layer.
    """
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    stem = getattr(embed, "stem", None)
    in_chans = getattr(model, "in_chans", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride:
        return False
    if (stem is not None and not isinstance(stem, nn.Identity)) or hasattr(embed, "backbone"):
        return False
    if in_chans is not None and proj.in_channels != in_chans:
        return False
    proj.requires_grad_(False)
    return True


class _NoLabels(Evaluator):
    """Stands in for k-NN when the run has no labelled feature bank: reports nothing."""

    primary = "knn_acc"
    higher_is_better = True

    def update(self, batch: dict, outputs: dict) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}


class SelfSupervised(Objective):
    """Base of the self-supervised objectives.

    Args:
        model: the backbone; its classifier is removed (``reset_classifier(0)``): nothing trains it,
            and a parameter without gradients would stop DDP.
        num_classes: classes of the labelled bank for k-NN (0: no k-NN).
        bank_loader: labelled loader (train split, eval transform) whose features form the k-NN
            bank; the evaluator then reports ``knn_acc`` on the validation set, and ``best/``
            follows it.
        knn_k: neighbours for the in-training k-NN (cosine, weights ``exp(sim / 0.07)``).
        weight_decay_end: when set, each step moves the weight decay of every decayed param
            group along a cosine from its start value to this (DINO: 0.04 -> 0.4).

    Buffers (checkpointed, so a resumed run continues the same schedules): ``progress`` (0..1
    of the run, following the lr schedule's clock, budget included) and ``step``.
    """

    def __init__(self, model: nn.Module, num_classes: int = 0, bank_loader=None, knn_k: int = 20,
                 weight_decay_end: float | None = None):
        super().__init__()
        if callable(getattr(model, "reset_classifier", None)):
            model.reset_classifier(0)
            # What the saved weights say about the model must match: a feature extractor.
            if isinstance(getattr(model, "model_args", None), dict):
                model.model_args = {**model.model_args, "num_classes": 0}
            if dataclasses.is_dataclass(getattr(model, "card", None)):
                model.card = dataclasses.replace(model.card, num_classes=0)
        self.model = model
        self.num_classes = num_classes
        self.bank_loader = bank_loader
        self.knn_k = knn_k
        self.weight_decay_end = weight_decay_end
        self._wd_start: list[float] | None = None
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)

    # ------------------------------------------------------------------ data the method needs

    @classmethod
    def train_pipeline(cls, cfg, model: nn.Module, img_size: int, in_chans: int, mean, std):
        """``(sample_transform, batch_transform)`` for training, or None for the run's default.

        ``sample_transform(img, rng)`` runs in the loader workers (a list return becomes
        ``batch["views"]``); ``batch_transform(batch)`` runs on the device and normalises.
        """
        return None

    # ------------------------------------------------------------------ schedules

    def on_step_end(self, ctx: StepContext) -> None:
        sched = getattr(ctx.trainer, "scheduler", None)
        p = sched.progress() if callable(getattr(sched, "progress", None)) else ctx.step / max(1, ctx.total_steps)
        self.progress.fill_(min(1.0, p))
        self.step.fill_(ctx.step)
        if self.weight_decay_end is not None:
            self._schedule_weight_decay(ctx.optimizer)

    def _schedule_weight_decay(self, optimizer) -> None:
        groups = optimizer.param_groups
        if self._wd_start is None or len(self._wd_start) != len(groups):
            # The configured values; after a resume the groups hold scheduled ones, which are not starts.
            self._wd_start = [g.get("initial_weight_decay", g["weight_decay"]) for g in groups]
            for g, wd in zip(groups, self._wd_start):
                g.setdefault("initial_weight_decay", wd)
        p = float(self.progress)
        for g, wd in zip(groups, self._wd_start):
            if wd > 0:  # groups without decay (norms, biases) keep none
                g["weight_decay"] = cosine_ramp(wd, self.weight_decay_end, p)

    # ------------------------------------------------------------------ evaluation

    def evaluator(self):
        if self.bank_loader is None or self.num_classes < 1:
            return _NoLabels()
        return KNNEvaluator(self.num_classes, k=self.knn_k, temperature=0.07, bank_loader=self.bank_loader)

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Features of the network the run exports (DINO: the teacher), or of ``model`` (the EMA copy).

        Nothing without a labelled bank: no evaluator would read them.
        """
        if self.bank_loader is None or self.num_classes < 1:
            return {}
        net = self.export_model() if model is None or model is self.model else model
        return {"features": backbone_features(net, batch["image"]).float()}


def context_kwargs(context: dict, knn: bool = True) -> dict:
    """The run context every self-supervised objective takes from ``build_objective``."""
    return {"num_classes": context.get("num_classes", 0) or 0, "bank_loader": context.get("bank_loader") if knn else None}
