"""Image-text contrastive objectives for two-tower models: ``clip`` (Radford et al., 2021) and ``siglip``
(Zhai et al., 2023).

Both train a two-tower model (``vitkit.clip.TwoTower``: ``forward(images, tokens)`` returns normalised
``image_embeds`` and ``text_embeds``, the exponentiated, clamped ``logit_scale`` and ``logit_bias``) on
caption batches: ``batch["image"]`` with one caption per image, ``batch["caption"]`` (list of str,
tokenized with ``model.tokenize``) or ``batch["text"]`` (token ids). Both are exact under DDP: the loss
and the gradients of N processes equal those of one process on the global batch (every process must
hold the same number of pairs, as ``drop_last`` loaders give).

- ``clip``: softmax cross-entropy of the scaled cosine similarities, image->text and text->image,
  averaged (CLIP's pseudo-code; open_clip's ``ClipLoss``).
- ``siglip``: ``-1/B * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b))`` with z = +1 for a matching
  pair and -1 otherwise, summed over every text of the global batch and divided by the local batch size
  (big_vision, open_clip's ``SigLipLoss``).

Evaluation: image-text retrieval recall@1/5/10 both ways on the validation batches (every caption of
``batch["captions"]`` is a query), plus zero-shot accuracy when the run knows class names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.distributed import all_gather_with_grad, get_rank, get_world_size, is_dist
from ..engine.evaluators import Evaluator
from ..errors import ConfigError, DataError
from .base import Objective
from .registry import register_objective

# ---------------------------------------------------------------- distributed pieces


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


def _gather_local_grad(x: Tensor) -> Tensor:
    """Every process's ``x`` concatenated in rank order, the gradient flowing to this process's slice only.

    Every process computes the same global loss, and DDP averages the parameters' gradients over the
    W processes: with gradients only through its own slice, each process must send back W times that
    slice's gradient for the average to be the global loss's gradient.
    """
    world = get_world_size()
    parts = list(all_gather_with_grad(x.detach()).chunk(world))
    parts[get_rank()] = _ScaleGrad.apply(x, float(world))
    return torch.cat(parts)


def _p2p_shift(x: Tensor, send_to: int, recv_from: int) -> Tensor:
    buf = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to), dist.P2POp(dist.irecv, buf, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return buf


class _RingShift(torch.autograd.Function):
    """Send ``x`` to the next rank, return the previous rank's; the gradient travels back the other way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = get_rank(), get_world_size()
        return _p2p_shift(x, (rank + 1) % world, (rank - 1) % world)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        rank, world = get_rank(), get_world_size()
        # The received tensor belongs to the previous rank: its gradient goes back there, and the
        # next rank returns the gradient of what this rank sent it.
        return _p2p_shift(g, (rank - 1) % world, (rank + 1) % world)


def ring_shift(x: Tensor) -> Tensor:
    """The previous rank's ``x`` (ranks in a ring), differentiable: what SigLIP's chunked loss passes round."""
    if not is_dist():
        return x
    return _RingShift.apply(x)


# ---------------------------------------------------------------- the losses

_LOCAL_NEEDS_GRAD = (
    "objective.local_loss=true needs objective.gather_with_grad=true: without gradients through the gathered "
    "features each process would miss its own features' part in the other processes' losses"
)


def _in_float32(loss_fn):
    """Run a contrastive loss with autocast off. The ``.float()`` casts inside are not enough: under
    bf16 autocast the similarity matmul would round every logit to bf16 again (steps of 0.0625 at
    |logit| ~ 10, where SigLIP's logits start)."""

    @functools.wraps(loss_fn)
    def run(image_embeds: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(image_embeds.device.type, enabled=False):
            return loss_fn(image_embeds, *args, **kwargs)

    return run


@_in_float32
def clip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CLIP's symmetric InfoNCE over the global batch.

    Args:
        image_embeds, text_embeds: (B, E) normalised embeddings of this process's pairs (row i of each
            is a matching pair).
        logit_scale: the temperature's inverse, already exponentiated (and clamped by the model).
        logit_bias: added to every logit when given (softmax ignores it; open_clip adds it too).
        local_loss: each process scores only its own rows against every column of the global batch
            (B x N logits instead of N x N); the processes' losses average to the global loss.
        gather_with_grad: the gathered features carry gradients back to the process that owns them.
            False: gather without gradients and scale the own slice's gradient instead, which is exact
            only when every process computes the whole loss (``local_loss=False``).
        label_smoothing: of both cross-entropies (0: CLIP).

    Returns:
        The loss of this process. Under DDP the mean over processes (what gradient averaging
        optimises) is the loss of one process on the global batch, and so are the gradients.
    """
    img, txt = image_embeds.float(), text_embeds.float()
    scale = logit_scale.float()
    bias = None if logit_bias is None else logit_bias.float()
    if not is_dist():
        logits_i = scale * img @ txt.T
        logits_t = logits_i.T
        labels = torch.arange(img.shape[0], device=img.device)
    elif local_loss:
        if not gather_with_grad:
            raise ConfigError(_LOCAL_NEEDS_GRAD)
        all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
        logits_i = scale * img @ all_txt.T
        logits_t = scale * txt @ all_img.T
        labels = torch.arange(img.shape[0], device=img.device) + get_rank() * img.shape[0]
    else:
        gather = all_gather_with_grad if gather_with_grad else _gather_local_grad
        all_img, all_txt = gather(img), gather(txt)
        logits_i = scale * all_img @ all_txt.T
        logits_t = logits_i.T
        labels = torch.arange(all_img.shape[0], device=img.device)
    if bias is not None:
        logits_i, logits_t = logits_i + bias, logits_t + bias
    return (F.cross_entropy(logits_i, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits_t, labels, label_smoothing=label_smoothing)) / 2


def _sigmoid_term(img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor | None, positives: bool) -> Tensor:
    logits = scale * img @ txt.T
    if bias is not None:
        logits = logits + bias
    z = -torch.ones_like(logits)
    if positives:
        z = z + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(z * logits).sum()


@_in_float32
def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    *,
    chunked: bool = True,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss of this process's images against every text of the global batch.

    Args:
        image_embeds, text_embeds: (B, E) normalised embeddings of this process's pairs.
        logit_scale: exponentiated temperature t; logit_bias: b (None: no bias).
        chunked: the paper's all-device form: the processes pass their texts round a ring, and each
            chunk's loss (negatives only, after the own chunk) is added, so no process ever holds more
            than two chunks of texts. False gathers every text at once.

    Returns:
        ``-sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)) / B`` over this process's B images and every
        text j; the processes' mean is the one-process loss on the global batch.
    """
    img, txt = image_embeds.float(), text_embeds.float()
    scale = logit_scale.float()
    bias = None if logit_bias is None else logit_bias.float()
    b = img.shape[0]
    if not is_dist():
        return _sigmoid_term(img, txt, scale, bias, True) / b
    if chunked:
        loss = _sigmoid_term(img, txt, scale, bias, True)
        other = txt
        for _ in range(get_world_size() - 1):
            other = ring_shift(other)
            loss = loss + _sigmoid_term(img, other, scale, bias, False)
        return loss / b
    all_txt = all_gather_with_grad(txt)
    logits = scale * img @ all_txt.T
    if bias is not None:
        logits = logits + bias
    z = -torch.ones_like(logits)
    rows = torch.arange(b, device=img.device)
    z[rows, rows + get_rank() * b] = 1.0
    return -F.logsigmoid(z * logits).sum() / b


# ---------------------------------------------------------------- objectives


@dataclass
class _LockConfig:
    """LiT (Zhai et al., 2022, "locked-image tuning"): ``lock_image`` keeps a pretrained image tower as it
    is (no gradient, eval mode: its BatchNorm statistics and dropout too) while the text tower and the
    image projection (``visual_proj``) learn; ``lock_image_unlocked_blocks`` leaves the tower's last N
    blocks and what follows them (final norm, pooling) trainable. Off by default (CLIP and SigLIP train
    both towers). open_clip calls these ``--lock-image`` / ``--lock-image-unlocked-groups``."""

    lock_image: bool = False
    lock_image_unlocked_blocks: int = 0


@dataclass
class ClipConfig(_LockConfig):
    """``objective.*`` keys of ``clip`` (see :func:`clip_loss`; the lock: :class:`_LockConfig`)."""

    local_loss: bool = False
    gather_with_grad: bool = True
    label_smoothing: float = 0.0


@dataclass
class SiglipConfig(_LockConfig):
    """``objective.*`` keys of ``siglip`` (see :func:`siglip_loss`; the lock: :class:`_LockConfig`)."""

    chunked: bool = True


def caption_tokens(model: nn.Module, batch: dict, device: torch.device) -> Tensor:
    """The token ids of a batch's captions: ``batch["text"]`` as given, else ``model.tokenize(batch["caption"])``."""
    n = batch["image"].shape[0]
    if "text" in batch:
        tokens = batch["text"]
        if not (isinstance(tokens, Tensor) and tokens.ndim == 2 and tokens.shape[0] == n):
            raise DataError(
                f"batch['text'] must be token ids of shape (B, L) with B = {n} images, "
                f"got {tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
            )
        return tokens.to(device=device, dtype=torch.long)
    captions = batch.get("caption")
    if captions is None:
        raise DataError(
            f"a caption batch needs 'caption' (one str per image) or 'text' (token ids); this one has "
            f"{sorted(batch)}: train clip or siglip on image-text data (a JSONL/CSV listing with captions, "
            "WebDataset jpg+txt, or shapes-captions)"
        )
    if isinstance(captions, str) or len(captions) != n or not all(isinstance(c, str) for c in captions):
        got = "one str" if isinstance(captions, str) else f"{len(captions)} items"
        raise DataError(f"batch['caption'] must hold one str per image ({n} images), got {got}")
    return model.tokenize(list(captions)).to(device)


def _in_batch_accuracy(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    sim = img.detach().float() @ txt.detach().float().T
    target = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == target).float().mean(), (sim.argmax(0) == target).float().mean()


class _TwoTowerObjective(Objective):
    """What ``clip`` and ``siglip`` share: the model check, the batch, the metrics, the evaluator."""

    objective_name = ""

    def __init__(self, model: nn.Module, classes: list[str] | None = None, templates: list[str] | None = None):
        super().__init__()
        missing = [fn for fn in ("encode_image", "encode_text", "tokenize") if not callable(getattr(model, fn, None))]
        if missing:
            raise ConfigError(
                f"objective.name={self.objective_name} trains a two-tower image-text model (vitkit.clip.create_clip, "
                f"e.g. clip_nano or siglip_nano), but {type(model).__name__} has no {', '.join(missing)}: "
                "set model.name to a clip_* / siglip_* model, or model.head=clip|siglip"
            )
        self.model = model
        self.classes = list(classes) if classes else None
        self.templates = list(templates) if templates else None
        self._locked: dict[str, nn.Module] = {}
        self._unlocked: list[nn.Module] = []

    @classmethod
    def from_config(cls, model: nn.Module, cfg, *, classes=None, templates=None, **_):
        return cls(model, cfg, classes=classes, templates=templates)

    def lock_image(self, locked: bool, unlocked_blocks: int = 0) -> None:
        """Lock the image tower (see :class:`_LockConfig`); ``unlocked_blocks``: its last N blocks stay trainable."""
        if unlocked_blocks < 0:
            raise ConfigError(f"objective.lock_image_unlocked_blocks must be >= 0, got {unlocked_blocks}")
        if not locked:
            if unlocked_blocks:
                raise ConfigError("objective.lock_image_unlocked_blocks needs objective.lock_image=true")
            self._locked, self._unlocked = {}, []
            return
        tower = self.model.visual
        blocks = list(tower.block_modules()) if callable(getattr(tower, "block_modules", None)) else []
        if unlocked_blocks > len(blocks):
            raise ConfigError(f"objective.lock_image_unlocked_blocks={unlocked_blocks}, but the image tower "
                              f"({type(tower).__name__}) has {len(blocks)} blocks")
        tail = [m for name in ("norm", "fc_norm", "attn_pool", "head_norm")
                if isinstance(m := getattr(tower, name, None), nn.Module)]
        self._locked = {"model.visual": tower}
        self._unlocked = [*blocks[len(blocks) - unlocked_blocks:], *tail] if unlocked_blocks else []

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self._locked

    def freeze(self) -> None:
        super().freeze()
        for m in self._unlocked:
            m.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._unlocked:
            m.train(mode)
        return self

    def embed(self, batch: dict) -> dict:
        images = batch["image"]
        return self.model(images, caption_tokens(self.model, batch, images.device))

    def pair_loss(self, out: dict) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, Tensor]:
        out = self.embed(batch)
        loss = self.pair_loss(out)
        acc_i2t, acc_t2i = _in_batch_accuracy(out["image_embeds"], out["text_embeds"])
        metrics = {"loss": loss, "logit_scale": out["logit_scale"].detach().float(), "acc_i2t": acc_i2t,
                   "acc_t2i": acc_t2i}
        if out.get("logit_bias") is not None:
            metrics["logit_bias"] = out["logit_bias"].detach().float()
        return metrics

    # ------------------------------------------------------------------ evaluation

    def evaluator(self):
        from ..clip.retrieval import RetrievalEvaluator

        retrieval = RetrievalEvaluator()
        if not self.classes:
            return retrieval
        from ..clip.zeroshot import TEMPLATES, ZeroShotEvaluator

        return RetrievalZeroShotEvaluator(retrieval, ZeroShotEvaluator(self.model, self.classes,
                                                                      self.templates or TEMPLATES))

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Normalised ``image_embeds`` (B, E), ``text_embeds`` (M, E) and ``text_to_image`` (M,): the
        image (row of this batch) each text describes. With ``batch["captions"]`` (a list of captions
        per image) every caption is a text; else the one caption (or token row) per image."""
        model = model if model is not None else self.model
        images = batch["image"]
        image_embeds = model.encode_image(images, normalize=True).float()
        all_captions = batch.get("captions")
        if all_captions is not None and "text" not in batch:
            if len(all_captions) != images.shape[0]:
                raise DataError(f"batch['captions'] must hold a list of captions per image ({images.shape[0]} "
                                f"images), got {len(all_captions)}")
            texts = [c for caps in all_captions for c in ([caps] if isinstance(caps, str) else caps)]
            counts = [1 if isinstance(caps, str) else len(caps) for caps in all_captions]
            tokens = model.tokenize(texts).to(images.device)
            owner = torch.repeat_interleave(torch.arange(len(counts), device=images.device),
                                            torch.tensor(counts, device=images.device))
        else:
            tokens = caption_tokens(model, batch, images.device)
            owner = torch.arange(images.shape[0], device=images.device)
        text_embeds = model.encode_text(tokens, normalize=True).float()
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_to_image": owner}


class RetrievalZeroShotEvaluator(Evaluator):
    """Retrieval (primary ``r_mean``) and zero-shot accuracy (``zeroshot_acc1``, ``zeroshot_acc5``) in one pass."""

    def __init__(self, retrieval, zeroshot):
        self.retrieval, self.zeroshot = retrieval, zeroshot
        self.primary, self.higher_is_better = retrieval.primary, retrieval.higher_is_better

    def reset(self) -> None:
        self.retrieval.reset()
        self.zeroshot.reset()

    def begin(self, objective, model, prepare) -> None:
        self.zeroshot.begin(objective, model, prepare)

    def update(self, batch: dict, outputs: dict) -> None:
        self.retrieval.update(batch, outputs)
        self.zeroshot.update(batch, outputs)

    def compute(self) -> dict:
        out = self.retrieval.compute()
        out.update({f"zeroshot_{k}": v for k, v in self.zeroshot.compute().items()})
        return out


@register_objective("clip", ClipConfig)
class Clip(_TwoTowerObjective):
    """CLIP's contrastive loss on a two-tower model (see :func:`clip_loss`).

    Returns ``loss``, ``logit_scale`` (exponentiated), ``acc_i2t`` and ``acc_t2i`` (top-1 of this
    process's batch, its own images against its own captions).
    """

    objective_name = "clip"

    def __init__(self, model: nn.Module, cfg: ClipConfig | None = None, *, classes=None, templates=None):
        super().__init__(model, classes, templates)
        self.cfg = cfg if cfg is not None else ClipConfig()
        self.lock_image(self.cfg.lock_image, self.cfg.lock_image_unlocked_blocks)
        if not 0.0 <= self.cfg.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing must be in [0, 1), got {self.cfg.label_smoothing}")
        if self.cfg.local_loss and not self.cfg.gather_with_grad:
            raise ConfigError(_LOCAL_NEEDS_GRAD)

    def pair_loss(self, out: dict) -> Tensor:
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out.get("logit_bias"),
                         local_loss=self.cfg.local_loss, gather_with_grad=self.cfg.gather_with_grad,
                         label_smoothing=self.cfg.label_smoothing)


@register_objective("siglip", SiglipConfig)
class Siglip(_TwoTowerObjective):
    """SigLIP's sigmoid loss on a two-tower model with a logit bias (see :func:`siglip_loss`).

    Returns ``loss``, ``logit_scale``, ``logit_bias``, ``acc_i2t`` and ``acc_t2i``.
    """

    objective_name = "siglip"

    def __init__(self, model: nn.Module, cfg: SiglipConfig | None = None, *, classes=None, templates=None):
        super().__init__(model, classes, templates)
        self.cfg = cfg if cfg is not None else SiglipConfig()
        self.lock_image(self.cfg.lock_image, self.cfg.lock_image_unlocked_blocks)
        if getattr(model, "logit_bias", None) is None:
            raise ConfigError(
                "objective.name=siglip needs a model with a learnable logit bias (SigLIP starts it at -10): build it "
                "with init_logit_bias=-10 (the siglip_* models have it), or use objective.name=clip"
            )

    def pair_loss(self, out: dict) -> Tensor:
        return siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out.get("logit_bias"),
                           chunked=self.cfg.chunked)

