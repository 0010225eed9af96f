"""``apply_peft``: freeze a backbone, add one method's trainable parameters, keep its head trainable.

The method is chosen from a dispatch table (``METHOD_FNS``: method -> ``fn(model, cfg, exclude)``
returning the names of the parameters it adds or unfreezes). Applicability is decided from the
model's public structure (``block_modules()``, Linear names, the token layout), never per family,
so a method that does not apply is refused with the list of those that do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

from torch import nn

from ..errors import ConfigError
from ..weights_io import state_sha256
from .adaptformer import adaptformer_unsupported
from .bitfit import apply_bitfit, is_bias
from .config import METHODS, PeftConfig
from .lora import apply_lora, linear_names, lora_target_names
from .partial import apply_partial
from .vpt import vpt_unsupported

MethodFn = Callable[[nn.Module, PeftConfig, tuple[str, ...]], list[str]]


def _apply_linear(model: nn.Module, cfg: PeftConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    return []  # a linear probe trains the head alone, which apply_peft unfreezes for every method


# method -> fn(model, cfg, exclude) -> names of the method's own trainable parameters; ``exclude``
# holds the head's module names, which every method leaves to apply_peft.
METHOD_FNS: dict[str, MethodFn] = {
    "linear": _apply_linear,
    "bitfit": apply_bitfit,
    "lora": apply_lora,
    "partial": apply_partial,
}


def register_method(name: str, fn: MethodFn) -> None:
    """Make ``fn`` the implementation of ``peft.method=name`` (one of ``METHODS``)."""
    if name not in METHODS:
        raise ValueError(f"{name!r} is not one of the peft methods {METHODS}")
    METHOD_FNS[name] = fn


@dataclass
class PeftInfo:
    """What :func:`apply_peft` did: the method's trainable parameters, the head's, and the base they sit on.

    ``params`` / ``head``: parameter names; ``n_method`` / ``n_head``: their element counts;
    ``n_base``: every parameter of the model before the method, the head excluded;
    ``base_sha256``: :func:`state_sha256` of the base without its head (identifies the base
    whatever file it was loaded from; an adapter is refused on another base).
    """

    method: str
    params: list[str]
    head: list[str]
    n_method: int
    n_head: int
    n_base: int
    base_sha256: str

    @property
    def pct(self) -> float:
        """The method's trainable parameters as a percentage of the base's (head excluded)."""
        return 100.0 * self.n_method / self.n_base if self.n_base else 0.0

    def summary(self) -> str:
        """One line, e.g. ``lora: 147,456 trainable (0.68% of 21.7M) + head 3,850``."""
        return f"{self.method}: {self.n_method:,} trainable ({self.pct:.2f}% of {_millions(self.n_base)}) + head {self.n_head:,}"

    def as_dict(self) -> dict:
        """The counts and the base's sha256, for run records (parameter names left out)."""
        d = asdict(self)
        del d["params"], d["head"]
        return {**d, "pct": self.pct}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of the model's classifiers (``classifier_names()``; none for a model without one)."""
    fn = getattr(model, "classifier_names", None)
    return tuple(fn()) if callable(fn) else ()


# ---------------------------------------------------------------------- applicability
def _blocks(model: nn.Module) -> list[nn.Module] | None:
    fn = getattr(model, "block_modules", None)
    if not callable(fn):
        return None
    blocks = fn()
    return blocks or None


def _why_not(model: nn.Module, method: str, cfg: PeftConfig) -> str | None:
    """Why ``method`` does not apply to ``model`` (None: it applies)."""
    if method == "linear":
        return None
    if method == "bitfit":
        head = head_names(model)
        ok = any(is_bias(n) and not _under(n, head) for n, _ in model.named_parameters())
        return None if ok else "it has no bias terms outside the head"
    if method == "partial":
        return None if _blocks(model) else "it lists no repeated blocks (block_modules())"
    if method == "lora":
        if lora_target_names(model, list(cfg.lora_targets), head_names(model)):
            return None
        return (f"no Linear layer matches peft.lora_targets={list(cfg.lora_targets)} "
                f"(its Linear layers are named {linear_names(model)})")
    if method == "adaptformer":
        return adaptformer_unsupported(model)
    if method in ("vpt_shallow", "vpt_deep"):
        return vpt_unsupported(model)
    raise ConfigError(f"peft.method must be one of {', '.join(METHODS)}, got {method!r}")


def supported_methods(model: nn.Module, cfg: PeftConfig | None = None) -> list[str]:
    """The methods (``METHODS`` order) that apply to ``model``; LoRA is judged with ``cfg.lora_targets``."""
    cfg = cfg or PeftConfig()
    return [m for m in METHODS if m in METHOD_FNS and _why_not(model, m, cfg) is None]


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "model_name", None)
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


# ---------------------------------------------------------------------- BatchNorm
def _keep_eval(module: nn.Module, args):
    module.training = False


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every BatchNorm layer in eval mode (running statistics used, never updated), even after
    ``model.train()``. Returns how many layers it froze."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if not getattr(m, "_peft_frozen", False):
                # A pre-hook survives model.train(), deepcopy and DDP wrapping, unlike an overridden method.
                m.register_forward_pre_hook(_keep_eval)
                m._peft_frozen = True
            n += 1
    return n


# ---------------------------------------------------------------------- apply
def apply_peft(model: nn.Module, cfg: PeftConfig) -> PeftInfo:
    """Make ``model`` a parameter-efficient fine-tuning model IN PLACE and describe what trains.

    Records the base's sha256 (head excluded), freezes every parameter, applies ``cfg.method``,
    unfreezes the classifier head, and freezes BatchNorm statistics unless ``norm_stats="save"``.
    The result is stored as ``model.peft_info`` (:class:`PeftInfo`) and ``model.peft_config``.
    """
    if not isinstance(cfg, PeftConfig):  # a mapping, e.g. a run config's ``peft`` section read back
        cfg = PeftConfig(**dict(cfg))
    cfg.check()
    # A plain list (not an OmegaConf ListConfig), so that the config saved with an adapter is JSON.
    cfg = replace(cfg, lora_targets=[str(t) for t in cfg.lora_targets])
    if not cfg.active:
        raise ConfigError("apply_peft needs a method: set peft.method to one of " + ", ".join(METHODS))
    if getattr(model, "peft_info", None) is not None:
        raise ConfigError(f"this model already has peft.method={model.peft_info.method} applied; start from the base model")
    method = cfg.method
    why = _why_not(model, method, cfg)
    if why is not None or method not in METHOD_FNS:
        ok = supported_methods(model, cfg)
        reason = why or "it is not available in this build"
        raise ConfigError(
            f"peft.method={method} does not apply to {_model_name(model)}: {reason}. "
            f"Methods that apply to it: {', '.join(ok)}"
        )
    head = head_names(model)
    base_sha = state_sha256(model, exclude=head)
    n_base = sum(p.numel() for n, p in model.named_parameters() if not _under(n, head))
    for p in model.parameters():
        p.requires_grad_(False)

    params = METHOD_FNS[method](model, cfg, head)
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    if missing:
        raise RuntimeError(f"peft method {method} named parameters the model does not have: {missing[:5]}")
    for n in params:
        named[n].requires_grad_(True)
    head_params = [n for n in named if _under(n, head)]
    for n in head_params:
        named[n].requires_grad_(True)
    if cfg.norm_stats == "freeze":
        freeze_batchnorm(model)

    info = PeftInfo(
        method=method, params=list(params), head=head_params,
        n_method=sum(named[n].numel() for n in params), n_head=sum(named[n].numel() for n in head_params),
        n_base=n_base, base_sha256=base_sha,
    )
    model.peft_info = info
    model.peft_config = cfg
    return info


__all__ = [
    "METHOD_FNS", "PeftInfo", "apply_peft", "freeze_batchnorm", "head_names", "register_method", "state_sha256",
    "supported_methods",
]
