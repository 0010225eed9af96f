"""`vitkit.sample(run)`: class-conditional images from a generative run (MaskGIT, VAR, DiT) as a PNG grid.

The samples are drawn by the run's own objective (``objective.sample``), rebuilt from its saved
config, so ``vitkit sample`` draws exactly as the evaluations during training did; ``steps`` and
``guidance`` default to the run's ``objective.sample_steps`` and ``objective.guidance``.

>>> from vitkit.sample import sample
>>> sample("runs/maskgit", classes=[3], n=64, steps=8)["path"]
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .engine.runtime import resolve_device
from .errors import ConfigError
from .generate.load import load_generator
from .objectives import build_objective
from .objectives.generative import balanced_labels
from .rundir import RunDir


def class_ids(classes: list[str | int] | None, names: list[str]) -> list[int] | None:
    """Class ids from ids or names (None: every class); ConfigError naming the classes for a bad one."""
    if classes is None:
        return None
    ids = []
    for c in classes:
        text = str(c)
        if text in names:
            ids.append(names.index(text))
        elif text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
            ids.append(int(text))
        else:
            listed = ", ".join(f"{i}={n}" for i, n in enumerate(names))
            raise ConfigError(f"--class {text}: not a class of this model; its classes are {listed}")
    return ids


def _objective(model, info: dict, num_classes: int):
    """The run's objective around ``model``, without its judge (sampling needs none)."""
    section = {k: v for k, v in info["objective"].items() if k != "references"}
    name = section.pop("name")
    if "judge" in section:
        section["judge"] = None
    return build_objective(name, model, section, num_classes=num_classes, tokenizer=info["tokenizer"],
                           tokenizer_ref=info["tokenizer_ref"])


@torch.no_grad()
def sample(source: str | os.PathLike, *, classes: list[str | int] | None = None, n: int = 64,
           steps: int | None = None, guidance: float | None = None, seed: int = 0,
           out: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
           device: str | torch.device | None = None) -> dict:
    """Draw ``n`` images of ``classes`` (ids or names; None: every class in turn) and write them as one grid.

    With several classes (or all) the images are class-balanced, one class per grid row. ``out``
    defaults to ``<run>/samples/sample_<classes>_seed<seed>.png`` (beside the weights for a
    bare file). ``tokenizer`` names the VQ tokenizer of a weights file that does not record it.

    Returns ``{"path", "n", "labels", "classes", "steps", "guidance", "seed", "seconds",
    "s_per_image"}`` (``seconds``: the sampling alone, not loading).
    """
    from .generate.grid import save_grid

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    dev = resolve_device(device)
    model, info = load_generator(source, device=dev, tokenizer=tokenizer)
    names = info["classes"]
    objective = _objective(model, info, len(names)).to(dev).eval()
    ids = class_ids(classes, names)
    if ids is None:
        labels, per = balanced_labels(n, len(names))
    else:
        per = math.ceil(n / len(ids))
        labels = torch.tensor(ids).repeat_interleave(per)[:n]
    nrow = per if ids is None or len(ids) > 1 else math.ceil(math.sqrt(n))
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    t0 = time.perf_counter()
    # None: the run's own objective.sample_steps and objective.guidance (VAR: one step per scale).
    images = objective.sample(labels.to(dev), model=model, steps=steps, guidance=guidance, generator=gen)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if steps is None:
        steps = len(info["tokenizer"].scales) if info["kind"] == "var" else objective.cfg.sample_steps
    guidance = objective.cfg.guidance if guidance is None else guidance
    if out is None:
        home = RunDir(info["run_dir"]).samples if info["run_dir"] is not None else Path(info["weights"]).parent
        tag = "all" if ids is None else "-".join(str(i) for i in ids)
        out = home / f"sample_{tag}_seed{seed}.png"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    path = save_grid(images.float().cpu(), out, nrow=nrow)
    drawn = sorted(set(labels.tolist()))
    return {"path": str(path), "n": n, "labels": labels.tolist(), "classes": [names[i] for i in drawn],
            "steps": steps, "guidance": guidance, "seed": seed, "seconds": seconds, "s_per_image": seconds / n,
            "kind": info["kind"]}


__all__ = ["class_ids", "sample"]
