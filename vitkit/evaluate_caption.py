"""Zero-shot classification and image-text retrieval with a two-tower model (CLIP, SigLIP).

:func:`zeroshot` classifies images by their similarity to prompts made from the class names
(``"a photo of a {}."`` and the other templates of :data:`vitkit.clip.zeroshot.TEMPLATES`, or a
file of your own), CLIP's prompt ensembling: each template's text embedding normalised, averaged
over the templates and normalised again. :func:`retrieve` ranks every caption against every image
and reports recall@k both ways, against chance. Both read the model with
:func:`vitkit.source.load_clip_model` (a caption run, its weights, open_clip or Hugging Face weights)
and see the images as training's evaluation did (shorter side resized, centre crop).

>>> from vitkit.evaluate_caption import zeroshot, retrieve
>>> zeroshot("runs/my-clip", "/data/pets")["top1"]
>>> retrieve("runs/my-clip", "/data/flickr/val.jsonl")["t2i_r5"]
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import ConfigError, DataError, PathNotFoundError
from .source import LoadedModel, load_clip_model

SPLITS = ("all", "train", "val")


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates, one per line, each with ``{}`` where the class name goes (blank lines and ``#`` skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PathNotFoundError(f"no such templates file: {path}: write one template per line, e.g. 'a photo of a {{}}.'")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(f"{path}: every template needs exactly one '{{}}' for the class name "
                          f"({'none found' if not templates else f'not in {bad[:3]}'}), e.g. 'a photo of a {{}}.'")
    return templates


def class_prompt_name(name: str) -> str:
    """A folder name as a prompt word: underscores and hyphens become spaces (``pickup_truck`` -> ``pickup truck``)."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def _datasets(data: str, split: str, lm: LoadedModel, task: str):
    """The dataset(s) of ``split`` ("all": train and val) read as ``task`` (classify or caption)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    s = lm.settings
    kw = dict(val_fraction=s.get("val_fraction", 0.1), seed=s.get("seed", 0),
              max_bad_fraction=s.get("max_bad_fraction", 0.05))
    if task == "caption":
        from .data.captions import build_caption_dataset

        def build(sp):
            return build_caption_dataset(data, sp, **kw)
    else:
        from .data import build_dataset

        def build(sp):
            return build_dataset(data, sp, in_chans=3, **kw)
    return [build(sp) for sp in (("train", "val") if split == "all" else (split,))]


def _loader(ds, lm: LoadedModel, task: str, batch_size: int, num_workers: int | None):
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    kw = dict(num_workers=workers, max_bad_fraction=lm.settings.get("max_bad_fraction", 0.05))
    from .data import build_loader
    from .data.captions import CaptionTransform

    transform = CaptionTransform(lm.transform.size[0], train=False) if task == "caption" else lm.transform
    return build_loader(ds, batch_size, train=False, transform=transform, **kw)


def _write(result: dict, out_dir, lm: LoadedModel, name: str) -> dict:
    out = Path(out_dir) if out_dir is not None else lm.home
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    result[name.split(".")[0] + "_json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def zeroshot(
    source: str | os.PathLike | LoadedModel,
    data: str,
    *,
    templates: list[str] | str | os.PathLike | None = None,
    split: str = "all",
    batch_size: int = 256,
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    use_ema: bool = False,
) -> dict:
    """Zero-shot top-1/top-5 of a two-tower model on labelled images; writes ``zeroshot.json``.

    Args:
        source: a CLIP/SigLIP run, checkpoint or weights (see :func:`~vitkit.source.load_clip_model`).
        data: class folders (or any classification format; the class names come from the folders), or
            caption data that has classes (``shapes-captions``).
        templates: a list of templates with ``{}``, or a file of them (one per line); None: CLIP-style ones.
        split: "all" (every image: the model never trained on this data), or the run's "train"/"val" split.

    Returns:
        ``top1``, ``top5`` (top-k with k = min(5, classes)), ``n``, ``per_class`` (class -> top-1),
        ``classes``, ``templates``, and where the model and the JSON are.
    """
    from .clip.zeroshot import TEMPLATES, zeroshot_classifier, zeroshot_predict
    from .data.task import detect_task

    lm = source if isinstance(source, LoadedModel) else load_clip_model(source, use_ema=use_ema)
    if templates is None:
        templates = list(TEMPLATES)
    elif isinstance(templates, (str, os.PathLike)):
        templates = read_templates(templates)
    task = detect_task(data).task
    if task not in ("classify", "caption"):
        raise ConfigError(f"{data} holds {task} data; zero-shot classification needs class folders")
    datasets = _datasets(data, split, lm, task)
    classes = [str(c) for c in (getattr(datasets[0], "classes", None) or [])]
    if len(classes) < 2:
        raise DataError(f"{data} has {len(classes)} class name(s): zero-shot classification needs at least two classes "
                        "(one folder per class, named by what it shows)")
    classifier = zeroshot_classifier(lm.model, [class_prompt_name(c) for c in classes], templates)
    k = len(classes)
    k5 = min(5, k)
    correct1 = torch.zeros(k, dtype=torch.long)
    correct5 = torch.zeros(k, dtype=torch.long)
    count = torch.zeros(k, dtype=torch.long)
    for ds in datasets:
        for batch in _loader(ds, lm, task, batch_size, num_workers):
            labels = torch.as_tensor(batch["label"]).long()
            if (labels < 0).any():
                raise DataError(f"{data}: some images have no class; zero-shot classification needs every image labelled")
            logits = zeroshot_predict(lm.model, lm.normalize(batch["image"].to(lm.device)), classifier).float().cpu()
            top = logits.topk(k5, dim=1).indices
            hit1 = top[:, 0] == labels
            hit5 = (top == labels[:, None]).any(1)
            count += torch.bincount(labels, minlength=k)
            correct1 += torch.bincount(labels[hit1], minlength=k)
            correct5 += torch.bincount(labels[hit5], minlength=k)
    n = int(count.sum())
    if n == 0:
        raise DataError(f"{data} ({split}) has no readable images")
    per_class = {c: float(correct1[i] / count[i]) for i, c in enumerate(classes) if count[i] > 0}
    result = {
        "model": str(lm.weights or ""), "data": str(data), "split": split, "n": n,
        "top1": float(correct1.sum()) / n, "top5": float(correct5.sum()) / n, "top5_k": k5,
        "per_class": per_class, "classes": classes, "templates": list(templates), "chance_top1": 1.0 / k,
    }
    return _write(result, out_dir, lm, "zeroshot.json")


def chance_recall(n_images: int, n_texts: int, captions_per_image: float, k: int) -> tuple[float, float]:
    """(image->text, text->image) recall@k of a random ranking: text->image ``k / n_images``; image->text the
    chance that ``k`` texts drawn from ``n_texts`` include one of an image's ``captions_per_image``."""
    t2i = min(1.0, k / max(1, n_images))
    c = max(1, round(captions_per_image))
    miss = math.comb(n_texts - c, k) / math.comb(n_texts, k) if n_texts >= k and n_texts - c >= k else 0.0
    return 1.0 - miss, t2i


@torch.no_grad()
def retrieve(
    source: str | os.PathLike | LoadedModel,
    data: str,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    split: str = "all",
    batch_size: int = 256,
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    use_ema: bool = False,
) -> dict:
    """Image->text and text->image recall@k of a two-tower model on captioned images; writes ``retrieve.json``.

    Every caption of an image is a text query (its image is the hit); an image query hits when any of
    its captions is among the top k texts.

    Args:
        data: caption data (a ``captions.jsonl``/``.csv``, a folder with one, WebDataset shards, shapes-captions).
        ks: the recall cut-offs.
        split: "all" (every image), or the run's "train"/"val" split of its own data.

    Returns:
        ``i2t_r{k}``, ``t2i_r{k}``, ``r_mean``, ``chance`` (the same keys for a random ranking),
        ``n_images``, ``n_texts``, and where the model and the JSON are.
    """
    from .clip.retrieval import retrieval_metrics
    from .data.task import detect_task

    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ConfigError(f"recall cut-offs must be positive integers, got {ks}")
    lm = source if isinstance(source, LoadedModel) else load_clip_model(source, use_ema=use_ema)
    choice = detect_task(data)
    if choice.task != "caption" and not os.path.exists(data) and "built-in" not in choice.reason:
        raise PathNotFoundError(f"no such file or folder: {data}: pass captioned images (a captions.jsonl/.csv, a "
                                "folder holding one, WebDataset jpg+txt shards, or shapes-captions)")
    if choice.task != "caption":
        raise DataError(f"{data} has no captions ({choice.reason}): retrieval needs image-text pairs, e.g. a "
                        "captions.jsonl with lines {\"image\": \"images/a.jpg\", \"captions\": [\"...\", ...]}")
    image_embeds, texts, owner = [], [], []
    n_images = 0
    for ds in _datasets(data, split, lm, "caption"):
        for batch in _loader(ds, lm, "caption", batch_size, num_workers):
            image_embeds.append(lm.image_embeds(batch["image"]).cpu())
            for i, caps in enumerate(batch["captions"]):
                texts += list(caps)
                owner += [n_images + i] * len(caps)
            n_images += len(batch["captions"])
    if n_images < 2 or not texts:
        raise DataError(f"{data} ({split}) has {n_images} captioned image(s): retrieval needs at least two")
    images = torch.cat(image_embeds)
    text_embeds = lm.text_embeds(texts, batch_size).cpu()
    metrics = retrieval_metrics(images, text_embeds, torch.tensor(owner, dtype=torch.long), ks=ks)
    metrics = {k: float(v) for k, v in metrics.items()}
    cpi = len(texts) / n_images
    chance = {}
    for k in ks:
        chance[f"i2t_r{k}"], chance[f"t2i_r{k}"] = chance_recall(n_images, len(texts), cpi, k)
    result = {
        "model": str(lm.weights or ""), "data": str(data), "split": split, "n_images": n_images,
        "n_texts": len(texts), "captions_per_image": cpi, "ks": list(ks), **metrics,
        "r_mean": sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks)), "chance": chance,
    }
    return _write(result, out_dir, lm, "retrieve.json")
