"""Generative models from runs and files: the tokenizer a generator trains on, and a generator to sample.

A source is a run directory (its final weights; for a run that did not finish, its best
checkpoint's, else its latest checkpoint's), a checkpoint directory of a run, or a
``model.safetensors`` written by ``save_weights`` (it carries the model's name and arguments).
Checkpoint weights carry no metadata: their architecture comes from the run's ``run.json``.

:func:`load_tokenizer` reads a VQ tokenizer (``vitkit train objective.name=vqvae``) and its
reference ``{"source", "sha256"}``; the sha256 is of the weights as loaded, the rule teachers
use (sorted names, dtypes, shapes and bytes), so one tokenizer has one identity whatever file
holds it. :func:`load_generator` reads a MaskGIT, VAR or DiT run with what sampling needs: its
classes, its objective's config and its tokenizer, loaded again from the recorded source and
checked against the recorded sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, PathNotFoundError, RunDirError, WeightsError
from ..rundir import RunDir, resolve_weights
from ..weights_io import read_metadata, read_state_dict, state_sha256
from .registry import create_generator, generator_kind, list_generators

# The generators that cannot sample without their tokenizer (DiT needs one in latent space only).
_TOKEN_KINDS = ("maskgit", "var")


def _run_info(run: RunDir | None) -> dict:
    return run.read_run_info() if run is not None and run.is_run() else {}


def architecture(weights: Path, run: RunDir | None) -> tuple[str, dict, str] | None:
    """(registered generator name, its arguments, its kind) of generative weights, else None.

    The run's ``run.json`` decides for a generative run; a weights file on its own by the
    ``model_name`` its metadata records.
    """
    info = _run_info(run)
    if info.get("task") == "generate":
        return info["model"], dict(info.get("model_args") or {}), info.get("kind") or generator_kind(info["model"])
    if info:  # a run of another task: its file's metadata names that model
        return None
    if weights.is_file() and weights.suffix == ".safetensors":
        name = read_metadata(weights).get("model_name")
        if name in list_generators():
            return name, json.loads(read_metadata(weights).get("model_args") or "{}"), generator_kind(name)
    return None


def generative_kind(source: str | os.PathLike) -> str | None:
    """The kind (tokenizer, maskgit, var, dit) of a generative run or weights file; None for any other model."""
    try:
        weights, run = resolve_weights(source)
    except (PathNotFoundError, RunDirError):
        return None
    arch = architecture(weights, run)
    return arch[2] if arch is not None else None


def _describe(weights: Path, run: RunDir | None) -> str:
    info = _run_info(run)
    if info:
        return f"a {info.get('task', 'classify')} run of {info.get('model')}"
    return "a weights file without a generative model's name in its metadata"


def _build(name: str, args: dict, weights: Path) -> nn.Module:
    model = create_generator(name, **args)
    state, where = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{where} does not fit {name} ({type(model).__name__}): missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; the file was not saved from this model")
    return model.eval()


def load_tokenizer(source: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The VQ tokenizer at ``source`` (frozen, eval mode) and its reference ``{"source", "sha256"}``.

    ``source`` in the reference is the absolute path, so a run can find it from any directory.

    Raises:
        PathNotFoundError: nothing at ``source``.
        ConfigError: ``source`` holds another model (a classifier, a generator).
        WeightsError: the weights do not fit the recorded architecture.
    """
    what = f"objective.tokenizer={source}"
    weights, run = resolve_weights(source, what=what)
    arch = architecture(weights, run)
    if arch is None:
        raise ConfigError(f"{what} is {_describe(weights, run)}, not a VQ tokenizer: train one first "
                          "(vitkit train --data DIR objective.name=vqvae --out runs/tok) and pass its run directory")
    name, args, kind = arch
    if kind != "tokenizer":
        raise ConfigError(f"{what} is a {kind} run ({name}), not a VQ tokenizer: pass the tokenizer run it was "
                          "trained on (its run.json records it under tokenizer.source)")
    model = _build(name, args, weights).to(device).requires_grad_(False)
    return model, {"source": str(Path(source).expanduser().resolve()), "sha256": state_sha256(model)}


def load_generator(source: str | os.PathLike, *, device: str | torch.device = "cpu",
                   tokenizer: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """A MaskGIT, VAR or DiT at ``source`` (eval mode) and what sampling needs.

    ``info``: ``kind``, ``model_name``, ``classes`` (names, index = class id), ``tokenizer`` (the
    frozen tokenizer module, or None), ``tokenizer_ref``, ``objective`` (the run's objective
    section, ``{"name": kind}`` for a bare weights file), ``config`` (the run's resolved config,
    {} without a run), ``weights`` and ``run_dir``. ``tokenizer`` names the tokenizer when the run
    has no record of it (a bare weights file) or it moved; a recorded one must have the recorded
    sha256.

    Raises:
        PathNotFoundError: nothing at ``source``.
        ConfigError: ``source`` is not a generator (a classifier; a tokenizer, which does not
            sample), or the generator's tokenizer is unknown.
        WeightsError: the tokenizer is not the one the run was trained with.
    """
    weights, run = resolve_weights(source)
    arch = architecture(weights, run)
    if arch is None:
        raise ConfigError(f"{source} is {_describe(weights, run)}, not a generative model: sample from a run "
                          "trained with objective.name=maskgit, var or dit")
    name, args, kind = arch
    if kind == "tokenizer":
        raise ConfigError(f"{source} is a VQ tokenizer: it encodes and decodes images but does not draw them; "
                          f"train a generator on it (vitkit train --data DIR objective.name=maskgit "
                          f"objective.tokenizer={source}) and sample from that run")
    model = _build(name, args, weights).to(device)
    info = _run_info(run)
    config = run.read_config() if run is not None and run.has_config() else {}
    objective = dict(config.get("objective") or {"name": kind})
    recorded = info.get("tokenizer") or None
    tok, ref = None, None
    if tokenizer is not None or recorded is not None:
        tok, ref = load_tokenizer(tokenizer if tokenizer is not None else recorded["source"], device)
        if recorded is not None and recorded.get("sha256") != ref["sha256"]:
            raise WeightsError(
                f"the tokenizer at {ref['source']} (sha256 {ref['sha256'][:12]}...) is not the one {source} was "
                f"trained with (sha256 {str(recorded.get('sha256'))[:12]}...): pass the run's own tokenizer"
            )
    elif kind in _TOKEN_KINDS:
        raise ConfigError(f"{source} is a {kind} model, which draws tokens that its VQ tokenizer decodes, and "
                          "nothing records that tokenizer: pass it (vitkit sample ... --tokenizer TOKENIZER_RUN)")
    num_classes = int(getattr(model, "num_classes", args.get("num_classes", 0)) or 0)
    classes = list(info.get("classes") or [str(i) for i in range(num_classes)])
    return model, {
        "kind": kind, "model_name": name, "classes": classes, "tokenizer": tok, "tokenizer_ref": ref,
        "objective": objective, "config": config, "weights": weights, "run_dir": run.path if run is not None else None,
    }


__all__ = ["architecture", "generative_kind", "load_generator", "load_tokenizer"]
