"""Parameter-efficient fine-tuning in a training run: applying ``cfg.peft`` to the built model,
what the run records about it (``run.json``'s ``peft``), and the adapter file it writes.

A PEFT run's ``model.safetensors`` holds the whole model (base, the method's weights and the head);
``adapter.safetensors`` beside it holds only what training changed, tied to the base by its sha256
(:mod:`vitkit.peft.io`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import ConfigError
from .rundir import ADAPTER


def base_source(cfg, model_name: str) -> str:
    """Where the frozen base weights came from, for the adapter's metadata."""
    return str(cfg.model.init) if cfg.model.init else f"{model_name} (random init, seed {cfg.engine.seed})"


def apply_run_peft(model: nn.Module, cfg, verbose: bool = True):
    """Apply ``cfg.peft`` to ``model`` in place (weights already loaded, head already sized); returns the
    :class:`~vitkit.peft.PeftInfo`, or None when PEFT is off. Prints the trainable/total count."""
    if not cfg.peft.method:
        return None
    from .peft import apply_peft

    info = apply_peft(model, cfg.peft)
    model.peft_base_source = base_source(cfg, getattr(model, "model_name", "") or str(cfg.model.name))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"peft {info.summary()}; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        if not cfg.model.init:
            print("note: peft without model.init adapts a randomly initialised base; pass --init PRETRAINED")
    return info


def peft_run_info(model: nn.Module) -> dict | None:
    """``run.json``'s ``peft`` entry: the method, its counts and the base it adapts."""
    info = getattr(model, "peft_info", None)
    if info is None:
        return None
    return {**info.as_dict(), "base_source": getattr(model, "peft_base_source", None), "adapter": ADAPTER}


def check_peft_task(cfg, task: str) -> None:
    """PEFT adapts classification backbones; on other tasks it would be silently ignored, so it is an error."""
    if cfg.peft.method and task != "classify":
        raise ConfigError(
            f"peft.method={cfg.peft.method} applies to classification runs; {cfg.data.path} is {task} data, "
            "whose runs train every weight: remove peft.method (or set peft.method=none)"
        )


def save_run_adapter(model: nn.Module, run_dir: str | Path) -> Path | None:
    """Write ``adapter.safetensors`` into the run directory when ``model`` carries PEFT; returns its path."""
    if getattr(model, "peft_info", None) is None:
        return None
    from .peft.io import save_adapter

    path = Path(run_dir) / ADAPTER
    save_adapter(model, path, base_source=getattr(model, "peft_base_source", None))
    return path
