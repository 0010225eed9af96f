"""The image-generation branch of :func:`vitkit.train.build_run`: tokenizers and generators through the one Trainer.

``objective.name`` picks what the run trains on class-folder (or IDX) data:

- ``vqvae``: a VQ image tokenizer (``model.name`` default ``vq_nano``; ``msvq_nano`` for VAR's
  multi-scale one);
- ``maskgit``, ``var``: a generator over the token maps of the tokenizer run named by
  ``objective.tokenizer`` (``maskgit_nano``, ``var_nano``);
- ``dit``: a diffusion transformer on pixels (``dit_nano``), or on the latents of
  ``objective.tokenizer`` with ``objective.space=latent``.

The generator's shape comes from the tokenizer (MaskGIT: its codebook size and grid; VAR: its
codebook size, embedding width and scales; DiT in latent space: its grid and width) and the
data (image size, channels, classes); ``model.args`` reach the constructor. Images are resized
to ``data.img_size`` (default: the tokenizer's size, else the data's own), not augmented (a
``data.hflip`` set explicitly flips), and normalised with mean = std = 0.5 to [-1, 1].
``run.json`` records ``task: "generate"``, the kind, the classes and the tokenizer reference;
``model.safetensors`` holds the generator. Each evaluation writes a sample grid to
``<run>/samples/``.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from .config import to_dict, user_keys
from .data import EvalTransform, Normalize, TrainTransform, build_loader, prepare_data
from .engine import Trainer
from .errors import ConfigError
from .objectives import build_objective, objective_config
from .rundir import RunDir
from .train_dense import default_out_dir, run_budget

# The objective -> the kind of model it trains and the registered variant it trains by default.
GENERATIVE = {"vqvae": ("tokenizer", "vq_nano"), "maskgit": ("maskgit", "maskgit_nano"), "var": ("var", "var_nano"),
              "dit": ("dit", "dit_nano")}
_OBJECTIVE_OF_KIND = {kind: name for name, (kind, _) in GENERATIVE.items()}
# Each paper's optimiser, with vitkit's lr written per 512 images (scaled to the batch): VQ-VAE Adam
# 2e-4 at batch 128 and a constant rate; MaskGIT AdamW (betas (0.9, 0.96), weight decay 0.045), VAR
# AdamW (betas (0.9, 0.95), weight decay 0.05), DiT AdamW with a constant rate and no weight decay.
# The generators' rate is 1e-3 per 512, not the papers' 1e-4 per 256: those train 30-700M-parameter
# models for hundreds of epochs, vitkit's CPU variants (about 2M) for minutes. Measured on
# Fashion-MNIST, dit_nano at batch 128 after 140 s: validation loss 0.61 at the papers' rate (2e-4
# per 512), 0.46 at 1e-3 per 512 (whose samples already show garment outlines). A key the user sets wins.
_OPTIM = {
    "vqvae": {"optim.lr": 8e-4, "optim.weight_decay": 0.0, "schedule.name": "constant", "schedule.warmup_epochs": 0.0},
    "maskgit": {"optim.lr": 1e-3, "optim.weight_decay": 0.045, "optim.betas": (0.9, 0.96),
                "schedule.warmup_epochs": 1.0},
    "var": {"optim.lr": 1e-3, "optim.weight_decay": 0.05, "optim.betas": (0.9, 0.95), "schedule.warmup_epochs": 1.0},
    "dit": {"optim.lr": 1e-3, "optim.weight_decay": 0.0, "schedule.name": "constant", "schedule.warmup_epochs": 0.0},
}


def _named_generator(cfg) -> str | None:
    """The kind of ``model.name`` when it names a registered generative model, else None."""
    from .generate import generator_kind, list_generators

    return generator_kind(cfg.model.name) if cfg.model.name in list_generators() else None


def wants_generate(cfg) -> bool:
    """True when the run trains image generation: ``--task generate``, a generative ``objective.name``,
    or a generative ``model.name`` on data whose task is not named."""
    if cfg.data.task == "generate" or cfg.objective.get("name") in GENERATIVE:
        return True
    return cfg.data.task is None and bool(cfg.model.name) and _named_generator(cfg) is not None


def _objective(cfg):
    """(name, config) of the generative objective: ``objective.name``, else the kind of ``model.name``."""
    section = dict(cfg.objective)
    named = "objective.name" in user_keys(cfg)
    name = section.get("name")
    if named and name not in GENERATIVE:
        raise ConfigError(f"objective.name={name} does not generate images: image generation trains "
                          "objective.name=vqvae (the tokenizer), maskgit, var or dit")
    if not named:
        kind = _named_generator(cfg) if cfg.model.name else None
        if kind is None:
            raise ConfigError("image generation trains objective.name=vqvae (the tokenizer), maskgit, var or dit: "
                              "set objective.name")
        name = _OBJECTIVE_OF_KIND[kind]  # model.name=maskgit_nano alone means objective.name=maskgit
    return objective_config({**section, "name": name})


def _load_tokenizer(objective_name: str, objective_cfg, verbose: bool):
    """(tokenizer, reference) named by ``objective.tokenizer``, or (None, None) where none is used."""
    from .generate.load import load_tokenizer

    source = getattr(objective_cfg, "tokenizer", None)
    latent = getattr(objective_cfg, "space", "pixels") == "latent"
    needs = objective_name in ("maskgit", "var") or (objective_name == "dit" and latent)
    if not needs:
        if source:
            why = "vqvae trains the tokenizer itself" if objective_name == "vqvae" else \
                "dit reads a tokenizer in objective.space=latent only"
            raise ConfigError(f"objective.tokenizer={source} is not used: {why}; drop objective.tokenizer")
        return None, None
    if not source:
        raise ConfigError(
            f"objective.name={objective_name}{' with objective.space=latent' if latent else ''} learns the token maps "
            "of a VQ tokenizer: train one first (vitkit train --data DIR objective.name=vqvae"
            f"{' model.name=msvq_nano' if objective_name == 'var' else ''} --out runs/tok), then pass "
            "objective.tokenizer=runs/tok"
        )
    tokenizer, ref = load_tokenizer(source)
    if verbose:
        print(f"tokenizer: {tokenizer.model_name} from {ref['source']} (sha256 {ref['sha256'][:12]}...)")
    return tokenizer, ref


def generator_args(kind: str, tokenizer, img_size: int, in_chans: int, num_classes: int,
                   source: str | None = None) -> dict:
    """The constructor arguments the data and the tokenizer fix for a model of ``kind``."""
    if kind == "tokenizer":
        return {"img_size": img_size, "in_chans": in_chans}
    if kind == "maskgit":
        return {"codebook_size": int(tokenizer.codebook_size), "grid": int(tokenizer.grid), "num_classes": num_classes}
    if kind == "var":
        scales = getattr(tokenizer, "scales", None)
        if not scales:
            raise ConfigError(
                f"objective.tokenizer={source} is a single-scale tokenizer ({tokenizer.model_name}): VAR predicts the "
                "token maps of a multi-scale residual tokenizer, coarse to fine; train one with model.name=msvq_nano "
                "(or model.args.quantizer=multiscale) and pass that run"
            )
        return {"codebook_size": int(tokenizer.codebook_size), "embed_dim": int(tokenizer.embed_dim),
                "scales": [int(s) for s in scales], "num_classes": num_classes}
    if kind == "dit" and tokenizer is not None:  # latent space: the tokenizer's pre-quantisation map
        return {"img_size": int(tokenizer.grid), "in_chans": int(tokenizer.embed_dim), "num_classes": num_classes}
    return {"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes}


def build_generator(cfg, objective_name: str, objective_cfg, tokenizer, img_size: int, in_chans: int,
                    num_classes: int):
    """(name, model): ``model.name`` (default: the objective's nano variant) with ``model.args``."""
    from .generate import create_generator, generator_kind

    kind, default = GENERATIVE[objective_name]
    name = cfg.model.name or default
    if generator_kind(name) != kind:
        raise ConfigError(f"model.name={name} is a {generator_kind(name)} model; objective.name={objective_name} "
                          f"trains a {kind} model (default {default})")
    if cfg.model.init:
        raise ConfigError(f"model.init={cfg.model.init}: generative runs start from scratch; continue a run with "
                          "--resume --out RUN")
    fixed = generator_args(kind, tokenizer, img_size, in_chans, num_classes,
                           getattr(objective_cfg, "tokenizer", None))
    user = dict(cfg.model.args)
    if kind == "dit" and tokenizer is not None and "patch_size" not in user:
        fixed["patch_size"] = 1  # the latent grid is already the tokenizer's downsampled one (7x7 at 28 px)
    clash = sorted(k for k in set(fixed) & set(user) if user[k] != fixed[k])
    if clash:
        raise ConfigError(f"model.args {', '.join(f'{k}={user[k]}' for k in clash)} contradict what the data and the "
                          f"tokenizer fix ({', '.join(f'{k}={fixed[k]}' for k in clash)}): drop them")
    return name, create_generator(name, **{**fixed, **user})


def _apply_defaults(cfg, objective_name: str) -> None:
    keys = user_keys(cfg)
    for key, value in _OPTIM[objective_name].items():
        if key not in keys:
            section, field = key.split(".")
            setattr(getattr(cfg, section), field, value)


def build_generate_run(cfg, dist, verbose: bool = True, start: float | None = None):
    """:func:`vitkit.train.build_run` for image generation on class-folder data."""
    d = cfg.data
    show = verbose and dist.is_main
    objective_name, objective_cfg = _objective(cfg)
    kind = GENERATIVE[objective_name][0]
    tokenizer, ref = _load_tokenizer(objective_name, objective_cfg, show)
    data = prepare_data(d.path, val_fraction=d.val_fraction, seed=cfg.engine.seed, in_chans=d.in_chans,
                        max_bad_fraction=d.max_bad_fraction, task="classify")
    if show and data.scan is not None:
        print(data.scan_line())
    info, train_ds, val_ds = data.info, data.train, data.val
    img_size = d.img_size or (int(tokenizer.img_size) if tokenizer is not None else max(info.typical_size))
    in_chans = d.in_chans or (int(tokenizer.in_chans) if tokenizer is not None else info.in_chans)
    if tokenizer is not None and (int(tokenizer.img_size), int(tokenizer.in_chans)) != (img_size, in_chans):
        raise ConfigError(
            f"the tokenizer {ref['source']} encodes {tokenizer.img_size} px {tokenizer.in_chans}-channel images, but "
            f"this run reads {img_size} px {in_chans}-channel ones: drop data.img_size / data.in_chans, or train a "
            "tokenizer at this size"
        )
    for ds in (train_ds, val_ds):
        ds.in_chans = in_chans
    num_classes = info.num_classes
    classes = list(getattr(train_ds, "classes", []) or [str(i) for i in range(num_classes)])
    _apply_defaults(cfg, objective_name)
    name, model = build_generator(cfg, objective_name, objective_cfg, tokenizer, img_size, in_chans, num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    reason = (f"{objective_name}: {name} ({n_params / 1e6:.2f} M parameters) on {img_size} px {in_chans}-channel "
              f"images of {num_classes} classes")
    if show:
        print(reason)
    workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    # A generator learns the data's distribution: no augmentation unless a flip is asked for.
    train_tf = TrainTransform(img_size, in_chans, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=d.hflip) \
        if "data.hflip" in user_keys(cfg) else EvalTransform(img_size, in_chans, crop_pct=1.0)
    eval_tf = EvalTransform(img_size, in_chans, crop_pct=1.0)
    common = dict(num_workers=workers, seed=cfg.engine.seed, distributed=dist.enabled,
                  max_bad_fraction=d.max_bad_fraction)
    train_loader = build_loader(train_ds, d.batch_size, train=True, transform=train_tf, **common)
    val_loader = build_loader(val_ds, d.eval_batch_size or d.batch_size, train=False, transform=eval_tf, **common)
    if len(train_loader) < cfg.engine.accum_steps:
        raise ConfigError(
            f"{len(train_ds)} training images make {len(train_loader)} full batches of data.batch_size="
            f"{d.batch_size} per process, fewer than one optimizer step of engine.accum_steps="
            f"{cfg.engine.accum_steps}: lower data.batch_size (or accum_steps), or train on more images"
        )
    objective = build_objective(objective_name, model, objective_cfg, num_classes=num_classes, tokenizer=tokenizer,
                                tokenizer_ref=ref, seed=cfg.engine.seed)
    if getattr(objective, "judge", None) is not None:  # class ids must mean the same to the judge
        objective.judge.check_classes(classes)
    out_dir = cfg.engine.out_dir if cfg.engine.out_dir != "runs/default" else default_out_dir(cfg, name)
    cfg.engine.out_dir = out_dir
    if hasattr(objective, "sample_dir"):
        objective.sample_dir = RunDir(out_dir).samples
    cfg.model.name, cfg.data.img_size, cfg.data.in_chans, cfg.data.num_classes = name, img_size, in_chans, num_classes
    if ref is not None:  # the saved config finds the tokenizer from any directory (resume, vitkit sample)
        objective_cfg.tokenizer = ref["source"]
    cfg.objective = {"name": objective_name, **asdict(objective_cfg)}
    mean = std = [0.5] * in_chans
    run_info = {
        "task": "generate", "kind": kind, "model": name, "model_args": model.model_args, "img_size": img_size,
        "in_chans": in_chans, "num_classes": num_classes, "classes": classes, "choice": reason,
        "data_format": info.format, "n_train": info.n_train, "n_val": info.n_val, "mean": mean, "std": std,
        "val_fraction": d.val_fraction, "seed": cfg.engine.seed, "tokenizer": ref,
        "objective": {"name": objective_name, **asdict(objective_cfg), "references": objective.references()},
        "bad_files": data.scan.lines() if data.scan is not None else [],
        "class_counts": dict(zip(classes, info.class_counts)), "plan": None,
    }
    trainer = Trainer(
        objective, train_loader, val_loader, cfg=cfg.engine, optim_cfg=cfg.optim, sched_cfg=cfg.schedule,
        out_dir=out_dir, train_transform=Normalize(mean, std), eval_transform=Normalize(mean, std),
        config_to_save=to_dict(cfg), budget=run_budget(cfg, start, None, info.n_val),
    )
    return trainer, run_info
