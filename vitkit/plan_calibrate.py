"""Measuring this machine for the plan (:mod:`vitkit.plan`): the train and evaluation speed of
a candidate model, the cost of decoding and cropping an image, and whether pretrained weights
can be had (cached, or the hub answers in time)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from .data.transforms import TrainTransform
from .engine.runtime import autocast
from .models import create_model, get_model_card

PRETRAINED_MODEL = "deit_tiny_patch16_224"


def find_pretrained(model_name: str = PRETRAINED_MODEL, timeout_s: float = 3.0) -> str | None:
    """The hub id of ``model_name``'s weights if they are in the local HF cache or the hub answers in time."""
    hub_id = get_model_card(model_name).hub_id
    if not hub_id:
        return None
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, name), str):
            return hub_id
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi().model_info(hub_id, timeout=timeout_s)
    except Exception:  # any failure (no network, DNS, timeout, HTTP error) means: not reachable
        return None
    return hub_id


def time_model(name: str, img_size: int, args: dict, in_chans: int, num_classes: int, batch: int, device,
               amp_dtype, min_s: float = 1.0, max_steps: int = 8) -> tuple[float, float]:
    """(training, evaluation) img/s of model ``name`` at ``img_size``: two untimed steps, then timed forward+backward+update
    steps for at least ``min_s`` seconds (at least 2, at most ``max_steps`` steps); then forward-only
    passes at twice the batch, as the evaluation runs, for a third of that."""
    model = create_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                         **args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_chans, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        with autocast(amp_dtype, device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    step()  # the first steps pay for kernel selection and allocation
    t0 = time.perf_counter()
    n = 0
    while n < 2 or (n < max_steps and time.perf_counter() - t0 < min_s):
        step()
        n += 1
    train_rate = batch * n / (time.perf_counter() - t0)

    model.eval()
    x2 = torch.cat([x, x])
    with torch.no_grad(), autocast(amp_dtype, device):
        model(x2)
        t0 = time.perf_counter()
        n = 0
        while n < 2 or (n < max_steps and time.perf_counter() - t0 < min_s / 3):
            model(x2)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return train_rate, 2 * batch * n / (time.perf_counter() - t0)


def time_decode(dataset, img_size: int, in_chans: int, n: int = 32) -> float:
    """Seconds to read, decode and random-crop one image of ``dataset`` (median-free mean over ``n``)."""
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        return 0.0
    tf = TrainTransform(img_size, in_chans, scale=(0.35, 1.0))
    idx = np.random.default_rng(0).permutation(len(dataset))[:n]
    t0 = time.perf_counter()
    for i in idx:
        tf(dataset[int(i)][0])
    return (time.perf_counter() - t0) / len(idx)
