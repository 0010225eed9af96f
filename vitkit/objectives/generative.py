"""The base of the class-conditional generative objectives (``maskgit``, ``var``, ``dit``).

A :class:`GenerativeObjective` trains a generator (``self.model``) on labelled images in [-1, 1],
optionally through a frozen VQ tokenizer (``self.tokenizer``) that a previous run trained. The
tokenizer is recorded by reference (its source and the sha256 of its weights, the rule of
:func:`vitkit.objectives.teacher.weights_sha256`), never saved in checkpoints; resuming loads it
again and checks the hash.

Classifier-free guidance: during training ``drop_labels`` replaces a ``class_dropout`` share of
the labels by the null class (id ``num_classes``), so the same network also learns the
unconditional model; samplers mix the two outputs as ``u + guidance * (c - u)``.

Each evaluation (:class:`GenerationEvaluator`) reports the mean per-sample validation ``loss``,
writes a class-balanced grid of samples to ``<run>/samples/step_<N>.png`` (N zero-padded to six
digits, as checkpoints are; the same seed every time, so the grids show the run's progress), and
with ``objective.judge=<classifier run>`` scores ``judge_samples`` class-balanced samples with
that classifier: ``class_consistency`` (its accuracy on the samples, the primary metric, higher
is better) and ``fd``, the Frechet distance between the samples and as many real validation
images in its pooled pre-logit feature space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..engine.distributed import all_gather_object, get_rank, get_world_size
from ..engine.evaluators import Evaluator, MeanEvaluator
from ..errors import ConfigError
from .base import Objective, StepContext


@dataclass
class GenerativeConfig:
    """``objective.*`` keys every generative objective has (each adds its own).

    ``tokenizer``: a VQ tokenizer run directory or weights file (``maskgit``, ``var``: required;
    ``dit``: for ``space=latent`` only). ``class_dropout``: share of training labels replaced by
    the null class, which trains the unconditional model classifier-free guidance needs (MaskGIT,
    VAR, DiT: 0.1). ``guidance``, ``sample_steps``: the guidance scale and the decoding or
    integration steps of the evaluation samples. ``grid_samples``: images in the class-balanced
    grid written at each evaluation (0: none). ``judge``: a classifier run that scores the
    samples at each evaluation (class consistency, Frechet distance); ``judge_samples``: how many
    samples, and real validation images, it compares.
    """

    tokenizer: str | None = None
    class_dropout: float = 0.1
    guidance: float = 1.0
    sample_steps: int = 8
    grid_samples: int = 40
    judge: str | None = None
    judge_samples: int = 1000


def check_generative_config(cfg: GenerativeConfig) -> None:
    """A value out of range is a ConfigError naming the key."""
    if not 0 <= cfg.class_dropout < 1:
        raise ConfigError(f"objective.class_dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.sample_steps < 1:
        raise ConfigError(f"objective.sample_steps must be >= 1, got {cfg.sample_steps}")
    if cfg.grid_samples < 0:
        raise ConfigError(f"objective.grid_samples must be >= 0 (0: no sample grids), got {cfg.grid_samples}")
    if cfg.judge and cfg.judge_samples < 2:
        raise ConfigError(f"objective.judge_samples must be >= 2 (the Frechet distance needs a covariance), "
                          f"got {cfg.judge_samples}")


def balanced_labels(n: int, num_classes: int) -> tuple[Tensor, int]:
    """(labels (n,), per-class count): ``ceil(n / K)`` images of each class in turn, class 0 first.

    A grid written with that many images per row shows one class per row.
    """
    per = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per)[:n], per


class GenerativeObjective(Objective):
    """Base class: a class-conditional generator, an optional frozen tokenizer, guidance and sampling.

    Subclasses implement :meth:`forward` (training loss), :meth:`eval_outputs` (per-sample ``loss``
    of the model being evaluated) and :meth:`sample`. A subclass that overrides :meth:`on_step_end`
    calls ``super().on_step_end(ctx)``: the base tracks the step the sample grids are named by.

    Args:
        model: the generator (its ``kind`` is maskgit, var or dit).
        cfg: the objective's config (a :class:`GenerativeConfig` subclass).
        num_classes: the data's classes; label ``num_classes`` is the null class.
        tokenizer: the frozen VQ tokenizer (None for a pixel-space model).
        tokenizer_ref: where the tokenizer came from, ``{"source", "sha256"}``
            (:func:`vitkit.generate.load.load_tokenizer`).
    """

    def __init__(self, model: nn.Module, cfg: GenerativeConfig, *, num_classes: int,
                 tokenizer: nn.Module | None = None, tokenizer_ref: dict | None = None):
        super().__init__()
        check_generative_config(cfg)
        if num_classes < 1:
            raise ConfigError(f"a class-conditional generator needs labelled data, got {num_classes} classes")
        self.model = model
        self.cfg = cfg
        self.num_classes = int(num_classes)
        if tokenizer is not None:
            tokenizer.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_ref = dict(tokenizer_ref) if tokenizer_ref else None
        self.sample_dir: Path | None = None  # set by the run: <run>/samples
        self.step = 0
        # The judge is no submodule: its weights stay out of state_dict, checkpoints and DDP.
        self.__dict__["_judge"] = None
        self.judge_ref: dict | None = None
        if cfg.judge:
            self._load_judge(torch.device("cpu"))

    @classmethod
    def from_config(cls, model: nn.Module, cfg: GenerativeConfig, *, num_classes: int,
                    tokenizer: nn.Module | None = None, tokenizer_ref: dict | None = None, **_) -> GenerativeObjective:
        return cls(model, cfg, num_classes=num_classes, tokenizer=tokenizer, tokenizer_ref=tokenizer_ref)

    # ------------------------------------------------------------------ frozen modules

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer} if self.tokenizer is not None else {}

    def references(self) -> dict[str, dict]:
        refs = {}
        if self.tokenizer is not None and self.tokenizer_ref:
            refs["tokenizer"] = {"source": self.tokenizer_ref["source"], "sha256": self.tokenizer_ref["sha256"]}
        if self.judge_ref is not None:  # metrics of one run compare samples by one classifier
            refs["judge"] = dict(self.judge_ref)
        return refs

    # ------------------------------------------------------------------ training

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``labels`` with a ``class_dropout`` share (each independently) replaced by the null class ``num_classes``."""
        p = self.cfg.class_dropout
        if p <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def on_step_end(self, ctx: StepContext) -> None:
        self.step = ctx.step

    # ------------------------------------------------------------------ subclasses

    def forward(self, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> {{'loss': ...}}")

    @torch.no_grad()
    def eval_outputs(self, batch: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement eval_outputs(batch, model) -> per-sample loss")

    @torch.no_grad()
    def sample(self, labels: Tensor, *, model: nn.Module | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] of classes ``labels`` (B,), drawn with ``model`` (None: ``self.model``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(labels, ...)")

    # ------------------------------------------------------------------ evaluation

    def _load_judge(self, device: torch.device):
        from .judge import load_judge

        judge = load_judge(self.cfg.judge, device=str(device))
        if self.judge_ref is not None and judge.sha256 != self.judge_ref["sha256"]:
            raise ConfigError(f"objective.judge={self.cfg.judge} changed while the run was using it: start a new run")
        judge.check_classes(self.num_classes)
        if self.cfg.judge_samples <= judge.num_features:  # a rank-deficient covariance: FD is not defined
            raise ConfigError(
                f"objective.judge_samples={self.cfg.judge_samples} must exceed the judge's feature width "
                f"({judge.num_features}) for the Frechet distance: raise objective.judge_samples"
            )
        self.__dict__["_judge"] = judge
        self.__dict__["_judge_device"] = device
        self.judge_ref = dict(judge.reference)  # source, model, sha256, test_acc (the consistency's ceiling)
        return judge

    @property
    def judge(self):
        """The classifier of ``objective.judge`` (a :class:`~vitkit.objectives.judge.Judge`), or None."""
        return self.__dict__["_judge"]

    def judge_on(self, device: torch.device):
        """The judge (None without ``objective.judge``) on ``device``; loaded there once."""
        if self.judge is None:
            return None
        if self.__dict__.get("_judge_device") != torch.device(device):
            return self._load_judge(torch.device(device))
        return self.judge

    def evaluator(self) -> GenerationEvaluator:
        device = next(self.model.parameters()).device
        return GenerationEvaluator(
            self.num_classes, judge=self.judge_on(device), judge_samples=self.cfg.judge_samples,
            grid_samples=self.cfg.grid_samples, sample_dir=self.sample_dir, step=self.step,
            steps=None, guidance=None,  # each objective samples with its own objective.sample_steps, guidance
        )


class GenerationEvaluator(Evaluator):
    """The evaluation of a generative objective: validation loss, a sample grid, and the judge's scores.

    ``update`` averages the per-sample outputs of ``eval_outputs`` (``loss``). ``begin`` draws the
    samples with the model being evaluated (the EMA copy's grid is ``step_<N>_ema.png``): a
    class-balanced grid of ``grid_samples`` with a fixed seed, written by the main process to
    ``sample_dir`` when set; with a ``judge``, ``judge_samples`` class-balanced samples (class
    ``i % K`` for the i-th), split over the processes. ``update`` also feeds up to
    ``judge_samples`` real validation images (in [-1, 1]) to the judge. ``compute`` gathers both
    sets from every process: ``class_consistency`` is the judge's accuracy on the samples against
    the classes asked for; ``fd`` the Frechet distance between the first ``n`` samples and ``n``
    real images, ``n`` = the smaller count (equal sizes on both sides: the distance is biased by
    the sample size), reported as ``fd_n``.

    ``steps`` and ``guidance`` go to ``objective.sample``; None: its own ``objective.sample_steps`` and
    ``objective.guidance`` (VAR takes no step count: one step per scale). Primary metric:
    ``class_consistency`` (higher is better) with a judge, else ``loss``.
    """

    def __init__(self, num_classes: int, *, judge=None, judge_samples: int = 1000, grid_samples: int = 40,
                 sample_dir: str | Path | None = None, step: int = 0, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, chunk: int = 250):
        self.num_classes, self.judge, self.judge_samples = num_classes, judge, judge_samples
        self.grid_samples, self.sample_dir, self.step = grid_samples, sample_dir, step
        self.steps, self.guidance, self.seed, self.chunk = steps, guidance, seed, chunk
        self.primary = "class_consistency" if judge is not None else "loss"
        self.higher_is_better = judge is not None
        self.grid_path: Path | None = None
        self.reset()

    def reset(self) -> None:
        self.means = MeanEvaluator()
        self.real: list[Tensor] = []  # this process's judge features of real images, (n, D) float64 CPU
        self.n_real = 0
        self.fake: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # index, features, logits, labels

    @torch.no_grad()
    def _sample(self, objective, model, labels: Tensor, seed: int) -> Tensor:
        """Images of ``labels`` in chunks; one seeded generator on the model's device for the whole set."""
        device = labels.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        out = [objective.sample(labels[i:i + self.chunk], model=model, steps=self.steps, guidance=self.guidance,
                                generator=gen) for i in range(0, len(labels), self.chunk)]
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def begin(self, objective, model, prepare) -> None:
        device = next(model.parameters()).device
        if self.sample_dir is not None and self.grid_samples > 0:
            from ..generate.grid import save_grid

            labels, per = balanced_labels(self.grid_samples, self.num_classes)
            # Every process draws the grid (a sharded model needs all of them); the main one writes it.
            images = self._sample(objective, model, labels.to(device), self.seed)
            if get_rank() == 0:
                suffix = "" if model is objective.model else "_ema"
                path = Path(self.sample_dir) / f"step_{self.step:06d}{suffix}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                self.grid_path = save_grid(images.float().cpu(), path, nrow=per)
        if self.judge is not None:
            # The same count on every process (the same number of forward passes under FSDP);
            # extra samples beyond judge_samples are dropped in compute().
            per_rank = math.ceil(self.judge_samples / get_world_size())
            index = torch.arange(per_rank) + get_rank() * per_rank
            labels = index % self.num_classes
            images = self._sample(objective, model, labels.to(device), self.seed + 1 + get_rank())
            feats, logits = self._judge(images)
            self.fake = (index, feats, logits, labels)

    def _judge(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The judge's (features, logits) of images in [-1, 1], float64 on the CPU, in chunks."""
        feats, logits = [], []
        for i in range(0, len(images), self.chunk):
            f, lg = self.judge(images[i:i + self.chunk].float())
            feats.append(f.detach().double().cpu())
            logits.append(lg.detach().double().cpu())
        if not feats:
            return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, self.num_classes, dtype=torch.float64)
        return torch.cat(feats), torch.cat(logits)

    def update(self, batch: dict, outputs: dict) -> None:
        self.means.update(batch, outputs)
        if self.judge is not None and self.n_real < self.judge_samples:
            images = batch["image"][: self.judge_samples - self.n_real]
            self.real.append(self._judge(images)[0])
            self.n_real += len(images)

    def compute(self) -> dict[str, float]:
        out = self.means.compute()  # every process: one all-reduce
        if self.judge is None:
            return out
        from ..generate.metrics import class_consistency, feature_stats, frechet_distance

        fakes = [f for f in all_gather_object(self.fake) if f is not None]
        reals = [torch.cat(r) for r in all_gather_object(self.real) if r]
        if not fakes:
            return out
        index = torch.cat([f[0] for f in fakes])
        order = index.argsort()
        keep = order[index[order] < self.judge_samples]  # the first judge_samples samples, in index order
        feats, logits, labels = (torch.cat([f[i] for f in fakes])[keep] for i in (1, 2, 3))
        out["class_consistency"] = float(class_consistency(logits, labels))
        real = torch.cat(reals)[: self.judge_samples] if reals else torch.zeros(0, feats.shape[1])
        n = min(len(real), len(feats))
        if n >= 2:
            mu_f, sigma_f = feature_stats(feats[:n])
            mu_r, sigma_r = feature_stats(real[:n])
            out["fd"] = float(frechet_distance(mu_f, sigma_f, mu_r, sigma_r))
            out["fd_n"] = float(n)
        return out


__all__ = ["GenerationEvaluator", "GenerativeConfig", "GenerativeObjective", "balanced_labels",
           "check_generative_config"]
