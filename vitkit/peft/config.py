"""The ``peft:`` config section: which parameter-efficient method adapts the backbone, and its keys.

Plain data, no torch: :mod:`vitkit.config` nests it in the run config, and every key can be set
from the command line (``peft.method=lora peft.lora_rank=4``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import ConfigError

METHODS = ("linear", "bitfit", "lora", "vpt_shallow", "vpt_deep", "adaptformer", "partial")
NORM_STATS = ("freeze", "save")
# A LoRA target containing one of these is a regular expression on the full module name.
REGEX_CHARS = frozenset(".*[]^$|")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: train a small part of a pretrained backbone, plus its head.

    ``method`` None (or ``"none"``) trains the whole model as usual. Otherwise the backbone is
    frozen and only the method's own parameters and the classifier head train:

    - ``linear``: the head alone (a linear probe).
    - ``bitfit``: every bias of the backbone (BitFit, Ben Zaken et al. 2022).
    - ``lora``: a rank-``lora_rank`` update ``B @ A`` scaled by ``lora_alpha / lora_rank`` beside each
      Linear named in ``lora_targets`` (LoRA, Hu et al. 2021). A target matches a Linear whose last
      name component equals it (``qkv``, ``proj``, ``fc1``, ``fc2``), or, when it contains one of
      ``.*[]^$|``, is a regular expression the full module name must match (``blocks\\.1[01]\\..*qkv``).
    - ``vpt_shallow`` / ``vpt_deep``: ``vpt_prompts`` learned prompt tokens at the input of the
      first block, or a fresh set at every block (VPT, Jia et al. 2022).
    - ``adaptformer``: a bottleneck of width ``adapter_width`` beside each block's MLP, scaled by
      ``adapter_scale`` (AdaptFormer, Chen et al. 2022).
    - ``partial``: the last ``partial_k`` blocks and the final norm.

    ``norm_stats``: ``freeze`` keeps BatchNorm layers (conv stems) in eval mode with the running
    statistics they came with; ``save`` lets them update and saves them with the adapter.
    """

    method: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    vpt_prompts: int = 10
    vpt_dropout: float = 0.0
    adapter_width: int = 64
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.0
    partial_k: int = 1
    norm_stats: str = "freeze"

    @property
    def active(self) -> bool:
        """Whether a method is set (``None`` and ``"none"`` both mean full training)."""
        return self.method not in (None, "none")

    def check(self) -> None:
        """Raise :class:`~vitkit.errors.ConfigError` naming the key for an unknown method or a bad number."""
        if self.method is not None and self.method not in (*METHODS, "none"):
            raise ConfigError(f"peft.method must be one of {', '.join(METHODS)} (or none), got {self.method!r}")
        rules = [
            ("lora_rank", self.lora_rank >= 1, "an integer >= 1"),
            ("lora_alpha", math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "a number > 0"),
            ("vpt_prompts", self.vpt_prompts >= 1, "an integer >= 1"),
            ("adapter_width", self.adapter_width >= 1, "an integer >= 1"),
            ("adapter_scale", math.isfinite(self.adapter_scale), "a finite number"),
            ("partial_k", self.partial_k >= 1, "an integer >= 1 (the number of last blocks to train)"),
        ]
        rules += [(k, 0.0 <= getattr(self, k) < 1.0, "in [0, 1)") for k in ("lora_dropout", "vpt_dropout", "adapter_dropout")]
        for key, ok, rule in rules:
            if not ok:
                raise ConfigError(f"peft.{key} must be {rule}, got {getattr(self, key)!r}")
        if self.norm_stats not in NORM_STATS:
            raise ConfigError(f"peft.norm_stats must be one of {', '.join(NORM_STATS)}, got {self.norm_stats!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"peft.lora_targets must be a non-empty list of module names such as [qkv, proj], got {targets!r}"
            )
        for t in targets:
            if is_regex(t):
                try:
                    re.compile(t)
                except re.error as e:
                    raise ConfigError(f"peft.lora_targets: {t!r} is not a valid regular expression ({e})") from None


def is_regex(target: str) -> bool:
    """Whether a LoRA target is a regular expression on the full module name (else a last name component)."""
    return bool(REGEX_CHARS.intersection(target))


__all__ = ["METHODS", "NORM_STATS", "PeftConfig", "is_regex"]
